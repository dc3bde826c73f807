//! Building blocks with their backward passes. The forward passes use candle's fused kernels
//! (which record no autograd graph); every backward here is written out and checked against
//! finite differences in `model::tests`.

use candle_core::{DType, Result, Tensor, D};

/// RMSNorm forward: `x / sqrt(mean(x^2) + eps) * w` over the last dim.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == DType::F64 {
        // the fused kernel has no f64 path (used by the gradient checks)
        return candle_nn::ops::rms_norm_slow(x, w, eps as f32);
    }
    candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
}

/// RMSNorm backward with respect to `x` (the weight is frozen). Computed in f32.
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, eps: f64, dy: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let up = |t: &Tensor| {
        if dt == DType::F64 {
            Ok(t.clone())
        } else {
            t.to_dtype(DType::F32)
        }
    };
    let (x, w, dy) = (up(x)?, up(w)?, up(dy)?);
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?; // [N,1]
    let xhat = x.broadcast_mul(&r)?;
    let g = dy.broadcast_mul(&w)?;
    let m = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = (g - xhat.broadcast_mul(&m)?)?.broadcast_mul(&r)?;
    dx.to_dtype(dt)
}

/// Rotary embedding (HF rotate-half layout) of `x: [B, H, T, hd]` with tables `[T, hd/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F64 {
        return candle_nn::rotary_emb::rope_slow(&x.contiguous()?, cos, sin);
    }
    candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
}

/// RoPE is a rotation: its backward is the rotation by the opposite angle.
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope(dy, cos, &sin.neg()?)
}

/// Softmax over the last dim (fused kernel), computed in f32 for half-precision inputs.
pub fn softmax_last_dim(s: &Tensor) -> Result<Tensor> {
    match s.dtype() {
        DType::F32 => candle_nn::ops::softmax_last_dim(s),
        DType::F64 => candle_nn::ops::softmax(s, D::Minus1),
        dt => candle_nn::ops::softmax_last_dim(&s.to_dtype(DType::F32)?)?.to_dtype(dt),
    }
}

/// Softmax backward: `dS = P * (dP - sum(P * dP))` over the last dim.
pub fn softmax_backward(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    let dot = (p * dp)?.sum_keepdim(D::Minus1)?;
    p * dp.broadcast_sub(&dot)?
}

/// SwiGLU: `silu(g) * u`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.silu()? * u
}

/// SwiGLU backward: returns (dg, du).
pub fn swiglu_backward(g: &Tensor, u: &Tensor, da: &Tensor) -> Result<(Tensor, Tensor)> {
    let sig = candle_nn::ops::sigmoid(g)?;
    let silu = (g * &sig)?;
    let du = (da * &silu)?;
    // d silu / dg = sig * (1 + g * (1 - sig))
    let one_minus = sig.affine(-1.0, 1.0)?;
    let dsilu = (&sig * (g * one_minus)?.affine(1.0, 1.0)?)?;
    let dg = ((da * u)? * dsilu)?;
    Ok((dg, du))
}

/// Additive causal mask `[rows, past + t]` for `t` new positions after `past` cached ones,
/// repeated `rep` times along the rows (grouped-query heads folded into the row dim).
pub fn causal_mask(
    t: usize,
    past: usize,
    rep: usize,
    dtype: DType,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let cols = past + t;
    let mut v = Vec::with_capacity(rep * t * cols);
    for _ in 0..rep {
        for i in 0..t {
            for j in 0..cols {
                v.push(if j > past + i { f32::NEG_INFINITY } else { 0.0 });
            }
        }
    }
    Tensor::from_vec(v, (rep * t, cols), dev)?.to_dtype(dtype)
}

/// Fused cross-entropy over rows of f32 logits on the CPU: one multi-threaded pass per row
/// computes the token loss `logsumexp(x) - x[target]` and, when `scale` is given, the gradient
/// `scale * (softmax(x) - onehot(target))`. Returns (per-row losses, gradient `[rows, V]`).
/// The generic path (`Llama::loss_head`) covers other devices and dtypes; the two agree
/// (tested).
pub fn cross_entropy_cpu_f32(
    logits: &Tensor,
    targets: &[u32],
    scale: Option<f64>,
) -> Result<(Vec<f64>, Option<Tensor>)> {
    use rayon::prelude::*;
    let (c, v) = logits.dims2()?;
    let data: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    let mut losses = vec![0f64; c];
    let mut grad = if scale.is_some() {
        vec![0f32; c * v]
    } else {
        Vec::new()
    };
    let row_loss = |row: &[f32], t: usize, g: Option<&mut [f32]>| -> f64 {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0f64;
        match g {
            Some(g) => {
                for (gj, &x) in g.iter_mut().zip(row) {
                    let e = (x - max).exp();
                    *gj = e;
                    sum += e as f64;
                }
                let s = scale.unwrap_or(1.0);
                let f = (s / sum) as f32;
                g.iter_mut().for_each(|gj| *gj *= f);
                g[t] -= s as f32;
            }
            None => sum = row.iter().map(|&x| ((x - max).exp()) as f64).sum(),
        }
        max as f64 + sum.ln() - row[t] as f64
    };
    if scale.is_some() {
        grad.par_chunks_mut(v)
            .zip(losses.par_iter_mut())
            .enumerate()
            .for_each(|(i, (g, l))| {
                *l = row_loss(&data[i * v..(i + 1) * v], targets[i] as usize, Some(g))
            });
    } else {
        losses
            .par_iter_mut()
            .enumerate()
            .for_each(|(i, l)| *l = row_loss(&data[i * v..(i + 1) * v], targets[i] as usize, None));
    }
    let grad = match scale {
        Some(_) => Some(Tensor::from_vec(grad, (c, v), logits.device())?),
        None => None,
    };
    Ok((losses, grad))
}
