//! Times the UNet's hot ops on the MNIST model's shapes (batch 64 by default):
//! `MIMALLOC_PURGE_DELAY=-1 cargo run -p ddpm-kernels --example opbench [batch] [resblock]`;
//! with `DDPM_PRECISION=bf16` the ops (and the per-shape totals) run at bf16 precision, and
//! `DDPM_ISA` / `DDPM_PLAIN_OPS` choose the kernels. The whole model's step is timed by
//! `cargo xtask bench`.
//! Uses mimalloc like the binaries do (with the default allocator, fresh pages for every large
//! buffer dominate the backward passes).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{Device, Result, Tensor, Var};
use ddpm_kernels::{self as ops, KernelOptions};
use std::time::Instant;

fn rand(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Median milliseconds of `f` over `reps` runs after one warm-up.
fn time<F: FnMut() -> Result<()>>(reps: usize, mut f: F) -> Result<f64> {
    f()?;
    let mut v = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

fn main() -> Result<()> {
    // As the binaries do (ddpm_cli::tune_threads): Candle's own element-wise pool would spin
    // against rayon's.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let b: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let precision: ops::Precision = std::env::var("DDPM_PRECISION")
        .unwrap_or_else(|_| "f32".into())
        .parse()
        .map_err(candle_core::Error::wrap)?;
    let opts = KernelOptions::with_precision(precision)
        .with_env_overrides()
        .map_err(candle_core::Error::wrap)?;
    println!(
        "batch {b}, {} threads, {precision}: {}",
        rayon::current_num_threads(),
        opts.describe()
    );
    let mode = std::env::args().nth(2).unwrap_or_default();
    let only_resblock = mode == "resblock";
    // (c_in, c_out, size, kernel, stride, how many times the MNIST UNet has it)
    let convs = [
        (1, 32, 28, 3, 1, 1),
        (32, 32, 28, 3, 1, 7),
        (96, 32, 28, 3, 1, 1),
        (64, 32, 28, 3, 1, 2),
        (32, 32, 28, 3, 2, 1),
        (32, 64, 14, 3, 1, 1),
        (64, 64, 14, 3, 1, 7),
        (128, 64, 14, 3, 1, 2),
        (96, 64, 14, 3, 1, 1),
        (64, 64, 14, 3, 2, 1),
        (64, 64, 7, 3, 1, 7),
        (128, 64, 7, 3, 1, 3),
        (32, 2, 28, 3, 1, 1),
        // The skip connections' 1×1 convolutions.
        (96, 32, 28, 1, 1, 1),
        (64, 32, 28, 1, 1, 2),
        (32, 64, 14, 1, 1, 1),
        (128, 64, 14, 1, 1, 2),
        (96, 64, 14, 1, 1, 1),
        (128, 64, 7, 1, 1, 3),
    ];
    let (mut tot_f, mut tot_b, mut tot_flop) = (0.0, 0.0, 0.0);
    if !only_resblock {
        // What backward() itself costs on an output of the largest size, without any op.
        let x = Var::from_tensor(&rand(&[b, 32, 28, 28], 1)?)?;
        let g = rand(&[b, 32, 28, 28], 2)?;
        let o1 = time(5, || {
            x.as_tensor().mul(&g)?.sum_all()?.backward().map(|_| ())
        })?;
        let o2 = time(5, || (x.as_tensor() * 1.0)?.backward().map(|_| ()))?;
        println!("backward overhead on {b}x32x28x28: mul+sum {o1:.2} ms, affine {o2:.2} ms");
    }
    for (i, &(ci, co, hw, k, s, count)) in convs.iter().enumerate().filter(|_| !only_resblock) {
        let x = Var::from_tensor(&rand(&[b, ci, hw, hw], i as u64)?)?;
        let w = Var::from_tensor(&(rand(&[co, ci, k, k], 100 + i as u64)? * 0.1)?)?;
        let bias = Var::from_tensor(&rand(&[co], 200 + i as u64)?)?;
        let pad = k / 2;
        let ho = (hw + 2 * pad - k) / s + 1;
        let flop = 2.0 * (b * co * ho * ho * ci * k * k) as f64;
        let g = rand(&[b, co, ho, ho], 300 + i as u64)?;
        let f = time(5, || {
            ops::conv2d(
                x.as_tensor(),
                w.as_tensor(),
                bias.as_tensor(),
                s,
                pad,
                &opts,
            )
            .map(|_| ())
        })?;
        let fb = time(5, || {
            let y = ops::conv2d(
                x.as_tensor(),
                w.as_tensor(),
                bias.as_tensor(),
                s,
                pad,
                &opts,
            )?;
            y.mul(&g)?.sum_all()?.backward().map(|_| ())
        })?;
        let bw = fb - f;
        println!(
            "conv {ci:>3}->{co:<3} {hw:>2}x{hw:<2} s{s} x{count}: fwd {f:7.2} ms {:6.1} GF/s | bwd {bw:7.2} ms {:6.1} GF/s",
            flop / f / 1e6,
            2.0 * flop / bw / 1e6
        );
        if k == 3 && s == 1 && ops::conv::direct::available() {
            let (xv, wv) = (
                x.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                w.as_tensor().flatten_all()?.to_vec1::<f32>()?,
            );
            let gv = g.flatten_all()?.to_vec1::<f32>()?;
            let f32k = ops::Kernels::new(ops::Isa::Avx512, false);
            let di = time(5, || {
                ops::conv::direct::backward_input(&gv, (b, co, hw, hw), &wv, ci, f32k);
                Ok(())
            })?;
            let bv = bias.as_tensor().to_vec1::<f32>()?;
            for isa in [ops::Isa::Avx512Bf16, ops::Isa::Amx] {
                if !isa.supported() {
                    continue;
                }
                let k16 = ops::Kernels::new(isa, true);
                let f16 = time(5, || {
                    ops::conv::direct::forward(&xv, (b, ci, hw, hw), &wv, co, &bv, k16);
                    Ok(())
                })?;
                let di16 = time(5, || {
                    ops::conv::direct::backward_input(&gv, (b, co, hw, hw), &wv, ci, k16);
                    Ok(())
                })?;
                let dw16 = time(5, || {
                    ops::conv::direct::backward_weight(&gv, &xv, (b, ci, hw, hw), co, k16);
                    Ok(())
                })?;
                println!(
                    "    bf16 {isa}: fwd {f16:.2} ms {:.1} GF/s, dX {di16:.2} ms {:.1} GF/s, dW {dw16:.2} ms {:.1} GF/s",
                    flop / f16 / 1e6,
                    flop / di16 / 1e6,
                    flop / dw16 / 1e6
                );
            }
            let dw = time(5, || {
                ops::conv::direct::backward_weight(&gv, &xv, (b, ci, hw, hw), co, f32k);
                Ok(())
            })?;
            println!(
                "    direct kernels: dX {di:.2} ms {:.1} GF/s, dW {dw:.2} ms {:.1} GF/s",
                flop / di / 1e6,
                flop / dw / 1e6
            );
        }
        tot_f += f * count as f64;
        tot_b += bw * count as f64;
        tot_flop += flop * count as f64;
    }
    println!(
        "convs total: fwd {tot_f:.1} ms ({:.1} GF/s), bwd {tot_b:.1} ms ({:.1} GF/s)",
        tot_flop / tot_f / 1e6,
        2.0 * tot_flop / tot_b / 1e6
    );

    if !only_resblock {
        // GroupNorm + scale-shift + SiLU on the largest activation.
        let x = Var::from_tensor(&rand(&[b, 32, 28, 28], 7)?)?;
        let gamma = Var::from_tensor(&(rand(&[32], 8)? + 1.0)?)?;
        let beta = Var::from_tensor(&rand(&[32], 9)?)?;
        let scale = Var::from_tensor(&rand(&[b, 32], 10)?)?;
        let shift = Var::from_tensor(&rand(&[b, 32], 11)?)?;
        let g = rand(&[b, 32, 28, 28], 12)?;
        let gn = || {
            ops::group_norm(
                x.as_tensor(),
                32,
                gamma.as_tensor(),
                beta.as_tensor(),
                1e-5,
                Some((scale.as_tensor(), shift.as_tensor())),
                true,
                &opts,
            )
        };
        let f = time(5, || gn().map(|_| ()))?;
        let fb = time(9, || gn()?.mul(&g)?.sum_all()?.backward().map(|_| ()))?;
        let o = time(9, || {
            x.as_tensor().mul(&g)?.sum_all()?.backward().map(|_| ())
        })?;
        println!(
            "groupnorm+ss+silu 32x28x28: fwd {f:.2} ms, bwd {:.2} ms (after {o:.2} ms of mul+sum)",
            fb - f - o
        );
    }

    if mode == "resblock" {
        // A ResBlock's ops at 32 channels, 28×28, as the model composes them.
        let c = 32;
        let v = |shape: &[usize], seed| -> Result<Var> {
            Var::from_tensor(&(rand(shape, seed)? * 0.2)?)
        };
        let x = v(&[b, c, 28, 28], 1)?;
        let (g1, b1, g2, b2) = (v(&[c], 2)?, v(&[c], 3)?, v(&[c], 4)?, v(&[c], 5)?);
        let (w1, c1, w2, c2) = (
            v(&[c, c, 3, 3], 6)?,
            v(&[c], 7)?,
            v(&[c, c, 3, 3], 8)?,
            v(&[c], 9)?,
        );
        let emb = v(&[b, 2 * c], 10)?;
        let block = || -> Result<Tensor> {
            let h = ops::group_norm(
                x.as_tensor(),
                32,
                g1.as_tensor(),
                b1.as_tensor(),
                1e-5,
                None,
                true,
                &opts,
            )?;
            let h = ops::conv2d(&h, w1.as_tensor(), c1.as_tensor(), 1, 1, &opts)?;
            let (sc, sh) = (
                emb.as_tensor().narrow(1, 0, c)?,
                emb.as_tensor().narrow(1, c, c)?,
            );
            let h = ops::group_norm(
                &h,
                32,
                g2.as_tensor(),
                b2.as_tensor(),
                1e-5,
                Some((&sc, &sh)),
                true,
                &opts,
            )?;
            let h = ops::conv2d(&h, w2.as_tensor(), c2.as_tensor(), 1, 1, &opts)?;
            x.as_tensor() + h
        };
        let f = time(9, || block().map(|_| ()))?;
        let fb = time(9, || block()?.sum_all()?.backward().map(|_| ()))?;
        println!("resblock 32ch 28x28: fwd {f:.2} ms, fwd+bwd {fb:.2} ms");
    }
    Ok(())
}
