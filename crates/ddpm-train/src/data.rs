//! Image data sets in memory: IDX files (MNIST, Fashion-MNIST) read and validated here, image
//! folders and CIFAR-10 in [`crate::image_folder`]; batching, flips and seeded shuffling.

use crate::{Result, TrainError};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::io::Read;
use std::path::{Path, PathBuf};

/// An n-dimensional array of unsigned bytes read from an IDX file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions, outermost first.
    pub dims: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<u8>,
}

fn data_err(path: &Path, detail: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Reads a file, transparently decompressing gzip (detected by its magic bytes).
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| data_err(path, format!("cannot read: {e}")))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| data_err(path, format!("corrupt gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses IDX bytes of unsigned-byte data, checking the magic number, dimensions and length.
pub fn parse_idx(bytes: &[u8], path: &Path) -> Result<IdxArray> {
    if bytes.len() < 4 {
        return Err(data_err(
            path,
            format!("{} bytes is too short for an IDX header", bytes.len()),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(data_err(
            path,
            format!(
                "bad IDX magic {:02x}{:02x}{:02x}{:02x}",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(data_err(
            path,
            format!(
                "IDX element type 0x{:02x} is not unsigned byte (0x08)",
                bytes[2]
            ),
        ));
    }
    let ndims = bytes[3] as usize;
    if ndims == 0 {
        return Err(data_err(path, "IDX file declares 0 dimensions"));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(data_err(
            path,
            format!(
                "truncated IDX header: {} dimensions need {header} bytes, file has {}",
                ndims,
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let have = bytes.len() - header;
    // Checked: a corrupt header can declare dimensions whose product overflows.
    let Some(n) = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
        return Err(data_err(
            path,
            format!("IDX dimensions {dims:?} are too large ({have} bytes of data)"),
        ));
    };
    if have != n {
        let what = if have < n {
            "truncated"
        } else {
            "has trailing bytes"
        };
        return Err(data_err(
            path,
            format!("IDX data {what}: dimensions {dims:?} need {n} bytes, found {have}"),
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Reads and validates an IDX file (gzip or raw).
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    parse_idx(&read_maybe_gz(path)?, path)
}

/// Which part of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The 60,000 training images.
    Train,
    /// The 10,000 test images.
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "test" | "t10k" => Ok(Split::Test),
            _ => Err(TrainError::Config(format!(
                "unknown split {s:?} (expected train or test)"
            ))),
        }
    }
}

/// The path of an IDX file in `dir`, preferring the decompressed file, else the `.gz`.
pub fn idx_path(dir: &Path, name: &str) -> PathBuf {
    let raw = dir.join(name);
    if raw.exists() {
        raw
    } else {
        dir.join(format!("{name}.gz"))
    }
}

/// Labelled images the trainer draws batches from.
pub trait Dataset {
    /// Number of images.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The shape of one image, [channels, height, width].
    fn image_shape(&self) -> [usize; 3];
    /// Images `idx` as `[B, C, H, W]` f32 in [-1, 1], and their labels `[B]` (u32; zeros for an
    /// unlabelled set).
    fn batch(&self, idx: &[usize], device: &Device) -> Result<(Tensor, Tensor)>;
    /// [`Self::batch`] for training, with any random augmentation drawn from `seed` (the trainer
    /// passes one per step, so a resumed run draws the same); no augmentation by default.
    fn batch_seeded(&self, idx: &[usize], _seed: u64, device: &Device) -> Result<(Tensor, Tensor)> {
        self.batch(idx, device)
    }
    /// The number of classes of a labelled data set.
    fn num_classes(&self) -> Option<usize> {
        None
    }
    /// The class names by label, when the source names them.
    fn class_names(&self) -> Option<Vec<String>> {
        None
    }
}

impl Dataset for ImageDataset {
    fn len(&self) -> usize {
        self.len
    }
    fn image_shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }
    fn batch(&self, idx: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        ImageDataset::batch(self, idx, device)
    }
    fn batch_seeded(&self, idx: &[usize], seed: u64, device: &Device) -> Result<(Tensor, Tensor)> {
        if !self.random_flip {
            return ImageDataset::batch(self, idx, device);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let flip: Vec<bool> = idx
            .iter()
            .map(|_| rand::Rng::random::<bool>(&mut rng))
            .collect();
        self.batch_flipped(idx, &flip, device)
    }
    fn num_classes(&self) -> Option<usize> {
        self.num_classes
    }
    fn class_names(&self) -> Option<Vec<String>> {
        self.class_names.clone()
    }
}

/// Images (grayscale or RGB) with labels, kept as bytes; batches are scaled to [-1, 1].
#[derive(Debug, Clone)]
pub struct ImageDataset {
    images: Vec<u8>,
    labels: Vec<u8>,
    /// Number of images.
    pub len: usize,
    /// Channels per image: 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// The class names by label, when the source names them (sub-folders, CIFAR-10's meta file).
    pub class_names: Option<Vec<String>>,
    /// The number of classes (labels are below it), when the images are labelled.
    pub num_classes: Option<usize>,
    /// Flip each image left-right with probability 1/2 in [`Dataset::batch_seeded`].
    pub random_flip: bool,
}

impl ImageDataset {
    /// Loads a split of an MNIST-format data set from `dir` (MNIST, Fashion-MNIST).
    pub fn load(dir: &Path, split: Split) -> Result<Self> {
        let images_path = idx_path(dir, &format!("{}-images-idx3-ubyte", split.prefix()));
        let labels_path = idx_path(dir, &format!("{}-labels-idx1-ubyte", split.prefix()));
        let images = read_idx(&images_path)?;
        let labels = read_idx(&labels_path)?;
        Self::from_idx(images, labels, &images_path, &labels_path)
    }

    /// Pairs an image array `[N, H, W]` with a label array `[N]`.
    pub fn from_idx(
        images: IdxArray,
        labels: IdxArray,
        images_path: &Path,
        labels_path: &Path,
    ) -> Result<Self> {
        if images.dims.len() != 3 {
            return Err(data_err(
                images_path,
                format!(
                    "expected images [N, H, W], found dimensions {:?}",
                    images.dims
                ),
            ));
        }
        if labels.dims.len() != 1 {
            return Err(data_err(
                labels_path,
                format!("expected labels [N], found dimensions {:?}", labels.dims),
            ));
        }
        if images.dims[0] != labels.dims[0] {
            return Err(data_err(
                labels_path,
                format!(
                    "{} labels for {} images in {}",
                    labels.dims[0],
                    images.dims[0],
                    images_path.display()
                ),
            ));
        }
        if images.dims.contains(&0) {
            return Err(data_err(
                images_path,
                format!(
                    "holds no images (dimensions {:?}): an empty data set cannot train or score",
                    images.dims
                ),
            ));
        }
        let num_classes = labels.data.iter().max().map(|&m| (m as usize + 1).max(10));
        Ok(Self {
            len: images.dims[0],
            channels: 1,
            height: images.dims[1],
            width: images.dims[2],
            images: images.data,
            labels: labels.data,
            class_names: None,
            num_classes,
            random_flip: false,
        })
    }

    /// A data set from images already decoded: `images` holds `len` images of
    /// `channels × height × width` bytes (channel-major), `labels` one byte each.
    pub fn from_bytes(
        images: Vec<u8>,
        labels: Vec<u8>,
        [channels, height, width]: [usize; 3],
        class_names: Option<Vec<String>>,
    ) -> Result<Self> {
        let px = channels * height * width;
        if px == 0 || images.is_empty() || !images.len().is_multiple_of(px) {
            return Err(TrainError::Config(format!(
                "{} bytes of images do not hold whole {channels}x{height}x{width} images",
                images.len()
            )));
        }
        let len = images.len() / px;
        if labels.len() != len {
            return Err(TrainError::Config(format!(
                "{} labels for {len} images",
                labels.len()
            )));
        }
        let num_classes = match &class_names {
            Some(names) => Some(names.len()),
            None => labels.iter().max().map(|&m| m as usize + 1),
        };
        Ok(Self {
            images,
            labels,
            len,
            channels,
            height,
            width,
            class_names,
            num_classes,
            random_flip: false,
        })
    }

    /// The label of image `i`.
    pub fn label(&self, i: usize) -> u8 {
        self.labels[i]
    }

    /// Images `idx` as `[B, C, H, W]` f32 in [-1, 1] (x/127.5 - 1), and their labels `[B]` (u32).
    pub fn batch(&self, idx: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        self.batch_flipped(idx, &vec![false; idx.len()], device)
    }

    /// [`Self::batch`] with the images where `flip` is true mirrored left-right.
    pub fn batch_flipped(
        &self,
        idx: &[usize],
        flip: &[bool],
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (c, h, w) = (self.channels, self.height, self.width);
        let px = c * h * w;
        let mut x = Vec::with_capacity(idx.len() * px);
        for (&i, &f) in idx.iter().zip(flip) {
            let img = &self.images[i * px..(i + 1) * px];
            for row in img.chunks_exact(w) {
                let v = |p: &u8| *p as f32 / 127.5 - 1.0;
                if f {
                    x.extend(row.iter().rev().map(v));
                } else {
                    x.extend(row.iter().map(v));
                }
            }
        }
        let y: Vec<u32> = idx.iter().map(|&i| self.labels[i] as u32).collect();
        Ok((
            Tensor::from_vec(x, (idx.len(), c, h, w), device)?,
            Tensor::from_vec(y, idx.len(), device)?,
        ))
    }
}

/// Visits a data set in a fresh seeded permutation each epoch; its position can be saved.
#[derive(Debug, Clone)]
pub struct EpochShuffler {
    seed: u64,
    len: usize,
    /// Current epoch.
    pub epoch: u64,
    /// Position inside the current epoch's permutation.
    pub pos: usize,
    perm: Vec<usize>,
}

impl EpochShuffler {
    /// Starts at `epoch`, `pos` (0, 0 for a new run).
    pub fn new(len: usize, seed: u64, epoch: u64, pos: usize) -> Self {
        let mut s = Self {
            seed,
            len,
            epoch,
            pos,
            perm: Vec::new(),
        };
        s.shuffle();
        s
    }

    fn shuffle(&mut self) {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.perm = (0..self.len).collect();
        self.perm.shuffle(&mut rng);
    }

    /// The next `n` indices, moving to a new permutation at the end of each epoch.
    pub fn next_indices(&mut self, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.pos == self.len {
                self.epoch += 1;
                self.pos = 0;
                self.shuffle();
            }
            let take = (n - out.len()).min(self.len - self.pos);
            out.extend_from_slice(&self.perm[self.pos..self.pos + take]);
            self.pos += take;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn parses_good_files_raw_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = idx_bytes(&[2, 2, 3], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 255]);
        let p = dir.path().join("a");
        std::fs::write(&p, &bytes).unwrap();
        let a = read_idx(&p).unwrap();
        assert_eq!(a.dims, vec![2, 2, 3]);
        assert_eq!(a.data[11], 255);
        let gz = dir.path().join("a.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &bytes).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        assert_eq!(read_idx(&gz).unwrap(), a);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let p = Path::new("x");
        let e = |b: &[u8]| parse_idx(b, p).unwrap_err().to_string();
        assert!(e(&idx_bytes(&[2, 3], &[0; 5]))
            .contains("truncated: dimensions [2, 3] need 6 bytes, found 5"));
        assert!(e(&idx_bytes(&[2], &[0; 3])).contains("trailing bytes"));
        assert!(e(&[0, 0, 0x0d, 1, 0, 0, 0, 0]).contains("not unsigned byte"));
        assert!(e(&[1, 2, 8, 1]).contains("bad IDX magic"));
        assert!(e(&[0, 0, 8, 3, 0, 0]).contains("truncated IDX header"));
        assert!(e(&[0, 0]).contains("too short"));
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("bad.gz");
        std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 1, 2, 3]).unwrap();
        assert!(read_idx(&gz)
            .unwrap_err()
            .to_string()
            .contains("corrupt gzip"));
        assert!(read_idx(&dir.path().join("none"))
            .unwrap_err()
            .to_string()
            .contains("cannot read"));
    }

    #[test]
    fn dataset_checks_pairing_and_scales_pixels() {
        let p = Path::new;
        let imgs = IdxArray {
            dims: vec![2, 1, 2],
            data: vec![0, 255, 51, 204],
        };
        let labels = IdxArray {
            dims: vec![2],
            data: vec![3, 9],
        };
        let ds =
            ImageDataset::from_idx(imgs.clone(), labels, Path::new("i"), Path::new("l")).unwrap();
        let (x, y) = ds.batch(&[1, 0], &Device::Cpu).unwrap();
        assert_eq!(x.dims(), &[2, 1, 1, 2]);
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((v[0] - (51.0 / 127.5 - 1.0)).abs() < 1e-7 && v[2] == -1.0 && v[3] == 1.0);
        assert_eq!(y.to_vec1::<u32>().unwrap(), vec![9, 3]);
        let bad = IdxArray {
            dims: vec![3],
            data: vec![1, 2, 3],
        };
        let e = ImageDataset::from_idx(imgs, bad, Path::new("i"), Path::new("l"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 labels for 2 images"), "{e}");
        // A data set of zero images (it would spin the epoch shuffler for ever).
        let none = |dims: Vec<usize>| IdxArray { dims, data: vec![] };
        let e = ImageDataset::from_idx(none(vec![0, 28, 28]), none(vec![0]), p("i"), p("l"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds no images"), "{e}");
        let e = ImageDataset::from_idx(none(vec![2, 0, 28]), none(vec![2]), p("i"), p("l"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds no images"), "{e}");
    }

    #[test]
    fn shuffler_is_seeded_covers_each_epoch_and_resumes() {
        let mut s = EpochShuffler::new(10, 7, 0, 0);
        let first: Vec<usize> = s.next_indices(10);
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(first, (0..10).collect::<Vec<_>>());
        let a = s.next_indices(4);
        assert_eq!(s.epoch, 1);
        let mut resumed = EpochShuffler::new(10, 7, s.epoch, s.pos);
        assert_eq!(resumed.next_indices(13), s.next_indices(13));
        assert_ne!(a, first[..4].to_vec());
    }
}
