//! Direct 3×3 (stride 1, padding 1) convolution kernels for AVX-512 CPUs.
//!
//! im2col + GEMM writes nine copies of every input, then the GEMM packs them again; on the
//! UNet's narrow layers (32–128 channels) those copies cost as much as the arithmetic. These
//! kernels read a zero-padded copy of each image instead. Positions are indexed on the padded
//! row width (q = y·(W+2) + x), so that each of the nine taps is one contiguous, shifted vector
//! load for any image width; the two extra columns per row are computed and dropped.
//! The input gradient is the same kernel on the output gradient with the flipped, transposed
//! kernel; the weight gradient reduces over positions with one accumulator per tap.

use rayon::prelude::*;

/// Whether this CPU runs these kernels (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX512.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

const LANES: usize = 16;

/// Layout of one image on the padded grid.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grid {
    h: usize,
    w: usize,
    /// Padded row width, W + 2.
    pub(crate) wp: usize,
    /// Output positions computed per channel (H·(W+2), rounded up to whole blocks).
    pub(crate) q: usize,
    /// Stride between channels of the padded input (covers the furthest tap of the last block).
    pub(crate) s: usize,
}

impl Grid {
    fn new(h: usize, w: usize, block: usize) -> Self {
        let wp = w + 2;
        let q = (h * wp).div_ceil(block) * block;
        let s = (q + 2 * wp + 2).div_ceil(LANES) * LANES;
        Self { h, w, wp, q, s }
    }

    /// Copies one image [C, H, W] into the zero-padded layout [C, s]. A buffer already of this
    /// layout keeps its zero borders (only the interior is ever written), so it is not cleared.
    fn pad(&self, x: &[f32], c: usize, buf: &mut Vec<f32>) {
        if buf.len() != c * self.s {
            buf.clear();
            buf.resize(c * self.s, 0.0);
        }
        for ch in 0..c {
            let src = &x[ch * self.h * self.w..(ch + 1) * self.h * self.w];
            let dst = &mut buf[ch * self.s..(ch + 1) * self.s];
            for y in 0..self.h {
                let o = (y + 1) * self.wp + 1;
                dst[o..o + self.w].copy_from_slice(&src[y * self.w..(y + 1) * self.w]);
            }
        }
    }

    /// Drops the padding columns: [C, q] back to [C, H, W].
    fn drop_padding(&self, q: &[f32], c: usize, out: &mut [f32]) {
        for ch in 0..c {
            let src = &q[ch * self.q..(ch + 1) * self.q];
            let dst = &mut out[ch * self.h * self.w..(ch + 1) * self.h * self.w];
            for y in 0..self.h {
                dst[y * self.w..(y + 1) * self.w]
                    .copy_from_slice(&src[y * self.wp..y * self.wp + self.w]);
            }
        }
    }
}

/// Vectors of positions per block of the forward kernel: 8 channels × 2 vectors keep 16
/// accumulators in registers (8 × 3 spills and runs at two thirds of the speed).
const QV: usize = 2;

/// y [B, Cout, H, W] = conv3x3(x [B, Cin, H, W]) with weights in [Cin, 9, Cout] order (+ bias).
fn conv_packed(
    x: &[f32],
    (b, cin, h, w): (usize, usize, usize, usize),
    wt: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
    bf16: bool,
) -> Vec<f32> {
    let g = Grid::new(h, w, QV * LANES);
    let bf16 = bf16 && super::bf16::available();
    let wt2 = if bf16 {
        super::bf16::pack_weights(wt, cin, cout)
    } else {
        Vec::new()
    };
    let mut out = vec![0f32; b * cout * h * w];
    out.par_chunks_mut(cout * h * w).enumerate().for_each_init(
        || (Vec::new(), Vec::new(), Vec::new()),
        |(padded, outq, pairs), (i, o)| {
            g.pad(&x[i * cin * h * w..(i + 1) * cin * h * w], cin, padded);
            // Every position of every channel is written by the kernels: no clearing.
            outq.resize(cout * g.q, 0.0);
            if bf16 {
                super::bf16::pack_pairs(padded, cin, g.s, pairs);
                // SAFETY: AVX512-BF16 is available; `pairs` is [⌈cin/2⌉, s], `outq`
                // [cout, q] with q a multiple of 32, as the kernel requires.
                unsafe { super::bf16::forward(pairs, &g, cin.div_ceil(2), &wt2, cout, bias, outq) };
            } else {
                // SAFETY: `available()` was checked by the caller; the kernel's loads stay
                // inside `padded` ([cin, s] with s covering the furthest tap) and its stores
                // inside `outq` ([cout, q]), by Grid's arithmetic.
                unsafe { kernels::forward(padded, &g, cin, wt, cout, bias, outq) };
            }
            g.drop_padding(outq, cout, o);
        },
    );
    out
}

/// 3×3 convolution, stride 1, padding 1: x [B, Cin, H, W], weight [Cout, Cin, 3, 3];
/// with `bf16` (and AVX512-BF16) the products are taken in bf16, accumulated in f32.
pub fn forward(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    weight: &[f32],
    cout: usize,
    bias: &[f32],
    bf16: bool,
) -> Vec<f32> {
    let cin = dims.1;
    let mut wt = vec![0f32; cin * 9 * cout];
    for co in 0..cout {
        for ci in 0..cin {
            for t in 0..9 {
                wt[(ci * 9 + t) * cout + co] = weight[(co * cin + ci) * 9 + t];
            }
        }
    }
    conv_packed(x, dims, &wt, cout, Some(bias), bf16)
}

/// The input gradient: dX [B, Cin, H, W] from dY [B, Cout, H, W] and weight [Cout, Cin, 3, 3]
/// (`bf16` as for [`forward`]).
pub fn backward_input(
    dy: &[f32],
    (b, cout, h, w): (usize, usize, usize, usize),
    weight: &[f32],
    cin: usize,
    bf16: bool,
) -> Vec<f32> {
    // dX is dY convolved with the kernel flipped in space and transposed in channels.
    let mut wt = vec![0f32; cout * 9 * cin];
    for co in 0..cout {
        for ci in 0..cin {
            for t in 0..9 {
                wt[(co * 9 + (8 - t)) * cin + ci] = weight[(co * cin + ci) * 9 + t];
            }
        }
    }
    conv_packed(dy, (b, cout, h, w), &wt, cin, None, bf16)
}

/// The weight gradient: dW [Cout, Cin, 3, 3] = Σ over images and positions of dY ⊗ x's taps
/// (with `bf16` and AVX512-BF16, products of bf16-rounded operands summed in f32).
pub fn backward_weight(
    dy: &[f32],
    x: &[f32],
    (b, cin, h, w): (usize, usize, usize, usize),
    cout: usize,
    bf16: bool,
) -> Vec<f32> {
    let bf16 = bf16 && super::bf16::available();
    // bf16 steps take 32 positions at a time.
    let step = if bf16 { 2 * LANES } else { LANES };
    let g = Grid::new(h, w, LANES);
    // Several images are laid end to end on one long position axis, so each accumulator is
    // reduced once per chunk rather than once per image. Consecutive images share a zero
    // padding row (image j starts (H+1)·(W+2) after image j-1). The chunk's output gradient,
    // re-read for every input channel, is sized to stay in L2.
    let stride = (h + 1) * g.wp;
    let chunk = (384 * 1024 / (cout * stride * 4)).clamp(1, 16);
    let threads = rayon::current_num_threads().max(1);
    let per = b.div_ceil(threads);
    let partials: Vec<Vec<f32>> = (0..threads)
        .into_par_iter()
        .map(|t| {
            let mut dw = vec![0f32; cout * cin * 9];
            let (mut padded, mut dyq) = (Vec::new(), Vec::new());
            let (mut padded16, mut dyq16) = (Vec::new(), Vec::new());
            let (first, end) = (t * per, ((t + 1) * per).min(b));
            let mut i0 = first;
            while i0 < end {
                let n = chunk.min(end - i0);
                // Rows of n images' positions (a whole number of vectors), plus room for the
                // furthest tap of the last vector.
                let len = (n * stride).div_ceil(step) * step;
                let row = len + 2 * g.wp + 2;
                padded.clear();
                padded.resize(cin * row, 0.0);
                dyq.clear();
                dyq.resize(cout * len, 0.0);
                for j in 0..n {
                    let img = i0 + j;
                    let xi = &x[img * cin * h * w..(img + 1) * cin * h * w];
                    let di = &dy[img * cout * h * w..(img + 1) * cout * h * w];
                    for c in 0..cin {
                        let dst = &mut padded[c * row + j * stride..];
                        for y in 0..h {
                            let o = (y + 1) * g.wp + 1;
                            dst[o..o + w].copy_from_slice(&xi[(c * h + y) * w..][..w]);
                        }
                    }
                    for c in 0..cout {
                        let dst = &mut dyq[c * len + j * stride..];
                        for y in 0..h {
                            dst[y * g.wp..y * g.wp + w]
                                .copy_from_slice(&di[(c * h + y) * w..][..w]);
                        }
                    }
                }
                if bf16 {
                    let to16 = |src: &[f32], dst: &mut Vec<u16>| {
                        dst.clear();
                        dst.extend(src.iter().map(|&v| super::bf16::bf16_bits(v) as u16));
                    };
                    to16(&padded, &mut padded16);
                    to16(&dyq, &mut dyq16);
                    // SAFETY: AVX512-BF16 is available; len is a multiple of 32 and the rows
                    // are as the kernel requires.
                    unsafe {
                        super::bf16::weight_grad(
                            &padded16, row, &dyq16, len, g.wp, cin, cout, &mut dw,
                        )
                    };
                } else {
                    // SAFETY: `available()` was checked by the caller; loads stay inside
                    // `padded` ([cin, row]) and `dyq` ([cout, len]), stores inside `dw`.
                    unsafe {
                        kernels::weight_grad(&padded, row, &dyq, len, &g, cin, cout, &mut dw)
                    };
                }
                i0 += n;
            }
            dw
        })
        .collect();
    let mut dw = vec![0f32; cout * cin * 9];
    for p in partials {
        dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    dw
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use super::{Grid, LANES, QV};
    use std::arch::x86_64::*;

    /// outq[co, q] (=/+) Σ_ci Σ_tap wt[ci, tap, co] · padded[ci, q + off(tap)], over all co.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn forward(
        padded: &[f32],
        g: &Grid,
        cin: usize,
        wt: &[f32],
        cout: usize,
        bias: Option<&[f32]>,
        outq: &mut [f32],
    ) {
        let mut co = 0;
        while co < cout {
            let left = cout - co;
            // SAFETY (all calls): forwarded from this function's contract.
            unsafe {
                match left {
                    8.. => block::<8, QV>(padded, g, cin, wt, cout, co, bias, outq),
                    4.. => block::<4, QV>(padded, g, cin, wt, cout, co, bias, outq),
                    _ => block::<1, QV>(padded, g, cin, wt, cout, co, bias, outq),
                }
            }
            co += if left >= 8 {
                8
            } else if left >= 4 {
                4
            } else {
                1
            };
        }
    }

    /// Output channels co0..co0+CB over all positions, QV vectors of positions at a time.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn block<const CB: usize, const QV: usize>(
        padded: &[f32],
        g: &Grid,
        cin: usize,
        wt: &[f32],
        cout: usize,
        co0: usize,
        bias: Option<&[f32]>,
        outq: &mut [f32],
    ) {
        let offs: [usize; 9] = std::array::from_fn(|t| (t / 3) * g.wp + t % 3);
        let p = padded.as_ptr();
        let wp = wt.as_ptr();
        let mut q0 = 0;
        while q0 < g.q {
            let mut acc = [[_mm512_setzero_ps(); QV]; CB];
            for ci in 0..cin {
                // SAFETY: q0 + QV·16 - 1 + off(8) < s, so every load is inside channel ci.
                let base = unsafe { p.add(ci * g.s + q0) };
                let wrow = unsafe { wp.add(ci * 9 * cout + co0) };
                for (t, &off) in offs.iter().enumerate() {
                    let xs: [__m512; QV] = std::array::from_fn(|v| unsafe {
                        _mm512_loadu_ps(base.add(off + v * LANES))
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
                let dst = unsafe { outq.as_mut_ptr().add((co0 + c) * g.q + q0) };
                for (v, &av) in a.iter().enumerate() {
                    unsafe { _mm512_storeu_ps(dst.add(v * LANES), _mm512_add_ps(av, bv)) };
                }
            }
            q0 += QV * LANES;
        }
    }

    /// dw[co, ci, tap] += Σ_q dyq[co, q] · padded[ci, q + off(tap)] over q < len; padded
    /// rows are `row` long, dyq rows `len` (a multiple of 16).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn weight_grad(
        padded: &[f32],
        row: usize,
        dyq: &[f32],
        len: usize,
        g: &Grid,
        cin: usize,
        cout: usize,
        dw: &mut [f32],
    ) {
        assert!(len.is_multiple_of(LANES) && len + 2 * g.wp + 2 <= row && dyq.len() >= cout * len);
        // Input channel outermost: its row stays in L1 while every output channel passes.
        for ci in 0..cin {
            let x = &padded[ci * row..(ci + 1) * row];
            let mut co = 0;
            // Eight output channels at a time, one kernel row (three taps) per pass: 24
            // accumulators share each input vector, 11 loads per 24 FMAs.
            while cout - co >= 8 {
                for ky in 0..3 {
                    // SAFETY: the assert above bounds every load (see `wgrad_row8`).
                    let sums = unsafe {
                        wgrad_row8(x.as_ptr().add(ky * g.wp), dyq.as_ptr().add(co * len), len)
                    };
                    for (c, s3) in sums.iter().enumerate() {
                        let r = &mut dw[((co + c) * cin + ci) * 9 + ky * 3..][..3];
                        r.iter_mut().zip(s3).for_each(|(a, b)| *a += b);
                    }
                }
                co += 8;
            }
            while co < cout {
                let pair = cout - co >= 2;
                let d1 = if pair { co + 1 } else { co };
                // SAFETY: the assert above bounds every load (see `wgrad_pair`).
                let sums = unsafe {
                    wgrad_pair(
                        x.as_ptr(),
                        dyq.as_ptr().add(co * len),
                        dyq.as_ptr().add(d1 * len),
                        len,
                        g.wp,
                    )
                };
                dw[(co * cin + ci) * 9..][..9]
                    .iter_mut()
                    .zip(&sums[0])
                    .for_each(|(a, b)| *a += b);
                if pair {
                    dw[(d1 * cin + ci) * 9..][..9]
                        .iter_mut()
                        .zip(&sums[1])
                        .for_each(|(a, b)| *a += b);
                }
                co += if pair { 2 } else { 1 };
            }
        }
    }

    /// Three tap sums (kx = 0, 1, 2) of eight consecutive output-gradient rows d[c·len..]
    /// against one shifted input row x: Σ_q d_c[q]·x[q + kx].
    // Out of line, and with AVX512-VL so that the registers above 15 take the zeroing idiom:
    // otherwise LLVM spills a third of the 24 accumulators.
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn wgrad_row8(x: *const f32, d: *const f32, len: usize) -> [[f32; 3]; 8] {
        let z = _mm512_setzero_ps();
        let mut acc = [z; 24];
        let (
            mut a0,
            mut a1,
            mut a2,
            mut a3,
            mut a4,
            mut a5,
            mut a6,
            mut a7,
            mut a8,
            mut a9,
            mut a10,
            mut a11,
            mut a12,
            mut a13,
            mut a14,
            mut a15,
            mut a16,
            mut a17,
            mut a18,
            mut a19,
            mut a20,
            mut a21,
            mut a22,
            mut a23,
        ) = (
            z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z,
        );
        let mut q = 0;
        while q < len {
            // SAFETY: q + 15 < len within each of the eight rows of d; q + 17 stays inside x
            // (the caller's row covers len + 2·wp + 2).
            unsafe {
                let (x0, x1, x2) = (
                    _mm512_loadu_ps(x.add(q)),
                    _mm512_loadu_ps(x.add(q + 1)),
                    _mm512_loadu_ps(x.add(q + 2)),
                );
                macro_rules! out {
                    ($c:expr, $p:ident, $r:ident, $s:ident) => {
                        let dv = _mm512_loadu_ps(d.add($c * len + q));
                        $p = _mm512_fmadd_ps(dv, x0, $p);
                        $r = _mm512_fmadd_ps(dv, x1, $r);
                        $s = _mm512_fmadd_ps(dv, x2, $s);
                    };
                }
                out!(0, a0, a1, a2);
                out!(1, a3, a4, a5);
                out!(2, a6, a7, a8);
                out!(3, a9, a10, a11);
                out!(4, a12, a13, a14);
                out!(5, a15, a16, a17);
                out!(6, a18, a19, a20);
                out!(7, a21, a22, a23);
            }
            q += LANES;
        }
        acc.copy_from_slice(&[
            a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18,
            a19, a20, a21, a22, a23,
        ]);
        std::array::from_fn(|c| std::array::from_fn(|k| _mm512_reduce_add_ps(acc[c * 3 + k])))
    }

    /// The nine tap sums of two output channels (d0, d1) against one input row x:
    /// Σ_q d[q]·x[q + ky·wp + kx]. Eighteen accumulators, written out so that they stay in
    /// registers; the three tap rows are base pointers with immediate offsets.
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn wgrad_pair(
        x: *const f32,
        d0: *const f32,
        d1: *const f32,
        len: usize,
        wp: usize,
    ) -> [[f32; 9]; 2] {
        let z = _mm512_setzero_ps();
        let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5, mut a6, mut a7, mut a8) =
            (z, z, z, z, z, z, z, z, z);
        let (mut b0, mut b1, mut b2, mut b3, mut b4, mut b5, mut b6, mut b7, mut b8) =
            (z, z, z, z, z, z, z, z, z);
        let mut q = 0;
        while q < len {
            // SAFETY: q + 15 < len for d0/d1; q + 15 + 2·wp + 2 < row for x (caller's assert).
            unsafe {
                let (u, v) = (_mm512_loadu_ps(d0.add(q)), _mm512_loadu_ps(d1.add(q)));
                let r0 = x.add(q);
                let (r1, r2) = (r0.add(wp), r0.add(2 * wp));
                macro_rules! tap {
                    ($p:expr, $a:ident, $b:ident) => {
                        let xv = _mm512_loadu_ps($p);
                        $a = _mm512_fmadd_ps(u, xv, $a);
                        $b = _mm512_fmadd_ps(v, xv, $b);
                    };
                }
                tap!(r0, a0, b0);
                tap!(r0.add(1), a1, b1);
                tap!(r0.add(2), a2, b2);
                tap!(r1, a3, b3);
                tap!(r1.add(1), a4, b4);
                tap!(r1.add(2), a5, b5);
                tap!(r2, a6, b6);
                tap!(r2.add(1), a7, b7);
                tap!(r2.add(2), a8, b8);
            }
            q += LANES;
        }
        let r = |v| _mm512_reduce_add_ps(v);
        [
            [
                r(a0),
                r(a1),
                r(a2),
                r(a3),
                r(a4),
                r(a5),
                r(a6),
                r(a7),
                r(a8),
            ],
            [
                r(b0),
                r(b1),
                r(b2),
                r(b3),
                r(b4),
                r(b5),
                r(b6),
                r(b7),
                r(b8),
            ],
        ]
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    use super::Grid;

    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward(
        _: &[f32],
        _: &Grid,
        _: usize,
        _: &[f32],
        _: usize,
        _: Option<&[f32]>,
        _: &mut [f32],
    ) {
        unreachable!("direct kernels are only dispatched when available()")
    }

    #[allow(clippy::too_many_arguments)]
    pub unsafe fn weight_grad(
        _: &[f32],
        _: usize,
        _: &[f32],
        _: usize,
        _: &Grid,
        _: usize,
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("direct kernels are only dispatched when available()")
    }
}
