//! The UNet's hot operations, kept behind one small interface.
//!
//! The model calls only these functions for convolution, GroupNorm (+ scale-shift + SiLU),
//! attention and upsampling. On the CPU with f32 tensors they run hand-written kernels, each with
//! its own backward pass, in the family ([`Isa`]) the CPU runs, chosen at run time:
//! - AMX-BF16 tiles ([`amx`]) and AVX512-BF16 vector products ([`bf16`]) for the 3×3
//!   convolutions at bf16 precision ([`set_precision`]);
//! - direct AVX-512 3×3 convolutions ([`direct`]) and AVX-512 GroupNorm/SiLU ([`norm`]);
//! - im2col + `gemm` for the other convolutions and for CPUs without AVX-512 ([`cpu`]), the
//!   element-wise loops compiled for AVX2 + FMA or for baseline x86-64.
//!
//! Attention ([`mod@attention`]) is shared by all. Elsewhere (other devices and dtypes) the ops
//! are compositions of plain Candle ops ([`mod@reference`]), which also serve as the oracle in
//! tests. `DDPM_ISA=avx2` (or [`set_isa_limit`]) caps the family; `DDPM_PLAIN_OPS=1` forces the
//! plain path everywhere.

pub mod amx;
pub mod attention;
mod avx2;
pub mod bf16;
pub mod cpu;
pub mod direct;
mod flat;
mod isa;
pub mod norm;
mod pointwise;
pub mod profile;
pub mod reference;
#[cfg(target_arch = "x86_64")]
mod simd;

pub use isa::{
    isa, isa_from_env, set_isa_limit, Isa, Kernels, Precision, UnknownIsa, UnknownPrecision,
};

use candle_core::{DType, Result, Tensor};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static BF16_CONVOLUTIONS: AtomicBool = AtomicBool::new(false);

/// Sets the precision of the 3×3 convolutions (forward, input and weight gradients) of ops
/// created from now on: at [`Precision::Bf16`] they multiply in bf16 with f32 accumulation
/// where the CPU has AMX or AVX512-BF16. Process-wide, like Candle's own reduced-precision
/// switches; weights, bias gradients and every other op stay f32.
pub fn set_precision(p: Precision) {
    BF16_CONVOLUTIONS.store(p == Precision::Bf16, Ordering::Relaxed);
}

/// The precision set by [`set_precision`].
pub fn precision() -> Precision {
    if BF16_CONVOLUTIONS.load(Ordering::Relaxed) {
        Precision::Bf16
    } else {
        Precision::F32
    }
}

/// Whether convolutions created now take bf16 kernels (asked for and supported).
pub fn bf16_convolutions() -> bool {
    BF16_CONVOLUTIONS.load(Ordering::Relaxed) && bf16_supported()
}

/// Whether this CPU, within the kernel family limit, has bf16 convolution kernels (AMX or
/// AVX512-BF16).
pub fn bf16_supported() -> bool {
    isa() >= Isa::Avx512Bf16
}

/// An uninitialised buffer of `n` f32 for an output that a kernel writes in full; see
/// [`assume_init`]. `vec![0.0; n]` would memset it first: on activations of tens of MB, that
/// write (and the cache lines it evicts) cost a few percent of a training step.
pub(crate) fn output_buffer(n: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { v.set_len(n) };
    v
}

/// The buffer as plain floats.
///
/// # Safety
/// Every element must have been written.
pub(crate) unsafe fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same allocation, length and capacity; MaybeUninit<f32> has f32's layout, and the
    // caller guarantees every element is initialised.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
}

/// A fully written part of an output buffer, as plain floats.
///
/// # Safety
/// Every element of `s` must have been written.
pub(crate) unsafe fn assume_init_mut(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: same layout; the caller guarantees initialisation.
    unsafe { &mut *(s as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Whether the environment variable `name` is set to something other than empty or "0".
fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v != "0" && !v.is_empty())
}

fn plain_forced() -> bool {
    static PLAIN: OnceLock<bool> = OnceLock::new();
    *PLAIN.get_or_init(|| env_flag("DDPM_PLAIN_OPS"))
}

/// The CPU kernels ops created now use for f32 tensors, in words (benchmarks and logs name it
/// beside their figures).
pub fn kernel_variant() -> String {
    if plain_forced() {
        "plain Candle ops (DDPM_PLAIN_OPS)".to_string()
    } else {
        Kernels::current().describe()
    }
}

/// Whether the fast CPU kernels handle tensors like `x`.
pub fn use_fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !plain_forced()
}

/// 2-D convolution with bias: x `[B, Cin, H, W]`, weight `[Cout, Cin, k, k]`, bias `[Cout]`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if use_fast_path(x) {
        cpu::conv2d(x, weight, bias, stride, padding)
    } else {
        reference::conv2d(x, weight, bias, stride, padding)
    }
}

/// Pointwise convolution on sequences: x `[B, Cin, T]`, weight `[Cout, Cin, 1]`, bias `[Cout]`.
pub fn conv1x1(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if use_fast_path(x) {
        // The 2-D kernel on [B, Cin, T, 1]: one GEMM per image, and packed weight and bias
        // gradients instead of reductions over broadcast dimensions.
        let (b, c, t) = x.dims3()?;
        cpu::conv2d(&x.reshape((b, c, t, 1))?, &weight.unsqueeze(3)?, bias, 1, 0)?.squeeze(3)
    } else {
        reference::conv1x1(x, weight, bias)
    }
}

/// GroupNorm over `groups` of x [B, C, ...], then `h·(1 + scale) + shift` when given
/// (scale and shift [B, C]), then SiLU when `silu`.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    scale_shift: Option<(&Tensor, &Tensor)>,
    silu: bool,
) -> Result<Tensor> {
    if use_fast_path(x) {
        norm::group_norm(x, groups, weight, bias, eps, scale_shift, silu)
    } else {
        reference::group_norm(x, groups, weight, bias, eps, scale_shift, silu)
    }
}

/// Multi-head QKV attention on qkv [B, heads·3·ch, T] laid out per head as (q, k, v).
pub fn attention(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    if use_fast_path(qkv) {
        attention::attention(qkv, heads)
    } else {
        reference::attention(qkv, heads)
    }
}

/// Nearest-neighbour ×2 upsampling of [B, C, H, W].
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    if use_fast_path(x) {
        cpu::upsample_nearest2x(x)
    } else {
        reference::upsample_nearest2x(x)
    }
}

#[cfg(test)]
mod tests;
