//! Deliberately degraded digits: what a sample-quality score must tell apart from clean ones.
//!
//! Each degradation imitates a way a diffusion model's samples go wrong: strokes too thick,
//! a background that is not black, blur, leftover noise, and a share of samples that are
//! blobs on grey squares instead of digits.

use crate::eval::{shuffled_indices, test_features, Classifier, Scores};
use crate::{ImageDataset, Result, TrainError};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A way of spoiling real digits (images [B, 1, H, W] in [-1, 1]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Degradation {
    /// Thicker strokes: a 3×3 maximum filter.
    Dilate,
    /// A grey background: every pixel at least −0.4 (30% grey).
    GreyBackground,
    /// Blur: a 3×3 binomial filter ([1, 2, 1] / 4 in each direction).
    Blur,
    /// Added Gaussian noise of standard deviation 0.2, clamped to [−1, 1].
    Noise,
    /// 12% of the images replaced by a white ellipse on a grey square.
    Blobs,
}

impl Degradation {
    /// Every degradation, in a fixed order.
    pub const ALL: [Degradation; 5] = [
        Degradation::Dilate,
        Degradation::GreyBackground,
        Degradation::Blur,
        Degradation::Noise,
        Degradation::Blobs,
    ];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Degradation::Dilate => "dilated strokes",
            Degradation::GreyBackground => "grey background",
            Degradation::Blur => "blur",
            Degradation::Noise => "noise 0.2",
            Degradation::Blobs => "12% blobs",
        }
    }

    /// The degraded copy of `x` ([B, 1, H, W], values in [−1, 1]); `seed` draws the noise and
    /// the blobs.
    pub fn apply(self, x: &Tensor, seed: u64) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != 1 {
            return Err(TrainError::Config(format!(
                "degradations take one-channel images, got {c} channels"
            )));
        }
        let src: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let px = h * w;
        let mut out = src.clone();
        match self {
            Degradation::Dilate => {
                for (img, dst) in src.chunks(px).zip(out.chunks_mut(px)) {
                    filter3(img, dst, h, w, |v| {
                        v.iter().copied().fold(f32::MIN, f32::max)
                    });
                }
            }
            Degradation::GreyBackground => out.iter_mut().for_each(|v| *v = v.max(-0.4)),
            Degradation::Blur => {
                const K: [f32; 9] = [1., 2., 1., 2., 4., 2., 1., 2., 1.];
                for (img, dst) in src.chunks(px).zip(out.chunks_mut(px)) {
                    filter3(img, dst, h, w, |v| {
                        v.iter().zip(K).map(|(a, k)| a * k).sum::<f32>() / 16.0
                    });
                }
            }
            Degradation::Noise => out.iter_mut().for_each(|v| {
                let z: f32 = StandardNormal.sample(&mut rng);
                *v = (*v + 0.2 * z).clamp(-1.0, 1.0);
            }),
            Degradation::Blobs => {
                let count = (b as f64 * 0.12).round() as usize;
                let mut order: Vec<usize> = (0..b).collect();
                rand::seq::SliceRandom::shuffle(&mut order[..], &mut rng);
                for &i in &order[..count] {
                    blob(&mut out[i * px..(i + 1) * px], h, w, &mut rng);
                }
            }
        }
        Ok(Tensor::from_vec(out, (b, c, h, w), x.device())?)
    }
}

/// Clean real digits scored in several draws (the floor and its spread) and each degradation
/// of the first draw, all at one n against the whole test set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvaluatorCheck {
    /// Images per draw.
    pub num: usize,
    /// Disjoint draws of clean training images.
    pub floor: Vec<Scores>,
    /// Each degradation of the first draw.
    pub degraded: Vec<(String, Scores)>,
}

impl EvaluatorCheck {
    /// Mean and standard deviation of the floor draws' Fréchet distances.
    pub fn floor_fd(&self) -> (f64, f64) {
        let fd: Vec<f64> = self.floor.iter().map(|s| s.frechet_distance).collect();
        let n = fd.len() as f64;
        let mean = fd.iter().sum::<f64>() / n;
        let var = fd.iter().map(|f| (f - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        (mean, var.sqrt())
    }

    /// The report as a table.
    pub fn table(&self) -> String {
        let (m, sd) = self.floor_fd();
        let mut out = format!(
            "{:<22} {:>10} {:>8} {:>10}\n",
            format!("n = {}", self.num),
            "FD",
            "IS",
            "confident"
        );
        for (i, s) in self.floor.iter().enumerate() {
            out += &format!(
                "{:<22} {:>10.2} {:>8.3} {:>9.1}%\n",
                format!("real, draw {}", i + 1),
                s.frechet_distance,
                s.inception_score,
                100.0 * s.confident_fraction
            );
        }
        out += &format!("{:<22} {m:>10.2} ± {sd:.2} (mean ± sd)\n", "real floor");
        for (name, s) in &self.degraded {
            out += &format!(
                "{:<22} {:>10.2} {:>8.3} {:>9.1}%   {:.1}x the floor\n",
                name,
                s.frechet_distance,
                s.inception_score,
                100.0 * s.confident_fraction,
                s.frechet_distance / m
            );
        }
        out
    }
}

/// Scores `draws` disjoint draws of `num` clean training images (a seeded shuffle) and every
/// [`Degradation`] of the first draw against the whole test set.
pub fn check_evaluator(
    clf: &Classifier,
    train: &ImageDataset,
    test: &ImageDataset,
    num: usize,
    draws: usize,
    seed: u64,
) -> Result<EvaluatorCheck> {
    if num < 2 || draws == 0 || num.checked_mul(draws).is_none_or(|t| t > train.len) {
        return Err(TrainError::Config(format!(
            "cannot take {draws} disjoint draws of {num} images from {} training images",
            train.len
        )));
    }
    let device = candle_core::Device::Cpu;
    let reference = test_features(clf, test)?;
    let order = shuffled_indices(train.len, seed);
    let mut floor = Vec::with_capacity(draws);
    let mut first = None;
    for d in 0..draws {
        let (x, _) = train.batch(&order[d * num..(d + 1) * num], &device)?;
        floor.push(Scores::of_images(clf, &x, &reference)?);
        first.get_or_insert(x);
    }
    let first = first.expect("draws > 0");
    let mut degraded = Vec::new();
    for (k, deg) in Degradation::ALL.into_iter().enumerate() {
        let y = deg.apply(&first, seed.wrapping_add(k as u64 + 1))?;
        degraded.push((
            deg.name().to_string(),
            Scores::of_images(clf, &y, &reference)?,
        ));
    }
    Ok(EvaluatorCheck {
        num,
        floor,
        degraded,
    })
}

/// Applies `f` to each pixel's 3×3 neighbourhood; outside the image is background (−1).
fn filter3(src: &[f32], dst: &mut [f32], h: usize, w: usize, f: impl Fn(&[f32; 9]) -> f32) {
    let at = |y: isize, x: isize| {
        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
            -1.0
        } else {
            src[y as usize * w + x as usize]
        }
    };
    for y in 0..h as isize {
        for x in 0..w as isize {
            let mut n = [0f32; 9];
            for (k, v) in n.iter_mut().enumerate() {
                *v = at(y + k as isize / 3 - 1, x + k as isize % 3 - 1);
            }
            dst[y as usize * w + x as usize] = f(&n);
        }
    }
}

/// A thick white ellipse on a grey square, with a soft edge, drawn over one image.
fn blob(img: &mut [f32], h: usize, w: usize, rng: &mut ChaCha8Rng) {
    let grey: f32 = rng.random_range(-0.6..-0.2);
    let (cy, cx) = (
        h as f32 / 2.0 + rng.random_range(-2.0..2.0),
        w as f32 / 2.0 + rng.random_range(-2.0..2.0),
    );
    let (ry, rx) = (rng.random_range(5.0..8.0f32), rng.random_range(4.0..7.0f32));
    let (s0, s1) = (rng.random_range(1.0..3.0f32), rng.random_range(1.0..3.0f32));
    let square = |y: f32, x: f32| ((y - cy).abs() - s0 - ry).max((x - cx).abs() - s1 - rx) < 0.0;
    for y in 0..h {
        for x in 0..w {
            let (fy, fx) = (y as f32, x as f32);
            let r = (((fy - cy) / ry).powi(2) + ((fx - cx) / rx).powi(2)).sqrt();
            // 1 inside the ellipse, falling to 0 over about a pixel at its edge.
            let ink = (1.0 - (r - 1.0) * ry.min(rx)).clamp(0.0, 1.0);
            let base = if square(fy, fx) { grey } else { -1.0 };
            img[y * w + x] = base + (1.0 - base) * ink;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn image() -> Tensor {
        // A 1-pixel vertical stroke in the middle of an 8×8 black image.
        let mut v = vec![-1f32; 64];
        for y in 2..6 {
            v[y * 8 + 4] = 1.0;
        }
        Tensor::from_vec(v, (1, 1, 8, 8), &Device::Cpu).unwrap()
    }

    fn values(x: &Tensor) -> Vec<f32> {
        x.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn each_degradation_does_what_it_says() {
        let x = image();
        let d = values(&Degradation::Dilate.apply(&x, 0).unwrap());
        // The stroke is three pixels wide and a row longer at each end.
        assert_eq!(d.iter().filter(|&&v| v == 1.0).count(), 3 * 6);
        let g = values(&Degradation::GreyBackground.apply(&x, 0).unwrap());
        assert_eq!(g.iter().filter(|&&v| v == -0.4).count(), 60);
        let b = values(&Degradation::Blur.apply(&x, 0).unwrap());
        // Inside the stroke: (2 + 4 + 2) of 16 weights white, 8 black -> 0; beside it: 4 of 16.
        assert!((b[3 * 8 + 4] - 0.0).abs() < 1e-6 && (b[3 * 8 + 3] + 0.5).abs() < 1e-6);
        let n = values(&Degradation::Noise.apply(&x, 0).unwrap());
        let diff: Vec<f32> = n.iter().zip(values(&x)).map(|(a, b)| a - b).collect();
        assert!(diff.iter().any(|&d| d != 0.0) && n.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert_eq!(n, values(&Degradation::Noise.apply(&x, 0).unwrap()));
        assert_ne!(n, values(&Degradation::Noise.apply(&x, 1).unwrap()));
    }

    #[test]
    fn blobs_replace_twelve_percent_with_grey_squares() {
        let x = Tensor::full(-1f32, (100, 1, 28, 28), &Device::Cpu).unwrap();
        let y = values(&Degradation::Blobs.apply(&x, 3).unwrap());
        let changed: Vec<&[f32]> = y
            .chunks(784)
            .filter(|c| c.iter().any(|&v| v != -1.0))
            .collect();
        assert_eq!(changed.len(), 12);
        for c in changed {
            // A white centre, grey square pixels, black corners.
            assert!(c[14 * 28 + 14] > 0.9);
            assert!(c.iter().any(|&v| (-0.6..-0.2).contains(&v)));
            assert_eq!(c[0], -1.0);
        }
        let e = Degradation::Blur
            .apply(
                &Tensor::zeros((1, 3, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
                0,
            )
            .unwrap_err();
        assert!(e.to_string().contains("3 channels"), "{e}");
    }
}
