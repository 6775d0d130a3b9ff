//! Options several commands share: where and how to compute, and which weights to load.

use anyhow::{bail, Result};
use candle_core::Device;
use clap::Args;
use ddpm_kernels::{KernelOptions, Precision};
use ddpm_train::checkpoint::{load_model, LoadedModel};
use std::path::PathBuf;

/// A device named on the command line: `cpu`, `cuda`, `cuda:N` or `metal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The CPU (the fast kernels run here).
    #[default]
    Cpu,
    /// CUDA device N (builds with `--features cuda`).
    Cuda(usize),
    /// The Metal device (builds with `--features metal`).
    Metal,
}

impl std::str::FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            "cuda" => Ok(Self::Cuda(0)),
            s => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(i)) => Ok(Self::Cuda(i)),
                _ => bail!("unknown device {s:?} (cpu, cuda, cuda:N, metal)"),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Metal => f.write_str("metal"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device; a build without its feature says how to get one.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Metal if cfg!(feature = "metal") => Ok(Device::new_metal(0)?),
            Self::Metal => bail!("this build has no Metal support; rebuild with --features metal"),
            Self::Cuda(i) if cfg!(feature = "cuda") => Ok(Device::new_cuda(i)?),
            Self::Cuda(_) => bail!("this build has no CUDA support; rebuild with --features cuda"),
        }
    }
}

/// `--device` and `--precision`: where the model runs and how its convolutions multiply.
#[derive(Debug, Clone, Args)]
pub struct ComputeArgs {
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// f32, or bf16: bf16 products (f32 accumulation) in the 3×3 convolutions and their
    /// gradients, on CPUs with AMX-BF16 or AVX512-BF16; weights, optimiser and everything else
    /// stay f32.
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
}

impl Default for ComputeArgs {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Cpu,
            precision: Precision::F32,
        }
    }
}

impl ComputeArgs {
    /// The device, opened, and the kernels to run on it.
    pub fn open(&self) -> Result<(Device, KernelOptions)> {
        let device = self.device.open()?;
        let kernels = kernel_options(self.precision, &device)?;
        Ok((device, kernels))
    }
}

/// `--checkpoint` and `--ema`: which trained weights to load.
#[derive(Debug, Clone, Args)]
pub struct WeightsArgs {
    /// Checkpoint folder (checkpoint-NNNNNNN).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// EMA rate whose weights to use ("model" for the raw weights; default: the first EMA).
    #[arg(long)]
    pub ema: Option<String>,
}

impl WeightsArgs {
    /// The checkpoint's UNet with the chosen weights, built on `kernels`.
    pub fn load(&self, kernels: KernelOptions, device: &Device) -> Result<LoadedModel> {
        let ema = self
            .ema
            .as_deref()
            .map(|e| if e == "model" { "" } else { e });
        Ok(load_model(&self.checkpoint, ema, kernels, device)?)
    }
}

/// The kernels a run on `device` computes with: `--precision`, with the benchmark overrides
/// `DDPM_ISA` and `DDPM_PLAIN_OPS` applied. bf16 needs the CPU with AMX or AVX512-BF16 (within
/// the `DDPM_ISA` limit), and an unknown `DDPM_ISA` is refused.
pub fn kernel_options(
    p: ddpm_kernels::Precision,
    device: &candle_core::Device,
) -> Result<KernelOptions> {
    use ddpm_kernels::Isa;
    let opts = KernelOptions::with_precision(p).with_env_overrides()?;
    if p == Precision::Bf16 {
        if opts.choice == ddpm_kernels::KernelChoice::Plain {
            anyhow::bail!(
                "--precision bf16 needs the fast CPU kernels, and DDPM_PLAIN_OPS asks for plain \
                 Candle ops; unset DDPM_PLAIN_OPS or use --precision f32"
            );
        }
        if !device.is_cpu() {
            anyhow::bail!(
                "--precision bf16 applies to the CPU kernels; on {device:?} use --precision f32"
            );
        }
        if !opts.bf16_supported() {
            anyhow::bail!(
                "--precision bf16 needs a CPU with AMX-BF16 or AVX512-BF16; this one runs {} \
                 kernels (detected {}){}; use --precision f32",
                opts.isa(),
                Isa::detected(),
                if opts.isa() < Isa::detected() {
                    ", limited by DDPM_ISA"
                } else {
                    ""
                }
            );
        }
    }
    Ok(opts)
}
