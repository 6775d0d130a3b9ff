//! Training diffusion models: data, timestep samplers, optimiser, EMA, checkpoints and the loop.
//!
//! The pieces of improved-diffusion's `train_util.py`, `resample.py` and `image_datasets.py`,
//! for Candle: an IDX reader for MNIST-style data sets, the uniform and loss-second-moment
//! timestep samplers, AdamW with saved state, exponential moving averages of the weights,
//! atomic checkpoints, and a training loop that resumes exactly.

pub mod sampler;

pub use sampler::{LossSecondMomentSampler, ScheduleSampler, UniformSampler};

/// Errors raised while training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A bad setting.
    #[error("invalid setting: {0}")]
    Config(String),
    /// An error from Candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
