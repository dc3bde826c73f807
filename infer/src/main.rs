//! infer: chat and batch generation with a base model, base + adapter, or a merged model.

use anyhow::{bail, Context, Result};
use clap::Parser;
use common::chat::Message;
use common::data::formats::{read_file, Purpose};
use common::device::DtypeArg;
use common::generate::SamplingParams;
use common::infer::{comparison_markdown, Session};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

/// Generate with a chat model: one prompt (--prompt), an interactive multi-turn chat (--chat,
/// with /reset, /system TEXT and /quit), or a file of conversations (--input) answered turn by
/// turn with the model's own earlier answers in the history. --compare answers the same
/// conversations with the base model and with base + adapter, side by side (JSONL + Markdown).
///
/// Uses the model's chat template (the same code path as dataprep), stops at eos and every
/// end-of-turn id, greedy when --temperature is 0. Output streams to a terminal; a tokens/s line
/// goes to stderr.
#[derive(Parser)]
#[command(name = "infer", version)]
struct Args {
    /// Model directory (base or merged).
    #[arg(long)]
    model: PathBuf,
    /// LoRA adapter directory to apply on top of --model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A single user message.
    #[arg(long, conflicts_with_all = ["chat", "input"])]
    prompt: Option<String>,
    /// Interactive multi-turn chat on stdin.
    #[arg(long, conflicts_with = "input")]
    chat: bool,
    /// JSONL/JSON of conversations (dataprep formats, {"prompt"} or {"turns": [...]}).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Where --input results go (JSONL; default stdout). With --compare a .md is written beside it.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Answer --input with the base model and with base + --adapter, side by side.
    #[arg(long, requires_all = ["adapter", "input"])]
    compare: bool,
    /// System prompt (when the conversation has none).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens generated per reply.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens with this total probability.
    #[arg(long)]
    top_p: Option<f64>,
    /// Sample among the k most likely tokens only.
    #[arg(long)]
    top_k: Option<usize>,
    /// Penalty (>1 discourages) for tokens already in the context.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed of the sampler (sampling is deterministic for a given seed).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Recompute the whole sequence for every token instead of using the KV cache.
    #[arg(long)]
    no_kv_cache: bool,
    /// Compute dtype.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = common::device::run_compute(|| run(args)) {
        eprintln!("infer: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<()> {
    let params = SamplingParams {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        no_cache: a.no_kv_cache,
    };
    params.validate()?;
    let device = common::device::parse(&a.device)?;
    let mut s = Session::open(
        &a.model,
        a.adapter.as_deref(),
        None,
        a.dtype.dtype(),
        &device,
        params,
    )?;
    let tty = std::io::stdout().is_terminal();
    if let Some(p) = &a.prompt {
        let mut h = Vec::new();
        if let Some(sys) = &a.system {
            h.push(Message::new("system", sys));
        }
        h.push(Message::new("user", p));
        let mut out = std::io::stdout();
        let (r, g) = s.reply(&h, |t| {
            if tty {
                let _ = out.write_all(t.as_bytes());
                let _ = out.flush();
            }
        })?;
        if tty {
            println!()
        } else {
            println!("{}", r.text)
        }
        eprintln!(
            "infer: {} prompt tokens, {} new tokens ({}), {:.1} tokens/s decode, prefill {:.2}s",
            g.prompt_tokens,
            g.ids.len(),
            if g.stopped {
                "stopped at end of turn"
            } else {
                "hit --max-new-tokens"
            },
            g.decode_tokens_per_s(),
            g.prefill_secs
        );
        return Ok(());
    }
    if a.chat {
        return chat(&s, a.system.clone());
    }
    let Some(input) = &a.input else {
        bail!("give one of --prompt TEXT, --chat or --input FILE");
    };
    let convs = read_file(input, Purpose::Prompting)?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|b| anyhow::anyhow!("{b}"))?;
    let mut sink: Box<dyn Write> = match &a.output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("{}: cannot create", p.display()))?,
        )),
        None => Box::new(std::io::stdout()),
    };
    let (mut turns, mut stopped, mut toks, mut secs) = (0usize, 0usize, 0usize, 0f64);
    let mut tally = |r: &common::infer::Reply| {
        turns += 1;
        stopped += r.stopped as usize;
        toks += r.tokens;
        if r.tokens_per_s > 0.0 {
            secs += r.tokens as f64 / r.tokens_per_s;
        }
    };
    let (mut base_stopped, mut tuned_stopped, mut compared) = (0usize, 0usize, 0usize);
    if a.compare {
        let mut items = Vec::new();
        for (k, c) in convs.iter().enumerate() {
            let item = s.compare(c, a.system.as_deref())?;
            for t in &item.turns {
                tally(&t.base);
                tally(&t.adapter);
            }
            base_stopped += item.turns.iter().filter(|t| t.base.stopped).count();
            tuned_stopped += item.turns.iter().filter(|t| t.adapter.stopped).count();
            compared += item.turns.len();
            writeln!(sink, "{}", serde_json::to_string(&item)?)?;
            eprintln!("infer: compared conversation {}/{}", k + 1, convs.len());
            items.push(item);
        }
        sink.flush()?;
        if let Some(p) = &a.output {
            let md = p.with_extension("md");
            let name = |p: &Option<PathBuf>| {
                p.as_ref()
                    .map(|x| x.display().to_string())
                    .unwrap_or_default()
            };
            std::fs::write(
                &md,
                comparison_markdown(&items, &a.model.display().to_string(), &name(&a.adapter)),
            )
            .with_context(|| format!("{}: cannot write", md.display()))?;
            eprintln!(
                "infer: comparison written to {} and {}",
                p.display(),
                md.display()
            );
        }
    } else {
        for c in &convs {
            let replies = s.answer_conversation(c, a.system.as_deref(), |_, _| {})?;
            for r in &replies {
                tally(r);
            }
            let turns_json: Vec<serde_json::Value> = c
                .user_turns()
                .into_iter()
                .zip(&replies)
                .map(|(u, r)| serde_json::json!({"user": u, "assistant": r.text, "tokens": r.tokens, "stopped": r.stopped}))
                .collect();
            writeln!(
                sink,
                "{}",
                serde_json::json!({"id": c.id.clone().unwrap_or_else(|| c.at.index.to_string()), "system": c.system().or(a.system.as_deref()), "turns": turns_json})
            )?;
        }
        sink.flush()?;
    }
    if a.compare {
        eprintln!(
            "infer: replies ending with the end-of-turn token: base {base_stopped}/{compared}, fine-tuned {tuned_stopped}/{compared}"
        );
    }
    eprintln!(
        "infer: {turns} replies, {stopped} ended with the end-of-turn token ({:.0}%), {:.1} tokens/s decode",
        100.0 * stopped as f64 / turns.max(1) as f64,
        toks as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn chat(s: &Session, mut system: Option<String>) -> Result<()> {
    let tty = std::io::stdin().is_terminal();
    let mut history: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    if tty {
        eprintln!("infer: chat (/reset clears the history, /system TEXT sets the system prompt, /quit exits)");
    }
    loop {
        if tty {
            eprint!("> ");
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                history.clear();
                eprintln!("infer: history cleared");
                continue;
            }
            l if l.starts_with("/system") => {
                let text = l.trim_start_matches("/system").trim();
                system = (!text.is_empty()).then(|| text.to_string());
                history.clear();
                eprintln!(
                    "infer: system prompt {}; history cleared",
                    if system.is_some() { "set" } else { "removed" }
                );
                continue;
            }
            _ => {}
        }
        let mut msgs = Vec::new();
        if let Some(sys) = &system {
            msgs.push(Message::new("system", sys));
        }
        msgs.extend(history.iter().cloned());
        msgs.push(Message::new("user", line));
        let (r, g) = s.reply(&msgs, |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        })?;
        println!();
        eprintln!(
            "infer: {} tokens, {:.1} tokens/s",
            g.ids.len(),
            g.decode_tokens_per_s()
        );
        history.push(Message::new("user", line));
        history.push(Message::new("assistant", &r.text));
    }
    Ok(())
}
