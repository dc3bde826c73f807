//! One request inside the engine: what it feeds the next step (a prompt chunk or its last
//! token), its KV cache, and what it does with its logits: penalties, its own sampler (its
//! seed), log-probabilities, incremental detokenization through tokenizers' `DecodeStream`
//! state, stop tokens and stop strings (never a partial match in the stream).

use super::{Event, Finish, Finished, Request, Sink, TokenLogprob};
use crate::model::KvCache;
use anyhow::{anyhow, Result};
use candle_core::Tensor;
use candle_transformers::generation::LogitsProcessor;
use std::collections::HashMap;
use std::time::Instant;
use tokenizers::Tokenizer;

/// What a sequence feeds one step.
pub(crate) struct Input {
    pub tokens: Vec<u32>,
    pub decode: bool,
    pub logits: bool,
}

/// Incremental detokenization: the state of `tokenizers::tokenizer::step_decode_stream` (the
/// function behind `DecodeStream`, whose state is kept here rather than borrowed), the text so
/// far, and how much of it has been sent.
#[derive(Default)]
struct TextStream {
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
    text: String,
    sent: usize,
}

pub(crate) struct Sequence {
    pub req: Request,
    pub adapter: Option<usize>,
    pub sink: Box<dyn Sink>,
    pub cache: KvCache,
    /// Prompt positions in the cache.
    prefilled: usize,
    /// Of them, those copied from the prefix cache.
    cached: usize,
    pub generated: Vec<u32>,
    sampler: LogitsProcessor,
    /// Occurrences of each generated token (presence and frequency penalties).
    counts: HashMap<u32, usize>,
    text: TextStream,
    /// Log-probabilities of tokens whose text has not been sent yet.
    logprobs: Vec<TokenLogprob>,
    pub submitted: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
}

/// How many bytes at the end of `text` could still be the start of one of the `stops`: held
/// back from the stream until the next piece decides. Cut on character boundaries.
pub fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .map(|st| {
            (1..st.len())
                .rev()
                .filter(|&k| st.is_char_boundary(k))
                .find(|&k| text.ends_with(&st[..k]))
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

impl Sequence {
    pub fn new(req: Request, adapter: Option<usize>, sink: Box<dyn Sink>, cache: KvCache) -> Self {
        let sampler = LogitsProcessor::from_sampling(req.params.seed, req.params.sampling());
        Sequence {
            req,
            adapter,
            sink,
            cache,
            prefilled: 0,
            cached: 0,
            generated: Vec::new(),
            sampler,
            counts: HashMap::new(),
            text: TextStream::default(),
            logprobs: Vec::new(),
            submitted: Instant::now(),
            admitted: None,
            first_token: None,
        }
    }

    pub fn admit(&mut self) {
        self.admitted = Some(Instant::now());
    }

    /// Starts from `cache`, the prefix cache's copy of the prompt's first `n` positions.
    pub fn reuse(&mut self, n: usize, cache: KvCache) {
        debug_assert!(n < self.req.prompt.len() && cache.len() == n);
        self.cache = cache;
        self.prefilled = n;
        self.cached = n;
    }

    pub fn prefilling(&self) -> bool {
        self.prefilled < self.req.prompt.len()
    }

    /// The next step's input: the next prompt chunk of `chunk` tokens (from where the prefix
    /// cache's positions end; how a prompt is cut does not change its results), else the last
    /// token; with `no_cache`, the whole sequence recomputed.
    pub fn input(&mut self, chunk: usize) -> Input {
        let prompt = &self.req.prompt;
        if self.req.params.no_cache {
            self.cache.clear();
            let mut tokens = prompt.clone();
            tokens.extend(&self.generated);
            return Input {
                tokens,
                decode: false,
                logits: true,
            };
        }
        if self.prefilling() {
            let end = (self.prefilled + chunk).min(prompt.len());
            return Input {
                tokens: prompt[self.prefilled..end].to_vec(),
                decode: false,
                logits: end == prompt.len(),
            };
        }
        Input {
            tokens: vec![*self.generated.last().expect("a token after the prompt")],
            decode: true,
            logits: true,
        }
    }

    /// Records that `input` went through the step, and with its logits picks the next token,
    /// sends the text that is final, and says whether the sequence has ended.
    pub fn advance(
        &mut self,
        input: &Input,
        logits: Option<Tensor>,
        tok: &Tokenizer,
        stop_ids: &[u32],
    ) -> Result<Option<Finish>> {
        if !input.decode && !self.req.params.no_cache {
            self.prefilled += input.tokens.len();
        }
        let Some(logits) = logits else {
            return Ok(None);
        };
        let next = self.sample(logits, tok)?;
        if self.first_token.is_none() {
            self.first_token = Some(Instant::now());
        }
        self.generated.push(next);
        *self.counts.entry(next).or_default() += 1;
        if stop_ids.contains(&next) && !self.req.ignore_eos {
            self.flush();
            return Ok(Some(Finish::Stop));
        }
        if self.push_text(next, tok)? {
            return Ok(Some(Finish::Stop));
        }
        if self.generated.len() >= self.req.params.max_new_tokens {
            self.flush();
            return Ok(Some(Finish::Length));
        }
        Ok(None)
    }

    /// Penalties, log-probabilities (of the model's own distribution, before penalties and
    /// temperature, as vLLM reports them) and the sampler.
    fn sample(&mut self, logits: Tensor, tok: &Tokenizer) -> Result<u32> {
        let p = &self.req.params;
        let (presence, frequency) = (self.req.presence_penalty, self.req.frequency_penalty);
        let mut logits = logits;
        if self.req.logprobs.is_some() || presence != 0.0 || frequency != 0.0 {
            let raw: Vec<f32> = logits.to_vec1()?;
            let mut v = raw.clone();
            for (&id, &n) in &self.counts {
                if let Some(x) = v.get_mut(id as usize) {
                    *x -= frequency * n as f32 + presence;
                }
            }
            logits = Tensor::from_vec(v, raw.len(), logits.device())?;
            if p.repetition_penalty != 1.0 {
                logits = self.repeat_penalty(&logits)?;
            }
            let next = self.sampler.sample(&logits)?;
            if let Some(top) = self.req.logprobs {
                self.logprobs.push(token_logprob(&raw, next, top, tok));
            }
            return Ok(next);
        }
        if p.repetition_penalty != 1.0 {
            logits = self.repeat_penalty(&logits)?;
        }
        Ok(self.sampler.sample(&logits)?)
    }

    fn repeat_penalty(&self, logits: &Tensor) -> Result<Tensor> {
        let mut context = self.req.prompt.clone();
        context.extend(&self.generated);
        Ok(candle_transformers::utils::apply_repeat_penalty(
            logits,
            self.req.params.repetition_penalty,
            &context,
        )?)
    }

    /// Adds a token's text; sends what can no longer be part of a stop string. True when a
    /// stop string was produced (the text is cut before it).
    fn push_text(&mut self, id: u32, tok: &Tokenizer) -> Result<bool> {
        let t = &mut self.text;
        let piece = tokenizers::tokenizer::step_decode_stream(
            tok,
            vec![id],
            true,
            &mut t.ids,
            &mut t.prefix,
            &mut t.prefix_index,
        )
        .map_err(|e| anyhow!("decode: {e}"))?;
        let Some(piece) = piece else {
            return Ok(false);
        };
        // a stop string can only begin within the longest stop's reach of the new piece
        let reach = self.req.stop.iter().map(|s| s.len()).max().unwrap_or(0);
        let from = t.text.len().saturating_sub(reach);
        t.text.push_str(&piece);
        let from = (0..=from)
            .rev()
            .find(|&i| t.text.is_char_boundary(i))
            .unwrap_or(0);
        let hit = self
            .req
            .stop
            .iter()
            .filter_map(|st| t.text[from..].find(st.as_str()).map(|p| p + from))
            .min();
        if let Some(pos) = hit {
            t.text.truncate(pos);
            self.flush();
            return Ok(true);
        }
        let upto = t.text.len() - stop_prefix_len(&t.text, &self.req.stop);
        self.send_upto(upto);
        Ok(false)
    }

    fn send_upto(&mut self, upto: usize) {
        let t = &mut self.text;
        if upto > t.sent {
            let text = t.text[t.sent..upto].to_string();
            t.sent = upto;
            let logprobs = std::mem::take(&mut self.logprobs);
            let _ = self.sink.send(Event::Delta { text, logprobs });
        }
    }

    /// Sends whatever text is held back (the sequence has ended), and the log-probabilities
    /// of tokens whose text was empty or cut.
    fn flush(&mut self) {
        self.send_upto(self.text.text.len());
        if !self.logprobs.is_empty() {
            let logprobs = std::mem::take(&mut self.logprobs);
            let _ = self.sink.send(Event::Delta {
                text: String::new(),
                logprobs,
            });
        }
    }

    /// What the finished sequence reports.
    pub fn finished(&self, finish: Finish) -> Finished {
        let now = Instant::now();
        let admitted = self.admitted.unwrap_or(now);
        let first = self.first_token.unwrap_or(now);
        Finished {
            text: self.text.text.clone(),
            ids: self.generated.clone(),
            prompt_tokens: self.req.prompt.len(),
            cached_tokens: self.cached,
            prefilled: self.prefilled.min(self.req.prompt.len()),
            completion_tokens: self.generated.len(),
            finish,
            queued_secs: (admitted - self.submitted).as_secs_f64(),
            first_token_secs: (first - self.submitted).as_secs_f64(),
            decode_secs: (now - first).as_secs_f64(),
        }
    }
}

/// The chosen token's log-probability and the `top` most likely ones, from the raw logits.
fn token_logprob(logits: &[f32], chosen: u32, top: usize, tok: &Tokenizer) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + logits
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let text = |id: u32| tok.decode(&[id], false).unwrap_or_default();
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let top = top.min(order.len());
    if top > 0 {
        order.select_nth_unstable_by(top - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
        order.truncate(top);
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    } else {
        order.clear();
    }
    TokenLogprob {
        id: chosen,
        token: text(chosen),
        logprob: logits[chosen as usize] - lse,
        top: order
            .into_iter()
            .map(|id| (id, text(id), logits[id as usize] - lse))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_stop_prefixes_end_on_character_boundaries() {
        let stops = vec!["。".to_string(), "END".to_string()];
        assert_eq!(stop_prefix_len("好的EN", &stops), 2);
        assert_eq!(stop_prefix_len("好的", &stops), 0);
        assert_eq!(stop_prefix_len("E", &stops), 1);
        let multi = vec!["。\n".to_string()];
        assert_eq!(stop_prefix_len("好的。", &multi), "。".len());
    }
}
