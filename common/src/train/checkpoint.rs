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
    /// Wall time of the run so far, loading included (see `RunRecord::wall_s`).
    #[serde(default)]
    pub wall_s: f64,
    pub nonfinite_in_a_row: usize,
    /// The loss of the first training step, and the steps in a row since whose loss was above
    /// --divergence-loss-ratio times it.
    #[serde(default)]
    pub first_loss: Option<f64>,
    #[serde(default)]
    pub exploded_in_a_row: usize,
    pub adam_t: u64,
    /// The lowest evaluation loss so far (before-training evaluation included).
    pub best_eval_loss: Option<f64>,
    /// The best value of --metric-for-best-model over the evaluations after training steps,
    /// and the step it came at.
    #[serde(default)]
    pub best_metric: Option<f64>,
    #[serde(default)]
    pub best_step: Option<usize>,
    /// Evaluations in a row without a significant improvement (early stopping).
    #[serde(default)]
    pub evals_without_improvement: usize,
    /// The settings that make a run this run (see `identity`): a resume must not change them.
    #[serde(default)]
    pub identity: BTreeMap<String, Setting>,
}

/// One setting of a run's identity: the value compared on resume and how to show it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Setting {
    pub value: String,
    pub shown: String,
}

impl Setting {
    fn plain(v: impl ToString) -> Self {
        let value = v.to_string();
        Setting {
            shown: value.clone(),
            value,
        }
    }
}

/// What a resumed run must share with the checkpoint, keyed by flag: what the adapter is
/// (LoRA settings, the base model) and what the data stream is (the shards, the seed that
/// orders them and draws dropout, the batch geometry).
///
/// `world`: the ranks training the run. Its micro-batches per step (ranks x
/// --gradient-accumulation-steps) are what a resume must keep, so a run of 2 ranks x
/// accumulation 4 resumes as 4 ranks x 2, or 1 rank x 8, the same optimizer steps.
pub fn identity(
    args: &super::args::TrainArgs,
    world: usize,
    lora: &LoraConfig,
    model_sha: &str,
    data_sha: &str,
) -> Result<BTreeMap<String, Setting>> {
    let mut targets = lora.targets()?;
    targets.sort();
    let file = |sha: &str, dir: &Path| Setting {
        value: sha.to_string(),
        shown: format!("{} ({sha})", dir.display()),
    };
    Ok(BTreeMap::from([
        ("--lora-r".into(), Setting::plain(lora.r)),
        ("--lora-alpha".into(), Setting::plain(lora.lora_alpha)),
        ("--lora-dropout".into(), Setting::plain(lora.lora_dropout)),
        ("--target-modules".into(), Setting::plain(targets.join(","))),
        ("--use-rslora".into(), Setting::plain(lora.use_rslora)),
        ("--seed".into(), Setting::plain(args.seed)),
        ("--model".into(), file(model_sha, &args.model)),
        ("--data".into(), file(data_sha, &args.data)),
        (
            "--per-device-train-batch-size".into(),
            Setting::plain(args.per_device_train_batch_size),
        ),
        ("--gradient-accumulation-steps".into(), {
            let g = args.gradient_accumulation_steps;
            Setting {
                value: (world * g).to_string(),
                shown: if world == 1 {
                    g.to_string()
                } else {
                    format!(
                        "{g} on each of {world} ranks ({} micro-batches a step)",
                        world * g
                    )
                },
            }
        }),
        (
            "--group-by-length".into(),
            Setting::plain(args.group_by_length),
        ),
    ]))
}

/// The settings of `now` that differ from `saved`, each as `FLAG: WHAT OLD, now NEW` (`what`
/// names where the old value comes from: `checkpoint`, `run`).
pub fn identity_diffs(
    saved: &BTreeMap<String, Setting>,
    now: &BTreeMap<String, Setting>,
    what: &str,
) -> Vec<String> {
    now.iter()
        .filter_map(|(k, v)| {
            let old = saved.get(k)?;
            (old.value != v.value).then(|| format!("{k}: {what} {}, now {}", old.shown, v.shown))
        })
        .collect()
}

/// Refuses to resume `checkpoint` with settings that differ from the ones it was made with,
/// naming each, with the checkpoint's value and the new one.
pub fn check_identity(
    checkpoint: &Path,
    saved: &BTreeMap<String, Setting>,
    now: &BTreeMap<String, Setting>,
) -> Result<()> {
    let diffs = identity_diffs(saved, now, "checkpoint");
    if !diffs.is_empty() {
        bail!(
            "{}: cannot resume with different settings ({}); resume with the checkpoint's settings, or start a new run in another --output-dir",
            checkpoint.display(),
            diffs.join("; ")
        );
    }
    Ok(())
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

/// Resolves `--resume-from-checkpoint`: `latest` (the newest in `output`; an error when
/// there is none), `auto` (the newest, or `None` to start afresh: a job system's choice, which
/// runs the same command again and again), or a checkpoint directory.
pub fn resolve(output: &Path, spec: &str) -> Result<Option<PathBuf>> {
    match spec {
        "auto" => Ok(list(output).pop().map(|(_, p)| p)),
        "latest" => list(output).pop().map(|(_, p)| Some(p)).ok_or_else(|| {
            anyhow!(
                "--resume-from-checkpoint latest: no checkpoint in {}",
                output.display()
            )
        }),
        dir => {
            let p = PathBuf::from(dir);
            if !p.join(STATE_FILE).exists() {
                bail!("{}: not a checkpoint (no {STATE_FILE})", p.display());
            }
            Ok(Some(p))
        }
    }
}

/// Which checkpoints stay: at most `keep` (0 = all), always the one of step `protect` (the best).
#[derive(Debug, Clone, Copy, Default)]
pub struct Retention {
    pub keep: usize,
    pub protect: Option<usize>,
}

/// Saves a checkpoint atomically and prunes old ones as `retention` says.
pub fn save(
    output: &Path,
    state: &TrainerState,
    lora_cfg: &LoraConfig,
    weights: &BTreeMap<String, (Tensor, Tensor)>,
    opt: &AdamW,
    module_names: &[String],
    retention: Retention,
) -> Result<PathBuf> {
    let Retention { keep, protect } = retention;
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
        let all: Vec<(usize, PathBuf)> = list(output)
            .into_iter()
            .filter(|(s, _)| Some(*s) != protect)
            .collect();
        let keep_others = keep.saturating_sub(usize::from(protect.is_some())).max(1);
        for (_, old) in all.iter().take(all.len().saturating_sub(keep_others)) {
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
