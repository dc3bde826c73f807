//! dataprep: multi-turn conversations (JSON/JSONL) -> token/label shards for `trainer`.

use anyhow::Result;
use clap::Parser;
use common::cli::say;
use common::data::labels::{LabelMode, TruncationSide};
use common::data::{prepare, summary, PrepOptions};
use std::path::PathBuf;

/// Render conversations with the model's chat template, tokenize each once, and write
/// memory-mappable token/label shards plus meta.json (see docs/FORMATS.md).
///
/// Inputs are JSON arrays, JSONL or Parquet files (as `datasets` writes them, the fields as
/// columns) in EmoLLM ({"conversation": [{"system"?, "input",
/// "output"}]}), ShareGPT ({"conversations": [{"from", "value"}]}), OpenAI ({"messages":
/// [{"role", "content"}]}) or Alpaca ({"instruction", "input", "output"}) form, detected per
/// record. Labels are the assistant replies plus their end-of-turn token; every other token
/// is masked (-100 in training).
#[derive(Parser)]
#[command(name = "dataprep", version, allow_negative_numbers = true)]
struct Args {
    /// Input files (.json array, .jsonl or .parquet), or quoted glob patterns
    /// ("data/train-*.parquet").
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Model directory whose tokenizer and chat template are used.
    #[arg(long)]
    model: PathBuf,
    /// Output directory for shards and meta.json.
    #[arg(long, short)]
    output: PathBuf,
    /// A Jinja chat template file to use instead of the model's.
    #[arg(long)]
    template: Option<PathBuf>,
    /// Which assistant turns are labels: all (every turn of a conversation), last (only its
    /// final reply), expand (one sample per assistant turn, with the history up to it).
    #[arg(long, value_enum, default_value_t = LabelMode::All)]
    label_mode: LabelMode,
    /// Longest sequence in tokens; longer ones are truncated (or dropped with --drop-long).
    #[arg(long, default_value_t = 2048)]
    max_seq_len: usize,
    /// How a sequence longer than --max-seq-len is cut: turns (drop the oldest exchanges, the
    /// system message stays, so the labelled turns left are whole), left (cut tokens from the
    /// start, keeping the labelled end) or right (cut tokens from the end, HF's default).
    #[arg(long, value_enum, default_value_t = TruncationSide::Turns)]
    truncation_side: TruncationSide,
    /// Drop sequences longer than --max-seq-len instead of truncating them.
    #[arg(long)]
    drop_long: bool,
    /// Fraction of conversations held out as the validation split (0 = none).
    #[arg(long, default_value_t = 0.0)]
    val_split: f64,
    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Sequences per shard file.
    #[arg(long, default_value_t = 50_000)]
    shard_size: usize,
    /// Bad records tolerated (skipped and reported) before failing with nothing written.
    #[arg(long, default_value_t = 0)]
    max_bad: usize,
    /// Fail on the first bad record.
    #[arg(long)]
    strict: bool,
    /// Replace a non-empty output directory.
    #[arg(long)]
    overwrite: bool,
}

fn main() {
    common::cli::finish("dataprep", run(Args::parse()).map(|_| 0));
}

fn run(a: Args) -> Result<()> {
    let t0 = std::time::Instant::now();
    let opts = PrepOptions {
        inputs: a.inputs,
        model_dir: a.model,
        template: a.template,
        output: a.output.clone(),
        label_mode: a.label_mode,
        max_seq_len: a.max_seq_len,
        truncation_side: a.truncation_side,
        drop_long: a.drop_long,
        val_split: a.val_split,
        seed: a.seed,
        shard_size: a.shard_size,
        max_bad: a.max_bad,
        strict: a.strict,
        overwrite: a.overwrite,
    };
    let meta = prepare(&opts, &mut |w| eprintln!("dataprep: {w}"))?;
    let secs = t0.elapsed().as_secs_f64();
    say(summary(&meta, &a.output))?;
    let toks = meta.train.tokens + meta.val.tokens;
    say(format!(
        "  {:.2}s, {:.0} tokens/s",
        secs,
        toks as f64 / secs.max(1e-9)
    ))
}
