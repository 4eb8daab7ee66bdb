//! Training-throughput benchmark, the same work as `shared/bench/hf_peft_cpu.py`: a
//! random Llama (4 layers, hidden 512, intermediate 1408, 8 heads, vocab 32000), one
//! sequence of 256 random tokens per step with loss on every next token, LoRA r=8
//! alpha=16 on q/k/v/o/gate/up/down, AdamW; 2 warm-up steps, then `steps` timed ones.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use lorafleet_shared::spec::{ComputeDtype, QuantMethod, TargetModules};
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
    pub compute_dtype: ComputeDtype,
    pub gradient_checkpointing: bool,
    pub steps: u64,
    pub seq_len: usize,
    /// Time each op ([`crate::profile`]) and report it in [`BenchResult::ops`].
    #[serde(default)]
    pub ops: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self { quant: QuantMethod::None, compute_dtype: ComputeDtype::F32, gradient_checkpointing: false, steps: 10, seq_len: 256, ops: false }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    pub options: BenchOptions,
    pub tokens_per_sec: f64,
    pub secs_per_step: f64,
    /// Peak resident set size of the whole run (VmHWM, generating and loading the model
    /// included, as the PyTorch anchor measures it) in MiB, `None` where /proc is missing.
    pub peak_rss_mib: Option<f64>,
    /// Peak resident set size during the training steps alone (the peak is reset after
    /// the model is loaded), in MiB: what gradient checkpointing changes. `None` where the
    /// kernel cannot reset the peak.
    pub train_peak_rss_mib: Option<f64>,
    pub threads: usize,
    pub final_loss: f64,
    /// Mean seconds per timed step in the forward pass + loss, the backward pass and
    /// the optimizer.
    pub forward_secs: f64,
    pub backward_secs: f64,
    pub optimizer_secs: f64,
    /// The memory estimate of the run (`memory::estimate_training`, margin included) in
    /// MiB, to compare with `peak_rss_mib`.
    #[serde(default)]
    pub estimate_mib: Option<f64>,
    /// With [`BenchOptions::ops`]: mean seconds per timed step in each op (forward and
    /// backward apart); the rest of the step is candle's own ops and bookkeeping.
    #[serde(default)]
    pub ops: Vec<OpTime>,
}

/// One op's share of a training step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpTime {
    pub op: String,
    pub secs_per_step: f64,
    pub calls_per_step: f64,
}

/// Reset this process's peak RSS to its current RSS (Linux >= 4.0: `5` to
/// /proc/self/clear_refs); false where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
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
    let load = bench_load_options(opts.quant, opts.compute_dtype, device);
    let estimate = {
        let cfg = crate::model::read_model_config(dir)?;
        let params = crate::memory::MemoryParams::for_load(&load, &cfg, opts.seq_len, 1, opts.gradient_checkpointing, false)?;
        crate::memory::estimate_training(&cfg, &params)?
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
    let load_peak = peak_rss_mib();
    let reset = reset_peak_rss();
    for i in 0..2 {
        step(i, &mut [0f64; 3])?;
    }
    crate::profile::enable(opts.ops);
    crate::profile::reset();
    let t0 = Instant::now();
    let mut last = f64::NAN;
    for i in 0..opts.steps {
        last = step(i, &mut phases)?;
    }
    let dt = t0.elapsed().as_secs_f64();
    crate::profile::enable(false);
    let per = opts.steps as f64;
    let ops = if opts.ops {
        crate::profile::totals().into_iter().map(|(op, secs, calls)| OpTime { op: op.name().to_string(), secs_per_step: secs / per, calls_per_step: calls as f64 / per }).collect()
    } else {
        Vec::new()
    };
    Ok(BenchResult {
        options: opts.clone(),
        tokens_per_sec: (opts.steps as f64 * opts.seq_len as f64) / dt,
        secs_per_step: dt / opts.steps as f64,
        peak_rss_mib: match (load_peak, peak_rss_mib()) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        },
        train_peak_rss_mib: if reset { peak_rss_mib() } else { None },
        threads: candle_core::utils::get_num_threads(),
        final_loss: last,
        forward_secs: phases[0] / opts.steps as f64,
        backward_secs: phases[1] / opts.steps as f64,
        optimizer_secs: phases[2] / opts.steps as f64,
        estimate_mib: Some(estimate.total as f64 / (1u64 << 20) as f64),
        ops,
    })
}

/// What [`bench_generate`] measures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateBenchOptions {
    pub quant: QuantMethod,
    pub compute_dtype: ComputeDtype,
    /// Random prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated per run (never stopped early).
    pub new_tokens: usize,
    /// Timed runs (after one warm-up run).
    pub runs: usize,
}

impl Default for GenerateBenchOptions {
    fn default() -> Self {
        Self { quant: QuantMethod::None, compute_dtype: ComputeDtype::F32, prompt_tokens: 32, new_tokens: 128, runs: 3 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateBenchResult {
    pub options: GenerateBenchOptions,
    /// New tokens per second, prompt processing included (what HF `generate` is timed on).
    pub tokens_per_sec: f64,
    /// Seconds to the first new token (the prompt's forward pass), mean of the runs.
    pub first_token_secs: f64,
    pub peak_rss_mib: Option<f64>,
    pub threads: usize,
}

/// Greedy decoding with the KV cache on `bench train`'s model with its LoRA adapter
/// attached (r=8 on all seven projections, unmerged, as PEFT runs it): `new_tokens`
/// after a random prompt of `prompt_tokens`, `runs` times after a warm-up.
pub fn bench_generate(opts: &GenerateBenchOptions, device: &Device) -> Result<GenerateBenchResult> {
    if opts.runs == 0 || opts.new_tokens == 0 || opts.prompt_tokens == 0 {
        return Err(EngineError::Config("bench generate: runs, new tokens and prompt tokens must be at least 1".into()));
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("lorafleet-bench-gen-{}", std::process::id()));
    RandomLlama::bench().write(&dir)?;
    let result = (|| {
        let model = crate::model::load_model(&dir, &bench_load_options(opts.quant, opts.compute_dtype, device))?;
        let model = model.as_ref();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let vocab = model.info().vocab_size as u32;
        let prompt: Vec<u32> = (0..opts.prompt_tokens).map(|_| rng.gen_range(1..vocab)).collect();
        // A stop id no model has: every run generates exactly `new_tokens`.
        let gen = crate::generate::GenerateOptions { max_new_tokens: opts.new_tokens, stop_ids: vec![u32::MAX], ..Default::default() };
        let once = || -> Result<(f64, f64)> {
            let t0 = Instant::now();
            let mut first = None;
            let (ids, _) = crate::generate::generate_ids(model, &prompt, &gen, device, &mut |_| {
                first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                Ok(())
            })?;
            debug_assert_eq!(ids.len(), opts.new_tokens);
            Ok((t0.elapsed().as_secs_f64(), first.unwrap_or(0.0)))
        };
        once()?;
        let (mut total, mut first) = (0.0, 0.0);
        for _ in 0..opts.runs {
            let (t, f) = once()?;
            total += t;
            first += f;
        }
        Ok(GenerateBenchResult {
            options: opts.clone(),
            tokens_per_sec: (opts.runs * opts.new_tokens) as f64 / total,
            first_token_secs: first / opts.runs as f64,
            peak_rss_mib: peak_rss_mib(),
            threads: candle_core::utils::get_num_threads(),
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The bench model's load options: LoRA r=8, alpha 16 on q/k/v/o/gate/up/down.
fn bench_load_options(quant: QuantMethod, compute_dtype: ComputeDtype, device: &Device) -> LoadOptions {
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    LoadOptions {
        quant: match quant {
            QuantMethod::Nf4 => Quant::Nf4 { double_quant: true },
            QuantMethod::None => Quant::None,
        },
        compute_dtype: match compute_dtype {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
        },
        device: device.clone(),
        lora: Some(LoraSettingsRequest {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            rslora: false,
            target_modules: Some(TargetModules::List(targets.iter().map(|s| s.to_string()).collect())),
            init: LoraInit::PeftDefault { seed: 0 },
        }),
    }
}

/// One line of [`bench_matmul`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatmulResult {
    /// What the product is in the training benchmark's model.
    pub role: String,
    /// `forward` (`y = x W^T`) or `input-grad` (`gx = g W`).
    pub pass: String,
    /// Rows of the activation, output features, input features.
    pub m: usize,
    pub out_features: usize,
    pub in_features: usize,
    /// `f32` or `nf4`.
    pub weight: String,
    pub backend: String,
    pub gflops: f64,
}

/// The frozen-weight products of one training step of [`bench_train`]'s model (seq 256),
/// timed on every backend this machine has: the built-in kernels on each instruction set
/// the CPU has (f32 and NF4 weights), the system BLAS (when one loads) and the gemm crate (f32;
/// NF4 weights on those two are dequantized first, as the frozen linear layer does).
/// Each product is repeated for about `secs_each` seconds.
pub fn bench_matmul(secs_each: f64) -> Vec<MatmulResult> {
    let shapes: [(&str, usize, usize, usize); 4] =
        [("q/k/v/o_proj", 256, 512, 512), ("gate/up_proj", 256, 1408, 512), ("down_proj", 256, 512, 1408), ("lm_head", 255, 32000, 512)];
    let mut out = Vec::new();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for &(role, m, n, k) in &shapes {
        let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-0.05..0.05)).collect();
        let q = crate::nf4::Nf4Tensor::quantize(&w, &[n, k], true).expect("2-d weight quantizes");
        let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let g: Vec<f32> = (0..m * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let (mut y, mut gx) = (vec![0f32; m * n], vec![0f32; m * k]);
        let flops = 2.0 * (m * n * k) as f64;
        let time = |f: &mut dyn FnMut()| -> f64 {
            f();
            let t0 = Instant::now();
            let mut reps = 0u64;
            while reps < 3 || t0.elapsed().as_secs_f64() < secs_each {
                f();
                reps += 1;
            }
            flops * reps as f64 / t0.elapsed().as_secs_f64() / 1e9
        };
        let mut record = |pass: &str, weight: &str, backend: String, gflops: f64| {
            out.push(MatmulResult { role: role.into(), pass: pass.into(), m, out_features: n, in_features: k, weight: weight.into(), backend, gflops });
        };
        for isa in crate::kernels::Isa::ALL.into_iter().filter(|i| i.supported()) {
            use crate::kernels::{linear_bwd, linear_fwd, Rows};
            let name = format!("{} (built-in)", isa.name());
            for (weight, rows) in [("f32", Rows::F32(&w)), ("nf4", Rows::Nf4(&q))] {
                let gf = time(&mut || linear_fwd(isa, m, n, k, &x, rows, &mut y, false));
                record("forward", weight, name.clone(), gf);
                let gf = time(&mut || linear_bwd(isa, m, n, k, &g, rows, &mut gx, false));
                record("input-grad", weight, name.clone(), gf);
            }
        }
        if crate::kernels_bf16::available() {
            use crate::kernels::Rows;
            use crate::kernels_bf16::{linear_bwd, linear_fwd};
            for (weight, rows) in [("f32", Rows::F32(&w)), ("nf4", Rows::Nf4(&q))] {
                let gf = time(&mut || linear_fwd(m, n, k, &x, rows, &mut y, false, true));
                record("forward", weight, "bf16 dot (built-in)".into(), gf);
                let gf = time(&mut || linear_bwd(m, n, k, &g, rows, &mut gx, false, true));
                record("input-grad", weight, "bf16 dot (built-in)".into(), gf);
            }
        }
        type Sgemm = dyn Fn(usize, usize, usize, &mut [f32], bool, &[f32], &[f32], bool);
        let system = crate::blas::system_search();
        let mut others: Vec<(String, Box<Sgemm>)> = Vec::new();
        if let Some(b) = system {
            let name = b.name.clone();
            others.push((name, Box::new(move |m, n, k, d, a, l, r, t| b.sgemm(m, n, k, d, a, l, r, t))));
        }
        others.push(("gemm crate".into(), Box::new(crate::blas::sgemm_portable)));
        for (name, f) in &others {
            for weight in ["f32", "nf4"] {
                let mut deq = vec![0f32; n * k];
                // The frozen layer hands these backends a dequantized copy of NF4 weights.
                let weight_f32 = |deq: &mut Vec<f32>| -> bool {
                    if weight == "nf4" {
                        q.dequantize_into(deq);
                    }
                    weight == "nf4"
                };
                let gf = time(&mut || {
                    let wv = if weight_f32(&mut deq) { &deq } else { &w };
                    f(m, n, k, &mut y, false, &x, wv, true)
                });
                record("forward", weight, name.clone(), gf);
                let gf = time(&mut || {
                    let wv = if weight_f32(&mut deq) { &deq } else { &w };
                    f(m, k, n, &mut gx, false, &g, wv, false)
                });
                record("input-grad", weight, name.clone(), gf);
            }
        }
    }
    out
}

/// One line of [`bench_allreduce`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllReduceResult {
    /// `tcp` (the ring) or `nccl`.
    pub transport: String,
    /// LoRA rank of the adapter whose gradients are reduced.
    pub r: usize,
    /// f32 values per all-reduce (the adapter's parameters).
    pub values: usize,
    pub mib: f64,
    /// Ranks of the ring (threads of this process on loopback).
    pub world: usize,
    /// Median seconds of one ordered all-reduce, over `rounds`.
    pub median_secs: f64,
    /// Buffer bytes / median time.
    pub gib_per_sec: f64,
    pub rounds: usize,
    /// Every rank got the ordered sum, bit for bit, in every round.
    pub exact: bool,
}

/// LoRA parameters of a Falcon-7B-shape model with adapters on `query_key_value` (32
/// layers, 4544 -> 4672): `r * (4544 + 4672)` per layer.
pub fn falcon7b_qkv_lora_params(r: usize) -> usize {
    32 * r * (4544 + 4672)
}

/// The TCP ring's ordered all-reduce on loopback (`world` ranks as threads of this
/// process), for the LoRA gradients of a 7B-shape model at each rank in `ranks`: the
/// per-step communication of a data-parallel run (one all-reduce per optimizer step).
pub fn bench_allreduce(ranks: &[usize], world: usize, rounds: usize) -> Result<Vec<AllReduceResult>> {
    use crate::collective::{Collective, TcpRing};
    bench_allreduce_on(ranks, rounds, "tcp", || {
        Ok(TcpRing::local(world, std::time::Duration::from_secs(120))?.into_iter().map(|r| Box::new(r) as Box<dyn Collective>).collect())
    })
}

/// The same over NCCL, one rank per CUDA device `0..world` of this machine.
#[cfg(feature = "nccl")]
pub fn bench_allreduce_nccl(ranks: &[usize], world: usize, rounds: usize) -> Result<Vec<AllReduceResult>> {
    use crate::collective::Collective;
    bench_allreduce_on(ranks, rounds, "nccl", || {
        let devices = (0..world).map(Device::new_cuda).collect::<candle_core::Result<Vec<_>>>()?;
        let comms = crate::collective::nccl::NcclCollective::local(&devices, std::time::Duration::from_secs(120))?;
        Ok(comms.into_iter().map(|c| Box::new(c) as Box<dyn Collective>).collect())
    })
}

/// Rank `r`'s contribution in the all-reduce benchmark (values whose sum depends on the order).
fn bench_part(r: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 + r * 13) % 101) as f32 * 0.0137 - 0.5 + (r as f32 + 1.0) * 1e-7 * (i % 3) as f32).collect()
}

fn bench_allreduce_on(
    ranks: &[usize],
    rounds: usize,
    transport: &str,
    make: impl Fn() -> Result<Vec<Box<dyn crate::collective::Collective>>>,
) -> Result<Vec<AllReduceResult>> {
    let mut out = Vec::new();
    for &r in ranks {
        let n = falcon7b_qkv_lora_params(r);
        let comms = make()?;
        let world = comms.len();
        // The ordered sum every rank must get, bit for bit.
        let mut expect = vec![0f32; n];
        for k in 0..world {
            for (e, v) in expect.iter_mut().zip(bench_part(k, n)) {
                *e += v;
            }
        }
        let results = std::thread::scope(|s| -> Result<Vec<(Vec<f64>, bool)>> {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|mut c| {
                    let expect = &expect;
                    s.spawn(move || -> Result<(Vec<f64>, bool)> {
                        let part = bench_part(c.rank(), n);
                        let mut outb = vec![0f32; n];
                        let mut t = Vec::with_capacity(rounds);
                        let mut exact = true;
                        c.barrier()?;
                        for _ in 0..rounds {
                            let t0 = Instant::now();
                            c.all_reduce_ordered(&[&part], &mut outb)?;
                            c.barrier()?;
                            t.push(t0.elapsed().as_secs_f64());
                            exact &= outb.iter().zip(expect).all(|(a, b)| a.to_bits() == b.to_bits());
                        }
                        Ok((t, exact))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().map_err(|_| crate::EngineError::Collective("bench thread panicked".into()))?).collect()
        })?;
        let exact = results.iter().all(|(_, e)| *e);
        let mut sorted = results.first().map(|(t, _)| t.clone()).unwrap_or_default();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
        let bytes = (n * 4) as f64;
        out.push(AllReduceResult {
            transport: transport.to_string(),
            r,
            values: n,
            mib: bytes / (1 << 20) as f64,
            world,
            median_secs: median,
            gib_per_sec: bytes / median / (1u64 << 30) as f64,
            rounds,
            exact,
        });
    }
    Ok(out)
}
