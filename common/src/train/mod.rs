//! Training: arguments (HF names), batching, the loop, optimizer and schedules, checkpoints,
//! and the run's records.

pub mod args;
pub mod batches;
pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod run;
pub mod schedule;
mod trainer;

pub use trainer::{stop_flag, Outcome, Reporter, Trainer};

/// The record of a run in `output_dir` that completed (its adapter written), if there is one.
pub fn completed_run(output_dir: &std::path::Path) -> Option<run::RunRecord> {
    let r = run::RunRecord::load(output_dir).ok()?;
    (r.status == run::RunStatus::Completed
        && output_dir.join(crate::lora::ADAPTER_WEIGHTS).exists())
    .then_some(r)
}
