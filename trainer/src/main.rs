//! trainer: LoRA fine-tuning of a Llama-family model on dataprep shards.

use anyhow::Result;
use clap::Parser;
use common::progress::{eta, Progress};
use common::train::args::{expand_config_file, TrainArgs};
use common::train::checkpoint::TrainerState;
use common::train::comm::{self, Communicator};
use common::train::{stop_flag, Outcome, Reporter, Trainer};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Train a LoRA adapter. Writes adapter_model.safetensors + adapter_config.json (PEFT layout),
/// metrics.csv, run.json and checkpoint-<step>/ directories to --output-dir.
///
/// Flags follow HF TrainingArguments / peft LoraConfig names. `--config FILE` (JSON or TOML,
/// same names with `_` or `-`) supplies defaults; flags on the command line override it.
/// SIGINT/SIGTERM (e.g. Slurm preemption) finish the current step, save a checkpoint and exit
/// with status 75; resume with `--resume-from-checkpoint latest`. Exit statuses: 0 done, 75
/// interrupted with a checkpoint saved (run again to resume), 65 diverged (retrying will not
/// help), 2 bad arguments, 1 any other error.
///
/// Data-parallel over MPI with the trainer of `make mpi` (target/mpi/release/trainer):
/// `mpirun -n N trainer ...` or, in a Slurm allocation, `srun --mpi=pmix -n N trainer ...`.
/// Each step's batch is world size x --per-device-train-batch-size x
/// --gradient-accumulation-steps sequences, the run N ranks x accumulation G equals one
/// process with accumulation N x G; rank 0 writes everything. A trainer without MPI refuses
/// to be one of several tasks.
#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    allow_negative_numbers = true,
    args_override_self = true
)]
struct Cli {
    /// JSON or TOML file of arguments (keys as the flag names).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    args: TrainArgs,
}

/// Progress on a terminal (a bar that says what the run is doing, with an ETA that counts
/// evaluations), log lines otherwise.
struct Report {
    progress: Progress,
    phase: String,
    eta: Option<Duration>,
    loss: Option<f64>,
}

impl Report {
    fn refresh(&self) {
        let mut msg = self.phase.clone();
        if let Some(l) = self.loss {
            msg += &format!(" loss {l:.4}");
        }
        if let Some(d) = self.eta {
            msg += &format!(" eta {}", eta(d));
        }
        self.progress.set_message(&msg);
    }
}

/// What the ranks other than 0 report: nothing (rank 0 speaks for the run).
struct Quiet;

impl Reporter for Quiet {
    fn line(&mut self, _: &str) {}
}

impl Reporter for Report {
    fn line(&mut self, s: &str) {
        self.progress.println(&format!("trainer: {s}"));
    }
    fn phase(&mut self, what: &str) {
        self.phase = what.to_string();
        self.refresh();
    }
    fn step(&mut self, st: &TrainerState, loss: f64, eta: Option<Duration>) {
        self.progress.set_position(st.global_step as u64);
        (self.loss, self.eta) = (Some(loss), eta);
        self.refresh();
    }
}

fn main() {
    let argv = match expand_config_file(std::env::args().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("trainer: error: {e:#}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(argv);
    let outcome = common::device::run_compute(|| run(cli.args));
    common::cli::finish("trainer", outcome);
}

fn run(mut args: TrainArgs) -> Result<i32> {
    let t0 = Instant::now();
    let comm: Rc<dyn Communicator> = comm::world(args.ddp_timeout)?.into();
    let (rank, world) = (comm.rank(), comm.size());
    if world > 1 && args.device == "cuda" {
        // each rank takes the GPU of its rank on the node
        args.device = format!("cuda:{}", comm.local_rank());
    }
    if args.resume_from_checkpoint.is_some() {
        if let Some(done) = common::train::check_completed(&args, world)? {
            if rank > 0 {
                return Ok(common::cli::exit::OK);
            }
            let line = format!(
                "trainer: the run in {} already completed at step {} with these arguments; nothing to resume (adapter in {})",
                args.output_dir.display(),
                done.global_step,
                args.output_dir.display()
            );
            eprintln!("{line}");
            return Ok(common::cli::exit::OK);
        }
    }
    let stop = stop_flag(&if world > 1 {
        format!("rank {rank}: ")
    } else {
        String::new()
    })?;
    if rank > 0 {
        return rank_run(args, comm, stop);
    }
    let mut progress = Progress::new(0, "trainer");
    progress.set_message("loading model and data");
    let mut t = Trainer::with_comm(args, comm.clone()).map_err(|e| at_rank(e, world, 0))?;
    let resumed = t.state.global_step;
    progress.println(&format!(
        "trainer: {} LoRA modules, {} trainable parameters; {} train / {} val sequences; {} steps{}{}",
        t.model.num_loras(),
        t.model.trainable_parameters(),
        t.train.len(),
        t.val.as_ref().map(|v| v.len()).unwrap_or(0),
        t.state.total_steps,
        if world > 1 {
            format!(" on {world} ranks ({} sequences a step)", t.global_batch_size())
        } else {
            String::new()
        },
        if resumed > 0 {
            format!(" (resuming at step {resumed})")
        } else {
            String::new()
        }
    ));
    progress.set_length(t.state.total_steps as u64);
    progress.set_position(resumed as u64);
    let mut rep = Report {
        progress,
        phase: "training".into(),
        eta: None,
        loss: None,
    };
    let outcome = t.run(stop, &mut rep);
    rep.progress.finish();
    let outcome = outcome_or_abort(outcome, &*comm)?;
    report_end(&t, &outcome, t0)?;
    // the other ranks exit after rank 0 has written everything and said so (a launcher may
    // stop every rank as soon as one exits with a non-zero status)
    comm::barrier(&*comm, "the end of the run");
    Ok(outcome.exit_code())
}

/// Says how the run ended.
fn report_end(t: &Trainer, outcome: &Outcome, t0: Instant) -> Result<()> {
    let wall = common::report::duration(t0.elapsed().as_secs_f64());
    match outcome.clone() {
        Outcome::Completed {
            adapter_dir,
            final_eval_loss,
            first_eval_loss,
            best,
            kept_step,
            reason,
        } => {
            let ev = match (first_eval_loss, final_eval_loss) {
                (Some(a), Some(b)) => format!("; eval loss {a:.4} -> {b:.4}"),
                (None, Some(b)) => format!("; eval loss {b:.4}"),
                _ => String::new(),
            };
            let why = match reason.as_deref() {
                Some("early_stopping") => " (stopped early: no improvement)",
                _ => "",
            };
            let kept = match best {
                Some((step, m)) if step == kept_step => {
                    format!("; kept step {kept_step}, the best ({m:.4})")
                }
                Some((step, m)) => format!("; kept step {kept_step} (best: step {step}, {m:.4})"),
                None => String::new(),
            };
            common::cli::say(format!(
                "trainer: done in {wall}, {} steps{why}{ev}{kept}; adapter in {}",
                t.state.global_step,
                adapter_dir.display()
            ))?;
            Ok(())
        }
        Outcome::Diverged { message } => {
            eprintln!("trainer: error: {message}");
            Ok(())
        }
        Outcome::Interrupted { checkpoint } => {
            eprintln!(
                "trainer: interrupted at step {} after {wall}; checkpoint saved in {}; resume with --resume-from-checkpoint latest",
                t.state.global_step,
                checkpoint.display()
            );
            Ok(())
        }
    }
}

/// A rank's error named by its rank when there are several.
fn at_rank(e: anyhow::Error, world: usize, rank: usize) -> anyhow::Error {
    if world > 1 && e.downcast_ref::<comm::OtherRankFailed>().is_none() {
        e.context(format!("rank {rank}"))
    } else {
        e
    }
}

/// A run's end as every rank sees it; an error on one rank alone (the ranks may be waiting
/// for it in a collective) is said and ends every rank (MPI_Abort).
fn outcome_or_abort(r: Result<Outcome>, comm: &dyn Communicator) -> Result<Outcome> {
    match r {
        Err(e) if comm.size() > 1 => {
            let e = at_rank(e, comm.size(), comm.rank());
            eprintln!("trainer: error: {}", common::cli::error_line(&e));
            comm.abort(common::cli::exit_code(&e))
        }
        r => r,
    }
}

/// A rank other than 0: the same training, silent; the exit status of the run's end.
fn rank_run(
    args: TrainArgs,
    comm: Rc<dyn Communicator>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<i32> {
    let (rank, world) = (comm.rank(), comm.size());
    let mut t = Trainer::with_comm(args, comm.clone()).map_err(|e| at_rank(e, world, rank))?;
    let outcome = outcome_or_abort(t.run(stop, &mut Quiet), &*comm)?;
    comm::barrier(&*comm, "the end of the run");
    Ok(outcome.exit_code())
}
