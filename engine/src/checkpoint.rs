//! Resumable training checkpoints: `work_dir/checkpoints/step-N/` holds
//! - `adapter_config.json` + `adapter_model.safetensors`: the LoRA weights (PEFT files),
//! - `optimizer.safetensors`: AdamW moments and step counts,
//! - `state.json`: step, data cursor, seed (every random stream of a run is derived
//!   from `seed` and the step, so these are the RNG states), lr schedule and the loss
//!   history so far.
//!
//! A checkpoint is written to `step-N.tmp` and renamed, so a directory named `step-N`
//! is always complete.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::DataCursor;
use crate::model::CausalLm;
use crate::optim::AdamW;
use crate::schedule::LrSchedule;
use crate::{EngineError, Result};

pub const STATE_FILE: &str = "state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// One logged optimizer step (kept in checkpoints so metrics survive a resume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub version: u32,
    pub step: u64,
    pub total_steps: u64,
    pub cursor: DataCursor,
    pub seed: u64,
    /// Dropout masks of step `s`, micro-batch `m` come from `dropout_seed(seed, s, m)`.
    pub dropout_stream: String,
    pub schedule: LrSchedule,
    pub tokens_seen: u64,
    pub history: Vec<StepRecord>,
}

/// The dropout seed of one micro-batch (SplitMix64 of seed, step and micro index).
pub fn dropout_seed(seed: u64, step: u64, micro: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ micro.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub fn checkpoint_dir(work_dir: &Path, step: u64) -> PathBuf {
    work_dir.join("checkpoints").join(format!("step-{step}"))
}

/// Write a complete checkpoint.
pub fn save(work_dir: &Path, state: &TrainState, model: &dyn CausalLm, base_model: &str, opt: &AdamW) -> Result<PathBuf> {
    let dir = checkpoint_dir(work_dir, state.step);
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| EngineError::file(&tmp, format!("cannot clear: {e}")))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| EngineError::file(&tmp, format!("cannot create checkpoint directory: {e}")))?;
    crate::peft::save_adapter(model, &tmp, base_model)?;
    opt.save(&tmp.join(OPTIMIZER_FILE))?;
    let sp = tmp.join(STATE_FILE);
    std::fs::write(&sp, serde_json::to_string_pretty(state).expect("json")).map_err(|e| EngineError::file(&sp, format!("cannot write: {e}")))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| EngineError::file(&dir, format!("cannot replace: {e}")))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| EngineError::file(&dir, format!("cannot finish checkpoint: {e}")))?;
    Ok(dir)
}

/// Read a checkpoint's state, restoring the LoRA weights and optimizer moments.
pub fn restore(dir: &Path, model: &dyn CausalLm, opt: &mut AdamW) -> Result<TrainState> {
    let sp = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&sp).map_err(|e| EngineError::file(&sp, format!("not a checkpoint: {e}")))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| EngineError::file(&sp, format!("malformed checkpoint state: {e}")))?;
    crate::peft::load_adapter_weights(model, dir)?;
    opt.load(&dir.join(OPTIMIZER_FILE))?;
    Ok(state)
}
