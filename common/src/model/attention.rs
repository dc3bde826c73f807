//! Self-attention of a Llama block: q/k/v/o projections (each a `LoraLinear`), rotary position
//! embedding, grouped-query attention with a causal mask, and its hand-written backward.
//!
//! Forward, per batch element and key/value head group (the `rep = heads / kv_heads` query heads
//! that share one key/value head are folded into the rows, so K and V are never repeated):
//!
//! ```text
//! Q = rope(x Wqᵀ)   K = rope(x Wkᵀ)   V = x Wvᵀ
//! S = Q Kᵀ                      scores, [rep·T, T]
//! P = softmax(c · S + M)        c = 1/sqrt(head_dim), M = 0 on and below the diagonal, -inf above
//! O = P V                       then y = O Woᵀ
//! ```
//!
//! Backward, from `dO` (the output projection's input gradient):
//!
//! ```text
//! dV = Pᵀ dO
//! dP = dO Vᵀ
//! dS = c · P ⊙ (dP − rowsum(P ⊙ dP))      softmax backward; masked entries have P = 0
//! dQ = dS K          dK = dSᵀ Q           (Q, K as roped)
//! dQ, dK ← rope⁻¹(dQ), rope⁻¹(dK)         the rotation by the opposite angle
//! dx = dQ Wq + dK Wk + dV Wv              summed in one buffer by the GEMMs
//! ```

use super::kv::{self, Heads, HostRope, LayerCache};
use super::linear::{LinearSaved, LoraLinear, StepRows};
use super::{matmul, ops, Grads, TrainCtx};
use crate::config::ModelConfig;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// Rotary tables: `cos`/`sin` of position × inverse frequency, `[max_positions, head_dim/2]`.
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// The tables as f32 rows on the CPU, for `kv::attend_host`.
    host: Option<(Vec<f32>, Vec<f32>)>,
}

impl Rope {
    pub(crate) fn new(cfg: &ModelConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let inv = cfg.rope_inv_freq();
        let n = cfg.max_position_embeddings;
        let inv = Tensor::from_vec(inv.clone(), (1, inv.len()), dev)?;
        let pos = Tensor::arange(0u32, n as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((n, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        let (cos, sin) = (freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?);
        let host = if dev.is_cpu() && dtype == DType::F32 {
            let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            Some((flat(&cos)?, flat(&sin)?))
        } else {
            None
        };
        Ok(Self { cos, sin, host })
    }

    fn host(&self) -> Option<HostRope<'_>> {
        self.host.as_ref().map(|(cos, sin)| HostRope { cos, sin })
    }

    /// The tables of positions `pos..pos + t`.
    fn tables(&self, pos: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let max = self.cos.dim(0)?;
        if pos + t > max {
            candle_core::bail!(
                "sequence of {} positions exceeds max_position_embeddings {max}",
                pos + t
            );
        }
        Ok((self.cos.narrow(0, pos, t)?, self.sin.narrow(0, pos, t)?))
    }
}

pub(crate) struct Attention {
    pub(crate) q: LoraLinear,
    pub(crate) k: LoraLinear,
    pub(crate) v: LoraLinear,
    pub(crate) o: LoraLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// What the backward needs from the forward.
pub(crate) struct AttnSaved {
    lq: LinearSaved,
    lk: LinearSaved,
    lv: LinearSaved,
    lo: LinearSaved,
    /// roped queries `[B, KVH, rep*T, hd]`, roped keys and values `[B, KVH, T, hd]`
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// attention probabilities `[B, KVH, rep*T, T]`
    p: Tensor,
}

/// What `Attention::attend` computes: the output `[B·T, H·hd]` before the output projection,
/// and the roped queries (grouped), keys, values and probabilities.
struct Attended {
    o: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
}

impl Attention {
    pub(crate) fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (h, kv, hd, d) = (
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
            cfg.hidden_size,
        );
        let qb = cfg.qkv_bias();
        Ok(Self {
            q: LoraLinear::load(&vb, "q_proj", d, h * hd, qb)?,
            k: LoraLinear::load(&vb, "k_proj", d, kv * hd, qb)?,
            v: LoraLinear::load(&vb, "v_proj", d, kv * hd, qb)?,
            o: LoraLinear::load(&vb, "o_proj", h * hd, d, cfg.o_bias())?,
            heads: h,
            kv_heads: kv,
            head_dim: hd,
        })
    }

    /// `x: [B, T, D]` at positions `pos..pos+T`. With a cache, keys/values are appended to it.
    /// With `ctx` (training) the activations the backward needs are returned.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        pos: usize,
        rope: &Rope,
        cache: Option<&mut LayerCache>,
        ctx: Option<&TrainCtx>,
    ) -> Result<(Tensor, Option<AttnSaved>)> {
        let (b, t, d) = x.dims3()?;
        let x2 = x.reshape((b * t, d))?;
        let (q, lq) = self.q.forward_t(&x2, ctx)?;
        let (k, lk) = self.k.forward_t(&x2, ctx)?;
        let (v, lv) = self.v.forward_t(&x2, ctx)?;
        let (o, a) = match cache {
            Some(c) if ctx.is_none() && b == 1 && c.host_for(&q) && rope.host().is_some() => {
                (self.attend_host(&q, &k, &v, &mut [(0, t, c)], rope)?, None)
            }
            cache => {
                let a = self.attend(&q, &k, &v, (b, t, pos), rope, cache)?;
                (a.o.clone(), Some(a))
            }
        };
        let (y, lo) = self.o.forward_t(&o, ctx)?;
        let y = y.reshape((b, t, d))?;
        let saved = match (ctx, a) {
            (Some(_), Some(a)) => Some(AttnSaved {
                lq,
                lk,
                lv,
                lo,
                q: a.q,
                k: a.k,
                v: a.v,
                p: a.p,
            }),
            _ => None,
        };
        Ok((y, saved))
    }

    /// The attention of cached sequences on the CPU in f32, all in one pass (`kv::attend_host`).
    fn attend_host(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seqs: &mut [(usize, usize, &mut LayerCache)],
        rope: &Rope,
    ) -> Result<Tensor> {
        let Some(tables) = rope.host() else {
            candle_core::bail!("attend_host: no f32 rotary tables on the CPU");
        };
        let heads = Heads {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        };
        kv::attend_host(q, k, v, seqs, &tables, heads)
    }

    /// The rows of a batched step (`StepRows`), `x: [rows, D]`: the projections over all rows
    /// (`LoraLinear::forward_rows`), the attention per sequence on its own cache (`seqs`: each
    /// sequence's first row, its rows and its cache, in row order), no padding, no mask across
    /// sequences.
    pub(crate) fn forward_rows(
        &self,
        x: &Tensor,
        rows: &StepRows,
        seqs: &mut [(usize, usize, &mut LayerCache)],
        rope: &Rope,
    ) -> Result<Tensor> {
        // q, k and v read one input: their frozen products in one pass
        let [pq, pk, pv] = LoraLinear::prepare([&self.q, &self.k, &self.v], x)?;
        let q = self.q.forward_rows(x, rows, &pq)?;
        let k = self.k.forward_rows(x, rows, &pk)?;
        let v = self.v.forward_rows(x, rows, &pv)?;
        let o = if rope.host().is_some() && seqs.iter().all(|s| s.2.host_for(&q)) {
            self.attend_host(&q, &k, &v, seqs, rope)?
        } else {
            self.attend_each(&q, &k, &v, seqs, rope)?
        };
        let [po] = LoraLinear::prepare([&self.o], &o)?;
        self.o.forward_rows(&o, rows, &po)
    }

    /// The attention of each sequence of a step by tensor ops, one after the other.
    fn attend_each(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seqs: &mut [(usize, usize, &mut LayerCache)],
        rope: &Rope,
    ) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(seqs.len());
        for (start, t, cache) in seqs.iter_mut() {
            let (start, t) = (*start, *t);
            let pos = cache.current_seq_len();
            let a = self.attend(
                &q.narrow(0, start, t)?,
                &k.narrow(0, start, t)?,
                &v.narrow(0, start, t)?,
                (1, t, pos),
                rope,
                Some(cache),
            )?;
            outs.push(a.o);
        }
        if outs.len() == 1 {
            Ok(outs.pop().expect("one sequence"))
        } else {
            Tensor::cat(&outs, 0)
        }
    }

    /// Rotary embedding, the cache and the attention proper for `b` sequences of `t` new
    /// positions from `pos`, from the projections `q`, `k`, `v` (`[b·t, ·]`).
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (b, t, pos): (usize, usize, usize),
        rope: &Rope,
        cache: Option<&mut LayerCache>,
    ) -> Result<Attended> {
        let (hd, kvh) = (self.head_dim, self.kv_heads);
        let rep = self.heads / kvh;
        let (cos, sin) = rope.tables(pos, t)?;
        let q = ops::rope(
            &q.reshape((b, t, self.heads, hd))?.transpose(1, 2)?,
            &cos,
            &sin,
        )?;
        let mut k = ops::rope(&k.reshape((b, t, kvh, hd))?.transpose(1, 2)?, &cos, &sin)?;
        let mut v = v.reshape((b, t, kvh, hd))?.transpose(1, 2)?.contiguous()?;
        let mut past = 0;
        if let Some(c) = cache {
            past = c.current_seq_len();
            // the cached positions and these, as views of the cache
            (k, v) = c.append(&k.contiguous()?, &v)?;
        }
        // grouped-query attention without repeating K/V: the `rep` query heads that share a
        // key/value head become rows
        let qg = q.reshape((b, kvh, rep * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let p = ops::causal_softmax(matmul::matmul(&qg, &k.t()?)?, scale, t, past)?;
        let og = matmul::matmul(&p, &v)?; // [B, KVH, rep*T, hd]
        let o = og
            .reshape((b, self.heads, t, hd))?
            .transpose(1, 2)?
            .reshape((b * t, self.heads * hd))?;
        Ok(Attended { o, q: qg, k, v, p })
    }

    /// Input gradient from the output gradient `dy: [B, T, D]` (see the module doc); LoRA
    /// gradients go into `grads`.
    pub(crate) fn backward(
        &self,
        s: &AttnSaved,
        dy: &Tensor,
        rope: &Rope,
        ctx: &TrainCtx,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let (b, t, d) = dy.dims3()?;
        let (hd, kvh) = (self.head_dim, self.kv_heads);
        let rep = self.heads / kvh;
        let do2 = self
            .o
            .backward(&s.lo, &dy.reshape((b * t, d))?, ctx, grads, None)?;
        let dog = do2
            .reshape((b, t, self.heads, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, kvh, rep * t, hd))?;
        let dv = matmul::matmul(&s.p.t()?, &dog)?; // [B, KVH, T, hd]
        let dp = matmul::matmul(&dog, &s.v.t()?)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let ds = ops::softmax_backward(&s.p, dp, scale)?;
        let dq = matmul::matmul(&ds, &s.k)?.reshape((b, self.heads, t, hd))?;
        let dk = matmul::matmul(&ds.t()?, &s.q)?;
        let (cos, sin) = rope.tables(0, t)?;
        let dq = ops::rope_backward(&dq, &cos, &sin)?;
        let dk = ops::rope_backward(&dk, &cos, &sin)?;
        let flat = |x: Tensor, h: usize| x.transpose(1, 2)?.reshape((b * t, h * hd));
        // the three input gradients are summed into one buffer by the GEMMs
        let dx = self
            .q
            .backward(&s.lq, &flat(dq, self.heads)?, ctx, grads, None)?;
        let dx = self
            .k
            .backward(&s.lk, &flat(dk, kvh)?, ctx, grads, Some(dx))?;
        let dx = self
            .v
            .backward(&s.lv, &flat(dv, kvh)?, ctx, grads, Some(dx))?;
        dx.reshape((b, t, d))
    }
}
