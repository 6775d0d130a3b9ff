//! `ddpm-cli eval`: sample quality of an MNIST model, with real data as the floor.

use crate::sample::{generate, respacing_of, GifShow, SampleArgs};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use ddpm_train::eval::{shuffled_indices, test_features, Classifier, Scores};
use ddpm_train::{ImageDataset, Split};
use std::path::PathBuf;

/// Options of `ddpm-cli eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// The checkpoint and its weights.
    #[command(flatten)]
    pub weights: crate::WeightsArgs,
    /// Number of samples (and of real training images, a seeded random draw, for the floor).
    #[arg(long, default_value_t = 1000)]
    pub num: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Respacing used to sample ("" = all steps, "logsnr20", "ddim50", ...; default: 20 steps
    /// as `sample`).
    #[arg(long)]
    pub respacing: Option<String>,
    /// Model evaluations per sample (instead of --respacing): N evenly spaced steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Sample with DDIM.
    #[arg(long)]
    pub ddim: bool,
    /// Sampling method: ddpm, ddim, dpm++2m or unipc [default: ddpm].
    #[arg(long)]
    pub solver: Option<String>,
    /// DDIM eta.
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder with the MNIST IDX files (the test set is the reference).
    #[arg(long, default_value = "data/mnist")]
    pub data: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Where and how to compute.
    #[command(flatten)]
    pub compute: crate::ComputeArgs,
    /// Classifier-free guidance scale for a model trained with --class-dropout (see `sample`).
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Print nothing (callers that use the returned report).
    #[arg(skip)]
    pub quiet: bool,
}

/// Runs `eval` and returns the report.
pub fn run(args: &EvalArgs) -> Result<serde_json::Value> {
    let test = ImageDataset::load(&args.data, Split::Test).with_context(|| {
        format!(
            "cannot load the MNIST test set from {}",
            args.data.display()
        )
    })?;
    let train = ImageDataset::load(&args.data, Split::Train).with_context(|| {
        format!(
            "cannot load the MNIST training set from {}",
            args.data.display()
        )
    })?;
    if (test.height, test.width) != (28, 28) {
        bail!(
            "eval scores 28x28 MNIST digits; {} holds {}x{} images",
            args.data.display(),
            test.height,
            test.width
        );
    }
    let sample_args = SampleArgs {
        weights: args.weights.clone(),
        num: args.num,
        batch_size: args.batch_size,
        respacing: args.respacing.clone(),
        ddim: args.ddim,
        solver: args.solver.clone(),
        steps: args.steps,
        eta: args.eta,
        clip_denoised: true,
        seed: args.seed,
        class: None,
        guidance_scale: args.guidance_scale,
        out: None,
        npz: None,
        gif: None,
        gif_show: GifShow::Both,
        gif_frames: 1,
        compute: args.compute.clone(),
        no_progress: args.no_progress,
    };
    let samples = generate(&sample_args)?;
    let device = Device::Cpu;
    let clf = Classifier::pretrained(&device)?;
    let f_test = test_features(&clf, &test)?;
    // The classifier runs on the CPU, wherever the samples were drawn.
    let images = samples.images.to_device(&device)?;
    let gen = Scores::of_images(&clf, &images, &f_test)?;
    if args.num > train.len {
        tracing::warn!(
            "the real-data floor uses all {} training images, fewer than the {} samples",
            train.len,
            args.num
        );
    }
    let mut order = shuffled_indices(train.len, args.seed);
    order.truncate(args.num.min(train.len));
    let (x_real, _) = train.batch(&order, &device)?;
    let real = Scores::of_images(&clf, &x_real, &f_test)?;
    let spacing = respacing_of(args.steps, args.respacing.as_deref())?;
    let report = serde_json::json!({
        "checkpoint": args.weights.checkpoint.display().to_string(),
        "num": args.num,
        "test_images": test.len,
        "respacing": spacing,
        "solver": samples.sampler.name(),
        "samples": gen,
        "real_train_images": real,
    });
    if args.quiet {
        return Ok(report);
    }
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{} samples ({} steps) scored by the MNIST classifier against the {} test images",
            args.num,
            if spacing.is_empty() {
                "all".to_string()
            } else {
                spacing.clone()
            },
            test.len
        );
        println!(
            "{:<26} {:>12} {:>12}",
            "",
            format!("{} samples", gen.num),
            format!("{} real", real.num)
        );
        let rows = [
            (
                "Fréchet distance (lower)",
                gen.frechet_distance,
                real.frechet_distance,
            ),
            (
                "Inception Score (max 10)",
                gen.inception_score,
                real.inception_score,
            ),
            (
                "confident (p > 0.9)",
                gen.confident_fraction,
                real.confident_fraction,
            ),
        ];
        for (name, g, r) in rows {
            println!("{name:<26} {g:>12.3} {r:>12.3}");
        }
        println!(
            "FD / floor: {:.2}",
            gen.frechet_distance / real.frechet_distance
        );
        println!("class histogram, samples:    {:?}", gen.class_histogram);
        println!("class histogram, real train: {:?}", real.class_histogram);
    }
    Ok(report)
}
