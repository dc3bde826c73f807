//! The Llama-family decoder (Llama, Mistral, Qwen2-style q/k/v bias; GQA; tied or untied head)
//! with LoRA on any subset of q,k,v,o,gate,up,down_proj: loading (`Llama::load(vb, cfg)`), the
//! inference forward with a KV cache, and the training forward/backward.
//!
//! A block is `h = x + attn(rmsnorm(x))`, `out = h + mlp(rmsnorm(h))`; its backward is
//!
//! ```text
//! dh = dout + rmsnorm_backward(h, mlp_backward(dout))
//! dx = dh + rmsnorm_backward(x, attn_backward(dh))
//! ```
//!
//! with RMSNorm's input gradient (weight `w` frozen, `r = 1/sqrt(mean(x²) + eps)`,
//! `x̂ = x r`): `dx = r (dy ⊙ w − x̂ · mean(dy ⊙ w ⊙ x̂))`.

use super::attention::{Attention, AttnSaved, Rope};
use super::kv::LayerCache;
use super::linear::{AdapterBranches, Lora, LoraLinear, Packed, StepRows};
use super::loss::{loss_head, targets, Batch, LossStats};
use super::mlp::{Mlp, MlpSaved};
use super::{matmul, ops};
use super::{Grads, TrainCtx};
use crate::config::ModelConfig;
use crate::lora::LoraConfig;
use candle_core::{DType, Device, IndexOp, Result, Tensor};
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
        cache: Option<&mut LayerCache>,
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

    /// The rows of a batched step, `x: [rows, D]` (`Llama::forward_step`).
    fn forward_rows(
        &self,
        x: &Tensor,
        rows: &StepRows,
        seqs: &mut [(usize, usize, &mut LayerCache)],
        rope: &Rope,
    ) -> Result<Tensor> {
        let a = self
            .attn
            .forward_rows(&self.ln1.forward(x)?, rows, seqs, rope)?;
        let h = (x + a)?;
        let m = self.mlp.forward_rows(&self.ln2.forward(&h)?, rows)?;
        h + m
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

/// Per-layer key/value cache for incremental decoding.
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .map(|l| l.current_seq_len())
            .unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| l.reset());
    }

    /// A copy of the first `n` positions of every layer, for a sequence that shares them (the
    /// engine's prefix cache); `None` where the layers are candle's tensors (off the CPU, or not
    /// f32), which are not shared.
    pub fn prefix(&self, n: usize) -> Option<KvCache> {
        if n > self.len() {
            return None;
        }
        let layers = self
            .layers
            .iter()
            .map(|l| l.prefix(n))
            .collect::<Option<_>>()?;
        Some(KvCache { layers })
    }

    /// Bytes of keys and values held (room made ahead included).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bytes()).sum()
    }

    /// An empty cache for a model of `layers` blocks.
    pub fn with_layers(layers: usize) -> Self {
        KvCache {
            layers: (0..layers).map(|_| LayerCache::Empty).collect(),
        }
    }
}

/// One sequence's share of a batched step (`Llama::forward_step`).
pub struct StepSeq<'a> {
    /// The positions fed this step: one token when decoding, a chunk of the prompt when
    /// prefilling.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// The adapter whose LoRA terms apply to this sequence's rows (`None`: the base model).
    pub adapter: Option<&'a AdapterBranches>,
    /// Decoding (one token; its row joins the other decode rows of its adapter) or prefilling
    /// (a chunk of the prompt).
    pub decode: bool,
    /// Whether the next-token logits (of the last position) are wanted.
    pub logits: bool,
}

/// The frozen weights' form for inference (`Llama::pack`): f32 as loaded, bf16, or the types
/// llama.cpp's Q8_0 / Q4_K_M files give each tensor (`gguf::weight_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightFormat {
    F32,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4K,
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4K => "q4_k",
        })
    }
}

pub struct Llama {
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// `None` when tied to the embeddings.
    lm_head: Option<Tensor>,
    /// The output head in a lighter form (`pack`).
    head_packed: Option<Packed>,
    /// The frozen weights' form.
    pub format: WeightFormat,
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
        let mut blocks = blocks;
        for (i, l) in blocks.iter_mut().flat_map(|b| b.linears_mut()).enumerate() {
            l.index = i;
        }
        Ok(Self {
            embed,
            blocks,
            norm,
            lm_head,
            head_packed: None,
            format: WeightFormat::F32,
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
        KvCache::with_layers(self.blocks.len())
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

    /// Number of trainable (LoRA A and B) parameters.
    pub fn trainable_parameters(&self) -> usize {
        self.loras()
            .iter()
            .map(|(_, l)| l.a.elem_count() + l.b.elem_count())
            .sum()
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
                cast: Default::default(),
            });
            id += 1;
        }
        Ok(id)
    }

    /// Attaches a loaded adapter; every adapter module must exist in the model with fitting
    /// shapes (`Adapter::check_base`). `base` names the model in errors.
    pub fn attach_adapter(
        &mut self,
        adapter: &crate::lora::Adapter,
        base: &std::path::Path,
    ) -> anyhow::Result<usize> {
        let branches = self.adapter_branches(adapter, base)?;
        let n = branches.iter().flatten().count();
        self.put_loras(branches);
        Ok(n)
    }

    /// A loaded adapter's LoRA branches by linear layer (`LoraLinear::index`), checked against
    /// this model as `attach_adapter` checks it, without attaching them: what a batched step
    /// adds on the rows of the requests for this adapter (`StepSeq::adapter`).
    pub fn adapter_branches(
        &self,
        adapter: &crate::lora::Adapter,
        base: &std::path::Path,
    ) -> anyhow::Result<AdapterBranches> {
        let shapes: std::collections::HashMap<String, Vec<usize>> = self
            .linears()
            .map(|l| (l.name.clone(), vec![l.out_dim(), l.in_dim()]))
            .collect();
        adapter.check_base(base, self.blocks.len(), |m| shapes.get(m).cloned())?;
        let mut ids = 0..;
        Ok(self
            .linears()
            .map(|l| {
                adapter.weights.get(&l.name).map(|(a, b)| Lora {
                    id: ids.next().expect("unbounded"),
                    a: a.clone(),
                    b: b.clone(),
                    scale: adapter.config.scale_for(&l.name),
                    dropout: 0.0,
                    cast: Default::default(),
                })
            })
            .collect())
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
            .to_dtype(self.dtype)?
            .reshape((b, t, self.config.hidden_size))
    }

    /// Makes the frozen weights lighter for inference on the CPU: every projection and the
    /// output head in `format` (LoRA terms stay f32 on top); the embedding stays f32 for the
    /// quantized formats and becomes bf16 with bf16. Training needs `F32`.
    pub fn pack(&mut self, format: WeightFormat) -> anyhow::Result<()> {
        use candle_core::quantized::{QMatMul, QTensor};
        if format == WeightFormat::F32 {
            return Ok(());
        }
        if !self.device.is_cpu() || self.dtype != DType::F32 {
            anyhow::bail!("lighter weights (--dtype bf16, --quantize) need an f32 model on the cpu; on a GPU use --dtype");
        }
        if self.format != WeightFormat::F32 {
            anyhow::bail!("the model's weights are already {}", self.format);
        }
        let ty = match format {
            WeightFormat::Q8_0 => Some(crate::gguf::ExportType::Q8_0),
            WeightFormat::Q4K => Some(crate::gguf::ExportType::Q4KM),
            _ => None,
        };
        let n_layers = self.blocks.len();
        let tied = self.lm_head.is_none();
        let pack = |hf: &str, w: &Tensor| -> anyhow::Result<Packed> {
            Ok(match ty {
                None => Packed::Bf16(w.to_dtype(DType::BF16)?),
                Some(ty) => {
                    let q = crate::gguf::weight_type(ty, hf, w.dim(1)?, n_layers, tied)?;
                    let qt = QTensor::quantize(w, q)?;
                    if super::q8::QRows::takes(q, w.device()) {
                        Packed::Q8(super::q8::QRows::from_qtensor(&qt)?)
                    } else if super::kquant::KRows::takes(q, w.device()) {
                        Packed::KQuant(super::kquant::KRows::from_qtensor(&qt)?)
                    } else {
                        Packed::Quantized(QMatMul::from_qtensor(qt)?)
                    }
                }
            })
        };
        for l in self.linears_mut() {
            let p = pack(&format!("{}.weight", l.name), &l.weight)?;
            l.pack(p)?;
        }
        if ty.is_none() {
            self.embed = self.embed.to_dtype(DType::BF16)?;
        }
        self.head_packed = Some(match (ty, tied) {
            // one bf16 copy serves as both
            (None, true) => Packed::Bf16(self.embed.clone()),
            (_, true) => pack("model.embed_tokens.weight", &self.embed)?,
            (_, false) => pack("lm_head.weight", self.head())?,
        });
        self.lm_head = None;
        self.format = format;
        Ok(())
    }

    /// Bytes of the frozen weights a decode step reads: every projection, the norms and the
    /// head, the embedding only where it is the head (otherwise a step reads one row of it).
    pub fn decode_bytes(&self) -> usize {
        let embed = self.embed.elem_count() * self.embed.dtype().size_in_bytes();
        let head_is_embed = match (&self.head_packed, &self.lm_head) {
            (Some(Packed::Bf16(h)), _) => h.id() == self.embed.id(),
            (None, None) => true,
            _ => false,
        };
        self.weight_bytes() - if head_is_embed { 0 } else { embed }
    }

    /// Bytes of the frozen weights as held (embedding, projections, head, norms).
    pub fn weight_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut n = t(&self.embed) + t(&self.norm.weight);
        for b in &self.blocks {
            n += t(&b.ln1.weight) + t(&b.ln2.weight);
        }
        for l in self.linears() {
            n += match &l.packed {
                Some(p) => p.bytes(),
                None => t(&l.weight),
            } + l.bias.as_ref().map(t).unwrap_or(0);
        }
        n + match (&self.head_packed, &self.lm_head) {
            // a tied bf16 head is the embedding itself
            (Some(Packed::Bf16(h)), _) if h.id() == self.embed.id() => 0,
            (Some(p), _) => p.bytes(),
            (None, Some(h)) => t(h),
            (None, None) => 0,
        }
    }

    /// The output head on rows of final hidden states `[rows, D]`: logits `[rows, V]` in f32,
    /// each row its own dot products (the row kernel or the packed head's).
    fn head_rows(&self, h: &Tensor) -> Result<Tensor> {
        match &self.head_packed {
            Some(p) => p.product(h),
            None => matmul::rows_matmul(h, self.head()),
        }?
        .to_dtype(DType::F32)
    }

    /// One step of many sequences at once: the decode rows of every decoding sequence (runs of
    /// the same adapter) and the prompt chunk of every prefilling one go through each layer
    /// together; each sequence attends to its own cache (which grows by its tokens). Returns the
    /// next-token logits (`[V]`, f32) of the sequences that want them.
    ///
    /// A row's results do not depend on what else shares the step, nor on how its sequence's
    /// prompt was cut into chunks: every row takes the row kernel (one dot product per output,
    /// summed in an order fixed by the length) or the q8_0 product (the same per row), its
    /// attention is computed on its own (`kv::attend_host`, on the CPU in f32), and its LoRA
    /// terms are its adapter's. So a sequence's cache holds the same bits however it was
    /// filled, and a prefix computed for one request serves another (`engine`'s prefix cache).
    pub fn forward_step(&self, seqs: &mut [StepSeq]) -> Result<Vec<Option<Tensor>>> {
        super::on_pool(|| {
            // the pool's threads only help a step on the CPU
            if self.device.is_cpu() {
                super::team::step(|| self.forward_step_here(seqs))
            } else {
                self.forward_step_here(seqs)
            }
        })
    }

    fn forward_step_here(&self, seqs: &mut [StepSeq]) -> Result<Vec<Option<Tensor>>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        if self.linears().any(|l| l.lora.is_some()) {
            candle_core::bail!("forward_step takes adapters per sequence, not attached ones");
        }
        // runs of the same adapter, told apart by address
        let key = |s: &StepSeq| s.adapter.map(|a| a as *const AdapterBranches as usize);
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| {
            let s = &seqs[i];
            (!s.decode, if s.decode { key(s) } else { None }, i)
        });
        let mut slots: Vec<Option<&mut StepSeq>> = seqs.iter_mut().map(Some).collect();
        let mut ordered: Vec<(usize, &mut StepSeq)> = order
            .iter()
            .map(|&i| (i, slots[i].take().expect("each sequence once")))
            .collect();
        let mut ids = Vec::new();
        let mut spans = Vec::with_capacity(ordered.len());
        let mut rows = StepRows { parts: Vec::new() };
        for (_, s) in &ordered {
            let (start, n) = (ids.len(), s.tokens.len());
            if n == 0 || (s.decode && n != 1) {
                candle_core::bail!("a step feeds one token to a decoding sequence and at least one to a prefilling one, got {n}");
            }
            ids.extend_from_slice(s.tokens);
            spans.push((start, n));
            if s.decode {
                let same = |p: &Option<&AdapterBranches>| match (p, s.adapter) {
                    (Some(a), Some(b)) => std::ptr::eq(*a, b),
                    (None, None) => true,
                    _ => false,
                };
                match rows.parts.last_mut() {
                    Some(p) if same(&p.2) => p.1 += 1,
                    _ => rows.parts.push((start, 1, s.adapter)),
                }
            } else {
                rows.parts.push((start, n, s.adapter));
            }
        }
        let n = ids.len();
        let mut x = self
            .embed
            .index_select(&Tensor::new(ids.as_slice(), &self.device)?, 0)?
            .to_dtype(self.dtype)?;
        for (l, blk) in self.blocks.iter().enumerate() {
            let mut lc: Vec<(usize, usize, &mut LayerCache)> = ordered
                .iter_mut()
                .zip(&spans)
                .map(|((_, s), &(st, k))| (st, k, &mut s.cache.layers[l]))
                .collect();
            x = blk.forward_rows(&x, &rows, &mut lc, &self.rope)?;
        }
        debug_assert_eq!(x.dim(0)?, n);
        let want: Vec<(usize, u32)> = ordered
            .iter()
            .zip(&spans)
            .filter(|((_, s), _)| s.logits)
            .map(|((i, _), &(st, k))| (*i, (st + k - 1) as u32))
            .collect();
        let mut out = vec![None; seqs.len()];
        if want.is_empty() {
            return Ok(out);
        }
        let last: Vec<u32> = want.iter().map(|w| w.1).collect();
        let h = x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        let logits = self.head_rows(&self.norm.forward(&h)?)?;
        for (r, (i, _)) in want.iter().enumerate() {
            out[*i] = Some(logits.get(r)?);
        }
        Ok(out)
    }

    /// Hidden states after the final norm, `[B, T, D]`. With a cache, positions continue from it.
    pub fn forward_hidden(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        super::on_pool(|| self.forward_hidden_here(ids, cache))
    }

    fn forward_hidden_here(&self, ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let pos = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let mut x = self.embed(ids)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let c = cache.as_mut().map(|c| &mut c.layers[i]);
            x = blk.forward(&x, pos, &self.rope, c, None)?.0;
        }
        self.norm.forward(&x)
    }

    /// Logits for every position, `[B, T, V]` (f32 through a packed head).
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache)?;
        if self.head_packed.is_some() {
            let (b, t, d) = h.dims3()?;
            return self.head_rows(&h.reshape((b * t, d))?)?.reshape((b, t, ()));
        }
        h.broadcast_matmul(&self.head().t()?)
    }

    /// Logits of the last position only, `[B, V]` in f32 (generation).
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache)?;
        let t = h.dim(1)?;
        self.head_rows(&h.i((.., t - 1, ..))?.contiguous()?)
    }

    /// Loss of a batch without gradients (evaluation).
    pub fn eval_loss(&self, batch: &Batch) -> Result<LossStats> {
        if self.head_packed.is_some() {
            candle_core::bail!("the loss needs the f32 model: packed weights are for generation");
        }
        let (b, t) = batch.input_ids.dims2()?;
        let (rows, tg) = targets(b, t, &batch.labels);
        if rows.is_empty() {
            return Ok(LossStats::default());
        }
        let h = self
            .forward_hidden(&batch.input_ids, None)?
            .reshape((b * t, self.config.hidden_size))?;
        let (loss_sum, _) = loss_head(&h, self.head(), &rows, &tg, None)?;
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
        let (rows, tg) = targets(b, t, &batch.labels);
        if rows.is_empty() {
            return Ok(LossStats::default());
        }
        let mut x = self.embed(&batch.input_ids)?;
        if let Some(alpha) = ctx.neftune_noise_alpha {
            x = neftune(x, alpha, ctx)?;
        }
        let mut saved: Vec<Option<BlockSaved>> = Vec::with_capacity(self.blocks.len());
        let mut inputs: Vec<Tensor> = Vec::new();
        for blk in &self.blocks {
            if ctx.gradient_checkpointing {
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
        let (loss_sum, dh) = loss_head(&h, self.head(), &rows, &tg, Some(grad_scale))?;
        let dh = dh.expect("gradient requested");
        if self.device.is_cuda() {
            // every activation is alive here: sample the device memory at its high point
            crate::device::peak_mem_mib(&self.device);
        }
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

/// NEFTune (Jain et al. 2023, as TRL and transformers apply it): uniform noise in
/// `±alpha/sqrt(T·D)` added to the input embeddings `[B, T, D]`, in training only. The noise is
/// a function of (seed, micro-step), drawn in independently seeded chunks, so a resumed run
/// draws what the uninterrupted one drew.
fn neftune(x: Tensor, alpha: f64, ctx: &TrainCtx) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let (_, t, d) = x.dims3()?;
    let mag = alpha / ((t * d) as f64).sqrt();
    let stream = ctx.seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
        ^ ctx.micro_step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ 0x4E45_4654_554E_4500;
    let mut noise = vec![0f32; x.elem_count()];
    noise.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(
            stream ^ (c as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93),
        );
        for v in o {
            *v = ((rng.random::<f64>() * 2.0 - 1.0) * mag) as f32;
        }
    });
    let noise = Tensor::from_vec(noise, x.dims(), x.device())?.to_dtype(x.dtype())?;
    x + noise
}
