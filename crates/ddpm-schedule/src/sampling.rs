//! Ancestral (DDPM) and DDIM sampling steps and loops, the loop of the multistep ODE solvers,
//! and the bits/dim loop.

use crate::solvers::{Multistep, OdeSolver};
use crate::{GaussianDiffusion, NoiseSource, Result, ScheduleError};
use candle_core::{Tensor, D};
use ddpm_math::mean_flat;
use std::str::FromStr;

/// The result of one sampling step.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// x_{t-1} (x_{t+1} for the reverse DDIM step).
    pub sample: Tensor,
    /// The model's prediction of x_0 at this step.
    pub pred_xstart: Tensor,
}

/// What a sampling loop reports after each step.
#[derive(Debug)]
pub struct SampleStep<'a> {
    /// Steps done so far, from 1 to `total`.
    pub step: usize,
    /// Number of steps of the loop.
    pub total: usize,
    /// The (respaced) timestep index just sampled from.
    pub t: usize,
    /// The new sample x_{t-1} (for UniPC, before the next evaluation corrects it).
    pub sample: &'a Tensor,
    /// The prediction of x_0 at this step.
    pub pred_xstart: &'a Tensor,
}

/// Which reverse process a loop runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplingMethod {
    /// Ancestral sampling of Ho et al.
    Ddpm,
    /// DDIM with the given eta (0 is deterministic).
    Ddim {
        /// Scale of the noise added at each step.
        eta: f64,
    },
    /// DPM-Solver++(2M) (Lu et al. 2022), a deterministic second-order multistep ODE solver.
    DpmSolverPp2m,
    /// UniPC (Zhao et al. 2023), bh2, order 2: UniP-2 predictor and UniC corrector, deterministic.
    UniPc,
}

impl FromStr for SamplingMethod {
    type Err = ScheduleError;
    /// Parses a sampler name; "ddim" is DDIM with eta 0.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ddpm" => Ok(Self::Ddpm),
            "ddim" => Ok(Self::Ddim { eta: 0.0 }),
            "dpm++2m" => Ok(Self::DpmSolverPp2m),
            "unipc" => Ok(Self::UniPc),
            other => Err(ScheduleError::UnknownSetting {
                what: "solver",
                value: other.to_string(),
                expected: "ddpm, ddim, dpm++2m, unipc",
            }),
        }
    }
}

impl SamplingMethod {
    /// The name used in configs and on the command line (DDIM's eta is not part of it).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddpm => "ddpm",
            Self::Ddim { .. } => "ddim",
            Self::DpmSolverPp2m => "dpm++2m",
            Self::UniPc => "unipc",
        }
    }

    /// The multistep ODE solver this sampler runs, if it is one.
    fn ode_solver(self) -> Option<OdeSolver> {
        match self {
            Self::Ddpm | Self::Ddim { .. } => None,
            Self::DpmSolverPp2m => Some(OdeSolver::DpmSolverPp2m),
            Self::UniPc => Some(OdeSolver::UniPc),
        }
    }
}

/// Terms of the full variational bound, from [`GaussianDiffusion::calc_bpd_loop`].
#[derive(Debug, Clone)]
pub struct BpdTerms {
    /// Total bound in bits/dim, shape `[B]`.
    pub total_bpd: Tensor,
    /// The prior term, shape `[B]`.
    pub prior_bpd: Tensor,
    /// vb terms, shape [B, T] (column t is timestep t).
    pub vb: Tensor,
    /// MSE of the predicted x_0, shape [B, T].
    pub xstart_mse: Tensor,
    /// MSE of the implied eps, shape [B, T].
    pub mse: Tensor,
}

impl GaussianDiffusion {
    fn nonzero_mask(&self, t: &[usize], x: &Tensor) -> Result<Tensor> {
        self.coef("nonzero_mask", t, x, |i| if i == 0 { 0.0 } else { 1.0 })
    }

    /// One ancestral step: x_{t-1} = mean + exp(log_variance / 2) · noise, with no noise at t = 0.
    pub fn p_sample(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &[usize],
        noise: &Tensor,
        clip_denoised: bool,
    ) -> Result<StepOutput> {
        let out = self.p_mean_variance(model_output, x_t, t, clip_denoised)?;
        let std = out.log_variance.affine(0.5, 0.0)?.exp()?;
        let scaled = std.mul(noise)?.broadcast_mul(&self.nonzero_mask(t, x_t)?)?;
        Ok(StepOutput {
            sample: (out.mean + scaled)?,
            pred_xstart: out.pred_xstart,
        })
    }

    /// One DDIM step (Song et al., eq. 12) with eps re-derived from the (clipped) x_0 prediction.
    pub fn ddim_sample(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &[usize],
        noise: &Tensor,
        clip_denoised: bool,
        eta: f64,
    ) -> Result<StepOutput> {
        let out = self.p_mean_variance(model_output, x_t, t, clip_denoised)?;
        let eps = self.predict_eps_from_xstart(x_t, t, &out.pred_xstart)?;
        let s = self.schedule();
        let sigma = |i: usize| {
            let (ab, abp) = (s.alphas_cumprod[i], s.alphas_cumprod_prev[i]);
            eta * ((1.0 - abp) / (1.0 - ab)).sqrt() * (1.0 - ab / abp).sqrt()
        };
        let op = "ddim_sample";
        let c_x0 = self.coef(op, t, x_t, |i| s.alphas_cumprod_prev[i].sqrt())?;
        let c_eps = self.coef(op, t, x_t, |i| {
            (1.0 - s.alphas_cumprod_prev[i] - sigma(i).powi(2)).sqrt()
        })?;
        let c_noise = self.coef(op, t, x_t, |i| if i == 0 { 0.0 } else { sigma(i) })?;
        let sample = ((c_x0.broadcast_mul(&out.pred_xstart)? + c_eps.broadcast_mul(&eps)?)?
            + c_noise.broadcast_mul(noise)?)?;
        Ok(StepOutput {
            sample,
            pred_xstart: out.pred_xstart,
        })
    }

    /// One deterministic reverse DDIM step, x_t to x_{t+1} (the ODE run forwards).
    pub fn ddim_reverse_sample(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &[usize],
        clip_denoised: bool,
    ) -> Result<StepOutput> {
        let out = self.p_mean_variance(model_output, x_t, t, clip_denoised)?;
        let eps = self.predict_eps_from_xstart(x_t, t, &out.pred_xstart)?;
        let s = self.schedule();
        let c_x0 = self.coef("ddim_reverse_sample", t, x_t, |i| {
            s.alphas_cumprod_next[i].sqrt()
        })?;
        let c_eps = self.coef("ddim_reverse_sample", t, x_t, |i| {
            (1.0 - s.alphas_cumprod_next[i]).sqrt()
        })?;
        let sample = (c_x0.broadcast_mul(&out.pred_xstart)? + c_eps.broadcast_mul(&eps)?)?;
        Ok(StepOutput {
            sample,
            pred_xstart: out.pred_xstart,
        })
    }

    /// Runs the reverse process from `x_start_noise` (x_T) down to x_0.
    ///
    /// `model(x_t, model_timesteps)` gives the model output; `noise` supplies each step's noise
    /// (the ODE solvers draw none); `on_step` sees every intermediate sample (for progress bars
    /// and recording the chain). Every sampler calls the model once per timestep.
    pub fn sample_loop<F, C>(
        &self,
        mut model: F,
        x_start_noise: Tensor,
        sampler: SamplingMethod,
        clip_denoised: bool,
        noise: &mut dyn NoiseSource,
        mut on_step: C,
    ) -> Result<Tensor>
    where
        F: FnMut(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
        C: FnMut(&SampleStep<'_>),
    {
        let mut img = x_start_noise;
        let batch = img.dims().first().copied().unwrap_or(0);
        let total = self.num_timesteps();
        let mut ode = sampler.ode_solver().map(Multistep::new);
        for (k, i) in (0..total).rev().enumerate() {
            let t = vec![i; batch];
            let ts = self.model_timestep_tensor(&t, img.dtype(), img.device())?;
            let model_output = model(&img, &ts)?.detach();
            let out = match (sampler, ode.as_mut()) {
                (SamplingMethod::Ddpm, _) => {
                    let z = noise.noise(img.shape(), img.dtype(), img.device())?;
                    self.p_sample(&model_output, &img, &t, &z, clip_denoised)?
                }
                (SamplingMethod::Ddim { eta }, _) => {
                    let z = noise.noise(img.shape(), img.dtype(), img.device())?;
                    self.ddim_sample(&model_output, &img, &t, &z, clip_denoised, eta)?
                }
                (_, Some(ode)) => {
                    let pred_xstart = self
                        .p_mean_variance(&model_output, &img, &t, clip_denoised)?
                        .pred_xstart;
                    let sample = ode.step(self.schedule(), &img, i, &pred_xstart)?;
                    StepOutput {
                        sample,
                        pred_xstart,
                    }
                }
                (_, None) => unreachable!("every ODE sampler has a solver"),
            };
            on_step(&SampleStep {
                step: k + 1,
                total,
                t: i,
                sample: &out.sample,
                pred_xstart: &out.pred_xstart,
            });
            img = out.sample;
        }
        Ok(img)
    }

    /// The ancestral sampling loop (the original's `p_sample_loop`).
    pub fn p_sample_loop<F, C>(
        &self,
        model: F,
        x_start_noise: Tensor,
        clip_denoised: bool,
        noise: &mut dyn NoiseSource,
        on_step: C,
    ) -> Result<Tensor>
    where
        F: FnMut(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
        C: FnMut(&SampleStep<'_>),
    {
        self.sample_loop(
            model,
            x_start_noise,
            SamplingMethod::Ddpm,
            clip_denoised,
            noise,
            on_step,
        )
    }

    /// The DDIM sampling loop (the original's `ddim_sample_loop`).
    #[allow(clippy::too_many_arguments)]
    pub fn ddim_sample_loop<F, C>(
        &self,
        model: F,
        x_start_noise: Tensor,
        clip_denoised: bool,
        eta: f64,
        noise: &mut dyn NoiseSource,
        on_step: C,
    ) -> Result<Tensor>
    where
        F: FnMut(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
        C: FnMut(&SampleStep<'_>),
    {
        self.sample_loop(
            model,
            x_start_noise,
            SamplingMethod::Ddim { eta },
            clip_denoised,
            noise,
            on_step,
        )
    }

    /// The full variational bound of `x_start` in bits/dim, with fresh noise at every timestep.
    ///
    /// `on_step(done, total)` reports progress.
    pub fn calc_bpd_loop<F>(
        &self,
        mut model: F,
        x_start: &Tensor,
        clip_denoised: bool,
        noise: &mut dyn NoiseSource,
        mut on_step: impl FnMut(usize, usize),
    ) -> Result<BpdTerms>
    where
        F: FnMut(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    {
        let batch = x_start.dims().first().copied().unwrap_or(0);
        let total = self.num_timesteps();
        let (mut vb, mut xstart_mse, mut mse) = (Vec::new(), Vec::new(), Vec::new());
        for (k, i) in (0..total).rev().enumerate() {
            let t = vec![i; batch];
            let eps = noise.noise(x_start.shape(), x_start.dtype(), x_start.device())?;
            let x_t = self.q_sample(x_start, &t, &eps)?;
            let ts = self.model_timestep_tensor(&t, x_t.dtype(), x_t.device())?;
            let model_output = model(&x_t, &ts)?.detach();
            let (term, pred_xstart) =
                self.vb_terms_bpd(&model_output, x_start, &x_t, &t, clip_denoised)?;
            xstart_mse.push(mean_flat(&(&pred_xstart - x_start)?.sqr()?)?);
            let pred_eps = self.predict_eps_from_xstart(&x_t, &t, &pred_xstart)?;
            mse.push(mean_flat(&(pred_eps - &eps)?.sqr()?)?);
            vb.push(term);
            on_step(k + 1, total);
        }
        // Collected from t = T-1 down to 0; column t must be timestep t.
        for v in [&mut vb, &mut xstart_mse, &mut mse] {
            v.reverse();
        }
        let vb = Tensor::stack(&vb, 1)?;
        let prior_bpd = self.prior_bpd(x_start)?;
        let total_bpd = (vb.sum(D::Minus1)? + &prior_bpd)?;
        Ok(BpdTerms {
            total_bpd,
            prior_bpd,
            vb,
            xstart_mse: Tensor::stack(&xstart_mse, 1)?,
            mse: Tensor::stack(&mse, 1)?,
        })
    }
}
