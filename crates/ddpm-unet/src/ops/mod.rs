//! The UNet's hot operations, kept behind one small interface.
//!
//! The model calls only these functions for convolution, GroupNorm (+ scale-shift + SiLU),
//! attention and upsampling. On the CPU with f32 they run hand-written kernels, each with its own
//! backward pass: direct AVX-512 3×3 convolutions ([`direct`], with a bf16 variant in [`bf16`]),
//! im2col + `gemm` for the other convolutions and for CPUs without AVX-512 ([`cpu`]), fused
//! GroupNorm ([`norm`]) and attention ([`mod@attention`]). Elsewhere they are compositions of plain
//! Candle ops ([`mod@reference`]), which also serve as the oracle in tests. Setting
//! `DDPM_PLAIN_OPS=1` forces the plain path everywhere.

pub mod attention;
pub mod bf16;
pub mod cpu;
pub mod direct;
mod flat;
pub mod norm;
pub mod reference;
#[cfg(target_arch = "x86_64")]
mod simd;

use candle_core::{DType, Result, Tensor};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static BF16_CONVOLUTIONS: AtomicBool = AtomicBool::new(false);

/// Lets the direct 3×3 convolutions (forward, input and weight gradients) multiply in bf16 with
/// f32 accumulation, where the CPU has AVX512-BF16. Process-wide, like Candle's own reduced-
/// precision switches; weights, bias gradients and every other op stay f32.
pub fn set_bf16_convolutions(on: bool) {
    BF16_CONVOLUTIONS.store(on, Ordering::Relaxed);
}

/// Whether convolutions created now take the bf16 kernels (asked for and supported).
pub fn bf16_convolutions() -> bool {
    BF16_CONVOLUTIONS.load(Ordering::Relaxed) && bf16_supported()
}

/// Whether this CPU and configuration can take the bf16 kernels at all: AVX512-BF16, and the
/// direct kernels they belong to enabled.
pub fn bf16_supported() -> bool {
    bf16::available() && direct_enabled()
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

/// Whether 3×3 convolutions use the direct AVX-512 kernels: when the CPU has AVX-512 and
/// `DDPM_NO_DIRECT_CONV` is not set (it selects the im2col + GEMM kernels instead).
pub fn direct_enabled() -> bool {
    static DIRECT: OnceLock<bool> = OnceLock::new();
    *DIRECT.get_or_init(|| direct::available() && !env_flag("DDPM_NO_DIRECT_CONV"))
}

/// The CPU kernels this process uses for f32 tensors, in words (benchmarks and logs name it
/// beside their figures).
pub fn kernel_variant() -> &'static str {
    if plain_forced() {
        "plain Candle ops (DDPM_PLAIN_OPS)"
    } else if direct_enabled() && bf16::available() {
        "direct AVX-512 3x3 convolutions (bf16 products available: AVX512-BF16)"
    } else if direct_enabled() {
        "direct AVX-512 3x3 convolutions"
    } else {
        "im2col + GEMM convolutions"
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
