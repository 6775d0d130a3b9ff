//! Image grids: batches of samples as one PNG (or animation frames).

use crate::{Result, TrainError};
use candle_core::{DType, Tensor};
use image::{DynamicImage, GrayImage, Luma, Rgb, RgbImage};
use std::path::Path;

/// Pixel value of the border between grid cells.
const BORDER: u8 = 128;

/// Converts [N, C, H, W] in [-1, 1] to bytes (x+1)·127.5, rounded and clamped, NHWC order.
pub fn to_u8_nhwc(x: &Tensor) -> Result<(Vec<u8>, [usize; 4])> {
    let (n, c, h, w) = x.dims4()?;
    let v: Vec<f32> = x
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1()?;
    let bytes = v
        .iter()
        .map(|p| ((p + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
        .collect();
    Ok((bytes, [n, h, w, c]))
}

/// Lays out a batch of images in a grid of about sqrt(N) columns with a 1-pixel border: RGB for
/// three channels, grayscale otherwise (the first channel).
pub fn make_grid(x: &Tensor) -> Result<DynamicImage> {
    let n = x.dim(0)?;
    make_grid_cols(x, (n as f64).sqrt().ceil().max(1.0) as usize)
}

/// [`make_grid`] with `cols` columns, filled row by row.
pub fn make_grid_cols(x: &Tensor, cols: usize) -> Result<DynamicImage> {
    let (bytes, [n, h, w, c]) = to_u8_nhwc(x)?;
    if n == 0 || cols == 0 {
        return Err(TrainError::Config(
            "cannot make a grid of zero images".into(),
        ));
    }
    let rows = n.div_ceil(cols);
    let (gw, gh) = (cols * (w + 1) + 1, rows * (h + 1) + 1);
    let cell = |i: usize, y: usize, xx: usize| {
        let (r, col) = (i / cols, i % cols);
        let at = ((i * h + y) * w + xx) * c;
        (
            (col * (w + 1) + 1 + xx) as u32,
            (r * (h + 1) + 1 + y) as u32,
            at,
        )
    };
    if c == 3 {
        let mut img = RgbImage::from_pixel(gw as u32, gh as u32, Rgb([BORDER; 3]));
        for i in 0..n {
            for y in 0..h {
                for xx in 0..w {
                    let (px, py, at) = cell(i, y, xx);
                    img.put_pixel(px, py, Rgb([bytes[at], bytes[at + 1], bytes[at + 2]]));
                }
            }
        }
        return Ok(DynamicImage::ImageRgb8(img));
    }
    let mut img = GrayImage::from_pixel(gw as u32, gh as u32, Luma([BORDER]));
    for i in 0..n {
        for y in 0..h {
            for xx in 0..w {
                let (px, py, at) = cell(i, y, xx);
                img.put_pixel(px, py, Luma([bytes[at]]));
            }
        }
    }
    Ok(DynamicImage::ImageLuma8(img))
}

/// Saves a batch as a PNG grid, atomically.
pub fn save_grid_png(x: &Tensor, path: &Path) -> Result<()> {
    save_png_atomically(&make_grid(x)?, path)
}

/// Encodes a PNG and writes it with [`crate::run_folder::write_atomically`].
pub fn save_png_atomically(img: &image::DynamicImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| TrainError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    crate::run_folder::write_atomically(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use image::GenericImageView;

    #[test]
    fn grid_layout_and_pixel_values() {
        let x = Tensor::new(&[-1.0f32, 1.0, 0.0, 0.5, -1.0], &Device::Cpu)
            .unwrap()
            .reshape((5, 1, 1, 1))
            .unwrap();
        let g = make_grid(&x).unwrap();
        // 5 images -> 3 columns, 2 rows of 1x1 cells with borders.
        assert_eq!(g.dimensions(), (7, 5));
        assert_eq!(g.get_pixel(1, 1).0[0], 0);
        assert_eq!(g.get_pixel(3, 1).0[0], 255);
        assert_eq!(g.get_pixel(5, 1).0[0], 128); // 0.0 -> 127.5 rounds to 128
        assert_eq!(g.get_pixel(1, 3).0[0], 191); // 0.5 -> 191.25
        assert_eq!(g.get_pixel(0, 0).0[0], BORDER);
        assert_eq!(g.get_pixel(5, 3).0[0], BORDER); // empty sixth cell
    }
}
