//! `--device cpu|cuda:N`.

use anyhow::{anyhow, bail, Result};
use candle_core::Device;

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
