//! `ddpm-cli eval`: sample quality of an MNIST model, with real data as the floor.

use crate::sample::{generate, SampleArgs};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use ddpm_train::eval::{class_histogram, frechet_distance, inception_score, Classifier};
use ddpm_train::{ImageDataset, Split};
use std::path::PathBuf;

/// Options of `ddpm-cli eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Checkpoint folder.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// EMA rate whose weights to use ("model" for the raw weights; default: the first EMA).
    #[arg(long)]
    pub ema: Option<String>,
    /// Number of samples (and of real training images for the floor).
    #[arg(long, default_value_t = 10_000)]
    pub num: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Respacing used to sample ("" = all steps).
    #[arg(long, default_value = "100")]
    pub respacing: String,
    /// Sample with DDIM.
    #[arg(long)]
    pub ddim: bool,
    /// Sampling method: ddpm, ddim, dpm++2m or unipc.
    #[arg(long, default_value = "ddpm")]
    pub solver: String,
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
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
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
        checkpoint: args.checkpoint.clone(),
        ema: args.ema.clone(),
        num: args.num,
        batch_size: args.batch_size,
        respacing: args.respacing.clone(),
        ddim: args.ddim,
        solver: args.solver.clone(),
        steps: None,
        eta: args.eta,
        clip_denoised: true,
        seed: args.seed,
        class: None,
        out: None,
        npz: None,
        gif: None,
        gif_show: "both".into(),
        gif_frames: 1,
        device: "cpu".into(),
        precision: ddpm_unet::ops::Precision::F32,
        no_progress: args.no_progress,
    };
    let samples = generate(&sample_args)?;
    let device = Device::Cpu;
    let clf = Classifier::pretrained(&device)?;
    let (f_gen, p_gen) = clf.describe(&samples.images, 500)?;
    let all_test: Vec<usize> = (0..test.len).collect();
    let (x_test, _) = test.batch(&all_test, &device)?;
    let (f_test, _) = clf.describe(&x_test, 500)?;
    let real: Vec<usize> = (0..args.num.min(train.len)).collect();
    if real.len() < args.num {
        tracing::warn!(
            "the real-data floor uses all {} training images, fewer than the {} samples",
            real.len(),
            args.num
        );
    }
    let (x_real, _) = train.batch(&real, &device)?;
    let (f_real, p_real) = clf.describe(&x_real, 500)?;
    let report = serde_json::json!({
        "checkpoint": args.checkpoint.display().to_string(),
        "num": args.num,
        "test_images": test.len,
        "respacing": args.respacing,
        "solver": if args.ddim { "ddim" } else { args.solver.as_str() },
        "samples": {
            "frechet_distance": frechet_distance(&f_gen, &f_test),
            "inception_score": inception_score(&p_gen),
            "class_histogram": class_histogram(&p_gen),
        },
        "real_train_images": {
            "num": real.len(),
            "frechet_distance": frechet_distance(&f_real, &f_test),
            "inception_score": inception_score(&p_real),
            "class_histogram": class_histogram(&p_real),
        },
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{} samples ({} steps) scored by the MNIST classifier against the {} test images",
            args.num,
            if args.respacing.is_empty() {
                "all".to_string()
            } else {
                args.respacing.clone()
            },
            test.len
        );
        println!(
            "{:<26} {:>12} {:>12}",
            "",
            format!("{} samples", args.num),
            format!("{} real", real.len())
        );
        let (s, r) = (&report["samples"], &report["real_train_images"]);
        println!(
            "{:<26} {:>12.3} {:>12.3}",
            "Fréchet distance (lower)",
            s["frechet_distance"].as_f64().unwrap_or(f64::NAN),
            r["frechet_distance"].as_f64().unwrap_or(f64::NAN)
        );
        println!(
            "{:<26} {:>12.3} {:>12.3}",
            "Inception Score (max 10)",
            s["inception_score"].as_f64().unwrap_or(f64::NAN),
            r["inception_score"].as_f64().unwrap_or(f64::NAN)
        );
        println!("class histogram, samples:    {}", s["class_histogram"]);
        println!("class histogram, real train: {}", r["class_histogram"]);
    }
    Ok(report)
}
