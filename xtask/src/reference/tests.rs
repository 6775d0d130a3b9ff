use super::*;
use serde_json::json;

fn outcome(case: serde_json::Value) -> Outcome {
    run_case(&case, Path::new("."))
}

#[test]
fn a_correct_case_passes() {
    let c = json!({"id": "a", "kind": "space_timesteps", "num_timesteps": 10, "respacing": "5",
                   "expected": {"steps": [0, 2, 4, 7, 9]}});
    assert!(matches!(outcome(c), Outcome::Passed));
}

#[test]
fn a_wrong_value_fails_naming_field_and_index() {
    let c = json!({"id": "a", "kind": "space_timesteps", "num_timesteps": 10, "respacing": "5",
                   "expected": {"steps": [0, 2, 5, 7, 9]}});
    let Outcome::Failed(ms) = outcome(c) else {
        panic!("should fail")
    };
    assert_eq!(ms.len(), 1);
    assert_eq!((ms[0].field.as_str(), ms[0].index), ("steps", Some(2)));
    assert_eq!(
        (ms[0].expected.as_str(), ms[0].got.as_str()),
        ("5e0", "4e0")
    );
}

#[test]
fn a_value_just_outside_tolerance_fails() {
    let c = json!({"id": "k", "kind": "approx_standard_normal_cdf", "x": [0.0],
                   "expected": {"cdf": [0.5002]}});
    assert!(matches!(outcome(c), Outcome::Failed(_)));
    let c = json!({"id": "k", "kind": "approx_standard_normal_cdf", "x": [0.0],
                   "expected": {"cdf": [0.5]}});
    assert!(matches!(outcome(c), Outcome::Passed));
}

#[test]
fn unknown_kinds_and_fields_are_not_skipped() {
    let c = json!({"id": "a", "kind": "teleport", "expected": {}});
    assert!(matches!(outcome(c), Outcome::Unsupported(_)));
    let c = json!({"id": "a", "kind": "space_timesteps", "num_timesteps": 10, "respacing": "5",
                   "stride_mode": "odd", "expected": {"steps": [0, 2, 4, 7, 9]}});
    let Outcome::Unsupported(why) = outcome(c) else {
        panic!("should be unsupported")
    };
    assert!(why.contains("stride_mode"), "{why}");
    let c = json!({"id": "a", "kind": "space_timesteps", "num_timesteps": 10, "respacing": "5",
                   "expected": {"steps": [0, 2, 4, 7, 9], "strides": [2]}});
    let Outcome::Failed(ms) = outcome(c) else {
        panic!("should fail")
    };
    assert_eq!(ms[0].field, "strides");
}

#[test]
fn errors_and_wrong_lengths_fail() {
    let c = json!({"id": "a", "kind": "space_timesteps", "num_timesteps": 10, "respacing": "20",
                   "expected": {"steps": [0]}});
    let Outcome::Failed(ms) = outcome(c) else {
        panic!("should fail")
    };
    assert!(ms[0].got.contains("cannot divide"), "{:?}", ms[0]);
    let c = json!({"id": "a", "kind": "space_timesteps", "num_timesteps": 10, "respacing": "5",
                   "expected": {"steps": [0, 2, 4]}});
    assert!(matches!(outcome(c), Outcome::Failed(_)));
    let c = json!({"id": "a", "kind": "space_timesteps", "num_timesteps": 10,
                   "expected": {"steps": [0, 2, 4]}});
    assert!(matches!(outcome(c), Outcome::Failed(_)));
}

/// The reference cases recorded from the original all pass, with nothing unsupported.
#[test]
fn reference_cases_pass() {
    let s = run_file(&crate::reference_cases(), false).expect("the reference cases are readable");
    assert_eq!((s.failed, s.unsupported), (0, 0), "{s:?}");
    assert!(s.passed >= 22, "{s:?}");
}

/// A case that errors stops before reading its later fields: it fails with the error, and is
/// not reported as unsupported because of the fields it never reached.
#[test]
fn an_erroring_case_fails_with_its_error_not_as_unsupported() {
    let c = json!({"id": "a", "kind": "space_timesteps", "num_timesteps": 10, "respacing": "20",
                   "later_field": 3, "expected": {"steps": [0]}});
    let Outcome::Failed(ms) = outcome(c) else {
        panic!("should fail")
    };
    assert_eq!(ms.len(), 1, "{ms:?}");
    assert_eq!(ms[0].field, "(error)");
    assert!(ms[0].got.contains("cannot divide"), "{:?}", ms[0]);
    // The same unread field in a case that runs to the end is not understood.
    let c = json!({"id": "a", "kind": "space_timesteps", "num_timesteps": 10, "respacing": "5",
                   "later_field": 3, "expected": {"steps": [0, 2, 4, 7, 9]}});
    assert!(matches!(outcome(c), Outcome::Unsupported(_)));
}

/// A small class-conditional fixture in the original's layout, labels stored as int64 the way
/// PyTorch saves class indices: the checker loads it, runs it, and passes it; float labels and
/// a wrong parameter count fail with errors that say so.
#[test]
fn a_class_conditional_fixture_with_int64_labels_loads_and_runs() {
    use candle_core::{DType, Device, Tensor};
    let cfg = ddpm_unet::UNetConfig {
        in_channels: 1,
        model_channels: 32,
        out_channels: 2,
        num_res_blocks: 1,
        attention_resolutions: vec![2],
        dropout: 0.0,
        channel_mult: vec![1, 2],
        num_classes: Some(10),
        num_heads: 2,
        use_scale_shift_norm: true,
        null_class: false,
    };
    let store = ddpm_unet::ParamStore::new(3, DType::F32, &Device::Cpu);
    let model = ddpm_unet::UNet::new(store.var_builder(), &cfg).unwrap();
    // Random values in the zero-initialised output layers, so that the output depends on them.
    for (name, var) in store.vars() {
        if name.starts_with("out.2") || name.contains("out_layers.3") {
            var.set(&Tensor::randn(0f32, 0.05, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let x = Tensor::randn(0f32, 1.0, (2, 1, 8, 8), &Device::Cpu).unwrap();
    let ts = Tensor::new(&[5f32, 700.0], &Device::Cpu).unwrap();
    let y = Tensor::new(&[4i64, 9], &Device::Cpu).unwrap();
    let out = model.forward(&x, &ts, Some(&y), false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, labels: Tensor| {
        let mut tensors = store.tensors().unwrap();
        tensors.insert("__input_x".into(), x.clone());
        tensors.insert("__input_timesteps".into(), ts.clone());
        tensors.insert("__input_y".into(), labels);
        tensors.insert("__output".into(), out.clone());
        ddpm_unet::write_safetensors(&tensors, &dir.path().join(name)).unwrap();
    };
    write("cond.safetensors", y.clone());
    write("float.safetensors", y.to_dtype(DType::F32).unwrap());
    assert_eq!(
        ddpm_unet::read_safetensors_any(&dir.path().join("cond.safetensors")).unwrap()["__input_y"]
            .dtype(),
        DType::I64
    );
    let want: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
    let case = |weights: &str, n: usize| {
        json!({"id": "c", "kind": "unet_forward", "weights": weights,
               "config": serde_json::to_value(&cfg).unwrap(), "num_parameters": n,
               "expected": {"output": want}})
    };
    let n = store.num_parameters();
    let ok = run_case(&case("cond.safetensors", n), dir.path());
    assert!(matches!(ok, Outcome::Passed), "{ok:?}");
    let Outcome::Failed(ms) = run_case(&case("float.safetensors", n), dir.path()) else {
        panic!("float labels must fail")
    };
    assert!(ms[0].got.contains("integer"), "{ms:?}");
    let Outcome::Failed(ms) = run_case(&case("cond.safetensors", n + 1), dir.path()) else {
        panic!("a wrong parameter count must fail")
    };
    assert!(ms[0].got.contains("parameters"), "{ms:?}");
}
