//! `ddpm-cli nll`: the variational bound in bits/dim on a data split.

use anyhow::{bail, Context, Result};
use clap::Args;
use ddpm_schedule::{GaussianDiffusion, RngNoise};
use ddpm_train::Split;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

/// Options of `ddpm-cli nll`.
#[derive(Debug, Clone, Args)]
pub struct NllArgs {
    /// The checkpoint and its weights.
    #[command(flatten)]
    pub weights: crate::WeightsArgs,
    /// Folder with the IDX files.
    #[arg(long, default_value = "data/mnist")]
    pub data: PathBuf,
    /// train or test.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Number of images (the first N of the split; default: all of it).
    #[arg(long)]
    pub num: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Respacing of the evaluated process ("" = all steps, the true bound of the model).
    #[arg(long, default_value = "")]
    pub respacing: String,
    /// Clamp predicted x_0 to [-1, 1].
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub clip_denoised: bool,
    /// Seed of the noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Where and how to compute.
    #[command(flatten)]
    pub compute: crate::ComputeArgs,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Print nothing (callers that use the returned report).
    #[arg(skip)]
    pub quiet: bool,
}

/// Runs `nll` and returns the report as JSON.
pub fn run(args: &NllArgs) -> Result<serde_json::Value> {
    if args.num == Some(0) || args.batch_size == 0 {
        bail!("--num and --batch-size must be positive");
    }
    let (device, kernels) = args.compute.open()?;
    let loaded = args.weights.load(kernels, &device)?;
    let split: Split = args.split.parse()?;
    // Loaded as the run loaded its training data (size, channels), without the flips.
    let options = ddpm_train::ImageOptions {
        random_flip: false,
        ..loaded.meta.train.data.clone()
    };
    let (data, _) = ddpm_train::load_data(&args.data, split, &options).with_context(|| {
        format!(
            "cannot load {} data from {}",
            args.split,
            args.data.display()
        )
    })?;
    let shape = [
        loaded.meta.model.in_channels,
        loaded.meta.image_size[0],
        loaded.meta.image_size[1],
    ];
    if [data.channels, data.height, data.width] != shape {
        bail!(
            "the data's images are {}x{}x{} (channels x height x width), the model was trained \
             on {}x{}x{}",
            data.channels,
            data.height,
            data.width,
            shape[0],
            shape[1],
            shape[2]
        );
    }
    let n = args.num.map_or(data.len, |k| k.min(data.len));
    let diffusion = loaded
        .meta
        .diffusion
        .to_config(Some(&args.respacing))
        .map_err(anyhow::Error::from)
        .and_then(|c| Ok(GaussianDiffusion::new(&c)?))
        .with_context(|| format!("--respacing {:?}", args.respacing))?;
    let t_total = diffusion.num_timesteps();
    let bar = if args.no_progress {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new((n.div_ceil(args.batch_size) * t_total) as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} model calls ({msg}), ETA {eta}",
        ) {
            b.set_style(style);
        }
        b.set_message(format!("{n} images x {t_total} timesteps"));
        b
    };
    let mut noise = RngNoise(ChaCha8Rng::seed_from_u64(args.seed));
    let bound = ddpm_train::nll::bits_per_dim(
        &loaded.model,
        &diffusion,
        &data,
        n,
        args.batch_size,
        loaded.meta.model.num_classes.is_some(),
        args.clip_denoised,
        &mut noise,
        &device,
        || bar.inc(1),
    )?;
    bar.finish_and_clear();
    let (totals, priors, vb_sum) = (&bound.total, &bound.prior, &bound.vb_sum);
    let m = totals.len() as f64;
    let (mean, stderr) = bound.mean_and_stderr();
    if !mean.is_finite() {
        bail!(
            "the bound is not finite ({mean}) on these images: the model's output holds NaN or \
             infinite values (check the weights of {})",
            args.weights.checkpoint.display()
        );
    }
    let quarters: Vec<f64> = (0..4)
        .map(|q| {
            (q * t_total / 4..(q + 1) * t_total / 4)
                .map(|t| vb_sum[t] / m)
                .sum()
        })
        .collect();
    let report = serde_json::json!({
        "checkpoint": args.weights.checkpoint.display().to_string(),
        "weights": loaded.weights,
        "split": args.split,
        "num": totals.len(),
        "timesteps": t_total,
        "bpd": mean,
        "bpd_stderr": stderr,
        "prior_bpd": priors.iter().sum::<f64>() / m,
        "vb_by_quarter": quarters,
    });
    if args.quiet {
    } else if args.json {
        println!("{report}");
    } else {
        println!(
            "{} images of {} ({} weights, {} timesteps)",
            totals.len(),
            args.split,
            loaded.weights,
            t_total
        );
        println!("bits/dim: {mean:.4} ± {stderr:.4} (standard error)");
        println!(
            "prior term: {:.3e}",
            report["prior_bpd"].as_f64().unwrap_or(f64::NAN)
        );
        for (q, v) in quarters.iter().enumerate() {
            println!(
                "vb terms, timesteps {}..{}: {v:.4}",
                q * t_total / 4,
                (q + 1) * t_total / 4
            );
        }
    }
    Ok(report)
}
