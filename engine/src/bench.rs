//! Training-throughput benchmark, the same work as `shared/bench/hf_peft_cpu.py`: a
//! random Llama (4 layers, hidden 512, intermediate 1408, 8 heads, vocab 32000), one
//! sequence of 256 random tokens per step with loss on every next token, LoRA r=8
//! alpha=16 on q/k/v/o/gate/up/down, AdamW; 2 warm-up steps, then `steps` timed ones.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use lorafleet_shared::spec::{QuantMethod, TargetModules};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::MicroBatch;
use crate::demo::RandomLlama;
use crate::model::{LoadOptions, LoraInit, LoraSettingsRequest, Quant};
use crate::optim::{AdamW, AdamWConfig};
use crate::{EngineError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchOptions {
    pub quant: QuantMethod,
    pub gradient_checkpointing: bool,
    pub steps: u64,
    pub seq_len: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self { quant: QuantMethod::None, gradient_checkpointing: false, steps: 10, seq_len: 256 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    pub options: BenchOptions,
    pub tokens_per_sec: f64,
    pub secs_per_step: f64,
    /// Peak resident set size (VmHWM) in MiB, `None` where /proc is missing.
    pub peak_rss_mib: Option<f64>,
    pub threads: usize,
    pub final_loss: f64,
    /// Mean seconds per timed step in the forward pass + loss, the backward pass and
    /// the optimizer.
    pub forward_secs: f64,
    pub backward_secs: f64,
    pub optimizer_secs: f64,
}

/// Peak RSS of this process in MiB (`VmHWM` of /proc/self/status).
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn bench_train(opts: &BenchOptions, device: &Device) -> Result<BenchResult> {
    let dir: PathBuf = std::env::temp_dir().join(format!("lorafleet-bench-{}", std::process::id()));
    let cfg = RandomLlama::bench();
    cfg.write(&dir)?;
    let result = run(opts, &dir, device);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(opts: &BenchOptions, dir: &std::path::Path, device: &Device) -> Result<BenchResult> {
    if opts.steps == 0 || opts.seq_len < 2 {
        return Err(EngineError::Config("bench: steps must be at least 1 and seq_len at least 2".into()));
    }
    let quant = match opts.quant {
        QuantMethod::Nf4 => Quant::Nf4 { double_quant: true },
        QuantMethod::None => Quant::None,
    };
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let load = LoadOptions {
        quant,
        compute_dtype: DType::F32,
        device: device.clone(),
        lora: Some(LoraSettingsRequest {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            rslora: false,
            target_modules: Some(TargetModules::List(targets.iter().map(|s| s.to_string()).collect())),
            init: LoraInit::PeftDefault { seed: 0 },
        }),
    };
    let model = crate::model::load_model(dir, &load)?;
    let model = model.as_ref();
    model.set_gradient_checkpointing(opts.gradient_checkpointing);
    model.set_training(true);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let vocab = model.info().vocab_size as u32;
    let ids: Vec<u32> = (0..opts.seq_len).map(|_| rng.gen_range(1..vocab)).collect();
    let seq = crate::data::Sequence { ids, targets: std::iter::once(false).chain(std::iter::repeat_n(true, opts.seq_len - 1)).collect(), segment_ids: None, position_ids: None };
    let mb = MicroBatch::from_sequences(&[&seq], 0);
    let n = mb.target_count() as f64;
    let mut opt = AdamW::new(AdamWConfig::default());
    let mut phases = [0f64; 3];
    let mut step = |_: u64, phases: &mut [f64; 3]| -> Result<f64> {
        let t0 = Instant::now();
        let bt = mb.to_tensors(device)?;
        let loss = (crate::eval::nll_sum(model, &bt)? / n)?;
        let v = loss.to_scalar::<f32>()? as f64;
        let t1 = Instant::now();
        let grads = model.backward(&loss)?;
        let t2 = Instant::now();
        opt.step(model.lora_params(), &grads, 1e-4)?;
        let t3 = Instant::now();
        phases[0] += (t1 - t0).as_secs_f64();
        phases[1] += (t2 - t1).as_secs_f64();
        phases[2] += (t3 - t2).as_secs_f64();
        Ok(v)
    };
    for i in 0..2 {
        step(i, &mut [0f64; 3])?;
    }
    let t0 = Instant::now();
    let mut last = f64::NAN;
    for i in 0..opts.steps {
        last = step(i, &mut phases)?;
    }
    let dt = t0.elapsed().as_secs_f64();
    Ok(BenchResult {
        options: opts.clone(),
        tokens_per_sec: (opts.steps as f64 * opts.seq_len as f64) / dt,
        secs_per_step: dt / opts.steps as f64,
        peak_rss_mib: peak_rss_mib(),
        threads: candle_core::utils::get_num_threads(),
        final_loss: last,
        forward_secs: phases[0] / opts.steps as f64,
        backward_secs: phases[1] / opts.steps as f64,
        optimizer_secs: phases[2] / opts.steps as f64,
    })
}
