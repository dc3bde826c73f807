//! dialora's shared library: the Llama-family model with LoRA, the formats between stages,
//! tokenizer and chat templates, and the work of every stage. The binaries (dataprep, trainer,
//! merger, infer and their helpers) parse arguments and call into this crate.
//!
//! | module | concept |
//! |---|---|
//! | `config` | a model directory's `config.json` |
//! | `weights` | memory-mapped safetensors in, safetensors out |
//! | `atomic` | every output written under a temporary name and renamed into place |
//! | `gguf` | llama.cpp GGUF files: import as a model directory, export (with an adapter merged) |
//! | `tokenizer`, `chat` | tokenizers and chat templates (with the end-of-turn marker) |
//! | `data` | dataprep: conversation formats, labels, shards |
//! | `model` | the decoder with LoRA, forward and backward |
//! | `lora` | PEFT adapter config and files, LoRA initialisation |
//! | `train` | the training loop, its arguments and records |
//! | `merge` | folding an adapter into its base |
//! | `generate` | decoding settings, and the one-sequence reference generation loop |
//! | `engine` | the batched generation engine: scheduler, per-sequence caches and adapters |
//! | `infer` | inference sessions over the engine, base-vs-tuned comparison |
//! | `serve` | the OpenAI-compatible HTTP server of `infer --serve` |
//! | `report` | the HTML run comparison |
//! | `bench` | the LoRA training benchmark |
//! | `decode_bench` | the decode-step benchmark and the memory-read bandwidth that bounds it |
//! | `device`, `progress` | device/dtype arguments, CPU threads, memory; progress output |
//! | `cli` | exit statuses, one-line errors, stdout that may close (`| head`) |

pub mod atomic;
pub mod bench;
pub mod chat;
pub mod cli;
pub mod config;
pub mod data;
pub mod decode_bench;
pub mod device;
pub mod engine;
pub mod generate;
pub mod gguf;
pub mod infer;
pub mod lora;
pub mod merge;
pub mod model;
pub mod progress;
pub mod report;
pub mod serve;
pub mod study;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use config::ModelConfig;
pub use lora::{Adapter, LoraConfig};
pub use model::{Batch, Grads, KvCache, Llama, TrainCtx};
