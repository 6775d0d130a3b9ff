//! The original's diffusion flags (`create_gaussian_diffusion`) as one value, stored in a
//! checkpoint's `config.json` under `"diffusion"` (with the `serde` feature).

use crate::{
    BetaSchedule, DiffusionConfig, LossType, ModelMeanType, ModelVarType, Result, ScheduleError,
};

/// The diffusion flags of the original's `create_gaussian_diffusion`.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct DiffusionSettings {
    /// Number of diffusion steps T.
    pub diffusion_steps: usize,
    /// The beta schedule ("linear" or "cosine" in config.json).
    pub noise_schedule: BetaSchedule,
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
    /// Predict the velocity v (Salimans & Ho 2022) instead of eps.
    #[cfg_attr(feature = "serde", serde(default))]
    pub predict_v: bool,
    /// Min-SNR-γ weighting of the mse term (Hang et al. 2023; None: unweighted).
    #[cfg_attr(feature = "serde", serde(default))]
    pub snr_gamma: Option<f64>,
}

impl Default for DiffusionSettings {
    /// Improved DDPM's MNIST recipe: cosine schedule, 1000 steps, learned-range sigma, hybrid loss.
    fn default() -> Self {
        Self {
            diffusion_steps: 1000,
            noise_schedule: BetaSchedule::Cosine,
            learn_sigma: true,
            sigma_small: false,
            use_kl: false,
            predict_xstart: false,
            rescale_learned_sigmas: true,
            timestep_respacing: String::new(),
            predict_v: false,
            snr_gamma: None,
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
        if self.predict_v && self.predict_xstart {
            return Err(ScheduleError::Conflict(
                "predict_v and predict_xstart exclude each other: the model predicts one thing",
            ));
        }
        let cfg = DiffusionConfig {
            beta_schedule: self.noise_schedule,
            num_timesteps: self.diffusion_steps,
            respacing: respacing.unwrap_or(&self.timestep_respacing).to_string(),
            model_mean_type: if self.predict_xstart {
                ModelMeanType::StartX
            } else if self.predict_v {
                ModelMeanType::V
            } else {
                ModelMeanType::Epsilon
            },
            model_var_type,
            loss_type,
            snr_gamma: self.snr_gamma,
        };
        // The same check as building the process, so a bad gamma is named before any run.
        crate::GaussianDiffusion::check_snr_gamma(cfg.snr_gamma)?;
        Ok(cfg)
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
        assert_eq!(s.out_channels(3), 3);
        assert_eq!(DiffusionSettings::default().out_channels(3), 6);
    }

    #[test]
    fn contradictory_or_bad_flags_are_named() {
        let both = DiffusionSettings {
            predict_v: true,
            predict_xstart: true,
            ..Default::default()
        };
        let err = both.to_config(None).unwrap_err().to_string();
        assert!(
            err.contains("predict_v") && err.contains("predict_xstart"),
            "{err}"
        );
        let bad_gamma = DiffusionSettings {
            snr_gamma: Some(-5.0),
            ..Default::default()
        };
        assert!(bad_gamma
            .to_config(None)
            .unwrap_err()
            .to_string()
            .contains("snr gamma -5"));
        let v = DiffusionSettings {
            predict_v: true,
            snr_gamma: Some(5.0),
            ..Default::default()
        }
        .to_config(None)
        .unwrap();
        assert_eq!(
            (v.model_mean_type, v.snr_gamma),
            (ModelMeanType::V, Some(5.0))
        );
    }

    #[cfg(feature = "serde")]
    #[test]
    fn settings_are_stored_with_the_schedule_by_name() {
        let s = DiffusionSettings {
            noise_schedule: BetaSchedule::Linear,
            snr_gamma: Some(5.0),
            ..Default::default()
        };
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["noise_schedule"], "linear");
        assert_eq!(
            serde_json::from_value::<DiffusionSettings>(json.clone()).unwrap(),
            s
        );
        let mut bad = json;
        bad["noise_schedule"] = "sigmoid".into();
        let e = serde_json::from_value::<DiffusionSettings>(bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sigmoid") && e.contains("cosine"), "{e}");
    }
}
