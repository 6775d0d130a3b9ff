//! `ddpm-cli train`: the original's training script flags, in kebab case.

use crate::parse_list;
use anyhow::{bail, Context, Result};
use clap::{ArgAction, Args};
use ddpm_train::{CheckpointMeta, DiffusionSettings, RunOutcome, Split, TrainConfig, Trainer};
use ddpm_unet::UNetConfig;
use std::path::PathBuf;

/// Options of `ddpm-cli train` (names follow improved-diffusion's `image_train.py`).
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Start from a preset's flags (tiny, small, base, classic for MNIST; cifar10, rgb-small for
    /// 32x32 colour images); flags given beside it override the preset's.
    #[arg(long, value_enum)]
    pub preset: Option<crate::presets::Preset>,
    /// The training data: a folder of IDX files (MNIST, Fashion-MNIST), of CIFAR-10 binary
    /// batches (data_batch_*.bin), or of PNG/JPEG images (searched recursively; classes from
    /// sub-folders or from `label_rest.png` names), told apart by what it holds.
    #[arg(long, default_value = "data/mnist")]
    pub data: PathBuf,
    /// Image folders: load as 1 (grayscale) or 3 (RGB) channels [default: 3 if any image has
    /// colour].
    #[arg(long)]
    pub channels: Option<usize>,
    /// Image folders: resize every image to N x N [default: the images' own size, which must
    /// be the same for all].
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Image folders: with --image-size, resize the shorter side and crop the centre square
    /// (without it, the whole image is squeezed to the square).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub center_crop: bool,
    /// Flip training images left-right at random (seeded, one draw per step).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub random_flip: bool,
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
    pub noise_schedule: ddpm_schedule::BetaSchedule,
    /// Diffusion steps T.
    #[arg(long, default_value_t = 1000)]
    pub diffusion_steps: usize,
    /// Train on the variational bound.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub use_kl: bool,
    /// Predict x_0 instead of eps.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub predict_xstart: bool,
    /// Predict the velocity v instead of eps (Salimans & Ho 2022).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub predict_v: bool,
    /// Min-SNR-γ loss weighting with this γ (Hang et al. 2023; 5 is the paper's choice).
    #[arg(long)]
    pub snr_gamma: Option<f64>,
    /// The hybrid loss: vb term scaled by T/1000.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub rescale_learned_sigmas: bool,
    /// Timestep sampler: uniform or loss-second-moment.
    #[arg(long, default_value = "uniform")]
    pub schedule_sampler: ddpm_train::TimestepSampling,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Anneal the learning rate to 0 over this many steps (0: over --steps when
    /// --lr-schedule is linear or cosine, else constant).
    #[arg(long, default_value_t = 0)]
    pub lr_anneal_steps: u64,
    /// constant, linear or cosine (default: linear when --lr-anneal-steps is set, else constant).
    #[arg(long)]
    pub lr_schedule: Option<ddpm_train::LrSchedule>,
    /// Steps of linear learning-rate warm-up.
    #[arg(long, default_value_t = 0)]
    pub lr_warmup_steps: u64,
    /// EMA warm-up: decay min(rate, 1 - (1 + step/inv_gamma)^-power), as diffusers.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub ema_warmup: bool,
    /// inv_gamma of the EMA warm-up.
    #[arg(long, default_value_t = 1.0)]
    pub ema_inv_gamma: f64,
    /// power of the EMA warm-up.
    #[arg(long, default_value_t = 0.75)]
    pub ema_power: f64,
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
    /// Steps between sample grids (0 = none).
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
    /// Resume from this checkpoint folder, or `latest`: the newest complete checkpoint in --out.
    #[arg(long)]
    pub resume_checkpoint: Option<PathBuf>,
    /// Start a new run in an --out folder that holds another run's checkpoints or metrics,
    /// deleting them (without it, that is an error).
    #[arg(long)]
    pub overwrite: bool,
    /// Train a class-conditional model.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub class_cond: bool,
    /// With --class-cond: replace each label with a null class with this probability, so that
    /// the model can be sampled with classifier-free guidance (sample --guidance-scale).
    #[arg(long, default_value_t = 0.0)]
    pub class_dropout: f64,
    /// Seed for initialisation, data order, timesteps, noise and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where and how to compute.
    #[command(flatten)]
    pub compute: crate::ComputeArgs,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// The flags given on the command line (clap ids such as `lr`), which a resumed run
    /// compares with the checkpoint; the others keep the checkpoint's values.
    #[arg(skip)]
    pub explicit: Vec<String>,
}

impl TrainArgs {
    /// The UNet config these flags describe, for MNIST: one channel, 10 classes, `image_size`
    /// pixels square.
    pub fn model_config(&self, image_size: usize) -> Result<UNetConfig> {
        self.model_config_for(1, image_size, 10)
    }

    /// The UNet config these flags describe, for `channels`-channel images of `image_size`
    /// pixels square with `classes` classes.
    pub fn model_config_for(
        &self,
        channels: usize,
        image_size: usize,
        classes: usize,
    ) -> Result<UNetConfig> {
        let mut attention = Vec::new();
        for res in parse_list::<usize>(&self.attention_resolutions, "--attention-resolutions")? {
            if res == 0 || !image_size.is_multiple_of(res) {
                bail!("--attention-resolutions: {res} does not divide the image size {image_size}");
            }
            attention.push(image_size / res);
        }
        let cfg = UNetConfig {
            in_channels: channels,
            model_channels: self.num_channels,
            out_channels: if self.learn_sigma {
                2 * channels
            } else {
                channels
            },
            num_res_blocks: self.num_res_blocks,
            attention_resolutions: attention,
            dropout: self.dropout,
            channel_mult: parse_list(&self.channel_mult, "--channel-mult")?,
            num_classes: self.class_cond.then_some(classes),
            num_heads: self.num_heads,
            use_scale_shift_norm: self.use_scale_shift_norm,
            null_class: self.class_cond && self.class_dropout > 0.0,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// How images from a folder are loaded.
    pub fn image_options(&self) -> ddpm_train::ImageOptions {
        ddpm_train::ImageOptions {
            channels: self.channels,
            image_size: self.image_size,
            center_crop: self.center_crop,
            random_flip: self.random_flip,
        }
    }

    /// The diffusion flags.
    pub fn diffusion(&self) -> DiffusionSettings {
        DiffusionSettings {
            diffusion_steps: self.diffusion_steps,
            noise_schedule: self.noise_schedule,
            learn_sigma: self.learn_sigma,
            sigma_small: self.sigma_small,
            use_kl: self.use_kl,
            predict_xstart: self.predict_xstart,
            rescale_learned_sigmas: self.rescale_learned_sigmas,
            timestep_respacing: String::new(),
            predict_v: self.predict_v,
            snr_gamma: self.snr_gamma,
        }
    }

    /// The training settings, validated.
    pub fn train_config(&self) -> Result<TrainConfig> {
        let cfg = self.train_config_unchecked()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The training settings as the flags give them, not yet validated: on resume only the
    /// given flags count, and they are validated together with the checkpoint's other values.
    pub fn train_config_unchecked(&self) -> Result<TrainConfig> {
        Ok(TrainConfig {
            batch_size: self.batch_size,
            microbatch: if self.microbatch <= 0 {
                0
            } else {
                self.microbatch as usize
            },
            lr: self.lr,
            weight_decay: self.weight_decay,
            lr_anneal_steps: self.lr_anneal_steps,
            lr_schedule: self.lr_schedule,
            lr_warmup_steps: self.lr_warmup_steps,
            ema_warmup: self.ema_warmup.then_some(ddpm_train::EmaWarmup {
                inv_gamma: self.ema_inv_gamma,
                power: self.ema_power,
            }),
            ema_rate: parse_list(&self.ema_rate, "--ema-rate")?,
            log_interval: self.log_interval,
            save_interval: self.save_interval,
            sample_interval: self.sample_interval,
            sample_count: self.sample_count,
            sample_respacing: self.sample_respacing.clone(),
            keep_checkpoints: self.keep_checkpoints,
            steps: self.steps,
            schedule_sampler: self.schedule_sampler,
            grad_clip: self.grad_clip,
            class_cond: self.class_cond,
            class_dropout: self.class_dropout,
            data: self.image_options(),
            seed: self.seed,
            // Checked against the device (and DDPM_ISA) in `run`, which sets them.
            kernels: ddpm_kernels::KernelOptions::with_precision(self.compute.precision),
        })
    }
}

/// A training setting a resumed run takes over from the command line: its flag id, how it reads
/// and how it is copied from the flags' config.
pub type Applied = (
    &'static str,
    fn(&TrainConfig) -> String,
    fn(&mut TrainConfig, &TrainConfig),
);

/// The settings a resumed run takes over (with a notice): they change how the rest of the run
/// proceeds, not what was trained so far.
pub const APPLIED_ON_RESUME: &[Applied] = &[
    ("steps", |c| c.steps.to_string(), |c, n| c.steps = n.steps),
    ("lr", |c| c.lr.to_string(), |c, n| c.lr = n.lr),
    (
        "weight_decay",
        |c| c.weight_decay.to_string(),
        |c, n| c.weight_decay = n.weight_decay,
    ),
    (
        "lr_anneal_steps",
        |c| c.lr_anneal_steps.to_string(),
        |c, n| c.lr_anneal_steps = n.lr_anneal_steps,
    ),
    (
        "lr_schedule",
        |c| c.lr_schedule().name().to_string(),
        |c, n| c.lr_schedule = n.lr_schedule,
    ),
    (
        "lr_warmup_steps",
        |c| c.lr_warmup_steps.to_string(),
        |c, n| c.lr_warmup_steps = n.lr_warmup_steps,
    ),
    (
        "microbatch",
        |c| c.microbatch.to_string(),
        |c, n| c.microbatch = n.microbatch,
    ),
    (
        "log_interval",
        |c| c.log_interval.to_string(),
        |c, n| c.log_interval = n.log_interval,
    ),
    (
        "save_interval",
        |c| c.save_interval.to_string(),
        |c, n| c.save_interval = n.save_interval,
    ),
    (
        "sample_interval",
        |c| c.sample_interval.to_string(),
        |c, n| c.sample_interval = n.sample_interval,
    ),
    (
        "sample_count",
        |c| c.sample_count.to_string(),
        |c, n| c.sample_count = n.sample_count,
    ),
    (
        "sample_respacing",
        |c| format!("{:?}", c.sample_respacing),
        |c, n| c.sample_respacing = n.sample_respacing.clone(),
    ),
    (
        "keep_checkpoints",
        |c| c.keep_checkpoints.to_string(),
        |c, n| c.keep_checkpoints = n.keep_checkpoints,
    ),
    (
        "grad_clip",
        |c| c.grad_clip.map_or_else(|| "none".into(), |v| v.to_string()),
        |c, n| c.grad_clip = n.grad_clip,
    ),
];

/// Flags that say where and how to run, not what to train.
pub const OPERATIONAL: &[&str] = &[
    "data",
    "preset",
    "out",
    "resume_checkpoint",
    "overwrite",
    "device",
    "precision",
    "no_progress",
];

/// A setting as the checkpoint has it and as the flags give it, for the flags that a resumed
/// run cannot change (the model, the diffusion process, the data order and the EMA).
fn fixed_on_resume(
    id: &str,
    meta: &CheckpointMeta,
    args: &TrainArgs,
) -> Result<Option<(String, String)>> {
    let (m, d, t) = (&meta.model, &meta.diffusion, &meta.train);
    let pair = |a: String, b: String| Ok(Some((a, b)));
    match id {
        "num_channels" => pair(m.model_channels.to_string(), args.num_channels.to_string()),
        "num_res_blocks" => pair(
            m.num_res_blocks.to_string(),
            args.num_res_blocks.to_string(),
        ),
        "channel_mult" => pair(
            format!("{:?}", m.channel_mult),
            format!(
                "{:?}",
                parse_list::<usize>(&args.channel_mult, "--channel-mult")?
            ),
        ),
        "attention_resolutions" => {
            // A set of resolutions: the order they are written in does not matter.
            let size = meta.image_size[0];
            let mut had: Vec<usize> = m.attention_resolutions.iter().map(|d| size / d).collect();
            let mut now =
                parse_list::<usize>(&args.attention_resolutions, "--attention-resolutions")?;
            had.sort_unstable();
            now.sort_unstable();
            pair(format!("{had:?}"), format!("{now:?}"))
        }
        "num_heads" => pair(m.num_heads.to_string(), args.num_heads.to_string()),
        "use_scale_shift_norm" => pair(
            m.use_scale_shift_norm.to_string(),
            args.use_scale_shift_norm.to_string(),
        ),
        "dropout" => pair(m.dropout.to_string(), args.dropout.to_string()),
        "learn_sigma" => pair(d.learn_sigma.to_string(), args.learn_sigma.to_string()),
        "sigma_small" => pair(d.sigma_small.to_string(), args.sigma_small.to_string()),
        "noise_schedule" => pair(
            d.noise_schedule.to_string(),
            args.noise_schedule.to_string(),
        ),
        "diffusion_steps" => pair(
            d.diffusion_steps.to_string(),
            args.diffusion_steps.to_string(),
        ),
        "use_kl" => pair(d.use_kl.to_string(), args.use_kl.to_string()),
        "predict_xstart" => pair(
            d.predict_xstart.to_string(),
            args.predict_xstart.to_string(),
        ),
        "predict_v" => pair(d.predict_v.to_string(), args.predict_v.to_string()),
        "snr_gamma" => pair(
            format!("{:?}", d.snr_gamma),
            format!("{:?}", args.snr_gamma),
        ),
        "ema_warmup" | "ema_inv_gamma" | "ema_power" => {
            let now = args.train_config_unchecked()?.ema_warmup;
            pair(format!("{:?}", t.ema_warmup), format!("{now:?}"))
        }
        "rescale_learned_sigmas" => pair(
            d.rescale_learned_sigmas.to_string(),
            args.rescale_learned_sigmas.to_string(),
        ),
        "schedule_sampler" => pair(
            t.schedule_sampler.to_string(),
            args.schedule_sampler.to_string(),
        ),
        "ema_rate" => pair(
            format!("{:?}", t.ema_rate),
            format!("{:?}", parse_list::<f64>(&args.ema_rate, "--ema-rate")?),
        ),
        "batch_size" => pair(t.batch_size.to_string(), args.batch_size.to_string()),
        "class_cond" => pair(t.class_cond.to_string(), args.class_cond.to_string()),
        "class_dropout" => pair(t.class_dropout.to_string(), args.class_dropout.to_string()),
        "channels" => pair(
            format!("{:?}", t.data.channels),
            format!("{:?}", args.channels),
        ),
        "image_size" => pair(
            format!("{:?}", t.data.image_size),
            format!("{:?}", args.image_size),
        ),
        "center_crop" => pair(t.data.center_crop.to_string(), args.center_crop.to_string()),
        "random_flip" => pair(t.data.random_flip.to_string(), args.random_flip.to_string()),
        "seed" => pair(t.seed.to_string(), args.seed.to_string()),
        _ => Ok(None),
    }
}

/// Checks the flags given for a resumed run against its checkpoint: a flag that would change
/// what was trained is refused (naming it) unless it repeats the checkpoint's value; the
/// settings of [`APPLIED_ON_RESUME`] that the flags change are returned, each with a notice.
pub fn check_resume_flags(args: &TrainArgs, meta: &CheckpointMeta) -> Result<Vec<Applied>> {
    let mut applied = Vec::new();
    let new = args.train_config_unchecked()?;
    for id in &args.explicit {
        let id = id.as_str();
        let flag = format!("--{}", id.replace('_', "-"));
        if OPERATIONAL.contains(&id) {
            continue;
        }
        if let Some(field) = APPLIED_ON_RESUME.iter().find(|f| f.0 == id) {
            if id == "steps" && new.steps < meta.step {
                bail!(
                    "--steps {} is below the checkpoint's step {}: nothing to train",
                    new.steps,
                    meta.step
                );
            }
            let (old, now) = (field.1(&meta.train), field.1(&new));
            if old != now {
                tracing::info!("resume: {flag} {now} (the checkpoint had {old})");
                applied.push(*field);
            }
            continue;
        }
        match fixed_on_resume(id, meta, args)? {
            Some((old, now)) if old == now => {}
            Some((old, now)) => bail!(
                "{flag} {now} differs from the checkpoint's {old}: a resumed run keeps its \
                 model, diffusion process, data order and EMA (start a new run to change it)"
            ),
            None => bail!("{flag} cannot be given when resuming"),
        }
    }
    Ok(applied)
}

/// The checkpoint `--resume-checkpoint` names (`latest`: the newest complete one in --out).
fn resume_path(args: &TrainArgs) -> Result<Option<PathBuf>> {
    match &args.resume_checkpoint {
        Some(p) if p.as_os_str() == "latest" => {
            match ddpm_train::run_folder::latest_checkpoint(&args.out) {
                Some(d) => {
                    tracing::info!("resuming from {}", d.display());
                    Ok(Some(d))
                }
                None => bail!(
                    "--resume-checkpoint latest: {} holds no complete checkpoint",
                    args.out.display()
                ),
            }
        }
        other => Ok(other.clone()),
    }
}

/// Runs `train`; `stop` is set by a Ctrl-C handler when there is one.
pub fn run(
    args: &TrainArgs,
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) -> Result<RunOutcome> {
    let (device, kernels) = args.compute.open()?;
    let resume = resume_path(args)?;
    // A resumed run loads its data as the checkpoint says (flags that differ are refused below).
    let image_options = match &resume {
        Some(ckpt) => {
            CheckpointMeta::<ddpm_unet::UNetConfig>::read(ckpt)?
                .train
                .data
        }
        None => args.image_options(),
    };
    let (data, format) = ddpm_train::load_data(&args.data, Split::Train, &image_options)
        .with_context(|| {
            format!(
                "cannot load training data from {} (cargo xtask download-mnist fetches MNIST)",
                args.data.display()
            )
        })?;
    tracing::info!(
        "data: {} in {}: {} images, {}x{}x{}{}",
        format,
        args.data.display(),
        data.len,
        data.channels,
        data.height,
        data.width,
        data.num_classes
            .map_or(String::new(), |k| format!(", {k} classes"))
    );
    if data.height != data.width {
        bail!(
            "only square images are supported, got {}x{} (--image-size N resizes an image folder)",
            data.height,
            data.width
        );
    }
    let mut trainer = match &resume {
        Some(ckpt) => {
            let meta = CheckpointMeta::<ddpm_unet::UNetConfig>::read(ckpt)?;
            let applied = check_resume_flags(args, &meta)?;
            let cfg = args.train_config_unchecked()?;
            Trainer::resume(ckpt, data, &args.out, &device, |c| {
                for (_, _, copy) in &applied {
                    copy(c, &cfg);
                }
                c.kernels = kernels;
            })?
        }
        None => {
            let classes = match (args.class_cond, data.num_classes) {
                (true, None) => bail!(
                    "--class-cond needs labelled data: {} has no classes (an image folder takes \
                     them from sub-folders or from label_rest.png names)",
                    args.data.display()
                ),
                (_, k) => k.unwrap_or(10),
            };
            let model = args.model_config_for(data.channels, data.height, classes)?;
            Trainer::new(
                model,
                args.diffusion(),
                TrainConfig {
                    kernels,
                    ..args.train_config()?
                },
                data,
                &args.out,
                &device,
            )?
        }
    };
    // Every setting is checked by now; only then may --overwrite delete an earlier run.
    let lock = ddpm_train::run_folder::prepare_run_folder(
        &args.out,
        resume.as_ref().map(|_| ddpm_train::run_folder::Resuming {
            run_id: trainer.run_id(),
            step: trainer.step,
        }),
        args.overwrite,
    )?;
    trainer.hold_lock(lock);
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Parser};

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn meta_of(args: &TrainArgs) -> CheckpointMeta {
        CheckpointMeta {
            model: args.model_config(28).unwrap(),
            diffusion: args.diffusion(),
            train: args.train_config().unwrap(),
            image_size: [28, 28],
            step: 5,
            rng: ddpm_train::checkpoint::RngState {
                seed: 1,
                word_pos: 0,
            },
            data_epoch: 0,
            data_pos: 0,
            sampler: None,
            run_id: None,
            data_len: None,
            class_names: None,
            log_window: None,
        }
    }

    /// Every flag of `train` has a rule on resume: applied, operational, or compared.
    #[test]
    fn every_train_flag_has_a_rule_on_resume() {
        let args = Wrapper::parse_from(["t"]).args;
        let meta = meta_of(&args);
        let cmd = TrainArgs::augment_args(clap::Command::new("t"));
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            let known = APPLIED_ON_RESUME.iter().any(|f| f.0 == id)
                || OPERATIONAL.contains(&id)
                || fixed_on_resume(id, &meta, &args).unwrap().is_some();
            assert!(known, "--{id} has no rule on resume");
        }
    }

    #[test]
    fn resume_flags_apply_refuse_or_pass() {
        let base = Wrapper::parse_from(["t"]).args;
        let meta = meta_of(&base);
        let check = |argv: &[&str]| {
            let mut args =
                Wrapper::parse_from(std::iter::once("t").chain(argv.iter().copied())).args;
            args.explicit = argv
                .iter()
                .filter_map(|a| a.strip_prefix("--"))
                .map(|a| a.replace('-', "_"))
                .collect();
            check_resume_flags(&args, &meta)
        };
        let applied = check(&["--lr", "0.05", "--steps", "20000"]).unwrap();
        let ids: Vec<&str> = applied.iter().map(|f| f.0).collect();
        assert_eq!(ids, vec!["lr", "steps"]);
        let mut cfg = meta.train.clone();
        let new = Wrapper::parse_from(["t", "--lr", "0.05"])
            .args
            .train_config()
            .unwrap();
        applied[0].2(&mut cfg, &new);
        assert_eq!(cfg.lr, 0.05);
        // The checkpoint's own values pass silently; others are refused by name.
        assert!(check(&["--num-channels", "32", "--lr", "0.0001"])
            .unwrap()
            .is_empty());
        let e = check(&["--num-channels", "64"]).unwrap_err().to_string();
        assert!(e.contains("--num-channels 64") && e.contains("32"), "{e}");
        let e = check(&["--attention-resolutions", "14"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--attention-resolutions"), "{e}");
        assert!(check(&["--attention-resolutions", "7"]).is_ok());
        let e = check(&["--steps", "4"]).unwrap_err().to_string();
        assert!(e.contains("below the checkpoint's step 5"), "{e}");
        // Resolutions are a set; and flags are judged with the checkpoint's other values, not
        // with the defaults of the flags not given.
        assert!(check(&["--attention-resolutions", "7,14"]).is_err());
        let mut big = meta.clone();
        big.train.batch_size = 256;
        big.model.attention_resolutions = vec![2, 4];
        let mut args = Wrapper::parse_from([
            "t",
            "--microbatch",
            "128",
            "--attention-resolutions",
            "7,14",
        ])
        .args;
        args.explicit = vec!["microbatch".into(), "attention_resolutions".into()];
        assert_eq!(check_resume_flags(&args, &big).unwrap().len(), 1);
    }
}
