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
