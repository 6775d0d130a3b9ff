//! A run folder on disk: crash-consistent checkpoint folders with a manifest, pruning that never
//! leaves a partial folder under a final name, ownership by one run, and the metrics log.
//!
//! The rule after any crash (power cut included) is the one databases keep: every
//! `checkpoint-N` name holds either a complete checkpoint or nothing. Files are written into a
//! hidden temporary folder, fsynced, listed with their sizes and SHA-256 in `manifest.json`
//! (written last), the folder is fsynced and renamed into place, and the run folder is fsynced.
//! Removal goes the other way: a checkpoint is renamed to a hidden name first, then deleted.

use crate::checkpoint::{checkpoint_name, CONFIG_FILE};
use crate::download::sha256_hex;
use crate::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of a checkpoint's manifest (names, sizes and SHA-256 of its other files).
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of the metrics log in a run folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Flushes a file's or a folder's contents and metadata to the disk.
pub fn fsync_path(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Replaces `path` with `bytes` so that a reader or a crash never sees half a file: written to
/// `<name>.tmp` beside it, fsynced, renamed into place, and the folder fsynced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    fsync_path(&tmp)?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => fsync_path(dir),
        _ => Ok(()),
    }
}

/// One file of a checkpoint, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// File name inside the checkpoint folder.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the contents, lowercase hex.
    pub sha256: String,
}

/// The manifest of a checkpoint folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Every other file of the folder.
    pub files: Vec<ManifestEntry>,
}

/// Writes `manifest.json` for the files now in `dir` (after fsyncing each of them).
fn write_manifest(dir: &Path) -> Result<()> {
    let mut files = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n != MANIFEST_FILE)
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        fsync_path(&path)?;
        files.push(ManifestEntry {
            name,
            size: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
        });
    }
    let path = dir.join(MANIFEST_FILE);
    let json = serde_json::to_string_pretty(&Manifest { files })
        .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    std::fs::write(&path, json).map_err(io(&path))?;
    fsync_path(&path)
}

/// Checks a checkpoint folder against its manifest: every file present, of its size and hash.
///
/// A folder without a manifest (written before manifests existed, like the golden model) is
/// accepted as it is; one whose manifest is unreadable or disagrees is named as damaged.
pub fn verify_checkpoint(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(TrainError::Checkpoint(format!(
            "{} is a file, not a checkpoint folder (give a checkpoint-N folder)",
            dir.display()
        )));
    }
    let path = dir.join(MANIFEST_FILE);
    let damaged =
        |what: String| TrainError::Checkpoint(format!("{} is damaged: {what}", dir.display()));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(damaged(format!("cannot read {MANIFEST_FILE}: {e}"))),
    };
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| damaged(format!("{MANIFEST_FILE} is not a valid manifest: {e}")))?;
    for f in &manifest.files {
        let p = dir.join(&f.name);
        let bytes = std::fs::read(&p).map_err(|e| damaged(format!("{}: {e}", f.name)))?;
        if bytes.len() as u64 != f.size {
            return Err(damaged(format!(
                "{} has {} bytes, the manifest says {}",
                f.name,
                bytes.len(),
                f.size
            )));
        }
        if sha256_hex(&bytes) != f.sha256 {
            return Err(damaged(format!(
                "{} does not match its SHA-256 in the manifest",
                f.name
            )));
        }
    }
    Ok(())
}

/// Writes a checkpoint folder crash-consistently: `write` fills a hidden temporary folder, which
/// gets a manifest, is fsynced and renamed to `checkpoint-N` only when complete; an interrupted
/// save leaves the previous checkpoints as they were.
pub fn write_checkpoint_dir(
    run_dir: &Path,
    step: u64,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let name = checkpoint_name(step);
    let final_dir = run_dir.join(&name);
    let tmp = run_dir.join(format!(".{name}.tmp{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let filled = write(&tmp).and_then(|()| write_manifest(&tmp));
    if let Err(e) = filled.and_then(|()| fsync_path(&tmp)) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if final_dir.exists() {
        // Same step again (a resumed run): the old folder leaves its name before the new one
        // takes it, and is deleted only after.
        let old = run_dir.join(format!(".{name}.old{}", std::process::id()));
        std::fs::rename(&final_dir, &old).map_err(io(&final_dir))?;
        std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
        fsync_path(run_dir)?;
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    }
    fsync_path(run_dir)?;
    Ok(final_dir)
}

/// Removes a checkpoint folder so that no partial folder is ever left under its name: it is
/// renamed to a hidden name (one atomic step), then deleted.
pub fn remove_checkpoint_dir(dir: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(TrainError::Checkpoint(format!(
            "{} is not a checkpoint folder",
            dir.display()
        )));
    };
    let doomed = parent.join(format!(
        ".{}.del{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::rename(dir, &doomed).map_err(io(dir))?;
    fsync_path(parent)?;
    std::fs::remove_dir_all(&doomed).map_err(io(&doomed))
}

/// Deletes what interrupted saves and prunes left behind: hidden `.checkpoint-*` folders.
/// Returns their names. Call it only while no other process writes to the folder.
pub fn clean_stale_temporaries(run_dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Ok(removed);
    };
    for e in entries.flatten() {
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        if !(name.starts_with(".checkpoint-") && e.path().is_dir()) {
            continue;
        }
        // `.checkpoint-N.oldPID` is a complete checkpoint moved aside while a rewrite of the
        // same step took its name; if the rewrite never arrived, it is the only copy: restore it.
        if let Some((base, _)) = name[1..].split_once(".old") {
            let final_dir = run_dir.join(base);
            if !final_dir.exists() {
                std::fs::rename(e.path(), &final_dir).map_err(io(&final_dir))?;
                fsync_path(run_dir)?;
                tracing::warn!("restored {base} from {name}, left by an interrupted rewrite");
                continue;
            }
        }
        std::fs::remove_dir_all(e.path()).map_err(io(&e.path()))?;
        removed.push(name);
    }
    removed.sort();
    Ok(removed)
}

/// The `checkpoint-N` folders of a run (those with a config.json), oldest first. Their files are
/// not verified here; see [`latest_checkpoint`].
pub fn list_checkpoints(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .filter(|(_, p)| p.join(CONFIG_FILE).exists())
        .collect();
    out.sort();
    out
}

/// The newest checkpoint of `run_dir` that passes [`verify_checkpoint`] (damaged ones are
/// skipped with a warning), or `None`.
pub fn latest_checkpoint(run_dir: &Path) -> Option<PathBuf> {
    list_checkpoints(run_dir)
        .into_iter()
        .rev()
        .find_map(|(_, dir)| match verify_checkpoint(&dir) {
            Ok(()) => Some(dir),
            Err(e) => {
                tracing::warn!("skipping {}: {e}", dir.display());
                None
            }
        })
}

/// The run a checkpoint folder belongs to (`None` for checkpoints written before run ids, or
/// an unreadable config).
fn run_id_of(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("run_id")?.as_str().map(str::to_string)
}

/// After writing the checkpoint at `step`: removes the run's own checkpoints older than it,
/// keeping the newest `keep` of those up to `step` (0 keeps all). Checkpoints of other runs and
/// newer ones are never touched.
pub fn prune_checkpoints(
    run_dir: &Path,
    run_id: Option<&str>,
    step: u64,
    keep: usize,
) -> Result<()> {
    // A run without an id (resumed from a checkpoint written before run ids) cannot tell its
    // checkpoints from any other folder's: it prunes nothing rather than guess.
    let Some(run_id) = run_id else {
        return Ok(());
    };
    if keep == 0 {
        return Ok(());
    }
    let own: Vec<(u64, PathBuf)> = list_checkpoints(run_dir)
        .into_iter()
        .filter(|(s, d)| *s <= step && run_id_of(d).as_deref() == Some(run_id))
        .collect();
    for (s, dir) in own.iter().take(own.len().saturating_sub(keep)) {
        if *s < step {
            remove_checkpoint_dir(dir)?;
        }
    }
    Ok(())
}

/// What a run folder already holds from earlier runs.
#[derive(Debug, Default)]
pub struct FolderContents {
    /// Checkpoint folders (step, path, run id), oldest first.
    pub checkpoints: Vec<(u64, PathBuf, Option<String>)>,
    /// Whether metrics.jsonl holds anything (an empty one, from a run killed before its first
    /// row, holds nothing to lose).
    pub logged: bool,
}

/// Lists the run artefacts in `run_dir` (nothing when it does not exist), and refuses a path
/// that exists but is not a folder.
pub fn folder_contents(run_dir: &Path) -> Result<FolderContents> {
    if run_dir.exists() && !run_dir.is_dir() {
        return Err(TrainError::Config(format!(
            "the run folder {} exists and is not a folder",
            run_dir.display()
        )));
    }
    Ok(FolderContents {
        checkpoints: list_checkpoints(run_dir)
            .into_iter()
            .map(|(s, d)| {
                let id = run_id_of(&d);
                (s, d, id)
            })
            .collect(),
        logged: std::fs::metadata(run_dir.join(METRICS_FILE)).is_ok_and(|m| m.len() > 0),
    })
}

/// The run a folder is prepared for when it resumes: the run's id and the step resumed from.
#[derive(Debug, Clone, Copy)]
pub struct Resuming<'a> {
    /// The resumed checkpoint's run id (`None` for checkpoints written before run ids).
    pub run_id: Option<&'a str>,
    /// The resumed checkpoint's step.
    pub step: u64,
}

/// An exclusive lock on a run folder (`.lock` inside it), held while a process trains there:
/// a second process cannot clean up or overwrite the first one's saves.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Takes the lock of `run_dir` (which must exist), or says that another process holds it.
    pub fn acquire(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(TrainError::Config(format!(
                "another process is training in {}; wait for it or choose another --out",
                run_dir.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(TrainError::Io { path, source: e }),
        }
    }
}

/// Makes `run_dir` ready for a run and locks it. A fresh run (`resuming` None) needs a folder
/// without another run's checkpoints or metrics; a resumed one a folder whose checkpoints are
/// its own and none newer than the step it resumes from (those would be a second line of
/// training that `latest` could pick up after a crash). With `overwrite`, all of these are
/// deleted instead (with sample grids, for a fresh run); files that are not run artefacts are
/// never touched. Stale temporaries of interrupted saves are cleaned up either way.
pub fn prepare_run_folder(
    run_dir: &Path,
    resuming: Option<Resuming<'_>>,
    overwrite: bool,
) -> Result<RunLock> {
    let contents = folder_contents(run_dir)?;
    // Locked before anything is deleted: another process training here keeps its files.
    std::fs::create_dir_all(run_dir).map_err(|e| {
        TrainError::Config(format!(
            "cannot create the run folder {}: {e}",
            run_dir.display()
        ))
    })?;
    let lock = RunLock::acquire(run_dir)?;
    let own = |id: &Option<String>| resuming.is_some_and(|r| id.as_deref() == r.run_id);
    let pick = |keep: &dyn Fn(u64, &Option<String>) -> bool| -> Vec<&PathBuf> {
        contents
            .checkpoints
            .iter()
            .filter(|(s, _, id)| keep(*s, id))
            .map(|(_, d, _)| d)
            .collect()
    };
    let foreign = pick(&|_, id| !own(id));
    let newer = pick(&|s, id| own(id) && resuming.is_some_and(|r| s > r.step));
    // A log with rows belongs to the run whose checkpoints are here.
    let stale_metrics = contents.logged && !contents.checkpoints.iter().any(|(_, _, id)| own(id));
    if !foreign.is_empty() || !newer.is_empty() || stale_metrics {
        if !overwrite {
            let folder = run_dir.display();
            return Err(TrainError::Config(if !foreign.is_empty() {
                format!(
                    "the run folder {folder} already holds {} checkpoint(s) of another run (e.g. \
                     {}); resume it with --resume-checkpoint latest, choose another --out, or \
                     pass --overwrite to delete the earlier run",
                    foreign.len(),
                    foreign[0].display()
                )
            } else if !newer.is_empty() {
                format!(
                    "the run folder {folder} holds {} checkpoint(s) of this run newer than the one \
                     resumed (e.g. {}); resume the newest with --resume-checkpoint latest, or pass \
                     --overwrite to delete the newer ones and continue from this one",
                    newer.len(),
                    newer[0].display()
                )
            } else {
                format!(
                    "the run folder {folder} already holds {METRICS_FILE} of an earlier run that \
                     saved no checkpoint here; choose another --out, or pass --overwrite to \
                     delete it"
                )
            }));
        }
        for d in foreign.iter().chain(&newer) {
            remove_checkpoint_dir(d)?;
        }
        if stale_metrics {
            let p = run_dir.join(METRICS_FILE);
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
        if resuming.is_none() {
            for e in std::fs::read_dir(run_dir).map_err(io(run_dir))?.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("samples-") && name.ends_with(".png") {
                    std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
                }
            }
        }
        tracing::warn!(
            "--overwrite: deleted the earlier run's files in {}",
            run_dir.display()
        );
    }
    for name in clean_stale_temporaries(run_dir)? {
        tracing::info!("cleaned up {name}, left by an interrupted save or prune");
    }
    Ok(lock)
}

/// The metrics log: one JSON object a line, steps strictly increasing, each line whole.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `run_dir/metrics.jsonl` for a run at `step`: rows past `step` (from a crashed
    /// run's replayed steps) and a cut last line are dropped, with a notice.
    pub fn open(run_dir: &Path, step: u64) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        if path.exists() {
            Self::truncate_past(&path, step)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok(Self { path, file })
    }

    fn truncate_past(path: &Path, step: u64) -> Result<()> {
        let text = std::fs::read(path).map_err(io(path))?;
        let text = String::from_utf8_lossy(&text);
        let mut kept = String::new();
        let (mut cut, mut later, mut last) = (0usize, 0usize, None::<u64>);
        for line in text.split_inclusive('\n') {
            let row = line
                .strip_suffix('\n')
                .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
            match row {
                None => cut += 1,
                Some(s) if s > step || last.is_some_and(|l| s <= l) => later += 1,
                Some(s) => {
                    last = Some(s);
                    kept.push_str(line);
                }
            }
        }
        if cut + later == 0 {
            return Ok(());
        }
        if cut > 0 {
            tracing::warn!(
                "{}: dropped {cut} cut or unreadable line(s)",
                path.display()
            );
        }
        if later > 0 {
            tracing::info!(
                "{}: dropped {later} row(s) past step {step}, which this run logs again",
                path.display()
            );
        }
        write_atomically(path, kept.as_bytes())
    }

    /// Flushes the rows to the disk (the trainer does before each checkpoint).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(io(&self.path))
    }

    /// Appends one row whole: a write that fails part-way (a full disk) is cut back off.
    pub fn append(&mut self, row: &serde_json::Value) -> Result<()> {
        let line = format!("{row}\n");
        let before = self.file.metadata().map_err(io(&self.path))?.len();
        if let Err(e) = self
            .file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
        {
            let _ = self.file.set_len(before);
            return Err(TrainError::Io {
                path: self.path.clone(),
                source: e,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
