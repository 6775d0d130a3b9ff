//! `cargo xtask golden`: regression tests of the samplers, the UNet and training numerics.
//!
//! A small model trained by the project (`xtask/golden/model/`, a checkpoint folder) is sampled
//! with fixed seeds, once with DDPM on a respaced schedule and once with DDIM, and the first
//! training steps from a fixed seed and initialisation are run; the results are compared with
//! `xtask/golden/golden.safetensors`, in every CPU kernel family the machine runs (the same
//! tolerance for all). At bf16 precision the same quantities have golden values of their own
//! per bf16 family, `golden_bf16_<family>.safetensors` (AMX tiles also take the 1×1
//! convolutions in bf16, AVX512-BF16 vectors only the 3×3 ones, so their results differ by
//! more than rounding).
//! `--bless` rewrites the files (bf16 only where the CPU has bf16 kernels) and reports what
//! changed; `--retrain` first retrains the model from MNIST (the recipe is [`retrain`]).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use ddpm_kernels::{Isa, KernelChoice, KernelOptions, Precision};
use ddpm_schedule::Denoiser;
use ddpm_schedule::{randn, GaussianDiffusion, RngNoise, SamplingMethod};
use ddpm_train::checkpoint::load_model;
use ddpm_train::data::{IdxArray, ImageDataset};
use ddpm_train::{DiffusionSettings, TrainConfig, Trainer};
use ddpm_unet::UNetConfig;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Largest allowed |difference| of a golden sample pixel (images in [-1, 1]). Wide enough for
/// other CPUs' FMA and summation orders, far below what a numerical change produces (> 0.05).
pub const SAMPLE_TOL: f64 = 2e-3;
/// Largest allowed relative difference of a golden training loss.
pub const LOSS_RTOL: f64 = 1e-4;

/// The folder holding the golden model and arrays.
pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden")
}

/// The golden file of a precision and kernel family (f32 has one for every family).
pub fn golden_file(dir: &Path, precision: Precision, isa: Isa) -> PathBuf {
    match precision {
        Precision::F32 => dir.join("golden.safetensors"),
        Precision::Bf16 => dir.join(format!("golden_bf16_{isa}.safetensors")),
    }
}

/// The kernel families this CPU runs at `precision` (for bf16: those with bf16 kernels).
pub fn families(precision: Precision) -> Vec<Isa> {
    Isa::supported_all()
        .into_iter()
        .filter(|&i| precision == Precision::F32 || i >= Isa::Avx512Bf16)
        .collect()
}

/// The golden quantities computed with the kernels of `isa` at `precision`.
pub fn compute_with(dir: &Path, isa: Isa, precision: Precision) -> Result<HashMap<String, Tensor>> {
    compute(
        dir,
        KernelOptions {
            precision,
            choice: KernelChoice::UpTo(isa),
        },
    )
}

/// The computed golden quantities, by name.
pub fn compute(dir: &Path, kernels: KernelOptions) -> Result<HashMap<String, Tensor>> {
    let device = Device::Cpu;
    let loaded = load_model(&dir.join("model"), None, kernels, &device)
        .context("loading the golden model")?;
    let meta = &loaded.meta;
    let [h, w] = meta.image_size;
    let mut out = HashMap::new();
    for (name, respacing, sampler, seed) in [
        ("ddpm_respaced25", "25", SamplingMethod::Ddpm, 1u64),
        (
            "ddim10_eta0",
            "ddim10",
            SamplingMethod::Ddim { eta: 0.0 },
            2,
        ),
        (
            "ddim10_eta1",
            "ddim10",
            SamplingMethod::Ddim { eta: 1.0 },
            3,
        ),
    ] {
        let diffusion = GaussianDiffusion::new(&meta.diffusion.to_config(Some(respacing))?)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x_t = randn(
            &mut rng,
            (4, meta.model.in_channels, h, w),
            DType::F32,
            &device,
        )?;
        let model = &loaded.model;
        let x = diffusion.sample_loop(
            model.sampling_fn(None),
            x_t,
            sampler,
            true,
            &mut RngNoise(rng),
            |_| {},
        )?;
        out.insert(name.to_string(), x);
    }
    out.insert(
        "train_losses".into(),
        Tensor::new(training_losses(kernels)?.as_slice(), &device)?,
    );
    Ok(out)
}

/// The first losses of a fixed-seed run of the golden architecture on fixed synthetic data,
/// computed with `kernels`.
fn training_losses(kernels: KernelOptions) -> Result<Vec<f64>> {
    let n = 32;
    let images = IdxArray {
        dims: vec![n, 28, 28],
        data: (0..n * 784)
            .map(|i| ((i * 131 + i / 784 * 17) % 256) as u8)
            .collect(),
    };
    let labels = IdxArray {
        dims: vec![n],
        data: vec![0; n],
    };
    let data = ImageDataset::from_idx(
        images,
        labels,
        Path::new("synthetic"),
        Path::new("synthetic"),
    )?;
    let dir = tempfile::tempdir()?;
    let cfg = TrainConfig {
        batch_size: 8,
        microbatch: 4,
        sample_interval: 0,
        seed: 11,
        schedule_sampler: ddpm_train::TimestepSampling::Uniform,
        kernels,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(
        golden_model_config(),
        DiffusionSettings::default(),
        cfg,
        data,
        dir.path(),
        &Device::Cpu,
    )?;
    (0..4).map(|_| Ok(t.train_step()?.loss)).collect()
}

/// The golden model's architecture: the tiny preset's UNet.
pub fn golden_model_config() -> UNetConfig {
    let (model, _, _) = ddpm_cli::presets::Preset::Tiny
        .configs()
        .expect("the tiny preset is valid");
    model
}

/// Differences between computed and golden arrays, one line each; empty when all agree.
pub fn differences(
    got: &HashMap<String, Tensor>,
    want: &HashMap<String, Tensor>,
) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    let mut names: Vec<&String> = got.keys().chain(want.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        let (Some(g), Some(w)) = (got.get(name), want.get(name)) else {
            lines.push(format!("{name}: present on one side only"));
            continue;
        };
        if g.dims() != w.dims() {
            lines.push(format!(
                "{name}: shape {:?}, golden {:?}",
                g.dims(),
                w.dims()
            ));
            continue;
        }
        let g: Vec<f64> = g.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let w: Vec<f64> = w.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let (mut worst, mut at) = (0f64, 0usize);
        let mut bad = 0usize;
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            let d = (a - b).abs();
            let limit = if name == "train_losses" {
                LOSS_RTOL * b.abs()
            } else {
                SAMPLE_TOL
            };
            if d.is_nan() || d > limit {
                bad += 1;
            }
            if d.is_nan() || d > worst {
                worst = d;
                at = i;
            }
        }
        if bad > 0 {
            lines.push(format!("{name}: {bad} of {} values differ; largest |diff| {worst:.3e} at {at} (golden {}, got {})", g.len(), w[at], g[at]));
        }
    }
    Ok(lines)
}

/// Checks (or with `bless`, rewrites) the golden arrays, in every kernel family this CPU runs.
pub fn run(bless: bool, retrain_data: Option<&Path>) -> Result<bool> {
    let dir = golden_dir();
    if let Some(data) = retrain_data {
        retrain(data, &dir.join("model"))?;
    }
    let mut ok = true;
    for precision in [Precision::F32, Precision::Bf16] {
        let fams = families(precision);
        if fams.is_empty() {
            println!("{precision}: this CPU has no {precision} kernels; not checked");
            continue;
        }
        // f32 is blessed once, with the most specialised family; every other must agree.
        let blessed: Vec<Isa> = match precision {
            Precision::F32 => vec![*fams.last().expect("non-empty")],
            Precision::Bf16 => fams.clone(),
        };
        for isa in fams {
            let path = golden_file(&dir, precision, isa);
            let want = if path.exists() {
                ddpm_unet::read_safetensors(&path)?
            } else {
                HashMap::new()
            };
            if bless {
                if !blessed.contains(&isa) {
                    continue;
                }
                let got = compute_with(&dir, isa, precision)?;
                let diffs = differences(&got, &want)?;
                ddpm_unet::write_safetensors(&got, &path)?;
                if diffs.is_empty() {
                    println!(
                        "{precision} {isa}: golden arrays unchanged ({})",
                        path.display()
                    );
                } else {
                    println!(
                        "{precision} {isa}: rewrote {}; what changed:",
                        path.display()
                    );
                    for d in &diffs {
                        println!("  {d}");
                    }
                }
                continue;
            }
            if want.is_empty() {
                bail!(
                    "{} is missing; run cargo xtask golden --bless",
                    path.display()
                );
            }
            let got = compute_with(&dir, isa, precision)?;
            let diffs = differences(&got, &want)?;
            for d in &diffs {
                println!("GOLDEN MISMATCH {precision} {isa}: {d}");
            }
            let total = got.len();
            println!(
                "{precision} {isa}: {} passed, {} failed",
                total - diffs.len(),
                diffs.len()
            );
            ok &= diffs.is_empty();
        }
    }
    Ok(ok)
}

/// The recipe of the committed golden model: the golden architecture, 300 steps of batch 16 on
/// MNIST, seed 0, lr 2e-4, EMA 0.99; only the EMA weights and config are kept (about 3 MB).
pub fn retrain(data: &Path, out: &Path) -> Result<()> {
    let train = ImageDataset::load(data, ddpm_train::Split::Train)?;
    let run = tempfile::tempdir()?;
    let cfg = TrainConfig {
        batch_size: 16,
        steps: 300,
        lr: 2e-4,
        ema_rate: vec![0.99],
        log_interval: 50,
        save_interval: 300,
        sample_interval: 0,
        seed: 0,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(
        golden_model_config(),
        DiffusionSettings::default(),
        cfg,
        train,
        run.path(),
        &Device::Cpu,
    )?;
    let ddpm_train::RunOutcome::Finished(ckpt) = t.run(true)? else {
        bail!("golden training was interrupted")
    };
    std::fs::create_dir_all(out)?;
    for f in ["config.json", "ema_0.99.safetensors"] {
        std::fs::copy(ckpt.join(f), out.join(f))?;
    }
    // The raw weights are not needed for sampling; keep the folder small.
    let _ = std::fs::remove_file(out.join("model.safetensors"));
    println!("retrained the golden model into {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The samplers, the UNet and the first training steps still give the golden numbers, in
    /// every kernel family this CPU runs, f32 and bf16.
    #[test]
    fn golden_outputs_are_unchanged_in_every_kernel_family() {
        let dir = golden_dir();
        for precision in [Precision::F32, Precision::Bf16] {
            let fams = families(precision);
            if fams.is_empty() {
                eprintln!("no {precision} kernels on this CPU: its golden values are not checked");
            }
            for isa in fams {
                let want = ddpm_unet::read_safetensors(&golden_file(&dir, precision, isa)).unwrap();
                assert_eq!(want.len(), 4);
                let got = compute_with(&dir, isa, precision).unwrap();
                let diffs = differences(&got, &want).unwrap();
                assert!(diffs.is_empty(), "{precision} {isa}: {diffs:#?}");
            }
        }
    }

    /// bf16 is not f32: each bf16 family's golden samples differ from f32's (by more than the
    /// tolerance), so the bf16 checks are not copies of the f32 one.
    #[test]
    fn bf16_golden_values_are_their_own() {
        let dir = golden_dir();
        let f =
            ddpm_unet::read_safetensors(&golden_file(&dir, Precision::F32, Isa::Portable)).unwrap();
        for isa in [Isa::Avx512Bf16, Isa::Amx] {
            let b = ddpm_unet::read_safetensors(&golden_file(&dir, Precision::Bf16, isa)).unwrap();
            let diffs = differences(&b, &f).unwrap();
            // The three sample arrays at least (the first training losses may agree within
            // their tolerance).
            let samples = diffs
                .iter()
                .filter(|d| !d.starts_with("train_losses"))
                .count();
            assert_eq!(samples, 3, "{isa}: {diffs:#?}");
        }
    }

    #[test]
    fn a_numerical_change_is_caught() {
        let dir = golden_dir();
        let want = ddpm_unet::read_safetensors(&dir.join("golden.safetensors")).unwrap();
        let mut got = want.clone();
        let x = &want["ddim10_eta0"];
        got.insert("ddim10_eta0".into(), (x + 0.01).unwrap());
        let l = &want["train_losses"];
        got.insert("train_losses".into(), (l * 1.001).unwrap());
        let diffs = differences(&got, &want).unwrap();
        assert_eq!(diffs.len(), 2, "{diffs:#?}");
        got.remove("ddpm_respaced25");
        assert_eq!(differences(&got, &want).unwrap().len(), 3);
    }
}
