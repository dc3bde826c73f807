//! report: compare training runs in one self-contained HTML file.

use clap::Parser;
use std::path::PathBuf;

/// Write one self-contained HTML file comparing training runs (trainer --output-dir
/// directories). It opens on the results, one row per run: final train loss, eval loss first ->
/// best (step) -> final, wall time, peak memory. Then the hyper-parameters that differ between
/// the runs (the shared ones folded away), SVG charts of loss, eval loss (best point circled),
/// gradient norm, learning rate and tokens/s against step with all runs overlaid, and the base
/// vs fine-tuned answers from `infer --compare` (compare.jsonl in a run directory) when present.
///
/// Runs are named by --run-name (run.json); when those clash, by the shortest distinct suffix of
/// their paths.
#[derive(Parser)]
#[command(name = "report", version)]
struct Args {
    /// Run directories (each with metrics.csv; run.json and compare.jsonl optional).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Output HTML file. An existing one is replaced only with --overwrite, and only when it
    /// is an earlier report; a file of a run directory is never written over.
    #[arg(long, short, default_value = "report.html")]
    output: PathBuf,
    /// Replace an existing report at --output.
    #[arg(long)]
    overwrite: bool,
    /// Title of the report.
    #[arg(long, default_value = "dialora")]
    title: String,
    /// List run directories without metrics yet (a sweep's unstarted or failed points) as
    /// such instead of failing.
    #[arg(long)]
    partial: bool,
}

fn main() {
    let a = Args::parse();
    let outcome =
        common::report::write_report(&a.runs, &a.output, &a.title, a.partial, a.overwrite)
            .and_then(|runs| {
                common::cli::say(format!(
                    "report: {} run(s) -> {}",
                    runs.len(),
                    a.output.display()
                ))
            });
    common::cli::finish("report", outcome.map(|_| 0));
}
