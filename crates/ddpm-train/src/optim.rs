//! AdamW with state that can be saved and restored, for exact resumption.

use crate::Result;
use candle_core::{backprop::GradStore, Tensor, Var};
use std::collections::HashMap;

/// AdamW hyperparameters (PyTorch's defaults; the original trains with lr 1e-4, no decay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over named parameters, as `torch.optim.AdamW`.
#[derive(Debug)]
pub struct AdamW {
    /// Hyperparameters; `lr` may be changed between steps (annealing).
    pub cfg: AdamWConfig,
    params: Vec<(String, Var, Var, Var)>,
    /// Steps taken so far.
    pub step: u64,
}

impl AdamW {
    /// An optimiser over `params` with zeroed moments.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(n, v)| {
                let m = Var::zeros(v.shape(), v.dtype(), v.device())?;
                let s = Var::zeros(v.shape(), v.dtype(), v.device())?;
                Ok((n, v, m, s))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            params,
            step: 0,
        })
    }

    /// Applies one update from `grads`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (_, p, m, v) in &self.params {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let m_new = ((m.as_tensor() * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v_new = ((v.as_tensor() * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&v_new / bc2)?.sqrt()? + c.eps)?;
            let update = ((&m_new / bc1)? / denom)?;
            let decayed = if c.weight_decay != 0.0 {
                (p.as_tensor() * (1.0 - c.lr * c.weight_decay))?
            } else {
                p.as_tensor().clone()
            };
            p.set(&(decayed - (update * c.lr)?)?)?;
            m.set(&m_new)?;
            v.set(&v_new)?;
        }
        Ok(())
    }

    /// The moments as tensors named `exp_avg.<param>` and `exp_avg_sq.<param>`.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (n, _, m, v) in &self.params {
            out.insert(format!("exp_avg.{n}"), m.as_tensor().copy()?);
            out.insert(format!("exp_avg_sq.{n}"), v.as_tensor().copy()?);
        }
        Ok(out)
    }

    /// Restores the moments saved by [`Self::state_tensors`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (n, p, m, v) in &self.params {
            for (key, var) in [(format!("exp_avg.{n}"), m), (format!("exp_avg_sq.{n}"), v)] {
                let t = tensors.get(&key).ok_or_else(|| {
                    crate::TrainError::Checkpoint(format!("optimizer state has no {key}"))
                })?;
                if t.dims() != p.dims() {
                    return Err(crate::TrainError::Checkpoint(format!(
                        "optimizer state {key} has shape {:?}, parameter has {:?}",
                        t.dims(),
                        p.dims()
                    )));
                }
                var.set(&t.to_dtype(p.dtype())?.to_device(p.device())?)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of the gradients of `params`.
pub fn grad_norm(params: &[(String, Var)], grads: &GradStore) -> Result<f64> {
    let mut total = 0f64;
    for (_, p) in params {
        if let Some(g) = grads.get(p.as_tensor()) {
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    Ok(total.sqrt())
}

/// Scales every gradient in place by `factor` (for clipping).
pub fn scale_grads(params: &[(String, Var)], grads: &mut GradStore, factor: f64) -> Result<()> {
    for (_, p) in params {
        if let Some(g) = grads.remove(p.as_tensor()) {
            grads.insert(p.as_tensor(), (g * factor)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn steps_match_a_scalar_adamw() {
        let p = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], cfg).unwrap();
        // loss = sum(p^3) / 3, so g = p^2.
        for _ in 0..3 {
            let loss = (p.as_tensor().powf(3.0).unwrap().sum_all().unwrap() / 3.0).unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        // torch.optim.AdamW, written out for one scalar.
        let reference = |mut w: f64| {
            let (mut m, mut v) = (0.0, 0.0);
            for k in 1..=3 {
                let g = w * w;
                w *= 1.0 - 0.1 * 0.5;
                m = 0.9 * m + 0.1 * g;
                v = 0.999 * v + 0.001 * g * g;
                let (mh, vh) = (m / (1.0 - 0.9f64.powi(k)), v / (1.0 - 0.999f64.powi(k)));
                w -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
            w
        };
        let got = p.as_tensor().to_vec1::<f64>().unwrap();
        assert!((got[0] - reference(1.0)).abs() < 1e-12, "{got:?}");
        assert!((got[1] - reference(-2.0)).abs() < 1e-12, "{got:?}");
        assert_eq!(opt.step, 3);
    }

    #[test]
    fn state_round_trip_gives_identical_updates() {
        let run = |restore: bool| {
            let p = Var::new(&[0.5f32, 1.5, -1.0], &Device::Cpu).unwrap();
            let mut opt =
                AdamW::new(vec![("w".into(), p.clone())], AdamWConfig::default()).unwrap();
            let grad = |p: &Var| {
                (p.as_tensor().sqr().unwrap().sum_all().unwrap())
                    .backward()
                    .unwrap()
            };
            for _ in 0..3 {
                opt.step(&grad(&p)).unwrap();
            }
            if restore {
                let state = opt.state_tensors().unwrap();
                let saved = p.as_tensor().copy().unwrap();
                let p2 = Var::from_tensor(&saved).unwrap();
                let mut opt2 =
                    AdamW::new(vec![("w".into(), p2.clone())], AdamWConfig::default()).unwrap();
                opt2.load_state(&state, 3).unwrap();
                opt2.step(&grad(&p2)).unwrap();
                return p2.as_tensor().to_vec1::<f32>().unwrap();
            }
            opt.step(&grad(&p)).unwrap();
            p.as_tensor().to_vec1::<f32>().unwrap()
        };
        assert_eq!(run(false), run(true));
        let p = Var::new(&[0.5f32], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), p)], AdamWConfig::default()).unwrap();
        let e = opt.load_state(
            &HashMap::from([(
                "exp_avg.w".to_string(),
                Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
            )]),
            1,
        );
        assert!(e.unwrap_err().to_string().contains("exp_avg_sq.w"));
    }
}
