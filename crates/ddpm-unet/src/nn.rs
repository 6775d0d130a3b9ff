//! The UNet's layers, with PyTorch's parameter names, shapes and default initialisation.
//!
//! Each layer follows candle-nn's pattern (`new(vb, ...)` creating its parameters under `vb`,
//! then `forward`); the convolutions and GroupNorm run the fast kernels of [`ddpm_kernels`] with
//! the [`KernelOptions`] they were built with. Other networks (the MNIST classifier of
//! ddpm-train, a researcher's own denoiser) use them as they are.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use ddpm_unet::nn::{Conv2d, Conv2dConfig, GroupNorm};
//! use ddpm_unet::ParamStore;
//!
//! let params = ParamStore::new(0, DType::F32, &Device::Cpu);
//! let vb = params.var_builder();
//! let conv = Conv2d::new(vb.pp("conv"), 1, 32, 3, Conv2dConfig { padding: 1, ..Default::default() })?;
//! let norm = GroupNorm::new(vb.pp("norm"), 32, 32, Default::default())?;
//! let x = Tensor::zeros((4, 1, 28, 28), DType::F32, &Device::Cpu)?;
//! let h = norm.forward(&conv.forward(&x)?, None, true)?;
//! assert_eq!(h.dims(), [4, 32, 28, 28]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use ddpm_kernels::KernelOptions;

/// PyTorch's default bias initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
fn bias_init(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// The weight init hint: PyTorch's default, or zeros for the layers the original zero-initialises.
fn weight_init(zero: bool) -> Init {
    if zero {
        Init::Const(0.0)
    } else {
        candle_nn::init::DEFAULT_KAIMING_UNIFORM
    }
}

/// `nn.Linear`: y = x Wᵀ + b.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Creates `weight` `[out, in]` and `bias` `[out]` under `vb`.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", weight_init(false))?;
        let bias = vb.get_with_hints(out_dim, "bias", bias_init(in_dim))?;
        Ok(Self { weight, bias })
    }

    /// Applies the layer to `[B, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// How a [`Conv2d`] is built and computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conv2dConfig {
    /// Stride (1 or 2 in the UNet).
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Zero weights and bias (the original's `zero_module`) instead of PyTorch's default.
    pub zero_init: bool,
    /// The kernels the convolution runs.
    pub kernels: KernelOptions,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            zero_init: false,
            kernels: KernelOptions::default(),
        }
    }
}

/// `nn.Conv2d` (square kernel, weight `[out, in, k, k]`).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    cfg: Conv2dConfig,
}

impl Conv2d {
    /// Creates `weight` `[c_out, c_in, k, k]` and `bias` `[c_out]` under `vb`.
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        k: usize,
        cfg: Conv2dConfig,
    ) -> Result<Self> {
        let zero = cfg.zero_init;
        let fan_in = c_in * k * k;
        let weight = vb.get_with_hints((c_out, c_in, k, k), "weight", weight_init(zero))?;
        let bias = vb.get_with_hints(
            c_out,
            "bias",
            if zero {
                Init::Const(0.0)
            } else {
                bias_init(fan_in)
            },
        )?;
        Ok(Self { weight, bias, cfg })
    }

    /// Applies the convolution to `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        ddpm_kernels::conv2d(x, &self.weight, &self.bias, c.stride, c.padding, &c.kernels)
    }
}

/// `nn.Conv1d` with kernel size 1 (weight `[out, in, 1]`), used by attention on `[B, C, T]`.
#[derive(Debug, Clone)]
pub struct Conv1x1 {
    weight: Tensor,
    bias: Tensor,
    kernels: KernelOptions,
}

impl Conv1x1 {
    /// Creates `weight` `[c_out, c_in, 1]` and `bias` `[c_out]` under `vb`; `zero` gives the
    /// original's `zero_module` initialisation.
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        zero: bool,
        kernels: KernelOptions,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((c_out, c_in, 1), "weight", weight_init(zero))?;
        let bias = vb.get_with_hints(
            c_out,
            "bias",
            if zero {
                Init::Const(0.0)
            } else {
                bias_init(c_in)
            },
        )?;
        Ok(Self {
            weight,
            bias,
            kernels,
        })
    }

    /// Applies the layer to `[B, C, T]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ddpm_kernels::conv1x1(x, &self.weight, &self.bias, &self.kernels)
    }
}

/// GroupNorm (the UNet's `GroupNorm32` with 32 groups), eps 1e-5, fused with the FiLM
/// scale-shift and SiLU that follow it in the model.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    kernels: KernelOptions,
}

/// GroupNorm's epsilon (PyTorch's default).
pub const GROUP_NORM_EPS: f64 = 1e-5;

impl GroupNorm {
    /// Creates `weight` (ones) and `bias` (zeros) for `channels`.
    pub fn new(
        vb: VarBuilder,
        groups: usize,
        channels: usize,
        kernels: KernelOptions,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            groups,
            kernels,
        })
    }

    /// Normalises, then optionally applies `(1 + scale)·h + shift` and SiLU.
    pub fn forward(
        &self,
        x: &Tensor,
        scale_shift: Option<(&Tensor, &Tensor)>,
        silu: bool,
    ) -> Result<Tensor> {
        ddpm_kernels::group_norm(
            x,
            self.groups,
            &self.weight,
            &self.bias,
            GROUP_NORM_EPS,
            scale_shift,
            silu,
            &self.kernels,
        )
    }
}

/// `nn.Embedding` (weight `[num, dim]`, initialised N(0, 1)).
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// Creates the table under `vb`.
    pub fn new(vb: VarBuilder, num: usize, dim: usize) -> Result<Self> {
        let weight = vb.get_with_hints(
            (num, dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        Ok(Self { weight })
    }

    /// The table, `[num, dim]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Looks up integer ids `[B]` (any integer dtype).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.weight.index_select(&ids.to_dtype(DType::U32)?, 0)
    }
}

/// Sinusoidal timestep embeddings `[B, dim]`, laid out `[cos, sin]` as in the original.
///
/// Frequencies are exp(-ln(10000)·i/half) for i < half; an odd `dim` gets a zero last column.
/// As in the original, the embedding is computed in f32 whatever `dtype` is, then cast.
pub fn timestep_embedding(timesteps: &Tensor, dim: usize, dtype: DType) -> Result<Tensor> {
    let half = dim / 2;
    let device: &Device = timesteps.device();
    let n = timesteps.dims1()?;
    let log_max = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| (log_max * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), device)?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let mut parts = vec![args.cos()?, args.sin()?];
    if dim % 2 == 1 {
        parts.push(Tensor::zeros((n, 1), DType::F32, device)?);
    }
    Tensor::cat(&parts, 1)?.to_dtype(dtype)
}
