//! Data sets from a folder of images (PNG, JPEG) or CIFAR-10's binary batches, and the
//! detection of what a `--data` folder holds.

use crate::data::{idx_path, ImageDataset, Split};
use crate::{Result, TrainError};
use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// How images from a folder become training images.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageOptions {
    /// 1 (grayscale) or 3 (RGB); by default 3 when any image has colour, else 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    /// Resize to `image_size` × `image_size` (the shorter side, then a centre crop with
    /// `center_crop`, else the whole image squeezed); by default the images' own size, which
    /// must then be the same for all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<usize>,
    /// Crop the centre square after resizing the shorter side (with `image_size`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub center_crop: bool,
    /// Flip training images left-right at random (each step draws its own flips).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub random_flip: bool,
}

impl ImageOptions {
    /// Whether these are the defaults (nothing to save).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// What a `--data` folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    /// MNIST-style IDX files (`train-images-idx3-ubyte[.gz]`, ...).
    Idx,
    /// CIFAR-10's binary batches (`data_batch_1.bin` ... and `test_batch.bin`).
    Cifar10,
    /// A folder of PNG and JPEG images, searched recursively.
    ImageFolder,
}

impl std::fmt::Display for DataFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataFormat::Idx => "IDX files",
            DataFormat::Cifar10 => "CIFAR-10 binary batches",
            DataFormat::ImageFolder => "an image folder",
        })
    }
}

/// Detects the format of `dir` from what it finds there.
pub fn detect_format(dir: &Path) -> Result<DataFormat> {
    if !dir.is_dir() {
        return Err(TrainError::Data {
            path: dir.to_path_buf(),
            detail: "is not a folder (give the folder that holds the data)".into(),
        });
    }
    let has = |name: &str| idx_path(dir, name).exists();
    if has("train-images-idx3-ubyte") || has("t10k-images-idx3-ubyte") {
        return Ok(DataFormat::Idx);
    }
    let cifar = dir.join("data_batch_1.bin").exists()
        || dir.join("cifar-10-batches-bin/data_batch_1.bin").exists();
    if cifar {
        return Ok(DataFormat::Cifar10);
    }
    Ok(DataFormat::ImageFolder)
}

/// Loads a split of whatever `dir` holds (see [`detect_format`]); an image folder has no splits
/// and is the same for both, and `opts` applies to it alone (CIFAR-10 takes `random_flip`).
pub fn load_data(
    dir: &Path,
    split: Split,
    opts: &ImageOptions,
) -> Result<(ImageDataset, DataFormat)> {
    let format = detect_format(dir)?;
    let mut data = match format {
        DataFormat::Idx => ImageDataset::load(dir, split)?,
        DataFormat::Cifar10 => load_cifar10(dir, split)?,
        DataFormat::ImageFolder => load_image_folder(dir, opts)?,
    };
    data.random_flip = opts.random_flip;
    Ok((data, format))
}

fn data_err(path: &Path, detail: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

/// Every image file under `dir`, sorted by path.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).map_err(|e| data_err(&d, format!("cannot list: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| data_err(&d, format!("cannot list: {e}")))?;
            let path = entry.path();
            // Symbolic links to folders are not followed: a link loop would never end.
            let kind = entry
                .file_type()
                .map_err(|e| data_err(&path, format!("cannot read: {e}")))?;
            if kind.is_dir() {
                stack.push(path);
            } else if is_image(&path) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The class of each file and the class names: the first sub-folder below `dir` when the images
/// lie in sub-folders, else the file-name prefix before the first `_` when every name has one
/// (improved-diffusion's `label_rest.png` rule), else none.
fn labels_of(dir: &Path, files: &[PathBuf]) -> (Vec<u8>, Option<Vec<String>>) {
    let folder = |f: &PathBuf| {
        let rel = f.strip_prefix(dir).ok()?;
        let mut parts = rel.components();
        let first = parts.next()?;
        parts
            .next()
            .map(|_| first.as_os_str().to_string_lossy().into_owned())
    };
    let prefix = |f: &PathBuf| {
        let name = f.file_name()?.to_string_lossy().into_owned();
        name.split_once('_').map(|(p, _)| p.to_string())
    };
    for rule in [&folder as &dyn Fn(&PathBuf) -> Option<String>, &prefix] {
        let names: Option<Vec<String>> = files.iter().map(rule).collect();
        if let Some(names) = names {
            let classes: Vec<String> = names
                .iter()
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if classes.len() > 256 {
                tracing::warn!(
                    "{}: {} classes is more than the 256 a data set here holds; the images are \
                     loaded unlabelled",
                    dir.display(),
                    classes.len()
                );
            } else if classes.len() > 1 {
                let labels = names
                    .iter()
                    .map(|n| classes.binary_search(n).expect("a known class") as u8)
                    .collect();
                return (labels, Some(classes));
            }
        }
    }
    (vec![0; files.len()], None)
}

/// Resizes (and crops) one image as `opts` says.
fn fit(img: DynamicImage, opts: &ImageOptions) -> DynamicImage {
    let Some(n) = opts.image_size else {
        return img;
    };
    let n = n as u32;
    let (w, h) = img.dimensions();
    if (w, h) == (n, n) {
        return img;
    }
    if opts.center_crop {
        let scale = n as f64 / w.min(h) as f64;
        let (sw, sh) = (
            ((w as f64 * scale).round() as u32).max(n),
            ((h as f64 * scale).round() as u32).max(n),
        );
        let resized = img.resize_exact(sw, sh, FilterType::Triangle);
        resized.crop_imm((sw - n) / 2, (sh - n) / 2, n, n)
    } else {
        img.resize_exact(n, n, FilterType::Triangle)
    }
}

/// Loads every PNG and JPEG image under `dir` into memory, decoded once.
pub fn load_image_folder(dir: &Path, opts: &ImageOptions) -> Result<ImageDataset> {
    if let Some(c) = opts.channels {
        if c != 1 && c != 3 {
            return Err(TrainError::Config(format!(
                "channels {c}: images are loaded as 1 (grayscale) or 3 (RGB) channels"
            )));
        }
    }
    if opts.center_crop && opts.image_size.is_none() {
        return Err(TrainError::Config(
            "--center-crop needs --image-size (the size to crop to)".into(),
        ));
    }
    if opts.image_size == Some(0) {
        return Err(TrainError::Config(
            "image size 0: give a positive size".into(),
        ));
    }
    let files = image_files(dir)?;
    if files.is_empty() {
        return Err(data_err(
            dir,
            "holds no PNG or JPEG images (nor IDX files or CIFAR-10 batches)",
        ));
    }
    let mut decoded = Vec::with_capacity(files.len());
    let mut colour = false;
    for f in &files {
        let img = image::open(f).map_err(|e| data_err(f, format!("cannot read the image: {e}")))?;
        colour |= img.color().has_color();
        decoded.push(fit(img, opts));
    }
    let (w, h) = decoded[0].dimensions();
    if let Some((f, img)) = files
        .iter()
        .zip(&decoded)
        .find(|(_, i)| i.dimensions() != (w, h))
    {
        let (w2, h2) = img.dimensions();
        return Err(data_err(
            f,
            format!(
                "is {w2}x{h2} but {} is {w}x{h}: give --image-size to resize them all",
                files[0].display()
            ),
        ));
    }
    let channels = opts.channels.unwrap_or(if colour { 3 } else { 1 });
    let (w, h) = (w as usize, h as usize);
    let mut bytes = Vec::with_capacity(files.len() * channels * h * w);
    for img in &decoded {
        if channels == 1 {
            bytes.extend_from_slice(img.to_luma8().as_raw());
        } else {
            let rgb = img.to_rgb8();
            for c in 0..3 {
                bytes.extend(rgb.as_raw().chunks_exact(3).map(|p| p[c]));
            }
        }
    }
    let (labels, names) = labels_of(dir, &files);
    let labelled = names.is_some();
    let mut data = ImageDataset::from_bytes(bytes, labels, [channels, h, w], names)?;
    data.random_flip = opts.random_flip;
    if !labelled {
        data.num_classes = None;
    }
    Ok(data)
}

/// CIFAR-10's record: a label byte, then 3×32×32 bytes (R, G, B planes).
const CIFAR_RECORD: usize = 1 + 3 * 32 * 32;

/// Loads a split of CIFAR-10's binary version (`data_batch_1..5.bin` for training,
/// `test_batch.bin` for the test split; class names from `batches.meta.txt` when present).
pub fn load_cifar10(dir: &Path, split: Split) -> Result<ImageDataset> {
    let dir = if dir.join("data_batch_1.bin").exists() {
        dir.to_path_buf()
    } else {
        dir.join("cifar-10-batches-bin")
    };
    let files: Vec<PathBuf> = match split {
        Split::Train => (1..=5)
            .map(|i| dir.join(format!("data_batch_{i}.bin")))
            .filter(|p| p.exists())
            .collect(),
        Split::Test => vec![dir.join("test_batch.bin")],
    };
    if files.is_empty() {
        return Err(data_err(
            &dir,
            "holds no CIFAR-10 training batches (data_batch_1.bin ...)",
        ));
    }
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for f in &files {
        let raw = std::fs::read(f).map_err(|e| data_err(f, format!("cannot read: {e}")))?;
        if raw.is_empty() || !raw.len().is_multiple_of(CIFAR_RECORD) {
            return Err(data_err(
                f,
                format!(
                    "{} bytes is not a whole number of CIFAR-10 records ({CIFAR_RECORD} bytes each)",
                    raw.len()
                ),
            ));
        }
        for rec in raw.chunks_exact(CIFAR_RECORD) {
            if rec[0] > 9 {
                return Err(data_err(
                    f,
                    format!("label {} is not a CIFAR-10 class (0..9)", rec[0]),
                ));
            }
            labels.push(rec[0]);
            images.extend_from_slice(&rec[1..]);
        }
    }
    let names = std::fs::read_to_string(dir.join("batches.meta.txt"))
        .ok()
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|n| n.len() == 10)
        .unwrap_or_else(|| {
            [
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ]
            .map(String::from)
            .to_vec()
        });
    ImageDataset::from_bytes(images, labels, [3, 32, 32], Some(names))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;
    use candle_core::Device;
    use image::{Rgb, RgbImage};

    /// A `size`-pixel square with a disc of `colour` on black.
    fn disc(size: u32, colour: [u8; 3]) -> RgbImage {
        let c = size as f32 / 2.0;
        RgbImage::from_fn(size, size, |x, y| {
            let d = ((x as f32 - c).powi(2) + (y as f32 - c).powi(2)).sqrt();
            if d < c * 0.6 {
                Rgb(colour)
            } else {
                Rgb([0, 0, 0])
            }
        })
    }

    #[test]
    fn folders_give_classes_colour_and_sizes() {
        let d = tempfile::tempdir().unwrap();
        for (class, colour) in [("red", [255, 0, 0]), ("blue", [0, 0, 255])] {
            std::fs::create_dir_all(d.path().join(class).join("more")).unwrap();
            for i in 0..3 {
                disc(8, colour)
                    .save(d.path().join(class).join(format!("{i}.png")))
                    .unwrap();
            }
            disc(8, colour)
                .save(d.path().join(class).join("more/x.jpg"))
                .unwrap();
        }
        std::fs::write(d.path().join("notes.txt"), "not an image").unwrap();
        assert_eq!(detect_format(d.path()).unwrap(), DataFormat::ImageFolder);
        let data = load_image_folder(d.path(), &ImageOptions::default()).unwrap();
        assert_eq!(
            (data.len, data.channels, data.height, data.width),
            (8, 3, 8, 8)
        );
        assert_eq!(
            data.class_names,
            Some(vec!["blue".to_string(), "red".to_string()])
        );
        assert_eq!(data.num_classes, Some(2));
        // Sorted paths: blue/0.png, blue/1.png, blue/2.png, blue/more/x.jpg, red/...
        let (x, y) = data.batch(&[0, 4], &Device::Cpu).unwrap();
        assert_eq!(y.to_vec1::<u32>().unwrap(), [0, 1]);
        let centre = |i: usize, c: usize| {
            x.get(i)
                .unwrap()
                .get(c)
                .unwrap()
                .get(4)
                .unwrap()
                .get(4)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!((centre(0, 2), centre(0, 0)), (1.0, -1.0), "blue disc");
        assert_eq!((centre(1, 0), centre(1, 2)), (1.0, -1.0), "red disc");
        // Forced grayscale, and resizing.
        let opts = ImageOptions {
            channels: Some(1),
            image_size: Some(4),
            ..Default::default()
        };
        let small = load_image_folder(d.path(), &opts).unwrap();
        assert_eq!((small.channels, small.height, small.width), (1, 4, 4));
        // Flips are seeded and mirror the image.
        let mut flipped = data.clone();
        flipped.random_flip = true;
        let idx = [0, 1, 2, 3, 4, 5, 6, 7];
        let a = flipped.batch_seeded(&idx, 7, &Device::Cpu).unwrap().0;
        let b = flipped.batch_seeded(&idx, 7, &Device::Cpu).unwrap().0;
        let max = |t: candle_core::Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(max((&a - &b).unwrap()), 0.0, "same seed, same flips");
        // The discs are symmetric: a flip shows in the pixels of an asymmetric image only, so
        // check the flip itself on a row.
        let plain = data.batch(&[0], &Device::Cpu).unwrap().0;
        let mirrored = data.batch_flipped(&[0], &[true], &Device::Cpu).unwrap().0;
        let row = |t: &candle_core::Tensor| {
            t.get(0)
                .unwrap()
                .get(2)
                .unwrap()
                .get(1)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let mut r = row(&plain);
        r.reverse();
        assert_eq!(row(&mirrored), r);
    }

    #[test]
    fn file_name_prefixes_label_a_flat_folder_and_gray_stays_gray() {
        let d = tempfile::tempdir().unwrap();
        for (name, v) in [("cat_1.png", 10u8), ("cat_2.png", 20), ("dog_1.png", 30)] {
            image::GrayImage::from_pixel(6, 6, image::Luma([v]))
                .save(d.path().join(name))
                .unwrap();
        }
        let data = load_image_folder(d.path(), &ImageOptions::default()).unwrap();
        assert_eq!(data.channels, 1);
        assert_eq!(
            data.class_names,
            Some(vec!["cat".to_string(), "dog".to_string()])
        );
        let (_, y) = data.batch(&[0, 1, 2], &Device::Cpu).unwrap();
        assert_eq!(y.to_vec1::<u32>().unwrap(), [0, 0, 1]);
    }

    #[test]
    fn bad_folders_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let e = load_image_folder(d.path(), &ImageOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds no PNG or JPEG images"), "{e}");
        disc(8, [9, 9, 9]).save(d.path().join("a.png")).unwrap();
        disc(6, [9, 9, 9]).save(d.path().join("b.png")).unwrap();
        let e = load_image_folder(d.path(), &ImageOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("b.png") && e.contains("is 6x6 but") && e.contains("--image-size"),
            "{e}"
        );
        let opts = ImageOptions {
            image_size: Some(8),
            center_crop: true,
            ..Default::default()
        };
        assert_eq!(load_image_folder(d.path(), &opts).unwrap().height, 8);
        std::fs::write(d.path().join("c.png"), b"not a png").unwrap();
        let e = load_image_folder(d.path(), &opts).unwrap_err().to_string();
        assert!(
            e.contains("c.png") && e.contains("cannot read the image"),
            "{e}"
        );
        let bad = ImageOptions {
            channels: Some(2),
            ..Default::default()
        };
        assert!(load_image_folder(d.path(), &bad)
            .unwrap_err()
            .to_string()
            .contains("channels 2"));
        let crop = ImageOptions {
            center_crop: true,
            ..Default::default()
        };
        let e = load_image_folder(d.path(), &crop).unwrap_err().to_string();
        assert!(e.contains("--center-crop needs --image-size"), "{e}");
        let e = detect_format(&d.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a folder"), "{e}");
    }

    #[test]
    fn cifar10_batches_are_read_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let record = |label: u8, v: u8| {
            let mut r = vec![label];
            r.extend((0..3 * 32 * 32).map(|i| if i < 1024 { v } else { 0 }));
            r
        };
        std::fs::write(
            d.path().join("data_batch_1.bin"),
            [record(3, 255), record(9, 0)].concat(),
        )
        .unwrap();
        std::fs::write(d.path().join("test_batch.bin"), record(1, 128)).unwrap();
        assert_eq!(detect_format(d.path()).unwrap(), DataFormat::Cifar10);
        let (train, _) = load_data(d.path(), Split::Train, &ImageOptions::default()).unwrap();
        assert_eq!((train.len, train.channels, train.height), (2, 3, 32));
        assert_eq!(train.class_names.as_ref().unwrap()[3], "cat");
        let (x, y) = train.batch(&[0], &Device::Cpu).unwrap();
        assert_eq!(y.to_vec1::<u32>().unwrap(), [3]);
        let red = x
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(red, 1.0);
        assert_eq!(load_cifar10(d.path(), Split::Test).unwrap().len, 1);
        std::fs::write(d.path().join("test_batch.bin"), [0u8; 100]).unwrap();
        let e = load_cifar10(d.path(), Split::Test).unwrap_err().to_string();
        assert!(e.contains("not a whole number of CIFAR-10 records"), "{e}");
    }
}
