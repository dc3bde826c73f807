//! The Llama-family decoder (Llama, Mistral, Qwen2-style q/k/v bias; GQA; tied or untied head)
//! with LoRA on any subset of q,k,v,o,gate,up,down_proj.
//!
//! One forward serves inference (with a KV cache) and training; training additionally keeps
//! what each op's hand-written backward needs, and only LoRA matrices get gradients (candle's
//! autograd would also compute `dW` of every frozen weight).
//!
//! | file | what |
//! |---|---|
//! | `llama.rs` | the decoder: embedding, blocks (RMSNorm + attention + MLP), head, KV cache |
//! | `attention.rs` | RoPE and grouped-query causal attention, forward and backward |
//! | `kv.rs` | the key/value cache; on the CPU in f32 the attention of every cached sequence of a step in one pass |
//! | `mlp.rs` | SwiGLU feed-forward, forward and backward |
//! | `linear.rs` | frozen linear + LoRA branch with dropout |
//! | `loss.rs` | chunked ignore-index cross-entropy and its gradient |
//! | `ops.rs` | the fused kernels (softmax, RMSNorm, SwiGLU, dropout, cross-entropy, with their backward) as custom ops: CPU body, CUDA body (`kernels/ops.cu`), plain-candle reference |
//! | `matmul.rs` | GEMMs without zero-fill, and accumulating into an output; the row kernel of decode (f32, bf16); a step's LoRA terms (`add_lora_rows`); `prefetch`, weights asked for ahead |
//! | `q8.rs` | the q8_0 × q8_0 and q5_0 × q8_0 products of decode and prefill (weight rows in groups of eight, one `vpdpbusd` for eight outputs) |
//! | `kquant.rs` | the q4_k and q6_k products of decode and prefill: candle's `vec_dot` per output, on the step's threads |
//! | `team.rs` | a forward step's threads kept on hand between its parallel loops (`par_for`) |
//! | `init.rs` | random weights for a config (benchmarks, tests) |

mod attention;
pub mod init;
mod kquant;
mod kv;
mod linear;
mod llama;
mod loss;
pub(crate) mod matmul;
mod mlp;
pub mod ops;
pub(crate) mod q8;
mod team;

pub use linear::{AdapterBranches, Lora, LoraLinear, Packed};
pub use llama::{KvCache, Llama, StepSeq, WeightFormat};
pub use loss::{Batch, LossStats};
pub use matmul::{prefetch, rows_matmul};
pub use q8::{time_product, ProductTiming};

use candle_core::{Result, Tensor};

/// Per-micro-step training context.
#[derive(Debug, Clone, Copy)]
pub struct TrainCtx {
    /// Run seed (dropout streams derive from it).
    pub seed: u64,
    /// Global micro-step counter: selects the dropout masks.
    pub micro_step: u64,
    /// Gradient checkpointing: recompute each block's activations in the backward instead of
    /// keeping them.
    pub gradient_checkpointing: bool,
    /// NEFTune noise on the input embeddings (training only).
    pub neftune_noise_alpha: Option<f64>,
}

/// Runs `f` on a thread of the compute pool (rayon's global pool, which candle and the kernels
/// split their work over), or right here when this is one. A forward makes a few hundred
/// parallel products; called from outside the pool, each would wake a worker and put this
/// thread to sleep until it is done, which costs more than the product of one decode row.
/// From inside, this thread takes its share and the other workers, still awake from the last
/// product, take theirs.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Accumulated LoRA gradients, indexed by `Lora::id`.
#[derive(Default)]
pub struct Grads {
    pub a: Vec<Option<Tensor>>,
    pub b: Vec<Option<Tensor>>,
}

impl Grads {
    pub fn new(n: usize) -> Self {
        Grads {
            a: vec![None; n],
            b: vec![None; n],
        }
    }

    pub fn add(&mut self, id: usize, da: &Tensor, db: &Tensor) -> Result<()> {
        for (slot, g) in [(&mut self.a[id], da), (&mut self.b[id], db)] {
            *slot = Some(match slot.take() {
                Some(prev) => (prev + g)?,
                None => g.clone(),
            });
        }
        Ok(())
    }

    /// The gradients as one list `[dA_0, dB_0, dA_1, dB_1, ...]` (the optimizer's parameter
    /// order); every module must have received one.
    pub fn into_flat(self) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(2 * self.a.len());
        for (id, (a, b)) in self.a.into_iter().zip(self.b).enumerate() {
            match (a, b) {
                (Some(a), Some(b)) => out.extend([a, b]),
                _ => candle_core::bail!("no gradient for LoRA module {id}"),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests;
