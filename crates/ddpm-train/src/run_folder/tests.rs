use super::*;
use crate::checkpoint::MODEL_FILE;

/// A checkpoint folder whose config.json records `run_id` (enough for listing and pruning).
fn fake_checkpoint(run: &Path, step: u64, run_id: &str) -> PathBuf {
    write_checkpoint_dir(run, step, |d| {
        std::fs::write(d.join(MODEL_FILE), format!("weights {step}")).unwrap();
        std::fs::write(d.join(CONFIG_FILE), format!("{{\"run_id\": \"{run_id}\"}}")).unwrap();
        Ok(())
    })
    .unwrap()
}

fn steps(run: &Path) -> Vec<u64> {
    list_checkpoints(run).iter().map(|c| c.0).collect()
}

/// The folder's entries, without the lock file.
fn names(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != ".lock")
        .collect();
    v.sort();
    v
}

#[test]
fn a_failed_save_leaves_the_previous_checkpoint_intact() {
    let run = tempfile::tempdir().unwrap();
    let first = fake_checkpoint(run.path(), 5, "a");
    assert_eq!(first.file_name().unwrap(), "checkpoint-0000005");
    // A save that dies half-way (error after writing one file).
    let e = write_checkpoint_dir(run.path(), 6, |d| {
        std::fs::write(d.join(MODEL_FILE), "partial").unwrap();
        Err(TrainError::Checkpoint("disk full".into()))
    });
    assert!(e.is_err());
    assert_eq!(steps(run.path()), vec![5]);
    assert_eq!(
        names(run.path()),
        vec!["checkpoint-0000005"],
        "no temporary left"
    );
    // Overwriting the same step replaces it whole, manifest included.
    write_checkpoint_dir(run.path(), 5, |d| {
        std::fs::write(d.join(CONFIG_FILE), "{\"v\":2}").unwrap();
        Ok(())
    })
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(first.join(CONFIG_FILE)).unwrap(),
        "{\"v\":2}"
    );
    assert!(!first.join(MODEL_FILE).exists());
    verify_checkpoint(&first).unwrap();
}

#[test]
fn the_manifest_names_a_damaged_checkpoint() {
    let run = tempfile::tempdir().unwrap();
    let dir = fake_checkpoint(run.path(), 1, "a");
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap()).unwrap();
    let listed: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(listed, vec![CONFIG_FILE, MODEL_FILE]);
    verify_checkpoint(&dir).unwrap();
    // Same size, different bytes.
    std::fs::write(dir.join(MODEL_FILE), "weights X").unwrap();
    let e = verify_checkpoint(&dir).unwrap_err().to_string();
    assert!(
        e.contains("damaged") && e.contains("SHA-256") && e.contains(MODEL_FILE),
        "{e}"
    );
    std::fs::write(dir.join(MODEL_FILE), "w").unwrap();
    let e = verify_checkpoint(&dir).unwrap_err().to_string();
    assert!(e.contains("1 bytes"), "{e}");
    std::fs::remove_file(dir.join(MODEL_FILE)).unwrap();
    let e = verify_checkpoint(&dir).unwrap_err().to_string();
    assert!(e.contains(MODEL_FILE), "{e}");
    std::fs::write(dir.join(MANIFEST_FILE), "{\"files\": 3").unwrap();
    let e = verify_checkpoint(&dir).unwrap_err().to_string();
    assert!(e.contains("not a valid manifest"), "{e}");
    // latest_checkpoint skips it.
    let good = fake_checkpoint(run.path(), 0, "a");
    assert_eq!(latest_checkpoint(run.path()), Some(good));
}

#[test]
fn pruning_removes_only_the_runs_own_older_checkpoints() {
    let run = tempfile::tempdir().unwrap();
    for s in [10, 20, 30, 40] {
        fake_checkpoint(run.path(), s, "mine");
    }
    // Another run's checkpoints, older and newer, and a newer one of this run.
    fake_checkpoint(run.path(), 5, "other");
    fake_checkpoint(run.path(), 99, "other");
    fake_checkpoint(run.path(), 50, "mine");
    prune_checkpoints(run.path(), Some("mine"), 40, 2).unwrap();
    assert_eq!(steps(run.path()), vec![5, 30, 40, 50, 99]);
    // keep = 1 removes every older one but never the one just written.
    prune_checkpoints(run.path(), Some("mine"), 30, 1).unwrap();
    assert_eq!(steps(run.path()), vec![5, 30, 40, 50, 99]);
    prune_checkpoints(run.path(), Some("mine"), 50, 1).unwrap();
    assert_eq!(steps(run.path()), vec![5, 50, 99]);
    // A run without an id cannot tell its checkpoints from others': it prunes nothing.
    prune_checkpoints(run.path(), None, 99, 1).unwrap();
    assert_eq!(steps(run.path()), vec![5, 50, 99]);
    assert!(names(run.path()).iter().all(|n| !n.starts_with('.')));
}

fn resuming(run_id: &str, step: u64) -> Option<Resuming<'_>> {
    Some(Resuming {
        run_id: Some(run_id),
        step,
    })
}

#[test]
fn a_fresh_run_refuses_a_folder_with_another_runs_work() {
    let run = tempfile::tempdir().unwrap();
    let dir = run.path().join("r");
    drop(prepare_run_folder(&dir, None, false).unwrap());
    assert!(dir.is_dir());
    fake_checkpoint(&dir, 7, "old");
    let e = prepare_run_folder(&dir, None, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("another run") && e.contains("--overwrite") && e.contains("latest"),
        "{e}"
    );
    // Resuming that run is fine; resuming another one into it is not.
    let lock = prepare_run_folder(&dir, resuming("old", 7), false).unwrap();
    // While one process holds the folder, no other can prepare it.
    let e = prepare_run_folder(&dir, resuming("old", 7), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("another process"), "{e}");
    drop(lock);
    let e = prepare_run_folder(&dir, resuming("new", 7), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("another run"), "{e}");
    // Resuming an older checkpoint of the run while newer ones exist starts a second line of
    // training: refused unless the newer ones are to go.
    fake_checkpoint(&dir, 3, "old");
    let e = prepare_run_folder(&dir, resuming("old", 3), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("newer than the one resumed") && e.contains("checkpoint-0000007"),
        "{e}"
    );
    drop(prepare_run_folder(&dir, resuming("old", 3), true).unwrap());
    assert_eq!(steps(&dir), vec![3]);
    // Metrics alone (a run killed before its first checkpoint) also belong to a run.
    std::fs::write(dir.join(METRICS_FILE), "{\"step\":1}\n").unwrap();
    std::fs::write(dir.join("samples-0000001.png"), "png").unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    drop(prepare_run_folder(&dir, None, true).unwrap());
    assert_eq!(
        names(&dir),
        vec!["notes.txt"],
        "--overwrite keeps unrelated files"
    );
    std::fs::write(dir.join(METRICS_FILE), "{\"step\":1}\n").unwrap();
    let e = prepare_run_folder(&dir, None, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains(METRICS_FILE), "{e}");
    // ... and so when another run resumes into the folder.
    let e = prepare_run_folder(&dir, resuming("old", 7), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains(METRICS_FILE), "{e}");
    // A file where the folder should be.
    let file = run.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let e = prepare_run_folder(&file, None, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not a folder"), "{e}");
}

#[test]
fn stale_temporaries_of_interrupted_saves_are_removed() {
    let run = tempfile::tempdir().unwrap();
    fake_checkpoint(run.path(), 3, "a");
    for n in [
        ".checkpoint-0000004.tmp123",
        ".checkpoint-0000003.old9",
        ".checkpoint-0000001.del77",
        ".checkpoint-0000002.old5",
    ] {
        std::fs::create_dir(run.path().join(n)).unwrap();
        std::fs::write(run.path().join(n).join(CONFIG_FILE), "{\"run_id\": \"a\"}").unwrap();
    }
    drop(prepare_run_folder(run.path(), resuming("a", 3), false).unwrap());
    // Step 2's copy, moved aside for a rewrite that never arrived, is its only copy: restored.
    assert_eq!(
        names(run.path()),
        vec!["checkpoint-0000002", "checkpoint-0000003"]
    );
}

#[test]
fn the_metrics_log_drops_replayed_and_cut_rows() {
    let run = tempfile::tempdir().unwrap();
    let path = run.path().join(METRICS_FILE);
    // Rows 10..40, then 20 and 30 again (a crashed run's replay), then a cut line.
    std::fs::write(
        &path,
        "{\"step\":10}\n{\"step\":20}\n{\"step\":30}\n{\"step\":40}\n{\"step\":20}\n{\"step\":30}\n{\"step\":4",
    )
    .unwrap();
    let mut log = MetricsLog::open(run.path(), 20).unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "{\"step\":10}\n{\"step\":20}\n"
    );
    log.append(&serde_json::json!({"step": 30})).unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "{\"step\":10}\n{\"step\":20}\n{\"step\":30}\n"
    );
    // An intact log is left byte for byte.
    drop(log);
    MetricsLog::open(run.path(), 30).unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "{\"step\":10}\n{\"step\":20}\n{\"step\":30}\n"
    );
}
