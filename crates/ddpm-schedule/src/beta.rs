//! Named beta schedules.

use crate::{Result, ScheduleError};
use std::f64::consts::PI;
use std::str::FromStr;

/// The named beta schedules of improved-diffusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BetaSchedule {
    /// Ho et al.'s linear schedule, scaled so that any step count behaves like 1000 steps.
    Linear,
    /// Nichol & Dhariwal's cosine schedule, alpha_bar(t) = cos²((t + 0.008) / 1.008 · π/2).
    Cosine,
}

/// Largest beta the cosine schedule allows, to avoid a singularity at t = T.
const MAX_BETA: f64 = 0.999;

impl BetaSchedule {
    /// The schedule's name as the original spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Cosine => "cosine",
        }
    }

    /// Betas for `num_timesteps` steps (f64, as the original computes them).
    pub fn betas(self, num_timesteps: usize) -> Result<Vec<f64>> {
        if num_timesteps == 0 {
            return Err(ScheduleError::Empty);
        }
        let n = num_timesteps as f64;
        Ok(match self {
            Self::Linear => {
                let scale = 1000.0 / n;
                let (start, end) = (scale * 0.0001, scale * 0.02);
                linspace(start, end, num_timesteps)
            }
            Self::Cosine => {
                let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * PI / 2.0).cos().powi(2);
                (0..num_timesteps)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n, (i + 1) as f64 / n);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(MAX_BETA)
                    })
                    .collect()
            }
        })
    }
}

/// numpy.linspace with the endpoint: start + i·step, the last value set exactly to `end`.
fn linspace(start: f64, end: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (end - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = end;
    v
}

impl FromStr for BetaSchedule {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            other => Err(ScheduleError::UnknownSchedule(other.to_string())),
        }
    }
}

impl std::fmt::Display for BetaSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Stored by name (`"linear"`, `"cosine"`), as the original's flag.
#[cfg(feature = "serde")]
impl serde::Serialize for BetaSchedule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for BetaSchedule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_endpoints_scale_with_steps() {
        let b = BetaSchedule::Linear.betas(1000).unwrap();
        assert_eq!(b.len(), 1000);
        assert!((b[0] - 1e-4).abs() < 1e-18 && b[999] == 0.02);
        assert!((b[1] - (1e-4 + (0.02 - 1e-4) / 999.0)).abs() < 1e-15);
        let b = BetaSchedule::Linear.betas(100).unwrap();
        assert!((b[0] - 1e-3).abs() < 1e-15 && (b[99] - 0.2).abs() < 1e-15);
    }

    #[test]
    fn cosine_is_increasing_and_clipped() {
        let b = BetaSchedule::Cosine.betas(1000).unwrap();
        assert!(b.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(b[999], 0.999);
        // 1 - alpha_bar(1/1000) / alpha_bar(0), computed by hand.
        let ab = |t: f64| ((t + 0.008) / 1.008 * PI / 2.0).cos().powi(2);
        assert!((b[0] - (1.0 - ab(0.001) / ab(0.0))).abs() < 1e-18);
        assert!((b[0] - 4.128422482196914e-05).abs() < 1e-15);
    }

    #[test]
    fn names_parse_and_errors() {
        assert_eq!(
            "cosine".parse::<BetaSchedule>().unwrap(),
            BetaSchedule::Cosine
        );
        assert_eq!(BetaSchedule::Linear.to_string(), "linear");
        let err = "quadratic".parse::<BetaSchedule>().unwrap_err();
        assert!(err.to_string().contains("quadratic"));
        assert!(matches!(
            BetaSchedule::Cosine.betas(0),
            Err(ScheduleError::Empty)
        ));
    }
}
