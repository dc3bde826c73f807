//! Checkpoints: `checkpoint-<step>/` with the adapter (PEFT layout), the optimizer moments,
//! and `trainer_state.json` (step, data position, counters). Written to a temporary directory
//! and renamed, so a crash never leaves a half-written checkpoint that looks complete.

use super::optim::{AdamW, Moments};
use crate::lora::{Adapter, LoraConfig};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: usize,
    pub total_steps: usize,
    /// Data position: epoch and next batch within it.
    pub epoch: u64,
    pub batch_in_epoch: usize,
    /// Micro-batches consumed (selects dropout masks).
    pub micro_step: u64,
    pub tokens_seen: usize,
    pub elapsed_s: f64,
    pub nonfinite_in_a_row: usize,
    pub adam_t: u64,
    pub best_eval_loss: Option<f64>,
}

pub fn checkpoint_dir(output: &Path, step: usize) -> PathBuf {
    output.join(format!("checkpoint-{step}"))
}

/// Complete checkpoints in `output`, oldest first.
pub fn list(output: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(output)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let step = e
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            e.path()
                .join(STATE_FILE)
                .exists()
                .then_some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Resolves `--resume-from-checkpoint` (`latest` or a directory).
pub fn resolve(output: &Path, spec: &str) -> Result<PathBuf> {
    if spec == "latest" {
        return list(output).pop().map(|(_, p)| p).ok_or_else(|| {
            anyhow!(
                "--resume-from-checkpoint latest: no checkpoint in {}",
                output.display()
            )
        });
    }
    let p = PathBuf::from(spec);
    if !p.join(STATE_FILE).exists() {
        bail!("{}: not a checkpoint (no {STATE_FILE})", p.display());
    }
    Ok(p)
}

/// Saves a checkpoint atomically and prunes old ones beyond `keep` (0 = keep all).
pub fn save(
    output: &Path,
    state: &TrainerState,
    lora_cfg: &LoraConfig,
    weights: &BTreeMap<String, (Tensor, Tensor)>,
    opt: &AdamW,
    module_names: &[String],
    keep: usize,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(output, state.global_step);
    let out = crate::atomic::OutputDir::create(&dir)?;
    Adapter::save(lora_cfg, weights, out.path())?;
    let mut t = BTreeMap::new();
    for (i, name) in module_names.iter().enumerate() {
        for (which, slot) in [('A', 2 * i), ('B', 2 * i + 1)] {
            if let Some(Moments { m, v }) = &opt.state[slot] {
                t.insert(format!("{name}.{which}.exp_avg"), m.clone());
                t.insert(format!("{name}.{which}.exp_avg_sq"), v.clone());
            }
        }
    }
    crate::weights::save(&t, &out.path().join(OPTIMIZER_FILE))?;
    crate::atomic::write_json(&out.path().join(STATE_FILE), state)?;
    out.commit()?;
    if keep > 0 {
        let all = list(output);
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            std::fs::remove_dir_all(old).ok();
        }
    }
    Ok(dir)
}

/// Loads a checkpoint: state, adapter weights, and the optimizer moments into `opt`.
pub fn load(
    dir: &Path,
    opt: &mut AdamW,
    module_names: &[String],
    device: &Device,
) -> Result<(TrainerState, Adapter)> {
    let sp = dir.join(STATE_FILE);
    let state: TrainerState = serde_json::from_str(
        &std::fs::read_to_string(&sp).with_context(|| format!("{}: cannot read", sp.display()))?,
    )
    .with_context(|| format!("{}: invalid trainer state", sp.display()))?;
    let adapter = Adapter::load(dir, DType::F32, device)?;
    let store = crate::weights::SafetensorsStore::open_files(&[dir.join(OPTIMIZER_FILE)])?;
    opt.t = state.adam_t;
    for (i, name) in module_names.iter().enumerate() {
        for (which, slot) in [('A', 2 * i), ('B', 2 * i + 1)] {
            let km = format!("{name}.{which}.exp_avg");
            let kv = format!("{name}.{which}.exp_avg_sq");
            opt.state[slot] = if store.contains(&km) {
                Some(Moments {
                    m: store.load(&km, DType::F32, device)?,
                    v: store.load(&kv, DType::F32, device)?,
                })
            } else {
                None
            };
        }
    }
    Ok((state, adapter))
}
