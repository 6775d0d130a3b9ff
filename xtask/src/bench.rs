//! `cargo xtask bench`: training and sampling throughput, side by side with the original.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use ddpm_kernels::{profile, Isa, KernelChoice, KernelOptions, Precision};
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
    /// Rounds of (ours f32, ours bf16, the original f32, the original under bf16 autocast),
    /// one after the other.
    pub rounds: usize,
    pub json: bool,
    /// Our kernel family limit, mirrored on the original's side (None: the CPU's best).
    pub isa: Option<Isa>,
}

/// What one side measured in one round, with our step's time by op class.
#[derive(Debug, Clone)]
struct Measured {
    figures: Figures,
    /// Seconds per training step by op class (ours only).
    breakdown: Option<Breakdown>,
}

/// A training step's seconds by op class: the kernels' own timings, the optimiser's, and the
/// rest of the step (Candle's element-wise ops, reductions, copies, the loss terms).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Breakdown {
    pub step: f64,
    pub convolutions: f64,
    pub norms: f64,
    pub attention: f64,
    pub optimiser: f64,
    pub elementwise_and_other: f64,
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

/// The kernels our side runs at `precision`, within the benchmark's family limit
/// (`--isa`, else `DDPM_ISA`), or plain Candle ops with `DDPM_PLAIN_OPS=1`.
fn our_kernels(opts: &BenchOptions, precision: Precision) -> KernelOptions {
    let plain = ddpm_kernels::plain_ops_from_env();
    KernelOptions {
        precision,
        choice: match opts.isa {
            _ if plain => KernelChoice::Plain,
            Some(isa) => KernelChoice::UpTo(isa),
            None => KernelChoice::Auto,
        },
    }
}

/// Runs our side of the benchmark at `precision`.
fn bench_ours(opts: &BenchOptions, precision: Precision) -> Result<Measured> {
    let device = Device::Cpu;
    let run_dir = tempfile::tempdir()?;
    let cfg = TrainConfig {
        batch_size: opts.batch,
        sample_interval: 0,
        kernels: our_kernels(opts, precision),
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
        if i == opts.warmup {
            profile::take();
            profile::set_profiling(true);
        }
        let t0 = Instant::now();
        trainer.train_step()?;
        if i >= opts.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    profile::set_profiling(false);
    let p = profile::take();
    let n = opts.iters as f64;
    let step = times.iter().sum::<f64>() / n;
    let (conv, norms, attention, optimiser) = (
        p.convolutions / n,
        p.norms / n,
        p.attention / n,
        p.optimiser / n,
    );
    let breakdown = Breakdown {
        step,
        convolutions: conv,
        norms,
        attention,
        optimiser,
        elementwise_and_other: (step - conv - norms - attention - optimiser).max(0.0),
    };
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
    Ok(Measured {
        figures: Figures {
            train_images_per_sec: train,
            forward_images_per_sec: forward,
            peak_rss_mib: peak_rss_mib(),
        },
        breakdown: Some(breakdown),
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
precision = sys.argv[6]
import contextlib
def autocast():
    if precision == "bf16":
        return th.autocast("cpu", dtype=th.bfloat16)
    return contextlib.nullcontext()
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
    with autocast():
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
    with th.no_grad(), autocast():
        model(x, ts)
forward = batch / timed(fwd)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps({"train_images_per_sec": train, "forward_images_per_sec": forward, "peak_rss_mib": rss}))
"#;

/// The environment that restricts PyTorch (ATen's kernels, oneDNN's convolutions, MKL's
/// matrix products) to roughly the family `isa`, for a like-for-like comparison.
fn torch_isa_env(isa: Isa) -> Vec<(&'static str, &'static str)> {
    match isa {
        Isa::Portable => vec![
            ("ATEN_CPU_CAPABILITY", "default"),
            ("ONEDNN_MAX_CPU_ISA", "SSE41"),
            ("MKL_ENABLE_INSTRUCTIONS", "SSE4_2"),
        ],
        Isa::Avx2 => vec![
            ("ATEN_CPU_CAPABILITY", "avx2"),
            ("ONEDNN_MAX_CPU_ISA", "AVX2"),
            ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
        ],
        Isa::Avx512 => vec![
            ("ATEN_CPU_CAPABILITY", "avx512"),
            ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE"),
        ],
        Isa::Avx512Bf16 => vec![
            ("ATEN_CPU_CAPABILITY", "avx512"),
            ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16"),
        ],
        Isa::Amx => vec![],
    }
}

/// Runs the original's side at `precision` (bf16: under CPU bf16 autocast) when `REF_PYTHON`
/// and `REF_SRC` are set.
fn bench_reference(
    opts: &BenchOptions,
    threads: usize,
    precision: Precision,
) -> Result<Option<Measured>> {
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
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(&path)
        .arg(&src)
        .args([opts.batch, opts.warmup, opts.iters, threads].map(|v| v.to_string()))
        .arg(precision.name());
    if let Some(isa) = opts.isa {
        cmd.envs(torch_isa_env(isa));
    }
    let out = cmd
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
    let figures = serde_json::from_str(line)
        .with_context(|| format!("unexpected reference output: {line}"))?;
    Ok(Some(Measured {
        figures,
        breakdown: None,
    }))
}

/// The median figures and breakdown of one side over the rounds (None when it never ran).
#[derive(Debug, Clone, Serialize)]
struct Side {
    #[serde(flatten)]
    figures: Figures,
    #[serde(skip_serializing_if = "Option::is_none")]
    breakdown: Option<Breakdown>,
}

fn side(rounds: &[Measured]) -> Option<Side> {
    if rounds.is_empty() {
        return None;
    }
    let figures: Vec<Figures> = rounds.iter().map(|m| m.figures.clone()).collect();
    let figures = median_figures(&figures);
    // The breakdown of the round whose training figure is the median.
    let breakdown = rounds
        .iter()
        .min_by(|a, b| {
            let d = |m: &Measured| {
                (m.figures.train_images_per_sec - figures.train_images_per_sec).abs()
            };
            d(a).total_cmp(&d(b))
        })
        .and_then(|m| m.breakdown);
    Some(Side { figures, breakdown })
}

/// Both precisions of one side.
#[derive(Debug, Clone, Serialize)]
struct Precisions {
    f32: Option<Side>,
    bf16: Option<Side>,
}

/// Runs both sides and prints the figures and ratios.
pub fn run(opts: BenchOptions) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let ours_bf16 = our_kernels(&opts, Precision::Bf16).bf16_supported();
    let reference_bf16 = opts.isa.is_none_or(|i| i >= Isa::Avx512Bf16);
    let mut rounds: [Vec<Measured>; 4] = Default::default();
    for round in 0..opts.rounds {
        if opts.rounds > 1 && !opts.json {
            eprintln!("round {} of {}", round + 1, opts.rounds);
        }
        rounds[0].push(bench_ours(&opts, Precision::F32)?);
        if ours_bf16 {
            rounds[1].push(bench_ours(&opts, Precision::Bf16)?);
        }
        if let Some(r) = bench_reference(&opts, threads, Precision::F32)? {
            rounds[2].push(r);
            if reference_bf16 {
                if let Some(r) = bench_reference(&opts, threads, Precision::Bf16)? {
                    rounds[3].push(r);
                }
            }
        }
    }
    let ours = Precisions {
        f32: side(&rounds[0]),
        bf16: side(&rounds[1]),
    };
    let original = Precisions {
        f32: side(&rounds[2]),
        bf16: side(&rounds[3]),
    };
    let ratio = |a: &Option<Side>, b: &Option<Side>| match (a, b) {
        (Some(a), Some(b)) => Some(serde_json::json!({
            "train": a.figures.train_images_per_sec / b.figures.train_images_per_sec,
            "forward": a.figures.forward_images_per_sec / b.figures.forward_images_per_sec,
        })),
        _ => None,
    };
    let kernels = serde_json::json!({
        "f32": our_kernels(&opts, Precision::F32).describe(),
        "bf16": ours_bf16.then(|| our_kernels(&opts, Precision::Bf16).describe()),
    });
    let isa = our_kernels(&opts, Precision::F32).isa();
    if opts.json {
        let per_round = |r: &[Measured]| r.iter().map(|m| m.figures.clone()).collect::<Vec<_>>();
        println!(
            "{}",
            serde_json::json!({
                "cpu": cpu_model(),
                "isa": isa.name(),
                "kernels": kernels,
                "batch": opts.batch,
                "threads": threads,
                "ours": ours,
                "original": original,
                "ratio": {
                    "f32": ratio(&ours.f32, &original.f32),
                    "bf16": ratio(&ours.bf16, &original.bf16),
                    "ours_bf16_over_ours_f32": ratio(&ours.bf16, &ours.f32),
                },
                "rounds": {
                    "ours": {"f32": per_round(&rounds[0]), "bf16": per_round(&rounds[1])},
                    "original": {"f32": per_round(&rounds[2]), "bf16": per_round(&rounds[3])},
                },
            })
        );
        return Ok(());
    }
    println!("CPU: {}; kernel family: {isa}", cpu_model());
    println!(
        "MNIST UNet (1.74 M parameters), batch {}, {threads} threads, median of {} rounds \
         (sides alternating) of the median of {} iterations",
        opts.batch, opts.rounds, opts.iters
    );
    println!("f32: {}", kernels["f32"].as_str().unwrap_or("-"));
    if let Some(k) = kernels["bf16"].as_str() {
        println!("bf16: {k}");
    }
    if let Some(isa) = opts.isa {
        let env: Vec<String> = torch_isa_env(isa)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("original restricted with {}", env.join(" "));
    }
    println!(
        "{:<24} {:>10} {:>10} {:>8} {:>10} {:>10} {:>8}",
        "", "ours f32", "orig f32", "ratio", "ours bf16", "orig bf16", "ratio"
    );
    let cell = |s: &Option<Side>, f: fn(&Figures) -> f64| s.as_ref().map(|s| f(&s.figures));
    let num = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    let rat = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    let row = |name: &str, f: fn(&Figures) -> f64, scale: f64| {
        let (a, b, c, d) = (
            cell(&ours.f32, f).map(|v| v * scale),
            cell(&original.f32, f).map(|v| v * scale),
            cell(&ours.bf16, f).map(|v| v * scale),
            cell(&original.bf16, f).map(|v| v * scale),
        );
        println!(
            "{name:<24} {:>10} {:>10} {:>8} {:>10} {:>10} {:>8}",
            num(a),
            num(b),
            rat(a, b),
            num(c),
            num(d),
            rat(c, d)
        );
    };
    row("train images/s", |f| f.train_images_per_sec, 1.0);
    row("forward images/s", |f| f.forward_images_per_sec, 1.0);
    row(
        "train GFLOP/s",
        |f| f.train_images_per_sec,
        TRAIN_GFLOP_PER_IMAGE,
    );
    row(
        "forward GFLOP/s",
        |f| f.forward_images_per_sec,
        FORWARD_GFLOP_PER_IMAGE,
    );
    row("peak RSS MiB", |f| f.peak_rss_mib, 1.0);
    for (name, s) in [("f32", &ours.f32), ("bf16", &ours.bf16)] {
        if let Some(b) = s.as_ref().and_then(|s| s.breakdown) {
            let pct = |v: f64| 100.0 * v / b.step;
            println!(
                "ours {name}, ms per training step: {:.1} = convolutions {:.1} ({:.0}%), norms {:.1} ({:.0}%), \
                 attention {:.1} ({:.0}%), optimiser {:.1} ({:.0}%), element-wise and other {:.1} ({:.0}%)",
                1e3 * b.step,
                1e3 * b.convolutions,
                pct(b.convolutions),
                1e3 * b.norms,
                pct(b.norms),
                1e3 * b.attention,
                pct(b.attention),
                1e3 * b.optimiser,
                pct(b.optimiser),
                1e3 * b.elementwise_and_other,
                pct(b.elementwise_and_other),
            );
        }
    }
    if original.f32.is_none() {
        println!("(set REF_PYTHON to a Python with torch and REF_SRC to an improved-diffusion checkout for the side-by-side)");
    }
    Ok(())
}
