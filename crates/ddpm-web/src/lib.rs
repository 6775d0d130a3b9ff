//! Sampling a trained diffusion model in a web page.
//!
//! The checkpoint comes in as bytes (its `config.json` and a safetensors file of weights, as a
//! page gets them from `fetch` or a file picker); [`WebModel`] samples it with the project's
//! seeded draws, so a seed gives the same digits as `ddpm-cli sample --seed`, and returns each
//! step and the result as RGBA grids laid out as `ddpm-cli sample --out` lays them out. Built for
//! `wasm32-unknown-unknown`, the [`bindings`] module exports it to JavaScript; `www/` holds the
//! page and its Web Worker (`cargo xtask web` builds and serves both).
//!
//! The same code runs natively, which is how it is tested:
//!
//! ```no_run
//! use ddpm_web::{SampleRequest, WebModel};
//!
//! let dir = std::path::Path::new("crates/ddpm-web/model");
//! let model = WebModel::from_bytes(
//!     &std::fs::read_to_string(dir.join("config.json"))?,
//!     &std::fs::read(dir.join("ema_0.999.safetensors"))?,
//! )?;
//! let request = SampleRequest { num: 16, seed: 0, class: Some(3), ..Default::default() };
//! let grid = model.sample(&request, |step| println!("step {} of {}", step.step, step.total))?;
//! assert_eq!(grid.rgba.len(), 4 * grid.width * grid.height);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod bindings;
mod grid;

pub use grid::Grid;

use candle_core::{DType, Device, Tensor};
use ddpm_schedule::{
    BatchStart, ClassifierFreeGuidance, Denoiser, DiffusionSettings, GaussianDiffusion,
    SamplingMethod,
};
use ddpm_unet::{KernelOptions, ParamStore, UNet, UNetConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

/// Errors of the web front end, worded for the page that shows them.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// A config.json that is not a checkpoint's.
    #[error("not a checkpoint config.json: {0}")]
    Config(String),
    /// A weights file that is not safetensors or does not fit the config.
    #[error("not weights for this model: {0}")]
    Weights(String),
    /// A request the model cannot serve (a class it lacks, zero steps, ...).
    #[error("{0}")]
    Request(String),
    /// An error from the diffusion process.
    #[error(transparent)]
    Schedule(#[from] ddpm_schedule::ScheduleError),
    /// An error from the network.
    #[error(transparent)]
    UNet(#[from] ddpm_unet::UNetError),
    /// An error from Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, WebError>;

/// The parts of a checkpoint's `config.json` the page needs (the training state is ignored).
#[derive(Debug, Clone, Deserialize)]
struct CheckpointConfig {
    model: UNetConfig,
    diffusion: DiffusionSettings,
    image_size: [usize; 2],
    #[serde(default)]
    class_names: Option<Vec<String>>,
    #[serde(default)]
    step: Option<u64>,
}

/// What a loaded model is, for the page's controls.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelInfo {
    /// Image channels (1 or 3).
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Diffusion steps T of the training process.
    pub diffusion_steps: usize,
    /// Classes of a class-conditional model.
    pub num_classes: Option<usize>,
    /// Their names, when the training data named them.
    pub class_names: Option<Vec<String>>,
    /// Whether the model was trained for classifier-free guidance (has a null class).
    pub guided: bool,
    /// The guidance scale used when none is given.
    pub default_guidance_scale: Option<f64>,
    /// Trained parameters.
    pub parameters: usize,
    /// The training step of the checkpoint, when config.json records it.
    pub step: Option<u64>,
}

/// What to sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRequest {
    /// Number of samples (one batch).
    pub num: usize,
    /// Seed of every draw.
    pub seed: u64,
    /// Model evaluations: the schedule respaced to this many evenly spaced steps.
    pub steps: usize,
    /// The sampling method.
    pub method: SamplingMethod,
    /// One class for every sample (None: uniformly random labels), for conditional models.
    pub class: Option<u32>,
    /// Classifier-free guidance scale for a guided model (None: its default).
    pub guidance_scale: Option<f64>,
}

impl Default for SampleRequest {
    /// 16 samples, seed 0, 20 DDPM steps (`ddpm-cli sample`'s solver and steps).
    fn default() -> Self {
        Self {
            num: 16,
            seed: 0,
            steps: 20,
            method: SamplingMethod::Ddpm,
            class: None,
            guidance_scale: None,
        }
    }
}

/// One step of a running chain, as the page draws it.
#[derive(Debug)]
pub struct StepView {
    /// Steps done, 1..=total.
    pub step: usize,
    /// Steps in all.
    pub total: usize,
    /// The noisy sample x_t.
    pub x_t: Grid,
    /// The model's prediction of x_0 at this step.
    pub pred_x0: Grid,
}

/// A checkpoint loaded for sampling: the UNet with its weights and the diffusion settings.
pub struct WebModel {
    model: UNet,
    config: CheckpointConfig,
    parameters: usize,
    device: Device,
}

impl std::fmt::Debug for WebModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebModel")
            .field("info", &self.info())
            .finish_non_exhaustive()
    }
}

impl WebModel {
    /// Loads a checkpoint from the text of its `config.json` and the bytes of a weights file
    /// (`ema_*.safetensors` or `model.safetensors`; f32, f16 or bf16).
    pub fn from_bytes(config_json: &str, weights: &[u8]) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(config_json)
            .map_err(|e| WebError::Config(format!("not JSON ({e})")))?;
        for key in ["model", "diffusion", "image_size"] {
            if value.get(key).is_none() {
                return Err(WebError::Config(format!(
                    "it has no \"{key}\" entry (pick the config.json of a checkpoint-N folder)"
                )));
            }
        }
        let config: CheckpointConfig =
            serde_json::from_value(value).map_err(|e| WebError::Config(e.to_string()))?;
        let [h, w] = config.image_size;
        config
            .model
            .validate()
            .and_then(|()| config.model.validate_image_size(h, w))
            .map_err(|e| WebError::Config(e.to_string()))?;
        if let (Some(names), Some(k)) = (&config.class_names, config.model.num_classes) {
            if names.len() != k {
                return Err(WebError::Config(format!(
                    "{} class names for a model of {k} classes",
                    names.len()
                )));
            }
        }
        let expected = config.diffusion.out_channels(config.model.in_channels);
        if config.model.out_channels != expected {
            return Err(WebError::Config(format!(
                "the model outputs {} channels where its diffusion settings need {expected}",
                config.model.out_channels
            )));
        }
        let device = Device::Cpu;
        let tensors = candle_core::safetensors::load_buffer(weights, &device)
            .map_err(|e| WebError::Weights(format!("not a safetensors file ({e})")))?;
        let store = ParamStore::new(0, DType::F32, &device);
        let model =
            UNet::with_kernels(store.var_builder(), &config.model, KernelOptions::default())?;
        store
            .set_tensors(&tensors)
            .map_err(|e| WebError::Weights(e.to_string()))?;
        Ok(Self {
            model,
            parameters: store.num_parameters(),
            config,
            device,
        })
    }

    /// What the model is.
    pub fn info(&self) -> ModelInfo {
        let guided = self.model.null_label().is_some();
        ModelInfo {
            channels: self.config.model.in_channels,
            height: self.config.image_size[0],
            width: self.config.image_size[1],
            diffusion_steps: self.config.diffusion.diffusion_steps,
            num_classes: self.config.model.num_classes,
            class_names: self.config.class_names.clone(),
            guided,
            default_guidance_scale: guided.then_some(ddpm_schedule::DEFAULT_GUIDANCE_SCALE),
            parameters: self.parameters,
            step: self.config.step,
        }
    }

    /// Samples one batch as `request` says, calling `on_step` after every step, and returns the
    /// samples as a grid: the same draws, in the same order, as `ddpm-cli sample` with the same
    /// seed, `--steps`, `--solver`, `--class` and `--guidance-scale` and `--batch-size` at least
    /// `num`.
    pub fn sample(
        &self,
        request: &SampleRequest,
        mut on_step: impl FnMut(&StepView),
    ) -> Result<Grid> {
        let info = self.info();
        if request.num == 0 {
            return Err(WebError::Request(
                "the number of samples must be positive".into(),
            ));
        }
        if request.steps == 0 {
            return Err(WebError::Request("sampling needs at least one step".into()));
        }
        if request.steps > info.diffusion_steps {
            return Err(WebError::Request(format!(
                "{} steps: the model was trained with {} diffusion steps",
                request.steps, info.diffusion_steps
            )));
        }
        match (request.class, info.num_classes) {
            (Some(_), None) => {
                return Err(WebError::Request(
                    "a class was asked for but the model is unconditional".into(),
                ))
            }
            (Some(c), Some(k)) if c as usize >= k => {
                return Err(WebError::Request(format!("class {c} is outside 0..{k}")))
            }
            _ => {}
        }
        let guidance = match (request.guidance_scale, self.model.null_label()) {
            (Some(s), _) if !s.is_finite() || s < 0.0 => {
                return Err(WebError::Request(format!(
                    "guidance scale {s} must be a finite number, 0 or more"
                )))
            }
            (Some(_), None) => {
                return Err(WebError::Request(
                    "guidance needs a model trained with --class-dropout".into(),
                ))
            }
            (s, Some(null)) => Some((null, s.unwrap_or(ddpm_schedule::DEFAULT_GUIDANCE_SCALE))),
            (None, None) => None,
        };
        let cfg = self
            .config
            .diffusion
            .to_config(Some(&request.steps.to_string()))?;
        let diffusion = GaussianDiffusion::new(&cfg)?;
        let (c, h, w) = (info.channels, info.height, info.width);
        let mut rng = ChaCha8Rng::seed_from_u64(request.seed);
        let start = BatchStart::draw(
            &mut rng,
            request.num,
            (c, h, w),
            info.num_classes,
            request.class,
            &self.device,
        )?;
        let y = start.label_tensor(&self.device)?;
        let (x_t, mut noise) = (start.x_t, start.noise);
        let guided = guidance.map(|(null_label, scale)| ClassifierFreeGuidance {
            model: &self.model,
            null_label,
            scale,
            eps_channels: c,
        });
        let model: &dyn Denoiser = match &guided {
            Some(g) => g,
            None => &self.model,
        };
        let mut failed = None;
        let out = diffusion.sample_loop(
            |x: &Tensor, ts: &Tensor| {
                // NaN weights would end as black images; stop with an error instead, as the CLI.
                let out = model.denoise(x, ts, y.as_ref(), false)?;
                let sum = out.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !sum.is_finite() {
                    candle_core::bail!(
                        "the model's output is not finite; the weights may hold NaN or infinite values"
                    );
                }
                Ok(out)
            },
            x_t,
            request.method,
            true,
            &mut noise,
            |s| {
                if failed.is_some() {
                    return;
                }
                let view = (|| -> candle_core::Result<StepView> {
                    Ok(StepView {
                        step: s.step,
                        total: s.total,
                        x_t: Grid::from_batch(&s.sample.clamp(-1f32, 1f32)?)?,
                        pred_x0: Grid::from_batch(s.pred_xstart)?,
                    })
                })();
                match view {
                    Ok(v) => on_step(&v),
                    Err(e) => failed = Some(e),
                }
            },
        )?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        Ok(Grid::from_batch(&out)?)
    }

    /// The forward process on one image: `image` (H·W gray bytes, or H·W·3 RGB) noised to
    /// timestep `t` of the training process with `q_sample` and noise drawn from `seed`.
    pub fn forward(&self, image: &[u8], t: usize, seed: u64) -> Result<Grid> {
        let info = self.info();
        let (c, h, w) = (info.channels, info.height, info.width);
        if image.len() != c * h * w {
            return Err(WebError::Request(format!(
                "an image of {} bytes where the model takes {c}x{h}x{w} = {}",
                image.len(),
                c * h * w
            )));
        }
        if t >= info.diffusion_steps {
            return Err(WebError::Request(format!(
                "t = {t} is outside 0..{}",
                info.diffusion_steps
            )));
        }
        let x0: Vec<f32> = image.iter().map(|&b| b as f32 / 127.5 - 1.0).collect();
        let x0 = Tensor::from_vec(x0, (1, h, w, c), &self.device)?.permute((0, 3, 1, 2))?;
        let diffusion = GaussianDiffusion::new(&self.config.diffusion.to_config(Some(""))?)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let eps = ddpm_schedule::randn(&mut rng, (1, c, h, w), DType::F32, &self.device)?;
        let x_t = diffusion.q_sample(&x0.contiguous()?, &[t], &eps)?;
        Ok(Grid::from_batch(&x_t.clamp(-1f32, 1f32)?)?)
    }
}

#[cfg(test)]
mod tests;
