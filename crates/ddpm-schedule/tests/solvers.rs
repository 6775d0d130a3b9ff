//! The multistep ODE solvers (DPM-Solver++(2M), UniPC) against DDIM on a toy problem whose
//! probability-flow ODE is solved exactly.
//!
//! Data: every pixel is independent N(0, S0²). Then q(x_t) = N(0, v_t) with
//! v_t = alpha_bar_t·S0² + 1 - alpha_bar_t, the optimal x_0 prediction is
//! E[x_0 | x_t] = sqrt(alpha_bar_t)·S0²·x_t / v_t, and the ODE keeps x_t / sqrt(v_t) constant: from
//! x_T with std sqrt(v_T) it lands on samples with std exactly S0. Every solver is then a scalar
//! gain on x_T, so the std error measures the discretisation error alone, free of Monte Carlo
//! noise.

use candle_core::{DType, Device, Tensor};
use ddpm_schedule::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;

mod common;
use common::*;

const SOLVERS: [SamplingMethod; 3] = [
    SamplingMethod::Ddim { eta: 0.0 },
    SamplingMethod::DpmSolverPp2m,
    SamplingMethod::UniPc,
];

fn values(x: &Tensor) -> Vec<f64> {
    x.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn diffusion(respacing: &str, mean: ModelMeanType, var: ModelVarType) -> GaussianDiffusion {
    GaussianDiffusion::new(&DiffusionConfig {
        beta_schedule: BetaSchedule::Linear,
        num_timesteps: 1000,
        respacing: respacing.into(),
        model_mean_type: mean,
        model_var_type: var,
        loss_type: LossType::Mse,
        ..Default::default()
    })
    .unwrap()
}

fn eps_diffusion(respacing: &str) -> GaussianDiffusion {
    diffusion(respacing, ModelMeanType::Epsilon, ModelVarType::FixedSmall)
}

/// 4096 pixels of x_T from `seed`, scaled to std exactly sqrt(v_T), so that the exact ODE
/// solution has std exactly S0.
fn x_t(d: &GaussianDiffusion, seed: u64) -> Tensor {
    let z = randn(
        &mut ChaCha8Rng::seed_from_u64(seed),
        (4, 1, 32, 32),
        DType::F64,
        &Device::Cpu,
    )
    .unwrap();
    let v_t = v(*d.schedule().alphas_cumprod.last().unwrap());
    (z.clone() * (v_t.sqrt() / std(&z))).unwrap()
}

fn std(x: &Tensor) -> f64 {
    let v = values(x);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

fn sample(d: &GaussianDiffusion, sampler: SamplingMethod, x_t: &Tensor, clip: bool) -> Tensor {
    // The ODE solvers draw no noise: an empty FixedNoise would fail if they did.
    let mut noise = FixedNoise::default();
    let mut noise_for_ddim = RngNoise(ChaCha8Rng::seed_from_u64(99));
    let noise: &mut dyn NoiseSource = match sampler {
        SamplingMethod::DpmSolverPp2m | SamplingMethod::UniPc => &mut noise,
        _ => &mut noise_for_ddim,
    };
    d.sample_loop(exact_model(d), x_t.clone(), sampler, clip, noise, |_| {})
        .unwrap()
}

/// |std of the samples - S0| for each respacing.
fn std_errors(sampler: SamplingMethod, respacings: &[&str]) -> Vec<f64> {
    respacings
        .iter()
        .map(|r| {
            let d = eps_diffusion(r);
            (std(&sample(&d, sampler, &x_t(&d, 0), false)) - S0).abs()
        })
        .collect()
}

#[test]
fn sample_std_converges_to_the_data_std_as_steps_grow() {
    let steps = ["5", "10", "20", "50", "100", "200"];
    // Measured |std - S0| (S0 = 0.25), at 5 / 10 / 20 / 50 / 100 / 200 steps:
    //   DDIM             1.79e-1 1.12e-1 6.01e-2 2.49e-2 1.27e-2 6.51e-3
    //   DPM-Solver++(2M) 1.01e-1 3.45e-2 7.22e-2 3.19e-2 9.86e-3 2.45e-3
    //   UniPC            1.00e-1 3.66e-2 7.45e-2 3.10e-2 8.46e-3 1.73e-3
    // The second-order errors change sign between 5 and 10 steps (undershoot to overshoot) and
    // only shrink steadily from 20 steps on: uniform-in-t nodes leave a last interval into t = 0
    // of h ≈ 2.9 (20 steps) that their extrapolation overshoots.
    let monotone_from = [0, 2, 2];
    let bound_at_50 = [3e-2, 4e-2, 4e-2];
    let bound_at_200 = [8e-3, 3e-3, 2.2e-3];
    for (k, sampler) in SOLVERS.into_iter().enumerate() {
        let err = std_errors(sampler, &steps);
        let what = format!("{}: {err:?}", sampler.name());
        for w in err[monotone_from[k]..].windows(2) {
            // DDIM's first halving (5 to 10 steps) gives 0.63, its later ones about 0.5.
            assert!(w[1] < 0.7 * w[0], "{what}");
        }
        assert!(err[3] < bound_at_50[k], "{what}");
        assert!(err[5] < bound_at_200[k], "{what}");
    }
    // 1000 DDIM steps, the full process.
    let full = std_errors(SamplingMethod::Ddim { eta: 0.0 }, &[""])[0];
    assert!(full < 2e-3, "{full}");
}

#[test]
fn second_order_solvers_beat_ddim_at_ten_steps_and_converge_at_second_order() {
    let [ddim, dpm, unipc] = SOLVERS.map(|s| std_errors(s, &["10", "100", "200", "400"]));
    // Measured at 10 steps: DDIM 1.12e-1, DPM-Solver++(2M) 3.45e-2, UniPC 3.66e-2.
    assert!(dpm[0] < ddim[0] / 2.5, "{dpm:?} vs {ddim:?}");
    assert!(unipc[0] < ddim[0] / 2.5, "{unipc:?} vs {ddim:?}");
    // Observed orders log2(err(n) / err(2n)), n = 100 and 200: DDIM 0.97, 0.89; DPM-Solver++(2M)
    // 2.01, 2.34; UniPC 2.29, 3.09 (UniC lifts UniP-2 towards order 3).
    let order = |e: &[f64], j: usize| (e[j] / e[j + 1]).log2();
    for j in [1, 2] {
        assert!((0.8..1.2).contains(&order(&ddim, j)), "ddim {ddim:?}");
        assert!(order(&dpm, j) > 1.8, "dpm++2m {dpm:?}");
        assert!(order(&unipc, j) > 1.8, "unipc {unipc:?}");
    }
    // At 400 steps the second-order errors are far below DDIM's (measured 7.3x and 17x lower).
    assert!(
        dpm[3] < ddim[3] / 5.0 && unipc[3] < ddim[3] / 10.0,
        "{ddim:?} {dpm:?} {unipc:?}"
    );
}

/// One pixel's path under a solver, written from the published update rules (in the form of
/// diffusers' schedulers, with sigma = 0 and lambda = inf at the clean point), in f64.
fn reference(d: &GaussianDiffusion, sampler: SamplingMethod, x_big_t: f64, clip: bool) -> f64 {
    let s = d.schedule();
    let n = d.num_timesteps();
    // Node k is respaced index n-1-k; node n is the clean point.
    let ab: Vec<f64> = (0..=n)
        .map(|k| {
            if k == n {
                1.0
            } else {
                s.alphas_cumprod[n - 1 - k]
            }
        })
        .collect();
    let alpha: Vec<f64> = ab.iter().map(|a| a.sqrt()).collect();
    let sigma: Vec<f64> = ab.iter().map(|a| (1.0 - a).sqrt()).collect();
    let lambda: Vec<f64> = (0..=n).map(|k| alpha[k].ln() - sigma[k].ln()).collect();
    let predict = |k: usize, x: f64| {
        let x0 = alpha[k] * S0 * S0 / v(ab[k]) * x;
        if clip {
            x0.clamp(-1.0, 1.0)
        } else {
            x0
        }
    };
    let mut x = x_big_t;
    let mut m: Vec<f64> = Vec::new();
    // UniPC: the sample the last predictor started from, and its order.
    let mut last: Option<(f64, usize)> = None;
    for k in 0..n {
        let m_k = predict(k, x);
        match sampler {
            SamplingMethod::Ddim { .. } => {
                let eps = (x - alpha[k] * m_k) / sigma[k];
                x = alpha[k + 1] * m_k + sigma[k + 1] * eps;
            }
            SamplingMethod::DpmSolverPp2m => {
                m.push(m_k);
                let h = lambda[k + 1] - lambda[k];
                let first = k == 0 || k == n - 1;
                x = sigma[k + 1] / sigma[k] * x - alpha[k + 1] * ((-h).exp() - 1.0) * m_k;
                if !first {
                    let r0 = (lambda[k] - lambda[k - 1]) / h;
                    let d1 = (m_k - m[k - 1]) / r0;
                    x -= 0.5 * alpha[k + 1] * ((-h).exp() - 1.0) * d1;
                }
            }
            SamplingMethod::UniPc => {
                if let Some((x_prev, order)) = last {
                    x = unic(&alpha, &sigma, &lambda, &m, k, x_prev, m_k, order);
                }
                m.push(m_k);
                let order = if k == 0 || k == n - 1 { 1 } else { 2 };
                last = Some((x, order));
                x = unip(&alpha, &sigma, &lambda, &m, k, x, order);
            }
            SamplingMethod::Ddpm => unreachable!(),
        }
    }
    x
}

/// bh2 right-hand sides b_1..b_order and h·phi_1 for hh = -h (data prediction).
fn bh2_rhs(h: f64, order: usize) -> (Vec<f64>, f64, f64) {
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = hh.exp_m1();
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial = 1.0;
    let mut b = Vec::new();
    for i in 1..=order {
        b.push(h_phi_k * factorial / b_h);
        factorial *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    (b, h_phi_1, b_h)
}

/// UniP from node k (sample x, predictions m up to m[k]) to node k+1.
fn unip(
    alpha: &[f64],
    sigma: &[f64],
    lambda: &[f64],
    m: &[f64],
    k: usize,
    x: f64,
    order: usize,
) -> f64 {
    let h = lambda[k + 1] - lambda[k];
    let (_, h_phi_1, b_h) = bh2_rhs(h, order);
    let mut out = sigma[k + 1] / sigma[k] * x - alpha[k + 1] * h_phi_1 * m[k];
    if order == 2 {
        let rk = (lambda[k - 1] - lambda[k]) / h;
        let d1 = (m[k - 1] - m[k]) / rk;
        out -= alpha[k + 1] * b_h * 0.5 * d1;
    }
    out
}

/// UniC of the step node k-1 -> k, from x_prev at k-1, with m_t evaluated at node k.
#[allow(clippy::too_many_arguments)]
fn unic(
    alpha: &[f64],
    sigma: &[f64],
    lambda: &[f64],
    m: &[f64],
    k: usize,
    x_prev: f64,
    m_t: f64,
    order: usize,
) -> f64 {
    let s0 = k - 1;
    let h = lambda[k] - lambda[s0];
    let (b, h_phi_1, b_h) = bh2_rhs(h, order);
    let base = sigma[k] / sigma[s0] * x_prev - alpha[k] * h_phi_1 * m[s0];
    let d1_t = m_t - m[s0];
    let corr = if order == 1 {
        0.5 * d1_t
    } else {
        let rk = (lambda[s0 - 1] - lambda[s0]) / h;
        let d1 = (m[s0 - 1] - m[s0]) / rk;
        // R = [[1, 1], [rk, 1]], solved by Cramer's rule.
        let det = 1.0 - rk;
        let rho = [(b[0] - b[1]) / det, (b[1] - rk * b[0]) / det];
        rho[0] * d1 + rho[1] * d1_t
    };
    base - alpha[k] * b_h * corr
}

#[test]
fn solvers_match_the_scalar_recursion_of_their_update_rules() {
    for respacing in ["1", "2", "3", "10", "ddim25"] {
        for mean in [
            ModelMeanType::Epsilon,
            ModelMeanType::StartX,
            ModelMeanType::V,
        ] {
            let d = diffusion(respacing, mean, ModelVarType::FixedSmall);
            let x = x_t(&d, 1);
            for clip in [false, true] {
                // Scaled so that clipping bites: predictions reach well past 1.
                let x = if clip { (&x * 6.0).unwrap() } else { x.clone() };
                for sampler in SOLVERS {
                    let got = values(&sample(&d, sampler, &x, clip));
                    let err = values(&x)
                        .iter()
                        .zip(&got)
                        .map(|(&x, &g)| (reference(&d, sampler, x, clip) - g).abs())
                        .fold(0.0, f64::max);
                    let what = format!("{} {respacing} {mean:?} clip {clip}", sampler.name());
                    assert!(err < 1e-12, "{what}: {err:e}");
                    if clip {
                        assert!(got.iter().all(|g| g.abs() <= 1.0), "{what}");
                        if d.num_timesteps() >= 10 {
                            assert!(got.iter().any(|g| g.abs() == 1.0), "{what}: no clipping");
                        }
                    }
                }
            }
        }
    }
    // The two second-order solvers really differ from each other and from DDIM.
    let d = eps_diffusion("10");
    let x = x_t(&d, 1);
    let [a, b, c] = SOLVERS.map(|s| sample(&d, s, &x, false));
    assert!(max_abs_diff(&a, &b) > 1e-3 && max_abs_diff(&b, &c) > 1e-4);
}

#[test]
fn solvers_call_the_model_once_per_step_with_original_timesteps_descending() {
    for sampler in [SamplingMethod::DpmSolverPp2m, SamplingMethod::UniPc] {
        let fixed = diffusion("ddim10", ModelMeanType::Epsilon, ModelVarType::FixedLarge);
        let x = x_t(&fixed, 2).to_dtype(DType::F32).unwrap();
        let seen = RefCell::new(Vec::new());
        let mut inner = exact_model(&fixed);
        let model = |x: &Tensor, ts: &Tensor| {
            seen.borrow_mut().push(ts.to_vec1::<f32>()?);
            inner(x, ts)
        };
        let mut steps = Vec::new();
        let mut last_pred = None;
        let out = fixed
            .sample_loop(
                model,
                x.clone(),
                sampler,
                true,
                &mut FixedNoise::default(),
                |s| {
                    steps.push((s.step, s.total, s.t));
                    let p: f32 = s
                        .pred_xstart
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar()
                        .unwrap();
                    assert!(p <= 1.0, "clip_denoised clamps every prediction");
                    last_pred = Some(s.pred_xstart.clone());
                },
            )
            .unwrap();
        let seen = seen.into_inner();
        assert_eq!(seen.len(), 10);
        for (k, ts) in seen.iter().enumerate() {
            assert_eq!(ts, &vec![(900 - 100 * k) as f32; 4], "{}", sampler.name());
        }
        let want: Vec<_> = (0..10).map(|k| (k + 1, 10, 9 - k)).collect();
        assert_eq!(steps, want);
        // The last step lands on the x_0 prediction at index 0 itself.
        assert_eq!(max_abs_diff(&out, &last_pred.unwrap()), 0.0);
        // Learned-variance channels do not enter the ODE.
        for var in [ModelVarType::Learned, ModelVarType::LearnedRange] {
            let learned = diffusion("ddim10", ModelMeanType::Epsilon, var);
            let with_var = sample(&learned, sampler, &x, true);
            assert_eq!(max_abs_diff(&with_var, &out), 0.0, "{var:?}");
        }
    }
}

#[test]
fn same_seed_same_samples_and_different_seed_different_samples() {
    let d = diffusion("20", ModelMeanType::Epsilon, ModelVarType::LearnedRange);
    let run = |sampler: SamplingMethod, seed: u64| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x = randn(&mut rng, (2, 1, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let mut noise = RngNoise(rng);
        let out = d
            .sample_loop(exact_model(&d), x, sampler, true, &mut noise, |_| {})
            .unwrap();
        out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    for sampler in [SamplingMethod::DpmSolverPp2m, SamplingMethod::UniPc] {
        let a = run(sampler, 7);
        assert_eq!(a, run(sampler, 7), "{}", sampler.name());
        assert_ne!(a, run(sampler, 8), "{}", sampler.name());
        // Pinned: the first samples of seed 7 (the gain on x_T is about S0 here).
        let pinned: &[f32] = match sampler {
            SamplingMethod::DpmSolverPp2m => &PINNED_DPM,
            _ => &PINNED_UNIPC,
        };
        for (g, w) in a.iter().zip(pinned) {
            assert!((g - w).abs() < 1e-6, "{}: {:?}", sampler.name(), &a[..4]);
        }
    }
}

const PINNED_DPM: [f32; 4] = [-0.2498079, -0.44570836, 0.28664625, 0.115912996];
const PINNED_UNIPC: [f32; 4] = [-0.25164255, -0.4489815, 0.28875118, 0.11676419];

#[test]
fn sampler_names_parse_and_bad_names_are_errors() {
    for (name, want) in [
        ("ddpm", SamplingMethod::Ddpm),
        ("ddim", SamplingMethod::Ddim { eta: 0.0 }),
        ("dpm++2m", SamplingMethod::DpmSolverPp2m),
        ("unipc", SamplingMethod::UniPc),
    ] {
        let got: SamplingMethod = name.parse().unwrap();
        assert_eq!(got, want);
        assert_eq!(got.name(), name);
    }
    assert_eq!(SamplingMethod::Ddim { eta: 1.0 }.name(), "ddim");
    match "dpm++3m".parse::<SamplingMethod>() {
        Err(ScheduleError::UnknownSetting {
            what,
            value,
            expected,
        }) => {
            assert_eq!((what, value.as_str()), ("solver", "dpm++3m"));
            assert_eq!(expected, "ddpm, ddim, dpm++2m, unipc");
        }
        other => panic!("{other:?}"),
    }
    let e = "UniPC".parse::<SamplingMethod>().unwrap_err().to_string();
    assert!(
        e.contains("unknown solver \"UniPC\"") && e.contains("dpm++2m"),
        "{e}"
    );
}

#[test]
fn on_the_log_snr_grid_the_solvers_beat_ddim_at_every_step_count() {
    // Measured |std - S0| at 10 / 20 / 50 steps of the log-SNR grid:
    //   DDIM             4.50e-2 2.25e-2 9.09e-3   (uniform grid: 1.12e-1 6.01e-2 2.49e-2)
    //   DPM-Solver++(2M) 6.02e-3 1.69e-3 4.83e-5   (uniform grid: 3.45e-2 7.22e-2 3.19e-2)
    //   UniPC            7.42e-3 8.11e-4 1.15e-4
    let grids = ["logsnr10", "logsnr20", "logsnr50"];
    let [ddim, dpm, unipc] = SOLVERS.map(|s| std_errors(s, &grids));
    let uniform_ddim = std_errors(SamplingMethod::Ddim { eta: 0.0 }, &["10", "20", "50"]);
    let uniform_dpm = std_errors(SamplingMethod::DpmSolverPp2m, &["10", "20", "50"]);
    let what = format!("ddim {ddim:?} dpm {dpm:?} unipc {unipc:?} uniform {uniform_dpm:?}");
    for i in 0..3 {
        assert!(dpm[i] < ddim[i] / 5.0 && unipc[i] < ddim[i] / 5.0, "{what}");
        assert!(dpm[i] < uniform_dpm[i] / 5.0, "{what}");
        assert!(ddim[i] < uniform_ddim[i], "{what}");
        if i > 0 {
            assert!(
                dpm[i] < dpm[i - 1] / 2.0 && unipc[i] < unipc[i - 1] / 2.0,
                "{what}"
            );
        }
    }
}
