//! Training-loop behaviour: exact resume, NaN guard, Ctrl-C, checkpoints, and real MNIST.

mod common;
use common::mnist;

use candle_core::{Device, Tensor};
use ddpm_train::checkpoint::CheckpointMeta;
use ddpm_train::data::{IdxArray, ImageDataset};
use ddpm_train::run_folder::list_checkpoints;
use ddpm_train::{
    DiffusionSettings, EmaWarmup, LrSchedule, RunOutcome, Split, TrainConfig, TrainError, Trainer,
};
use ddpm_unet::UNetConfig;
use std::path::Path;
use std::sync::atomic::Ordering;

fn tiny_model() -> UNetConfig {
    UNetConfig {
        in_channels: 1,
        model_channels: 32,
        out_channels: 2,
        num_res_blocks: 1,
        attention_resolutions: vec![2],
        dropout: 0.1,
        channel_mult: vec![1, 2],
        num_classes: None,
        num_heads: 1,
        use_scale_shift_norm: true,
        null_class: false,
    }
}

fn tiny_train(steps: u64) -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        microbatch: 2,
        steps,
        log_interval: 1,
        save_interval: 1000,
        sample_interval: 0,
        ema_rate: vec![0.9, 0.99],
        schedule_sampler: ddpm_train::TimestepSampling::LossSecondMoment,
        keep_checkpoints: 0,
        seed: 3,
        ..TrainConfig::default()
    }
}

fn data() -> ImageDataset {
    let n = 10;
    let images = IdxArray {
        dims: vec![n, 8, 8],
        data: (0..n * 64).map(|i| ((i * 97) % 256) as u8).collect(),
    };
    let labels = IdxArray {
        dims: vec![n],
        data: (0..n).map(|i| (i % 10) as u8).collect(),
    };
    ImageDataset::from_idx(images, labels, Path::new("i"), Path::new("l")).unwrap()
}

fn trainer(dir: &Path, steps: u64) -> Trainer {
    trainer_with(dir, tiny_train(steps), tiny_diffusion())
}

fn tiny_diffusion() -> DiffusionSettings {
    DiffusionSettings {
        diffusion_steps: 50,
        ..Default::default()
    }
}

fn trainer_with(dir: &Path, cfg: TrainConfig, diffusion: DiffusionSettings) -> Trainer {
    Trainer::new(tiny_model(), diffusion, cfg, data(), dir, &Device::Cpu).unwrap()
}

/// The newer recipe: EMA warm-up, cosine lr with warm-up, v-prediction with Min-SNR-5.
fn recipe(steps: u64) -> (TrainConfig, DiffusionSettings) {
    let cfg = TrainConfig {
        ema_warmup: Some(EmaWarmup::default()),
        lr_schedule: Some(LrSchedule::Cosine),
        lr_warmup_steps: 3,
        lr: 1e-3,
        ..tiny_train(steps)
    };
    let diffusion = DiffusionSettings {
        predict_v: true,
        snr_gamma: Some(5.0),
        ..tiny_diffusion()
    };
    (cfg, diffusion)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn the_newer_recipe_resumes_exactly_and_its_ema_starts_at_the_weights() {
    let a = tempfile::tempdir().unwrap();
    let (cfg, diffusion) = recipe(6);
    let mut straight = trainer_with(a.path(), cfg.clone(), diffusion.clone());
    let first_loss = straight.train_step().unwrap();
    // The first warm-up update copies the weights: decay 0.
    let w = straight.params().tensors().unwrap();
    for ema in straight.emas() {
        assert_eq!(flat(&ema.params["out.2.weight"]), flat(&w["out.2.weight"]));
    }
    assert!(
        (first_loss.lr - 1e-3 / 3.0).abs() < 1e-12,
        "{}",
        first_loss.lr
    );
    let mut want = vec![first_loss.loss];
    want.extend(losses(&mut straight, 5));
    let b = tempfile::tempdir().unwrap();
    let mut first = trainer_with(b.path(), cfg, diffusion);
    let mut got = losses(&mut first, 3);
    let ckpt = first.save().unwrap();
    drop(first);
    let mut resumed =
        Trainer::<UNetConfig>::resume(&ckpt, data(), b.path(), &Device::Cpu, |_| {}).unwrap();
    assert_eq!(resumed.cfg.ema_warmup, Some(EmaWarmup::default()));
    assert!(resumed.diffusion_settings().snr_gamma == Some(5.0));
    got.extend(losses(&mut resumed, 3));
    assert_eq!(got, want);
    for (e1, e2) in straight.emas().iter().zip(resumed.emas()) {
        assert_eq!(
            flat(&e1.params["out.2.weight"]),
            flat(&e2.params["out.2.weight"])
        );
    }
    // The EMA moved off the weights after the first step (decay > 0 from the second update).
    let w = resumed.params().tensors().unwrap();
    assert_ne!(
        flat(&resumed.emas()[1].params["out.2.weight"]),
        flat(&w["out.2.weight"])
    );
}

fn losses(t: &mut Trainer, n: usize) -> Vec<f64> {
    (0..n).map(|_| t.train_step().unwrap().loss).collect()
}

#[test]
fn n_steps_resume_n_steps_equals_2n_steps() {
    let a = tempfile::tempdir().unwrap();
    let mut straight = trainer(a.path(), 8);
    let want = losses(&mut straight, 8);
    let b = tempfile::tempdir().unwrap();
    let mut first = trainer(b.path(), 8);
    let mut got = losses(&mut first, 4);
    let ckpt = first.save().unwrap();
    drop(first);
    let mut resumed =
        Trainer::<UNetConfig>::resume(&ckpt, data(), b.path(), &Device::Cpu, |_| {}).unwrap();
    assert_eq!(resumed.step, 4);
    got.extend(losses(&mut resumed, 4));
    assert_eq!(
        got, want,
        "resumed losses must equal the uninterrupted run's"
    );
    // The weights and EMAs agree too.
    let (w1, w2) = (
        straight.params().tensors().unwrap(),
        resumed.params().tensors().unwrap(),
    );
    for (k, v) in &w1 {
        let d: f32 = (v - &w2[k])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(d, 0.0, "{k}");
    }
    let e1 = &straight.emas()[1].params["out.2.weight"];
    let e2 = &resumed.emas()[1].params["out.2.weight"];
    assert_eq!(
        e1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        e2.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn a_non_finite_loss_stops_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(dir.path(), 10);
    losses(&mut t, 2);
    let saved = t.save().unwrap();
    let before = std::fs::read(saved.join("model.safetensors")).unwrap();
    // Poison one weight: the next loss is NaN.
    let (_, var) = t
        .params()
        .vars()
        .into_iter()
        .find(|(n, _)| n == "input_blocks.0.0.weight")
        .unwrap();
    var.set(&(var.as_tensor() * f64::NAN).unwrap()).unwrap();
    let err = t.run(false).unwrap_err();
    assert!(
        matches!(err, TrainError::NonFinite { step: 3, .. }),
        "{err}"
    );
    assert!(err
        .to_string()
        .contains("checkpoints already written are kept"));
    assert_eq!(
        list_checkpoints(dir.path())
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(
        std::fs::read(saved.join("model.safetensors")).unwrap(),
        before
    );
}

#[test]
fn the_stop_flag_saves_a_checkpoint_and_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(dir.path(), 100);
    losses(&mut t, 1);
    t.stop_flag().store(true, Ordering::SeqCst);
    let outcome = t.run(false).unwrap();
    let RunOutcome::Interrupted(ckpt) = outcome else {
        panic!("expected an interrupted run")
    };
    let meta = CheckpointMeta::<ddpm_unet::UNetConfig>::read(&ckpt).unwrap();
    assert_eq!(meta.step, 1);
    assert_eq!(meta.image_size, [8, 8]);
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "ema_0.9.safetensors",
        "ema_0.99.safetensors",
        "config.json",
    ] {
        assert!(ckpt.join(f).exists(), "{f}");
    }
}

#[test]
fn a_run_logs_metrics_and_writes_a_sample_grid() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        sample_interval: 2,
        sample_count: 3,
        sample_respacing: "5".into(),
        ..tiny_train(2)
    };
    let mut t = Trainer::new(
        tiny_model(),
        DiffusionSettings {
            diffusion_steps: 50,
            ..Default::default()
        },
        cfg,
        data(),
        dir.path(),
        &Device::Cpu,
    )
    .unwrap();
    assert!(matches!(t.run(false).unwrap(), RunOutcome::Finished(_)));
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for key in ["loss", "mse", "vb", "grad_norm", "lr", "images_per_sec"] {
        assert!(lines[1][key].as_f64().unwrap().is_finite(), "{key}");
    }
    let png = image::open(dir.path().join("samples-0000002.png")).unwrap();
    assert_eq!((png.width(), png.height()), (2 * 9 + 1, 2 * 9 + 1));
}

#[test]
fn mismatched_settings_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bad = UNetConfig {
        out_channels: 1,
        ..tiny_model()
    };
    let e = Trainer::new(
        bad,
        DiffusionSettings::default(),
        tiny_train(1),
        data(),
        dir.path(),
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("out_channels"), "{e}");
    let e = Trainer::new(
        tiny_model(),
        DiffusionSettings::default(),
        TrainConfig {
            class_cond: true,
            ..tiny_train(1)
        },
        data(),
        dir.path(),
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("class_cond"), "{e}");
    let e = Trainer::<UNetConfig>::resume(dir.path(), data(), dir.path(), &Device::Cpu, |_| {})
        .err()
        .unwrap();
    assert!(e.to_string().contains("not a checkpoint folder"), "{e}");
}

#[test]
fn class_conditional_training_runs() {
    let dir = tempfile::tempdir().unwrap();
    let model = UNetConfig {
        num_classes: Some(10),
        ..tiny_model()
    };
    let cfg = TrainConfig {
        class_cond: true,
        ..tiny_train(2)
    };
    let mut t = Trainer::new(
        model,
        DiffusionSettings {
            diffusion_steps: 50,
            ..Default::default()
        },
        cfg,
        data(),
        dir.path(),
        &Device::Cpu,
    )
    .unwrap();
    let l = losses(&mut t, 2);
    assert!(l.iter().all(|v| v.is_finite()));
    assert!(t
        .params()
        .tensors()
        .unwrap()
        .contains_key("label_emb.weight"));
}

/// The download path users run, after a dead mirror, from a folder holding the files.
#[test]
fn mnist_download_falls_back_to_a_working_mirror_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mnist");
    let mirrors = vec![
        dir.path().join("dead-mirror").display().to_string(),
        mnist().display().to_string(),
    ];
    let fetched = ddpm_train::download::download_mnist(&out, &mirrors).unwrap();
    assert_eq!(fetched.len(), 4);
    // A second call finds everything verified and fetches nothing.
    assert!(ddpm_train::download::download_mnist(&out, &mirrors)
        .unwrap()
        .is_empty());
    let train = ImageDataset::load(&out, Split::Train).unwrap();
    let test = ImageDataset::load(&out, Split::Test).unwrap();
    assert_eq!(
        (train.len, train.height, train.width, test.len),
        (60_000, 28, 28, 10_000)
    );
    // The first training label of MNIST is a 5, the first test label a 7.
    assert_eq!((train.label(0), test.label(0)), (5, 7));
    let (x, _) = train.batch(&[0], &Device::Cpu).unwrap();
    let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(v[0], -1.0);
    assert!(v.contains(&1.0));
}

/// The committed classifier behind `ddpm-cli eval` classifies real MNIST digits at >= 99%.
#[test]
fn mnist_classifier_reaches_99_percent() {
    let test = ImageDataset::load(&mnist(), Split::Test).unwrap();
    let clf = ddpm_train::eval::Classifier::pretrained(&Device::Cpu).unwrap();
    let acc = clf.accuracy(&test).unwrap();
    assert!(acc >= 0.99, "test accuracy {acc}");
    // Real test digits score like a confident, balanced 10-way classifier.
    let idx: Vec<usize> = (0..2000).collect();
    let (x, _) = test.batch(&idx, &Device::Cpu).unwrap();
    let (feats, probs) = clf.describe(&x, 500).unwrap();
    assert_eq!(feats[0].len(), ddpm_train::eval::FEATURES);
    let is = ddpm_train::eval::inception_score(&probs);
    assert!(is > 9.0, "IS {is}");
    // Two halves of the real digits are close; real digits and noise images are far apart.
    let (a, b) = feats.split_at(1000);
    let noise = Tensor::rand(-1f32, 1f32, (1000, 1, 28, 28), &Device::Cpu).unwrap();
    let (noise_feats, _) = clf.describe(&noise, 500).unwrap();
    let (fd_real, fd_noise) = (
        ddpm_train::eval::frechet_distance(a, b),
        ddpm_train::eval::frechet_distance(a, &noise_feats),
    );
    assert!(
        fd_real < 0.05 * fd_noise,
        "FD halves {fd_real}, FD to noise {fd_noise}"
    );
}

#[test]
fn label_dropout_replaces_about_p_of_the_labels_reproducibly() {
    use rand::SeedableRng;
    let n = 10_000;
    let labels = Tensor::from_vec(
        (0..n as u32).map(|i| i % 10).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap();
    let draw = |seed| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let y = ddpm_train::trainer::drop_labels(&labels, 0.25, 10, &mut rng).unwrap();
        y.to_vec1::<u32>().unwrap()
    };
    let (a, b) = (draw(1), draw(1));
    assert_eq!(a, b, "seeded");
    assert_ne!(a, draw(2));
    let dropped = a.iter().filter(|&&v| v == 10).count() as f64 / n as f64;
    assert!((0.23..0.27).contains(&dropped), "{dropped}");
    assert!(a
        .iter()
        .enumerate()
        .all(|(i, &v)| v == 10 || v == (i % 10) as u32));
}
