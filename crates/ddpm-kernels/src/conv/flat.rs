//! The f32 direct 3×3 kernels on the unpadded position layout.
//!
//! The padded grid (`direct::Grid`, which the bf16 kernels use) computes two junk
//! columns per row (W+2 positions for W pixels: 7% at 28×28, 12% at 14×14, 22% at 7×7, more in
//! the weight gradient) so that every tap is a plain shifted load. Here positions are the pixels themselves, y·W + x, and the two
//! taps that would wrap around a row's ends (x - 1 at x = 0, x + 1 at x = W - 1) are masked
//! loads instead; only the row above and below needs zeros. Several small images are stacked on
//! one position axis, one zero row apart, so that 7×7 and 14×14 maps fill whole vectors.

use super::direct::{channel_blocks, with_scratch, LANES, QV};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `k` images of [H, W] stacked on one position axis: pixel (y, x) of image j at position
/// p = j·(H+1)·W + y·W + x; the row after each image separates it from the next (its outputs
/// are computed and dropped). A staged input holds position p at index p + W + 1, so that the
/// tap (ky, kx) of position p is at index p + ky·W + kx; everything not written is zero.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Flat {
    h: usize,
    w: usize,
    /// Positions computed per channel: the stack, rounded up to whole blocks.
    q: usize,
    /// Stride between channels of a staged input (covers the furthest tap of the last block).
    s: usize,
}

impl Flat {
    /// The layout for `k` images of [h, w], positions rounded up to multiples of `block`.
    fn new(h: usize, w: usize, k: usize, block: usize) -> Self {
        let q = (k * (h + 1) * w - w).div_ceil(block) * block;
        let s = (q + 2 * w + 2).div_ceil(LANES) * LANES;
        Self { h, w, q, s }
    }

    /// Images per task: stacks of about 900 positions (7×7 and 14×14 maps stack; at 28×28 one
    /// image is already that big), at most 8 images.
    fn stack(h: usize, w: usize) -> usize {
        (900 / ((h + 1) * w)).clamp(1, 8)
    }

    /// Distance between consecutive images on the position axis.
    fn stride(&self) -> usize {
        (self.h + 1) * self.w
    }

    /// Per vector of 16 positions from 0 to `len`: the lanes whose left neighbour (x - 1) and
    /// right neighbour (x + 1) are in the same row, as masks for the kx = 0 and kx = 2 taps.
    fn masks(&self, len: usize) -> Vec<[u16; 2]> {
        (0..len / LANES)
            .map(|v| {
                let (mut left, mut right) = (0u16, 0u16);
                for l in 0..LANES {
                    let x = (v * LANES + l) % self.w;
                    left |= u16::from(x != 0) << l;
                    right |= u16::from(x != self.w - 1) << l;
                }
                [left, right]
            })
            .collect()
    }

    /// Copies `n` ≤ k images [C, H, W] (consecutive in `x`) into the staged layout [C, row],
    /// `row` ≥ s. A buffer of the same size keeps its zeros (only pixels are ever written), so
    /// it is cleared only when the size changes; slots of images beyond `n` keep stale pixels,
    /// which only reach outputs that are dropped.
    fn stage(&self, x: &[f32], c: usize, n: usize, row: usize, buf: &mut Vec<f32>) {
        if buf.len() != c * row {
            buf.clear();
            buf.resize(c * row, 0.0);
        }
        let hw = self.h * self.w;
        for j in 0..n {
            for ch in 0..c {
                let at = ch * row + self.w + 1 + j * self.stride();
                buf[at..at + hw].copy_from_slice(&x[(j * c + ch) * hw..][..hw]);
            }
        }
    }

    /// The kernel's rows [C, q] back to `n` images [C, H, W]; every element of `out` is written.
    fn unstage(&self, outq: &[f32], c: usize, n: usize, out: &mut [MaybeUninit<f32>]) {
        let hw = self.h * self.w;
        for j in 0..n {
            for ch in 0..c {
                let src = &outq[ch * self.q + j * self.stride()..][..hw];
                for (d, &v) in out[(j * c + ch) * hw..][..hw].iter_mut().zip(src) {
                    d.write(v);
                }
            }
        }
    }
}

/// y [B, Cout, H, W] = conv3x3(x [B, Cin, H, W]) with weights in [Cin, 9, Cout] order (+ bias).
///
/// The caller checks [`super::direct::available`].
pub(crate) fn conv(
    x: &[f32],
    (b, cin, h, w): (usize, usize, usize, usize),
    wt: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let k = Flat::stack(h, w);
    let f = Flat::new(h, w, k, QV * LANES);
    let masks = f.masks(f.q);
    let (img_in, img_out) = (cin * h * w, cout * h * w);
    let mut out = crate::output_buffer(b * img_out);
    out.par_chunks_mut(k * img_out)
        .enumerate()
        .for_each(|(t, o)| {
            let n = o.len() / img_out;
            let x = &x[t * k * img_in..][..n * img_in];
            with_scratch((false, cin, h, w), |s| {
                f.stage(x, cin, n, f.s, &mut s.staged);
                // Every position of every channel is written by the kernel: no clearing.
                s.outq.resize(cout * f.q, 0.0);
                // SAFETY: the caller checked available(); the kernel's loads stay inside
                // `staged` ([cin, s], s covering the furthest tap of the last block) and its
                // stores inside `outq` ([cout, q]); `masks` has q / 16 entries.
                unsafe {
                    kernels::forward(&s.staged, &f, &masks, cin, wt, cout, bias, &mut s.outq)
                };
                f.unstage(&s.outq, cout, n, o);
            })
        });
    // SAFETY: unstage wrote every element of every image.
    unsafe { crate::assume_init(out) }
}

/// The weight and bias gradients packed as [dW; db] (see [`super::direct::backward_weight`]).
///
/// The caller checks [`super::direct::available`].
pub(crate) fn weight_grad(
    dy: &[f32],
    x: &[f32],
    (b, cin, h, w): (usize, usize, usize, usize),
    cout: usize,
) -> Vec<f32> {
    // Several images on one position axis, so that each accumulator is reduced once per chunk
    // rather than once per image; the chunk's output gradient, re-read for every input
    // channel, is sized to stay in L2.
    let stride = (h + 1) * w;
    let chunk = (384 * 1024 / (cout * stride * 4)).clamp(1, 16);
    let f = Flat::new(h, w, chunk, LANES);
    let masks = f.masks(f.q);
    let nw = cout * cin * 9;
    let hw = h * w;
    super::sum_over_images(b, nw + cout, |images, dw| {
        let (dw, db) = dw.split_at_mut(nw);
        let (mut staged, mut dyq) = (Vec::new(), Vec::new());
        let mut last_n = 0;
        let mut i0 = images.start;
        while i0 < images.end {
            let n = chunk.min(images.end - i0);
            // Positions of n images (whole vectors); the row holds the furthest tap too.
            let len = Flat::new(h, w, n, LANES).q;
            let row = len + 2 * w + 2;
            // A chunk of the same size overwrites exactly the previous chunk's pixels, and the
            // zeros between them stay: the buffers are cleared only when the size changes.
            if n != last_n {
                staged.clear();
                dyq.clear();
                dyq.resize(cout * len, 0.0);
                last_n = n;
            }
            f.stage(
                &x[i0 * cin * hw..][..n * cin * hw],
                cin,
                n,
                row,
                &mut staged,
            );
            for j in 0..n {
                for c in 0..cout {
                    let src = &dy[((i0 + j) * cout + c) * hw..][..hw];
                    dyq[c * len + j * stride..][..hw].copy_from_slice(src);
                    db[c] += super::sum(src) as f32;
                }
            }
            // SAFETY: available() was checked by the caller; weight_grad calls the kernel only
            // within the bounds it asserts, and len ≤ q, so `masks` covers every vector.
            let rows = |x, d, len, cb, sums: &mut _| unsafe {
                kernels::row_sums(x, d, len, cb, &masks, sums)
            };
            // SAFETY: as for `rows`.
            unsafe {
                super::direct::weight_grad(&staged, row, &dyq, len, LANES, w, cin, cout, dw, rows)
            };
            i0 += n;
        }
    })
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use super::{channel_blocks, Flat, LANES, QV};
    use std::arch::x86_64::*;

    /// outq[co, p] = bias[co] + Σ_ci Σ_tap wt[ci, tap, co] · staged[ci, p + ky·W + kx], with
    /// the row-wrapping taps masked.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn forward(
        staged: &[f32],
        f: &Flat,
        masks: &[[u16; 2]],
        cin: usize,
        wt: &[f32],
        cout: usize,
        bias: Option<&[f32]>,
        outq: &mut [f32],
    ) {
        assert!(
            staged.len() >= cin * f.s
                && outq.len() >= cout * f.q
                && masks.len() * LANES >= f.q
                && wt.len() >= cin * 9 * cout
                && f.q.is_multiple_of(QV * LANES)
                && f.s >= f.q + 2 * f.w + 2
        );
        for (co, cb) in channel_blocks(cout) {
            // SAFETY (all calls): the assert above.
            unsafe {
                match cb {
                    8 => block::<8>(staged, f, masks, cin, wt, cout, co, bias, outq),
                    4 => block::<4>(staged, f, masks, cin, wt, cout, co, bias, outq),
                    _ => block::<1>(staged, f, masks, cin, wt, cout, co, bias, outq),
                }
            }
        }
    }

    /// Output channels co0..co0+CB over all positions, QV vectors of positions at a time.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn block<const CB: usize>(
        staged: &[f32],
        f: &Flat,
        masks: &[[u16; 2]],
        cin: usize,
        wt: &[f32],
        cout: usize,
        co0: usize,
        bias: Option<&[f32]>,
        outq: &mut [f32],
    ) {
        let offs: [usize; 9] = std::array::from_fn(|t| (t / 3) * f.w + t % 3);
        let p = staged.as_ptr();
        let wp = wt.as_ptr();
        let mut q0 = 0;
        while q0 < f.q {
            let m: [[u16; 2]; QV] = std::array::from_fn(|v| masks[q0 / LANES + v]);
            let mut acc = [[_mm512_setzero_ps(); QV]; CB];
            for ci in 0..cin {
                // SAFETY: q0 + QV·16 - 1 + off(8) < s, so every load is inside channel ci;
                // co0 + CB <= cout.
                let base = unsafe { p.add(ci * f.s + q0) };
                let wrow = unsafe { wp.add(ci * 9 * cout + co0) };
                for (t, &off) in offs.iter().enumerate() {
                    let xs: [__m512; QV] = std::array::from_fn(|v| unsafe {
                        let at = base.add(off + v * LANES);
                        match t % 3 {
                            0 => _mm512_maskz_loadu_ps(m[v][0], at),
                            1 => _mm512_loadu_ps(at),
                            _ => _mm512_maskz_loadu_ps(m[v][1], at),
                        }
                    });
                    for (c, a) in acc.iter_mut().enumerate() {
                        let wv = _mm512_set1_ps(unsafe { *wrow.add(t * cout + c) });
                        for v in 0..QV {
                            a[v] = _mm512_fmadd_ps(wv, xs[v], a[v]);
                        }
                    }
                }
            }
            for (c, a) in acc.iter().enumerate() {
                let bv = _mm512_set1_ps(bias.map_or(0.0, |b| b[co0 + c]));
                // SAFETY: q0 + QV·16 <= q, inside row co0 + c of outq.
                let dst = unsafe { outq.as_mut_ptr().add((co0 + c) * f.q + q0) };
                for (v, &av) in a.iter().enumerate() {
                    unsafe { _mm512_storeu_ps(dst.add(v * LANES), _mm512_add_ps(av, bv)) };
                }
            }
            q0 += QV * LANES;
        }
    }

    /// The row kernel of [`super::super::direct::weight_grad`] on the flat layout: the kx = 0 and kx = 2 taps
    /// masked with `masks` (one entry per vector of positions, covering `len`).
    pub unsafe fn row_sums(
        x: *const f32,
        d: *const f32,
        len: usize,
        cb: usize,
        masks: &[[u16; 2]],
        sums: &mut [[f32; 3]; 8],
    ) {
        // SAFETY (all calls): forwarded from this function's contract.
        unsafe {
            match cb {
                8 => *sums = rows::<8>(x, d, len, masks),
                4 => sums[..4].copy_from_slice(&rows::<4>(x, d, len, masks)),
                _ => sums[..1].copy_from_slice(&rows::<1>(x, d, len, masks)),
            }
        }
    }

    /// The tap sums of CB output-gradient rows: 3·CB accumulators share each input vector.
    // Out of line, and with AVX512-VL so that the registers above 15 take the zeroing idiom:
    // otherwise LLVM spills a third of the 24 accumulators.
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn rows<const CB: usize>(
        x: *const f32,
        d: *const f32,
        len: usize,
        masks: &[[u16; 2]],
    ) -> [[f32; 3]; CB] {
        let mut acc = [[_mm512_setzero_ps(); 3]; CB];
        let mut q = 0;
        while q < len {
            let [left, right] = masks[q / LANES];
            // SAFETY: q + 15 < len within each of the CB rows of d; q + 17 < len + 2 for x.
            let xs = unsafe {
                [
                    _mm512_maskz_loadu_ps(left, x.add(q)),
                    _mm512_loadu_ps(x.add(q + 1)),
                    _mm512_maskz_loadu_ps(right, x.add(q + 2)),
                ]
            };
            for (c, a) in acc.iter_mut().enumerate() {
                let dv = unsafe { _mm512_loadu_ps(d.add(c * len + q)) };
                for k in 0..3 {
                    a[k] = _mm512_fmadd_ps(dv, xs[k], a[k]);
                }
            }
            q += LANES;
        }
        acc.map(|a| a.map(|v| _mm512_reduce_add_ps(v)))
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    use super::Flat;

    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward(
        _: &[f32],
        _: &Flat,
        _: &[[u16; 2]],
        _: usize,
        _: &[f32],
        _: usize,
        _: Option<&[f32]>,
        _: &mut [f32],
    ) {
        unreachable!("direct kernels are only dispatched when available()")
    }

    pub unsafe fn row_sums(
        _: *const f32,
        _: *const f32,
        _: usize,
        _: usize,
        _: &[[u16; 2]],
        _: &mut [[f32; 3]; 8],
    ) {
        unreachable!("direct kernels are only dispatched when available()")
    }
}
