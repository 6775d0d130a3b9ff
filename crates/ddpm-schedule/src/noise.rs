//! Reproducible noise: Candle cannot seed its CPU RNG, so noise comes from our own generators.

use crate::Result;
use candle_core::{DType, Device, Shape, Tensor};
use rand::Rng;
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
