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
        let mut co = 0;
        while co < cout {
            let left = cout - co;
            // SAFETY: forwarded from this function's contract.
            unsafe {
                match left {
                    8.. => kernel::block::<8>(pairs, g, npairs, wt2, cout, co, bias, outq),
                    4.. => kernel::block::<4>(pairs, g, npairs, wt2, cout, co, bias, outq),
                    _ => kernel::block::<1>(pairs, g, npairs, wt2, cout, co, bias, outq),
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

    /// Three tap sums (kx = 0, 1, 2) of CB consecutive output-gradient rows d[c·len..]
    /// against one shifted input row x, 32 positions (16 bf16 pairs) per instruction.
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
    pub unsafe fn wgrad_rows<const CB: usize>(
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
            // SAFETY: the caller bounds q + 31 < len for d's rows and q + 33 + 2·wp for x.
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

/// dw[co, ci, tap] += Σ_q dyq[co, q]·padded[ci, q + off(tap)] in bf16 (f32 sums): the weight
/// gradient of [`super::direct::backward_weight`] on bf16 copies of its position rows.
///
/// # Safety
/// [`available`] must be true; `len` is a multiple of 32, `padded` holds [cin, row] with
/// row ≥ len + 2·wp + 2, `dyq` [cout, len] and `dw` [cout, cin, 9].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn weight_grad(
    padded: &[u16],
    row: usize,
    dyq: &[u16],
    len: usize,
    wp: usize,
    cin: usize,
    cout: usize,
    dw: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(
            len.is_multiple_of(32)
                && len + 2 * wp + 2 <= row
                && padded.len() >= cin * row
                && dyq.len() >= cout * len
                && dw.len() >= cout * cin * 9
        );
        for ci in 0..cin {
            let x = padded[ci * row..].as_ptr();
            let mut co = 0;
            while co < cout {
                let cb = if cout - co >= 8 { 8 } else { 1 };
                for ky in 0..3 {
                    // SAFETY: the assert above bounds every load (rows of 32 positions from
                    // q < len, taps up to 2·wp + 2 further).
                    let (d, xk) = unsafe { (dyq.as_ptr().add(co * len), x.add(ky * wp)) };
                    let mut add = |c: usize, s: [f32; 3]| {
                        let r = &mut dw[((co + c) * cin + ci) * 9 + ky * 3..][..3];
                        r.iter_mut().zip(s).for_each(|(a, b)| *a += b);
                    };
                    if cb == 8 {
                        let sums = unsafe { kernel::wgrad_rows::<8>(xk, d, len) };
                        sums.into_iter().enumerate().for_each(|(c, s)| add(c, s));
                    } else {
                        add(0, unsafe { kernel::wgrad_rows::<1>(xk, d, len) }[0]);
                    }
                }
                co += cb;
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (padded, row, dyq, len, wp, cin, cout, dw);
        unreachable!("the bf16 kernel is only dispatched when available()")
    }
}
