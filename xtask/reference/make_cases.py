"""Computes reference cases with the original improved-diffusion code and adds them to cases.json.

Usage (a Python with torch, numpy and safetensors; REF_SRC an improved-diffusion checkout):

    REF_SRC=/path/to/improved-diffusion python xtask/reference/make_cases.py

The cases recorded first (ids without the "gen-" prefix) are kept as they are; every "gen-" case
is recomputed, so running the script twice gives the same file. The original is imported and run
as it is, with one change: its `_extract_into_tensor` casts the schedule's float64 tables to
float32, which is replaced by a version that keeps float64, so that the cases are float64 like the
first ones (the documented format). Everything else (the diffusion process, the losses, the UNet)
is the original's own code; this script only draws inputs and records what the original returns.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch as th
from safetensors.torch import save_file

sys.path.insert(0, os.environ["REF_SRC"])
from improved_diffusion import gaussian_diffusion as gd  # noqa: E402
from improved_diffusion.respace import SpacedDiffusion, space_timesteps  # noqa: E402
from improved_diffusion.unet import UNetModel  # noqa: E402

HERE = Path(__file__).resolve().parent
CASES = HERE / "cases.json"


def extract_f64(arr, timesteps, broadcast_shape):
    res = th.from_numpy(arr).to(device=timesteps.device)[timesteps]
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


gd._extract_into_tensor = extract_f64

MEAN_TYPES = {"eps": gd.ModelMeanType.EPSILON, "x0": gd.ModelMeanType.START_X}
VAR_TYPES = {
    "fixed_small": gd.ModelVarType.FIXED_SMALL,
    "fixed_large": gd.ModelVarType.FIXED_LARGE,
    "learned": gd.ModelVarType.LEARNED,
    "learned_range": gd.ModelVarType.LEARNED_RANGE,
}
LOSS_TYPES = {
    "mse": gd.LossType.MSE,
    "rescaled_mse": gd.LossType.RESCALED_MSE,
    "kl": gd.LossType.KL,
    "rescaled_kl": gd.LossType.RESCALED_KL,
}


def flat(t):
    return [float(v) for v in t.detach().double().reshape(-1).tolist()]


class Recorder:
    """A stand-in model: returns a fixed output and records what it was called with."""

    def __init__(self, output):
        self.output = output
        self.calls = []

    def __call__(self, x, ts, **kwargs):
        self.calls.append((x.detach().clone(), ts.detach().clone()))
        return self.output


def diffusion(settings):
    steps = settings["num_timesteps"]
    betas = gd.get_named_beta_schedule(settings["beta_schedule"], steps)
    respacing = settings.get("respacing") or str(steps)
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, respacing),
        betas=betas,
        model_mean_type=MEAN_TYPES[settings["model_mean_type"]],
        model_var_type=VAR_TYPES[settings["model_var_type"]],
        loss_type=LOSS_TYPES[settings.get("loss_type", "mse")],
        rescale_timesteps=True,
    )


def draw(rng, settings, shape, t):
    """Inputs for one case: x_start (on the pixel grid), noise, x_t noise and a model output."""
    d = diffusion(settings)
    b, c = shape[:2]
    learned = settings["model_var_type"] in ("learned", "learned_range")
    out_shape = [b, 2 * c, *shape[2:]] if learned else list(shape)
    x_start = th.from_numpy(rng.integers(0, 256, size=shape) / 127.5 - 1.0)
    noise = th.from_numpy(rng.standard_normal(shape))
    model_output = th.from_numpy(rng.standard_normal(out_shape))
    if settings["model_var_type"] == "learned_range":
        model_output[:, c:] = th.from_numpy(rng.uniform(-1, 1, size=[b, c, *shape[2:]]))
    elif settings["model_var_type"] == "learned":
        # Log variances near the schedule's own (a standard normal would be far outside it).
        lv = np.log(d.betas[t]).reshape(b, 1, *([1] * (len(shape) - 2)))
        model_output[:, c:] = th.from_numpy(lv + 0.3 * rng.standard_normal([b, c, *shape[2:]]))
    x_t = th.from_numpy(rng.standard_normal(shape))
    return d, x_start, noise, model_output, x_t


def case_settings(settings):
    return {k: v for k, v in settings.items()}


def training_losses_case(rng, settings, t, shape):
    d, x_start, noise, mo, _ = draw(rng, settings, shape, t)
    rec = Recorder(mo)
    terms = d.training_losses(rec, x_start, th.tensor(t), noise=noise)
    x_t, ts = rec.calls[0]
    expected = {k: flat(v) for k, v in terms.items()}
    expected["model_timestep_input"] = flat(ts)
    return {
        "kind": "training_losses",
        **case_settings(settings),
        "t": t,
        "shape": shape,
        "model_output": flat(mo),
        "x_start": flat(x_start),
        "noise": flat(noise),
        "x_t": flat(x_t),
        "expected": expected,
    }


def p_mean_variance_case(rng, settings, t, shape, clip):
    d, _, _, mo, x_t = draw(rng, settings, shape, t)
    rec = Recorder(mo)
    out = d.p_mean_variance(rec, x_t, th.tensor(t), clip_denoised=clip)
    expected = {k: flat(out[k]) for k in ("mean", "variance", "log_variance", "pred_xstart")}
    expected["model_timestep_input"] = flat(rec.calls[0][1])
    return {
        "kind": "p_mean_variance",
        **case_settings(settings),
        "t": t,
        "clip_denoised": clip,
        "shape": shape,
        "model_output": flat(mo),
        "x_t": flat(x_t),
        "expected": expected,
    }


def vb_terms_case(rng, settings, t, shape, clip):
    d, x_start, _, mo, x_t = draw(rng, settings, shape, t)
    rec = Recorder(mo)
    out = d._vb_terms_bpd(rec, x_start, x_t, th.tensor(t), clip_denoised=clip)
    return {
        "kind": "vb_terms_bpd",
        **case_settings(settings),
        "t": t,
        "clip_denoised": clip,
        "shape": shape,
        "model_output": flat(mo),
        "x_start": flat(x_start),
        "x_t": flat(x_t),
        "expected": {
            "output": flat(out["output"]),
            "model_timestep_input": flat(rec.calls[0][1]),
        },
    }


def sample_case(rng, settings, t, shape, clip, eta=None):
    """p_sample (eta None) or ddim_sample, with the noise the original drew recorded."""
    d, _, _, mo, x_t = draw(rng, settings, shape, t)
    # The original draws its noise with randn_like(x_t) after p_mean_variance, which draws
    # nothing: the same seed then gives the same draw here, recorded as the case's noise.
    seed = int(rng.integers(0, 2**31))
    th.manual_seed(seed)
    noise = th.randn_like(x_t)
    rec = Recorder(mo)
    th.manual_seed(seed)
    if eta is None:
        out = d.p_sample(rec, x_t, th.tensor(t), clip_denoised=clip)
    else:
        out = d.ddim_sample(rec, x_t, th.tensor(t), clip_denoised=clip, eta=eta)
    case = {
        "kind": "p_sample" if eta is None else "ddim_sample",
        **case_settings(settings),
        "t": t,
        "clip_denoised": clip,
        "shape": shape,
        "model_output": flat(mo),
        "x_t": flat(x_t),
        "expected": {
            "sample": flat(out["sample"]),
            "pred_xstart": flat(out["pred_xstart"]),
            "model_timestep_input": flat(rec.calls[0][1]),
        },
    }
    case["noise"] = flat(noise)
    if eta is not None:
        case["eta"] = eta
    return case


def unet_case(seed, name, config, image_size, labels_dtype):
    """A UNet with random (not zero-initialised) weights, its inputs and the original's output."""
    th.manual_seed(seed)
    model = UNetModel(**config).float()
    with th.no_grad():
        for p in model.parameters():
            p.add_(0.05 * th.randn_like(p))
    model.eval()
    b = 3
    x = th.randn(b, config["in_channels"], image_size, image_size)
    ts = th.tensor([0.0, 417.0, 999.0])
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    y = None
    if config.get("num_classes") is not None:
        y = th.randint(0, config["num_classes"], (b,), dtype=labels_dtype)
    with th.no_grad():
        out = model(x, ts, y=y.long() if y is not None else None)
    tensors["__input_x"] = x
    tensors["__input_timesteps"] = ts
    if y is not None:
        tensors["__input_y"] = y
    tensors["__output"] = out.contiguous()
    save_file(tensors, str(HERE / name), metadata={"config": json.dumps(config)})
    return {
        "kind": "unet_forward",
        "weights": name,
        "config": config,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "expected": {"output": flat(out)},
    }


def generated():
    rng = np.random.default_rng(20261202)
    cases = []
    shape = [2, 2, 2, 3]
    # Every loss type with every variance type and both mean types, on a full and a respaced
    # schedule (t = 0 hits the decoder term of the bound).
    for loss in LOSS_TYPES:
        for var in VAR_TYPES:
            for mean in MEAN_TYPES:
                for sched, steps, respacing, t in (
                    ("cosine", 1000, "", [0, 613]),
                    ("linear", 100, "ddim20", [19, 0]),
                ):
                    settings = {
                        "beta_schedule": sched,
                        "num_timesteps": steps,
                        "respacing": respacing,
                        "model_mean_type": mean,
                        "model_var_type": var,
                        "loss_type": loss,
                    }
                    if loss.endswith("kl") and respacing:
                        # The bound's terms also on a respaced schedule.
                        t = [7, 0]
                    cases.append(training_losses_case(rng, settings, t, shape))
    for var in VAR_TYPES:
        for mean in MEAN_TYPES:
            for clip in (False, True):
                settings = {
                    "beta_schedule": "linear" if clip else "cosine",
                    "num_timesteps": 1000,
                    "respacing": "50" if clip else "",
                    "model_mean_type": mean,
                    "model_var_type": var,
                }
                t = [0, 31] if clip else [999, 1]
                cases.append(p_mean_variance_case(rng, settings, t, shape, clip))
                cases.append(vb_terms_case(rng, settings, t, shape, clip))
                cases.append(sample_case(rng, settings, t, shape, clip))
                cases.append(
                    sample_case(rng, settings, t, shape, clip, eta=0.0 if clip else 0.7)
                )
    base = {
        "in_channels": 1,
        "model_channels": 32,
        "num_res_blocks": 1,
        "attention_resolutions": [2],
        "dropout": 0.0,
        "channel_mult": [1, 2],
        "num_classes": 10,
        "num_heads": 2,
    }
    cases.append(
        unet_case(
            1,
            "unet_class_cond_scale_shift.safetensors",
            {**base, "out_channels": 2, "use_scale_shift_norm": True},
            16,
            th.int64,
        )
    )
    cases.append(
        unet_case(
            2,
            "unet_class_cond.safetensors",
            {**base, "out_channels": 1, "use_scale_shift_norm": False},
            16,
            th.int64,
        )
    )
    for i, c in enumerate(cases):
        c["id"] = f"gen-{c['kind']}-{i}"
    return cases


def main():
    root = json.loads(CASES.read_text())
    kept = [c for c in root["cases"] if not c["id"].startswith("gen-")]
    gen = generated()
    # Keys in the documented order: id and kind first.
    gen = [{"id": c.pop("id"), **c} for c in gen]
    root["cases"] = kept + gen
    root["meta"]["generated"] = (
        "cases with ids gen-*: xtask/reference/make_cases.py, the original at commit 1bc7bbb, "
        f"torch {th.__version__}, float64 (UNet fixtures float32)"
    )
    # One case a line, so that a diff names the cases that changed.
    lines = [json.dumps(c, separators=(",", ":")) for c in root["cases"]]
    meta = json.dumps(root["meta"], indent=1)
    CASES.write_text('{"meta": ' + meta + ',\n"cases": [\n' + ",\n".join(lines) + "\n]}\n")
    print(f"{len(kept)} cases kept, {len(gen)} generated into {CASES}")


if __name__ == "__main__":
    main()
