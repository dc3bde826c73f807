//! Training: arguments (HF names), batching, the loop, optimizer and schedules, checkpoints,
//! and the run's records.

pub mod args;
pub mod batches;
pub mod checkpoint;
pub mod comm;
pub mod metrics;
pub mod optim;
pub mod run;
pub mod schedule;
pub mod tensorboard;
mod trainer;

pub use trainer::{
    record_failure, steps, stop_flag, Outcome, OutputLock, Reporter, Trainer, LOCK_FILE,
};

use anyhow::Result;

/// This machine's host name (Linux), which the lock file and TensorBoard file names carry.
pub(crate) fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
}

/// The record of a run in `output_dir` that completed (its adapter written), if there is one.
pub fn completed_run(output_dir: &std::path::Path) -> Option<run::RunRecord> {
    let r = run::RunRecord::load(output_dir).ok()?;
    (r.status == run::RunStatus::Completed
        && output_dir.join(crate::lora::ADAPTER_WEIGHTS).exists())
    .then_some(r)
}

/// `--resume-from-checkpoint` on an output directory whose run already completed (by `world`
/// ranks now): the record
/// when these arguments are that run's own (nothing left to do: a requeued sweep point ends at
/// once), a bad-argument error naming what differs when they ask for another run (more steps,
/// other settings), since a finished run is not continued silently or at all; `None` when the
/// directory holds no completed run.
pub fn check_completed(args: &args::TrainArgs, world: usize) -> Result<Option<run::RunRecord>> {
    let out = &args.output_dir;
    let Some(done) = completed_run(out) else {
        return Ok(None);
    };
    let usage = |what: String| {
        crate::cli::usage(format!(
            "{}: the run there completed at step {} of {}, and {what}; a completed run is not continued: train into another --output-dir (or start over with --overwrite-output-dir and no --resume-from-checkpoint)",
            out.display(),
            done.global_step,
            done.total_steps
        ))
    };
    let Some(done_lora) = &done.lora_config else {
        return Ok(Some(done));
    };
    let lora = args
        .lora_config()
        .map_err(|e| crate::cli::usage(crate::cli::error_line(&e)))?;
    let now = checkpoint::identity(
        args,
        world,
        &lora,
        &run::file_sha256(&args.model.join("config.json")),
        &run::file_sha256(&args.data.join("meta.json")),
    )?;
    let then = checkpoint::identity(
        &done.args,
        done.world_size.max(1),
        done_lora,
        &done.model.config_sha256,
        &done.data.meta_sha256,
    )?;
    let diffs = checkpoint::identity_diffs(&then, &now, "run");
    if !diffs.is_empty() {
        return Err(usage(format!(
            "these arguments differ from it ({})",
            diffs.join("; ")
        )));
    }
    let meta = crate::data::shards::Meta::load(&args.data)?;
    let (_, _, total) = steps(args, world, meta.train.sequences);
    if total != done.total_steps {
        return Err(usage(format!("these arguments ask for {total} steps")));
    }
    Ok(Some(done))
}

/// Records in `output_dir`'s run.json that an attempt to resume it failed before training
/// (a damaged checkpoint, say), unless there is no record or the run completed.
pub fn record_failed_start(output_dir: &std::path::Path, error: &anyhow::Error) {
    let Ok(mut r) = run::RunRecord::load(output_dir) else {
        return;
    };
    if r.status == run::RunStatus::Completed {
        return;
    }
    r.status = run::RunStatus::Failed;
    r.error = Some(format!(
        "could not resume: {}",
        crate::cli::error_line(error)
    ));
    if let Err(e) = r.save(output_dir) {
        eprintln!("trainer: cannot record the failure in run.json: {e:#}");
    }
}
