//! Where and in what precision the compute runs: `--device cpu|cuda:N`, `--dtype`, the CPU
//! thread set-up, and peak memory.

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device};

/// `--dtype`: the compute dtype of the frozen model (LoRA weights, gradients and optimizer state
/// stay f32).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

impl DtypeArg {
    pub fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
        }
    }
}

pub fn parse(s: &str) -> Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let n = match s {
        "cuda" => 0,
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| anyhow!("--device must be cpu or cuda:N, got '{s}'"))?,
    };
    if !candle_core::utils::cuda_is_available() {
        bail!("--device {s}: this build has no CUDA support (rebuild with --features cuda)");
    }
    Device::new_cuda(n).map_err(|e| anyhow!("--device {s}: {e}"))
}

/// Peak resident memory of this process in MiB (Linux VmHWM), or 0 when unknown.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Compute threads when `RAYON_NUM_THREADS` is not set: candle's choice (the physical cores),
/// but no more than the CPUs this process may run on (its affinity mask and cgroup quota: what
/// a Slurm `--cpus-per-task` job, `taskset` or a container gives it).
pub fn default_threads() -> usize {
    let allowed = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    candle_core::utils::get_num_threads().clamp(1, allowed)
}

/// The compute threads in use (after `run_compute` set them up).
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Runs the compute of a binary (`f`) with the CPU thread set-up that suits it:
///
/// - `f` runs inside candle's CPU thread pool (`Device::with_context`), so the thread that
///   drives the model takes part in every parallel GEMM and kernel instead of sleeping while
///   the pool works and competing with it when it wakes up;
/// - candle's element-wise thread pool spins at most ~1,000 iterations before it parks
///   (`CANDLE_BARRIER_POOL_SPIN_LIMIT`, default 25,000 in candle): a worker spinning for longer
///   steals a core from the GEMM that follows every element-wise op;
/// - the thread count is fixed once in `RAYON_NUM_THREADS` (`default_threads`: the physical
///   cores, within the process's CPU affinity): unset, candle re-reads /proc/cpuinfo on every
///   matmul to find it.
///
/// Values the user set win. Measured on 2 cores (bench-lora, SmolLM2-135M, seq 256): 145 -> 170
/// tok/s for the spin limit, 170 -> 185 for the pool. Call it first thing in `main`, before any
/// thread exists (it sets environment variables).
pub fn run_compute<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // single-threaded at this point: nothing reads the environment concurrently
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", default_threads().to_string());
    }
    Device::Cpu.with_context(f)
}
