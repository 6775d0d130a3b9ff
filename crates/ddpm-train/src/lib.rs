//! Training diffusion models: data, timestep samplers, optimiser, EMA, checkpoints and the loop.
//!
//! The pieces of improved-diffusion's `train_util.py`, `resample.py` and `image_datasets.py`,
//! for Candle: an IDX reader for MNIST-style data sets, the uniform and loss-second-moment
//! timestep samplers, AdamW with saved state, exponential moving averages of the weights,
//! crash-consistent checkpoints in run folders that belong to one run ([`run_folder`]), and a
//! training loop that resumes exactly, metrics rows included.
//!
//! Timesteps come from a seeded generator, so the same seed draws the same training batches:
//!
//! ```
//! use ddpm_train::{LossSecondMomentSampler, TimestepSampler, UniformSampler};
//! use rand::SeedableRng;
//!
//! let draw = |seed| {
//!     let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
//!     UniformSampler::new(1000).sample(8, &mut rng)
//! };
//! let (t, weights) = draw(0);
//! assert!(t.iter().all(|&t| t < 1000) && weights == [1.0; 8]);
//! assert_eq!(draw(0), (t, weights));
//! // Improved DDPM's importance sampler is uniform until it has a history of losses.
//! assert_eq!(LossSecondMomentSampler::new(1000).weights(), vec![1.0; 1000]);
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod degrade;
pub mod download;
pub mod ema;
pub mod eval;
pub mod generate;
pub mod grid;
pub mod image_folder;
pub mod model;
pub mod nll;
pub mod optim;
pub mod plot;
pub mod run_folder;
pub mod settings;
pub mod timestep_sampler;
pub mod trainer;

pub use checkpoint::CheckpointMeta;
pub use data::{Dataset, ImageDataset, Split};
pub use image_folder::{load_data, DataFormat, ImageOptions};
pub use model::{ModelConfig, TrainableModel};
pub use settings::{DiffusionSettings, EmaWarmup, LrSchedule, TrainConfig};
pub use timestep_sampler::{
    LossSecondMomentSampler, TimestepSampler, TimestepSampling, UniformSampler,
};
pub use trainer::{RunOutcome, StepStats, Trainer};

/// Errors raised while training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A bad setting.
    #[error("invalid setting: {0}")]
    Config(String),
    /// A data file that is missing, truncated or corrupt.
    #[error("{path}: {detail}")]
    Data {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A file or folder that could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: std::path::PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A checkpoint that cannot be written or read back.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The loss or gradient became NaN or infinite.
    #[error("non-finite loss or gradient ({loss}) at step {step}; stopping (checkpoints already written are kept)")]
    NonFinite {
        /// The step that failed.
        step: u64,
        /// The offending value.
        loss: f64,
    },
    /// An error from the model.
    #[error(transparent)]
    Model(#[from] ddpm_unet::UNetError),
    /// An error from the diffusion process.
    #[error(transparent)]
    Diffusion(#[from] ddpm_schedule::ScheduleError),
    /// A download that failed on every mirror.
    #[error("download failed: {0}")]
    Download(String),
    /// An error from Candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
