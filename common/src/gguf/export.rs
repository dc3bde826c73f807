//! Export of a model directory, optionally with a LoRA adapter merged on the fly, as a llama.cpp
//! GGUF v3 file: the architecture's hyper-parameters, llama.cpp's tensor names and Q/K row
//! order, the tokenizer (`tokenizer.ggml.*`) and the chat template. Tensors are quantized with
//! candle's own quantized types (`QTensor::quantize`), one at a time as they are written, so
//! peak memory is about one tensor. Which tensor gets which type follows llama.cpp's
//! `llama-quantize` (1-D tensors stay f32; Q4_K_M keeps some layers' attn_v/ffn_down and the
//! output matrix at Q6_K; shapes a k-quant cannot hold fall back as llama.cpp does).
//!
//! Only what can be written faithfully is: Llama-architecture models (Llama, Mistral) with a
//! byte-level BPE tokenizer whose pre-tokenizer llama.cpp knows by a name dialora can verify
//! (`smollm`, `gpt-2`), and RoPE without scaling or with linear scaling. Anything else is
//! refused with the reason.

use super::{gguf_name, permute_qk};
use crate::config::ModelConfig;
use crate::lora::Adapter;
use crate::weights::SafetensorsStore;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `--type`: the file's main tensor type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportType {
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k_m")]
    Q4KM,
    #[value(name = "q4_0")]
    Q4_0,
}

impl ExportType {
    /// llama.cpp's `general.file_type` (`llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            ExportType::F16 => 1,
            ExportType::Q4_0 => 2,
            ExportType::Q8_0 => 7,
            ExportType::Q4KM => 15,
            ExportType::Bf16 => 32,
        }
    }

    fn base(self) -> GgmlDType {
        match self {
            ExportType::F16 => GgmlDType::F16,
            ExportType::Bf16 => GgmlDType::BF16,
            ExportType::Q8_0 => GgmlDType::Q8_0,
            ExportType::Q4KM => GgmlDType::Q4K,
            ExportType::Q4_0 => GgmlDType::Q4_0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub output: PathBuf,
    pub ty: ExportType,
    pub overwrite: bool,
}

#[derive(Debug, Clone)]
pub struct ExportReport {
    pub tensors: usize,
    pub bytes: u64,
    /// How many tensors got each type.
    pub types: BTreeMap<String, usize>,
    pub merged_modules: usize,
}

/// GGML's type ids (ggml.h), as written in a GGUF tensor info.
fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// llama.cpp's choice of type for a 2-D weight: the base type, raised for the output matrix
/// (and the embedding when it doubles as the output) and, in Q4_K_M, for the `attn_v` and
/// `ffn_down` of some layers; then a fallback when the row length does not fit the type's
/// block.
fn tensor_type(
    ty: ExportType,
    gguf: &str,
    cols: usize,
    layer: Option<usize>,
    n_layers: usize,
    tied: bool,
) -> GgmlDType {
    let base = ty.base();
    if matches!(ty, ExportType::F16 | ExportType::Bf16) {
        return base;
    }
    // llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one
    let more_bits =
        |i: usize| i < n_layers / 8 || i >= 7 * n_layers / 8 || (i - n_layers / 8) % 3 == 2;
    let is_output = gguf == "output.weight" || (tied && gguf == "token_embd.weight");
    let mut t = base;
    if is_output {
        t = if !cols.is_multiple_of(base.block_size()) {
            GgmlDType::Q8_0
        } else if base != GgmlDType::Q8_0 {
            GgmlDType::Q6K
        } else {
            base
        };
    } else if ty == ExportType::Q4KM
        && (gguf.ends_with(".attn_v.weight") || gguf.ends_with(".ffn_down.weight"))
        && layer.is_some_and(more_bits)
    {
        t = GgmlDType::Q6K;
    }
    if !cols.is_multiple_of(t.block_size()) {
        t = match t {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            other => other,
        };
        if !cols.is_multiple_of(t.block_size()) {
            t = GgmlDType::F16;
        }
    }
    t
}

/// The quantized type `ty` gives the HF weight `hf` (`[rows, cols]`) of a model with
/// `n_layers` blocks: llama.cpp's per-tensor choice, as `export` writes it, so that a model
/// quantized in memory (`infer --quantize`) holds the types of the GGUF of the same name.
pub fn weight_type(
    ty: ExportType,
    hf: &str,
    cols: usize,
    n_layers: usize,
    tied: bool,
) -> Result<GgmlDType> {
    let layer = hf
        .strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next()?.parse().ok());
    Ok(tensor_type(
        ty,
        &gguf_name(hf)?,
        cols,
        layer,
        n_layers,
        tied,
    ))
}

/// GGUF metadata values are candle's (`gguf_file::Value`); `gguf_file::write` serialises them.
type Meta = Value;

/// A GGUF string: its length (u64) and bytes (tensor names in the tensor infos).
fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// A list of strings as a GGUF array.
fn strings(v: Vec<String>) -> Meta {
    Value::Array(v.into_iter().map(Value::String).collect())
}

/// The GGUF header up to the tensor infos: magic, version 3, the tensor count, and the
/// metadata, serialised by candle's GGUF writer (asked for a file with no tensors, and read
/// back by candle's reader, which also checks it; the writer says version 2 and 0 tensors,
/// set here to 3, the version llama.cpp writes, which differs from 2 only in allowing
/// big-endian files, and to the tensor count).
fn header(meta: &[(String, Meta)], tensors: usize) -> Result<Vec<u8>> {
    let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &refs, &[])?;
    let mut read = std::io::Cursor::new(buf.into_inner());
    let content = gguf_file::Content::read(&mut read)?;
    if content.metadata.len() != meta.len() {
        bail!(
            "GGUF metadata: wrote {} keys, read back {}",
            meta.len(),
            content.metadata.len()
        );
    }
    let end = read.position() as usize;
    let mut head = read.into_inner();
    head.truncate(end);
    head[4..8].copy_from_slice(&3u32.to_le_bytes());
    head[8..16].copy_from_slice(&(tensors as u64).to_le_bytes());
    Ok(head)
}

/// The tokenizer of a model directory as llama.cpp's `tokenizer.ggml.*` keys.
fn tokenizer_meta(dir: &Path, cfg: &ModelConfig, meta: &mut Vec<(String, Meta)>) -> Result<()> {
    let path = dir.join("tokenizer.json");
    let read = |p: &Path| -> Result<Json> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", p.display()))
    };
    let tj = read(&path)?;
    let model = &tj["model"];
    if model["type"] != "BPE" {
        bail!(
            "{}: tokenizer model {} cannot be exported (only byte-level BPE)",
            path.display(),
            model["type"]
        );
    }
    let pre = pre_tokenizer_name(&tj["pre_tokenizer"]).ok_or_else(|| {
        anyhow!(
            "{}: pre-tokenizer {} has no llama.cpp name dialora can vouch for (supported: {}); exporting it under another name would give wrong token ids",
            path.display(),
            tj["pre_tokenizer"],
            crate::tokenizer::KNOWN_PRE_TOKENIZERS.join(", ")
        )
    })?;
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| anyhow!("{}: model.vocab is not a map", path.display()))?;
    // tokens by id: the BPE vocabulary, the added tokens, then padding up to the embedding rows
    let mut by_id: BTreeMap<usize, (String, i32)> = vocab
        .iter()
        .filter_map(|(t, id)| Some((id.as_u64()? as usize, (t.clone(), 1))))
        .collect();
    for a in tj["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        // llama.cpp token types: 3 control (special), 4 user-defined
        let kind = if a["special"].as_bool().unwrap_or(false) {
            3
        } else {
            4
        };
        by_id.insert(id as usize, (content.to_string(), kind));
    }
    let n = cfg
        .vocab_size
        .max(by_id.keys().next_back().map_or(0, |k| k + 1));
    if n > cfg.vocab_size {
        bail!(
            "{}: the tokenizer has ids up to {} but the model's vocab_size is {}",
            path.display(),
            n - 1,
            cfg.vocab_size
        );
    }
    let (mut tokens, mut types) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let (t, k) = by_id.remove(&i).unwrap_or_else(|| (format!("[PAD{i}]"), 5)); // 5: unused
        tokens.push(t);
        types.push(k);
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .ok_or_else(|| anyhow!("{}: model.merges missing", path.display()))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) => match p.as_slice() {
                [Json::String(a), Json::String(b)] => Ok(format!("{a} {b}")),
                _ => Err(anyhow!("{}: bad merge {m}", path.display())),
            },
            _ => Err(anyhow!("{}: bad merge {m}", path.display())),
        })
        .collect::<Result<_>>()?;
    let tc = read(&dir.join("tokenizer_config.json")).unwrap_or(Json::Null);
    let token_id = |k: &str| -> Option<u32> {
        let name = match &tc[k] {
            Json::String(s) => s.clone(),
            Json::Object(o) => o.get("content")?.as_str()?.to_string(),
            _ => return None,
        };
        tokens.iter().position(|t| *t == name).map(|i| i as u32)
    };
    let first = |ids: &Option<crate::config::TokenIds>| {
        ids.as_ref().and_then(|x| x.to_vec().first().copied())
    };
    meta.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
    meta.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
    meta.push(("tokenizer.ggml.tokens".into(), strings(tokens.clone())));
    meta.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    ));
    meta.push(("tokenizer.ggml.merges".into(), strings(merges)));
    for (key, id) in [
        (
            "bos_token_id",
            first(&cfg.bos_token_id).or_else(|| token_id("bos_token")),
        ),
        (
            "eos_token_id",
            first(&cfg.eos_token_id).or_else(|| token_id("eos_token")),
        ),
        (
            "padding_token_id",
            first(&cfg.pad_token_id).or_else(|| token_id("pad_token")),
        ),
        ("unknown_token_id", token_id("unk_token")),
    ] {
        if let Some(id) = id {
            meta.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    for key in ["add_bos_token", "add_eos_token"] {
        meta.push((
            format!("tokenizer.ggml.{key}"),
            Value::Bool(tc[key].as_bool().unwrap_or(false)),
        ));
    }
    let template = crate::chat::ChatTemplate::from_model_dir(dir)?;
    meta.push((
        "tokenizer.chat_template".into(),
        Value::String(template.source().to_string()),
    ));
    Ok(())
}

/// llama.cpp's name for a tokenizer.json pre-tokenizer, when it is one dialora builds and
/// checks itself (see `tokenizer::KNOWN_PRE_TOKENIZERS`).
fn pre_tokenizer_name(p: &Json) -> Option<&'static str> {
    let byte_level = |x: &Json| x["type"] == "ByteLevel" && x["use_regex"] != false;
    if byte_level(p) {
        return Some("gpt-2");
    }
    match p["pretokenizers"].as_array()?.as_slice() {
        [d, b] if d["type"] == "Digits" && d["individual_digits"] == true && byte_level(b) => {
            Some("smollm")
        }
        _ => None,
    }
}

/// The model's hyper-parameters as llama.cpp reads them for the `llama` architecture.
fn llama_meta(cfg: &ModelConfig, name: &str, ty: ExportType) -> Result<Vec<(String, Meta)>> {
    let arch = cfg.architecture();
    if !matches!(arch.as_str(), "LlamaForCausalLM" | "MistralForCausalLM") {
        bail!("{arch} cannot be exported to GGUF yet (Llama and Mistral can)");
    }
    if cfg.qkv_bias() || cfg.o_bias() {
        bail!("attention biases cannot be exported for the llama architecture");
    }
    let mut m: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("general.alignment".into(), Value::U32(ALIGN as u32)),
    ];
    let u = |k: &str, v: usize| (format!("llama.{k}"), Value::U32(v as u32));
    m.push(u("context_length", cfg.max_position_embeddings));
    m.push(u("embedding_length", cfg.hidden_size));
    m.push(u("block_count", cfg.num_hidden_layers));
    m.push(u("feed_forward_length", cfg.intermediate_size));
    m.push(u("attention.head_count", cfg.num_attention_heads));
    m.push(u("attention.head_count_kv", cfg.num_kv_heads()));
    m.push(u("rope.dimension_count", cfg.head_dim()));
    m.push(u("vocab_size", cfg.vocab_size));
    if cfg.head_dim() * cfg.num_attention_heads != cfg.hidden_size {
        m.push(u("attention.key_length", cfg.head_dim()));
        m.push(u("attention.value_length", cfg.head_dim()));
    }
    m.push((
        "llama.rope.freq_base".into(),
        Value::F32(cfg.rope_theta() as f32),
    ));
    m.push((
        "llama.attention.layer_norm_rms_epsilon".into(),
        Value::F32(cfg.rms_norm_eps as f32),
    ));
    let scaling = cfg
        .rope_scaling
        .as_ref()
        .or(cfg.rope_parameters.as_ref())
        .filter(|s| s.rope_type != "default");
    match scaling {
        None => {}
        Some(s) if s.rope_type == "linear" => {
            m.push((
                "llama.rope.scaling.type".into(),
                Value::String("linear".into()),
            ));
            m.push((
                "llama.rope.scaling.factor".into(),
                Value::F32(s.factor.unwrap_or(1.0) as f32),
            ));
        }
        Some(s) => bail!(
            "RoPE scaling '{}' cannot be exported faithfully (none or linear can)",
            s.rope_type
        ),
    }
    Ok(m)
}

const ALIGN: usize = 32;

fn padding(n: usize) -> usize {
    (ALIGN - n % ALIGN) % ALIGN
}

/// One tensor of the file: its names, shape, type and place.
struct Planned {
    hf: String,
    gguf: String,
    shape: Vec<usize>,
    ty: GgmlDType,
    bytes: usize,
}

/// Writes the GGUF file (atomically); `progress(done, total)` after each tensor.
pub fn export(o: &ExportOptions, mut progress: impl FnMut(usize, usize)) -> Result<ExportReport> {
    if o.output.exists() && !o.overwrite {
        bail!(
            "{}: output file exists (use --overwrite to replace it)",
            o.output.display()
        );
    }
    crate::atomic::refuse_inside(&o.output, &o.model, "model directory")?;
    let cfg = ModelConfig::from_dir(&o.model)?;
    let name = o
        .model
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let mut meta = llama_meta(&cfg, &name, o.ty).with_context(|| o.model.display().to_string())?;
    tokenizer_meta(&o.model, &cfg, &mut meta)?;
    let store = SafetensorsStore::open_dir(&o.model)?;
    let adapter = match &o.adapter {
        Some(dir) => {
            let a = Adapter::load(dir, DType::F32, &Device::Cpu)?;
            a.check_base(&o.model, cfg.num_hidden_layers, |m| {
                store.shape(&format!("{m}.weight"))
            })?;
            Some(a)
        }
        None => None,
    };
    let tied = !store.contains("lm_head.weight");
    // plan: names, types, sizes (llama.cpp's order: embedding, blocks, final norm, output)
    let mut names: Vec<&String> = store.names().collect();
    let rank = |n: &str| -> (usize, usize, String) {
        match n {
            "model.embed_tokens.weight" => (0, 0, String::new()),
            "model.norm.weight" => (2, 0, String::new()),
            "lm_head.weight" => (3, 0, String::new()),
            _ => {
                let i = n
                    .strip_prefix("model.layers.")
                    .and_then(|r| r.split('.').next()?.parse().ok())
                    .unwrap_or(usize::MAX);
                (1, i, n.to_string())
            }
        }
    };
    names.sort_by_key(|n| rank(n));
    let mut plan = Vec::with_capacity(names.len());
    for n in names {
        let gguf = gguf_name(n)?;
        let shape = store.shape(n).unwrap_or_default();
        let layer = n
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next()?.parse().ok());
        let ty = if shape.len() < 2 {
            GgmlDType::F32
        } else {
            tensor_type(o.ty, &gguf, shape[1], layer, cfg.num_hidden_layers, tied)
        };
        let elems: usize = shape.iter().product();
        if !elems.is_multiple_of(ty.block_size()) {
            bail!("{n}: {elems} values do not fill whole {ty:?} blocks");
        }
        let bytes = elems / ty.block_size() * ty.type_size();
        plan.push(Planned {
            hf: n.clone(),
            gguf,
            shape,
            ty,
            bytes,
        });
    }

    let mut f = crate::atomic::AtomicFile::create(&o.output)?;
    let io = |e: std::io::Error| anyhow!("{}: cannot write: {e}", o.output.display());
    // header (candle's writer), then the tensor infos and padding (the tensors are streamed
    // one at a time below, which candle's writer, taking them all at once, cannot do)
    let mut head = header(&meta, plan.len())?;
    let mut offset = 0usize;
    for p in &plan {
        put_str(&mut head, &p.gguf).map_err(io)?;
        head.extend_from_slice(&(p.shape.len() as u32).to_le_bytes());
        for d in p.shape.iter().rev() {
            head.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        head.extend_from_slice(&ggml_type_id(p.ty).to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += p.bytes + padding(p.bytes);
    }
    head.resize(head.len() + padding(head.len()), 0);
    f.write_all(&head).map_err(io)?;
    // data, one tensor at a time
    let mut types = BTreeMap::new();
    let mut merged = 0;
    let (n_head, n_kv) = (cfg.num_attention_heads, cfg.num_kv_heads());
    for (i, p) in plan.iter().enumerate() {
        let mut t = store.load(&p.hf, DType::F32, &Device::Cpu)?;
        let module = p.hf.strip_suffix(".weight").unwrap_or(&p.hf);
        if let Some((a, b)) = adapter.as_ref().and_then(|ad| ad.weights.get(module)) {
            let scale = adapter
                .as_ref()
                .map_or(1.0, |ad| ad.config.scale_for(module));
            t = (t + crate::merge::lora_delta(a, b, scale)?)?;
            merged += 1;
        }
        if p.gguf.ends_with(".attn_q.weight") {
            t = permute_qk(&t, n_head)?;
        } else if p.gguf.ends_with(".attn_k.weight") {
            t = permute_qk(&t, n_kv)?;
        }
        let q = QTensor::quantize(&t, p.ty)
            .map_err(|e| anyhow!("tensor '{}' as {:?}: {e}", p.hf, p.ty))?;
        let data = q.data()?;
        if data.len() != p.bytes {
            bail!(
                "tensor '{}': {} bytes as {:?}, planned {}",
                p.hf,
                data.len(),
                p.ty,
                p.bytes
            );
        }
        f.write_all(&data).map_err(io)?;
        f.write_all(&vec![0u8; padding(p.bytes)]).map_err(io)?;
        *types.entry(format!("{:?}", p.ty)).or_insert(0) += 1;
        progress(i + 1, plan.len());
    }
    if let Some(a) = &adapter {
        if merged != a.weights.len() {
            bail!(
                "merged {merged} of the adapter's {} modules",
                a.weights.len()
            );
        }
    }
    f.commit()?;
    Ok(ExportReport {
        tensors: plan.len(),
        bytes: std::fs::metadata(&o.output).map(|m| m.len()).unwrap_or(0),
        types,
        merged_modules: merged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_follow_llama_quantize() {
        let t = |ty, name: &str, cols, layer| tensor_type(ty, name, cols, layer, 32, false);
        // Q4_K_M: most weights Q4_K, some layers' attn_v and ffn_down Q6_K, the output Q6_K
        assert_eq!(
            t(ExportType::Q4KM, "blk.10.attn_q.weight", 4096, Some(10)),
            GgmlDType::Q4K
        );
        assert_eq!(
            t(ExportType::Q4KM, "blk.0.attn_v.weight", 4096, Some(0)),
            GgmlDType::Q6K
        );
        assert_eq!(
            t(ExportType::Q4KM, "blk.10.attn_v.weight", 4096, Some(10)),
            GgmlDType::Q4K
        );
        assert_eq!(
            t(ExportType::Q4KM, "blk.30.ffn_down.weight", 11008, Some(30)),
            GgmlDType::Q6K
        );
        assert_eq!(
            t(ExportType::Q4KM, "output.weight", 4096, None),
            GgmlDType::Q6K
        );
        assert_eq!(
            t(ExportType::Q4KM, "token_embd.weight", 4096, None),
            GgmlDType::Q4K
        );
        // a tied embedding is the output; rows of 576 (SmolLM2) do not fit 256-blocks
        assert_eq!(
            tensor_type(ExportType::Q4KM, "token_embd.weight", 576, None, 30, true),
            GgmlDType::Q8_0
        );
        assert_eq!(
            t(ExportType::Q4KM, "blk.10.attn_q.weight", 576, Some(10)),
            GgmlDType::Q5_0
        );
        assert_eq!(
            t(ExportType::Q4KM, "blk.0.attn_v.weight", 576, Some(0)),
            GgmlDType::Q8_0
        );
        // q8_0 everywhere; q4_0's output raised
        assert_eq!(
            t(ExportType::Q8_0, "output.weight", 4096, None),
            GgmlDType::Q8_0
        );
        assert_eq!(
            t(ExportType::Q4_0, "blk.3.ffn_up.weight", 4096, Some(3)),
            GgmlDType::Q4_0
        );
        assert_eq!(
            t(ExportType::Q4_0, "output.weight", 4096, None),
            GgmlDType::Q6K
        );
        // rows that fit no block: f16
        assert_eq!(
            t(ExportType::Q8_0, "blk.3.ffn_up.weight", 50, Some(3)),
            GgmlDType::F16
        );
        assert_eq!(
            t(ExportType::F16, "output.weight", 50, None),
            GgmlDType::F16
        );
    }
}
