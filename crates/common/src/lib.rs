//! dialora's shared library: the Llama-family model with LoRA, formats between stages,
//! tokenizer and chat templates. The binaries (dataprep, trainer, merger, infer) are thin
//! command-line layers over this crate.

pub mod config;
pub mod fsutil;
pub mod gguf;
pub mod lora;
pub mod model;
pub mod tokenizer;
pub mod weights;

pub use config::ModelConfig;
pub use lora::{Adapter, LoraConfig};
pub use model::{Batch, Grads, KvCache, Llama, TrainCtx};
pub mod bench;
pub mod chat;
pub mod data;
pub mod device;
pub mod generate;
pub mod infer;
pub mod merge;
pub mod progress;
pub mod report;
pub mod testing;
pub mod train;
