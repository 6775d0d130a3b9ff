//! The AMX-BF16 variant of the direct 3×3 convolution (Intel Sapphire Rapids and later).
//!
//! A tile product (`tdpbf16ps`) multiplies a 16×32 bf16 tile by a 32×16 one into 16×16 f32
//! accumulators: 8,192 multiply-adds per instruction, sixteen times what `vdpbf16ps` does on one
//! register. Rust's AMX intrinsics are unstable, so the instructions are written with inline
//! `asm!` (the compiler never allocates tile registers itself, so their contents persist between
//! the blocks of one kernel call).
//!
//! - Forward and input gradient: outq[co, q] += W[co, (pair, tap)] · pairs[pair, q + off(tap)],
//!   with the weights as the 16×32 tile (16 output channels × 16 input-channel pairs) and the
//!   staged input pairs of [`super::bf16::pack_pairs`] as the 32×16 one: each tap is the same
//!   tile load shifted along the padded grid, as in the vector kernels.
//! - Weight gradient: dWᵀ[ci, co] += x[ci, q + off(tap)] · dY[co, q] summed over positions, the
//!   input rows (shifted per tap) as the 16×32 tile and the output gradient, interleaved by
//!   position pairs, as the 32×16 one.

use super::direct::Grid;

/// `arch_prctl` code asking for permission to use an extended state component.
#[cfg(target_arch = "x86_64")]
const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
/// The XSAVE component of the tile data (AMX's registers).
#[cfg(target_arch = "x86_64")]
const XFEATURE_XTILEDATA: u64 = 18;

/// Whether this CPU and kernel let the process use AMX-BF16 tiles (checked once; the first call
/// asks Linux for the tile state permission, which then holds for every thread of the process).
pub fn available() -> bool {
    static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMX.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid_count, _xgetbv};
    let leaf0 = __cpuid_count(0, 0);
    if leaf0.eax < 7 {
        return false;
    }
    let l7 = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (l7.edx & (1 << 22) != 0, l7.edx & (1 << 24) != 0);
    let osxsave = __cpuid_count(1, 0).ecx & (1 << 27) != 0;
    if !(amx_bf16 && amx_tile && osxsave && super::bf16::available()) {
        return false;
    }
    // SAFETY: XGETBV with ECX = 0 is valid whenever OSXSAVE is set (checked above).
    let xcr0 = unsafe { _xgetbv(0) };
    // XTILECFG (bit 17) and XTILEDATA (bit 18) enabled by the OS.
    if xcr0 & (3 << 17) != 3 << 17 {
        return false;
    }
    let ret: i64;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) only changes this process's
    // permitted XSAVE features; the syscall clobbers rcx and r11 and returns in rax.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") 158i64 => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Whether the tile kernels take a convolution with these channel counts: output channels in
/// whole tiles of 16, and at least 16 input channels (fewer would waste most of each tile; such
/// layers go to the vector kernels).
pub fn fits(cin: usize, cout: usize) -> bool {
    cin >= 16 && cout.is_multiple_of(16)
}

/// Whether the weight-gradient tile kernel takes these channel counts: both in whole tiles of
/// 16 (input rows and output-gradient columns are loaded 16 at a time).
pub fn fits_weight_grad(cin: usize, cout: usize) -> bool {
    cin.is_multiple_of(16) && cout.is_multiple_of(16)
}

/// Input-channel pairs padded to whole tiles (16 pairs, 32 channels).
pub fn padded_pairs(cin: usize) -> usize {
    cin.div_ceil(2).div_ceil(16) * 16
}

/// Packs weights in [Cin, taps, Cout] order as the forward kernel's 16×32 tiles,
/// [Cout/16][pair tile][tap][16 rows][32 bf16]: row r of a tile holds output channel
/// 16·block + r, and its 32 values the input channels 32·(pair tile) .. + 32 (zero past Cin).
pub fn pack_weights(wt: &[f32], cin: usize, taps: usize, cout: usize) -> Vec<u16> {
    let kt = padded_pairs(cin) / 16;
    let mut out = vec![0u16; (cout / 16) * kt * taps * 512];
    for cb in 0..cout / 16 {
        for k in 0..kt {
            for t in 0..taps {
                let tile = &mut out[((cb * kt + k) * taps + t) * 512..][..512];
                for r in 0..16 {
                    for e in 0..32 {
                        let ci = 32 * k + e;
                        if ci < cin {
                            let v = wt[(ci * taps + t) * cout + 16 * cb + r];
                            tile[r * 32 + e] = super::bf16::bf16_bits(v) as u16;
                        }
                    }
                }
            }
        }
    }
    out
}

/// Tile configuration: palette 1, all eight tiles 16 rows × 64 bytes.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

#[cfg(target_arch = "x86_64")]
impl TileConfig {
    fn full() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        Self(c)
    }
}

/// Loads the tile configuration on entry and releases the tiles on exit (also on unwind).
#[cfg(target_arch = "x86_64")]
struct Tiles;

#[cfg(target_arch = "x86_64")]
impl Tiles {
    /// # Safety
    /// [`available`] must be true.
    unsafe fn configure() -> Self {
        let cfg = TileConfig::full();
        // SAFETY: AMX is available and permitted (the caller's contract); cfg is a valid
        // 64-byte palette-1 configuration.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack)) };
        Tiles
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `configure`; releasing returns them to the init
        // state and touches no memory.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// The 3×3 convolution on the padded grid: outq[co, q] = Σ_pairs Σ_tap W · pairs[pair,
/// q + off(tap)] for every co and every q < g.q.
///
/// # Safety
/// [`available`] must be true; `pairs` holds [`padded_pairs`] rows of g.s words (the padding
/// rows zero), `wa` is [`pack_weights`]'s packing (9 taps) for these channels with [`fits`]
/// true, `outq` holds [cout, g.q], and g.q is a multiple of 32.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn forward(
    pairs: &[u32],
    g: &Grid,
    cin: usize,
    wa: &[u16],
    cout: usize,
    outq: &mut [f32],
) {
    let offs: [usize; 9] = std::array::from_fn(|t| (t / 3) * g.wp + t % 3);
    // SAFETY: forwarded; s covers the furthest tap of the last block (Grid's layout).
    unsafe { products(pairs, g.q, g.s, &offs, cin, wa, cout, outq) }
}

/// outq[co, q] = Σ_pairs Σ_tap W[co, pair, tap] · pairs[pair, q + offs[tap]] for every co and
/// every q < q_len: `pairs` rows of `s` words, outq rows of q_len floats.
///
/// # Safety
/// [`available`] must be true; `pairs` holds [`padded_pairs`] rows of s words (the padding
/// rows zero) with q_len + max(offs) ≤ s (every tile read inside its row),
/// `wa` is [`pack_weights`]'s packing for these channels and offs.len() taps with [`fits`]
/// true, `outq` holds [cout, q_len], and q_len is a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn products(
    pairs: &[u32],
    q_len: usize,
    s: usize,
    offs: &[usize],
    cin: usize,
    wa: &[u16],
    cout: usize,
    outq: &mut [f32],
) {
    let kt = padded_pairs(cin) / 16;
    let taps = offs.len();
    assert!(
        q_len.is_multiple_of(32)
            && q_len + offs.iter().max().copied().unwrap_or(0) <= s
            && pairs.len() >= kt * 16 * s
            && wa.len() >= (cout / 16) * kt * taps * 512
            && outq.len() >= cout * q_len
            && fits(cin, cout)
    );
    let (bstride, cstride) = (s * 4, q_len * 4);
    // SAFETY: the caller guarantees AMX.
    let _tiles = unsafe { Tiles::configure() };
    let mut cb = 0;
    while cb < cout / 16 {
        // Two output-channel tiles at a time where two are left: four accumulators.
        let two = cb + 1 < cout / 16;
        let mut q0 = 0;
        while q0 < q_len {
            // SAFETY (all tile blocks below): tile rows read are inside `pairs` (rows
            // 16·k .. 16·k + 16, words q0 + off .. q0 + off + 32 ≤ s) and `wa` (whole tiles),
            // and rows written inside `outq` (rows 16·cb .. + 32, positions q0 .. q0 + 32);
            // all bounds follow from the assert and the layout contracts.
            unsafe {
                std::arch::asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for k in 0..kt {
                    for (t, &off) in offs.iter().enumerate() {
                        let b = pairs.as_ptr().add(16 * k * s + q0 + off);
                        let a0 = wa.as_ptr().add(((cb * kt + k) * taps + t) * 512);
                        std::arch::asm!(
                            "tileloadd tmm4, [{a} + {sa} * 1]",
                            "tileloadd tmm6, [{b} + {sb} * 1]",
                            "tileloadd tmm7, [{b2} + {sb} * 1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            a = in(reg) a0,
                            sa = in(reg) 64usize,
                            b = in(reg) b,
                            b2 = in(reg) b.add(16),
                            sb = in(reg) bstride,
                            options(nostack, readonly),
                        );
                        if two {
                            let a1 = a0.add(kt * taps * 512);
                            std::arch::asm!(
                                "tileloadd tmm5, [{a} + {sa} * 1]",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                a = in(reg) a1,
                                sa = in(reg) 64usize,
                                options(nostack, readonly),
                            );
                        }
                    }
                }
                let c0 = outq.as_mut_ptr().add(16 * cb * q_len + q0);
                std::arch::asm!(
                    "tilestored [{c} + {sc} * 1], tmm0",
                    "tilestored [{c2} + {sc} * 1], tmm1",
                    c = in(reg) c0,
                    c2 = in(reg) c0.add(16),
                    sc = in(reg) cstride,
                    options(nostack),
                );
                if two {
                    let c1 = c0.add(16 * q_len);
                    std::arch::asm!(
                        "tilestored [{c} + {sc} * 1], tmm2",
                        "tilestored [{c2} + {sc} * 1], tmm3",
                        c = in(reg) c1,
                        c2 = in(reg) c1.add(16),
                        sc = in(reg) cstride,
                        options(nostack),
                    );
                }
            }
            q0 += 32;
        }
        cb += if two { 2 } else { 1 };
    }
}

/// dw[co, ci, tap] += Σ_{q < len} dY[co, q] · x[ci, q + ky·wp + kx] for every (co, ci, tap) of a
/// k×k kernel (k = 3, or 1 for a pointwise convolution, where wp is unused), from the staged
/// bf16 input rows `x16` ([cin, row]) and the output gradient interleaved by position pairs,
/// `dyv` ([len/2, cout] words holding (dY[co, 2p], dY[co, 2p + 1])).
///
/// # Safety
/// [`available`] must be true; k is 1 or 3, len is a multiple of 32, len + (k - 1)·(wp + 1) ≤
/// row, cin and cout are multiples of 16, and the slices hold what is described.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn weight_grad(
    x16: &[u16],
    row: usize,
    dyv: &[u32],
    len: usize,
    wp: usize,
    k: usize,
    cin: usize,
    cout: usize,
    dw: &mut [f32],
) {
    assert!(
        (k == 1 || k == 3)
            && len.is_multiple_of(32)
            && len + (k - 1) * (wp + 1) <= row
            && cin.is_multiple_of(16)
            && cout.is_multiple_of(16)
            && x16.len() >= cin * row
            && dyv.len() >= len / 2 * cout
            && dw.len() >= cout * cin * k * k
    );
    let (astride, bstride) = (row * 2, cout * 4);
    let mut c = [[0f32; 256]; 3];
    // SAFETY: the caller guarantees AMX.
    let _tiles = unsafe { Tiles::configure() };
    for ci0 in (0..cin).step_by(16) {
        for co0 in (0..cout).step_by(16) {
            for ky in 0..k {
                // SAFETY (all tile blocks): A rows are x16 rows ci0 .. ci0 + 16 from
                // ky·wp + q0 (+ 0, 1, 2; + 0 alone when k = 1) for 32 values, inside each row
                // since q0 + 32 + (k - 1)·(wp + 1) ≤ row; B rows are dyv rows q0/2 .. q0/2 + 16,
                // words co0 .. co0 + 16; the stores go to `c`, three 16×16 f32 tiles.
                unsafe {
                    std::arch::asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        options(nostack, nomem)
                    );
                    let mut q0 = 0;
                    while q0 < len {
                        let a = x16.as_ptr().add(ci0 * row + ky * wp + q0);
                        let b = dyv.as_ptr().add(q0 / 2 * cout + co0);
                        if k == 1 {
                            std::arch::asm!(
                                "tileloadd tmm7, [{b} + {sb} * 1]",
                                "tileloadd tmm4, [{a0} + {sa} * 1]",
                                "tdpbf16ps tmm0, tmm4, tmm7",
                                b = in(reg) b,
                                sb = in(reg) bstride,
                                a0 = in(reg) a,
                                sa = in(reg) astride,
                                options(nostack, readonly),
                            );
                            q0 += 32;
                            continue;
                        }
                        std::arch::asm!(
                            "tileloadd tmm7, [{b} + {sb} * 1]",
                            "tileloadd tmm4, [{a0} + {sa} * 1]",
                            "tileloadd tmm5, [{a1} + {sa} * 1]",
                            "tileloadd tmm6, [{a2} + {sa} * 1]",
                            "tdpbf16ps tmm0, tmm4, tmm7",
                            "tdpbf16ps tmm1, tmm5, tmm7",
                            "tdpbf16ps tmm2, tmm6, tmm7",
                            b = in(reg) b,
                            sb = in(reg) bstride,
                            a0 = in(reg) a,
                            a1 = in(reg) a.add(1),
                            a2 = in(reg) a.add(2),
                            sa = in(reg) astride,
                            options(nostack, readonly),
                        );
                        q0 += 32;
                    }
                    std::arch::asm!(
                        "tilestored [{c0} + {s} * 1], tmm0",
                        "tilestored [{c1} + {s} * 1], tmm1",
                        "tilestored [{c2} + {s} * 1], tmm2",
                        c0 = in(reg) c[0].as_mut_ptr(),
                        c1 = in(reg) c[1].as_mut_ptr(),
                        c2 = in(reg) c[2].as_mut_ptr(),
                        s = in(reg) 64usize,
                        options(nostack),
                    );
                }
                // c[kx][i·16 + o] is the sum for input channel ci0 + i, output co0 + o.
                for i in 0..16 {
                    for o in 0..16 {
                        let d = &mut dw[((co0 + o) * cin + ci0 + i) * k * k + ky * k..][..k];
                        for (kx, d) in d.iter_mut().enumerate() {
                            *d += c[kx][i * 16 + o];
                        }
                    }
                }
            }
        }
    }
}

/// Staging for the tile kernels, compiled for AVX-512 (every AMX CPU has it) so that the
/// conversions to bf16 vectorise: the crates are built for baseline x86-64.
pub(crate) mod stage {
    use super::super::bf16::bf16_bits;
    use super::super::direct::Grid;

    /// One image [C, H, W] as channel pairs on the padded grid, [padded_pairs(C), g.s] words,
    /// written straight from the f32 pixels. Borders, the padding pairs and a missing odd
    /// channel's half are zero; a buffer already of this size keeps them (only pixels are
    /// written), so it is cleared only when its size changes.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VL.
    #[cfg_attr(
        target_arch = "x86_64",
        target_feature(enable = "avx512f,avx512bw,avx512vl")
    )]
    pub(crate) unsafe fn pairs(x: &[f32], c: usize, g: &Grid, out: &mut Vec<u32>) {
        let (h, w) = g.dims();
        let rows = super::padded_pairs(c);
        if out.len() != rows * g.s {
            out.clear();
            out.resize(rows * g.s, 0);
        }
        let hw = h * w;
        for p in 0..c.div_ceil(2) {
            let lo = &x[2 * p * hw..][..hw];
            let hi = (2 * p + 1 < c).then(|| &x[(2 * p + 1) * hw..][..hw]);
            let dst = &mut out[p * g.s..][..g.s];
            for y in 0..h {
                let d = &mut dst[(y + 1) * g.wp + 1..][..w];
                let l = &lo[y * w..][..w];
                match hi {
                    Some(hi) => {
                        for ((d, &a), &b) in d.iter_mut().zip(l).zip(&hi[y * w..][..w]) {
                            *d = bf16_bits(a) | (bf16_bits(b) << 16);
                        }
                    }
                    None => {
                        for (d, &a) in d.iter_mut().zip(l) {
                            *d = bf16_bits(a);
                        }
                    }
                }
            }
        }
    }

    /// The kernel's rows [C, g.q] back to [C, H, W] (+ bias); every element of `out` is written.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VL.
    #[cfg_attr(
        target_arch = "x86_64",
        target_feature(enable = "avx512f,avx512bw,avx512vl")
    )]
    pub(crate) unsafe fn unpad(
        q: &[f32],
        c: usize,
        g: &Grid,
        bias: Option<&[f32]>,
        out: &mut [std::mem::MaybeUninit<f32>],
    ) {
        let (h, w) = g.dims();
        for ch in 0..c {
            let add = bias.map_or(0.0, |b| b[ch]);
            for y in 0..h {
                let src = &q[ch * g.q + y * g.wp..][..w];
                let dst = &mut out[(ch * h + y) * w..][..w];
                for (d, &s) in dst.iter_mut().zip(src) {
                    d.write(s + add);
                }
            }
        }
    }

    /// The weight gradient's operands for `n` images from `first`: the input as bf16 rows
    /// [C_in, row] (image j's pixel (y, x) at j·stride + (y + 1)·wp + 1 + x, so tap (ky, kx) of
    /// position q is at q + ky·wp + kx), and the output gradient interleaved by position pairs,
    /// [len/2, C_out] words (position j·stride + y·wp + x), through `dy16`, its bf16 rows
    /// [C_out, len]. Positions not written stay zero while the sizes stay the same (the caller
    /// clears when they change).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VL.
    #[allow(clippy::too_many_arguments)]
    #[cfg_attr(
        target_arch = "x86_64",
        target_feature(enable = "avx512f,avx512bw,avx512vl")
    )]
    pub(crate) unsafe fn weight_grad_operands(
        x: &[f32],
        dy: &[f32],
        (first, n): (usize, usize),
        (cin, cout): (usize, usize),
        g: &Grid,
        (stride, row, len): (usize, usize, usize),
        x16: &mut [u16],
        dy16: &mut [u32],
        dyv: &mut [u32],
        db: &mut [f32],
    ) {
        let (h, w) = g.dims();
        let hw = h * w;
        let half = len / 2;
        for j in 0..n {
            let img = first + j;
            for c in 0..cin {
                let src = &x[(img * cin + c) * hw..][..hw];
                for y in 0..h {
                    let at = c * row + j * stride + (y + 1) * g.wp + 1;
                    for (d, &v) in x16[at..at + w].iter_mut().zip(&src[y * w..][..w]) {
                        *d = bf16_bits(v) as u16;
                    }
                }
            }
            for c in 0..cout {
                let src = &dy[(img * cout + c) * hw..][..hw];
                db[c] += super::super::sum(src) as f32;
                // SAFETY: the u16 view of row c of dy16 ([cout, len/2] words) is aligned and
                // in bounds; x86 is little-endian, so position 2k is word k's low half.
                let r16 = unsafe {
                    std::slice::from_raw_parts_mut(
                        dy16.as_mut_ptr().add(c * half).cast::<u16>(),
                        len,
                    )
                };
                for y in 0..h {
                    let at = j * stride + y * g.wp;
                    for (d, &v) in r16[at..at + w].iter_mut().zip(&src[y * w..][..w]) {
                        *d = bf16_bits(v) as u16;
                    }
                }
            }
        }
        transpose_pairs(dy16, half, cout, dyv);
    }

    /// The output gradient's bf16 rows as position-pair words, [cout, half], transposed to the
    /// tile kernel's [half, cout], sixteen position pairs at a time so that the destination
    /// rows stay in L1.
    pub(crate) fn transpose_pairs(dy16: &[u32], half: usize, cout: usize, dyv: &mut [u32]) {
        for p0 in (0..half).step_by(16) {
            let pn = (half - p0).min(16);
            for c in 0..cout {
                let src = &dy16[c * half + p0..][..pn];
                for (k, &v) in src.iter().enumerate() {
                    dyv[(p0 + k) * cout + c] = v;
                }
            }
        }
    }
}
