//! End-to-end tests of the `ddpm-cli` binary: happy paths and bad input.

mod common;
use common::*;
use std::path::Path;

#[test]
fn train_then_resume_then_sample_png_npz_gif_deterministically() {
    let root = tempfile::tempdir().unwrap();
    let (data, ckpt) = trained(root.path(), false);
    assert!(
        ckpt.join("model.safetensors").exists() && ckpt.join("ema_0.9999.safetensors").exists()
    );
    // Resume to step 4.
    let out = root.path().join("run");
    ok(&train(
        &data,
        &out,
        &[
            "--steps",
            "4",
            "--resume-checkpoint",
            ckpt.to_str().unwrap(),
        ],
    ));
    let ck4 = out.join("checkpoint-0000004");
    assert!(ck4.join("config.json").exists());
    // Sample twice with the same seed: byte-identical files.
    let files = |tag: &str| {
        let d = root.path().join(tag);
        std::fs::create_dir_all(&d).unwrap();
        let (png, npz, gif) = (d.join("g.png"), d.join("s.npz"), d.join("c.gif"));
        ok(&cli(&[
            "sample",
            "--checkpoint",
            ck4.to_str().unwrap(),
            "--num",
            "5",
            "--batch-size",
            "3",
            "--respacing",
            "10",
            "--seed",
            "7",
            "--out",
            png.to_str().unwrap(),
            "--npz",
            npz.to_str().unwrap(),
            "--gif",
            gif.to_str().unwrap(),
            "--no-progress",
        ]));
        (
            std::fs::read(png).unwrap(),
            std::fs::read(&npz).unwrap(),
            std::fs::read(gif).unwrap(),
            npz,
        )
    };
    let (a, b) = (files("a"), files("b"));
    assert_eq!((&a.0, &a.1, &a.2), (&b.0, &b.1, &b.2));
    let png = image::load_from_memory(&a.0).unwrap();
    assert_eq!((png.width(), png.height()), (3 * 29 + 1, 2 * 29 + 1));
    let arrays = candle_core::Tensor::read_npz(&a.3).unwrap();
    let arr0 = &arrays.iter().find(|(n, _)| n == "arr_0").unwrap().1;
    assert_eq!(arr0.dims(), &[5, 28, 28, 1]);
    assert_eq!(arr0.dtype(), candle_core::DType::U8);
    assert!(image::load_from_memory(&a.2).is_ok());
    // DDIM with another seed gives different samples.
    let d = root.path().join("ddim.png");
    ok(&cli(&[
        "sample",
        "--checkpoint",
        ck4.to_str().unwrap(),
        "--num",
        "5",
        "--batch-size",
        "5",
        "--respacing",
        "ddim10",
        "--ddim",
        "--seed",
        "8",
        "--out",
        d.to_str().unwrap(),
        "--no-progress",
    ]));
    assert_ne!(std::fs::read(d).unwrap(), a.0);
    // nll on the test split.
    let out = ok(&cli(&[
        "nll",
        "--checkpoint",
        ck4.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--num",
        "4",
        "--respacing",
        "20",
        "--json",
        "--no-progress",
    ]));
    let report = json_line(&out);
    let bpd = report["bpd"].as_f64().unwrap();
    assert!(bpd > 0.5 && bpd < 20.0, "{report}");
    assert_eq!(report["vb_by_quarter"].as_array().unwrap().len(), 4);
    assert!(report["prior_bpd"].as_f64().unwrap() > 0.0);
    // eval: sample quality against the (synthetic) test set, with real images as the floor.
    let out = ok(&cli(&[
        "eval",
        "--checkpoint",
        ck4.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--num",
        "6",
        "--batch-size",
        "3",
        "--respacing",
        "5",
        "--json",
        "--no-progress",
    ]));
    let report = json_line(&out);
    for side in ["samples", "real_train_images"] {
        let is = report[side]["inception_score"].as_f64().unwrap();
        assert!((1.0..=10.0).contains(&is), "{report}");
        assert!(report[side]["frechet_distance"].as_f64().unwrap() >= 0.0);
        let hist: Vec<u64> = report[side]["class_histogram"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!((hist.len(), hist.iter().sum::<u64>()), (10, 6));
    }
}

#[test]
fn class_conditional_sampling_checks_labels() {
    let root = tempfile::tempdir().unwrap();
    let (data, ckpt) = trained(root.path(), true);
    // eval --per-class: every class sampled and scored against its own test images.
    let out = ok(&cli(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--num",
        "4",
        "--steps",
        "2",
        "--per-class",
        "2",
        "--json",
        "--no-progress",
    ]));
    let report = json_line(&out);
    let rows = report["per_class"].as_array().expect("per_class rows");
    assert_eq!(rows.len(), 10);
    for (c, row) in rows.iter().enumerate() {
        assert_eq!(row["class"], c);
        let acc = row["accuracy"].as_f64().unwrap();
        assert!([0.0, 0.5, 1.0].contains(&acc), "{row}");
        // The synthetic test set has labels 0..7 only: no distance for classes 8 and 9.
        match c {
            0..8 => assert!(row["frechet_distance"].as_f64().unwrap() >= 0.0, "{row}"),
            _ => assert!(row["frechet_distance"].is_null(), "{row}"),
        }
    }
    let png = root.path().join("c.png");
    let c = ckpt.to_str().unwrap();
    ok(&cli(&[
        "sample",
        "--checkpoint",
        c,
        "--num",
        "2",
        "--respacing",
        "5",
        "--class",
        "3",
        "--out",
        png.to_str().unwrap(),
        "--no-progress",
    ]));
    fails_with(
        &cli(&[
            "sample",
            "--checkpoint",
            c,
            "--num",
            "2",
            "--class",
            "10",
            "--out",
            png.to_str().unwrap(),
        ]),
        "outside 0..10",
    );
}

#[test]
fn classifier_free_guidance_trains_and_samples() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_data(&data);
    let out = root.path().join("guided");
    // A large rate, so that four steps move the output layers (zero at initialisation) enough
    // for the guidance to show in 8-bit pixels; sampled with the raw weights (the EMA's have
    // hardly moved).
    let args = [
        "--class-cond",
        "--class-dropout",
        "0.3",
        "--steps",
        "4",
        "--lr",
        "0.02",
    ];
    ok(&train(&data, &out, &args));
    let ckpt = out.join("checkpoint-0000004");
    let config = std::fs::read_to_string(ckpt.join("config.json")).unwrap();
    assert!(config.contains("\"null_class\": true"), "{config}");
    assert!(config.contains("\"class_dropout\": 0.3"), "{config}");
    let (c, p) = (ckpt.to_str().unwrap(), root.path().join("g.npz"));
    let sample = |scale: Option<&str>, path: &Path| {
        let path = path.to_str().unwrap();
        let flags = [
            "--num",
            "2",
            "--respacing",
            "4",
            "--class",
            "4",
            "--seed",
            "3",
        ];
        let mut argv = vec!["sample", "--checkpoint", c, "--npz", path, "--no-progress"];
        argv.extend(flags);
        argv.extend(["--ema", "model"]);
        argv.extend(scale.iter().flat_map(|s| ["--guidance-scale", *s]));
        ok(&cli(&argv));
        std::fs::read(path).unwrap()
    };
    let three = sample(Some("3"), &p);
    assert!(
        three != sample(Some("1"), &root.path().join("g1.npz")),
        "the scale matters"
    );
    assert!(
        three == sample(Some("3"), &root.path().join("g3b.npz")),
        "same seed, same bytes"
    );
    let default = sample(None, &root.path().join("d.npz"));
    assert!(
        default == sample(Some("2"), &root.path().join("g2.npz")),
        "the default scale is 2"
    );
    // Guidance needs a model trained for it, a sane scale, and dropout needs labels.
    let (_, plain) = trained(&root.path().join("plain"), true);
    let plain = plain.to_str().unwrap();
    let png = root.path().join("x.png");
    let png = png.to_str().unwrap();
    fails_with(
        &cli(&[
            "sample",
            "--checkpoint",
            plain,
            "--guidance-scale",
            "2",
            "--out",
            png,
        ]),
        "needs a model trained with --class-dropout",
    );
    fails_with(
        &cli(&[
            "sample",
            "--checkpoint",
            c,
            "--guidance-scale",
            "-1",
            "--out",
            png,
        ]),
        "--guidance-scale -1",
    );
    let bad = root.path().join("bad");
    fails_with(
        &train(&data, &bad, &["--class-dropout", "0.2", "--steps", "2"]),
        "class dropout needs a class-conditional model",
    );
}

#[test]
fn bad_input_gives_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    let (data, ckpt) = trained(root.path(), false);
    let png = root.path().join("x.png");
    let (c, p) = (ckpt.to_str().unwrap(), png.to_str().unwrap());
    fails_with(
        &cli(&["sample", "--checkpoint", "/no/such/checkpoint", "--out", p]),
        "not a checkpoint folder",
    );
    fails_with(
        &cli(&["sample", "--checkpoint", c, "--class", "1", "--out", p]),
        "unconditional",
    );
    fails_with(
        &cli(&[
            "sample",
            "--checkpoint",
            c,
            "--respacing",
            "ddim37",
            "--out",
            p,
        ]),
        "exactly 37 steps",
    );
    fails_with(
        &cli(&[
            "sample",
            "--checkpoint",
            c,
            "--respacing",
            "5,x",
            "--out",
            p,
        ]),
        "\"x\"",
    );
    fails_with(
        &cli(&["sample", "--checkpoint", c, "--ema", "0.5", "--out", p]),
        "no EMA at rate 0.5",
    );
    fails_with(&cli(&["sample", "--checkpoint", c]), "nothing to write");
    // A corrupt config.json and a truncated weights file.
    let broken = root.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["config.json", "model.safetensors", "ema_0.9999.safetensors"] {
        std::fs::copy(ckpt.join(f), broken.join(f)).unwrap();
    }
    let w = std::fs::read(broken.join("ema_0.9999.safetensors")).unwrap();
    std::fs::write(broken.join("ema_0.9999.safetensors"), &w[..w.len() / 2]).unwrap();
    fails_with(
        &cli(&[
            "sample",
            "--checkpoint",
            broken.to_str().unwrap(),
            "--out",
            p,
        ]),
        "ema_0.9999.safetensors",
    );
    std::fs::write(broken.join("config.json"), "{\"model\": {}}").unwrap();
    fails_with(
        &cli(&[
            "sample",
            "--checkpoint",
            broken.to_str().unwrap(),
            "--out",
            p,
        ]),
        "config.json",
    );
    // Training: a missing data folder, an architecture that cannot fit 28x28, a bad flag value.
    let out = root.path().join("r2");
    let o = out.to_str().unwrap();
    fails_with(
        &cli(&["train", "--data", "/no/such/data", "--out", o]),
        "cargo xtask download-mnist",
    );
    let d = data.to_str().unwrap();
    fails_with(
        &cli(&[
            "train",
            "--data",
            d,
            "--out",
            o,
            "--channel-mult",
            "1,2,2,2",
        ]),
        "28→14→7→4→8",
    );
    fails_with(
        &cli(&["train", "--data", d, "--out", o, "--num-channels", "48"]),
        "GroupNorm",
    );
    fails_with(
        &cli(&[
            "train",
            "--data",
            d,
            "--out",
            o,
            "--schedule-sampler",
            "magic",
        ]),
        "unknown schedule sampler",
    );
    fails_with(
        &cli(&["nll", "--checkpoint", c, "--data", d, "--split", "val"]),
        "unknown split",
    );
}

/// `--precision` and `DDPM_ISA`: unknown values are refused with the accepted ones named, bf16
/// where the kernels (within the limit) have no bf16 products is refused, and a run limited to
/// any kernel family trains to the same losses within f32 rounding.
#[test]
fn precision_and_kernel_family_flags() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    common::write_data(&data);
    let run = |name: &str, extra: &[&str], isa: Option<&str>| {
        let mut c = common::train_command(&data, &root.path().join(name), extra);
        if let Some(i) = isa {
            c.env("DDPM_ISA", i);
        }
        c.output().expect("ddpm-cli runs")
    };
    fails_with(
        &run("a", &["--steps", "1", "--precision", "fp64"], None),
        "unknown precision 'fp64': expected f32 or bf16",
    );
    fails_with(
        &run("b", &["--steps", "1"], Some("avx9")),
        "DDPM_ISA: unknown kernel family 'avx9'",
    );
    fails_with(
        &run(
            "c",
            &["--steps", "1", "--precision", "bf16"],
            Some("portable"),
        ),
        "limited by DDPM_ISA",
    );
    // The same tiny run in the portable family and in the CPU's best: f32 either way.
    let losses = |dir: &str| -> Vec<f64> {
        let text = std::fs::read_to_string(root.path().join(dir).join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    ok(&run("portable", &["--steps", "6"], Some("portable")));
    ok(&run("best", &["--steps", "6"], None));
    let (a, b) = (losses("portable"), losses("best"));
    assert!(!a.is_empty() && a.len() == b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-3 * x.abs().max(1e-3),
            "portable {x} vs best {y}"
        );
    }
}

#[test]
fn solvers_and_the_newer_training_flags() {
    let root = tempfile::tempdir().unwrap();
    let (data, ckpt) = trained(root.path(), false);
    let c = ckpt.to_str().unwrap();
    let npz = |tag: &str, extra: &[&str]| {
        let f = root.path().join(format!("{tag}.npz"));
        let mut a = vec!["sample", "--checkpoint", c, "--num", "3", "--seed", "5"];
        a.extend_from_slice(extra);
        a.extend_from_slice(&["--npz", f.to_str().unwrap(), "--no-progress"]);
        ok(&cli(&a));
        std::fs::read(f).unwrap()
    };
    // Each solver runs in 4 model evaluations, deterministically. (A two-step model saturates
    // every pixel alike, so the solvers' own differences are tested in ddpm-schedule.)
    let mut outs = Vec::new();
    for solver in ["ddim", "dpm++2m", "unipc"] {
        let a = npz(solver, &["--solver", solver, "--steps", "4"]);
        assert_eq!(a, npz(solver, &["--solver", solver, "--respacing", "4"]));
        outs.push(a);
    }
    // --ddim is --solver ddim, and without either the sampler is DDPM.
    assert_eq!(outs[0], npz("ddim-flag", &["--ddim", "--steps", "4"]));
    assert_eq!(
        npz("default", &["--steps", "4"]),
        npz("ddpm", &["--solver", "ddpm", "--steps", "4"])
    );
    let base = ["sample", "--checkpoint", c, "--npz", "/tmp/never.npz"];
    let bad = |extra: &[&str], words: &str| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        fails_with(&cli(&a), words);
    };
    bad(&["--solver", "euler"], "ddpm, ddim, dpm++2m, unipc");
    bad(&["--steps", "4", "--respacing", "8"], "give one");
    bad(&["--steps", "0"], "at least one step");
    bad(&["--solver", "unipc", "--eta", "1"], "DDIM setting");
    bad(&["--ddim", "--solver", "dpm++2m"], "exclude each other");
    bad(&["--ddim", "--solver", "ddpm"], "exclude each other");
    // Training with the newer recipe, and its bad values.
    let out = root.path().join("recipe");
    ok(&train(
        &data,
        &out,
        &[
            "--steps",
            "2",
            "--predict-v",
            "--snr-gamma",
            "5",
            "--ema-warmup",
            "--lr-schedule",
            "cosine",
            "--lr-warmup-steps",
            "1",
            "--learn-sigma",
            "false",
        ],
    ));
    let cfg = std::fs::read_to_string(out.join("checkpoint-0000002/config.json")).unwrap();
    for key in [
        "\"predict_v\":true",
        "\"snr_gamma\":5.0",
        "\"lr_schedule\":\"cosine\"",
    ] {
        assert!(cfg.replace([' ', '\n'], "").contains(key), "{key} in {cfg}");
    }
    let o = root.path().join("bad");
    let bad_train = |extra: &[&str], words: &str| {
        fails_with(&train(&data, &o, extra), words);
    };
    bad_train(&["--lr-schedule", "step"], "constant, linear, cosine");
    bad_train(&["--snr-gamma", "0"], "snr gamma 0");
    bad_train(&["--predict-v", "--predict-xstart"], "exclude each other");
    bad_train(&["--ema-warmup", "--ema-power", "-1"], "power -1");
}

#[test]
fn plot_and_quality_curve_of_a_run() {
    let root = tempfile::tempdir().unwrap();
    let (data, _) = trained(root.path(), false);
    // Two more checkpoints, with a sample grid: the trainer draws loss.png beside it.
    let run = root.path().join("run");
    ok(&train(
        &data,
        &run,
        &[
            "--steps",
            "6",
            "--resume-checkpoint",
            "latest",
            "--sample-interval",
            "4",
            "--sample-count",
            "2",
            "--sample-respacing",
            "3",
        ],
    ));
    let loss = run.join("loss.png");
    assert_eq!(image::open(&loss).unwrap().width(), 1200);
    std::fs::remove_file(&loss).unwrap();
    let r = run.to_str().unwrap();
    let out = ok(&cli(&["plot", r]));
    assert!(out.contains("loss.png") && loss.exists(), "{out}");
    let out = ok(&cli(&[
        "quality-curve",
        r,
        "--data",
        data.to_str().unwrap(),
        "--num",
        "6",
        "--respacing",
        "4",
        "--nll-num",
        "2",
        "--nll-respacing",
        "4",
    ]));
    let points: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("quality.json")).unwrap()).unwrap();
    let points = points.as_array().unwrap();
    // The three kept checkpoints (steps 2, 4, 6), in order, with minutes that grow.
    let steps: Vec<u64> = points.iter().map(|p| p["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![2, 4, 6], "{out}");
    let minutes: Vec<f64> = points
        .iter()
        .map(|p| p["minutes"].as_f64().unwrap())
        .collect();
    assert!(
        minutes.windows(2).all(|w| w[1] > w[0]) && minutes[0] > 0.0,
        "{minutes:?}"
    );
    for p in points {
        assert!(p["frechet_distance"].as_f64().unwrap() > 0.0);
        assert!(p["bits_per_dim"].as_f64().unwrap() > 0.0);
        assert!((0.0..=1.0).contains(&p["confident_fraction"].as_f64().unwrap()));
    }
    assert!(image::open(run.join("quality.png")).is_ok());
    // plot draws the curve too, now that quality.json exists.
    assert!(ok(&cli(&["plot", r])).contains("quality.png"));
    // eval (and sample) default to 20 steps; --steps and --respacing together are refused.
    let ck = run.join("checkpoint-0000006");
    let (c, d) = (ck.to_str().unwrap(), data.to_str().unwrap());
    let base = [
        "eval",
        "--checkpoint",
        c,
        "--data",
        d,
        "--num",
        "2",
        "--no-progress",
    ];
    let report = json_line(&ok(&cli(&[&base[..], &["--json"]].concat())));
    assert_eq!(report["respacing"], "20", "{report}");
    let both = [&base[..], &["--steps", "5", "--respacing", "5"]].concat();
    fails_with(&cli(&both), "both set the steps");
    // A damaged checkpoint is left out of the curve, with a warning naming it.
    let w = std::fs::read(run.join("checkpoint-0000004/model.safetensors")).unwrap();
    std::fs::write(
        run.join("checkpoint-0000004/model.safetensors"),
        &w[..w.len() / 2],
    )
    .unwrap();
    let out = ok(&cli(&[
        "quality-curve",
        r,
        "--data",
        d,
        "--num",
        "4",
        "--respacing",
        "3",
        "--nll-num",
        "0",
    ]));
    assert!(out.contains("checkpoint-0000004"), "{out}");
    let points: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("quality.json")).unwrap()).unwrap();
    let steps: Vec<u64> = points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![2, 6]);
    assert!(points[0]["bits_per_dim"].is_null());
    fails_with(&cli(&["plot", "/no/such/run"]), "not a run folder");
    fails_with(
        &cli(&["quality-curve", root.path().to_str().unwrap()]),
        "not a run folder",
    );
}

/// A folder of colour PNGs in class sub-folders trains, samples in colour and scores its bound;
/// the class names travel in the checkpoint.
#[test]
fn an_rgb_image_folder_trains_and_samples_in_colour() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("shapes");
    for (class, colour) in [("circles", [230u8, 40, 40]), ("squares", [40, 90, 230])] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..4u32 {
            let img = image::RgbImage::from_fn(16, 16, |x, y| {
                let (dx, dy) = (x as i32 - 8, y as i32 - 8);
                let inside = if class == "circles" {
                    dx * dx + dy * dy < 20 + i as i32
                } else {
                    dx.abs() < 4 && dy.abs() < 4 + i as i32 / 2
                };
                image::Rgb(if inside { colour } else { [0, 0, 0] })
            });
            img.save(data.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    let run = root.path().join("run");
    let flags = [
        "--attention-resolutions",
        "8",
        "--class-cond",
        "--random-flip",
        "--steps",
        "2",
    ];
    let text = ok(&train(&data, &run, &flags));
    assert!(!text.contains("error"), "{text}");
    let ckpt = run.join("checkpoint-0000002");
    let config = std::fs::read_to_string(ckpt.join("config.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        meta["class_names"],
        serde_json::json!(["circles", "squares"])
    );
    assert_eq!(meta["model"]["in_channels"], 3);
    assert_eq!(meta["model"]["out_channels"], 6);
    assert_eq!(meta["train"]["data"]["random_flip"], true);
    let (png, npz) = (root.path().join("s.png"), root.path().join("s.npz"));
    ok(&cli(&[
        "sample",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--num",
        "4",
        "--respacing",
        "4",
        "--class",
        "1",
        "--out",
        png.to_str().unwrap(),
        "--npz",
        npz.to_str().unwrap(),
        "--no-progress",
    ]));
    let grid = image::open(&png).unwrap();
    assert_eq!(grid.color(), image::ColorType::Rgb8);
    assert_eq!((grid.width(), grid.height()), (2 * 17 + 1, 2 * 17 + 1));
    let bytes = std::fs::read(&npz).unwrap();
    let header = String::from_utf8_lossy(&bytes[..200]);
    assert!(header.contains("'shape': (4,16,16,3,)"), "{header}");
    let out = ok(&cli(&[
        "nll",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--respacing",
        "5",
        "--json",
        "--no-progress",
    ]));
    let report = json_line(&out);
    assert_eq!(report["num"], 8);
    assert!(report["bpd"].as_f64().unwrap() > 0.0);
    // Resuming on the same folder with a different size is refused, naming the flag.
    fails_with(
        &train(
            &data,
            &run,
            &[
                "--resume-checkpoint",
                "latest",
                "--image-size",
                "8",
                "--steps",
                "4",
            ],
        ),
        "--image-size",
    );
}

/// `train --preset` starts from the preset's flags; flags beside it win, and only the typed
/// ones count when resuming.
#[test]
fn train_presets_give_their_model_and_typed_flags_override_them() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_data(&data);
    let out = root.path().join("run");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let run = |extra: &[&str]| {
        let mut argv = vec!["train", "--preset", "tiny", "--data", d, "--out", o];
        argv.extend([
            "--batch-size",
            "4",
            "--sample-interval",
            "0",
            "--no-progress",
        ]);
        argv.extend(extra);
        cli(&argv)
    };
    ok(&run(&["--steps", "2", "--save-interval", "2"]));
    let ckpt = out.join("checkpoint-0000002");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(meta["model"]["channel_mult"], serde_json::json!([1, 2]));
    assert_eq!(meta["train"]["batch_size"], 4, "the typed flag wins");
    assert_eq!(
        meta["train"]["ema_rate"],
        serde_json::json!([0.9]),
        "the preset's"
    );
    ok(&run(&["--resume-checkpoint", "latest", "--steps", "4"]));
    assert!(out.join("checkpoint-0000004").exists());
    fails_with(
        &cli(&["train", "--preset", "huge", "--data", d]),
        "invalid value 'huge'",
    );
}
