//! `run.json` of a run directory: what ran (arguments, LoRA config, model and data
//! fingerprints, versions, device) and how it ended. Written by the trainer at the start and at
//! every end, read by the report.

use super::args::TrainArgs;
use crate::lora::LoraConfig;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const RUN_FILE: &str = "run.json";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Completed,
    /// Stopped by a signal after saving a checkpoint (resume to continue).
    Interrupted,
    /// Stopped by the divergence guard (non-finite loss or gradient).
    Diverged,
    /// Stopped by an error (`error` says which).
    Failed,
    /// Stopped by a second signal without saving (`error` says after which step).
    Aborted,
    #[default]
    #[serde(other)]
    Unknown,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Diverged => "diverged",
            RunStatus::Failed => "failed",
            RunStatus::Aborted => "aborted",
            RunStatus::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelInfo {
    pub dir: String,
    pub config_sha256: String,
    pub tokenizer_fingerprint: String,
    pub architecture: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DataInfo {
    pub dir: String,
    pub meta_sha256: String,
    pub train_sequences: usize,
    pub val_sequences: usize,
    pub label_mode: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Versions {
    pub dialora: String,
    pub candle: String,
    pub tokenizers: String,
    pub safetensors: String,
}

impl Default for Versions {
    /// The versions this build was made with (from Cargo.lock, see build.rs).
    fn default() -> Self {
        Versions {
            dialora: env!("CARGO_PKG_VERSION").into(),
            candle: env!("DIALORA_CANDLE_VERSION").into(),
            tokenizers: env!("DIALORA_TOKENIZERS_VERSION").into(),
            safetensors: env!("DIALORA_SAFETENSORS_VERSION").into(),
        }
    }
}

/// The record. Every field has a default so older or partial records still read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunRecord {
    pub status: RunStatus,
    /// Why a completed run ended early, or what an interrupted/failed one hit.
    pub reason: Option<String>,
    /// The error of a failed run.
    pub error: Option<String>,
    /// The run's name (`--run-name`, else the output directory's name).
    pub run_name: String,
    pub args: TrainArgs,
    pub lora_config: Option<LoraConfig>,
    pub total_steps: usize,
    pub warmup_steps: usize,
    pub batches_per_epoch: usize,
    pub trainable_parameters: usize,
    pub model: ModelInfo,
    pub data: DataInfo,
    pub versions: Versions,
    pub device: String,
    /// CPU threads the compute ran on (on each rank).
    pub threads: usize,
    /// The ranks that trained the run (1: one process), and the sequences of one optimizer
    /// step across them (ranks x per-device batch x accumulation).
    #[serde(default)]
    pub world_size: usize,
    #[serde(default)]
    pub global_batch_size: usize,
    /// Seconds rank 0 spent in collectives with the other ranks (gradients, losses, the
    /// stop flag) moving the data, and waiting for the others to reach them.
    #[serde(default)]
    pub collective_s: f64,
    #[serde(default)]
    pub collective_wait_s: f64,
    pub global_step: usize,
    /// Time in the training loop (steps and evaluations), over every attempt.
    pub elapsed_s: f64,
    /// Wall time of the run from the start of each attempt (loading included), over every
    /// attempt.
    pub wall_s: f64,
    pub peak_mem_mib: f64,
    /// What `peak_mem_mib` measures: `rss` (peak resident memory of the process, CPU runs) or
    /// `cuda` (peak device memory in use, CUDA runs).
    pub peak_mem_of: String,
    pub best_eval_loss: Option<f64>,
    /// --metric-for-best-model, its best value after a training step and that step.
    pub metric_for_best_model: String,
    pub best_metric: Option<f64>,
    pub best_step: Option<usize>,
    /// The step whose adapter the run wrote (the best with --load-best-model-at-end).
    pub kept_step: Option<usize>,
}

impl RunRecord {
    /// Reads `<dir>/run.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(RUN_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid run record", path.display()))
    }

    /// Writes `<dir>/run.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::atomic::write_json(&dir.join(RUN_FILE), self)
    }
}

/// `sha256:` of a file's bytes (empty when it cannot be read).
pub fn file_sha256(p: &Path) -> String {
    use sha2::Digest;
    std::fs::read(p)
        .map(|b| format!("sha256:{:x}", sha2::Sha256::digest(&b)))
        .unwrap_or_default()
}
