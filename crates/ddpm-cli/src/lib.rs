//! The `ddpm-cli` commands as a library, so `cargo xtask` can run them in-process.

pub mod eval;
pub mod nll;
pub mod sample;
pub mod train;

use anyhow::{bail, Result};
use candle_core::Device;

/// Parses `--device`: `cpu`, `cuda`, `cuda:N` or `metal`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "metal" => {
            if cfg!(feature = "metal") {
                Ok(Device::new_metal(0)?)
            } else {
                bail!("this build has no Metal support; rebuild with --features metal")
            }
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let idx: usize = s
                .strip_prefix("cuda:")
                .map(|i| i.parse())
                .transpose()?
                .unwrap_or(0);
            if cfg!(feature = "cuda") {
                Ok(Device::new_cuda(idx)?)
            } else {
                bail!("this build has no CUDA support; rebuild with --features cuda")
            }
        }
        other => bail!("unknown device {other:?} (cpu, cuda, cuda:N, metal)"),
    }
}

/// Parses a comma-separated list ("1,2,2").
pub fn parse_list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse::<T>()
                .map_err(|_| anyhow::anyhow!("{what}: {p:?} in {s:?} is not a valid number"))
        })
        .collect()
}
