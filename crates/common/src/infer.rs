//! Inference sessions: a model (base, base + adapter, or merged), its tokenizer, chat template
//! and stop ids; answering a conversation turn by turn; the inputs `infer --input` reads; and
//! the side-by-side comparison written by `infer --compare`.

use crate::chat::{ChatTemplate, Message};
use crate::generate::{generate, stop_ids, Generation, SamplingParams};
use crate::model::Llama;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokenizers::Tokenizer;

pub struct Session {
    pub model: Llama,
    pub tok: Tokenizer,
    pub template: ChatTemplate,
    pub stops: Vec<u32>,
    pub params: SamplingParams,
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
    /// Loads a model directory, with an optional adapter attached (checked against the base).
    pub fn open(
        model_dir: &Path,
        adapter: Option<&Path>,
        dtype: DType,
        device: &Device,
        params: SamplingParams,
    ) -> Result<Self> {
        params.validate()?;
        let mut model = Llama::from_dir(model_dir, dtype, device)?;
        if let Some(a) = adapter {
            let ad = crate::lora::Adapter::load(a, dtype, device)?;
            model.attach_adapter(&ad).with_context(|| {
                format!(
                    "adapter {} does not fit the model in {}",
                    a.display(),
                    model_dir.display()
                )
            })?;
        }
        let tok = crate::tokenizer::load(model_dir)?;
        let template = ChatTemplate::from_model_dir(model_dir)?;
        let stops = stop_ids(model_dir, &tok);
        if stops.is_empty() {
            bail!(
                "{}: no eos/end-of-turn token id found (generation_config.json eos_token_id)",
                model_dir.display()
            );
        }
        Ok(Session {
            model,
            tok,
            template,
            stops,
            params,
        })
    }

    /// Prompt ids for a history ending on a user turn (same template call as dataprep's).
    pub fn prompt_ids(&self, history: &[Message]) -> Result<Vec<u32>> {
        let text = self.template.render(history, true)?;
        crate::tokenizer::encode(&self.tok, &text)
    }

    /// Generates the assistant reply to `history`; `on_text` receives the text as it grows.
    pub fn reply(
        &self,
        history: &[Message],
        mut on_text: impl FnMut(&str),
    ) -> Result<(Reply, Generation)> {
        let prompt = self.prompt_ids(history)?;
        let mut printed = 0usize;
        let mut ids: Vec<u32> = Vec::new();
        let tok = &self.tok;
        let g = generate(&self.model, &prompt, &self.params, &self.stops, |id| {
            if self.stops.contains(&id) {
                return Ok(());
            }
            ids.push(id);
            let text = tok.decode(&ids, true).map_err(|e| anyhow!("decode: {e}"))?;
            // print only complete characters (a token may end inside a UTF-8 sequence)
            if text.len() > printed && !text.ends_with('\u{fffd}') {
                on_text(&text[printed..]);
                printed = text.len();
            }
            Ok(())
        })?;
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

    /// Answers every user turn in order, feeding the model's own earlier answers back.
    pub fn answer_conversation(
        &self,
        conv: &UserTurns,
        mut on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<Reply>> {
        let mut history = Vec::new();
        if let Some(s) = &conv.system {
            history.push(Message::new("system", s));
        }
        let mut replies = Vec::new();
        for (i, u) in conv.turns.iter().enumerate() {
            history.push(Message::new("user", u));
            let (r, _) = self.reply(&history, |t| on_text(i, t))?;
            history.push(Message::new("assistant", &r.text));
            replies.push(r);
        }
        Ok(replies)
    }
}

/// A conversation to answer: optional system prompt and the user turns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserTurns {
    pub id: String,
    pub system: Option<String>,
    pub turns: Vec<String>,
}

/// Reads `--input`: JSONL (or a JSON array) of records in any dataprep format (assistant
/// replies are ignored), or `{"prompt": ...}` / `{"turns": [...]}`.
pub fn read_user_turns(path: &Path, default_system: Option<&str>) -> Result<Vec<UserTurns>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let t = text.trim_start();
    let records: Vec<(String, serde_json::Value)> = if t.starts_with('[') {
        let v: Vec<serde_json::Value> = serde_json::from_str(t)
            .with_context(|| format!("{}: invalid JSON array", path.display()))?;
        v.into_iter()
            .enumerate()
            .map(|(i, v)| (format!("{}: record {i}", path.display()), v))
            .collect()
    } else {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{}:{}", path.display(), i + 1);
            let v = serde_json::from_str(line).map_err(|e| anyhow!("{at}: invalid JSON: {e}"))?;
            out.push((at, v));
        }
        out
    };
    let mut convs = Vec::new();
    for (n, (at, v)) in records.into_iter().enumerate() {
        let str_field = |v: &serde_json::Value, k: &str| -> Result<Option<String>> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => bail!("{at}: field '{k}' must be a string"),
            }
        };
        let mut system = None;
        let mut turns = Vec::new();
        if let Some(p) = str_field(&v, "prompt")? {
            turns.push(p);
        } else if let Some(list) = v.get("turns").and_then(|x| x.as_array()) {
            for (i, x) in list.iter().enumerate() {
                turns.push(
                    x.as_str()
                        .ok_or_else(|| anyhow!("{at}: field 'turns[{i}]' must be a string"))?
                        .to_string(),
                );
            }
        } else if let Some(list) = v.get("conversation").and_then(|x| x.as_array()) {
            for (i, x) in list.iter().enumerate() {
                if i == 0 {
                    system = str_field(x, "system")?.filter(|s| !s.is_empty());
                }
                turns.push(
                    str_field(x, "input")?
                        .ok_or_else(|| anyhow!("{at}: field 'conversation[{i}].input' missing"))?,
                );
            }
        } else if let Some((key, rk, ck)) = [
            ("messages", "role", "content"),
            ("conversations", "from", "value"),
        ]
        .into_iter()
        .find(|(k, _, _)| v.get(*k).is_some())
        {
            let list = v[key]
                .as_array()
                .ok_or_else(|| anyhow!("{at}: field '{key}' must be a list"))?;
            for (i, x) in list.iter().enumerate() {
                let role = str_field(x, rk)?.unwrap_or_default();
                let content = str_field(x, ck)?
                    .ok_or_else(|| anyhow!("{at}: field '{key}[{i}].{ck}' missing"))?;
                match role.as_str() {
                    "system" => system = Some(content),
                    "user" | "human" => turns.push(content),
                    "assistant" | "gpt" => {}
                    other => bail!("{at}: field '{key}[{i}].{rk}': unknown role '{other}'"),
                }
            }
        } else if let Some(ins) = str_field(&v, "instruction")? {
            let input = str_field(&v, "input")?.unwrap_or_default();
            turns.push(if input.trim().is_empty() {
                ins
            } else {
                format!("{ins}\n\n{input}")
            });
        } else {
            bail!("{at}: expected 'prompt', 'turns', 'conversation', 'messages', 'conversations' or 'instruction'");
        }
        if turns.is_empty() {
            bail!("{at}: no user turns");
        }
        let id = v
            .get("id")
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| format!("{n}"));
        convs.push(UserTurns {
            id,
            system: system.or(default_system.map(str::to_string)),
            turns,
        });
    }
    Ok(convs)
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
pub fn comparison_markdown(items: &[Comparison], base_name: &str, adapter_name: &str) -> String {
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', "<br>");
    let mut md =
        format!("# Base vs fine-tuned\n\nBase: `{base_name}` — adapter: `{adapter_name}`\n\n");
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
    fn reads_every_input_shape() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("in.jsonl");
        std::fs::write(
            &p,
            concat!(
                "{\"prompt\": \"hi\"}\n",
                "{\"turns\": [\"a\", \"b\"], \"id\": \"x\"}\n",
                "{\"conversation\": [{\"system\": \"S\", \"input\": \"u1\", \"output\": \"\"}, {\"input\": \"u2\"}]}\n",
                "{\"messages\": [{\"role\": \"user\", \"content\": \"m1\"}, {\"role\": \"assistant\", \"content\": \"r\"}, {\"role\": \"user\", \"content\": \"m2\"}]}\n",
            ),
        )
        .unwrap();
        let c = read_user_turns(&p, Some("D")).unwrap();
        assert_eq!(c.len(), 4);
        assert_eq!(c[0].turns, vec!["hi"]);
        assert_eq!(c[0].system.as_deref(), Some("D"));
        assert_eq!(c[1].id, "x");
        assert_eq!(c[2].system.as_deref(), Some("S"));
        assert_eq!(c[2].turns, vec!["u1", "u2"]);
        assert_eq!(c[3].turns, vec!["m1", "m2"]);
        std::fs::write(&p, "{\"turns\": [1]}\n").unwrap();
        let e = read_user_turns(&p, None).unwrap_err().to_string();
        assert!(e.contains("in.jsonl:1") && e.contains("turns[0]"), "{e}");
    }
}
