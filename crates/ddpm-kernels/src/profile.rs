//! Where a step's time goes: wall-clock seconds per op class, summed while profiling is on.
//!
//! The fast CPU kernels time themselves (on the calling thread, so a parallel kernel counts its
//! wall time once); a trainer times its optimiser with [`timed`]. Whatever a step spends beyond
//! these classes is Candle's element-wise and reduction ops, copies and allocation. Off by
//! default: a disabled [`timed`] costs one relaxed load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A class of ops in the breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    /// Convolutions: forward, input and weight gradients, every kernel.
    Convolution,
    /// GroupNorm (+ scale-shift + SiLU), forward and backward.
    Norm,
    /// QKV attention, forward and backward.
    Attention,
    /// Gradient norm, optimiser step and EMA updates.
    Optimiser,
}

const CLASSES: usize = 4;
static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; CLASSES] = [const { AtomicU64::new(0) }; CLASSES];

/// Turns profiling on or off, process-wide (the sums are kept until [`take`]).
pub fn set_profiling(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Runs `f`, adding its wall-clock time to `class` while profiling is on.
pub fn timed<R>(class: OpClass, f: impl FnOnce() -> R) -> R {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let t0 = Instant::now();
    let r = f();
    NANOS[class as usize].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    r
}

/// Seconds spent per class since the last call, which resets them.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    /// [`OpClass::Convolution`].
    pub convolutions: f64,
    /// [`OpClass::Norm`].
    pub norms: f64,
    /// [`OpClass::Attention`].
    pub attention: f64,
    /// [`OpClass::Optimiser`].
    pub optimiser: f64,
}

/// The sums since the last call, resetting them.
pub fn take() -> Profile {
    let s = |c: OpClass| NANOS[c as usize].swap(0, Ordering::Relaxed) as f64 * 1e-9;
    Profile {
        convolutions: s(OpClass::Convolution),
        norms: s(OpClass::Norm),
        attention: s(OpClass::Attention),
        optimiser: s(OpClass::Optimiser),
    }
}
