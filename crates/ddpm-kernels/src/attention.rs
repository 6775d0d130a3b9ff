//! Multi-head self-attention over few positions (the UNet's 7×7 maps: 49), as one CPU op.
//!
//! Composed of Candle ops, attention on [B·heads, ch, 49] spends its time in narrows,
//! transposes, copies and the autograd bookkeeping of each, not in arithmetic (a few MFLOP).
//! Here each (image, head) is five small single-threaded GEMMs and a softmax, the heads spread
//! over rayon's pool; the backward pass recomputes the attention weights rather than keep them.

use crate::conv::{matmul, slice};
use crate::group_norm::exp_fast;
use crate::profile::{timed, OpClass};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// QKV attention: qkv [B, heads·3·ch, T], per head (q, k, v) → [B, heads·ch, T].
struct Attention {
    heads: usize,
}

impl Attention {
    fn dims(&self, d: &[usize]) -> Result<(usize, usize, usize)> {
        let &[b, width, t] = d else {
            bail!("attention: qkv must be [B, heads·3·ch, T], got {d:?}")
        };
        if self.heads == 0 || width % (3 * self.heads) != 0 {
            bail!("attention: width {width} is not 3·ch·{} heads", self.heads);
        }
        Ok((b, width / (3 * self.heads), t))
    }

    /// P [T, T] = softmax_s(Σ_c q[c, t]·k[c, s] / √ch) of one head.
    fn weights(q: &[f32], k: &[f32], ch: usize, t: usize, p: &mut [f32]) {
        // Σ over ch of qᵀ (strided) times k.
        matmul(t, t, ch, p, false, q, (1, t as isize), k, (t as isize, 1));
        let scale = 1.0 / (ch as f32).sqrt();
        for row in p.chunks_mut(t) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
            // The exponentials in a loop of their own, which vectorises (a running sum in the
            // same loop kept it scalar: a fifth of the attention op's time).
            for v in row.iter_mut() {
                *v = exp_fast(*v * scale - max);
            }
            let inv = 1.0 / row.iter().sum::<f32>();
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

/// Head i's (q, k, v), each [ch, T] (`n` = ch·T values), from qkv laid out head by head.
fn head(qkv: &[f32], i: usize, n: usize) -> (&[f32], &[f32], &[f32]) {
    let h = &qkv[i * 3 * n..(i + 1) * 3 * n];
    (&h[..n], &h[n..2 * n], &h[2 * n..])
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "ddpm-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = slice(s, l, "attention qkv")?;
        let (b, ch, t) = self.dims(l.dims())?;
        let mut out = vec![0f32; b * self.heads * ch * t];
        out.par_chunks_mut(ch * t).enumerate().for_each_init(
            || vec![0f32; t * t],
            |p, (i, o)| {
                let (q, k, v) = head(qkv, i, ch * t);
                Self::weights(q, k, ch, t, p);
                // out[c, t] = Σ_s v[c, s]·P[t, s]
                matmul(ch, t, t, o, false, v, (t as isize, 1), p, (1, t as isize));
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, self.heads * ch, t))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        timed(OpClass::Attention, || {
            let g = grad.contiguous()?;
            Ok(Some(qkv.apply_op2_no_bwd(
                &g,
                &AttentionBackward { heads: self.heads },
            )?))
        })
    }
}

/// d(qkv) from qkv and d(out), in qkv's layout.
struct AttentionBackward {
    heads: usize,
}

impl CustomOp2 for AttentionBackward {
    fn name(&self) -> &'static str {
        "ddpm-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (qkv, dout) = (
            slice(s1, l1, "attention qkv")?,
            slice(s2, l2, "attention grad")?,
        );
        let (b, ch, t) = Attention { heads: self.heads }.dims(l1.dims())?;
        if l2.dims() != [b, self.heads * ch, t] {
            bail!("attention backward: gradient {:?} does not fit", l2.dims());
        }
        let scale = 1.0 / (ch as f32).sqrt();
        let mut dqkv = vec![0f32; qkv.len()];
        dqkv.par_chunks_mut(3 * ch * t).enumerate().for_each_init(
            || (vec![0f32; t * t], vec![0f32; t * t]),
            |(p, dp), (i, dh)| {
                let (q, k, v) = head(qkv, i, ch * t);
                let d_o = &dout[i * ch * t..(i + 1) * ch * t];
                Attention::weights(q, k, ch, t, p);
                let (dq, rest) = dh.split_at_mut(ch * t);
                let (dk, dv) = rest.split_at_mut(ch * t);
                let (ti, one) = (t as isize, 1isize);
                // dV[c, s] = Σ_t dO[c, t]·P[t, s];  dP[t, s] = Σ_c dO[c, t]·v[c, s]
                matmul(ch, t, t, dv, false, d_o, (ti, one), p, (ti, one));
                matmul(t, t, ch, dp, false, d_o, (one, ti), v, (ti, one));
                // Through the softmax: dW = P ⊙ (dP - Σ_s P·dP), times the logits' scale.
                for (pr, dr) in p.chunks(t).zip(dp.chunks_mut(t)) {
                    let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                    for (d, &pv) in dr.iter_mut().zip(pr) {
                        *d = pv * (*d - dot) * scale;
                    }
                }
                // dQ[c, t] = Σ_s k[c, s]·dW[t, s];  dK[c, s] = Σ_t q[c, t]·dW[t, s]
                matmul(ch, t, t, dq, false, k, (ti, one), dp, (one, ti));
                matmul(ch, t, t, dk, false, q, (ti, one), dp, (ti, one));
            },
        );
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}

/// Attention through the fused kernel (the input is made contiguous first).
pub fn attention(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let qkv = qkv.contiguous()?;
    timed(OpClass::Attention, || qkv.apply_op1(Attention { heads }))
}
