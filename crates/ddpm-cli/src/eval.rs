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
    /// Class-conditional models: also sample N images of each class and report, per class,
    /// how many the classifier labels as that class and their Fréchet distance to the test
    /// images of the class (beside the floor of N real training images of the class).
    #[arg(long)]
    pub per_class: Option<usize>,
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
    if args.per_class == Some(0) {
        bail!("--per-class must be positive");
    }
    if args.per_class.is_some() {
        let meta =
            ddpm_train::CheckpointMeta::<ddpm_unet::UNetConfig>::read(&args.weights.checkpoint)?;
        if meta.model.num_classes != Some(10) {
            bail!(
                "--per-class scores a class-conditional model of the ten digits; the model in {} \
                 has {}",
                args.weights.checkpoint.display(),
                meta.model
                    .num_classes
                    .map_or("no classes".to_string(), |k| format!("{k} classes"))
            );
        }
    }
    let samples = generate(&sample_args)?;
    let device = Device::Cpu;
    let clf = Classifier::pretrained(&device)?;
    let f_test = test_features(&clf, &test)?;
    let per_class = match args.per_class {
        Some(n) => Some(per_class_scores(
            n,
            &sample_args,
            &clf,
            &f_test,
            &test,
            &train,
        )?),
        None => None,
    };
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
        "guidance_scale": samples.guidance_scale,
        "per_class": per_class,
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
        if let Some(pc) = &report["per_class"].as_array() {
            println!("class  labelled as it   FD   floor");
            for row in pc.iter() {
                println!(
                    "{:>5}  {:>14.3} {:>6.1} {:>6.1}",
                    row["class"],
                    row["accuracy"].as_f64().unwrap_or(f64::NAN),
                    row["frechet_distance"].as_f64().unwrap_or(f64::NAN),
                    row["floor"].as_f64().unwrap_or(f64::NAN)
                );
            }
        }
    }
    Ok(report)
}

/// Samples `n` images of each class and scores them against the test images of their class.
fn per_class_scores(
    n: usize,
    base: &SampleArgs,
    clf: &Classifier,
    f_test: &[Vec<f64>],
    test: &ImageDataset,
    train: &ImageDataset,
) -> Result<Vec<serde_json::Value>> {
    let mut rows = Vec::new();
    for class in 0..10u32 {
        let args = SampleArgs {
            num: n,
            class: Some(class),
            seed: base.seed.wrapping_add(1 + class as u64),
            ..base.clone()
        };
        let samples = generate(&args)?;
        let (feats, probs) = clf.describe(&samples.images.to_device(&Device::Cpu)?, 500)?;
        let hits = ddpm_train::eval::class_histogram(&probs)[class as usize];
        let reference: Vec<Vec<f64>> = (0..test.len)
            .filter(|&i| u32::from(test.label(i)) == class)
            .map(|i| f_test[i].clone())
            .collect();
        let real: Vec<usize> = shuffled_indices(train.len, base.seed)
            .into_iter()
            .filter(|&i| u32::from(train.label(i)) == class)
            .take(n)
            .collect();
        // A class without test (or training) images has no distance: null in the report.
        let fd = |x: &[Vec<f64>]| {
            Some(ddpm_train::eval::frechet_distance(x, &reference)).filter(|d| d.is_finite())
        };
        let floor = if real.is_empty() {
            None
        } else {
            let (x_real, _) = train.batch(&real, &Device::Cpu)?;
            fd(&clf.describe(&x_real, 500)?.0)
        };
        rows.push(serde_json::json!({
            "class": class,
            "num": n,
            "accuracy": hits as f64 / n as f64,
            "frechet_distance": fd(&feats),
            "test_images": reference.len(),
            "floor": floor,
        }));
    }
    Ok(rows)
}
