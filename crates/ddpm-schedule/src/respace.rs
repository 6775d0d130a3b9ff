//! Timestep respacing: keeping a subset of a schedule's steps for faster sampling.

use crate::{Result, Schedule, ScheduleError};
use std::collections::BTreeSet;

/// The timesteps of a `num_timesteps` process kept by a respacing `spec`, sorted.
///
/// `spec` is either `"ddimN"` (the smallest integer stride that gives exactly N steps from 0, as
/// in the DDIM paper) or comma-separated section counts: `"10,15,20"` splits the process into
/// three near-equal sections and takes 10, 15 and 20 evenly spread steps from them (a section may
/// ask for 0). An empty spec keeps every step. Steps are rounded half to even from an accumulated
/// float stride, exactly as the original does.
///
/// `"logsnrN"` depends on the schedule, not only on its length: use [`Schedule::respace_spec`]
/// (or [`logsnr_timesteps`]); here it is refused with that advice.
pub fn space_timesteps(num_timesteps: usize, spec: &str) -> Result<Vec<usize>> {
    let fail = |reason: String| ScheduleError::Respacing {
        spec: spec.to_string(),
        num_timesteps,
        reason,
    };
    let spec_t = spec.trim();
    if spec_t.is_empty() {
        return Ok((0..num_timesteps).collect());
    }
    if spec_t.starts_with("logsnr") {
        return Err(fail(
            "log-SNR spacing needs the schedule's alphas_cumprod: use Schedule::respace_spec"
                .into(),
        ));
    }
    if let Some(count) = spec_t.strip_prefix("ddim") {
        let desired: usize = count
            .parse()
            .map_err(|_| fail(format!("{count:?} after \"ddim\" is not a step count")))?;
        return (1..num_timesteps)
            .find(|&stride| num_timesteps.div_ceil(stride) == desired)
            .map(|stride| (0..num_timesteps).step_by(stride).collect())
            .ok_or_else(|| {
                fail(format!(
                    "cannot create exactly {desired} steps with an integer stride"
                ))
            });
    }
    let counts = spec_t
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| fail(format!("section count {s:?} is not a non-negative integer")))
        })
        .collect::<Result<Vec<_>>>()?;
    let size_per = num_timesteps / counts.len();
    let extra = num_timesteps % counts.len();
    let mut start = 0usize;
    let mut steps = BTreeSet::new();
    for (i, &count) in counts.iter().enumerate() {
        let size = size_per + usize::from(i < extra);
        if size < count {
            return Err(fail(format!(
                "cannot divide section {i} of {size} steps into {count}"
            )));
        }
        let stride = if count <= 1 {
            1.0
        } else {
            (size - 1) as f64 / (count - 1) as f64
        };
        let mut cur = 0.0f64;
        for _ in 0..count {
            steps.insert(start + cur.round_ties_even() as usize);
            cur += stride;
        }
        start += size;
    }
    if steps.is_empty() {
        return Err(fail("it keeps no timestep".into()));
    }
    Ok(steps.into_iter().collect())
}

/// `count` timesteps evenly spaced in log-SNR, ln(ᾱ/(1 − ᾱ)), from the noisiest step to step 0.
///
/// Multistep ODE solvers take their steps in log-SNR, and a uniform grid in t leaves them one
/// long last interval next to the data (on the cosine schedule, t 0..50 spans a third of the
/// log-SNR range). The noisy end is not spread out the same way: below a log-SNR of −5 the
/// image is all noise to a model, so the grid runs evenly from that level (or from the noisiest
/// step if it is less noisy) to step 0, and the noisiest step is always kept as the start.
/// Targets are rounded to the nearest timestep and pushed apart where two would coincide.
pub fn logsnr_timesteps(alphas_cumprod: &[f64], count: usize) -> Result<Vec<usize>> {
    let n = alphas_cumprod.len();
    let fail = |reason: String| ScheduleError::Respacing {
        spec: format!("logsnr{count}"),
        num_timesteps: n,
        reason,
    };
    if count == 0 {
        return Err(fail("it keeps no timestep".into()));
    }
    if count > n {
        return Err(fail(format!("cannot take {count} of {n} steps")));
    }
    let lambda: Vec<f64> = alphas_cumprod
        .iter()
        .map(|&a| a.ln() - (1.0 - a).ln())
        .collect();
    if lambda.iter().any(|l| !l.is_finite()) || lambda.windows(2).any(|w| w[1] >= w[0]) {
        return Err(fail(
            "log-SNR must be finite and fall strictly with t (alphas_cumprod strictly decreasing in (0, 1))"
                .into(),
        ));
    }
    if count == 1 {
        return Ok(vec![n - 1]);
    }
    // The nearest timestep to a target, searched on the falling log-SNR curve.
    let nearest = |target: f64| -> usize {
        let i = lambda.partition_point(|&l| l > target);
        if i == 0 {
            0
        } else if i >= n {
            n - 1
        } else if (lambda[i - 1] - target).abs() <= (lambda[i] - target).abs() {
            i - 1
        } else {
            i
        }
    };
    let hi = lambda[0];
    let lo = lambda[n - 1].max(LOGSNR_NOISE_FLOOR);
    let mut steps = vec![n - 1];
    let inner = count - 1;
    for k in 1..count {
        let target = lo + (hi - lo) * k as f64 / inner as f64;
        let prev = steps[k - 1];
        // Strictly below the previous step, and leaving one timestep for each later step.
        let t = nearest(target).min(prev - 1).max(count - 1 - k);
        steps.push(t);
    }
    steps.reverse();
    Ok(steps)
}

/// The log-SNR below which [`logsnr_timesteps`] puts no target (the noisiest step, and steps
/// pushed apart when nearly every step is asked for, may still lie below it).
pub const LOGSNR_NOISE_FLOOR: f64 = -5.0;

/// A schedule restricted to kept timesteps, with the map back to the original steps.
#[derive(Debug, Clone, PartialEq)]
pub struct SpacedSchedule {
    /// Tables of the respaced process, betas recomputed from the kept alphas_cumprod.
    pub schedule: Schedule,
    /// `timestep_map[i]` is the original timestep of respaced index i.
    pub timestep_map: Vec<usize>,
    /// Number of steps of the original process.
    pub original_num_steps: usize,
}

impl SpacedSchedule {
    /// The timestep the model sees for respaced index `t`: the original step scaled to 0..1000.
    pub fn model_timestep(&self, t: usize) -> f64 {
        self.timestep_map[t] as f64 * (1000.0 / self.original_num_steps as f64)
    }

    /// Number of steps of the respaced process.
    pub fn num_timesteps(&self) -> usize {
        self.schedule.num_timesteps()
    }
}

impl Schedule {
    /// Keeps only `use_timesteps`, recomputing betas so that alphas_cumprod is unchanged at them.
    ///
    /// The new betas are not clipped, as in the original's `SpacedDiffusion`.
    pub fn respace(&self, use_timesteps: &[usize]) -> Result<SpacedSchedule> {
        let n = self.num_timesteps();
        let keep: BTreeSet<usize> = use_timesteps.iter().copied().collect();
        if let Some(&timestep) = keep.iter().find(|&&t| t >= n) {
            return Err(ScheduleError::TimestepOutOfRange {
                timestep,
                num_timesteps: n,
            });
        }
        let mut last = 1.0;
        let mut betas = Vec::with_capacity(keep.len());
        for &t in &keep {
            betas.push(1.0 - self.alphas_cumprod[t] / last);
            last = self.alphas_cumprod[t];
        }
        Ok(SpacedSchedule {
            schedule: Schedule::from_betas(betas)?,
            timestep_map: keep.into_iter().collect(),
            original_num_steps: n,
        })
    }

    /// Respaces by a specification understood by [`space_timesteps`], or `"logsnrN"` for
    /// [`logsnr_timesteps`].
    pub fn respace_spec(&self, spec: &str) -> Result<SpacedSchedule> {
        if let Some(count) = spec.trim().strip_prefix("logsnr") {
            let count: usize = count.parse().map_err(|_| ScheduleError::Respacing {
                spec: spec.to_string(),
                num_timesteps: self.num_timesteps(),
                reason: format!("{count:?} after \"logsnr\" is not a step count"),
            })?;
            return self.respace(&logsnr_timesteps(&self.alphas_cumprod, count)?);
        }
        self.respace(&space_timesteps(self.num_timesteps(), spec)?)
    }

    /// This schedule with every step kept (identity `timestep_map`).
    pub fn unspaced(&self) -> SpacedSchedule {
        SpacedSchedule {
            schedule: self.clone(),
            timestep_map: (0..self.num_timesteps()).collect(),
            original_num_steps: self.num_timesteps(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BetaSchedule;

    #[test]
    fn sections_follow_the_documented_example() {
        // 300 steps, [10, 15, 20]: sections of 100 with strides 11, 99/14, 99/19.
        let s = space_timesteps(300, "10,15,20").unwrap();
        assert_eq!(s.len(), 45);
        assert_eq!(&s[..3], &[0, 11, 22]);
        assert_eq!(s[9], 99);
        assert_eq!(&s[10..12], &[100, 107]);
        assert_eq!(*s.last().unwrap(), 299);
    }

    #[test]
    fn rounding_is_half_to_even() {
        // 10 steps into 5: stride 9/4 = 2.25 -> 0, 2.25, 4.5, 6.75, 9 -> 0, 2, 4, 7, 9.
        assert_eq!(space_timesteps(10, "5").unwrap(), vec![0, 2, 4, 7, 9]);
        // 4 steps into 3: stride 1.5 -> 0, 1.5, 3 -> 0, 2, 3 (1.5 rounds to 2).
        assert_eq!(space_timesteps(4, "3").unwrap(), vec![0, 2, 3]);
        // 6 steps into 5: stride 1.25 -> 0, 1.25, 2.5, 3.75, 5 -> 0, 1, 2, 4, 5 (2.5 rounds to 2).
        assert_eq!(space_timesteps(6, "5").unwrap(), vec![0, 1, 2, 4, 5]);
    }

    #[test]
    fn ddim_strides_and_zero_sections() {
        assert_eq!(
            space_timesteps(1000, "ddim50").unwrap(),
            (0..1000).step_by(20).collect::<Vec<_>>()
        );
        // 1000 steps, 3 from stride 334 (0, 334, 668); stride 333 would give 4.
        assert_eq!(space_timesteps(1000, "ddim3").unwrap(), vec![0, 334, 668]);
        assert_eq!(space_timesteps(10, "0,2").unwrap(), vec![5, 9]);
        assert_eq!(space_timesteps(7, "").unwrap(), (0..7).collect::<Vec<_>>());
        assert_eq!(space_timesteps(7, "1").unwrap(), vec![0]);
    }

    #[test]
    fn impossible_specs_say_why() {
        let e = space_timesteps(1000, "ddim37").unwrap_err().to_string();
        assert!(e.contains("exactly 37 steps"), "{e}");
        let e = space_timesteps(10, "6,6").unwrap_err().to_string();
        assert!(e.contains("section 0 of 5 steps into 6"), "{e}");
        assert!(space_timesteps(10, "a,b")
            .unwrap_err()
            .to_string()
            .contains("\"a\""));
        assert!(space_timesteps(10, "ddimx").is_err());
        assert!(space_timesteps(10, "-3").is_err());
        assert!(space_timesteps(10, "0")
            .unwrap_err()
            .to_string()
            .contains("no timestep"));
    }

    #[test]
    fn respacing_keeps_alphas_cumprod() {
        let s = Schedule::named(BetaSchedule::Linear, 100).unwrap();
        let sp = s.respace_spec("10").unwrap();
        assert_eq!(sp.num_timesteps(), 10);
        assert_eq!(sp.timestep_map[1], 11);
        for (i, &t) in sp.timestep_map.iter().enumerate() {
            let rel =
                (sp.schedule.alphas_cumprod[i] - s.alphas_cumprod[t]).abs() / s.alphas_cumprod[t];
            assert!(rel < 1e-12);
        }
        assert_eq!(sp.model_timestep(1), 110.0);
        assert!(matches!(
            s.respace(&[3, 100]),
            Err(ScheduleError::TimestepOutOfRange { timestep: 100, .. })
        ));
        assert_eq!(s.unspaced().timestep_map.len(), 100);
    }

    fn logsnr(s: &Schedule, t: usize) -> f64 {
        let a = s.alphas_cumprod[t];
        a.ln() - (1.0 - a).ln()
    }

    #[test]
    fn logsnr_spacing_is_even_in_log_snr_from_the_noise_floor() {
        let s = Schedule::named(BetaSchedule::Cosine, 1000).unwrap();
        for count in [5, 10, 20] {
            let steps = s
                .respace_spec(&format!("logsnr{count}"))
                .unwrap()
                .timestep_map;
            assert_eq!(steps.len(), count);
            assert_eq!((steps[0], steps[count - 1]), (0, 999));
            assert!(steps.windows(2).all(|w| w[0] < w[1]));
            // Below the noisiest step, each step is the timestep nearest (by brute force) to
            // its target: count − 1 levels evenly spaced above the noise floor up to step 0.
            let top = logsnr(&s, 0);
            let h = (top - LOGSNR_NOISE_FLOOR) / (count - 1) as f64;
            for (i, &t) in steps[..count - 1].iter().enumerate() {
                let target = top - h * i as f64;
                let best = (0..1000)
                    .min_by(|&a, &b| {
                        let da = (logsnr(&s, a) - target).abs();
                        da.total_cmp(&(logsnr(&s, b) - target).abs())
                    })
                    .unwrap();
                assert_eq!(t, best, "count {count}, step {i}: target {target}");
            }
        }
        // The uniform grid's last interval is much longer in log-SNR than this one's.
        let uniform = s.respace_spec("20").unwrap().timestep_map;
        let even = s.respace_spec("logsnr20").unwrap().timestep_map;
        let first_gap = |v: &[usize]| logsnr(&s, v[0]) - logsnr(&s, v[1]);
        assert!(first_gap(&uniform) > 2.0 * first_gap(&even));
    }

    #[test]
    fn logsnr_spacing_crowded_and_bad() {
        // As many steps as the process has: every step, pushed apart where targets coincide.
        let s = Schedule::named(BetaSchedule::Linear, 30).unwrap();
        assert_eq!(
            s.respace_spec("logsnr30").unwrap().timestep_map,
            (0..30).collect::<Vec<_>>()
        );
        assert_eq!(s.respace_spec("logsnr1").unwrap().timestep_map, vec![29]);
        for (spec, why) in [
            ("logsnr0", "no timestep"),
            ("logsnr31", "cannot take 31 of 30"),
            ("logsnrx", "\"x\""),
        ] {
            let e = s.respace_spec(spec).unwrap_err().to_string();
            assert!(e.contains(why), "{spec}: {e}");
        }
        let e = space_timesteps(30, "logsnr10").unwrap_err().to_string();
        assert!(e.contains("respace_spec"), "{e}");
        assert!(logsnr_timesteps(&[0.9, 0.95], 2).is_err());
    }
}
