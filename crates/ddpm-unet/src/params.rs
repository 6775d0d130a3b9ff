//! Trainable parameters: seeded PyTorch-style initialisation and safetensors I/O.

use crate::{Result, UNetError};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A named set of trainable parameters ([`Var`]s), created on first request from a seeded RNG.
///
/// Build a model with [`ParamStore::var_builder`]; each parameter is created once, in the order
/// the model asks for it, so the same seed always gives the same initial weights.
#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Mutex<Inner>>,
    dtype: DType,
    device: Device,
}

struct Inner {
    vars: BTreeMap<String, Var>,
    rng: ChaCha8Rng,
}

impl std::fmt::Debug for ParamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamStore")
            .field("len", &self.len())
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl ParamStore {
    /// An empty store whose parameters will be initialised from `seed`.
    pub fn new(seed: u64, dtype: DType, device: &Device) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                vars: BTreeMap::new(),
                rng: ChaCha8Rng::seed_from_u64(seed),
            })),
            dtype,
            device: device.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave the map half-written: every insert is a single call.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A [`VarBuilder`] that creates (or returns) parameters in this store.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), self.dtype, self.device.clone())
    }

    /// The parameters' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The parameters' device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of parameter tensors.
    pub fn len(&self) -> usize {
        self.lock().vars.len()
    }

    /// Whether the store holds no parameter.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.lock().vars.values().map(|v| v.elem_count()).sum()
    }

    /// Every parameter, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.lock()
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// A copy of every parameter's current value, by name.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.lock()
            .vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect()
    }

    /// Overwrites every parameter from `tensors`, which must hold exactly the store's names and
    /// shapes (other dtypes are converted). Nothing is changed when anything mismatches.
    pub fn set_tensors(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let inner = self.lock();
        let mut missing = Vec::new();
        let mut mismatched = Vec::new();
        for (name, var) in &inner.vars {
            match tensors.get(name) {
                None => missing.push(name.clone()),
                Some(t) if t.dims() != var.dims() => {
                    mismatched.push((name.clone(), var.dims().to_vec(), t.dims().to_vec()))
                }
                Some(_) => {}
            }
        }
        let mut unexpected: Vec<String> = tensors
            .keys()
            .filter(|k| !inner.vars.contains_key(*k))
            .cloned()
            .collect();
        unexpected.sort();
        if !missing.is_empty() || !unexpected.is_empty() || !mismatched.is_empty() {
            return Err(UNetError::WeightsMismatch {
                missing,
                unexpected,
                mismatched,
            });
        }
        for name in inner.vars.keys() {
            let dtype = tensors[name].dtype();
            if !matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
                return Err(UNetError::NotFloat {
                    name: name.clone(),
                    dtype,
                });
            }
        }
        for (name, var) in &inner.vars {
            let t = tensors[name]
                .to_device(&self.device)?
                .to_dtype(self.dtype)?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// Loads every parameter from a safetensors file (f32, f64, f16 or bf16).
    pub fn load_safetensors(&self, path: &Path) -> Result<()> {
        self.set_tensors(&read_safetensors(path)?)
    }

    /// Writes every parameter to a safetensors file atomically (temporary file, then rename).
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        write_safetensors(&self.tensors()?, path)
    }
}

/// Reads every tensor of a weights file (f32, f64, f16 or bf16), with errors that name the file.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let tensors = read_safetensors_any(path)?;
    let bad = |detail: String| UNetError::BadFile {
        path: path.to_path_buf(),
        detail,
    };
    for (name, t) in &tensors {
        if !matches!(
            t.dtype(),
            DType::F32 | DType::F64 | DType::F16 | DType::BF16
        ) {
            return Err(bad(format!(
                "tensor {name} has dtype {:?}; expected a float type",
                t.dtype()
            )));
        }
    }
    Ok(tensors)
}

/// Reads every tensor of a safetensors file in its stored dtype, integers included (class labels
/// saved by PyTorch are int64), with errors that name the file.
pub fn read_safetensors_any(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|source| UNetError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| UNetError::BadFile {
        path: path.to_path_buf(),
        detail: format!("not a valid safetensors file: {e}"),
    })
}

/// Writes tensors to a safetensors file atomically: a crash leaves the old file or the new one.
pub fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = tmp_path(path);
    let io = |source| UNetError::Io {
        path: path.to_path_buf(),
        source,
    };
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

impl Inner {
    fn init(&mut self, shape: &Shape, hint: Init) -> Vec<f64> {
        let n = shape.elem_count();
        match hint {
            Init::Const(c) => vec![c; n],
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| mean + stdev * self.rng.sample::<f64, _>(StandardNormal))
                .collect(),
            Init::Uniform { lo, up } => (0..n).map(|_| self.rng.random_range(lo..up)).collect(),
            Init::Kaiming { .. } => {
                // PyTorch's default for conv and linear weights: kaiming_uniform(a = sqrt(5)),
                // i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
                let fan_in: usize = shape.dims().iter().skip(1).product();
                let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
                (0..n)
                    .map(|_| self.rng.random_range(-bound..bound))
                    .collect()
            }
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for ParamStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut inner = self.lock();
        if let Some(v) = inner.vars.get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "parameter {name} exists with shape {:?}, requested {:?}",
                    v.dims(),
                    s.dims()
                );
            }
            return v.as_tensor().to_dtype(dtype)?.to_device(dev);
        }
        let values = inner.init(&s, h);
        let t = Tensor::from_vec(values, s, &self.device)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        inner.vars.insert(name.to_string(), var);
        out.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.lock().vars.get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("no parameter named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.lock().vars.contains_key(name)
    }
}
