//! Batches of images as one RGBA grid, laid out as `ddpm-cli sample --out` lays out its PNG.

use candle_core::{DType, Tensor};

/// Pixel value of the border between cells (ddpm-train's grids use the same).
const BORDER: u8 = 128;

/// An RGBA image of a batch: about sqrt(N) columns of cells with a 1-pixel border.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grid {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Row-major RGBA bytes, 4·width·height of them (alpha 255).
    pub rgba: Vec<u8>,
}

impl Grid {
    /// Lays out `x` ([N, C, H, W] in [-1, 1]; bytes (x+1)·127.5 rounded and clamped) in
    /// ceil(sqrt(N)) columns: RGB for three channels, gray (the first channel) otherwise.
    pub fn from_batch(x: &Tensor) -> candle_core::Result<Self> {
        let (n, c, h, w) = x.dims4()?;
        let v: Vec<f32> = x
            .to_dtype(DType::F32)?
            .permute((0, 2, 3, 1))?
            .flatten_all()?
            .to_vec1()?;
        let byte = |p: f32| ((p + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8;
        let cols = ((n as f64).sqrt().ceil() as usize).max(1);
        let rows = n.div_ceil(cols);
        let (width, height) = (cols * (w + 1) + 1, rows * (h + 1) + 1);
        let mut rgba = [BORDER, BORDER, BORDER, 255].repeat(width * height);
        for i in 0..n {
            let (r, col) = (i / cols, i % cols);
            for y in 0..h {
                for xx in 0..w {
                    let at = ((i * h + y) * w + xx) * c;
                    let rgb = if c == 3 {
                        [byte(v[at]), byte(v[at + 1]), byte(v[at + 2])]
                    } else {
                        [byte(v[at]); 3]
                    };
                    let px = (r * (h + 1) + 1 + y) * width + col * (w + 1) + 1 + xx;
                    rgba[4 * px..4 * px + 3].copy_from_slice(&rgb);
                }
            }
        }
        Ok(Self {
            width,
            height,
            rgba,
        })
    }
}
