//! The evaluator sees what a person sees: deliberately degraded real digits score clearly worse
//! than clean ones at the same n, by more than the clean draws differ among themselves.

mod common;
use common::mnist;

use ddpm_train::degrade::{check_evaluator, Degradation};
use ddpm_train::eval::Classifier;
use ddpm_train::{ImageDataset, Split};

#[test]
fn degraded_digits_score_clearly_worse_than_the_real_floor() {
    let dir = mnist();
    let train = ImageDataset::load(&dir, Split::Train).unwrap();
    let test = ImageDataset::load(&dir, Split::Test).unwrap();
    let clf = Classifier::pretrained(&candle_core::Device::Cpu).unwrap();
    let check = check_evaluator(&clf, &train, &test, 1000, 5, 0).unwrap();
    let table = check.table();
    println!("{table}");
    let (mean, sd) = check.floor_fd();
    let worst_floor = check
        .floor
        .iter()
        .map(|s| s.frechet_distance)
        .fold(f64::MIN, f64::max);
    let least_confident = check
        .floor
        .iter()
        .map(|s| s.confident_fraction)
        .fold(f64::MAX, f64::min);
    // Measured (n = 1000, seed 0): floor 17.4 ± 3.3, confident 96.5-98.2%.
    assert!(sd > 0.0 && mean > 0.0, "{table}");
    assert!(least_confident > 0.95, "{table}");
    for s in &check.floor {
        assert!(
            s.class_histogram.iter().all(|&c| (50..=150).contains(&c)),
            "{table}"
        );
    }
    assert_eq!(check.degraded.len(), Degradation::ALL.len());
    // Measured: dilated 20x the floor, grey background 55x, blur 11x, noise 3.4x, 12% blobs
    // 3.0x (about 10 floor standard deviations above the mean).
    for (name, s) in &check.degraded {
        assert!(
            s.frechet_distance > 2.0 * mean && s.frechet_distance > worst_floor + 5.0 * sd,
            "{name} is not clearly worse than real digits:\n{table}"
        );
    }
    // Blobs and grey backgrounds also lower the confident fraction below every clean draw's.
    for name in ["12% blobs", "grey background"] {
        let s = &check.degraded.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(
            s.confident_fraction < least_confident - 0.05,
            "{name}:\n{table}"
        );
    }
    assert!(check_evaluator(&clf, &train, &test, 1000, 61, 0).is_err());
}
