//! The prefix cache (vLLM's automatic prefix caching, llama-server's `cache_prompt`): the key
//! and value caches of finished sequences, kept by adapter and token ids, so that a new request
//! whose prompt starts with tokens seen before (a system prompt, an earlier turn of the same
//! conversation) copies their positions instead of computing them again.
//!
//! Every row of a step takes the same operations whatever the other rows and however a prompt
//! is cut into chunks (`Llama::forward_step`), so a reused position holds the bits the request
//! would have computed itself, and its answer is the one it gets on a fresh engine.
//!
//! Bounded by bytes of keys and values; the least recently used entries go first.

use crate::model::KvCache;

struct Entry {
    adapter: Option<usize>,
    /// The tokens whose positions `cache` holds, in order.
    tokens: Vec<u32>,
    cache: KvCache,
    bytes: usize,
    /// When it was last stored or reused (a counter).
    used: u64,
}

pub(crate) struct PrefixCache {
    budget: usize,
    bytes: usize,
    clock: u64,
    entries: Vec<Entry>,
}

fn common_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// A cache of at most `budget` bytes (0: none kept).
    pub fn new(budget: usize) -> Self {
        PrefixCache {
            budget,
            bytes: 0,
            clock: 0,
            entries: Vec::new(),
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The longest run of `prompt`'s first tokens held for `adapter`, all but the prompt's last
    /// token (the step that feeds it gives the next token's logits): the number of positions
    /// and a copy of them. `None` when no entry shares a token.
    pub fn lookup(&mut self, adapter: Option<usize>, prompt: &[u32]) -> Option<(usize, KvCache)> {
        let want = &prompt[..prompt.len().saturating_sub(1)];
        let (i, n) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.adapter == adapter)
            .map(|(i, e)| (i, common_len(&e.tokens, want)))
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))?;
        if n == 0 {
            return None;
        }
        let cache = self.entries[i].cache.prefix(n)?;
        self.clock += 1;
        self.entries[i].used = self.clock;
        Some((n, cache))
    }

    /// Keeps a finished sequence's cache of `tokens` (one position per token). Entries it
    /// extends are dropped; the least recently used go while the budget is exceeded.
    pub fn insert(&mut self, adapter: Option<usize>, tokens: Vec<u32>, cache: KvCache) {
        let bytes = cache.bytes();
        if tokens.is_empty() || cache.len() != tokens.len() || bytes > self.budget {
            return;
        }
        // the same tokens, or a prefix of them, held already
        let covered = |e: &Entry| e.adapter == adapter && tokens.starts_with(&e.tokens);
        if self
            .entries
            .iter()
            .any(|e| e.adapter == adapter && e.tokens.starts_with(&tokens))
        {
            return;
        }
        self.entries.retain(|e| !covered(e));
        self.clock += 1;
        self.entries.push(Entry {
            adapter,
            tokens,
            cache,
            bytes,
            used: self.clock,
        });
        self.bytes = self.entries.iter().map(|e| e.bytes).sum();
        while self.bytes > self.budget {
            let oldest = (0..self.entries.len())
                .min_by_key(|&i| self.entries[i].used)
                .expect("entries while over budget");
            self.bytes -= self.entries.swap_remove(oldest).bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StepSeq;

    /// A real cache of `tokens` from a tiny model.
    fn cache_of(model: &crate::Llama, tokens: &[u32]) -> KvCache {
        let mut c = model.new_cache();
        let mut s = [StepSeq {
            tokens,
            cache: &mut c,
            adapter: None,
            decode: false,
            logits: false,
        }];
        model.forward_step(&mut s).unwrap();
        c
    }

    #[test]
    fn the_longest_shared_prefix_of_the_same_adapter_is_reused_and_the_oldest_goes_first() {
        let cfg = crate::model::tests::tiny_config(true);
        let model = crate::model::tests::tiny_model(&cfg, candle_core::DType::F32);
        let a: Vec<u32> = (1..=10).collect();
        let one = cache_of(&model, &a).bytes();
        let mut p = PrefixCache::new(one * 3 / 2);
        p.insert(None, a.clone(), cache_of(&model, &a));
        // six tokens shared, the rest not
        let mut q = a[..6].to_vec();
        q.extend([30, 31]);
        let (n, c) = p.lookup(None, &q).unwrap();
        assert_eq!((n, c.len()), (6, 6));
        // the same prompt: all but its last token, which must be fed for the logits
        assert_eq!(p.lookup(None, &a).unwrap().0, 9);
        // another adapter's, or nothing shared
        assert!(p.lookup(Some(0), &a).is_none());
        assert!(p.lookup(None, &[20, 21, 22]).is_none());
        // the reused positions are the bits a fresh computation gives
        let fresh = cache_of(&model, &a[..6]);
        let mut s = [StepSeq {
            tokens: &[7],
            cache: &mut p.lookup(None, &q).unwrap().1,
            adapter: None,
            decode: true,
            logits: true,
        }];
        let reused = model.forward_step(&mut s).unwrap().remove(0).unwrap();
        let mut fresh_cache = fresh;
        let mut s = [StepSeq {
            tokens: &[7],
            cache: &mut fresh_cache,
            adapter: None,
            decode: true,
            logits: true,
        }];
        let want = model.forward_step(&mut s).unwrap().remove(0).unwrap();
        assert_eq!(crate::testing::max_abs_diff(&reused, &want), 0.0);
        // a longer sequence that extends it replaces it
        let mut b = a.clone();
        b.extend([11, 12]);
        p.insert(None, b.clone(), cache_of(&model, &b));
        assert_eq!(p.entries.len(), 1);
        assert_eq!(p.lookup(None, &b).unwrap().0, 11);
        // over the budget, the least recently used goes
        let c: Vec<u32> = (20..30).collect();
        p.insert(None, c.clone(), cache_of(&model, &c));
        assert_eq!(p.entries.len(), 1);
        assert!(p.lookup(None, &b).is_none());
        assert_eq!(p.lookup(None, &c).unwrap().0, 9);
        assert!(p.bytes() <= one * 3 / 2);
        // a cache that does not hold its tokens' positions is not kept
        p.insert(Some(1), vec![1, 2, 3], cache_of(&model, &[1, 2]));
        assert!(p.lookup(Some(1), &[1, 2, 3, 4]).is_none());
    }
}
