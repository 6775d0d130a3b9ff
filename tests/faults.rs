//! Faults a user or an operator meets: run folders of earlier runs, signals, kills at random
//! points, late validation, flags on resume, non-finite values, the metrics log, messages.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn data_dir(root: &Path) -> PathBuf {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_data(&data);
    data
}

fn checkpoints(run: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(run) else {
        return Vec::new();
    };
    let mut v: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    v.sort();
    v
}

fn metrics_rows(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The rows without their wall-clock speed, which no two runs share.
fn without_speed(rows: &[serde_json::Value]) -> Vec<serde_json::Value> {
    rows.iter()
        .map(|r| {
            let mut r = r.clone();
            r.as_object_mut().unwrap().remove("images_per_sec");
            r
        })
        .collect()
}

/// Item 1: a new run never deletes or mixes with an earlier run's checkpoints.
#[test]
fn a_new_run_refuses_a_folder_holding_another_run() {
    let root = tempfile::tempdir().unwrap();
    let data = data_dir(root.path());
    let run = root.path().join("run");
    ok(&train(&data, &run, &["--steps", "6"]));
    assert_eq!(
        checkpoints(&run),
        vec![
            "checkpoint-0000002",
            "checkpoint-0000004",
            "checkpoint-0000006"
        ]
    );
    let before = std::fs::read(run.join("checkpoint-0000006/model.safetensors")).unwrap();
    // A fresh 2-step run into the same folder: refused, nothing touched.
    fails_with(&train(&data, &run, &["--steps", "2"]), "--overwrite");
    assert_eq!(checkpoints(&run).len(), 3);
    assert_eq!(
        std::fs::read(run.join("checkpoint-0000006/model.safetensors")).unwrap(),
        before
    );
    // --resume-checkpoint latest continues the newest complete checkpoint.
    let out = ok(&train(
        &data,
        &run,
        &["--steps", "8", "--resume-checkpoint", "latest"],
    ));
    assert!(out.contains("checkpoint-0000008") || run.join("checkpoint-0000008").exists());
    assert_eq!(
        checkpoints(&run),
        vec![
            "checkpoint-0000004",
            "checkpoint-0000006",
            "checkpoint-0000008"
        ]
    );
    // --overwrite starts afresh: the earlier run's checkpoints and metrics are gone, and the
    // new run's final checkpoint is the one it names.
    ok(&train(&data, &run, &["--steps", "2", "--overwrite"]));
    assert_eq!(checkpoints(&run), vec!["checkpoint-0000002"]);
    assert_eq!(metrics_rows(&run).len(), 1);
    // A run killed before its first row leaves an empty log: nothing to protect. One killed
    // after logging but before its first checkpoint can only be overwritten, and says so.
    let fresh = root.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::write(fresh.join("metrics.jsonl"), "").unwrap();
    ok(&train(&data, &fresh, &["--steps", "2"]));
    let logged = root.path().join("logged");
    std::fs::create_dir_all(&logged).unwrap();
    std::fs::write(logged.join("metrics.jsonl"), "{\"step\":2}\n").unwrap();
    let out = train(&data, &logged, &["--steps", "2"]);
    fails_with(&out, "saved no checkpoint");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("latest"));
    // A file where the run folder should be, and a folder that cannot be made.
    fails_with(
        &train(&data, Path::new("/proc/no-run-here"), &["--steps", "2"]),
        "cannot create the run folder /proc/no-run-here",
    );
    let file = root.path().join("file");
    std::fs::write(&file, "x").unwrap();
    fails_with(&train(&data, &file, &["--steps", "2"]), "is not a folder");
    let empty = root.path().join("empty");
    fails_with(
        &train(&data, &empty, &["--resume-checkpoint", "latest"]),
        "no complete checkpoint",
    );
}

/// IDX files with `n` images (and n labels).
fn write_idx(dir: &Path, prefix: &str, n: u32) {
    let mut img = vec![0u8, 0, 8, 3];
    for d in [n, 28, 28] {
        img.extend_from_slice(&d.to_be_bytes());
    }
    img.extend((0..n as usize * 784).map(|i| (i % 251) as u8));
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
    let mut lab = vec![0u8, 0, 8, 1];
    lab.extend_from_slice(&n.to_be_bytes());
    lab.extend((0..n).map(|i| (i % 10) as u8));
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
}

/// Items 2 and 3: empty data sets and a smaller data set on resume are errors, not a hang or a
/// panic.
#[test]
fn empty_and_shrunken_data_sets_are_errors() {
    let root = tempfile::tempdir().unwrap();
    let empty = root.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    write_idx(&empty, "train", 0);
    write_idx(&empty, "t10k", 0);
    let start = Instant::now();
    fails_with(
        &train(&empty, &root.path().join("r0"), &["--steps", "2"]),
        "holds no images",
    );
    assert!(start.elapsed() < Duration::from_secs(60));
    let data = data_dir(root.path());
    let run = root.path().join("run");
    ok(&train(
        &data,
        &run,
        &["--steps", "3", "--save-interval", "3"],
    ));
    let ckpt = run.join("checkpoint-0000003");
    fails_with(
        &cli(&[
            "eval",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--data",
            empty.to_str().unwrap(),
            "--num",
            "2",
        ]),
        "holds no images",
    );
    fails_with(
        &cli(&[
            "nll",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--data",
            empty.to_str().unwrap(),
        ]),
        "holds no images",
    );
    // The checkpoint is at position 12 of a 16-image epoch; resume on 8 images.
    let small = root.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    write_idx(&small, "train", 8);
    fails_with(
        &train(
            &small,
            &run,
            &[
                "--steps",
                "6",
                "--resume-checkpoint",
                ckpt.to_str().unwrap(),
            ],
        ),
        "same data",
    );
}

/// Spawns a long training run and waits until it has logged a row (training is under way).
fn spawn_training(data: &Path, run: &Path) -> std::process::Child {
    let child = train_command(
        data,
        run,
        &["--steps", "100000", "--save-interval", "100000"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let start = Instant::now();
    while !run.join("metrics.jsonl").exists()
        || std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap_or_default()
            .is_empty()
    {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "training never logged"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Item 4: SIGTERM and SIGHUP save a checkpoint and exit like SIGINT.
#[test]
fn sigterm_and_sighup_save_a_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let data = data_dir(root.path());
    for sig in ["TERM", "HUP", "INT"] {
        let run = root.path().join(format!("run-{sig}"));
        let child = spawn_training(&data, &run);
        let status = Command::new("kill")
            .args([format!("-{sig}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "SIG{sig}: {err}");
        assert!(err.contains("saving a checkpoint"), "SIG{sig}: {err}");
        let cks = checkpoints(&run);
        assert_eq!(cks.len(), 1, "SIG{sig}: {cks:?}");
        let ck = run.join(&cks[0]);
        assert!(ck.join("manifest.json").exists());
        // The saved checkpoint resumes.
        let step: u64 = cks[0]["checkpoint-".len()..].parse().unwrap();
        ok(&train(
            &data,
            &run,
            &[
                "--steps",
                &(step + 1).to_string(),
                "--resume-checkpoint",
                "latest",
            ],
        ));
    }
}

/// Reads a checkpoint's weights file as bytes.
fn weights(ckpt: &Path) -> Vec<u8> {
    std::fs::read(ckpt.join("model.safetensors")).unwrap()
}

/// Items 5 and 9: SIGKILL at random points (inside steps, saves and prunes), many times in a
/// row. After each kill every `checkpoint-*` name is complete and loadable; each restart resumes
/// from the newest; at the end the weights and the metrics rows equal an uninterrupted run's.
#[test]
fn killed_at_random_points_training_ends_as_if_never_interrupted() {
    let root = tempfile::tempdir().unwrap();
    let data = data_dir(root.path());
    const STEPS: u64 = 60;
    let steps = STEPS.to_string();
    let flags = [
        "--steps",
        &steps,
        "--save-interval",
        "1",
        "--keep-checkpoints",
        "2",
        "--log-interval",
        "3",
    ];
    let clean = root.path().join("clean");
    let start = Instant::now();
    ok(&train(&data, &clean, &flags));
    // Kill moments scale with this machine's speed today: about one step and its save.
    let step_ms = (start.elapsed().as_millis() as u64 / STEPS).max(5);
    let run = root.path().join("killed");
    // A small deterministic generator for the kill delays.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    const KILLS: usize = 15;
    let (mut kills, mut finished) = (0, false);
    let mut in_training = 0;
    for _ in 0..200 {
        let before = checkpoints(&run).last().cloned();
        // Killed before its first checkpoint, a run's metrics belong to no checkpoint: start
        // afresh over them.
        let restart: &[&str] = if before.is_some() {
            &["--resume-checkpoint", "latest"]
        } else {
            &["--overwrite"]
        };
        let mut child = train_command(&data, &run, &[&flags[..], restart].concat())
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if kills >= KILLS {
            // The bounded number of kills is spent: the last restart runs to the end.
            child.wait().unwrap();
        } else if kills % 4 == 3 {
            // Every fourth kill lands in start-up: loading, checks, cleaning up.
            std::thread::sleep(Duration::from_millis(next() % 150));
        } else {
            // The others once the process is in its loop (it has saved a checkpoint of its
            // own), then anywhere in the next two steps: training, saving, pruning, logging.
            let waited = Instant::now();
            while child.try_wait().unwrap().is_none() && checkpoints(&run).last() == before.as_ref()
            {
                assert!(waited.elapsed() < Duration::from_secs(120), "no progress");
                std::thread::sleep(Duration::from_millis(1));
            }
            in_training += 1;
            std::thread::sleep(Duration::from_millis(next() % (2 * step_ms)));
        }
        match child.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "a restarted run failed: {status:?}");
                if run.join(format!("checkpoint-{STEPS:07}")).exists() {
                    finished = true;
                    break;
                }
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
            }
        }
        // Every name is complete: it loads and matches its manifest.
        for name in checkpoints(&run) {
            let ck = run.join(&name);
            let out = cli(&[
                "sample",
                "--checkpoint",
                ck.to_str().unwrap(),
                "--num",
                "1",
                "--respacing",
                "2",
                "--out",
                root.path().join("probe.png").to_str().unwrap(),
                "--no-progress",
            ]);
            assert!(
                out.status.success(),
                "after kill {kills}, {name} does not load: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    eprintln!("{kills} SIGKILLs ({in_training} inside the training loop) before the run finished");
    assert!(
        finished,
        "the run did not finish within the time ({kills} kills)"
    );
    // Each life trains at most a few steps, so the run cannot finish before most kills landed.
    assert!(kills >= 10, "only {kills} kills before the run finished");
    let last = &format!("checkpoint-{STEPS:07}");
    assert_eq!(weights(&run.join(last)), weights(&clean.join(last)));
    assert_eq!(
        std::fs::read(run.join(last).join("ema_0.9999.safetensors")).unwrap(),
        std::fs::read(clean.join(last).join("ema_0.9999.safetensors")).unwrap()
    );
    assert_eq!(
        without_speed(&metrics_rows(&run)),
        without_speed(&metrics_rows(&clean))
    );
    let hidden: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with('.') && n != ".lock")
        .collect();
    assert!(hidden.is_empty(), "temporaries left: {hidden:?}");
}

/// Item 6: bad sample-grid settings and output paths fail before any work.
#[test]
fn settings_are_validated_before_the_first_step() {
    let root = tempfile::tempdir().unwrap();
    let data = data_dir(root.path());
    for (flags, words) in [
        (
            &["--sample-interval", "2", "--sample-respacing", "abc"][..],
            "abc",
        ),
        (
            &["--sample-interval", "2", "--sample-count", "0"][..],
            "sample_count",
        ),
        (&["--lr", "nan"][..], "lr"),
        (&["--weight-decay", "inf"][..], "weight decay"),
        (&["--grad-clip", "nan"][..], "grad clip"),
        (&["--grad-clip", "-1"][..], "grad clip -1"),
        (&["--ema-rate", "0.9,0.9"][..], "given twice"),
        (
            &["--diffusion-steps", "1"][..],
            "at least 2 diffusion steps",
        ),
    ] {
        let run = root.path().join("r");
        let mut f = vec!["--steps", "4"];
        f.extend_from_slice(flags);
        fails_with(&train(&data, &run, &f), words);
        assert!(!run.exists(), "{flags:?} left a run folder behind");
    }
    let run = root.path().join("ok");
    ok(&train(&data, &run, &["--steps", "2"]));
    let ck = run.join("checkpoint-0000002");
    let c = ck.to_str().unwrap();
    let missing = root.path().join("no/such/folder/x.png");
    let start = Instant::now();
    fails_with(
        &cli(&[
            "sample",
            "--checkpoint",
            c,
            "--num",
            "2000",
            "--out",
            missing.to_str().unwrap(),
        ]),
        "does not exist",
    );
    // Refused before 2,000 samples of 1,000 steps could start.
    assert!(start.elapsed() < Duration::from_secs(30));
    fails_with(
        &cli(&["sample", "--checkpoint", c, "--npz", "/proc/x.npz"]),
        "/proc/x.npz",
    );
    fails_with(
        &cli(&[
            "sample",
            "--checkpoint",
            c,
            "--gif",
            root.path().to_str().unwrap(),
        ]),
        "is a folder",
    );
    fails_with(
        &cli(&["sample", "--checkpoint", c, "--out", "grid.jpg"]),
        "ending in .png",
    );
    fails_with(
        &cli(&[
            "sample",
            "--checkpoint",
            c,
            "--gif",
            "c.gif",
            "--gif-frames",
            "0",
        ]),
        "--gif-frames",
    );
    for eta in ["nan", "1.5", "-0.5"] {
        fails_with(
            &cli(&[
                "sample",
                "--checkpoint",
                c,
                "--ddim",
                "--eta",
                eta,
                "--out",
                "x.png",
            ]),
            "between 0 and 1",
        );
    }
}

/// Item 7: a resumed run applies the flags that are sound to change (with a notice) and refuses
/// the others, naming them.
#[test]
fn flags_given_on_resume_are_applied_or_refused() {
    let root = tempfile::tempdir().unwrap();
    let data = data_dir(root.path());
    let run = root.path().join("run");
    ok(&train(&data, &run, &["--steps", "2"]));
    let ck = run.join("checkpoint-0000002");
    let c = ck.to_str().unwrap();
    for (flag, value) in [
        ("--num-channels", "64"),
        ("--batch-size", "16"),
        ("--ema-rate", "0.99"),
        ("--noise-schedule", "linear"),
        ("--seed", "3"),
    ] {
        fails_with(
            &train(
                &data,
                &run,
                &["--steps", "4", "--resume-checkpoint", c, flag, value],
            ),
            flag,
        );
    }
    // Repeating the checkpoint's own value is fine.
    let out = ok(&train(
        &data,
        &run,
        &[
            "--steps",
            "3",
            "--resume-checkpoint",
            c,
            "--batch-size",
            "4",
            "--lr",
            "0.05",
        ],
    ));
    let _ = out;
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("checkpoint-0000003/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["train"]["lr"].as_f64(), Some(0.05));
    assert_eq!(meta["train"]["steps"].as_u64(), Some(3));
    let notice = train(
        &data,
        &run,
        &[
            "--steps",
            "4",
            "--resume-checkpoint",
            "latest",
            "--lr",
            "0.01",
        ],
    );
    assert!(notice.status.success());
    fails_with(
        &train(&data, &run, &["--steps", "1", "--resume-checkpoint", c]),
        "below the checkpoint's step 2",
    );
}

/// Item 8: NaN in settings or weights stops with an error, never an image.
#[test]
fn non_finite_weights_stop_sampling_with_the_step() {
    let root = tempfile::tempdir().unwrap();
    let data = data_dir(root.path());
    let run = root.path().join("run");
    ok(&train(&data, &run, &["--steps", "2", "--ema-rate", "0.9"]));
    let ck = run.join("checkpoint-0000002");
    // Poison the raw weights (a copy without a manifest: edited on purpose).
    let bad = root.path().join("nan");
    std::fs::create_dir_all(&bad).unwrap();
    for f in ["config.json", "ema_0.9.safetensors"] {
        std::fs::copy(ck.join(f), bad.join(f)).unwrap();
    }
    let mut t =
        candle_core::safetensors::load(ck.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let w = t.get_mut("out.2.bias").unwrap();
    *w = (w.ones_like().unwrap() * f64::NAN).unwrap();
    candle_core::safetensors::save(&t, bad.join("model.safetensors")).unwrap();
    let png = root.path().join("x.png");
    fails_with(
        &cli(&[
            "sample",
            "--checkpoint",
            bad.to_str().unwrap(),
            "--ema",
            "model",
            "--respacing",
            "4",
            "--out",
            png.to_str().unwrap(),
        ]),
        "not finite at sampling step 1 of 4",
    );
    assert!(!png.exists());
    fails_with(
        &cli(&[
            "nll",
            "--checkpoint",
            bad.to_str().unwrap(),
            "--ema",
            "model",
            "--data",
            data.to_str().unwrap(),
            "--num",
            "2",
            "--respacing",
            "4",
        ]),
        "not finite",
    );
}

/// Item 9: replayed steps, a cut last line and a resume off the log boundary.
#[test]
fn metrics_rows_are_whole_increasing_and_match_an_uninterrupted_run() {
    let root = tempfile::tempdir().unwrap();
    let data = data_dir(root.path());
    let flags = ["--log-interval", "4", "--save-interval", "3"];
    let clean = root.path().join("clean");
    let mut f = vec!["--steps", "12"];
    f.extend_from_slice(&flags);
    ok(&train(&data, &clean, &f));
    let run = root.path().join("run");
    let mut f = vec!["--steps", "9"];
    f.extend_from_slice(&flags);
    ok(&train(&data, &run, &f));
    // A crash that replays: resume from step 3 (rows 4 and 8 exist) after a cut line. The
    // newer checkpoints of the run are another line of training: resuming an older one needs
    // --overwrite to drop them (without, it is refused).
    let mut m = std::fs::OpenOptions::new()
        .append(true)
        .open(run.join("metrics.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut m, b"{\"step\": 9, \"loss").unwrap();
    drop(m);
    let ck3 = run.join("checkpoint-0000003");
    assert!(ck3.exists());
    let mut f = vec![
        "--steps",
        "12",
        "--resume-checkpoint",
        ck3.to_str().unwrap(),
    ];
    f.extend_from_slice(&flags);
    fails_with(&train(&data, &run, &f), "newer than the one resumed");
    f.push("--overwrite");
    ok(&train(&data, &run, &f));
    let rows = metrics_rows(&run);
    let steps: Vec<u64> = rows.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![4, 8, 12]);
    assert_eq!(without_speed(&rows), without_speed(&metrics_rows(&clean)));
}

/// Item 10: messages that name the real problem.
#[test]
fn messages_name_the_real_problem() {
    let root = tempfile::tempdir().unwrap();
    let data = data_dir(root.path());
    let run = root.path().join("run");
    ok(&train(&data, &run, &["--steps", "2"]));
    let ck = run.join("checkpoint-0000002");
    let png = root.path().join("x.png");
    let p = png.to_str().unwrap();
    // A damaged checkpoint is named as damaged (its manifest disagrees).
    let damaged = root.path().join("damaged");
    std::fs::create_dir_all(&damaged).unwrap();
    for e in std::fs::read_dir(&ck).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), damaged.join(e.file_name())).unwrap();
    }
    std::fs::remove_file(damaged.join("ema_0.9999.safetensors")).unwrap();
    fails_with(
        &cli(&[
            "sample",
            "--checkpoint",
            damaged.to_str().unwrap(),
            "--out",
            p,
        ]),
        "damaged",
    );
    // Without a manifest, the missing EMA file is named (no silent fallback to raw weights).
    std::fs::remove_file(damaged.join("manifest.json")).unwrap();
    fails_with(
        &cli(&[
            "sample",
            "--checkpoint",
            damaged.to_str().unwrap(),
            "--out",
            p,
        ]),
        "missing ema_0.9999.safetensors",
    );
    // A bad diffusion setting in config.json is blamed on config.json, not on --respacing.
    let text = std::fs::read_to_string(damaged.join("config.json")).unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    meta["diffusion"]["noise_schedule"] = "wavy".into();
    std::fs::write(damaged.join("config.json"), meta.to_string()).unwrap();
    let out = cli(&[
        "sample",
        "--checkpoint",
        damaged.to_str().unwrap(),
        "--ema",
        "model",
        "--out",
        p,
    ]);
    fails_with(&out, "config.json");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("--respacing"));
    // eval reports how many real images its floor used.
    let out = ok(&cli(&[
        "eval",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--num",
        "20",
        "--batch-size",
        "10",
        "--respacing",
        "2",
        "--json",
        "--no-progress",
    ]));
    let report = json_line(&out);
    assert_eq!(report["num"].as_u64(), Some(20));
    assert_eq!(report["test_images"].as_u64(), Some(8));
    assert_eq!(report["real_train_images"]["num"].as_u64(), Some(16));
}
