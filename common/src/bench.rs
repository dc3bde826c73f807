//! LoRA training benchmark with the shapes and settings of the reference `bench_lora.py`:
//! random token ids (labels = inputs), LoRA on q,k,v,o,gate,up,down, AdamW, median step time
//! over the timed steps, peak memory.

use crate::config::ModelConfig;
use crate::lora::LoraConfig;
use crate::model::{Batch, Grads, Llama, TrainCtx};
use crate::train::optim::{AdamW, AdamWConfig};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model: Option<PathBuf>,
    /// `deepseek-7b`, `smollm2-135m` or a config.json path (random init).
    pub random_config: Option<String>,
    pub layers: Option<usize>,
    pub seq: usize,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub lr: f64,
    pub dtype: DType,
    pub device: Device,
    pub grad_ckpt: bool,
    pub seed: u64,
}

pub fn preset(name: &str) -> Result<ModelConfig> {
    let v = match name {
        "deepseek-7b" => {
            serde_json::json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 30, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 102400,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false})
        }
        "smollm2-135m" => {
            serde_json::json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true})
        }
        path => {
            let p = PathBuf::from(path);
            let dir = if p.is_dir() {
                p
            } else {
                p.parent().map(|x| x.to_path_buf()).unwrap_or_default()
            };
            return ModelConfig::from_dir(&dir);
        }
    };
    Ok(serde_json::from_value(v)?)
}

fn sync(d: &Device) -> Result<()> {
    d.synchronize()?;
    Ok(())
}

pub fn run(o: &BenchOptions) -> Result<serde_json::Value> {
    if o.steps <= o.warmup {
        bail!("--steps must exceed --warmup");
    }
    let t_load = std::time::Instant::now();
    let mut model = match (&o.model, &o.random_config) {
        (Some(dir), _) => Llama::from_dir(dir, o.dtype, &o.device)?,
        (None, Some(rc)) => {
            let mut cfg = preset(rc)?;
            if let Some(l) = o.layers {
                cfg.num_hidden_layers = l;
            }
            crate::model::init::random_model(&cfg, o.dtype, &o.device)?
        }
        _ => bail!("give --model DIR or --random-config"),
    };
    let load_s = t_load.elapsed().as_secs_f64();
    let targets: Vec<String> = crate::lora::TARGETABLE
        .iter()
        .map(|s| s.to_string())
        .collect();
    let lc = LoraConfig::new(o.r, o.alpha, o.dropout, targets);
    let n = model.attach_lora(
        &lc,
        crate::lora::initializer(&lc.init_lora_weights, o.seed, &o.device),
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let trainable = model.trainable_parameters();
    let mut opt = AdamW::new(
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        2 * n,
    );
    let v = model.config.vocab_size as u32;
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for step in 0..o.steps {
        let ids: Vec<u32> = (0..o.batch * o.seq)
            .map(|_| rng.random_range(0..v))
            .collect();
        let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
        let batch = Batch {
            input_ids: Tensor::from_vec(ids, (o.batch, o.seq), &o.device)?,
            labels,
        };
        sync(&o.device)?;
        let t = std::time::Instant::now();
        let mut g = Grads::new(n);
        let ctx = TrainCtx {
            seed: o.seed,
            micro_step: step as u64,
            gradient_checkpointing: o.grad_ckpt,
            neftune_noise_alpha: None,
        };
        let count = o.batch * (o.seq - 1);
        let s = model.forward_backward(&batch, &ctx, 1.0 / count as f64, &mut g)?;
        opt.step_loras(&mut model, &g.into_flat()?, o.lr)?;
        sync(&o.device)?;
        let dt = t.elapsed().as_secs_f64();
        let loss = s.loss_sum / s.tokens as f64;
        eprintln!(
            "step {step} [{}] loss={loss:.4} time={dt:.3}s tok/s={:.1}",
            if step < o.warmup { "warmup" } else { "timed" },
            (o.batch * o.seq) as f64 / dt
        );
        losses.push(loss);
        if step >= o.warmup {
            times.push(dt);
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let med = sorted[sorted.len() / 2];
    let ntok = (o.batch * o.seq) as f64;
    Ok(serde_json::json!({
        "impl": "dialora", "model": o.model.as_ref().map(|p| p.display().to_string()).or(o.random_config.clone()),
        "device": format!("{:?}", o.device), "dtype": format!("{:?}", o.dtype), "seq": o.seq, "batch": o.batch,
        "steps": o.steps, "warmup": o.warmup, "grad_ckpt": o.grad_ckpt, "r": o.r, "alpha": o.alpha, "dropout": o.dropout,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "trainable_params": trainable, "median_step_s": med, "tokens_per_s": ntok / med,
        "tokens_per_s_best_step": ntok / sorted[0], "final_loss": losses.last(),
        "peak_rss_mib": crate::device::peak_rss_mib(), "load_s": load_s,
        "peak_mem_mib": crate::device::peak_mem_mib(&o.device), "peak_mem_of": crate::device::mem_kind(&o.device),
    }))
}
