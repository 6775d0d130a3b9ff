//! Every fast kernel against the plain-Candle oracle: outputs and gradients on random inputs.

use super::{conv, reference, Isa, KernelChoice, KernelOptions, Kernels};
use candle_core::{DType, Device, Tensor, Var};

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    // A cheap deterministic pseudo-random fill in [-1, 1].
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let mut z = (i as u64).wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let d: f32 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let s: f32 = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(d <= tol * s.max(1.0), "{what}: max diff {d} (scale {s})");
}

/// Runs f on fresh Vars built from `inputs`, returns the output and the gradients of
/// sum(output · probe) with respect to each input.
fn run(
    inputs: &[Tensor],
    probe_seed: u64,
    f: impl Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let probe = rand(out.dims(), probe_seed);
    let grads = (&out * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).expect("gradient").clone())
        .collect();
    (out, g)
}

#[test]
fn conv2d_matches_candle_forward_and_backward() {
    // (batch, c_in, c_out, height, width, kernel, stride, padding), through every kernel family
    // this CPU runs. The 3×3 stride-1 cases take the direct kernels from AVX-512 up and
    // im2col + GEMM below:
    // c_out 17 and 5 exercise the 8-, 4- and 1-channel blocks; 14×14 fills whole blocks of
    // positions, 28×28 and 7×7 end in a partial one; 6×11 is a rectangle.
    for &(b, ci, co, h, w, k, stride, pad) in &[
        (2, 3, 5, 7, 7, 3, 1, 1),
        // 7×7 maps stack 8 images per task: a full stack, then 3 (slots of stale images).
        (11, 4, 9, 7, 7, 3, 1, 1),
        (2, 5, 17, 28, 28, 3, 1, 1),
        (3, 16, 8, 14, 14, 3, 1, 1),
        (2, 9, 2, 6, 11, 3, 1, 1),
        (3, 4, 4, 8, 8, 3, 2, 1),
        (2, 6, 3, 5, 5, 1, 1, 0),
        (1, 2, 3, 7, 7, 3, 2, 1),
    ] {
        let inputs = [
            rand(&[b, ci, h, w], 1),
            rand(&[co, ci, k, k], 2),
            rand(&[co], 3),
        ];
        let (o2, g2) = run(&inputs, 9, |t| {
            reference::conv2d(&t[0], &t[1], &t[2], stride, pad).unwrap()
        });
        for isa in Isa::supported_all() {
            let kernels = Kernels::new(isa, false);
            let (o1, g1) = run(&inputs, 9, |t| {
                conv::conv2d(&t[0], &t[1], &t[2], stride, pad, kernels).unwrap()
            });
            let what = format!("conv {h}x{w} k{k} s{stride} p{pad} c{ci}->{co} {isa}");
            close(&o1, &o2, 1e-5, &format!("{what} output"));
            for (i, name) in ["dx", "dw", "db"].iter().enumerate() {
                close(&g1[i], &g2[i], 1e-4, &format!("{what} {name}"));
            }
        }
    }
}

#[test]
fn conv2d_rejects_empty_shapes() {
    let x = rand(&[2, 3, 5, 5], 41);
    let err = super::conv2d(
        &x,
        &Tensor::zeros((0, 3, 3, 3), DType::F32, &Device::Cpu).unwrap(),
        &Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap(),
        1,
        1,
        &KernelOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn conv1x1_matches_candle_forward_and_backward() {
    // Attention's qkv and proj_out shapes, small: [B, C, T] with T = 7×7.
    let inputs = [
        rand(&[3, 8, 49], 21),
        rand(&[24, 8, 1], 22),
        rand(&[24], 23),
    ];
    let (o1, g1) = run(&inputs, 24, |t| {
        super::conv1x1(&t[0], &t[1], &t[2], &KernelOptions::default()).unwrap()
    });
    let (o2, g2) = run(&inputs, 24, |t| {
        reference::conv1x1(&t[0], &t[1], &t[2]).unwrap()
    });
    close(&o1, &o2, 1e-5, "conv1x1 output");
    for (i, name) in ["dx", "dw", "db"].iter().enumerate() {
        close(&g1[i], &g2[i], 1e-4, &format!("conv1x1 {name}"));
    }
}

#[test]
fn group_norm_matches_candle_in_every_variant() {
    let (b, c, h) = (3, 64, 5);
    for (ss, silu) in [(false, false), (false, true), (true, true), (true, false)] {
        let mut inputs = vec![
            (rand(&[b, c, h, h], 4) * 3.0).unwrap(),
            (rand(&[c], 5) + 1.0).unwrap(),
            rand(&[c], 6),
        ];
        if ss {
            inputs.push(rand(&[b, c], 7));
            inputs.push(rand(&[b, c], 8));
        }
        let f = |fast: Option<Isa>| {
            move |t: &[Tensor]| {
                let s = if ss { Some((&t[3], &t[4])) } else { None };
                match fast {
                    Some(isa) => {
                        super::group_norm::group_norm(&t[0], 32, &t[1], &t[2], 1e-5, s, silu, isa)
                            .unwrap()
                    }
                    None => reference::group_norm(&t[0], 32, &t[1], &t[2], 1e-5, s, silu).unwrap(),
                }
            }
        };
        let (o2, g2) = run(&inputs, 10, f(None));
        for isa in Isa::supported_all() {
            let (o1, g1) = run(&inputs, 10, f(Some(isa)));
            close(
                &o1,
                &o2,
                1e-5,
                &format!("gn ss={ss} silu={silu} {isa} output"),
            );
            for i in 0..inputs.len() {
                close(
                    &g1[i],
                    &g2[i],
                    1e-4,
                    &format!("gn ss={ss} silu={silu} {isa} grad {i}"),
                );
            }
        }
    }
    // 3-D input, as in attention blocks.
    let inputs = [rand(&[2, 32, 49], 11), rand(&[32], 12), rand(&[32], 13)];
    let (o1, g1) = run(&inputs, 14, |t| {
        super::group_norm::group_norm(&t[0], 32, &t[1], &t[2], 1e-5, None, false, Isa::detected())
            .unwrap()
    });
    let (o2, g2) = run(&inputs, 14, |t| {
        reference::group_norm(&t[0], 32, &t[1], &t[2], 1e-5, None, false).unwrap()
    });
    close(&o1, &o2, 1e-5, "gn 3-D output");
    for i in 0..3 {
        close(&g1[i], &g2[i], 1e-4, "gn 3-D grad");
    }
}

#[test]
fn upsample_matches_candle() {
    let inputs = [rand(&[2, 3, 4, 5], 15)];
    let (o1, g1) = run(&inputs, 16, |t| {
        super::upsample::upsample_nearest2x(&t[0]).unwrap()
    });
    let (o2, g2) = run(&inputs, 16, |t| {
        reference::upsample_nearest2x(&t[0]).unwrap()
    });
    close(&o1, &o2, 0.0, "upsample output");
    close(&g1[0], &g2[0], 1e-6, "upsample grad");
}

#[test]
fn fast_path_only_for_cpu_f32_unless_plain() {
    let auto = KernelOptions::default();
    assert!(auto.fast_path(&rand(&[1], 0)));
    assert!(!auto.fast_path(&rand(&[1], 0).to_dtype(DType::F64).unwrap()));
    let plain = KernelOptions {
        choice: KernelChoice::Plain,
        ..auto
    };
    assert!(!plain.fast_path(&rand(&[1], 0)));
    assert!(!plain.bf16_supported());
}

#[test]
fn options_cap_the_family_and_take_bf16_only_where_supported() {
    let portable = KernelOptions {
        choice: KernelChoice::UpTo(Isa::Portable),
        precision: crate::Precision::Bf16,
    };
    assert_eq!(portable.isa(), Isa::Portable);
    assert_eq!(portable.kernels(), Kernels::new(Isa::Portable, false));
    let above = KernelOptions {
        choice: KernelChoice::UpTo(Isa::Amx),
        ..KernelOptions::default()
    };
    assert_eq!(above.isa(), Isa::detected());
    let bf16 = KernelOptions::with_precision(crate::Precision::Bf16);
    assert_eq!(bf16.bf16_convolutions(), Isa::detected() >= Isa::Avx512Bf16);
}

/// Two option values used in turn in one thread give each its own result: nothing is left
/// behind in the process by the first.
#[test]
fn two_option_values_in_one_process_keep_their_own_results() {
    let x = rand(&[2, 32, 14, 14], 51);
    let w = (rand(&[32, 32, 3, 3], 52) * 0.1).unwrap();
    let b = rand(&[32], 53);
    let oracle = reference::conv2d(&x, &w, &b, 1, 1).unwrap();
    let f32_opts = KernelOptions::default();
    let bf16_opts = KernelOptions::with_precision(crate::Precision::Bf16);
    let plain = KernelOptions {
        choice: KernelChoice::Plain,
        ..f32_opts
    };
    let conv = |o: &KernelOptions| super::conv2d(&x, &w, &b, 1, 1, o).unwrap();
    let first = conv(&f32_opts);
    let low = conv(&bf16_opts);
    let again = conv(&f32_opts);
    let plain_out = conv(&plain);
    let diff = |a: &Tensor, b: &Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    assert_eq!(diff(&first, &again), 0.0, "f32 after bf16 changed");
    assert_eq!(diff(&plain_out, &oracle), 0.0, "plain is the oracle");
    assert!(diff(&first, &oracle) < 1e-4);
    if bf16_opts.bf16_convolutions() {
        // bf16 products: visibly different from f32, yet close.
        let d = diff(&low, &first);
        assert!(d > 1e-4 && d < 0.1, "bf16 against f32: {d}");
    } else {
        assert_eq!(diff(&low, &first), 0.0);
    }
}

/// Rounds every element to the nearest bf16 (kept as f32).
fn to_bf16(t: &Tensor) -> Tensor {
    let v: Vec<f32> = t
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|x| f32::from_bits(conv::bf16::bf16_bits(x) << 16))
        .collect();
    Tensor::from_vec(v, t.shape(), t.device()).unwrap()
}

#[test]
fn bf16_rounding_is_nearest_even() {
    let r = |x: f32| f32::from_bits(conv::bf16::bf16_bits(x) << 16);
    assert_eq!(r(1.0), 1.0);
    // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
    assert_eq!(r(1.0 + 1.0 / 256.0), 1.0);
    assert_eq!(r(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
    assert_eq!(r(-2.5e-3), -0.002_502_441_4);
    assert!(r(f32::NAN).is_nan());
    assert_eq!(r(f32::INFINITY), f32::INFINITY);
}

#[test]
fn bf16_convolution_is_the_f32_convolution_of_rounded_operands() {
    let families: Vec<Isa> = Isa::supported_all()
        .into_iter()
        .filter(|&i| i >= Isa::Avx512Bf16)
        .collect();
    if families.is_empty() {
        eprintln!("no AVX512-BF16 here: the bf16 kernels are not used, nothing to test");
        return;
    }
    // c_in 5 pairs its last channel with zero; c_out 13 takes the 8-, 4- and 1-channel blocks.
    // On AMX: 32 -> 16 and 16 -> 32 fill whole tiles (one and two output tiles), 48 -> 48 pads
    // the input pairs to two tiles and ends on a single output tile, 96 -> 64 at 7×7 is the
    // UNet's; 5 -> 13 and 4 -> 2 go to the vector kernels.
    // 1×1 (pointwise, AMX from 16 channels): 96 -> 32, and 64 -> 192 (a QKV projection) at
    // 7×7 stacks 16 images per task, 17 images leave a short last stack; 5 -> 3 stays f32.
    let shapes = [
        (2, 5, 13, 9, 9, 3),
        (3, 32, 16, 14, 14, 3),
        (1, 4, 2, 28, 28, 3),
        (2, 16, 32, 28, 28, 3),
        (2, 48, 48, 6, 11, 3),
        (3, 96, 64, 7, 7, 3),
        // 17 images at 28×28 into 16 channels: weight-gradient chunks of 7, a full one then a
        // short one on each thread.
        (17, 16, 16, 28, 28, 3),
        (2, 96, 32, 5, 5, 1),
        (17, 64, 192, 7, 7, 1),
        (2, 32, 16, 28, 28, 1),
        (2, 5, 3, 4, 4, 1),
    ];
    // 3×3 stride 2 (AMX: the stride-1 convolution subsampled, from 16 channels): even and odd
    // sizes; 4 -> 4 stays f32.
    let strided = [(2, 32, 32, 28, 28), (3, 16, 48, 7, 7), (2, 4, 4, 6, 6)];
    for isa in families {
        let kernels = Kernels::new(isa, true);
        for &(b, ci, co, h, w, k) in &shapes {
            let pad = k / 2;
            let x = rand(&[b, ci, h, w], 21);
            let wt = rand(&[co, ci, k, k], 22);
            let bias = rand(&[co], 23);
            let got = conv::conv2d(&x, &wt, &bias, 1, pad, kernels).unwrap();
            // 1×1 convolutions take bf16 only on AMX tiles, where the channels fill them.
            if k == 1 && !(isa == Isa::Amx && ci % 16 == 0 && co % 16 == 0) {
                let inputs = [x.clone(), wt.clone(), bias.clone()];
                let (o1, g1) = run(&inputs, 24, |t| {
                    conv::conv2d(&t[0], &t[1], &t[2], 1, pad, kernels).unwrap()
                });
                let (o2, g2) = run(&inputs, 24, |t| {
                    reference::conv2d(&t[0], &t[1], &t[2], 1, pad).unwrap()
                });
                let what = format!("f32 conv k1 {ci}->{co} {h}x{w} {isa}");
                close(&o1, &o2, 1e-5, &what);
                for i in 0..3 {
                    close(&g1[i], &g2[i], 1e-4, &format!("{what} grad {i}"));
                }
                continue;
            }
            let want = reference::conv2d(&to_bf16(&x), &to_bf16(&wt), &bias, 1, pad).unwrap();
            let what = format!("bf16 conv k{k} {ci}->{co} {h}x{w} {isa}");
            close(&got, &want, 1e-5, &what);
            // Within bf16's precision of the unrounded f32 result.
            let exact = reference::conv2d(&x, &wt, &bias, 1, pad).unwrap();
            close(&got, &exact, 3e-2, &format!("{what} against f32"));
            // The input gradient goes through the same kernel with the transposed weights.
            let inputs = [x.clone(), wt.clone(), bias.clone()];
            let (_, g1) = run(&inputs, 24, |t| {
                conv::conv2d(&t[0], &t[1], &t[2], 1, pad, kernels).unwrap()
            });
            let (_, g3) = run(&inputs, 24, |t| {
                reference::conv2d(&t[0], &t[1], &t[2], 1, pad).unwrap()
            });
            let dx_want = {
                // dX of the rounded problem: weights and output gradient (the probe) rounded.
                let p = to_bf16(&rand(&[b, co, h, w], 24));
                let xv = Var::from_tensor(&x).unwrap();
                let y = reference::conv2d(xv.as_tensor(), &to_bf16(&wt), &bias, 1, pad).unwrap();
                let grads = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
                grads.get(xv.as_tensor()).unwrap().clone()
            };
            close(&g1[0], &dx_want, 1e-5, &format!("{what} dx"));
            // The weight gradient: products of rounded inputs and output gradient, f32 sums.
            let dw_want = {
                let p = to_bf16(&rand(&[b, co, h, w], 24));
                let wv = Var::from_tensor(&wt).unwrap();
                let y = reference::conv2d(&to_bf16(&x), wv.as_tensor(), &bias, 1, pad).unwrap();
                let grads = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
                grads.get(wv.as_tensor()).unwrap().clone()
            };
            close(&g1[1], &dw_want, 1e-5, &format!("{what} dw"));
            // The bias gradient stays f32.
            close(&g1[2], &g3[2], 1e-4, &format!("{what} db"));
        }
        for &(b, ci, co, h, w) in &strided {
            let x = rand(&[b, ci, h, w], 41);
            let wt = rand(&[co, ci, 3, 3], 42);
            let bias = rand(&[co], 43);
            let inputs = [x.clone(), wt.clone(), bias.clone()];
            let (o1, g1) = run(&inputs, 44, |t| {
                conv::conv2d(&t[0], &t[1], &t[2], 2, 1, kernels).unwrap()
            });
            let what = format!("conv s2 {ci}->{co} {h}x{w} {isa}");
            if isa == Isa::Amx && ci >= 16 && co % 16 == 0 {
                // The rounded problem, as for stride 1.
                let p = to_bf16(&rand(o1.dims(), 44));
                let want = reference::conv2d(&to_bf16(&x), &to_bf16(&wt), &bias, 2, 1).unwrap();
                close(&o1, &want, 1e-5, &what);
                let xv = Var::from_tensor(&x).unwrap();
                let y = reference::conv2d(xv.as_tensor(), &to_bf16(&wt), &bias, 2, 1).unwrap();
                let gx = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
                close(
                    &g1[0],
                    gx.get(xv.as_tensor()).unwrap(),
                    1e-5,
                    &format!("{what} dx"),
                );
                let wv = Var::from_tensor(&wt).unwrap();
                let y = reference::conv2d(&to_bf16(&x), wv.as_tensor(), &bias, 2, 1).unwrap();
                let gw = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
                close(
                    &g1[1],
                    gw.get(wv.as_tensor()).unwrap(),
                    1e-5,
                    &format!("{what} dw"),
                );
            } else {
                let (o2, g2) = run(&inputs, 44, |t| {
                    reference::conv2d(&t[0], &t[1], &t[2], 2, 1).unwrap()
                });
                close(&o1, &o2, 1e-5, &what);
                for i in 0..2 {
                    close(&g1[i], &g2[i], 1e-4, &format!("{what} grad {i}"));
                }
            }
        }
    }
}

#[test]
fn attention_matches_candle() {
    // (batch, heads, ch per head, positions): the UNet's 7×7 maps, and odd sizes.
    for &(b, heads, ch, t) in &[(2, 4, 16, 49), (3, 1, 5, 7), (1, 2, 8, 1)] {
        let inputs = [(rand(&[b, heads * 3 * ch, t], 31) * 3.0).unwrap()];
        let (o1, g1) = run(&inputs, 32, |x| {
            super::attention::attention(&x[0], heads).unwrap()
        });
        let (o2, g2) = run(&inputs, 32, |x| reference::attention(&x[0], heads).unwrap());
        let what = format!("attention b{b} heads{heads} ch{ch} t{t}");
        close(&o1, &o2, 1e-5, &format!("{what} output"));
        close(&g1[0], &g2[0], 1e-4, &format!("{what} grad"));
    }
    // A width that is not 3·ch·heads is an error, not a panic.
    let bad = rand(&[1, 10, 4], 33);
    assert!(super::attention::attention(&bad, 4).is_err());
}
