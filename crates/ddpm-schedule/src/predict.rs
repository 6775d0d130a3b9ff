//! Conversions between the model's parameterisations (eps, x_0, v) and the SNR weights.

use crate::{GaussianDiffusion, ModelMeanType, Result};
use candle_core::Tensor;

impl GaussianDiffusion {
    /// x_0 predicted from x_t and the predicted noise.
    pub fn predict_xstart_from_eps(
        &self,
        x_t: &Tensor,
        t: &[usize],
        eps: &Tensor,
    ) -> Result<Tensor> {
        Self::check_same("predict_xstart_from_eps", x_t, eps)?;
        let s = self.schedule();
        let a = self.table_coef(
            "predict_xstart_from_eps",
            &s.sqrt_recip_alphas_cumprod,
            t,
            x_t,
        )?;
        let b = self.table_coef(
            "predict_xstart_from_eps",
            &s.sqrt_recipm1_alphas_cumprod,
            t,
            x_t,
        )?;
        Ok((a.broadcast_mul(x_t)? - b.broadcast_mul(eps)?)?)
    }

    /// The noise implied by x_t and a prediction of x_0.
    pub fn predict_eps_from_xstart(
        &self,
        x_t: &Tensor,
        t: &[usize],
        pred_xstart: &Tensor,
    ) -> Result<Tensor> {
        Self::check_same("predict_eps_from_xstart", x_t, pred_xstart)?;
        let s = self.schedule();
        let a = self.table_coef(
            "predict_eps_from_xstart",
            &s.sqrt_recip_alphas_cumprod,
            t,
            x_t,
        )?;
        let b = self.table_coef(
            "predict_eps_from_xstart",
            &s.sqrt_recipm1_alphas_cumprod,
            t,
            x_t,
        )?;
        Ok((a.broadcast_mul(x_t)? - pred_xstart)?.broadcast_div(&b)?)
    }

    /// The velocity target v = sqrt(alpha_bar_t)·eps - sqrt(1 - alpha_bar_t)·x_0.
    pub fn predict_v(&self, x_start: &Tensor, t: &[usize], noise: &Tensor) -> Result<Tensor> {
        Self::check_same("predict_v", x_start, noise)?;
        let s = self.schedule();
        let a = self.table_coef("predict_v", &s.sqrt_alphas_cumprod, t, x_start)?;
        let b = self.table_coef("predict_v", &s.sqrt_one_minus_alphas_cumprod, t, x_start)?;
        Ok((a.broadcast_mul(noise)? - b.broadcast_mul(x_start)?)?)
    }

    /// x_0 from x_t and a predicted velocity: sqrt(alpha_bar_t)·x_t - sqrt(1 - alpha_bar_t)·v.
    pub fn predict_xstart_from_v(&self, x_t: &Tensor, t: &[usize], v: &Tensor) -> Result<Tensor> {
        Self::check_same("predict_xstart_from_v", x_t, v)?;
        let s = self.schedule();
        let a = self.table_coef("predict_xstart_from_v", &s.sqrt_alphas_cumprod, t, x_t)?;
        let b = self.table_coef(
            "predict_xstart_from_v",
            &s.sqrt_one_minus_alphas_cumprod,
            t,
            x_t,
        )?;
        Ok((a.broadcast_mul(x_t)? - b.broadcast_mul(v)?)?)
    }

    /// eps from x_t and a predicted velocity: sqrt(1 - alpha_bar_t)·x_t + sqrt(alpha_bar_t)·v.
    pub fn predict_eps_from_v(&self, x_t: &Tensor, t: &[usize], v: &Tensor) -> Result<Tensor> {
        Self::check_same("predict_eps_from_v", x_t, v)?;
        let s = self.schedule();
        let a = self.table_coef(
            "predict_eps_from_v",
            &s.sqrt_one_minus_alphas_cumprod,
            t,
            x_t,
        )?;
        let b = self.table_coef("predict_eps_from_v", &s.sqrt_alphas_cumprod, t, x_t)?;
        Ok((a.broadcast_mul(x_t)? + b.broadcast_mul(v)?)?)
    }

    /// Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of (respaced) timestep `t`.
    pub fn snr(&self, t: usize) -> f64 {
        let ab = self.schedule().alphas_cumprod[t];
        ab / (1.0 - ab)
    }

    /// The Min-SNR-γ weight of the mse term at timestep `t` for this model's mean type:
    /// min(SNR, γ)/SNR for eps, min(SNR, γ) for x_0, min(SNR, γ)/(SNR + 1) for v.
    /// These make the three parameterisations the same loss on x_0, clamped at SNR γ.
    pub fn snr_weight(&self, t: usize, gamma: f64) -> f64 {
        let snr = self.snr(t);
        let clamped = snr.min(gamma);
        match self.model_mean_type {
            ModelMeanType::Epsilon => clamped / snr,
            ModelMeanType::StartX => clamped,
            ModelMeanType::V => clamped / (snr + 1.0),
        }
    }
}
