//! A diffusion model of your own with ddpm-schedule: a small candle-nn MLP learns a ring of eight
//! Gaussians in 2-D, samples are drawn with DDPM, and a PNG shows them over the data.
//!
//! ```text
//! cargo run --release -p ddpm-schedule --example toy2d -- [--steps N] [--out toy2d.png]
//! ```
//!
//! The example checks its own result: it fails unless every mode holds between 6% and 20% of the
//! samples and 90% of them lie within four standard deviations of a mode.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use ddpm_schedule::{
    randn, DiffusionConfig, GaussianDiffusion, ModelVarType, RngNoise, SamplingMethod,
};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::f64::consts::TAU;

/// Modes of the data, evenly spaced on the unit circle.
const MODES: usize = 8;
/// Standard deviation of each mode.
const MODE_STD: f64 = 0.05;
/// Sinusoidal features of the timestep given to the network.
const FREQS: usize = 8;

/// An epsilon network: timestep features concatenated to x, three hidden SiLU layers.
struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let dims = [2 + 2 * FREQS, 128, 128, 128, 2];
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, d)| linear(d[0], d[1], vb.pp(i)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { layers })
    }

    /// eps for x `[B, 2]` at model timesteps `t` `[B]` (in [0, 1000)).
    fn forward(&self, x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        let freqs: Vec<f32> = (0..FREQS)
            .map(|k| (1u32 << k) as f32 * std::f32::consts::PI / 1000.0)
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, FREQS), x.device())?;
        let angles = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
        let mut h = Tensor::cat(&[x, &angles.sin()?, &angles.cos()?], 1)?;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = h.silu()?;
            }
        }
        Ok(h)
    }
}

/// Redraws every parameter from `rng`, in name order, as PyTorch's `Linear` initialises them
/// (uniform in ±1/sqrt(fan_in)): candle-nn draws initial weights from an unseeded generator.
fn seed_weights(vars: &VarMap, rng: &mut ChaCha8Rng) -> candle_core::Result<()> {
    let data = vars
        .data()
        .lock()
        .expect("no other thread holds the VarMap");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let layer = name.rsplit_once('.').map_or("", |(layer, _)| layer);
        let fan_in = data[&format!("{layer}.weight")].dims()[1];
        let bound = 1.0 / (fan_in as f64).sqrt();
        let v: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        var.set(&Tensor::from_vec(v, var.shape(), var.device())?)?;
    }
    Ok(())
}

/// `n` points of the ring of Gaussians, as x, y pairs.
fn ring(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    let mut xy = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let a = TAU * rng.random_range(0..MODES) as f64 / MODES as f64;
        let (dx, dy): (f64, f64) = (
            rng.sample(rand_distr::StandardNormal),
            rng.sample(rand_distr::StandardNormal),
        );
        xy.push((a.cos() + MODE_STD * dx) as f32);
        xy.push((a.sin() + MODE_STD * dy) as f32);
    }
    xy
}

/// Draws data (grey) and samples (red) over [-1.5, 1.5]².
fn scatter(data: &[f32], samples: &[f32], path: &str) -> image::ImageResult<()> {
    const SIZE: u32 = 400;
    let mut img = RgbImage::from_pixel(SIZE, SIZE, Rgb([255, 255, 255]));
    let mut dot = |x: f32, y: f32, colour: Rgb<u8>| {
        let px = ((x + 1.5) / 3.0 * SIZE as f32) as i64;
        let py = ((1.5 - y) / 3.0 * SIZE as f32) as i64;
        for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            let (u, v) = (px + ox, py + oy);
            if (0..SIZE as i64).contains(&u) && (0..SIZE as i64).contains(&v) {
                img.put_pixel(u as u32, v as u32, colour);
            }
        }
    };
    for p in data.chunks(2) {
        dot(p[0], p[1], Rgb([170, 170, 170]));
    }
    for p in samples.chunks(2) {
        dot(p[0], p[1], Rgb([200, 30, 30]));
    }
    img.save(path)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut steps = 6000usize;
    let mut out = "toy2d.png".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--steps" => steps = value()?.parse()?,
            "--out" => out = value()?,
            other => return Err(format!("unknown option {other} (--steps N, --out PATH)").into()),
        }
    }

    // Ho et al.'s plain epsilon network with the MSE loss, on a shorter chain.
    let diffusion = GaussianDiffusion::new(&DiffusionConfig {
        num_timesteps: 200,
        model_var_type: ModelVarType::FixedSmall,
        ..DiffusionConfig::ddpm()
    })?;
    let device = Device::Cpu;
    let (batch, peak_lr) = (512, 2e-3);
    let vars = VarMap::new();
    let mlp = Mlp::new(VarBuilder::from_varmap(&vars, DType::F32, &device))?;
    let mut opt = AdamW::new(
        vars.all_vars(),
        ParamsAdamW {
            lr: peak_lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;

    // Weights, timesteps and noise come from one seeded generator: the same run twice is the
    // same run.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    seed_weights(&vars, &mut rng)?;
    for step in 1..=steps {
        // Linear decay to zero: the last steps at a small rate sharpen the modes.
        opt.set_learning_rate(peak_lr * (1.0 - (step - 1) as f64 / steps as f64));
        let xy = ring(&mut rng, batch);
        let x_start = Tensor::from_vec(xy, (batch, 2), &device)?;
        let t: Vec<usize> = (0..batch)
            .map(|_| rng.random_range(0..diffusion.num_timesteps()))
            .collect();
        let noise = randn(&mut rng, (batch, 2), DType::F32, &device)?;
        let terms = diffusion.training_losses(|x, ts| mlp.forward(x, ts), &x_start, &t, &noise)?;
        let loss = terms.loss.mean_all()?;
        opt.backward_step(&loss)?;
        if step % 500 == 0 || step == steps {
            println!("step {step:5}  loss {:.4}", loss.to_scalar::<f32>()?);
        }
    }

    let n = 2000;
    let x_end = randn(&mut rng, (n, 2), DType::F32, &device)?;
    let samples = diffusion.sample_loop(
        |x, ts| mlp.forward(x, ts),
        x_end,
        SamplingMethod::Ddpm,
        false,
        &mut RngNoise(rng.clone()),
        |_| {},
    )?;
    let samples: Vec<f32> = samples.flatten_all()?.to_vec1()?;

    // Each sample's nearest mode, and how far it is from it in units of the mode's std.
    let mut counts = [0usize; MODES];
    let mut near = 0;
    for p in samples.chunks(2) {
        let (m, d) = (0..MODES)
            .map(|m| {
                let a = TAU * m as f64 / MODES as f64;
                let d = (p[0] as f64 - a.cos()).hypot(p[1] as f64 - a.sin());
                (m, d)
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("MODES > 0");
        counts[m] += 1;
        near += usize::from(d < 4.0 * MODE_STD);
    }
    let data = ring(&mut rng, n);
    scatter(&data, &samples, &out)?;
    let near_frac = near as f64 / n as f64;
    println!("samples per mode {counts:?}; within 4 std of a mode: {near_frac:.3}; wrote {out}");
    let share = |c: usize| c as f64 / n as f64;
    if near_frac < 0.9 || counts.iter().any(|&c| !(0.06..=0.2).contains(&share(c))) {
        return Err("the samples do not match the ring of Gaussians".into());
    }
    Ok(())
}
