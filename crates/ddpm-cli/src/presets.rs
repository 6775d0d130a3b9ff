//! Training presets, defined once: `ddpm-cli train --preset`, `cargo xtask train-mnist`, the
//! end-to-end tests and the golden model all take theirs from here.

use crate::train::TrainArgs;
use ddpm_train::{DiffusionSettings, TrainConfig};
use ddpm_unet::UNetConfig;

/// Training presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// A few steps of a small model: checks the whole pipeline in under a minute.
    Tiny,
    /// The base recipe for a few minutes.
    Small,
    /// The main job: the MNIST UNet with one residual block per level, batch 64, for about 12.5
    /// minutes on two Zen 5 cores, with lr warm-up and cosine decay, Min-SNR-5 weighting and the
    /// EMA warm-up.
    Base,
    /// The original recipe this project started with (6,000 steps at lr 2e-4, plain EMA 0.999,
    /// 45 minutes here), kept for comparison.
    Classic,
    /// The original's CIFAR-10 model and recipe (improved-diffusion's README: 128 channels,
    /// channel_mult 1,2,2,2, 3 residual blocks, attention at 16 and 8, dropout 0.3, 4000 cosine
    /// steps, lr 1e-4, batch 128), for 32x32 RGB data: a GPU's job.
    Cifar10,
    /// A small RGB model for 32x32 colour images that trains on a CPU (32 channels, one
    /// residual block per level, attention at 8x8).
    RgbSmall,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 6] = [
        Preset::Tiny,
        Preset::Small,
        Preset::Base,
        Preset::Classic,
        Preset::Cifar10,
        Preset::RgbSmall,
    ];

    /// The side of the square images the preset is made for (28 for MNIST, 32 for the RGB
    /// ones).
    pub fn image_size(self) -> usize {
        match self {
            Preset::Cifar10 | Preset::RgbSmall => 32,
            _ => 28,
        }
    }

    /// The channels of the images the preset is made for.
    pub fn channels(self) -> usize {
        match self {
            Preset::Cifar10 | Preset::RgbSmall => 3,
            _ => 1,
        }
    }

    /// The flags of the preset's network (the rest are the UNet's defaults, the original's
    /// MNIST shape).
    pub fn model_flags(self) -> &'static [&'static str] {
        match self {
            // One residual block per level instead of two: 30% fewer FLOPs per image, and at
            // the same minutes the images it gains are worth more than the depth it loses
            // (README, "recipes tried").
            Preset::Small | Preset::Base => &["--num-res-blocks", "1"],
            Preset::Tiny => &[
                "--channel-mult",
                "1,2",
                "--num-res-blocks",
                "1",
                "--attention-resolutions",
                "14",
                "--num-heads",
                "1",
            ],
            Preset::Classic => &[],
            Preset::Cifar10 => &[
                "--num-channels",
                "128",
                "--channel-mult",
                "1,2,2,2",
                "--num-res-blocks",
                "3",
                "--attention-resolutions",
                "16,8",
                "--dropout",
                "0.3",
            ],
            Preset::RgbSmall => &[
                "--num-channels",
                "32",
                "--channel-mult",
                "1,2,2",
                "--num-res-blocks",
                "1",
                "--attention-resolutions",
                "8",
            ],
        }
    }

    /// The `ddpm-cli train` flags of the preset (later flags override them).
    pub fn flags(self) -> Vec<&'static str> {
        let preset = self;
        // The recipe `small` and `base` share; each adds its length and intervals.
        const RECIPE: &[&str] = &[
            "--batch-size",
            "64",
            "--lr",
            "1e-3",
            "--lr-schedule",
            "cosine",
            "--snr-gamma",
            "5",
            "--ema-warmup",
            "--ema-rate",
            "0.999",
            "--log-interval",
            "10",
            "--sample-respacing",
            "25",
        ];
        let recipe: &[&str] = match preset {
            Preset::Small | Preset::Base | Preset::RgbSmall => RECIPE,
            Preset::Tiny | Preset::Classic | Preset::Cifar10 => &[],
        };
        let extra: &[&str] = match preset {
            Preset::Cifar10 => &[
                "--diffusion-steps",
                "4000",
                "--noise-schedule",
                "cosine",
                "--lr",
                "1e-4",
                "--batch-size",
                "128",
                "--ema-rate",
                "0.9999",
                "--steps",
                "500000",
                "--save-interval",
                "10000",
                "--sample-interval",
                "10000",
                "--random-flip",
            ],
            Preset::RgbSmall => &[
                "--batch-size",
                "32",
                "--steps",
                "1500",
                "--lr-warmup-steps",
                "100",
                "--save-interval",
                "500",
                "--sample-interval",
                "500",
                "--random-flip",
            ],
            Preset::Tiny => &[
                "--batch-size",
                "8",
                "--steps",
                "12",
                "--lr",
                "2e-4",
                "--ema-rate",
                "0.9",
                "--log-interval",
                "4",
                "--save-interval",
                "6",
                "--sample-interval",
                "12",
                "--sample-count",
                "4",
                "--sample-respacing",
                "10",
            ],
            Preset::Small => &[
                "--steps",
                "500",
                "--lr-warmup-steps",
                "100",
                "--save-interval",
                "250",
                "--sample-interval",
                "250",
            ],
            Preset::Base => &[
                "--steps",
                "2700",
                "--lr-warmup-steps",
                "200",
                "--save-interval",
                "675",
                "--keep-checkpoints",
                "0",
                "--sample-interval",
                "1350",
            ],
            Preset::Classic => &[
                "--batch-size",
                "32",
                "--steps",
                "6000",
                "--lr",
                "2e-4",
                "--ema-rate",
                "0.999",
                "--log-interval",
                "10",
                "--save-interval",
                "250",
                "--sample-interval",
                "500",
                "--sample-respacing",
                "100",
            ],
        };
        [self.model_flags(), recipe, extra].concat()
    }

    /// The preset's settings as `ddpm-cli train` parses them (data and output folders at their
    /// defaults; a later flag overrides an earlier one, as on the command line).
    pub fn train_args(self) -> anyhow::Result<TrainArgs> {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(subcommand)]
            cmd: Cmd,
        }
        #[derive(clap::Subcommand)]
        enum Cmd {
            #[command(args_override_self = true, allow_negative_numbers = true)]
            Train(TrainArgs),
        }
        let argv = ["ddpm-cli", "train"].into_iter().chain(self.flags());
        let Cmd::Train(args) = <Wrapper as clap::Parser>::try_parse_from(argv)?.cmd;
        Ok(args)
    }

    /// The preset's model, diffusion and training settings for the images it is made for
    /// ([`Self::channels`], [`Self::image_size`]).
    pub fn configs(self) -> anyhow::Result<(UNetConfig, DiffusionSettings, TrainConfig)> {
        let t = self.train_args()?;
        let model = t.model_config_for(self.channels(), self.image_size(), 10)?;
        Ok((model, t.diffusion(), t.train_config()?))
    }
}
