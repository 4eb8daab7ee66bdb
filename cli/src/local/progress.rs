//! The `lorafleet train` progress bar: step, loss, lr, tokens/s and ETA; evaluations
//! (loss, perplexity, exact match, ROUGE-L, the best so far) and the run's notices (early
//! stopping, the best adapter kept) as lines above it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lorafleet_engine::train::{EvalMetrics, StepMetrics, TrainObserver};

pub struct CliObserver {
    bar: Option<ProgressBar>,
    /// Set by Ctrl-C: the loop stops before its next step.
    pub stop: Arc<AtomicBool>,
    /// The last checkpoint written (to tell the user how to resume).
    pub last_checkpoint: Option<std::path::PathBuf>,
    pub last_step: u64,
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
        Self { bar, stop: Arc::new(AtomicBool::new(false)), last_checkpoint: None, last_step: 0 }
    }

    /// Stop cleanly on Ctrl-C (a second Ctrl-C exits at once).
    pub fn stop_on_ctrl_c(&self) {
        let stop = self.stop.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("\nstopping after the current step (Ctrl-C again to abort)");
                    stop.store(true, Ordering::SeqCst);
                }
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            });
        });
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl TrainObserver for CliObserver {
    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn on_checkpoint(&mut self, step: u64, dir: &std::path::Path) -> lorafleet_engine::Result<()> {
        self.last_checkpoint = Some(dir.to_path_buf());
        let line = format!("checkpoint at step {step}: {}", dir.display());
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
        Ok(())
    }

    fn on_start(&mut self, total_steps: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total_steps);
        }
    }

    fn on_step(&mut self, m: &StepMetrics) {
        self.last_step = m.step;
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
        if let Some(l) = eval_line(m) {
            lines.push(l);
        }
        for (p, a) in &m.samples {
            lines.push(format!("  {p} -> {a}"));
        }
        for l in lines {
            self.println(l);
        }
    }

    /// Info notices (early stopping, the best adapter kept); warnings already reach the
    /// terminal through the log.
    fn on_notice(&mut self, level: &str, message: &str) {
        if level == "info" {
            self.println(message.to_string());
        }
    }
}

impl CliObserver {
    fn println(&self, l: String) {
        match &self.bar {
            Some(b) => b.println(l),
            None => eprintln!("{l}"),
        }
    }
}

/// `eval at step 20: loss 1.2345 perplexity 3.437 (512 tokens), exact match 25.0% ROUGE-L
/// 0.612 (8 answers), best eval_loss 1.2345 at step 20`; `None` when the evaluation had
/// neither eval data nor generated answers (sample prompts only).
pub fn eval_line(m: &EvalMetrics) -> Option<String> {
    let mut parts = vec![];
    if m.tokens > 0 {
        parts.push(format!("loss {:.4} perplexity {:.3} ({} tokens)", m.loss, m.perplexity, m.tokens));
    }
    if let (Some(em), Some(rl)) = (m.exact_match, m.rouge_l) {
        parts.push(format!("exact match {:.1}% ROUGE-L {:.3} ({} answers)", em * 100.0, rl, m.generated));
    }
    if let Some(b) = &m.best {
        parts.push(format!("best {} {:.4} at step {}", b.metric, b.value, b.step));
    }
    (!parts.is_empty()).then(|| format!("eval at step {}: {}", m.step, parts.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lorafleet_engine::checkpoint::BestRecord;

    #[test]
    fn eval_line_shows_the_answer_metrics_and_the_best() {
        let mut m = EvalMetrics { step: 20, loss: 1.23456, perplexity: 3.4368, tokens: 512, samples: vec![], exact_match: None, rouge_l: None, generated: 0, best: None };
        assert_eq!(eval_line(&m).unwrap(), "eval at step 20: loss 1.2346 perplexity 3.437 (512 tokens)");
        (m.exact_match, m.rouge_l, m.generated) = (Some(0.25), Some(0.6123), 8);
        m.best = Some(BestRecord { metric: "rouge_l".into(), step: 10, value: 0.7 });
        assert_eq!(
            eval_line(&m).unwrap(),
            "eval at step 20: loss 1.2346 perplexity 3.437 (512 tokens), exact match 25.0% ROUGE-L 0.612 (8 answers), best rouge_l 0.7000 at step 10"
        );
        let none = EvalMetrics { tokens: 0, exact_match: None, rouge_l: None, best: None, ..m };
        assert_eq!(eval_line(&none), None);
    }
}
