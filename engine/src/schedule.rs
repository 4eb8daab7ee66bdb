//! Learning-rate schedules, as Hugging Face transformers defines them
//! (`get_cosine_schedule_with_warmup`, `get_linear_schedule_with_warmup`,
//! `get_constant_schedule_with_warmup`): a multiplier of the base lr evaluated at the
//! number of optimizer steps already taken (so the first step of a warm-up runs at 0,
//! as in HF's `LambdaLR`).

use lorafleet_shared::spec::{Schedule, TrainingSpec};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub kind: Schedule,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

/// HF's `TrainingArguments.get_warmup_steps`: `warmup_steps` if set, else
/// `ceil(total * warmup_ratio)`.
pub fn warmup_steps(spec: &TrainingSpec, total_steps: u64) -> u64 {
    match spec.warmup_steps {
        Some(w) => w,
        None => (total_steps as f64 * spec.warmup_ratio).ceil() as u64,
    }
}

impl LrSchedule {
    pub fn new(kind: Schedule, base_lr: f64, warmup_steps: u64, total_steps: u64) -> Self {
        Self { kind, base_lr, warmup_steps, total_steps }
    }

    pub fn from_spec(spec: &TrainingSpec, total_steps: u64) -> Self {
        Self::new(spec.schedule, spec.lr, warmup_steps(spec, total_steps), total_steps)
    }

    /// The multiplier after `step` optimizer steps.
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            Schedule::Constant => 1.0,
            Schedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Schedule::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate used by optimizer step number `step + 1`.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn cosine_with_warmup_matches_hf() {
        // get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10), lr 1e-3
        let s = LrSchedule::new(Schedule::Cosine, 1e-3, 2, 10);
        close(s.lr(0), 0.0);
        close(s.lr(1), 0.5e-3);
        close(s.lr(2), 1e-3);
        // progress 1/8: 0.5 * (1 + cos(pi/8)) = 0.9619397662556434
        close(s.lr(3), 0.9619397662556434e-3);
        // progress 4/8: 0.5
        close(s.lr(6), 0.5e-3);
        close(s.lr(10), 0.0);
    }

    #[test]
    fn linear_and_constant_match_hf() {
        let s = LrSchedule::new(Schedule::Linear, 2.0, 1, 5);
        let got: Vec<f64> = (0..6).map(|i| s.lr(i)).collect();
        // warmup 0/1; then (5 - s) / 4
        let want = [0.0, 2.0, 1.5, 1.0, 0.5, 0.0];
        for (g, w) in got.iter().zip(want) {
            close(*g, w);
        }
        let c = LrSchedule::new(Schedule::Constant, 0.01, 0, 12);
        close(c.lr(0), 0.01);
        close(c.lr(11), 0.01);
        let cw = LrSchedule::new(Schedule::Constant, 1.0, 4, 12);
        close(cw.lr(1), 0.25);
        close(cw.lr(4), 1.0);
    }

    #[test]
    fn warmup_ratio_rounds_up() {
        let mut t = TrainingSpec { warmup_ratio: 0.05, ..Default::default() };
        assert_eq!(warmup_steps(&t, 80), 4);
        assert_eq!(warmup_steps(&t, 81), 5); // ceil(4.05)
        t.warmup_steps = Some(0);
        assert_eq!(warmup_steps(&t, 81), 0);
    }
}
