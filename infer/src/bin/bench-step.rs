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
    /// A PEFT adapter directory (repeatable): each format and batch size is then timed with
    /// every sequence on the first adapter, and with the sequences spread over all of them
    /// in turn (as `infer --serve` batches requests for different adapters).
    #[arg(long = "adapter")]
    adapters: Vec<std::path::PathBuf>,
}

fn main() {
    let a = Args::parse();
    let code = common::device::run_compute(|| -> Result<()> {
        let bw = common::decode_bench::read_bandwidth();
        println!(
            "memory read bandwidth: {:.1} GB/s (best of 5, all threads)",
            bw / 1e9
        );
        let dev = candle_core::Device::Cpu;
        let adapters = a
            .adapters
            .iter()
            .map(|dir| common::lora::Adapter::load(dir, candle_core::DType::F32, &dev))
            .collect::<Result<Vec<_>>>()?;
        let mut all = Vec::new();
        for &f in &a.formats {
            let mut model = common::Llama::from_dir(&a.model, candle_core::DType::F32, &dev)?;
            model.pack(f)?;
            let branches = adapters
                .iter()
                .map(|ad| model.adapter_branches(ad, &a.model))
                .collect::<Result<Vec<_>>>()?;
            let all_of: Vec<&common::model::AdapterBranches> = branches.iter().collect();
            // (what the sequences ask for, its name)
            let mut ways: Vec<(&[&common::model::AdapterBranches], String)> = Vec::new();
            if all_of.is_empty() {
                ways.push((&[], String::new()));
            } else {
                ways.push((&all_of[..1], ", all on one adapter".into()));
                if all_of.len() > 1 {
                    ways.push((&all_of, format!(", spread over {} adapters", all_of.len())));
                }
            }
            for &b in &a.batch {
                for (ads, way) in &ways {
                    let t = common::decode_bench::time_steps(&model, b, a.context, a.steps, ads)?;
                    let bound = bw / t.weight_bytes as f64;
                    println!(
                    "decode {f} batch {b} context {}{way}: {:.2} ms/step, {:.1} tokens/s; {:.1} MB of weights per step: bound {bound:.1} steps/s, {:.0}% of it",
                    a.context,
                    t.step_s * 1e3,
                    t.tokens_per_s,
                    t.weight_bytes as f64 / 1e6,
                    100.0 / t.step_s / bound
                );
                    all.push(serde_json::json!({
                        "format": f.to_string(), "batch": b, "context": a.context,
                        "adapters": ads.len(),
                        "step_s": t.step_s, "tokens_per_s": t.tokens_per_s,
                        "weight_bytes": t.weight_bytes, "read_bandwidth": bw,
                        "bound_steps_per_s": bound, "of_bound": 1.0 / t.step_s / bound,
                    }));
                }
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
