//! Fast f32 CPU convolutions for the UNet, as Candle custom ops with their own
//! backward passes.
//!
//! 3×3 stride-1 convolutions go to the direct kernels ([`self::direct`]) where the CPU has
//! AVX-512; the others (and all of them elsewhere) are im2col + `gemm`, one image per task on
//! rayon's pool (each GEMM single-threaded), with the input gradient (`Wᵀ·dY`, then col2im), the
//! weight gradient (`dY·colsᵀ` summed over the batch) and the bias gradient computed directly
//! rather than through transposed convolutions and multi-axis reductions. Everything is NCHW
//! and contiguous.

use crate::profile::{timed, OpClass};
use crate::Kernels;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

pub mod amx;
mod avx2;
pub mod bf16;
pub mod direct;
mod flat;
mod pointwise;

/// The f32 contents of a contiguous CPU tensor's storage.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{what}: the fast CPU kernels take f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{what}: input must be contiguous"),
    }
}

/// C[m×n] (+)= A·B with explicit strides, single-threaded (the caller parallelises).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (isize, isize),
    b: &[f32],
    (b_rs, b_cs): (isize, isize),
) {
    debug_assert!(dst.len() >= m * n);
    // SAFETY: the strides and sizes describe regions inside the given slices (checked by the
    // callers' shape arithmetic); dst is exclusively borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy)]
struct ConvGeom {
    b: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl ConvGeom {
    fn new(x: &[usize], wt: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[b, c_in, h, w], &[c_out, wc, k, k2]) = (x, wt) else {
            bail!("conv2d: expected 4-D input and kernel")
        };
        if wc != c_in || k != k2 {
            bail!("conv2d: kernel {wt:?} does not fit input {x:?}");
        }
        if x.contains(&0) || wt.contains(&0) || stride == 0 {
            bail!("conv2d: empty input {x:?} or kernel {wt:?}, or stride 0");
        }
        if h + 2 * pad < k || w + 2 * pad < k {
            bail!("conv2d: input {x:?} smaller than the kernel");
        }
        let ho = (h + 2 * pad - k) / stride + 1;
        let wo = (w + 2 * pad - k) / stride + 1;
        Ok(Self {
            b,
            c_in,
            h,
            w,
            c_out,
            k,
            stride,
            pad,
            ho,
            wo,
        })
    }
    /// Whether the direct 3×3 kernels ([`self::direct`]) take this convolution.
    fn direct(&self, kernels: Kernels) -> bool {
        self.k == 3 && self.stride == 1 && self.pad == 1 && kernels.direct()
    }
    fn kk(&self) -> usize {
        self.c_in * self.k * self.k
    }
    fn n(&self) -> usize {
        self.ho * self.wo
    }
    /// Whether a 3×3 stride-2 convolution runs as the stride-1 one on AMX tiles, subsampled
    /// (its gradients from the zero-filled full-size output gradient): four times the
    /// products, but tile products cost a fraction of im2col + f32 GEMM.
    fn strided_on_tiles(&self, kernels: Kernels) -> bool {
        self.k == 3
            && self.stride == 2
            && self.pad == 1
            && kernels.amx()
            && self::amx::fits(self.c_in, self.c_out)
    }

    /// A 1×1, stride-1, unpadded convolution needs no im2col: the image is its own column matrix.
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }

    /// cols[K = c·k·k, N = ho·wo] of one image.
    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let (k, n) = (self.k, self.n());
        for c in 0..self.c_in {
            let xc = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &mut cols[((c * k + ky) * k + kx) * n..][..n];
                    for oy in 0..self.ho {
                        let iy = (oy * self.stride + ky) as isize - self.pad as isize;
                        let out = &mut row[oy * self.wo..(oy + 1) * self.wo];
                        if iy < 0 || iy >= self.h as isize {
                            out.fill(0.0);
                            continue;
                        }
                        let xr = &xc[iy as usize * self.w..(iy as usize + 1) * self.w];
                        if self.stride == 1 {
                            // A shifted copy of the input row, zero outside it.
                            let (lo, hi) = self.valid_range(kx);
                            out[..lo].fill(0.0);
                            out[hi..].fill(0.0);
                            let start = (lo + kx) - self.pad;
                            out[lo..hi].copy_from_slice(&xr[start..start + (hi - lo)]);
                        } else {
                            for (ox, o) in out.iter_mut().enumerate() {
                                let ix = (ox * self.stride + kx) as isize - self.pad as isize;
                                *o = if ix >= 0 && (ix as usize) < self.w {
                                    xr[ix as usize]
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                }
            }
        }
    }

    /// For stride 1: the output columns [lo, hi) whose input column ox + kx - pad is inside.
    fn valid_range(&self, kx: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(kx).min(self.wo);
        let hi = (self.w + self.pad).saturating_sub(kx).min(self.wo).max(lo);
        (lo, hi)
    }

    /// Adds cols[K, N] back into one image's gradient (the adjoint of im2col).
    fn col2im(&self, cols: &[f32], dx: &mut [f32]) {
        let (k, n) = (self.k, self.n());
        for c in 0..self.c_in {
            let dxc = &mut dx[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &cols[((c * k + ky) * k + kx) * n..][..n];
                    for oy in 0..self.ho {
                        let iy = (oy * self.stride + ky) as isize - self.pad as isize;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        let dr = &mut dxc[iy as usize * self.w..(iy as usize + 1) * self.w];
                        let src = &row[oy * self.wo..(oy + 1) * self.wo];
                        if self.stride == 1 {
                            let (lo, hi) = self.valid_range(kx);
                            let start = (lo + kx) - self.pad;
                            for (d, &v) in dr[start..start + (hi - lo)].iter_mut().zip(&src[lo..hi])
                            {
                                *d += v;
                            }
                        } else {
                            for (ox, &v) in src.iter().enumerate() {
                                let ix = (ox * self.stride + kx) as isize - self.pad as isize;
                                if ix >= 0 && (ix as usize) < self.w {
                                    dr[ix as usize] += v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Forward convolution with bias: x, weight, bias.
struct Conv2d {
    stride: usize,
    pad: usize,
    /// The kernel family and precision (fixed when the op is made, for its backward pass too).
    kernels: Kernels,
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "ddpm-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = ConvGeom::new(l1.dims(), l2.dims(), self.stride, self.pad)?;
        let (x, wt, bias) = (
            slice(s1, l1, "conv2d x")?,
            slice(s2, l2, "conv2d weight")?,
            slice(s3, l3, "conv2d bias")?,
        );
        let (kk, n, co) = (g.kk(), g.n(), g.c_out);
        if g.direct(self.kernels) {
            let out = self::direct::forward(x, (g.b, g.c_in, g.h, g.w), wt, co, bias, self.kernels);
            return Ok((CpuStorage::F32(out), Shape::from((g.b, co, g.ho, g.wo))));
        }
        if g.strided_on_tiles(self.kernels) {
            let full =
                self::direct::forward(x, (g.b, g.c_in, g.h, g.w), wt, co, bias, self.kernels);
            let mut out = crate::output_buffer(g.b * co * n);
            out.par_chunks_mut(n)
                .zip(full.par_chunks(g.h * g.w))
                .for_each(|(o, f)| {
                    for (i, row) in o.chunks_exact_mut(g.wo).enumerate() {
                        for (j, v) in row.iter_mut().enumerate() {
                            v.write(f[2 * i * g.w + 2 * j]);
                        }
                    }
                });
            // SAFETY: every output position was written above.
            let out = unsafe { crate::assume_init(out) };
            return Ok((CpuStorage::F32(out), Shape::from((g.b, co, g.ho, g.wo))));
        }
        if g.pointwise() && self.kernels.isa >= crate::Isa::Avx512 {
            let mut wt_t = vec![0f32; g.c_in * co];
            for (o, row) in wt.chunks_exact(g.c_in).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    wt_t[i * co + o] = v;
                }
            }
            let out = if self.kernels.amx() && self::amx::fits(g.c_in, co) {
                self::pointwise::forward(x, (g.b, g.c_in, n), &wt_t, co, Some(bias))
            } else {
                self::pointwise::forward_f32(x, (g.b, g.c_in, n), &wt_t, co, Some(bias))
            };
            return Ok((CpuStorage::F32(out), Shape::from((g.b, co, g.ho, g.wo))));
        }
        let img = g.c_in * g.h * g.w;
        // Each row is filled with its bias before the GEMM adds to it.
        let mut out = crate::output_buffer(g.b * co * n);
        out.par_chunks_mut(co * n).enumerate().for_each_init(
            || vec![0f32; if g.pointwise() { 0 } else { kk * n }],
            |cols, (b, o)| {
                let xb = &x[b * img..(b + 1) * img];
                let cols: &[f32] = if g.pointwise() {
                    xb
                } else {
                    g.im2col(xb, cols);
                    cols
                };
                for (c, row) in o.chunks_mut(n).enumerate() {
                    row.iter_mut().for_each(|v| {
                        v.write(bias[c]);
                    });
                }
                // SAFETY: every row was just filled.
                let o = unsafe { crate::assume_init_mut(o) };
                matmul(
                    co,
                    n,
                    kk,
                    o,
                    true,
                    wt,
                    (kk as isize, 1),
                    cols,
                    (n as isize, 1),
                );
            },
        );
        // SAFETY: every row of every image was filled above.
        let out = unsafe { crate::assume_init(out) };
        Ok((CpuStorage::F32(out), Shape::from((g.b, co, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        timed(OpClass::Convolution, || self.gradients(x, w, grad))
    }
}

impl Conv2d {
    /// The input, weight and bias gradients of [`CustomOp3::bwd`].
    fn gradients(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut grad = grad.contiguous()?;
        let (mut stride, mut pad) = (self.stride, self.pad);
        let g = ConvGeom::new(x.dims(), w.dims(), stride, pad)?;
        if g.strided_on_tiles(self.kernels) {
            // Both gradients of the subsampled stride-1 convolution: from dY spread onto the
            // full output grid once, through the stride-1 ops.
            grad = grad.apply_op1_no_bwd(&SpreadGrad { h: g.h, w: g.w })?;
            (stride, pad) = (1, 1);
        }
        // The input gradient is skipped when nothing upstream needs it (e.g. the image batch).
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(
                w,
                &Conv2dBackwardInput {
                    stride,
                    pad,
                    kernels: self.kernels,
                    h: x.dim(2)?,
                    w: x.dim(3)?,
                },
            )?)
        } else {
            None
        };
        // [dW; db] in one buffer.
        let packed = grad.apply_op2_no_bwd(
            x,
            &Conv2dBackwardWeight {
                stride,
                pad,
                kernels: self.kernels,
                k: w.dim(2)?,
            },
        )?;
        let nw = w.elem_count();
        let dw = packed.narrow(0, 0, nw)?.reshape(w.shape())?;
        let db = packed.narrow(0, nw, w.dim(0)?)?;
        Ok((dx, Some(dw), Some(db)))
    }
}

/// dX from dY [B, Cout, Ho, Wo] and the weight.
struct Conv2dBackwardInput {
    stride: usize,
    pad: usize,
    kernels: Kernels,
    h: usize,
    w: usize,
}

impl CustomOp2 for Conv2dBackwardInput {
    fn name(&self) -> &'static str {
        "ddpm-conv2d-bwd-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gd, wd) = (l1.dims(), l2.dims());
        let g = ConvGeom::new(&[gd[0], wd[1], self.h, self.w], wd, self.stride, self.pad)?;
        if gd != [g.b, g.c_out, g.ho, g.wo] {
            bail!("conv2d backward: gradient {gd:?} does not fit");
        }
        let (dy, wt) = (
            slice(s1, l1, "conv2d grad")?,
            slice(s2, l2, "conv2d weight")?,
        );
        let (kk, n, co) = (g.kk(), g.n(), g.c_out);
        if g.direct(self.kernels) {
            let dx =
                self::direct::backward_input(dy, (g.b, co, g.h, g.w), wt, g.c_in, self.kernels);
            return Ok((CpuStorage::F32(dx), Shape::from((g.b, g.c_in, g.h, g.w))));
        }
        if g.pointwise() && self.kernels.isa >= crate::Isa::Avx512 {
            // dX = Wᵀ·dY: the weight [Cout, Cin] is already in the [Cin', Cout'] order the
            // kernels take for Cin' = Cout, Cout' = Cin.
            let dx = if self.kernels.amx() && self::amx::fits(co, g.c_in) {
                self::pointwise::forward(dy, (g.b, co, n), wt, g.c_in, None)
            } else {
                self::pointwise::forward_f32(dy, (g.b, co, n), wt, g.c_in, None)
            };
            return Ok((CpuStorage::F32(dx), Shape::from((g.b, g.c_in, g.h, g.w))));
        }
        let img = g.c_in * g.h * g.w;
        let mut dx = vec![0f32; g.b * img];
        dx.par_chunks_mut(img).enumerate().for_each_init(
            || vec![0f32; if g.pointwise() { 0 } else { kk * n }],
            |cols, (b, dxb)| {
                let dyb = &dy[b * co * n..(b + 1) * co * n];
                // dcols[K, N] = Wᵀ[K, Cout] · dY_b[Cout, N]
                if g.pointwise() {
                    matmul(
                        kk,
                        n,
                        co,
                        dxb,
                        false,
                        wt,
                        (1, kk as isize),
                        dyb,
                        (n as isize, 1),
                    );
                } else {
                    matmul(
                        kk,
                        n,
                        co,
                        cols,
                        false,
                        wt,
                        (1, kk as isize),
                        dyb,
                        (n as isize, 1),
                    );
                    g.col2im(cols, dxb);
                }
            },
        );
        Ok((CpuStorage::F32(dx), Shape::from((g.b, g.c_in, g.h, g.w))))
    }
}

/// Sums `len`-long buffers over the images 0..b, one buffer per rayon thread: `add(images,
/// buffer)` adds a contiguous range of images into its thread's buffer, then the buffers are
/// added up.
pub(crate) fn sum_over_images(
    b: usize,
    len: usize,
    add: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    let threads = rayon::current_num_threads().max(1);
    let per = b.div_ceil(threads);
    let partials: Vec<Vec<f32>> = (0..threads)
        .into_par_iter()
        .map(|t| {
            let mut buf = vec![0f32; len];
            add(t * per..((t + 1) * per).min(b), &mut buf);
            buf
        })
        .collect();
    let mut total = vec![0f32; len];
    for p in partials {
        total.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    total
}

/// dW [Cout, K] = Σ_b dY_b · cols_bᵀ through im2col and `gemm`.
fn weight_grad_im2col(g: &ConvGeom, dy: &[f32], x: &[f32]) -> Vec<f32> {
    let (kk, n, co) = (g.kk(), g.n(), g.c_out);
    let img = g.c_in * g.h * g.w;
    sum_over_images(g.b, co * kk, |images, dw| {
        let mut cols = vec![0f32; if g.pointwise() { 0 } else { kk * n }];
        for b in images {
            let xb = &x[b * img..(b + 1) * img];
            let c: &[f32] = if g.pointwise() {
                xb
            } else {
                g.im2col(xb, &mut cols);
                &cols
            };
            let dyb = &dy[b * co * n..(b + 1) * co * n];
            matmul(
                co,
                kk,
                n,
                dw,
                true,
                dyb,
                (n as isize, 1),
                c,
                (1, n as isize),
            );
        }
    })
}

/// Σ of one row of values: sixteen f32 lanes, then f64.
pub(crate) fn sum(row: &[f32]) -> f64 {
    let mut acc = [0f32; 16];
    let full = row.len() / 16 * 16;
    for ch in row[..full].chunks_exact(16) {
        for l in 0..16 {
            acc[l] += ch[l];
        }
    }
    acc.iter().map(|&v| v as f64).sum::<f64>() + row[full..].iter().map(|&v| v as f64).sum::<f64>()
}

/// Σ over images and positions of dY [B, C, N]: the bias gradient, per channel.
fn bias_grad(dy: &[f32], c: usize, n: usize) -> Vec<f32> {
    // f64 across rows and images.
    let per_image: Vec<Vec<f64>> = dy
        .par_chunks(c * n)
        .map(|img| img.chunks(n).map(sum).collect())
        .collect();
    (0..c)
        .map(|ch| per_image.iter().map(|v| v[ch]).sum::<f64>() as f32)
        .collect()
}

/// [dW; db] from dY and the input x.
struct Conv2dBackwardWeight {
    stride: usize,
    pad: usize,
    kernels: Kernels,
    k: usize,
}

impl CustomOp2 for Conv2dBackwardWeight {
    fn name(&self) -> &'static str {
        "ddpm-conv2d-bwd-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gd, xd) = (l1.dims(), l2.dims());
        let g = ConvGeom::new(xd, &[gd[1], xd[1], self.k, self.k], self.stride, self.pad)?;
        let (dy, x) = (slice(s1, l1, "conv2d grad")?, slice(s2, l2, "conv2d x")?);
        let dw = if g.direct(self.kernels) {
            // Already [dW; db].
            self::direct::backward_weight(dy, x, (g.b, g.c_in, g.h, g.w), g.c_out, self.kernels)
        } else if g.pointwise()
            && self.kernels.amx()
            && self::amx::fits_weight_grad(g.c_in, g.c_out)
        {
            self::pointwise::weight_grad(dy, x, (g.b, g.c_in, g.n()), g.c_out)
        } else if g.pointwise() && self.kernels.isa >= crate::Isa::Avx512 {
            self::pointwise::weight_grad_f32(dy, x, (g.b, g.c_in, g.n()), g.c_out)
        } else {
            let mut dw = weight_grad_im2col(&g, dy, x);
            dw.extend_from_slice(&bias_grad(dy, g.c_out, g.n()));
            dw
        };
        let len = dw.len();
        Ok((CpuStorage::F32(dw), Shape::from(len)))
    }
}

/// Convolution through the fast kernels of `kernels` (inputs are made contiguous first).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
    kernels: Kernels,
) -> Result<Tensor> {
    let (x, weight, bias) = (x.contiguous()?, weight.contiguous()?, bias.contiguous()?);
    let op = Conv2d {
        stride,
        pad: padding,
        kernels,
    };
    timed(OpClass::Convolution, || x.apply_op3(&weight, &bias, op))
}

/// dY [B, C, Ho, Wo] of a stride-2 convolution spread onto its stride-1 output grid
/// [B, C, h, w]: dY at the even positions, zero elsewhere.
struct SpreadGrad {
    h: usize,
    w: usize,
}

impl CustomOp1 for SpreadGrad {
    fn name(&self) -> &'static str {
        "ddpm-conv2d-spread-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dy = slice(s, l, "conv2d grad")?;
        let (b, c, ho, wo) = l.shape().dims4()?;
        let (h, w) = (self.h, self.w);
        if ho != h.div_ceil(2) || wo != w.div_ceil(2) {
            bail!("conv2d backward: gradient {ho}x{wo} does not fit a stride-2 output of {h}x{w}");
        }
        let mut full = vec![0f32; b * c * h * w];
        full.par_chunks_mut(h * w)
            .zip(dy.par_chunks(ho * wo))
            .for_each(|(f, d)| {
                for (i, row) in d.chunks_exact(wo).enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        f[2 * i * w + 2 * j] = v;
                    }
                }
            });
        Ok((CpuStorage::F32(full), Shape::from((b, c, h, w))))
    }
}
