//! Sampling any [`Denoiser`] with a check on every model output.

use crate::Result;
use candle_core::{DType, Tensor};
use ddpm_schedule::{Denoiser, GaussianDiffusion, NoiseSource, SampleStep, SamplingMethod};

/// Runs the sampling method `method` from `x_t` with `model` (labels `y` for a conditional model) and returns x_0.
///
/// A NaN or infinite model output would end as a black image; instead sampling stops with an
/// error naming the step and the model timestep where it happened.
#[allow(clippy::too_many_arguments)]
pub fn sample_checked<M: Denoiser>(
    model: &M,
    diffusion: &GaussianDiffusion,
    x_t: Tensor,
    method: SamplingMethod,
    y: Option<&Tensor>,
    clip_denoised: bool,
    noise: &mut dyn NoiseSource,
    on_step: impl FnMut(&SampleStep<'_>),
) -> Result<Tensor> {
    let total = diffusion.num_timesteps();
    let mut calls = 0usize;
    let checked = |x: &Tensor, ts: &Tensor| {
        calls += 1;
        let out = model.denoise(x, ts, y, false)?;
        let sum = out.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !sum.is_finite() {
            let t = ts.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            candle_core::bail!(
                "the model's output is not finite at sampling step {calls} of {total} \
                 (model timestep {}); the weights may hold NaN or infinite values",
                t.first().copied().unwrap_or(f64::NAN)
            );
        }
        Ok(out)
    };
    Ok(diffusion.sample_loop(checked, x_t, method, clip_denoised, noise, on_step)?)
}
