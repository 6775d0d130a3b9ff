//! bf16 1×1 convolutions (the residual blocks' skip connections, attention's QKV and output
//! projections) on AMX tiles: matrix products with no taps, so several images are stacked on one
//! position axis with no gaps, and the tile kernels of [`super::amx`] run with a single tap.
//!
//! In f32 (and without AMX) these convolutions stay im2col-free GEMMs ([`super::cpu`]).

use super::direct::with_scratch;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Images per task: stacks of about 1,024 positions, at most 16 images.
fn stack(n: usize) -> usize {
    (1024 / n.max(1)).clamp(1, 16)
}

/// The kernel's rows [C, q] (the stacked images' positions) back to images [C, N] (+ bias);
/// every element of `out` (whole images) is written.
fn unstack(
    outq: &[f32],
    c: usize,
    n: usize,
    q: usize,
    bias: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
) {
    for (j, img) in out.chunks_exact_mut(c * n).enumerate() {
        for (co, dst) in img.chunks_exact_mut(n).enumerate() {
            let add = bias.map_or(0.0, |b| b[co]);
            for (d, &v) in dst.iter_mut().zip(&outq[co * q + j * n..][..n]) {
                d.write(v + add);
            }
        }
    }
}

/// Packs `k` images [C, N] (consecutive in `x`) as channel pairs on one position axis:
/// [padded_pairs(C), q] words, position j·N + p of image j, zero beyond k·N and in the padding
/// pairs.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL (compiled for them so that the conversion
/// vectorises).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_pairs(x: &[f32], c: usize, n: usize, k: usize, q: usize, out: &mut Vec<u32>) {
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
    let mut out = crate::output_buffer(b * cout * n);
    out.par_chunks_mut(k * cout * n)
        .enumerate()
        .for_each(|(t, o)| {
            let m = o.len() / (cout * n);
            let xs = &x[t * k * cin * n..][..m * cin * n];
            with_scratch((false, usize::MAX, cin, n), |s| {
                s.outq.resize(cout * q, 0.0);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AMX (checked above) implies AVX-512 F, BW and VL.
                unsafe {
                    pack_pairs(xs, cin, n, m, q, &mut s.pairs)
                };
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AMX checked above; `pairs` holds padded_pairs(cin) rows of q words
                // (the padding zero) and one tap at offset 0 reads within each row; `wa` is
                // the packing for one tap; `outq` is [cout, q] with q a multiple of 32.
                unsafe {
                    super::amx::products(&s.pairs, q, q, &[0], cin, &wa, cout, &mut s.outq)
                };
                unstack(&s.outq, cout, n, q, bias, o);
            })
        });
    // SAFETY: every element of every image was written above.
    unsafe { crate::assume_init(out) }
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
    assert!(super::amx::available() && super::amx::fits_weight_grad(cin, cout));
    let k = stack(n);
    let len = (k * n).div_ceil(32) * 32;
    let nw = cout * cin;
    super::sum_over_images(b, nw + cout, |images, dw| {
        let (dw, db) = dw.split_at_mut(nw);
        let half = len / 2;
        let (mut x16, mut dy16) = (vec![0u16; cin * len], vec![0u32; half * cout]);
        let mut dyv = vec![0u32; half * cout];
        let mut i0 = images.start;
        while i0 < images.end {
            let m = k.min(images.end - i0);
            // Positions past m·N stay zero from the previous (full) chunks or the start, except
            // in a short last chunk: clear the tail then.
            if m < k {
                x16.fill(0);
                dy16.fill(0);
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
                    db[c] += super::sum(src) as f32;
                    // SAFETY: the u16 view of row c of dy16 ([cout, len/2] words) is aligned
                    // and in bounds; x86 is little-endian, so position 2k is word k's low half.
                    let r16 = unsafe {
                        std::slice::from_raw_parts_mut(
                            dy16.as_mut_ptr().add(c * half).cast::<u16>(),
                            len,
                        )
                    };
                    for (d, &v) in r16[j * n..][..n].iter_mut().zip(src) {
                        *d = super::bf16::bf16_bits(v) as u16;
                    }
                }
            }
            // Every word of dyv is rewritten from dy16.
            super::amx::stage::transpose_pairs(&dy16, half, cout, &mut dyv);
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

/// Copies `k` images [C, N] (consecutive in `x`) onto one position axis: [C, q] floats,
/// position j·N + p of image j, zero beyond k·N.
fn stack_rows(x: &[f32], c: usize, n: usize, k: usize, q: usize, out: &mut Vec<f32>) {
    out.clear();
    out.resize(c * q, 0.0);
    for j in 0..k {
        for ch in 0..c {
            out[ch * q + j * n..][..n].copy_from_slice(&x[(j * c + ch) * n..][..n]);
        }
    }
}

/// y [B, Cout, N] = W · x [B, Cin, N] (+ bias) with weights in [Cin, Cout] order, in f32 on
/// AVX-512: 8 output channels × 32 positions of accumulators per block.
///
/// The caller checks that the CPU has AVX-512 F and VL.
pub(crate) fn forward_f32(
    x: &[f32],
    (b, cin, n): (usize, usize, usize),
    wt: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert!(crate::Isa::detected() >= crate::Isa::Avx512);
    let k = stack(n);
    let q = (k * n).div_ceil(32) * 32;
    let mut out = crate::output_buffer(b * cout * n);
    out.par_chunks_mut(k * cout * n)
        .enumerate()
        .for_each(|(t, o)| {
            let m = o.len() / (cout * n);
            let xs = &x[t * k * cin * n..][..m * cin * n];
            with_scratch((false, usize::MAX - 1, cin, n), |s| {
                stack_rows(xs, cin, n, m, q, &mut s.staged);
                s.outq.resize(cout * q, 0.0);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512 checked above; `staged` is [cin, q], `outq` [cout, q], q a
                // multiple of 32, `wt` [cin, cout].
                unsafe {
                    f32_kernels::forward(&s.staged, q, cin, wt, cout, &mut s.outq)
                };
                unstack(&s.outq, cout, n, q, bias, o);
            })
        });
    // SAFETY: every element of every image was written above.
    unsafe { crate::assume_init(out) }
}

/// [dW; db] for y = W · x in f32 on AVX-512 (as [`weight_grad`]).
///
/// The caller checks that the CPU has AVX-512 F and VL.
pub(crate) fn weight_grad_f32(
    dy: &[f32],
    x: &[f32],
    (b, cin, n): (usize, usize, usize),
    cout: usize,
) -> Vec<f32> {
    assert!(crate::Isa::detected() >= crate::Isa::Avx512);
    let k = stack(n);
    let len = (k * n).div_ceil(16) * 16;
    let nw = cout * cin;
    super::sum_over_images(b, nw + cout, |images, dw| {
        let (dw, db) = dw.split_at_mut(nw);
        let (mut xs, mut ds) = (Vec::new(), Vec::new());
        let mut i0 = images.start;
        while i0 < images.end {
            let m = k.min(images.end - i0);
            stack_rows(&x[i0 * cin * n..][..m * cin * n], cin, n, m, len, &mut xs);
            stack_rows(
                &dy[i0 * cout * n..][..m * cout * n],
                cout,
                n,
                m,
                len,
                &mut ds,
            );
            for (c, d) in db.iter_mut().enumerate() {
                *d += super::sum(&ds[c * len..(c + 1) * len]) as f32;
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 checked above; xs is [cin, len], ds [cout, len], len a multiple
            // of 16, dw [cout, cin].
            unsafe {
                f32_kernels::weight_grad(&xs, &ds, len, cin, cout, dw)
            };
            i0 += m;
        }
    })
}

#[cfg(target_arch = "x86_64")]
mod f32_kernels {
    use std::arch::x86_64::*;

    /// outq[co, p] = Σ_ci wt[ci, co] · xs[ci, p] for p < q.
    ///
    /// # Safety
    /// AVX-512 F and VL; xs is [cin, q], outq [cout, q], wt [cin, cout], q a multiple of 32.
    pub unsafe fn forward(
        xs: &[f32],
        q: usize,
        cin: usize,
        wt: &[f32],
        cout: usize,
        outq: &mut [f32],
    ) {
        assert!(
            q.is_multiple_of(32)
                && xs.len() >= cin * q
                && outq.len() >= cout * q
                && wt.len() >= cin * cout
        );
        for (co, cb) in super::super::direct::channel_blocks(cout) {
            // SAFETY: forwarded, within the bounds asserted.
            unsafe {
                match cb {
                    8 => block::<8>(xs, q, cin, wt, cout, co, outq),
                    4 => block::<4>(xs, q, cin, wt, cout, co, outq),
                    _ => block::<1>(xs, q, cin, wt, cout, co, outq),
                }
            }
        }
    }

    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn block<const CB: usize>(
        xs: &[f32],
        q: usize,
        cin: usize,
        wt: &[f32],
        cout: usize,
        co0: usize,
        outq: &mut [f32],
    ) {
        let (x, w) = (xs.as_ptr(), wt.as_ptr());
        let mut p0 = 0;
        while p0 < q {
            let mut acc = [[_mm512_setzero_ps(); 2]; CB];
            for ci in 0..cin {
                // SAFETY: p0 + 32 ≤ q inside row ci; weights ci·cout + co0 .. + CB ≤ cin·cout.
                let (x0, x1) = unsafe {
                    (
                        _mm512_loadu_ps(x.add(ci * q + p0)),
                        _mm512_loadu_ps(x.add(ci * q + p0 + 16)),
                    )
                };
                for (c, a) in acc.iter_mut().enumerate() {
                    let wv = unsafe { _mm512_set1_ps(*w.add(ci * cout + co0 + c)) };
                    a[0] = _mm512_fmadd_ps(x0, wv, a[0]);
                    a[1] = _mm512_fmadd_ps(x1, wv, a[1]);
                }
            }
            for (c, a) in acc.iter().enumerate() {
                // SAFETY: p0 + 32 ≤ q inside row co0 + c of outq.
                unsafe {
                    let dst = outq.as_mut_ptr().add((co0 + c) * q + p0);
                    _mm512_storeu_ps(dst, a[0]);
                    _mm512_storeu_ps(dst.add(16), a[1]);
                }
            }
            p0 += 32;
        }
    }

    /// dw[co, ci] += Σ_p ds[co, p] · xs[ci, p] for p < len, 4 × 4 channel blocks (16
    /// accumulators) where the counts allow, single rows and columns at the edges.
    ///
    /// # Safety
    /// AVX-512 F and VL; xs is [cin, len], ds [cout, len], dw [cout, cin], len a multiple of 16.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn weight_grad(
        xs: &[f32],
        ds: &[f32],
        len: usize,
        cin: usize,
        cout: usize,
        dw: &mut [f32],
    ) {
        assert!(
            len.is_multiple_of(16)
                && xs.len() >= cin * len
                && ds.len() >= cout * len
                && dw.len() >= cout * cin
        );
        let (x, d) = (xs.as_ptr(), ds.as_ptr());
        let blocks = |n: usize| (0..n).step_by(4).map(move |s| (s, (n - s).min(4)));
        for (co, cb) in blocks(cout) {
            for (ci, ib) in blocks(cin) {
                let mut acc = [[_mm512_setzero_ps(); 4]; 4];
                let mut p = 0;
                while p < len {
                    // SAFETY: p + 16 ≤ len inside rows co .. co + cb of ds and ci .. ci + ib
                    // of xs.
                    let xv: [__m512; 4] = std::array::from_fn(|i| unsafe {
                        _mm512_loadu_ps(x.add((ci + i.min(ib - 1)) * len + p))
                    });
                    for (o, a) in acc.iter_mut().enumerate().take(cb) {
                        let dv = unsafe { _mm512_loadu_ps(d.add((co + o) * len + p)) };
                        for i in 0..4 {
                            a[i] = _mm512_fmadd_ps(dv, xv[i], a[i]);
                        }
                    }
                    p += 16;
                }
                for (o, a) in acc.iter().enumerate().take(cb) {
                    for (i, v) in a.iter().enumerate().take(ib) {
                        dw[(co + o) * cin + ci + i] += _mm512_reduce_add_ps(*v);
                    }
                }
            }
        }
    }
}
