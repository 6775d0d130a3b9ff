//! The AVX2 + FMA variant of the direct 3×3 convolution, for CPUs without AVX-512 (most laptops
//! and desktops).
//!
//! It runs on the zero-padded grid of [`super::direct::Grid`] (two computed-and-dropped columns
//! per row), where every tap is a plain shifted load: AVX2 has no cheap masked loads for the
//! unpadded layout the AVX-512 kernels use. Sixteen 8-lane registers hold 6 output channels ×
//! 2 vectors of accumulators in the forward kernel and 4 channels × 3 taps in the weight
//! gradient.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Output channels per forward block: 6 while at least 6 are left, then 4, 2, 1.
fn blocks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut co = 0;
    std::iter::from_fn(move || {
        let cb = match n - co {
            0 => return None,
            6.. => 6,
            4.. => 4,
            2.. => 2,
            _ => 1,
        };
        co += cb;
        Some((co - cb, cb))
    })
}

/// outq[co, q] = bias + Σ_ci Σ_tap wt[ci, tap, co] · padded[ci, q + off(tap)] for every co and
/// q < g.q, with the weights in [Cin, 9, Cout] order.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `padded` holds [cin, g.s] (Grid's layout), `outq`
/// [cout, g.q], and g.q is a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn forward(
    padded: &[f32],
    g: &super::direct::Grid,
    cin: usize,
    wt: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
    outq: &mut [f32],
) {
    assert!(
        g.q.is_multiple_of(16)
            && padded.len() >= cin * g.s
            && wt.len() >= cin * 9 * cout
            && outq.len() >= cout * g.q
    );
    for (co, cb) in blocks(cout) {
        // SAFETY: forwarded from this function's contract and the assert.
        unsafe {
            match cb {
                6 => block::<6>(padded, g, cin, wt, cout, co, bias, outq),
                4 => block::<4>(padded, g, cin, wt, cout, co, bias, outq),
                2 => block::<2>(padded, g, cin, wt, cout, co, bias, outq),
                _ => block::<1>(padded, g, cin, wt, cout, co, bias, outq),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn block<const CB: usize>(
    padded: &[f32],
    g: &super::direct::Grid,
    cin: usize,
    wt: &[f32],
    cout: usize,
    co0: usize,
    bias: Option<&[f32]>,
    outq: &mut [f32],
) {
    let offs: [usize; 9] = std::array::from_fn(|t| (t / 3) * g.wp + t % 3);
    let (p, w) = (padded.as_ptr(), wt.as_ptr());
    let mut q0 = 0;
    while q0 < g.q {
        let mut acc = [[_mm256_setzero_ps(); 2]; CB];
        for ci in 0..cin {
            // SAFETY: q0 + 15 + off(8) < s, so both vectors of every tap are inside row ci; the
            // weights read are wt[ci, tap, co0 .. co0 + CB] with co0 + CB ≤ cout.
            let base = unsafe { p.add(ci * g.s + q0) };
            let wrow = unsafe { w.add(ci * 9 * cout + co0) };
            for (t, &off) in offs.iter().enumerate() {
                let (x0, x1) = unsafe {
                    (
                        _mm256_loadu_ps(base.add(off)),
                        _mm256_loadu_ps(base.add(off + 8)),
                    )
                };
                for (c, a) in acc.iter_mut().enumerate() {
                    let wv = unsafe { _mm256_broadcast_ss(&*wrow.add(t * cout + c)) };
                    a[0] = _mm256_fmadd_ps(x0, wv, a[0]);
                    a[1] = _mm256_fmadd_ps(x1, wv, a[1]);
                }
            }
        }
        for (c, a) in acc.iter().enumerate() {
            let bv = _mm256_set1_ps(bias.map_or(0.0, |b| b[co0 + c]));
            // SAFETY: q0 + 16 ≤ q, inside row co0 + c of outq.
            unsafe {
                let dst = outq.as_mut_ptr().add((co0 + c) * g.q + q0);
                _mm256_storeu_ps(dst, _mm256_add_ps(a[0], bv));
                _mm256_storeu_ps(dst.add(8), _mm256_add_ps(a[1], bv));
            }
        }
        q0 += 16;
    }
}

/// The row kernel of [`super::direct::weight_grad`] for f32 rows on AVX2, 8 positions per
/// step: into sums[c] (c < cb, cb one of 8, 4, 1) the three tap sums Σ_q d[c·len + q]·x[q + kx].
///
/// # Safety
/// The CPU must have AVX2 and FMA, len must be a multiple of 8, and the reads described at
/// `weight_grad` in bounds.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn row_sums(
    x: *const f32,
    d: *const f32,
    len: usize,
    cb: usize,
    sums: &mut [[f32; 3]; 8],
) {
    // SAFETY (all calls): forwarded; the second half of an 8-channel block starts 4 rows on.
    unsafe {
        match cb {
            8 => {
                let (a, b) = (rows::<4>(x, d, len), rows::<4>(x, d.add(4 * len), len));
                sums[..4].copy_from_slice(&a);
                sums[4..].copy_from_slice(&b);
            }
            4 => sums[..4].copy_from_slice(&rows::<4>(x, d, len)),
            _ => sums[..1].copy_from_slice(&rows::<1>(x, d, len)),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows<const CB: usize>(x: *const f32, d: *const f32, len: usize) -> [[f32; 3]; CB] {
    let mut acc = [[_mm256_setzero_ps(); 3]; CB];
    let mut q = 0;
    while q < len {
        // SAFETY: q + 7 < len within each of the CB rows of d; q + 9 < len + 2 for x.
        let xs = unsafe {
            [
                _mm256_loadu_ps(x.add(q)),
                _mm256_loadu_ps(x.add(q + 1)),
                _mm256_loadu_ps(x.add(q + 2)),
            ]
        };
        for (c, a) in acc.iter_mut().enumerate() {
            let dv = unsafe { _mm256_loadu_ps(d.add(c * len + q)) };
            for k in 0..3 {
                a[k] = _mm256_fmadd_ps(dv, xs[k], a[k]);
            }
        }
        q += 8;
    }
    acc.map(|a| a.map(|v| hsum(v)))
}

/// The sum of the 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}
