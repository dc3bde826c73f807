//! The batched generation engine, under which `infer --serve`, `--input`, `--compare`,
//! `--prompt` and `--chat` all run: one scheduler owns the batch (as in vLLM and LoRAX).
//!
//! Requests wait in arrival order (at most `max_queue`); up to `max_batch` run at once. Every
//! step is one forward over all running sequences (`Llama::forward_step`): each decoding
//! sequence feeds its last token, each prefilling one its next prompt chunk of `prefill_chunk`
//! tokens (while the step's budget of `prefill_chunk` prompt tokens lasts; the first always
//! goes), so running streams keep flowing while a long prompt is read. A request joins at the
//! next step and leaves the moment it ends. Each sequence has its own KV cache, its own adapter
//! (LoRA terms added on its rows only), its own sampler and penalties, so its answer does not
//! depend on its neighbours: greedy answers and seeded samples are those it gets alone.
//! A finished sequence's cache goes to the prefix cache (`prefix.rs`): a later prompt of the
//! same adapter that starts with its tokens copies those positions and reads only the rest.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | requests, events, the engine thread and its scheduler loop |
//! | `sequence.rs` | one request: inputs, sampling, log-probabilities, text and stop strings |
//! | `metrics.rs` | counters and histograms, in Prometheus text for `GET /metrics` |
//! | `prefix.rs` | the prefix cache: finished sequences' keys and values, reused by prompts that start with their tokens |

mod metrics;
mod prefix;
mod sequence;

pub use metrics::Metrics;
pub use sequence::stop_prefix_len;

use crate::generate::SamplingParams;
use crate::model::{AdapterBranches, KvCache, Llama, StepSeq};
use anyhow::Result;
use sequence::{Input, Sequence};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokenizers::Tokenizer;

/// Prompt tokens a prefilling sequence feeds per step, and the step's budget of them.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// MiB of keys and values the prefix cache keeps by default.
pub const DEFAULT_PREFIX_CACHE_MIB: usize = 256;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Sequences running at once.
    pub max_batch: usize,
    /// Requests that may wait for a place; more are refused (`Refused::Full`).
    pub max_queue: usize,
    /// Prompt tokens per prefill chunk (and per step).
    pub prefill_chunk: usize,
    /// Bytes of finished sequences' keys and values kept for prompts that start with their
    /// tokens (`prefix.rs`); 0 keeps none.
    pub prefix_cache_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch: 16,
            max_queue: 64,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            prefix_cache_bytes: DEFAULT_PREFIX_CACHE_MIB << 20,
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Request {
    /// The rendered, tokenized prompt.
    pub prompt: Vec<u32>,
    /// An adapter's name (`Engine::start`), or `None` for the base model.
    pub adapter: Option<String>,
    pub params: SamplingParams,
    /// OpenAI's penalties on tokens already generated: `presence` once a token has appeared,
    /// `frequency` per appearance, subtracted from the logits.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Strings that end the generation (not included in the text).
    pub stop: Vec<String>,
    /// Report each token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// vLLM's `ignore_eos`: the end-of-turn and eos tokens do not end the generation (as
    /// serving benchmarks ask, so that every answer is `max_new_tokens` long); stop strings
    /// still do.
    pub ignore_eos: bool,
}

impl Request {
    pub fn new(prompt: Vec<u32>, adapter: Option<String>, params: SamplingParams) -> Self {
        Request {
            prompt,
            adapter,
            params,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            stop: Vec::new(),
            logprobs: None,
            ignore_eos: false,
        }
    }
}

/// A generated token's log-probability and the most likely alternatives (id, text, logprob).
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub id: u32,
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(u32, String, f32)>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-turn/eos token or a stop string.
    Stop,
    /// `max_new_tokens`.
    Length,
    /// Its receiver went away.
    Cancelled,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
        }
    }
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The text as streamed (cut before a stop string; the stop token's text not included).
    pub text: String,
    /// New tokens, the stop token included when one ended it.
    pub ids: Vec<u32>,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache (OpenAI's
    /// `prompt_tokens_details.cached_tokens`).
    pub cached_tokens: usize,
    /// Prompt tokens the model has seen (fewer when cancelled while prefilling).
    pub prefilled: usize,
    pub completion_tokens: usize,
    pub finish: Finish,
    /// Waiting for a place, from submission.
    pub queued_secs: f64,
    /// From submission to the first token.
    pub first_token_secs: f64,
    /// From the first token to the last.
    pub decode_secs: f64,
}

impl Finished {
    /// Ended on an end-of-turn/eos token or a stop string.
    pub fn stopped(&self) -> bool {
        self.finish == Finish::Stop
    }

    /// New tokens per second after the first.
    pub fn decode_tokens_per_s(&self) -> f64 {
        crate::generate::decode_rate(self.ids.len(), self.decode_secs)
    }
}

/// What the engine tells a request's submitter, in order: deltas, then `Done` or `Error`.
#[derive(Debug, Clone)]
pub enum Event {
    /// Text that is final (never part of a stop string), with the log-probabilities of the
    /// tokens behind it when asked.
    Delta {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Done(Finished),
    Error(String),
}

/// Where a request's events go. `send` returns false, and `closed` true, once nobody listens:
/// the request is then cancelled at the next step.
pub trait Sink: Send {
    fn send(&mut self, e: Event) -> bool;
    fn closed(&self) -> bool;
}

impl Sink for tokio::sync::mpsc::UnboundedSender<Event> {
    fn send(&mut self, e: Event) -> bool {
        tokio::sync::mpsc::UnboundedSender::send(self, e).is_ok()
    }
    fn closed(&self) -> bool {
        self.is_closed()
    }
}

/// Events of many requests into one channel, each tagged with its submitter's key.
pub struct Tagged<K>(pub K, pub tokio::sync::mpsc::UnboundedSender<(K, Event)>);

impl<K: Clone + Send> Sink for Tagged<K> {
    fn send(&mut self, e: Event) -> bool {
        self.1.send((self.0.clone(), e)).is_ok()
    }
    fn closed(&self) -> bool {
        self.1.is_closed()
    }
}

/// Why a request was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// `max_queue` requests are already waiting.
    Full(usize),
    UnknownAdapter(String),
    /// Prompt plus `max_new_tokens` exceed the context.
    TooLong {
        prompt: usize,
        max_new_tokens: usize,
        context: usize,
    },
    EmptyPrompt,
    /// The engine has stopped.
    Stopped,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Full(n) => write!(f, "{n} requests are already waiting"),
            Refused::UnknownAdapter(a) => write!(f, "no adapter named '{a}'"),
            Refused::TooLong {
                prompt,
                max_new_tokens,
                context,
            } => write!(
                f,
                "prompt is {prompt} tokens; with --max-new-tokens {max_new_tokens} that exceeds the model's context of {context} tokens"
            ),
            Refused::EmptyPrompt => write!(f, "empty prompt"),
            Refused::Stopped => write!(f, "the generation engine has stopped"),
        }
    }
}

impl std::error::Error for Refused {}

struct Job {
    seq: Sequence,
}

/// Counts shared by the engine thread and its handle.
struct Shared {
    /// Submitted and not yet running (or cancelled while waiting).
    waiting: AtomicUsize,
    running: AtomicUsize,
    metrics: Metrics,
}

/// The handle of a running engine. Dropping it lets the running and waiting requests finish,
/// then stops the engine thread.
pub struct Engine {
    tx: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
    adapters: Vec<String>,
    context: usize,
    opts: EngineOptions,
    /// The model's blocks (a new sequence's cache has one entry per block).
    layers: usize,
}

impl Engine {
    /// Starts the engine thread over `model` (without attached adapters) and the named
    /// adapters' branches (`Llama::adapter_branches`); `stop_ids` end every generation.
    pub fn start(
        model: Llama,
        tok: Tokenizer,
        stop_ids: Vec<u32>,
        adapters: Vec<(String, AdapterBranches)>,
        opts: EngineOptions,
    ) -> Result<Engine> {
        if opts.max_batch == 0 || opts.max_queue == 0 || opts.prefill_chunk == 0 {
            anyhow::bail!("max batch, max queue and prefill chunk must each be at least 1");
        }
        let shared = Arc::new(Shared {
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            metrics: Metrics::new(),
        });
        let names = adapters.iter().map(|(n, _)| n.clone()).collect();
        let context = model.config.max_position_embeddings;
        let layers = model.config.num_hidden_layers;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let sh = shared.clone();
        let o = opts.clone();
        let thread = std::thread::Builder::new()
            .name("dialora-engine".into())
            .spawn(move || {
                let branches: Vec<AdapterBranches> = adapters.into_iter().map(|(_, b)| b).collect();
                Scheduler {
                    model: &model,
                    tok: &tok,
                    stop_ids: &stop_ids,
                    adapters: &branches,
                    opts: o.clone(),
                    shared: &sh,
                    waiting: VecDeque::new(),
                    running: Vec::new(),
                    prefix: prefix::PrefixCache::new(o.prefix_cache_bytes),
                }
                .run(rx)
            })?;
        Ok(Engine {
            tx: Some(tx),
            thread: Some(thread),
            shared,
            adapters: names,
            context,
            opts,
            layers,
        })
    }

    pub fn adapters(&self) -> &[String] {
        &self.adapters
    }

    pub fn has_adapter(&self, name: &str) -> bool {
        self.adapters.iter().any(|a| a == name)
    }

    pub fn context(&self) -> usize {
        self.context
    }

    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    /// Requests waiting for a place.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::SeqCst)
    }

    /// Requests running.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// The engine's metrics in Prometheus' text format.
    pub fn metrics_text(&self) -> String {
        self.shared
            .metrics
            .encode(self.waiting(), self.running(), self.opts.max_batch)
    }

    /// Queues a request; its events go to `sink`.
    pub fn submit(&self, req: Request, sink: Box<dyn Sink>) -> std::result::Result<(), Refused> {
        if req.prompt.is_empty() {
            return Err(Refused::EmptyPrompt);
        }
        if req.prompt.len() + req.params.max_new_tokens > self.context {
            return Err(Refused::TooLong {
                prompt: req.prompt.len(),
                max_new_tokens: req.params.max_new_tokens,
                context: self.context,
            });
        }
        let adapter = match &req.adapter {
            None => None,
            Some(a) => Some(
                self.adapters
                    .iter()
                    .position(|n| n == a)
                    .ok_or_else(|| Refused::UnknownAdapter(a.clone()))?,
            ),
        };
        let max = self.opts.max_queue;
        self.shared
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| Refused::Full(max))?;
        let seq = Sequence::new(req, adapter, sink, KvCache::with_layers(self.layers));
        let sent = self.tx.as_ref().map(|tx| tx.send(Job { seq }).is_ok());
        if sent != Some(true) {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Stopped);
        }
        Ok(())
    }

    /// Submits a request and waits for its end (blocking; not from async code), passing each
    /// delta's text to `on_text`.
    pub fn generate(&self, req: Request, mut on_text: impl FnMut(&str)) -> Result<Finished> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        self.submit(req, Box::new(tx))?;
        while let Some(e) = rx.blocking_recv() {
            match e {
                Event::Delta { text, .. } => on_text(&text),
                Event::Done(f) => return Ok(f),
                Event::Error(e) => anyhow::bail!("{e}"),
            }
        }
        anyhow::bail!("the generation engine stopped")
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The engine thread's state: the waiting requests in arrival order and the running ones.
struct Scheduler<'a> {
    model: &'a Llama,
    tok: &'a Tokenizer,
    stop_ids: &'a [u32],
    adapters: &'a [AdapterBranches],
    opts: EngineOptions,
    shared: &'a Shared,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    prefix: prefix::PrefixCache,
}

impl Scheduler<'_> {
    fn run(mut self, rx: std::sync::mpsc::Receiver<Job>) {
        let mut open = true;
        loop {
            if self.waiting.is_empty() && self.running.is_empty() {
                if !open {
                    return;
                }
                match rx.recv() {
                    Ok(j) => self.waiting.push_back(j.seq),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(j) => self.waiting.push_back(j.seq),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.drop_cancelled();
            while self.running.len() < self.opts.max_batch {
                let Some(mut s) = self.waiting.pop_front() else {
                    break;
                };
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                s.admit();
                if !s.req.params.no_cache {
                    if let Some((n, cache)) = self.prefix.lookup(s.adapter, &s.req.prompt) {
                        s.reuse(n, cache);
                    }
                }
                self.running.push(s);
            }
            self.shared
                .running
                .store(self.running.len(), Ordering::SeqCst);
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    /// Requests nobody listens to any more leave (waiting or running).
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.sink.closed());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.shared.waiting.fetch_sub(gone, Ordering::SeqCst);
            self.shared.metrics.cancelled_waiting(gone);
        }
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].sink.closed() {
                let s = self.running.swap_remove(i);
                self.end(s, Finish::Cancelled);
            } else {
                i += 1;
            }
        }
    }

    fn end(&mut self, mut s: Sequence, finish: Finish) {
        let f = s.finished(finish);
        if finish != Finish::Cancelled && !s.req.params.no_cache {
            // the positions its cache holds: the prompt, then every generated token but the
            // last (never fed)
            let mut tokens = s.req.prompt.clone();
            tokens.extend(&s.generated);
            tokens.truncate(s.cache.len());
            let cache = std::mem::replace(&mut s.cache, KvCache::with_layers(0));
            self.prefix.insert(s.adapter, tokens, cache);
            self.shared.metrics.prefix_cache(self.prefix.bytes());
        }
        if finish == Finish::Cancelled {
            if f.prefilled < f.prompt_tokens {
                eprintln!(
                    "infer: a client went away: its prompt was stopped after {} of {} tokens",
                    f.prefilled, f.prompt_tokens
                );
            } else {
                eprintln!(
                    "infer: a client went away: stopped after {} of at most {} tokens",
                    f.completion_tokens, s.req.params.max_new_tokens
                );
            }
        }
        self.shared.metrics.finished(&f);
        let _ = s.sink.send(Event::Done(f));
    }

    /// One forward over every running sequence, then each one's token.
    fn step(&mut self) {
        let mut budget = self.opts.prefill_chunk;
        let mut first_prefill = true;
        let inputs: Vec<Option<Input>> = self
            .running
            .iter_mut()
            .map(|s| {
                if s.prefilling() || s.req.params.no_cache {
                    if !first_prefill && budget == 0 {
                        return None;
                    }
                    first_prefill = false;
                    let i = s.input(self.opts.prefill_chunk);
                    budget = budget.saturating_sub(i.tokens.len());
                    Some(i)
                } else {
                    Some(s.input(self.opts.prefill_chunk))
                }
            })
            .collect();
        let t0 = Instant::now();
        let adapters = self.adapters;
        let result = {
            let model = self.model;
            let mut steps: Vec<StepSeq> = self
                .running
                .iter_mut()
                .zip(&inputs)
                .filter_map(|(s, i)| {
                    let i = i.as_ref()?;
                    Some(StepSeq {
                        tokens: &i.tokens,
                        cache: &mut s.cache,
                        adapter: s.adapter.map(|a| &adapters[a]),
                        decode: i.decode,
                        logits: i.logits,
                    })
                })
                .collect();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                model.forward_step(&mut steps)
            }))
        };
        let logits = match result {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return self.fail_all(&crate::cli::error_line(&e.into())),
            Err(_) => return self.fail_all("internal error in the generation step"),
        };
        let fed: usize = inputs.iter().flatten().map(|i| i.tokens.len()).sum();
        self.shared
            .metrics
            .step(t0.elapsed().as_secs_f64(), self.running.len(), fed);
        let mut logits = logits.into_iter();
        let mut ended = Vec::new();
        for (k, (s, input)) in self.running.iter_mut().zip(&inputs).enumerate() {
            let Some(input) = input else {
                continue;
            };
            let l = logits.next().flatten();
            match s.advance(input, l, self.tok, self.stop_ids) {
                Ok(None) => {}
                Ok(Some(f)) => ended.push((k, Ok(f))),
                Err(e) => ended.push((k, Err(crate::cli::error_line(&e)))),
            }
        }
        // the finished leave the batch (and the running count) before their clients hear of
        // it, so a client that has its answer never sees itself counted as running
        let ended: Vec<_> = ended
            .into_iter()
            .rev()
            .map(|(k, r)| (self.running.remove(k), r))
            .collect();
        self.shared
            .running
            .store(self.running.len(), Ordering::SeqCst);
        for (mut s, r) in ended {
            match r {
                Ok(f) => self.end(s, f),
                Err(e) => {
                    let _ = s.sink.send(Event::Error(e));
                }
            }
        }
    }

    /// A failed step ends every running request with the error (the engine goes on).
    fn fail_all(&mut self, msg: &str) {
        eprintln!("infer: generation step failed: {msg}");
        for mut s in self.running.drain(..) {
            let _ = s.sink.send(Event::Error(msg.to_string()));
        }
        self.shared.running.store(0, Ordering::SeqCst);
    }
}
