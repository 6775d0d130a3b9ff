//! Checkpoint folders: weights, EMA weights, optimiser state and everything needed to resume.

use crate::settings::{DiffusionSettings, TrainConfig};
use crate::{Result, TrainError};
use ddpm_unet::UNetConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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

/// The contents of `config.json`: settings and progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    /// The UNet's configuration.
    pub model: UNetConfig,
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
    pub sampler: Option<crate::sampler::LossSecondMomentSampler>,
}

impl CheckpointMeta {
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
        meta.model
            .validate()
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
        Ok(meta)
    }
}

/// The folder name of the checkpoint at `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step:07}")
}

/// Writes a checkpoint folder atomically: files go to a temporary folder that is renamed into
/// place only when complete, so an interrupted save leaves the previous checkpoints intact.
pub fn write_checkpoint_dir(
    run_dir: &Path,
    step: u64,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let io = |path: &Path, e: std::io::Error| TrainError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let final_dir = run_dir.join(checkpoint_name(step));
    let tmp = run_dir.join(format!(
        ".{}.tmp{}",
        checkpoint_name(step),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if final_dir.exists() {
        let old = run_dir.join(format!(
            ".{}.old{}",
            checkpoint_name(step),
            std::process::id()
        ));
        std::fs::rename(&final_dir, &old).map_err(|e| io(&final_dir, e))?;
        std::fs::rename(&tmp, &final_dir).map_err(|e| io(&final_dir, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
    } else {
        std::fs::rename(&tmp, &final_dir).map_err(|e| io(&final_dir, e))?;
    }
    Ok(final_dir)
}

/// Complete checkpoint folders of a run, oldest first.
pub fn list_checkpoints(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .filter(|(_, p)| p.join(CONFIG_FILE).exists())
        .collect();
    out.sort();
    out
}

/// Removes all but the newest `keep` checkpoints (0 keeps all).
pub fn prune_checkpoints(run_dir: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let all = list_checkpoints(run_dir);
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(dir).map_err(|e| TrainError::Io {
            path: dir.clone(),
            source: e,
        })?;
    }
    Ok(())
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

/// Loads a checkpoint's network with the EMA weights at `ema` ("" for the raw model weights,
/// `None` for the first EMA saved, or the raw weights when there is none).
pub fn load_model(
    dir: &Path,
    ema: Option<&str>,
    device: &candle_core::Device,
) -> Result<LoadedModel> {
    let meta = CheckpointMeta::read(dir)?;
    let file = match ema {
        Some("") => MODEL_FILE.to_string(),
        Some(rate) => {
            let f = ema_file(rate);
            if !dir.join(&f).exists() {
                let have: Vec<String> = meta.train.ema_rate.iter().map(|r| r.to_string()).collect();
                return Err(TrainError::Checkpoint(format!(
                    "{} has no EMA at rate {rate} (it has: {})",
                    dir.display(),
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                )));
            }
            f
        }
        None => match meta.train.ema_rate.first() {
            Some(r) if dir.join(ema_file(&r.to_string())).exists() => ema_file(&r.to_string()),
            _ => MODEL_FILE.to_string(),
        },
    };
    let store = ddpm_unet::ParamStore::new(0, candle_core::DType::F32, device);
    let model = ddpm_unet::UNet::new(store.var_builder(), &meta.model)?;
    store
        .load_safetensors(&dir.join(&file))
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", dir.join(&file).display())))?;
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
    fn a_failed_save_leaves_the_previous_checkpoint_intact() {
        let run = tempfile::tempdir().unwrap();
        let first = write_checkpoint_dir(run.path(), 5, |d| {
            std::fs::write(d.join(CONFIG_FILE), "{}").unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(first.file_name().unwrap(), "checkpoint-0000005");
        // A save that dies half-way (error after writing one file).
        let e = write_checkpoint_dir(run.path(), 6, |d| {
            std::fs::write(d.join(MODEL_FILE), "partial").unwrap();
            Err(TrainError::Checkpoint("disk full".into()))
        });
        assert!(e.is_err());
        assert_eq!(
            list_checkpoints(run.path())
                .iter()
                .map(|c| c.0)
                .collect::<Vec<_>>(),
            vec![5]
        );
        assert_eq!(
            std::fs::read_dir(run.path()).unwrap().count(),
            1,
            "no temporary folder left"
        );
        // Overwriting the same step replaces it whole.
        write_checkpoint_dir(run.path(), 5, |d| {
            std::fs::write(d.join(CONFIG_FILE), "{\"v\":2}").unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(first.join(CONFIG_FILE)).unwrap(),
            "{\"v\":2}"
        );
    }

    #[test]
    fn pruning_keeps_the_newest() {
        let run = tempfile::tempdir().unwrap();
        for s in [10, 20, 30, 40] {
            write_checkpoint_dir(run.path(), s, |d| {
                std::fs::write(d.join(CONFIG_FILE), "{}").unwrap();
                Ok(())
            })
            .unwrap();
        }
        prune_checkpoints(run.path(), 2).unwrap();
        assert_eq!(
            list_checkpoints(run.path())
                .iter()
                .map(|c| c.0)
                .collect::<Vec<_>>(),
            vec![30, 40]
        );
    }

    #[test]
    fn reading_a_non_checkpoint_says_so() {
        let d = tempfile::tempdir().unwrap();
        let e = CheckpointMeta::read(d.path()).unwrap_err().to_string();
        assert!(e.contains("is not a checkpoint folder"), "{e}");
        std::fs::write(d.path().join(CONFIG_FILE), "{\"model\": 3}").unwrap();
        assert!(CheckpointMeta::read(d.path()).is_err());
    }
}
