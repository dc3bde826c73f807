//! Test helpers shared by the test suites (feature `testing`; never in a release binary): the
//! repository's location, the real test model, the HF oracle fixture, tiny random models and
//! sample shards.
//!
//! Paths are found at run time from the test's own crate directory (cargo sets
//! `CARGO_MANIFEST_DIR` for `cargo test`) or the current directory, never baked in at build
//! time, and never outside the repository.

use crate::config::ModelConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::path::{Path, PathBuf};

/// Largest absolute element-wise difference of two tensors of the same shape and dtype.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>())
        .expect("tensors of the same shape and dtype")
}

/// A JSON array of token ids (the oracle fixture's `ids` fields) as `u32`s.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// Tensor `name` of a model directory's weights, as f32 values in row-major order.
pub fn f32_values(store: &crate::weights::SafetensorsStore, name: &str) -> Vec<f32> {
    let t = store
        .load(name, DType::F32, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    t.flatten_all()
        .and_then(|t| t.to_vec1())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The repository root: the nearest directory at or above the running test's crate (or the
/// current directory) whose Cargo.toml declares the workspace.
pub fn repo_root() -> PathBuf {
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::current_dir().expect("current directory"));
    let mut dir = start.as_path();
    loop {
        let manifest = dir.join("Cargo.toml");
        if std::fs::read_to_string(&manifest).is_ok_and(|s| s.contains("[workspace]")) {
            return dir.to_path_buf();
        }
        dir = dir
            .parent()
            .unwrap_or_else(|| panic!("no workspace Cargo.toml above {}", start.display()));
    }
}

/// The imported SmolLM2 directory (`DIALORA_MODEL_DIR`, default `models/smollm2-135m-instruct`
/// in the repository). Fails with the command to run when it is missing: the real-model tests
/// must not pass silently without the model.
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

/// Path of the HF transformers oracle for SmolLM2 (token ids, greedy text, logits), a fixture
/// in the repository made by `scripts/make-reference.py`.
pub fn reference_path() -> PathBuf {
    repo_root().join("common/tests/fixtures/smollm2_hf_reference.json")
}

/// The HF oracle fixture, parsed.
pub fn reference() -> Result<serde_json::Value> {
    let path = reference_path();
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: reference fixture missing", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Writes a small random Llama model directory that uses the real model's tokenizer and chat
/// template (so dataprep shards from the real tokenizer fit it).
pub fn write_tiny_model(
    dir: &Path,
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
        crate::model::init::random_weights(&cfg, seed, DType::F32)
            .into_iter()
            .collect();
    crate::weights::save(&w, &dir.join("model.safetensors"))?;
    copy_tokenizer(&real, dir)?;
    Ok(cfg)
}

/// Copies a model directory's tokenizer, tokenizer config, chat template and generation config
/// (those it has) into `dir`.
pub fn copy_tokenizer(model: &Path, dir: &Path) -> Result<()> {
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        if model.join(f).exists() {
            std::fs::copy(model.join(f), dir.join(f))?;
        }
    }
    Ok(())
}

/// Shards of the project's sample dialogues (data/counsel_train.jsonl), made with the real
/// model's tokenizer into `dir/shards`.
pub fn sample_shards(dir: &Path, max_seq_len: usize, val_split: f64) -> Result<PathBuf> {
    let out = dir.join("shards");
    let opts = crate::data::PrepOptions {
        inputs: vec![repo_root().join("data/counsel_train.jsonl")],
        model_dir: real_model_dir()?,
        output: out.clone(),
        max_seq_len,
        val_split,
        seed: 1,
        strict: true,
        ..crate::data::PrepOptions::default()
    };
    crate::data::prepare(&opts, &mut |_| {})?;
    Ok(out)
}

/// `program` to be run as a user without privileges: as root (CI), through
/// `setpriv --reuid=nobody` (root ignores file permissions, so a read-only directory would not
/// be read-only to it); as any other user, as that user. `dir` and its parents are made
/// traversable and readable by that user.
pub fn unprivileged(program: &Path, dir: &Path) -> std::process::Command {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    if !root {
        return std::process::Command::new(program);
    }
    let mut d = Some(dir);
    while let Some(p) = d {
        if let Ok(m) = std::fs::metadata(p) {
            let mode = m.permissions().mode();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode | 0o055)).ok();
        }
        d = p.parent();
    }
    let mut c = std::process::Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(program);
    c
}

/// A directory nobody may write into (mode 0555), inside `parent`.
pub fn read_only_dir(parent: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let ro = parent.join("read-only");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    ro
}

/// A random adapter for the real SmolLM2 on q/v (rank 4) with a visible effect, seeded.
pub fn random_adapter(dir: &Path, seed: u64) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut uniform = |rows: usize, cols: usize| {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random::<f32>() * 0.2 - 0.1)
            .collect();
        Tensor::from_vec(v, (rows, cols), &candle_core::Device::Cpu)
    };
    let mut w = std::collections::BTreeMap::new();
    for i in 0..30 {
        for (m, out) in [("self_attn.q_proj", 576), ("self_attn.v_proj", 192)] {
            let a = uniform(4, 576)?;
            let b = uniform(out, 4)?;
            let s = (seed as f64 + 1.0) * 0.5;
            w.insert(format!("model.layers.{i}.{m}"), ((a * s)?, (b * s)?));
        }
    }
    crate::lora::Adapter::save(
        &crate::lora::LoraConfig::new(4, 8.0, 0.0, vec!["q_proj".into(), "v_proj".into()]),
        &w,
        dir,
    )
}
