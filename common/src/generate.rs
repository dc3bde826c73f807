//! Token generation: greedy or sampled (temperature, top-k, top-p, repetition penalty, seed),
//! with a KV cache, stopping at any of the stop ids.

use crate::model::Llama;
use anyhow::{bail, Result};
use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};

/// Temperatures below this decode greedily (as vLLM does): dividing the logits by less would
/// overflow f32 and leave the sampler nothing but NaN.
pub const GREEDY_BELOW: f64 = 1e-5;

/// Checks a `top_p` in the type the sampler compares it in (f32), so that a value such as
/// 1e-46, which is 0 there, is refused instead of silently switching top-p off.
pub fn check_top_p(p: f64) -> std::result::Result<(), String> {
    if !(p > 0.0 && p <= 1.0) {
        return Err(format!("must be in (0, 1], got {p}"));
    }
    if (p as f32) <= 0.0 {
        return Err(format!(
            "must be in (0, 1], got {p}, which is 0 as the 32-bit float the sampler uses"
        ));
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 (or anything below `GREEDY_BELOW`) means greedy.
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Recompute the whole sequence at every step instead of using the KV cache (testing).
    pub no_cache: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: None,
            top_k: None,
            repetition_penalty: 1.0,
            seed: 42,
            no_cache: false,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("--temperature must be >= 0, got {}", self.temperature);
        }
        if let Some(p) = self.top_p {
            check_top_p(p).map_err(|e| anyhow::anyhow!("--top-p {e}"))?;
        }
        if self.top_k == Some(0) {
            bail!("--top-k must be >= 1");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            bail!(
                "--repetition-penalty must be > 0, got {}",
                self.repetition_penalty
            );
        }
        if self.max_new_tokens == 0 {
            bail!("--max-new-tokens must be >= 1");
        }
        Ok(())
    }

    pub(crate) fn sampling(&self) -> Sampling {
        let temperature = self.temperature;
        if temperature < GREEDY_BELOW {
            return Sampling::ArgMax;
        }
        match (self.top_k, self.top_p) {
            (None, None) => Sampling::All { temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
        }
    }
}

/// Decoding settings as asked on a command line or in a request: each `None` falls back to the
/// model's `generation_config.json`, then to HF `generate`'s defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingFlags {
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
    pub seed: u64,
    pub no_cache: bool,
}

/// The sampling fields of a model's `generation_config.json`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct GenerationConfig {
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// `<dir>/generation_config.json`, or nothing when the model has none.
    pub fn from_dir(dir: &std::path::Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: invalid generation config: {e}", path.display())),
            Err(_) => Ok(Self::default()),
        }
    }
}

impl SamplingFlags {
    /// Range checks of the values given (before any falls back to a default).
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = self.temperature {
            if !(t >= 0.0 && t.is_finite()) {
                bail!("--temperature must be >= 0, got {t}");
            }
        }
        if let Some(p) = self.top_p {
            check_top_p(p).map_err(|e| anyhow::anyhow!("--top-p {e}"))?;
        }
        if let Some(r) = self.repetition_penalty {
            if !(r > 0.0 && r.is_finite()) {
                bail!("--repetition-penalty must be > 0, got {r}");
            }
        }
        if self.max_new_tokens == Some(0) {
            bail!("--max-new-tokens must be >= 1");
        }
        Ok(())
    }

    /// The decoding to use and a line saying what it is and where it came from. Sampling is
    /// on when asked (`do_sample`, or a `temperature` above 0), else when the model's
    /// generation config asks for it, unless `greedy_unless_asked` (comparisons). Unset values
    /// come from the generation config, then HF's defaults (temperature 1, top_k 50).
    pub fn resolve(
        &self,
        cfg: &GenerationConfig,
        greedy_unless_asked: bool,
    ) -> (SamplingParams, String) {
        let asked = self.do_sample.or(self.temperature.map(|t| t > 0.0));
        let (sample, why) = match asked {
            Some(s) => (s, "as asked"),
            None if greedy_unless_asked => (false, "comparisons are greedy unless asked"),
            None => match cfg.do_sample {
                Some(s) => (s, "from generation_config.json"),
                None => (false, "the default"),
            },
        };
        let max_new_tokens = self.max_new_tokens.or(cfg.max_new_tokens).unwrap_or(256);
        let repetition_penalty = self
            .repetition_penalty
            .or(cfg.repetition_penalty)
            .unwrap_or(1.0);
        let mut p = SamplingParams {
            max_new_tokens,
            repetition_penalty,
            seed: self.seed,
            no_cache: self.no_cache,
            ..Default::default()
        };
        let how = if sample {
            p.temperature = self.temperature.or(cfg.temperature).unwrap_or(1.0);
            p.top_p = self.top_p.or(cfg.top_p).filter(|&x| x < 1.0);
            p.top_k = self.top_k.or(cfg.top_k).or(Some(50)).filter(|&k| k > 0);
            format!(
                "sampling (temperature {}, top_p {}, top_k {}, seed {})",
                p.temperature,
                p.top_p.map(|x| x.to_string()).unwrap_or("1".into()),
                p.top_k.map(|x| x.to_string()).unwrap_or("off".into()),
                p.seed
            )
        } else {
            "greedy".to_string()
        };
        let line = format!(
            "{how}, repetition penalty {repetition_penalty}, at most {max_new_tokens} new tokens ({why})"
        );
        (p, line)
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// New tokens, including the stop token when one was produced.
    pub ids: Vec<u32>,
    /// Whether generation ended on a stop token (rather than on `max_new_tokens`).
    pub stopped: bool,
    pub prompt_tokens: usize,
    /// Prompt tokens the model has seen (fewer than `prompt_tokens` when stopped in prefill).
    pub prefilled: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl Generation {
    /// Decode speed in new tokens per second (prefill excluded).
    pub fn decode_tokens_per_s(&self) -> f64 {
        decode_rate(self.ids.len(), self.decode_secs)
    }
}

/// New tokens per second after the first (which the prefill produces), over `decode_secs`.
pub fn decode_rate(new_tokens: usize, decode_secs: f64) -> f64 {
    if decode_secs > 0.0 {
        new_tokens.saturating_sub(1) as f64 / decode_secs
    } else {
        0.0
    }
}

/// Prompt tokens fed to the model per forward while prefilling: a long prompt is processed in
/// chunks, with a check between chunks whether the caller still wants the answer.
pub const PREFILL_CHUNK: usize = 256;

/// Generates after `prompt`, calling `on_token` for every new token as it is produced; it
/// returns whether to go on (`false` ends the generation there, as a stop token does).
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    params: &SamplingParams,
    stop_ids: &[u32],
    on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Generation> {
    generate_until(model, prompt, params, stop_ids, || false, on_token)
}

/// `generate`, ending early when `stop_now` says so: it is asked between the prefill's chunks
/// of `PREFILL_CHUNK` tokens (a long prompt nobody waits for any more is not prefilled to its
/// end) and before every new token. A generation stopped in its prefill has no tokens and
/// `prefilled < prompt_tokens`.
pub fn generate_until(
    model: &Llama,
    prompt: &[u32],
    params: &SamplingParams,
    stop_ids: &[u32],
    stop_now: impl Fn() -> bool,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Generation> {
    params.validate()?;
    let max_pos = model.config.max_position_embeddings;
    if prompt.is_empty() {
        bail!("empty prompt");
    }
    if prompt.len() + params.max_new_tokens > max_pos {
        bail!(
            "prompt is {} tokens; with --max-new-tokens {} that exceeds the model's context of {max_pos} tokens",
            prompt.len(),
            params.max_new_tokens
        );
    }
    let mut lp = LogitsProcessor::from_sampling(params.seed, params.sampling());
    let mut cache = model.new_cache();
    let mut all: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    let t0 = std::time::Instant::now();
    let mut prefill_secs = 0.0;
    let mut stopped = false;
    let cancelled = |prefilled: usize| Generation {
        ids: Vec::new(),
        stopped: false,
        prompt_tokens: prompt.len(),
        prefilled,
        prefill_secs: t0.elapsed().as_secs_f64(),
        decode_secs: 0.0,
    };
    if !params.no_cache {
        // all of the prompt but its last chunk, which the first step below feeds
        let mut done = 0;
        while prompt.len() - done > PREFILL_CHUNK {
            if stop_now() {
                return Ok(cancelled(done));
            }
            let ids = Tensor::new(&prompt[done..done + PREFILL_CHUNK], &model.device)?;
            model.forward_hidden(&ids.unsqueeze(0)?, Some(&mut cache))?;
            done += PREFILL_CHUNK;
        }
    }
    for step in 0..params.max_new_tokens {
        if stop_now() {
            if step == 0 {
                return Ok(cancelled(cache.len()));
            }
            break;
        }
        let logits = if params.no_cache {
            let ids = Tensor::new(all.as_slice(), &model.device)?.unsqueeze(0)?;
            model.forward_last(&ids, None)?
        } else {
            let new = &all[cache.len()..];
            let ids = Tensor::new(new, &model.device)?.unsqueeze(0)?;
            model.forward_last(&ids, Some(&mut cache))?
        };
        let mut logits = logits.squeeze(0)?;
        if params.repetition_penalty != 1.0 {
            logits = candle_transformers::utils::apply_repeat_penalty(
                &logits,
                params.repetition_penalty,
                &all,
            )?;
        }
        let next = lp.sample(&logits)?;
        if step == 0 {
            prefill_secs = t0.elapsed().as_secs_f64();
        }
        all.push(next);
        out.push(next);
        let go_on = on_token(next)?;
        if stop_ids.contains(&next) || !go_on {
            stopped = true;
            break;
        }
    }
    let decode_secs = t0.elapsed().as_secs_f64() - prefill_secs;
    Ok(Generation {
        ids: out,
        stopped,
        prompt_tokens: prompt.len(),
        prefilled: prompt.len(),
        prefill_secs,
        decode_secs,
    })
}

/// Stop ids of a model: `generation_config.json`'s eos ids, config.json's, and the chat
/// template's end-of-turn token (`ChatTemplate::end_of_turn`, the same marker dataprep labels).
pub fn stop_ids(dir: &std::path::Path, eot: &crate::chat::EndOfTurn) -> Vec<u32> {
    let mut ids = Vec::new();
    let read = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok()
    };
    for f in ["generation_config.json", "config.json"] {
        if let Some(v) = read(f).and_then(|v| v.get("eos_token_id").cloned()) {
            match v {
                serde_json::Value::Number(n) => ids.extend(n.as_u64().map(|x| x as u32)),
                serde_json::Value::Array(a) => {
                    ids.extend(a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)))
                }
                _ => {}
            }
        }
    }
    ids.extend(eot.single_id());
    ids.sort();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_prefill_equals_the_full_forward_and_stops_between_chunks() {
        let mut cfg = crate::model::tests::tiny_config(true);
        cfg.max_position_embeddings = 1024;
        let model = crate::model::tests::tiny_model(&cfg, candle_core::DType::F32);
        let prompt: Vec<u32> = (0..2 * PREFILL_CHUNK + 37)
            .map(|i| (i * 7 % 40) as u32)
            .collect();
        let p = SamplingParams {
            max_new_tokens: 6,
            ..Default::default()
        };
        let run = |p: &SamplingParams| generate(&model, &prompt, p, &[], |_| Ok(true)).unwrap();
        let chunked = run(&p);
        let full = run(&SamplingParams {
            no_cache: true,
            ..p.clone()
        });
        assert_eq!(chunked.ids, full.ids);
        assert_eq!(chunked.prefilled, prompt.len());
        // asked between chunks: stopped after the first, nothing generated
        let asked = std::cell::Cell::new(0);
        let g = generate_until(
            &model,
            &prompt,
            &p,
            &[],
            || {
                asked.set(asked.get() + 1);
                asked.get() > 1
            },
            |_| Ok(true),
        )
        .unwrap();
        assert_eq!((g.prefilled, g.ids.len()), (PREFILL_CHUNK, 0));
    }

    #[test]
    fn top_p_is_checked_as_the_sampler_sees_it() {
        assert!(check_top_p(0.9).is_ok() && check_top_p(1.0).is_ok());
        assert!(
            check_top_p(1e-40).is_ok(),
            "a subnormal f32 is still above 0"
        );
        let e = check_top_p(1e-46).unwrap_err();
        assert!(e.contains("32-bit"), "{e}");
        assert!(check_top_p(0.0).is_err() && check_top_p(1.5).is_err());
        let f = SamplingFlags {
            top_p: Some(1e-46),
            ..Default::default()
        };
        assert!(f.validate().is_err());
        // a temperature too small to divide by decodes greedily instead of giving NaN
        let p = SamplingParams {
            temperature: 1e-300,
            ..Default::default()
        };
        assert!(matches!(p.sampling(), Sampling::ArgMax));
    }

    #[test]
    fn decoding_follows_flags_then_the_generation_config_then_hf_defaults() {
        let cfg = GenerationConfig {
            do_sample: Some(true),
            temperature: Some(0.6),
            top_p: Some(0.9),
            repetition_penalty: Some(1.1),
            ..Default::default()
        };
        let none = SamplingFlags::default();
        // the model's config asks for sampling: chat and batch follow it
        let (p, line) = none.resolve(&cfg, false);
        assert_eq!(
            (p.temperature, p.top_p, p.top_k),
            (0.6, Some(0.9), Some(50))
        );
        assert_eq!((p.repetition_penalty, p.max_new_tokens), (1.1, 256));
        assert!(line.contains("from generation_config.json"), "{line}");
        // comparisons stay greedy unless asked
        let (p, line) = none.resolve(&cfg, true);
        assert_eq!(p.temperature, 0.0);
        assert!(
            line.starts_with("greedy") && line.contains("unless asked"),
            "{line}"
        );
        // flags win: a temperature asks for sampling, --do-sample false for greedy
        let f = SamplingFlags {
            temperature: Some(1.2),
            top_k: Some(0),
            max_new_tokens: Some(9),
            ..Default::default()
        };
        let (p, _) = f.resolve(&cfg, true);
        assert_eq!((p.temperature, p.top_k, p.max_new_tokens), (1.2, None, 9));
        let f = SamplingFlags {
            do_sample: Some(false),
            ..Default::default()
        };
        assert_eq!(f.resolve(&cfg, false).0.temperature, 0.0);
        // no config: greedy, as HF generate
        let (p, line) = none.resolve(&GenerationConfig::default(), false);
        assert_eq!(p.temperature, 0.0);
        assert!(line.contains("the default"), "{line}");
    }
}
