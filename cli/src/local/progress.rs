//! The `lorafleet train` progress bar: step, loss, lr, tokens/s and ETA.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lorafleet_engine::train::{EvalMetrics, StepMetrics, TrainObserver};

pub struct CliObserver {
    bar: Option<ProgressBar>,
}

impl CliObserver {
    pub fn new(show: bool) -> Self {
        let bar = show.then(|| {
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template("{bar:30.cyan/blue} step {pos}/{len} {msg} ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b
        });
        Self { bar }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl TrainObserver for CliObserver {
    fn on_start(&mut self, total_steps: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total_steps);
        }
    }

    fn on_step(&mut self, m: &StepMetrics) {
        match &self.bar {
            Some(b) => {
                b.set_position(m.step);
                b.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s", m.loss, m.lr, m.tokens_per_sec));
            }
            None => eprintln!(
                "step {}/{} loss {:.4} lr {:.2e} grad_norm {:.3} {:.0} tok/s eta {:.0}s",
                m.step, m.total_steps, m.loss, m.lr, m.grad_norm, m.tokens_per_sec, m.eta_secs
            ),
        }
    }

    fn on_eval(&mut self, m: &EvalMetrics) {
        let mut lines = vec![];
        if m.tokens > 0 {
            lines.push(format!("eval at step {}: loss {:.4} perplexity {:.3} ({} tokens)", m.step, m.loss, m.perplexity, m.tokens));
        }
        for (p, a) in &m.samples {
            lines.push(format!("  {p} -> {a}"));
        }
        for l in lines {
            match &self.bar {
                Some(b) => b.println(l),
                None => eprintln!("{l}"),
            }
        }
    }
}
