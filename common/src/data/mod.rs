//! dataprep's pipeline: read conversations, render and tokenize them, mark labels, split,
//! truncate, and write shards with `meta.json` (atomically: a temp directory renamed at the end).

pub mod formats;
pub mod labels;
pub mod shards;

use crate::chat::ChatTemplate;
use anyhow::{bail, Result};
use formats::{BadRecord, Conversation, Purpose};
use labels::{LabelMode, Labeler, TruncationSide};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use shards::{Histogram, Meta, ShardWriter};
use std::path::{Path, PathBuf};

/// dataprep's settings (the binary's flags).
#[derive(Debug, Clone)]
pub struct PrepOptions {
    pub inputs: Vec<PathBuf>,
    pub model_dir: PathBuf,
    pub template: Option<PathBuf>,
    pub output: PathBuf,
    pub label_mode: LabelMode,
    pub max_seq_len: usize,
    pub truncation_side: TruncationSide,
    pub drop_long: bool,
    pub val_split: f64,
    pub seed: u64,
    pub shard_size: usize,
    pub max_bad: usize,
    pub strict: bool,
    pub overwrite: bool,
}

impl Default for PrepOptions {
    fn default() -> Self {
        PrepOptions {
            inputs: Vec::new(),
            model_dir: PathBuf::new(),
            template: None,
            output: PathBuf::new(),
            label_mode: LabelMode::All,
            max_seq_len: 2048,
            truncation_side: TruncationSide::Turns,
            drop_long: false,
            val_split: 0.0,
            seed: 42,
            shard_size: 50_000,
            max_bad: 0,
            strict: false,
            overwrite: false,
        }
    }
}

/// Reads every input; returns the good conversations and the bad records (already validated
/// against the --strict policy).
pub fn read_inputs(
    inputs: &[PathBuf],
    strict: bool,
) -> Result<(Vec<Conversation>, Vec<BadRecord>)> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for path in inputs {
        for rec in formats::read_file(path, Purpose::Training)? {
            match rec {
                Ok(c) => good.push(c),
                Err(b) if strict => bail!("{b}"),
                Err(b) => bad.push(b),
            }
        }
    }
    Ok((good, bad))
}

/// Runs dataprep. Bad records are printed (one line each) through `warn`.
pub fn prepare(o: &PrepOptions, warn: &mut dyn FnMut(&str)) -> Result<Meta> {
    if o.inputs.is_empty() {
        bail!("no input files given");
    }
    if !(0.0..1.0).contains(&o.val_split) {
        bail!("--val-split must be in [0, 1), got {}", o.val_split);
    }
    if o.max_seq_len < 2 {
        bail!("--max-seq-len must be at least 2");
    }
    let inputs = formats::expand_inputs(&o.inputs)?;
    for i in &inputs {
        crate::atomic::refuse_inside(&o.output, i, "input")?;
    }
    crate::atomic::check_output_dir(&o.output, o.overwrite)?;
    let tok = crate::tokenizer::load(&o.model_dir)?;
    let tmpl = ChatTemplate::resolve(&o.model_dir, o.template.as_deref())?;
    let (mut convs, mut bad) = read_inputs(&inputs, o.strict)?;

    // the end-of-turn marker dataprep labels and infer stops on
    let eot = tmpl.end_of_turn(&tok)?;
    if let Some(problem) = eot.problem() {
        warn(&format!("warning: {problem}"));
    }
    let labeler = Labeler {
        template: &tmpl,
        tok: &tok,
        eot: eot.text.clone(),
        mode: o.label_mode,
        max_len: (!o.drop_long).then_some(o.max_seq_len),
        truncation: o.truncation_side,
    };

    // render + tokenize (template errors are bad records too)
    let mut progress = crate::progress::Progress::new(convs.len() as u64, "dataprep");
    let mut samples: Vec<labels::Prepared> = Vec::with_capacity(convs.len());
    let mut empty_replies = 0;
    let mut blank_replies = 0;
    for c in &convs {
        match labeler.conversation(&c.messages) {
            Ok(p) => {
                let replies = |n: usize| if n == 1 { "y" } else { "ies" };
                if p.empty_replies > 0 {
                    warn(&format!(
                        "warning: {}: {} empty assistant repl{} (trained as an immediate end of turn)",
                        c.at,
                        p.empty_replies,
                        replies(p.empty_replies)
                    ));
                    empty_replies += p.empty_replies;
                }
                if p.blank_replies > 0 {
                    warn(&format!(
                        "warning: {}: {} assistant repl{} of whitespace only (its whitespace tokens are trained before the end of turn, as the rendered conversation tokenizes; not an immediate end of turn)",
                        c.at,
                        p.blank_replies,
                        replies(p.blank_replies)
                    ));
                    blank_replies += p.blank_replies;
                }
                samples.push(p);
            }
            Err(e) => {
                let b = BadRecord {
                    at: c.at.clone(),
                    field: String::new(),
                    problem: crate::cli::error_line(&e),
                };
                if o.strict {
                    bail!("{b}");
                }
                bad.push(b);
            }
        }
        progress.inc(1);
    }
    progress.finish();
    for b in &bad {
        warn(&format!("bad record: {b}"));
    }
    if bad.len() > o.max_bad {
        bail!(
            "{} bad record(s) (first: {}); allowed --max-bad {}: nothing written",
            bad.len(),
            bad[0],
            o.max_bad
        );
    }
    let n_conv = samples.len();
    convs.clear();

    // split by conversation (no leakage between train and val in expand mode)
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(o.seed));
    let n_val = ((samples.len() as f64) * o.val_split).round() as usize;
    let n_val = if o.val_split > 0.0 {
        n_val.max(1).min(samples.len().saturating_sub(1))
    } else {
        0
    };
    let mut is_val = vec![false; samples.len()];
    for &i in &order[..n_val] {
        is_val[i] = true;
    }

    let out_dir = crate::atomic::OutputDir::create(&o.output)?;
    let tmp = out_dir.path();
    let meta = {
        let mut train = ShardWriter::new(tmp, "train", o.shard_size);
        let mut val = ShardWriter::new(tmp, "val", o.shard_size);
        let (mut truncated, mut dropped_long, mut dropped_no_labels) = (0, 0, 0);
        let (mut turns_dropped, mut tokens_cut) = (0, 0);
        let mut hist = Histogram::new(o.max_seq_len);
        for (k, p) in samples.drain(..).enumerate() {
            truncated += p.truncated;
            turns_dropped += p.turns_dropped;
            tokens_cut += p.tokens_cut;
            for (s, len) in p.samples.into_iter().zip(p.lengths) {
                hist.add(len);
                if s.ids.len() > o.max_seq_len {
                    // only with --drop-long: the labeler fits every other sample
                    dropped_long += 1;
                    continue;
                }
                // a label at position 0 predicts nothing: need one after the first token
                if !s.mask.iter().skip(1).any(|&m| m != 0) {
                    dropped_no_labels += 1;
                    continue;
                }
                if is_val[k] {
                    val.push(s)?
                } else {
                    train.push(s)?
                }
            }
        }
        let meta = Meta {
            format: shards::FORMAT.into(),
            version: shards::VERSION,
            created_by: format!("dataprep {}", env!("CARGO_PKG_VERSION")),
            tokenizer_fingerprint: crate::tokenizer::fingerprint(&tok)?,
            model_dir: o.model_dir.display().to_string(),
            chat_template: tmpl.source().to_string(),
            chat_template_fingerprint: tmpl.fingerprint(),
            label_mode: o.label_mode,
            end_of_turn: eot.text.clone(),
            end_of_turn_ids: eot.ids.clone(),
            max_seq_len: o.max_seq_len,
            truncation_side: o.truncation_side,
            drop_long: o.drop_long,
            val_split: o.val_split,
            seed: o.seed,
            inputs: inputs.iter().map(|p| p.display().to_string()).collect(),
            conversations: n_conv,
            bad_records: bad.len(),
            truncated,
            turns_dropped,
            tokens_cut,
            empty_replies,
            blank_replies,
            dropped_long,
            dropped_no_labels,
            train: train.finish()?,
            val: val.finish()?,
            length_histogram: hist,
        };
        if meta.train.sequences == 0 {
            bail!("no training sequences left (all records bad, too long or without labels)");
        }
        crate::atomic::write_json(&tmp.join("meta.json"), &meta)?;
        meta
    };
    out_dir.commit()?;
    Ok(meta)
}

/// One-paragraph summary of a finished dataprep run.
pub fn summary(m: &Meta, out: &Path) -> String {
    let pct = |a: usize, b: usize| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    format!(
        "dataprep: {} conversations -> {} train / {} val sequences in {}\n  train: {} tokens, {} label tokens ({:.1}%); val: {} tokens, {} label tokens\n  label mode {}, end of turn {:?}, max_seq_len {}: {} truncated ({}: {} exchanges dropped, {} tokens cut), {} dropped as too long, {} dropped without labels, {} empty replies, {} bad records",
        m.conversations,
        m.train.sequences,
        m.val.sequences,
        out.display(),
        m.train.tokens,
        m.train.label_tokens,
        pct(m.train.label_tokens, m.train.tokens),
        m.val.tokens,
        m.val.label_tokens,
        m.label_mode.as_str(),
        m.end_of_turn,
        m.max_seq_len,
        m.truncated,
        m.truncation_side.as_str(),
        m.turns_dropped,
        m.tokens_cut,
        m.dropped_long,
        m.dropped_no_labels,
        m.empty_replies,
        m.bad_records
    )
}
