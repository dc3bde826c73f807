//! bench-q8: the q8_0 product of `infer --quantize q8_0` alone, against candle's `QMatMul` on
//! the same weight and rows, for SmolLM2-135M's shapes (or `--shape N,K`). One line per shape
//! and row count, then `RESULT {json}`.

use anyhow::Result;
use clap::Parser;

/// Time `x·Wᵀ` for a random Q8_0 weight [N, K] and M random rows (ours: the rows quantized,
/// then the products; candle's QMatMul alternating with it), medians of --reps runs.
#[derive(Parser)]
#[command(name = "bench-q8", version)]
struct Args {
    /// Weight shapes N,K (default: SmolLM2-135M's q/o, gate/up, down and head).
    #[arg(long = "shape", value_parser = parse_shape)]
    shapes: Vec<(usize, usize)>,
    /// Input rows (1: single-stream decode, 8: a decode step of 8 sequences, 64: prefill).
    #[arg(long = "rows", default_values_t = [1usize, 8, 64])]
    rows: Vec<usize>,
    /// Timed runs per shape and row count.
    #[arg(long, default_value_t = 50)]
    reps: usize,
}

fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (n, k) = s.split_once(',').ok_or("N,K")?;
    let p = |v: &str| v.trim().parse::<usize>().map_err(|e| format!("{v}: {e}"));
    let (n, k) = (p(n)?, p(k)?);
    if k % 32 != 0 || n == 0 {
        return Err(format!("{s}: K must be a multiple of 32 and N positive"));
    }
    Ok((n, k))
}

fn main() {
    let a = Args::parse();
    let code = common::device::run_compute(|| -> Result<()> {
        let shapes = if a.shapes.is_empty() {
            vec![(576, 576), (1536, 576), (576, 1536), (49152, 576)]
        } else {
            a.shapes.clone()
        };
        let mut all = Vec::new();
        for &(n, k) in &shapes {
            for &m in &a.rows {
                let t = common::model::time_product(n, k, m, a.reps)?;
                println!(
                    "q8_0 [{m}, {k}] x [{n}, {k}]^T: ours {:.1} us ({:.1} of it quantizing), candle QMatMul {:.1} us, {:.2}x; weights read at {:.1} GB/s",
                    t.ours_s * 1e6,
                    t.quantize_s * 1e6,
                    t.candle_s * 1e6,
                    t.candle_s / t.ours_s,
                    t.weight_bytes as f64 / t.ours_s / 1e9
                );
                all.push(t);
            }
        }
        println!("RESULT {}", serde_json::to_string(&all)?);
        Ok(())
    });
    if let Err(e) = code {
        eprintln!("bench-q8: {e:#}");
        std::process::exit(1);
    }
}
