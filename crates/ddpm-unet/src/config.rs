//! The UNet configuration, mirroring the original `UNetModel` keyword arguments.

use crate::{Result, UNetError};
use serde::{Deserialize, Serialize};

/// GroupNorm's group count in the original (`normalization` = GroupNorm32).
pub const NORM_GROUPS: usize = 32;

/// Hyperparameters of the UNet, named as the original's `UNetModel` arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    /// Channels of the input image.
    pub in_channels: usize,
    /// Base channel count.
    pub model_channels: usize,
    /// Channels of the output (2·in_channels when sigma is learned).
    pub out_channels: usize,
    /// Residual blocks per resolution level.
    pub num_res_blocks: usize,
    /// Downsample factors (1, 2, 4, ...) at which attention is used.
    pub attention_resolutions: Vec<usize>,
    /// Dropout probability inside residual blocks.
    pub dropout: f64,
    /// Channel multiplier per level.
    pub channel_mult: Vec<usize>,
    /// Number of classes for a class-conditional model.
    pub num_classes: Option<usize>,
    /// Attention heads.
    pub num_heads: usize,
    /// FiLM-like conditioning of the residual blocks on the timestep embedding.
    pub use_scale_shift_norm: bool,
    /// A learned embedding for the null class of classifier-free guidance (Ho & Salimans 2022):
    /// label `num_classes` means "no label", embedded by the parameter `label_emb.null`
    /// (`[1, time_embed_dim]`, beside the original's `label_emb.weight`). Not an argument of the
    /// original; absent from JSON written without it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub null_class: bool,
}

impl UNetConfig {
    /// The MNIST configuration of the reference fixture (1,743,170 parameters).
    pub fn mnist() -> Self {
        Self {
            in_channels: 1,
            model_channels: 32,
            out_channels: 2,
            num_res_blocks: 2,
            attention_resolutions: vec![4],
            dropout: 0.0,
            channel_mult: vec![1, 2, 2],
            num_classes: None,
            num_heads: 4,
            use_scale_shift_norm: true,
            null_class: false,
        }
    }

    /// Parses a JSON config (exactly the original's argument names).
    pub fn from_json(s: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(s)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a UNet config always serialises")
    }

    /// Channels of the timestep embedding.
    pub fn time_embed_dim(&self) -> usize {
        4 * self.model_channels
    }

    /// Checks that the config builds a working network.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(UNetError::Config(m));
        if self.in_channels == 0 || self.out_channels == 0 || self.model_channels == 0 {
            return fail("in_channels, out_channels and model_channels must be positive".into());
        }
        if self.channel_mult.is_empty() || self.channel_mult.contains(&0) {
            return fail(format!(
                "channel_mult {:?} must be non-empty and positive",
                self.channel_mult
            ));
        }
        if self.num_heads == 0 {
            return fail("num_heads must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return fail(format!("dropout {} must be in [0, 1)", self.dropout));
        }
        if self.null_class && self.num_classes.is_none() {
            return fail("null_class (classifier-free guidance) needs num_classes".into());
        }
        if self.num_classes == Some(0) {
            return fail(
                "num_classes must be at least 1 (or null for an unconditional model)".into(),
            );
        }
        let max_ds = 1usize << (self.channel_mult.len() - 1);
        if let Some(r) = self
            .attention_resolutions
            .iter()
            .find(|&&r| r == 0 || r > max_ds || !r.is_power_of_two())
        {
            return fail(format!(
                "attention resolution {r} is not a downsample factor of this network (1..={max_ds}, powers of 2)"
            ));
        }
        for (what, ch) in self.normalized_channels() {
            if ch % NORM_GROUPS != 0 {
                return fail(format!(
                    "{what} has {ch} channels, not divisible by GroupNorm's {NORM_GROUPS} groups"
                ));
            }
        }
        for ch in self.attention_channels() {
            if ch % self.num_heads != 0 {
                return fail(format!(
                    "{} heads do not divide an attention block's {ch} channels",
                    self.num_heads
                ));
            }
        }
        Ok(())
    }

    /// Checks that an image of `height` × `width` goes down and back up to the same size.
    pub fn validate_image_size(&self, height: usize, width: usize) -> Result<()> {
        let factor = 1usize << (self.channel_mult.len() - 1);
        if height == 0
            || width == 0
            || !height.is_multiple_of(factor)
            || !width.is_multiple_of(factor)
        {
            let mut path = vec![height];
            let mut h = height;
            for _ in 1..self.channel_mult.len() {
                h = h.div_ceil(2);
                path.push(h);
            }
            let up: Vec<usize> = (1..self.channel_mult.len()).map(|i| h << i).collect();
            let trace = path
                .iter()
                .chain(&up)
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join("→");
            return Err(UNetError::Config(format!(
                "a {height}×{width} image cannot pass {} levels (each side must be divisible by {factor}: {trace})",
                self.channel_mult.len()
            )));
        }
        Ok(())
    }

    /// Every (layer, channel count) that a GroupNorm normalises, walking the network as built.
    fn normalized_channels(&self) -> Vec<(String, usize)> {
        let mc = self.model_channels;
        let mut out = Vec::new();
        let mut chans = vec![mc];
        let mut ch = mc;
        for (level, &mult) in self.channel_mult.iter().enumerate() {
            for _ in 0..self.num_res_blocks {
                out.push((format!("a level-{level} input res block"), ch));
                ch = mult * mc;
                out.push((format!("a level-{level} input res block"), ch));
                chans.push(ch);
            }
            if level + 1 != self.channel_mult.len() {
                chans.push(ch);
            }
        }
        out.push(("the middle block".into(), ch));
        for (level, &mult) in self.channel_mult.iter().enumerate().rev() {
            for _ in 0..=self.num_res_blocks {
                let skip = chans.pop().unwrap_or(0);
                out.push((
                    format!("a level-{level} output res block (with its skip input)"),
                    ch + skip,
                ));
                ch = mc * mult;
                out.push((format!("a level-{level} output res block"), ch));
            }
        }
        out.push(("the output layer".into(), ch));
        out
    }

    /// Channel counts of every attention block.
    fn attention_channels(&self) -> Vec<usize> {
        let mc = self.model_channels;
        let mut out = Vec::new();
        for (level, &mult) in self.channel_mult.iter().enumerate() {
            if self.attention_resolutions.contains(&(1 << level)) {
                out.push(mult * mc);
            }
        }
        out.push(mc * self.channel_mult[self.channel_mult.len() - 1]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mnist_config_is_valid_and_round_trips_through_json() {
        let cfg = UNetConfig::mnist();
        cfg.validate().unwrap();
        cfg.validate_image_size(28, 28).unwrap();
        let json = cfg.to_json();
        assert!(
            json.contains("\"attention_resolutions\"")
                && json.contains("\"use_scale_shift_norm\": true")
        );
        assert_eq!(UNetConfig::from_json(&json).unwrap(), cfg);
    }

    #[test]
    fn reference_json_parses_and_unknown_names_fail() {
        let s = r#"{"in_channels": 1, "model_channels": 32, "out_channels": 2, "num_res_blocks": 2,
            "attention_resolutions": [4], "dropout": 0.0, "channel_mult": [1, 2, 2],
            "num_classes": null, "num_heads": 4, "use_scale_shift_norm": true}"#;
        assert_eq!(UNetConfig::from_json(s).unwrap(), UNetConfig::mnist());
        let bad = s.replace("num_heads", "heads");
        assert!(UNetConfig::from_json(&bad)
            .unwrap_err()
            .to_string()
            .contains("heads"));
    }

    #[test]
    fn invalid_configs_say_why() {
        let err = |f: fn(&mut UNetConfig)| {
            let mut c = UNetConfig::mnist();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(err(|c| c.model_channels = 48).contains("not divisible by GroupNorm's 32 groups"));
        assert!(err(|c| c.num_heads = 3).contains("3 heads do not divide"));
        assert!(err(|c| c.attention_resolutions = vec![8]).contains("attention resolution 8"));
        assert!(err(|c| c.dropout = 1.0).contains("dropout"));
        assert!(err(|c| c.channel_mult = vec![]).contains("channel_mult"));
        assert!(err(|c| c.num_classes = Some(0)).contains("num_classes"));
    }

    #[test]
    fn image_sizes_that_cannot_come_back_up_are_rejected() {
        let mut c = UNetConfig::mnist();
        c.channel_mult = vec![1, 2, 2, 2];
        let e = c.validate_image_size(28, 28).unwrap_err().to_string();
        assert!(e.contains("28→14→7→4→8"), "{e}");
        c.validate_image_size(32, 32).unwrap();
        assert!(UNetConfig::mnist().validate_image_size(28, 30).is_err());
    }
}
