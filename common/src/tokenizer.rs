//! Tokenizer: loading a model directory's `tokenizer.json`, building one from a GGUF vocabulary
//! (byte-level BPE), and a fingerprint that ties token shards to the tokenizer that made them.

use anyhow::{anyhow, Context, Result};
use sha2::{Digest, Sha256};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
pub use tokenizers::Tokenizer;
use tokenizers::{AddedToken, PreTokenizerWrapper};

/// Loads `<dir>/tokenizer.json`.
pub fn load(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        anyhow::bail!("{}: tokenizer file not found", path.display());
    }
    Tokenizer::from_file(&path).map_err(|e| anyhow!("{}: invalid tokenizer: {e}", path.display()))
}

/// A stable fingerprint of a tokenizer's behaviour (its canonical serialisation, hashed).
pub fn fingerprint(tok: &Tokenizer) -> Result<String> {
    let s = tok
        .to_string(false)
        .map_err(|e| anyhow!("cannot serialise tokenizer: {e}"))?;
    let mut h = Sha256::new();
    h.update(s.as_bytes());
    Ok(format!("sha256:{:x}", h.finalize()))
}

/// Encodes text exactly as given (no special tokens added: chat templates carry their own).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, false)
        .map_err(|e| anyhow!("tokenizer failed: {e}"))?
        .get_ids()
        .to_vec())
}

pub fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, false)
        .map_err(|e| anyhow!("cannot decode: {e}"))
}

/// What a GGUF (`tokenizer.ggml.*`) says about a byte-level BPE tokenizer.
pub struct BpeSpec<'a> {
    pub tokens: &'a [String],
    pub merges: &'a [String],
    /// Ids of control/user-defined tokens, added as special tokens (never split).
    pub special_ids: &'a [u32],
    /// `tokenizer.ggml.pre` (e.g. "smollm", "llama-bpe", "default").
    pub pre: &'a str,
}

/// llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) this module reproduces exactly:
/// `gpt-2` (GPT-2's byte-level split) and `smollm` (digits split individually first, as
/// llama.cpp and the original SmolLM2 tokenizer do). Others are refused: splitting text another
/// way than the model was trained with gives wrong token ids.
pub const KNOWN_PRE_TOKENIZERS: &[&str] = &["gpt-2", "smollm"];

/// Builds a byte-level BPE tokenizer (GPT-2 style) from a GGUF vocabulary and merges, with the
/// pre-tokenizer `spec.pre` (one of `KNOWN_PRE_TOKENIZERS`).
pub fn build_bpe(spec: &BpeSpec) -> Result<Tokenizer> {
    let vocab: tokenizers::models::bpe::Vocab = spec
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = spec
        .merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow!("tokenizer.ggml.merges[{i}] = {m:?} is not 'a b'"))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("cannot build BPE model: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre: PreTokenizerWrapper = match spec.pre {
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "gpt-2" => byte_level.into(),
        other => anyhow::bail!(
            "pre-tokenizer '{other}' is not supported (supported: {})",
            KNOWN_PRE_TOKENIZERS.join(", ")
        ),
    };
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    // Untrimmed offsets: dataprep maps assistant spans by character offsets.
    tok.with_post_processor(Some(ByteLevel::new(false, false, true)));
    let specials: Vec<AddedToken> = spec
        .special_ids
        .iter()
        .map(|&i| {
            let t = spec
                .tokens
                .get(i as usize)
                .ok_or_else(|| anyhow!("special token id {i} out of range"))?;
            Ok(AddedToken::from(t.clone(), true))
        })
        .collect::<Result<_>>()?;
    tok.add_special_tokens(specials)
        .map_err(|e| anyhow!("cannot add special tokens: {e}"))?;
    Ok(tok)
}

/// Saves a tokenizer as `tokenizer.json` in `dir`.
pub fn save(tok: &Tokenizer, dir: &Path) -> Result<()> {
    let s = tok
        .to_string(true)
        .map_err(|e| anyhow!("cannot serialise tokenizer: {e}"))?;
    crate::atomic::write_file(&dir.join("tokenizer.json"), s.as_bytes())
        .context("writing tokenizer.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Tokenizer {
        // bytes-to-unicode for ASCII letters and space (Ġ) suffice here.
        let tokens: Vec<String> = ["<|s|>", "a", "b", "Ġ", "1", "2", "ab", "Ġa"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let merges = vec!["a b".to_string(), "Ġ a".to_string()];
        build_bpe(&BpeSpec {
            tokens: &tokens,
            merges: &merges,
            special_ids: &[0],
            pre: "smollm",
        })
        .unwrap()
    }

    #[test]
    fn bpe_merges_specials_and_digits() {
        let t = tiny();
        assert_eq!(encode(&t, "ab a").unwrap(), vec![6, 7]);
        assert_eq!(encode(&t, "<|s|>ab").unwrap(), vec![0, 6]);
        assert_eq!(encode(&t, "12").unwrap(), vec![4, 5]);
        assert_eq!(decode(&t, &[6, 7]).unwrap(), "ab a");
        let t2 = tiny();
        assert_eq!(fingerprint(&t).unwrap(), fingerprint(&t2).unwrap());
    }

    #[test]
    fn unknown_pre_tokenizers_are_refused() {
        let tokens = vec!["a".to_string()];
        for pre in ["llama-bpe", "default", "qwen2"] {
            let e = build_bpe(&BpeSpec {
                tokens: &tokens,
                merges: &[],
                special_ids: &[],
                pre,
            })
            .err()
            .unwrap()
            .to_string();
            assert!(e.contains(pre) && e.contains("not supported"), "{e}");
        }
    }

    #[test]
    fn bad_merge_is_reported() {
        let tokens = vec!["a".to_string()];
        let merges = vec!["ab".to_string()];
        let e = build_bpe(&BpeSpec {
            tokens: &tokens,
            merges: &merges,
            special_ids: &[],
            pre: "gpt-2",
        })
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("merges[0]"), "{e}");
    }
}
