//! Serializable settings, named after the original training script's flags.

use crate::timestep_sampler::TimestepSampling;
use crate::{Result, TrainError};
pub use ddpm_schedule::DiffusionSettings;
use serde::{Deserialize, Serialize};

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// Settings with a fixed set of values, stored in JSON under their names (`"cosine"`,
/// `"loss-second-moment"`) and parsed back with an error that lists the accepted ones.
mod by_name {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// How the learning rate changes over a run (after its warm-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// The configured rate throughout.
    Constant,
    /// Linearly down to 0 (the original's `lr_anneal_steps`).
    Linear,
    /// Half a cosine down to 0.
    Cosine,
}

impl std::str::FromStr for LrSchedule {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            other => Err(TrainError::Config(format!(
                "unknown lr schedule {other:?} (constant, linear, cosine)"
            ))),
        }
    }
}

impl LrSchedule {
    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::Linear => "linear",
            Self::Cosine => "cosine",
        }
    }
}

/// EMA warm-up as diffusers' `EMAModel(use_ema_warmup=True)`: the n-th update uses the decay
/// min(rate, 1 - (1 + (n-1)/inv_gamma)^-power) (0 for the first, which copies the weights), so
/// the average forgets the random initialisation within a few hundred steps instead of
/// thousands, and approaches the configured rate as training goes on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaWarmup {
    /// Steps scale of the ramp (diffusers' `inv_gamma`, 1.0 in train_unconditional.py).
    pub inv_gamma: f64,
    /// Exponent of the ramp (diffusers' `power`: 0.75 there, 2/3 for long runs).
    pub power: f64,
}

impl Default for EmaWarmup {
    fn default() -> Self {
        Self {
            inv_gamma: 1.0,
            power: 0.75,
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
    /// Anneal the learning rate to 0 over this many steps (0: over `steps` when a decaying
    /// `lr_schedule` is set, else no annealing).
    pub lr_anneal_steps: u64,
    /// How the rate decays (None: the original's rule, linear when `lr_anneal_steps` > 0).
    #[serde(default)]
    pub lr_schedule: Option<LrSchedule>,
    /// Steps of linear warm-up from lr/warmup to lr before the schedule starts.
    #[serde(default)]
    pub lr_warmup_steps: u64,
    /// EMA warm-up (None: every update uses the configured rate, as the original).
    #[serde(default)]
    pub ema_warmup: Option<EmaWarmup>,
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
    /// The timestep sampler ("uniform" or "loss-second-moment" in config.json).
    #[serde(with = "by_name")]
    pub schedule_sampler: TimestepSampling,
    /// Clip the global gradient norm to this (None = no clipping, as the original).
    pub grad_clip: Option<f64>,
    /// Train a class-conditional model.
    pub class_cond: bool,
    /// Probability of replacing an example's label with the null class, so that one model
    /// learns the conditional and the unconditional noise (classifier-free guidance; 0: never).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub class_dropout: f64,
    /// Seed for initialisation, data order, timesteps, noise and dropout.
    pub seed: u64,
    /// How images from a folder are loaded (size, channels, crop, flips).
    #[serde(default, skip_serializing_if = "crate::ImageOptions::is_default")]
    pub data: crate::ImageOptions,
    /// The kernels the model runs (precision, kernel family). How this process computes, not
    /// what the run is: never saved, so a resumed run takes the resuming process's choice.
    #[serde(skip)]
    pub kernels: ddpm_unet::KernelOptions,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 64,
            microbatch: 0,
            lr: 1e-4,
            weight_decay: 0.0,
            lr_anneal_steps: 0,
            lr_schedule: None,
            lr_warmup_steps: 0,
            ema_warmup: None,
            ema_rate: vec![0.9999],
            log_interval: 10,
            save_interval: 1000,
            sample_interval: 1000,
            sample_count: 64,
            sample_respacing: "100".into(),
            keep_checkpoints: 3,
            steps: 10_000,
            schedule_sampler: TimestepSampling::Uniform,
            grad_clip: None,
            class_cond: false,
            class_dropout: 0.0,
            seed: 0,
            data: Default::default(),
            kernels: Default::default(),
        }
    }
}

impl TrainConfig {
    /// Checks the settings and says what is wrong.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(TrainError::Config(m));
        if !(0.0..1.0).contains(&self.class_dropout) {
            return fail(format!(
                "class dropout {} must be in [0, 1)",
                self.class_dropout
            ));
        }
        if self.class_dropout > 0.0 && !self.class_cond {
            return fail("class dropout needs a class-conditional model (class_cond)".into());
        }
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
        if let Some(w) = self.ema_warmup {
            if !(w.inv_gamma > 0.0
                && w.inv_gamma.is_finite()
                && w.power > 0.0
                && w.power.is_finite())
            {
                return fail(format!(
                    "ema warm-up inv_gamma {} and power {} must be positive and finite",
                    w.inv_gamma, w.power
                ));
            }
        }
        if self.log_interval == 0 || self.save_interval == 0 {
            return fail("log_interval and save_interval must be positive".into());
        }
        if let Some(c) = self.grad_clip {
            if !(c > 0.0 && c.is_finite()) {
                return fail(format!("grad clip {c} must be positive"));
            }
        }
        Ok(())
    }

    /// The schedule in force: the configured one, or the original's rule.
    pub fn lr_schedule(&self) -> LrSchedule {
        self.lr_schedule.unwrap_or(if self.lr_anneal_steps > 0 {
            LrSchedule::Linear
        } else {
            LrSchedule::Constant
        })
    }

    /// The learning rate of optimiser step `step` (0-based): a linear warm-up over
    /// `lr_warmup_steps`, then the schedule over the rest of `lr_anneal_steps` (or `steps`).
    pub fn lr_at(&self, step: u64) -> f64 {
        let warm = self.lr_warmup_steps;
        if step < warm {
            return self.lr * (step + 1) as f64 / warm as f64;
        }
        let horizon = if self.lr_anneal_steps > 0 {
            self.lr_anneal_steps
        } else {
            self.steps
        };
        let span = horizon.saturating_sub(warm).max(1) as f64;
        let frac = ((step - warm) as f64 / span).min(1.0);
        match self.lr_schedule() {
            LrSchedule::Constant => self.lr,
            LrSchedule::Linear => self.lr * (1.0 - frac),
            LrSchedule::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()),
        }
    }

    /// The decay an EMA of `rate` uses at its `update`-th update (1-based).
    pub fn ema_decay(&self, rate: f64, update: u64) -> f64 {
        match self.ema_warmup {
            None => rate,
            Some(_) if update <= 1 => 0.0,
            Some(w) => {
                let k = (update - 1) as f64;
                rate.min(1.0 - (1.0 + k / w.inv_gamma).powf(-w.power))
            }
        }
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
    fn lr_schedules_follow_their_formulas() {
        let c = |schedule, anneal, warm| TrainConfig {
            lr: 2e-4,
            steps: 1000,
            lr_anneal_steps: anneal,
            lr_schedule: schedule,
            lr_warmup_steps: warm,
            ..Default::default()
        };
        // The original's rule: constant, or linear over lr_anneal_steps, exactly as before.
        assert_eq!(c(None, 0, 0).lr_at(700), 2e-4);
        let orig = c(None, 400, 0);
        assert_eq!(orig.lr_schedule(), LrSchedule::Linear);
        assert!((orig.lr_at(100) - 2e-4 * 0.75).abs() < 1e-18);
        assert_eq!(orig.lr_at(400), 0.0);
        assert_eq!(orig.lr_at(900), 0.0);
        // Warm-up: (step + 1)/warmup of the rate, then the schedule over the rest of the run.
        let cos = c(Some(LrSchedule::Cosine), 0, 100);
        assert!((cos.lr_at(0) - 2e-6).abs() < 1e-18);
        assert!((cos.lr_at(49) - 1e-4).abs() < 1e-15);
        assert!((cos.lr_at(100) - 2e-4).abs() < 1e-15);
        assert!((cos.lr_at(550) - 1e-4).abs() < 1e-12, "{}", cos.lr_at(550));
        assert!(cos.lr_at(1000).abs() < 1e-18);
        let lin = c(Some(LrSchedule::Linear), 0, 0);
        assert!((lin.lr_at(250) - 1.5e-4).abs() < 1e-15);
        // An explicit constant schedule ignores lr_anneal_steps.
        assert_eq!(c(Some(LrSchedule::Constant), 400, 0).lr_at(500), 2e-4);
        assert_eq!("cosine".parse::<LrSchedule>().unwrap(), LrSchedule::Cosine);
        let e = "step".parse::<LrSchedule>().unwrap_err().to_string();
        assert!(e.contains("constant, linear, cosine"), "{e}");
    }

    #[test]
    fn ema_warmup_ramps_to_the_rate() {
        let plain = TrainConfig::default();
        assert_eq!(plain.ema_decay(0.999, 1), 0.999);
        let warm = TrainConfig {
            ema_warmup: Some(EmaWarmup::default()),
            ..Default::default()
        };
        assert_eq!(warm.ema_decay(0.999, 1), 0.0);
        // 1 - 2^-0.75 and 1 - 102^-0.75, as diffusers' get_decay at optimisation steps 2, 102.
        assert!((warm.ema_decay(0.999, 2) - (1.0 - 2f64.powf(-0.75))).abs() < 1e-15);
        assert!((warm.ema_decay(0.999, 102) - (1.0 - 102f64.powf(-0.75))).abs() < 1e-15);
        assert_eq!(warm.ema_decay(0.999, 100_000), 0.999);
        // What is left of the initial weights after 500 updates: nothing, where a plain 0.999
        // average still holds 61% of them.
        let left: f64 = (1..=500).map(|n| warm.ema_decay(0.999, n)).product();
        assert!(left < 1e-6, "{left}");
        assert!((0.999f64.powi(500) - 0.606).abs() < 1e-3);
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
        assert!(e(|c| c.ema_warmup = Some(EmaWarmup {
            inv_gamma: 0.0,
            power: 0.75
        }))
        .contains("inv_gamma 0"));
        TrainConfig::default().validate().unwrap();
    }
}
