//! report: compare training runs in one self-contained HTML file.

use clap::Parser;
use std::path::PathBuf;

/// Write one HTML file comparing run directories (trainer --output-dir): SVG charts of loss,
/// eval loss, gradient norm, learning rate and tokens/s against step with all runs overlaid, a
/// table of hyperparameters, final/best losses, wall time and peak memory, and the base vs
/// fine-tuned answers from `infer --compare` (compare.jsonl in the run directory) when present.
#[derive(Parser)]
#[command(name = "report", version)]
struct Args {
    /// Run directories (each with metrics.csv; run.json and compare.jsonl optional).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Output HTML file.
    #[arg(long, short, default_value = "report.html")]
    output: PathBuf,
    /// Title of the report.
    #[arg(long, default_value = "dialora")]
    title: String,
}

fn main() {
    let a = Args::parse();
    match common::report::write_report(&a.runs, &a.output, &a.title) {
        Ok(runs) => println!("report: {} run(s) -> {}", runs.len(), a.output.display()),
        Err(e) => {
            eprintln!("report: error: {e:#}");
            std::process::exit(1);
        }
    }
}
