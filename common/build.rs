//! Records the versions of the main dependencies, as resolved in the workspace's Cargo.lock, so
//! run records name what actually ran (`common::versions`).

fn main() {
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
