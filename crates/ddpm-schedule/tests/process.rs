//! Behaviour of the diffusion process on a toy problem whose optimal model is known exactly.
//!
//! Data: every pixel is independent N(0, S0²). Then q(x_t) = N(0, v_t) with
//! v_t = alpha_bar_t·S0² + 1 - alpha_bar_t, the optimal eps-predictor is
//! E[eps | x_t] = sqrt(1 - alpha_bar_t)·x_t / v_t, and the true reverse conditional
//! p(x_{t-1} | x_t) is Gaussian with variance v_{t-1} - alpha_t·v_{t-1}²/v_t.

use candle_core::{DType, Device, Tensor, Var};
use ddpm_schedule::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;

mod common;
use common::*;

fn diffusion(
    steps: usize,
    respacing: &str,
    var: ModelVarType,
    loss: LossType,
) -> GaussianDiffusion {
    GaussianDiffusion::new(&DiffusionConfig {
        beta_schedule: BetaSchedule::Linear,
        num_timesteps: steps,
        respacing: respacing.into(),
        model_mean_type: ModelMeanType::Epsilon,
        model_var_type: var,
        loss_type: loss,
        snr_gamma: None,
    })
    .unwrap()
}

/// 8-bit data drawn from N(0, S0²), rescaled to [-1, 1].
fn gaussian_images(n: usize, rng: &mut ChaCha8Rng) -> Tensor {
    let x = randn(rng, (n, 1, 8, 8), DType::F64, &Device::Cpu).unwrap();
    let v: Vec<f64> = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let q: Vec<f64> = v
        .iter()
        .map(|z| ((z * S0 + 1.0) * 127.5).round().clamp(0.0, 255.0) / 127.5 - 1.0)
        .collect();
    Tensor::from_vec(q, (n, 1, 8, 8), &Device::Cpu).unwrap()
}

#[test]
fn bpd_of_the_exact_model_is_near_the_data_entropy() {
    let d = diffusion(1000, "", ModelVarType::Learned, LossType::Kl);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let x = gaussian_images(32, &mut rng);
    let mut noise = RngNoise(ChaCha8Rng::seed_from_u64(1));
    let terms = d
        .calc_bpd_loop(exact_model(&d), &x, false, &mut noise, |_, _| {})
        .unwrap();
    assert_eq!(terms.vb.dims(), &[32, 1000]);
    let bpd: f64 = terms.total_bpd.mean_all().unwrap().to_scalar().unwrap();
    // The true NLL of these pixels: -log2(pdf(x)·2/255) under N(0, S0²) (bins << S0).
    let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let nll = xs
        .iter()
        .map(|x| {
            0.5 * (2.0 * std::f64::consts::PI * S0 * S0).ln() + x * x / (2.0 * S0 * S0)
                - (2.0f64 / 255.0).ln()
        })
        .sum::<f64>()
        / xs.len() as f64
        / std::f64::consts::LN_2;
    // Monte Carlo noise of this estimate is about 0.03 bits here.
    assert!((bpd - nll).abs() < 0.1, "bpd {bpd} vs true nll {nll}");
    let prior: f64 = terms.prior_bpd.mean_all().unwrap().to_scalar().unwrap();
    assert!(prior < 1e-3 && prior > 0.0, "prior {prior}");
    // A model that predicts zero noise is much worse.
    let zero = |x: &Tensor, _: &Tensor| Tensor::cat(&[&x.zeros_like()?, &x.zeros_like()?], 1);
    let bad = d
        .calc_bpd_loop(zero, &x, false, &mut noise, |_, _| {})
        .unwrap();
    let bad: f64 = bad.total_bpd.mean_all().unwrap().to_scalar().unwrap();
    assert!(bad > bpd + 1.0, "{bad} vs {bpd}");
}

#[test]
fn ddim_with_eta_zero_is_deterministic_and_its_reverse_inverts_it() {
    let d = diffusion(1000, "", ModelVarType::FixedSmall, LossType::Mse);
    let x_t = randn(
        &mut ChaCha8Rng::seed_from_u64(2),
        (2, 1, 8, 8),
        DType::F64,
        &Device::Cpu,
    )
    .unwrap();
    let run = |seed: u64| {
        let mut noise = RngNoise(ChaCha8Rng::seed_from_u64(seed));
        d.ddim_sample_loop(exact_model(&d), x_t.clone(), false, 0.0, &mut noise, |_| {})
            .unwrap()
    };
    let (a, b) = (run(3), run(4));
    let diff: f64 = max_abs_diff(&a, &b);
    assert_eq!(diff, 0.0, "eta = 0 must not use the noise");
    // Encode the sample back with reverse steps 0..T-1: we must land on x_T again.
    let mut model = exact_model(&d);
    let mut x = a.clone();
    for i in 0..d.num_timesteps() {
        let t = vec![i; 2];
        let ts = d
            .model_timestep_tensor(&t, DType::F64, &Device::Cpu)
            .unwrap();
        let out = model(&x, &ts).unwrap();
        x = d.ddim_reverse_sample(&out, &x, &t, false).unwrap().sample;
    }
    let err: f64 = max_abs_diff(&x, &x_t);
    let scale: f64 = x_t.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert!(err < 0.02 * scale, "inversion error {err}");
    // With eta = 1 the noise matters.
    let mut n1 = RngNoise(ChaCha8Rng::seed_from_u64(3));
    let c = d
        .ddim_sample_loop(exact_model(&d), x_t.clone(), false, 1.0, &mut n1, |_| {})
        .unwrap();
    let diff: f64 = max_abs_diff(&a, &c);
    assert!(diff > 1e-3);
}

#[test]
fn respaced_sampling_calls_the_model_with_original_timesteps() {
    let d = diffusion(1000, "ddim10", ModelVarType::FixedLarge, LossType::Mse);
    let seen = RefCell::new(Vec::new());
    let model = |x: &Tensor, ts: &Tensor| {
        seen.borrow_mut().push(ts.to_vec1::<f32>()?);
        x.zeros_like()
    };
    let x = Tensor::zeros((3, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let mut steps = Vec::new();
    let mut noise = RngNoise(ChaCha8Rng::seed_from_u64(0));
    d.p_sample_loop(model, x, true, &mut noise, |s| steps.push((s.step, s.t)))
        .unwrap();
    let seen = seen.into_inner();
    assert_eq!(seen.len(), 10);
    for (k, ts) in seen.iter().enumerate() {
        let want = (900 - 100 * k) as f32;
        assert_eq!(ts, &vec![want; 3]);
    }
    assert_eq!(steps.first(), Some(&(1, 9)));
    assert_eq!(steps.last(), Some(&(10, 0)));
}

#[test]
fn same_seed_same_samples_and_different_seed_different_samples() {
    let d = diffusion(50, "", ModelVarType::LearnedRange, LossType::RescaledMse);
    let sample = |seed: u64| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x_t = randn(&mut rng, (2, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let model = |x: &Tensor, _: &Tensor| Tensor::cat(&[&(x * 0.1)?, &x.zeros_like()?], 1);
        d.p_sample_loop(model, x_t, true, &mut RngNoise(rng), |_| {})
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(sample(7), sample(7));
    assert_ne!(sample(7), sample(8));
}

#[test]
fn hybrid_loss_trains_variance_through_vb_and_mean_through_mse() {
    let d = diffusion(100, "", ModelVarType::LearnedRange, LossType::RescaledMse);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let x0 = gaussian_images(2, &mut rng).to_dtype(DType::F32).unwrap();
    let noise = randn(&mut rng, (2, 1, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let out = Var::from_tensor(&randn(&mut rng, (2, 2, 8, 8), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let t = [0usize, 57];
    let terms = d
        .training_losses(|_, _| Ok(out.as_tensor().clone()), &x0, &t, &noise)
        .unwrap();
    let grad_norms = |loss: &Tensor| {
        let g = loss.sum_all().unwrap().backward().unwrap();
        let g = g.get(out.as_tensor()).unwrap().clone();
        let n = |c: usize| -> f32 {
            g.narrow(1, c, 1)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        (n(0), n(1))
    };
    let (mean_g, var_g) = grad_norms(terms.vb.as_ref().unwrap());
    assert_eq!(mean_g, 0.0, "vb must not move the mean channels");
    assert!(var_g > 0.0);
    let (mean_g, var_g) = grad_norms(terms.mse.as_ref().unwrap());
    assert!(mean_g > 0.0);
    assert_eq!(var_g, 0.0, "mse must not move the variance channels");
    // The kl loss trains both.
    let dk = diffusion(100, "", ModelVarType::LearnedRange, LossType::Kl);
    let terms = dk
        .training_losses(|_, _| Ok(out.as_tensor().clone()), &x0, &t, &noise)
        .unwrap();
    // As in the original, the bound is the whole loss: no separate mse or vb term.
    assert!(terms.mse.is_none() && terms.vb.is_none());
    let (mean_g, var_g) = grad_norms(&terms.loss);
    assert!(mean_g > 0.0 && var_g > 0.0);
}

#[test]
fn bad_shapes_and_timesteps_are_errors() {
    let d = diffusion(100, "", ModelVarType::LearnedRange, LossType::RescaledMse);
    let x = Tensor::zeros((2, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let e = d
        .p_mean_variance(&x, &x, &[0, 1], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs 2 channels"), "{e}");
    let out = Tensor::zeros((2, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        d.p_mean_variance(&out, &x, &[0], true),
        Err(ScheduleError::Shape { .. })
    ));
    assert!(matches!(
        d.p_mean_variance(&out, &x, &[0, 100], true),
        Err(ScheduleError::TimestepOutOfRange { timestep: 100, .. })
    ));
    assert!(d.q_sample(&x, &[0, 1], &out).is_err());
    assert!("gaussian"
        .parse::<ModelVarType>()
        .unwrap_err()
        .to_string()
        .contains("learned_range"));
}
