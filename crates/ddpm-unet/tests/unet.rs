//! Behaviour of the UNet: initialisation, weights I/O, conditioning, dropout.

use candle_core::{DType, Device, Tensor};
use ddpm_unet::{ParamStore, UNet, UNetConfig, UNetError};
use std::collections::HashMap;

fn small_cfg() -> UNetConfig {
    UNetConfig {
        in_channels: 1,
        model_channels: 32,
        out_channels: 2,
        num_res_blocks: 1,
        attention_resolutions: vec![2],
        dropout: 0.0,
        channel_mult: vec![1, 2],
        num_classes: None,
        num_heads: 2,
        use_scale_shift_norm: true,
        null_class: false,
    }
}

fn build(cfg: &UNetConfig, seed: u64) -> (ParamStore, UNet) {
    let store = ParamStore::new(seed, DType::F32, &Device::Cpu);
    let model = UNet::new(store.var_builder(), cfg).unwrap();
    (store, model)
}

/// Gives the zero-initialised layers random values so that the output is not identically zero.
fn perturb(store: &ParamStore, seed: u64) {
    let mut k = seed;
    for (name, var) in store.vars() {
        if name.contains("out_layers.3") || name.contains("proj_out") || name.starts_with("out.2") {
            k += 1;
            let t = Tensor::arange(0f32, var.elem_count() as f32, &Device::Cpu).unwrap();
            let t = ((t * (0.37 + k as f64 * 0.011)).unwrap().sin().unwrap() * 0.05).unwrap();
            var.set(&t.reshape(var.shape()).unwrap()).unwrap();
        }
    }
}

fn inputs(b: usize) -> (Tensor, Tensor) {
    let x = Tensor::arange(0f32, (b * 16 * 16) as f32, &Device::Cpu).unwrap();
    let x = (x * 0.013)
        .unwrap()
        .cos()
        .unwrap()
        .reshape((b, 1, 16, 16))
        .unwrap();
    let t = Tensor::new(&[3f32, 870.0][..b], &Device::Cpu).unwrap();
    (x, t)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

#[test]
fn fresh_model_outputs_exactly_zero_and_init_is_seeded() {
    let (store, model) = build(&small_cfg(), 1);
    let (x, t) = inputs(2);
    let out = model.forward(&x, &t, None, false).unwrap();
    assert_eq!(out.dims(), &[2, 2, 16, 16]);
    assert_eq!(max_abs(&out), 0.0);
    let (store2, _) = build(&small_cfg(), 1);
    let (store3, _) = build(&small_cfg(), 2);
    let w = |s: &ParamStore| {
        s.tensors().unwrap()["input_blocks.0.0.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(w(&store), w(&store2));
    assert_ne!(w(&store), w(&store3));
    // PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 9 for the first conv.
    assert!(w(&store).iter().all(|v| v.abs() <= 1.0 / 3.0));
    assert!(w(&store).iter().any(|v| v.abs() > 0.3));
    let gn = &store.tensors().unwrap()["input_blocks.1.0.in_layers.0.weight"];
    assert!(gn.to_vec1::<f32>().unwrap().iter().all(|&v| v == 1.0));
}

#[test]
fn mnist_config_has_the_original_parameter_count_and_names() {
    let (store, _) = build(&UNetConfig::mnist(), 0);
    assert_eq!(store.num_parameters(), 1_743_170);
    let names: Vec<String> = store.vars().into_iter().map(|(n, _)| n).collect();
    for n in [
        "time_embed.0.weight",
        "input_blocks.1.0.in_layers.2.weight",
        "middle_block.1.qkv.weight",
        "out.2.weight",
        "output_blocks.8.0.skip_connection.weight",
        "output_blocks.2.2.conv.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "missing {n}");
    }
}

#[test]
fn safetensors_round_trip_restores_the_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let (store, model) = build(&small_cfg(), 3);
    perturb(&store, 0);
    let (x, t) = inputs(2);
    let out = model.forward(&x, &t, None, false).unwrap();
    assert!(max_abs(&out) > 1e-3);
    store.save_safetensors(&path).unwrap();
    let (store2, model2) = build(&small_cfg(), 99);
    store2.load_safetensors(&path).unwrap();
    assert_eq!(
        max_diff(&out, &model2.forward(&x, &t, None, false).unwrap()),
        0.0
    );
    // bf16 files are converted on load.
    let bf: HashMap<String, Tensor> = store
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap()))
        .collect();
    ddpm_unet::write_safetensors(&bf, &path).unwrap();
    store2.load_safetensors(&path).unwrap();
    let d = max_diff(&out, &model2.forward(&x, &t, None, false).unwrap());
    assert!(d > 0.0 && d < 0.05 * max_abs(&out), "{d}");
}

#[test]
fn mismatched_weight_files_name_every_problem_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    let (store, _) = build(&small_cfg(), 3);
    let before = store.tensors().unwrap();
    let mut t = before.clone();
    t.remove("time_embed.0.bias");
    t.insert(
        "extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    t.insert(
        "out.2.weight".into(),
        Tensor::zeros((2, 32, 1, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    t.insert(
        "input_blocks.0.0.weight".into(),
        Tensor::ones((32, 1, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    ddpm_unet::write_safetensors(&t, &path).unwrap();
    let err = store.load_safetensors(&path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, UNetError::WeightsMismatch { .. }));
    assert!(msg.contains("missing 1: time_embed.0.bias"), "{msg}");
    assert!(msg.contains("unexpected 1: extra.weight"), "{msg}");
    assert!(
        msg.contains("out.2.weight has shape [2, 32, 1, 1] in the file but [2, 32, 3, 3]"),
        "{msg}"
    );
    // A file of another configuration mismatches every tensor: a few are named, not all.
    let (wide, _) = build(
        &UNetConfig {
            model_channels: 64,
            ..small_cfg()
        },
        3,
    );
    ddpm_unet::write_safetensors(&wide.tensors().unwrap(), &path).unwrap();
    let msg = store.load_safetensors(&path).unwrap_err().to_string();
    assert!(
        msg.contains("more tensors of other shapes") && msg.len() < 1000,
        "{msg}"
    );
    let after = store.tensors().unwrap();
    assert_eq!(
        max_diff(
            &before["input_blocks.0.0.weight"],
            &after["input_blocks.0.0.weight"]
        ),
        0.0
    );
    // Not a safetensors file at all, and a missing file.
    std::fs::write(&path, b"not a tensor file").unwrap();
    assert!(matches!(
        store.load_safetensors(&path),
        Err(UNetError::BadFile { .. })
    ));
    let e = store
        .load_safetensors(&dir.path().join("nope.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.safetensors"), "{e}");
}

#[test]
fn class_conditional_forward_uses_the_labels() {
    let cfg = UNetConfig {
        num_classes: Some(10),
        ..small_cfg()
    };
    let (store, model) = build(&cfg, 4);
    perturb(&store, 1);
    assert!(store.tensors().unwrap().contains_key("label_emb.weight"));
    let (x, t) = inputs(2);
    let y1 = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    let y2 = Tensor::new(&[7u32, 2], &Device::Cpu).unwrap();
    let a = model.forward(&x, &t, Some(&y1), false).unwrap();
    let b = model.forward(&x, &t, Some(&y2), false).unwrap();
    assert!(max_diff(&a.get(0).unwrap(), &b.get(0).unwrap()) > 1e-4);
    assert_eq!(max_diff(&a.get(1).unwrap(), &b.get(1).unwrap()), 0.0);
    let e = model.forward(&x, &t, None, false).unwrap_err().to_string();
    assert!(e.contains("needs labels"), "{e}");
    let bad = Tensor::new(&[1u32, 10], &Device::Cpu).unwrap();
    assert!(model
        .forward(&x, &t, Some(&bad), false)
        .unwrap_err()
        .to_string()
        .contains("outside 0..10"));
    let (_, uncond) = build(&small_cfg(), 4);
    let e = uncond
        .forward(&x, &t, Some(&y1), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unconditional"), "{e}");
}

/// Labels come as PyTorch (int64) and numpy (int32, uint8) write them; floats are refused.
#[test]
fn class_labels_load_from_every_integer_dtype() {
    let cfg = UNetConfig {
        num_classes: Some(10),
        ..small_cfg()
    };
    let (store, model) = build(&cfg, 4);
    perturb(&store, 1);
    let (x, t) = inputs(2);
    let want = model
        .forward(
            &x,
            &t,
            Some(&Tensor::new(&[3u32, 9], &Device::Cpu).unwrap()),
            false,
        )
        .unwrap();
    let ints = [
        Tensor::new(&[3i64, 9], &Device::Cpu).unwrap(),
        Tensor::new(&[3i32, 9], &Device::Cpu).unwrap(),
        Tensor::new(&[3i16, 9], &Device::Cpu).unwrap(),
        Tensor::new(&[3u32, 9], &Device::Cpu).unwrap(),
        Tensor::new(&[3u8, 9], &Device::Cpu).unwrap(),
    ];
    for y in &ints {
        let got = model.forward(&x, &t, Some(y), false).unwrap();
        assert_eq!(max_diff(&want, &got), 0.0, "labels as {:?}", y.dtype());
    }
    let float = Tensor::new(&[3f32, 9.0], &Device::Cpu).unwrap();
    let e = model
        .forward(&x, &t, Some(&float), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("F32") && e.contains("integer"), "{e}");
    for bad in [[-1i64, 2], [2, 10]] {
        let y = Tensor::new(&bad, &Device::Cpu).unwrap();
        let e = model
            .forward(&x, &t, Some(&y), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside 0..10"), "{e}");
    }
    // A parameter file cannot smuggle an integer tensor in as weights.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let mut tensors = store.tensors().unwrap();
    tensors.insert(
        "label_emb.weight".into(),
        Tensor::zeros((10, 128), DType::I64, &Device::Cpu).unwrap(),
    );
    ddpm_unet::write_safetensors(&tensors, &path).unwrap();
    let e = store.load_safetensors(&path).unwrap_err().to_string();
    assert!(e.contains("label_emb.weight") && e.contains("I64"), "{e}");
    assert_eq!(
        ddpm_unet::read_safetensors_any(&path).unwrap()["label_emb.weight"].dtype(),
        DType::I64
    );
}

#[test]
fn dropout_acts_only_in_training_and_is_seeded() {
    let cfg = UNetConfig {
        dropout: 0.3,
        ..small_cfg()
    };
    let (store, model) = build(&cfg, 5);
    perturb(&store, 2);
    let (x, t) = inputs(2);
    let e1 = model.forward(&x, &t, None, false).unwrap();
    let e2 = model.forward(&x, &t, None, false).unwrap();
    assert_eq!(max_diff(&e1, &e2), 0.0);
    model.set_dropout_seed(11);
    let t1 = model.forward(&x, &t, None, true).unwrap();
    model.set_dropout_seed(11);
    let t2 = model.forward(&x, &t, None, true).unwrap();
    let t3 = model.forward(&x, &t, None, true).unwrap();
    assert_eq!(max_diff(&t1, &t2), 0.0);
    assert!(max_diff(&t1, &e1) > 1e-4);
    assert!(max_diff(&t2, &t3) > 1e-4);
}

#[test]
fn wrong_input_shapes_are_errors() {
    let (_, model) = build(&small_cfg(), 6);
    let (x, t) = inputs(2);
    let e = model
        .forward(&x.narrow(3, 0, 15).unwrap(), &t, None, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("divisible by 2"), "{e}");
    assert!(model
        .forward(&x, &t.narrow(0, 0, 1).unwrap(), None, false)
        .is_err());
    let x3 = Tensor::zeros((2, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    assert!(model
        .forward(&x3, &t, None, false)
        .unwrap_err()
        .to_string()
        .contains("[B, 1, H, W]"));
}

#[test]
fn gradients_reach_every_parameter() {
    let (store, model) = build(&small_cfg(), 7);
    perturb(&store, 3);
    let (x, t) = inputs(2);
    let loss = model
        .forward(&x, &t, None, true)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in store.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dims(), var.dims());
    }
}

/// Three networks with the same weights built on different kernels live in one process, used in
/// turn: each gives its own result, and none changes what another computes.
#[test]
fn networks_on_different_kernels_share_a_process() {
    use ddpm_unet::{KernelChoice, KernelOptions, Precision};
    let cfg = small_cfg();
    let (store, _) = build(&cfg, 4);
    perturb(&store, 4);
    let weights = store.tensors().unwrap();
    let on = |kernels: KernelOptions| {
        let s = ParamStore::new(0, DType::F32, &Device::Cpu);
        let m = UNet::with_kernels(s.var_builder(), &cfg, kernels).unwrap();
        s.set_tensors(&weights).unwrap();
        (s, m)
    };
    let (_s1, fast) = on(KernelOptions::default());
    let (_s2, low) = on(KernelOptions::with_precision(Precision::Bf16));
    let (_s3, plain) = on(KernelOptions {
        choice: KernelChoice::Plain,
        ..Default::default()
    });
    let (x, t) = inputs(2);
    let run = |m: &UNet| m.forward(&x, &t, None, false).unwrap();
    let f1 = run(&fast);
    let b1 = run(&low);
    let p1 = run(&plain);
    let f2 = run(&fast);
    let b2 = run(&low);
    let diff = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap());
    assert_eq!(
        diff(&f1, &f2),
        0.0,
        "f32 network changed after the others ran"
    );
    assert_eq!(
        diff(&b1, &b2),
        0.0,
        "bf16 network changed after the others ran"
    );
    let scale = max_abs(&p1);
    assert!(scale > 0.01, "output is not trivially zero: {scale}");
    assert!(
        diff(&f1, &p1) < 1e-4 * scale,
        "fast kernels against plain Candle"
    );
    if KernelOptions::with_precision(Precision::Bf16).bf16_convolutions() {
        let d = diff(&b1, &f1);
        assert!(
            d > 1e-6 * scale && d < 0.05 * scale,
            "bf16 against f32: {d} (scale {scale})"
        );
    } else {
        assert_eq!(
            diff(&b1, &f1),
            0.0,
            "no bf16 kernels here: bf16 asks for f32"
        );
    }
}

/// A model for classifier-free guidance has one more parameter, `label_emb.null`, takes label
/// `num_classes` as "no label", and its config without the flag reads as before.
#[test]
fn null_class_is_one_more_embedding_row_under_its_own_name() {
    let cfg = UNetConfig {
        num_classes: Some(3),
        null_class: true,
        ..small_cfg()
    };
    let (store, model) = build(&cfg, 6);
    perturb(&store, 6);
    let vars = store.vars();
    let null = vars
        .iter()
        .find(|(n, _)| n == "label_emb.null")
        .expect("label_emb.null");
    assert_eq!(null.1.dims(), [1, cfg.time_embed_dim()]);
    assert_eq!(model.null_label(), Some(3));
    let (x, t) = inputs(2);
    let y = |a: u32, b: u32| Tensor::new(&[a, b], &Device::Cpu).unwrap();
    let with_null = model.forward(&x, &t, Some(&y(3, 3)), false).unwrap();
    let with_label = model.forward(&x, &t, Some(&y(1, 1)), false).unwrap();
    assert!(max_diff(&with_null, &with_label) > 1e-6);
    assert!(model.forward(&x, &t, Some(&y(4, 0)), false).is_err());
    // Without the flag, label 3 is out of range and there is no such parameter.
    let plain = UNetConfig {
        null_class: false,
        ..cfg.clone()
    };
    let (store, model) = build(&plain, 6);
    assert!(model.forward(&x, &t, Some(&y(3, 0)), false).is_err());
    assert!(model.null_label().is_none());
    assert!(store.vars().iter().all(|(n, _)| n != "label_emb.null"));
    // JSON: written only when set; a config without it (the original's) reads as unguided.
    assert!(!plain.to_json().contains("null_class"));
    assert_eq!(UNetConfig::from_json(&cfg.to_json()).unwrap(), cfg);
    assert_eq!(UNetConfig::from_json(&plain.to_json()).unwrap(), plain);
    let unconditional = UNetConfig {
        num_classes: None,
        ..cfg
    };
    assert!(unconditional.validate().is_err());
}

/// Guidance at scale 1 samples exactly as the conditional model, and at scale 0 exactly as the
/// model given the null label everywhere.
#[test]
fn guidance_end_points_sample_exactly_as_the_plain_model() {
    use ddpm_schedule::{
        ClassifierFreeGuidance, Denoiser, DiffusionConfig, GaussianDiffusion, RngNoise,
        SamplingMethod,
    };
    use rand::SeedableRng;
    let cfg = UNetConfig {
        num_classes: Some(3),
        null_class: true,
        ..small_cfg()
    };
    let (store, model) = build(&cfg, 8);
    perturb(&store, 8);
    let diffusion = GaussianDiffusion::new(&DiffusionConfig {
        respacing: "5".into(),
        ..DiffusionConfig::default()
    })
    .unwrap();
    let (x, _) = inputs(2);
    let y = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
    let null = Tensor::new(&[3u32, 3], &Device::Cpu).unwrap();
    let sample = |m: &dyn Denoiser, labels: &Tensor| {
        let mut noise = RngNoise(rand_chacha::ChaCha8Rng::seed_from_u64(1));
        let f = |x: &Tensor, t: &Tensor| m.denoise(x, t, Some(labels), false);
        diffusion
            .sample_loop(f, x.clone(), SamplingMethod::Ddpm, true, &mut noise, |_| {})
            .unwrap()
    };
    let guided = |scale| ClassifierFreeGuidance {
        model: &model,
        null_label: 3,
        scale,
        eps_channels: 1,
    };
    let plain = sample(&model, &y);
    assert_eq!(max_diff(&sample(&guided(1.0), &y), &plain), 0.0);
    assert_eq!(
        max_diff(&sample(&guided(0.0), &y), &sample(&model, &null)),
        0.0
    );
    assert!(max_diff(&sample(&guided(3.0), &y), &plain) > 1e-5);
}
