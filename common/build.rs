//! Records the versions of the main dependencies, as resolved in the workspace's Cargo.lock, so
//! run records name what actually ran (`common::versions`); with the `cuda` feature, compiles
//! dialora's CUDA kernels (kernels/ops.cu) to PTX with nvcc.

fn main() {
    versions();
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda_kernels();
    }
}

/// kernels/ops.cu -> $OUT_DIR/ops.ptx, for the GPU generation in CUDA_COMPUTE_CAP (default 80:
/// PTX that the driver compiles for the GPU it runs on, Ampere or newer). nvcc is taken from
/// NVCC, else CUDA_HOME/bin, else PATH.
fn cuda_kernels() {
    let src = "kernels/ops.cu";
    println!("cargo:rerun-if-changed={src}");
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP", "NVCC_APPEND_FLAGS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match std::env::var("CUDA_HOME") {
        Ok(home) if std::path::Path::new(&home).join("bin/nvcc").exists() => {
            format!("{home}/bin/nvcc")
        }
        _ => "nvcc".into(),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap = cap.trim().replace('.', "");
    let out = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("ops.ptx");
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg(src)
        .status()
        .unwrap_or_else(|e| {
            panic!("the cuda feature needs nvcc (the CUDA toolkit): running {nvcc}: {e}")
        });
    if !status.success() {
        panic!("nvcc failed on {src} ({status})");
    }
}

fn versions() {
    let lock =
        std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let text = std::fs::read_to_string(&lock).unwrap_or_default();
    let parsed: toml::Value =
        toml::from_str(&text).unwrap_or(toml::Value::Table(Default::default()));
    let packages = parsed
        .get("package")
        .and_then(|p| p.as_array())
        .cloned()
        .unwrap_or_default();
    for (krate, var) in [
        ("candle-core", "DIALORA_CANDLE_VERSION"),
        ("tokenizers", "DIALORA_TOKENIZERS_VERSION"),
        ("safetensors", "DIALORA_SAFETENSORS_VERSION"),
    ] {
        let v = packages
            .iter()
            .find(|p| p.get("name").and_then(|n| n.as_str()) == Some(krate))
            .and_then(|p| p.get("version")?.as_str())
            .unwrap_or("unknown");
        println!("cargo:rustc-env={var}={v}");
    }
}
