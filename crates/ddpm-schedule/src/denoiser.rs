//! The network side of the process: what the samplers, the losses and the bound ask of a model.

use candle_core::{Result, Tensor};

/// A denoising network: the model output for `x_t` at timesteps `t`, optionally conditioned on
/// class labels.
///
/// The output is what the [`DiffusionConfig`](crate::DiffusionConfig) says the model predicts
/// (`eps`, `x_0` or the previous mean), with the variance channels appended when the variance is
/// learned ([`DiffusionConfig::model_output_channels`](crate::DiffusionConfig::model_output_channels)).
/// The improved-diffusion UNet implements it; so can any Candle network. Errors are Candle's, the
/// same type the process's closures return.
///
/// ```
/// use candle_core::{DType, Device, Result, Tensor};
/// use ddpm_schedule::{Denoiser, DiffusionConfig, GaussianDiffusion, RngNoise};
/// use rand::SeedableRng;
///
/// /// Predicts no noise at all: enough to drive a sampler.
/// struct Zero;
/// impl Denoiser for Zero {
///     fn denoise(&self, x: &Tensor, _t: &Tensor, _y: Option<&Tensor>, _train: bool) -> Result<Tensor> {
///         x.zeros_like()
///     }
/// }
///
/// let cfg = DiffusionConfig { respacing: "10".into(), ..DiffusionConfig::ddpm() };
/// let diffusion = GaussianDiffusion::new(&cfg)?;
/// let x_t = Tensor::ones((2, 1, 4, 4), DType::F32, &Device::Cpu)?;
/// let mut noise = RngNoise(rand_chacha::ChaCha8Rng::seed_from_u64(0));
/// let x_0 = diffusion.p_sample_loop(Zero.sampling_fn(None), x_t, true, &mut noise, |_| {})?;
/// assert_eq!(x_0.dims(), [2, 1, 4, 4]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Denoiser {
    /// The model output for `x_t` at timesteps `t` (`[B]`, f32, in the model's own numbering),
    /// with class labels `y` (`[B]`, integer) for a conditional model; `train` enables dropout.
    fn denoise(&self, x_t: &Tensor, t: &Tensor, y: Option<&Tensor>, train: bool) -> Result<Tensor>;

    /// The model as the closure the samplers and the bound take: inference mode, labels `y`.
    fn sampling_fn<'a>(
        &'a self,
        y: Option<&'a Tensor>,
    ) -> impl FnMut(&Tensor, &Tensor) -> Result<Tensor> + 'a
    where
        Self: Sized,
    {
        move |x_t, t| self.denoise(x_t, t, y, false)
    }
}

impl<D: Denoiser + ?Sized> Denoiser for &D {
    fn denoise(&self, x_t: &Tensor, t: &Tensor, y: Option<&Tensor>, train: bool) -> Result<Tensor> {
        (**self).denoise(x_t, t, y, train)
    }
}
