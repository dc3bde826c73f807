//! Rendering a conversation with the chat template, tokenizing it once, and marking the label
//! tokens (each assistant reply plus its end-of-turn marker) by character offsets; fitting
//! samples to the length limit.

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

/// How a sample longer than `--max-seq-len` is cut (`--truncation-side`; HF's name, with one
/// more choice).
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
pub enum TruncationSide {
    /// Drop the oldest user/assistant exchanges (the system message stays) until the sample
    /// fits, so the labelled turns that remain are whole; one exchange still too long is cut
    /// from the left.
    #[default]
    Turns,
    /// Cut tokens from the start: keeps the end, where `last` and `expand` put the labelled
    /// reply.
    Left,
    /// Cut tokens from the end (HF's default): keeps the start; the labelled reply at the end
    /// of a `last`/`expand` sample is lost.
    Right,
}

impl TruncationSide {
    pub fn as_str(self) -> &'static str {
        match self {
            TruncationSide::Turns => "turns",
            TruncationSide::Left => "left",
            TruncationSide::Right => "right",
        }
    }
}

/// A conversation's samples, and what was done to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prepared {
    pub samples: Vec<Sample>,
    /// Each sample's length before it was fitted to the limit.
    pub lengths: Vec<usize>,
    /// Labelled assistant replies that are empty (trained as an immediate end of turn).
    pub empty_replies: usize,
    /// Labelled replies of whitespace only: their whitespace tokens (as the rendered
    /// conversation tokenizes, once) are trained, then the end of turn.
    pub blank_replies: usize,
    /// Samples that were longer than the limit and cut.
    pub truncated: usize,
    /// User/assistant exchanges dropped from the start of samples (`turns`).
    pub turns_dropped: usize,
    /// Tokens cut from samples (`left`/`right`, or `turns` when one exchange is still too long).
    pub tokens_cut: usize,
}

/// Renders conversations with the chat template, tokenizes each sample once and marks its
/// labels: every labelled assistant reply as the template renders it (the reply as given,
/// trailing whitespace included) through the end-of-turn marker that follows it.
pub struct Labeler<'a> {
    pub template: &'a ChatTemplate,
    pub tok: &'a Tokenizer,
    /// What closes a reply (`ChatTemplate::turn_end_text`), e.g. `<|im_end|>`.
    pub eot: String,
    pub mode: LabelMode,
    /// `None`: no length limit.
    pub max_len: Option<usize>,
    pub truncation: TruncationSide,
}

impl Labeler<'_> {
    /// Byte span `[start, end)` of assistant message `i` in the rendering of `msgs[..=i]`: from
    /// the end of the generation prompt through the end-of-turn marker after the reply.
    fn span(&self, msgs: &[Message], i: usize) -> Result<(usize, usize, String)> {
        let t = self.template;
        let prompt = t.render(&msgs[..i], true)?;
        let full = t.render(&msgs[..=i], false)?;
        if !full.starts_with(&prompt) {
            bail!("the chat template is not prefix-stable (rendering turn {i} changes the text before it); cannot map assistant spans");
        }
        let start = prompt.len();
        let tail = &full[start..];
        let content = msgs[i].content.as_str();
        // the reply as given, else as a template that trims it writes it
        let found = match tail.find(content) {
            Some(p) if !content.trim().is_empty() => Some((p, content.len())),
            _ => tail.find(content.trim()).map(|p| (p, content.trim().len())),
        };
        let Some((pos, len)) = found else {
            bail!("the chat template does not write assistant turn {i} as given; cannot map its labels");
        };
        let mut end = start + pos + len;
        // the end-of-turn marker, after any whitespace the template puts before it
        let rest = &full[end..];
        let gap = rest.len() - rest.trim_start().len();
        if !self.eot.is_empty() && rest[gap..].starts_with(&self.eot) {
            end += gap + self.eot.len();
        }
        Ok((start, end, full))
    }

    /// One sample of `msgs` with the assistant messages `labelled` (indices into `msgs`) as
    /// labels.
    fn sample(&self, msgs: &[Message], labelled: &[usize]) -> Result<Sample> {
        let full = self.template.render(msgs, false)?;
        let mut spans = Vec::with_capacity(labelled.len());
        for &i in labelled {
            let (a, b, text) = self.span(msgs, i)?;
            if !full.starts_with(&text) {
                bail!("the chat template is not prefix-stable; cannot map assistant spans");
            }
            spans.push((a, b));
        }
        tokenize_with_spans(self.tok, &full, &spans)
    }

    /// A sample of `msgs` labelling `labelled`, fitted to the length limit.
    fn fitted(&self, msgs: &[Message], labelled: &[usize], p: &mut Prepared) -> Result<Sample> {
        let mut s = self.sample(msgs, labelled)?;
        p.lengths.push(s.ids.len());
        let Some(max) = self.max_len.filter(|&m| s.ids.len() > m) else {
            return Ok(s);
        };
        p.truncated += 1;
        if self.truncation == TruncationSide::Turns {
            // drop whole exchanges after the system message while more than one remains
            let sys = usize::from(msgs.first().is_some_and(|m| m.role == "system"));
            let mut first = sys;
            while s.ids.len() > max && msgs[first..].len() > 2 {
                first += 2;
                p.turns_dropped += 1;
                let kept: Vec<Message> =
                    msgs[..sys].iter().chain(&msgs[first..]).cloned().collect();
                let shift = first - sys;
                let lab: Vec<usize> = labelled
                    .iter()
                    .filter(|&&i| i >= first)
                    .map(|&i| i - shift)
                    .collect();
                s = self.sample(&kept, &lab)?;
            }
        }
        if s.ids.len() > max {
            let cut = s.ids.len() - max;
            p.tokens_cut += cut;
            if self.truncation == TruncationSide::Right {
                s.ids.truncate(max);
                s.mask.truncate(max);
            } else {
                s.ids.drain(..cut);
                s.mask.drain(..cut);
            }
        }
        Ok(s)
    }

    /// Turns one conversation into training samples.
    pub fn conversation(&self, msgs: &[Message]) -> Result<Prepared> {
        let asst: Vec<usize> = msgs
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == "assistant")
            .map(|(i, _)| i)
            .collect();
        let Some(&last) = asst.last() else {
            bail!("no assistant turn");
        };
        let mut p = Prepared::default();
        let labelled: &[usize] = match self.mode {
            LabelMode::All | LabelMode::Expand => &asst,
            LabelMode::Last => std::slice::from_ref(&last),
        };
        p.empty_replies = labelled
            .iter()
            .filter(|&&i| msgs[i].content.is_empty())
            .count();
        p.blank_replies = labelled
            .iter()
            .filter(|&&i| !msgs[i].content.is_empty() && msgs[i].content.trim().is_empty())
            .count();
        p.samples = match self.mode {
            LabelMode::All | LabelMode::Last => vec![self.fitted(msgs, labelled, &mut p)?],
            LabelMode::Expand => {
                let mut v = Vec::with_capacity(asst.len());
                for &i in &asst {
                    v.push(self.fitted(&msgs[..=i], &[i], &mut p)?);
                }
                v
            }
        };
        Ok(p)
    }
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
