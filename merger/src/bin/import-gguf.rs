//! import-gguf: turn a llama.cpp GGUF file into a Hugging Face model directory.

use anyhow::Result;
use clap::Parser;
use common::device::DtypeArg;
use common::gguf::import;
use std::path::PathBuf;

/// Import a GGUF model (llama architecture, byte-level BPE vocabulary) as a Hugging Face
/// directory: dequantized model.safetensors (llama.cpp's Q/K row permutation undone),
/// config.json, tokenizer.json built from the GGUF vocabulary and merges,
/// tokenizer_config.json with bos/eos/pad and the chat template, chat_template.jinja and
/// generation_config.json.
#[derive(Parser)]
#[command(name = "import-gguf", version)]
struct Args {
    /// The GGUF file to import.
    #[arg(long)]
    gguf: PathBuf,
    /// Output model directory (must not exist or be empty, unless --overwrite).
    #[arg(long)]
    output: PathBuf,
    /// Dtype of the dequantized weights.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    /// Replace a non-empty output directory.
    #[arg(long)]
    overwrite: bool,
}

fn main() {
    common::cli::finish("import-gguf", run(Args::parse()).map(|_| 0));
}

fn run(a: Args) -> Result<()> {
    let t = std::time::Instant::now();
    let r = import(&a.gguf, &a.output, a.dtype.dtype(), a.overwrite)?;
    common::cli::say(format!(
        "imported {} -> {}: {} tensors, {:.1}M parameters, {} layers, vocab {} ({:.1}s)",
        a.gguf.display(),
        a.output.display(),
        r.tensors,
        r.parameters as f64 / 1e6,
        r.layers,
        r.vocab,
        t.elapsed().as_secs_f64()
    ))
}
