//! Locations of the real test model and the HF reference, shared by the test suites.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

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
