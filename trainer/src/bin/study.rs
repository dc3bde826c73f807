//! study: plan a one-at-a-time study of trainer settings, and report on it
//! (`scripts/study.sh` runs the whole study; this is its planning and reporting half).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Plan a study (a baseline and factors varied one at a time around it) into training points,
/// or write its report. `scripts/study.sh STUDY.toml` does both and trains the points in
/// between, locally or as one Slurm array; see the header of that script and
/// `studies/article.toml` for the study file.
#[derive(Parser)]
#[command(name = "study", version, allow_negative_numbers = true)]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Expand a study file into points under --out (runs/NAME): study.toml (its copy),
    /// plan.json, points.tsv (one `name<TAB>trainer flags` line per point, for
    /// `scripts/sweep.sh --points`) and dataprep.args. A value equal to the baseline's (or to
    /// an earlier point's) is trained once and shared. A study directory that exists with
    /// another study file, model or trainer arguments is refused.
    Plan {
        /// The study file (TOML: [baseline], [[factor]], [data], [answers]).
        study: PathBuf,
        /// The study's directory.
        #[arg(long)]
        out: PathBuf,
        /// Base model directory (Hugging Face layout).
        #[arg(long)]
        model: PathBuf,
        /// Trainer arguments applied to every point (after `--`).
        #[arg(last = true)]
        trainer_args: Vec<String>,
    },
    /// Answer the study's held-out questions with the base model and every completed point
    /// (all at once through the batched engine; earlier answers are reused while the adapter
    /// is unchanged), score the answers, and write study.json and report.html into the study
    /// directory. Points not finished are listed with their status.
    Report {
        /// The study's directory (runs/NAME).
        dir: PathBuf,
    },
}

fn main() {
    let a = Args::parse();
    let outcome = match a.what {
        What::Plan {
            study,
            out,
            model,
            trainer_args,
        } => common::study::write_plan(&study, &model, &trainer_args, &out).and_then(|p| {
            let shared = p
                .factors
                .iter()
                .flat_map(|f| &f.levels)
                .filter(|l| l.baseline)
                .count();
            common::cli::say(format!(
                "study: {} factors, {} training points (the baseline shared by {shared} values) -> {}",
                p.factors.len(),
                p.points.len(),
                out.join(common::study::POINTS_FILE).display()
            ))
        }),
        What::Report { dir } => {
            common::study::write_report(&dir, &mut |s| eprintln!("{s}")).and_then(|r| {
                let done = r.points.iter().filter(|p| p.status == "completed").count();
                common::cli::say(format!(
                    "study: {} points, {done} completed; report in {}",
                    r.points.len(),
                    dir.join(common::study::REPORT_FILE).display()
                ))?;
                for p in r.points.iter().filter(|p| p.status != "completed") {
                    common::cli::say(format!(
                        "  {}: {}{}",
                        p.name,
                        p.status,
                        p.message
                            .as_deref()
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    ))?;
                }
                Ok(())
            })
        }
    };
    common::cli::finish("study", outcome.map(|_| 0));
}
