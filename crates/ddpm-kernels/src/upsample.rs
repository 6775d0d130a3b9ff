//! Nearest-neighbour ×2 upsampling as a Candle custom op, with its adjoint (a 2×2 sum) as the
//! backward pass.

use crate::conv::slice;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Nearest ×2 upsampling.
struct Upsample2x;

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "ddpm-upsample2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "upsample x")?;
        let &[b, c, h, w] = l.dims() else {
            bail!("upsample: expected [B, C, H, W]")
        };
        // Every output position is written.
        let mut out = crate::output_buffer(b * c * 4 * h * w);
        out.par_chunks_mut(4 * h * w)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, xi)| {
                for y in 0..2 * h {
                    let src = &xi[(y / 2) * w..(y / 2 + 1) * w];
                    for (xx, v) in o[y * 2 * w..(y + 1) * 2 * w].iter_mut().enumerate() {
                        v.write(src[xx / 2]);
                    }
                }
            });
        // SAFETY: every output position was written.
        let out = unsafe { crate::assume_init(out) };
        Ok((CpuStorage::F32(out), Shape::from((b, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&SumPool2x)?))
    }
}

/// Sums each 2×2 block: the adjoint of nearest ×2 upsampling.
struct SumPool2x;

impl CustomOp1 for SumPool2x {
    fn name(&self) -> &'static str {
        "ddpm-sumpool2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = slice(s, l, "upsample grad")?;
        let &[b, c, h2, w2] = l.dims() else {
            bail!("sumpool: expected [B, C, H, W]")
        };
        let (h, w) = (h2 / 2, w2 / 2);
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(h * w)
            .zip(g.par_chunks(h2 * w2))
            .for_each(|(o, gi)| {
                for y in 0..h2 {
                    for x in 0..w2 {
                        o[(y / 2) * w + x / 2] += gi[y * w2 + x];
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
    }
}

/// Nearest ×2 upsampling through the fast kernel.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Upsample2x)
}
