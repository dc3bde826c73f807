//! bench-step: decode steps of `infer`'s engine (`Llama::forward_step`) on a real model, for
//! each weight format and batch size, against the memory-bandwidth bound of the format (bytes
//! of weights a step reads / the measured read bandwidth). One line per format and batch size,
//! then `RESULT {json}`.

use anyhow::Result;
use clap::Parser;
use common::model::WeightFormat;

/// Time decode steps of B sequences after a C-token prompt each (medians over --steps steps).
#[derive(Parser)]
#[command(name = "bench-step", version)]
struct Args {
    /// Model directory (HF layout).
    #[arg(long)]
    model: std::path::PathBuf,
    /// Weight formats of the frozen base (as `infer --quantize`; f32 and bf16 as `--dtype`).
    #[arg(long = "format", value_enum, default_values_t = [WeightFormat::F32, WeightFormat::Q8_0])]
    formats: Vec<WeightFormat>,
    /// Sequences decoding together (1: single-stream decode).
    #[arg(long = "batch", default_values_t = [1usize, 8])]
    batch: Vec<usize>,
    /// Prompt tokens of each sequence before the timed steps.
    #[arg(long, default_value_t = 64)]
    context: usize,
    /// Timed decode steps.
    #[arg(long, default_value_t = 32)]
    steps: usize,
}

fn main() {
    let a = Args::parse();
    let code = common::device::run_compute(|| -> Result<()> {
        let bw = common::decode_bench::read_bandwidth();
        println!(
            "memory read bandwidth: {:.1} GB/s (best of 5, all threads)",
            bw / 1e9
        );
        let mut all = Vec::new();
        for &f in &a.formats {
            let dev = candle_core::Device::Cpu;
            let mut model = common::Llama::from_dir(&a.model, candle_core::DType::F32, &dev)?;
            model.pack(f)?;
            for &b in &a.batch {
                let t = common::decode_bench::time_steps(&model, b, a.context, a.steps)?;
                let bound = bw / t.weight_bytes as f64;
                println!(
                    "decode {f} batch {b} context {}: {:.2} ms/step, {:.1} tokens/s; {:.1} MB of weights per step: bound {bound:.1} steps/s, {:.0}% of it",
                    a.context,
                    t.step_s * 1e3,
                    t.tokens_per_s,
                    t.weight_bytes as f64 / 1e6,
                    100.0 / t.step_s / bound
                );
                all.push(serde_json::json!({
                    "format": f.to_string(), "batch": b, "context": a.context,
                    "step_s": t.step_s, "tokens_per_s": t.tokens_per_s,
                    "weight_bytes": t.weight_bytes, "read_bandwidth": bw,
                    "bound_steps_per_s": bound, "of_bound": 1.0 / t.step_s / bound,
                }));
            }
        }
        println!("RESULT {}", serde_json::to_string(&all)?);
        Ok(())
    });
    if let Err(e) = code {
        eprintln!("bench-step: {e:#}");
        std::process::exit(1);
    }
}
