//! Direct 3×3 (stride 1, padding 1) convolution kernels for AVX-512 CPUs: the entry points.
//!
//! im2col + GEMM writes nine copies of every input, then the GEMM packs them again; on the
//! UNet's narrow layers (32–128 channels) those copies cost as much as the arithmetic. These
//! kernels read one staged copy of each image instead and take each tap as a shifted vector
//! load. The input gradient is the same convolution of the output gradient with the flipped,
//! transposed kernel; the weight gradient reduces over positions with one accumulator per tap.
//! In f32 the kernels run on the pixels themselves (`flat`, masked loads at the row ends); the
//! bf16 kernels ([`super::bf16`]) run on a zero-padded grid (`Grid`: positions y·(W+2) + x,
//! two computed-and-dropped columns per row), where every tap is a plain load.

use crate::Kernels;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Whether this CPU runs these kernels (AVX-512 F and VL).
pub fn available() -> bool {
    crate::Isa::detected() >= crate::Isa::Avx512
}

pub(crate) const LANES: usize = 16;

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
    /// (H, W) of the image.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.h, self.w)
    }

    pub(crate) fn new(h: usize, w: usize, block: usize) -> Self {
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
        let hw = self.h * self.w;
        for ch in 0..c {
            self.put_padded(&x[ch * hw..(ch + 1) * hw], &mut buf[ch * self.s..]);
        }
    }

    /// Writes one channel [H, W] inside the zero border of a padded image starting at dst[0]
    /// (row y at (y + 1)·(W+2) + 1).
    fn put_padded(&self, src: &[f32], dst: &mut [f32]) {
        for (y, r) in src.chunks_exact(self.w).enumerate() {
            let o = (y + 1) * self.wp + 1;
            dst[o..o + self.w].copy_from_slice(r);
        }
    }

    /// Writes one channel [H, W] onto the position grid starting at dst[0] (row y at y·(W+2)).
    fn put_rows(&self, src: &[f32], dst: &mut [f32]) {
        for (y, r) in src.chunks_exact(self.w).enumerate() {
            dst[y * self.wp..y * self.wp + self.w].copy_from_slice(r);
        }
    }

    /// Drops the padding columns: [C, q] back to [C, H, W].
    /// Every element of `out` ([C, H, W]) is written.
    fn drop_padding(&self, q: &[f32], c: usize, out: &mut [MaybeUninit<f32>]) {
        for ch in 0..c {
            let src = &q[ch * self.q..(ch + 1) * self.q];
            let dst = &mut out[ch * self.h * self.w..(ch + 1) * self.h * self.w];
            for y in 0..self.h {
                let (d, s) = (
                    &mut dst[y * self.w..(y + 1) * self.w],
                    &src[y * self.wp..y * self.wp + self.w],
                );
                for (d, &s) in d.iter_mut().zip(s) {
                    d.write(s);
                }
            }
        }
    }
}

/// A rayon thread's buffers for one convolution task (the bf16 kernels' and `flat`'s): the
/// staged input, the kernel's output rows and the bf16 pairs.
#[derive(Default)]
pub(crate) struct Scratch {
    /// (padded grid or not, channels, height, width) of the last task's staged input.
    key: (bool, usize, usize, usize),
    pub(crate) staged: Vec<f32>,
    pub(crate) outq: Vec<f32>,
    pub(crate) pairs: Vec<u32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch. The staged input and the pairs keep their zeros from
/// the last task (only pixels are ever written) unless the layout, (`padded_grid`, c, h, w),
/// changed; then they are emptied for the caller to size and clear. rayon splits a call's images into many jobs:
/// buffers kept per thread spare each job an allocation and a clearing (16 per call, measured).
/// Nothing in `f` may call into rayon, or this thread could take another job and borrow the
/// scratch twice.
pub(crate) fn with_scratch<R>(
    (padded_grid, c, h, w): (bool, usize, usize, usize),
    f: impl FnOnce(&mut Scratch) -> R,
) -> R {
    SCRATCH.with_borrow_mut(|s| {
        if s.key != (padded_grid, c, h, w) {
            s.staged.clear();
            s.pairs.clear();
            s.key = (padded_grid, c, h, w);
        }
        f(s)
    })
}

/// Vectors of positions per block of the forward kernel: 8 channels × 2 vectors keep 16
/// accumulators in registers (8 × 3 spills and runs at two thirds of the speed).
pub(crate) const QV: usize = 2;

/// y [B, Cout, H, W] = conv3x3(x [B, Cin, H, W]) with weights in [Cin, 9, Cout] order (+ bias),
/// products in bf16: on AMX tiles with `amx` where the channel counts fit, else with
/// `vdpbf16ps` (the caller checks that the CPU has what it asks for).
fn conv_bf16(
    x: &[f32],
    (b, cin, h, w): (usize, usize, usize, usize),
    wt: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
    amx: bool,
) -> Vec<f32> {
    let amx = amx && super::amx::fits(cin, cout);
    let g = Grid::new(h, w, QV * LANES);
    let wt2 = if amx {
        super::amx::pack_weights(wt, cin, 9, cout)
    } else {
        Vec::new()
    };
    let wv = if amx {
        Vec::new()
    } else {
        super::bf16::pack_weights(wt, cin, cout)
    };
    let mut out = crate::output_buffer(b * cout * h * w);
    out.par_chunks_mut(cout * h * w)
        .enumerate()
        .for_each(|(i, o)| {
            with_scratch((true, cin, h, w), |s| {
                let Scratch {
                    staged: padded,
                    outq,
                    pairs,
                    ..
                } = s;
                let xi = &x[i * cin * h * w..(i + 1) * cin * h * w];
                // Every position of every channel is written by the kernel: no clearing.
                outq.resize(cout * g.q, 0.0);
                if amx {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AMX implies AVX-512 F, BW and VL.
                    unsafe {
                        super::amx::stage::pairs(xi, cin, &g, pairs)
                    };
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the caller checked AMX; `pairs` holds padded_pairs(cin) rows of
                    // g.s words (the padding zero), `wt2` is pack_weights' packing for these
                    // channels (fits checked), `outq` [cout, q] with q a multiple of 32.
                    unsafe {
                        super::amx::forward(pairs, &g, cin, &wt2, cout, outq);
                        super::amx::stage::unpad(outq, cout, &g, bias, o);
                    };
                } else {
                    g.pad(xi, cin, padded);
                    super::bf16::pack_pairs(padded, cin, g.s, pairs);
                    // SAFETY: AVX512-BF16 is available; `pairs` is [⌈cin/2⌉, s], `outq`
                    // [cout, q] with q a multiple of 32, as the kernel requires.
                    unsafe {
                        super::bf16::forward(pairs, &g, cin.div_ceil(2), &wv, cout, bias, outq)
                    };
                    g.drop_padding(outq, cout, o);
                }
            })
        });
    // SAFETY: drop_padding wrote every element of every image.
    unsafe { crate::assume_init(out) }
}

/// The AVX2 + FMA kernel over a batch: y [B, Cout, H, W] = conv3x3(x) with weights in
/// [Cin, 9, Cout] order (+ bias), one image per task on the padded grid.
fn conv_avx2(
    x: &[f32],
    (b, cin, h, w): (usize, usize, usize, usize),
    wt: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let g = Grid::new(h, w, LANES);
    let mut out = crate::output_buffer(b * cout * h * w);
    out.par_chunks_mut(cout * h * w)
        .enumerate()
        .for_each(|(i, o)| {
            with_scratch((true, cin, h, w), |s| {
                g.pad(
                    &x[i * cin * h * w..(i + 1) * cin * h * w],
                    cin,
                    &mut s.staged,
                );
                // Every position of every channel is written by the kernel: no clearing.
                s.outq.resize(cout * g.q, 0.0);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the caller checked AVX2 + FMA (an op's family never exceeds the
                // CPU's); `staged` is [cin, s] in the grid's layout, `outq` [cout, q] with q a
                // multiple of 16.
                unsafe {
                    super::avx2::forward(&s.staged, &g, cin, wt, cout, bias, &mut s.outq)
                };
                g.drop_padding(&s.outq, cout, o);
            })
        });
    // SAFETY: drop_padding wrote every element of every image.
    unsafe { crate::assume_init(out) }
}

/// 3×3 convolution, stride 1, padding 1: x [B, Cin, H, W], weight [Cout, Cin, 3, 3]; at bf16
/// precision (where `kernels` has bf16 products) they are taken in bf16, accumulated in f32.
/// `kernels` must have [`Kernels::direct`] (AVX2 and up).
pub fn forward(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    weight: &[f32],
    cout: usize,
    bias: &[f32],
    kernels: Kernels,
) -> Vec<f32> {
    assert!(kernels.direct(), "the direct kernels need AVX2");
    let cin = dims.1;
    let mut wt = vec![0f32; cin * 9 * cout];
    for co in 0..cout {
        for ci in 0..cin {
            for t in 0..9 {
                wt[(ci * 9 + t) * cout + co] = weight[(co * cin + ci) * 9 + t];
            }
        }
    }
    if kernels.isa == crate::Isa::Avx2 {
        conv_avx2(x, dims, &wt, cout, Some(bias))
    } else if kernels.bf16_vectors() {
        conv_bf16(x, dims, &wt, cout, Some(bias), kernels.amx())
    } else {
        super::flat::conv(x, dims, &wt, cout, Some(bias))
    }
}

/// The input gradient: dX [B, Cin, H, W] from dY [B, Cout, H, W] and weight [Cout, Cin, 3, 3]
/// (`kernels` as for [`forward`]).
pub fn backward_input(
    dy: &[f32],
    (b, cout, h, w): (usize, usize, usize, usize),
    weight: &[f32],
    cin: usize,
    kernels: Kernels,
) -> Vec<f32> {
    assert!(kernels.direct(), "the direct kernels need AVX2");
    // dX is dY convolved with the kernel flipped in space and transposed in channels.
    let mut wt = vec![0f32; cout * 9 * cin];
    for co in 0..cout {
        for ci in 0..cin {
            for t in 0..9 {
                wt[(co * 9 + (8 - t)) * cin + ci] = weight[(co * cin + ci) * 9 + t];
            }
        }
    }
    if kernels.isa == crate::Isa::Avx2 {
        conv_avx2(dy, (b, cout, h, w), &wt, cin, None)
    } else if kernels.bf16_vectors() {
        conv_bf16(dy, (b, cout, h, w), &wt, cin, None, kernels.amx())
    } else {
        super::flat::conv(dy, (b, cout, h, w), &wt, cin, None)
    }
}

/// The weight and bias gradients, packed as `[dW; db]`: dW `[Cout, Cin, 3, 3]` = Σ over images
/// and positions of dY ⊗ x's taps (at bf16 precision, products of bf16-rounded operands summed
/// in f32: on AMX tiles where the channel counts are multiples of 16), db `[Cout]` = Σ dY,
/// taken while dY is copied for the kernels. `kernels` as for [`forward`].
pub fn backward_weight(
    dy: &[f32],
    x: &[f32],
    (b, cin, h, w): (usize, usize, usize, usize),
    cout: usize,
    kernels: Kernels,
) -> Vec<f32> {
    assert!(kernels.direct(), "the direct kernels need AVX2");
    // AVX2: f32 rows on the padded grid, 8 positions a step; bf16: 32 positions a step.
    let avx2 = kernels.isa == crate::Isa::Avx2;
    if !avx2 && !kernels.bf16_vectors() {
        return super::flat::weight_grad(dy, x, (b, cin, h, w), cout);
    }
    if kernels.amx() && super::amx::fits_weight_grad(cin, cout) {
        return weight_grad_amx(dy, x, (b, cin, h, w), cout);
    }
    let step = if avx2 { 8 } else { 2 * LANES };
    let g = Grid::new(h, w, LANES);
    // Several images are laid end to end on one long position axis, so each accumulator is
    // reduced once per chunk rather than once per image. Consecutive images share a zero
    // padding row (image j starts (H+1)·(W+2) after image j-1). The chunk's output gradient,
    // re-read for every input channel, is sized to stay in L2.
    let stride = (h + 1) * g.wp;
    let chunk = (384 * 1024 / (cout * stride * 4)).clamp(1, 16);
    let nw = cout * cin * 9;
    super::sum_over_images(b, nw + cout, |images, dw| {
        let (dw, db) = dw.split_at_mut(nw);
        let (mut padded, mut dyq) = (Vec::new(), Vec::new());
        let (mut padded16, mut dyq16) = (Vec::new(), Vec::<u16>::new());
        let hw = h * w;
        let mut i0 = images.start;
        let mut last_n = 0;
        while i0 < images.end {
            let n = chunk.min(images.end - i0);
            // Rows of n images' positions (a whole number of vectors), plus room for the
            // furthest tap of the last vector.
            let len = (n * stride).div_ceil(step) * step;
            let row = len + 2 * g.wp + 2;
            // Chunks of the same size overwrite exactly the previous chunk's values: the zero
            // padding between them stays, so the buffers are cleared only when the size changes.
            if n != last_n {
                padded.clear();
                padded.resize(cin * row, 0.0);
                dyq.clear();
                dyq.resize(cout * len, 0.0);
                last_n = n;
            }
            for j in 0..n {
                let img = i0 + j;
                for c in 0..cin {
                    let src = &x[(img * cin + c) * hw..][..hw];
                    g.put_padded(src, &mut padded[c * row + j * stride..]);
                }
                for c in 0..cout {
                    let src = &dy[(img * cout + c) * hw..][..hw];
                    g.put_rows(src, &mut dyq[c * len + j * stride..]);
                    db[c] += super::sum(src) as f32;
                }
            }
            if avx2 {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the caller checked AVX2 + FMA, and weight_grad calls the kernel only
                // within the bounds it asserts (len a multiple of 8).
                unsafe {
                    let rows =
                        |x, d, len, cb, sums: &mut _| super::avx2::row_sums(x, d, len, cb, sums);
                    weight_grad(&padded, row, &dyq, len, step, g.wp, cin, cout, dw, rows)
                };
                i0 += n;
                continue;
            }
            let to16 = |src: &[f32], dst: &mut Vec<u16>| {
                dst.clear();
                dst.extend(src.iter().map(|&v| super::bf16::bf16_bits(v) as u16));
            };
            to16(&padded, &mut padded16);
            to16(&dyq, &mut dyq16);
            // SAFETY: AVX512-BF16 is available (checked above), and weight_grad calls the
            // kernel only within the bounds it asserts.
            let rows =
                |x, d, len, cb, sums: &mut _| unsafe { super::bf16::row_sums(x, d, len, cb, sums) };
            // SAFETY: as for `rows`.
            unsafe { weight_grad(&padded16, row, &dyq16, len, step, g.wp, cin, cout, dw, rows) };
            i0 += n;
        }
    })
}

/// [`backward_weight`] on AMX tiles (the caller checks AMX, and that both channel counts are
/// multiples of 16): the operands staged straight from the f32 tensors, chunks of images on
/// one position axis as for the vector kernels.
fn weight_grad_amx(
    dy: &[f32],
    x: &[f32],
    (b, cin, h, w): (usize, usize, usize, usize),
    cout: usize,
) -> Vec<f32> {
    let g = Grid::new(h, w, LANES);
    let stride = (h + 1) * g.wp;
    let chunk = (384 * 1024 / (cout * stride * 4)).clamp(1, 16);
    let nw = cout * cin * 9;
    super::sum_over_images(b, nw + cout, |images, dw| {
        let (dw, db) = dw.split_at_mut(nw);
        let (mut x16, mut dy16, mut dyv) = (Vec::<u16>::new(), Vec::<u32>::new(), Vec::new());
        let mut i0 = images.start;
        let mut last_n = 0;
        while i0 < images.end {
            let n = chunk.min(images.end - i0);
            let len = (n * stride).div_ceil(32) * 32;
            let row = len + 2 * g.wp + 2;
            // Chunks of the same size overwrite exactly the previous chunk's values: the zero
            // padding between them stays, so the buffers are cleared only when the size changes.
            if n != last_n {
                x16.clear();
                x16.resize(cin * row, 0);
                dy16.clear();
                dy16.resize(len / 2 * cout, 0);
                dyv.clear();
                dyv.resize(len / 2 * cout, 0);
                last_n = n;
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AMX implies AVX-512 F, BW and VL; the buffers hold [cin, row] bf16 and
            // [cout, len/2], [len/2, cout] words for n images of this layout.
            unsafe {
                super::amx::stage::weight_grad_operands(
                    x,
                    dy,
                    (i0, n),
                    (cin, cout),
                    &g,
                    (stride, row, len),
                    &mut x16,
                    &mut dy16,
                    &mut dyv,
                    db,
                );
                super::amx::weight_grad(&x16, row, &dyv, len, g.wp, 3, cin, cout, dw);
            }
            i0 += n;
        }
    })
}

/// Output channels in the blocks the kernels have instances for: 8 while at least 8 are left,
/// then 4, then one at a time, as (first channel, block size).
pub(crate) fn channel_blocks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut co = 0;
    std::iter::from_fn(move || {
        let cb = match n - co {
            0 => return None,
            8.. => 8,
            4.. => 4,
            _ => 1,
        };
        co += cb;
        Some((co - cb, cb))
    })
}

/// dw[co, ci, tap] += Σ_q dyq[co, q]·staged[ci, q + ky·wp + kx] over q < len, one kernel row
/// of taps per call to `rows` (the f32 `flat` kernel with wp = W, or the bf16 kernel on the
/// padded grid).
///
/// `rows(x, d, len, cb, sums)` is a weight-gradient kernel: into sums[c] (c < cb, cb one of 8,
/// 4, 1), the three tap sums Σ_q d[c·len + q]·x[q + kx] (kx = 0, 1, 2) for q < len, reading
/// d[c·len..c·len + len] and x[..len + 2].
///
/// # Safety
/// `rows` must be able to run on this CPU and read only what is described above; the bounds
/// it then relies on are checked here.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn weight_grad<T>(
    staged: &[T],
    row: usize,
    dyq: &[T],
    len: usize,
    step: usize,
    wp: usize,
    cin: usize,
    cout: usize,
    dw: &mut [f32],
    rows: impl Fn(*const T, *const T, usize, usize, &mut [[f32; 3]; 8]),
) {
    assert!(
        len.is_multiple_of(step)
            && len + 2 * wp + 2 <= row
            && staged.len() >= cin * row
            && dyq.len() >= cout * len
            && dw.len() >= cout * cin * 9
    );
    let mut sums = [[0f32; 3]; 8];
    // Input channel outermost: its row stays in L1 while every output channel passes.
    for ci in 0..cin {
        let x = staged[ci * row..].as_ptr();
        for (co, cb) in channel_blocks(cout) {
            for ky in 0..3 {
                // SAFETY: the assert bounds the kernel's reads: rows co..co + cb of dyq hold
                // len values each, and x from ci·row + ky·wp reaches len + 2 within the row.
                let (xr, d) = unsafe { (x.add(ky * wp), dyq.as_ptr().add(co * len)) };
                rows(xr, d, len, cb, &mut sums);
                for (c, s) in sums[..cb].iter().enumerate() {
                    let r = &mut dw[((co + c) * cin + ci) * 9 + ky * 3..][..3];
                    r.iter_mut().zip(s).for_each(|(a, b)| *a += b);
                }
            }
        }
    }
}
