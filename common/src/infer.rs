//! Inference sessions: a model (base, base + adapter, or merged), its tokenizer, chat template
//! and stop ids; answering a conversation turn by turn; and the base-vs-fine-tuned comparison
//! written by `infer --compare`. Conversations come from `data::formats` (the reader dataprep
//! uses), read for prompting.

use crate::chat::{ChatTemplate, EndOfTurn, Message};
use crate::data::formats::Conversation;
use crate::engine::{Engine, EngineOptions, Event, Finished, Request, Tagged};
use crate::generate::{stop_ids, GenerationConfig, SamplingParams};
use crate::model::{Llama, WeightFormat};
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// A model ready to answer: its tokenizer, chat template and stop ids, the decoding to use,
/// and the generation engine (`engine::Engine`) holding the model and every adapter.
pub struct Session {
    pub engine: Engine,
    pub tok: Tokenizer,
    pub template: ChatTemplate,
    pub end_of_turn: EndOfTurn,
    pub stops: Vec<u32>,
    pub params: SamplingParams,
    /// The model's `generation_config.json` (decoding defaults).
    pub gen_config: GenerationConfig,
    /// The adapter `reply` uses (`None`: the base model).
    pub adapter: Option<String>,
    /// Bytes of the frozen weights as held.
    pub weight_bytes: usize,
}

/// How to load the model a session serves.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Compute dtype (on the CPU, bf16 keeps the frozen weights in bf16 and computes in f32).
    pub dtype: DType,
    /// Frozen weights quantized for inference (CPU).
    pub quantize: Option<WeightFormat>,
    pub device: Device,
    pub engine: EngineOptions,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            dtype: DType::F32,
            quantize: None,
            device: Device::Cpu,
            engine: EngineOptions::default(),
        }
    }
}

/// One generated reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub text: String,
    pub tokens: usize,
    /// Ended on an end-of-turn/eos token (rather than on --max-new-tokens).
    pub stopped: bool,
    pub tokens_per_s: f64,
}

impl Reply {
    fn of(f: &Finished) -> Reply {
        Reply {
            text: f.text.trim().to_string(),
            tokens: f.completion_tokens,
            stopped: f.stopped(),
            tokens_per_s: f.decode_tokens_per_s(),
        }
    }
}

impl Session {
    /// Loads a model directory with any number of named adapters (each checked against the
    /// base) and an optional template file instead of the model's own; `reply` uses the
    /// adapter named `use_adapter`.
    pub fn open(
        model_dir: &Path,
        adapters: &[(String, PathBuf)],
        use_adapter: Option<&str>,
        template: Option<&Path>,
        o: &ModelOptions,
        params: SamplingParams,
    ) -> Result<Self> {
        params.validate()?;
        let cpu_light = o.device.is_cpu() && o.dtype == DType::BF16;
        let load_dtype = if cpu_light || o.quantize.is_some() {
            DType::F32
        } else {
            o.dtype
        };
        let mut model = Llama::from_dir(model_dir, load_dtype, &o.device)?;
        let mut branches = Vec::new();
        for (name, dir) in adapters {
            let ad = crate::lora::Adapter::load(dir, load_dtype, &o.device)?;
            branches.push((name.clone(), model.adapter_branches(&ad, model_dir)?));
        }
        match (o.quantize, cpu_light) {
            (Some(q), _) => model.pack(q)?,
            (None, true) => model.pack(WeightFormat::Bf16)?,
            (None, false) => {}
        }
        let weight_bytes = model.weight_bytes();
        let tok = crate::tokenizer::load(model_dir)?;
        let template = ChatTemplate::resolve(model_dir, template)?;
        let end_of_turn = template.end_of_turn(&tok)?;
        let stops = stop_ids(model_dir, &end_of_turn);
        if stops.is_empty() {
            bail!(
                "{}: no eos/end-of-turn token id found (generation_config.json eos_token_id, or a single-token end of turn in the chat template)",
                model_dir.display()
            );
        }
        let engine = Engine::start(
            model,
            tok.clone(),
            stops.clone(),
            branches,
            o.engine.clone(),
        )?;
        Ok(Session {
            engine,
            tok,
            template,
            end_of_turn,
            stops,
            params,
            gen_config: GenerationConfig::from_dir(model_dir)?,
            adapter: use_adapter.map(str::to_string),
            weight_bytes,
        })
    }

    /// Prompt ids for a history ending on a user turn (same template call as dataprep's).
    pub fn prompt_ids(&self, history: &[Message]) -> Result<Vec<u32>> {
        prompt_ids(&self.template, &self.tok, history)
    }

    /// Generates the assistant reply to `history`; `on_text` receives the text as it grows.
    pub fn reply(
        &self,
        history: &[Message],
        on_text: impl FnMut(&str),
    ) -> Result<(Reply, Finished)> {
        let req = Request::new(
            self.prompt_ids(history)?,
            self.adapter.clone(),
            self.params.clone(),
        );
        let f = self.engine.generate(req, on_text)?;
        Ok((Reply::of(&f), f))
    }

    /// Answers every user turn of every conversation, each with each of `adapters` (`None`:
    /// the base model), feeding each answer back into its own history: all of them at once
    /// through the engine, each conversation's next turn joining the batch when its previous
    /// answer is done. `on_done(conversation, adapter)` is called as each pair finishes.
    /// Returns, per conversation and adapter, the replies or the error that ended them.
    pub fn answer_all(
        &self,
        convs: &[&Conversation],
        default_system: Option<&str>,
        adapters: &[Option<String>],
        mut on_done: impl FnMut(usize, usize),
    ) -> Vec<Vec<Result<Vec<Reply>>>> {
        struct Run {
            history: Vec<Message>,
            users: Vec<String>,
            replies: Vec<Reply>,
            result: Option<Result<Vec<Reply>>>,
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<((usize, usize), Event)>();
        let mut runs: Vec<Vec<Run>> = convs
            .iter()
            .map(|c| {
                let mut history = Vec::new();
                if let Some(s) = c.system().or(default_system) {
                    history.push(Message::new("system", s));
                }
                let users: Vec<String> = c.user_turns().into_iter().map(str::to_string).collect();
                adapters
                    .iter()
                    .map(|_| Run {
                        history: history.clone(),
                        users: users.clone(),
                        replies: Vec::new(),
                        result: None,
                    })
                    .collect()
            })
            .collect();
        // submits the next turn of a run; false when it has none left (its result is set)
        let next = |key: (usize, usize), run: &mut Run| -> bool {
            let turn = run.replies.len();
            if turn == run.users.len() {
                run.result = Some(Ok(std::mem::take(&mut run.replies)));
                return false;
            }
            run.history.push(Message::new("user", &run.users[turn]));
            let submitted = self.prompt_ids(&run.history).and_then(|p| {
                let req = Request::new(p, adapters[key.1].clone(), self.params.clone());
                Ok(self.engine.submit(req, Box::new(Tagged(key, tx.clone())))?)
            });
            if let Err(e) = submitted {
                run.result = Some(Err(e));
                return false;
            }
            true
        };
        // at most max_queue wait at once: runs start as places free
        let cap = self.engine.options().max_queue + self.engine.options().max_batch;
        let mut pending = (0..runs.len()).flat_map(|c| (0..adapters.len()).map(move |a| (c, a)));
        let mut in_flight = 0usize;
        loop {
            while in_flight < cap {
                let Some(k) = pending.next() else { break };
                if next(k, &mut runs[k.0][k.1]) {
                    in_flight += 1;
                } else {
                    on_done(k.0, k.1);
                }
            }
            if in_flight == 0 {
                break;
            }
            let Some((key, e)) = rx.blocking_recv() else {
                break;
            };
            let run = &mut runs[key.0][key.1];
            match e {
                Event::Delta { .. } => continue,
                Event::Done(f) => {
                    let r = Reply::of(&f);
                    run.history.push(Message::new("assistant", &r.text));
                    run.replies.push(r);
                    if !next(key, run) {
                        in_flight -= 1;
                        on_done(key.0, key.1);
                    }
                }
                Event::Error(msg) => {
                    in_flight -= 1;
                    run.result = Some(Err(anyhow!("{msg}")));
                    on_done(key.0, key.1);
                }
            }
        }
        runs.into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|x| {
                        x.result
                            .unwrap_or_else(|| Err(anyhow!("the generation engine stopped")))
                    })
                    .collect()
            })
            .collect()
    }
}

/// A conversation's turns answered by the base model and by base + adapter, side by side.
pub fn comparison(
    conv: &Conversation,
    default_system: Option<&str>,
    base: Vec<Reply>,
    tuned: Vec<Reply>,
) -> Comparison {
    Comparison {
        id: conv.id.clone().unwrap_or_else(|| conv.at.index.to_string()),
        system: conv.system().or(default_system).map(str::to_string),
        turns: conv
            .user_turns()
            .into_iter()
            .zip(base.into_iter().zip(tuned))
            .map(|(u, (b, t))| ComparedTurn {
                user: u.to_string(),
                base: b,
                adapter: t,
            })
            .collect(),
    }
}

/// The prompt ids of a history ending on a user turn: rendered with the chat template (with
/// the generation prompt) and tokenized once, as dataprep does.
pub fn prompt_ids(
    template: &ChatTemplate,
    tok: &Tokenizer,
    history: &[Message],
) -> Result<Vec<u32>> {
    let text = template.render(history, true)?;
    crate::tokenizer::encode(tok, &text)
}

/// An interactive chat: the system prompt, the turns so far, and the slash commands.
#[derive(Debug, Clone, Default)]
pub struct Chat {
    pub system: Option<String>,
    /// Alternating user and assistant messages.
    pub turns: Vec<Message>,
}

/// What a line typed into the chat asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatInput {
    /// A message for the model.
    Say(String),
    /// A command was handled; show this to the user.
    Show(String),
    /// End the chat.
    Quit,
    /// Nothing (an empty line).
    Nothing,
}

impl Chat {
    pub const HELP: &'static str = "commands: /history shows the conversation the model is given, /reset clears it, /system TEXT sets the system prompt (/system alone removes it), /help, /quit (or Ctrl-D); start a message with // to send one that begins with /";

    pub fn new(system: Option<String>) -> Self {
        Chat {
            system,
            turns: Vec::new(),
        }
    }

    /// Interprets one input line.
    pub fn handle(&mut self, line: &str) -> ChatInput {
        let line = line.trim_end_matches(['\n', '\r']);
        let t = line.trim();
        if t.is_empty() {
            return ChatInput::Nothing;
        }
        if let Some(literal) = t.strip_prefix("//") {
            return ChatInput::Say(format!("/{literal}"));
        }
        if !t.starts_with('/') {
            return ChatInput::Say(line.to_string());
        }
        let (cmd, arg) = t.split_once(char::is_whitespace).unwrap_or((t, ""));
        let arg = arg.trim();
        match cmd {
            "/quit" | "/exit" => ChatInput::Quit,
            "/help" => ChatInput::Show(Self::HELP.into()),
            "/reset" => {
                self.turns.clear();
                ChatInput::Show("history cleared".into())
            }
            "/history" => ChatInput::Show(self.history_text()),
            "/system" => {
                self.system = (!arg.is_empty()).then(|| arg.to_string());
                self.turns.clear();
                ChatInput::Show(format!(
                    "system prompt {}; history cleared",
                    if self.system.is_some() {
                        "set"
                    } else {
                        "removed"
                    }
                ))
            }
            other => ChatInput::Show(format!("unknown command {other}; {}", Self::HELP)),
        }
    }

    /// The messages the model is given to answer `user`: the system prompt, every earlier
    /// turn, and `user`.
    pub fn messages_with(&self, user: &str) -> Vec<Message> {
        let mut m: Vec<Message> = self
            .system
            .iter()
            .map(|s| Message::new("system", s))
            .collect();
        m.extend(self.turns.iter().cloned());
        m.push(Message::new("user", user));
        m
    }

    /// Records an exchange once the model has answered.
    pub fn record(&mut self, user: &str, reply: &str) {
        self.turns.push(Message::new("user", user));
        self.turns.push(Message::new("assistant", reply));
    }

    /// The conversation so far, one `role: content` block per message.
    pub fn history_text(&self) -> String {
        let m = self.messages_with("");
        let shown = &m[..m.len() - 1];
        if shown.is_empty() {
            return "(empty conversation)".into();
        }
        shown
            .iter()
            .map(|m| format!("{}: {}", m.role, m.content))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One conversation answered by the base model and by base + adapter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub id: String,
    pub system: Option<String>,
    pub turns: Vec<ComparedTurn>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComparedTurn {
    pub user: String,
    pub base: Reply,
    pub adapter: Reply,
}

/// The comparison as a readable Markdown table.
pub fn comparison_markdown(
    items: &[Comparison],
    base_name: &str,
    adapter_name: &str,
    decoding: &str,
) -> String {
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', "<br>");
    let mut md = format!(
        "# Base vs fine-tuned\n\nBase: `{base_name}` — adapter: `{adapter_name}` — decoding: {decoding}\n\n"
    );
    md += "| # | user | base | fine-tuned |\n|---|---|---|---|\n";
    for c in items {
        for (i, t) in c.turns.iter().enumerate() {
            let flag = |r: &Reply| {
                if r.stopped {
                    String::new()
                } else {
                    " *(hit max tokens)*".to_string()
                }
            };
            md += &format!(
                "| {}.{} | {} | {}{} | {}{} |\n",
                c.id,
                i + 1,
                cell(&t.user),
                cell(&t.base.text),
                flag(&t.base),
                cell(&t.adapter.text),
                flag(&t.adapter)
            );
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_keeps_earlier_turns_in_the_prompt_and_explains_commands() {
        let mut c = Chat::new(Some("Be kind.".into()));
        assert_eq!(
            c.handle("My name is Ada.\n"),
            ChatInput::Say("My name is Ada.".into())
        );
        c.record("My name is Ada.", "Hello Ada!");
        let m = c.messages_with("What is my name?");
        let roles: Vec<&str> = m.iter().map(|x| x.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(m[1].content, "My name is Ada.");
        assert_eq!(m[2].content, "Hello Ada!");
        match c.handle("/history") {
            ChatInput::Show(h) => assert_eq!(
                h,
                "system: Be kind.\nuser: My name is Ada.\nassistant: Hello Ada!"
            ),
            other => panic!("{other:?}"),
        }
        // unknown commands are explained, not sent to the model
        match c.handle("/hsitory") {
            ChatInput::Show(h) => assert!(
                h.contains("unknown command /hsitory") && h.contains("/history"),
                "{h}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.handle("//etc/passwd is a file"),
            ChatInput::Say("/etc/passwd is a file".into())
        );
        assert_eq!(c.handle("  "), ChatInput::Nothing);
        assert!(matches!(c.handle("/system"), ChatInput::Show(_)));
        assert!(c.system.is_none() && c.turns.is_empty());
        assert_eq!(c.handle("/quit"), ChatInput::Quit);
    }
}
