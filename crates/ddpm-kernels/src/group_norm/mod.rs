//! Fused GroupNorm (+ scale-shift) (+ SiLU) for the CPU, forward and backward, as Candle
//! custom ops.
//!
//! One pass computes each group's statistics (f32 lanes, f64 totals), one more normalises,
//! applies the affine and FiLM terms and SiLU; the backward pass needs two passes and keeps only
//! two sums per channel. The per-group loops are compiled again for AVX-512 and for AVX2 + FMA
//! and picked by the op's kernel family (the crates are built for baseline x86-64).

use crate::conv::slice;
use crate::profile::{timed, OpClass};
use crate::Isa;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

#[cfg(target_arch = "x86_64")]
mod simd;

/// Fused GroupNorm (+ scale-shift) (+ SiLU). `params` packs [gamma; beta] and, when present,
/// [scale; shift] per batch element: [2C + B·2C].
#[derive(Clone, Copy)]
struct GroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
    scale_shift: bool,
    /// The kernel family (fixed when the op is made, for its backward pass too).
    isa: Isa,
}

struct GnDims {
    b: usize,
    c: usize,
    t: usize,
    cg: usize,
}

impl GroupNorm {
    fn dims(&self, x: &[usize], params_len: usize) -> Result<GnDims> {
        if x.len() < 2 {
            bail!("group_norm: input must be [B, C, ...]");
        }
        let (b, c) = (x[0], x[1]);
        let t: usize = x[2..].iter().product();
        if c % self.groups != 0 {
            bail!(
                "group_norm: {c} channels are not divisible by {} groups",
                self.groups
            );
        }
        let want = 2 * c + if self.scale_shift { 2 * b * c } else { 0 };
        if params_len != want {
            bail!("group_norm: {params_len} parameters for [{b}, {c}] (expected {want})");
        }
        Ok(GnDims {
            b,
            c,
            t,
            cg: c / self.groups,
        })
    }

    /// Mean and 1/std of one group, in one pass: sums of (x - k) and (x - k)², shifted by the
    /// group's first value k so that the variance does not come from the difference of two
    /// large sums.
    #[inline(always)]
    fn stats(&self, xg: &[f32]) -> (f32, f32) {
        let n = xg.len() as f64;
        let k = xg.first().copied().unwrap_or(0.0);
        let (t1, t2) = shifted_sums(xg, k, self.isa);
        let var = ((t2 - t1 * t1 / n) / n).max(0.0);
        (
            (k as f64 + t1 / n) as f32,
            (1.0 / (var + self.eps).sqrt()) as f32,
        )
    }

    /// Normalises group i (image i / groups, group i % groups) of x into o.
    #[inline(always)]
    fn forward_group(
        &self,
        p: &[f32],
        d: &GnDims,
        i: usize,
        o: &mut [MaybeUninit<f32>],
        xg: &[f32],
    ) {
        let (b, g) = (i / self.groups, i % self.groups);
        let (mean, rstd) = self.stats(xg);
        for ci in 0..d.cg {
            let c = g * d.cg + ci;
            let a = p[c] * rstd;
            let sh0 = p[d.c + c] - mean * a;
            let (s1, sh) = self.film(p, d, b, c);
            let (a, sh0) = (a * s1, sh0 * s1 + sh);
            let (orow, xrow) = (
                &mut o[ci * d.t..(ci + 1) * d.t],
                &xg[ci * d.t..(ci + 1) * d.t],
            );
            if self.silu {
                #[allow(unused_mut)]
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if self.isa >= Isa::Avx512 {
                    // SAFETY: the CPU has AVX-512 (Kernels never exceed the CPU's family).
                    done = unsafe { self::simd::silu_affine(orow, xrow, a, sh0) };
                } else if self.isa == Isa::Avx2 {
                    // SAFETY: the CPU has AVX2 and FMA, as above.
                    done = unsafe { self::simd::silu_affine_avx2(orow, xrow, a, sh0) };
                }
                for (ov, &xv) in orow[done..].iter_mut().zip(&xrow[done..]) {
                    let z = xv * a + sh0;
                    ov.write(z * sigmoid(z));
                }
            } else {
                for (ov, &xv) in orow.iter_mut().zip(xrow) {
                    ov.write(xv * a + sh0);
                }
            }
        }
    }

    /// The backward pass of group a.i: dx into dxg, per-channel parameter sums into part.
    #[inline(always)]
    fn backward_group(&self, a: GroupArgs, dxg: &mut [MaybeUninit<f32>], part: &mut [f32]) {
        let GroupArgs { x, dout, p, d, i } = a;
        let gsize = d.cg * d.t;
        let (b, g) = (i / self.groups, i % self.groups);
        let xg = &x[i * gsize..(i + 1) * gsize];
        let dg = &dout[i * gsize..(i + 1) * gsize];
        let (mean, rstd) = self.stats(xg);
        // Pass 1, per channel: dz (the gradient before scale-shift and GroupNorm's
        // affine), kept in dx for pass 2, and the two sums every parameter gradient
        // and the normalisation's gradient are made of: Σdz and Σdz·x̂.
        let (mut sum1, mut sum2) = (0f64, 0f64);
        for ci in 0..d.cg {
            let c = g * d.cg + ci;
            let (gamma, beta) = (p[c], p[d.c + c]);
            let (s1, sh) = self.film(p, d, b, c);
            let (a, z0) = (gamma * s1, beta * s1 + sh);
            let range = ci * d.t..(ci + 1) * d.t;
            let (xs, ds, dzs) = (&xg[range.clone()], &dg[range.clone()], &mut dxg[range]);
            let (mut sdz, mut sdzx) = ([0f32; 16], [0f32; 16]);
            let silu = self.silu;
            let dz_of = |xv: f32, dv: f32| {
                let xh = (xv - mean) * rstd;
                let dz = if silu {
                    let z = xh * a + z0;
                    let s = sigmoid(z);
                    dv * s * (1.0 + z * (1.0 - s))
                } else {
                    dv
                };
                (dz, xh)
            };
            #[allow(unused_mut)]
            let mut start = 0;
            #[cfg(target_arch = "x86_64")]
            if silu && self.isa >= Isa::Avx512 {
                // SAFETY: the CPU has the features `simd` needs.
                let (s, sx, done) =
                    unsafe { self::simd::silu_backward(dzs, xs, ds, mean, rstd, a, z0) };
                (sdz[0], sdzx[0], start) = (s, sx, done);
            } else if silu && self.isa == Isa::Avx2 {
                // SAFETY: the CPU has AVX2 and FMA (an op's family never exceeds the CPU's).
                let (s, sx, done) =
                    unsafe { self::simd::silu_backward_avx2(dzs, xs, ds, mean, rstd, a, z0) };
                (sdz[0], sdzx[0], start) = (s, sx, done);
            }
            // Whole vectors of 16 (so the loop vectorises), then the rest.
            let full = start + (d.t - start) / 16 * 16;
            for ((xc, dc), zc) in xs[start..full]
                .chunks_exact(16)
                .zip(ds[start..full].chunks_exact(16))
                .zip(dzs[start..full].chunks_exact_mut(16))
            {
                for l in 0..16 {
                    let (dz, xh) = dz_of(xc[l], dc[l]);
                    zc[l].write(dz);
                    sdz[l] += dz;
                    sdzx[l] += dz * xh;
                }
            }
            for j in full..d.t {
                let (dz, xh) = dz_of(xs[j], ds[j]);
                dzs[j].write(dz);
                sdz[0] += dz;
                sdzx[0] += dz * xh;
            }
            let sdz: f32 = sdz.iter().sum();
            let sdzx: f32 = sdzx.iter().sum();
            part[ci] = s1 * sdzx;
            part[d.cg + ci] = s1 * sdz;
            part[2 * d.cg + ci] = gamma * sdzx + beta * sdz;
            part[3 * d.cg + ci] = sdz;
            sum1 += (a * sdz) as f64;
            sum2 += (a * sdzx) as f64;
        }
        // SAFETY: pass 1 wrote every element of the group.
        let dxg = unsafe { crate::assume_init_mut(dxg) };
        // Pass 2: dx = rstd·(a·dz - mean(dx̂) - x̂·mean(dx̂·x̂)).
        let n = gsize as f64;
        let (m1, m2) = ((sum1 / n) as f32, (sum2 / n) as f32);
        for ci in 0..d.cg {
            let c = g * d.cg + ci;
            let a = p[c] * self.film(p, d, b, c).0;
            let range = ci * d.t..(ci + 1) * d.t;
            for (dz, &xv) in dxg[range.clone()].iter_mut().zip(&xg[range]) {
                let xh = (xv - mean) * rstd;
                *dz = rstd * (a * *dz - m1 - xh * m2);
            }
        }
    }

    /// (1 + scale, shift) for batch element b, channel c.
    fn film(&self, p: &[f32], d: &GnDims, b: usize, c: usize) -> (f32, f32) {
        if self.scale_shift {
            let ss = &p[2 * d.c + b * 2 * d.c..];
            (1.0 + ss[c], ss[d.c + c])
        } else {
            (1.0, 0.0)
        }
    }
}

/// e^x to about 2 ulp for f32 (Cody-Waite reduction, degree-6 polynomial); unlike libm's expf
/// it inlines and vectorises.
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Inputs outside this range would overflow or leave the normal range of 2^n.
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by the 1.5·2^23 trick (vectorises, unlike f32::round).
    let n = (x * LOG2E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n: adding 2^23 + 127 leaves n + 127 in the low mantissa bits; the shift moves it into
    // the exponent field (a float-to-int cast would not vectorise on AVX2).
    p * f32::from_bits((n + 8_388_735.0).to_bits() << 23)
}

#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp_fast(-z))
}

/// Σ(x - k) and Σ(x - k)²: with AVX-512 in f32 lanes of at most 64 values added up in f64
/// ([`self::simd::shifted_sums`]), elsewhere in f64 throughout.
fn shifted_sums(xg: &[f32], k: f32, isa: Isa) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512 {
        // SAFETY: the CPU has AVX-512 (an op's family never exceeds the CPU's).
        return unsafe { self::simd::shifted_sums(xg, k) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA, as above.
        return unsafe { self::simd::shifted_sums_avx2(xg, k) };
    }
    let (mut t1, mut t2) = (0f64, 0f64);
    for &v in xg {
        let d = (v - k) as f64;
        t1 += d;
        t2 += d * d;
    }
    (t1, t2)
}

/// [`GroupNorm::forward_group`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn forward_group_avx512(
    op: &GroupNorm,
    p: &[f32],
    d: &GnDims,
    i: usize,
    o: &mut [MaybeUninit<f32>],
    xg: &[f32],
) {
    op.forward_group(p, d, i, o, xg)
}

/// [`GroupNorm::backward_group`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn backward_group_avx512(
    op: &GroupNorm,
    a: GroupArgs,
    dxg: &mut [MaybeUninit<f32>],
    part: &mut [f32],
) {
    op.backward_group(a, dxg, part)
}

/// [`GroupNorm::forward_group`] compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_group_avx2(
    op: &GroupNorm,
    p: &[f32],
    d: &GnDims,
    i: usize,
    o: &mut [MaybeUninit<f32>],
    xg: &[f32],
) {
    op.forward_group(p, d, i, o, xg)
}

/// [`GroupNorm::backward_group`] compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_group_avx2(
    op: &GroupNorm,
    a: GroupArgs,
    dxg: &mut [MaybeUninit<f32>],
    part: &mut [f32],
) {
    op.backward_group(a, dxg, part)
}

/// The read-only inputs of one group's backward pass.
#[derive(Clone, Copy)]
struct GroupArgs<'a> {
    x: &'a [f32],
    dout: &'a [f32],
    p: &'a [f32],
    d: &'a GnDims,
    i: usize,
}

impl CustomOp2 for GroupNorm {
    fn name(&self) -> &'static str {
        "ddpm-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, p) = (
            slice(s1, l1, "group_norm x")?,
            slice(s2, l2, "group_norm params")?,
        );
        let d = self.dims(l1.dims(), p.len())?;
        let gsize = d.cg * d.t;
        let mut out = crate::output_buffer(x.len());
        out.par_chunks_mut(gsize)
            .zip(x.par_chunks(gsize))
            .enumerate()
            .for_each(|(i, (o, xg))| {
                #[cfg(target_arch = "x86_64")]
                match self.isa {
                    // SAFETY: the CPU has the features the wrapper enables (an op's family
                    // never exceeds the CPU's).
                    Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => {
                        return unsafe { forward_group_avx512(self, p, &d, i, o, xg) }
                    }
                    // SAFETY: as above.
                    Isa::Avx2 => return unsafe { forward_group_avx2(self, p, &d, i, o, xg) },
                    Isa::Portable => {}
                }
                self.forward_group(p, &d, i, o, xg)
            });
        // SAFETY: forward_group wrote every element of every group.
        let out = unsafe { crate::assume_init(out) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = timed(OpClass::Norm, || {
            x.apply_op3_no_bwd(params, &grad.contiguous()?, &GroupNormBackward(*self))
        })?;
        let nx = x.elem_count();
        let dx = packed.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dp = packed.narrow(0, nx, params.elem_count())?;
        Ok((Some(dx), Some(dp)))
    }
}

/// The backward pass of [`GroupNorm`]: gives [dx; dparams] packed in one vector.
struct GroupNormBackward(GroupNorm);

impl CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "ddpm-group-norm-bwd"
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
        let op = &self.0;
        let (x, p, dout) = (
            slice(s1, l1, "group_norm x")?,
            slice(s2, l2, "group_norm params")?,
            slice(s3, l3, "group_norm grad")?,
        );
        let d = op.dims(l1.dims(), p.len())?;
        let gsize = d.cg * d.t;
        let mut dx = crate::output_buffer(x.len());
        // Room for the parameter gradients appended below, so that appending does not copy dx.
        dx.reserve_exact(p.len());
        // Per group: partial d(gamma), d(beta) for its channels, and d(scale), d(shift).
        let mut partial = vec![0f32; d.b * op.groups * 4 * d.cg];
        dx.par_chunks_mut(gsize)
            .zip(partial.par_chunks_mut(4 * d.cg))
            .enumerate()
            .for_each(|(i, (dxg, part))| {
                let a = GroupArgs {
                    x,
                    dout,
                    p,
                    d: &d,
                    i,
                };
                #[cfg(target_arch = "x86_64")]
                match op.isa {
                    // SAFETY: the CPU has the features the wrapper enables (an op's family
                    // never exceeds the CPU's).
                    Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => {
                        return unsafe { backward_group_avx512(op, a, dxg, part) }
                    }
                    // SAFETY: as above.
                    Isa::Avx2 => return unsafe { backward_group_avx2(op, a, dxg, part) },
                    Isa::Portable => {}
                }
                op.backward_group(a, dxg, part)
            });
        let mut dp = vec![0f32; p.len()];
        for b in 0..d.b {
            for g in 0..op.groups {
                let part = &partial[(b * op.groups + g) * 4 * d.cg..][..4 * d.cg];
                for ci in 0..d.cg {
                    let c = g * d.cg + ci;
                    dp[c] += part[ci];
                    dp[d.c + c] += part[d.cg + ci];
                    if op.scale_shift {
                        dp[2 * d.c + b * 2 * d.c + c] = part[2 * d.cg + ci];
                        dp[2 * d.c + b * 2 * d.c + d.c + c] = part[3 * d.cg + ci];
                    }
                }
            }
        }
        // SAFETY: backward_group wrote every element of every group.
        let mut dx = unsafe { crate::assume_init(dx) };
        dx.extend_from_slice(&dp);
        let n = dx.len();
        Ok((CpuStorage::F32(dx), Shape::from(n)))
    }
}

/// GroupNorm (+ scale-shift) (+ SiLU) through the fused kernel of family `isa` (capped at the
/// CPU's).
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    scale_shift: Option<(&Tensor, &Tensor)>,
    silu: bool,
    isa: Isa,
) -> Result<Tensor> {
    let mut parts = vec![weight.flatten_all()?, bias.flatten_all()?];
    if let Some((scale, shift)) = scale_shift {
        let b = x.dim(0)?;
        parts.push(Tensor::cat(&[scale, shift], 1)?.reshape(b * 2 * x.dim(1)?)?);
    }
    let params = Tensor::cat(&parts, 0)?;
    let x = x.contiguous()?;
    timed(OpClass::Norm, || {
        x.apply_op2(
            &params,
            GroupNorm {
                groups,
                eps,
                silu,
                scale_shift: scale_shift.is_some(),
                isa: isa.min(Isa::detected()),
            },
        )
    })
}
