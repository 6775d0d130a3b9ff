//! `cargo xtask bench`: training and sampling throughput, side by side with the original.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use ddpm_train::data::{IdxArray, ImageDataset};
use ddpm_train::{DiffusionSettings, TrainConfig, Trainer};
use ddpm_unet::UNetConfig;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// What one side of the comparison measured.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Figures {
    /// Training images per second (one full step: forward, hybrid loss, backward, AdamW, EMA).
    pub train_images_per_sec: f64,
    /// Forward (no-grad) images per second.
    pub forward_images_per_sec: f64,
    /// Peak resident memory in MiB.
    pub peak_rss_mib: f64,
}

/// Multiply-adds ×2 of the MNIST UNet's forward pass per image (convolutions, attention and
/// linear layers), and of a training step (forward + the two gradients of every layer).
const FORWARD_GFLOP_PER_IMAGE: f64 = 0.555;
const TRAIN_GFLOP_PER_IMAGE: f64 = 3.0 * FORWARD_GFLOP_PER_IMAGE;

/// Options of the benchmark.
pub struct BenchOptions {
    pub batch: usize,
    pub warmup: usize,
    pub iters: usize,
    /// Rounds of (ours, ours with bf16 convolutions, the original), one after the other.
    pub rounds: usize,
    pub json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite timings"));
    v[v.len() / 2]
}

/// The per-field median of several rounds' figures (the largest peak RSS).
fn median_figures(rounds: &[Figures]) -> Figures {
    let field = |f: fn(&Figures) -> f64| median(rounds.iter().map(f).collect());
    Figures {
        train_images_per_sec: field(|f| f.train_images_per_sec),
        forward_images_per_sec: field(|f| f.forward_images_per_sec),
        peak_rss_mib: rounds.iter().map(|f| f.peak_rss_mib).fold(0.0, f64::max),
    }
}

/// The CPU's model name as the kernel reports it.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Synthetic MNIST-shaped data: the benchmark measures compute, not data loading.
fn synthetic_data(n: usize) -> ImageDataset {
    let images = IdxArray {
        dims: vec![n, 28, 28],
        data: (0..n * 784).map(|i| (i * 37 % 256) as u8).collect(),
    };
    let labels = IdxArray {
        dims: vec![n],
        data: (0..n).map(|i| (i % 10) as u8).collect(),
    };
    ImageDataset::from_idx(
        images,
        labels,
        Path::new("synthetic"),
        Path::new("synthetic"),
    )
    .expect("consistent synthetic data")
}

/// Runs our side of the benchmark.
pub fn bench_ours(opts: &BenchOptions) -> Result<Figures> {
    let device = Device::Cpu;
    let run_dir = tempfile::tempdir()?;
    let cfg = TrainConfig {
        batch_size: opts.batch,
        sample_interval: 0,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(
        UNetConfig::mnist(),
        DiffusionSettings::default(),
        cfg,
        synthetic_data(4 * opts.batch),
        run_dir.path(),
        &device,
    )?;
    let mut times = Vec::new();
    for i in 0..opts.warmup + opts.iters {
        let t0 = Instant::now();
        trainer.train_step()?;
        if i >= opts.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let train = opts.batch as f64 / median(times);
    let x = Tensor::randn(0f32, 1.0, (opts.batch, 1, 28, 28), &device)?;
    let ts = Tensor::from_vec(
        (0..opts.batch)
            .map(|i| (i * 997 % 1000) as f32)
            .collect::<Vec<_>>(),
        opts.batch,
        &device,
    )?;
    let mut times = Vec::new();
    for i in 0..opts.warmup + opts.iters {
        let t0 = Instant::now();
        let out = trainer.model().forward(&x, &ts, None, false)?;
        out.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        if i >= opts.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let forward = opts.batch as f64 / median(times);
    Ok(Figures {
        train_images_per_sec: train,
        forward_images_per_sec: forward,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// The original's side: the same step in PyTorch, run by `REF_PYTHON` from `REF_SRC`.
const REFERENCE_SCRIPT: &str = r#"
import json, resource, sys, time
import torch as th
sys.path.insert(0, sys.argv[1])
from improved_diffusion.script_util import create_gaussian_diffusion
from improved_diffusion.resample import UniformSampler
from improved_diffusion.nn import update_ema
batch, warmup, iters, threads = map(int, sys.argv[2:6])
th.set_num_threads(threads)
th.manual_seed(0)
diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="cosine",
                                      rescale_timesteps=True, rescale_learned_sigmas=True)
"#;

const REFERENCE_SCRIPT_TAIL: &str = r#"
params = list(model.parameters())
opt = th.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
ema = [p.detach().clone() for p in params]
sampler = UniformSampler(diffusion)
x = th.rand(batch, 1, 28, 28) * 2 - 1
def step():
    t, w = sampler.sample(batch, "cpu")
    losses = diffusion.training_losses(model, x, t)
    loss = (losses["loss"] * w).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    update_ema(ema, params, rate=0.9999)
def timed(f):
    out = []
    for i in range(warmup + iters):
        t0 = time.perf_counter(); f(); dt = time.perf_counter() - t0
        if i >= warmup: out.append(dt)
    out.sort()
    return out[len(out) // 2]
train = batch / timed(step)
ts = th.tensor([float(i * 997 % 1000) for i in range(batch)])
def fwd():
    with th.no_grad():
        model(x, ts)
forward = batch / timed(fwd)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps({"train_images_per_sec": train, "forward_images_per_sec": forward, "peak_rss_mib": rss}))
"#;

/// Runs the original's side when `REF_PYTHON` and `REF_SRC` are set.
pub fn bench_reference(opts: &BenchOptions, threads: usize) -> Result<Option<Figures>> {
    let (Ok(python), Ok(src)) = (std::env::var("REF_PYTHON"), std::env::var("REF_SRC")) else {
        return Ok(None);
    };
    // The MNIST UNet takes one input channel; rebuild the model the same way with in_channels=1.
    let build = r#"
from improved_diffusion.unet import UNetModel
model = UNetModel(in_channels=1, model_channels=32, out_channels=2, num_res_blocks=2,
                  attention_resolutions=(4,), dropout=0.0, channel_mult=(1, 2, 2),
                  num_classes=None, num_heads=4, use_scale_shift_norm=True)
"#;
    let script = format!("{REFERENCE_SCRIPT}{build}{REFERENCE_SCRIPT_TAIL}");
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench_reference.py");
    std::fs::write(&path, script)?;
    let out = std::process::Command::new(&python)
        .arg(&path)
        .arg(&src)
        .args([opts.batch, opts.warmup, opts.iters, threads].map(|v| v.to_string()))
        .output()
        .with_context(|| format!("cannot run REF_PYTHON={python}"))?;
    if !out.status.success() {
        bail!(
            "the reference benchmark failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .context("the reference benchmark printed nothing")?;
    Ok(Some(serde_json::from_str(line).with_context(|| {
        format!("unexpected reference output: {line}")
    })?))
}

/// Runs both sides and prints the figures and ratios.
pub fn run(opts: BenchOptions) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (mut ours, mut ours_bf16, mut reference) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..opts.rounds {
        if opts.rounds > 1 && !opts.json {
            eprintln!("round {} of {}", round + 1, opts.rounds);
        }
        ours.push(bench_ours(&opts)?);
        // The bf16 variant of the convolutions, where the CPU has AVX512-BF16.
        if ddpm_unet::ops::bf16_supported() {
            ddpm_unet::ops::set_bf16_convolutions(true);
            let f = bench_ours(&opts);
            ddpm_unet::ops::set_bf16_convolutions(false);
            ours_bf16.push(f?);
        }
        if let Some(r) = bench_reference(&opts, threads)? {
            reference.push(r);
        }
    }
    let rounds = serde_json::json!({"ours": ours, "ours_bf16_convolutions": ours_bf16, "original": reference});
    let ours = median_figures(&ours);
    let ours_bf16 = (!ours_bf16.is_empty()).then(|| median_figures(&ours_bf16));
    let reference = (!reference.is_empty()).then(|| median_figures(&reference));
    if opts.json {
        let ratio = reference.as_ref().map(|r| {
            serde_json::json!({
                "train": ours.train_images_per_sec / r.train_images_per_sec,
                "forward": ours.forward_images_per_sec / r.forward_images_per_sec,
            })
        });
        println!(
            "{}",
            serde_json::json!({"cpu": cpu_model(), "kernels": ddpm_unet::ops::kernel_variant(), "batch": opts.batch, "threads": threads, "ours": ours, "ours_bf16_convolutions": ours_bf16, "original": reference, "ratio": ratio, "rounds": rounds})
        );
        return Ok(());
    }
    println!(
        "CPU: {}; kernels: {}",
        cpu_model(),
        ddpm_unet::ops::kernel_variant()
    );
    println!(
        "MNIST UNet (1.74 M parameters), batch {}, {threads} threads, median of {} rounds \
         (sides alternating) of the median of {} iterations",
        opts.batch, opts.rounds, opts.iters
    );
    println!(
        "{:<28} {:>12} {:>12} {:>8}",
        "", "ddpm-rs", "original", "ratio"
    );
    let row = |name: &str, a: f64, b: Option<f64>| match b {
        Some(b) => println!("{name:<28} {a:>12.1} {b:>12.1} {:>7.2}x", a / b),
        None => println!("{name:<28} {a:>12.1} {:>12} {:>8}", "-", "-"),
    };
    row(
        "train images/s",
        ours.train_images_per_sec,
        reference.as_ref().map(|r| r.train_images_per_sec),
    );
    row(
        "forward images/s",
        ours.forward_images_per_sec,
        reference.as_ref().map(|r| r.forward_images_per_sec),
    );
    row(
        "peak RSS MiB",
        ours.peak_rss_mib,
        reference.as_ref().map(|r| r.peak_rss_mib),
    );
    row(
        "train GFLOP/s",
        ours.train_images_per_sec * TRAIN_GFLOP_PER_IMAGE,
        reference
            .as_ref()
            .map(|r| r.train_images_per_sec * TRAIN_GFLOP_PER_IMAGE),
    );
    row(
        "forward GFLOP/s",
        ours.forward_images_per_sec * FORWARD_GFLOP_PER_IMAGE,
        reference
            .as_ref()
            .map(|r| r.forward_images_per_sec * FORWARD_GFLOP_PER_IMAGE),
    );
    if let Some(b) = &ours_bf16 {
        row(
            "train images/s, bf16 convs",
            b.train_images_per_sec,
            reference.as_ref().map(|r| r.train_images_per_sec),
        );
        row(
            "forward images/s, bf16 convs",
            b.forward_images_per_sec,
            reference.as_ref().map(|r| r.forward_images_per_sec),
        );
    }
    if reference.is_none() {
        println!("(set REF_PYTHON to a Python with torch and REF_SRC to an improved-diffusion checkout for the side-by-side)");
    }
    Ok(())
}
