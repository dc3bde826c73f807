//! Conversation inputs, read the same way by dataprep and infer: JSON arrays or JSONL (UTF-8,
//! with or without a byte-order mark), in EmoLLM (`conversation` of `{system?, input,
//! output}`), ShareGPT (`conversations` of `{from, value}`), OpenAI (`messages` of `{role,
//! content}`) or Alpaca (`instruction`, `input`, `output`) form, detected per record. Every
//! problem is reported with file, line/record and field.
//!
//! What a record must hold depends on what it is read for (`Purpose`): training needs a whole
//! conversation (alternating turns ending on an assistant reply); prompting (`infer --input`)
//! needs user turns, ignores replies, and also takes `{"prompt": ...}` and `{"turns": [...]}`.

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
    /// `{"prompt": "..."}` (prompting only)
    Prompt,
    /// `{"turns": ["user 1", "user 2"]}` (prompting only)
    Turns,
}

/// What records are read for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// dataprep: optional system message, then alternating user/assistant turns, ending on an
    /// assistant reply.
    Training,
    /// infer: at least one user turn; assistant replies are kept but not required.
    Prompting,
}

#[derive(Debug, Clone)]
pub struct Conversation {
    pub at: Location,
    /// The record's `id` field (string or number), when it has one.
    pub id: Option<String>,
    pub messages: Vec<Message>,
}

impl Conversation {
    /// The system prompt, when the conversation starts with one.
    pub fn system(&self) -> Option<&str> {
        self.messages
            .first()
            .filter(|m| m.role == "system")
            .map(|m| m.content.as_str())
    }

    /// The user turns, in order.
    pub fn user_turns(&self) -> Vec<&str> {
        self.messages
            .iter()
            .filter(|m| m.role == "user")
            .map(|m| m.content.as_str())
            .collect()
    }

    /// How messages name the conversation: its id, else where it came from.
    pub fn name(&self) -> String {
        match &self.id {
            Some(id) => format!("'{id}' ({})", self.at),
            None => self.at.to_string(),
        }
    }
}

/// A JSON value read with duplicate object keys refused: serde_json's `Value` keeps the last
/// of them silently, and a record with `"output"` twice would lose a reply.
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

/// The start of serde's message for a duplicate key; the key follows, quoted.
const DUPLICATE_KEY: &str = "duplicate key '";

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(Strict(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(serde::de::Error::custom(format!("{DUPLICATE_KEY}{k}'")));
            }
            let Strict(v) = map.next_value()?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

/// Parses one record's JSON, duplicate keys refused: a bad record naming the key.
fn parse_json(text: &str, at: &Location) -> Result<Value, BadRecord> {
    serde_json::from_str::<Strict>(text).map(|s| s.0).map_err(|e| {
        let msg = e.to_string();
        match msg.strip_prefix(DUPLICATE_KEY).and_then(|r| r.split_once('\'')) {
            Some((key, _)) => BadRecord {
                at: at.clone(),
                field: key.to_string(),
                problem: format!(
                    "the key appears twice in one object ({msg}); JSON keeps only one of them, so the record is refused rather than read with data lost"
                ),
            },
            None => BadRecord {
                at: at.clone(),
                field: String::new(),
                problem: format!("invalid JSON: {e}"),
            },
        }
    })
}

/// One record of a file: a conversation, or what is wrong with it.
pub type Record = Result<Conversation, BadRecord>;

/// Reads every row of a Parquet file (as `datasets` and pyarrow write them: the record formats'
/// fields as columns, nested lists and structs included; snappy, LZ4 or no compression) as a
/// record: parquet's own row reader turns each row into JSON (a null is an absent field), which
/// then goes through the parser of a JSONL line, so a row and the JSON record it holds give the
/// same conversation; a bad row is named by its 0-based index. A file that is not Parquet, or
/// uses another codec, is an `Err` saying so.
pub fn read_parquet(path: &Path, purpose: Purpose) -> anyhow::Result<Vec<Record>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let what =
        |e: &dyn fmt::Display| anyhow::anyhow!("{}: cannot read as Parquet: {e}", path.display());
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let reader = SerializedFileReader::new(file).map_err(|e| what(&e))?;
    let mut out = Vec::new();
    for row in reader.get_row_iter(None).map_err(|e| what(&e))? {
        let row = row.map_err(|e| what(&e))?;
        let at = Location {
            file: path.to_path_buf(),
            index: out.len(),
            is_line: false,
        };
        let v = without_nulls(row.to_json_value());
        out.push(parse_record(&v, at, purpose));
    }
    if out.is_empty() {
        anyhow::bail!("{}: no rows (no records)", path.display());
    }
    Ok(out)
}

/// A Parquet row's JSON with null fields left out (a null column is an absent field).
fn without_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, x)| !x.is_null())
                .map(|(k, x)| (k, without_nulls(x)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

/// The input files named by `inputs`: each path as it is, or, when it holds a glob pattern
/// (`*`, `?`, `[`), the files it matches in sorted order; a pattern that matches nothing is an
/// error.
pub fn expand_inputs(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        let s = p.to_string_lossy();
        if !s.contains(['*', '?', '[']) || p.exists() {
            out.push(p.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = glob::glob(&s)
            .map_err(|e| anyhow::anyhow!("{s}: not a valid pattern: {e}"))?
            .filter_map(|m| m.ok())
            .filter(|m| m.is_file())
            .collect();
        if found.is_empty() {
            anyhow::bail!("{s}: no file matches this pattern");
        }
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

/// Reads every record of `path` (JSON array or JSONL). A file that cannot be read, is empty, or
/// is a malformed JSON array is an `Err`; a bad JSONL line (invalid UTF-8, invalid JSON, a
/// record that does not fit `purpose`) is a `BadRecord` naming its line.
pub fn read_file(path: &Path, purpose: Purpose) -> anyhow::Result<Vec<Record>> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
    {
        return read_parquet(path, purpose);
    }
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let first = bytes.iter().position(|b| !b.is_ascii_whitespace());
    let Some(first) = first else {
        anyhow::bail!("{}: empty input file (no records)", path.display());
    };
    let at = |index, is_line| Location {
        file: path.to_path_buf(),
        index,
        is_line,
    };
    let mut out = Vec::new();
    if bytes[first] == b'[' {
        let arr: Vec<&serde_json::value::RawValue> =
            serde_json::from_slice(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{}: invalid JSON array at line {} column {}: {e}",
                    path.display(),
                    e.line(),
                    e.column()
                )
            })?;
        if arr.is_empty() {
            anyhow::bail!("{}: empty JSON array (no records)", path.display());
        }
        for (i, raw) in arr.iter().enumerate() {
            let loc = at(i, false);
            out.push(parse_json(raw.get(), &loc).and_then(|v| parse_record(&v, loc, purpose)));
        }
    } else {
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            let loc = at(i + 1, true);
            let line = match std::str::from_utf8(line) {
                Ok(l) => l,
                Err(e) => {
                    out.push(Err(BadRecord {
                        at: loc,
                        field: String::new(),
                        problem: format!(
                            "invalid UTF-8 at byte {} of the line (the file must be UTF-8)",
                            e.valid_up_to() + 1
                        ),
                    }));
                    continue;
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            out.push(parse_json(line, &loc).and_then(|v| parse_record(&v, loc, purpose)));
        }
    }
    Ok(out)
}

pub fn detect(v: &Value, purpose: Purpose) -> Option<Format> {
    let o = v.as_object()?;
    let prompting = purpose == Purpose::Prompting;
    if o.contains_key("conversation") {
        Some(Format::EmoLlm)
    } else if o.contains_key("conversations") {
        Some(Format::ShareGpt)
    } else if o.contains_key("messages") {
        Some(Format::OpenAi)
    } else if o.contains_key("instruction") || o.contains_key("output") {
        Some(Format::Alpaca)
    } else if prompting && o.contains_key("prompt") {
        Some(Format::Prompt)
    } else if prompting && o.contains_key("turns") {
        Some(Format::Turns)
    } else {
        None
    }
}

/// Maps a ShareGPT/OpenAI role name to system, user or assistant.
pub fn normalize_role(role: &str) -> Option<&'static str> {
    Some(match role {
        "system" => "system",
        "user" | "human" => "user",
        "assistant" | "gpt" | "chatgpt" | "bing" | "bard" | "model" => "assistant",
        _ => return None,
    })
}

/// Parses one record into a conversation fit for `purpose`.
pub fn parse_record(v: &Value, at: Location, purpose: Purpose) -> Record {
    let bad = |field: &str, problem: &str| BadRecord {
        at: at.clone(),
        field: field.into(),
        problem: problem.into(),
    };
    let training = purpose == Purpose::Training;
    let fmt = detect(v, purpose).ok_or_else(|| {
        let extra = if training {
            ""
        } else {
            ", 'prompt' or 'turns'"
        };
        bad("", &format!("unrecognised record: expected 'conversation' (EmoLLM), 'conversations' (ShareGPT), 'messages' (OpenAI), 'instruction'/'output' (Alpaca){extra}"))
    })?;
    let o = v.as_object().expect("detect() saw an object");
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
                let input = text(t.get("input"), &f("input"), true)?.unwrap_or_default();
                msgs.push(Message::new("user", &input));
                match text(t.get("output"), &f("output"), false)? {
                    Some(out) => msgs.push(Message::new("assistant", &out)),
                    None if training => {
                        return Err(bad(
                            &f("output"),
                            "missing (the conversation would end on a user turn)",
                        ));
                    }
                    None => {}
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
                let role_raw = text(t.get(rk), &f(rk), true)?.unwrap_or_default();
                let role = normalize_role(&role_raw).ok_or_else(|| {
                    bad(
                        &f(rk),
                        &format!("unknown role '{role_raw}' (system, user/human, assistant/gpt)"),
                    )
                })?;
                let content = text(t.get(ck), &f(ck), true)?.unwrap_or_default();
                if role == "system" && i != 0 {
                    return Err(bad(&f(rk), "a system message is only allowed first"));
                }
                msgs.push(Message::new(role, &content));
            }
        }
        Format::Alpaca => {
            let instr = text(o.get("instruction"), "instruction", true)?.unwrap_or_default();
            let input = text(o.get("input"), "input", false)?.unwrap_or_default();
            let output = text(o.get("output"), "output", training)?;
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
            if let Some(out) = output {
                msgs.push(Message::new("assistant", &out));
            }
        }
        Format::Prompt => {
            let p = text(o.get("prompt"), "prompt", true)?.unwrap_or_default();
            if let Some(s) = text(o.get("system"), "system", false)?.filter(|s| !s.is_empty()) {
                msgs.push(Message::new("system", &s));
            }
            msgs.push(Message::new("user", &p));
        }
        Format::Turns => {
            if let Some(s) = text(o.get("system"), "system", false)?.filter(|s| !s.is_empty()) {
                msgs.push(Message::new("system", &s));
            }
            for (i, x) in list("turns")?.iter().enumerate() {
                let u = text(Some(x), &format!("turns[{i}]"), true)?.unwrap_or_default();
                msgs.push(Message::new("user", &u));
            }
        }
    }
    let checked = match purpose {
        Purpose::Training => validate_training(&msgs),
        Purpose::Prompting => validate_prompting(&msgs),
    };
    checked.map_err(|(i, p)| bad(&turn_field(fmt, i), &p))?;
    let id = match o.get("id") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Ok(Conversation {
        at,
        id,
        messages: msgs,
    })
}

fn turn_field(fmt: Format, i: usize) -> String {
    match fmt {
        Format::EmoLlm => "conversation".into(),
        Format::ShareGpt => format!("conversations[{i}]"),
        Format::OpenAi => format!("messages[{i}]"),
        Format::Alpaca => "output".into(),
        Format::Prompt => "prompt".into(),
        Format::Turns => format!("turns[{i}]"),
    }
}

/// Turns must alternate user/assistant after an optional system message and end on an
/// assistant turn. Returns the index of the offending message.
fn validate_training(msgs: &[Message]) -> Result<(), (usize, String)> {
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
    if msgs.last().is_some_and(|m| m.role != "assistant") {
        return Err((
            msgs.len() - 1,
            "conversation ends on a user turn (nothing to learn)".into(),
        ));
    }
    Ok(())
}

/// A conversation to answer needs at least one user turn.
fn validate_prompting(msgs: &[Message]) -> Result<(), (usize, String)> {
    if !msgs.iter().any(|m| m.role == "user") {
        return Err((0, "no user turns to answer".into()));
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

    fn train(v: &Value) -> Record {
        parse_record(v, at(), Purpose::Training)
    }

    #[test]
    fn all_four_formats() {
        let emo = json!({"conversation": [{"system": "S", "input": "u1", "output": "a1"}, {"input": "u2", "output": "a2"}]});
        let c = train(&emo).unwrap();
        let roles: Vec<&str> = c.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user", "assistant"]);
        let sg = json!({"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]});
        assert_eq!(
            train(&sg).unwrap().messages[1],
            Message::new("assistant", "a")
        );
        let oa = json!({"id": 7, "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]});
        let c = train(&oa).unwrap();
        assert_eq!((c.messages.len(), c.id.as_deref()), (3, Some("7")));
        let al = json!({"instruction": "do", "input": "this", "output": "done"});
        assert_eq!(train(&al).unwrap().messages[0].content, "do\n\nthis");
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
            (json!({"prompt": "hi"}), "", "unrecognised record"),
        ];
        for (v, field, problem) in cases {
            let e = train(&v).unwrap_err();
            let s = e.to_string();
            assert_eq!(e.field, field, "{s}");
            assert!(s.starts_with("x.jsonl:3: ") && s.contains(problem), "{s}");
        }
    }

    #[test]
    fn prompting_takes_user_turns_with_the_same_roles() {
        let p = |v: Value| parse_record(&v, at(), Purpose::Prompting);
        let c = p(json!({"prompt": "hi"})).unwrap();
        assert_eq!(c.user_turns(), ["hi"]);
        let c = p(json!({"turns": ["a", "b"], "id": "x", "system": "S"})).unwrap();
        assert_eq!(
            (c.user_turns(), c.system(), c.id.as_deref()),
            (vec!["a", "b"], Some("S"), Some("x"))
        );
        // a conversation ending on a user turn, with an empty earlier reply
        let c = p(json!({"conversation": [{"system": "S", "input": "u1", "output": ""}, {"input": "u2"}]})).unwrap();
        assert_eq!((c.user_turns(), c.system()), (vec!["u1", "u2"], Some("S")));
        let c = p(json!({"conversations": [{"from": "human", "value": "m1"}, {"from": "gpt", "value": "r"}, {"from": "human", "value": "m2"}]})).unwrap();
        assert_eq!(c.user_turns(), ["m1", "m2"]);
        // the same role and type checks as training
        let e = p(json!({"messages": [{"role": "robot", "content": "u"}]})).unwrap_err();
        assert!(e.to_string().contains("unknown role 'robot'"), "{e}");
        let e = p(json!({"turns": [1]})).unwrap_err();
        assert_eq!(e.field, "turns[0]");
        let e = p(json!({"messages": [{"role": "system", "content": "s"}]})).unwrap_err();
        assert!(e.to_string().contains("no user turns"), "{e}");
    }

    #[test]
    fn encodings_and_empty_files() {
        let d = tempfile::tempdir().unwrap();
        let rec = r#"{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}"#;
        // a byte-order mark is accepted in JSONL and in JSON
        let p = d.path().join("bom.jsonl");
        std::fs::write(&p, format!("\u{feff}{rec}\n{rec}\n")).unwrap();
        let r = read_file(&p, Purpose::Training).unwrap();
        assert!(r.iter().all(|x| x.is_ok()) && r.len() == 2);
        let p = d.path().join("bom.json");
        std::fs::write(&p, format!("\u{feff}[{rec}]")).unwrap();
        assert!(read_file(&p, Purpose::Training).unwrap()[0].is_ok());
        // invalid UTF-8 is a bad record on its line, the other lines still read
        let p = d.path().join("latin1.jsonl");
        let mut bytes = format!("{rec}\n").into_bytes();
        bytes.extend(b"{\"prompt\": \"caf\xe9\"}\n");
        bytes.extend(format!("{rec}\n").into_bytes());
        std::fs::write(&p, bytes).unwrap();
        let r = read_file(&p, Purpose::Training).unwrap();
        assert_eq!(r.len(), 3);
        let e = r[1].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("latin1.jsonl:2") && e.contains("invalid UTF-8"),
            "{e}"
        );
        assert!(r[2].is_ok());
        // empty and whitespace-only files say so
        for (name, text) in [
            ("empty.jsonl", ""),
            ("blank.jsonl", " \n\n \t\n"),
            ("empty.json", "[]"),
        ] {
            let p = d.path().join(name);
            std::fs::write(&p, text).unwrap();
            let e = read_file(&p, Purpose::Training).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains("empty"), "{e}");
        }
    }
}
