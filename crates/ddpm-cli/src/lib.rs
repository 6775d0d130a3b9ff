//! The `ddpm-cli` commands as a library, so `cargo xtask` can run them in-process.

#![warn(missing_docs)]

pub mod eval;
pub mod nll;
pub mod options;
pub mod plot;
pub mod presets;
pub mod sample;
pub mod train;

pub use options::{kernel_options, ComputeArgs, DeviceChoice, WeightsArgs};

use anyhow::Result;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Keeps freed memory mapped when the binary's global allocator is mimalloc.
///
/// Training frees and re-allocates the same large activation buffers every step; returning
/// them to the OS makes the kernel zero fresh pages each time (about a fifth of a step's time
/// here). Call it first thing in `main`, after `#[global_allocator] static A: mimalloc::MiMalloc`.
pub fn tune_mimalloc() {
    // mi_option_purge_delay (15 in mimalloc 2.x): -1 means never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an option is a plain store inside mimalloc, valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Leaves Candle's element-wise ops on the calling thread unless `CANDLE_NUM_THREADS` is set.
///
/// ddpm-rs's kernels run on rayon's pool; Candle 0.11 keeps a second pool of its own whose
/// workers spin while they wait for work, so on a few cores the two pools take turns at the CPU
/// (one Candle thread measured here, 2 cores: training 56 -> 62 images/s, forward 218 -> 228).
/// Call it first thing in `main`, before any thread or tensor exists: Candle reads the variable
/// when its pool starts.
pub fn tune_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Logs to stderr at `RUST_LOG` (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// A flag set by the first SIGINT (Ctrl-C), SIGTERM or SIGHUP: the trainer then saves a
/// checkpoint and returns. These are the signals a terminal, a service manager, a container
/// runtime or a batch scheduler sends; a second one exits at once.
pub fn ctrlc_stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || {
        if s.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        // Not eprintln!: after SIGHUP the terminal may be gone, and a failed write must not
        // panic the handler.
        let _ = writeln!(
            std::io::stderr(),
            "\nstopping: saving a checkpoint (a second signal quits at once)"
        );
    })?;
    Ok(stop)
}

/// The ids of `cmd`'s arguments that `m` took from the command line or the environment.
pub fn explicit_flags(cmd: &clap::Command, m: &clap::ArgMatches) -> Vec<String> {
    cmd.get_arguments()
        .map(|a| a.get_id().as_str())
        .filter(|id| {
            matches!(
                m.value_source(id),
                Some(
                    clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable
                )
            )
        })
        .map(str::to_string)
        .collect()
}

/// An error and its causes on one line, each cause once: library errors often print their
/// source in their own message, which `{:#}` would then repeat.
pub fn error_message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg += ": ";
            }
            msg += &text;
        }
    }
    msg
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
