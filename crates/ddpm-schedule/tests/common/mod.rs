//! The Gaussian toy problem the process tests share: every pixel is independent N(0, S0²), so
//! q(x_t) = N(0, v_t) with v_t = alpha_bar_t·S0² + 1 - alpha_bar_t and the optimal model is known
//! exactly for every parameterisation.

use candle_core::{DType, Tensor};
use ddpm_schedule::{GaussianDiffusion, ModelMeanType};

/// Standard deviation of the data.
pub const S0: f64 = 0.25;

/// Largest absolute difference of two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// v_t, the variance of x_t, for alpha_bar_t = `ab`.
pub fn v(ab: f64) -> f64 {
    ab * S0 * S0 + 1.0 - ab
}

/// The exact model for Gaussian data: eps, x_0 or v as the model predicts, plus the true reverse
/// log variance when the variance is learned.
pub fn exact_model(
    d: &GaussianDiffusion,
) -> impl FnMut(&Tensor, &Tensor) -> candle_core::Result<Tensor> + '_ {
    move |x_t, ts| {
        let s = d.schedule();
        let ts: Vec<f64> = ts.to_dtype(DType::F64)?.to_vec1()?;
        // The model sees original timesteps; map them back to respaced indices.
        let idx: Vec<usize> = ts
            .iter()
            .map(|&m| {
                d.spaced()
                    .timestep_map
                    .iter()
                    .position(|&o| {
                        (o as f64 * 1000.0 / d.spaced().original_num_steps as f64 - m).abs() < 1e-6
                    })
                    .unwrap()
            })
            .collect();
        let b = x_t.dims()[0];
        let coef: Vec<f64> = idx
            .iter()
            .map(|&i| {
                let ab = s.alphas_cumprod[i];
                match d.model_mean_type {
                    ModelMeanType::StartX => ab.sqrt() * S0 * S0 / v(ab),
                    // v = sqrt(alpha_bar)·eps - sqrt(1 - alpha_bar)·x_0.
                    ModelMeanType::V => (ab * (1.0 - ab)).sqrt() * (1.0 - S0 * S0) / v(ab),
                    ModelMeanType::Epsilon => (1.0 - ab).sqrt() / v(ab),
                }
            })
            .collect();
        let mean = x_t.broadcast_mul(
            &Tensor::from_vec(coef, (b, 1, 1, 1), x_t.device())?.to_dtype(x_t.dtype())?,
        )?;
        if !d.model_var_type.is_learned() {
            return Ok(mean);
        }
        let log_var: Vec<f64> = idx
            .iter()
            .map(|&i| {
                let (vt, vp) = (v(s.alphas_cumprod[i]), v(s.alphas_cumprod_prev[i]));
                (vp - (1.0 - s.betas[i]) * vp * vp / vt).ln()
            })
            .collect();
        let lv = Tensor::from_vec(log_var, (b, 1, 1, 1), x_t.device())?
            .to_dtype(x_t.dtype())?
            .broadcast_as(x_t.shape())?;
        Tensor::cat(&[&mean, &lv], 1)
    }
}
