//! Import of a llama.cpp GGUF file into a Hugging Face model directory: dequantized safetensors
//! (Q/K row permutation undone), config.json, tokenizer.json built from the GGUF vocabulary,
//! tokenizer_config.json with the chat template, chat_template.jinja and generation_config.json.

use super::{hf_name, unpermute_qk};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn get(&self, k: &str) -> Result<&Value> {
        self.md.get(k).ok_or_else(|| {
            anyhow!(
                "{}: GGUF metadata key '{k}' is missing",
                self.path.display()
            )
        })
    }
    fn u(&self, k: &str) -> Result<usize> {
        let v = self.get(k)?;
        v.to_u64()
            .map(|x| x as usize)
            .or_else(|_| v.to_u32().map(|x| x as usize))
            .or_else(|_| v.to_i32().map(|x| x as usize))
            .map_err(|e| anyhow!("{}: GGUF key '{k}': {e}", self.path.display()))
    }
    fn f(&self, k: &str) -> Result<f64> {
        let v = self.get(k)?;
        v.to_f32()
            .map(|x| x as f64)
            .or_else(|_| v.to_f64())
            .map_err(|e| anyhow!("{}: GGUF key '{k}': {e}", self.path.display()))
    }
    fn s(&self, k: &str) -> Option<String> {
        self.md.get(k).and_then(|v| v.to_string().ok().cloned())
    }
    fn strings(&self, k: &str) -> Result<Vec<String>> {
        self.get(k)?
            .to_vec()
            .map_err(|e| anyhow!("{}: GGUF key '{k}': {e}", self.path.display()))?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| anyhow!("GGUF key '{k}': {e}"))
            })
            .collect()
    }
    fn ints(&self, k: &str) -> Result<Vec<i64>> {
        self.get(k)?
            .to_vec()
            .map_err(|e| anyhow!("{}: GGUF key '{k}': {e}", self.path.display()))?
            .iter()
            .map(|v| {
                v.to_i32()
                    .map(|x| x as i64)
                    .or_else(|_| v.to_u32().map(|x| x as i64))
                    .map_err(|e| anyhow!("GGUF key '{k}': {e}"))
            })
            .collect()
    }
}

/// Summary of an import, for the caller to print.
#[derive(Debug)]
pub struct ImportReport {
    pub tensors: usize,
    pub parameters: usize,
    pub vocab: usize,
    pub layers: usize,
}

/// Imports `gguf_path` into `out_dir` (created; must not exist or be empty unless `overwrite`).
/// Everything is written into a temporary sibling directory first and renamed at the end.
pub fn import(
    gguf_path: &Path,
    out_dir: &Path,
    dtype: DType,
    overwrite: bool,
) -> Result<ImportReport> {
    let mut file = std::fs::File::open(gguf_path)
        .with_context(|| format!("{}: cannot open GGUF file", gguf_path.display()))?;
    let content = Content::read(&mut file)
        .map_err(|e| anyhow!("{}: not a valid GGUF file ({e})", gguf_path.display()))?;
    let meta = Meta {
        path: gguf_path,
        md: &content.metadata,
    };
    let arch = meta.s("general.architecture").unwrap_or_default();
    if arch != "llama" {
        bail!(
            "{}: GGUF architecture '{arch}' is not supported by the importer (only 'llama')",
            gguf_path.display()
        );
    }
    let n_head = meta.u("llama.attention.head_count")?;
    let n_kv = meta.u("llama.attention.head_count_kv").unwrap_or(n_head);
    let hidden = meta.u("llama.embedding_length")?;
    let layers = meta.u("llama.block_count")?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let vocab = meta.u("llama.vocab_size").unwrap_or(tokens.len());
    let tok_model = meta.s("tokenizer.ggml.model").unwrap_or_default();
    if tok_model != "gpt2" {
        bail!(
            "{}: tokenizer model '{tok_model}' is not supported (only byte-level BPE, 'gpt2')",
            gguf_path.display()
        );
    }

    let pre = meta
        .s("tokenizer.ggml.pre")
        .unwrap_or_else(|| "default".into());
    if !crate::tokenizer::KNOWN_PRE_TOKENIZERS.contains(&pre.as_str()) {
        bail!(
            "{}: pre-tokenizer '{pre}' (tokenizer.ggml.pre) is not supported (supported: {}): importing it with another one would give wrong token ids",
            gguf_path.display(),
            crate::tokenizer::KNOWN_PRE_TOKENIZERS.join(", ")
        );
    }
    crate::atomic::check_output_dir(out_dir, overwrite)?;
    let out = crate::atomic::OutputDir::create(out_dir)?;
    let tmp = out.path();
    let report = {
        // ---- weights
        let st_dtype = dtype;
        let mut tensors = BTreeMap::new();
        let mut params = 0usize;
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let q = content
                .tensor(&mut file, name, &Device::Cpu)
                .map_err(|e| anyhow!("{}: tensor '{name}': {e}", gguf_path.display()))?;
            let mut t = q
                .dequantize(&Device::Cpu)
                .map_err(|e| anyhow!("{}: cannot dequantize '{name}': {e}", gguf_path.display()))?;
            if name.contains(".attn_q.") && t.rank() == 2 {
                t = unpermute_qk(&t, n_head)?;
            } else if name.contains(".attn_k.") && t.rank() == 2 {
                t = unpermute_qk(&t, n_kv)?;
            }
            params += t.elem_count();
            tensors.insert(hf_name(name)?, t.to_dtype(st_dtype)?);
        }
        let tied = !tensors.contains_key("lm_head.weight");
        crate::weights::save(&tensors, &tmp.join("model.safetensors"))?;

        // ---- tokenizer
        let merges = meta.strings("tokenizer.ggml.merges")?;
        let types = meta.ints("tokenizer.ggml.token_type").unwrap_or_default();
        // llama.cpp token types: 3 = control, 4 = user-defined.
        let special_ids: Vec<u32> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(i, _)| i as u32)
            .collect();
        let tok = crate::tokenizer::build_bpe(&crate::tokenizer::BpeSpec {
            tokens: &tokens,
            merges: &merges,
            special_ids: &special_ids,
            pre: &pre,
        })?;
        crate::tokenizer::save(&tok, tmp)?;
        let id = |k: &str| meta.u(k).ok().map(|x| x as u32);
        let name_of = |i: Option<u32>| i.and_then(|i| tokens.get(i as usize).cloned());
        let (bos, eos, pad, unk) = (
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id"),
            id("tokenizer.ggml.padding_token_id"),
            id("tokenizer.ggml.unknown_token_id"),
        );
        let add_bos = meta
            .get("tokenizer.ggml.add_bos_token")
            .ok()
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let chat_template = meta.s("tokenizer.chat_template");
        let ctx = meta.u("llama.context_length").unwrap_or(2048);
        let added: serde_json::Map<String, serde_json::Value> = special_ids
            .iter()
            .map(|&i| {
                (
                    i.to_string(),
                    json!({"content": tokens[i as usize], "lstrip": false, "normalized": false,
                           "rstrip": false, "single_word": false, "special": true}),
                )
            })
            .collect();
        let mut tc = json!({
            "add_bos_token": add_bos, "add_eos_token": false, "add_prefix_space": false,
            "added_tokens_decoder": added, "bos_token": name_of(bos), "eos_token": name_of(eos),
            "pad_token": name_of(pad), "unk_token": name_of(unk), "clean_up_tokenization_spaces": false,
            "model_max_length": ctx, "tokenizer_class": "GPT2Tokenizer",
        });
        if let Some(t) = &chat_template {
            tc["chat_template"] = json!(t);
            crate::atomic::write_file(&tmp.join("chat_template.jinja"), t.as_bytes())?;
        }
        crate::atomic::write_json(&tmp.join("tokenizer_config.json"), &tc)?;
        crate::atomic::write_json(
            &tmp.join("special_tokens_map.json"),
            &json!({"bos_token": name_of(bos), "eos_token": name_of(eos), "pad_token": name_of(pad), "unk_token": name_of(unk)}),
        )?;

        // ---- config
        let head_dim = meta
            .u("llama.rope.dimension_count")
            .unwrap_or(hidden / n_head);
        let mut cfg = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": hidden, "intermediate_size": meta.u("llama.feed_forward_length")?,
            "num_hidden_layers": layers, "num_attention_heads": n_head, "num_key_value_heads": n_kv,
            "head_dim": head_dim, "vocab_size": vocab, "hidden_act": "silu",
            "rms_norm_eps": meta.f("llama.attention.layer_norm_rms_epsilon")?,
            "rope_theta": meta.f("llama.rope.freq_base").unwrap_or(10000.0),
            "max_position_embeddings": ctx, "tie_word_embeddings": tied,
            "attention_bias": false, "mlp_bias": false, "initializer_range": 0.02,
            "torch_dtype": crate::config::torch_dtype_name(dtype),
            "use_cache": true,
        });
        if let Some(b) = bos {
            cfg["bos_token_id"] = json!(b);
        }
        if let Some(e) = eos {
            cfg["eos_token_id"] = json!(e);
        }
        if let Some(p) = pad {
            cfg["pad_token_id"] = json!(p);
        }
        crate::atomic::write_json(&tmp.join("config.json"), &cfg)?;
        let mut gen = json!({"do_sample": false});
        if let Some(b) = bos {
            gen["bos_token_id"] = json!(b);
        }
        if let Some(e) = eos {
            gen["eos_token_id"] = json!(e);
        }
        if let Some(p) = pad {
            gen["pad_token_id"] = json!(p);
        }
        crate::atomic::write_json(&tmp.join("generation_config.json"), &gen)?;
        crate::atomic::write_json(
            &tmp.join("dialora_import.json"),
            &json!({"source": gguf_path.file_name().map(|n| n.to_string_lossy().to_string()),
                    "general.name": meta.s("general.name"), "tokenizer.ggml.pre": pre,
                    "dequantized_to": cfg["torch_dtype"]}),
        )?;
        ImportReport {
            tensors: tensors.len(),
            parameters: params,
            vocab: tokens.len(),
            layers,
        }
    };
    out.commit()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_a_gguf_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.gguf");
        std::fs::write(&p, b"not gguf at all").unwrap();
        let e = import(&p, &d.path().join("out"), DType::F32, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.gguf") && e.contains("not a valid GGUF"),
            "{e}"
        );
        assert!(!d.path().join("out").exists());
    }
}
