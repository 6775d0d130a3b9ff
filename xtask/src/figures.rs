//! `cargo xtask figures`: the explainer's pictures, drawn from a trained model.
//!
//! Everything is seeded and computed on the CPU's default kernels, so the same checkpoint, data
//! and seed give byte-identical files.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use ddpm_kernels::KernelOptions;
use ddpm_schedule::{randn, Denoiser, GaussianDiffusion, RngNoise, SamplingMethod};
use ddpm_train::grid::{make_grid_cols, save_png_atomically};
use ddpm_train::{ImageDataset, Split};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

/// Options of `cargo xtask figures`.
#[derive(Debug, Clone, clap::Args)]
pub struct FigureArgs {
    /// The checkpoint folder of a model trained by the project.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The MNIST-style data the model was trained on (its test split supplies the digits).
    #[arg(long, default_value = "data/mnist")]
    pub data: PathBuf,
    /// Where the pictures go.
    #[arg(long, default_value = "docs/figures")]
    pub out: PathBuf,
    /// Seed of every noise drawn.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Respacing of the variational bound's timesteps ("" for all of them).
    #[arg(long, default_value = "")]
    pub bound_respacing: String,
}

/// What the figures measured, written beside them as `figures.json`.
#[derive(Debug, serde::Serialize)]
pub struct Measured {
    /// Mean squared error of the DDIM round trip (digit -> noise -> digit), per pixel in [-1, 1].
    pub ddim_reconstruction_mse: f64,
    /// Model evaluations of each column of `steps.png`.
    pub steps: Vec<usize>,
    /// The bound on the test digits of `bound.png`, bits/dim.
    pub bits_per_dim: f64,
    /// Its prior term L_T and reconstruction term L_0, bits/dim.
    pub prior_bpd: f64,
    /// The reconstruction term L_0, bits/dim.
    pub reconstruction_bpd: f64,
}

/// The model and what it is conditioned on.
struct Model {
    net: ddpm_unet::UNet,
    meta: ddpm_train::CheckpointMeta,
}

impl Model {
    /// Labels for `n` images: `labels` for a conditional model, none otherwise.
    fn labels(&self, labels: &[u32]) -> Result<Option<Tensor>> {
        Ok(match self.meta.model.num_classes {
            Some(_) => Some(Tensor::new(labels, &Device::Cpu)?),
            None => None,
        })
    }

    fn diffusion(&self, respacing: &str) -> Result<GaussianDiffusion> {
        Ok(GaussianDiffusion::new(
            &self.meta.diffusion.to_config(Some(respacing))?,
        )?)
    }
}

/// Writes every figure into `args.out` and returns their paths.
pub fn run(args: &FigureArgs) -> Result<Vec<PathBuf>> {
    let device = Device::Cpu;
    let weights = ddpm_cli::WeightsArgs {
        checkpoint: args.checkpoint.clone(),
        ema: None,
    };
    let loaded = weights.load(KernelOptions::default(), &device)?;
    let model = Model {
        net: loaded.model,
        meta: loaded.meta,
    };
    let test = ImageDataset::load(&args.data, Split::Test)
        .with_context(|| format!("the test digits in {}", args.data.display()))?;
    anyhow::ensure!(test.len >= 16, "the figures need 16 test images");
    std::fs::create_dir_all(&args.out)?;
    let idx: Vec<usize> = (0..8).collect();
    let (x0, y0) = test.batch(&idx, &device)?;
    let y0: Vec<u32> = y0.to_vec1()?;
    let mut written = Vec::new();
    let mut save = |name: &str, x: &Tensor, cols: usize| -> Result<()> {
        let path = args.out.join(name);
        save_png_atomically(&make_grid_cols(x, cols)?, &path)?;
        written.push(path);
        Ok(())
    };

    // The forward process: q_sample at nine times from 0 to T - 1, one digit a row.
    let full = model.diffusion("")?;
    let t_max = full.num_timesteps() - 1;
    let times: Vec<usize> = (0..=8).map(|k| k * t_max / 8).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let noise = randn(&mut rng, x0.shape().clone(), DType::F32, &device)?;
    let mut cells = Vec::new();
    for i in 0..8 {
        let (xi, ni) = (x0.narrow(0, i, 1)?, noise.narrow(0, i, 1)?);
        for &t in &times {
            cells.push(full.q_sample(&xi, &[t], &ni)?);
        }
    }
    save("forward.png", &Tensor::cat(&cells, 0)?, times.len())?;

    // The reverse process: 50 ancestral steps; each row pair is x_t and the predicted x_0 at
    // ten points of the chain.
    let fifty = model.diffusion("50")?;
    let labels4 = model.labels(&[0, 3, 5, 8])?;
    let x_t = randn(&mut rng, (4, 1, 28, 28), DType::F32, &device)?;
    let mut frames: Vec<(Tensor, Tensor)> = Vec::new();
    fifty.sample_loop(
        model.net.sampling_fn(labels4.as_ref()),
        x_t,
        SamplingMethod::Ddpm,
        true,
        &mut RngNoise(ChaCha8Rng::seed_from_u64(args.seed + 1)),
        |s| {
            if s.step % 5 == 0 {
                frames.push((s.sample.clone(), s.pred_xstart.clone()));
            }
        },
    )?;
    let mut cells = Vec::new();
    for i in 0..4 {
        for part in 0..2 {
            for (xt, px0) in &frames {
                let x = if part == 0 { xt } else { px0 };
                cells.push(x.narrow(0, i, 1)?.clamp(-1f32, 1f32)?);
            }
        }
    }
    save("reverse.png", &Tensor::cat(&cells, 0)?, frames.len())?;

    // DDIM as a deterministic map: digits inverted to noise and decoded back.
    let ddim = model.diffusion("ddim50")?;
    let labels8 = model.labels(&y0)?;
    let mut z = x0.clone();
    for i in 0..ddim.num_timesteps() {
        let t = vec![i; 8];
        let ts = ddim.model_timestep_tensor(&t, DType::F32, &device)?;
        let out = model.net.denoise(&z, &ts, labels8.as_ref(), false)?;
        z = ddim.ddim_reverse_sample(&out, &z, &t, true)?.sample;
    }
    let decode = |z: &Tensor, labels: Option<&Tensor>| -> Result<Tensor> {
        Ok(ddim.sample_loop(
            model.net.sampling_fn(labels),
            z.clone(),
            SamplingMethod::Ddim { eta: 0.0 },
            true,
            &mut RngNoise(ChaCha8Rng::seed_from_u64(0)),
            |_| {},
        )?)
    };
    let back = decode(&z, labels8.as_ref())?;
    let mse = (&back - &x0)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    let shown_z = (&z / 3.0)?.clamp(-1f32, 1f32)?;
    save(
        "ddim-inversion.png",
        &Tensor::cat(&[&x0, &shown_z, &back], 0)?,
        8,
    )?;

    // Interpolation: two noises, spherically interpolated, decoded by DDIM.
    let ends = randn(&mut rng, (2, 1, 28, 28), DType::F32, &device)?;
    let (a, b) = (ends.narrow(0, 0, 1)?, ends.narrow(0, 1, 1)?);
    let dot = (&a * &b)?.sum_all()?.to_scalar::<f32>()? as f64;
    let norm =
        |v: &Tensor| -> Result<f64> { Ok((v.sqr()?.sum_all()?.to_scalar::<f32>()? as f64).sqrt()) };
    let theta = (dot / (norm(&a)? * norm(&b)?)).clamp(-1.0, 1.0).acos();
    let mut path = Vec::new();
    for k in 0..10 {
        let s = k as f64 / 9.0;
        let (wa, wb) = (
            ((1.0 - s) * theta).sin() / theta.sin(),
            (s * theta).sin() / theta.sin(),
        );
        path.push(((&a * wa)? + (&b * wb)?)?);
    }
    let labels10 = model.labels(&[y0[0]; 10])?;
    let row = decode(&Tensor::cat(&path, 0)?, labels10.as_ref())?;
    save("ddim-slerp.png", &row, 10)?;

    // Fewer steps, rougher digits: the same noise after 1, 2, 5, 10, 20, 50 DDIM steps (on
    // the log-SNR grid, which starts at the noisiest step).
    let steps = vec![1usize, 2, 5, 10, 20, 50];
    let x_t = randn(&mut rng, (8, 1, 28, 28), DType::F32, &device)?;
    let labels8b = model.labels(&(0..8).collect::<Vec<u32>>())?;
    let mut columns = Vec::new();
    for &n in &steps {
        let d = model.diffusion(&format!("logsnr{n}"))?;
        columns.push(d.sample_loop(
            model.net.sampling_fn(labels8b.as_ref()),
            x_t.clone(),
            SamplingMethod::Ddim { eta: 0.0 },
            true,
            &mut RngNoise(ChaCha8Rng::seed_from_u64(0)),
            |_| {},
        )?);
    }
    let mut cells = Vec::new();
    for i in 0..8 {
        for c in &columns {
            cells.push(c.narrow(0, i, 1)?);
        }
    }
    save("steps.png", &Tensor::cat(&cells, 0)?, steps.len())?;

    // The variational bound term by term on 16 test digits.
    let bound = model.diffusion(&args.bound_respacing)?;
    let idx16: Vec<usize> = (0..16).collect();
    let (x16, y16) = test.batch(&idx16, &device)?;
    let y16 = model.meta.model.num_classes.map(|_| y16);
    let terms = bound.calc_bpd_loop(
        model.net.sampling_fn(y16.as_ref()),
        &x16,
        true,
        &mut RngNoise(ChaCha8Rng::seed_from_u64(args.seed + 2)),
        |_, _| {},
    )?;
    let vb: Vec<f64> = terms.vb.to_dtype(DType::F64)?.mean(0)?.to_vec1()?;
    let prior = terms
        .prior_bpd
        .to_dtype(DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?;
    let total = terms
        .total_bpd
        .to_dtype(DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?;
    let model_t = bound.model_timesteps(&(0..vb.len()).collect::<Vec<_>>());
    let line: Vec<(f64, f64)> = model_t.iter().copied().zip(vb.iter().copied()).collect();
    let t_end = model_t.last().copied().unwrap_or(0.0);
    let span = (t_end / 25.0).max(1.0);
    let bound_path = args.out.join("bound.png");
    ddpm_train::plot::line_plot(
        &format!("the bound term by term: {total:.3} bits/dim on 16 test digits"),
        "timestep t",
        &[
            ("L_t (bits/dim), t = 1 .. T-1".to_string(), line),
            (
                format!("L_0, reconstruction: {:.3}", vb[0]),
                vec![(0.0, vb[0]), (span, vb[0])],
            ),
            (
                format!("L_T, prior: {prior:.2e}"),
                vec![(t_end - span, prior.max(1e-12)), (t_end, prior.max(1e-12))],
            ),
        ],
        true,
        &bound_path,
    )?;
    written.push(bound_path);

    let measured = Measured {
        ddim_reconstruction_mse: mse,
        steps,
        bits_per_dim: total,
        prior_bpd: prior,
        reconstruction_bpd: vb[0],
    };
    let json = args.out.join("figures.json");
    std::fs::write(&json, serde_json::to_string_pretty(&measured)? + "\n")?;
    written.push(json);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Whether two folders hold the same files with the same bytes.
    fn same_files(a: &Path, b: &Path) -> Result<bool> {
        let list = |d: &Path| -> Result<Vec<PathBuf>> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(d)?
                .map(|e| Ok(e?.file_name().into()))
                .collect::<Result<_>>()?;
            v.sort();
            Ok(v)
        };
        let (la, lb) = (list(a)?, list(b)?);
        if la != lb {
            return Ok(false);
        }
        for f in la {
            if std::fs::read(a.join(&f))? != std::fs::read(b.join(&f))? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// 16 synthetic 28x28 test digits in IDX files (the golden model draws from them).
    fn write_test_digits(dir: &Path) {
        let n = 16u32;
        let mut img = vec![0u8, 0, 8, 3];
        for d in [n, 28, 28] {
            img.extend_from_slice(&d.to_be_bytes());
        }
        img.extend((0..n as usize * 784).map(|i| if (i / 28 + i / 5) % 9 < 3 { 255 } else { 0 }));
        std::fs::write(dir.join("t10k-images-idx3-ubyte"), img).unwrap();
        let mut lab = vec![0u8, 0, 8, 1];
        lab.extend_from_slice(&n.to_be_bytes());
        lab.extend((0..n).map(|i| (i % 10) as u8));
        std::fs::write(dir.join("t10k-labels-idx1-ubyte"), lab).unwrap();
    }

    #[test]
    fn figures_are_drawn_and_byte_identical_for_the_same_seed() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        write_test_digits(&data);
        let args = |out: &str, seed| FigureArgs {
            checkpoint: crate::golden::golden_dir().join("model"),
            data: data.clone(),
            out: root.path().join(out),
            seed,
            bound_respacing: "10".into(),
        };
        let written = run(&args("a", 0)).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "forward.png",
            "reverse.png",
            "ddim-inversion.png",
            "ddim-slerp.png",
            "steps.png",
            "bound.png",
            "figures.json",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        // Nine times of the forward process for eight digits: 9 columns, 8 rows of 28 + 1.
        let fwd = image::open(root.path().join("a/forward.png")).unwrap();
        assert_eq!((fwd.width(), fwd.height()), (9 * 29 + 1, 8 * 29 + 1));
        run(&args("b", 0)).unwrap();
        assert!(same_files(&root.path().join("a"), &root.path().join("b")).unwrap());
        run(&args("c", 1)).unwrap();
        assert!(!same_files(&root.path().join("a"), &root.path().join("c")).unwrap());
        let m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.path().join("a/figures.json")).unwrap(),
        )
        .unwrap();
        assert!(m["bits_per_dim"].as_f64().unwrap() > 0.0);
        assert!(m["ddim_reconstruction_mse"].as_f64().unwrap() >= 0.0);
    }
}
