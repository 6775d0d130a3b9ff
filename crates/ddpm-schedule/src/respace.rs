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

    /// Respaces by a specification understood by [`space_timesteps`].
    pub fn respace_spec(&self, spec: &str) -> Result<SpacedSchedule> {
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
}
