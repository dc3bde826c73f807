//! Token/label shards: memory-mappable little-endian arrays plus `meta.json`
//! (format in docs/FORMATS.md).
//!
//! Per shard `NAME` (e.g. `train-00000`): `NAME.tokens.u32` (all token ids, concatenated),
//! `NAME.labels.u8` (1 where the token is a label), `NAME.offsets.u64` (sequence starts,
//! n+1 entries).

use super::labels::Sample;
use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "dialora-shards";
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardInfo {
    pub name: String,
    pub sequences: usize,
    pub tokens: usize,
    pub label_tokens: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SplitInfo {
    pub sequences: usize,
    pub tokens: usize,
    pub label_tokens: usize,
    pub shards: Vec<ShardInfo>,
}

/// Writes the shards of one split into a directory.
pub struct ShardWriter {
    dir: PathBuf,
    split: String,
    shard_size: usize,
    cur: Vec<Sample>,
    pub info: SplitInfo,
}

impl ShardWriter {
    pub fn new(dir: &Path, split: &str, shard_size: usize) -> Self {
        ShardWriter {
            dir: dir.into(),
            split: split.into(),
            shard_size: shard_size.max(1),
            cur: Vec::new(),
            info: SplitInfo::default(),
        }
    }

    pub fn push(&mut self, s: Sample) -> Result<()> {
        self.cur.push(s);
        if self.cur.len() >= self.shard_size {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.cur.is_empty() {
            return Ok(());
        }
        let name = format!("{}-{:05}", self.split, self.info.shards.len());
        let mut tokens = Vec::new();
        let mut labels = Vec::new();
        let mut offsets: Vec<u64> = vec![0];
        for s in self.cur.drain(..) {
            tokens.extend(s.ids.iter().flat_map(|i| i.to_le_bytes()));
            labels.extend_from_slice(&s.mask);
            offsets.push(offsets.last().unwrap() + s.ids.len() as u64);
        }
        let n = offsets.len() - 1;
        let ntok = labels.len();
        let nlab = labels.iter().filter(|&&m| m != 0).count();
        write_file(&self.dir.join(format!("{name}.tokens.u32")), &tokens)?;
        write_file(&self.dir.join(format!("{name}.labels.u8")), &labels)?;
        let off: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        write_file(&self.dir.join(format!("{name}.offsets.u64")), &off)?;
        self.info.sequences += n;
        self.info.tokens += ntok;
        self.info.label_tokens += nlab;
        self.info.shards.push(ShardInfo {
            name,
            sequences: n,
            tokens: ntok,
            label_tokens: nlab,
        });
        Ok(())
    }

    pub fn finish(mut self) -> Result<SplitInfo> {
        self.flush()?;
        Ok(self.info)
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

/// `meta.json` of a shard directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub format: String,
    pub version: u32,
    pub created_by: String,
    pub tokenizer_fingerprint: String,
    pub model_dir: String,
    pub chat_template: String,
    pub chat_template_fingerprint: String,
    pub label_mode: super::labels::LabelMode,
    /// The end-of-turn marker labelled after every reply, and its token ids.
    #[serde(default)]
    pub end_of_turn: String,
    #[serde(default)]
    pub end_of_turn_ids: Vec<u32>,
    pub max_seq_len: usize,
    #[serde(default)]
    pub truncation_side: super::labels::TruncationSide,
    pub drop_long: bool,
    pub val_split: f64,
    pub seed: u64,
    pub inputs: Vec<String>,
    pub conversations: usize,
    pub bad_records: usize,
    /// Sequences longer than `max_seq_len`, fitted by `truncation_side`.
    pub truncated: usize,
    /// Exchanges dropped (`turns`) and tokens cut while fitting them.
    #[serde(default)]
    pub turns_dropped: usize,
    #[serde(default)]
    pub tokens_cut: usize,
    /// Labelled assistant replies that were empty.
    #[serde(default)]
    pub empty_replies: usize,
    /// Labelled assistant replies of whitespace only (their whitespace is trained).
    #[serde(default)]
    pub blank_replies: usize,
    pub dropped_long: usize,
    pub dropped_no_labels: usize,
    pub train: SplitInfo,
    pub val: SplitInfo,
    /// Sequence lengths before truncation: `counts[i]` sequences with length in
    /// `[edges[i], edges[i+1])`; the last bin is open-ended (`edges[n-1]` and longer).
    pub length_histogram: Histogram,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Histogram {
    pub edges: Vec<usize>,
    pub counts: Vec<usize>,
}

impl Histogram {
    /// Power-of-two bins from 16 up to past `max`.
    pub fn new(max: usize) -> Self {
        let mut edges = vec![0, 16];
        while *edges.last().unwrap() <= max {
            let e = edges.last().unwrap() * 2;
            edges.push(e);
        }
        let counts = vec![0; edges.len() - 1];
        Histogram { edges, counts }
    }
    pub fn add(&mut self, len: usize) {
        let i = self
            .edges
            .windows(2)
            .position(|w| len >= w[0] && len < w[1])
            .unwrap_or(self.counts.len() - 1);
        self.counts[i] += 1;
    }
}

impl Meta {
    pub fn load(dir: &Path) -> Result<Meta> {
        let path = dir.join("meta.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: cannot read shard metadata (is this a dataprep output directory?)",
                path.display()
            )
        })?;
        let meta: Meta = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid shard metadata", path.display()))?;
        if meta.format != FORMAT || meta.version != VERSION {
            bail!(
                "{}: format {} v{} is not {FORMAT} v{VERSION}",
                path.display(),
                meta.format,
                meta.version
            );
        }
        Ok(meta)
    }
}

struct OpenShard {
    /// `<dir>/<name>.tokens.u32`, named in errors.
    path: PathBuf,
    tokens: Mmap,
    labels: Mmap,
    offsets: Vec<u64>,
}

/// Read side: all sequences of one split, memory-mapped.
pub struct ShardReader {
    shards: Vec<OpenShard>,
    /// (shard, sequence-in-shard) of every sequence
    index: Vec<(u32, u32)>,
}

fn map(path: &Path) -> Result<Mmap> {
    let f = std::fs::File::open(path)
        .with_context(|| format!("{}: cannot open shard", path.display()))?;
    // SAFETY: read-only map of a file this process does not modify.
    unsafe { Mmap::map(&f) }.with_context(|| format!("{}: cannot map", path.display()))
}

impl ShardReader {
    /// Opens split `split` ("train" or "val") of a shard directory, checking every file's size
    /// against the metadata.
    pub fn open(dir: &Path, meta: &Meta, split: &str) -> Result<Self> {
        let info = match split {
            "train" => &meta.train,
            "val" => &meta.val,
            other => bail!("unknown split '{other}'"),
        };
        let mut shards = Vec::new();
        let mut index = Vec::new();
        for (si, s) in info.shards.iter().enumerate() {
            let p = |ext: &str| dir.join(format!("{}.{ext}", s.name));
            let tokens = map(&p("tokens.u32"))?;
            let labels = map(&p("labels.u8"))?;
            let off_raw = map(&p("offsets.u64"))?;
            if tokens.len() != 4 * s.tokens
                || labels.len() != s.tokens
                || off_raw.len() != 8 * (s.sequences + 1)
            {
                bail!(
                    "{}: shard files do not match meta.json (truncated or modified)",
                    p("*").display()
                );
            }
            let offsets: Vec<u64> = off_raw
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            if offsets.last().copied() != Some(s.tokens as u64)
                || offsets.windows(2).any(|w| w[0] > w[1])
            {
                bail!("{}: corrupt offsets", p("offsets.u64").display());
            }
            index.extend((0..s.sequences).map(|i| (si as u32, i as u32)));
            shards.push(OpenShard {
                path: p("tokens.u32"),
                tokens,
                labels,
                offsets,
            });
        }
        Ok(ShardReader { shards, index })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Refuses token ids the model has no embedding for (shards made for another model).
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        for sh in &self.shards {
            let toks: &[u32] = bytemuck::cast_slice(&sh.tokens[..]);
            if let Some((pos, &id)) = toks.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
                bail!(
                    "{}: token id {id} (token {pos} of the shard) is outside the model's vocabulary of {vocab}: shards made for another model?",
                    sh.path.display()
                );
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Token ids and label mask of sequence `i`.
    pub fn get(&self, i: usize) -> (&[u32], &[u8]) {
        let (s, j) = self.index[i];
        let sh = &self.shards[s as usize];
        let (a, b) = (
            sh.offsets[j as usize] as usize,
            sh.offsets[j as usize + 1] as usize,
        );
        let toks: &[u32] = bytemuck::cast_slice(&sh.tokens[4 * a..4 * b]);
        (toks, &sh.labels[a..b])
    }

    pub fn seq_len(&self, i: usize) -> usize {
        let (s, j) = self.index[i];
        let sh = &self.shards[s as usize];
        (sh.offsets[j as usize + 1] - sh.offsets[j as usize]) as usize
    }
}

/// Refuses shards made with another tokenizer than the model's.
pub fn check_tokenizer(
    meta: &Meta,
    data_dir: &Path,
    model_fingerprint: &str,
    model_dir: &Path,
) -> Result<()> {
    if meta.tokenizer_fingerprint != model_fingerprint {
        return Err(anyhow!(
            "{}: shards were made with another tokenizer ({}) than the model's in {} ({}); rerun dataprep with --model {}",
            data_dir.join("meta.json").display(),
            meta.tokenizer_fingerprint,
            model_dir.display(),
            model_fingerprint,
            model_dir.display()
        ));
    }
    Ok(())
}
