//! Batching: per-epoch shuffle from (seed, epoch), optional length grouping (HF
//! `group_by_length`-style megabatches), right padding with ignored labels.

use crate::data::shards::ShardReader;
use crate::model::Batch;
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// The sequence indices of every batch of epoch `epoch`, deterministic in (seed, epoch).
pub fn epoch_batches(
    reader: &ShardReader,
    batch_size: usize,
    seed: u64,
    epoch: u64,
    group_by_length: bool,
) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1),
    );
    let mut idx: Vec<usize> = (0..reader.len()).collect();
    idx.shuffle(&mut rng);
    if !group_by_length {
        return idx.chunks(batch_size).map(|c| c.to_vec()).collect();
    }
    // megabatches of 50 batches, sorted by length inside, then batch order shuffled
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for mega in idx.chunks(batch_size * 50) {
        let mut m = mega.to_vec();
        m.sort_by_key(|&i| std::cmp::Reverse(reader.seq_len(i)));
        batches.extend(m.chunks(batch_size).map(|c| c.to_vec()));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Label tokens a batch contributes to the loss (positions t with a label at t+1).
pub fn label_count(reader: &ShardReader, seqs: &[usize]) -> usize {
    seqs.iter()
        .map(|&i| reader.get(i).1.iter().skip(1).filter(|&&m| m != 0).count())
        .sum()
}

/// Builds a right-padded batch: `pad_id` tokens with ignored labels after each sequence.
pub fn make_batch(
    reader: &ShardReader,
    seqs: &[usize],
    pad_id: u32,
    device: &Device,
) -> candle_core::Result<Batch> {
    let t = seqs
        .iter()
        .map(|&i| reader.seq_len(i))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let mut labels = Vec::with_capacity(seqs.len() * t);
    for &i in seqs {
        let (tok, mask) = reader.get(i);
        ids.extend_from_slice(tok);
        labels.extend(
            tok.iter()
                .zip(mask)
                .map(|(&x, &m)| if m != 0 { x as i64 } else { -100 }),
        );
        ids.extend(std::iter::repeat_n(pad_id, t - tok.len()));
        labels.extend(std::iter::repeat_n(-100i64, t - tok.len()));
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (seqs.len(), t), device)?,
        labels,
    })
}
