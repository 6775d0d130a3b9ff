//! What the trainer asks of a network: a [`Denoiser`] it can build from a saved config.
//!
//! The improved-diffusion UNet is one such network; a researcher's own is another (see
//! `examples/custom_denoiser.rs`). The trainer creates the parameters through a
//! [`VarBuilder`] of its own [`ParamStore`](ddpm_unet::ParamStore) (seeded), so it can optimise,
//! average (EMA), save and reload them without knowing the network.

use crate::Result;
use candle_nn::VarBuilder;
use ddpm_kernels::KernelOptions;
use ddpm_schedule::Denoiser;
use ddpm_unet::{UNet, UNetConfig};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A network's architecture, saved as `model` in every checkpoint's `config.json`, and how to
/// build the network from it.
pub trait ModelConfig: Clone + std::fmt::Debug + PartialEq + Serialize + DeserializeOwned {
    /// The network it builds.
    type Model: TrainableModel;
    /// Builds the network under `vb` (the trainer's seeded parameters), computing with
    /// `kernels`.
    fn build(&self, vb: VarBuilder, kernels: KernelOptions) -> Result<Self::Model>;
    /// Checks that the config builds a working network, and says what is wrong.
    fn validate(&self) -> Result<()>;
    /// Checks that the network takes images of this size.
    fn validate_image_size(&self, _height: usize, _width: usize) -> Result<()> {
        Ok(())
    }
    /// Channels of the images it denoises.
    fn in_channels(&self) -> usize;
    /// Channels of its output (twice `in_channels` when it also predicts the variance).
    fn out_channels(&self) -> usize;
    /// The number of classes of a class-conditional network.
    fn num_classes(&self) -> Option<usize>;
    /// The label that means "no label" to a network trained for classifier-free guidance.
    fn null_label(&self) -> Option<u32> {
        None
    }
}

/// A [`Denoiser`] the [`Trainer`](crate::Trainer) trains: built by a [`ModelConfig`].
pub trait TrainableModel: Denoiser {
    /// Seeds the dropout masks of the next training step (a network without dropout ignores
    /// it).
    fn set_dropout_seed(&self, _seed: u64) {}
}

impl ModelConfig for UNetConfig {
    type Model = UNet;
    fn build(&self, vb: VarBuilder, kernels: KernelOptions) -> Result<UNet> {
        Ok(UNet::with_kernels(vb, self, kernels)?)
    }
    fn validate(&self) -> Result<()> {
        Ok(UNetConfig::validate(self)?)
    }
    fn validate_image_size(&self, height: usize, width: usize) -> Result<()> {
        Ok(UNetConfig::validate_image_size(self, height, width)?)
    }
    fn in_channels(&self) -> usize {
        self.in_channels
    }
    fn out_channels(&self) -> usize {
        self.out_channels
    }
    fn num_classes(&self) -> Option<usize> {
        self.num_classes
    }
    fn null_label(&self) -> Option<u32> {
        self.num_classes
            .filter(|_| self.null_class)
            .map(|n| n as u32)
    }
}

impl TrainableModel for UNet {
    fn set_dropout_seed(&self, seed: u64) {
        UNet::set_dropout_seed(self, seed)
    }
}
