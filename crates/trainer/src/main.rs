//! trainer: LoRA fine-tuning of a Llama-family model on dataprep shards.

use anyhow::Result;
use clap::Parser;
use common::train::args::{expand_config_file, TrainArgs};
use common::train::checkpoint::TrainerState;
use common::train::{stop_flag, Outcome, Reporter, Trainer};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

/// Train a LoRA adapter. Writes adapter_model.safetensors + adapter_config.json (PEFT layout),
/// metrics.csv, run.json and checkpoint-<step>/ directories to --output-dir.
///
/// Flags follow HF TrainingArguments / peft LoraConfig names. `--config FILE` (JSON or TOML,
/// same names with `_` or `-`) supplies defaults; flags on the command line override it.
/// SIGINT/SIGTERM (e.g. Slurm preemption) finish the current step, save a checkpoint and exit
/// with status 130; resume with `--resume-from-checkpoint latest`.
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

struct Report {
    bar: Option<ProgressBar>,
}

impl Reporter for Report {
    fn line(&mut self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("trainer: {s}"),
        }
    }
    fn step(&mut self, st: &TrainerState, loss: f64) {
        if let Some(b) = &self.bar {
            b.set_length(st.total_steps as u64);
            b.set_position(st.global_step as u64);
            b.set_message(format!("loss {loss:.4}"));
        }
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
    match common::device::run_compute(|| run(cli.args)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("trainer: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: TrainArgs) -> Result<i32> {
    let stop = stop_flag()?;
    let mut t = Trainer::new(args)?;
    let resumed = t.state.global_step;
    eprintln!(
        "trainer: {} LoRA modules, {} trainable parameters; {} train / {} val sequences; {} steps{}",
        t.model.num_loras(),
        t.model.loras().iter().map(|(_, l)| l.a.elem_count() + l.b.elem_count()).sum::<usize>(),
        t.train.len(),
        t.val.as_ref().map(|v| v.len()).unwrap_or(0),
        t.state.total_steps,
        if resumed > 0 { format!(" (resuming at step {resumed})") } else { String::new() }
    );
    let bar = if std::io::stderr().is_terminal() && std::env::var_os("DIALORA_NO_BAR").is_none() {
        let b = ProgressBar::new(t.state.total_steps as u64);
        b.set_style(
            ProgressStyle::with_template("train [{bar:30}] {pos}/{len} {msg} eta {eta}")
                .unwrap()
                .progress_chars("=> "),
        );
        b.set_position(resumed as u64);
        Some(b)
    } else {
        None
    };
    let mut rep = Report { bar };
    let outcome = t.run(stop, &mut rep)?;
    if let Some(b) = &rep.bar {
        b.finish_and_clear();
    }
    match outcome {
        Outcome::Completed {
            adapter_dir,
            final_eval_loss,
            first_eval_loss,
        } => {
            let ev = match (first_eval_loss, final_eval_loss) {
                (Some(a), Some(b)) => format!("; eval loss {a:.4} -> {b:.4}"),
                (None, Some(b)) => format!("; eval loss {b:.4}"),
                _ => String::new(),
            };
            println!(
                "trainer: done in {:.1}s, {} steps{ev}; adapter in {}",
                t.state.elapsed_s,
                t.state.global_step,
                adapter_dir.display()
            );
            Ok(0)
        }
        Outcome::Interrupted { checkpoint } => {
            eprintln!(
                "trainer: interrupted at step {}; checkpoint saved in {}; resume with --resume-from-checkpoint latest",
                t.state.global_step,
                checkpoint.display()
            );
            Ok(130)
        }
    }
}
