//! Helpers shared by the end-to-end tests: running the binary, a tiny data set and model.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddpm-cli"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("ddpm-cli runs")
}

pub fn ok(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ddpm-cli failed:\n{text}");
    text
}

/// The JSON object a `--json` command printed (its one line starting with `{`).
pub fn json_line(out: &str) -> serde_json::Value {
    let line = out
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    serde_json::from_str(line).unwrap()
}

/// Fails with a clear message: non-zero exit, `error:` and the expected words, no panic.
pub fn fails_with(out: &Output, words: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    assert!(
        err.contains("error") && err.contains(words),
        "expected {words:?} in:\n{err}"
    );
    assert!(!err.contains("panicked"), "panic:\n{err}");
}

/// A small MNIST-format data set (16 synthetic 28x28 digits) in IDX files.
pub fn write_data(dir: &Path) {
    let n = 16u32;
    for (prefix, count) in [("train", n), ("t10k", 8)] {
        let mut img = vec![0u8, 0, 8, 3];
        for d in [count, 28, 28] {
            img.extend_from_slice(&d.to_be_bytes());
        }
        img.extend((0..count as usize * 784).map(|i| if (i / 28 + i) % 7 < 2 { 255 } else { 0 }));
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
        let mut lab = vec![0u8, 0, 8, 1];
        lab.extend_from_slice(&count.to_be_bytes());
        lab.extend((0..count).map(|i| (i % 10) as u8));
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
    }
}

/// The tiny preset's model (`ddpm_cli::presets::Preset::Tiny`), with the tests' own batch,
/// intervals and a 100-step process so that a run takes seconds.
pub fn tiny() -> Vec<&'static str> {
    let mut flags = ddpm_cli::presets::Preset::Tiny.model_flags().to_vec();
    flags.extend([
        "--batch-size",
        "4",
        "--log-interval",
        "2",
        "--save-interval",
        "2",
        "--sample-interval",
        "0",
        "--diffusion-steps",
        "100",
        "--no-progress",
    ]);
    flags
}

/// `ddpm-cli train` on `data` into `out` with the tiny model and `extra` flags (later flags
/// override earlier ones).
pub fn train(data: &Path, out: &Path, extra: &[&str]) -> Output {
    train_command(data, out, extra)
        .output()
        .expect("ddpm-cli runs")
}

/// The command of [`train`], to spawn.
pub fn train_command(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ddpm-cli"));
    c.args(["train", "--data", data.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap()])
        .args(tiny())
        .args(extra)
        .env("RUST_LOG", "warn");
    c
}

/// Trains a 2-step model once and returns (data dir, checkpoint dir).
pub fn trained(root: &Path, class_cond: bool) -> (PathBuf, PathBuf) {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_data(&data);
    let out = root.join("run");
    let cond: &[&str] = if class_cond { &["--class-cond"] } else { &[] };
    ok(&train(&data, &out, &[&["--steps", "2"], cond].concat()));
    (data, out.join("checkpoint-0000002"))
}
