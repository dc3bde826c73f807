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

/// Whether `t` is an f32 tensor on the CPU (the fused kernels' and fast GEMMs' domain).
pub(crate) fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The contiguous f32 data of a CPU storage (custom-op kernels).
pub(crate) fn f32_slice<'a>(
    st: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> Result<&'a [f32]> {
    match (st, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("CPU kernel: contiguous f32 tensors only"),
    }
}

/// The contiguous f32 data of a CPU storage, mutably (in-place kernels).
pub(crate) fn f32_mut<'a>(
    st: &'a mut candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> Result<&'a mut [f32]> {
    match (st, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("in-place kernel: contiguous f32 CPU tensors only"),
    }
}

/// Runs `f` over the contiguous f32 data of CPU tensors; `None` when any is not such a tensor
/// (the caller then takes the generic path).
pub(crate) fn with_cpu_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (g, l) in &guards {
        match &**g {
            candle_core::Storage::Cpu(st) => slices.push(f32_slice(st, l).ok()?),
            _ => return None,
        }
    }
    Some(f(&slices))
}

/// Rows per parallel task for the fused CPU kernels.
fn par_rows(cols: usize) -> usize {
    (16384 / cols.max(1)).max(1)
}

/// RMSNorm backward with respect to `x` (the weight is frozen). Computed in f32; one fused
/// multi-threaded pass per row on the CPU.
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, eps: f64, dy: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let d = x.dim(candle_core::D::Minus1)?;
    let fused = with_cpu_f32(&[x, w, dy], |s| {
        let (xs, ws, dys) = (s[0], s[1], s[2]);
        let mut out = vec![0f32; xs.len()];
        let rows = par_rows(d);
        out.par_chunks_mut(d * rows).enumerate().for_each(|(c, o)| {
            for (k, orow) in o.chunks_mut(d).enumerate() {
                let i = (c * rows + k) * d;
                let (xr, dr) = (&xs[i..i + d], &dys[i..i + d]);
                let ms: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
                let r = 1.0 / (ms + eps).sqrt();
                let dot: f64 = (0..d)
                    .map(|j| (dr[j] * ws[j]) as f64 * (xr[j] as f64 * r))
                    .sum::<f64>()
                    / d as f64;
                for j in 0..d {
                    let xhat = xr[j] as f64 * r;
                    orow[j] = (r * ((dr[j] * ws[j]) as f64 - xhat * dot)) as f32;
                }
            }
        });
        out
    });
    match fused {
        Some(v) => Tensor::from_vec(v, x.dims(), x.device()),
        None => rms_norm_backward_generic(x, w, eps, dy),
    }
}

/// RMSNorm backward from candle ops (any device and dtype).
pub fn rms_norm_backward_generic(x: &Tensor, w: &Tensor, eps: f64, dy: &Tensor) -> Result<Tensor> {
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

/// Causal softmax of attention scores `s: [.., rows, past + t]` whose rows are the `t` new
/// query positions (repeated for grouped heads folded into the rows):
/// `softmax(scale * s + mask)`, where row `r` sees keys `0..=past + r % t`. On the CPU in f32
/// one fused multi-threaded pass per row, written over `s` in place (so `s` must own its
/// storage: a fresh matmul result); masked entries come out exactly 0.
pub fn causal_softmax(s: Tensor, scale: f64, t: usize, past: usize) -> Result<Tensor> {
    let cols = s.dim(D::Minus1)?;
    if cols != past + t {
        candle_core::bail!("causal_softmax: {cols} key columns for {past} + {t} positions");
    }
    if is_cpu_f32(&s) && s.is_contiguous() {
        s.inplace_op1(&CausalSoftmax { scale, t, past })?;
        return Ok(s);
    }
    let mut x = (s * scale)?;
    if t > 1 {
        let rep = x.dim(D::Minus2)? / t;
        x = x.broadcast_add(&causal_mask(t, past, rep, x.dtype(), x.device())?)?;
    }
    softmax_last_dim(&x)
}

struct CausalSoftmax {
    scale: f64,
    t: usize,
    past: usize,
}

impl candle_core::InplaceOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "dialora-causal-softmax"
    }
    fn cpu_fwd(&self, st: &mut candle_core::CpuStorage, l: &candle_core::Layout) -> Result<()> {
        use rayon::prelude::*;
        let cols = self.past + self.t;
        let data = f32_mut(st, l)?;
        let sc = self.scale as f32;
        data.par_chunks_mut(cols * par_rows(cols))
            .enumerate()
            .for_each(|(c, block)| {
                for (k, row) in block.chunks_mut(cols).enumerate() {
                    let r = c * par_rows(cols) + k;
                    let seen = self.past + r % self.t + 1;
                    let (live, masked) = row.split_at_mut(seen);
                    let max = live.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) * sc;
                    let mut sum = 0f32;
                    for x in live.iter_mut() {
                        *x = (*x * sc - max).exp();
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    live.iter_mut().for_each(|x| *x *= inv);
                    masked.fill(0.0);
                }
            });
        Ok(())
    }
}

/// Softmax backward: `dS = scale * P * (dP - sum(P * dP))` over the last dim; `scale` is the
/// factor the scores were multiplied by before the softmax. On the CPU in f32 one fused pass
/// per row, written over `dp` in place (so `dp` must own its storage).
pub fn softmax_backward(p: &Tensor, dp: Tensor, scale: f64) -> Result<Tensor> {
    let cpu = |t: &Tensor| is_cpu_f32(t) && t.is_contiguous();
    if cpu(p) && cpu(&dp) && p.dims() == dp.dims() {
        dp.inplace_op2(p, &SoftmaxBackward { scale })?;
        return Ok(dp);
    }
    softmax_backward_generic(p, &dp)? * scale
}

struct SoftmaxBackward {
    scale: f64,
}

impl candle_core::InplaceOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "dialora-softmax-backward"
    }
    fn cpu_fwd(
        &self,
        st: &mut candle_core::CpuStorage,
        l: &candle_core::Layout,
        ps: &candle_core::CpuStorage,
        pl: &candle_core::Layout,
    ) -> Result<()> {
        use rayon::prelude::*;
        let d = l.dims().last().copied().unwrap_or(1);
        let dps = f32_mut(st, l)?;
        let ps = f32_slice(ps, pl)?;
        let sc = self.scale as f32;
        let rows = par_rows(d);
        dps.par_chunks_mut(d * rows)
            .enumerate()
            .for_each(|(c, block)| {
                for (k, dr) in block.chunks_mut(d).enumerate() {
                    let i = (c * rows + k) * d;
                    let pr = &ps[i..i + d];
                    let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                    for (g, &pj) in dr.iter_mut().zip(pr) {
                        *g = sc * pj * (*g - dot);
                    }
                }
            });
        Ok(())
    }
}

/// Softmax backward from candle ops.
pub fn softmax_backward_generic(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    let dot = (p * dp)?.sum_keepdim(D::Minus1)?;
    p * dp.broadcast_sub(&dot)?
}

/// SwiGLU: `silu(g) * u` (one fused multi-threaded pass on the CPU).
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let fused = with_cpu_f32(&[g, u], |s| {
        let (gs, us) = (s[0], s[1]);
        let mut out = vec![0f32; gs.len()];
        out.par_chunks_mut(16384).enumerate().for_each(|(c, o)| {
            let base = c * 16384;
            for (j, v) in o.iter_mut().enumerate() {
                let x = gs[base + j];
                *v = x / (1.0 + (-x).exp()) * us[base + j];
            }
        });
        out
    });
    match fused {
        Some(v) => Tensor::from_vec(v, g.dims(), g.device()),
        None => g.silu()? * u,
    }
}

/// SwiGLU backward: returns (dg, du) (one fused multi-threaded pass on the CPU).
pub fn swiglu_backward(g: &Tensor, u: &Tensor, da: &Tensor) -> Result<(Tensor, Tensor)> {
    use rayon::prelude::*;
    let fused = with_cpu_f32(&[g, u, da], |s| {
        let (gs, us, das) = (s[0], s[1], s[2]);
        let n = gs.len();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        dg.par_chunks_mut(16384)
            .zip(du.par_chunks_mut(16384))
            .enumerate()
            .for_each(|(c, (dgc, duc))| {
                let base = c * 16384;
                for j in 0..dgc.len() {
                    let (x, uu, d) = (gs[base + j], us[base + j], das[base + j]);
                    let sig = 1.0 / (1.0 + (-x).exp());
                    duc[j] = d * x * sig;
                    dgc[j] = d * uu * sig * (1.0 + x * (1.0 - sig));
                }
            });
        (dg, du)
    });
    match fused {
        Some((dg, du)) => Ok((
            Tensor::from_vec(dg, g.dims(), g.device())?,
            Tensor::from_vec(du, g.dims(), g.device())?,
        )),
        None => swiglu_backward_generic(g, u, da),
    }
}

/// SwiGLU backward from candle ops.
pub fn swiglu_backward_generic(g: &Tensor, u: &Tensor, da: &Tensor) -> Result<(Tensor, Tensor)> {
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
/// `scale * (softmax(x) - onehot(target))`, written over the logits in place (so `logits` must
/// own its storage: a fresh matmul result). Returns (per-row losses, gradient `[rows, V]`).
/// The generic path (`Llama::loss_head`) covers other devices and dtypes; the two agree
/// (tested).
pub fn cross_entropy_cpu_f32(
    logits: Tensor,
    targets: &[u32],
    scale: Option<f64>,
) -> Result<(Vec<f64>, Option<Tensor>)> {
    use rayon::prelude::*;
    let (c, _) = logits.dims2()?;
    if targets.len() != c {
        candle_core::bail!("cross_entropy: {} targets for {c} rows", targets.len());
    }
    match scale {
        Some(scale) => {
            let op = CrossEntropyGrad {
                targets,
                scale,
                losses: std::sync::Mutex::new(Vec::new()),
            };
            logits.inplace_op1(&op)?;
            let losses = op.losses.into_inner().unwrap_or_default();
            Ok((losses, Some(logits)))
        }
        None => {
            let losses = with_cpu_f32(&[&logits], |s| {
                let v = s[0].len() / c.max(1);
                (0..c)
                    .into_par_iter()
                    .map(|i| {
                        let row = &s[0][i * v..(i + 1) * v];
                        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                        let sum: f64 = row.iter().map(|&x| ((x - max).exp()) as f64).sum();
                        max as f64 + sum.ln() - row[targets[i] as usize] as f64
                    })
                    .collect::<Vec<f64>>()
            });
            match losses {
                Some(l) => Ok((l, None)),
                None => candle_core::bail!("cross_entropy_cpu_f32: contiguous f32 CPU logits only"),
            }
        }
    }
}

struct CrossEntropyGrad<'a> {
    targets: &'a [u32],
    scale: f64,
    losses: std::sync::Mutex<Vec<f64>>,
}

impl candle_core::InplaceOp1 for CrossEntropyGrad<'_> {
    fn name(&self) -> &'static str {
        "dialora-cross-entropy"
    }
    fn cpu_fwd(&self, st: &mut candle_core::CpuStorage, l: &candle_core::Layout) -> Result<()> {
        use rayon::prelude::*;
        let data = f32_mut(st, l)?;
        let v = l.dims()[1];
        let mut losses = vec![0f64; self.targets.len()];
        data.par_chunks_mut(v)
            .zip(losses.par_iter_mut())
            .zip(self.targets.par_iter())
            .for_each(|((row, loss), &t)| {
                let t = t as usize;
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let picked = row[t];
                let mut sum = 0f64;
                for x in row.iter_mut() {
                    let e = (*x - max).exp();
                    *x = e;
                    sum += e as f64;
                }
                *loss = max as f64 + sum.ln() - picked as f64;
                let f = (self.scale / sum) as f32;
                row.iter_mut().for_each(|g| *g *= f);
                row[t] -= self.scale as f32;
            });
        *self.losses.lock().unwrap() = losses;
        Ok(())
    }
}
