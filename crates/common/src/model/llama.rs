use super::linear::{LinearSaved, Lora, LoraLinear};
use super::{gemm, ops};
use super::{Grads, TrainCtx};
use crate::config::ModelConfig;
use crate::lora::LoraConfig;
use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use candle_nn::VarBuilder;

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight, self.eps)
    }
    fn backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        ops::rms_norm_backward(x, &self.weight, self.eps, dy)
    }
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &ModelConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let inv = cfg.rope_inv_freq();
        let n = cfg.max_position_embeddings;
        let inv = Tensor::from_vec(inv.clone(), (1, inv.len()), dev)?;
        let pos = Tensor::arange(0u32, n as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((n, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }
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

struct Attention {
    q: LoraLinear,
    k: LoraLinear,
    v: LoraLinear,
    o: LoraLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

struct AttnSaved {
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

impl Attention {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
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
    fn forward(
        &self,
        x: &Tensor,
        pos: usize,
        rope: &Rope,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        ctx: Option<&TrainCtx>,
    ) -> Result<(Tensor, Option<AttnSaved>)> {
        let (b, t, d) = x.dims3()?;
        let (hd, kvh) = (self.head_dim, self.kv_heads);
        let rep = self.heads / kvh;
        let x2 = x.reshape((b * t, d))?;
        let (q, lq) = self.q.forward_t(&x2, ctx)?;
        let (k, lk) = self.k.forward_t(&x2, ctx)?;
        let (v, lv) = self.v.forward_t(&x2, ctx)?;
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
            if let Some((pk, pv)) = c.as_ref() {
                past = pk.dim(2)?;
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *c = Some((k.clone(), v.clone()));
        }
        // Grouped-query attention without repeating K/V: fold the `rep` query heads that share
        // a key/value head into the row dimension.
        let qg = q.reshape((b, kvh, rep * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let p = ops::causal_softmax(gemm::matmul(&qg, &k.t()?)?, scale, t, past)?;
        let og = gemm::matmul(&p, &v)?; // [B, KVH, rep*T, hd]
        let o2 = og
            .reshape((b, self.heads, t, hd))?
            .transpose(1, 2)?
            .reshape((b * t, self.heads * hd))?;
        let (y, lo) = self.o.forward_t(&o2, ctx)?;
        let y = y.reshape((b, t, d))?;
        let saved = ctx.map(|_| AttnSaved {
            lq,
            lk,
            lv,
            lo,
            q: qg,
            k,
            v,
            p,
        });
        Ok((y, saved))
    }

    fn backward(
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
        let dv = gemm::matmul(&s.p.t()?, &dog)?; // [B, KVH, T, hd]
        let dp = gemm::matmul(&dog, &s.v.t()?)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let ds = ops::softmax_backward(&s.p, dp, scale)?;
        let dq = gemm::matmul(&ds, &s.k)?.reshape((b, self.heads, t, hd))?;
        let dk = gemm::matmul(&ds.t()?, &s.q)?;
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

struct Mlp {
    gate: LoraLinear,
    up: LoraLinear,
    down: LoraLinear,
}

struct MlpSaved {
    lg: LinearSaved,
    lu: LinearSaved,
    ld: LinearSaved,
    g: Tensor,
    u: Tensor,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate: LoraLinear::load(&vb, "gate_proj", d, f, false)?,
            up: LoraLinear::load(&vb, "up_proj", d, f, false)?,
            down: LoraLinear::load(&vb, "down_proj", f, d, false)?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: Option<&TrainCtx>) -> Result<(Tensor, Option<MlpSaved>)> {
        let (b, t, d) = x.dims3()?;
        let x2 = x.reshape((b * t, d))?;
        let (g, lg) = self.gate.forward_t(&x2, ctx)?;
        let (u, lu) = self.up.forward_t(&x2, ctx)?;
        let a = ops::swiglu(&g, &u)?;
        let (y, ld) = self.down.forward_t(&a, ctx)?;
        Ok((
            y.reshape((b, t, d))?,
            ctx.map(|_| MlpSaved { lg, lu, ld, g, u }),
        ))
    }

    fn backward(
        &self,
        s: &MlpSaved,
        dy: &Tensor,
        ctx: &TrainCtx,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let (b, t, d) = dy.dims3()?;
        let da = self
            .down
            .backward(&s.ld, &dy.reshape((b * t, d))?, ctx, grads, None)?;
        let (dg, du) = ops::swiglu_backward(&s.g, &s.u, &da)?;
        let dx = self.gate.backward(&s.lg, &dg, ctx, grads, None)?;
        let dx = self.up.backward(&s.lu, &du, ctx, grads, Some(dx))?;
        dx.reshape((b, t, d))
    }
}

struct Block {
    ln1: RmsNorm,
    attn: Attention,
    ln2: RmsNorm,
    mlp: Mlp,
}

struct BlockSaved {
    x: Tensor,
    h: Tensor,
    attn: AttnSaved,
    mlp: MlpSaved,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        Ok(Self {
            ln1: RmsNorm::load(vb.pp("input_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            attn: Attention::load(vb.pp("self_attn"), cfg)?,
            ln2: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        pos: usize,
        rope: &Rope,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        ctx: Option<&TrainCtx>,
    ) -> Result<(Tensor, Option<BlockSaved>)> {
        let (a, sa) = self
            .attn
            .forward(&self.ln1.forward(x)?, pos, rope, cache, ctx)?;
        let h = (x + a)?;
        let (m, sm) = self.mlp.forward(&self.ln2.forward(&h)?, ctx)?;
        let out = (&h + m)?;
        let saved = match (sa, sm) {
            (Some(attn), Some(mlp)) => Some(BlockSaved {
                x: x.clone(),
                h,
                attn,
                mlp,
            }),
            _ => None,
        };
        Ok((out, saved))
    }

    fn backward(
        &self,
        s: &BlockSaved,
        dout: &Tensor,
        rope: &Rope,
        ctx: &TrainCtx,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let dm = self.mlp.backward(&s.mlp, dout, ctx, grads)?;
        let dh = (dout + self.ln2.backward(&s.h, &dm)?)?;
        let da = self.attn.backward(&s.attn, &dh, rope, ctx, grads)?;
        dh + self.ln1.backward(&s.x, &da)?
    }

    fn linears_mut(&mut self) -> [&mut LoraLinear; 7] {
        let (a, m) = (&mut self.attn, &mut self.mlp);
        [
            &mut a.q,
            &mut a.k,
            &mut a.v,
            &mut a.o,
            &mut m.gate,
            &mut m.up,
            &mut m.down,
        ]
    }
}

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

/// Per-layer key/value cache for incremental decoding.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }
}

pub struct Llama {
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// `None` when tied to the embeddings.
    lm_head: Option<Tensor>,
    rope: Rope,
    pub config: ModelConfig,
    pub dtype: DType,
    pub device: Device,
}

impl Llama {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let m = vb.pp("model");
        let embed = m
            .pp("embed_tokens")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(m.pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            None
        } else {
            Some(
                vb.pp("lm_head")
                    .get((cfg.vocab_size, cfg.hidden_size), "weight")?,
            )
        };
        let rope = Rope::new(cfg, vb.dtype(), vb.device())?;
        Ok(Self {
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            config: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Loads a model directory (config.json + safetensors) in `dtype` on `device`.
    pub fn from_dir(dir: &std::path::Path, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let store = crate::weights::SafetensorsStore::open_dir(dir)?;
        let vb = VarBuilder::from_backend(Box::new(store), dtype, device.clone());
        Ok(Self::load(vb, &cfg)?)
    }

    fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.blocks.len()],
        }
    }

    /// Every linear layer, in a fixed order (layer by layer: q,k,v,o,gate,up,down).
    pub fn linears(&self) -> impl Iterator<Item = &LoraLinear> {
        self.blocks.iter().flat_map(|b| {
            [
                &b.attn.q,
                &b.attn.k,
                &b.attn.v,
                &b.attn.o,
                &b.mlp.gate,
                &b.mlp.up,
                &b.mlp.down,
            ]
        })
    }

    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut LoraLinear> {
        self.blocks.iter_mut().flat_map(|b| b.linears_mut())
    }

    /// The LoRA modules in id order.
    pub fn loras(&self) -> Vec<(&str, &Lora)> {
        let mut v: Vec<(&str, &Lora)> = self
            .linears()
            .filter_map(|l| l.lora.as_ref().map(|x| (l.name.as_str(), x)))
            .collect();
        v.sort_by_key(|(_, l)| l.id);
        v
    }

    /// The LoRA modules in id order, mutable (optimizer updates, loading weights).
    pub fn loras_mut(&mut self) -> Vec<&mut Lora> {
        let mut v: Vec<&mut Lora> = self.linears_mut().filter_map(|l| l.lora.as_mut()).collect();
        v.sort_by_key(|l| l.id);
        v
    }

    pub fn num_loras(&self) -> usize {
        self.linears().filter(|l| l.lora.is_some()).count()
    }

    /// Attaches LoRA branches per `cfg`, with (A, B) from `init(module, r, in, out)`.
    /// Returns the number of modules that got one.
    pub fn attach_lora(
        &mut self,
        cfg: &LoraConfig,
        mut init: impl FnMut(&str, usize, usize, usize) -> anyhow::Result<(Tensor, Tensor)>,
    ) -> anyhow::Result<usize> {
        let targets = cfg.targets()?;
        let mut id = 0;
        for l in self.linears_mut() {
            let kind = l.name.rsplit('.').next().unwrap_or_default();
            if !targets.iter().any(|t| t == kind) {
                continue;
            }
            let r = cfg.rank_for(&l.name);
            let (a, b) = init(&l.name, r, l.in_dim(), l.out_dim())?;
            if a.dims() != [r, l.in_dim()] || b.dims() != [l.out_dim(), r] {
                anyhow::bail!(
                    "LoRA for '{}': A {:?} / B {:?} do not fit the layer (expected [{r}, {}] and [{}, {r}])",
                    l.name, a.dims(), b.dims(), l.in_dim(), l.out_dim()
                );
            }
            l.lora = Some(Lora {
                id,
                a,
                b,
                scale: cfg.scale_for(&l.name),
                dropout: cfg.lora_dropout,
            });
            id += 1;
        }
        Ok(id)
    }

    /// Attaches a loaded adapter; every adapter module must exist in the model with fitting shapes.
    pub fn attach_adapter(&mut self, adapter: &crate::lora::Adapter) -> anyhow::Result<usize> {
        let names: std::collections::HashSet<String> =
            self.linears().map(|l| l.name.clone()).collect();
        if let Some(m) = adapter.weights.keys().find(|m| !names.contains(*m)) {
            anyhow::bail!(
                "adapter module '{m}' does not exist in the base model ({} layers): adapter for a different base?",
                self.blocks.len()
            );
        }
        let mut id = 0;
        for l in self.linears_mut() {
            if let Some((a, b)) = adapter.weights.get(&l.name) {
                if a.dim(1)? != l.in_dim() || b.dim(0)? != l.out_dim() {
                    anyhow::bail!(
                        "adapter module '{}': A {:?} / B {:?} do not fit the base weight [{}, {}]: adapter for a different base?",
                        l.name, a.dims(), b.dims(), l.out_dim(), l.in_dim()
                    );
                }
                l.lora = Some(Lora {
                    id,
                    a: a.clone(),
                    b: b.clone(),
                    scale: adapter.config.scale_for(&l.name),
                    dropout: 0.0,
                });
                id += 1;
            }
        }
        Ok(id)
    }

    /// Removes every LoRA branch (returned in module order), leaving the base model.
    pub fn take_loras(&mut self) -> Vec<Option<Lora>> {
        self.linears_mut().map(|l| l.lora.take()).collect()
    }

    /// Puts back LoRA branches taken with `take_loras`.
    pub fn put_loras(&mut self, loras: Vec<Option<Lora>>) {
        for (l, lo) in self.linears_mut().zip(loras) {
            l.lora = lo;
        }
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden_size))
    }

    /// Hidden states after the final norm, `[B, T, D]`. With a cache, positions continue from it.
    pub fn forward_hidden(&self, ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let pos = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let mut x = self.embed(ids)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let c = cache.as_mut().map(|c| &mut c.layers[i]);
            x = blk.forward(&x, pos, &self.rope, c, None)?.0;
        }
        self.norm.forward(&x)
    }

    /// Logits for every position, `[B, T, V]`.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache)?;
        h.broadcast_matmul(&self.head().t()?)
    }

    /// Logits of the last position only, `[B, V]` in f32 (generation).
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache)?;
        let t = h.dim(1)?;
        h.i((.., t - 1, ..))?
            .matmul(&self.head().t()?)?
            .to_dtype(DType::F32)
    }

    /// Positions with a target: (flat row index, target id) for every `t` with `labels[t+1] != -100`.
    fn targets(&self, b: usize, t: usize, labels: &[i64]) -> (Vec<u32>, Vec<u32>) {
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

    /// Cross-entropy over the label positions of `h: [N, D]` (final-normed hidden states),
    /// chunked so the full `[N, V]` logits never exist at once. With `grad_scale`, also returns
    /// `dL/dh` for the loss `grad_scale * sum(token losses)`.
    fn loss_head(
        &self,
        h: &Tensor,
        rows: &[u32],
        tg: &[u32],
        grad_scale: Option<f64>,
    ) -> Result<(f64, Option<Tensor>)> {
        let head = self.head();
        let v = self.config.vocab_size;
        // ~8M logits per chunk: bounded memory whatever the vocabulary and batch
        let chunk = (8 * 1024 * 1024 / v).max(1);
        let mut loss = 0f64;
        let mut dh = match grad_scale {
            Some(_) => Some(h.zeros_like()?),
            None => None,
        };
        for start in (0..rows.len()).step_by(chunk) {
            let end = (start + chunk).min(rows.len());
            let n = end - start;
            let idx = Tensor::from_slice(&rows[start..end], n, h.device())?;
            let tgt = Tensor::from_slice(&tg[start..end], (n, 1), h.device())?;
            let hs = h.index_select(&idx, 0)?;
            let logits = gemm::matmul(&hs, &head.t()?)?;
            let dlogits = if ops::is_cpu_f32(&logits) {
                let (l, g) = ops::cross_entropy_cpu_f32(logits, &tg[start..end], grad_scale)?;
                loss += l.iter().sum::<f64>();
                g
            } else {
                let logits = if logits.dtype() == DType::F64 {
                    logits
                } else {
                    logits.to_dtype(DType::F32)?
                };
                let max = logits.max_keepdim(D::Minus1)?;
                let shifted = logits.broadcast_sub(&max)?;
                let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
                let picked = shifted.gather(&tgt, 1)?;
                loss += (lse.clone() - picked)?
                    .to_dtype(DType::F64)?
                    .sum_all()?
                    .to_scalar::<f64>()?;
                match grad_scale {
                    Some(scale) => {
                        let p = shifted.broadcast_sub(&lse)?.exp()?;
                        let minus = Tensor::full(-1f32, (n, 1), h.device())?.to_dtype(p.dtype())?;
                        Some((p.scatter_add(&tgt, &minus, 1)? * scale)?)
                    }
                    None => None,
                }
            };
            if let (Some(dl), Some(dh)) = (dlogits, dh.as_mut()) {
                let dhs = gemm::matmul(&dl.to_dtype(h.dtype())?, head)?;
                *dh = dh.index_add(&idx, &dhs, 0)?;
            }
        }
        Ok((loss, dh))
    }

    /// Loss of a batch without gradients (evaluation).
    pub fn eval_loss(&self, batch: &Batch) -> Result<LossStats> {
        let (b, t) = batch.input_ids.dims2()?;
        let (rows, tg) = self.targets(b, t, &batch.labels);
        if rows.is_empty() {
            return Ok(LossStats::default());
        }
        let h = self
            .forward_hidden(&batch.input_ids, None)?
            .reshape((b * t, self.config.hidden_size))?;
        let (loss_sum, _) = self.loss_head(&h, &rows, &tg, None)?;
        Ok(LossStats {
            loss_sum,
            tokens: rows.len(),
        })
    }

    /// Forward and backward of one micro-batch. The loss whose gradient is accumulated into
    /// `grads` is `grad_scale * sum(token losses)`; pass `1 / (label tokens in the whole
    /// accumulated batch)` to normalise over the accumulated batch.
    pub fn forward_backward(
        &self,
        batch: &Batch,
        ctx: &TrainCtx,
        grad_scale: f64,
        grads: &mut Grads,
    ) -> Result<LossStats> {
        let (b, t) = batch.input_ids.dims2()?;
        let (rows, tg) = self.targets(b, t, &batch.labels);
        if rows.is_empty() {
            return Ok(LossStats::default());
        }
        let mut x = self.embed(&batch.input_ids)?;
        let mut saved: Vec<Option<BlockSaved>> = Vec::with_capacity(self.blocks.len());
        let mut inputs: Vec<Tensor> = Vec::new();
        for blk in &self.blocks {
            if ctx.checkpoint {
                inputs.push(x.clone());
                // no activations kept: recomputed in the backward
                x = blk
                    .forward(&x, 0, &self.rope, None, Some(ctx))
                    .map(|(y, _)| y)?;
                saved.push(None);
            } else {
                let (y, s) = blk.forward(&x, 0, &self.rope, None, Some(ctx))?;
                saved.push(s);
                x = y;
            }
        }
        let d = self.config.hidden_size;
        let x2 = x.reshape((b * t, d))?;
        let h = self.norm.forward(&x2)?;
        let (loss_sum, dh) = self.loss_head(&h, &rows, &tg, Some(grad_scale))?;
        let dh = dh.expect("gradient requested");
        let mut dx = self.norm.backward(&x2, &dh)?.reshape((b, t, d))?;
        drop(h);
        for (i, blk) in self.blocks.iter().enumerate().rev() {
            let s = match saved.pop().flatten() {
                Some(s) => s,
                None => blk
                    .forward(&inputs[i], 0, &self.rope, None, Some(ctx))?
                    .1
                    .expect("training forward saves"),
            };
            dx = blk.backward(&s, &dx, &self.rope, ctx, grads)?;
        }
        Ok(LossStats {
            loss_sum,
            tokens: rows.len(),
        })
    }
}
