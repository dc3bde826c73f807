//! infer: chat and batch generation with a base model, base + adapter, or a merged model.

use anyhow::{bail, Context, Result};
use clap::Parser;
use common::atomic::AtomicFile;
use common::chat::Message;
use common::cli::{emit, say};
use common::data::formats::{read_file, Purpose};
use common::device::DtypeArg;
use common::generate::{GenerationConfig, SamplingFlags};
use common::infer::{
    comparison, comparison_markdown, Chat, ChatInput, ModelOptions, Reply, Session,
};
use common::model::WeightFormat;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

/// Generate with a chat model: one prompt (--prompt), an interactive multi-turn chat (--chat,
/// with /history, /reset, /system TEXT, /help and /quit), or a file of conversations (--input)
/// answered turn by turn with the model's own earlier answers in the history. --compare answers
/// the same conversations with the base model and with base + adapter, side by side (JSONL +
/// Markdown). --serve ADDR answers OpenAI-style HTTP requests (POST /v1/chat/completions, GET
/// /v1/models, GET /health) for the base and every --adapter NAME=DIR, until SIGTERM.
///
/// Uses the model's chat template (the same code path as dataprep), stops at eos and the
/// template's end-of-turn token, greedy when --temperature is 0. Replies go to stdout (streamed
/// on a terminal); progress and a tokens/s line go to stderr.
#[derive(Parser)]
#[command(name = "infer", version, allow_negative_numbers = true)]
struct Args {
    /// Model directory (base or merged).
    #[arg(long)]
    model: PathBuf,
    /// LoRA adapter directory to apply on top of --model. With --serve, NAME=DIR, repeatable:
    /// a request's "model" picks one by NAME.
    #[arg(long)]
    adapter: Vec<String>,
    /// Serve an OpenAI-compatible API on this address (e.g. 127.0.0.1:8000; port 0 picks a
    /// free one, printed on stderr).
    #[arg(long, conflicts_with_all = ["prompt", "chat", "input"])]
    serve: Option<String>,
    /// The name the API gives the base model (default: --model's directory name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests that may wait for a place in the batch at once; with --serve more are answered
    /// 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Sequences generated at once (requests with --serve, conversations with --input and
    /// --compare): each step reads the weights once for all of them.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Prompt tokens a sequence feeds per step while its prompt is read (and the step's budget
    /// of them), so that running streams keep flowing beside a long prompt.
    #[arg(long, default_value_t = common::engine::DEFAULT_PREFILL_CHUNK)]
    prefill_chunk: usize,
    /// MiB of keys and values kept from finished requests, so that a prompt starting with
    /// tokens seen before (a system prompt, the earlier turns of a conversation) reuses their
    /// positions instead of computing them again (vLLM's prefix caching, llama-server's
    /// cache_prompt); the answer is the same either way. 0 keeps none. On the CPU in f32.
    #[arg(long, default_value_t = common::engine::DEFAULT_PREFIX_CACHE_MIB)]
    prefix_cache_mib: usize,
    /// Quantize the frozen base weights for inference on the CPU with candle's types, as
    /// llama.cpp's files of that type hold them (q4_k: Q4_K_M's choice per tensor); LoRA terms
    /// stay f32.
    #[arg(long, value_enum)]
    quantize: Option<QuantizeArg>,
    /// With --serve: require `Authorization: Bearer KEY` on every request but GET /health
    /// (OpenAI's 401 otherwise). Taken from DIALORA_API_KEY when the flag is not given; prefer
    /// that or --api-key-file, which keep the key out of `ps`. Without a key anyone who can
    /// reach the port can use the server: bind beyond 127.0.0.1 only with one.
    #[arg(long, env = "DIALORA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// With --serve: read the API key from this file (its first line).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// A Jinja chat template file to use instead of the model's (as dataprep --template).
    #[arg(long)]
    template: Option<PathBuf>,
    /// A single user message.
    #[arg(long, conflicts_with_all = ["chat", "input"])]
    prompt: Option<String>,
    /// Interactive multi-turn chat on stdin.
    #[arg(long, conflicts_with = "input")]
    chat: bool,
    /// JSONL/JSON of conversations (dataprep formats, {"prompt"} or {"turns": [...]}).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Where --input results go (JSONL, written atomically; default stdout). With --compare a
    /// .md is written beside it.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Answer --input with the base model and with base + --adapter, side by side.
    #[arg(long, requires_all = ["adapter", "input"])]
    compare: bool,
    /// System prompt (when the conversation has none).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens generated per reply [default: the model's generation_config.json, else 256].
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Sample (true) or decode greedily (false) [default: a --temperature above 0 samples;
    /// else generation_config.json's do_sample (--compare: greedy), else greedy].
    #[arg(long)]
    do_sample: Option<bool>,
    /// Sampling temperature; 0 = greedy [default: generation_config.json's, else 1].
    #[arg(long)]
    temperature: Option<f64>,
    /// Nucleus sampling: keep the smallest set of tokens with this total probability
    /// [default: generation_config.json's, else off].
    #[arg(long)]
    top_p: Option<f64>,
    /// Sample among the k most likely tokens only; 0 = off [default: generation_config.json's,
    /// else 50, as HF generate].
    #[arg(long)]
    top_k: Option<usize>,
    /// Penalty (>1 discourages) for tokens already in the context [default:
    /// generation_config.json's, else 1].
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Conversations of --input that may fail (unreadable, too long for the context) and be
    /// skipped, each reported; one more fails the run with nothing written.
    #[arg(long, default_value_t = 0)]
    max_bad: usize,
    /// Seed of the sampler (sampling is deterministic for a given seed).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Recompute the whole sequence for every token instead of using the KV cache.
    #[arg(long)]
    no_kv_cache: bool,
    /// Weights and compute dtype. On the CPU, bf16 keeps the frozen base weights in bf16 (half
    /// the bytes read per token) and computes in f32, LoRA terms in f32.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    #[arg(long, default_value = "cpu", help = common::device::DEVICE_HELP)]
    device: String,
}

/// `--quantize`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum QuantizeArg {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4K,
}

fn main() {
    let args = Args::parse();
    let outcome = common::device::run_compute(|| run(args));
    common::cli::finish("infer", outcome.map(|_| 0));
}

fn run(a: Args) -> Result<()> {
    let flags = SamplingFlags {
        do_sample: a.do_sample,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        repetition_penalty: a.repetition_penalty,
        max_new_tokens: a.max_new_tokens,
        seed: a.seed,
        no_cache: a.no_kv_cache,
    };
    flags.validate()?;
    let device = common::device::parse(&a.device)?;
    let adapters = a
        .adapter
        .iter()
        .map(|x| match x.split_once('=') {
            Some((name, dir)) => (name.to_string(), PathBuf::from(dir)),
            None => {
                let dir = PathBuf::from(x);
                let name = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_else(|| x.clone());
                (name, dir)
            }
        })
        .collect::<Vec<_>>();
    if a.max_queue == 0 || a.max_batch == 0 || a.prefill_chunk == 0 {
        return Err(common::cli::usage(
            "--max-queue, --max-batch and --prefill-chunk must each be at least 1",
        ));
    }
    let mo = ModelOptions {
        dtype: a.dtype.dtype(),
        quantize: a.quantize.map(|q| match q {
            QuantizeArg::Q8_0 => WeightFormat::Q8_0,
            QuantizeArg::Q4K => WeightFormat::Q4K,
        }),
        device: device.clone(),
        engine: common::engine::EngineOptions {
            max_batch: a.max_batch,
            max_queue: a.max_queue,
            prefill_chunk: a.prefill_chunk,
            prefix_cache_bytes: a.prefix_cache_mib << 20,
        },
    };
    if let Some(addr) = &a.serve {
        let s = Session::open(
            &a.model,
            &adapters,
            None,
            a.template.as_deref(),
            &mo,
            Default::default(),
        )?;
        eprintln!(
            "infer: weights {} ({:.0} MiB)",
            weights_line(&mo),
            s.weight_bytes as f64 / (1 << 20) as f64
        );
        let base_name = a.served_model_name.clone().unwrap_or_else(|| {
            a.model
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| "model".into())
        });
        let names: Vec<String> = std::iter::once(base_name.clone())
            .chain(adapters.iter().map(|(n, _)| n.clone()))
            .collect();
        let api_key = match (&a.api_key_file, &a.api_key) {
            (Some(f), _) => {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("--api-key-file {}", f.display()))?;
                Some(text.lines().next().unwrap_or_default().trim().to_string())
            }
            (None, k) => k.as_ref().map(|k| k.trim().to_string()),
        };
        if api_key.as_ref().is_some_and(|k| k.is_empty()) {
            return Err(common::cli::usage("the API key is empty"));
        }
        let options = common::serve::ServeOptions {
            addr: addr.clone(),
            base_name,
            defaults: flags,
            api_key,
        };
        return common::serve::serve(s, options, |bound| {
            eprintln!(
                "infer: serving {} on http://{bound}/v1 (POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics)",
                names.join(", ")
            );
        });
    }
    if adapters.len() > 1 {
        bail!("one --adapter at a time outside --serve");
    }
    let adapter = adapters.first().map(|(_, d)| d.clone());
    let (params, decoding) = flags.resolve(&GenerationConfig::from_dir(&a.model)?, a.compare);
    eprintln!("infer: decoding: {decoding}");
    let named: Vec<(String, PathBuf)> = adapter
        .iter()
        .map(|d| ("adapter".to_string(), d.clone()))
        .collect();
    let s = Session::open(
        &a.model,
        &named,
        named.first().map(|(n, _)| n.as_str()),
        a.template.as_deref(),
        &mo,
        params,
    )?;
    if mo.quantize.is_some() || a.dtype != DtypeArg::F32 {
        eprintln!(
            "infer: weights {} ({:.0} MiB)",
            weights_line(&mo),
            s.weight_bytes as f64 / (1 << 20) as f64
        );
    }
    if let Some(p) = &a.prompt {
        return single(&s, a.system.as_deref(), p);
    }
    if a.chat {
        return chat(&s, a.system.clone());
    }
    let Some(input) = &a.input else {
        bail!("give one of --prompt TEXT, --chat or --input FILE");
    };
    batch(&s, &a, adapter.as_deref(), input, &decoding)
}

/// The weights' form, for the log.
fn weights_line(o: &ModelOptions) -> String {
    match o.quantize {
        Some(q) => format!("{q} (quantized base, f32 LoRA)"),
        None => format!("{:?}", o.dtype).to_lowercase(),
    }
}

/// `--prompt`: one reply, streamed on a terminal.
fn single(s: &Session, system: Option<&str>, prompt: &str) -> Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut h = Vec::new();
    if let Some(sys) = system {
        h.push(Message::new("system", sys));
    }
    h.push(Message::new("user", prompt));
    let mut written = Ok(());
    let (r, g) = s.reply(&h, |t| {
        if tty && written.is_ok() {
            written = emit(t);
        }
    })?;
    written?;
    if tty {
        say("")?;
    } else {
        say(&r.text)?;
    }
    eprintln!(
        "infer: {} prompt tokens, {} new tokens ({}), {:.1} tokens/s decode, prefill {:.2}s",
        g.prompt_tokens,
        g.ids.len(),
        if g.stopped() {
            "stopped at end of turn"
        } else {
            "hit --max-new-tokens"
        },
        g.decode_tokens_per_s(),
        g.first_token_secs
    );
    Ok(())
}

/// `--chat`: a multi-turn conversation on stdin.
fn chat(s: &Session, system: Option<String>) -> Result<()> {
    let tty = std::io::stdin().is_terminal();
    let mut chat = Chat::new(system);
    let stdin = std::io::stdin();
    if tty {
        eprintln!("infer: chat; {}", Chat::HELP);
    }
    loop {
        if tty {
            eprint!("> ");
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            if tty {
                // Ctrl-D: leave the shell prompt on a line of its own
                eprintln!();
            }
            return Ok(());
        }
        let user = match chat.handle(&line) {
            ChatInput::Nothing => continue,
            ChatInput::Quit => return Ok(()),
            ChatInput::Show(text) => {
                say(text)?;
                continue;
            }
            ChatInput::Say(user) => user,
        };
        let mut written = Ok(());
        let (r, g) = s.reply(&chat.messages_with(&user), |t| {
            if written.is_ok() {
                written = emit(t);
            }
        })?;
        written?;
        say("")?;
        eprintln!(
            "infer: {} tokens, {:.1} tokens/s",
            g.ids.len(),
            g.decode_tokens_per_s()
        );
        chat.record(&user, &r.text);
    }
}

/// Totals over the replies of a batch.
#[derive(Default)]
struct Tally {
    replies: usize,
    stopped: usize,
    tokens: usize,
}

impl Tally {
    fn add(&mut self, r: &Reply) {
        self.replies += 1;
        self.stopped += usize::from(r.stopped);
        self.tokens += r.tokens;
    }
}

/// Where --input results go: stdout, or a file written atomically.
enum Sink {
    Stdout,
    File(AtomicFile),
}

impl Sink {
    fn line(&mut self, s: &str) -> Result<()> {
        match self {
            Sink::Stdout => say(s),
            Sink::File(f) => Ok(writeln!(f, "{s}")?),
        }
    }
    fn commit(self) -> Result<()> {
        match self {
            Sink::Stdout => Ok(()),
            Sink::File(f) => f.commit(),
        }
    }
}

/// `--input` (and `--compare`): every conversation of a file, answered turn by turn, all of
/// them at once through the engine (with --compare each conversation twice, with the adapter
/// and with the base). A conversation that cannot be read or answered is named (id, file and
/// line); up to `--max-bad` of them are skipped and counted, one more fails the run with
/// nothing written.
fn batch(
    s: &Session,
    a: &Args,
    adapter: Option<&std::path::Path>,
    input: &std::path::Path,
    decoding: &str,
) -> Result<()> {
    let records = read_file(input, Purpose::Prompting)?;
    let mut sink = match &a.output {
        Some(p) => Sink::File(AtomicFile::create(p)?),
        None => Sink::Stdout,
    };
    let mut bad = 0usize;
    let mut fail = |what: String| -> Result<()> {
        bad += 1;
        if bad > a.max_bad {
            bail!("{what}; allowed --max-bad {}: nothing written", a.max_bad);
        }
        eprintln!("infer: skipped: {what}");
        Ok(())
    };
    let total = records.len();
    // failures are reported in file order, unreadable records and failed answers alike
    let mut unreadable = std::collections::BTreeMap::new();
    let mut convs = Vec::new();
    for (k, rec) in records.into_iter().enumerate() {
        match rec {
            Ok(c) => convs.push((k, c)),
            Err(b) => {
                unreadable.insert(k, b.to_string());
            }
        }
    }
    let system = a.system.as_deref();
    let runs: Vec<Option<String>> = if a.compare {
        vec![s.adapter.clone(), None]
    } else {
        vec![s.adapter.clone()]
    };
    let t0 = std::time::Instant::now();
    let refs: Vec<&common::data::formats::Conversation> = convs.iter().map(|(_, c)| c).collect();
    let mut done = 0usize;
    let results = s.answer_all(&refs, system, &runs, |_, _| {
        done += 1;
        if done.is_multiple_of(runs.len()) {
            eprintln!(
                "infer: {} conversation {}/{total}",
                if a.compare { "compared" } else { "answered" },
                done / runs.len()
            );
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    let mut all = Tally::default();
    let (mut base, mut tuned) = (Tally::default(), Tally::default());
    let mut items = Vec::new();
    let mut answered = convs.iter().zip(results).peekable();
    for k in 0..total {
        if let Some(what) = unreadable.remove(&k) {
            fail(what)?;
            continue;
        }
        let Some(((_, c), r)) = answered.next() else {
            break;
        };
        let mut r = r.into_iter();
        let first = r.next().expect("one run per adapter");
        let answered = match (first, r.next()) {
            (Ok(t), None) => Ok((t, None)),
            (Ok(t), Some(Ok(b))) => Ok((t, Some(b))),
            (Err(e), _) | (_, Some(Err(e))) => Err(e),
        };
        let (replies, base_replies) = match answered {
            Ok(x) => x,
            Err(e) => {
                fail(format!(
                    "conversation {}: {}",
                    c.name(),
                    common::cli::error_line(&e)
                ))?;
                continue;
            }
        };
        if let Some(b) = base_replies {
            let item = comparison(c, system, b, replies);
            for t in &item.turns {
                base.add(&t.base);
                tuned.add(&t.adapter);
                all.add(&t.base);
                all.add(&t.adapter);
            }
            sink.line(&serde_json::to_string(&item)?)?;
            items.push(item);
        } else {
            replies.iter().for_each(|r| all.add(r));
            let turns: Vec<serde_json::Value> = c
                .user_turns()
                .into_iter()
                .zip(&replies)
                .map(|(u, r)| serde_json::json!({"user": u, "assistant": r.text, "tokens": r.tokens, "stopped": r.stopped}))
                .collect();
            let id = c.id.clone().unwrap_or_else(|| c.at.index.to_string());
            sink.line(
                &serde_json::json!({"id": id, "system": c.system().or(system), "turns": turns})
                    .to_string(),
            )?;
        }
    }
    sink.commit()?;
    if a.compare {
        if let Some(p) = &a.output {
            let md = p.with_extension("md");
            let adapter = adapter.map(|x| x.display().to_string());
            common::atomic::write_file(
                &md,
                comparison_markdown(
                    &items,
                    &a.model.display().to_string(),
                    &adapter.unwrap_or_default(),
                    decoding,
                )
                .as_bytes(),
            )?;
            eprintln!(
                "infer: comparison written to {} and {}",
                p.display(),
                md.display()
            );
        }
        eprintln!(
            "infer: replies ending with the end-of-turn token: base {}/{}, fine-tuned {}/{}",
            base.stopped, base.replies, tuned.stopped, tuned.replies
        );
    }
    eprintln!(
        "infer: {} replies, {} ended with the end-of-turn token ({:.0}%), {} tokens in {:.1}s ({:.1} tokens/s, all conversations batched){}",
        all.replies,
        all.stopped,
        100.0 * all.stopped as f64 / all.replies.max(1) as f64,
        all.tokens,
        secs,
        all.tokens as f64 / secs.max(1e-9),
        if bad > 0 {
            format!("; {bad} conversation(s) skipped")
        } else {
            String::new()
        }
    );
    Ok(())
}
