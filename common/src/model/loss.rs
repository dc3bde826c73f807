//! The language-model loss: ignore-index token cross-entropy over the label positions, computed
//! chunk by chunk through the output head so the full `[tokens, vocab]` logits never exist at
//! once, with its gradient with respect to the final hidden states.
//!
//! For a label position with hidden state `h` and target `y`, logits `z = h Hᵀ` (`H` the output
//! head, `[V, D]`):
//!
//! ```text
//! loss = logsumexp(z) − z[y]
//! dz   = s · (softmax(z) − onehot(y))       s = the caller's grad_scale
//! dh   = dz H
//! ```
//!
//! `s` is `1 / (label tokens of the whole accumulated batch)`: the loss is normalised over the
//! accumulated batch, not per micro-batch.

use super::{matmul, ops};
use candle_core::{DType, Result, Tensor};

/// A training micro-batch: `input_ids [B, T]` and labels aligned with them (`-100` = ignored;
/// the loss at position t predicts `labels[t+1]`, as in HF).
pub struct Batch {
    pub input_ids: Tensor,
    pub labels: Vec<i64>,
}

/// Sum of token losses and the number of label tokens that contributed.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossStats {
    pub loss_sum: f64,
    pub tokens: usize,
}

/// Positions with a target: (flat row index, target id) for every `t` with `labels[t+1] != -100`.
pub(crate) fn targets(b: usize, t: usize, labels: &[i64]) -> (Vec<u32>, Vec<u32>) {
    let (mut rows, mut tg) = (Vec::new(), Vec::new());
    for bi in 0..b {
        for ti in 0..t.saturating_sub(1) {
            let l = labels[bi * t + ti + 1];
            if l >= 0 {
                rows.push((bi * t + ti) as u32);
                tg.push(l as u32);
            }
        }
    }
    (rows, tg)
}

/// Cross-entropy over the rows `rows` of `h: [N, D]` (final-normed hidden states) against
/// `tg`, through `head: [V, D]`. With `grad_scale`, also returns `dL/dh` for the loss
/// `grad_scale * sum(token losses)`. Returns the summed token loss.
pub(crate) fn loss_head(
    h: &Tensor,
    head: &Tensor,
    rows: &[u32],
    tg: &[u32],
    grad_scale: Option<f64>,
) -> Result<(f64, Option<Tensor>)> {
    let v = head.dim(0)?;
    // ~8M logits per chunk: bounded memory whatever the vocabulary and batch
    let chunk = (8 * 1024 * 1024 / v).max(1);
    // per-row losses stay on the device; one transfer at the end
    let mut losses: Vec<Tensor> = Vec::new();
    let mut dh = match grad_scale {
        Some(_) => Some(h.zeros_like()?),
        None => None,
    };
    // the positions and targets go to the device once
    let all_idx = Tensor::from_slice(rows, rows.len(), h.device())?;
    let all_tgt = Tensor::from_slice(tg, tg.len(), h.device())?;
    for start in (0..rows.len()).step_by(chunk) {
        let n = chunk.min(rows.len() - start);
        let idx = all_idx.narrow(0, start, n)?;
        let tgt = all_tgt.narrow(0, start, n)?;
        let hs = h.index_select(&idx, 0)?;
        let logits = matmul::matmul(&hs, &head.t()?)?;
        let (l, dlogits) = ops::cross_entropy(logits, &tgt, grad_scale)?;
        losses.push(l);
        if let (Some(dl), Some(dh)) = (dlogits, dh.as_mut()) {
            let dhs = matmul::matmul(&dl.to_dtype(h.dtype())?, head)?;
            *dh = dh.index_add(&idx, &dhs, 0)?;
        }
    }
    let loss = Tensor::cat(&losses, 0)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok((loss, dh))
}
