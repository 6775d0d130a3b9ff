//! The UNet's building blocks: ResBlock, AttentionBlock, Downsample, Upsample.

use crate::config::NORM_GROUPS;
use crate::nn::{Conv1x1, Conv2d, Conv2dConfig, GroupNorm, Linear};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use ddpm_kernels::KernelOptions;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A 3×3 convolution config (`padding` 1, `stride` given) on `kernels`.
pub(crate) fn conv3(stride: usize, zero_init: bool, kernels: KernelOptions) -> Conv2dConfig {
    Conv2dConfig {
        stride,
        padding: 1,
        zero_init,
        kernels,
    }
}

/// Inverted dropout with a mask from our own seeded RNG (Candle's CPU RNG cannot be seeded).
pub fn dropout(x: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let keep = 1.0 - p;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            if rng.random::<f64>() < keep {
                (1.0 / keep) as f32
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

/// A residual block conditioned on the timestep embedding (`ResBlock`).
#[derive(Debug, Clone)]
pub struct ResBlock {
    in_norm: GroupNorm,
    in_conv: Conv2d,
    emb_linear: Linear,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    skip: Option<Conv2d>,
    use_scale_shift_norm: bool,
    out_channels: usize,
    dropout: f64,
}

impl ResBlock {
    /// Builds the block with the original's layer indices (in_layers.0/.2, out_layers.0/.3, ...).
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        emb_channels: usize,
        out_channels: usize,
        dropout: f64,
        use_scale_shift_norm: bool,
        kernels: KernelOptions,
    ) -> Result<Self> {
        let k = kernels;
        let emb_out = if use_scale_shift_norm {
            2 * out_channels
        } else {
            out_channels
        };
        Ok(Self {
            in_norm: GroupNorm::new(vb.pp("in_layers.0"), NORM_GROUPS, channels, k)?,
            in_conv: Conv2d::new(
                vb.pp("in_layers.2"),
                channels,
                out_channels,
                3,
                conv3(1, false, k),
            )?,
            emb_linear: Linear::new(vb.pp("emb_layers.1"), emb_channels, emb_out)?,
            out_norm: GroupNorm::new(vb.pp("out_layers.0"), NORM_GROUPS, out_channels, k)?,
            out_conv: Conv2d::new(
                vb.pp("out_layers.3"),
                out_channels,
                out_channels,
                3,
                conv3(1, true, k),
            )?,
            skip: if out_channels == channels {
                None
            } else {
                let cfg = Conv2dConfig {
                    kernels: k,
                    ..Default::default()
                };
                Some(Conv2d::new(
                    vb.pp("skip_connection"),
                    channels,
                    out_channels,
                    1,
                    cfg,
                )?)
            },
            use_scale_shift_norm,
            out_channels,
            dropout,
        })
    }

    /// Applies the block; `rng` is given in training mode, when dropout is active.
    pub fn forward(
        &self,
        x: &Tensor,
        emb: &Tensor,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let h = self
            .in_conv
            .forward(&self.in_norm.forward(x, None, true)?)?;
        let emb_out = self.emb_linear.forward(&emb.silu()?)?;
        let mut h = if self.use_scale_shift_norm {
            let scale = emb_out.narrow(1, 0, self.out_channels)?;
            let shift = emb_out.narrow(1, self.out_channels, self.out_channels)?;
            self.out_norm.forward(&h, Some((&scale, &shift)), true)?
        } else {
            let h = h.broadcast_add(&emb_out.unsqueeze(2)?.unsqueeze(3)?)?;
            self.out_norm.forward(&h, None, true)?
        };
        if let Some(rng) = rng {
            if self.dropout > 0.0 {
                h = dropout(&h, self.dropout, rng)?;
            }
        }
        let h = self.out_conv.forward(&h)?;
        match &self.skip {
            Some(skip) => skip.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Self-attention over spatial positions (`AttentionBlock`).
#[derive(Debug, Clone)]
pub struct AttentionBlock {
    norm: GroupNorm,
    qkv: Conv1x1,
    proj_out: Conv1x1,
    num_heads: usize,
    kernels: KernelOptions,
}

impl AttentionBlock {
    /// Builds `norm`, `qkv` and the zero-initialised `proj_out`.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        num_heads: usize,
        kernels: KernelOptions,
    ) -> Result<Self> {
        let k = kernels;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), NORM_GROUPS, channels, k)?,
            qkv: Conv1x1::new(vb.pp("qkv"), channels, 3 * channels, false, k)?,
            proj_out: Conv1x1::new(vb.pp("proj_out"), channels, channels, true, k)?,
            num_heads,
            kernels,
        })
    }

    /// Applies attention to [B, C, H, W].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, hh, ww) = x.dims4()?;
        let x = x.reshape((b, c, hh * ww))?;
        let qkv = self.qkv.forward(&self.norm.forward(&x, None, false)?)?;
        let h = self.proj_out.forward(&ddpm_kernels::attention(
            &qkv,
            self.num_heads,
            &self.kernels,
        )?)?;
        (x + h)?.reshape((b, c, hh, ww))
    }
}

/// A stride-2 3×3 convolution (`Downsample` with conv_resample).
#[derive(Debug, Clone)]
pub struct Downsample {
    op: Conv2d,
}

impl Downsample {
    /// Builds `op`.
    pub fn new(vb: VarBuilder, channels: usize, kernels: KernelOptions) -> Result<Self> {
        Ok(Self {
            op: Conv2d::new(vb.pp("op"), channels, channels, 3, conv3(2, false, kernels))?,
        })
    }

    /// Halves the spatial size (rounding up).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.op.forward(x)
    }
}

/// Nearest ×2 upsampling followed by a 3×3 convolution (`Upsample` with conv_resample).
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv2d,
    kernels: KernelOptions,
}

impl Upsample {
    /// Builds `conv`.
    pub fn new(vb: VarBuilder, channels: usize, kernels: KernelOptions) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(
                vb.pp("conv"),
                channels,
                channels,
                3,
                conv3(1, false, kernels),
            )?,
            kernels,
        })
    }

    /// Doubles the spatial size.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv
            .forward(&ddpm_kernels::upsample_nearest2x(x, &self.kernels)?)
    }
}

/// One layer of a `TimestepEmbedSequential`.
#[derive(Debug, Clone)]
pub enum Layer {
    /// A plain convolution (the first input block).
    Conv(Conv2d),
    /// A residual block.
    Res(ResBlock),
    /// An attention block.
    Attention(AttentionBlock),
    /// Downsampling.
    Down(Downsample),
    /// Upsampling.
    Up(Upsample),
}

/// A sequence of layers that passes the timestep embedding to the residual blocks.
#[derive(Debug, Clone, Default)]
pub struct TimestepEmbedSequential(pub Vec<Layer>);

impl TimestepEmbedSequential {
    /// Applies each layer in turn.
    pub fn forward(
        &self,
        x: &Tensor,
        emb: &Tensor,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.0 {
            h = match layer {
                Layer::Conv(c) => c.forward(&h)?,
                Layer::Res(r) => r.forward(&h, emb, rng.as_deref_mut())?,
                Layer::Attention(a) => a.forward(&h)?,
                Layer::Down(d) => d.forward(&h)?,
                Layer::Up(u) => u.forward(&h)?,
            };
        }
        Ok(h)
    }
}
