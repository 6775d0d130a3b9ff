//! v-prediction and Min-SNR-γ on the Gaussian toy problem, where the optimal model is known.
//!
//! Data: every pixel is independent N(0, S0²), so with v_t = alpha_bar_t·S0² + 1 - alpha_bar_t
//! the optimal predictions at x_t are E[eps | x_t] = sqrt(1 - ab)·x_t / v_t,
//! E[x_0 | x_t] = sqrt(ab)·S0²·x_t / v_t and E[v | x_t] = sqrt(ab)·eps* - sqrt(1 - ab)·x_0*.

use candle_core::{DType, Device, Tensor};
use ddpm_schedule::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

mod common;
use common::*;

const T: usize = 100;

fn diffusion(mean: ModelMeanType, var: ModelVarType, gamma: Option<f64>) -> GaussianDiffusion {
    GaussianDiffusion::new(&DiffusionConfig {
        beta_schedule: BetaSchedule::Linear,
        num_timesteps: T,
        respacing: String::new(),
        model_mean_type: mean,
        model_var_type: var,
        loss_type: LossType::Mse,
        snr_gamma: gamma,
    })
    .unwrap()
}

fn randn_f64(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
    randn(
        &mut ChaCha8Rng::seed_from_u64(seed),
        shape,
        DType::F64,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn v_conversions_invert_q_sample() {
    let d = diffusion(ModelMeanType::V, ModelVarType::FixedSmall, None);
    let x0 = randn_f64((5, 1, 4, 4), 1).clamp(-1.0, 1.0).unwrap();
    let noise = randn_f64((5, 1, 4, 4), 2);
    let t = [0, 1, 37, 98, 99];
    let x_t = d.q_sample(&x0, &t, &noise).unwrap();
    let v = d.predict_v(&x0, &t, &noise).unwrap();
    let back = d.predict_xstart_from_v(&x_t, &t, &v).unwrap();
    assert!(max_abs_diff(&back, &x0) < 1e-12);
    let eps = d.predict_eps_from_v(&x_t, &t, &v).unwrap();
    assert!(max_abs_diff(&eps, &noise) < 1e-12);
    // v by its definition, element by element at one timestep.
    let ab = d.schedule().alphas_cumprod[37];
    let want = ((noise.get(2).unwrap() * ab.sqrt()).unwrap()
        - (x0.get(2).unwrap() * (1.0 - ab).sqrt()).unwrap())
    .unwrap();
    assert!(max_abs_diff(&v.get(2).unwrap(), &want) < 1e-15);
    // And p_mean_variance reads a v output as the same x_0.
    let out = d.p_mean_variance(&v, &x_t, &t, false).unwrap();
    assert!(max_abs_diff(&out.pred_xstart, &x0) < 1e-12);
    assert!("v".parse::<ModelMeanType>().unwrap() == ModelMeanType::V);
    assert_eq!(ModelMeanType::V.name(), "v");
    let e = "w".parse::<ModelMeanType>().unwrap_err().to_string();
    assert!(e.contains("eps, x0, v"), "{e}");
}

#[test]
fn exact_eps_x0_and_v_models_sample_the_same_chain() {
    for var in [ModelVarType::FixedLarge, ModelVarType::Learned] {
        let x_t = randn_f64((3, 1, 4, 4), 3);
        let run = |mean, sampler| {
            let d = diffusion(mean, var, None);
            let mut noise = RngNoise(ChaCha8Rng::seed_from_u64(4));
            d.sample_loop(
                exact_model(&d),
                x_t.clone(),
                sampler,
                false,
                &mut noise,
                |_| {},
            )
            .unwrap()
        };
        for sampler in [SamplingMethod::Ddpm, SamplingMethod::Ddim { eta: 0.0 }] {
            let eps = run(ModelMeanType::Epsilon, sampler);
            for mean in [ModelMeanType::StartX, ModelMeanType::V] {
                let other = run(mean, sampler);
                let diff = max_abs_diff(&eps, &other);
                assert!(diff < 1e-9, "{var:?} {sampler:?} {mean:?}: {diff}");
            }
        }
    }
}

#[test]
fn min_snr_weights_make_the_three_parameterisations_one_loss_on_x0() {
    let gamma = 5.0;
    let x0 = randn_f64((6, 1, 4, 4), 5).clamp(-1.0, 1.0).unwrap();
    let noise = randn_f64((6, 1, 4, 4), 6);
    let delta = (randn_f64((6, 1, 4, 4), 7) * 0.1).unwrap();
    let t = [0usize, 3, 20, 50, 80, 99];
    let reference = diffusion(ModelMeanType::Epsilon, ModelVarType::FixedSmall, None);
    // The SNR crosses γ inside this range, so both sides of the clamp are exercised.
    let snr: Vec<f64> = t.iter().map(|&i| reference.snr(i)).collect();
    assert!(snr[0] > gamma && snr[5] < gamma, "{snr:?}");
    let x_t = reference.q_sample(&x0, &t, &noise).unwrap();
    let x0_pred = (&x0 + &delta).unwrap();
    let eps_pred = reference
        .predict_eps_from_xstart(&x_t, &t, &x0_pred)
        .unwrap();
    let v_pred = reference.predict_v(&x0_pred, &t, &eps_pred).unwrap();
    let x0_err: Vec<f64> = delta
        .sqr()
        .unwrap()
        .mean_keepdim(1)
        .unwrap()
        .flatten_from(1)
        .unwrap()
        .mean(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f64> = x0_err
        .iter()
        .zip(&snr)
        .map(|(e, s)| s.min(gamma) * e)
        .collect();
    for (mean, out) in [
        (ModelMeanType::Epsilon, &eps_pred),
        (ModelMeanType::StartX, &x0_pred),
        (ModelMeanType::V, &v_pred),
    ] {
        let d = diffusion(mean, ModelVarType::FixedSmall, Some(gamma));
        let terms = d
            .training_losses(|_, _| Ok(out.clone()), &x0, &t, &noise)
            .unwrap();
        let got: Vec<f64> = terms.loss.to_vec1().unwrap();
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() < 1e-9 * w.max(1.0),
                "{mean:?} t={}: {g} vs {w}",
                t[k]
            );
        }
        // Unweighted, the eps loss is SNR·|Δx0|², far above the clamp at high SNR.
        let plain = diffusion(mean, ModelVarType::FixedSmall, None)
            .training_losses(|_, _| Ok(out.clone()), &x0, &t, &noise)
            .unwrap();
        let plain: Vec<f64> = plain.loss.to_vec1().unwrap();
        if mean == ModelMeanType::Epsilon {
            assert!((plain[0] - snr[0] * x0_err[0]).abs() < 1e-9 * plain[0]);
            assert!(plain[0] > 10.0 * got[0], "{} vs {}", plain[0], got[0]);
        }
    }
}

#[test]
fn v_training_loss_is_zero_at_the_target_and_gamma_is_checked() {
    let d = diffusion(ModelMeanType::V, ModelVarType::FixedSmall, Some(5.0));
    let x0 = randn_f64((2, 1, 4, 4), 8).clamp(-1.0, 1.0).unwrap();
    let noise = randn_f64((2, 1, 4, 4), 9);
    let t = [10, 90];
    let v = d.predict_v(&x0, &t, &noise).unwrap();
    let zero = d
        .training_losses(|_, _| Ok(v.clone()), &x0, &t, &noise)
        .unwrap();
    let z: f64 = zero
        .loss
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(z < 1e-20, "{z}");
    // Predicting eps instead of v is penalised.
    let wrong = d
        .training_losses(|_, _| Ok(noise.clone()), &x0, &t, &noise)
        .unwrap();
    let got: Vec<f64> = wrong.loss.to_vec1().unwrap();
    for (k, &i) in t.iter().enumerate() {
        let err: f64 = (noise.get(k).unwrap() - v.get(k).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let want = d.snr_weight(i, 5.0) * err;
        assert!(
            want > 0.0 && (got[k] - want).abs() < 1e-12,
            "{} vs {want}",
            got[k]
        );
    }
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = diffusion(ModelMeanType::V, ModelVarType::FixedSmall, None)
            .with_snr_gamma(Some(bad))
            .unwrap_err()
            .to_string();
        assert!(e.contains("snr gamma") && e.contains("positive"), "{e}");
    }
}
