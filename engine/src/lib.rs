//! lorafleet engine: Hugging Face causal LMs in candle with NF4 frozen weights and
//! trainable LoRA adapters (PEFT-exact), data loading, training, evaluation and
//! generation. No networking: the worker and the CLI call this library.
//!
//! Module map (see docs/architecture.md):
//! - `model`: the `CausalLm` contract, HF config parsing, Llama-family and Falcon models.
//! - `nf4`: bitsandbytes-exact NF4 quantization; `ops`: the frozen linear custom ops and
//!   differentiable building blocks; `fused`: single-op forms of the hot chains (LoRA
//!   layer, attention, RoPE, RMSNorm, SwiGLU) for f32 and bf16 CPU compute; `blas`,
//!   `kernels` and `kernels_bf16`: the matrix products they run on (`gemv`: their
//!   decoding form, one to four activation rows).
//! - `lora`: LoRA layers and PEFT adapter files.
//! - `data`, `optim`, `train`, `eval`, `answer_metrics`, `generate`: the training side; `memory`: a
//!   training run's peak memory estimate and the check that refuses a run that cannot fit.
//! - `demo`, `synth`, `bench`: random models (tiny ones, and 7B-shape checkpoints) and
//!   benchmarks.

pub mod error;
pub mod model;
pub mod nf4;
pub mod ops;
pub mod fused;
pub mod blas;
pub mod kernels;
pub mod kernels_bf16;
pub(crate) mod gemv;
pub mod lora;
pub mod multi_lora;
pub mod peft;
pub mod quantize;
pub mod merge;
pub mod gguf;
pub mod tokenizer;
pub mod chat_template;
pub mod data;
pub mod optim;
pub mod schedule;
pub mod eval;
pub mod answer_metrics;
pub mod generate;
pub mod demo;
pub mod synth;
pub mod memory;
pub mod checkpoint;
pub mod collective;
pub mod train;
pub mod bench;
pub mod profile;

pub use error::{EngineError, Result};
