//! `lorafleet watch` / `submit --watch` and `lorafleet logs`.

use super::output::{is_final, short, state_name};
use super::status_err;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lorafleet_proto as pb;
use lorafleet_proto::job_service_client::JobServiceClient;
use std::io::IsTerminal;
use std::time::Duration;
use lorafleet_proto::connect::AuthChannel;

const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The last `width` values as a sparkline, scaled between their min and max.
pub fn sparkline(values: &[f64], width: usize) -> String {
    let vals: Vec<f64> = values.iter().rev().take(width).rev().copied().filter(|v| v.is_finite()).collect();
    if vals.is_empty() {
        return String::new();
    }
    let (lo, hi) = vals.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    vals.iter()
        .map(|&v| {
            let t = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
            SPARKS[((t * 7.0).round() as usize).min(7)]
        })
        .collect()
}

fn eta(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Ranks shown by [`rank_summary`]; the rest are counted.
const MAX_RANKS_SHOWN: usize = 8;

/// A gang's ranks in one short line, `ranks r0@1a2b3c4d 12 tok/s, r1@5e6f7a8b 11 tok/s (step 41)`:
/// each rank with the first 8 characters of its worker id, its tokens/s and its step when
/// that is not the event's `step`. Empty for no ranks.
pub fn rank_summary(ranks: &[pb::RankStatus], step: u64) -> String {
    if ranks.is_empty() {
        return String::new();
    }
    let mut sorted: Vec<&pb::RankStatus> = ranks.iter().collect();
    sorted.sort_by_key(|r| r.rank);
    let mut parts: Vec<String> = sorted
        .iter()
        .take(MAX_RANKS_SHOWN)
        .map(|r| {
            let worker = if r.worker_id.is_empty() { "-" } else { short(&r.worker_id) };
            let tps = if r.tokens_per_sec.is_finite() { format!("{:.0}", r.tokens_per_sec) } else { "-".into() };
            let at = if r.step != step { format!(" (step {})", r.step) } else { String::new() };
            format!("r{}@{worker} {tps} tok/s{at}", r.rank)
        })
        .collect();
    if sorted.len() > MAX_RANKS_SHOWN {
        parts.push(format!("+{} more", sorted.len() - MAX_RANKS_SHOWN));
    }
    format!("ranks {}", parts.join(", "))
}

/// Follow a job until it ends; Ok only if it succeeded.
pub async fn watch(client: &mut JobServiceClient<AuthChannel>, job_id: &str) -> anyhow::Result<()> {
    let tty = std::io::stderr().is_terminal();
    let bar = ProgressBar::with_draw_target(None, if tty { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
    bar.set_style(ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg}").expect("valid template").progress_chars("█▉▊▋▌▍▎▏ "));
    let mut losses: Vec<f64> = Vec::new();
    let mut after_seq = 0u64;
    let mut last_state = pb::JobState::Unspecified as i32;
    let mut retries = 0;
    loop {
        let stream = client.watch_job(pb::WatchJobRequest { job_id: job_id.to_string(), after_seq }).await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && retries < 30 => {
                retries += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(s) => return Err(status_err(s)),
        };
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    retries = 0;
                    after_seq = ev.seq;
                    match ev.event {
                        Some(pb::job_event::Event::StateChange(c)) => {
                            last_state = c.to;
                            let mut line = if c.from == pb::JobState::Unspecified as i32 {
                                format!("{} (attempt {})", state_name(c.to), c.attempt)
                            } else {
                                format!("{} -> {} (attempt {})", state_name(c.from), state_name(c.to), c.attempt)
                            };
                            if !c.worker_id.is_empty() {
                                line.push_str(&format!(" on worker {}", &c.worker_id[..c.worker_id.len().min(8)]));
                            }
                            if !c.reason.is_empty() {
                                line.push_str(&format!(": {}", c.reason));
                            }
                            bar.println(line.clone());
                            if !tty {
                                println!("{line}");
                            }
                        }
                        Some(pb::job_event::Event::Step(s)) => {
                            losses.push(s.loss);
                            bar.set_length(s.total_steps);
                            bar.set_position(s.step);
                            let mut msg = format!("loss {:.4} lr {:.2e} {:.0} tok/s ETA {} {}", s.loss, s.lr, s.tokens_per_sec, eta(s.eta_secs), sparkline(&losses, 24));
                            if !s.ranks.is_empty() {
                                msg.push(' ');
                                msg.push_str(&rank_summary(&s.ranks, s.step));
                            }
                            // Without a terminal: about 50 lines per job, plus the last step.
                            let every = (s.total_steps / 50).max(1);
                            if !tty && (s.step % every == 0 || s.step == s.total_steps) {
                                println!("step {}/{} {msg}", s.step, s.total_steps);
                            }
                            bar.set_message(msg);
                        }
                        Some(pb::job_event::Event::Eval(e)) => {
                            let line = eval_line(&e);
                            bar.println(line.clone());
                            if !tty {
                                println!("{line}");
                            }
                            for s in e.samples {
                                let l = format!("  {} -> {}", s.prompt, s.completion.trim());
                                bar.println(l.clone());
                                if !tty {
                                    println!("{l}");
                                }
                            }
                        }
                        Some(pb::job_event::Event::Checkpoint(c)) => {
                            let line = format!("checkpoint at step {} committed", c.step);
                            bar.println(line.clone());
                            if !tty {
                                println!("{line}");
                            }
                        }
                        None => {}
                    }
                }
                Ok(None) => break,
                Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown => break,
                Err(s) => return Err(status_err(s)),
            }
        }
        if is_final(last_state) {
            break;
        }
        // The stream ended early (coordinator restart): check and resume after the last event.
        match client.get_job(pb::GetJobRequest { job_id: job_id.to_string() }).await {
            Ok(j) if is_final(j.get_ref().state) => break,
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::Unavailable && retries < 30 => retries += 1,
            Err(s) => return Err(status_err(s)),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bar.finish_and_clear();
    let job = client.get_job(pb::GetJobRequest { job_id: job_id.to_string() }).await.map_err(status_err)?.into_inner();
    let loss = job.loss.map(|l| format!(", final loss {l:.4}")).unwrap_or_default();
    println!("job {} {}{loss}{}", job.job_id, state_name(job.state), if losses.is_empty() { String::new() } else { format!(" {}", sparkline(&losses, 40)) });
    match pb::JobState::try_from(job.state) {
        Ok(pb::JobState::Succeeded) => Ok(()),
        _ if !job.error.is_empty() => anyhow::bail!("job {} {}: {}", job.job_id, state_name(job.state), job.error),
        _ => anyhow::bail!("job {} {}", job.job_id, state_name(job.state)),
    }
}

pub async fn logs(client: &mut JobServiceClient<AuthChannel>, job_id: &str, follow: bool) -> anyhow::Result<()> {
    let mut after = 0u64;
    loop {
        let r = client.get_job_logs(pb::GetJobLogsRequest { job_id: job_id.to_string(), after_seq: after, limit: 1000 }).await.map_err(status_err)?.into_inner();
        if after == 0 && r.truncated {
            println!("(older lines were dropped)");
        }
        let n = r.lines.len();
        for l in r.lines {
            after = l.seq;
            if let Some(line) = l.line {
                println!("{}  {:<5}  [epoch {}] {}", super::output::time(line.unix_ms), line.level, l.epoch, line.message);
            }
        }
        if n == 1000 {
            continue;
        }
        if !follow {
            return Ok(());
        }
        let j = client.get_job(pb::GetJobRequest { job_id: job_id.to_string() }).await.map_err(status_err)?.into_inner();
        if is_final(j.state) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkline_scales_between_min_and_max() {
        assert_eq!(sparkline(&[3.0, 2.0, 1.0], 10), "█▅▁");
        assert_eq!(sparkline(&[1.0, 1.0], 10), "▅▅");
        assert_eq!(sparkline(&[5.0, 4.0, 0.0, 8.0], 2), "▁█");
        assert_eq!(sparkline(&[], 5), "");
        assert_eq!(eta(3725.0), "1h02m");
        assert_eq!(eta(65.0), "1m05s");
    }

    #[test]
    fn rank_summary_is_compact() {
        let rank = |rank, worker: &str, step, tokens_per_sec| pb::RankStatus {
            rank,
            node_rank: rank,
            worker_id: worker.into(),
            step,
            tokens_per_sec,
            updated_at_unix_ms: 0,
        };
        assert_eq!(rank_summary(&[], 3), "");
        let ranks = [rank(1, "5e6f7a8b-0000-4000-8000-000000000002", 40, 11.4), rank(0, "1a2b3c4d-0000-4000-8000-000000000001", 41, 12.6)];
        assert_eq!(rank_summary(&ranks, 41), "ranks r0@1a2b3c4d 13 tok/s, r1@5e6f7a8b 11 tok/s (step 40)");
        assert_eq!(rank_summary(&[rank(0, "", 5, f64::NAN)], 5), "ranks r0@- - tok/s");
        let many: Vec<_> = (0..10).map(|i| rank(i, "w", 1, 1.0)).collect();
        assert!(rank_summary(&many, 1).ends_with("r7@w 1 tok/s, +2 more"), "{}", rank_summary(&many, 1));
    }
}

/// One evaluation as `watch` prints it: loss and perplexity, exact match and ROUGE-L of
/// the generated answers, and the best so far (`samples at step N:` when it had none of
/// these, only sample prompts).
pub fn eval_line(e: &pb::EvalMetrics) -> String {
    let mut parts = vec![];
    if e.eval_loss.is_finite() {
        parts.push(format!("loss {:.4} perplexity {:.2}", e.eval_loss, e.perplexity));
    }
    if let (Some(em), Some(rl)) = (e.exact_match, e.rouge_l) {
        parts.push(format!("exact match {:.1}% ROUGE-L {:.3} ({} answers)", em * 100.0, rl, e.generated));
    }
    if let Some(v) = e.best_value.filter(|_| !e.best_metric.is_empty()) {
        parts.push(format!("best {} {v:.4} at step {}", e.best_metric, e.best_step));
    }
    if parts.is_empty() {
        format!("samples at step {}:", e.step)
    } else {
        format!("eval at step {}: {}", e.step, parts.join(", "))
    }
}

#[cfg(test)]
mod eval_line_tests {
    use super::*;

    #[test]
    fn eval_lines_show_answer_metrics_and_the_best() {
        let mut e = pb::EvalMetrics { step: 8, eval_loss: 1.5, perplexity: 4.4817, ..Default::default() };
        assert_eq!(eval_line(&e), "eval at step 8: loss 1.5000 perplexity 4.48");
        (e.exact_match, e.rouge_l, e.generated) = (Some(0.5), Some(0.75), 4);
        (e.best_metric, e.best_step, e.best_value) = ("exact_match".into(), 6, Some(0.75));
        assert_eq!(eval_line(&e), "eval at step 8: loss 1.5000 perplexity 4.48, exact match 50.0% ROUGE-L 0.750 (4 answers), best exact_match 0.7500 at step 6");
        let samples_only = pb::EvalMetrics { step: 3, eval_loss: f64::NAN, ..Default::default() };
        assert_eq!(eval_line(&samples_only), "samples at step 3:");
    }
}
