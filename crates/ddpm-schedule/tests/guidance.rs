//! Classifier-free guidance: the mix of conditional and unconditional outputs, and its end points.

use candle_core::{DType, Device, Result, Tensor};
use ddpm_schedule::{
    ClassifierFreeGuidance, Denoiser, DiffusionConfig, GaussianDiffusion, ModelVarType, RngNoise,
    SamplingMethod,
};
use rand::SeedableRng;

/// A stand-in conditional model with a learned variance: eps = 0.1·x + 0.01·label (label 10 is
/// the null class), variance channel = 0.5 - 0.01·label.
struct Toy;

impl Denoiser for Toy {
    fn denoise(&self, x: &Tensor, _t: &Tensor, y: Option<&Tensor>, _: bool) -> Result<Tensor> {
        let b = x.dim(0)?;
        let y = y
            .expect("conditional")
            .to_dtype(DType::F32)?
            .reshape((b, 1, 1, 1))?
            .broadcast_as(x.shape())?;
        let eps = ((x * 0.1)? + (&y * 0.01)?)?;
        let var = (y * -0.01)?.affine(1.0, 0.5)?;
        Tensor::cat(&[&eps, &var], 1)
    }
}

fn inputs() -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let x = Tensor::arange(0f32, 32.0, &dev)
        .unwrap()
        .reshape((2, 1, 4, 4))
        .unwrap();
    let t = Tensor::new(&[3f32, 7.0], &dev).unwrap();
    let y = Tensor::new(&[2u32, 7], &dev).unwrap();
    (x, t, y)
}

fn guided(scale: f64) -> ClassifierFreeGuidance<Toy> {
    ClassifierFreeGuidance {
        model: Toy,
        null_label: 10,
        scale,
        eps_channels: 1,
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn scale_mixes_the_noise_channels_and_keeps_the_conditional_variance() {
    let (x, t, y) = inputs();
    let null = Tensor::new(&[10u32, 10], &Device::Cpu).unwrap();
    let cond = Toy.denoise(&x, &t, Some(&y), false).unwrap();
    let uncond = Toy.denoise(&x, &t, Some(&null), false).unwrap();
    // s = 1 and s = 0 are the two models themselves, bit for bit.
    let one = guided(1.0).denoise(&x, &t, Some(&y), false).unwrap();
    let zero = guided(0.0).denoise(&x, &t, Some(&y), false).unwrap();
    assert_eq!(max_diff(&one, &cond), 0.0);
    assert_eq!(max_diff(&zero, &uncond), 0.0);
    // s = 3: eps = -2·eps_u + 3·eps_c = 0.1·x + 0.01·(3·y - 20); variance from the cond pass.
    let three = guided(3.0).denoise(&x, &t, Some(&y), false).unwrap();
    let want_eps = ((uncond.narrow(1, 0, 1).unwrap() * -2.0).unwrap()
        + (cond.narrow(1, 0, 1).unwrap() * 3.0).unwrap())
    .unwrap();
    assert!(max_diff(&three.narrow(1, 0, 1).unwrap(), &want_eps) < 1e-5);
    let label_2 = three.narrow(0, 0, 1).unwrap().narrow(1, 0, 1).unwrap();
    let x_0 = x.narrow(0, 0, 1).unwrap();
    let by_hand = ((x_0 * 0.1).unwrap() + 0.01 * (3.0 * 2.0 - 20.0)).unwrap();
    assert!(max_diff(&label_2, &by_hand) < 1e-5);
    assert_eq!(
        max_diff(
            &three.narrow(1, 1, 1).unwrap(),
            &cond.narrow(1, 1, 1).unwrap()
        ),
        0.0
    );
    // More noise channels than the output has is an error, not a panic.
    let bad = ClassifierFreeGuidance {
        eps_channels: 3,
        ..guided(2.0)
    };
    assert!(bad.denoise(&x, &t, Some(&y), false).is_err());
}

#[test]
fn guided_sampling_at_the_end_points_is_the_plain_samplers() {
    let (x, _, y) = inputs();
    let null = Tensor::new(&[10u32, 10], &Device::Cpu).unwrap();
    let diffusion = GaussianDiffusion::new(&DiffusionConfig {
        num_timesteps: 50,
        respacing: "10".into(),
        model_var_type: ModelVarType::LearnedRange,
        ..DiffusionConfig::ddpm()
    })
    .unwrap();
    let x_t = (x / 32.0).unwrap();
    for method in [SamplingMethod::Ddpm, SamplingMethod::DpmSolverPp2m] {
        let run = |model: &dyn Denoiser, labels: &Tensor| {
            let mut noise = RngNoise(rand_chacha::ChaCha8Rng::seed_from_u64(4));
            let f = |x: &Tensor, t: &Tensor| model.denoise(x, t, Some(labels), false);
            diffusion
                .sample_loop(f, x_t.clone(), method, true, &mut noise, |_| {})
                .unwrap()
        };
        let plain = run(&Toy, &y);
        let unconditional = run(&Toy, &null);
        assert_eq!(max_diff(&run(&guided(1.0), &y), &plain), 0.0, "{method:?}");
        assert_eq!(
            max_diff(&run(&guided(0.0), &y), &unconditional),
            0.0,
            "{method:?}"
        );
        assert!(
            max_diff(&run(&guided(4.0), &y), &plain) > 1e-4,
            "{method:?}"
        );
    }
}
