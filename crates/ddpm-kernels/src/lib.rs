//! Fast CPU kernels for diffusion UNets, as Candle custom ops with their own backward passes.
//!
//! Five ops cover the hot path of an improved-diffusion UNet: [`conv2d`] (3×3, 1×1 and strided),
//! [`conv1x1`] on sequences, [`group_norm()`] fused with FiLM scale-shift and SiLU, multi-head
//! [`attention()`] and [`upsample_nearest2x`]. Each takes a [`KernelOptions`] value saying how to
//! compute it, so two models with different options live side by side in one process. On the
//! CPU with f32 tensors they run hand-written kernels in the family ([`Isa`]) the CPU runs,
//! detected at run time:
//! - AMX-BF16 tiles ([`conv::amx`]) and AVX512-BF16 vector products ([`conv::bf16`]) for the
//!   3×3 convolutions at [`Precision::Bf16`];
//! - direct AVX-512 and AVX2 3×3 convolutions ([`conv::direct`]) and vectorised GroupNorm/SiLU
//!   ([`mod@group_norm`]);
//! - im2col + `gemm` for the other convolutions and for CPUs without AVX2 ([`mod@conv`]).
//!
//! Elsewhere (other devices and dtypes), or with [`KernelChoice::Plain`], the ops are
//! compositions of plain Candle ops ([`mod@reference`]), which also serve as the oracle the
//! tests compare every kernel with.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ddpm_kernels::{conv2d, reference, KernelOptions};
//!
//! let dev = Device::Cpu;
//! let x = Tensor::randn(0f32, 1.0, (2, 8, 14, 14), &dev)?;
//! let w = Tensor::randn(0f32, 0.1, (16, 8, 3, 3), &dev)?;
//! let b = Tensor::zeros(16, candle_core::DType::F32, &dev)?;
//! let fast = conv2d(&x, &w, &b, 1, 1, &KernelOptions::default())?;
//! let plain = reference::conv2d(&x, &w, &b, 1, 1)?;
//! let err = (fast - plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(err < 1e-4);
//! # Ok::<(), candle_core::Error>(())
//! ```

#![warn(missing_docs)]
// Off x86_64 the ISA-specific kernels are compiled (their dispatch code is shared) but never
// reached, so their helpers and some arguments are unused there.
#![cfg_attr(not(target_arch = "x86_64"), allow(unused))]

pub mod attention;
pub mod conv;
pub mod group_norm;
mod isa;
pub mod profile;
pub mod reference;
pub mod upsample;

pub use isa::{isa_from_env, Isa, Kernels, Precision, UnknownIsa, UnknownPrecision};

use candle_core::{DType, Result, Tensor};
use std::mem::MaybeUninit;

/// Whether `DDPM_PLAIN_OPS` asks for plain Candle ops (set to anything but empty or "0").
pub fn plain_ops_from_env() -> bool {
    std::env::var_os("DDPM_PLAIN_OPS").is_some_and(|v| v != "0" && !v.is_empty())
}

/// Which kernels the ops run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KernelChoice {
    /// The most specialised family this CPU runs.
    #[default]
    Auto,
    /// At most the given family (`UpTo(Isa::Portable)`: the portable kernels, which run on any
    /// CPU); a family above the CPU's means the CPU's own.
    UpTo(Isa),
    /// Compositions of plain Candle ops, as on devices other than the CPU.
    Plain,
}

/// How the ops compute: the kernels and the precision of the 3×3 convolutions.
///
/// A value, given to each op (and to a model when it is built), never a process-wide switch.
/// The binaries let environment variables override it for benchmarks and CI
/// ([`KernelOptions::with_env_overrides`]); the library itself reads none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct KernelOptions {
    /// The arithmetic precision of the 3×3 convolutions (forward and both gradients): at
    /// [`Precision::Bf16`] they multiply in bf16 with f32 accumulation where the CPU has AMX or
    /// AVX512-BF16 (f32 elsewhere); weights, bias gradients and every other op stay f32.
    pub precision: Precision,
    /// Which kernels run.
    pub choice: KernelChoice,
}

/// A setting these options cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// `DDPM_ISA` names no kernel family.
    #[error("DDPM_ISA: {0}")]
    UnknownIsa(#[from] UnknownIsa),
}

impl KernelOptions {
    /// The default kernels at `precision`.
    pub fn with_precision(precision: Precision) -> Self {
        Self {
            precision,
            ..Self::default()
        }
    }

    /// The kernel family these options run on this CPU (the portable one for
    /// [`KernelChoice::Plain`], which runs none).
    pub fn isa(&self) -> Isa {
        match self.choice {
            KernelChoice::Auto => Isa::detected(),
            KernelChoice::UpTo(limit) => limit.min(Isa::detected()),
            KernelChoice::Plain => Isa::Portable,
        }
    }

    /// What each op records: the family and whether its 3×3 convolutions take bf16 products.
    pub fn kernels(&self) -> Kernels {
        Kernels::new(self.isa(), self.bf16_convolutions())
    }

    /// Whether the 3×3 convolutions take bf16 kernels (asked for and supported).
    pub fn bf16_convolutions(&self) -> bool {
        self.precision == Precision::Bf16 && self.bf16_supported()
    }

    /// Whether the chosen family has bf16 convolution kernels (AMX or AVX512-BF16).
    pub fn bf16_supported(&self) -> bool {
        self.choice != KernelChoice::Plain && self.isa() >= Isa::Avx512Bf16
    }

    /// Whether the fast kernels handle tensors like `x` (f32 on the CPU, unless
    /// [`KernelChoice::Plain`]).
    pub fn fast_path(&self, x: &Tensor) -> bool {
        self.choice != KernelChoice::Plain && x.device().is_cpu() && x.dtype() == DType::F32
    }

    /// These options as the environment overrides them, for benchmarks and CI: `DDPM_ISA=family`
    /// caps the family, `DDPM_PLAIN_OPS=1` forces plain Candle ops. An unknown family is an
    /// error naming it.
    pub fn with_env_overrides(mut self) -> std::result::Result<Self, KernelError> {
        if let Some(limit) = isa_from_env()? {
            self.choice = KernelChoice::UpTo(limit);
        }
        if plain_ops_from_env() {
            self.choice = KernelChoice::Plain;
        }
        Ok(self)
    }

    /// The kernels these options run for f32 CPU tensors, in words (benchmarks and logs name it
    /// beside their figures).
    pub fn describe(&self) -> String {
        match self.choice {
            KernelChoice::Plain => "plain Candle ops".to_string(),
            _ => self.kernels().describe(),
        }
    }
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

/// 2-D convolution with bias: x `[B, Cin, H, W]`, weight `[Cout, Cin, k, k]`, bias `[Cout]`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
    opts: &KernelOptions,
) -> Result<Tensor> {
    if opts.fast_path(x) {
        conv::conv2d(x, weight, bias, stride, padding, opts.kernels())
    } else {
        reference::conv2d(x, weight, bias, stride, padding)
    }
}

/// Pointwise convolution on sequences: x `[B, Cin, T]`, weight `[Cout, Cin, 1]`, bias `[Cout]`.
pub fn conv1x1(x: &Tensor, weight: &Tensor, bias: &Tensor, opts: &KernelOptions) -> Result<Tensor> {
    if opts.fast_path(x) {
        // The 2-D kernel on [B, Cin, T, 1]: one GEMM per image, and packed weight and bias
        // gradients instead of reductions over broadcast dimensions.
        let (b, c, t) = x.dims3()?;
        let x4 = x.reshape((b, c, t, 1))?;
        conv::conv2d(&x4, &weight.unsqueeze(3)?, bias, 1, 0, opts.kernels())?.squeeze(3)
    } else {
        reference::conv1x1(x, weight, bias)
    }
}

/// GroupNorm over `groups` of x [B, C, ...], then `h·(1 + scale) + shift` when given
/// (scale and shift [B, C]), then SiLU when `silu`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    scale_shift: Option<(&Tensor, &Tensor)>,
    silu: bool,
    opts: &KernelOptions,
) -> Result<Tensor> {
    if opts.fast_path(x) {
        group_norm::group_norm(x, groups, weight, bias, eps, scale_shift, silu, opts.isa())
    } else {
        reference::group_norm(x, groups, weight, bias, eps, scale_shift, silu)
    }
}

/// Multi-head QKV attention on qkv [B, heads·3·ch, T] laid out per head as (q, k, v).
pub fn attention(qkv: &Tensor, heads: usize, opts: &KernelOptions) -> Result<Tensor> {
    if opts.fast_path(qkv) {
        attention::attention(qkv, heads)
    } else {
        reference::attention(qkv, heads)
    }
}

/// Nearest-neighbour ×2 upsampling of [B, C, H, W].
pub fn upsample_nearest2x(x: &Tensor, opts: &KernelOptions) -> Result<Tensor> {
    if opts.fast_path(x) {
        upsample::upsample_nearest2x(x)
    } else {
        reference::upsample_nearest2x(x)
    }
}

#[cfg(test)]
mod tests;
