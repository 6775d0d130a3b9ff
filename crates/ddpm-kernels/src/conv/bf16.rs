//! The bf16 variant of the direct 3×3 convolution (AVX512-BF16).
//!
//! Operands are rounded to bf16 and multiplied with `vdpbf16ps`, which takes pairs (two input
//! channels in the forward kernel, two positions in the weight gradient) per instruction and
//! accumulates in f32: about twice the f32 kernels' arithmetic per cycle. Accumulation, bias,
//! outputs and everything outside the convolution stay f32 (the weights' master copy included),
//! as in PyTorch's bf16 autocast.

use super::direct::Grid;

/// Whether this CPU has AVX512-BF16 (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static BF16: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *BF16.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The bf16 bits of `x`, rounded to nearest even (NaN stays NaN).
#[inline(always)]
pub fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        return (b >> 16) | 0x40;
    }
    (b + 0x7fff + ((b >> 16) & 1)) >> 16
}

/// Packs channel pairs of one padded image [C, s] (f32) into [⌈C/2⌉, s] words holding
/// (bf16 of channel 2p, bf16 of channel 2p + 1); an odd last channel pairs with zero.
pub fn pack_pairs(padded: &[f32], c: usize, s: usize, out: &mut Vec<u32>) {
    let pairs = c.div_ceil(2);
    // Every word is written below: no clearing.
    out.resize(pairs * s, 0);
    for p in 0..pairs {
        let lo = &padded[2 * p * s..(2 * p + 1) * s];
        let dst = &mut out[p * s..(p + 1) * s];
        if 2 * p + 1 < c {
            let hi = &padded[(2 * p + 1) * s..(2 * p + 2) * s];
            for ((d, &a), &b) in dst.iter_mut().zip(lo).zip(hi) {
                *d = bf16_bits(a) | (bf16_bits(b) << 16);
            }
        } else {
            for (d, &a) in dst.iter_mut().zip(lo) {
                *d = bf16_bits(a);
            }
        }
    }
}

/// Packs weights in [Cin, 9, Cout] order into [⌈Cin/2⌉, 9, Cout] channel-pair words.
pub fn pack_weights(wt: &[f32], cin: usize, cout: usize) -> Vec<u32> {
    let pairs = cin.div_ceil(2);
    let mut out = vec![0u32; pairs * 9 * cout];
    for p in 0..pairs {
        for t in 0..9 {
            for co in 0..cout {
                let lo = bf16_bits(wt[((2 * p) * 9 + t) * cout + co]);
                let hi = if 2 * p + 1 < cin {
                    bf16_bits(wt[((2 * p + 1) * 9 + t) * cout + co])
                } else {
                    0
                };
                out[(p * 9 + t) * cout + co] = lo | (hi << 16);
            }
        }
    }
    out
}

/// outq[co, q] = bias + Σ_pairs Σ_tap wt2[p, tap, co] · pairs[p, q + off(tap)], all co.
///
/// # Safety
/// [`available`] must be true; `pairs` holds [npairs, g.s] and `outq` [cout, g.q] with g.q a
/// multiple of 32.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn forward(
    pairs: &[u32],
    g: &Grid,
    npairs: usize,
    wt2: &[u32],
    cout: usize,
    bias: Option<&[f32]>,
    outq: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        for (co, cb) in super::direct::channel_blocks(cout) {
            // SAFETY: forwarded from this function's contract.
            unsafe {
                match cb {
                    8 => kernel::block::<8>(pairs, g, npairs, wt2, cout, co, bias, outq),
                    4 => kernel::block::<4>(pairs, g, npairs, wt2, cout, co, bias, outq),
                    _ => kernel::block::<1>(pairs, g, npairs, wt2, cout, co, bias, outq),
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (pairs, g, npairs, wt2, cout, bias, outq);
        unreachable!("the bf16 kernel is only dispatched when available()")
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::Grid;
    use std::arch::x86_64::*;

    const LANES: usize = 16;
    const QV: usize = 2;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn block<const CB: usize>(
        pairs: &[u32],
        g: &Grid,
        npairs: usize,
        wt2: &[u32],
        cout: usize,
        co0: usize,
        bias: Option<&[f32]>,
        outq: &mut [f32],
    ) {
        let offs: [usize; 9] = std::array::from_fn(|t| (t / 3) * g.wp + t % 3);
        let p = pairs.as_ptr();
        let wp = wt2.as_ptr();
        let mut q0 = 0;
        while q0 < g.q {
            let mut acc = [[_mm512_setzero_ps(); QV]; CB];
            for pi in 0..npairs {
                // SAFETY: q0 + QV·16 - 1 + off(8) < s, so every load is inside pair row pi.
                let base = unsafe { p.add(pi * g.s + q0) };
                let wrow = unsafe { wp.add(pi * 9 * cout + co0) };
                for (t, &off) in offs.iter().enumerate() {
                    let xs: [__m512bh; QV] = std::array::from_fn(|v| unsafe {
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                            base.add(off + v * LANES) as *const __m512i,
                        ))
                    });
                    for (c, a) in acc.iter_mut().enumerate() {
                        let wv = unsafe {
                            std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                                *wrow.add(t * cout + c) as i32,
                            ))
                        };
                        for v in 0..QV {
                            a[v] = _mm512_dpbf16_ps(a[v], xs[v], wv);
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

    /// The tap sums of CB output-gradient rows, 32 positions (16 bf16 pairs) per instruction.
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
    pub unsafe fn rows<const CB: usize>(
        x: *const u16,
        d: *const u16,
        len: usize,
    ) -> [[f32; 3]; CB] {
        macro_rules! load {
            ($p:expr) => {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512($p as *const __m512i))
            };
        }
        let mut acc = [[_mm512_setzero_ps(); 3]; CB];
        let mut q = 0;
        while q < len {
            // SAFETY: q + 31 < len within each of the CB rows of d; q + 33 < len + 2 for x.
            let xs = unsafe { [load!(x.add(q)), load!(x.add(q + 1)), load!(x.add(q + 2))] };
            for (c, a) in acc.iter_mut().enumerate() {
                let dv = unsafe { load!(d.add(c * len + q)) };
                for k in 0..3 {
                    a[k] = _mm512_dpbf16_ps(a[k], dv, xs[k]);
                }
            }
            q += 32;
        }
        acc.map(|a| a.map(|v| _mm512_reduce_add_ps(v)))
    }
}

/// The row kernel of [`super::direct::weight_grad`] for bf16 rows (the bits as u16), 32
/// positions per step: the weight gradient of [`super::direct::backward_weight`] with `bf16`.
///
/// # Safety
/// [`available`] must be true, and the reads described at `weight_grad` in bounds (len a
/// multiple of 32).
pub(crate) unsafe fn row_sums(
    x: *const u16,
    d: *const u16,
    len: usize,
    cb: usize,
    sums: &mut [[f32; 3]; 8],
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY (all calls): forwarded from this function's contract.
    unsafe {
        match cb {
            8 => *sums = kernel::rows::<8>(x, d, len),
            4 => sums[..4].copy_from_slice(&kernel::rows::<4>(x, d, len)),
            _ => sums[..1].copy_from_slice(&kernel::rows::<1>(x, d, len)),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, d, len, cb, sums);
        unreachable!("the bf16 kernel is only dispatched when available()")
    }
}
