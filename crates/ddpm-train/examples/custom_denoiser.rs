//! A network of your own through ddpm-train's `Trainer`: a small residual CNN (not the UNet)
//! learns MNIST's noise for a few hundred steps, is checkpointed like any run, and samples a
//! grid.
//!
//! ```text
//! cargo run --release -p ddpm-train --example custom_denoiser -- [--steps N] [--data DIR] [--out DIR]
//! ```
//!
//! MNIST is fetched into `--data` (default `data/mnist`) as `cargo xtask download-mnist` does
//! (`MNIST_MIRROR` points it at a local copy). The example checks its own result: it fails
//! unless the loss of the last steps is well below that of the first ones and the samples have
//! the contrast of digits (dark background, some bright strokes), not flat noise.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use ddpm_schedule::Denoiser;
use ddpm_train::{DiffusionSettings, ImageDataset, ModelConfig, Split, TrainConfig, Trainer};
use ddpm_unet::nn::{Conv2d, Conv2dConfig, GroupNorm, Linear};
use ddpm_unet::{timestep_embedding, KernelOptions};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The architecture: saved as `model` in each checkpoint's config.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SmallCnnConfig {
    channels: usize,
    blocks: usize,
}

/// 3×3 convolutions at full resolution with residual connections; the timestep enters each
/// block as a per-channel shift.
struct SmallCnn {
    channels: usize,
    time: (Linear, Linear),
    input: Conv2d,
    blocks: Vec<(GroupNorm, Linear, Conv2d)>,
    out_norm: GroupNorm,
    output: Conv2d,
}

impl Denoiser for SmallCnn {
    fn denoise(&self, x: &Tensor, t: &Tensor, _y: Option<&Tensor>, _train: bool) -> Result<Tensor> {
        let emb = timestep_embedding(t, self.channels, DType::F32)?;
        let emb = self.time.1.forward(&self.time.0.forward(&emb)?.silu()?)?;
        let mut h = self.input.forward(x)?;
        for (norm, shift, conv) in &self.blocks {
            let s = shift.forward(&emb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            let a = norm.forward(&h.broadcast_add(&s)?, None, true)?;
            h = (h + conv.forward(&a)?)?;
        }
        self.output.forward(&self.out_norm.forward(&h, None, true)?)
    }
}

impl ddpm_train::TrainableModel for SmallCnn {}

impl ModelConfig for SmallCnnConfig {
    type Model = SmallCnn;

    fn build(&self, vb: VarBuilder, kernels: KernelOptions) -> ddpm_train::Result<SmallCnn> {
        let (c, e) = (self.channels, 4 * self.channels);
        let conv = |zero_init| Conv2dConfig {
            padding: 1,
            zero_init,
            kernels,
            ..Default::default()
        };
        let blocks = (0..self.blocks)
            .map(|i| {
                let vb = vb.pp(format!("blocks.{i}"));
                Ok((
                    GroupNorm::new(vb.pp("norm"), 8, c, kernels)?,
                    Linear::new(vb.pp("shift"), e, c)?,
                    Conv2d::new(vb.pp("conv"), c, c, 3, conv(false))?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(SmallCnn {
            channels: c,
            time: (
                Linear::new(vb.pp("time.0"), c, e)?,
                Linear::new(vb.pp("time.1"), e, e)?,
            ),
            input: Conv2d::new(vb.pp("input"), 1, c, 3, conv(false))?,
            blocks,
            out_norm: GroupNorm::new(vb.pp("out_norm"), 8, c, kernels)?,
            output: Conv2d::new(vb.pp("output"), c, 1, 3, conv(true))?,
        })
    }

    fn validate(&self) -> ddpm_train::Result<()> {
        if self.channels == 0 || !self.channels.is_multiple_of(8) || self.blocks == 0 {
            return Err(ddpm_train::TrainError::Config(format!(
                "channels ({}) must be a positive multiple of 8 and blocks ({}) positive",
                self.channels, self.blocks
            )));
        }
        Ok(())
    }
    fn in_channels(&self) -> usize {
        1
    }
    fn out_channels(&self) -> usize {
        1
    }
    fn num_classes(&self) -> Option<usize> {
        None
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let steps: u64 = flag(&args, "--steps").map_or(Ok(300), |s| s.parse())?;
    let data_dir = PathBuf::from(flag(&args, "--data").unwrap_or_else(|| "data/mnist".into()));
    let out =
        PathBuf::from(flag(&args, "--out").unwrap_or_else(|| "target/custom_denoiser".into()));
    if steps < 20 {
        return Err(
            "--steps must be at least 20 (the example compares early and late losses)".into(),
        );
    }
    ddpm_train::download::ensure_mnist(&data_dir)?;
    let data = ImageDataset::load(&data_dir, Split::Train)?;

    // A plain epsilon model (Ho et al.): one output channel, fixed variances.
    let diffusion = DiffusionSettings {
        learn_sigma: false,
        ..DiffusionSettings::default()
    };
    let cfg = TrainConfig {
        batch_size: 32,
        lr: 1e-3,
        steps,
        log_interval: steps,
        save_interval: steps,
        sample_interval: 0,
        ema_rate: vec![0.99],
        seed: 0,
        ..TrainConfig::default()
    };
    let model = SmallCnnConfig {
        channels: 32,
        blocks: 4,
    };
    let mut trainer = Trainer::new(model, diffusion, cfg, data, &out, &Device::Cpu)?;
    let losses: Vec<f64> = (0..steps)
        .map(|_| Ok(trainer.train_step()?.loss))
        .collect::<ddpm_train::Result<_>>()?;
    let ckpt = trainer.save()?;
    let grid = out.join("samples.png");
    trainer.sample_grid(&grid)?;

    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&losses[..10]), mean(&losses[losses.len() - 10..]));
    println!("loss: first 10 steps {first:.4}, last 10 steps {last:.4}");
    println!("checkpoint {}; samples {}", ckpt.display(), grid.display());
    if last >= 0.5 * first {
        return Err(format!("the loss did not fall enough: {first:.4} -> {last:.4}").into());
    }
    let img = image::open(&grid)?.to_luma8();
    let px: Vec<f64> = img.pixels().map(|p| p.0[0] as f64 / 255.0).collect();
    let dark = px.iter().filter(|&&v| v < 0.2).count() as f64 / px.len() as f64;
    let bright = px.iter().filter(|&&v| v > 0.6).count() as f64 / px.len() as f64;
    println!(
        "samples: {:.0}% dark pixels, {:.0}% bright",
        100.0 * dark,
        100.0 * bright
    );
    if dark < 0.5 || bright < 0.03 {
        return Err("the samples do not look like digits on a dark background".into());
    }
    Ok(())
}
