//! The training loop: LoRA fine-tuning of a (possibly NF4-quantized) base model.
//!
//! Loss convention (that of Hugging Face's Trainer with a model computing a mean loss):
//! each micro-batch's loss is the total NLL of its target tokens divided by their count;
//! the loss backpropagated is that divided by `grad_accum`, so gradients of the
//! micro-batches add up to the gradient of their mean. The reported step loss is the
//! mean of the micro-batch losses.
//!
//! Determinism: one `training.seed` drives the data order (ChaCha8 per epoch), the eval
//! split and the LoRA dropout masks (`checkpoint::dropout_seed(seed, step, micro)`), so
//! a run resumed from a checkpoint gives the same later losses as an uninterrupted one.
//!
//! Data parallelism: a run is a group of ranks (`collective`), one model replica each:
//! the devices of one process ([`train`] joins them with a ring on loopback) and, for a
//! gang, the devices of several workers ([`train_ranks`] with the worker's ring ranks).
//! Every rank draws every micro-batch of a step (the batch stays global:
//! `micro_batch_size * grad_accum` examples per step whatever the world size) and runs a
//! contiguous block of them ([`rank_block`]); their LoRA gradients and losses go through
//! one ordered all-reduce, whose fixed order is the one a single device accumulates in,
//! so every world size trains the same adapter bit for bit where the kernels are
//! deterministic. Each rank then takes the same optimizer step on the same gradient.
//! Rank 0 alone reads the resume checkpoint (the others receive its state by broadcast),
//! evaluates, and writes checkpoints (after a barrier: every rank reached the step),
//! metrics and the adapter. `training.grad_accum` must be at least the world size.
//!
//! Evaluation (rank 0, every `eval_every` steps and at the end, when there is eval data
//! or sample prompts): eval loss and perplexity; with `eval_generate_samples` N > 0, the
//! first N question/answer examples of the eval set (file order; an `eval_split` keeps
//! file order too) answered greedily with the spec's template and scored against their
//! answers (`answer_metrics`: exact match, ROUGE-L F1, averaged). With `save_best` or
//! `early_stopping` one metric is tracked ([`lorafleet_shared::spec::TrainingSpec::tracked_metric`]):
//! an evaluation strictly better than every earlier one is the best; with `save_best` its
//! adapter is written to `output_dir/best/` (PEFT files + `best.json`: metric, step,
//! value), carried in every later checkpoint (`checkpoint::BEST_DIR`) and restored on
//! resume, and at the end it is the run's adapter (copied bit for bit), not the last one.
//! Early stopping counts evaluations that do not improve on the reference value (the
//! last one that did) by more than `min_delta`; at `patience` of them rank 0 decides to
//! stop, broadcasts the decision, and every rank ends the loop at that step; the run
//! succeeds, with the reason in its log (`TrainObserver::on_notice`) and summary. A
//! non-finite metric (no eval data left, no generated answers) neither improves nor
//! counts.
//!
//! Outputs in `output_dir`: the PEFT adapter (`adapter_config.json`,
//! `adapter_model.safetensors`), `best/` (with `save_best`), `metrics.jsonl` (one line
//! per step and per eval), `loss.svg` (training loss, eval loss points, the best step)
//! and `train_summary.json`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lorafleet_shared::spec::{ComputeDtype, EarlyStoppingSpec, EvalMetric, JobSpec, MetricMode, Optimizer, QuantMethod};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, BestRecord, EvalRecord, StepRecord, TrainState};
use crate::collective::{Collective, Solo, TcpRing};
use crate::data::{self, Batcher, DataReport, Dataset};
use crate::eval;
use crate::generate;
use crate::model::{CausalLm, LoadOptions, LoraInit, LoraSettingsRequest, Quant};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::schedule::LrSchedule;
use crate::tokenizer::Tokenizer;
use crate::{EngineError, Result};

/// Everything a training run needs. Paths are local (the worker downloads first).
pub struct TrainRun {
    pub spec: JobSpec,
    pub model_dir: PathBuf,
    pub train_data: PathBuf,
    pub eval_data: Option<PathBuf>,
    /// Start from this PEFT adapter instead of a fresh LoRA init.
    pub init_adapter: Option<PathBuf>,
    pub output_dir: PathBuf,
    /// Scratch: checkpoints are written under `work_dir/checkpoints/step-N/`.
    pub work_dir: PathBuf,
    /// Resume from this checkpoint directory.
    pub resume_from: Option<PathBuf>,
    /// The devices to train on: one, or several for data parallelism (module docs). The
    /// first holds the optimizer state and runs evaluation and sampling.
    pub devices: Vec<Device>,
}

impl TrainRun {
    /// [`TrainRun::devices`], or the CPU if none is given.
    pub fn devices(&self) -> Vec<Device> {
        if self.devices.is_empty() {
            vec![Device::Cpu]
        } else {
            self.devices.clone()
        }
    }
}

/// Called by the loop; all methods have defaults.
pub trait TrainObserver {
    fn on_start(&mut self, _total_steps: u64) {}
    fn on_step(&mut self, _m: &StepMetrics) {}
    fn on_eval(&mut self, _m: &EvalMetrics) {}
    /// A checkpoint was written to `dir` (e.g. upload it). An error stops training.
    fn on_checkpoint(&mut self, _step: u64, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Something the user should know about this run that does not stop it (`level`
    /// `warn` or `info`), e.g. a setting that is slow on this device. Also logged.
    fn on_notice(&mut self, _level: &str, _message: &str) {}
    /// Another rank of this process finished a step (data parallelism over several
    /// devices of one process; `m` carries the rank's own `rank_tokens_per_sec`).
    fn on_rank_step(&mut self, _rank: usize, _m: &StepMetrics) {}
    /// Polled before every step; true cancels the run (`EngineError::Cancelled`).
    fn should_stop(&self) -> bool {
        false
    }
}

/// An observer that does nothing.
pub struct NoObserver;
impl TrainObserver for NoObserver {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Non-padding tokens processed in this step.
    pub tokens: u64,
    pub tokens_per_sec: f64,
    pub elapsed_secs: f64,
    pub eta_secs: f64,
    /// This rank of `world_size` data-parallel ranks (0 of 1 without data parallelism).
    pub rank: u32,
    pub world_size: u32,
    /// Tokens of this rank's own micro-batches per second.
    pub rank_tokens_per_sec: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub step: u64,
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: u64,
    /// `(prompt, greedy answer)` for `training.sample_prompts`.
    pub samples: Vec<(String, String)>,
    /// Mean exact match (fraction) of the generated eval answers
    /// (`training.eval_generate_samples`; absent without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
    /// Mean ROUGE-L F1 of the generated eval answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rouge_l: Option<f64>,
    /// Eval examples answered.
    #[serde(default)]
    pub generated: usize,
    /// The best evaluation so far (this one included) of the tracked metric, when
    /// `save_best` or `early_stopping` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<BestRecord>,
}

impl EvalMetrics {
    /// The value of `metric` in this evaluation (NaN when it was not computed).
    pub fn value(&self, metric: EvalMetric) -> f64 {
        match metric {
            EvalMetric::EvalLoss => self.loss,
            EvalMetric::ExactMatch => self.exact_match.unwrap_or(f64::NAN),
            EvalMetric::RougeL => self.rouge_l.unwrap_or(f64::NAN),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub total_steps: u64,
    /// Loss of the last step.
    pub final_loss: f64,
    pub final_eval: Option<EvalMetrics>,
    pub adapter_dir: PathBuf,
    pub tokens: u64,
    pub elapsed_secs: f64,
    pub train_data: DataReport,
    pub eval_data: Option<DataReport>,
    pub resumed_from_step: Option<u64>,
    /// The best evaluation of the tracked metric (`save_best` / `early_stopping`).
    #[serde(default)]
    pub best: Option<BestRecord>,
    /// The step whose adapter is the run's adapter: the best one with `save_best` (when
    /// an evaluation happened), else the last step.
    #[serde(default)]
    pub adapter_step: u64,
    /// Early stopping ended the run before `total_steps`.
    #[serde(default)]
    pub stopped_early: bool,
    #[serde(default)]
    pub stop_reason: Option<String>,
}

/// Whether `a` is better than `b` by more than `delta` in `mode`.
fn better(mode: MetricMode, a: f64, b: f64, delta: f64) -> bool {
    match mode {
        MetricMode::Min => a < b - delta,
        MetricMode::Max => a > b + delta,
    }
}

/// What one evaluation did to the tracked metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracked {
    /// Strictly better than every earlier evaluation: the new best.
    pub improved: bool,
    /// Early stopping's decision to stop, with the reason.
    pub stop: Option<String>,
}

/// The metric `save_best` and `early_stopping` follow (module docs), applied to the
/// [`TrainState`] (which keeps the best and the count across a resume).
#[derive(Debug, Clone)]
pub struct MetricTracker {
    pub metric: EvalMetric,
    pub mode: MetricMode,
    pub early_stopping: Option<EarlyStoppingSpec>,
}

impl MetricTracker {
    /// The tracker a spec asks for, if any.
    pub fn from_spec(spec: &JobSpec) -> Option<Self> {
        let t = &spec.training;
        t.tracked_metric().map(|(metric, mode)| Self { metric, mode, early_stopping: t.early_stopping.clone() })
    }

    /// Record the evaluation of `step` whose metric is `value` in the run's best and
    /// early-stopping count (`TrainState::best`, `TrainState::patience`).
    pub fn observe(&self, best: &mut Option<BestRecord>, patience: &mut checkpoint::PatienceState, step: u64, value: f64) -> Tracked {
        if !value.is_finite() {
            return Tracked { improved: false, stop: None };
        }
        let improved = best.as_ref().is_none_or(|b| better(self.mode, value, b.value, 0.0));
        if improved {
            *best = Some(BestRecord { metric: self.metric.name().into(), step, value });
        }
        let mut stop = None;
        if let Some(es) = &self.early_stopping {
            let p = patience;
            if p.reference.is_none_or(|r| better(self.mode, value, r, es.min_delta)) {
                p.reference = Some(value);
                p.bad_evals = 0;
            } else {
                p.bad_evals += 1;
            }
            if p.bad_evals >= es.patience.max(1) {
                let best = best.as_ref().map(|b| format!("; best {:.6} at step {}", b.value, b.step)).unwrap_or_default();
                stop = Some(format!(
                    "early stopping at step {step}: {} did not improve by more than {} in {} evaluation{}{best}",
                    self.metric.name(),
                    es.min_delta,
                    p.bad_evals,
                    if p.bad_evals == 1 { "" } else { "s" }
                ));
            }
        }
        Tracked { improved, stop }
    }
}

/// Number of optimizer steps: `max_steps` and/or `ceil(epochs * steps_per_epoch)`
/// (whichever ends first when both are set), where an epoch is
/// `max(1, ceil(sequences / micro_batch_size) / grad_accum)` steps as in HF's Trainer.
pub fn total_steps(spec: &JobSpec, sequences: usize) -> u64 {
    let t = &spec.training;
    let batches = sequences.div_ceil(t.micro_batch_size.max(1) as usize) as u64;
    let per_epoch = (batches / t.grad_accum.max(1) as u64).max(1);
    let by_epochs = t.epochs.map(|e| ((e * per_epoch as f64).ceil() as u64).max(1));
    match (t.max_steps, by_epochs) {
        (Some(m), Some(e)) => m.min(e),
        (Some(m), None) => m,
        (None, Some(e)) => e,
        (None, None) => per_epoch,
    }
}

/// The model load options a spec asks for (LoRA from `init_adapter` when given, else
/// PEFT's init seeded with `training.seed`).
pub fn load_options(spec: &JobSpec, init_adapter: Option<&Path>, device: &Device) -> LoadOptions {
    let quant = match spec.quantization.method {
        QuantMethod::Nf4 => Quant::Nf4 { double_quant: spec.quantization.double_quant },
        QuantMethod::None => Quant::None,
    };
    let compute_dtype = match spec.quantization.compute_dtype {
        ComputeDtype::F32 => DType::F32,
        ComputeDtype::Bf16 => DType::BF16,
    };
    let init = match init_adapter {
        Some(p) => LoraInit::FromAdapter(p.to_path_buf()),
        None => LoraInit::PeftDefault { seed: spec.training.seed },
    };
    LoadOptions {
        quant,
        compute_dtype,
        device: device.clone(),
        lora: Some(LoraSettingsRequest {
            r: spec.lora.r as usize,
            alpha: spec.lora.alpha,
            dropout: spec.lora.dropout,
            rslora: spec.lora.rslora,
            target_modules: spec.lora.target_modules.clone(),
            init,
        }),
    }
}

/// A warning for settings that are slower on `device` than an equivalent choice: bf16
/// compute on a CPU where the frozen products cannot use bf16 dot products
/// ([`crate::ops::bf16_dot_products`]: no AVX512-BF16, another matmul backend, or
/// `LORAFLEET_BF16_DOT=off`) and every op converts: in `lorafleet
/// bench train` (NF4, sequence 256, 2026-12-01) that ran ~1.05-1.2x slower than f32
/// compute, where with AVX512-BF16 bf16 compute is ~1.3x faster than f32
/// (`scripts/bench-compare.sh` at `7fc74a2`).
pub fn device_advice(spec: &JobSpec, device: &Device) -> Option<String> {
    (device.is_cpu() && spec.quantization.compute_dtype == ComputeDtype::Bf16 && !crate::ops::bf16_dot_products()).then(|| {
        "quantization.compute_dtype: bf16 on a CPU without bf16 dot products (AVX512-BF16 and the built-in AVX-512 \
         kernels) trains slower than f32 in lorafleet's benchmark (~1.05-1.2x: every op converts; it saves ~30% of \
         activation memory): set `quantization.compute_dtype: f32` for speed on this CPU"
            .to_string()
    })
}

fn io_err(path: &Path, e: std::io::Error) -> EngineError {
    EngineError::file(path, e.to_string())
}

/// How long a rank of a ring between the devices of one process waits for another (they
/// wait for rank 0's evaluations, which can be long; a crash of the process ends all).
pub const LOCAL_RING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Run training on the devices of `run` (module docs): one device, or a data-parallel
/// group of one rank per device joined by a [`TcpRing`] on loopback (by NCCL between
/// CUDA devices in builds with the `nccl` feature).
pub fn train(run: &TrainRun, observer: &mut dyn TrainObserver) -> Result<TrainSummary> {
    let devices = run.devices();
    let n = devices.len();
    #[cfg(feature = "nccl")]
    if n > 1 && devices.iter().all(|d| d.is_cuda()) {
        let comms = crate::collective::nccl::NcclCollective::local(&devices, LOCAL_RING_TIMEOUT)?;
        return train_ranks(run, comms.into_iter().map(|c| Box::new(c) as Box<dyn Collective>).collect(), observer);
    }
    let collectives: Vec<Box<dyn Collective>> = if n == 1 {
        vec![Box::new(Solo)]
    } else {
        TcpRing::local(n, LOCAL_RING_TIMEOUT)?.into_iter().map(|r| Box::new(r) as Box<dyn Collective>).collect()
    };
    train_ranks(run, collectives, observer)
}

/// Run this process's ranks of a data-parallel group: `collectives[i]` is the rank
/// training on `run.devices()[i]`. The first runs on this thread and reports to
/// `observer` (the others' step metrics reach it through [`TrainObserver::on_rank_step`]);
/// the others run on threads of their own. Only global rank 0 evaluates and writes
/// checkpoints, metrics and the adapter; the summary is the first local rank's.
pub fn train_ranks(run: &TrainRun, collectives: Vec<Box<dyn Collective>>, observer: &mut dyn TrainObserver) -> Result<TrainSummary> {
    let devices = run.devices();
    if collectives.len() != devices.len() {
        return Err(EngineError::Config(format!("{} collectives for {} devices", collectives.len(), devices.len())));
    }
    check_memory(run, &devices, &crate::memory::SystemMemory)?;
    let mut collectives = collectives.into_iter();
    let first = collectives.next().ok_or_else(|| EngineError::Config("no devices".into()))?;
    let rest: Vec<Box<dyn Collective>> = collectives.collect();
    if rest.is_empty() {
        return train_rank(run, &devices[0], first, observer);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<(usize, StepMetrics)>();
    std::thread::scope(|s| {
        let handles: Vec<_> = rest
            .into_iter()
            .zip(&devices[1..])
            .map(|(c, device)| {
                let mut follower = Follower { stop: stop.clone(), tx: tx.clone(), rank: c.rank() };
                let name = format!("rank-{}", c.rank());
                std::thread::Builder::new().name(name).spawn_scoped(s, move || train_rank(run, device, c, &mut follower))
            })
            .collect();
        let mut main = Leader { inner: observer, rx, stop: stop.clone() };
        let result = match handles.iter().find_map(|h| h.as_ref().err()) {
            Some(e) => Err(EngineError::Config(format!("cannot start a rank's thread: {e}"))),
            None => train_rank(run, &devices[0], first, &mut main),
        };
        // Followers blocked on the first rank see its ring closed when it returns.
        stop.store(true, Ordering::SeqCst);
        let mut followers = Ok(());
        for h in handles.into_iter().flatten() {
            let r = h.join().unwrap_or_else(|_| Err(EngineError::Config("a data-parallel rank's thread panicked".into())));
            if let (Err(e), Ok(())) = (r, &followers) {
                followers = Err(e);
            }
        }
        // The other ranks' last steps may arrive after the first rank's last one.
        while let Ok((rank, m)) = main.rx.try_recv() {
            main.inner.on_rank_step(rank, &m);
        }
        let summary = result?;
        followers?;
        Ok(summary)
    })
}

/// The memory settings of a run (`memory::MemoryParams`), from its spec and model config.
pub fn memory_params(spec: &JobSpec, cfg: &crate::model::config::ModelConfig) -> Result<crate::memory::MemoryParams> {
    let t = &spec.training;
    crate::memory::MemoryParams::for_load(
        &load_options(spec, None, &Device::Cpu),
        cfg,
        spec.data.max_seq_len as usize,
        t.micro_batch_size.max(1) as usize,
        t.gradient_checkpointing,
        t.optimizer == Optimizer::AdamW8bit,
    )
}

/// The memory estimate of `run` on one device, and the settings it was made from.
pub fn memory_estimate(run: &TrainRun) -> Result<(crate::memory::MemoryEstimate, crate::memory::MemoryParams)> {
    let cfg = crate::model::read_model_config(&run.model_dir)?;
    let params = memory_params(&run.spec, &cfg)?;
    Ok((crate::memory::estimate_training(&cfg, &params)?, params))
}

/// Before any weight is read: refuse a run whose estimated peak memory (one model replica
/// per CPU device of this process) exceeds what `probe` says this process may use,
/// unless `LORAFLEET_SKIP_MEMORY_CHECK` is set (`memory` module docs). Devices other than
/// the CPU hold their replicas in their own memory and are not counted.
pub fn check_memory(run: &TrainRun, devices: &[Device], probe: &dyn crate::memory::MemoryProbe) -> Result<()> {
    let replicas = devices.iter().filter(|d| d.is_cpu()).count();
    if replicas == 0 {
        return Ok(());
    }
    let (est, params) = memory_estimate(run)?;
    if crate::memory::check_skipped() {
        tracing::warn!(estimate = %est.describe(), "memory check skipped ({} is set)", crate::memory::SKIP_ENV);
        return Ok(());
    }
    crate::memory::check_fits(&est, replicas, &params, probe)
}

/// The observer of the first local rank: forwards to the caller's observer, with the
/// other local ranks' steps.
struct Leader<'a> {
    inner: &'a mut dyn TrainObserver,
    rx: std::sync::mpsc::Receiver<(usize, StepMetrics)>,
    stop: Arc<AtomicBool>,
}

impl TrainObserver for Leader<'_> {
    fn on_start(&mut self, total_steps: u64) {
        self.inner.on_start(total_steps)
    }
    fn on_step(&mut self, m: &StepMetrics) {
        while let Ok((rank, fm)) = self.rx.try_recv() {
            self.inner.on_rank_step(rank, &fm);
        }
        self.inner.on_step(m)
    }
    fn on_rank_step(&mut self, rank: usize, m: &StepMetrics) {
        self.inner.on_rank_step(rank, m)
    }
    fn on_eval(&mut self, m: &EvalMetrics) {
        self.inner.on_eval(m)
    }
    fn on_checkpoint(&mut self, step: u64, dir: &Path) -> Result<()> {
        self.inner.on_checkpoint(step, dir)
    }
    fn on_notice(&mut self, level: &str, message: &str) {
        self.inner.on_notice(level, message)
    }
    fn should_stop(&self) -> bool {
        let s = self.inner.should_stop();
        if s {
            self.stop.store(true, Ordering::SeqCst);
        }
        s
    }
}

/// The observer of the other local ranks: their steps go to the first rank's thread.
struct Follower {
    stop: Arc<AtomicBool>,
    tx: std::sync::mpsc::Sender<(usize, StepMetrics)>,
    rank: usize,
}

impl TrainObserver for Follower {
    fn on_step(&mut self, m: &StepMetrics) {
        let _ = self.tx.send((self.rank, m.clone()));
    }
    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// The micro-batches of a step that rank `rank` of `world` runs: a contiguous block,
/// the first `ga % world` ranks one more (module docs: this keeps the reduction order).
pub fn rank_block(rank: usize, world: usize, ga: usize) -> std::ops::Range<usize> {
    let (base, extra) = (ga / world, ga % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// The flat f32 buffer one all-reduce carries per step: every LoRA gradient (in
/// parameter-name order), then one presence flag per parameter (a parameter no
/// micro-batch produced a gradient for stays out of the optimizer step, as on one
/// device), then one loss slot per micro-batch of the step.
struct GradLayout {
    params: Vec<(String, candle_core::Shape, usize, usize)>,
    flags: usize,
    losses: usize,
    len: usize,
}

impl GradLayout {
    fn new(model: &dyn CausalLm, ga: usize) -> Self {
        let mut off = 0;
        let params = model
            .lora_params()
            .iter()
            .map(|(k, v)| {
                let shape = v.as_tensor().shape().clone();
                let n = shape.elem_count();
                off += n;
                (k.clone(), shape, off - n, n)
            })
            .collect::<Vec<_>>();
        let flags = off;
        let losses = flags + params.len();
        Self { len: losses + ga, params, flags, losses }
    }

    /// Micro-batch `micro`'s contribution.
    fn pack(&self, grads: &BTreeMap<String, Tensor>, micro: usize, loss: f64) -> Result<Vec<f32>> {
        let mut buf = vec![0f32; self.len];
        for (i, (k, _, off, n)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(k) else { continue };
            let v: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            if v.len() != *n {
                return Err(EngineError::Config(format!("gradient of {k} has {} values, the parameter {n}", v.len())));
            }
            buf[*off..off + n].copy_from_slice(&v);
            buf[self.flags + i] = 1.0;
        }
        if let Some(g) = grads.keys().find(|k| !self.params.iter().any(|p| &p.0 == *k)) {
            return Err(EngineError::Config(format!("a gradient for {g}, which is not a lora parameter")));
        }
        // Losses are f32 values (micro_step reads them as f32), so the slot is exact.
        buf[self.losses + micro] = loss as f32;
        Ok(buf)
    }

    /// The reduced gradients on `device` and the step's loss (the f64 sum of the slots in
    /// micro-batch order).
    fn unpack(&self, buf: &[f32], device: &Device) -> Result<(BTreeMap<String, Tensor>, f64)> {
        let mut grads = BTreeMap::new();
        for (i, (k, shape, off, n)) in self.params.iter().enumerate() {
            if buf[self.flags + i] > 0.0 {
                grads.insert(k.clone(), Tensor::from_slice(&buf[*off..off + n], shape.clone(), device)?);
            }
        }
        let loss = buf[self.losses..].iter().fold(0f64, |acc, &l| acc + l as f64);
        Ok((grads, loss))
    }
}

/// Every file of a directory (not recursive), as one byte string: the state rank 0
/// broadcasts at the start of a data-parallel run.
fn pack_dir(dir: &Path) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?.collect::<std::io::Result<Vec<_>>>().map_err(|e| io_err(dir, e))?;
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let name = e.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(e.path()).map_err(|err| io_err(&e.path(), err))?;
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

fn unpack_dir(mut bytes: &[u8], dir: &Path) -> Result<()> {
    let bad = || EngineError::Collective("the broadcast training state is malformed".into());
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    while !bytes.is_empty() {
        let take = |b: &mut &[u8], n: usize| -> Result<Vec<u8>> {
            if b.len() < n {
                return Err(bad());
            }
            let (h, t) = b.split_at(n);
            *b = t;
            Ok(h.to_vec())
        };
        let n = u32::from_le_bytes(take(&mut bytes, 4)?.try_into().map_err(|_| bad())?) as usize;
        let name = String::from_utf8(take(&mut bytes, n)?).map_err(|_| bad())?;
        if name.is_empty() || name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(bad());
        }
        let len = u64::from_le_bytes(take(&mut bytes, 8)?.try_into().map_err(|_| bad())?) as usize;
        let data = take(&mut bytes, len)?;
        let p = dir.join(&name);
        std::fs::write(&p, data).map_err(|e| io_err(&p, e))?;
    }
    Ok(())
}

/// One rank's training loop (the whole run when it is the only rank).
fn train_rank(run: &TrainRun, device: &Device, mut comm: Box<dyn Collective>, observer: &mut dyn TrainObserver) -> Result<TrainSummary> {
    let spec = &run.spec;
    let t = &spec.training;
    let started = Instant::now();
    let (rank, world) = (comm.rank(), comm.world_size());
    let leader = rank == 0;
    let replica = crate::model::load_model(&run.model_dir, &load_options(spec, run.init_adapter.as_deref(), device))?;
    let model: &dyn CausalLm = replica.as_ref();
    let info = model.info().clone();
    if info.lora.is_none() {
        return Err(EngineError::Config("the model was loaded without lora".into()));
    }
    let ga = t.grad_accum.max(1) as usize;
    if world > 1 {
        tracing::info!(rank, world, device = ?device.location(), "data parallel: one model replica per rank");
        if ga < world {
            return Err(EngineError::Config(format!(
                "training.grad_accum: {ga} micro-batches per step cannot be shared by {world} data-parallel ranks (set it to at least {world})"
            )));
        }
        if leader && !ga.is_multiple_of(world) {
            let advice = format!(
                "training.grad_accum: {ga} micro-batches per step over {world} ranks leaves some ranks idle part of each step (use a multiple of {world})"
            );
            tracing::warn!("{advice}");
            observer.on_notice("warn", &advice);
        }
    }
    if let Some(advice) = device_advice(spec, device).filter(|_| leader) {
        tracing::warn!("{advice}");
        observer.on_notice("warn", &advice);
    }
    let tok = Tokenizer::from_model_dir(&run.model_dir, info.eos_token_ids.first().copied(), info.pad_token_id)?;
    let (train_ds, eval_ds) = data::load_train_eval(&run.train_data, run.eval_data.as_deref(), &tok, &spec.data, t.seed)?;
    tracing::info!(
        rank,
        rows = train_ds.report.rows,
        examples = train_ds.report.examples,
        skipped = train_ds.report.skipped.len(),
        truncated = train_ds.report.truncated,
        sequences = train_ds.report.sequences,
        target_tokens = train_ds.report.target_tokens,
        eval_examples = eval_ds.as_ref().map(|d| d.report.examples).unwrap_or(0),
        "training data loaded"
    );
    let total = total_steps(spec, train_ds.sequences.len());
    let schedule = LrSchedule::from_spec(t, total);
    let mut opt = AdamW::new(AdamWConfig {
        beta1: t.betas[0],
        beta2: t.betas[1],
        eps: t.eps,
        weight_decay: t.weight_decay,
        eight_bit: t.optimizer == Optimizer::AdamW8bit,
    });
    let mut batcher = Batcher::new(&train_ds, spec.data.shuffle, t.seed, t.micro_batch_size as usize, tok.pad_id());
    let mut state = TrainState {
        version: 1,
        step: 0,
        total_steps: total,
        cursor: batcher.cursor,
        seed: t.seed,
        dropout_stream: "splitmix64(seed, step, micro)".into(),
        schedule,
        tokens_seen: 0,
        history: vec![],
        evals: vec![],
        best: None,
        patience: Default::default(),
    };
    let tracker = MetricTracker::from_spec(spec);
    let save_best = t.save_best.is_some();
    let best_dir = run.output_dir.join(checkpoint::BEST_DIR);
    let base_model = spec.model.source.clone();
    let mut resumed_from = None;
    let restore_checked = |ck: &Path, opt: &mut AdamW| -> Result<TrainState> {
        let st = checkpoint::restore(ck, model, opt)?;
        if st.total_steps != total || st.seed != t.seed {
            return Err(EngineError::file(
                ck,
                format!("checkpoint is for another run (total_steps {} seed {}, this run {} and {})", st.total_steps, st.seed, total, t.seed),
            ));
        }
        Ok(st)
    };
    if let Some(ck) = run.resume_from.as_ref().filter(|_| leader) {
        let st = restore_checked(ck, &mut opt)?;
        resumed_from = Some(st.step);
        tracing::info!(step = st.step, checkpoint = %ck.display(), "resuming");
        if save_best {
            // The best adapter as of the checkpoint (a newer one in the output, from a
            // run that got further, is found again: the steps after it are replayed).
            match &st.best {
                Some(b) => {
                    let from = ck.join(checkpoint::BEST_DIR);
                    if !from.join(checkpoint::ADAPTER_WEIGHTS).is_file() {
                        return Err(EngineError::file(ck, format!("checkpoint names a best adapter (step {}) but has no {}/", b.step, checkpoint::BEST_DIR)));
                    }
                    checkpoint::copy_files(&from, &best_dir)?;
                    tracing::info!(metric = %b.metric, step = b.step, value = b.value, "best adapter restored from the checkpoint");
                }
                None => {
                    let _ = std::fs::remove_dir_all(&best_dir);
                }
            }
        }
        state = st;
    }
    if world > 1 {
        // Every rank starts from rank 0's adapter, optimizer moments and position.
        let sync = run.work_dir.join(format!("rank-{rank}-sync"));
        let mut blob = Vec::new();
        if leader {
            let dir = checkpoint::save(&sync, &state, model, &base_model, &opt)?;
            blob = pack_dir(&dir)?;
        }
        comm.broadcast(&mut blob)?;
        if !leader {
            let dir = checkpoint::checkpoint_dir(&sync, 0);
            unpack_dir(&blob, &dir)?;
            let st = restore_checked(&dir, &mut opt)?;
            resumed_from = (st.step > 0).then_some(st.step);
            state = st;
        }
        let _ = std::fs::remove_dir_all(&sync);
    }
    batcher.cursor = state.cursor;
    model.set_gradient_checkpointing(t.gradient_checkpointing);
    let mut metrics = if leader {
        std::fs::create_dir_all(&run.output_dir).map_err(|e| io_err(&run.output_dir, e))?;
        Some(MetricsFile::create(&run.output_dir.join("metrics.jsonl"), &state.history, &state.evals)?)
    } else {
        None
    };
    observer.on_start(total);
    let layout = GradLayout::new(model, ga);
    let mine = rank_block(rank, world, ga);
    let run_start = Instant::now();
    let (mut run_tokens, mut rank_tokens) = (0u64, 0u64);
    let first_step = state.step;
    let mut last_loss = state.history.last().map(|h| h.loss).unwrap_or(f64::NAN);
    let mut last_eval = None;
    let mut stop_reason: Option<String> = None;
    let generation_set = eval_ds.as_ref().map(|d| generation_set(d, t.eval_generate_samples as usize)).unwrap_or_default();
    let eval_batches = eval_ds.as_ref().map(|d| data::eval_batches(d, t.micro_batch_size as usize, tok.pad_id()));
    let mut reduced = vec![0f32; layout.len];
    while state.step < total {
        if observer.should_stop() {
            return Err(EngineError::Cancelled);
        }
        model.set_training(true);
        let batches: Vec<data::MicroBatch> = (0..ga).map(|_| batcher.next_batch()).collect();
        let step_tokens: u64 = batches.iter().map(|b| b.tokens as u64).sum();
        // Alone, each micro-batch's gradients are added as they come (the same order,
        // one buffer); in a group, a rank keeps its block's until the all-reduce.
        let mut parts = Vec::with_capacity(if world > 1 { mine.len() } else { 0 });
        reduced.fill(0.0);
        for j in mine.clone() {
            rank_tokens += batches[j].tokens as u64;
            if let Some((loss, g)) = micro_step(model, device, &batches[j], t.seed, state.step, j as u64, ga as u64)? {
                let p = layout.pack(&g, j, loss)?;
                if world == 1 {
                    crate::collective::add_parts(&mut reduced, &[&p], 0..p.len());
                } else {
                    parts.push(p);
                }
            }
        }
        if world > 1 {
            let refs: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
            comm.all_reduce_ordered(&refs, &mut reduced)?;
        }
        drop(parts);
        // with ga micro-batches, the summed losses are already the mean of the micro-batch losses
        let (mut grads, loss) = layout.unpack(&reduced, device)?;
        let lr = schedule.lr(state.step);
        let grad_norm = clip_grad_norm(&mut grads, t.max_grad_norm)?;
        opt.step(model.lora_params(), &grads, lr)?;
        drop(grads);
        state.step += 1;
        state.cursor = batcher.cursor;
        state.tokens_seen += step_tokens;
        run_tokens += step_tokens;
        last_loss = loss;
        if !loss.is_finite() {
            return Err(EngineError::Config(format!("training diverged: loss is {loss} at step {} (lower training.lr?)", state.step)));
        }
        let elapsed = run_start.elapsed().as_secs_f64();
        let done = state.step - first_step;
        let m = StepMetrics {
            step: state.step,
            total_steps: total,
            epoch: batcher.epoch(),
            loss,
            lr,
            grad_norm,
            tokens: step_tokens,
            tokens_per_sec: run_tokens as f64 / elapsed.max(1e-9),
            elapsed_secs: elapsed,
            eta_secs: elapsed / done as f64 * (total - state.step) as f64,
            rank: rank as u32,
            world_size: world as u32,
            rank_tokens_per_sec: rank_tokens as f64 / elapsed.max(1e-9),
        };
        if leader && (state.step.is_multiple_of(t.log_every.max(1)) || state.step == total) {
            tracing::info!(step = m.step, total_steps = total, loss = m.loss, lr = m.lr, grad_norm = m.grad_norm, tokens_per_sec = m.tokens_per_sec, epoch = m.epoch, "train step");
        }
        state.history.push(StepRecord { step: state.step, loss, lr, grad_norm });
        if let Some(mf) = metrics.as_mut() {
            mf.step(&m)?;
        }
        observer.on_step(&m);

        let eval_now = (t.eval_every > 0 && state.step.is_multiple_of(t.eval_every)) || state.step == total;
        if leader && eval_now && (eval_batches.is_some() || !t.sample_prompts.is_empty()) {
            let mut em = run_eval(model, &tok, spec, eval_batches.as_deref(), &generation_set, state.step, device)?;
            tracing::info!(
                step = em.step,
                eval_loss = em.loss,
                perplexity = em.perplexity,
                tokens = em.tokens,
                exact_match = em.exact_match,
                rouge_l = em.rouge_l,
                generated = em.generated,
                "eval"
            );
            for (p, a) in &em.samples {
                tracing::info!(prompt = %p, answer = %a, "sample");
            }
            if let Some(tr) = &tracker {
                let value = em.value(tr.metric);
                let tracked = tr.observe(&mut state.best, &mut state.patience, state.step, value);
                if !value.is_finite() {
                    tracing::warn!(step = state.step, metric = tr.metric.name(), "the tracked metric was not computed at this evaluation; it neither improves nor counts");
                }
                if tracked.improved {
                    tracing::info!(step = state.step, metric = tr.metric.name(), value, "new best evaluation");
                    if save_best {
                        write_best(model, &best_dir, &base_model, state.best.as_ref().expect("just set"))?;
                    }
                }
                em.best = state.best.clone();
                stop_reason = tracked.stop;
            }
            state.evals.push(EvalRecord { step: em.step, loss: em.loss.is_finite().then_some(em.loss), exact_match: em.exact_match, rouge_l: em.rouge_l });
            if let Some(mf) = metrics.as_mut() {
                mf.eval(&em)?;
            }
            observer.on_eval(&em);
            last_eval = Some(em);
        }
        if world > 1 && eval_now && t.early_stopping.is_some() {
            // Rank 0's decision, so that every rank ends at the same step.
            let mut blob = stop_reason.clone().unwrap_or_default().into_bytes();
            comm.broadcast(&mut blob)?;
            let reason = String::from_utf8(blob).map_err(|_| EngineError::Collective("the broadcast stop decision is malformed".into()))?;
            stop_reason = (!reason.is_empty()).then_some(reason);
        }
        if let Some(reason) = &stop_reason {
            if state.step < total {
                if leader {
                    tracing::info!(step = state.step, total_steps = total, "{reason}");
                    observer.on_notice("info", reason);
                }
                break;
            }
            // The last step: nothing is cut short.
            stop_reason = None;
        }
        if t.checkpoint_every > 0 && state.step.is_multiple_of(t.checkpoint_every) && state.step < total {
            // A checkpoint is committed only once every rank has reached its step.
            comm.barrier()?;
            if leader {
                let best = (save_best && state.best.is_some()).then_some(best_dir.as_path());
                let dir = checkpoint::save_with_best(&run.work_dir, &state, model, &base_model, &opt, best)?;
                tracing::info!(step = state.step, dir = %dir.display(), "checkpoint written");
                observer.on_checkpoint(state.step, &dir)?;
            }
        }
    }
    if world > 1 {
        comm.barrier()?;
    }
    let best_adapter = state.best.as_ref().filter(|_| save_best);
    let adapter_step = best_adapter.map(|b| b.step).unwrap_or(state.step);
    if leader {
        match best_adapter {
            Some(b) => {
                // The run's adapter is the best one, bit for bit.
                for f in [checkpoint::ADAPTER_WEIGHTS, checkpoint::ADAPTER_CONFIG] {
                    let (from, to) = (best_dir.join(f), run.output_dir.join(f));
                    std::fs::copy(&from, &to).map_err(|e| io_err(&from, e))?;
                }
                let msg = format!("the adapter is the best evaluation's: {} {:.6} at step {} (of {})", b.metric, b.value, b.step, state.step);
                tracing::info!("{msg}");
                observer.on_notice("info", &msg);
            }
            None => crate::peft::save_adapter(model, &run.output_dir, &base_model)?,
        }
        // The prompt format travels with the adapter (generate and serve read it).
        crate::peft::write_prompt_file(&run.output_dir, &crate::data::PromptFormat::of(&spec.data))?;
        let svg = run.output_dir.join("loss.svg");
        std::fs::write(&svg, loss_svg_with_evals(&state.history, &state.evals, state.best.as_ref().map(|b| b.step))).map_err(|e| io_err(&svg, e))?;
    }
    let summary = TrainSummary {
        steps: state.step,
        total_steps: total,
        final_loss: last_loss,
        final_eval: last_eval,
        adapter_dir: run.output_dir.clone(),
        tokens: state.tokens_seen,
        elapsed_secs: started.elapsed().as_secs_f64(),
        train_data: train_ds.report.clone(),
        eval_data: eval_ds.as_ref().map(|d| d.report.clone()),
        resumed_from_step: resumed_from,
        best: state.best.clone(),
        adapter_step,
        stopped_early: stop_reason.is_some(),
        stop_reason,
    };
    if leader {
        let sp = run.output_dir.join("train_summary.json");
        std::fs::write(&sp, serde_json::to_string_pretty(&summary).expect("json")).map_err(|e| io_err(&sp, e))?;
        tracing::info!(steps = summary.steps, final_loss = summary.final_loss, adapter = %run.output_dir.display(), "training finished");
    }
    Ok(summary)
}

/// One micro-batch's share of a step: its loss (divided by `grad_accum`) and the
/// gradients of the LoRA parameters; `None` for a micro-batch without target tokens.
type MicroGrads = Option<(f64, BTreeMap<String, Tensor>)>;

/// Forward and backward of micro-batch `micro` of `step` on one replica.
fn micro_step(model: &dyn CausalLm, device: &Device, mb: &data::MicroBatch, seed: u64, step: u64, micro: u64, ga: u64) -> Result<MicroGrads> {
    let n = mb.target_count();
    if n == 0 {
        return Ok(None);
    }
    model.set_dropout_seed(checkpoint::dropout_seed(seed, step, micro));
    let bt = mb.to_tensors(device)?;
    let nll = eval::nll_sum(model, &bt)?;
    let loss = (nll / (n as f64 * ga as f64))?;
    let value = loss.to_scalar::<f32>()? as f64;
    let grads = model.backward(&loss)?.into_iter().map(|(k, v)| (k, v.detach())).collect();
    Ok(Some((value, grads)))
}

/// The `(question, reference answer)` pairs answered at each evaluation: the first `n`
/// question/answer records of the eval set, in its order.
pub fn generation_set(ds: &Dataset, n: usize) -> Vec<(String, String)> {
    ds.records
        .iter()
        .filter_map(|r| match &r.kind {
            data::RecordKind::Qa { question, answer } => Some((question.clone(), answer.clone())),
            _ => None,
        })
        .take(n)
        .collect()
}

/// Write `model`'s adapter as the best one: `dir` replaced by the PEFT files and
/// `best.json`.
fn write_best(model: &dyn CausalLm, dir: &Path, base_model: &str, best: &BestRecord) -> Result<()> {
    let tmp = dir.with_extension("new");
    let _ = std::fs::remove_dir_all(&tmp);
    crate::peft::save_adapter(model, &tmp, base_model)?;
    let bf = tmp.join(checkpoint::BEST_FILE);
    std::fs::write(&bf, serde_json::to_string_pretty(best).expect("json")).map_err(|e| io_err(&bf, e))?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, e))
}

fn run_eval(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    spec: &JobSpec,
    batches: Option<&[data::MicroBatch]>,
    generation_set: &[(String, String)],
    step: u64,
    device: &Device,
) -> Result<EvalMetrics> {
    let r = match batches {
        Some(b) => eval::evaluate(model, b, device)?,
        None => eval::EvalResult { loss: f64::NAN, perplexity: f64::NAN, tokens: 0 },
    };
    let mut samples = Vec::new();
    for p in &spec.training.sample_prompts {
        let a = generate::answer(model, tok, &crate::data::PromptFormat::of(&spec.data), p, spec.training.sample_max_new_tokens as usize, device)?;
        samples.push((p.clone(), a));
    }
    let max_new = spec.training.eval_max_new_tokens() as usize;
    let mut answers = Vec::with_capacity(generation_set.len());
    for (q, reference) in generation_set {
        let a = generate::answer(model, tok, &crate::data::PromptFormat::of(&spec.data), q, max_new, device)?;
        tracing::debug!(question = %q, answer = %a, reference = %reference, "eval answer");
        answers.push(a);
    }
    let scores = crate::answer_metrics::score_answers(answers.iter().zip(generation_set).map(|(a, (_, r))| (a.as_str(), r.as_str())));
    model.set_training(true);
    Ok(EvalMetrics {
        step,
        loss: r.loss,
        perplexity: r.perplexity,
        tokens: r.tokens,
        samples,
        exact_match: scores.map(|s| s.exact_match),
        rouge_l: scores.map(|s| s.rouge_l),
        generated: answers.len(),
        best: None,
    })
}

/// `metrics.jsonl`: `{"type":"step",...}` and `{"type":"eval",...}` lines.
struct MetricsFile {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsFile {
    fn create(path: &Path, history: &[StepRecord], evals: &[EvalRecord]) -> Result<Self> {
        let mut file = std::fs::File::create(path).map_err(|e| io_err(path, e))?;
        let mut evals = evals.iter().peekable();
        for h in history {
            let line = serde_json::json!({"type": "step", "step": h.step, "loss": h.loss, "lr": h.lr, "grad_norm": h.grad_norm, "resumed": true});
            writeln!(file, "{line}").map_err(|e| io_err(path, e))?;
            while let Some(e) = evals.next_if(|e| e.step <= h.step) {
                let mut line = serde_json::json!({"type": "eval", "step": e.step, "loss": e.loss, "resumed": true});
                if let Some(x) = e.exact_match {
                    line["exact_match"] = x.into();
                }
                if let Some(x) = e.rouge_l {
                    line["rouge_l"] = x.into();
                }
                writeln!(file, "{line}").map_err(|e| io_err(path, e))?;
            }
        }
        Ok(Self { path: path.to_path_buf(), file })
    }
    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| io_err(&self.path, e))
    }
    fn step(&mut self, m: &StepMetrics) -> Result<()> {
        let mut v = serde_json::to_value(m).expect("json");
        v["type"] = "step".into();
        self.write(v)
    }
    fn eval(&mut self, m: &EvalMetrics) -> Result<()> {
        let mut v = serde_json::to_value(m).expect("json");
        v["type"] = "eval".into();
        self.write(v)
    }
}

/// A self-contained SVG line chart of the training loss per step.
pub fn loss_svg(history: &[StepRecord]) -> String {
    loss_svg_with_evals(history, &[], None)
}

/// [`loss_svg`] with the eval losses as points (orange) and the best evaluation's step
/// (`best_step`) as a dashed green line.
pub fn loss_svg_with_evals(history: &[StepRecord], evals: &[EvalRecord], best_step: Option<u64>) -> String {
    let (w, h, ml, mr, mt, mb) = (720.0, 360.0, 60.0, 20.0, 30.0, 40.0);
    let pts: Vec<(f64, f64)> = history.iter().filter(|r| r.loss.is_finite()).map(|r| (r.step as f64, r.loss)).collect();
    let eval_pts: Vec<(f64, f64)> = evals.iter().filter_map(|e| e.loss.filter(|l| l.is_finite()).map(|l| (e.step as f64, l))).collect();
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">training loss</text>\n",
        w / 2.0
    );
    if pts.is_empty() {
        s.push_str("<text x=\"360\" y=\"180\" text-anchor=\"middle\">no steps</text>\n</svg>\n");
        return s;
    }
    let xmin = pts.first().unwrap().0;
    let xmax = pts.last().unwrap().0.max(xmin + 1.0);
    let ymin = pts.iter().chain(&eval_pts).map(|p| p.1).fold(f64::INFINITY, f64::min);
    let ymax = pts.iter().chain(&eval_pts).map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let (ymin, ymax) = if ymax - ymin < 1e-9 { (ymin - 0.5, ymax + 0.5) } else { (ymin, ymax) };
    let px = |x: f64| ml + (x - xmin) / (xmax - xmin) * (w - ml - mr);
    let py = |y: f64| mt + (ymax - y) / (ymax - ymin) * (h - mt - mb);
    // axes and ticks
    s.push_str(&format!(
        "<line x1=\"{ml}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{ml}\" y1=\"{mt}\" x2=\"{ml}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - mb,
        w - mr,
        h - mb,
        h - mb
    ));
    for i in 0..=4 {
        let y = ymin + (ymax - ymin) * i as f64 / 4.0;
        s.push_str(&format!(
            "<line x1=\"{}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.3}</text>\n",
            ml,
            py(y),
            w - mr,
            py(y),
            ml - 6.0,
            py(y) + 4.0,
            y
        ));
        let x = xmin + (xmax - xmin) * i as f64 / 4.0;
        s.push_str(&format!("<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{:.0}</text>\n", px(x), h - mb + 16.0, x));
    }
    s.push_str(&format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n", (ml + w - mr) / 2.0, h - 6.0));
    let path: Vec<String> = pts.iter().map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
    s.push_str(&format!("<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{}\"/>\n", path.join(" ")));
    if let Some(b) = best_step {
        let x = px((b as f64).clamp(xmin, xmax));
        s.push_str(&format!(
            "<line class=\"best\" x1=\"{x:.1}\" y1=\"{mt}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#2ca02c\" stroke-dasharray=\"4 3\"/><text x=\"{:.1}\" y=\"{}\" fill=\"#2ca02c\">best (step {b})</text>\n",
            h - mb,
            x + 4.0,
            mt + 12.0
        ));
    }
    for (x, y) in &eval_pts {
        s.push_str(&format!("<circle class=\"eval\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"#ff7f0e\"/>\n", px(*x), py(*y)));
    }
    if !eval_pts.is_empty() {
        s.push_str(&format!(
            "<line x1=\"{}\" y1=\"22\" x2=\"{}\" y2=\"22\" stroke=\"#1f77b4\" stroke-width=\"1.5\"/><text x=\"{}\" y=\"26\">train</text><circle cx=\"{}\" cy=\"22\" r=\"3.5\" fill=\"#ff7f0e\"/><text x=\"{}\" y=\"26\">eval</text>\n",
            w - mr - 150.0,
            w - mr - 130.0,
            w - mr - 125.0,
            w - mr - 70.0,
            w - mr - 62.0
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// Convenience for tests and the CLI: the dataset a spec would train on.
pub fn load_training_data(spec: &JobSpec, model_dir: &Path, train: &Path, eval: Option<&Path>) -> Result<(Tokenizer, Dataset, Option<Dataset>)> {
    let tok = Tokenizer::from_model_dir(model_dir, None, None)?;
    let (tr, ev) = data::load_train_eval(train, eval, &tok, &spec.data, spec.training.seed)?;
    Ok((tok, tr, ev))
}

