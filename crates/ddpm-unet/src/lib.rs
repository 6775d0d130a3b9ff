//! The improved-diffusion UNet in Candle.
//!
//! [`UNet`] is the denoising network of Nichol & Dhariwal (2021), layer for layer and with the
//! same parameter names as the PyTorch original's state dict (`time_embed.0.weight`,
//! `input_blocks.1.0.in_layers.2.weight`, ...), so converted checkpoints load as they are and
//! weights saved here load back into PyTorch. [`UNetConfig`] mirrors the original's keyword
//! arguments; [`ParamStore`] holds the trainable parameters, initialised from a seeded RNG the
//! way PyTorch initialises them, and reads and writes safetensors files.
//!
//! The layers ([`nn`]) run the fast CPU kernels of [`ddpm_kernels`] with the
//! [`KernelOptions`] the network was built with ([`UNet::with_kernels`]; [`UNet::new`] takes the
//! defaults), so faster kernels replace them without touching the model code.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use ddpm_unet::{ParamStore, UNet, UNetConfig};
//!
//! // The MNIST UNet, lighter: one residual block per level and no attention. Its variance is
//! // learned, so it returns two channels (eps and the variance) per input channel.
//! let cfg = UNetConfig {
//!     channel_mult: vec![1, 2],
//!     num_res_blocks: 1,
//!     attention_resolutions: vec![],
//!     ..UNetConfig::mnist()
//! };
//! let params = ParamStore::new(0, DType::F32, &Device::Cpu);
//! let unet = UNet::new(params.var_builder(), &cfg)?;
//! let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu)?;
//! let t = Tensor::new(&[10f32, 500.0], &Device::Cpu)?;
//! let out = unet.forward(&x, &t, None, false)?;
//! assert_eq!(out.dims(), [2, 2, 28, 28]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

mod blocks;
mod config;
mod model;
pub mod nn;
mod params;

pub use config::UNetConfig;
pub use ddpm_kernels::{KernelChoice, KernelOptions, Precision};
pub use model::{class_indices, UNet};
pub use nn::timestep_embedding;
pub use params::{read_safetensors, read_safetensors_any, write_safetensors, ParamStore};

/// Errors raised by the UNet crate.
#[derive(Debug, thiserror::Error)]
pub enum UNetError {
    /// A configuration that cannot build a working network.
    #[error("invalid UNet config: {0}")]
    Config(String),
    /// An input that does not fit the network.
    #[error("invalid UNet input: {0}")]
    Input(String),
    /// A weights file whose tensors do not match the network's parameters.
    #[error("weights do not match the model:{}", describe_mismatch(.missing, .unexpected, .mismatched))]
    WeightsMismatch {
        /// Parameters the model has and the file lacks.
        missing: Vec<String>,
        /// Tensors in the file that the model has no parameter for.
        unexpected: Vec<String>,
        /// (name, model shape, file shape) for tensors whose shapes differ.
        mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    },
    /// A file that could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A weights file that is not valid safetensors, or holds an unsupported dtype.
    #[error("{path}: {detail}")]
    BadFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A tensor given as a parameter that does not hold floating-point values.
    #[error("parameter {name} has dtype {dtype:?}; expected a float type (f32, f64, f16, bf16)")]
    NotFloat {
        /// The parameter's name.
        name: String,
        /// The tensor's dtype.
        dtype: candle_core::DType,
    },
    /// A JSON config that cannot be parsed.
    #[error("UNet config JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// An error from Candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn describe_mismatch(
    missing: &[String],
    unexpected: &[String],
    mismatched: &[(String, Vec<usize>, Vec<usize>)],
) -> String {
    // A few names of each kind: a wrong config mismatches every tensor, and a message of
    // thousands of names helps nobody.
    const SHOWN: usize = 4;
    let some = |names: &[String]| {
        let mut s = names
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if names.len() > SHOWN {
            s += &format!(", ... ({} more)", names.len() - SHOWN);
        }
        s
    };
    let mut s = String::new();
    if !missing.is_empty() {
        s += &format!(" missing {}: {};", missing.len(), some(missing));
    }
    if !unexpected.is_empty() {
        s += &format!(" unexpected {}: {};", unexpected.len(), some(unexpected));
    }
    for (name, want, got) in mismatched.iter().take(SHOWN) {
        s += &format!(" {name} has shape {got:?} in the file but {want:?} in the model;");
    }
    if mismatched.len() > SHOWN {
        s += &format!(
            " and {} more tensors of other shapes;",
            mismatched.len() - SHOWN
        );
    }
    s.pop();
    s
}

/// A UNet error inside Candle's (the error of the diffusion closures and of
/// [`ddpm_schedule::Denoiser`]): Candle's own errors pass through unchanged.
impl From<UNetError> for candle_core::Error {
    fn from(e: UNetError) -> Self {
        match e {
            UNetError::Candle(e) => e,
            e => candle_core::Error::wrap(e),
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, UNetError>;
