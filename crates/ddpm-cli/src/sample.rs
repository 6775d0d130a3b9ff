//! `ddpm-cli sample`: PNG grids, npz arrays and GIFs of the denoising chain.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use ddpm_schedule::{
    BatchStart, ClassifierFreeGuidance, Denoiser, GaussianDiffusion, SamplingMethod,
};
use image::{Delay, Frame, RgbaImage};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

/// Model evaluations per sample when neither --steps nor --respacing is given (README, solver
/// table).
pub const DEFAULT_STEPS: usize = 20;

/// The sampling method of `sample` and `eval` unless --solver (or --ddim) says otherwise:
/// ancestral sampling with the learned variance. On the base preset's model UniPC scores a lower
/// Fréchet distance at 20 steps, but draws some digits as blobs on grey squares, which DDPM does
/// not (README, solver table).
pub const DEFAULT_SOLVER: &str = "ddpm";

/// The sampler that `--ddim`, `--solver` (default [`DEFAULT_SOLVER`]) and `--eta` ask for
/// together; `--ddim` alone is DDIM.
pub fn sampler_of(ddim: bool, solver: Option<&str>, eta: f64) -> Result<SamplingMethod> {
    let named = solver.map(str::parse::<SamplingMethod>).transpose()?;
    let sampler = match (ddim, named) {
        (true, None | Some(SamplingMethod::Ddim { .. }))
        | (false, Some(SamplingMethod::Ddim { .. })) => SamplingMethod::Ddim { eta },
        (true, Some(other)) => bail!("--ddim and --solver {} exclude each other", other.name()),
        (false, Some(other)) => other,
        (false, None) => DEFAULT_SOLVER.parse()?,
    };
    if eta != 0.0 && !matches!(sampler, SamplingMethod::Ddim { .. }) {
        bail!(
            "--eta {eta} is a DDIM setting; --solver {} has none",
            sampler.name()
        );
    }
    Ok(sampler)
}

/// The respacing that `--steps` and `--respacing` ask for together (at most one of them; neither
/// gives [`DEFAULT_STEPS`]).
pub fn respacing_of(steps: Option<usize>, respacing: Option<&str>) -> Result<String> {
    Ok(match (steps, respacing) {
        (Some(0), _) => bail!("--steps 0: sampling needs at least one step"),
        (Some(n), None) => n.to_string(),
        (Some(n), Some(r)) => {
            bail!("--steps {n} and --respacing {r:?} both set the steps: give one")
        }
        (None, Some(r)) => r.to_string(),
        (None, None) => DEFAULT_STEPS.to_string(),
    })
}

/// Options of `ddpm-cli sample`.
#[derive(Debug, Clone, Args)]
pub struct SampleArgs {
    /// The checkpoint and its weights.
    #[command(flatten)]
    pub weights: crate::WeightsArgs,
    /// Number of samples.
    #[arg(long, default_value_t = 64)]
    pub num: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Timestep respacing: "" (all steps), "250", "ddim50", "logsnr20", ... (default: 20
    /// evenly spaced steps, see --steps).
    #[arg(long)]
    pub respacing: Option<String>,
    /// Use DDIM instead of ancestral sampling (the same as --solver ddim).
    #[arg(long)]
    pub ddim: bool,
    /// Sampling method: ddpm (ancestral), ddim, dpm++2m (DPM-Solver++(2M)) or unipc (UniPC-2)
    /// [default: ddpm].
    #[arg(long)]
    pub solver: Option<String>,
    /// Model evaluations: respaces the schedule to N evenly spaced steps (the same as
    /// --respacing N; the default is 20).
    #[arg(long)]
    pub steps: Option<usize>,
    /// DDIM eta (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Clamp the predicted x_0 to [-1, 1] at every step.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub clip_denoised: bool,
    /// Seed: the same seed and settings give byte-identical files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Class label for every sample (class-conditional models; default: random labels).
    #[arg(long)]
    pub class: Option<u32>,
    /// Classifier-free guidance scale for a model trained with --class-dropout: 1 is plain
    /// conditional sampling, 0 the unconditional model, above 1 sharper classes and less
    /// variety [default: 2 for such models].
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// PNG grid of the samples.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// npz with the samples (`arr_0`, NHWC uint8) and labels (`arr_1`), as the original.
    #[arg(long)]
    pub npz: Option<PathBuf>,
    /// Animated GIF of the chain of the first batch.
    #[arg(long)]
    pub gif: Option<PathBuf>,
    /// What the GIF shows: the noisy sample, the predicted x_0, or both side by side.
    #[arg(long, value_enum, default_value_t = GifShow::Both)]
    pub gif_show: GifShow,
    /// Frames in the GIF (one every total/frames steps, plus the last).
    #[arg(long, default_value_t = 40)]
    pub gif_frames: usize,
    /// Where and how to compute.
    #[command(flatten)]
    pub compute: crate::ComputeArgs,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// The guidance scale of a model trained for classifier-free guidance when `--guidance-scale`
/// is not given.
pub const DEFAULT_GUIDANCE_SCALE: f64 = ddpm_schedule::DEFAULT_GUIDANCE_SCALE;

/// What the sampling GIF shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GifShow {
    /// The noisy sample x_t.
    Xt,
    /// The model's prediction of x_0.
    X0,
    /// Both, side by side.
    Both,
}

/// What `sample` produced.
pub struct Samples {
    /// The images, [N, C, H, W] in [-1, 1].
    pub images: Tensor,
    /// Their labels (0 for unconditional models).
    pub labels: Vec<i64>,
    /// The sampler that drew them.
    pub sampler: SamplingMethod,
    /// The classifier-free guidance scale used (None: no guidance).
    pub guidance_scale: Option<f64>,
}

/// Runs `sample` and writes the requested files.
pub fn run(args: &SampleArgs) -> Result<Samples> {
    if args.out.is_none() && args.npz.is_none() && args.gif.is_none() {
        bail!("nothing to write: give --out grid.png, --npz FILE and/or --gif FILE");
    }
    generate(args)
}

/// Samples as `args` say and writes whichever files it names.
pub fn generate(args: &SampleArgs) -> Result<Samples> {
    if args.num == 0 || args.batch_size == 0 {
        bail!("--num and --batch-size must be positive");
    }
    // DDIM's eta runs from 0 (deterministic) to 1 (the DDPM posterior's noise); above 1 the
    // step's noise outgrows what the schedule leaves and the mean takes the root of a negative.
    if !(0.0..=1.0).contains(&args.eta) {
        bail!("--eta {} must be between 0 and 1", args.eta);
    }
    if args.gif.is_some() && args.gif_frames == 0 {
        bail!("--gif-frames must be positive");
    }
    // Outputs are checked before the sampling, which can take hours, not after it.
    for (flag, path, ext) in [
        ("--out", &args.out, "png"),
        ("--npz", &args.npz, "npz"),
        ("--gif", &args.gif, "gif"),
    ] {
        if let Some(p) = path {
            check_writable(flag, p)?;
            // The format is fixed by the flag: a name that says otherwise would mislead.
            let given = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !given.eq_ignore_ascii_case(ext) {
                bail!(
                    "{flag} {} writes a .{ext} file; give a name ending in .{ext}",
                    p.display()
                );
            }
        }
    }
    let (device, kernels) = args.compute.open()?;
    let loaded = args.weights.load(kernels, &device)?;
    let meta = &loaded.meta;
    let classes = meta.model.num_classes;
    match (args.class, classes) {
        (Some(_), None) => bail!(
            "--class given but the model in {} is unconditional",
            args.weights.checkpoint.display()
        ),
        (Some(c), Some(k)) if c as usize >= k => bail!("--class {c} is outside 0..{k}"),
        _ => {}
    }
    let null_label = loaded.model.null_label();
    let guidance = match (args.guidance_scale, null_label) {
        (Some(s), _) if !s.is_finite() || s < 0.0 => {
            bail!("--guidance-scale {s} must be a finite number, 0 or more")
        }
        (Some(_), None) => bail!(
            "--guidance-scale needs a model trained with --class-dropout (classifier-free \
             guidance); the model in {} has no null class",
            args.weights.checkpoint.display()
        ),
        (s, Some(null)) => Some((null, s.unwrap_or(DEFAULT_GUIDANCE_SCALE))),
        (None, None) => None,
    };
    let respacing = respacing_of(args.steps, args.respacing.as_deref())?;
    let cfg = meta
        .diffusion
        .to_config(Some(&respacing))
        .context("--respacing")?;
    let diffusion =
        GaussianDiffusion::new(&cfg).with_context(|| format!("--respacing {respacing:?}"))?;
    let sampler = sampler_of(args.ddim, args.solver.as_deref(), args.eta)?;
    let [h, w] = meta.image_size;
    let c = meta.model.in_channels;
    let total_steps = diffusion.num_timesteps();
    let batches = args.num.div_ceil(args.batch_size);
    let bar = if args.no_progress {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new((batches * total_steps) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps, ETA {eta}",
            )
            .expect("valid template"),
        );
        b
    };
    tracing::info!(
        "sampling {} images with {} weights, {} steps ({:?})",
        args.num,
        loaded.weights,
        total_steps,
        sampler
    );
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut images = Vec::new();
    let mut labels = Vec::new();
    let every = (total_steps / args.gif_frames.max(1)).max(1);
    let mut frames: Vec<(Tensor, Tensor)> = Vec::new();
    for bi in 0..batches {
        let n = args.batch_size.min(args.num - bi * args.batch_size);
        let start = BatchStart::draw(&mut rng, n, (c, h, w), classes, args.class, &device)?;
        let y_t = start.label_tensor(&device)?;
        let (y, x_t, mut noise) = (start.labels, start.x_t, start.noise);
        let record = bi == 0 && args.gif.is_some();
        let guided = guidance.map(|(null_label, scale)| ClassifierFreeGuidance {
            model: &loaded.model,
            null_label,
            scale,
            eps_channels: c,
        });
        let model: &dyn Denoiser = match &guided {
            Some(g) => g,
            None => &loaded.model,
        };
        let out = ddpm_train::generate::sample_checked(
            &model,
            &diffusion,
            x_t,
            sampler,
            y_t.as_ref(),
            args.clip_denoised,
            &mut noise,
            |s| {
                bar.inc(1);
                if record && (s.step % every == 0 || s.step == s.total || s.step == 1) {
                    frames.push((s.sample.clone(), s.pred_xstart.clone()));
                }
            },
        )?;
        images.push(out);
        labels.extend(y.unwrap_or_else(|| vec![0; n]).into_iter().map(i64::from));
    }
    bar.finish_and_clear();
    let images = Tensor::cat(&images, 0)?;
    if let Some(path) = &args.out {
        ddpm_train::grid::save_grid_png(&images, path)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.npz {
        let (bytes, [n, hh, ww, cc]) = ddpm_train::grid::to_u8_nhwc(&images)?;
        let arr0 = Tensor::from_vec(bytes, (n, hh, ww, cc), &Device::Cpu)?;
        let arr1 = Tensor::from_vec(labels.clone(), n, &Device::Cpu)?;
        let tmp = path.with_extension("npz.tmp");
        Tensor::write_npz(&[("arr_0", &arr0), ("arr_1", &arr1)], &tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.gif {
        write_gif(&frames, args.gif_show, path)?;
        println!("wrote {} ({} frames)", path.display(), frames.len());
    }
    Ok(Samples {
        images,
        labels,
        sampler,
        guidance_scale: guidance.map(|(_, s)| s),
    })
}

/// Checks that `path` can be written: its folder exists and takes a new file, and it is not a
/// folder itself.
pub fn check_writable(flag: &str, path: &std::path::Path) -> Result<()> {
    if path.is_dir() {
        bail!("{flag} {} is a folder; give a file name", path.display());
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "{flag} {}: the folder {} does not exist",
            path.display(),
            parent.display()
        );
    }
    let probe = parent.join(format!(".ddpm-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| {
        format!(
            "{flag} {}: cannot write in {}",
            path.display(),
            parent.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Writes the recorded (x_t, predicted x_0) pairs as an animated GIF of grids.
fn write_gif(frames: &[(Tensor, Tensor)], show: GifShow, path: &std::path::Path) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut enc = image::codecs::gif::GifEncoder::new(std::io::BufWriter::new(file));
    enc.set_repeat(image::codecs::gif::Repeat::Infinite)?;
    for (i, (xt, x0)) in frames.iter().enumerate() {
        let grid = |t: &Tensor| ddpm_train::grid::make_grid(&t.clamp(-1f32, 1f32)?);
        let img = match show {
            GifShow::Xt => grid(xt)?,
            GifShow::X0 => grid(x0)?,
            GifShow::Both => {
                let (a, b) = (grid(xt)?.to_rgba8(), grid(x0)?.to_rgba8());
                let mut both = RgbaImage::from_pixel(
                    a.width() + b.width() + 4,
                    a.height(),
                    image::Rgba([255; 4]),
                );
                image::imageops::replace(&mut both, &a, 0, 0);
                image::imageops::replace(&mut both, &b, (a.width() + 4) as i64, 0);
                image::DynamicImage::ImageRgba8(both)
            }
        };
        let rgba: RgbaImage = img.to_rgba8();
        // Hold the last frame for two seconds.
        let ms = if i + 1 == frames.len() { 2000 } else { 80 };
        enc.encode_frame(Frame::from_parts(
            rgba,
            0,
            0,
            Delay::from_numer_denom_ms(ms, 1),
        ))?;
    }
    Ok(())
}
