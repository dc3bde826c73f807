//! Chat templates: the model's own Jinja template (tokenizer_config.json `chat_template` or
//! chat_template.jinja), rendered with minijinja configured like transformers' sandbox
//! (trim_blocks, lstrip_blocks, Python string methods, `raise_exception`). dataprep and infer
//! both render through here, so training sees exactly the text inference will feed.

use anyhow::{anyhow, bail, Context, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The end of an assistant turn as the template writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndOfTurn {
    /// The marker text (see `ChatTemplate::turn_end_text`).
    pub text: String,
    /// Its token ids.
    pub ids: Vec<u32>,
}

impl EndOfTurn {
    /// The marker's token id when it is a single token (what generation can stop on).
    pub fn single_id(&self) -> Option<u32> {
        match self.ids.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// Why the marker is not a usable end-of-turn token, if it is not.
    pub fn problem(&self) -> Option<String> {
        match self.ids.len() {
            1 => None,
            0 => Some("the chat template writes nothing after an assistant reply: the model cannot learn where its turn ends".into()),
            n => Some(format!(
                "the chat template ends assistant replies with {:?}, which is {n} tokens in this vocabulary, not one: generation cannot stop on it",
                self.text
            )),
        }
    }
}

#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

fn token_string(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of a model directory: `chat_template.jinja` if present, else
    /// `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates, of
    /// which `default` is used).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let tc_path = dir.join("tokenizer_config.json");
        let tc: serde_json::Value = if tc_path.exists() {
            let text = std::fs::read_to_string(&tc_path)
                .with_context(|| format!("{}: cannot read", tc_path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", tc_path.display()))?
        } else {
            serde_json::Value::Null
        };
        let (bos, eos) = (
            token_string(tc.get("bos_token")),
            token_string(tc.get("eos_token")),
        );
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            std::fs::read_to_string(&jinja)
                .with_context(|| format!("{}: cannot read", jinja.display()))?
        } else {
            match tc.get("chat_template") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("{}: 'chat_template' list has no 'default' entry", tc_path.display()))?,
                _ => bail!(
                    "{}: the model has no chat template (no chat_template.jinja, no 'chat_template' in tokenizer_config.json); pass --template FILE",
                    dir.display()
                ),
            }
        };
        Self::from_source(&source, &bos, &eos)
            .with_context(|| format!("chat template of {}", dir.display()))
    }

    /// The template dataprep and infer use: `--template FILE` when given (with the model's
    /// special tokens), else the model's own.
    pub fn resolve(model_dir: &Path, template: Option<&Path>) -> Result<Self> {
        match template {
            Some(p) => Self::from_file(p, model_dir),
            None => Self::from_model_dir(model_dir),
        }
    }

    /// A template file given by the user (`--template`), with the model's special tokens.
    pub fn from_file(path: &Path, model_dir: &Path) -> Result<Self> {
        let source = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read template", path.display()))?;
        let base = Self::from_model_dir(model_dir).ok();
        let (bos, eos) = base.map(|b| (b.bos_token, b.eos_token)).unwrap_or_default();
        Self::from_source(&source, &bos, &eos)
            .with_context(|| format!("{}: invalid template", path.display()))
    }

    pub fn from_source(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| anyhow!("cannot parse chat template: {e}"))?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template's `eos_token`.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// What the template writes right after an assistant reply, found by rendering a probe
    /// conversation: the text between the reply and the end of its turn's rendering, without
    /// separator whitespace (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, the eos token
    /// for DeepSeek and Mistral). Empty when the template writes nothing there.
    pub fn turn_end_text(&self) -> Result<String> {
        const REPLY: &str = "dialora-probe-reply";
        let msgs = [
            Message::new("user", "dialora-probe-question"),
            Message::new("assistant", REPLY),
        ];
        let text = self.render(&msgs, false)?;
        let end = text.rfind(REPLY).map(|p| p + REPLY.len()).ok_or_else(|| {
            anyhow!("the chat template drops the assistant reply; cannot find where turns end")
        })?;
        Ok(text[end..].trim().to_string())
    }

    /// The end-of-turn marker and its token ids: the one source of what closes a reply, for
    /// dataprep's labels and infer's stop ids.
    pub fn end_of_turn(&self, tok: &tokenizers::Tokenizer) -> Result<EndOfTurn> {
        let text = self.turn_end_text()?;
        let ids = if text.is_empty() {
            Vec::new()
        } else {
            crate::tokenizer::encode(tok, &text)?
        };
        Ok(EndOfTurn { text, ids })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn fingerprint(&self) -> String {
        format!("sha256:{:x}", Sha256::digest(self.source.as_bytes()))
    }

    /// Renders a conversation, like transformers' `apply_chat_template(tokenize=False)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in constructor");
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| anyhow!("chat template failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_default_system() {
        let t = ChatTemplate::from_source(CHATML, "<s>", "</s>").unwrap();
        let s = t.render(&[Message::new("user", "hi")], true).unwrap();
        assert_eq!(s, "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let src = "{% for m in messages %}{% if m.role not in ['user','assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}{{ bos_token }}{{ m.content.strip() }}{% endfor %}";
        let t = ChatTemplate::from_source(src, "<s>", "</s>").unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  x ")], false).unwrap(),
            "<s>x"
        );
        let e = t
            .render(&[Message::new("tool", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad role tool"), "{e}");
    }

    #[test]
    fn missing_template_is_explained() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("tokenizer_config.json"), "{}").unwrap();
        let e = ChatTemplate::from_model_dir(d.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("no chat template") && e.contains("--template"),
            "{e}"
        );
    }
}
