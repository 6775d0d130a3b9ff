use super::*;
use clap::Parser;
use std::path::{Path, PathBuf};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("model")
}

fn config_text() -> String {
    std::fs::read_to_string(model_dir().join("config.json")).unwrap()
}

fn weights() -> Vec<u8> {
    std::fs::read(model_dir().join("ema_0.999.safetensors")).unwrap()
}

fn model() -> WebModel {
    WebModel::from_bytes(&config_text(), &weights()).unwrap()
}

fn err(r: Result<impl std::fmt::Debug>) -> String {
    r.unwrap_err().to_string()
}

#[derive(Parser)]
struct Sample {
    #[command(flatten)]
    args: ddpm_cli::sample::SampleArgs,
}

#[test]
fn the_committed_model_loads_and_describes_itself() {
    let info = model().info();
    assert_eq!(
        (info.channels, info.height, info.width, info.diffusion_steps),
        (1, 28, 28, 1000)
    );
    assert_eq!(info.num_classes, Some(10));
    assert!(info.guided);
    assert_eq!(info.default_guidance_scale, Some(2.0));
    assert_eq!(info.parameters, 1_192_930);
}

/// The page promises the CLI's digits for the CLI's settings: same draws, same grid.
#[test]
fn samples_equal_ddpm_cli_sample_for_the_same_settings() {
    let m = model();
    for (solver, method, class, guidance) in [
        ("ddpm", SamplingMethod::Ddpm, Some(3), None),
        ("dpm++2m", SamplingMethod::DpmSolverPp2m, None, Some(1.5)),
    ] {
        let request = SampleRequest {
            num: 3,
            seed: 11,
            steps: 4,
            method,
            class,
            guidance_scale: guidance,
        };
        let mut steps = Vec::new();
        let grid = m
            .sample(&request, |s| {
                assert_eq!((s.x_t.width, s.x_t.height), (2 * 29 + 1, 2 * 29 + 1));
                steps.push((s.step, s.total));
            })
            .unwrap();
        assert_eq!(steps, [(1, 4), (2, 4), (3, 4), (4, 4)]);

        let mut argv = vec![
            "sample".to_string(),
            "--checkpoint".into(),
            model_dir().display().to_string(),
            "--num".into(),
            "3".into(),
            "--seed".into(),
            "11".into(),
            "--steps".into(),
            "4".into(),
            "--solver".into(),
            solver.into(),
            "--npz".into(),
            "unused.npz".into(),
        ];
        if let Some(c) = class {
            argv.extend(["--class".into(), c.to_string()]);
        }
        if let Some(g) = guidance {
            argv.extend(["--guidance-scale".into(), g.to_string()]);
        }
        let cli = Sample::try_parse_from(&argv).unwrap().args;
        // Only the sampling: nothing is written without --out/--npz/--gif given to `run`.
        let cli = ddpm_cli::sample::SampleArgs { npz: None, ..cli };
        let samples = ddpm_cli::sample::generate(&cli).unwrap();
        let expected = ddpm_train::grid::make_grid(&samples.images)
            .unwrap()
            .to_rgba8();
        assert_eq!(
            (grid.width, grid.height),
            (expected.width() as usize, expected.height() as usize)
        );
        assert!(grid.rgba == expected.into_raw(), "{solver}: grids differ");
        if let Some(c) = class {
            assert!(samples.labels.iter().all(|&l| l == c as i64));
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_samples_and_another_seed_others() {
    let m = model();
    let req = |seed| SampleRequest {
        num: 2,
        seed,
        steps: 3,
        ..Default::default()
    };
    let a = m.sample(&req(5), |_| {}).unwrap();
    assert_eq!(a, m.sample(&req(5), |_| {}).unwrap());
    assert_ne!(a, m.sample(&req(6), |_| {}).unwrap());
}

#[test]
fn a_grid_is_laid_out_as_ddpm_train_lays_out_its_pngs() {
    let x = Tensor::arange(0f32, 5.0 * 3.0 * 4.0 * 2.0, &Device::Cpu)
        .unwrap()
        .reshape((5, 3, 4, 2))
        .unwrap()
        .affine(1.0 / 60.0, -1.0)
        .unwrap();
    let grid = Grid::from_batch(&x).unwrap();
    let png = ddpm_train::grid::make_grid(&x).unwrap().to_rgba8();
    assert_eq!((grid.width, grid.height), (3 * 3 + 1, 2 * 5 + 1));
    assert!(grid.rgba == png.into_raw());
    let gray = x.narrow(1, 0, 1).unwrap();
    let grid = Grid::from_batch(&gray).unwrap();
    assert!(
        grid.rgba
            == ddpm_train::grid::make_grid(&gray)
                .unwrap()
                .to_rgba8()
                .into_raw()
    );
}

#[test]
fn the_forward_process_keeps_the_digit_at_t0_and_drowns_it_at_the_end() {
    let m = model();
    let digit: Vec<u8> = (0..784)
        .map(|i| if i % 28 > 14 { 255 } else { 0 })
        .collect();
    let cell = |g: &Grid| -> Vec<u8> {
        (0..784)
            .map(|i| g.rgba[4 * ((i / 28 + 1) * 30 + i % 28 + 1)])
            .collect()
    };
    let t0 = m.forward(&digit, 0, 0).unwrap();
    assert_eq!((t0.width, t0.height), (30, 30));
    let worst = cell(&t0)
        .iter()
        .zip(&digit)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    // sqrt(1 - alpha_bar_0) is about 0.006 under the cosine schedule: a level or two.
    assert!(worst <= 3, "t = 0 moved a pixel by {worst}");
    let end = cell(&m.forward(&digit, 999, 0).unwrap());
    let right: f64 = (0..784)
        .filter(|i| i % 28 > 14)
        .map(|i| end[i] as f64)
        .sum::<f64>()
        / 364.0;
    let left: f64 = (0..784)
        .filter(|i| i % 28 <= 14)
        .map(|i| end[i] as f64)
        .sum::<f64>()
        / 420.0;
    assert!(
        (right - left).abs() < 25.0,
        "the digit shows at t = T-1: {left} vs {right}"
    );
    assert_ne!(
        cell(&m.forward(&digit, 500, 0).unwrap()),
        cell(&m.forward(&digit, 500, 1).unwrap())
    );
    assert!(err(m.forward(&digit[..700], 10, 0)).contains("700 bytes"));
    assert!(err(m.forward(&digit, 1000, 0)).contains("outside 0..1000"));
}

#[test]
fn files_that_are_not_a_checkpoint_are_named_as_such() {
    let w = weights();
    assert!(err(WebModel::from_bytes("hello", &w))
        .starts_with("not a checkpoint config.json: not JSON"));
    let e = err(WebModel::from_bytes("{\"hello\": 1}", &w));
    assert!(e.contains("no \"model\" entry"), "{e}");
    let e = err(WebModel::from_bytes(&config_text(), b"not safetensors"));
    assert!(
        e.starts_with("not weights for this model: not a safetensors file"),
        "{e}"
    );
    // Weights of another network: the unguided twin of the model lacks the null class row.
    let unguided = config_text().replace("\"null_class\": true", "\"null_class\": false");
    assert_ne!(unguided, config_text());
    let e = err(WebModel::from_bytes(&unguided, &w));
    assert!(
        e.starts_with("not weights for this model") && e.contains("label_emb.null"),
        "{e}"
    );
    // An image size the UNet cannot restore through its down- and up-sampling.
    let mut v: serde_json::Value = serde_json::from_str(&config_text()).unwrap();
    v["image_size"] = serde_json::json!([27, 27]);
    let e = err(WebModel::from_bytes(&v.to_string(), &w));
    assert!(
        e.starts_with("not a checkpoint config.json") && e.contains("27"),
        "{e}"
    );
}

#[test]
fn requests_the_model_cannot_serve_are_refused() {
    let m = model();
    let req = SampleRequest::default();
    let bad = |r: SampleRequest| err(m.sample(&r, |_| panic!("no step may run")));
    assert!(bad(SampleRequest {
        num: 0,
        ..req.clone()
    })
    .contains("positive"));
    assert!(bad(SampleRequest {
        steps: 0,
        ..req.clone()
    })
    .contains("at least one step"));
    assert!(bad(SampleRequest {
        steps: 1001,
        ..req.clone()
    })
    .contains("1000 diffusion steps"));
    assert!(bad(SampleRequest {
        class: Some(10),
        ..req.clone()
    })
    .contains("outside 0..10"));
    assert!(bad(SampleRequest {
        guidance_scale: Some(-1.0),
        ..req.clone()
    })
    .contains("0 or more"));
    assert!(bad(SampleRequest {
        guidance_scale: Some(f64::NAN),
        ..req
    })
    .contains("finite"));
}

#[test]
fn class_names_that_do_not_fit_and_nan_weights_are_errors() {
    let mut v: serde_json::Value = serde_json::from_str(&config_text()).unwrap();
    v["class_names"] = serde_json::json!(["zero", "one"]);
    let e = err(WebModel::from_bytes(&v.to_string(), &weights()));
    assert!(e.contains("2 class names for a model of 10 classes"), "{e}");

    let mut tensors = candle_core::safetensors::load_buffer(&weights(), &Device::Cpu).unwrap();
    let w = &tensors["out.2.weight"];
    let nan = Tensor::full(f32::NAN, w.dims(), &Device::Cpu).unwrap();
    tensors.insert("out.2.weight".into(), nan);
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("nan.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let m = WebModel::from_bytes(&config_text(), &std::fs::read(&path).unwrap()).unwrap();
    let req = SampleRequest {
        num: 1,
        steps: 2,
        ..Default::default()
    };
    let e = err(m.sample(&req, |_| {}));
    assert!(e.contains("not finite"), "{e}");
}
