//! Timestep samplers: which diffusion steps each training example is taken at.

use crate::{Result, TrainError};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Which timestep sampler a run uses (the original's `--schedule_sampler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TimestepSampling {
    /// Every timestep equally likely ([`UniformSampler`]).
    #[default]
    Uniform,
    /// Importance sampling by the loss history ([`LossSecondMomentSampler`]).
    LossSecondMoment,
}

impl TimestepSampling {
    /// Every choice.
    pub const ALL: [TimestepSampling; 2] = [Self::Uniform, Self::LossSecondMoment];

    /// The name the original and `--schedule-sampler` use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Uniform => "uniform",
            Self::LossSecondMoment => "loss-second-moment",
        }
    }
}

impl std::fmt::Display for TimestepSampling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TimestepSampling {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                TrainError::Config(format!(
                    "unknown schedule sampler {s:?} (expected uniform or loss-second-moment)"
                ))
            })
    }
}

/// A distribution over timesteps, sampled with importance weights 1/(T·p) so the loss stays
/// an unbiased estimate of the uniform-timestep objective (the original's `ScheduleSampler`).
#[doc(alias = "ScheduleSampler")]
pub trait TimestepSampler {
    /// Unnormalised positive weights, one per timestep.
    fn weights(&self) -> Vec<f64>;

    /// Feeds back per-example losses at their timesteps (loss-aware samplers use them).
    fn update_with_losses(&mut self, _t: &[usize], _losses: &[f64]) {}

    /// Draws `batch` timesteps and their importance weights.
    fn sample<R: Rng + ?Sized>(&self, batch: usize, rng: &mut R) -> (Vec<usize>, Vec<f64>)
    where
        Self: Sized,
    {
        sample_from_weights(&self.weights(), batch, rng)
    }
}

/// Draws `batch` indices with probability proportional to `w`, and weights `1/(n·p[i])`.
pub fn sample_from_weights<R: Rng + ?Sized>(
    w: &[f64],
    batch: usize,
    rng: &mut R,
) -> (Vec<usize>, Vec<f64>) {
    let total: f64 = w.iter().sum();
    let p: Vec<f64> = w.iter().map(|x| x / total).collect();
    let mut cdf = Vec::with_capacity(p.len());
    let mut acc = 0.0;
    for &pi in &p {
        acc += pi;
        cdf.push(acc);
    }
    let n = p.len();
    let mut ts = Vec::with_capacity(batch);
    let mut weights = Vec::with_capacity(batch);
    for _ in 0..batch {
        let u: f64 = rng.random::<f64>() * acc;
        let i = cdf.partition_point(|&c| c <= u).min(n - 1);
        ts.push(i);
        weights.push(1.0 / (n as f64 * p[i]));
    }
    (ts, weights)
}

/// Every timestep equally likely (the default).
#[derive(Debug, Clone)]
pub struct UniformSampler {
    num_timesteps: usize,
}

impl UniformSampler {
    /// A uniform sampler over `num_timesteps` steps.
    pub fn new(num_timesteps: usize) -> Self {
        Self { num_timesteps }
    }
}

impl TimestepSampler for UniformSampler {
    fn weights(&self) -> Vec<f64> {
        vec![1.0; self.num_timesteps]
    }

    fn sample<R: Rng + ?Sized>(&self, batch: usize, rng: &mut R) -> (Vec<usize>, Vec<f64>) {
        (
            (0..batch)
                .map(|_| rng.random_range(0..self.num_timesteps))
                .collect(),
            vec![1.0; batch],
        )
    }
}

/// Improved DDPM's importance sampler: `p(t) ∝ sqrt(E[L_t²])` over the last losses at each step,
/// mixed with a small uniform probability; uniform until every step has a full history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossSecondMomentSampler {
    history_per_term: usize,
    uniform_prob: f64,
    /// Per timestep, its most recent losses (oldest first), at most `history_per_term`.
    history: Vec<Vec<f64>>,
}

impl LossSecondMomentSampler {
    /// The original's defaults: a history of 10 losses per step, uniform probability 0.001.
    pub fn new(num_timesteps: usize) -> Self {
        Self::with_params(num_timesteps, 10, 0.001).expect("defaults are valid")
    }

    /// A sampler with an explicit history length and uniform probability.
    pub fn with_params(
        num_timesteps: usize,
        history_per_term: usize,
        uniform_prob: f64,
    ) -> Result<Self> {
        if num_timesteps == 0 || history_per_term == 0 || !(0.0..=1.0).contains(&uniform_prob) {
            return Err(TrainError::Config(format!(
                "loss-second-moment sampler needs steps > 0, history > 0 and uniform_prob in [0, 1] \
                 (got {num_timesteps}, {history_per_term}, {uniform_prob})"
            )));
        }
        Ok(Self {
            history_per_term,
            uniform_prob,
            history: vec![Vec::new(); num_timesteps],
        })
    }

    /// Whether every timestep has a full history of losses.
    pub fn warmed_up(&self) -> bool {
        self.history
            .iter()
            .all(|h| h.len() == self.history_per_term)
    }
}

impl TimestepSampler for LossSecondMomentSampler {
    fn weights(&self) -> Vec<f64> {
        let n = self.history.len();
        if !self.warmed_up() {
            return vec![1.0; n];
        }
        let rms: Vec<f64> = self
            .history
            .iter()
            .map(|h| (h.iter().map(|l| l * l).sum::<f64>() / h.len() as f64).sqrt())
            .collect();
        let total: f64 = rms.iter().sum();
        rms.iter()
            .map(|w| w / total * (1.0 - self.uniform_prob) + self.uniform_prob / n as f64)
            .collect()
    }

    fn update_with_losses(&mut self, t: &[usize], losses: &[f64]) {
        for (&t, &loss) in t.iter().zip(losses) {
            let h = &mut self.history[t];
            if h.len() == self.history_per_term {
                h.remove(0);
            }
            h.push(loss);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn uniform_covers_all_steps_with_unit_weights() {
        let s = UniformSampler::new(4);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (t, w) = s.sample(400, &mut rng);
        assert!(w.iter().all(|&x| x == 1.0));
        for k in 0..4 {
            let c = t.iter().filter(|&&x| x == k).count();
            assert!((60..140).contains(&c), "step {k} drawn {c} times");
        }
    }

    #[test]
    fn second_moment_weights_follow_the_loss_rms() {
        let mut s = LossSecondMomentSampler::with_params(2, 2, 0.0).unwrap();
        s.update_with_losses(&[0, 0, 1], &[1.0, 1.0, 3.0]);
        assert_eq!(s.weights(), vec![1.0, 1.0], "uniform until warmed up");
        s.update_with_losses(&[1], &[3.0]);
        assert!(s.warmed_up());
        let w = s.weights();
        assert!(
            (w[0] - 0.25).abs() < 1e-15 && (w[1] - 0.75).abs() < 1e-15,
            "{w:?}"
        );
        // Old losses fall out of the history.
        s.update_with_losses(&[0, 0], &[3.0, 3.0]);
        assert!((s.weights()[0] - 0.5).abs() < 1e-15);
        // Importance weights undo the non-uniform sampling: 1 / (T p).
        let (t, iw) = sample_from_weights(&[1.0, 3.0], 50, &mut ChaCha8Rng::seed_from_u64(1));
        for (t, w) in t.iter().zip(iw) {
            assert!((w - if *t == 0 { 2.0 } else { 2.0 / 3.0 }).abs() < 1e-12);
        }
        assert!(LossSecondMomentSampler::with_params(2, 0, 0.1).is_err());
    }
}
