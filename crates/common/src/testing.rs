//! Locations of the real test model and the HF reference, shared by the test suites.

use crate::config::ModelConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::PathBuf;

/// Largest absolute element-wise difference of two tensors of the same shape and dtype.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>())
        .expect("tensors of the same shape and dtype")
}

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// The imported SmolLM2 directory (`DIALORA_MODEL_DIR`, default `models/smollm2-135m-instruct`).
/// Fails with the command to run when it is missing: the real-model tests must not pass
/// silently without the model.
pub fn real_model_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("DIALORA_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/smollm2-135m-instruct"));
    if !dir.join("config.json").exists() {
        bail!(
            "{}: real model missing; run scripts/fetch-model.sh (make test does)",
            dir.display()
        );
    }
    Ok(dir)
}

/// HF transformers' reference outputs (`DIALORA_REFERENCE`, default
/// `../shared/reference/reference_tokens.json` beside the repository).
pub fn reference() -> Result<serde_json::Value> {
    let path = std::env::var_os("DIALORA_REFERENCE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/reference/reference_tokens.json"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: reference file missing", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Random weights for a config, as a name -> tensor map (HF names).
pub fn random_weights(cfg: &ModelConfig, seed: u64, dtype: DType) -> HashMap<String, Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = |shape: &[usize], scale: f64, offset: f64| {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| offset + scale * (rng.random::<f64>() * 2.0 - 1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    weight_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let t = if name.ends_with("norm.weight") {
                t(&shape, 0.2, 1.0)
            } else if name == "model.embed_tokens.weight" {
                t(&shape, 1.0, 0.0)
            } else if name == "lm_head.weight" {
                t(&shape, 0.3, 0.0)
            } else {
                t(&shape, 1.0 / (shape[1] as f64).sqrt(), 0.0)
            };
            (name, t)
        })
        .collect()
}

/// Every weight of a Llama config with its shape (HF names).
pub fn weight_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (h, kv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let mut m = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, d]),
        ("model.norm.weight".to_string(), vec![d]),
    ];
    if !cfg.tie_word_embeddings {
        m.push(("lm_head.weight".into(), vec![v, d]));
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (n, shape) in [
            ("self_attn.q_proj", vec![h * hd, d]),
            ("self_attn.k_proj", vec![kv * hd, d]),
            ("self_attn.v_proj", vec![kv * hd, d]),
            ("self_attn.o_proj", vec![d, h * hd]),
            ("mlp.gate_proj", vec![f, d]),
            ("mlp.up_proj", vec![f, d]),
            ("mlp.down_proj", vec![d, f]),
            ("input_layernorm", vec![d]),
            ("post_attention_layernorm", vec![d]),
        ] {
            m.push((format!("{p}.{n}.weight"), shape));
        }
    }
    m
}

/// Writes a small random Llama model directory that uses the real model's tokenizer and chat
/// template (so dataprep shards from the real tokenizer fit it). `vocab` must be the real one.
pub fn write_tiny_model(
    dir: &std::path::Path,
    hidden: usize,
    layers: usize,
    seed: u64,
) -> Result<ModelConfig> {
    let real = real_model_dir()?;
    std::fs::create_dir_all(dir)?;
    let real_cfg = ModelConfig::from_dir(&real)?;
    let cfg: ModelConfig = serde_json::from_value(serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": hidden * 2, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": real_cfg.vocab_size, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2
    }))?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let w: std::collections::BTreeMap<String, Tensor> =
        random_weights(&cfg, seed, DType::F32).into_iter().collect();
    crate::weights::save_atomic(&w, &dir.join("model.safetensors"))?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        if real.join(f).exists() {
            std::fs::copy(real.join(f), dir.join(f))?;
        }
    }
    Ok(cfg)
}

/// Shards of the project's sample dialogues (data/counsel_train.jsonl), made with the real
/// model's tokenizer into `dir/shards`.
pub fn sample_shards(
    dir: &std::path::Path,
    max_seq_len: usize,
    val_split: f64,
) -> Result<std::path::PathBuf> {
    let out = dir.join("shards");
    let opts = crate::data::PrepOptions {
        inputs: vec![repo_root().join("data/counsel_train.jsonl")],
        model_dir: real_model_dir()?,
        template: None,
        output: out.clone(),
        label_mode: crate::data::labels::LabelMode::All,
        max_seq_len,
        drop_long: false,
        val_split,
        seed: 1,
        shard_size: 1000,
        max_bad: 0,
        strict: true,
        overwrite: false,
    };
    crate::data::prepare(&opts, &mut |_| {})?;
    Ok(out)
}
