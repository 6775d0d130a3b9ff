//! Classifier-free guidance (Ho & Salimans 2022): a conditional model's output pushed away from
//! its own unconditional output.

use crate::Denoiser;
use candle_core::{Result, Tensor};

/// The guidance scale front ends use for a model trained with label dropout when none is
/// given: sharper classes than s = 1 at a small cost in variety (README, classifier-free
/// guidance).
pub const DEFAULT_GUIDANCE_SCALE: f64 = 2.0;

/// A class-conditional [`Denoiser`] trained with label dropout, sampled with guidance scale `s`:
/// eps = (1 - s)·eps(x, null) + s·eps(x, y).
///
/// `s = 1` is plain conditional sampling and `s = 0` the unconditional model; both call the
/// model once, on the labels they need, and so equal those samplers exactly. Other scales run
/// the conditional and the null-label batch through the model together. With a learned
/// variance only the first `eps_channels` channels (the noise prediction) are mixed; the
/// variance channels are the conditional pass's, as GLIDE does.
///
/// ```
/// use candle_core::{DType, Device, Result, Tensor};
/// use ddpm_schedule::{ClassifierFreeGuidance, Denoiser};
///
/// /// Outputs its label as a constant image (label 9 is the null class).
/// struct LabelImage;
/// impl Denoiser for LabelImage {
///     fn denoise(&self, x: &Tensor, _t: &Tensor, y: Option<&Tensor>, _: bool) -> Result<Tensor> {
///         let y = y.unwrap().to_dtype(DType::F32)?.reshape((x.dim(0)?, 1, 1, 1))?;
///         y.broadcast_as(x.shape())?.contiguous()
///     }
/// }
/// let guided = ClassifierFreeGuidance { model: LabelImage, null_label: 9, scale: 3.0, eps_channels: 1 };
/// let x = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu)?;
/// let (t, y) = (Tensor::new(&[5f32], &Device::Cpu)?, Tensor::new(&[1u32], &Device::Cpu)?);
/// // (1 - 3)·9 + 3·1 = -15
/// let out = guided.denoise(&x, &t, Some(&y), false)?;
/// assert_eq!(out.flatten_all()?.to_vec1::<f32>()?, [-15.0; 4]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ClassifierFreeGuidance<M> {
    /// The conditional model.
    pub model: M,
    /// The label that means "no label" to the model.
    pub null_label: u32,
    /// The guidance scale s.
    pub scale: f64,
    /// Channels of the noise prediction (the model's input channels).
    pub eps_channels: usize,
}

impl<M: Denoiser> Denoiser for ClassifierFreeGuidance<M> {
    fn denoise(&self, x_t: &Tensor, t: &Tensor, y: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let Some(y) = y else {
            return self.model.denoise(x_t, t, None, train);
        };
        let null = Tensor::full(self.null_label, y.dims(), y.device())?.to_dtype(y.dtype())?;
        if self.scale == 1.0 {
            return self.model.denoise(x_t, t, Some(y), train);
        }
        if self.scale == 0.0 {
            return self.model.denoise(x_t, t, Some(&null), train);
        }
        let b = x_t.dim(0)?;
        let both = self.model.denoise(
            &Tensor::cat(&[x_t, x_t], 0)?,
            &Tensor::cat(&[t, t], 0)?,
            Some(&Tensor::cat(&[y, &null], 0)?),
            train,
        )?;
        let (cond, uncond) = (both.narrow(0, 0, b)?, both.narrow(0, b, b)?);
        let c = self.eps_channels;
        let channels = cond.dim(1)?;
        if c == 0 || c > channels {
            candle_core::bail!(
                "guidance: {c} noise channels asked of a model output with {channels}"
            );
        }
        let (ec, eu) = (cond.narrow(1, 0, c)?, uncond.narrow(1, 0, c)?);
        let eps = (eu.affine(1.0 - self.scale, 0.0)? + ec.affine(self.scale, 0.0)?)?;
        if c == channels {
            Ok(eps)
        } else {
            Tensor::cat(&[&eps, &cond.narrow(1, c, channels - c)?], 1)
        }
    }
}
