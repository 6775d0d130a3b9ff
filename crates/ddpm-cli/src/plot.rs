//! `ddpm-cli plot` and `ddpm-cli quality-curve`: pictures of a run folder.

use crate::eval::EvalArgs;
use crate::nll::NllArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use ddpm_train::plot::{loss_plot, minutes_at_rows, quality_plot, read_metrics, QualityPoint};
use std::path::{Path, PathBuf};

/// Options of `ddpm-cli plot`.
#[derive(Debug, Clone, Args)]
pub struct PlotArgs {
    /// Run folder (with metrics.jsonl; quality.json too, if `quality-curve` has scored it).
    pub run: PathBuf,
    /// Where to write the loss plot (default RUN/loss.png).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Draws RUN/loss.png, and RUN/quality.png when RUN/quality.json exists; returns the paths.
pub fn plot(args: &PlotArgs) -> Result<Vec<PathBuf>> {
    let metrics = args.run.join("metrics.jsonl");
    if !metrics.is_file() {
        bail!(
            "{} is not a run folder: it has no metrics.jsonl",
            args.run.display()
        );
    }
    let rows = read_metrics(&metrics)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.run.join("loss.png"));
    loss_plot(&rows, &out)?;
    let mut written = vec![out];
    let quality = args.run.join("quality.json");
    if quality.is_file() {
        let points: Vec<QualityPoint> = serde_json::from_slice(
            &std::fs::read(&quality).with_context(|| format!("{}", quality.display()))?,
        )
        .with_context(|| format!("{} is not a quality curve", quality.display()))?;
        let png = args.run.join("quality.png");
        let num = points.first().map_or(0, |p| p.num);
        quality_plot(&points, &curve_title(&args.run, num), &png)?;
        written.push(png);
    }
    Ok(written)
}

fn curve_title(run: &Path, num: usize) -> String {
    format!(
        "sample quality of {} (n = {num}, classifier features)",
        run.file_name()
            .map_or_else(|| run.display().to_string(), |n| n.to_string_lossy().into())
    )
}

/// Options of `ddpm-cli quality-curve`.
#[derive(Debug, Clone, Args)]
pub struct QualityArgs {
    /// Run folder whose checkpoints to score.
    pub run: PathBuf,
    /// Samples per checkpoint (and real images for the floor).
    #[arg(long, default_value_t = 1000)]
    pub num: usize,
    /// Test images for bits/dim (0 = skip it).
    #[arg(long, default_value_t = 100)]
    pub nll_num: usize,
    /// Respacing of the bound for bits/dim (a respaced bound is looser than the full one).
    #[arg(long, default_value = "100")]
    pub nll_respacing: String,
    /// Sampling method (as `eval --solver`).
    #[arg(long, default_value = crate::sample::DEFAULT_SOLVER)]
    pub solver: String,
    /// Respacing used to sample (as `eval --respacing`; default: `sample`'s 20 steps).
    #[arg(long)]
    pub respacing: Option<String>,
    /// Folder with the MNIST IDX files.
    #[arg(long, default_value = "data/mnist")]
    pub data: PathBuf,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Scores every checkpoint of RUN, writes RUN/quality.json and draws RUN/quality.png.
pub fn quality_curve(args: &QualityArgs) -> Result<Vec<QualityPoint>> {
    let rows = read_metrics(&args.run.join("metrics.jsonl"))
        .with_context(|| format!("{} is not a run folder", args.run.display()))?;
    // Damaged checkpoints (a crash, a full disk) are left out with a warning.
    let checkpoints: Vec<(u64, PathBuf)> = ddpm_train::run_folder::list_checkpoints(&args.run)
        .into_iter()
        .filter(
            |(_, dir)| match ddpm_train::run_folder::verify_checkpoint(dir) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!("skipping {}: {e}", dir.display());
                    false
                }
            },
        )
        .collect();
    if checkpoints.is_empty() {
        bail!(
            "{} holds no intact checkpoint-NNNNNNN folders",
            args.run.display()
        );
    }
    let meta = ddpm_train::CheckpointMeta::<ddpm_unet::UNetConfig>::read(&checkpoints[0].1)?;
    let minutes = minutes_at_rows(&rows, meta.train.batch_size);
    let json = args.run.join("quality.json");
    let title = curve_title(&args.run, args.num);
    let mut points = Vec::new();
    for (step, dir) in &checkpoints {
        let at = minutes
            .iter()
            .rfind(|(s, _)| s <= step)
            .map_or(0.0, |m| m.1);
        tracing::info!("scoring {} ({at:.1} min)", dir.display());
        let weights = crate::WeightsArgs {
            checkpoint: dir.clone(),
            ema: None,
        };
        let report = crate::eval::run(&EvalArgs {
            weights: weights.clone(),
            compute: Default::default(),
            guidance_scale: None,
            per_class: None,
            num: args.num,
            batch_size: 100,
            respacing: args.respacing.clone(),
            steps: None,
            ddim: false,
            solver: Some(args.solver.clone()),
            eta: 0.0,
            seed: args.seed,
            data: args.data.clone(),
            json: false,
            no_progress: true,
            quiet: true,
        })?;
        let bits_per_dim = if args.nll_num > 0 {
            let r = crate::nll::run(&NllArgs {
                weights,
                data: args.data.clone(),
                split: "test".into(),
                num: Some(args.nll_num),
                batch_size: 100,
                respacing: args.nll_respacing.clone(),
                clip_denoised: true,
                seed: args.seed,
                json: false,
                compute: Default::default(),
                no_progress: true,
                quiet: true,
            })?;
            r["bpd"].as_f64()
        } else {
            None
        };
        let f = |k: &str, v: &str| report[k][v].as_f64().unwrap_or(f64::NAN);
        points.push(QualityPoint {
            step: *step,
            minutes: at,
            num: args.num,
            frechet_distance: f("samples", "frechet_distance"),
            floor: f("real_train_images", "frechet_distance"),
            confident_fraction: f("samples", "confident_fraction"),
            bits_per_dim,
        });
        // After every point, so that an interrupted curve keeps what it scored.
        ddpm_train::run_folder::write_atomically(&json, &serde_json::to_vec_pretty(&points)?)?;
    }
    quality_plot(&points, &title, &args.run.join("quality.png"))?;
    Ok(points)
}

/// The curve as a table.
pub fn table(points: &[QualityPoint]) -> String {
    let mut s = format!(
        "{:>8} {:>8} {:>10} {:>8} {:>10} {:>9}\n",
        "step", "minutes", "FD", "floor", "confident", "bits/dim"
    );
    for p in points {
        s += &format!(
            "{:>8} {:>8.1} {:>10.2} {:>8.2} {:>9.1}% {:>9}\n",
            p.step,
            p.minutes,
            p.frechet_distance,
            p.floor,
            100.0 * p.confident_fraction,
            p.bits_per_dim.map_or("-".into(), |b| format!("{b:.3}"))
        );
    }
    s
}
