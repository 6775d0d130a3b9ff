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
fn shared_reference_cases_pass() {
    let path = crate::shared_dir().join("reference").join("cases.json");
    let s = run_file(&path, false).expect("the shared reference cases must be readable");
    assert_eq!((s.failed, s.unsupported), (0, 0), "{s:?}");
    assert!(s.passed >= 22, "{s:?}");
}
