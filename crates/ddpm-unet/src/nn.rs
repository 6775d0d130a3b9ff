//! Layers with PyTorch's parameter names, shapes and default initialisation.

use crate::ops;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};

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
    /// Creates `weight` [out, in] and `bias` [out] under `vb`.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", weight_init(false))?;
        let bias = vb.get_with_hints(out_dim, "bias", bias_init(in_dim))?;
        Ok(Self { weight, bias })
    }

    /// Applies the layer to [B, in].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// `nn.Conv2d` (square kernel, weight [out, in, k, k]).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Creates the layer; `zero` gives the original's `zero_module` initialisation.
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        zero: bool,
    ) -> Result<Self> {
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
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }

    /// Applies the convolution to [B, C, H, W].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv2d(x, &self.weight, &self.bias, self.stride, self.padding)
    }
}

/// `nn.Conv1d` with kernel size 1 (weight [out, in, 1]), used by attention on [B, C, T].
#[derive(Debug, Clone)]
pub struct Conv1x1 {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1x1 {
    /// Creates the layer; `zero` gives the original's `zero_module` initialisation.
    pub fn new(vb: VarBuilder, c_in: usize, c_out: usize, zero: bool) -> Result<Self> {
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
        Ok(Self { weight, bias })
    }

    /// Applies the layer to [B, C, T].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv1x1(x, &self.weight, &self.bias)
    }
}

/// `GroupNorm32`: GroupNorm over 32 groups, eps 1e-5, computed in f32 or wider.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

/// GroupNorm's epsilon (PyTorch's default).
pub const GROUP_NORM_EPS: f64 = 1e-5;

impl GroupNorm {
    /// Creates `weight` (ones) and `bias` (zeros) for `channels`.
    pub fn new(vb: VarBuilder, groups: usize, channels: usize) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            groups,
        })
    }

    /// Normalises, then optionally applies `(1 + scale)·h + shift` and SiLU.
    pub fn forward(
        &self,
        x: &Tensor,
        scale_shift: Option<(&Tensor, &Tensor)>,
        silu: bool,
    ) -> Result<Tensor> {
        ops::group_norm(
            x,
            self.groups,
            &self.weight,
            &self.bias,
            GROUP_NORM_EPS,
            scale_shift,
            silu,
        )
    }
}

/// `nn.Embedding` (weight [num, dim], initialised N(0, 1)).
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

    /// Looks up integer ids [B] (any integer dtype).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.weight.index_select(&ids.to_dtype(DType::U32)?, 0)
    }
}

/// Sinusoidal timestep embeddings [B, dim], laid out [cos, sin] as in the original.
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
