//! Every table derived from a beta schedule, in f64.

use crate::{BetaSchedule, Result, ScheduleError};

/// A diffusion schedule: the betas and every table the original derives from them.
///
/// All tables have one entry per timestep and are computed in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// beta_t, the variance added at step t.
    pub betas: Vec<f64>,
    /// alpha_bar_t = prod_{s<=t} (1 - beta_s).
    pub alphas_cumprod: Vec<f64>,
    /// alpha_bar_{t-1}, with 1 at t = 0.
    pub alphas_cumprod_prev: Vec<f64>,
    /// alpha_bar_{t+1}, with 0 at the last step.
    pub alphas_cumprod_next: Vec<f64>,
    /// sqrt(alpha_bar_t).
    pub sqrt_alphas_cumprod: Vec<f64>,
    /// sqrt(1 - alpha_bar_t).
    pub sqrt_one_minus_alphas_cumprod: Vec<f64>,
    /// log(1 - alpha_bar_t).
    pub log_one_minus_alphas_cumprod: Vec<f64>,
    /// sqrt(1 / alpha_bar_t).
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    /// sqrt(1 / alpha_bar_t - 1).
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    /// Variance of q(x_{t-1} | x_t, x_0).
    pub posterior_variance: Vec<f64>,
    /// log of the posterior variance, with index 0 taking index 1's value (it is 0 there).
    pub posterior_log_variance_clipped: Vec<f64>,
    /// Coefficient of x_0 in the posterior mean.
    pub posterior_mean_coef1: Vec<f64>,
    /// Coefficient of x_t in the posterior mean.
    pub posterior_mean_coef2: Vec<f64>,
}

impl Schedule {
    /// Builds every table from betas, each of which must lie in (0, 1].
    pub fn from_betas(betas: Vec<f64>) -> Result<Self> {
        if betas.is_empty() {
            return Err(ScheduleError::Empty);
        }
        if let Some((index, &value)) = betas
            .iter()
            .enumerate()
            .find(|(_, &b)| !(b > 0.0 && b <= 1.0))
        {
            return Err(ScheduleError::BetaOutOfRange { index, value });
        }
        let n = betas.len();
        let map = |v: &[f64], f: fn(f64) -> f64| v.iter().map(|&x| f(x)).collect::<Vec<_>>();
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1.0;
        for &b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        let alphas_cumprod_prev: Vec<f64> = std::iter::once(1.0)
            .chain(alphas_cumprod[..n - 1].iter().copied())
            .collect();
        let alphas_cumprod_next: Vec<f64> = alphas_cumprod[1..]
            .iter()
            .copied()
            .chain(std::iter::once(0.0))
            .collect();
        let posterior_variance: Vec<f64> = (0..n)
            .map(|t| betas[t] * (1.0 - alphas_cumprod_prev[t]) / (1.0 - alphas_cumprod[t]))
            .collect();
        let posterior_log_variance_clipped: Vec<f64> = (0..n)
            .map(|t| posterior_variance[if t == 0 && n > 1 { 1 } else { t }].ln())
            .collect();
        let posterior_mean_coef1 = (0..n)
            .map(|t| betas[t] * alphas_cumprod_prev[t].sqrt() / (1.0 - alphas_cumprod[t]))
            .collect();
        let posterior_mean_coef2 = (0..n)
            .map(|t| {
                (1.0 - alphas_cumprod_prev[t]) * (1.0 - betas[t]).sqrt() / (1.0 - alphas_cumprod[t])
            })
            .collect();
        Ok(Self {
            sqrt_alphas_cumprod: map(&alphas_cumprod, f64::sqrt),
            sqrt_one_minus_alphas_cumprod: map(&alphas_cumprod, |a| (1.0 - a).sqrt()),
            log_one_minus_alphas_cumprod: map(&alphas_cumprod, |a| (1.0 - a).ln()),
            sqrt_recip_alphas_cumprod: map(&alphas_cumprod, |a| (1.0 / a).sqrt()),
            sqrt_recipm1_alphas_cumprod: map(&alphas_cumprod, |a| (1.0 / a - 1.0).sqrt()),
            betas,
            alphas_cumprod,
            alphas_cumprod_prev,
            alphas_cumprod_next,
            posterior_variance,
            posterior_log_variance_clipped,
            posterior_mean_coef1,
            posterior_mean_coef2,
        })
    }

    /// Builds the tables of a named schedule with `num_timesteps` steps.
    pub fn named(schedule: BetaSchedule, num_timesteps: usize) -> Result<Self> {
        Self::from_betas(schedule.betas(num_timesteps)?)
    }

    /// Number of timesteps T.
    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// A table by the name the original gives it, for generic checks and tools.
    pub fn table(&self, name: &str) -> Option<&[f64]> {
        Some(match name {
            "betas" => &self.betas,
            "alphas_cumprod" => &self.alphas_cumprod,
            "alphas_cumprod_prev" => &self.alphas_cumprod_prev,
            "alphas_cumprod_next" => &self.alphas_cumprod_next,
            "sqrt_alphas_cumprod" => &self.sqrt_alphas_cumprod,
            "sqrt_one_minus_alphas_cumprod" => &self.sqrt_one_minus_alphas_cumprod,
            "log_one_minus_alphas_cumprod" => &self.log_one_minus_alphas_cumprod,
            "sqrt_recip_alphas_cumprod" => &self.sqrt_recip_alphas_cumprod,
            "sqrt_recipm1_alphas_cumprod" => &self.sqrt_recipm1_alphas_cumprod,
            "posterior_variance" => &self.posterior_variance,
            "posterior_log_variance_clipped" => &self.posterior_log_variance_clipped,
            "posterior_mean_coef1" => &self.posterior_mean_coef1,
            "posterior_mean_coef2" => &self.posterior_mean_coef2,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_of_a_two_step_schedule() {
        let s = Schedule::from_betas(vec![0.1, 0.5]).unwrap();
        assert_eq!(s.alphas_cumprod, vec![0.9, 0.45]);
        assert_eq!(s.alphas_cumprod_prev, vec![1.0, 0.9]);
        assert_eq!(s.alphas_cumprod_next, vec![0.45, 0.0]);
        // posterior_variance[1] = 0.5 * (1 - 0.9) / (1 - 0.45)
        let pv1 = 0.5 * 0.1 / 0.55;
        assert_eq!(s.posterior_variance[0], 0.0);
        assert!((s.posterior_variance[1] - pv1).abs() < 1e-15);
        let plv = &s.posterior_log_variance_clipped;
        assert!(plv[0] == plv[1] && (plv[1] - pv1.ln()).abs() < 1e-13);
        assert!((s.posterior_mean_coef1[0] - 1.0).abs() < 1e-15);
        assert_eq!(s.posterior_mean_coef2[0], 0.0);
        assert!((s.posterior_mean_coef2[1] - 0.1 * 0.5f64.sqrt() / 0.55).abs() < 1e-15);
        assert!((s.sqrt_recipm1_alphas_cumprod[1] - (1.0f64 / 0.45 - 1.0).sqrt()).abs() < 1e-15);
        assert_eq!(s.table("betas").unwrap(), &[0.1, 0.5]);
        assert!(s.table("gammas").is_none());
    }

    #[test]
    fn bad_betas_are_rejected() {
        assert!(matches!(
            Schedule::from_betas(vec![]),
            Err(ScheduleError::Empty)
        ));
        let err = Schedule::from_betas(vec![0.1, 0.0]).unwrap_err();
        assert!(
            matches!(err, ScheduleError::BetaOutOfRange { index: 1, .. }),
            "{err}"
        );
        assert!(Schedule::from_betas(vec![1.5]).is_err());
        assert!(Schedule::from_betas(vec![f64::NAN]).is_err());
        assert!(Schedule::from_betas(vec![1.0]).is_ok());
    }
}
