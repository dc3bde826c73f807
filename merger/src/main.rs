//! merger: fold a LoRA adapter into its base model, producing a standalone model directory.

use anyhow::Result;
use clap::Parser;
use common::device::DtypeArg;
use common::merge::{merge, parse_size, MergeOptions};
use std::path::PathBuf;

/// Merge a PEFT-layout LoRA adapter into a Hugging Face base model: W' = W + scale * B A per
/// targeted module (scale alpha/r, alpha/sqrt(r) with use_rslora, rank_pattern/alpha_pattern
/// honoured), computed in f32 and stored in the base dtype or --dtype.
///
/// Streams tensor by tensor from the memory-mapped base (peak memory about one tensor),
/// writes sharded output with model.safetensors.index.json past --max-shard-size, copies the
/// config/tokenizer/template files (regular files only), and records the merge in
/// dialora_merge.json. Output is built in a temporary directory and renamed at the end.
#[derive(Parser)]
#[command(name = "merger", version)]
struct Args {
    /// Base model directory.
    #[arg(long)]
    base: PathBuf,
    /// Adapter directory (adapter_config.json + adapter_model.safetensors; PEFT's own
    /// `.default` keys are accepted).
    #[arg(long)]
    adapter: PathBuf,
    /// Output model directory (must not be the base, inside it, or contain it).
    #[arg(long)]
    output: PathBuf,
    /// Store merged weights in this dtype (default: each tensor's base dtype).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Largest output shard, e.g. 5GB, 500MB.
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
    /// Replace a non-empty output directory.
    #[arg(long)]
    overwrite: bool,
}

fn main() {
    let args = Args::parse();
    let outcome = common::device::run_compute(|| run(args));
    common::cli::finish("merger", outcome.map(|_| 0));
}

fn run(a: Args) -> Result<()> {
    let opts = MergeOptions {
        base: a.base,
        adapter: a.adapter,
        output: a.output.clone(),
        dtype: a.dtype.map(DtypeArg::dtype),
        max_shard_size: parse_size(&a.max_shard_size)?,
        overwrite: a.overwrite,
    };
    let mut p: Option<common::progress::Progress> = None;
    let r = merge(&opts, |done, total| {
        let bar = p.get_or_insert_with(|| common::progress::Progress::new(total as u64, "merger"));
        bar.inc(1);
        if done == total {
            if let Some(b) = p.take() {
                b.finish();
            }
        }
    })?;
    common::cli::say(format!(
        "merger: merged {} modules into {} ({} tensors, {} shard(s), {:.1} MB) in {:.1}s; peak RSS {:.0} MiB",
        r.merged_modules,
        a.output.display(),
        r.tensors,
        r.shards,
        r.bytes as f64 / 1e6,
        r.seconds,
        common::device::peak_rss_mib()
    ))
}
