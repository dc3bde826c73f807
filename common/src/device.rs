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

/// `--help` of `--device`: what this build can run on.
pub const DEVICE_HELP: &str = if cfg!(feature = "cuda") {
    "Where to compute: cpu, or cuda:N for the N-th GPU (cuda = cuda:0)."
} else {
    "Where to compute: cpu (this build has no CUDA support; `make cuda` builds binaries that also take cuda:N)."
};

/// `--device`: `cpu`, `cuda` or `cuda:N`.
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
        bail!(
            "--device {s}: this build has no CUDA support; build one with `make cuda` \
             (cargo build --release --features cuda; needs the CUDA toolkit)"
        );
    }
    let dev = Device::new_cuda(n).map_err(|e| {
        // one line: candle's error carries a backtrace
        let first = e.to_string().lines().next().unwrap_or_default().to_string();
        anyhow!("--device {s}: no usable CUDA device {n} ({first})")
    })?;
    keep_freed_device_memory(&dev);
    Ok(dev)
}

/// Makes CUDA's stream-ordered memory pool keep freed blocks for reuse instead of returning
/// them to the driver at every synchronisation (its default): what PyTorch's caching allocator
/// does, fewer driver calls per step, and what makes `peak_mem_mib` the high-water mark.
#[cfg(feature = "cuda")]
fn keep_freed_device_memory(dev: &Device) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Ok(cuda) = dev.as_cuda_device() else {
        return;
    };
    let ctx = cuda.cuda_stream().context().clone();
    if ctx.bind_to_thread().is_err() {
        return;
    }
    // SAFETY: plain driver calls on this device's default pool with valid out-pointers.
    unsafe {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
        {
            let mut keep_all: u64 = u64::MAX;
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut keep_all as *mut u64 as *mut std::ffi::c_void,
            );
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn keep_freed_device_memory(_: &Device) {}

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

/// What `peak_mem_mib` measures on `dev`: `"rss"` (the process's peak resident memory) or
/// `"cuda"` (device memory).
pub fn mem_kind(dev: &Device) -> &'static str {
    if dev.is_cuda() {
        "cuda"
    } else {
        "rss"
    }
}

/// Peak memory of the compute in MiB. On the CPU, the process's peak RSS. On a CUDA device,
/// the most device memory seen in use (total − free) at any call so far: candle allocates
/// from CUDA's stream-ordered pool, which keeps freed blocks, so this is the pool's high-water
/// mark plus the CUDA context (PyTorch's `max_memory_reserved` plus its context), read without
/// waiting for the device.
pub fn peak_mem_mib(dev: &Device) -> f64 {
    if !dev.is_cuda() {
        return peak_rss_mib();
    }
    cuda_used_mib(dev).map_or(0.0, |used| {
        use std::sync::atomic::{AtomicU64, Ordering};
        static PEAK: AtomicU64 = AtomicU64::new(0);
        let prev = PEAK.fetch_max(used.to_bits(), Ordering::Relaxed); // non-negative f64s order as bits
        f64::from_bits(prev).max(used)
    })
}

#[cfg(feature = "cuda")]
fn cuda_used_mib(dev: &Device) -> Option<f64> {
    let cuda = dev.as_cuda_device().ok()?;
    let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    Some((total - free) as f64 / (1024.0 * 1024.0))
}

#[cfg(not(feature = "cuda"))]
fn cuda_used_mib(_: &Device) -> Option<f64> {
    None
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
