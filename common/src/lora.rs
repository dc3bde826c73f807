//! LoRA configuration in PEFT's `adapter_config.json` form, and adapter files in PEFT layout
//! (`adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`, A `[r, in]`,
//! B `[out, r]`).

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The projections a LoRA adapter may target in a Llama-family block.
pub const TARGETABLE: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

/// `target_modules`: a list, or a string (`"all-linear"`, or a single module name).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    One(String),
}

/// PEFT's `init_lora_weights`: `true` (Kaiming-uniform A, zero B), `false` or `"gaussian"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum InitLoraWeights {
    Bool(bool),
    Name(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(default = "peft_type")]
    pub peft_type: String,
    #[serde(default = "task_type")]
    pub task_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default = "init_default")]
    pub init_lora_weights: InitLoraWeights,
    #[serde(default)]
    pub rank_pattern: HashMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: HashMap<String, f64>,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
}

fn peft_type() -> String {
    "LORA".into()
}
fn task_type() -> String {
    "CAUSAL_LM".into()
}
fn bias_none() -> String {
    "none".into()
}
fn init_default() -> InitLoraWeights {
    InitLoraWeights::Bool(true)
}

impl LoraConfig {
    pub fn new(r: usize, alpha: f64, dropout: f64, targets: Vec<String>) -> Self {
        LoraConfig {
            peft_type: peft_type(),
            task_type: task_type(),
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: TargetModules::List(targets),
            use_rslora: false,
            bias: bias_none(),
            init_lora_weights: init_default(),
            rank_pattern: HashMap::new(),
            alpha_pattern: HashMap::new(),
            use_dora: false,
            fan_in_fan_out: false,
            base_model_name_or_path: None,
            inference_mode: true,
            modules_to_save: None,
            layers_to_transform: None,
        }
    }

    /// Checks the configuration is one dialora can train, load and merge.
    pub fn validate(&self) -> Result<()> {
        if self.peft_type != "LORA" {
            bail!(
                "peft_type '{}' is not supported (only LORA)",
                self.peft_type
            );
        }
        if self.use_dora {
            bail!("DoRA adapters (use_dora: true) are not supported: the magnitude vector cannot be folded as B·A");
        }
        if self.r == 0 {
            bail!("r (--lora-r) must be at least 1");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!("lora_dropout must be in [0, 1), got {}", self.lora_dropout);
        }
        if self.bias != "none" {
            bail!("bias '{}' is not supported (only 'none')", self.bias);
        }
        if self.fan_in_fan_out {
            bail!("fan_in_fan_out adapters (GPT-2 Conv1D) do not apply to Llama-family models");
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            bail!("modules_to_save is not supported");
        }
        if self
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            bail!("layers_to_transform is not supported");
        }
        if let InitLoraWeights::Name(n) = &self.init_lora_weights {
            if n != "gaussian" {
                bail!("init_lora_weights '{n}' is not supported (true, false, gaussian)");
            }
        }
        self.targets()?;
        Ok(())
    }

    /// The targeted module kinds (`q_proj`, ...), `all-linear` expanded.
    pub fn targets(&self) -> Result<Vec<String>> {
        let list = match &self.target_modules {
            TargetModules::One(s) if s == "all-linear" => {
                return Ok(TARGETABLE.iter().map(|s| s.to_string()).collect())
            }
            TargetModules::One(s) => s
                .split(',')
                .map(|x| x.trim().to_string())
                .collect::<Vec<_>>(),
            TargetModules::List(v) => v.clone(),
        };
        if list.is_empty() {
            bail!("target_modules is empty");
        }
        for t in &list {
            if !TARGETABLE.contains(&t.as_str()) {
                bail!(
                    "unknown target module '{t}' (choose from {}, or all-linear)",
                    TARGETABLE.join(", ")
                );
            }
        }
        Ok(list)
    }

    fn pattern_match<'a, V>(map: &'a HashMap<String, V>, module: &str) -> Option<&'a V> {
        // PEFT matches pattern keys against the end of the module name at a '.' boundary.
        map.iter()
            .filter(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
            .max_by_key(|(k, _)| k.len())
            .map(|(_, v)| v)
    }

    /// Rank of a module (`rank_pattern` over `r`); `module` is the full name, e.g.
    /// `model.layers.3.self_attn.q_proj`.
    pub fn rank_for(&self, module: &str) -> usize {
        *Self::pattern_match(&self.rank_pattern, module).unwrap_or(&self.r)
    }

    /// Scale `alpha/r` (or `alpha/sqrt(r)` with rsLoRA) of a module, with the patterns applied.
    pub fn scale_for(&self, module: &str) -> f64 {
        let r = self.rank_for(module) as f64;
        let alpha = *Self::pattern_match(&self.alpha_pattern, module).unwrap_or(&self.lora_alpha);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read adapter config", path.display()))?;
        let cfg: LoraConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid adapter config", path.display()))?;
        cfg.validate()
            .with_context(|| format!("{}: unsupported adapter", path.display()))?;
        Ok(cfg)
    }
}

/// The initial (A, B) of a module of rank `r`, `in`/`out` features, PEFT-style, drawn from one
/// stream seeded by the run seed (modules in model order), created on `device`:
/// `true` A Kaiming-uniform (bound `1/sqrt(in)`), B zero; `gaussian` A ~ N(0, 1/r), B zero;
/// `false` both Kaiming-uniform (the adapter is not a no-op at start).
pub fn initializer(
    init: &InitLoraWeights,
    seed: u64,
    device: &Device,
) -> impl FnMut(&str, usize, usize, usize) -> Result<(Tensor, Tensor)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let device = device.clone();
    let gaussian = matches!(init, InitLoraWeights::Name(n) if n == "gaussian");
    let b_random = matches!(init, InitLoraWeights::Bool(false));
    move |_, r, i, o| {
        fn uniform(
            rng: &mut rand::rngs::StdRng,
            rows: usize,
            cols: usize,
            bound: f64,
        ) -> Result<Tensor> {
            let v: Vec<f32> = (0..rows * cols)
                .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
                .collect();
            Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
        }
        // kaiming_uniform_(a=sqrt(5)) on [out, in] gives bound 1/sqrt(fan_in)
        let a = if gaussian {
            let std = 1.0 / r as f64;
            let v: Vec<f32> = (0..r * i)
                .map(|_| {
                    let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                    (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
                })
                .collect();
            Tensor::from_vec(v, (r, i), &Device::Cpu)?
        } else {
            uniform(&mut rng, r, i, 1.0 / (i as f64).sqrt())?
        };
        let b = if b_random {
            uniform(&mut rng, o, r, 1.0 / (r as f64).sqrt())?
        } else {
            Tensor::zeros((o, r), DType::F32, &Device::Cpu)?
        };
        Ok((a.to_device(&device)?, b.to_device(&device)?))
    }
}

/// PEFT key of a LoRA matrix: `base_model.model.<module>.lora_A.weight`.
pub fn peft_key(module: &str, which: char) -> String {
    format!("{KEY_PREFIX}{module}.lora_{which}.weight")
}

/// A loaded adapter: config plus (A, B) per full module name.
pub struct Adapter {
    /// The adapter directory (named in errors).
    pub dir: std::path::PathBuf,
    pub config: LoraConfig,
    pub weights: BTreeMap<String, (Tensor, Tensor)>,
}

impl Adapter {
    /// Loads an adapter directory (PEFT keys with or without `.default`), in `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = LoraConfig::load(dir)?;
        let path = dir.join(ADAPTER_WEIGHTS);
        if !path.exists() {
            bail!("{}: adapter weights not found", path.display());
        }
        let store = crate::weights::SafetensorsStore::open_files(std::slice::from_ref(&path))?;
        let mut a_map = BTreeMap::new();
        let mut b_map = BTreeMap::new();
        for key in store.names() {
            let k = key.replace(".default.weight", ".weight");
            let rest = k.strip_prefix(KEY_PREFIX).ok_or_else(|| {
                anyhow!(
                    "{}: key '{key}' does not start with '{KEY_PREFIX}' (PEFT would ignore it)",
                    path.display()
                )
            })?;
            let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                (m, 'A')
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                (m, 'B')
            } else {
                bail!(
                    "{}: unexpected key '{key}' (only lora_A/lora_B weights are supported)",
                    path.display()
                );
            };
            let t = store.load(key, dtype, device)?;
            if t.rank() != 2 {
                bail!(
                    "{}: '{key}' must be a matrix, has shape {:?}",
                    path.display(),
                    t.dims()
                );
            }
            if which == 'A' {
                a_map.insert(module.to_string(), t)
            } else {
                b_map.insert(module.to_string(), t)
            };
        }
        let mut weights = BTreeMap::new();
        for (m, a) in a_map {
            let b = b_map.remove(&m).ok_or_else(|| {
                anyhow!("{}: module '{m}' has lora_A but no lora_B", path.display())
            })?;
            let (r_a, r_b) = (a.dim(0)?, b.dim(1)?);
            if r_a != r_b {
                bail!(
                    "{}: module '{m}': lora_A has rank {r_a} but lora_B has rank {r_b}",
                    path.display()
                );
            }
            weights.insert(m, (a, b));
        }
        if let Some(m) = b_map.keys().next() {
            bail!("{}: module '{m}' has lora_B but no lora_A", path.display());
        }
        if weights.is_empty() {
            bail!("{}: no LoRA weights in the adapter", path.display());
        }
        let adapter = Adapter {
            dir: dir.to_path_buf(),
            config,
            weights,
        };
        adapter.check_config()?;
        Ok(adapter)
    }

    /// Checks the tensors against `adapter_config.json`: every module is one of its
    /// `target_modules`, with the rank `r` (or its `rank_pattern` entry) says. A wrong rank
    /// would silently scale the update by the wrong `alpha/r`.
    fn check_config(&self) -> Result<()> {
        let (file, cfg_file) = (
            self.dir.join(ADAPTER_WEIGHTS),
            self.dir.join(ADAPTER_CONFIG),
        );
        let targets = self.config.targets()?;
        for (m, (a, _)) in &self.weights {
            let kind = m.rsplit('.').next().unwrap_or_default();
            if !targets.iter().any(|t| t == kind) {
                bail!(
                    "{}: module '{m}' is not among the target_modules of {} ({})",
                    file.display(),
                    cfg_file.display(),
                    targets.join(", ")
                );
            }
            let (have, want) = (a.dim(0)?, self.config.rank_for(m));
            if have != want {
                bail!(
                    "{}: module '{m}' has rank {have} (lora_A {:?}) but {} says r = {want}",
                    file.display(),
                    a.dims(),
                    cfg_file.display()
                );
            }
        }
        Ok(())
    }

    /// Checks the adapter fits a base model: every module exists there (`weight_shape` gives
    /// its `[out, in]`) and `B A` has that shape. `layers` is the base's layer count.
    pub fn check_base(
        &self,
        base: &Path,
        layers: usize,
        weight_shape: impl Fn(&str) -> Option<Vec<usize>>,
    ) -> Result<()> {
        let file = self.dir.join(ADAPTER_WEIGHTS);
        for (m, (a, b)) in &self.weights {
            let Some(shape) = weight_shape(m) else {
                let layer = m.split('.').nth(2).and_then(|s| s.parse::<usize>().ok());
                if let Some(l) = layer.filter(|&l| l >= layers) {
                    bail!(
                        "{}: module '{m}' is in layer {l} but the base in {} has {layers} layers: adapter for a different base?",
                        file.display(),
                        base.display()
                    );
                }
                bail!(
                    "{}: module '{m}' does not exist in the base in {}: adapter for a different base?",
                    file.display(),
                    base.display()
                );
            };
            let (r, inp) = a.dims2()?;
            let (out, r2) = b.dims2()?;
            if shape != [out, inp] || r != r2 {
                bail!(
                    "{}: module '{m}': lora_A {:?} and lora_B {:?} do not fit the base weight {shape:?} in {}: adapter for a different base?",
                    file.display(),
                    a.dims(),
                    b.dims(),
                    base.display()
                );
            }
        }
        Ok(())
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (each atomically).
    pub fn save(
        config: &LoraConfig,
        weights: &BTreeMap<String, (Tensor, Tensor)>,
        dir: &Path,
    ) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let mut tensors = BTreeMap::new();
        for (m, (a, b)) in weights {
            tensors.insert(peft_key(m, 'A'), a.to_dtype(DType::F32)?);
            tensors.insert(peft_key(m, 'B'), b.to_dtype(DType::F32)?);
        }
        crate::weights::save(&tensors, &dir.join(ADAPTER_WEIGHTS))?;
        crate::atomic::write_json(&dir.join(ADAPTER_CONFIG), config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_and_patterns() {
        let mut c = LoraConfig::new(16, 32.0, 0.05, vec!["q_proj".into()]);
        assert_eq!(c.scale_for("model.layers.0.self_attn.q_proj"), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scale_for("model.layers.0.self_attn.q_proj"), 8.0);
        c.use_rslora = false;
        c.rank_pattern.insert("layers.1.self_attn.q_proj".into(), 4);
        c.alpha_pattern.insert("q_proj".into(), 8.0);
        assert_eq!(c.rank_for("model.layers.1.self_attn.q_proj"), 4);
        assert_eq!(c.scale_for("model.layers.1.self_attn.q_proj"), 2.0);
        assert_eq!(c.scale_for("model.layers.11.self_attn.q_proj"), 0.5);
    }

    #[test]
    fn validation_errors() {
        let c = LoraConfig::new(0, 32.0, 0.0, vec!["q_proj".into()]);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("r (--lora-r)"));
        let c = LoraConfig::new(8, 32.0, 0.0, vec!["qkv".into()]);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("unknown target module 'qkv'"));
        let mut c = LoraConfig::new(8, 32.0, 0.0, vec!["q_proj".into()]);
        c.use_dora = true;
        assert!(c.validate().unwrap_err().to_string().contains("DoRA"));
        let c: LoraConfig =
            serde_json::from_str(r#"{"r":8,"lora_alpha":16,"target_modules":"all-linear"}"#)
                .unwrap();
        assert_eq!(c.targets().unwrap().len(), 7);
    }

    #[test]
    fn rank_and_targets_are_checked_against_the_config() {
        let d = tempfile::tempdir().unwrap();
        let q = "model.layers.0.self_attn.q_proj".to_string();
        let w = BTreeMap::from([(
            q.clone(),
            (
                Tensor::ones((8, 3), DType::F32, &Device::Cpu).unwrap(),
                Tensor::zeros((5, 8), DType::F32, &Device::Cpu).unwrap(),
            ),
        )]);
        // config says r = 16, the tensors have rank 8: the scale would be 1.0 instead of 2.0
        Adapter::save(
            &LoraConfig::new(16, 16.0, 0.0, vec!["q_proj".into()]),
            &w,
            d.path(),
        )
        .unwrap();
        let e = Adapter::load(d.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("adapter_model.safetensors")
                && e.contains(&q)
                && e.contains("rank 8")
                && e.contains("r = 16"),
            "{e}"
        );
        // a rank_pattern entry that matches the tensors is fine
        let mut c = LoraConfig::new(16, 16.0, 0.0, vec!["q_proj".into()]);
        c.rank_pattern.insert("q_proj".into(), 8);
        Adapter::save(&c, &w, d.path()).unwrap();
        let ad = Adapter::load(d.path(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(ad.config.scale_for(&q), 2.0);
        // a module the config does not target
        Adapter::save(
            &LoraConfig::new(8, 16.0, 0.0, vec!["v_proj".into()]),
            &w,
            d.path(),
        )
        .unwrap();
        let e = Adapter::load(d.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("not among the target_modules") && e.contains("v_proj"),
            "{e}"
        );
        // and against a base: the weight's shape, both values named
        Adapter::save(
            &LoraConfig::new(8, 16.0, 0.0, vec!["q_proj".into()]),
            &w,
            d.path(),
        )
        .unwrap();
        let ad = Adapter::load(d.path(), DType::F32, &Device::Cpu).unwrap();
        ad.check_base(Path::new("base"), 1, |_| Some(vec![5, 3]))
            .unwrap();
        let e = ad
            .check_base(Path::new("base"), 1, |_| Some(vec![5, 4]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[8, 3]") && e.contains("[5, 4]") && e.contains("base"),
            "{e}"
        );
    }

    #[test]
    fn adapter_roundtrip_and_default_keys() {
        let d = tempfile::tempdir().unwrap();
        let cfg = LoraConfig::new(2, 4.0, 0.0, vec!["q_proj".into()]);
        let mut w = BTreeMap::new();
        let a = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((5, 2), DType::F32, &Device::Cpu).unwrap();
        w.insert(
            "model.layers.0.self_attn.q_proj".to_string(),
            (a.clone(), b.clone()),
        );
        Adapter::save(&cfg, &w, d.path()).unwrap();
        let ad = Adapter::load(d.path(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            ad.weights["model.layers.0.self_attn.q_proj"].0.dims(),
            &[2, 3]
        );
        // PEFT's own `.default` keys load too
        let mut t = BTreeMap::new();
        t.insert(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight".to_string(),
            a,
        );
        t.insert(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight".to_string(),
            b,
        );
        crate::weights::save(&t, &d.path().join(ADAPTER_WEIGHTS)).unwrap();
        let ad = Adapter::load(d.path(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(ad.weights.len(), 1);
        // a key without the PEFT prefix is refused (PEFT would silently ignore it)
        let mut t = BTreeMap::new();
        t.insert(
            "model.layers.0.self_attn.q_proj.lora_A.weight".to_string(),
            Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        crate::weights::save(&t, &d.path().join(ADAPTER_WEIGHTS)).unwrap();
        let e = Adapter::load(d.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("base_model.model."), "{e}");
    }
}
