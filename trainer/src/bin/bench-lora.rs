//! bench-lora: LoRA training throughput and peak memory (same shapes and settings as the
//! reference bench_lora.py), on a real model directory or a randomly initialised config.

use anyhow::Result;
use clap::Parser;
use common::device::DtypeArg;
use std::path::PathBuf;

/// Train LoRA (q,k,v,o,gate,up,down) for --steps on random tokens and print tokens/s and peak
/// memory; the last line is `RESULT {json}`.
#[derive(Parser)]
#[command(name = "bench-lora", version)]
struct Args {
    /// A model directory (real weights).
    #[arg(long, conflicts_with = "random_config")]
    model: Option<PathBuf>,
    /// Random init of a preset (deepseek-7b, smollm2-135m) or a config.json.
    #[arg(long)]
    random_config: Option<String>,
    /// Override num_hidden_layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Sequence length.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Steps in total (warmup included).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Untimed first steps.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    r: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.05)]
    dropout: f64,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Compute dtype of the frozen model.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    #[arg(long, default_value = "cpu", help = common::device::DEVICE_HELP)]
    device: String,
    /// Gradient checkpointing.
    #[arg(long)]
    grad_ckpt: bool,
    /// Seed of the random tokens and LoRA init.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() {
    let args = Args::parse();
    let outcome = common::device::run_compute(|| run(args));
    common::cli::finish("bench-lora", outcome.map(|_| 0));
}

fn run(a: Args) -> Result<()> {
    let o = common::bench::BenchOptions {
        model: a.model,
        random_config: a.random_config,
        layers: a.layers,
        seq: a.seq,
        batch: a.batch,
        steps: a.steps,
        warmup: a.warmup,
        r: a.r,
        alpha: a.alpha,
        dropout: a.dropout,
        lr: a.lr,
        dtype: a.dtype.dtype(),
        device: common::device::parse(&a.device)?,
        grad_ckpt: a.grad_ckpt,
        seed: a.seed,
    };
    let r = common::bench::run(&o)?;
    common::cli::say(format!(
        "median step {:.3}s  tokens/s {:.1}  peak memory ({}) {:.0} MiB",
        r["median_step_s"].as_f64().unwrap_or(0.0),
        r["tokens_per_s"].as_f64().unwrap_or(0.0),
        r["peak_mem_of"].as_str().unwrap_or("rss"),
        r["peak_mem_mib"].as_f64().unwrap_or(0.0)
    ))?;
    common::cli::say(format!("RESULT {r}"))
}
