//! `ddpm-cli train`: the original's training script flags, in kebab case.

use crate::{parse_device, parse_list};
use anyhow::{bail, Context, Result};
use clap::{ArgAction, Args};
use ddpm_train::{DiffusionSettings, ImageDataset, RunOutcome, Split, TrainConfig, Trainer};
use ddpm_unet::UNetConfig;
use std::path::PathBuf;

/// Options of `ddpm-cli train` (names follow improved-diffusion's `image_train.py`).
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Folder with the IDX files (train-images-idx3-ubyte[.gz], ...): MNIST or Fashion-MNIST.
    #[arg(long, default_value = "data/mnist")]
    pub data: PathBuf,
    /// Run folder for checkpoints, metrics.jsonl and sample grids.
    #[arg(long, default_value = "runs/mnist")]
    pub out: PathBuf,
    /// Base channel count of the UNet.
    #[arg(long, default_value_t = 32)]
    pub num_channels: usize,
    /// Residual blocks per resolution.
    #[arg(long, default_value_t = 2)]
    pub num_res_blocks: usize,
    /// Channel multiplier per resolution level (comma-separated).
    #[arg(long, default_value = "1,2,2")]
    pub channel_mult: String,
    /// Image resolutions with attention (comma-separated, e.g. "7" for 7x7 on MNIST).
    #[arg(long, default_value = "7")]
    pub attention_resolutions: String,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub num_heads: usize,
    /// Scale-shift conditioning of the residual blocks.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub use_scale_shift_norm: bool,
    /// Dropout in the residual blocks.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Learn the variance (learned-range sigma).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub learn_sigma: bool,
    /// With a fixed variance, use the posterior variance.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub sigma_small: bool,
    /// Beta schedule: linear or cosine.
    #[arg(long, default_value = "cosine")]
    pub noise_schedule: String,
    /// Diffusion steps T.
    #[arg(long, default_value_t = 1000)]
    pub diffusion_steps: usize,
    /// Train on the variational bound.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub use_kl: bool,
    /// Predict x_0 instead of eps.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub predict_xstart: bool,
    /// The hybrid loss: vb term scaled by T/1000.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub rescale_learned_sigmas: bool,
    /// Timestep sampler: uniform or loss-second-moment.
    #[arg(long, default_value = "uniform")]
    pub schedule_sampler: String,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Anneal the learning rate to 0 over this many steps (0 = constant).
    #[arg(long, default_value_t = 0)]
    pub lr_anneal_steps: u64,
    /// EMA rates (comma-separated).
    #[arg(long, default_value = "0.9999")]
    pub ema_rate: String,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Microbatch size (-1 or 0: no microbatching).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub microbatch: i64,
    /// Steps between log lines.
    #[arg(long, default_value_t = 10)]
    pub log_interval: u64,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 1000)]
    pub save_interval: u64,
    /// Steps between sample grids (0 = none until the end).
    #[arg(long, default_value_t = 1000)]
    pub sample_interval: u64,
    /// Respacing for the sample grids.
    #[arg(long, default_value = "100")]
    pub sample_respacing: String,
    /// Images per sample grid.
    #[arg(long, default_value_t = 64)]
    pub sample_count: usize,
    /// Keep the last K checkpoints (0 = all).
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// Total optimiser steps.
    #[arg(long, default_value_t = 10_000)]
    pub steps: u64,
    /// Clip the gradient norm (off by default, as the original).
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// Resume from this checkpoint folder.
    #[arg(long)]
    pub resume_checkpoint: Option<PathBuf>,
    /// Train a class-conditional model.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub class_cond: bool,
    /// Seed for initialisation, data order, timesteps, noise and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Multiply in bf16 (f32 accumulation) in the 3×3 convolutions and their gradients, on CPUs
    /// with AVX512-BF16; weights, optimiser and everything else stay f32.
    #[arg(long)]
    pub bf16: bool,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

impl TrainArgs {
    /// The UNet config these flags describe, for images of `image_size` pixels square.
    pub fn model_config(&self, image_size: usize) -> Result<UNetConfig> {
        let mut attention = Vec::new();
        for res in parse_list::<usize>(&self.attention_resolutions, "--attention-resolutions")? {
            if res == 0 || !image_size.is_multiple_of(res) {
                bail!("--attention-resolutions: {res} does not divide the image size {image_size}");
            }
            attention.push(image_size / res);
        }
        let cfg = UNetConfig {
            in_channels: 1,
            model_channels: self.num_channels,
            out_channels: if self.learn_sigma { 2 } else { 1 },
            num_res_blocks: self.num_res_blocks,
            attention_resolutions: attention,
            dropout: self.dropout,
            channel_mult: parse_list(&self.channel_mult, "--channel-mult")?,
            num_classes: self.class_cond.then_some(10),
            num_heads: self.num_heads,
            use_scale_shift_norm: self.use_scale_shift_norm,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The diffusion flags.
    pub fn diffusion(&self) -> DiffusionSettings {
        DiffusionSettings {
            diffusion_steps: self.diffusion_steps,
            noise_schedule: self.noise_schedule.clone(),
            learn_sigma: self.learn_sigma,
            sigma_small: self.sigma_small,
            use_kl: self.use_kl,
            predict_xstart: self.predict_xstart,
            rescale_learned_sigmas: self.rescale_learned_sigmas,
            timestep_respacing: String::new(),
        }
    }

    /// The training settings.
    pub fn train_config(&self) -> Result<TrainConfig> {
        let cfg = TrainConfig {
            batch_size: self.batch_size,
            microbatch: if self.microbatch <= 0 {
                0
            } else {
                self.microbatch as usize
            },
            lr: self.lr,
            weight_decay: self.weight_decay,
            lr_anneal_steps: self.lr_anneal_steps,
            ema_rate: parse_list(&self.ema_rate, "--ema-rate")?,
            log_interval: self.log_interval,
            save_interval: self.save_interval,
            sample_interval: self.sample_interval,
            sample_count: self.sample_count,
            sample_respacing: self.sample_respacing.clone(),
            keep_checkpoints: self.keep_checkpoints,
            steps: self.steps,
            schedule_sampler: self.schedule_sampler.clone(),
            grad_clip: self.grad_clip,
            class_cond: self.class_cond,
            seed: self.seed,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Runs `train`; `stop` is set by a Ctrl-C handler when there is one.
pub fn run(
    args: &TrainArgs,
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) -> Result<RunOutcome> {
    let device = parse_device(&args.device)?;
    crate::set_bf16(args.bf16, &device);
    let data = ImageDataset::load(&args.data, Split::Train).with_context(|| {
        format!(
            "cannot load training data from {} (cargo xtask download-mnist fetches MNIST)",
            args.data.display()
        )
    })?;
    if data.height != data.width {
        bail!(
            "only square images are supported, got {}x{}",
            data.height,
            data.width
        );
    }
    let mut trainer = match &args.resume_checkpoint {
        Some(ckpt) => {
            let cfg = args.train_config()?;
            Trainer::resume(ckpt, data, &args.out, &device, |c| {
                c.steps = cfg.steps;
                c.log_interval = cfg.log_interval;
                c.save_interval = cfg.save_interval;
                c.sample_interval = cfg.sample_interval;
                c.keep_checkpoints = cfg.keep_checkpoints;
            })?
        }
        None => {
            let model = args.model_config(data.height)?;
            Trainer::new(
                model,
                args.diffusion(),
                args.train_config()?,
                data,
                &args.out,
                &device,
            )?
        }
    };
    if let Some(stop) = stop {
        trainer.set_stop_flag(stop);
    }
    tracing::info!(
        "training {} parameters for {} steps into {}",
        trainer.params().num_parameters(),
        trainer.cfg.steps,
        args.out.display()
    );
    let outcome = trainer.run(!args.no_progress)?;
    match &outcome {
        RunOutcome::Finished(d) => tracing::info!("finished; checkpoint {}", d.display()),
        RunOutcome::Interrupted(d) => tracing::info!("interrupted; checkpoint {}", d.display()),
    }
    Ok(outcome)
}
