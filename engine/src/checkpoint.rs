//! Resumable training checkpoints: `work_dir/checkpoints/step-N/` holds
//! - `adapter_config.json` + `adapter_model.safetensors`: the LoRA weights (PEFT files),
//! - `optimizer.safetensors`: AdamW moments and step counts,
//! - `state.json`: step, data cursor, seed (every random stream of a run is derived
//!   from `seed` and the step, so these are the RNG states), lr schedule and the loss
//!   history so far.
//!
//! - `best/` (runs with `training.save_best`, once an evaluation was best): the best
//!   adapter so far (PEFT files and `best.json`), so that it survives a resume on another
//!   machine along with the rest of the checkpoint.
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
/// The best adapter's directory, in a run's output and in its checkpoints.
pub const BEST_DIR: &str = "best";
/// In [`BEST_DIR`]: the [`BestRecord`] of the adapter there.
pub const BEST_FILE: &str = "best.json";

/// The best evaluation so far of the metric `save_best` / `early_stopping` follow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestRecord {
    /// `eval_loss`, `exact_match` or `rouge_l`.
    pub metric: String,
    pub step: u64,
    pub value: f64,
}

/// One evaluation (kept in checkpoints so the eval points of the loss plot and
/// metrics.jsonl survive a resume). `loss` is absent when there was no eval data (only
/// sample prompts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    #[serde(default)]
    pub loss: Option<f64>,
    #[serde(default)]
    pub exact_match: Option<f64>,
    #[serde(default)]
    pub rouge_l: Option<f64>,
}

/// Early stopping's count: `reference` is the value of the last evaluation that improved
/// on the one before by more than `min_delta` (the first evaluation sets it), `bad_evals`
/// the evaluations since that did not.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PatienceState {
    pub reference: Option<f64>,
    pub bad_evals: u32,
}

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
    /// Evaluations so far (absent in checkpoints written before evaluations were kept).
    #[serde(default)]
    pub evals: Vec<EvalRecord>,
    /// The best evaluation so far of the tracked metric (`save_best` / `early_stopping`).
    #[serde(default)]
    pub best: Option<BestRecord>,
    #[serde(default)]
    pub patience: PatienceState,
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
    save_with_best(work_dir, state, model, base_model, opt, None)
}

/// Write a complete checkpoint that also carries the best adapter so far (the files of
/// `best`, copied into its [`BEST_DIR`]).
pub fn save_with_best(work_dir: &Path, state: &TrainState, model: &dyn CausalLm, base_model: &str, opt: &AdamW, best: Option<&Path>) -> Result<PathBuf> {
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
    if let Some(b) = best {
        copy_files(b, &tmp.join(BEST_DIR))?;
    }
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

/// Copy the files of `from` (not recursive) into `to`, replacing `to`: written to
/// `to.tmp` and renamed, so `to` is always complete.
pub fn copy_files(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| EngineError::file(&tmp, format!("cannot create: {e}")))?;
    let entries = std::fs::read_dir(from).map_err(|e| EngineError::file(from, format!("cannot read: {e}")))?;
    for e in entries {
        let e = e.map_err(|e| EngineError::file(from, format!("cannot read: {e}")))?;
        if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            let dst = tmp.join(e.file_name());
            std::fs::copy(e.path(), &dst).map_err(|err| EngineError::file(&dst, format!("cannot copy {}: {err}", e.path().display())))?;
        }
    }
    if to.exists() {
        std::fs::remove_dir_all(to).map_err(|e| EngineError::file(to, format!("cannot replace: {e}")))?;
    }
    std::fs::rename(&tmp, to).map_err(|e| EngineError::file(to, format!("cannot finish: {e}")))
}
