//! The engine's metrics (`GET /metrics`), kept and written in Prometheus' text format by the
//! `prometheus-client` crate, named after vLLM's where there is one (`dialora:` instead of
//! `vllm:`): requests running and waiting, prompt and generated tokens, the prefix cache's
//! lookups, hits and size, finished requests by reason, and histograms of the time to the first token, the time per output token, the
//! whole request and the engine's steps.

use super::Finished;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub struct Metrics {
    registry: Registry,
    running: Gauge,
    waiting: Gauge,
    max_batch: Gauge,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    prefix_queries: Counter,
    prefix_hits: Counter,
    prefix_bytes: Gauge,
    finished: Family<Vec<(String, String)>, Counter>,
    ttft: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    queue: Histogram,
    step: Histogram,
    step_tokens: Histogram,
    step_seqs: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dialora");
        let secs = || Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let m = Metrics {
            running: Gauge::default(),
            waiting: Gauge::default(),
            max_batch: Gauge::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            prefix_queries: Counter::default(),
            prefix_hits: Counter::default(),
            prefix_bytes: Gauge::default(),
            finished: Family::default(),
            ttft: secs(),
            tpot: secs(),
            e2e: secs(),
            queue: secs(),
            step: secs(),
            step_tokens: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            step_seqs: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "num_requests_running",
            "Requests running (in the batch)",
            m.running.clone(),
        );
        r.register(
            "num_requests_waiting",
            "Requests waiting for a place in the batch",
            m.waiting.clone(),
        );
        r.register(
            "max_batch",
            "Requests that may run at once (--max-batch)",
            m.max_batch.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens of finished requests",
            m.prompt_tokens.clone(),
        );
        r.register(
            "generation_tokens",
            "Generated tokens of finished requests",
            m.generation_tokens.clone(),
        );
        r.register(
            "prefix_cache_queries",
            "Prompt tokens of finished requests looked up in the prefix cache",
            m.prefix_queries.clone(),
        );
        r.register(
            "prefix_cache_hits",
            "Prompt tokens of finished requests whose keys and values came from the prefix cache",
            m.prefix_hits.clone(),
        );
        r.register(
            "prefix_cache_bytes",
            "Bytes of keys and values the prefix cache holds",
            m.prefix_bytes.clone(),
        );
        r.register(
            "request_success",
            "Finished requests by finish reason",
            m.finished.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "From arrival to the first token",
            m.ttft.clone(),
        );
        r.register(
            "time_per_output_token_seconds",
            "Decode time per output token after the first, per request",
            m.tpot.clone(),
        );
        r.register(
            "e2e_request_latency_seconds",
            "From arrival to the last token",
            m.e2e.clone(),
        );
        r.register(
            "request_queue_time_seconds",
            "Waiting for a place in the batch",
            m.queue.clone(),
        );
        r.register(
            "step_duration_seconds",
            "Duration of one batched forward",
            m.step.clone(),
        );
        r.register(
            "step_tokens",
            "Tokens fed to one batched forward",
            m.step_tokens.clone(),
        );
        r.register(
            "step_sequences",
            "Sequences running during one batched forward",
            m.step_seqs.clone(),
        );
        Metrics { registry, ..m }
    }

    pub(crate) fn finished(&self, f: &Finished) {
        self.prompt_tokens.inc_by(f.prefilled as u64);
        self.generation_tokens.inc_by(f.completion_tokens as u64);
        self.prefix_queries.inc_by(f.prompt_tokens as u64);
        self.prefix_hits.inc_by(f.cached_tokens as u64);
        self.finished
            .get_or_create(&vec![(
                "finished_reason".to_string(),
                f.finish.reason().to_string(),
            )])
            .inc();
        if f.completion_tokens > 0 {
            self.ttft.observe(f.first_token_secs);
            self.e2e.observe(f.first_token_secs + f.decode_secs);
        }
        if f.completion_tokens > 1 {
            self.tpot
                .observe(f.decode_secs / (f.completion_tokens - 1) as f64);
        }
        self.queue.observe(f.queued_secs);
    }

    pub(crate) fn prefix_cache(&self, bytes: usize) {
        self.prefix_bytes.set(bytes as i64);
    }

    /// Requests whose clients left while they waited (never run).
    pub(crate) fn cancelled_waiting(&self, n: usize) {
        self.finished
            .get_or_create(&vec![(
                "finished_reason".to_string(),
                super::Finish::Cancelled.reason().to_string(),
            )])
            .inc_by(n as u64);
    }

    pub(crate) fn step(&self, secs: f64, seqs: usize, tokens: usize) {
        self.step.observe(secs);
        self.step_seqs.observe(seqs as f64);
        self.step_tokens.observe(tokens as f64);
    }

    /// The text exposition, with the gauges read now.
    pub fn encode(&self, waiting: usize, running: usize, max_batch: usize) -> String {
        self.waiting.set(waiting as i64);
        self.running.set(running as i64);
        self.max_batch.set(max_batch as i64);
        let mut s = String::new();
        // writing into a String cannot fail
        let _ = encode(&mut s, &self.registry);
        s
    }
}
