//! Which kernel family runs: the CPU's features, detected at run time.
//!
//! The crates are built for baseline x86-64; every SIMD kernel is compiled for its features with
//! `#[target_feature]` and chosen here. Each op records the [`Kernels`] it was created with, so
//! its backward pass runs the same family, and tests can run every family the machine has side
//! by side.

use std::sync::OnceLock;

/// A CPU kernel family, from the most portable to the most specialised; each level includes
/// the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Baseline x86-64 (SSE2) or any other architecture: im2col + GEMM convolutions, scalar
    /// element-wise loops.
    Portable,
    /// AVX2 + FMA: direct 3×3 convolutions on a padded grid, the element-wise loops compiled
    /// for them.
    Avx2,
    /// AVX-512 F/VL: direct 3×3 convolutions and vectorised GroupNorm/SiLU.
    Avx512,
    /// AVX-512 BF16: bf16 products (`vdpbf16ps`) in the 3×3 convolutions at `bf16` precision.
    Avx512Bf16,
    /// AMX-BF16 tiles (`tdpbf16ps`) for the 3×3 convolutions at `bf16` precision.
    Amx,
}

impl Isa {
    /// Every family, lowest first.
    pub const ALL: [Isa; 5] = [
        Isa::Portable,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Bf16,
        Isa::Amx,
    ];

    /// The name used by `DDPM_ISA` and `--isa`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }

    /// The most specialised family this CPU (and operating system) runs (checked once).
    pub fn detected() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(detect)
    }

    /// Whether this CPU runs this family.
    pub fn supported(self) -> bool {
        self <= Isa::detected()
    }

    /// The families this CPU runs, lowest first (what the tests cover).
    pub fn supported_all() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.supported()).collect()
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A kernel family name that is not one of [`Isa::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kernel family '{0}': expected one of portable, avx2, avx512, avx512bf16, amx")]
pub struct UnknownIsa(pub String);

impl std::str::FromStr for Isa {
    type Err = UnknownIsa;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownIsa(s.to_string()))
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    use std::arch::is_x86_feature_detected as has;
    if !(has!("avx2") && has!("fma")) {
        return Isa::Portable;
    }
    if !(has!("avx512f") && has!("avx512vl")) {
        return Isa::Avx2;
    }
    if !has!("avx512bf16") {
        return Isa::Avx512;
    }
    if !crate::conv::amx::available() {
        return Isa::Avx512Bf16;
    }
    Isa::Amx
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Portable
}

/// The limit `DDPM_ISA` asks for, if set: `Ok(None)` when unset or empty, an error naming the
/// value when it is not a family's name.
pub fn isa_from_env() -> Result<Option<Isa>, UnknownIsa> {
    match std::env::var("DDPM_ISA") {
        Ok(v) if !v.trim().is_empty() => v.parse().map(Some),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(UnknownIsa(v.to_string_lossy().into())),
    }
}

/// The arithmetic precision of the CPU convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// bf16 products with f32 accumulation in the 3×3 convolutions and their gradients (AMX or
    /// AVX512-BF16); weights, optimiser state and every other op stay f32.
    Bf16,
}

impl Precision {
    /// The name used by `--precision`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A precision name that is neither `f32` nor `bf16`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown precision '{0}': expected f32 or bf16")]
pub struct UnknownPrecision(pub String);

impl std::str::FromStr for Precision {
    type Err = UnknownPrecision;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(UnknownPrecision(s.to_string())),
        }
    }
}

/// What one op runs: the kernel family and whether its convolutions multiply in bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    /// The kernel family (at most the CPU's).
    pub isa: Isa,
    /// bf16 products in the 3×3 convolutions (taken only where `isa` has them).
    pub bf16: bool,
}

impl Kernels {
    /// `isa` (capped at the CPU's) with f32 or bf16 products.
    pub fn new(isa: Isa, bf16: bool) -> Self {
        Kernels {
            isa: isa.min(Isa::detected()),
            bf16,
        }
    }

    /// Whether 3×3 stride-1 convolutions take the direct kernels (AVX2 and up).
    pub fn direct(self) -> bool {
        self.isa >= Isa::Avx2
    }

    /// Whether the direct convolutions take AMX tiles where the channel counts fit.
    pub fn amx(self) -> bool {
        self.bf16 && self.isa >= Isa::Amx
    }

    /// Whether the direct convolutions take bf16 vector products (`vdpbf16ps`).
    pub fn bf16_vectors(self) -> bool {
        self.bf16 && self.isa >= Isa::Avx512Bf16
    }

    /// What these kernels are, in words (benchmarks and logs name it beside their figures).
    pub fn describe(self) -> String {
        let conv = match self.isa {
            Isa::Portable => "im2col + GEMM convolutions",
            Isa::Avx2 => "direct 3x3 convolutions (AVX2 + FMA, padded grid)",
            _ => "direct 3x3 convolutions (AVX-512)",
        };
        let products = if self.amx() {
            ", bf16 products on AMX tiles (AVX512-BF16 for layers under 16 channels)"
        } else if self.bf16_vectors() {
            ", bf16 products (AVX512-BF16)"
        } else {
            ", f32"
        };
        format!("{} kernels: {conv}{products}", self.isa)
    }
}
