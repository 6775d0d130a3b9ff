//! The training loop: hybrid-loss steps, EMA, logging, sample grids and exact resumption.

use crate::checkpoint::{self, CheckpointMeta, RngState};
use crate::data::{Dataset, EpochShuffler, ImageDataset};
use crate::ema::Ema;
use crate::model::{ModelConfig, TrainableModel};
use crate::optim::{grad_norm, scale_grads, AdamW, AdamWConfig};
use crate::settings::{DiffusionSettings, TrainConfig};
use crate::timestep_sampler::{
    LossSecondMomentSampler, TimestepSampler, TimestepSampling, UniformSampler,
};
use crate::{grid, Result, TrainError};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use ddpm_kernels::profile::{timed, OpClass};
use ddpm_schedule::{randn, Denoiser, GaussianDiffusion, RngNoise};
use ddpm_unet::{ParamStore, UNetConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The timestep sampler of a run, with its state.
#[derive(Debug, Clone)]
enum TimestepSamplers {
    Uniform(UniformSampler),
    LossSecondMoment(LossSecondMomentSampler),
}

/// One example's (timestep, loss, mse, vb).
pub type ExampleLoss = (usize, f64, Option<f64>, Option<f64>);

/// What one optimiser step measured.
#[derive(Debug, Clone, Serialize)]
pub struct StepStats {
    /// The step just completed (1-based).
    pub step: u64,
    /// Mean weighted loss over the batch.
    pub loss: f64,
    /// Mean mse term, when the loss has one.
    pub mse: Option<f64>,
    /// Mean vb term, when the loss has one.
    pub vb: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Per-example (timestep, loss, mse, vb) of the batch, for per-quartile logging.
    #[serde(skip)]
    pub per_example: Vec<ExampleLoss>,
}

/// How a call to [`Trainer::run`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// All steps done; the final checkpoint.
    Finished(PathBuf),
    /// Stopped by the stop flag (Ctrl-C); the checkpoint saved on the way out.
    Interrupted(PathBuf),
}

/// A training run of the network a `C` builds (the UNet by default) on an image data set `D` (MNIST-style
/// IDX files by default).
pub struct Trainer<C: ModelConfig = UNetConfig, D: Dataset = ImageDataset> {
    model_cfg: C,
    diffusion_settings: DiffusionSettings,
    /// Training settings.
    pub cfg: TrainConfig,
    store: ParamStore,
    params: Vec<(String, Var)>,
    model: C::Model,
    diffusion: GaussianDiffusion,
    opt: AdamW,
    emas: Vec<Ema>,
    sampler: TimestepSamplers,
    data: D,
    shuffler: EpochShuffler,
    rng: ChaCha8Rng,
    run_dir: PathBuf,
    run_id: Option<String>,
    log: LogWindow,
    /// The checkpoint this trainer was resumed from, with its step.
    resumed_from: Option<(u64, PathBuf)>,
    lock: Option<crate::run_folder::RunLock>,
    /// Optimiser steps completed.
    pub step: u64,
    stop: Arc<AtomicBool>,
    device: Device,
}

impl<C: ModelConfig, D: Dataset> Trainer<C, D> {
    /// A new run: a freshly initialised model (seeded by `cfg.seed`) writing to `run_dir`.
    pub fn new(
        model_cfg: C,
        diffusion_settings: DiffusionSettings,
        cfg: TrainConfig,
        data: D,
        run_dir: &Path,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        ModelConfig::validate(&model_cfg)?;
        let [channels, height, width] = data.image_shape();
        ModelConfig::validate_image_size(&model_cfg, height, width)?;
        if channels != model_cfg.in_channels() {
            return Err(TrainError::Config(format!(
                "the data has {channels}-channel images; the model takes {}",
                model_cfg.in_channels()
            )));
        }
        if cfg.class_dropout > 0.0 && model_cfg.null_label().is_none() {
            return Err(TrainError::Config(
                "class dropout needs a model with a null class (null_class)".into(),
            ));
        }
        if cfg.class_cond != model_cfg.num_classes().is_some() {
            return Err(TrainError::Config(
                "class_cond and the model's num_classes disagree".into(),
            ));
        }
        if diffusion_settings.out_channels(model_cfg.in_channels()) != model_cfg.out_channels() {
            return Err(TrainError::Config(format!(
                "learn_sigma={} needs out_channels = {}, the model has {}",
                diffusion_settings.learn_sigma,
                diffusion_settings.out_channels(model_cfg.in_channels()),
                model_cfg.out_channels()
            )));
        }
        let diffusion = GaussianDiffusion::new(&diffusion_settings.to_config(Some(""))?)?;
        if diffusion_settings.learn_sigma && diffusion.num_timesteps() < 2 {
            // The learned range spans posterior variance to beta; with one step the posterior
            // variance is 0 and its log is -inf.
            return Err(TrainError::Config(
                "a learned variance (learn_sigma) needs at least 2 diffusion steps".into(),
            ));
        }
        if cfg.sample_interval > 0 {
            // The sample grids' settings are checked now, not at the first grid (and only when
            // grids are drawn: a run without them may keep the default respacing whatever its
            // number of steps).
            GaussianDiffusion::new(&diffusion_settings.to_config(Some(&cfg.sample_respacing))?)
                .map_err(|e| {
                    TrainError::Config(format!("sample respacing {:?}: {e}", cfg.sample_respacing))
                })?;
        }
        let store = ParamStore::new(cfg.seed, DType::F32, device);
        let model = model_cfg.build(store.var_builder(), cfg.kernels)?;
        let params = store.vars();
        let opt = AdamW::new(
            params.clone(),
            AdamWConfig {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )?;
        let emas = cfg
            .ema_rate
            .iter()
            .map(|&r| Ema::new(r, &params))
            .collect::<Result<_>>()?;
        let n = diffusion.num_timesteps();
        let sampler = match cfg.schedule_sampler {
            TimestepSampling::LossSecondMoment => {
                TimestepSamplers::LossSecondMoment(LossSecondMomentSampler::new(n))
            }
            TimestepSampling::Uniform => TimestepSamplers::Uniform(UniformSampler::new(n)),
        };
        Ok(Self {
            shuffler: EpochShuffler::new(data.len(), cfg.seed, 0, 0),
            rng: ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(1)),
            model_cfg,
            diffusion_settings,
            store,
            params,
            model,
            diffusion,
            opt,
            emas,
            sampler,
            data,
            run_dir: run_dir.to_path_buf(),
            run_id: Some(new_run_id(cfg.seed)),
            log: LogWindow::default(),
            resumed_from: None,
            lock: None,
            step: 0,
            stop: Arc::new(AtomicBool::new(false)),
            device: device.clone(),
            cfg,
        })
    }

    /// Continues a run from a checkpoint folder exactly where it stopped.
    ///
    /// `update` may change settings that do not affect the model (steps, intervals, lr, ...).
    pub fn resume(
        ckpt: &Path,
        data: D,
        run_dir: &Path,
        device: &Device,
        update: impl FnOnce(&mut TrainConfig),
    ) -> Result<Self> {
        // Damage first, as in `load_model`: a damaged config.json is named as damage.
        crate::run_folder::verify_checkpoint(ckpt)?;
        let meta = CheckpointMeta::<C>::read(ckpt)?;
        let mut cfg = meta.train.clone();
        update(&mut cfg);
        if cfg.steps < meta.step {
            return Err(TrainError::Config(format!(
                "{} is at step {}, past the {} steps asked for",
                ckpt.display(),
                meta.step,
                cfg.steps
            )));
        }
        if meta.data_pos > data.len() || meta.data_len.is_some_and(|n| n != data.len()) {
            return Err(TrainError::Config(format!(
                "{} was trained on {} images (at position {} of an epoch); this training set \
                 has {}: resume with the same data",
                ckpt.display(),
                meta.data_len
                    .map_or_else(|| "a different number of".to_string(), |n| n.to_string()),
                meta.data_pos,
                data.len()
            )));
        }
        if cfg.ema_rate != meta.train.ema_rate
            || cfg.ema_warmup != meta.train.ema_warmup
            || cfg.class_cond != meta.train.class_cond
            || cfg.class_dropout != meta.train.class_dropout
            || cfg.schedule_sampler != meta.train.schedule_sampler
        {
            return Err(TrainError::Config(
                "ema_rate, ema_warmup, class_cond, class_dropout and schedule_sampler cannot \
                 change on resume"
                    .into(),
            ));
        }
        let mut t = Self::new(
            meta.model.clone(),
            meta.diffusion.clone(),
            cfg,
            data,
            run_dir,
            device,
        )?;
        let ck =
            |e: ddpm_unet::UNetError| TrainError::Checkpoint(format!("{}: {e}", ckpt.display()));
        t.store
            .load_safetensors(&ckpt.join(checkpoint::MODEL_FILE))
            .map_err(ck)?;
        let opt_state =
            ddpm_unet::read_safetensors(&ckpt.join(checkpoint::OPTIMIZER_FILE)).map_err(ck)?;
        t.opt.load_state(&opt_state, meta.step)?;
        for ema in &mut t.emas {
            let tensors =
                ddpm_unet::read_safetensors(&ckpt.join(checkpoint::ema_file(&ema.rate_name())))
                    .map_err(ck)?;
            for (name, value) in ema.params.iter_mut() {
                let v = tensors.get(name).ok_or_else(|| {
                    TrainError::Checkpoint(format!("EMA {} has no {name}", ema.rate))
                })?;
                *value = v.to_dtype(DType::F32)?.to_device(device)?;
            }
        }
        t.rng = ChaCha8Rng::seed_from_u64(meta.rng.seed);
        t.rng.set_word_pos(meta.rng.word_pos);
        t.shuffler = EpochShuffler::new(t.data.len(), t.cfg.seed, meta.data_epoch, meta.data_pos);
        if let (TimestepSamplers::LossSecondMoment(s), Some(saved)) = (&mut t.sampler, meta.sampler)
        {
            *s = saved;
        }
        t.step = meta.step;
        t.run_id = meta.run_id;
        t.log = meta.log_window.unwrap_or_default();
        t.resumed_from = Some((meta.step, ckpt.to_path_buf()));
        Ok(t)
    }

    /// A flag that, once set (e.g. by a Ctrl-C handler), makes [`Self::run`] save and return.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Uses `flag` as the stop flag (one shared with a signal handler).
    pub fn set_stop_flag(&mut self, flag: Arc<AtomicBool>) {
        self.stop = flag;
    }

    /// The run this trainer continues or started (checkpoints carry it; pruning keeps to it).
    pub fn run_id(&self) -> Option<&str> {
        self.run_id.as_deref()
    }

    /// Hands the trainer the lock of its run folder (from
    /// [`prepare_run_folder`](crate::run_folder::prepare_run_folder)); without one,
    /// [`Self::run`] takes it.
    pub fn hold_lock(&mut self, lock: crate::run_folder::RunLock) {
        self.lock = Some(lock);
    }

    /// The checkpoint of the current step when it is already on disk: the resumed one, if no
    /// step has been trained since and it lies in the run folder. Saving it again would only
    /// rewrite the same state (and put its only copy at risk for a moment).
    fn unchanged_checkpoint(&self) -> Option<PathBuf> {
        let (step, dir) = self.resumed_from.as_ref()?;
        let here = self.run_dir.join(checkpoint::checkpoint_name(*step));
        (*step == self.step && same_dir(dir, &here)).then_some(here)
    }

    fn create_run_dir(&self) -> Result<()> {
        std::fs::create_dir_all(&self.run_dir).map_err(|e| TrainError::Io {
            path: self.run_dir.clone(),
            source: e,
        })
    }

    /// The image size [height, width] of the data.
    fn image_size(&self) -> [usize; 2] {
        let [_, h, w] = self.data.image_shape();
        [h, w]
    }

    /// The model being trained.
    pub fn model(&self) -> &C::Model {
        &self.model
    }

    /// The trainable parameters.
    pub fn params(&self) -> &ParamStore {
        &self.store
    }

    /// The diffusion flags this run trains with.
    pub fn diffusion_settings(&self) -> &DiffusionSettings {
        &self.diffusion_settings
    }

    /// The EMA weights.
    pub fn emas(&self) -> &[Ema] {
        &self.emas
    }

    fn lr_at(&self, step: u64) -> f64 {
        self.cfg.lr_at(step)
    }

    /// One optimiser step over one batch (microbatches accumulate gradients, as the original).
    pub fn train_step(&mut self) -> Result<StepStats> {
        let idx = self.shuffler.next_indices(self.cfg.batch_size);
        let augment = self.cfg.seed ^ (self.step + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let (x, y) = self.data.batch_seeded(&idx, augment, &self.device)?;
        self.model
            .set_dropout_seed(self.cfg.seed ^ (self.step + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
        let mut total: Option<GradStore> = None;
        let mut loss_sum = 0.0;
        let mut per_example = Vec::with_capacity(idx.len());
        let micro = self.cfg.micro();
        for start in (0..idx.len()).step_by(micro) {
            let len = micro.min(idx.len() - start);
            let xm = x.narrow(0, start, len)?;
            let ym = self
                .cfg
                .class_cond
                .then(|| y.narrow(0, start, len))
                .transpose()?;
            let ym = match (ym, self.model_cfg.null_label()) {
                (Some(ym), Some(null)) if self.cfg.class_dropout > 0.0 => Some(drop_labels(
                    &ym,
                    self.cfg.class_dropout,
                    null,
                    &mut self.rng,
                )?),
                (ym, _) => ym,
            };
            let (t, w) = match &self.sampler {
                TimestepSamplers::Uniform(s) => s.sample(len, &mut self.rng),
                TimestepSamplers::LossSecondMoment(s) => s.sample(len, &mut self.rng),
            };
            let noise = randn(&mut self.rng, xm.shape().clone(), DType::F32, &self.device)?;
            let model = &self.model;
            let terms = self.diffusion.training_losses(
                |xt, ts| model.denoise(xt, ts, ym.as_ref(), true),
                &xm,
                &t,
                &noise,
            )?;
            let losses: Vec<f64> = terms.loss.to_dtype(DType::F64)?.to_vec1()?;
            let host = |o: &Option<Tensor>| -> Result<Option<Vec<f64>>> {
                Ok(match o {
                    Some(t) => Some(t.to_dtype(DType::F64)?.to_vec1()?),
                    None => None,
                })
            };
            let (mse, vb) = (host(&terms.mse)?, host(&terms.vb)?);
            for i in 0..len {
                per_example.push((
                    t[i],
                    losses[i],
                    mse.as_ref().map(|m| m[i]),
                    vb.as_ref().map(|v| v[i]),
                ));
            }
            if let TimestepSamplers::LossSecondMoment(s) = &mut self.sampler {
                s.update_with_losses(&t, &losses);
            }
            let w = Tensor::from_vec(
                w.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                len,
                &self.device,
            )?;
            let loss = (terms.loss * w)?.mean_all()?;
            let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !lv.is_finite() {
                return Err(TrainError::NonFinite {
                    step: self.step + 1,
                    loss: lv,
                });
            }
            loss_sum += lv * len as f64;
            let grads = loss.backward()?;
            total = Some(match total {
                None => grads,
                Some(mut acc) => {
                    for (_, p) in &self.params {
                        if let Some(g) = grads.get(p.as_tensor()) {
                            let sum = match acc.remove(p.as_tensor()) {
                                Some(a) => (a + g)?,
                                None => g.clone(),
                            };
                            acc.insert(p.as_tensor(), sum);
                        }
                    }
                    acc
                }
            });
        }
        let grads = total.expect("a batch has at least one microbatch");
        let (norm, lr) = timed(OpClass::Optimiser, || self.apply_gradients(grads))?;
        self.step += 1;
        let n = per_example.len() as f64;
        let mean = |f: fn(&ExampleLoss) -> Option<f64>| -> Option<f64> {
            let v: Option<Vec<f64>> = per_example.iter().map(f).collect();
            v.map(|v| v.iter().sum::<f64>() / n)
        };
        Ok(StepStats {
            step: self.step,
            loss: loss_sum / n,
            mse: mean(|e| e.2),
            vb: mean(|e| e.3),
            grad_norm: norm,
            lr,
            per_example,
        })
    }

    /// Clips (when asked), steps the optimiser and updates the EMAs: returns the gradient norm
    /// before clipping and the learning rate used.
    fn apply_gradients(&mut self, mut grads: GradStore) -> Result<(f64, f64)> {
        let norm = grad_norm(&self.params, &grads)?;
        if !norm.is_finite() {
            return Err(TrainError::NonFinite {
                step: self.step + 1,
                loss: norm,
            });
        }
        if let Some(clip) = self.cfg.grad_clip {
            if norm > clip {
                scale_grads(&self.params, &mut grads, clip / norm)?;
            }
        }
        let lr = self.lr_at(self.step);
        self.opt.cfg.lr = lr;
        self.opt.step(&grads)?;
        // The step count is in every checkpoint, so a resumed run continues the same ramp.
        let update = self.step + 1;
        for ema in &mut self.emas {
            let decay = self.cfg.ema_decay(ema.rate, update);
            ema.update_with_decay(&self.params, decay)?;
        }
        Ok((norm, lr))
    }

    /// Writes a checkpoint of the current state and prunes old ones.
    pub fn save(&self) -> Result<PathBuf> {
        let meta = CheckpointMeta {
            model: self.model_cfg.clone(),
            diffusion: self.diffusion_settings.clone(),
            train: self.cfg.clone(),
            image_size: self.image_size(),
            step: self.step,
            rng: RngState {
                seed: self.cfg.seed.wrapping_add(1),
                word_pos: self.rng.get_word_pos(),
            },
            data_epoch: self.shuffler.epoch,
            data_pos: self.shuffler.pos,
            sampler: match &self.sampler {
                TimestepSamplers::LossSecondMoment(s) => Some(s.clone()),
                TimestepSamplers::Uniform(_) => None,
            },
            run_id: self.run_id.clone(),
            data_len: Some(self.data.len()),
            class_names: self.data.class_names(),
            log_window: Some(self.log.clone()),
        };
        self.create_run_dir()?;
        let ck = |e: ddpm_unet::UNetError| TrainError::Checkpoint(e.to_string());
        let dir = crate::run_folder::write_checkpoint_dir(&self.run_dir, self.step, |d| {
            self.store
                .save_safetensors(&d.join(checkpoint::MODEL_FILE))
                .map_err(ck)?;
            ddpm_unet::write_safetensors(
                &self.opt.state_tensors()?,
                &d.join(checkpoint::OPTIMIZER_FILE),
            )
            .map_err(ck)?;
            for ema in &self.emas {
                ddpm_unet::write_safetensors(
                    &ema.params,
                    &d.join(checkpoint::ema_file(&ema.rate_name())),
                )
                .map_err(ck)?;
            }
            let json = serde_json::to_string_pretty(&meta)
                .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
            std::fs::write(d.join(checkpoint::CONFIG_FILE), json).map_err(|e| TrainError::Io {
                path: d.join(checkpoint::CONFIG_FILE),
                source: e,
            })
        })?;
        crate::run_folder::prune_checkpoints(
            &self.run_dir,
            self.run_id.as_deref(),
            self.step,
            self.cfg.keep_checkpoints,
        )?;
        Ok(dir)
    }

    /// Redraws `loss.png` from `metrics.jsonl`; a run never stops over a picture.
    fn draw_loss_plot(&self) {
        let metrics = self.run_dir.join(crate::run_folder::METRICS_FILE);
        let drawn = crate::plot::read_metrics(&metrics)
            .and_then(|rows| crate::plot::loss_plot(&rows, &self.run_dir.join("loss.png")));
        if let Err(e) = drawn {
            tracing::warn!("loss.png not drawn: {e}");
        }
    }

    /// Saves a checkpoint once the rows logged before it are on disk, so that a checkpoint that
    /// survives a power cut never has fewer rows before it than were logged.
    fn save_after(&self, metrics: &crate::run_folder::MetricsLog) -> Result<PathBuf> {
        metrics.sync()?;
        self.save()
    }

    /// Samples a grid from the first EMA weights (or the raw weights when there is no EMA).
    pub fn sample_grid(&self, path: &Path) -> Result<()> {
        let weights: HashMap<String, Tensor> = match self.emas.first() {
            Some(e) => e.params.clone(),
            None => self.store.tensors()?,
        };
        let size = self.image_size();
        let x = sample_images(
            &self.model_cfg,
            &self.diffusion_settings,
            &weights,
            size,
            self.cfg.sample_count,
            &self.cfg.sample_respacing,
            self.cfg.seed,
            self.cfg.kernels,
            &self.device,
        )?;
        grid::save_grid_png(&x, path)
    }

    /// Trains until `cfg.steps`, logging, saving and sampling along the way.
    pub fn run(&mut self, progress: bool) -> Result<RunOutcome> {
        self.create_run_dir()?;
        if self.lock.is_none() {
            self.lock = Some(crate::run_folder::RunLock::acquire(&self.run_dir)?);
            for name in crate::run_folder::clean_stale_temporaries(&self.run_dir)? {
                tracing::info!("cleaned up {name}, left by an interrupted save or prune");
            }
        }
        let mut metrics = crate::run_folder::MetricsLog::open(&self.run_dir, self.step)?;
        let bar = if progress {
            let b = indicatif::ProgressBar::new(self.cfg.steps);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps, ETA {eta} {msg}",
                )
                .expect("valid template"),
            );
            b.set_position(self.step);
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut last_saved = None;
        let mut window = Instant::now();
        let mut window_images = 0usize;
        while self.step < self.cfg.steps {
            if self.stop.load(Ordering::SeqCst) {
                let dir = match self.unchanged_checkpoint() {
                    Some(d) => d,
                    None => self.save_after(&metrics)?,
                };
                bar.abandon_with_message("interrupted; checkpoint saved");
                return Ok(RunOutcome::Interrupted(dir));
            }
            let stats = self.train_step()?;
            self.log.add(&stats, self.diffusion.num_timesteps());
            window_images += stats.per_example.len();
            bar.set_position(self.step);
            bar.set_message(format!("loss {:.4}", stats.loss));
            if self.step.is_multiple_of(self.cfg.log_interval) {
                let secs = window.elapsed().as_secs_f64();
                // The speed of this process's steps only (a resumed window began before it).
                let record = self
                    .log
                    .finish(self.step, stats.lr, window_images as f64 / secs);
                tracing::info!(
                    "step {} loss {:.4} mse {:.4} vb {:.4} grad {:.3} lr {:.2e} {:.1} img/s",
                    self.step,
                    record["loss"].as_f64().unwrap_or(f64::NAN),
                    record["mse"].as_f64().unwrap_or(f64::NAN),
                    record["vb"].as_f64().unwrap_or(f64::NAN),
                    record["grad_norm"].as_f64().unwrap_or(f64::NAN),
                    stats.lr,
                    record["images_per_sec"].as_f64().unwrap_or(f64::NAN),
                );
                metrics.append(&record)?;
                self.log = LogWindow::default();
                window = Instant::now();
                window_images = 0;
            }
            if self.step.is_multiple_of(self.cfg.save_interval) {
                last_saved = Some(self.save_after(&metrics)?);
            }
            if self.cfg.sample_interval > 0 && self.step.is_multiple_of(self.cfg.sample_interval) {
                self.sample_grid(&self.run_dir.join(format!("samples-{:07}.png", self.step)))?;
                self.draw_loss_plot();
            }
        }
        if self.cfg.sample_interval > 0 {
            self.draw_loss_plot();
        }
        let dir = match (last_saved, self.unchanged_checkpoint()) {
            (Some(d), _) if d.ends_with(checkpoint::checkpoint_name(self.step)) => d,
            (_, Some(d)) => d,
            _ => self.save_after(&metrics)?,
        };
        bar.finish_with_message("done");
        Ok(RunOutcome::Finished(dir))
    }
}

/// Samples `n` images with the weights `weights` (seeded) of the network `model_cfg` builds, for grids and quick
/// looks.
#[allow(clippy::too_many_arguments)]
pub fn sample_images<C: ModelConfig>(
    model_cfg: &C,
    settings: &DiffusionSettings,
    weights: &HashMap<String, Tensor>,
    image_size: [usize; 2],
    n: usize,
    respacing: &str,
    seed: u64,
    kernels: ddpm_unet::KernelOptions,
    device: &Device,
) -> Result<Tensor> {
    let store = ParamStore::new(0, DType::F32, device);
    let model = model_cfg.build(store.var_builder(), kernels)?;
    store.set_tensors(weights)?;
    let diffusion = GaussianDiffusion::new(&settings.to_config(Some(respacing))?)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5A4D_504C_4553);
    let [h, w] = image_size;
    let x_t = randn(
        &mut rng,
        (n, model_cfg.in_channels(), h, w),
        DType::F32,
        device,
    )?;
    let labels = match model_cfg.num_classes() {
        Some(k) => Some(Tensor::from_vec(
            (0..n).map(|i| (i % k) as u32).collect::<Vec<_>>(),
            n,
            device,
        )?),
        None => None,
    };
    let mut noise = RngNoise(rng);
    let out = diffusion.p_sample_loop(
        model.sampling_fn(labels.as_ref()),
        x_t,
        true,
        &mut noise,
        |_| {},
    )?;
    Ok(out)
}

/// Labels with each replaced by `null` with probability `p` (classifier-free guidance's label
/// dropout), drawn from the training stream so that a resumed run draws the same.
pub fn drop_labels(labels: &Tensor, p: f64, null: u32, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    use rand::Rng;
    let mut y: Vec<u32> = labels.to_dtype(DType::U32)?.to_vec1()?;
    for v in &mut y {
        if rng.random::<f64>() < p {
            *v = null;
        }
    }
    Ok(Tensor::from_vec(y, labels.dims(), labels.device())?)
}

/// The statistics of the steps since the last metrics row (saved in checkpoints, so that a
/// resumed run logs the rows an uninterrupted one does).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogWindow {
    /// Steps in the window.
    pub steps: u64,
    /// Images in the window.
    pub images: usize,
    /// Sum and count of each logged term.
    pub sums: std::collections::BTreeMap<String, (f64, usize)>,
    /// Sum of the steps' gradient norms.
    pub grad_norm: f64,
}

impl LogWindow {
    fn push(&mut self, key: String, v: f64) {
        let e = self.sums.entry(key).or_insert((0.0, 0));
        e.0 += v;
        e.1 += 1;
    }

    fn add(&mut self, s: &StepStats, num_timesteps: usize) {
        self.steps += 1;
        self.images += s.per_example.len();
        self.grad_norm += s.grad_norm;
        for &(t, loss, mse, vb) in &s.per_example {
            // The original logs each term per quarter of the schedule (q0 = the noiseless end).
            let q = (4 * t / num_timesteps).min(3);
            for (name, v) in [("loss", Some(loss)), ("mse", mse), ("vb", vb)] {
                if let Some(v) = v {
                    self.push(name.to_string(), v);
                    self.push(format!("{name}_q{q}"), v);
                }
            }
        }
    }

    /// The metrics row at `step`.
    fn finish(&self, step: u64, lr: f64, images_per_sec: f64) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("step".into(), step.into());
        for (k, &(s, n)) in &self.sums {
            m.insert(k.clone(), (s / n as f64).into());
        }
        m.insert(
            "grad_norm".into(),
            (self.grad_norm / self.steps.max(1) as f64).into(),
        );
        m.insert("lr".into(), lr.into());
        m.insert("images_per_sec".into(), images_per_sec.into());
        serde_json::Value::Object(m)
    }
}

/// Whether two paths name the same folder (through links and `..` too).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// A run id that differs between runs (the clock, the process and the seed).
fn new_run_id(seed: u64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mix = (nanos as u64) ^ (u64::from(std::process::id()) << 32) ^ seed.rotate_left(17);
    format!("{mix:016x}")
}
