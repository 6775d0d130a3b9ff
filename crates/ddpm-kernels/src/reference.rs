//! The hot operations as compositions of plain Candle ops: the path on CUDA and Metal, and the
//! oracle that the fast CPU kernels are tested against.

use candle_core::{DType, Result, Tensor, D};

/// 2-D convolution with bias: x `[B, Cin, H, W]`, weight `[Cout, Cin, k, k]`, bias `[Cout]`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let y = x.conv2d(weight, padding, stride, 1, 1)?;
    y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)
}

/// Pointwise convolution on sequences: x `[B, Cin, T]`, weight `[Cout, Cin, 1]`, bias `[Cout]`.
pub fn conv1x1(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    weight
        .squeeze(2)?
        .broadcast_matmul(x)?
        .broadcast_add(&bias.unsqueeze(1)?)
}

/// GroupNorm over `groups` of x [B, C, ...], then `h·(1 + scale) + shift` when given
/// (scale and shift [B, C]), then SiLU when `silu`. Statistics use f32 for half types.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    scale_shift: Option<(&Tensor, &Tensor)>,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let x_dtype = x.dtype();
    let work = match x_dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let xg = x.to_dtype(work)?.reshape((b, groups, ()))?;
    let n = xg.dim(2)? as f64;
    let mean = (xg.sum_keepdim(2)? / n)?;
    let centered = xg.broadcast_sub(&mean)?;
    let var = (centered.sqr()?.sum_keepdim(2)? / n)?;
    let normed = centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape(dims.as_slice())?;
    let mut cshape = vec![1usize; dims.len()];
    cshape[1] = c;
    let mut h = normed
        .broadcast_mul(&weight.to_dtype(work)?.reshape(cshape.as_slice())?)?
        .broadcast_add(&bias.to_dtype(work)?.reshape(cshape.as_slice())?)?
        .to_dtype(x_dtype)?;
    if let Some((scale, shift)) = scale_shift {
        let mut bshape = vec![1usize; dims.len()];
        bshape[0] = b;
        bshape[1] = c;
        let scale = (scale.reshape(bshape.as_slice())? + 1.0)?;
        h = h
            .broadcast_mul(&scale)?
            .broadcast_add(&shift.reshape(bshape.as_slice())?)?;
    }
    if silu {
        h = h.silu()?;
    }
    Ok(h)
}

/// Multi-head QKV attention on qkv [B, heads·3·ch, T] laid out per head as (q, k, v), giving
/// [B, heads·ch, T]. q and k are each scaled by ch^(-1/4) before their product, as the original.
pub fn attention(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, width, t) = qkv.dims3()?;
    let ch = width / (3 * heads);
    let qkv = qkv.reshape((b * heads, 3 * ch, t))?;
    let scale = 1.0 / (ch as f64).sqrt().sqrt();
    let q = (qkv.narrow(1, 0, ch)? * scale)?;
    let k = (qkv.narrow(1, ch, ch)? * scale)?;
    let v = qkv.narrow(1, 2 * ch, ch)?;
    // weight[b, t, s] = sum_c q[b, c, t] k[b, c, s]
    let weight = q.transpose(1, 2)?.contiguous()?.matmul(&k.contiguous()?)?;
    let weight = candle_nn::ops::softmax(&weight, D::Minus1)?;
    // out[b, c, t] = sum_s v[b, c, s] weight[b, t, s]
    let out = v
        .contiguous()?
        .matmul(&weight.transpose(1, 2)?.contiguous()?)?;
    out.reshape((b, heads * ch, t))
}

/// Nearest-neighbour ×2 upsampling of [B, C, H, W].
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))
}
