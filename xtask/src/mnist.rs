//! `cargo xtask download-mnist` and `cargo xtask train-mnist`.

use anyhow::Result;
use clap::Args;
pub use ddpm_cli::presets::Preset;
use ddpm_train::download::{download_mnist, mirrors_after};
use std::path::PathBuf;

/// Options of `download-mnist`.
#[derive(Debug, Clone, Args)]
pub struct DownloadArgs {
    /// Where to put the four decompressed IDX files.
    #[arg(long, default_value = "data/mnist")]
    pub dir: PathBuf,
    /// A mirror to try first: a URL or a local folder with the .gz files (env MNIST_MIRROR).
    #[arg(long, env = "MNIST_MIRROR")]
    pub mirror: Option<String>,
}

/// Fetches what is missing and says what it did.
pub fn download(args: &DownloadArgs) -> Result<()> {
    let fetched = download_mnist(&args.dir, &mirrors_after(args.mirror.as_deref()))?;
    if fetched.is_empty() {
        println!(
            "MNIST already present and verified in {}",
            args.dir.display()
        );
    } else {
        println!(
            "fetched {} into {} (SHA-256 verified)",
            fetched.join(", "),
            args.dir.display()
        );
    }
    Ok(())
}

/// Options of `train-mnist`.
#[derive(Debug, Clone, Args)]
pub struct TrainMnistArgs {
    /// The training recipe.
    #[arg(long, value_enum, default_value = "base")]
    pub preset: Preset,
    /// Override the preset's number of steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Run folder (default runs/mnist-PRESET).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Train a class-conditional model, guided: labels dropped to a null class one time in
    /// ten, for classifier-free guidance at sampling (`ddpm-cli sample --guidance-scale`).
    #[arg(long)]
    pub class_cond: bool,
    /// Resume from this checkpoint folder, or `latest` (the newest in the run folder).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start afresh in a run folder that holds an earlier run, deleting it.
    #[arg(long)]
    pub overwrite: bool,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where and how to compute, as `ddpm-cli train --device/--precision`.
    #[command(flatten)]
    pub compute: ddpm_cli::ComputeArgs,
    #[command(flatten)]
    pub download: DownloadArgs,
}

/// Writes a split of the IDX or CIFAR-10 data in `data` as PNGs under `out` (in data order,
/// named by index; in class sub-folders with `class_folders`); returns how many.
pub fn export_png(
    data: &std::path::Path,
    split: ddpm_train::Split,
    out: &std::path::Path,
    class_folders: bool,
) -> Result<usize> {
    use ddpm_train::{DataFormat, Dataset};
    let (set, format) = ddpm_train::load_data(data, split, &Default::default())?;
    anyhow::ensure!(
        format != DataFormat::ImageFolder,
        "{} is already an image folder",
        data.display()
    );
    std::fs::create_dir_all(out)?;
    anyhow::ensure!(
        std::fs::read_dir(out)?.next().is_none(),
        "{} is not empty: export into a new folder",
        out.display()
    );
    let device = candle_core::Device::Cpu;
    let names = set.class_names.clone();
    let [c, h, w] = set.image_shape();
    for i in 0..set.len {
        let (x, _) = set.batch(&[i], &device)?;
        let (bytes, _) = ddpm_train::grid::to_u8_nhwc(&x)?;
        let (h, w) = (h as u32, w as u32);
        let img = match c {
            3 => image::RgbImage::from_raw(w, h, bytes).map(image::DynamicImage::ImageRgb8),
            _ => image::GrayImage::from_raw(w, h, bytes).map(image::DynamicImage::ImageLuma8),
        }
        .ok_or_else(|| anyhow::anyhow!("image {i} does not hold {c}x{h}x{w} bytes"))?;
        let dir = if class_folders {
            let label = set.label(i) as usize;
            // Unnamed classes zero-padded, so that sorting the folder names keeps the labels.
            let unnamed = format!("{label:03}");
            out.join(
                names
                    .as_ref()
                    .and_then(|n| n.get(label).cloned())
                    .unwrap_or(unnamed),
            )
        } else {
            out.to_path_buf()
        };
        std::fs::create_dir_all(&dir)?;
        img.save(dir.join(format!("{i:05}.png")))?;
    }
    Ok(set.len)
}

/// Draws `per_class` 32x32 images of each of four shapes into `out/<shape>/NNNNN.png`.
pub fn make_shapes(out: &std::path::Path, per_class: usize, seed: u64) -> Result<usize> {
    use rand::{Rng, SeedableRng};
    std::fs::create_dir_all(out)?;
    anyhow::ensure!(
        std::fs::read_dir(out)?.next().is_none(),
        "{} is not empty: draw into a new folder",
        out.display()
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    const SHAPES: [&str; 4] = ["discs", "rings", "squares", "triangles"];
    for shape in SHAPES {
        std::fs::create_dir_all(out.join(shape))?;
    }
    for i in 0..per_class {
        for (k, shape) in SHAPES.iter().enumerate() {
            let colour: [f32; 3] = [rng.random(), rng.random(), rng.random()];
            // A bright, saturated colour: the largest channel scaled to 1.
            let peak = colour.iter().cloned().fold(0.1f32, f32::max);
            let colour = colour.map(|c| (c / peak * 230.0 + 25.0).min(255.0));
            let background = rng.random_range(0.0f32..40.0);
            let (cx, cy) = (
                rng.random_range(10.0f32..22.0),
                rng.random_range(10.0f32..22.0),
            );
            let r = rng.random_range(5.0f32..9.0);
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                let d = (dx * dx + dy * dy).sqrt();
                let inside = match k {
                    0 => d < r,
                    1 => d < r && d > 0.55 * r,
                    2 => dx.abs() < 0.85 * r && dy.abs() < 0.85 * r,
                    _ => dy < 0.7 * r && dy > -r + 2.0 * dx.abs(),
                };
                let px = |c: f32| if inside { c } else { background } as u8;
                image::Rgb(colour.map(px))
            });
            img.save(out.join(shape).join(format!("{i:05}.png")))?;
        }
    }
    Ok(4 * per_class)
}

/// The label dropout of `train-mnist --class-cond` (classifier-free guidance).
pub const CLASS_DROPOUT: f64 = 0.1;

/// Downloads MNIST if needed, then trains the preset.
pub fn train(args: &TrainMnistArgs) -> Result<()> {
    if args.preset.channels() != 1 {
        anyhow::bail!(
            "--preset {:?} is for 32x32 colour images, not MNIST: run `ddpm-cli train --preset \
             {} --data FOLDER`",
            args.preset,
            clap::ValueEnum::to_possible_value(&args.preset)
                .map_or(String::new(), |v| v.get_name().to_string())
        );
    }
    download(&args.download)?;
    let name = format!("{:?}", args.preset).to_lowercase();
    let mut t = args.preset.train_args()?;
    t.data = args.download.dir.clone();
    t.out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/mnist-{name}")));
    // On resume the checkpoint's settings stand; the flags given here are compared with them.
    if let Some(s) = args.steps {
        t.steps = s;
        t.explicit.push("steps".into());
    }
    if args.class_cond {
        t.explicit.push("class_cond".into());
        // A guided model by default: one in ten labels dropped to the null class (a resumed
        // run keeps its checkpoint's).
        if args.resume.is_none() {
            t.class_dropout = CLASS_DROPOUT;
            t.explicit.push("class_dropout".into());
        }
    }
    if args.seed != 0 {
        t.explicit.push("seed".into());
    }
    t.class_cond = args.class_cond;
    t.resume_checkpoint = args.resume.clone();
    t.overwrite = args.overwrite;
    t.seed = args.seed;
    t.compute = args.compute.clone();
    let stop = ddpm_cli::ctrlc_stop_flag()?;
    let outcome = ddpm_cli::train::run(&t, Some(stop))?;
    println!("{outcome:?}");
    Ok(())
}

/// The recipe of the committed classifier: seed 0, batch 128, AdamW with cosine decay.
pub fn train_classifier(data: &std::path::Path, epochs: usize) -> Result<()> {
    use ddpm_train::eval::Classifier;
    use ddpm_train::{ImageDataset, Split};
    let device = candle_core::Device::Cpu;
    let (train, test) = (
        ImageDataset::load(data, Split::Train)?,
        ImageDataset::load(data, Split::Test)?,
    );
    let c = Classifier::new(0, &device)?;
    let accs = c.train(&train, &test, epochs, 128, 0)?;
    let acc = *accs.last().unwrap_or(&0.0);
    anyhow::ensure!(
        acc >= 0.99,
        "test accuracy {acc:.4} is below 0.99; weights not written"
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/ddpm-train/assets/mnist_classifier.safetensors");
    c.params().save_safetensors(&path)?;
    println!("test accuracy {acc:.4}; wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_a_valid_recipe_and_base_uses_the_new_one() {
        for preset in Preset::ALL {
            let t = preset
                .train_args()
                .unwrap_or_else(|e| panic!("{preset:?}: {e}"));
            t.train_config()
                .unwrap_or_else(|e| panic!("{preset:?}: {e}"));
            preset
                .configs()
                .unwrap_or_else(|e| panic!("{preset:?}: {e}"));
            assert!(t.diffusion().to_config(None).is_ok(), "{preset:?}");
        }
        let (base, classic) = (
            Preset::Base.train_args().unwrap(),
            Preset::Classic.train_args().unwrap(),
        );
        let (b, c) = (
            base.train_config().unwrap(),
            classic.train_config().unwrap(),
        );
        assert!(b.ema_warmup.is_some() && c.ema_warmup.is_none());
        assert_eq!((base.snr_gamma, classic.snr_gamma), (Some(5.0), None));
        // The base model is the lighter UNet at batch 64; classic keeps the original's.
        assert_eq!((base.num_res_blocks, classic.num_res_blocks), (1, 2));
        assert_eq!((b.batch_size, c.batch_size), (64, 32));
        // Every checkpoint of the base run is kept, for its quality curve.
        assert_eq!(b.keep_checkpoints, 0);
    }
}
