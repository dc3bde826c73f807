//! Inference sessions: a model (base, base + adapter, or merged), its tokenizer, chat template
//! and stop ids; answering a conversation turn by turn; and the base-vs-fine-tuned comparison
//! written by `infer --compare`. Conversations come from `data::formats` (the reader dataprep
//! uses), read for prompting.

use crate::chat::{ChatTemplate, EndOfTurn, Message};
use crate::data::formats::Conversation;
use crate::generate::{generate_until, stop_ids, Generation, GenerationConfig, SamplingParams};
use crate::model::Llama;
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokenizers::Tokenizer;

pub struct Session {
    pub model: Llama,
    pub tok: Tokenizer,
    pub template: ChatTemplate,
    pub end_of_turn: EndOfTurn,
    pub stops: Vec<u32>,
    pub params: SamplingParams,
    /// The model's `generation_config.json` (decoding defaults).
    pub gen_config: GenerationConfig,
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

impl Session {
    /// Loads a model directory, with an optional adapter attached (checked against the base)
    /// and an optional template file instead of the model's own.
    pub fn open(
        model_dir: &Path,
        adapter: Option<&Path>,
        template: Option<&Path>,
        dtype: DType,
        device: &Device,
        params: SamplingParams,
    ) -> Result<Self> {
        params.validate()?;
        let mut model = Llama::from_dir(model_dir, dtype, device)?;
        if let Some(a) = adapter {
            let ad = crate::lora::Adapter::load(a, dtype, device)?;
            model.attach_adapter(&ad, model_dir)?;
        }
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
        Ok(Session {
            model,
            tok,
            template,
            end_of_turn,
            stops,
            params,
            gen_config: GenerationConfig::from_dir(model_dir)?,
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
    ) -> Result<(Reply, Generation)> {
        self.reply_until(history, on_text, || false)
    }

    /// `reply`, ending early when `stop_now` says so (checked between prefill chunks and after
    /// every token).
    pub fn reply_until(
        &self,
        history: &[Message],
        on_text: impl FnMut(&str),
        stop_now: impl Fn() -> bool,
    ) -> Result<(Reply, Generation)> {
        self.reply_to_ids(&self.prompt_ids(history)?, on_text, stop_now)
    }

    /// `reply_until` for a prompt already rendered and tokenized (`prompt_ids`).
    pub fn reply_to_ids(
        &self,
        prompt: &[u32],
        mut on_text: impl FnMut(&str),
        stop_now: impl Fn() -> bool,
    ) -> Result<(Reply, Generation)> {
        let mut printed = 0usize;
        let mut ids: Vec<u32> = Vec::new();
        let tok = &self.tok;
        let g = generate_until(
            &self.model,
            prompt,
            &self.params,
            &self.stops,
            &stop_now,
            |id| {
                if self.stops.contains(&id) {
                    return Ok(true);
                }
                ids.push(id);
                let text = tok.decode(&ids, true).map_err(|e| anyhow!("decode: {e}"))?;
                // print only complete characters (a token may end inside a UTF-8 sequence)
                if text.len() > printed && !text.ends_with('\u{fffd}') {
                    on_text(&text[printed..]);
                    printed = text.len();
                }
                Ok(!stop_now())
            },
        )?;
        let content: Vec<u32> = g
            .ids
            .iter()
            .copied()
            .filter(|i| !self.stops.contains(i))
            .collect();
        let text = tok
            .decode(&content, true)
            .map_err(|e| anyhow!("decode: {e}"))?;
        if text.len() > printed {
            on_text(&text[printed..]);
        }
        let reply = Reply {
            text: text.trim().to_string(),
            tokens: g.ids.len(),
            stopped: g.stopped,
            tokens_per_s: g.decode_tokens_per_s(),
        };
        Ok((reply, g))
    }

    /// Answers every user turn of `conv` in order, feeding the model's own earlier answers back
    /// (`default_system` when the conversation has no system prompt).
    pub fn answer_conversation(
        &self,
        conv: &Conversation,
        default_system: Option<&str>,
        mut on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<Reply>> {
        let mut history = Vec::new();
        if let Some(s) = conv.system().or(default_system) {
            history.push(Message::new("system", s));
        }
        let mut replies = Vec::new();
        for (i, u) in conv.user_turns().into_iter().enumerate() {
            history.push(Message::new("user", u));
            let (r, _) = self.reply(&history, |t| on_text(i, t))?;
            history.push(Message::new("assistant", &r.text));
            replies.push(r);
        }
        Ok(replies)
    }

    /// Answers `conv` with the adapter attached and then with the base model alone (the
    /// adapter is detached for the second pass and put back whatever happens).
    pub fn compare(
        &mut self,
        conv: &Conversation,
        default_system: Option<&str>,
    ) -> Result<Comparison> {
        let tuned = self.answer_conversation(conv, default_system, |_, _| {})?;
        let loras = self.model.take_loras();
        let base = self.answer_conversation(conv, default_system, |_, _| {});
        self.model.put_loras(loras);
        let base = base?;
        Ok(Comparison {
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
        })
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
