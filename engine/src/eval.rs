//! Loss and evaluation. The loss of a set of examples is the total negative
//! log-likelihood of their target (answer) tokens divided by the number of those
//! tokens; perplexity is `exp(loss)`. Logits are computed only at the positions that
//! predict a target.

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::data::{BatchTensors, MicroBatch};
use crate::model::CausalLm;
use crate::Result;

/// Summed NLL (f32 scalar tensor, differentiable) of a micro-batch's targets.
pub fn nll_sum(model: &dyn CausalLm, batch: &BatchTensors) -> Result<Tensor> {
    let hidden = model.hidden_states(&batch.input)?;
    let (b, s, h) = hidden.dims3()?;
    let flat = hidden.reshape((b * s, h))?;
    let picked = flat.index_select(&batch.loss_positions, 0)?;
    let logits = model.logits(&picked)?.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let diff = logits.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = diff.broadcast_sub(&lse)?;
    let tgt = logp.gather(&batch.targets.unsqueeze(1)?, 1)?;
    Ok(tgt.sum_all()?.neg()?)
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Mean NLL per target token.
    pub loss: f64,
    pub perplexity: f64,
    /// Target tokens scored.
    pub tokens: u64,
}

/// Evaluate micro-batches (no gradients kept).
pub fn evaluate(model: &dyn CausalLm, batches: &[MicroBatch], device: &Device) -> Result<EvalResult> {
    let was_training = false;
    model.set_training(was_training);
    let mut total = 0f64;
    let mut tokens = 0u64;
    for b in batches {
        if b.target_count() == 0 {
            continue;
        }
        let t = b.to_tensors(device)?;
        let s = nll_sum(model, &t)?.detach().to_scalar::<f32>()?;
        total += s as f64;
        tokens += b.target_count() as u64;
    }
    let loss = if tokens > 0 { total / tokens as f64 } else { f64::NAN };
    Ok(EvalResult { loss, perplexity: loss.exp(), tokens })
}
