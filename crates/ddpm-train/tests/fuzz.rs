//! Arbitrary bytes and strings into every loader and parser: each gives a value or an error,
//! never a panic (and, the inputs being bounded, never a hang: the suite has a time budget).

use candle_core::{DType, Device, Tensor};
use ddpm_schedule::{space_timesteps, BetaSchedule, Schedule};
use ddpm_train::data::parse_idx;
use ddpm_train::CheckpointMeta;
use ddpm_unet::{ParamStore, UNet, UNetConfig};
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// A valid IDX file of `dims` to mutate.
fn idx_bytes(dims: &[u32]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    let n: u32 = dims.iter().product();
    b.extend((0..n).map(|i| i as u8));
    b
}

/// Applies byte edits (position, value) and an optional truncation.
fn mutate(mut b: Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    if b.is_empty() {
        return b;
    }
    for &(i, v) in edits {
        let n = b.len();
        b[i % n] = v;
    }
    if let Some(c) = cut {
        b.truncate(c % (b.len() + 1));
    }
    b
}

fn tiny_unet() -> UNetConfig {
    UNetConfig {
        in_channels: 1,
        model_channels: 32,
        out_channels: 2,
        num_res_blocks: 1,
        attention_resolutions: vec![2],
        dropout: 0.0,
        channel_mult: vec![1, 2],
        num_classes: Some(10),
        num_heads: 1,
        use_scale_shift_norm: true,
        null_class: false,
    }
}

/// A real checkpoint config.json to mutate.
fn valid_config() -> String {
    let meta = CheckpointMeta {
        model: tiny_unet(),
        diffusion: Default::default(),
        train: Default::default(),
        image_size: [8, 8],
        step: 3,
        rng: ddpm_train::checkpoint::RngState {
            seed: 1,
            word_pos: 77,
        },
        data_epoch: 0,
        data_pos: 12,
        sampler: None,
        run_id: Some("r".into()),
        data_len: Some(16),
        class_names: None,
        log_window: None,
    };
    serde_json::to_string_pretty(&meta).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn idx_parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = parse_idx(&bytes, Path::new("fuzz"));
    }

    #[test]
    fn idx_parser_never_panics_on_mutated_files(
        dims in proptest::collection::vec(0u32..6, 1..4),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let b = mutate(idx_bytes(&dims), &edits, cut);
        if let Ok(a) = parse_idx(&b, Path::new("fuzz")) {
            // A value that parses is consistent with itself.
            prop_assert_eq!(a.dims.iter().product::<usize>(), a.data.len());
        }
    }

    #[test]
    fn idx_headers_with_arbitrary_dimensions_never_panic(
        dims in proptest::collection::vec(any::<u32>(), 1..5),
        data in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in &dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend(data);
        let _ = parse_idx(&b, Path::new("fuzz"));
    }

    #[test]
    fn gzip_and_idx_files_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.gz");
        let mut data = vec![0x1f, 0x8b];
        data.extend(bytes);
        std::fs::write(&p, data).unwrap();
        let _ = ddpm_train::data::read_idx(&p);
    }

    #[test]
    fn respacing_parser_never_panics(num in 1usize..3000, spec in "\\PC{0,12}") {
        if let Ok(steps) = space_timesteps(num, &spec) {
            prop_assert!(steps.iter().all(|&s| s < num));
            prop_assert!(steps.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn respacing_of_number_lists_never_panics(
        num in 1usize..3000,
        counts in proptest::collection::vec(0usize..4000, 0..5),
        ddim in any::<bool>(),
    ) {
        let spec = if ddim {
            format!("ddim{}", counts.first().copied().unwrap_or(0))
        } else {
            counts.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",")
        };
        if let Ok(steps) = space_timesteps(num, &spec) {
            prop_assert!(steps.iter().all(|&s| s < num));
            let s = Schedule::named(BetaSchedule::Cosine, num).unwrap();
            prop_assert!(s.respace_spec(&spec).is_ok());
        }
    }

    #[test]
    fn checkpoint_config_loader_never_panics(
        edits in proptest::collection::vec((any::<usize>(), 0x20u8..0x7f), 0..4),
        cut in proptest::option::of(any::<usize>()),
        junk in "\\PC{0,40}",
        use_junk in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let text = if use_junk {
            junk.into_bytes()
        } else {
            mutate(valid_config().into_bytes(), &edits, cut)
        };
        std::fs::write(dir.path().join("config.json"), text).unwrap();
        if let Ok(meta) = CheckpointMeta::<ddpm_unet::UNetConfig>::read(dir.path()) {
            // Whatever loads builds a model (a valid config is a buildable one).
            let store = ParamStore::new(0, DType::F32, &Device::Cpu);
            if meta.model.model_channels <= 64 && meta.model.channel_mult.len() <= 3 {
                let _ = UNet::new(store.var_builder(), &meta.model);
            }
        }
    }

    #[test]
    fn unet_configs_that_validate_build(
        channels in 1usize..3,
        mult in proptest::collection::vec(0usize..3, 0..3),
        blocks in 0usize..2,
        heads in 0usize..3,
        attention in proptest::collection::vec(0usize..5, 0..2),
        classes in proptest::option::of(0usize..3),
    ) {
        let cfg = UNetConfig {
            model_channels: 32 * channels,
            channel_mult: mult,
            num_res_blocks: blocks,
            num_heads: heads,
            attention_resolutions: attention,
            num_classes: classes,
            ..tiny_unet()
        };
        if cfg.validate().is_ok() {
            let store = ParamStore::new(0, DType::F32, &Device::Cpu);
            prop_assert!(UNet::new(store.var_builder(), &cfg).is_ok(), "{cfg:?}");
        }
    }

    #[test]
    fn safetensors_loaders_never_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        let mut t = HashMap::new();
        t.insert("a".to_string(), Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((2, 3)).unwrap());
        t.insert("b".to_string(), Tensor::new(&[1i64, 2], &Device::Cpu).unwrap());
        ddpm_unet::write_safetensors(&t, &p).unwrap();
        let b = mutate(std::fs::read(&p).unwrap(), &edits, cut);
        std::fs::write(&p, b).unwrap();
        let _ = ddpm_unet::read_safetensors(&p);
        let _ = ddpm_unet::read_safetensors_any(&p);
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        let _ = store.load_safetensors(&p);
    }
}
