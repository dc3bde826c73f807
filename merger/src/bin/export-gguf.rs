//! export-gguf: a model directory (optionally with a LoRA adapter merged) as a llama.cpp GGUF
//! file, for llama.cpp, Ollama and LM Studio.

use anyhow::Result;
use clap::Parser;
use common::gguf::{export, ExportOptions, ExportType};
use std::path::PathBuf;

/// Write a model directory as one GGUF v3 file that llama.cpp loads: llama.cpp's tensor names
/// and Q/K row order, the hyper-parameters it reads, the tokenizer (tokenizer.ggml.*) and the
/// chat template. With --adapter the LoRA update W + scale·B·A is merged on the fly (in f32)
/// before quantization. Tensors are quantized with candle's quantized types, one at a time
/// (peak memory about one tensor); which tensor gets which type follows llama.cpp's
/// llama-quantize (norms stay f32, Q4_K_M keeps some layers' attn_v/ffn_down and the output at
/// Q6_K, rows a type cannot hold fall back as llama.cpp does). The file is written under a
/// temporary name and renamed when complete.
///
/// Exports Llama and Mistral models with a byte-level BPE tokenizer whose pre-tokenizer is
/// smollm or gpt-2, with RoPE unscaled or linearly scaled; anything else is refused with the
/// reason.
#[derive(Parser)]
#[command(name = "export-gguf", version)]
struct Args {
    /// Model directory (Hugging Face layout).
    #[arg(long)]
    model: PathBuf,
    /// LoRA adapter directory to merge before export.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The GGUF file to write.
    #[arg(long, short)]
    output: PathBuf,
    /// Tensor type: f16, bf16, q8_0, q4_k_m or q4_0.
    #[arg(long = "type", value_enum, default_value_t = ExportType::Q8_0)]
    ty: ExportType,
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
}

fn main() {
    let args = Args::parse();
    let outcome = common::device::run_compute(|| run(args));
    common::cli::finish("export-gguf", outcome.map(|_| 0));
}

fn run(a: Args) -> Result<()> {
    let t = std::time::Instant::now();
    let mut p: Option<common::progress::Progress> = None;
    let r = export(
        &ExportOptions {
            model: a.model.clone(),
            adapter: a.adapter.clone(),
            output: a.output.clone(),
            ty: a.ty,
            overwrite: a.overwrite,
        },
        |done, total| {
            let bar = p.get_or_insert_with(|| {
                common::progress::Progress::new(total as u64, "export-gguf")
            });
            bar.inc(1);
            if done == total {
                if let Some(b) = p.take() {
                    b.finish();
                }
            }
        },
    )?;
    let types: Vec<String> = r.types.iter().map(|(k, n)| format!("{n} {k}")).collect();
    common::cli::say(format!(
        "export-gguf: {} -> {}: {} tensors ({}), {:.1} MB{} in {:.1}s; peak RSS {:.0} MiB",
        a.model.display(),
        a.output.display(),
        r.tensors,
        types.join(", "),
        r.bytes as f64 / 1e6,
        if r.merged_modules > 0 {
            format!(", {} adapter modules merged", r.merged_modules)
        } else {
            String::new()
        },
        t.elapsed().as_secs_f64(),
        common::device::peak_rss_mib()
    ))
}
