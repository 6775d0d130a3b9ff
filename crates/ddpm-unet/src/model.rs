//! The full UNet (`UNetModel`).

use crate::blocks::{
    conv3, AttentionBlock, Downsample, Layer, ResBlock, TimestepEmbedSequential, Upsample,
};
use crate::config::NORM_GROUPS;
use crate::nn::{timestep_embedding, Conv2d, Embedding, GroupNorm, Linear};
use crate::{Result, UNetConfig, UNetError};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use ddpm_kernels::KernelOptions;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Mutex;

/// The improved-diffusion UNet with attention and timestep (and optional class) embedding.
#[derive(Debug)]
pub struct UNet {
    cfg: UNetConfig,
    time_embed: (Linear, Linear),
    label_emb: Option<Embedding>,
    /// The null class's embedding (`label_emb.null`), for classifier-free guidance.
    label_null: Option<Tensor>,
    input_blocks: Vec<TimestepEmbedSequential>,
    middle_block: TimestepEmbedSequential,
    output_blocks: Vec<TimestepEmbedSequential>,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    dtype: DType,
    dropout_rng: Mutex<ChaCha8Rng>,
}

impl UNet {
    /// Builds the network under `vb` with the original's parameter names, on the default
    /// kernels (the CPU's best family, f32).
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        Self::with_kernels(vb, cfg, KernelOptions::default())
    }

    /// [`UNet::new`] on the given kernels: two networks built with different options run side
    /// by side in one process, each on its own.
    pub fn with_kernels(vb: VarBuilder, cfg: &UNetConfig, kernels: KernelOptions) -> Result<Self> {
        cfg.validate()?;
        let k = kernels;
        let mc = cfg.model_channels;
        let ted = cfg.time_embed_dim();
        let time_embed = (
            Linear::new(vb.pp("time_embed.0"), mc, ted)?,
            Linear::new(vb.pp("time_embed.2"), ted, ted)?,
        );
        let label_emb = match cfg.num_classes {
            Some(n) => Some(Embedding::new(vb.pp("label_emb"), n, ted)?),
            None => None,
        };
        let label_null = if cfg.null_class {
            let init = candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            };
            Some(vb.pp("label_emb").get_with_hints((1, ted), "null", init)?)
        } else {
            None
        };
        let res = |vb: VarBuilder, c_in: usize, c_out: usize| {
            ResBlock::new(
                vb,
                c_in,
                ted,
                c_out,
                cfg.dropout,
                cfg.use_scale_shift_norm,
                k,
            )
        };

        let vbi = vb.pp("input_blocks");
        let mut input_blocks = vec![TimestepEmbedSequential(vec![Layer::Conv(Conv2d::new(
            vbi.pp("0.0"),
            cfg.in_channels,
            mc,
            3,
            conv3(1, false, k),
        )?)])];
        let mut chans = vec![mc];
        let (mut ch, mut ds) = (mc, 1usize);
        for (level, &mult) in cfg.channel_mult.iter().enumerate() {
            for _ in 0..cfg.num_res_blocks {
                let vbb = vbi.pp(input_blocks.len());
                let mut layers = vec![Layer::Res(res(vbb.pp(0), ch, mult * mc)?)];
                ch = mult * mc;
                if cfg.attention_resolutions.contains(&ds) {
                    layers.push(Layer::Attention(AttentionBlock::new(
                        vbb.pp(1),
                        ch,
                        cfg.num_heads,
                        k,
                    )?));
                }
                input_blocks.push(TimestepEmbedSequential(layers));
                chans.push(ch);
            }
            if level + 1 != cfg.channel_mult.len() {
                let vbb = vbi.pp(input_blocks.len());
                input_blocks.push(TimestepEmbedSequential(vec![Layer::Down(Downsample::new(
                    vbb.pp(0),
                    ch,
                    k,
                )?)]));
                chans.push(ch);
                ds *= 2;
            }
        }

        let vbm = vb.pp("middle_block");
        let middle_block = TimestepEmbedSequential(vec![
            Layer::Res(res(vbm.pp(0), ch, ch)?),
            Layer::Attention(AttentionBlock::new(vbm.pp(1), ch, cfg.num_heads, k)?),
            Layer::Res(res(vbm.pp(2), ch, ch)?),
        ]);

        let vbo = vb.pp("output_blocks");
        let mut output_blocks = Vec::new();
        for (level, &mult) in cfg.channel_mult.iter().enumerate().rev() {
            for i in 0..=cfg.num_res_blocks {
                let vbb = vbo.pp(output_blocks.len());
                let skip = chans.pop().expect("one skip channel count per input block");
                let mut layers = vec![Layer::Res(res(vbb.pp(0), ch + skip, mc * mult)?)];
                ch = mc * mult;
                if cfg.attention_resolutions.contains(&ds) {
                    layers.push(Layer::Attention(AttentionBlock::new(
                        vbb.pp(layers.len()),
                        ch,
                        cfg.num_heads,
                        k,
                    )?));
                }
                if level > 0 && i == cfg.num_res_blocks {
                    layers.push(Layer::Up(Upsample::new(vbb.pp(layers.len()), ch, k)?));
                    ds /= 2;
                }
                output_blocks.push(TimestepEmbedSequential(layers));
            }
        }
        Ok(Self {
            cfg: cfg.clone(),
            time_embed,
            label_emb,
            label_null,
            input_blocks,
            middle_block,
            output_blocks,
            out_norm: GroupNorm::new(vb.pp("out.0"), NORM_GROUPS, ch, k)?,
            out_conv: Conv2d::new(vb.pp("out.2"), mc, cfg.out_channels, 3, conv3(1, true, k))?,
            dtype: vb.dtype(),
            dropout_rng: Mutex::new(ChaCha8Rng::seed_from_u64(0)),
        })
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// The null class's label (`num_classes`) of a model trained for classifier-free guidance.
    pub fn null_label(&self) -> Option<u32> {
        self.cfg
            .num_classes
            .filter(|_| self.cfg.null_class)
            .map(|n| n as u32)
    }

    /// Reseeds the dropout RNG (the trainer does this every step, so resuming is exact).
    pub fn set_dropout_seed(&self, seed: u64) {
        *self.dropout_rng.lock().unwrap_or_else(|p| p.into_inner()) =
            ChaCha8Rng::seed_from_u64(seed);
    }

    /// Checks the inputs of [`Self::forward`], says what is wrong, and returns the labels as
    /// `u32` indices.
    fn check_inputs(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        labels: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let bad = |m: String| Err(UNetError::Input(m));
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != self.cfg.in_channels {
            return bad(format!(
                "x has shape {dims:?}; expected [B, {}, H, W]",
                self.cfg.in_channels
            ));
        }
        self.cfg
            .validate_image_size(dims[2], dims[3])
            .map_err(|e| UNetError::Input(e.to_string().replace("invalid UNet config: ", "")))?;
        if timesteps.dims() != [dims[0]] {
            return bad(format!(
                "timesteps have shape {:?}; expected [{}]",
                timesteps.dims(),
                dims[0]
            ));
        }
        match (labels, self.cfg.num_classes) {
            (None, None) => Ok(None),
            (Some(_), None) => bad("class labels given to an unconditional model".into()),
            (None, Some(n)) => bad(format!(
                "this model is class-conditional ({n} classes) and needs labels"
            )),
            (Some(y), Some(n)) => {
                if y.dims() != [dims[0]] {
                    return bad(format!(
                        "labels have shape {:?}; expected [{}]",
                        y.dims(),
                        dims[0]
                    ));
                }
                class_indices(y, n + usize::from(self.cfg.null_class)).map(Some)
            }
        }
    }

    /// Applies the model: x `[B, C, H, W]`, timesteps `[B]` (as the model sees them, 0..1000),
    /// optional class labels `[B]`; `train` turns dropout on.
    pub fn forward(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        labels: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let labels = self.check_inputs(x, timesteps, labels)?;
        let x = x.to_dtype(self.dtype)?;
        let t_emb = timestep_embedding(timesteps, self.cfg.model_channels, self.dtype)?;
        let mut emb = self
            .time_embed
            .1
            .forward(&self.time_embed.0.forward(&t_emb)?.silu()?)?;
        if let (Some(le), Some(y)) = (&self.label_emb, &labels) {
            let label_emb = match &self.label_null {
                // Label num_classes is the null class: the table with its row appended.
                Some(null) => Tensor::cat(&[le.weight(), null], 0)?.index_select(y, 0)?,
                None => le.forward(y)?,
            };
            emb = (emb + label_emb)?;
        }
        let mut guard = (train && self.cfg.dropout > 0.0)
            .then(|| self.dropout_rng.lock().unwrap_or_else(|p| p.into_inner()));
        let mut hs = Vec::with_capacity(self.input_blocks.len());
        let mut h = x;
        for block in &self.input_blocks {
            h = block.forward(&h, &emb, guard.as_deref_mut())?;
            hs.push(h.clone());
        }
        h = self.middle_block.forward(&h, &emb, guard.as_deref_mut())?;
        for block in &self.output_blocks {
            let skip = hs.pop().expect("one skip per output block");
            h = block.forward(&Tensor::cat(&[&h, &skip], 1)?, &emb, guard.as_deref_mut())?;
        }
        Ok(self
            .out_conv
            .forward(&self.out_norm.forward(&h, None, true)?)?)
    }
}

/// Class labels as `u32` indices below `num_classes`, from any integer dtype (PyTorch saves class
/// indices as int64, numpy often as int32 or uint8). Floats are refused: a label is an index,
/// and a float one usually means images and labels were swapped.
pub fn class_indices(labels: &Tensor, num_classes: usize) -> Result<Tensor> {
    let bad = |m: String| UNetError::Input(m);
    let ids: Vec<i64> = match labels.dtype() {
        DType::U8 | DType::U32 | DType::I16 | DType::I32 | DType::I64 => labels
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1()?,
        other => {
            return Err(bad(format!(
                "class labels have dtype {other:?}; expected integer class indices (u8, u32, i16, i32 or i64)"
            )))
        }
    };
    if let Some(v) = ids.iter().find(|&&v| v < 0 || v >= num_classes as i64) {
        return Err(bad(format!("label {v} is outside 0..{num_classes}")));
    }
    let ids: Vec<u32> = ids.into_iter().map(|v| v as u32).collect();
    Ok(Tensor::from_vec(ids, labels.dims(), labels.device())?)
}

impl ddpm_schedule::Denoiser for UNet {
    fn denoise(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        y: Option<&Tensor>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        Ok(self.forward(x_t, t, y, train)?)
    }
}
