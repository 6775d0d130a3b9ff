//! Checkpoint folders: weights, EMA weights, optimiser state and everything needed to resume.

use crate::model::ModelConfig;
use crate::settings::{DiffusionSettings, TrainConfig};
use crate::{Result, TrainError};
use ddpm_unet::UNetConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// File name of the model weights in a checkpoint folder.
pub const MODEL_FILE: &str = "model.safetensors";
/// File name of the optimiser state.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File name of the settings and progress.
pub const CONFIG_FILE: &str = "config.json";

/// The file name of the EMA weights at `rate`.
pub fn ema_file(rate: &str) -> String {
    format!("ema_{rate}.safetensors")
}

/// Where a random stream stands: the seed it was made from and its position in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The seed.
    pub seed: u64,
    /// Position in 32-bit words, as a decimal string (JSON numbers cannot hold a u128).
    #[serde(with = "u128_string")]
    pub word_pos: u128,
}

mod u128_string {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The contents of `config.json`: settings and progress, for a network whose architecture is
/// `C` (the UNet's by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, bound = "C: ModelConfig")]
pub struct CheckpointMeta<C = UNetConfig> {
    /// The network's configuration.
    pub model: C,
    /// The diffusion process.
    pub diffusion: DiffusionSettings,
    /// Training settings.
    pub train: TrainConfig,
    /// Image size [height, width] the model was trained on.
    pub image_size: [usize; 2],
    /// Optimiser steps completed.
    pub step: u64,
    /// The training random stream (timesteps and noise).
    pub rng: RngState,
    /// Data order: epoch and position within it.
    pub data_epoch: u64,
    /// Data order: position within the epoch.
    pub data_pos: usize,
    /// The loss-second-moment sampler's history, when that sampler is used.
    pub sampler: Option<crate::timestep_sampler::LossSecondMomentSampler>,
    /// The run this checkpoint belongs to (pruning removes only its own run's checkpoints);
    /// absent in checkpoints written before run ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The class names by label, when the data names them (sub-folders, CIFAR-10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
    /// Images in the training set, to refuse resuming on a different one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_len: Option<usize>,
    /// The log window in progress (steps since the last metrics row), so that a resumed run
    /// logs the same rows as an uninterrupted one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_window: Option<crate::trainer::LogWindow>,
}

impl<C: ModelConfig> CheckpointMeta<C> {
    /// Reads `config.json` from a checkpoint folder.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            TrainError::Checkpoint(format!(
                "{} is not a checkpoint folder: cannot read {CONFIG_FILE}: {e}",
                dir.display()
            ))
        })?;
        let meta: Self = serde_json::from_str(&text)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
        let bad = |e: String| TrainError::Checkpoint(format!("{}: {e}", path.display()));
        meta.model.validate().map_err(|e| bad(e.to_string()))?;
        // The stored diffusion settings must describe a process on their own, so that a bad
        // value is blamed on this file rather than on a sampling flag.
        meta.diffusion
            .to_config(Some(""))
            .and_then(|c| ddpm_schedule::GaussianDiffusion::new(&c))
            .map_err(|e| bad(format!("diffusion settings: {e}")))?;
        Ok(meta)
    }
}

/// The folder name of the checkpoint at `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step:07}")
}

/// A model loaded from a checkpoint folder for sampling or evaluation.
pub struct LoadedModel {
    /// The checkpoint's settings.
    pub meta: CheckpointMeta,
    /// The network with the chosen weights.
    pub model: ddpm_unet::UNet,
    /// Which weights were loaded: "model" or `"ema_<rate>"`.
    pub weights: String,
}

/// Loads a checkpoint's network, built on `kernels`, with the EMA weights at `ema` ("" for the
/// raw model weights, `None` for the first EMA saved, or the raw weights when there is none).
pub fn load_model(
    dir: &Path,
    ema: Option<&str>,
    kernels: ddpm_unet::KernelOptions,
    device: &candle_core::Device,
) -> Result<LoadedModel> {
    // Damage first: a damaged config.json is named as damage, not as a bad setting.
    crate::run_folder::verify_checkpoint(dir)?;
    let meta = CheckpointMeta::<ddpm_unet::UNetConfig>::read(dir)?;
    let have: Vec<String> = meta.train.ema_rate.iter().map(|r| r.to_string()).collect();
    let file = match ema {
        Some("") => MODEL_FILE.to_string(),
        Some(rate) => {
            // The rate as the run named its file ("0.99990" is the run's 0.9999).
            let known = meta
                .train
                .ema_rate
                .iter()
                .find(|r| r.to_string() == rate || rate.parse::<f64>().is_ok_and(|x| x == **r));
            let Some(r) = known else {
                return Err(TrainError::Checkpoint(format!(
                    "{} has no EMA at rate {rate} (it has: {}; --ema model takes the raw weights)",
                    dir.display(),
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                )));
            };
            ema_file(&r.to_string())
        }
        // The first EMA the run kept; the raw weights only for a run that kept none.
        None => match have.first() {
            Some(r) => ema_file(r),
            None => MODEL_FILE.to_string(),
        },
    };
    let path = dir.join(&file);
    if !path.exists() {
        return Err(TrainError::Checkpoint(format!(
            "{} is missing {file} (the run saved it: the folder is damaged or incomplete); \
             --ema model takes the raw weights",
            dir.display()
        )));
    }
    let store = ddpm_unet::ParamStore::new(0, candle_core::DType::F32, device);
    let model = ddpm_unet::UNet::with_kernels(store.var_builder(), &meta.model, kernels)?;
    store
        .load_safetensors(&path)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
    let weights = file.trim_end_matches(".safetensors").to_string();
    Ok(LoadedModel {
        meta,
        model,
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_a_non_checkpoint_says_so() {
        let d = tempfile::tempdir().unwrap();
        let e = CheckpointMeta::<ddpm_unet::UNetConfig>::read(d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a checkpoint folder"), "{e}");
        // A file given where the folder belongs is named as such, not as a damaged checkpoint.
        let file = d.path().join("weights.safetensors");
        std::fs::write(&file, b"x").unwrap();
        let Err(e) = load_model(&file, None, Default::default(), &candle_core::Device::Cpu) else {
            panic!("a file loaded as a checkpoint");
        };
        let e = e.to_string();
        assert!(e.contains("is a file, not a checkpoint folder"), "{e}");
        std::fs::write(d.path().join(CONFIG_FILE), "{\"model\": 3}").unwrap();
        assert!(CheckpointMeta::<ddpm_unet::UNetConfig>::read(d.path()).is_err());
    }
}
