//! Wall-clock totals per op for `lorafleet bench train --ops`: where a training step's
//! time goes. Each custom op of [`crate::fused`], [`crate::ops`] and [`crate::eval`]
//! opens a [`span`] around its CPU work, forward and backward separately; what no span
//! covers (candle's own element-wise ops, copies, the backward graph's bookkeeping,
//! allocation) is the step time minus their sum. Off unless [`enable`]d: a span is then
//! one relaxed atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// What a span measures (its discriminant indexes the totals, in [`Op::ALL`]'s order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    LoraFwd,
    LoraBwd,
    FrozenFwd,
    FrozenBwd,
    AttentionFwd,
    AttentionBwd,
    RopeFwd,
    RopeBwd,
    NormFwd,
    NormBwd,
    SwigluFwd,
    SwigluBwd,
    LossFwd,
    LossBwd,
}

impl Op {
    pub const ALL: [Op; 14] = [
        Op::LoraFwd,
        Op::LoraBwd,
        Op::FrozenFwd,
        Op::FrozenBwd,
        Op::AttentionFwd,
        Op::AttentionBwd,
        Op::RopeFwd,
        Op::RopeBwd,
        Op::NormFwd,
        Op::NormBwd,
        Op::SwigluFwd,
        Op::SwigluBwd,
        Op::LossFwd,
        Op::LossBwd,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::LoraFwd => "LoRA linear (frozen + LoRA products) forward",
            Op::LoraBwd => "LoRA linear backward (input, A, B gradients)",
            Op::FrozenFwd => "frozen linear without LoRA (output head) forward",
            Op::FrozenBwd => "frozen linear without LoRA (output head) input gradient",
            Op::AttentionFwd => "attention forward",
            Op::AttentionBwd => "attention backward",
            Op::RopeFwd => "rotary embedding forward",
            Op::RopeBwd => "rotary embedding backward",
            Op::NormFwd => "RMSNorm forward",
            Op::NormBwd => "RMSNorm backward",
            Op::SwigluFwd => "SwiGLU forward",
            Op::SwigluBwd => "SwiGLU backward",
            Op::LossFwd => "cross-entropy forward",
            Op::LossBwd => "cross-entropy backward",
        }
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; Op::ALL.len()] = [const { AtomicU64::new(0) }; Op::ALL.len()];
static CALLS: [AtomicU64; Op::ALL.len()] = [const { AtomicU64::new(0) }; Op::ALL.len()];

/// Turn the spans on or off (process-wide).
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Zero the totals.
pub fn reset() {
    NANOS.iter().chain(&CALLS).for_each(|a| a.store(0, Ordering::Relaxed));
}

/// `(op, seconds, calls)` since the last [`reset`], for the ops that ran.
pub fn totals() -> Vec<(Op, f64, u64)> {
    Op::ALL
        .iter()
        .map(|&op| (op, NANOS[op as usize].load(Ordering::Relaxed) as f64 * 1e-9, CALLS[op as usize].load(Ordering::Relaxed)))
        .filter(|&(_, _, calls)| calls > 0)
        .collect()
}

/// A running span: adds its wall time to `op` when dropped.
pub struct Span(Option<(Op, Instant)>);

/// Time the rest of the scope as `op` (when enabled).
pub fn span(op: Op) -> Span {
    Span(ON.load(Ordering::Relaxed).then(|| (op, Instant::now())))
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((op, t0)) = self.0 {
            NANOS[op as usize].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            CALLS[op as usize].fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_the_ops_in_discriminant_order() {
        assert!(Op::ALL.iter().enumerate().all(|(i, &op)| op as usize == i));
    }

    #[test]
    fn spans_add_up_only_when_enabled() {
        reset();
        drop(span(Op::RopeFwd));
        assert!(totals().iter().all(|&(op, _, _)| op != Op::RopeFwd), "disabled spans count nothing");
        enable(true);
        {
            let _s = span(Op::RopeFwd);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        enable(false);
        let t = totals();
        let (_, secs, calls) = t.iter().find(|(op, _, _)| *op == Op::RopeFwd).copied().expect("the span was counted");
        assert!(calls >= 1);
        assert!(secs >= 0.002, "{secs}");
    }
}
