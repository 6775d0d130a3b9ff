//! bf16 1×1 convolutions (the residual blocks' skip connections, attention's QKV and output
//! projections) on AMX tiles: matrix products with no taps, so several images are stacked on one
//! position axis with no gaps, and the tile kernels of [`super::amx`] run with a single tap.
//!
//! In f32 (and without AMX) these convolutions stay im2col-free GEMMs ([`super::cpu`]).

use super::direct::with_scratch;
use rayon::prelude::*;

/// Images per task: stacks of about 1,024 positions, at most 16 images.
fn stack(n: usize) -> usize {
    (1024 / n.max(1)).clamp(1, 16)
}

/// Packs `k` images [C, N] (consecutive in `x`) as channel pairs on one position axis:
/// [padded_pairs(C), q] words, position j·N + p of image j, zero beyond k·N and in the padding
/// pairs.
fn pack_pairs(x: &[f32], c: usize, n: usize, k: usize, q: usize, out: &mut Vec<u32>) {
    let rows = super::amx::padded_pairs(c);
    out.clear();
    out.resize(rows * q, 0);
    for j in 0..k {
        for p in 0..c.div_ceil(2) {
            let lo = &x[(j * c + 2 * p) * n..][..n];
            let dst = &mut out[p * q + j * n..][..n];
            if 2 * p + 1 < c {
                let hi = &x[(j * c + 2 * p + 1) * n..][..n];
                for ((d, &a), &b) in dst.iter_mut().zip(lo).zip(hi) {
                    *d = super::bf16::bf16_bits(a) | (super::bf16::bf16_bits(b) << 16);
                }
            } else {
                for (d, &a) in dst.iter_mut().zip(lo) {
                    *d = super::bf16::bf16_bits(a);
                }
            }
        }
    }
}

/// y [B, Cout, N] = W · x [B, Cin, N] (+ bias) with weights in [Cin, Cout] order, products in
/// bf16 on AMX tiles.
///
/// The caller checks [`super::amx::available`] and [`super::amx::fits`]`(cin, cout)`.
pub(crate) fn forward(
    x: &[f32],
    (b, cin, n): (usize, usize, usize),
    wt: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert!(super::amx::available() && super::amx::fits(cin, cout));
    let wa = super::amx::pack_weights(wt, cin, 1, cout);
    let k = stack(n);
    let q = (k * n).div_ceil(32) * 32;
    let mut out = super::output_buffer(b * cout * n);
    out.par_chunks_mut(k * cout * n)
        .enumerate()
        .for_each(|(t, o)| {
            let m = o.len() / (cout * n);
            let xs = &x[t * k * cin * n..][..m * cin * n];
            with_scratch((false, usize::MAX, cin, n), |s| {
                pack_pairs(xs, cin, n, m, q, &mut s.pairs);
                s.outq.resize(cout * q, 0.0);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AMX checked above; `pairs` holds padded_pairs(cin) rows of q words
                // (the padding zero) and one tap at offset 0 reads within each row; `wa` is
                // the packing for one tap; `outq` is [cout, q] with q a multiple of 32.
                unsafe {
                    super::amx::products(&s.pairs, q, q, &[0], cin, &wa, cout, &mut s.outq)
                };
                for j in 0..m {
                    for co in 0..cout {
                        let add = bias.map_or(0.0, |b| b[co]);
                        let src = &s.outq[co * q + j * n..][..n];
                        let dst = &mut o[(j * cout + co) * n..][..n];
                        for (d, &v) in dst.iter_mut().zip(src) {
                            d.write(v + add);
                        }
                    }
                }
            })
        });
    // SAFETY: every element of every image was written above.
    unsafe { super::assume_init(out) }
}

/// [dW; db] for y = W · x: dW [Cout, Cin] = Σ over images and positions of dY ⊗ x (products of
/// bf16-rounded operands, f32 sums, on AMX tiles), db [Cout] = Σ dY.
///
/// The caller checks [`super::amx::available`] and that cin and cout are multiples of 16.
pub(crate) fn weight_grad(
    dy: &[f32],
    x: &[f32],
    (b, cin, n): (usize, usize, usize),
    cout: usize,
) -> Vec<f32> {
    assert!(super::amx::available() && cin.is_multiple_of(16) && cout.is_multiple_of(16));
    let k = stack(n);
    let len = (k * n).div_ceil(32) * 32;
    let nw = cout * cin;
    super::cpu::sum_over_images(b, nw + cout, |images, dw| {
        let (dw, db) = dw.split_at_mut(nw);
        let (mut x16, mut dyv) = (vec![0u16; cin * len], vec![0u32; len / 2 * cout]);
        let mut i0 = images.start;
        while i0 < images.end {
            let m = k.min(images.end - i0);
            // Positions past m·N stay zero from the previous (full) chunks or the start, except
            // in a short last chunk: clear the tail then.
            if m < k {
                x16.fill(0);
                dyv.fill(0);
            }
            for j in 0..m {
                let img = i0 + j;
                for c in 0..cin {
                    let src = &x[(img * cin + c) * n..][..n];
                    for (d, &v) in x16[c * len + j * n..][..n].iter_mut().zip(src) {
                        *d = super::bf16::bf16_bits(v) as u16;
                    }
                }
                for c in 0..cout {
                    let src = &dy[(img * cout + c) * n..][..n];
                    db[c] += super::cpu::sum(src) as f32;
                    for (p, &v) in src.iter().enumerate() {
                        let at = j * n + p;
                        let word = &mut dyv[at / 2 * cout + c];
                        let bits = super::bf16::bf16_bits(v);
                        *word = if at % 2 == 0 {
                            (*word & 0xffff_0000) | bits
                        } else {
                            (*word & 0xffff) | (bits << 16)
                        };
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AMX checked above; len is a multiple of 32 and a 1×1 kernel reads
            // nothing past it; cin and cout are multiples of 16; x16 is [cin, len], dyv
            // [len/2, cout], dw [cout, cin].
            unsafe {
                super::amx::weight_grad(&x16, len, &dyv, len, 0, 1, cin, cout, dw)
            };
            i0 += m;
        }
    })
}
