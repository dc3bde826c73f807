//! Random weights for a model config: the bench's randomly initialised models and the tests'
//! tiny ones. Uniform in `±1/sqrt(fan_in)` for projections, norms around 1.

use crate::config::ModelConfig;
use crate::model::Llama;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// Every weight of a Llama config with its shape (HF names).
pub fn weight_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (h, kv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let mut m = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, d]),
        ("model.norm.weight".to_string(), vec![d]),
    ];
    if !cfg.tie_word_embeddings {
        m.push(("lm_head.weight".into(), vec![v, d]));
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (n, shape) in [
            ("self_attn.q_proj", vec![h * hd, d]),
            ("self_attn.k_proj", vec![kv * hd, d]),
            ("self_attn.v_proj", vec![kv * hd, d]),
            ("self_attn.o_proj", vec![d, h * hd]),
            ("mlp.gate_proj", vec![f, d]),
            ("mlp.up_proj", vec![f, d]),
            ("mlp.down_proj", vec![d, f]),
            ("input_layernorm", vec![d]),
            ("post_attention_layernorm", vec![d]),
        ] {
            m.push((format!("{p}.{n}.weight"), shape));
        }
    }
    m
}

/// Random weights for a config, as a name -> tensor map (HF names), deterministic in `seed`.
pub fn random_weights(cfg: &ModelConfig, seed: u64, dtype: DType) -> HashMap<String, Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = |shape: &[usize], scale: f64, offset: f64| {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| offset + scale * (rng.random::<f64>() * 2.0 - 1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("a host tensor of a supported dtype")
    };
    weight_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let t = if name.ends_with("norm.weight") {
                t(&shape, 0.2, 1.0)
            } else if name == "model.embed_tokens.weight" {
                t(&shape, 1.0, 0.0)
            } else if name == "lm_head.weight" {
                t(&shape, 0.3, 0.0)
            } else {
                t(&shape, 1.0 / (shape[1] as f64).sqrt(), 0.0)
            };
            (name, t)
        })
        .collect()
}

/// A randomly initialised model generated on the device (normal, std 0.02; norms 1): the
/// benchmark's stand-in for a checkpoint of a given shape.
pub fn random_model(cfg: &ModelConfig, dtype: DType, device: &Device) -> anyhow::Result<Llama> {
    let mut m = HashMap::new();
    for (n, shape) in weight_shapes(cfg) {
        let t = if n.ends_with("norm.weight") {
            Tensor::ones(shape, dtype, device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?
        };
        m.insert(n, t);
    }
    let vb = candle_nn::VarBuilder::from_tensors(m, dtype, device);
    Ok(Llama::load(vb, cfg)?)
}
