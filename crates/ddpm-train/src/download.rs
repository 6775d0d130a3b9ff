//! Fetching MNIST from the canonical mirrors (or a local folder), verified by SHA-256.

use crate::{Result, TrainError};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The four MNIST files and the SHA-256 of their decompressed bytes.
pub const MNIST_FILES: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    (
        "train-labels-idx1-ubyte",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    (
        "t10k-images-idx3-ubyte",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    (
        "t10k-labels-idx1-ubyte",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
];

/// The canonical MNIST mirrors, tried in order.
pub const MNIST_MIRRORS: [&str; 3] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
];

/// The environment variable naming a mirror to try before the canonical ones.
pub const MIRROR_ENV: &str = "MNIST_MIRROR";

/// The mirrors to try, in order: `first` when given and not blank (a URL or a local folder),
/// then [`MNIST_MIRRORS`].
pub fn mirrors_after(first: Option<&str>) -> Vec<String> {
    first
        .filter(|m| !m.trim().is_empty())
        .into_iter()
        .chain(MNIST_MIRRORS)
        .map(str::to_string)
        .collect()
}

/// The mirrors to try: `MNIST_MIRROR` when set, then [`MNIST_MIRRORS`].
pub fn mirrors_from_env() -> Vec<String> {
    mirrors_after(std::env::var(MIRROR_ENV).ok().as_deref())
}

/// Makes sure `dir` holds verified MNIST, fetching what is missing from [`mirrors_from_env`].
///
/// Meant for programs and tests that need the real data set: on failure the error is one line
/// that says how to provide MNIST (a mirror folder or a download with network access).
pub fn ensure_mnist(dir: &Path) -> Result<()> {
    let mirrors = mirrors_from_env();
    download_mnist(dir, &mirrors).map(|_| ()).map_err(|e| {
        let first = e
            .to_string()
            .lines()
            .nth(1)
            .unwrap_or("")
            .trim()
            .to_string();
        TrainError::Download(format!(
            "MNIST is not in {} and could not be fetched ({first}); set {MIRROR_ENV} to a \
             folder (or URL) holding the four MNIST .gz files, or run `cargo xtask \
             download-mnist` on a machine with network access",
            dir.display()
        ))
    })
}

/// SHA-256 of bytes, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decompress(bytes: Vec<u8>) -> std::io::Result<Vec<u8>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&bytes[..]).read_to_end(&mut out)?;
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// Whether `path` exists and its content hashes to `sha`.
fn verified(path: &Path, sha: &str) -> bool {
    std::fs::read(path)
        .map(|b| sha256_hex(&b) == sha)
        .unwrap_or(false)
}

/// Fetches `name.gz` (or `name`) from a mirror: a URL or a local folder.
fn fetch(mirror: &str, name: &str) -> std::result::Result<Vec<u8>, String> {
    if mirror.starts_with("http://") || mirror.starts_with("https://") {
        let url = format!("{}/{name}.gz", mirror.trim_end_matches('/'));
        // Bounded waits: a stalled server must not hang a download (or a test) for ever.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .into();
        let resp = agent.get(&url).call().map_err(|e| format!("{url}: {e}"))?;
        let mut body = Vec::new();
        resp.into_body()
            .into_reader()
            .take(200 << 20)
            .read_to_end(&mut body)
            .map_err(|e| format!("{url}: {e}"))?;
        Ok(body)
    } else {
        let dir = Path::new(mirror.strip_prefix("file://").unwrap_or(mirror));
        for candidate in [dir.join(format!("{name}.gz")), dir.join(name)] {
            if candidate.exists() {
                return std::fs::read(&candidate)
                    .map_err(|e| format!("{}: {e}", candidate.display()));
            }
        }
        Err(format!("{}: no {name}.gz or {name}", dir.display()))
    }
}

/// Makes sure `dir` holds the four verified, decompressed MNIST files, fetching what is missing.
///
/// Each file is tried on every mirror in turn; a file is written under a temporary name and
/// renamed only once its SHA-256 matches, so a partial file never has the final name. Returns
/// the names fetched (files already present and verified are skipped).
pub fn download_mnist(dir: &Path, mirrors: &[String]) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let mut fetched = Vec::new();
    // A mirror that could not be reached for one file is not asked for the next ones.
    let mut unreachable: Vec<&str> = Vec::new();
    for (name, sha) in MNIST_FILES {
        let dest: PathBuf = dir.join(name);
        if verified(&dest, sha) {
            continue;
        }
        let mut tried = Vec::new();
        let mut ok = false;
        for mirror in mirrors {
            if unreachable.contains(&mirror.as_str()) {
                tried.push(format!(
                    "{mirror}: skipped (unreachable for an earlier file)"
                ));
                continue;
            }
            let bytes = match fetch(mirror, name) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("{e}");
                    tried.push(e);
                    unreachable.push(mirror);
                    continue;
                }
            };
            let bytes = match decompress(bytes) {
                Ok(b) => b,
                Err(e) => {
                    let e = format!("{mirror}: {name}.gz: bad gzip: {e}");
                    tracing::warn!("{e}");
                    tried.push(e);
                    continue;
                }
            };
            let got = sha256_hex(&bytes);
            if got != sha {
                tried.push(format!(
                    "{mirror}: {name} has SHA-256 {got}, expected {sha}"
                ));
                continue;
            }
            // Unique per call, so that threads (parallel tests) fetching at once never share it.
            static CALLS: AtomicU64 = AtomicU64::new(0);
            let tmp = dir.join(format!(
                "{name}.part{}-{}",
                std::process::id(),
                CALLS.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&tmp, &bytes).map_err(|e| TrainError::Io {
                path: tmp.clone(),
                source: e,
            })?;
            std::fs::rename(&tmp, &dest).map_err(|e| TrainError::Io {
                path: dest.clone(),
                source: e,
            })?;
            tracing::info!("fetched {name} from {mirror}");
            fetched.push(name.to_string());
            ok = true;
            break;
        }
        if !ok {
            return Err(TrainError::Download(format!(
                "could not fetch {name}; tried:\n  {}\nPoint --mirror or MNIST_MIRROR at a URL or a local folder holding the MNIST .gz files",
                tried.join("\n  ")
            )));
        }
    }
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha_of_known_bytes() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn unreachable_mirrors_give_an_error_listing_what_was_tried() {
        let dir = tempfile::tempdir().unwrap();
        let mirrors = vec![
            dir.path().join("nowhere").display().to_string(),
            "/also/missing".to_string(),
        ];
        let e = download_mnist(&dir.path().join("out"), &mirrors)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nowhere") && e.contains("/also/missing") && e.contains("MNIST_MIRROR"),
            "{e}"
        );
    }

    #[test]
    fn a_mirror_with_wrong_content_is_rejected_and_nothing_partial_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad");
        std::fs::create_dir(&bad).unwrap();
        std::fs::write(bad.join("train-images-idx3-ubyte"), b"not mnist").unwrap();
        let out = dir.path().join("out");
        let e = download_mnist(&out, &[bad.display().to_string()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("SHA-256"), "{e}");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }
}
