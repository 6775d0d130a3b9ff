//! Sample quality for MNIST: a small classifier's features give a Fréchet distance, its class
//! probabilities a classifier-based Inception Score and a class histogram.

use crate::optim::{AdamW, AdamWConfig};
use crate::{ImageDataset, Result, TrainError};
use candle_core::{DType, Device, Tensor, D};
use ddpm_unet::nn::{Conv2d, Conv2dConfig, Linear};
use ddpm_unet::ParamStore;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// One row of numbers per image (features or class probabilities).
pub type Rows = Vec<Vec<f64>>;

/// Width of the feature layer used for the Fréchet distance.
pub const FEATURES: usize = 128;

/// The classifier's committed weights (trained by `cargo xtask train-classifier`).
pub const CLASSIFIER_WEIGHTS: &[u8] = include_bytes!("../assets/mnist_classifier.safetensors");

/// A small CNN for 28×28 digits: three 3×3 convolutions (32, 64, 128 channels; the last two
/// stride 2), a 128-wide feature layer and 10 logits.
pub struct Classifier {
    convs: [Conv2d; 3],
    fc: Linear,
    out: Linear,
    store: ParamStore,
}

impl Classifier {
    /// A classifier with seeded initial weights.
    pub fn new(seed: u64, device: &Device) -> Result<Self> {
        let store = ParamStore::new(seed, DType::F32, device);
        let vb = store.var_builder();
        let conv = |name: &str, c_in, c_out, stride| {
            let cfg = Conv2dConfig {
                stride,
                padding: 1,
                ..Default::default()
            };
            Conv2d::new(vb.pp(name), c_in, c_out, 3, cfg)
        };
        Ok(Self {
            convs: [
                conv("conv1", 1, 32, 1)?,
                conv("conv2", 32, 64, 2)?,
                conv("conv3", 64, 128, 2)?,
            ],
            fc: Linear::new(vb.pp("fc"), 128 * 7 * 7, FEATURES)?,
            out: Linear::new(vb.pp("out"), FEATURES, 10)?,
            store,
        })
    }

    /// The committed, pre-trained classifier.
    pub fn pretrained(device: &Device) -> Result<Self> {
        let c = Self::new(0, device)?;
        let tensors = candle_core::safetensors::load_buffer(CLASSIFIER_WEIGHTS, &Device::Cpu)?;
        c.store.set_tensors(&tensors)?;
        Ok(c)
    }

    /// Its parameters.
    pub fn params(&self) -> &ParamStore {
        &self.store
    }

    /// Features [B, 128] and logits [B, 10] of images [B, 1, 28, 28] in [-1, 1].
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1..] != [1, 28, 28] {
            return Err(TrainError::Config(format!(
                "the MNIST classifier takes [B, 1, 28, 28] images, got {dims:?}"
            )));
        }
        let mut h = x.clone();
        for conv in &self.convs {
            h = conv.forward(&h)?.relu()?;
        }
        let feats = self.fc.forward(&h.flatten_from(1)?)?.relu()?;
        let logits = self.out.forward(&feats)?;
        Ok((feats, logits))
    }

    /// Features and class probabilities of many images, in batches, as f64 rows.
    pub fn describe(&self, x: &Tensor, batch: usize) -> Result<(Rows, Rows)> {
        let n = x.dim(0)?;
        let (mut feats, mut probs) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for start in (0..n).step_by(batch.max(1)) {
            let xb = x.narrow(0, start, batch.min(n - start))?;
            let (f, l) = self.forward(&xb)?;
            let p = candle_nn::ops::softmax(&l, D::Minus1)?;
            feats.extend(f.to_dtype(DType::F64)?.to_vec2::<f64>()?);
            probs.extend(p.to_dtype(DType::F64)?.to_vec2::<f64>()?);
        }
        Ok((feats, probs))
    }

    /// Trains on `train` with AdamW and cross-entropy; returns the test accuracy after each epoch.
    pub fn train(
        &self,
        train: &ImageDataset,
        test: &ImageDataset,
        epochs: usize,
        batch: usize,
        seed: u64,
    ) -> Result<Vec<f64>> {
        let device = self.store.device().clone();
        let params = self.store.vars();
        let mut opt = AdamW::new(
            params.clone(),
            AdamWConfig {
                lr: 1e-3,
                ..Default::default()
            },
        )?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut accs = Vec::new();
        let steps_total = (epochs * train.len.div_ceil(batch)) as f64;
        let mut step = 0f64;
        for _ in 0..epochs {
            let mut order: Vec<usize> = (0..train.len).collect();
            order.shuffle(&mut rng);
            for idx in order.chunks(batch) {
                let (x, y) = train.batch(idx, &device)?;
                let x = random_shift(&x, 2, &mut rng)?;
                let (_, logits) = self.forward(&x)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
                // Cosine decay to a tenth of the initial rate.
                opt.cfg.lr = 1e-3
                    * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * step / steps_total).cos()));
                opt.step(&loss.backward()?)?;
                step += 1.0;
            }
            accs.push(self.accuracy(test)?);
            tracing::info!(
                "classifier epoch {}: test accuracy {:.4}",
                accs.len(),
                accs[accs.len() - 1]
            );
        }
        Ok(accs)
    }

    /// Fraction of `data` classified correctly.
    pub fn accuracy(&self, data: &ImageDataset) -> Result<f64> {
        let device = self.store.device().clone();
        let mut correct = 0usize;
        let idx: Vec<usize> = (0..data.len).collect();
        for chunk in idx.chunks(500) {
            let (x, y) = data.batch(chunk, &device)?;
            let (_, logits) = self.forward(&x)?;
            let pred = logits
                .argmax(D::Minus1)?
                .to_dtype(DType::U32)?
                .to_vec1::<u32>()?;
            let y = y.to_vec1::<u32>()?;
            correct += pred.iter().zip(&y).filter(|(a, b)| a == b).count();
        }
        Ok(correct as f64 / data.len as f64)
    }
}

/// Shifts each image by up to `max` pixels in x and y (background −1 fills in): augmentation.
fn random_shift(x: &Tensor, max: usize, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    use rand::Rng;
    let (b, c, h, w) = x.dims4()?;
    let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let mut out = vec![-1f32; v.len()];
    let m = max as isize;
    for i in 0..b * c {
        let (dy, dx) = (
            rng.random_range(-m as i64..=m as i64) as isize,
            rng.random_range(-m as i64..=m as i64) as isize,
        );
        for y in 0..h as isize {
            let sy = y - dy;
            if sy < 0 || sy >= h as isize {
                continue;
            }
            for xx in 0..w as isize {
                let sx = xx - dx;
                if sx >= 0 && sx < w as isize {
                    out[i * h * w + (y as usize) * w + xx as usize] =
                        v[i * h * w + (sy as usize) * w + sx as usize];
                }
            }
        }
    }
    Ok(Tensor::from_vec(out, (b, c, h, w), x.device())?)
}

/// Mean and covariance (divided by n − 1) of the rows.
#[allow(clippy::needless_range_loop)] // index loops read best for matrix code
pub fn mean_cov(rows: &[Vec<f64>]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = rows.len() as f64;
    let d = rows.first().map_or(0, |r| r.len());
    let mut mu = vec![0.0; d];
    for r in rows {
        for (m, v) in mu.iter_mut().zip(r) {
            *m += v / n;
        }
    }
    let mut cov = vec![vec![0.0; d]; d];
    for r in rows {
        for i in 0..d {
            let di = r[i] - mu[i];
            for j in i..d {
                cov[i][j] += di * (r[j] - mu[j]);
            }
        }
    }
    for i in 0..d {
        for j in i..d {
            cov[i][j] /= (n - 1.0).max(1.0);
            cov[j][i] = cov[i][j];
        }
    }
    (mu, cov)
}

/// Eigenvalues and eigenvectors (columns) of a symmetric matrix, by cyclic Jacobi rotations.
#[allow(clippy::needless_range_loop)] // index loops read best for matrix code
pub fn symmetric_eigen(a: &[Vec<f64>]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = a.len();
    let mut a: Vec<Vec<f64>> = a.to_vec();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
        .collect();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        let scale: f64 = (0..n).map(|i| a[i][i] * a[i][i]).sum::<f64>().max(1e-300);
        if off <= 1e-22 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k][p], a[k][q]);
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p][k], a[q][k]);
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
                for row in v.iter_mut() {
                    let (vkp, vkq) = (row[p], row[q]);
                    row[p] = c * vkp - s * vkq;
                    row[q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i][i]).collect(), v)
}

fn matmul(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (n, m, k) = (a.len(), b[0].len(), b.len());
    (0..n)
        .map(|i| {
            (0..m)
                .map(|j| (0..k).map(|l| a[i][l] * b[l][j]).sum())
                .collect()
        })
        .collect()
}

/// Symmetric PSD square root via the eigen decomposition (negative eigenvalues clipped to 0).
fn sqrtm_psd(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (vals, vecs) = symmetric_eigen(a);
    let n = a.len();
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    (0..n)
                        .map(|k| vecs[i][k] * vals[k].max(0.0).sqrt() * vecs[j][k])
                        .sum()
                })
                .collect()
        })
        .collect()
}

/// Fréchet distance between Gaussians fitted to two feature sets:
/// |μ1 − μ2|² + tr(Σ1) + tr(Σ2) − 2·tr((Σ1^½ Σ2 Σ1^½)^½). NaN when a set is empty or the
/// widths differ: no Gaussian to fit.
pub fn frechet_distance(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    let width = |s: &[Vec<f64>]| s.first().map(|r| r.len());
    if a.is_empty() || b.is_empty() || width(a) != width(b) {
        return f64::NAN;
    }
    let (m1, s1) = mean_cov(a);
    let (m2, s2) = mean_cov(b);
    let diff: f64 = m1.iter().zip(&m2).map(|(x, y)| (x - y).powi(2)).sum();
    let tr = |s: &[Vec<f64>]| (0..s.len()).map(|i| s[i][i]).sum::<f64>();
    let r = sqrtm_psd(&s1);
    let inner = matmul(&matmul(&r, &s2), &r);
    let (vals, _) = symmetric_eigen(&inner);
    let tr_sqrt: f64 = vals.iter().map(|v| v.max(0.0).sqrt()).sum();
    (diff + tr(&s1) + tr(&s2) - 2.0 * tr_sqrt).max(0.0)
}

/// exp(E_x KL(p(y|x) || p(y))): 1 for uninformative predictions, up to 10 for confident,
/// evenly spread ones.
pub fn inception_score(probs: &[Vec<f64>]) -> f64 {
    let n = probs.len() as f64;
    let k = probs.first().map_or(0, |p| p.len());
    let marginal: Vec<f64> = (0..k)
        .map(|j| probs.iter().map(|p| p[j]).sum::<f64>() / n)
        .collect();
    let kl: f64 = probs
        .iter()
        .map(|p| {
            p.iter()
                .zip(&marginal)
                .filter(|(pi, _)| **pi > 0.0)
                .map(|(pi, mi)| pi * (pi.ln() - mi.ln()))
                .sum::<f64>()
        })
        .sum::<f64>()
        / n;
    kl.exp()
}

/// Fraction of images whose largest class probability exceeds `threshold` (0.9 in reports):
/// a clean digit is classified with confidence, a blob or a scrawl usually is not.
pub fn confident_fraction(probs: &[Vec<f64>], threshold: f64) -> f64 {
    if probs.is_empty() {
        return f64::NAN;
    }
    let n = probs
        .iter()
        .filter(|p| p.iter().copied().fold(f64::MIN, f64::max) > threshold)
        .count();
    n as f64 / probs.len() as f64
}

/// The classifier's features of every test image: the reference every score is taken against.
pub fn test_features(clf: &Classifier, test: &ImageDataset) -> Result<Rows> {
    let all: Vec<usize> = (0..test.len).collect();
    let (x, _) = test.batch(&all, &candle_core::Device::Cpu)?;
    Ok(clf.describe(&x, 500)?.0)
}

/// The indices 0..len in a seeded random order: real-data floors are drawn from its front, as
/// the first images of a set are not a fair sample of it.
pub fn shuffled_indices(len: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    order
}

/// What `eval` reports for one set of images, against the test set's features.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Scores {
    /// Number of images scored.
    pub num: usize,
    /// Fréchet distance to the reference features (lower is better).
    pub frechet_distance: f64,
    /// Classifier-based Inception Score (at most 10).
    pub inception_score: f64,
    /// Fraction classified with confidence above 0.9.
    pub confident_fraction: f64,
    /// Images per predicted class.
    pub class_histogram: Vec<usize>,
}

impl Scores {
    /// Scores the images [N, 1, 28, 28] in [-1, 1] against `reference` features.
    pub fn of_images(clf: &Classifier, x: &Tensor, reference: &[Vec<f64>]) -> Result<Self> {
        let (f, p) = clf.describe(x, 500)?;
        Ok(Self::of_rows(&f, &p, reference))
    }

    /// Scores already computed features and probabilities.
    pub fn of_rows(feats: &[Vec<f64>], probs: &[Vec<f64>], reference: &[Vec<f64>]) -> Self {
        Self {
            num: feats.len(),
            frechet_distance: frechet_distance(feats, reference),
            inception_score: inception_score(probs),
            confident_fraction: confident_fraction(probs, 0.9),
            class_histogram: class_histogram(probs),
        }
    }
}

/// How many images the classifier puts in each class.
pub fn class_histogram(probs: &[Vec<f64>]) -> Vec<usize> {
    let mut h = vec![0; probs.first().map_or(0, |p| p.len())];
    for p in probs {
        let best = p
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0);
        h[best] += 1;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eigen_decomposition_reconstructs_the_matrix() {
        let a = vec![
            vec![4.0, 1.0, 0.5],
            vec![1.0, 3.0, 0.2],
            vec![0.5, 0.2, 1.0],
        ];
        let (vals, vecs) = symmetric_eigen(&a);
        for i in 0..3 {
            for j in 0..3 {
                let r: f64 = (0..3).map(|k| vecs[i][k] * vals[k] * vecs[j][k]).sum();
                assert!((r - a[i][j]).abs() < 1e-10);
            }
        }
        let s = sqrtm_psd(&a);
        let s2 = matmul(&s, &s);
        assert!((s2[0][1] - 1.0).abs() < 1e-10 && (s2[2][2] - 1.0).abs() < 1e-10);
    }

    #[test]
    fn frechet_distance_of_known_gaussians() {
        // Samples whose mean and covariance are exactly known: ±1 patterns.
        let pts = |shift: f64, scale: f64| -> Vec<Vec<f64>> {
            [[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]
                .iter()
                .map(|p| vec![p[0] * scale + shift, p[1] * scale])
                .collect()
        };
        let a = pts(0.0, 1.0);
        assert!(frechet_distance(&a, &a) < 1e-9);
        // Covariances (4/3)·I and (4/3)·4·I, means 3 apart in x:
        // 9 + 2·4/3 + 2·16/3 − 2·2·sqrt(4/3 · 16/3) = 9 + 40/3 − 4·8/3 = 9 + 8/3.
        let fd = frechet_distance(&a, &pts(3.0, 2.0));
        assert!((fd - (9.0 + 8.0 / 3.0)).abs() < 1e-9, "{fd}");
    }

    #[test]
    fn confident_fraction_counts_above_the_threshold() {
        let p = vec![
            vec![0.95, 0.05],
            vec![0.5, 0.5],
            vec![0.1, 0.9],
            vec![0.0, 1.0],
        ];
        assert_eq!(confident_fraction(&p, 0.9), 0.5);
        assert!(confident_fraction(&[], 0.9).is_nan());
    }

    #[test]
    fn inception_score_and_histogram() {
        let confident: Vec<Vec<f64>> = (0..10)
            .map(|i| (0..10).map(|j| f64::from(u8::from(i == j))).collect())
            .collect();
        assert!((inception_score(&confident) - 10.0).abs() < 1e-9);
        let flat = vec![vec![0.1; 10]; 5];
        assert!((inception_score(&flat) - 1.0).abs() < 1e-12);
        assert_eq!(class_histogram(&confident), vec![1; 10]);
    }
}
