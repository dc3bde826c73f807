//! Rendering a conversation with the chat template, tokenizing it once, and marking the label
//! tokens (each assistant reply plus its end-of-turn token) by character offsets.

use crate::chat::{ChatTemplate, Message};
use anyhow::{anyhow, bail, Result};
use tokenizers::Tokenizer;

/// Which assistant turns are labels (`--label-mode`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LabelMode {
    /// One sample per conversation, every assistant turn labelled.
    #[default]
    All,
    /// One sample per conversation, only the final assistant turn labelled.
    Last,
    /// One sample per assistant turn (history up to it), that turn labelled.
    Expand,
}

impl LabelMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LabelMode::All => "all",
            LabelMode::Last => "last",
            LabelMode::Expand => "expand",
        }
    }
}

/// A tokenized training sample: ids and a 0/1 label mask of the same length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
}

impl Sample {
    pub fn label_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m != 0).count()
    }
}

/// Byte span `[start, end)` of assistant turn `i` (message index) in the rendering of
/// `msgs[..=i]`: from the end of the generation prompt to the end of the reply's
/// end-of-turn token (trailing separators such as a newline are not labels).
fn assistant_span(
    t: &ChatTemplate,
    msgs: &[Message],
    i: usize,
    eot: &str,
) -> Result<(usize, usize, String)> {
    let prompt = t.render(&msgs[..i], true)?;
    let full = t.render(&msgs[..=i], false)?;
    if !full.starts_with(&prompt) {
        bail!("the chat template is not prefix-stable (rendering turn {i} changes the text before it); cannot map assistant spans");
    }
    let start = prompt.len();
    let tail = &full[start..];
    let content = msgs[i].content.trim();
    let end = match tail.find(content) {
        Some(pos) => {
            let mut e = start + pos + content.len();
            if !eot.is_empty() && full[e..].starts_with(eot) {
                e += eot.len();
            }
            e
        }
        None => start + tail.trim_end().len(),
    };
    Ok((start, end, full))
}

/// Tokenizes `text` once and marks tokens that start inside one of `spans`.
fn tokenize_with_spans(tok: &Tokenizer, text: &str, spans: &[(usize, usize)]) -> Result<Sample> {
    let enc = tok
        .encode(text, false)
        .map_err(|e| anyhow!("tokenizer failed: {e}"))?;
    let ids = enc.get_ids().to_vec();
    let mask = enc
        .get_offsets()
        .iter()
        .map(|&(s, _)| u8::from(spans.iter().any(|&(a, b)| s >= a && s < b)))
        .collect();
    Ok(Sample { ids, mask })
}

/// Turns one conversation into training samples.
pub fn conversation_samples(
    t: &ChatTemplate,
    tok: &Tokenizer,
    msgs: &[Message],
    mode: LabelMode,
    eot: &str,
) -> Result<Vec<Sample>> {
    let asst: Vec<usize> = msgs
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == "assistant")
        .map(|(i, _)| i)
        .collect();
    if asst.is_empty() {
        bail!("no assistant turn");
    }
    let mut spans = Vec::new();
    let mut texts = Vec::new();
    for &i in &asst {
        let (a, b, text) = assistant_span(t, msgs, i, eot)?;
        spans.push((a, b));
        texts.push(text);
    }
    match mode {
        LabelMode::All | LabelMode::Last => {
            let full = t.render(msgs, false)?;
            if !full.starts_with(texts.last().unwrap()) {
                bail!("the chat template is not prefix-stable; cannot map assistant spans");
            }
            let chosen: Vec<(usize, usize)> = if mode == LabelMode::All {
                spans
            } else {
                vec![*spans.last().unwrap()]
            };
            Ok(vec![tokenize_with_spans(tok, &full, &chosen)?])
        }
        LabelMode::Expand => texts
            .iter()
            .zip(&spans)
            .map(|(text, &span)| tokenize_with_spans(tok, text, &[span]))
            .collect(),
    }
}

/// Cuts a sample to `max_len` tokens (keeping the start). Returns whether it was cut.
pub fn truncate(s: &mut Sample, max_len: usize) -> bool {
    if s.ids.len() > max_len {
        s.ids.truncate(max_len);
        s.mask.truncate(max_len);
        true
    } else {
        false
    }
}
