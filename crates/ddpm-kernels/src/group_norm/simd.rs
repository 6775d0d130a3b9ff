//! AVX-512 (and AVX2 + FMA) row kernels for GroupNorm's element-wise passes, written with intrinsics where LLVM
//! left the portable loops slow: lane-array sums stayed scalar, and SiLU's sigmoid divided
//! (`vdivps` on 16 lanes took a third of the forward pass). Callers check the op's [`crate::Isa`] and
//! keep a portable loop for other CPUs; the results agree with it to a few ulp.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// The sum of the 16 lanes, in f64.
#[target_feature(enable = "avx512f")]
fn lanes_f64(v: __m512) -> f64 {
    let mut a = [0f32; 16];
    // SAFETY: `a` holds 16 floats.
    unsafe { _mm512_storeu_ps(a.as_mut_ptr(), v) };
    a.iter().map(|&x| x as f64).sum()
}

/// Σ(x - k) and Σ(x - k)² over `xs`: f32 lanes over blocks of 1024 values (at most 64 per
/// lane), each block's lanes added up in f64.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn shifted_sums(xs: &[f32], k: f32) -> (f64, f64) {
    let kv = _mm512_set1_ps(k);
    let (mut t1, mut t2) = (0f64, 0f64);
    for block in xs.chunks(1024) {
        let zero = _mm512_setzero_ps();
        let (mut s1a, mut s2a, mut s1b, mut s2b) = (zero, zero, zero, zero);
        let pairs = block.chunks_exact(32);
        let rest = pairs.remainder();
        for c in pairs {
            // SAFETY: c holds 32 floats.
            let (a, b) = unsafe {
                (
                    _mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), kv),
                    _mm512_sub_ps(_mm512_loadu_ps(c.as_ptr().add(16)), kv),
                )
            };
            s1a = _mm512_add_ps(s1a, a);
            s2a = _mm512_fmadd_ps(a, a, s2a);
            s1b = _mm512_add_ps(s1b, b);
            s2b = _mm512_fmadd_ps(b, b, s2b);
        }
        t1 += lanes_f64(_mm512_add_ps(s1a, s1b));
        t2 += lanes_f64(_mm512_add_ps(s2a, s2b));
        for &v in rest {
            let d = (v - k) as f64;
            t1 += d;
            t2 += d * d;
        }
    }
    (t1, t2)
}

/// e^x on 16 lanes, as `norm::exp_fast` (same reduction and polynomial), with `vscalefps`
/// for the 2^n.
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
        _mm512_set1_ps(88.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let c = |v: f32| _mm512_set1_ps(v);
    let mut p = _mm512_fmadd_ps(c(1.0 / 720.0), r, c(1.0 / 120.0));
    p = _mm512_fmadd_ps(p, r, c(1.0 / 24.0));
    p = _mm512_fmadd_ps(p, r, c(1.0 / 6.0));
    p = _mm512_fmadd_ps(p, r, c(0.5));
    p = _mm512_fmadd_ps(p, r, c(1.0));
    p = _mm512_fmadd_ps(p, r, c(1.0));
    _mm512_scalef_ps(p, n)
}

/// 1 / (1 + e^-z) on 16 lanes: a 14-bit reciprocal estimate and one Newton step.
#[target_feature(enable = "avx512f")]
fn sigmoid16(z: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    let d = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), z)));
    let r = _mm512_rcp14_ps(d);
    // r·(2 - d·r)
    _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)))
}

/// out = z·σ(z) with z = a·x + b, for whole vectors of 16; returns how many values it did.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn silu_affine(
    out: &mut [MaybeUninit<f32>],
    xs: &[f32],
    a: f32,
    b: f32,
) -> usize {
    let n = out.len().min(xs.len()) / 16 * 16;
    let (av, bv) = (_mm512_set1_ps(a), _mm512_set1_ps(b));
    for j in (0..n).step_by(16) {
        // SAFETY: j + 16 <= n, inside both slices.
        unsafe {
            let z = _mm512_fmadd_ps(_mm512_loadu_ps(xs.as_ptr().add(j)), av, bv);
            let o = out.as_mut_ptr().add(j).cast::<f32>();
            _mm512_storeu_ps(o, _mm512_mul_ps(z, sigmoid16(z)));
        }
    }
    n
}

/// SiLU's backward pass for one channel of GroupNorm, over whole vectors of 16: with
/// x̂ = (x - mean)·rstd and z = a·x̂ + z0, dz = dy·σ(z)·(1 + z·(1 - σ(z))) goes to `dz`;
/// returns (Σdz, Σdz·x̂) and how many values it did.
///
/// # Safety
/// The CPU must have AVX-512F.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn silu_backward(
    dz: &mut [MaybeUninit<f32>],
    xs: &[f32],
    dy: &[f32],
    mean: f32,
    rstd: f32,
    a: f32,
    z0: f32,
) -> (f32, f32, usize) {
    let n = dz.len().min(xs.len()).min(dy.len()) / 16 * 16;
    let (mv, rv, av, zv) = (
        _mm512_set1_ps(mean),
        _mm512_set1_ps(rstd),
        _mm512_set1_ps(a),
        _mm512_set1_ps(z0),
    );
    let one = _mm512_set1_ps(1.0);
    let (mut sdz, mut sdzx) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for j in (0..n).step_by(16) {
        // SAFETY: j + 16 <= n, inside all three slices.
        unsafe {
            let xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xs.as_ptr().add(j)), mv), rv);
            let z = _mm512_fmadd_ps(xh, av, zv);
            let s = sigmoid16(z);
            // dy·s·(1 + z·(1 - s))
            let g = _mm512_fmadd_ps(z, _mm512_sub_ps(one, s), one);
            let d = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(dy.as_ptr().add(j)), s), g);
            _mm512_storeu_ps(dz.as_mut_ptr().add(j).cast::<f32>(), d);
            sdz = _mm512_add_ps(sdz, d);
            sdzx = _mm512_fmadd_ps(d, xh, sdzx);
        }
    }
    (_mm512_reduce_add_ps(sdz), _mm512_reduce_add_ps(sdzx), n)
}

/// e^x on 8 lanes (AVX2 + FMA), as [`exp16`], with 2^n built in the exponent field.
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    let c = |v: f32| _mm256_set1_ps(v);
    let x = _mm256_min_ps(_mm256_max_ps(x, c(-87.0)), c(88.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        c(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, c(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, c(1.428_606_8e-6), r);
    let mut p = _mm256_fmadd_ps(c(1.0 / 720.0), r, c(1.0 / 120.0));
    p = _mm256_fmadd_ps(p, r, c(1.0 / 24.0));
    p = _mm256_fmadd_ps(p, r, c(1.0 / 6.0));
    p = _mm256_fmadd_ps(p, r, c(0.5));
    p = _mm256_fmadd_ps(p, r, c(1.0));
    p = _mm256_fmadd_ps(p, r, c(1.0));
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(p, _mm256_castsi256_ps(e))
}

/// 1 / (1 + e^-z) on 8 lanes: a 12-bit reciprocal estimate and one Newton step.
#[target_feature(enable = "avx2,fma")]
fn sigmoid8(z: __m256) -> __m256 {
    let one = _mm256_set1_ps(1.0);
    let d = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), z)));
    let r = _mm256_rcp_ps(d);
    _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0)))
}

/// The sum of 8 lanes, in f64.
#[target_feature(enable = "avx2")]
fn lanes8_f64(v: __m256) -> f64 {
    let mut a = [0f32; 8];
    // SAFETY: `a` holds 8 floats.
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
    a.iter().map(|&x| x as f64).sum()
}

/// [`shifted_sums`] on AVX2 + FMA: f32 lanes over blocks of 512 values (at most 64 per lane),
/// each block's lanes added up in f64.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn shifted_sums_avx2(xs: &[f32], k: f32) -> (f64, f64) {
    let kv = _mm256_set1_ps(k);
    let (mut t1, mut t2) = (0f64, 0f64);
    for block in xs.chunks(512) {
        let zero = _mm256_setzero_ps();
        let (mut s1a, mut s2a, mut s1b, mut s2b) = (zero, zero, zero, zero);
        let pairs = block.chunks_exact(16);
        let rest = pairs.remainder();
        for c in pairs {
            // SAFETY: c holds 16 floats.
            let (a, b) = unsafe {
                (
                    _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), kv),
                    _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr().add(8)), kv),
                )
            };
            s1a = _mm256_add_ps(s1a, a);
            s2a = _mm256_fmadd_ps(a, a, s2a);
            s1b = _mm256_add_ps(s1b, b);
            s2b = _mm256_fmadd_ps(b, b, s2b);
        }
        t1 += lanes8_f64(_mm256_add_ps(s1a, s1b));
        t2 += lanes8_f64(_mm256_add_ps(s2a, s2b));
        for &v in rest {
            let d = (v - k) as f64;
            t1 += d;
            t2 += d * d;
        }
    }
    (t1, t2)
}

/// [`silu_affine`] on AVX2 + FMA, whole vectors of 8; returns how many values it did.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn silu_affine_avx2(
    out: &mut [MaybeUninit<f32>],
    xs: &[f32],
    a: f32,
    b: f32,
) -> usize {
    let n = out.len().min(xs.len()) / 8 * 8;
    let (av, bv) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
    for j in (0..n).step_by(8) {
        // SAFETY: j + 8 <= n, inside both slices.
        unsafe {
            let z = _mm256_fmadd_ps(_mm256_loadu_ps(xs.as_ptr().add(j)), av, bv);
            let o = out.as_mut_ptr().add(j).cast::<f32>();
            _mm256_storeu_ps(o, _mm256_mul_ps(z, sigmoid8(z)));
        }
    }
    n
}

/// [`silu_backward`] on AVX2 + FMA, whole vectors of 8.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn silu_backward_avx2(
    dz: &mut [MaybeUninit<f32>],
    xs: &[f32],
    dy: &[f32],
    mean: f32,
    rstd: f32,
    a: f32,
    z0: f32,
) -> (f32, f32, usize) {
    let n = dz.len().min(xs.len()).min(dy.len()) / 8 * 8;
    let (mv, rv, av, zv) = (
        _mm256_set1_ps(mean),
        _mm256_set1_ps(rstd),
        _mm256_set1_ps(a),
        _mm256_set1_ps(z0),
    );
    let one = _mm256_set1_ps(1.0);
    let (mut sdz, mut sdzx) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for j in (0..n).step_by(8) {
        // SAFETY: j + 8 <= n, inside all three slices.
        unsafe {
            let xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xs.as_ptr().add(j)), mv), rv);
            let z = _mm256_fmadd_ps(xh, av, zv);
            let s = sigmoid8(z);
            let g = _mm256_fmadd_ps(z, _mm256_sub_ps(one, s), one);
            let d = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(dy.as_ptr().add(j)), s), g);
            _mm256_storeu_ps(dz.as_mut_ptr().add(j).cast::<f32>(), d);
            sdz = _mm256_add_ps(sdz, d);
            sdzx = _mm256_fmadd_ps(d, xh, sdzx);
        }
    }
    let sum = |v: __m256| {
        let mut a = [0f32; 8];
        // SAFETY: `a` holds 8 floats.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
        a.iter().sum::<f32>()
    };
    (sum(sdz), sum(sdzx), n)
}
