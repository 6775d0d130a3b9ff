//! Exponential moving averages of the model weights.

use crate::Result;
use candle_core::{Tensor, Var};
use std::collections::HashMap;

/// An EMA of a set of parameters: ema ← rate·ema + (1 − rate)·param after each step.
#[derive(Debug, Clone)]
pub struct Ema {
    /// The decay rate (the original's default is 0.9999).
    pub rate: f64,
    /// The averaged values, by parameter name.
    pub params: HashMap<String, Tensor>,
}

impl Ema {
    /// Starts the average at the parameters' current values.
    pub fn new(rate: f64, params: &[(String, Var)]) -> Result<Self> {
        let params = params
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        Ok(Self { rate, params })
    }

    /// Moves the average towards the parameters' current values at the average's rate.
    pub fn update(&mut self, params: &[(String, Var)]) -> Result<()> {
        self.update_with_decay(params, self.rate)
    }

    /// Moves the average with this step's `decay` (below the rate during an EMA warm-up).
    pub fn update_with_decay(&mut self, params: &[(String, Var)], decay: f64) -> Result<()> {
        for (name, var) in params {
            if let Some(e) = self.params.get_mut(name) {
                // Detached: otherwise each average keeps the previous one (and both products)
                // alive as its backprop graph, and memory grows by three model copies a step.
                *e = ((&*e * decay)? + (var.as_tensor() * (1.0 - decay))?)?.detach();
            }
        }
        Ok(())
    }

    /// The rate as it appears in file names (`ema_0.9999.safetensors`).
    pub fn rate_name(&self) -> String {
        format!("{}", self.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn update_follows_the_formula() {
        let v = Var::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
        let params = vec![("w".to_string(), v.clone())];
        let mut ema = Ema::new(0.9, &params).unwrap();
        v.set(&Tensor::new(&[3.0f64, 0.0], &Device::Cpu).unwrap())
            .unwrap();
        ema.update(&params).unwrap();
        ema.update(&params).unwrap();
        // 1 → 0.9·1 + 0.1·3 = 1.2 → 0.9·1.2 + 0.3 = 1.38; 2 → 1.8 → 1.62
        let got = ema.params["w"].to_vec1::<f64>().unwrap();
        assert!(
            (got[0] - 1.38).abs() < 1e-12 && (got[1] - 1.62).abs() < 1e-12,
            "{got:?}"
        );
        assert_eq!(ema.rate_name(), "0.9");
        // The average is plain data, not a graph that links every past step.
        assert!(!ema.params["w"].track_op());
    }
}
