//! Serializable settings, named after the original training script's flags.

use crate::{Result, TrainError};
use ddpm_schedule::{DiffusionConfig, LossType, ModelMeanType, ModelVarType};
use serde::{Deserialize, Serialize};

/// The diffusion flags of the original's `create_gaussian_diffusion`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionSettings {
    /// Number of diffusion steps T.
    pub diffusion_steps: usize,
    /// "linear" or "cosine".
    pub noise_schedule: String,
    /// Learn the variance (learned-range sigma; the model outputs 2·C channels).
    pub learn_sigma: bool,
    /// With a fixed variance, use the posterior variance instead of beta.
    pub sigma_small: bool,
    /// Train on the variational bound (rescaled KL).
    pub use_kl: bool,
    /// Predict x_0 instead of eps.
    pub predict_xstart: bool,
    /// With mse and learned sigma: the vb term scaled by T/1000 (the hybrid loss).
    pub rescale_learned_sigmas: bool,
    /// Respacing used when sampling ("" = every step).
    pub timestep_respacing: String,
}

impl Default for DiffusionSettings {
    /// Improved DDPM's MNIST recipe: cosine schedule, 1000 steps, learned-range sigma, hybrid loss.
    fn default() -> Self {
        Self {
            diffusion_steps: 1000,
            noise_schedule: "cosine".into(),
            learn_sigma: true,
            sigma_small: false,
            use_kl: false,
            predict_xstart: false,
            rescale_learned_sigmas: true,
            timestep_respacing: String::new(),
        }
    }
}

impl DiffusionSettings {
    /// The process these flags describe, with `respacing` overriding the stored respacing.
    pub fn to_config(&self, respacing: Option<&str>) -> Result<DiffusionConfig> {
        let loss_type = if self.use_kl {
            LossType::RescaledKl
        } else if self.rescale_learned_sigmas {
            LossType::RescaledMse
        } else {
            LossType::Mse
        };
        let model_var_type = match (self.learn_sigma, self.sigma_small) {
            (true, _) => ModelVarType::LearnedRange,
            (false, true) => ModelVarType::FixedSmall,
            (false, false) => ModelVarType::FixedLarge,
        };
        Ok(DiffusionConfig {
            beta_schedule: self
                .noise_schedule
                .parse()
                .map_err(|e| TrainError::Config(format!("{e}")))?,
            num_timesteps: self.diffusion_steps,
            respacing: respacing.unwrap_or(&self.timestep_respacing).to_string(),
            model_mean_type: if self.predict_xstart {
                ModelMeanType::StartX
            } else {
                ModelMeanType::Epsilon
            },
            model_var_type,
            loss_type,
        })
    }

    /// Output channels the model needs for `in_channels` image channels.
    pub fn out_channels(&self, in_channels: usize) -> usize {
        if self.learn_sigma {
            2 * in_channels
        } else {
            in_channels
        }
    }
}

/// Training hyperparameters (the original's flags, plus what a run needs to be reproducible).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Examples per optimiser step.
    pub batch_size: usize,
    /// Examples per forward/backward pass (0 = the whole batch); gradients accumulate.
    pub microbatch: usize,
    /// Learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Anneal the learning rate linearly to 0 over this many steps (0 = constant).
    pub lr_anneal_steps: u64,
    /// EMA decay rates.
    pub ema_rate: Vec<f64>,
    /// Log every this many steps.
    pub log_interval: u64,
    /// Save a checkpoint every this many steps.
    pub save_interval: u64,
    /// Write a sample grid every this many steps (0 = never).
    pub sample_interval: u64,
    /// Images in each sample grid.
    pub sample_count: usize,
    /// Respacing used for the sample grids (e.g. "100").
    pub sample_respacing: String,
    /// Keep only the last this many checkpoints (0 = keep all).
    pub keep_checkpoints: usize,
    /// Stop after this many steps in total.
    pub steps: u64,
    /// "uniform" or "loss-second-moment".
    pub schedule_sampler: String,
    /// Clip the global gradient norm to this (None = no clipping, as the original).
    pub grad_clip: Option<f64>,
    /// Train a class-conditional model.
    pub class_cond: bool,
    /// Seed for initialisation, data order, timesteps, noise and dropout.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 64,
            microbatch: 0,
            lr: 1e-4,
            weight_decay: 0.0,
            lr_anneal_steps: 0,
            ema_rate: vec![0.9999],
            log_interval: 10,
            save_interval: 1000,
            sample_interval: 1000,
            sample_count: 64,
            sample_respacing: "100".into(),
            keep_checkpoints: 3,
            steps: 10_000,
            schedule_sampler: "uniform".into(),
            grad_clip: None,
            class_cond: false,
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// Checks the settings and says what is wrong.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(TrainError::Config(m));
        if self.batch_size == 0 {
            return fail("batch_size must be positive".into());
        }
        if self.microbatch > self.batch_size {
            return fail(format!(
                "microbatch {} is larger than batch_size {}",
                self.microbatch, self.batch_size
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return fail(format!("lr {} must be positive", self.lr));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return fail(format!(
                "weight decay {} must be finite and not negative",
                self.weight_decay
            ));
        }
        if self.sample_interval > 0 && self.sample_count == 0 {
            return fail("sample_count must be positive when sample grids are drawn".into());
        }
        if let Some(r) = self.ema_rate.iter().find(|r| !(0.0..1.0).contains(*r)) {
            return fail(format!("ema rate {r} must be in [0, 1)"));
        }
        for (i, r) in self.ema_rate.iter().enumerate() {
            if self.ema_rate[..i].contains(r) {
                return fail(format!("ema rate {r} is given twice"));
            }
        }
        if self.log_interval == 0 || self.save_interval == 0 {
            return fail("log_interval and save_interval must be positive".into());
        }
        if !matches!(
            self.schedule_sampler.as_str(),
            "uniform" | "loss-second-moment"
        ) {
            return fail(format!(
                "unknown schedule sampler {:?} (uniform, loss-second-moment)",
                self.schedule_sampler
            ));
        }
        if let Some(c) = self.grad_clip {
            if !(c > 0.0 && c.is_finite()) {
                return fail(format!("grad clip {c} must be positive"));
            }
        }
        Ok(())
    }

    /// The microbatch size actually used.
    pub fn micro(&self) -> usize {
        if self.microbatch == 0 {
            self.batch_size
        } else {
            self.microbatch
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_map_to_the_original_process() {
        let d = DiffusionSettings::default().to_config(None).unwrap();
        assert_eq!(d.loss_type, LossType::RescaledMse);
        assert_eq!(d.model_var_type, ModelVarType::LearnedRange);
        let s = DiffusionSettings {
            learn_sigma: false,
            sigma_small: true,
            use_kl: true,
            predict_xstart: true,
            ..Default::default()
        };
        let d = s.to_config(Some("ddim10")).unwrap();
        assert_eq!(
            (d.loss_type, d.model_var_type, d.model_mean_type),
            (
                LossType::RescaledKl,
                ModelVarType::FixedSmall,
                ModelMeanType::StartX
            )
        );
        assert_eq!(d.respacing, "ddim10");
        assert!(DiffusionSettings {
            noise_schedule: "quad".into(),
            ..Default::default()
        }
        .to_config(None)
        .is_err());
    }

    #[test]
    fn bad_train_configs_say_why() {
        let e = |f: fn(&mut TrainConfig)| {
            let mut c = TrainConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(e(|c| c.microbatch = 65).contains("microbatch 65"));
        assert!(e(|c| c.ema_rate = vec![1.0]).contains("ema rate"));
        assert!(e(|c| c.schedule_sampler = "x".into()).contains("unknown schedule sampler"));
        assert!(e(|c| c.lr = 0.0).contains("lr"));
        // Non-finite settings are errors before any work.
        assert!(e(|c| c.lr = f64::NAN).contains("lr"));
        assert!(e(|c| c.lr = f64::INFINITY).contains("lr"));
        assert!(e(|c| c.weight_decay = f64::NAN).contains("weight decay"));
        assert!(e(|c| c.weight_decay = -1.0).contains("weight decay"));
        assert!(e(|c| c.grad_clip = Some(f64::INFINITY)).contains("grad clip"));
        assert!(e(|c| c.grad_clip = Some(f64::NAN)).contains("grad clip"));
        assert!(e(|c| c.ema_rate = vec![f64::NAN]).contains("ema rate"));
        assert!(e(|c| c.ema_rate = vec![0.9, 0.99, 0.9]).contains("0.9 is given twice"));
        assert!(e(|c| {
            c.sample_interval = 10;
            c.sample_count = 0
        })
        .contains("sample_count"));
        TrainConfig::default().validate().unwrap();
    }
}
