//! The Gaussian diffusion process: q, the posterior, p_mean_variance, vb terms and losses.

use crate::{BetaSchedule, Result, Schedule, ScheduleError, SpacedSchedule};
use candle_core::{DType, Device, Tensor};
use ddpm_math::{discretized_gaussian_log_likelihood, mean_flat, normal_kl};
use std::f64::consts::LN_2;
use std::str::FromStr;

/// What the model predicts as its mean output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelMeanType {
    /// The noise eps added to x_0 (Ho et al.).
    Epsilon,
    /// x_0 itself.
    StartX,
    /// The velocity v = sqrt(alpha_bar)·eps - sqrt(1 - alpha_bar)·x_0 (Salimans & Ho 2022).
    V,
}

/// How the model's output variance is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelVarType {
    /// The posterior variance beta-tilde_t.
    FixedSmall,
    /// beta_t (`posterior_variance[1]` at t = 0, for a better decoder likelihood).
    FixedLarge,
    /// The model outputs the log variance.
    Learned,
    /// The model outputs v in [-1, 1], interpolating log variance between beta-tilde_t and beta_t.
    LearnedRange,
}

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossType {
    /// MSE on the mean, plus the vb term when the variance is learned.
    Mse,
    /// MSE plus the vb term scaled by T/1000 (Improved DDPM's hybrid loss).
    RescaledMse,
    /// The variational bound term.
    Kl,
    /// The variational bound term times T, an estimate of the full bound.
    RescaledKl,
}

macro_rules! named_enum {
    ($ty:ident, $what:literal, $expected:literal, $($name:literal => $var:ident),+) => {
        impl FromStr for $ty {
            type Err = ScheduleError;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($name => Ok(Self::$var),)+
                    other => Err(ScheduleError::UnknownSetting {
                        what: $what,
                        value: other.to_string(),
                        expected: $expected,
                    }),
                }
            }
        }
        impl $ty {
            /// The name used in configs and on the command line.
            pub fn name(self) -> &'static str {
                match self { $(Self::$var => $name,)+ }
            }
        }
    };
}
named_enum!(ModelMeanType, "model mean type", "eps, x0, v", "eps" => Epsilon, "x0" => StartX,
    "v" => V);
named_enum!(ModelVarType, "model variance type", "fixed_small, fixed_large, learned, learned_range",
    "fixed_small" => FixedSmall, "fixed_large" => FixedLarge, "learned" => Learned,
    "learned_range" => LearnedRange);
named_enum!(LossType, "loss type", "mse, rescaled_mse, kl, rescaled_kl",
    "mse" => Mse, "rescaled_mse" => RescaledMse, "kl" => Kl, "rescaled_kl" => RescaledKl);

impl ModelVarType {
    /// Whether the model outputs variance channels (2·C output channels).
    pub fn is_learned(self) -> bool {
        matches!(self, Self::Learned | Self::LearnedRange)
    }
}

impl LossType {
    /// Whether the loss is the variational bound itself.
    pub fn is_vb(self) -> bool {
        matches!(self, Self::Kl | Self::RescaledKl)
    }
}

/// Everything that defines a diffusion process, as the original's `create_gaussian_diffusion`.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusionConfig {
    /// Named beta schedule.
    pub beta_schedule: BetaSchedule,
    /// Number of steps T of the full process.
    pub num_timesteps: usize,
    /// Respacing spec ("" keeps every step; see [`crate::space_timesteps`]).
    pub respacing: String,
    /// What the model predicts as its mean.
    pub model_mean_type: ModelMeanType,
    /// How the variance is obtained.
    pub model_var_type: ModelVarType,
    /// The training objective.
    pub loss_type: LossType,
    /// Min-SNR-γ weighting of the mse term (Hang et al. 2023; None = unweighted, as the original).
    pub snr_gamma: Option<f64>,
}

impl DiffusionConfig {
    /// Ho et al.'s recipe, for a plain epsilon network (one output channel per image channel):
    /// linear schedule, 1000 steps, eps, fixed variance beta_t, MSE loss.
    pub fn ddpm() -> Self {
        Self {
            beta_schedule: BetaSchedule::Linear,
            model_var_type: ModelVarType::FixedLarge,
            loss_type: LossType::Mse,
            ..Self::default()
        }
    }

    /// Channels the model must output for images of `image_channels` channels: twice as many
    /// when it also outputs the variance.
    pub fn model_output_channels(&self, image_channels: usize) -> usize {
        if self.model_var_type.is_learned() {
            2 * image_channels
        } else {
            image_channels
        }
    }
}

impl Default for DiffusionConfig {
    /// Improved DDPM's recipe: cosine schedule, 1000 steps, eps, learned-range sigma, hybrid loss.
    /// The model outputs eps and the variance (see [`Self::model_output_channels`]); for a plain
    /// epsilon network use [`DiffusionConfig::ddpm`].
    fn default() -> Self {
        Self {
            beta_schedule: BetaSchedule::Cosine,
            num_timesteps: 1000,
            respacing: String::new(),
            model_mean_type: ModelMeanType::Epsilon,
            model_var_type: ModelVarType::LearnedRange,
            loss_type: LossType::RescaledMse,
            snr_gamma: None,
        }
    }
}

/// A mean, variance and log variance, each of the image's shape.
#[derive(Debug, Clone)]
pub struct MeanVariance {
    /// The mean.
    pub mean: Tensor,
    /// The variance.
    pub variance: Tensor,
    /// Its log.
    pub log_variance: Tensor,
}

/// The posterior q(x_{t-1} | x_t, x_0).
pub type PosteriorMeanVariance = MeanVariance;

/// The output of [`GaussianDiffusion::p_mean_variance`].
#[derive(Debug, Clone)]
pub struct PMeanVariance {
    /// Mean of p(x_{t-1} | x_t).
    pub mean: Tensor,
    /// Its variance.
    pub variance: Tensor,
    /// Its log variance.
    pub log_variance: Tensor,
    /// The model's prediction of x_0.
    pub pred_xstart: Tensor,
}

/// Per-example training loss terms.
#[derive(Debug, Clone)]
pub struct LossTerms {
    /// The total loss, shape `[B]`.
    pub loss: Tensor,
    /// The mean-squared error term as it enters the loss (Min-SNR-weighted when γ is set;
    /// absent for the kl losses).
    pub mse: Option<Tensor>,
    /// The variational-bound term of an mse loss with a learned variance (absent for a fixed
    /// variance, and for the kl losses, whose `loss` is the bound itself).
    pub vb: Option<Tensor>,
}

/// A Gaussian diffusion process on a full or respaced schedule (the original's SpacedDiffusion).
///
/// Timesteps `t` are indices into the (respaced) schedule, one per batch element; the model is
/// always called with the original timestep scaled to 0..1000 ([`Self::model_timesteps`]).
#[derive(Debug, Clone)]
pub struct GaussianDiffusion {
    spaced: SpacedSchedule,
    /// What the model predicts as its mean.
    pub model_mean_type: ModelMeanType,
    /// How the variance is obtained.
    pub model_var_type: ModelVarType,
    /// The training objective.
    pub loss_type: LossType,
    /// Min-SNR-γ weighting of the mse term (None: unweighted).
    pub snr_gamma: Option<f64>,
}

impl GaussianDiffusion {
    /// Builds the process described by `cfg`.
    pub fn new(cfg: &DiffusionConfig) -> Result<Self> {
        let base = Schedule::named(cfg.beta_schedule, cfg.num_timesteps)?;
        let d = Self::from_spaced(
            base.respace_spec(&cfg.respacing)?,
            cfg.model_mean_type,
            cfg.model_var_type,
            cfg.loss_type,
        );
        d.with_snr_gamma(cfg.snr_gamma)
    }

    /// The same process with Min-SNR-γ weighting of its mse term (γ must be positive).
    pub fn with_snr_gamma(mut self, snr_gamma: Option<f64>) -> Result<Self> {
        Self::check_snr_gamma(snr_gamma)?;
        self.snr_gamma = snr_gamma;
        Ok(self)
    }

    /// Checks a Min-SNR-γ setting: γ must be positive and finite (None: no weighting).
    pub fn check_snr_gamma(snr_gamma: Option<f64>) -> Result<()> {
        match snr_gamma {
            Some(g) if !(g > 0.0 && g.is_finite()) => Err(ScheduleError::BadSetting {
                what: "snr gamma",
                value: g.to_string(),
                reason: "must be positive and finite",
            }),
            _ => Ok(()),
        }
    }

    /// Builds a process from an already respaced schedule.
    pub fn from_spaced(
        spaced: SpacedSchedule,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
    ) -> Self {
        Self {
            spaced,
            model_mean_type,
            model_var_type,
            loss_type,
            snr_gamma: None,
        }
    }

    /// The schedule's tables.
    pub fn schedule(&self) -> &Schedule {
        &self.spaced.schedule
    }

    /// The respaced schedule with its timestep map.
    pub fn spaced(&self) -> &SpacedSchedule {
        &self.spaced
    }

    /// Number of (respaced) timesteps.
    pub fn num_timesteps(&self) -> usize {
        self.spaced.num_timesteps()
    }

    /// The timesteps the model receives for indices `t`: original steps scaled by 1000/T.
    pub fn model_timesteps(&self, t: &[usize]) -> Vec<f64> {
        t.iter().map(|&i| self.spaced.model_timestep(i)).collect()
    }

    /// [`Self::model_timesteps`] as a tensor of shape `[B]` in `dtype` on `device`.
    pub fn model_timestep_tensor(
        &self,
        t: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let ts = self.model_timesteps(t);
        Ok(Tensor::from_vec(ts, t.len(), device)?.to_dtype(dtype)?)
    }

    /// Per-batch coefficients f(t_i) as a tensor [B, 1, ..., 1] broadcastable against `x`.
    pub(crate) fn coef(
        &self,
        op: &'static str,
        t: &[usize],
        x: &Tensor,
        f: impl Fn(usize) -> f64,
    ) -> Result<Tensor> {
        self.check_t(op, t, x)?;
        let mut shape = vec![1usize; x.rank()];
        shape[0] = t.len();
        let v: Vec<f64> = t.iter().map(|&i| f(i)).collect();
        Ok(Tensor::from_vec(v, shape, x.device())?.to_dtype(x.dtype())?)
    }

    fn check_t(&self, op: &'static str, t: &[usize], x: &Tensor) -> Result<()> {
        let n = self.num_timesteps();
        if x.rank() < 2 || x.dims()[0] != t.len() {
            return Err(ScheduleError::Shape {
                op,
                detail: format!("{} timesteps for a batch of shape {:?}", t.len(), x.dims()),
            });
        }
        if let Some(&bad) = t.iter().find(|&&i| i >= n) {
            return Err(ScheduleError::TimestepOutOfRange {
                timestep: bad,
                num_timesteps: n,
            });
        }
        Ok(())
    }

    pub(crate) fn table_coef(
        &self,
        op: &'static str,
        table: &[f64],
        t: &[usize],
        x: &Tensor,
    ) -> Result<Tensor> {
        self.coef(op, t, x, |i| table[i])
    }

    pub(crate) fn check_same(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
        if a.shape() != b.shape() {
            return Err(ScheduleError::Shape {
                op,
                detail: format!("shapes {:?} and {:?} differ", a.dims(), b.dims()),
            });
        }
        Ok(())
    }

    /// q(x_t | x_0): mean, variance and log variance.
    pub fn q_mean_variance(&self, x_start: &Tensor, t: &[usize]) -> Result<MeanVariance> {
        let s = self.schedule();
        let mean = self
            .table_coef("q_mean_variance", &s.sqrt_alphas_cumprod, t, x_start)?
            .broadcast_mul(x_start)?;
        let variance = self.coef("q_mean_variance", t, x_start, |i| 1.0 - s.alphas_cumprod[i])?;
        let log_variance = self.table_coef(
            "q_mean_variance",
            &s.log_one_minus_alphas_cumprod,
            t,
            x_start,
        )?;
        Ok(MeanVariance {
            mean,
            variance: variance.broadcast_as(x_start.shape())?,
            log_variance: log_variance.broadcast_as(x_start.shape())?,
        })
    }

    /// Samples x_t ~ q(x_t | x_0) with the given standard normal `noise`.
    pub fn q_sample(&self, x_start: &Tensor, t: &[usize], noise: &Tensor) -> Result<Tensor> {
        Self::check_same("q_sample", x_start, noise)?;
        let s = self.schedule();
        let a = self.table_coef("q_sample", &s.sqrt_alphas_cumprod, t, x_start)?;
        let b = self.table_coef("q_sample", &s.sqrt_one_minus_alphas_cumprod, t, x_start)?;
        Ok((a.broadcast_mul(x_start)? + b.broadcast_mul(noise)?)?)
    }

    /// The posterior q(x_{t-1} | x_t, x_0).
    pub fn q_posterior_mean_variance(
        &self,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &[usize],
    ) -> Result<PosteriorMeanVariance> {
        Self::check_same("q_posterior_mean_variance", x_start, x_t)?;
        let s = self.schedule();
        let op = "q_posterior_mean_variance";
        let c1 = self.table_coef(op, &s.posterior_mean_coef1, t, x_t)?;
        let c2 = self.table_coef(op, &s.posterior_mean_coef2, t, x_t)?;
        let mean = (c1.broadcast_mul(x_start)? + c2.broadcast_mul(x_t)?)?;
        let variance = self
            .table_coef(op, &s.posterior_variance, t, x_t)?
            .broadcast_as(x_t.shape())?;
        let log_variance = self
            .table_coef(op, &s.posterior_log_variance_clipped, t, x_t)?
            .broadcast_as(x_t.shape())?;
        Ok(MeanVariance {
            mean,
            variance,
            log_variance,
        })
    }

    /// Splits a model output into its mean part and, for learned variances, its variance part.
    pub fn split_model_output(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dims = x_t.dims();
        let c = dims[1];
        let want_c = if self.model_var_type.is_learned() {
            2 * c
        } else {
            c
        };
        let out = model_output.dims();
        if out.len() != dims.len() || out[0] != dims[0] || out[1] != want_c || out[2..] != dims[2..]
        {
            return Err(ScheduleError::Shape {
                op: "p_mean_variance",
                detail: format!(
                    "model output {out:?} does not fit x_t {dims:?} ({} variance needs {want_c} channels)",
                    self.model_var_type.name()
                ),
            });
        }
        if self.model_var_type.is_learned() {
            Ok((
                model_output.narrow(1, 0, c)?,
                Some(model_output.narrow(1, c, c)?),
            ))
        } else {
            Ok((model_output.clone(), None))
        }
    }

    /// p(x_{t-1} | x_t) given the model's output at x_t, and the prediction of x_0.
    ///
    /// With `clip_denoised`, the predicted x_0 is clamped to [-1, 1] before it forms the mean.
    pub fn p_mean_variance(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &[usize],
        clip_denoised: bool,
    ) -> Result<PMeanVariance> {
        let op = "p_mean_variance";
        self.check_t(op, t, x_t)?;
        let s = self.schedule();
        let (mean_out, var_out) = self.split_model_output(model_output, x_t)?;
        let shape = x_t.shape();
        let (variance, log_variance) = match (self.model_var_type, var_out) {
            (ModelVarType::Learned, Some(v)) => (v.exp()?, v),
            (ModelVarType::LearnedRange, Some(v)) => {
                let min_log = self.table_coef(op, &s.posterior_log_variance_clipped, t, x_t)?;
                let max_log = self.coef(op, t, x_t, |i| s.betas[i].ln())?;
                // v in [-1, 1] maps to [min_log, max_log].
                let frac = v.affine(0.5, 0.5)?;
                let log_var = frac
                    .broadcast_mul(&(max_log - &min_log)?)?
                    .broadcast_add(&min_log)?;
                (log_var.exp()?, log_var)
            }
            (ModelVarType::FixedLarge, _) => {
                let large = |i: usize| {
                    if i == 0 {
                        s.posterior_variance[1.min(s.betas.len() - 1)]
                    } else {
                        s.betas[i]
                    }
                };
                let var = self.coef(op, t, x_t, large)?.broadcast_as(shape)?;
                let log_var = self
                    .coef(op, t, x_t, |i| large(i).ln())?
                    .broadcast_as(shape)?;
                (var, log_var)
            }
            (ModelVarType::FixedSmall, _) => (
                self.table_coef(op, &s.posterior_variance, t, x_t)?
                    .broadcast_as(shape)?,
                self.table_coef(op, &s.posterior_log_variance_clipped, t, x_t)?
                    .broadcast_as(shape)?,
            ),
            (_, None) => {
                unreachable!("split_model_output returns variance channels for learned types")
            }
        };
        let raw_xstart = match self.model_mean_type {
            ModelMeanType::StartX => mean_out,
            ModelMeanType::Epsilon => self.predict_xstart_from_eps(x_t, t, &mean_out)?,
            ModelMeanType::V => self.predict_xstart_from_v(x_t, t, &mean_out)?,
        };
        let pred_xstart = if clip_denoised {
            raw_xstart.clamp(-1f32, 1f32)?
        } else {
            raw_xstart
        };
        let mean = self.q_posterior_mean_variance(&pred_xstart, x_t, t)?.mean;
        Ok(PMeanVariance {
            mean,
            variance,
            log_variance,
            pred_xstart,
        })
    }

    /// One term of the variational bound in bits per dimension, per batch element.
    ///
    /// KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder NLL at t = 0.
    /// Returns the terms (shape `[B]`) and the prediction of x_0.
    pub fn vb_terms_bpd(
        &self,
        model_output: &Tensor,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &[usize],
        clip_denoised: bool,
    ) -> Result<(Tensor, Tensor)> {
        let true_post = self.q_posterior_mean_variance(x_start, x_t, t)?;
        let out = self.p_mean_variance(model_output, x_t, t, clip_denoised)?;
        let kl = normal_kl(
            &true_post.mean,
            &true_post.log_variance,
            &out.mean,
            &out.log_variance,
        )?;
        let kl = (mean_flat(&kl)? / LN_2)?;
        let log_scales = out.log_variance.affine(0.5, 0.0)?;
        let nll = discretized_gaussian_log_likelihood(x_start, &out.mean, &log_scales)?.neg()?;
        let nll = (mean_flat(&nll)? / LN_2)?;
        let is_first: Vec<u8> = t.iter().map(|&i| u8::from(i == 0)).collect();
        let mask = Tensor::from_vec(is_first, t.len(), x_t.device())?;
        Ok((mask.where_cond(&nll, &kl)?, out.pred_xstart))
    }

    /// The prior term KL(q(x_T | x_0) || N(0, I)) in bits per dimension, per batch element.
    ///
    /// Evaluated in f64 where the device has it: the term is ~1e-10 and f32 rounds it to 0.
    pub fn prior_bpd(&self, x_start: &Tensor) -> Result<Tensor> {
        if x_start.dtype() != DType::F64 && !x_start.device().is_metal() {
            return Ok(self
                .prior_bpd(&x_start.to_dtype(DType::F64)?)?
                .to_dtype(x_start.dtype())?);
        }
        let t = vec![self.num_timesteps() - 1; x_start.dims().first().copied().unwrap_or(0)];
        let q = self.q_mean_variance(x_start, &t)?;
        let zeros = x_start.zeros_like()?;
        let kl = normal_kl(&q.mean, &q.log_variance.contiguous()?, &zeros, &zeros)?;
        Ok((mean_flat(&kl)? / LN_2)?)
    }

    /// Training losses for one batch, per element.
    ///
    /// `model(x_t, model_timesteps)` returns the model output. For learned variances with an mse
    /// loss (the hybrid objective), the vb term sees the mean part with gradients stopped, so it
    /// trains only the variance channels.
    pub fn training_losses<F>(
        &self,
        model: F,
        x_start: &Tensor,
        t: &[usize],
        noise: &Tensor,
    ) -> Result<LossTerms>
    where
        F: FnOnce(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    {
        let x_t = self.q_sample(x_start, t, noise)?;
        let ts = self.model_timestep_tensor(t, x_t.dtype(), x_t.device())?;
        let model_output = model(&x_t, &ts)?;
        if self.loss_type.is_vb() {
            let (mut vb, _) = self.vb_terms_bpd(&model_output, x_start, &x_t, t, false)?;
            if self.loss_type == LossType::RescaledKl {
                vb = (vb * self.num_timesteps() as f64)?;
            }
            // The bound is the loss itself: like the original, no separate mse or vb term.
            return Ok(LossTerms {
                loss: vb,
                mse: None,
                vb: None,
            });
        }
        let (mean_out, var_out) = self.split_model_output(&model_output, &x_t)?;
        let vb = match var_out {
            Some(v) => {
                let frozen = Tensor::cat(&[&mean_out.detach(), &v], 1)?;
                let (vb, _) = self.vb_terms_bpd(&frozen, x_start, &x_t, t, false)?;
                Some(if self.loss_type == LossType::RescaledMse {
                    // Scaled by T/1000 so that the vb term does not swamp the mse term.
                    (vb * (self.num_timesteps() as f64 / 1000.0))?
                } else {
                    vb
                })
            }
            None => None,
        };
        let target = match self.model_mean_type {
            ModelMeanType::Epsilon => noise.clone(),
            ModelMeanType::StartX => x_start.clone(),
            ModelMeanType::V => self.predict_v(x_start, t, noise)?,
        };
        let mut mse = mean_flat(&(target - &mean_out)?.sqr()?)?;
        if let Some(gamma) = self.snr_gamma {
            // Only the mse term is weighted: the vb term trains the variance and stays a bound.
            let w: Vec<f64> = t.iter().map(|&i| self.snr_weight(i, gamma)).collect();
            let w = Tensor::from_vec(w, t.len(), mse.device())?.to_dtype(mse.dtype())?;
            mse = (mse * w)?;
        }
        let loss = match &vb {
            Some(vb) => (&mse + vb)?,
            None => mse.clone(),
        };
        Ok(LossTerms {
            loss,
            mse: Some(mse),
            vb,
        })
    }
}
