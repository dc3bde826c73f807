//! `config.json` of a Hugging Face model directory (Llama family), parsed and validated.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Architectures whose decoder block is the Llama block (optionally with q/k/v bias).
pub const SUPPORTED_ARCHITECTURES: &[&str] =
    &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// RoPE frequency scaling (`rope_scaling` / `rope_parameters` in config.json).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

/// Token id or list of ids (`eos_token_id` may be either in HF configs).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers >= 5 stores rope_theta (and scaling) here.
    #[serde(default)]
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<TokenIds>,
    #[serde(default, alias = "dtype")]
    pub torch_dtype: Option<String>,
}

/// transformers' `torch_dtype` name of a dtype.
pub fn torch_dtype_name(d: candle_core::DType) -> &'static str {
    match d {
        candle_core::DType::BF16 => "bfloat16",
        candle_core::DType::F16 => "float16",
        candle_core::DType::F64 => "float64",
        _ => "float32",
    }
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

impl ModelConfig {
    /// Reads and validates `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read model config", path.display()))?;
        let cfg: ModelConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid model config", path.display()))?;
        cfg.validate()
            .with_context(|| format!("{}: unsupported model config", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let arch = self.architecture();
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            bail!(
                "architecture '{arch}' is not supported (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            );
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                bail!("hidden_act '{act}' is not supported (only silu)");
            }
        }
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                bail!("{name} must be > 0");
            }
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            bail!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({kv})",
                self.num_attention_heads
            );
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!("hidden_size must be divisible by num_attention_heads");
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("head_dim must be even for RoPE");
        }
        if let Some(s) = self.scaling() {
            match s.rope_type.as_str() {
                "default" | "linear" | "llama3" => {}
                other => {
                    bail!("rope scaling type '{other}' is not supported (default, linear, llama3)")
                }
            }
        }
        Ok(())
    }

    /// The architecture name (first of `architectures`, or derived from `model_type`).
    pub fn architecture(&self) -> String {
        if let Some(a) = self.architectures.first() {
            return a.clone();
        }
        match self.model_type.as_deref() {
            Some("llama") => "LlamaForCausalLM".into(),
            Some("mistral") => "MistralForCausalLM".into(),
            Some("qwen2") => "Qwen2ForCausalLM".into(),
            Some(other) => other.to_string(),
            None => "<missing architectures and model_type>".into(),
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Whether q/k/v projections carry a bias (Qwen2 always; Llama when `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        self.architecture() == "Qwen2ForCausalLM" || self.attention_bias.unwrap_or(false)
    }

    /// Whether o_proj carries a bias (Llama's `attention_bias` covers it; Qwen2 does not).
    pub fn o_bias(&self) -> bool {
        self.architecture() != "Qwen2ForCausalLM" && self.attention_bias.unwrap_or(false)
    }

    fn scaling(&self) -> Option<&RopeScaling> {
        self.rope_scaling
            .as_ref()
            .or(self.rope_parameters.as_ref())
            .filter(|s| s.rope_type != "default")
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or(self.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10000.0)
    }

    /// RoPE inverse frequencies (length head_dim/2), with scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim();
        let theta = self.rope_theta();
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        if let Some(s) = self.scaling() {
            let factor = s.factor.unwrap_or(1.0);
            match s.rope_type.as_str() {
                "linear" => inv.iter_mut().for_each(|f| *f /= factor),
                "llama3" => {
                    let lo = s.low_freq_factor.unwrap_or(1.0);
                    let hi = s.high_freq_factor.unwrap_or(4.0);
                    let old = s.original_max_position_embeddings.unwrap_or(8192) as f64;
                    let (lo_wl, hi_wl) = (old / lo, old / hi);
                    for f in inv.iter_mut() {
                        let wl = 2.0 * std::f64::consts::PI / *f;
                        if wl > lo_wl {
                            *f /= factor;
                        } else if wl >= hi_wl {
                            let smooth = (old / wl - lo) / (hi - lo);
                            *f = (1.0 - smooth) * *f / factor + smooth * *f;
                        }
                    }
                }
                _ => {}
            }
        }
        inv.into_iter().map(|f| f as f32).collect()
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(|e| e.to_vec())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 100, "rms_norm_eps": 1e-5, "rope_theta": 10000.0
        })
    }

    #[test]
    fn parses_and_derives() {
        let c: ModelConfig = serde_json::from_value(base()).unwrap();
        c.validate().unwrap();
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.num_kv_heads(), 2);
        assert!(!c.qkv_bias());
        assert_eq!(c.rope_inv_freq().len(), 8);
        assert_eq!(c.rope_inv_freq()[0], 1.0);
    }

    #[test]
    fn rejects_unsupported_architecture() {
        let mut v = base();
        v["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
        let c: ModelConfig = serde_json::from_value(v).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("GPTNeoXForCausalLM") && e.contains("not supported"),
            "{e}"
        );
    }

    #[test]
    fn rejects_bad_gqa() {
        let mut v = base();
        v["num_key_value_heads"] = serde_json::json!(3);
        let c: ModelConfig = serde_json::from_value(v).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("multiple"));
    }

    #[test]
    fn missing_config_names_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", ModelConfig::from_dir(dir.path()).unwrap_err());
        assert!(
            e.contains("config.json") && e.contains("cannot read"),
            "{e}"
        );
        std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 3").unwrap();
        let e = format!("{:#}", ModelConfig::from_dir(dir.path()).unwrap_err());
        assert!(e.contains("config.json") && e.contains("invalid"), "{e}");
    }

    #[test]
    fn qwen2_has_qkv_bias_and_eos_list() {
        let mut v = base();
        v["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
        v["eos_token_id"] = serde_json::json!([5, 7]);
        let c: ModelConfig = serde_json::from_value(v).unwrap();
        assert!(c.qkv_bias() && !c.o_bias());
        assert_eq!(c.eos_token_ids(), vec![5, 7]);
    }
}
