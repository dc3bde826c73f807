//! The decode-step benchmark of `bench-step`: a batched step (`Llama::forward_step`) of B
//! sequences decoding after a prompt of C tokens, timed step by step, and the memory-read
//! bandwidth that bounds it (a decode step reads every weight once, whatever B).

use crate::model::{AdapterBranches, KvCache, Llama, StepSeq};
use anyhow::Result;
use std::time::Instant;

/// One batch size's timing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepTiming {
    pub batch: usize,
    pub context: usize,
    /// Median seconds per decode step.
    pub step_s: f64,
    /// New tokens per second of the whole batch (`batch / step_s`).
    pub tokens_per_s: f64,
    /// Bytes of weights a step reads (`Llama::decode_bytes`).
    pub weight_bytes: usize,
}

/// Prefills `batch` sequences with `context` prompt tokens each (ids cycling through the
/// vocabulary, each sequence its own), then times `steps` decode steps of them all, each
/// sequence fed the argmax of its last logits. Sequence `i` asks for `adapters[i % n]` (none
/// given: the base model).
pub fn time_steps(
    model: &Llama,
    batch: usize,
    context: usize,
    steps: usize,
    adapters: &[&AdapterBranches],
) -> Result<StepTiming> {
    let adapter = |i: usize| (!adapters.is_empty()).then(|| adapters[i % adapters.len()]);
    let vocab = model.config.vocab_size as u32;
    let mut caches: Vec<KvCache> = (0..batch).map(|_| model.new_cache()).collect();
    let mut last: Vec<u32> = Vec::with_capacity(batch);
    for (i, c) in caches.iter_mut().enumerate() {
        let prompt: Vec<u32> = (0..context as u32)
            .map(|p| (p * 7919 + i as u32 * 104729) % vocab)
            .collect();
        let mut one = [StepSeq {
            tokens: &prompt,
            cache: c,
            adapter: adapter(i),
            decode: false,
            logits: true,
        }];
        let l = model.forward_step(&mut one)?;
        last.push(argmax(l[0].as_ref())?);
    }
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
        let mut seqs: Vec<StepSeq> = caches
            .iter_mut()
            .zip(&toks)
            .enumerate()
            .map(|(i, (c, t))| StepSeq {
                tokens: t,
                cache: c,
                adapter: adapter(i),
                decode: true,
                logits: true,
            })
            .collect();
        let t0 = Instant::now();
        let out = model.forward_step(&mut seqs)?;
        times.push(t0.elapsed().as_secs_f64());
        for (l, o) in last.iter_mut().zip(&out) {
            *l = argmax(o.as_ref())?;
        }
    }
    times.sort_by(f64::total_cmp);
    let step_s = times[times.len() / 2];
    Ok(StepTiming {
        batch,
        context,
        step_s,
        tokens_per_s: batch as f64 / step_s,
        weight_bytes: model.decode_bytes(),
    })
}

fn argmax(l: Option<&candle_core::Tensor>) -> Result<u32> {
    let l = l.ok_or_else(|| anyhow::anyhow!("no logits"))?;
    Ok(l.argmax(0)?.to_scalar::<u32>()?)
}

/// The best of five reads of a 512 MiB buffer by every thread of the compute pool, each line
/// asked for ahead (`PREFETCH`) as the kernels ask for theirs, bytes per second: what a step
/// that reads each weight once could at best read at.
pub fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = (512usize << 20) / 4;
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t0 = Instant::now();
        let sum: f32 = crate::model::on_pool(|| {
            buf.par_chunks(1 << 16)
                .map(|c| {
                    let mut acc = [0f32; 16];
                    for x in c.chunks_exact(16) {
                        // asked for ahead, as the kernels ask for their weights
                        crate::model::prefetch(x.as_ptr() as *const u8);
                        for l in 0..16 {
                            acc[l] += x[l];
                        }
                    }
                    acc.iter().sum::<f32>()
                })
                .sum()
        });
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((n * 4) as f64 / dt);
    }
    best
}
