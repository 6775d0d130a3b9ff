//! Beta schedules, their derived tables, timestep respacing, and the Gaussian diffusion process.
//!
//! This is the "scheduler" half of openai/improved-diffusion, ported to Rust and Candle:
//! [`BetaSchedule`] makes betas, [`Schedule`] holds every table the original derives from them
//! (in f64, as the original does), [`space_timesteps`] and [`Schedule::respace`] build the
//! shortened schedules used for fast sampling, and [`GaussianDiffusion`] runs the forward and
//! reverse processes on tensors. It never depends on a particular network: model outputs come in
//! as tensors or through a closure.
//!
//! A training loss and a sampling loop around any function of (x_t, timesteps), here a stand-in
//! that always predicts zero noise (`examples/toy2d.rs` trains a real one):
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use ddpm_schedule::{randn, DiffusionConfig, GaussianDiffusion, RngNoise, SamplingMethod};
//! use rand::SeedableRng;
//!
//! // Ho et al.'s plain epsilon model (Improved DDPM's default also outputs a variance).
//! let cfg = DiffusionConfig::ddpm();
//! assert_eq!(cfg.model_output_channels(1), 1);
//! assert_eq!(DiffusionConfig::default().model_output_channels(1), 2);
//! // Sampled on 10 respaced steps.
//! let diffusion = GaussianDiffusion::new(&DiffusionConfig { respacing: "10".into(), ..cfg })?;
//! let model = |x: &Tensor, _t: &Tensor| x.zeros_like();
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
//! let (dev, f32) = (Device::Cpu, DType::F32);
//!
//! let x_start = Tensor::zeros((4, 1, 8, 8), f32, &dev)?;
//! let noise = randn(&mut rng, (4, 1, 8, 8), f32, &dev)?;
//! let terms = diffusion.training_losses(model, &x_start, &[0, 3, 6, 9], &noise)?;
//! assert_eq!(terms.loss.dims(), [4]);
//!
//! let x_end = randn(&mut rng, (4, 1, 8, 8), f32, &dev)?;
//! let mut steps = 0;
//! let sample = diffusion.sample_loop(model, x_end, SamplingMethod::Ddpm, true, &mut RngNoise(rng), |_| {
//!     steps += 1
//! })?;
//! assert_eq!((sample.dims(), steps), ([4, 1, 8, 8].as_slice(), 10));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

mod beta;
mod denoiser;
mod diffusion;
mod guidance;
mod noise;
mod predict;
mod respace;
mod sampling;
mod settings;
mod solvers;
mod tables;

pub use beta::BetaSchedule;
pub use denoiser::Denoiser;
pub use diffusion::{
    DiffusionConfig, GaussianDiffusion, LossTerms, LossType, MeanVariance, ModelMeanType,
    ModelVarType, PMeanVariance, PosteriorMeanVariance,
};
pub use guidance::{ClassifierFreeGuidance, DEFAULT_GUIDANCE_SCALE};
pub use noise::{randn, BatchStart, FixedNoise, NoiseSource, RngNoise};
pub use respace::{logsnr_timesteps, space_timesteps, SpacedSchedule, LOGSNR_NOISE_FLOOR};
pub use sampling::{BpdTerms, SampleStep, SamplingMethod, StepOutput};
pub use settings::DiffusionSettings;
pub use tables::Schedule;

/// Errors raised while building schedules or running the diffusion process.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// A beta schedule name that is not known.
    #[error("unknown beta schedule {0:?} (expected \"linear\" or \"cosine\")")]
    UnknownSchedule(String),
    /// A schedule with no steps.
    #[error("a schedule needs at least one timestep")]
    Empty,
    /// A beta outside (0, 1].
    #[error("beta[{index}] = {value} is outside (0, 1]")]
    BetaOutOfRange {
        /// Position of the bad beta.
        index: usize,
        /// Its value.
        value: f64,
    },
    /// A respacing specification that cannot be satisfied or parsed.
    #[error("invalid respacing {spec:?} for {num_timesteps} steps: {reason}")]
    Respacing {
        /// The specification as given.
        spec: String,
        /// The number of steps of the schedule being respaced.
        num_timesteps: usize,
        /// Why it cannot work.
        reason: String,
    },
    /// A kept timestep that is not inside the schedule.
    #[error("timestep {timestep} is outside a schedule of {num_timesteps} steps")]
    TimestepOutOfRange {
        /// The offending timestep.
        timestep: usize,
        /// Length of the schedule.
        num_timesteps: usize,
    },
    /// A setting name that is not known.
    #[error("unknown {what} {value:?} (expected one of {expected})")]
    UnknownSetting {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: String,
        /// The accepted values.
        expected: &'static str,
    },
    /// Settings that contradict each other.
    #[error("{0}")]
    Conflict(&'static str),
    /// A setting whose value is out of its range.
    #[error("{what} {value} {reason}")]
    BadSetting {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: String,
        /// What it must be.
        reason: &'static str,
    },
    /// Tensors or timesteps whose shapes do not fit together.
    #[error("{op}: {detail}")]
    Shape {
        /// The operation that found the problem.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// An error from the distribution helpers.
    #[error(transparent)]
    Math(#[from] ddpm_math::MathError),
    /// An error from Candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, ScheduleError>;
