//! Continuous batching on one engine thread.
//!
//! Requests queue on a channel. Before every pass the thread admits queued requests up to
//! `max_batch` live sequences, then builds one packed pass
//! ([`CausalLm::forward_packed`]): every decoding sequence contributes its last token,
//! and prompts contribute chunks from a budget of `max_batch_tokens` prompt tokens per
//! pass (long prompts are fed over several passes, so decoding streams keep flowing).
//! Sequences are ordered by adapter, so each adapter's rows are one range. A sequence
//! whose prompt is fully fed samples a token from its own seeded RNG; text is decoded
//! incrementally, held back while it could be the start of a stop sequence, and sent to
//! the request's channel. A request whose receiver is gone (client disconnected) is
//! dropped before the next pass.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::DType;
use lorafleet_engine::generate::{sample_next, GenerateOptions};
use lorafleet_engine::model::{CausalLm, KvCache};
use lorafleet_engine::multi_lora::{PackedSeq, ServedAdapter};
use lorafleet_engine::tokenizer::{StreamDecoder, Tokenizer};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;

use super::metrics::ServeMetrics;

/// One generation to run.
pub struct Job {
    pub prompt: Vec<u32>,
    pub adapter: Option<Arc<ServedAdapter>>,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Drop the leading space of the answer (the template protocol's separator).
    pub trim_start: bool,
    pub events: mpsc::UnboundedSender<Event>,
    pub queued_at: Instant,
}

/// What a request hears back.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Text(String),
    /// The generation ended: `stopped` by a stop token or sequence (else by length).
    Done { stopped: bool, completion_tokens: usize },
    Failed(String),
}

#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Live sequences per pass.
    pub max_batch: usize,
    /// Prompt tokens per pass (decoding tokens come on top).
    pub max_batch_tokens: usize,
    /// Requests waiting for a place in the batch.
    pub max_queue: usize,
}

/// The handle requests are submitted through.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Job>,
    queued: Arc<AtomicUsize>,
    max_queue: usize,
}

impl Batcher {
    /// Start the engine thread over `model`.
    pub fn start(model: Box<dyn CausalLm>, tok: Arc<Tokenizer>, limits: BatchLimits, metrics: Arc<ServeMetrics>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        std::thread::Builder::new().name("lorafleet-serve-engine".into()).spawn(move || run(model.as_ref(), &tok, rx, limits, &q, &metrics))?;
        Ok(Self { tx, queued, max_queue: limits.max_queue })
    }

    /// Queue a job; `Err` when the queue is full or the engine has stopped.
    pub fn submit(&self, job: Job) -> Result<(), String> {
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(format!("the server is at capacity ({} requests waiting); retry later", self.max_queue));
        }
        self.tx.send(job).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            "the engine has stopped".to_string()
        })
    }
}

/// Text to send, held back while it could be the start of a stop sequence.
pub struct TextOut {
    stop: Vec<String>,
    trim_start: bool,
    text: String,
    sent: usize,
}

impl TextOut {
    pub fn new(stop: Vec<String>, trim_start: bool) -> Self {
        Self { stop, trim_start, text: String::new(), sent: 0 }
    }

    /// Add a decoded piece; returns the text now safe to send, and whether a stop
    /// sequence ended the generation (the text up to it is returned, the rest dropped).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        let piece = if self.trim_start && self.text.is_empty() { piece.trim_start() } else { piece };
        let from = self.sent;
        self.text.push_str(piece);
        // The earliest stop sequence in the unsent text (it may start in held-back text).
        let hit = self.stop.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
        if let Some(end) = hit {
            let out = self.text[from..end].to_string();
            self.sent = end;
            return (out, true);
        }
        let hold = self.held_suffix();
        let end = self.text.len() - hold;
        let out = self.text[from..end].to_string();
        self.sent = end;
        (out, false)
    }

    /// Everything not sent yet (at the end of a generation not ended by a stop sequence).
    pub fn flush(&mut self) -> String {
        let out = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        out
    }

    /// Bytes at the end of the unsent text that begin some stop sequence.
    fn held_suffix(&self) -> usize {
        let unsent = &self.text[self.sent..];
        let mut hold = 0;
        for s in &self.stop {
            for (i, _) in unsent.char_indices() {
                let tail = &unsent[i..];
                if tail.len() < s.len() && s.starts_with(tail) {
                    hold = hold.max(tail.len());
                    break;
                }
            }
        }
        hold
    }
}

struct Live<'t> {
    job: Job,
    cache: KvCache,
    /// Tokens not fed yet (the prompt, then the last sampled token).
    pending: Vec<u32>,
    opts: GenerateOptions,
    rng: ChaCha8Rng,
    dec: StreamDecoder<'t>,
    out: TextOut,
    generated: usize,
}

impl<'t> Live<'t> {
    fn new(job: Job, tok: &'t Tokenizer, eos: &[u32]) -> Self {
        let opts = GenerateOptions { max_new_tokens: job.max_tokens, temperature: job.temperature, top_p: job.top_p, top_k: 0, seed: job.seed, stop_ids: eos.to_vec() };
        Self {
            cache: KvCache::default(),
            pending: job.prompt.clone(),
            rng: ChaCha8Rng::seed_from_u64(job.seed),
            dec: tok.stream(),
            out: TextOut::new(job.stop.clone(), job.trim_start),
            opts,
            generated: 0,
            job,
        }
    }

    fn adapter_key(&self) -> usize {
        self.job.adapter.as_ref().map_or(0, |a| Arc::as_ptr(a) as usize)
    }

    fn send(&self, e: Event) {
        let _ = self.job.events.send(e);
    }

    /// Take `token`; true when the sequence has ended.
    fn accept(&mut self, token: u32, context: usize, metrics: &ServeMetrics) -> bool {
        if self.generated == 0 {
            metrics.time_to_first_token.observe(self.job.queued_at.elapsed().as_secs_f64());
        }
        if self.opts.stop_ids.contains(&token) {
            self.finish(true);
            return true;
        }
        self.generated += 1;
        metrics.generated_tokens.inc();
        let piece = match self.dec.push(token) {
            Ok(p) => p,
            Err(e) => {
                self.send(Event::Failed(format!("decoding the output failed: {e}")));
                return true;
            }
        };
        if let Some(piece) = piece {
            let (text, stopped) = self.out.push(&piece);
            if !text.is_empty() {
                self.send(Event::Text(text));
            }
            if stopped {
                self.send(Event::Done { stopped: true, completion_tokens: self.generated });
                return true;
            }
        }
        if self.generated >= self.opts.max_new_tokens || self.cache.seq_len >= context {
            self.finish(false);
            return true;
        }
        self.pending = vec![token];
        false
    }

    fn finish(&mut self, stopped: bool) {
        let mut rest = String::new();
        if let Ok(Some(p)) = self.dec.finish() {
            let (t, hit) = self.out.push(&p);
            rest.push_str(&t);
            if hit {
                if !rest.is_empty() {
                    self.send(Event::Text(rest));
                }
                self.send(Event::Done { stopped: true, completion_tokens: self.generated });
                return;
            }
        }
        rest.push_str(&self.out.flush());
        if !rest.is_empty() {
            self.send(Event::Text(rest));
        }
        self.send(Event::Done { stopped, completion_tokens: self.generated });
    }
}

fn run(model: &dyn CausalLm, tok: &Tokenizer, mut rx: mpsc::UnboundedReceiver<Job>, limits: BatchLimits, queued: &AtomicUsize, metrics: &ServeMetrics) {
    model.set_training(false);
    let info = model.info().clone();
    let context = info.max_position_embeddings;
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut live: Vec<Live<'_>> = Vec::new();
    loop {
        if live.is_empty() && waiting.is_empty() {
            match rx.blocking_recv() {
                Some(j) => waiting.push_back(j),
                None => return,
            }
        }
        while let Ok(j) = rx.try_recv() {
            waiting.push_back(j);
        }
        while live.len() < limits.max_batch {
            let Some(j) = waiting.pop_front() else { break };
            queued.fetch_sub(1, Ordering::SeqCst);
            if !j.events.is_closed() {
                live.push(Live::new(j, tok, &info.eos_token_ids));
            }
        }
        let before = live.len();
        live.retain(|l| !l.job.events.is_closed());
        metrics.cancelled.inc_by((before - live.len()) as u64);
        metrics.live.set(live.len() as i64);
        metrics.waiting.set(waiting.len() as i64);
        if live.is_empty() {
            continue;
        }
        live.sort_by_key(Live::adapter_key);
        // Decoding sequences feed their token; prompts share the prompt-token budget.
        let mut budget = limits.max_batch_tokens.max(1);
        let mut feed: Vec<(usize, usize)> = Vec::with_capacity(live.len());
        for (i, l) in live.iter().enumerate() {
            let n = if l.generated > 0 {
                1
            } else {
                let n = l.pending.len().min(budget);
                budget -= n;
                n
            };
            if n > 0 {
                feed.push((i, n));
            }
        }
        let started = Instant::now();
        let result = {
            let mut packed: Vec<PackedSeq<'_>> = Vec::with_capacity(feed.len());
            let mut slots: Vec<Option<&mut Live<'_>>> = live.iter_mut().map(Some).collect();
            for &(i, n) in &feed {
                if let Some(l) = slots[i].take() {
                    packed.push(PackedSeq { tokens: &l.pending[..n], cache: &mut l.cache, adapter: l.job.adapter.clone() });
                }
            }
            model.forward_packed(&mut packed).and_then(|t| Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?))
        };
        metrics.batch_sequences.observe(feed.len() as f64);
        metrics.pass_seconds.observe(started.elapsed().as_secs_f64());
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, sequences = feed.len(), "serving pass failed");
                for l in live.drain(..) {
                    l.send(Event::Failed(format!("the model failed: {e}")));
                }
                continue;
            }
        };
        let mut ended = vec![false; live.len()];
        for (row, &(i, n)) in feed.iter().enumerate() {
            let l = &mut live[i];
            l.pending.drain(..n);
            if l.generated == 0 && !l.pending.is_empty() {
                continue; // mid-prompt: this pass fed one chunk of it
            }
            let token = sample_next(&logits[row], &l.opts, &mut l.rng);
            ended[i] = l.accept(token, context, metrics);
        }
        let mut k = 0;
        live.retain(|_| {
            k += 1;
            !ended[k - 1]
        });
    }
}

#[cfg(test)]
mod tests {
    use super::TextOut;

    fn run(stop: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut o = TextOut::new(stop.iter().map(|s| s.to_string()).collect(), false);
        let mut all = String::new();
        for p in pieces {
            let (t, hit) = o.push(p);
            all.push_str(&t);
            if hit {
                return (all, true);
            }
        }
        all.push_str(&o.flush());
        (all, false)
    }

    #[test]
    fn stop_sequences_end_the_text_even_across_pieces() {
        assert_eq!(run(&["\n"], &["ab", "c\nd"]), ("abc".into(), true));
        assert_eq!(run(&["<human>"], &["yes <hu", "man>: more"]), ("yes ".into(), true));
        assert_eq!(run(&["xyz"], &["ab", "xy"]), ("abxy".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        // the earliest of several
        assert_eq!(run(&["c", "b"], &["abc"]), ("a".into(), true));
    }

    #[test]
    fn held_text_is_only_what_could_start_a_stop() {
        let mut o = TextOut::new(vec!["END".into()], false);
        assert_eq!(o.push("hello E"), ("hello ".into(), false));
        assert_eq!(o.push("x"), ("Ex".into(), false));
        assert_eq!(o.push("é EN"), ("é ".into(), false));
        assert_eq!(o.push("D"), ("".into(), true));
    }

    #[test]
    fn the_answer_separator_is_trimmed() {
        let mut o = TextOut::new(vec![], true);
        assert_eq!(o.push(" Paris"), ("Paris".into(), false));
        assert_eq!(o.push(" is"), (" is".into(), false));
    }
}
