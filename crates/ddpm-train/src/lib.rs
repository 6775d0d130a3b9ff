//! Training diffusion models: data, timestep samplers, optimiser, EMA, checkpoints and the loop.
//!
//! The pieces of improved-diffusion's `train_util.py`, `resample.py` and `image_datasets.py`,
//! for Candle: an IDX reader for MNIST-style data sets, the uniform and loss-second-moment
//! timestep samplers, AdamW with saved state, exponential moving averages of the weights,
//! crash-consistent checkpoints in run folders that belong to one run ([`run_folder`]), and a
//! training loop that resumes exactly, metrics rows included.

pub mod checkpoint;

/// Keeps freed memory mapped when the binary's global allocator is mimalloc.
///
/// Training frees and re-allocates the same large activation buffers every step; returning
/// them to the OS makes the kernel zero fresh pages each time (about a fifth of a step's time
/// here). Call it first thing in `main`, after `#[global_allocator] static A: mimalloc::MiMalloc`.
pub fn tune_mimalloc() {
    // mi_option_purge_delay (15 in mimalloc 2.x): -1 means never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an option is a plain store inside mimalloc, valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Leaves Candle's element-wise ops on the calling thread unless `CANDLE_NUM_THREADS` is set.
///
/// ddpm-rs's kernels run on rayon's pool; Candle 0.11 keeps a second pool of its own whose
/// workers spin while they wait for work, so on a few cores the two pools take turns at the CPU
/// (one Candle thread measured here, 2 cores: training 56 -> 62 images/s, forward 218 -> 228).
/// Call it first thing in `main`, before any thread or tensor exists: Candle reads the variable
/// when its pool starts.
pub fn tune_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

pub mod data;
pub mod degrade;
pub mod download;
pub mod ema;
pub mod eval;
pub mod grid;
pub mod optim;
pub mod plot;
pub mod run_folder;
pub mod sampler;
pub mod settings;
pub mod trainer;

pub use checkpoint::CheckpointMeta;
pub use data::{ImageDataset, Split};
pub use sampler::{LossSecondMomentSampler, ScheduleSampler, UniformSampler};
pub use settings::{DiffusionSettings, EmaWarmup, LrSchedule, TrainConfig};
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
