//! The bf16 convolutions against f32: the same training run, step for step, on real MNIST.
//!
//! Run for every bf16 kernel family this CPU has (AMX tiles, AVX512-BF16 vectors); the kernels
//! are a value in each trainer's config, so the runs share one process.

mod common;

use candle_core::Device;
use ddpm_kernels::{Isa, KernelChoice, KernelOptions, Precision};
use ddpm_train::{DiffusionSettings, ImageDataset, Split, TrainConfig, Trainer};
use ddpm_unet::UNetConfig;

fn losses(data: &ImageDataset, kernels: KernelOptions, steps: usize) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let model = UNetConfig {
        in_channels: 1,
        model_channels: 32,
        out_channels: 2,
        num_res_blocks: 1,
        attention_resolutions: vec![],
        dropout: 0.0,
        channel_mult: vec![1, 2],
        num_classes: None,
        num_heads: 1,
        use_scale_shift_norm: true,
        null_class: false,
    };
    let cfg = TrainConfig {
        batch_size: 8,
        lr: 5e-4,
        steps: steps as u64,
        log_interval: 1000,
        save_interval: 100_000,
        sample_interval: 0,
        ema_rate: vec![0.99],
        keep_checkpoints: 0,
        seed: 5,
        kernels,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(
        model,
        DiffusionSettings::default(),
        cfg,
        data.clone(),
        dir.path(),
        &Device::Cpu,
    )
    .unwrap();
    (0..steps).map(|_| t.train_step().unwrap().loss).collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn mnist_bf16_training_follows_the_f32_loss_curve() {
    let dir = common::mnist();
    let data = ImageDataset::load(&dir, Split::Train).unwrap();
    let families: Vec<Isa> = Isa::supported_all()
        .into_iter()
        .filter(|&i| i >= Isa::Avx512Bf16)
        .collect();
    if families.is_empty() {
        eprintln!("no AMX or AVX512-BF16 on this CPU: bf16 precision is refused here");
        return;
    }
    let steps = 40;
    let f32_losses = losses(&data, KernelOptions::default(), steps);
    for isa in families {
        let bf16 = KernelOptions {
            precision: Precision::Bf16,
            choice: KernelChoice::UpTo(isa),
        };
        let bf16_losses = losses(&data, bf16, steps);
        follows(&f32_losses, &bf16_losses, isa);
    }
}

fn follows(f32_losses: &[f64], bf16_losses: &[f64], isa: Isa) {
    let steps = f32_losses.len();
    for (i, (a, b)) in f32_losses.iter().zip(bf16_losses).enumerate() {
        eprintln!("step {i:>2}: f32 {a:.4}  bf16 ({isa}) {b:.4}");
    }
    // The switch took effect (bf16 rounding changes the losses somewhere)...
    assert_ne!(
        f32_losses, bf16_losses,
        "{isa}: bf16 gave bit-identical losses"
    );
    // ... and, with the same batches, timesteps and noise, the first step differs only by
    // rounding.
    let first = (bf16_losses[0] - f32_losses[0]).abs() / f32_losses[0];
    assert!(
        first < 0.01,
        "{isa}: first step: {first:.4} relative difference"
    );
    // Both learn: the last ten steps' loss is well below the first five's.
    for l in [f32_losses, bf16_losses] {
        assert!(mean(&l[steps - 10..]) < 0.5 * mean(&l[..5]), "{isa}: {l:?}");
    }
    // And bf16 stays on the f32 curve: the last twenty steps agree within 5% on average.
    let (a, b) = (
        mean(&f32_losses[steps - 20..]),
        mean(&bf16_losses[steps - 20..]),
    );
    assert!(
        (a - b).abs() / a < 0.05,
        "{isa}: late loss f32 {a:.4} vs bf16 {b:.4}"
    );
}
