//! The contract between the models and the training side.
//!
//! A model is loaded from a Hugging Face directory with [`LoadOptions`] (quantization,
//! compute dtype, LoRA settings) and used through [`CausalLm`]. The training side
//! never touches architecture details: it calls `hidden_states` + `logits` (so logits
//! are computed only for the positions that carry loss), then `backward` to get the
//! LoRA gradients keyed by their PEFT names.

use candle_core::{Tensor, Var};
use std::collections::BTreeMap;

use crate::Result;

pub mod config;
pub mod falcon;
pub mod llama;
pub mod loader;
pub mod transformer;
pub mod weights;

pub use config::{ArchConfig, ModelConfig};
pub use loader::{activation_dtype, load_model, read_model_config, read_model_info, LoadOptions, LoraInit, LoraSettingsRequest, Quant};

/// What every architecture exposes.
pub trait CausalLm: Send + Sync {
    /// Facts the training side needs (vocab, eos, architecture name...).
    fn info(&self) -> &ModelInfo;

    /// Final hidden states `[batch, seq, hidden]` (after the final norm), in the compute
    /// dtype. `input_ids` is `[batch, seq]` u32. Causal attention; right padding needs
    /// no mask (real tokens never attend to later positions).
    fn hidden_states(&self, input: &ForwardInput) -> Result<Tensor>;

    /// The output head applied to hidden states `[n, hidden]` or `[b, s, hidden]`;
    /// returns f32 logits.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor>;

    /// [`CausalLm::logits`] in the compute dtype (bf16 logits stay bf16): for a loss that
    /// reads them as they are, saving two conversions of every logit.
    fn logits_compute(&self, hidden: &Tensor) -> Result<Tensor> {
        self.logits(hidden)
    }

    /// The summed cross-entropy of `hidden [n, hidden]` (final hidden states of the
    /// labelled positions) against `targets [n]`, an f32 scalar, differentiable.
    fn head_loss(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        crate::eval::head_loss_from_logits(self, hidden, targets)
    }

    /// Incremental decoding with a KV cache: feed the new tokens `[batch, new]`, get
    /// f32 logits of the last position `[batch, vocab]`.
    fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor>;

    /// Batched serving: the new tokens of several sequences, each with its own cache and
    /// adapter, in one pass (continuous batching: some sequences may be prompts, others
    /// one decoding step). Returns f32 logits of each sequence's last new token
    /// `[seqs, vocab]`; every cache grows by its sequence's new tokens.
    fn forward_packed(&self, _seqs: &mut [crate::multi_lora::PackedSeq<'_>]) -> Result<Tensor> {
        Err(crate::EngineError::Config(format!("{}: batched serving is not supported by this model", self.info().model_type)))
    }

    /// The frozen linear modules by path, with `(out, in)` (for checking adapters).
    fn linear_shapes(&self) -> Vec<(String, usize, usize)> {
        Vec::new()
    }

    /// Backpropagate a scalar loss. Returns the gradient of every LoRA parameter, keyed
    /// by its PEFT key, with `None` for none. (Gradient checkpointing computes part of
    /// the gradients inside recomputation, which is why this goes through the model.)
    fn backward(&self, loss: &Tensor) -> Result<BTreeMap<String, Tensor>>;

    /// The trainable LoRA parameters keyed by PEFT key
    /// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), f32.
    fn lora_params(&self) -> &BTreeMap<String, Var>;

    /// Training mode turns LoRA dropout on; dropout masks come from a ChaCha RNG seeded
    /// by `set_dropout_seed` so runs are reproducible.
    fn set_training(&self, training: bool);
    fn set_dropout_seed(&self, seed: u64);
    fn set_gradient_checkpointing(&self, on: bool);
}

/// Input of a training/eval forward pass.
pub struct ForwardInput {
    /// `[batch, seq]` u32.
    pub input_ids: Tensor,
    /// `[batch, seq]` u32 positions; `None` means 0..seq for each row.
    pub position_ids: Option<Tensor>,
    /// `[batch, seq]` u32 segment ids for packed sequences: a token attends only to
    /// earlier tokens of the same segment. `None`: one segment per row.
    pub segment_ids: Option<Tensor>,
}

/// Architecture-independent facts about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// `model_type` from config.json (`llama`, `mistral`, `qwen2`, `falcon`).
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub max_position_embeddings: usize,
    /// The LoRA config in effect (target modules resolved).
    pub lora: Option<crate::model::LoraSettings>,
}

/// Resolved LoRA settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub rslora: bool,
    /// Module names (last path component) that carry adapters.
    pub target_modules: Vec<String>,
}

impl LoraSettings {
    pub fn scaling(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// Per-layer key/value cache for generation.
#[derive(Default)]
pub struct KvCache {
    /// `(k, v)` per layer, `[batch, kv_heads, seq, head_dim]`.
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// Number of positions already cached.
    pub seq_len: usize,
}
