//! Likelihood: the variational bound in bits/dim of any [`Denoiser`] on any [`Dataset`].

use crate::data::Dataset;
use crate::Result;
use candle_core::{DType, Device};
use ddpm_schedule::{Denoiser, GaussianDiffusion, NoiseSource};

/// The bound on the first images of a data set, image by image.
#[derive(Debug, Clone, PartialEq)]
pub struct BitsPerDim {
    /// Each image's total bound, in bits/dim.
    pub total: Vec<f64>,
    /// Each image's prior term, in bits/dim.
    pub prior: Vec<f64>,
    /// The vb term at each timestep, summed over the images (index t is timestep t).
    pub vb_sum: Vec<f64>,
}

impl BitsPerDim {
    /// The mean bound and its standard error.
    pub fn mean_and_stderr(&self) -> (f64, f64) {
        let m = self.total.len() as f64;
        let mean = self.total.iter().sum::<f64>() / m;
        let var = self.total.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (m - 1.0).max(1.0);
        (mean, (var / m).sqrt())
    }
}

/// The bound of `model` on images `0..n` of `data`, `batch_size` at a time, with the labels when
/// `conditional`; `on_call` runs after each model call (progress bars).
#[allow(clippy::too_many_arguments)]
pub fn bits_per_dim<M: Denoiser, D: Dataset>(
    model: &M,
    diffusion: &GaussianDiffusion,
    data: &D,
    n: usize,
    batch_size: usize,
    conditional: bool,
    clip_denoised: bool,
    noise: &mut dyn NoiseSource,
    device: &Device,
    mut on_call: impl FnMut(),
) -> Result<BitsPerDim> {
    let mut out = BitsPerDim {
        total: Vec::new(),
        prior: Vec::new(),
        vb_sum: vec![0.0; diffusion.num_timesteps()],
    };
    for start in (0..n).step_by(batch_size.max(1)) {
        let idx: Vec<usize> = (start..(start + batch_size).min(n)).collect();
        let (x, y) = data.batch(&idx, device)?;
        let y = conditional.then_some(y);
        let terms = diffusion.calc_bpd_loop(
            model.sampling_fn(y.as_ref()),
            &x,
            clip_denoised,
            noise,
            |_, _| on_call(),
        )?;
        out.total
            .extend(terms.total_bpd.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        out.prior
            .extend(terms.prior_bpd.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        for row in terms.vb.to_dtype(DType::F64)?.to_vec2::<f64>()? {
            for (s, v) in out.vb_sum.iter_mut().zip(row) {
                *s += v;
            }
        }
    }
    Ok(out)
}
