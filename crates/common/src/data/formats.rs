//! Conversation inputs: JSON arrays or JSONL, in EmoLLM (`conversation` of
//! `{system?, input, output}`), ShareGPT (`conversations` of `{from, value}`), OpenAI
//! (`messages` of `{role, content}`) or Alpaca (`instruction`, `input`, `output`) form,
//! detected per record. Every problem is reported with file, line/record and field.

use crate::chat::Message;
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where a record came from: a JSONL line or a JSON-array element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based line for JSONL, 0-based element index for a JSON array.
    pub index: usize,
    pub is_line: bool,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_line {
            write!(f, "{}:{}", self.file.display(), self.index)
        } else {
            write!(f, "{}: record {}", self.file.display(), self.index)
        }
    }
}

/// A problem with one record: where, which field, what.
#[derive(Debug, Clone)]
pub struct BadRecord {
    pub at: Location,
    pub field: String,
    pub problem: String,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.at, self.problem)
        } else {
            write!(f, "{}: field '{}': {}", self.at, self.field, self.problem)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    EmoLlm,
    ShareGpt,
    OpenAi,
    Alpaca,
}

#[derive(Debug, Clone)]
pub struct Conversation {
    pub at: Location,
    pub messages: Vec<Message>,
}

/// Reads every record of `path` (JSON array or JSONL). Each record is a conversation or a
/// `BadRecord`. A file that cannot be read at all is an `Err`.
pub fn read_file(path: &Path) -> anyhow::Result<Vec<Result<Conversation, BadRecord>>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    let mut out = Vec::new();
    if trimmed.starts_with('[') {
        let arr: Vec<Value> = serde_json::from_str(trimmed).map_err(|e| {
            anyhow::anyhow!(
                "{}: invalid JSON array at line {} column {}: {e}",
                path.display(),
                e.line(),
                e.column()
            )
        })?;
        for (i, v) in arr.into_iter().enumerate() {
            let at = Location {
                file: path.to_path_buf(),
                index: i,
                is_line: false,
            };
            out.push(parse_record(&v, at));
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = Location {
                file: path.to_path_buf(),
                index: i + 1,
                is_line: true,
            };
            match serde_json::from_str::<Value>(line) {
                Ok(v) => out.push(parse_record(&v, at)),
                Err(e) => out.push(Err(BadRecord {
                    at,
                    field: String::new(),
                    problem: format!("invalid JSON: {e}"),
                })),
            }
        }
    }
    Ok(out)
}

pub fn detect(v: &Value) -> Option<Format> {
    let o = v.as_object()?;
    if o.contains_key("conversation") {
        Some(Format::EmoLlm)
    } else if o.contains_key("conversations") {
        Some(Format::ShareGpt)
    } else if o.contains_key("messages") {
        Some(Format::OpenAi)
    } else if o.contains_key("instruction") || o.contains_key("output") {
        Some(Format::Alpaca)
    } else {
        None
    }
}

/// Parses one record into a conversation (system?, then alternating user/assistant turns,
/// ending on an assistant turn).
pub fn parse_record(v: &Value, at: Location) -> Result<Conversation, BadRecord> {
    let bad = |field: &str, problem: &str| BadRecord {
        at: at.clone(),
        field: field.into(),
        problem: problem.into(),
    };
    let fmt = detect(v).ok_or_else(|| {
        bad("", "unrecognised record: expected 'conversation' (EmoLLM), 'conversations' (ShareGPT), 'messages' (OpenAI) or 'instruction'/'output' (Alpaca)")
    })?;
    let o = v.as_object().unwrap();
    let text =
        |val: Option<&Value>, field: &str, required: bool| -> Result<Option<String>, BadRecord> {
            match val {
                None | Some(Value::Null) if !required => Ok(None),
                None | Some(Value::Null) => Err(bad(field, "missing")),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(bad(
                    field,
                    &format!("must be a string, got {}", type_name(other)),
                )),
            }
        };
    let list = |key: &str| -> Result<&Vec<Value>, BadRecord> {
        match o.get(key) {
            Some(Value::Array(a)) if a.is_empty() => Err(bad(key, "empty conversation")),
            Some(Value::Array(a)) => Ok(a),
            Some(other) => Err(bad(
                key,
                &format!("must be a list, got {}", type_name(other)),
            )),
            None => Err(bad(key, "missing")),
        }
    };
    let mut msgs = Vec::new();
    match fmt {
        Format::EmoLlm => {
            for (i, turn) in list("conversation")?.iter().enumerate() {
                let f = |k: &str| format!("conversation[{i}].{k}");
                let t = turn
                    .as_object()
                    .ok_or_else(|| bad(&format!("conversation[{i}]"), "must be an object"))?;
                if let Some(s) = text(t.get("system"), &f("system"), false)? {
                    if i == 0 && !s.is_empty() {
                        msgs.push(Message::new("system", &s));
                    }
                }
                let input = text(t.get("input"), &f("input"), true)?.unwrap();
                msgs.push(Message::new("user", &input));
                match text(t.get("output"), &f("output"), false)? {
                    Some(out) => msgs.push(Message::new("assistant", &out)),
                    None => {
                        return Err(bad(
                            &f("output"),
                            "missing (the conversation would end on a user turn)",
                        ));
                    }
                }
            }
        }
        Format::ShareGpt | Format::OpenAi => {
            let (key, rk, ck) = if fmt == Format::ShareGpt {
                ("conversations", "from", "value")
            } else {
                ("messages", "role", "content")
            };
            for (i, turn) in list(key)?.iter().enumerate() {
                let f = |k: &str| format!("{key}[{i}].{k}");
                let t = turn
                    .as_object()
                    .ok_or_else(|| bad(&format!("{key}[{i}]"), "must be an object"))?;
                let role_raw = text(t.get(rk), &f(rk), true)?.unwrap();
                let role = match role_raw.as_str() {
                    "system" => "system",
                    "user" | "human" => "user",
                    "assistant" | "gpt" | "chatgpt" | "bing" | "bard" | "model" => "assistant",
                    other => {
                        return Err(bad(
                            &f(rk),
                            &format!("unknown role '{other}' (system, user/human, assistant/gpt)"),
                        ))
                    }
                };
                let content = text(t.get(ck), &f(ck), true)?.unwrap();
                if role == "system" && i != 0 {
                    return Err(bad(&f(rk), "a system message is only allowed first"));
                }
                msgs.push(Message::new(role, &content));
            }
        }
        Format::Alpaca => {
            let instr = text(o.get("instruction"), "instruction", true)?.unwrap();
            let input = text(o.get("input"), "input", false)?.unwrap_or_default();
            let output = text(o.get("output"), "output", true)?.unwrap();
            if let Some(s) = text(o.get("system"), "system", false)? {
                if !s.is_empty() {
                    msgs.push(Message::new("system", &s));
                }
            }
            let user = if input.trim().is_empty() {
                instr
            } else {
                format!("{instr}\n\n{input}")
            };
            msgs.push(Message::new("user", &user));
            msgs.push(Message::new("assistant", &output));
        }
    }
    validate_turns(&msgs).map_err(|(i, p)| bad(&turn_field(fmt, i), &p))?;
    Ok(Conversation { at, messages: msgs })
}

fn turn_field(fmt: Format, i: usize) -> String {
    match fmt {
        Format::EmoLlm => "conversation".into(),
        Format::ShareGpt => format!("conversations[{i}]"),
        Format::OpenAi => format!("messages[{i}]"),
        Format::Alpaca => "output".into(),
    }
}

/// Turns must alternate user/assistant after an optional system message and end on an
/// assistant turn. Returns the index of the offending message.
fn validate_turns(msgs: &[Message]) -> Result<(), (usize, String)> {
    let start = usize::from(msgs.first().is_some_and(|m| m.role == "system"));
    if msgs.len() <= start {
        return Err((0, "empty conversation (no user/assistant turns)".into()));
    }
    for (i, m) in msgs.iter().enumerate().skip(start) {
        let want = if (i - start) % 2 == 0 {
            "user"
        } else {
            "assistant"
        };
        if m.role != want {
            return Err((i, format!("expected a {want} turn, got {}", m.role)));
        }
    }
    if msgs.last().unwrap().role != "assistant" {
        return Err((
            msgs.len() - 1,
            "conversation ends on a user turn (nothing to learn)".into(),
        ));
    }
    Ok(())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at() -> Location {
        Location {
            file: "x.jsonl".into(),
            index: 3,
            is_line: true,
        }
    }

    #[test]
    fn all_four_formats() {
        let emo = json!({"conversation": [{"system": "S", "input": "u1", "output": "a1"}, {"input": "u2", "output": "a2"}]});
        let c = parse_record(&emo, at()).unwrap();
        let roles: Vec<&str> = c.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user", "assistant"]);
        let sg = json!({"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]});
        assert_eq!(
            parse_record(&sg, at()).unwrap().messages[1],
            Message::new("assistant", "a")
        );
        let oa = json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]});
        assert_eq!(parse_record(&oa, at()).unwrap().messages.len(), 3);
        let al = json!({"instruction": "do", "input": "this", "output": "done"});
        assert_eq!(
            parse_record(&al, at()).unwrap().messages[0].content,
            "do\n\nthis"
        );
    }

    #[test]
    fn bad_records_name_line_and_field() {
        let cases = [
            (
                json!({"conversation": [{"input": "u"}]}),
                "conversation[0].output",
                "user turn",
            ),
            (
                json!({"conversation": []}),
                "conversation",
                "empty conversation",
            ),
            (
                json!({"messages": [{"role": "user", "content": 5}]}),
                "messages[0].content",
                "must be a string",
            ),
            (
                json!({"messages": [{"role": "user", "content": "u"}]}),
                "messages[0]",
                "ends on a user turn",
            ),
            (
                json!({"messages": [{"role": "robot", "content": "u"}]}),
                "messages[0].role",
                "unknown role 'robot'",
            ),
            (
                json!({"conversations": [{"from": "human"}]}),
                "conversations[0].value",
                "missing",
            ),
            (json!({"foo": 1}), "", "unrecognised record"),
        ];
        for (v, field, problem) in cases {
            let e = parse_record(&v, at()).unwrap_err();
            let s = e.to_string();
            assert_eq!(e.field, field, "{s}");
            assert!(s.starts_with("x.jsonl:3: ") && s.contains(problem), "{s}");
        }
    }
}
