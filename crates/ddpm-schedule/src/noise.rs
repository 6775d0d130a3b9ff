//! Reproducible noise: Candle cannot seed its CPU RNG, so noise comes from our own generators.

use crate::Result;
use candle_core::{DType, Device, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::collections::VecDeque;

/// Standard normal noise of `shape`, drawn from `rng` (f64 draws, then cast to `dtype`).
pub fn randn<R: Rng + ?Sized>(
    rng: &mut R,
    shape: impl Into<Shape>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    let v: Vec<f64> = (0..shape.elem_count())
        .map(|_| rng.sample(StandardNormal))
        .collect();
    Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
}

/// What a seeded sampling batch starts from: its labels, x_T and the stream of its step noise.
#[derive(Debug)]
pub struct BatchStart<R> {
    /// One label per sample for a conditional model (None: unconditional).
    pub labels: Option<Vec<u32>>,
    /// The starting noise x_T, [n, C, H, W] f32.
    pub x_t: Tensor,
    /// The noise of the sampler's steps, from its own generator.
    pub noise: RngNoise<R>,
}

impl<R: Rng + SeedableRng> BatchStart<R> {
    /// Draws a batch of `n` samples of `chw` from `rng`: the labels (`class`, or uniform over
    /// `classes` when `class` is None; none for an unconditional model), then x_T, then the seed
    /// of the step noise. Every front end (the CLI, the figures, the web page) draws in this
    /// order, so the same seed gives the same samples in each.
    pub fn draw(
        rng: &mut R,
        n: usize,
        chw: (usize, usize, usize),
        classes: Option<usize>,
        class: Option<u32>,
        device: &Device,
    ) -> Result<Self> {
        let labels = classes.map(|k| {
            (0..n)
                .map(|_| class.unwrap_or_else(|| rng.random_range(0..k as u32)))
                .collect()
        });
        let (c, h, w) = chw;
        let x_t = randn(rng, (n, c, h, w), DType::F32, device)?;
        let noise = RngNoise(R::seed_from_u64(rng.random()));
        Ok(Self { labels, x_t, noise })
    }

    /// The labels as a u32 tensor on `device` (None for an unconditional batch).
    pub fn label_tensor(&self, device: &Device) -> Result<Option<Tensor>> {
        Ok(match &self.labels {
            Some(v) => Some(Tensor::from_vec(v.clone(), v.len(), device)?),
            None => None,
        })
    }
}

/// Where the sampling loops get their noise from.
pub trait NoiseSource {
    /// Standard normal noise of the given shape, dtype and device.
    fn noise(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor>;
}

/// Noise drawn from a seeded random number generator.
#[derive(Debug, Clone)]
pub struct RngNoise<R>(pub R);

impl<R: Rng> NoiseSource for RngNoise<R> {
    fn noise(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        randn(&mut self.0, shape.clone(), dtype, device)
    }
}

/// Caller-supplied noise tensors, handed out in order.
#[derive(Debug, Clone, Default)]
pub struct FixedNoise(pub VecDeque<Tensor>);

impl NoiseSource for FixedNoise {
    fn noise(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self
            .0
            .pop_front()
            .ok_or_else(|| crate::ScheduleError::Shape {
                op: "FixedNoise",
                detail: "ran out of caller-supplied noise tensors".into(),
            })?;
        if t.shape() != shape {
            return Err(crate::ScheduleError::Shape {
                op: "FixedNoise",
                detail: format!(
                    "noise of shape {:?} where {:?} is needed",
                    t.dims(),
                    shape.dims()
                ),
            });
        }
        Ok(t.to_device(device)?.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;

    /// The order is the contract: labels, then x_T, then the step noise's seed, all from one
    /// generator, which is left where the next batch starts.
    #[test]
    fn a_batch_draws_labels_then_x_t_then_the_noise_seed() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut manual = rng.clone();
        let b = BatchStart::draw(&mut rng, 4, (1, 2, 2), Some(10), None, &dev).unwrap();
        let labels: Vec<u32> = (0..4).map(|_| manual.random_range(0..10u32)).collect();
        let x_t = randn(&mut manual, (4, 1, 2, 2), DType::F32, &dev).unwrap();
        let mut noise = RngNoise(ChaCha8Rng::seed_from_u64(manual.random()));
        assert_eq!(b.labels.as_deref(), Some(&labels[..]));
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&b.x_t), flat(&x_t));
        let shape = Shape::from((2, 3));
        let mut b_noise = b.noise;
        assert_eq!(
            flat(&b_noise.noise(&shape, DType::F32, &dev).unwrap()),
            flat(&noise.noise(&shape, DType::F32, &dev).unwrap())
        );
        assert_eq!(rng.random::<u64>(), manual.random::<u64>());

        // A fixed class draws no labels; an unconditional batch has none.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let b = BatchStart::draw(&mut rng, 2, (1, 2, 2), Some(10), Some(7), &dev).unwrap();
        assert_eq!(b.labels.as_deref(), Some(&[7, 7][..]));
        let mut rng2 = ChaCha8Rng::seed_from_u64(3);
        let u = BatchStart::draw(&mut rng2, 2, (1, 2, 2), None, None, &dev).unwrap();
        assert!(u.labels.is_none() && u.label_tensor(&dev).unwrap().is_none());
        assert_eq!(flat(&b.x_t), flat(&u.x_t));
        assert_eq!(
            b.label_tensor(&dev)
                .unwrap()
                .unwrap()
                .to_vec1::<u32>()
                .unwrap(),
            [7, 7]
        );
    }
}
