//! What the integration tests share.

use std::path::{Path, PathBuf};

/// Real MNIST in the workspace's `data/mnist` (where `cargo xtask train-mnist` keeps it), fetched
/// once through the project's downloader, which honours `MNIST_MIRROR`.
pub fn mnist() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .join("data/mnist");
    ddpm_train::download::ensure_mnist(&dir).unwrap_or_else(|e| panic!("{e}"));
    dir
}
