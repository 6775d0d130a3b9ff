//! One check per case kind, each through the project's public API.

use super::{Case, Tol};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use ddpm_schedule::{space_timesteps, BetaSchedule, DiffusionConfig, GaussianDiffusion, Schedule};

/// Runs the check for `kind`, or `None` when the kind is unknown.
pub fn check(kind: &str, case: &Case) -> Option<Result<()>> {
    Some(match kind {
        "beta_schedule" => beta_schedule(case),
        "space_timesteps" => space_timesteps_case(case),
        "respaced_schedule" => respaced_schedule(case),
        "normal_kl" => elementwise(
            case,
            &["mean1", "logvar1", "mean2", "logvar2"],
            "kl",
            Tol::F32,
            |t| Ok(ddpm_math::normal_kl(&t[0], &t[1], &t[2], &t[3])?),
        ),
        "discretized_gaussian_log_likelihood" => elementwise(
            case,
            &["x", "means", "log_scales"],
            "log_probs",
            Tol::F32_LOGLIK,
            |t| {
                Ok(ddpm_math::discretized_gaussian_log_likelihood(
                    &t[0], &t[1], &t[2],
                )?)
            },
        ),
        "approx_standard_normal_cdf" => elementwise(case, &["x"], "cdf", Tol::F32, |t| {
            Ok(ddpm_math::approx_standard_normal_cdf(&t[0])?)
        }),
        "prior_bpd" => prior_bpd(case),
        "p_mean_variance" => p_mean_variance(case),
        "vb_terms_bpd" => vb_terms_bpd(case),
        "training_losses" => training_losses(case),
        "p_sample" | "ddim_sample" => sample_step(case, kind == "ddim_sample"),
        "timestep_embedding" => timestep_embedding(case),
        "unet_forward" => unet_forward(case),
        "loss_second_moment_weights" => loss_second_moment_weights(case),
        _ => return None,
    })
}

/// Each tensor case runs twice: in f64 against tight tolerances and in f32 as models run.
const PRECISIONS: [(DType, &str); 2] = [(DType::F64, "(f64)"), (DType::F32, "(f32)")];

fn tol_for(dtype: DType, f32_tol: Tol) -> Tol {
    if dtype == DType::F64 {
        Tol::F64
    } else {
        f32_tol
    }
}

fn tensor(v: &[f64], shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    anyhow::ensure!(n == v.len(), "{} values for shape {shape:?}", v.len());
    Ok(Tensor::from_slice(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
}

fn beta_schedule(case: &Case) -> Result<()> {
    let schedule: BetaSchedule = case.str("beta_schedule")?.parse()?;
    let s = Schedule::named(schedule, case.usize("num_timesteps")?)?;
    let t = case.usizes("t")?;
    let fields: Vec<String> = case.expected_keys();
    for name in fields {
        let table = s
            .table(&name)
            .with_context(|| format!("no table named {name:?}"))?;
        let got = t
            .iter()
            .map(|&i| {
                table
                    .get(i)
                    .copied()
                    .with_context(|| format!("t = {i} is outside the schedule"))
            })
            .collect::<Result<Vec<_>>>()?;
        case.compare(&name, "", &got, Tol::SCHEDULE)?;
    }
    Ok(())
}

fn space_timesteps_case(case: &Case) -> Result<()> {
    let steps = space_timesteps(case.usize("num_timesteps")?, case.str("respacing")?)?;
    case.compare_exact("steps", &steps)
}

fn respaced_schedule(case: &Case) -> Result<()> {
    let schedule: BetaSchedule = case.str("beta_schedule")?.parse()?;
    let s = Schedule::named(schedule, case.usize("num_timesteps")?)?;
    let sp = s.respace_spec(case.str("respacing")?)?;
    case.compare_exact("timestep_map", &sp.timestep_map)?;
    for name in case
        .expected_keys()
        .into_iter()
        .filter(|k| k != "timestep_map")
    {
        let table = sp
            .schedule
            .table(&name)
            .with_context(|| format!("no table named {name:?}"))?;
        case.compare(&name, "", table, Tol::SCHEDULE)?;
    }
    Ok(())
}

fn elementwise(
    case: &Case,
    inputs: &[&str],
    output: &str,
    f32_tol: Tol,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    let raw: Vec<Vec<f64>> = inputs.iter().map(|k| case.f64s(k)).collect::<Result<_>>()?;
    for (dtype, label) in PRECISIONS {
        let ts: Vec<Tensor> = raw
            .iter()
            .map(|v| tensor(v, &[v.len()], dtype))
            .collect::<Result<_>>()?;
        let out = f(&ts)?;
        anyhow::ensure!(
            out.dtype() == dtype,
            "{output} came back as {:?}",
            out.dtype()
        );
        case.compare(output, label, &values(&out)?, tol_for(dtype, f32_tol))?;
    }
    Ok(())
}

/// The diffusion process a case describes.
fn diffusion(case: &Case) -> Result<GaussianDiffusion> {
    let mut cfg = DiffusionConfig {
        beta_schedule: case.str("beta_schedule")?.parse()?,
        num_timesteps: case.usize("num_timesteps")?,
        respacing: case.str_opt("respacing")?.unwrap_or("").to_string(),
        ..DiffusionConfig::default()
    };
    if case.has("model_mean_type") {
        cfg.model_mean_type = case.str("model_mean_type")?.parse()?;
    }
    if case.has("model_var_type") {
        cfg.model_var_type = case.str("model_var_type")?.parse()?;
    }
    if case.has("loss_type") {
        cfg.loss_type = case.str("loss_type")?.parse()?;
    }
    Ok(GaussianDiffusion::new(&cfg)?)
}

/// The image shape and the model output's shape (2·C channels for learned variances).
fn shapes(case: &Case, d: &GaussianDiffusion) -> Result<(Vec<usize>, Vec<usize>)> {
    let shape = case.usizes("shape")?;
    anyhow::ensure!(shape.len() >= 2, "shape {shape:?} has no channel dimension");
    let mut out_shape = shape.clone();
    if d.model_var_type.is_learned() {
        out_shape[1] *= 2;
    }
    Ok((shape, out_shape))
}

fn check_model_timesteps(case: &Case, d: &GaussianDiffusion, t: &[usize]) -> Result<()> {
    case.compare(
        "model_timestep_input",
        "",
        &d.model_timesteps(t),
        Tol::SCHEDULE,
    )
}

fn prior_bpd(case: &Case) -> Result<()> {
    let d = diffusion(case)?;
    let shape = case.usizes("shape")?;
    let x = case.f64s("x_start")?;
    for (dtype, label) in PRECISIONS {
        let out = d.prior_bpd(&tensor(&x, &shape, dtype)?)?;
        case.compare("prior_bpd", label, &values(&out)?, tol_for(dtype, Tol::F32))?;
    }
    Ok(())
}

fn p_mean_variance(case: &Case) -> Result<()> {
    let d = diffusion(case)?;
    let (shape, out_shape) = shapes(case, &d)?;
    let t = case.usizes("t")?;
    let (x_t, mo) = (case.f64s("x_t")?, case.f64s("model_output")?);
    let clip = case.bool("clip_denoised")?;
    for (dtype, label) in PRECISIONS {
        let out = d.p_mean_variance(
            &tensor(&mo, &out_shape, dtype)?,
            &tensor(&x_t, &shape, dtype)?,
            &t,
            clip,
        )?;
        let tol = tol_for(dtype, Tol::F32);
        case.compare("mean", label, &values(&out.mean)?, tol)?;
        case.compare("variance", label, &values(&out.variance)?, tol)?;
        case.compare("log_variance", label, &values(&out.log_variance)?, tol)?;
        case.compare("pred_xstart", label, &values(&out.pred_xstart)?, tol)?;
    }
    check_model_timesteps(case, &d, &t)
}

fn vb_terms_bpd(case: &Case) -> Result<()> {
    let d = diffusion(case)?;
    let (shape, out_shape) = shapes(case, &d)?;
    let t = case.usizes("t")?;
    let (x_start, x_t, mo) = (
        case.f64s("x_start")?,
        case.f64s("x_t")?,
        case.f64s("model_output")?,
    );
    let clip = case.bool("clip_denoised")?;
    for (dtype, label) in PRECISIONS {
        let (out, _) = d.vb_terms_bpd(
            &tensor(&mo, &out_shape, dtype)?,
            &tensor(&x_start, &shape, dtype)?,
            &tensor(&x_t, &shape, dtype)?,
            &t,
            clip,
        )?;
        case.compare(
            "output",
            label,
            &values(&out)?,
            tol_for(dtype, Tol::F32_LOGLIK),
        )?;
    }
    check_model_timesteps(case, &d, &t)
}

fn training_losses(case: &Case) -> Result<()> {
    let d = diffusion(case)?;
    let (shape, out_shape) = shapes(case, &d)?;
    let t = case.usizes("t")?;
    let (x_start, noise, x_t, mo) = (
        case.f64s("x_start")?,
        case.f64s("noise")?,
        case.f64s("x_t")?,
        case.f64s("model_output")?,
    );
    let want_ts = case.expected_f64s("model_timestep_input")?;
    for (dtype, label) in PRECISIONS {
        let tol = tol_for(dtype, Tol::F32);
        let model_output = tensor(&mo, &out_shape, dtype)?;
        let terms = d.training_losses(
            |xt, ts| {
                // The model must see the recorded x_t and the scaled original timesteps.
                let got = xt.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                case.compare_values(&format!("x_t{label}"), &x_t, &got, tol);
                let ts = ts.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                case.compare_values(&format!("model_timestep_input{label}"), &want_ts, &ts, tol);
                Ok(model_output.clone())
            },
            &tensor(&x_start, &shape, dtype)?,
            &t,
            &tensor(&noise, &shape, dtype)?,
        )?;
        let vb_tol = tol_for(dtype, Tol::F32_LOGLIK);
        let loss_tol = if d.model_var_type.is_learned() || d.loss_type.is_vb() {
            vb_tol
        } else {
            tol
        };
        case.compare("loss", label, &values(&terms.loss)?, loss_tol)?;
        compare_optional(case, "mse", label, terms.mse.as_ref(), tol)?;
        compare_optional(case, "vb", label, terms.vb.as_ref(), vb_tol)?;
    }
    Ok(())
}

/// A term the original returns must be returned, and one it omits must be omitted.
fn compare_optional(
    case: &Case,
    key: &str,
    label: &str,
    got: Option<&Tensor>,
    tol: Tol,
) -> Result<()> {
    match (case.expects(key), got) {
        (true, Some(t)) => case.compare(key, label, &values(t)?, tol),
        (true, None) => anyhow::bail!("the original returns {key:?} but we do not"),
        (false, Some(_)) => anyhow::bail!("we return {key:?} but the original does not"),
        (false, None) => Ok(()),
    }
}

fn sample_step(case: &Case, ddim: bool) -> Result<()> {
    let d = diffusion(case)?;
    let (shape, out_shape) = shapes(case, &d)?;
    let t = case.usizes("t")?;
    let (x_t, mo, noise) = (
        case.f64s("x_t")?,
        case.f64s("model_output")?,
        case.f64s("noise")?,
    );
    let clip = case.bool("clip_denoised")?;
    let eta = if ddim { case.f64("eta")? } else { 0.0 };
    for (dtype, label) in PRECISIONS {
        let (mo, x, z) = (
            tensor(&mo, &out_shape, dtype)?,
            tensor(&x_t, &shape, dtype)?,
            tensor(&noise, &shape, dtype)?,
        );
        let out = if ddim {
            d.ddim_sample(&mo, &x, &t, &z, clip, eta)?
        } else {
            d.p_sample(&mo, &x, &t, &z, clip)?
        };
        let tol = tol_for(dtype, Tol::F32);
        case.compare("sample", label, &values(&out.sample)?, tol)?;
        case.compare("pred_xstart", label, &values(&out.pred_xstart)?, tol)?;
    }
    check_model_timesteps(case, &d, &t)
}

fn timestep_embedding(case: &Case) -> Result<()> {
    let dim = case.usize("dim")?;
    let ts = case.f64s("timesteps")?;
    for (dtype, label) in PRECISIONS {
        let t = tensor(&ts, &[ts.len()], dtype)?;
        let emb = ddpm_unet::timestep_embedding(&t, dim, dtype)?;
        anyhow::ensure!(
            emb.dims() == [ts.len(), dim],
            "embedding has shape {:?}",
            emb.dims()
        );
        // The original computes embeddings in f32 whatever the model's dtype, and so do we.
        case.compare("embedding", label, &values(&emb)?, Tol::F32)?;
    }
    Ok(())
}

/// Loads the original's weights and inputs from the fixture, runs our UNet, compares outputs.
fn unet_forward(case: &Case) -> Result<()> {
    let cfg: ddpm_unet::UNetConfig = serde_json::from_value(case.value("config")?.clone())
        .context("config does not parse as UNetModel keyword arguments")?;
    let num_parameters = case.usize("num_parameters")?;
    let path = case.path("weights")?;
    // Every dtype: the labels are integers (int64 when PyTorch wrote them).
    let mut tensors = ddpm_unet::read_safetensors_any(&path)?;
    let mut take = |name: &str| tensors.remove(name);
    let x = take("__input_x").context("fixture has no __input_x")?;
    let ts = take("__input_timesteps").context("fixture has no __input_timesteps")?;
    let y = take("__input_y");
    let want = take("__output").context("fixture has no __output")?;
    if let Some(k) = tensors.keys().find(|k| k.starts_with("__")) {
        anyhow::bail!("fixture tensor {k} is not understood");
    }
    let want = values(&want)?;
    for (dtype, label) in PRECISIONS {
        let store = ddpm_unet::ParamStore::new(0, dtype, &Device::Cpu);
        // The kernels `DDPM_ISA` / `DDPM_PLAIN_OPS` choose: CI checks every family.
        let kernels = ddpm_kernels::KernelOptions::default().with_env_overrides()?;
        let model = ddpm_unet::UNet::with_kernels(store.var_builder(), &cfg, kernels)?;
        store.set_tensors(&tensors)?;
        anyhow::ensure!(
            store.num_parameters() == num_parameters,
            "{} parameters, the original has {num_parameters}",
            store.num_parameters()
        );
        let out = model.forward(&x, &ts, y.as_ref(), false)?;
        // The fixture's output was computed by PyTorch in f32; f32 tolerances apply to both runs.
        case.compare_values(&format!("output{label}"), &want, &values(&out)?, Tol::F32);
    }
    case.expected_value("output")?;
    Ok(())
}

fn loss_second_moment_weights(case: &Case) -> Result<()> {
    use ddpm_train::{LossSecondMomentSampler, TimestepSampler};
    let mut s = LossSecondMomentSampler::with_params(
        case.usize("num_timesteps")?,
        case.usize("history_per_term")?,
        case.f64("uniform_prob")?,
    )?;
    let updates = case
        .value("updates")?
        .as_array()
        .context("updates is not an array")?;
    for (i, u) in updates.iter().enumerate() {
        if let Some(k) = u
            .as_object()
            .and_then(|o| o.keys().find(|k| !matches!(k.as_str(), "t" | "losses")))
        {
            anyhow::bail!("update {i} has a field the checker does not understand: {k:?}");
        }
        let field = |k: &str| {
            u.get(k)
                .and_then(|v| v.as_array())
                .with_context(|| format!("update {i} has no {k:?} array"))
        };
        let t: Vec<usize> = field("t")?
            .iter()
            .map(|v| v.as_u64().map(|x| x as usize))
            .collect::<Option<_>>()
            .context("bad t")?;
        let l: Vec<f64> = field("losses")?
            .iter()
            .map(|v| v.as_f64())
            .collect::<Option<_>>()
            .context("bad losses")?;
        anyhow::ensure!(
            t.len() == l.len(),
            "update {i}: {} timesteps for {} losses",
            t.len(),
            l.len()
        );
        if let Some(&bad) = t.iter().find(|&&x| x >= s.weights().len()) {
            anyhow::bail!("update {i}: timestep {bad} is outside the schedule");
        }
        s.update_with_losses(&t, &l);
    }
    case.compare("weights", "", &s.weights(), Tol::F64)
}
