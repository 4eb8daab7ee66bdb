//! Local commands: run the engine in this process.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use lorafleet_engine::bench::{bench_train, BenchOptions};
use lorafleet_engine::data::{self, PromptFormat};
use lorafleet_engine::demo::RandomLlama;
use lorafleet_engine::eval;
use lorafleet_engine::generate::{self, GenerateOptions};
use lorafleet_engine::model::{load_model, LoadOptions, LoraInit, LoraSettingsRequest, Quant};
use lorafleet_engine::tokenizer::Tokenizer;
use lorafleet_engine::train::{self, TrainRun};
use lorafleet_shared::spec::{ComputeDtype, DataFormat, DataSpec, JobSpec, QuantMethod, SpecContext};

mod export;
mod progress;

#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Fine-tune a LoRA adapter on this machine from a job spec.
    ///
    /// Writes the PEFT adapter (adapter_config.json, adapter_model.safetensors),
    /// metrics.jsonl (one line per step and eval), loss.svg and train_summary.json to
    /// the spec's output.dir, and resumable checkpoints to output.dir/checkpoints/step-N
    /// when training.checkpoint_every is set. Relative paths in the spec are taken from
    /// the current directory, then from the spec's directory.
    ///
    /// Examples:
    ///   lorafleet demo-model --out models/demo
    ///   lorafleet train examples/faq.yaml
    ///   lorafleet train examples/faq.yaml --resume out/faq/checkpoints/step-200
    #[command(verbatim_doc_comment)]
    Train(TrainArgs),
    /// Loss and perplexity of a model (+ adapter) on a data file.
    ///
    /// The loss is the mean negative log-likelihood of the answer tokens.
    ///
    /// Examples:
    ///   lorafleet eval --model models/demo --adapter out/faq --data examples/faq.json
    ///   lorafleet eval --model models/demo --data examples/faq.json --quantization none --json
    #[command(verbatim_doc_comment)]
    Eval(EvalArgs),
    /// Generate text from a prompt, streaming tokens as they come.
    ///
    /// The prompt is wrapped in the training template ("<human>: {question}\n<assistant>:")
    /// unless --raw is given. Greedy by default; --temperature > 0 samples (seeded).
    ///
    /// Examples:
    ///   lorafleet generate --model models/demo --adapter out/faq --prompt "How do I reset my password?"
    ///   lorafleet generate --model models/demo --prompt "Once upon a time" --raw --temperature 0.8 --top-p 0.9 --seed 7
    #[command(verbatim_doc_comment)]
    Generate(GenerateArgs),
    /// Quantize a model's linear weights to NF4 (bitsandbytes layout, loadable by
    /// transformers + bitsandbytes and by lorafleet without re-quantizing).
    ///
    /// Example:
    ///   lorafleet quantize --model models/demo --out models/demo-nf4
    #[command(verbatim_doc_comment)]
    Quantize {
        /// Source Hugging Face model directory.
        #[arg(long)]
        model: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Skip double quantization of the absmax values.
        #[arg(long)]
        no_double_quant: bool,
    },
    /// Fold a LoRA adapter into its base model (a full checkpoint, servable without PEFT).
    ///
    /// Examples:
    ///   lorafleet merge --model models/demo --adapter out/faq --out models/demo-faq --dtype bf16
    ///   lorafleet merge --model models/demo --adapter out/faq --out demo-faq.gguf --format gguf --dtype q8_0
    #[command(verbatim_doc_comment)]
    Merge {
        /// Base model directory.
        #[arg(long)]
        model: PathBuf,
        /// PEFT adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Weight dtype of the merged checkpoint (f16 and q8_0 with --format gguf).
        #[arg(long, value_enum, default_value = "f32")]
        dtype: export::WeightDtype,
        /// Output: a Hugging Face directory, or one llama.cpp GGUF file.
        #[arg(long, value_enum, default_value = "safetensors")]
        format: export::MergeFormat,
    },
    /// Write a PEFT LoRA adapter as a llama.cpp GGUF LoRA adapter (llama-cli --lora).
    ///
    /// Example:
    ///   lorafleet export --adapter out/faq --format gguf -o faq.gguf --model models/demo
    #[command(verbatim_doc_comment)]
    Export(export::ExportArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Write the deterministic random demo base model (Llama, 4 layers, hidden 128,
    /// bilingual tokenizer) as a Hugging Face directory. Nothing is downloaded.
    ///
    /// Example:
    ///   lorafleet demo-model --out models/demo
    #[command(verbatim_doc_comment)]
    DemoModel {
        /// Directory to write config.json, model.safetensors, tokenizer.json into.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// LoRA training throughput on a random Llama (4 layers, hidden 512, vocab 32000,
    /// seq 256, batch 1, r=8 on all seven projections, AdamW): tokens/s and peak RSS.
    ///
    /// Examples:
    ///   lorafleet bench train
    ///   lorafleet bench train --quant nf4 --checkpointing on --steps 5
    ///   lorafleet bench train --quant nf4 --compute-dtype bf16
    #[command(verbatim_doc_comment)]
    Train {
        /// Frozen weights: full precision or NF4.
        #[arg(long, value_enum, default_value = "none")]
        quant: QuantArg,
        /// Compute dtype (the spec's quantization.compute_dtype).
        #[arg(long, value_enum, default_value = "f32")]
        compute_dtype: DtypeArg,
        /// Gradient checkpointing (recompute activations in the backward pass).
        #[arg(long, value_enum, default_value = "off")]
        checkpointing: OnOff,
        /// Timed steps (after 2 warm-up steps).
        #[arg(long, default_value_t = 10)]
        steps: u64,
        /// Tokens per sequence (one sequence per step).
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Also time each op (LoRA layers, output head, attention, RoPE, RMSNorm, SwiGLU,
        /// loss; forward and backward apart) and print where a step's time goes.
        #[arg(long)]
        ops: bool,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Decoding speed: greedy generation with the KV cache on `bench train`'s model with
    /// its LoRA adapter attached (unmerged), a random prompt, a fixed number of new
    /// tokens (never stopped early); new tokens/s, prompt included, as HF `generate` is
    /// timed by `scripts/bench-compare.sh`.
    ///
    /// Examples:
    ///   lorafleet bench generate
    ///   lorafleet bench generate --quant nf4 --new-tokens 128 --runs 3 --json
    #[command(verbatim_doc_comment)]
    Generate {
        #[arg(long, value_enum, default_value = "none")]
        quant: QuantArg,
        #[arg(long, value_enum, default_value = "f32")]
        compute_dtype: DtypeArg,
        #[arg(long, default_value_t = 32)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        /// Timed runs (after one warm-up run).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long)]
        json: bool,
    },
    /// GFLOP/s of the frozen-weight matrix products of `bench train`'s model (forward
    /// and input gradient of q/k/v/o, gate/up, down and lm_head at 256 rows), f32 and NF4
    /// weights, on every backend this machine has: the built-in kernels (AVX-512, AVX2), the
    /// system BLAS (OpenBLAS/MKL) and the gemm crate.
    ///
    /// Examples:
    ///   lorafleet bench matmul
    ///   lorafleet bench matmul --secs 1 --json
    #[command(verbatim_doc_comment)]
    Matmul {
        /// Seconds to repeat each product.
        #[arg(long, default_value_t = 0.5)]
        secs: f64,
        /// Print the results as one JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Write a random checkpoint of a real 7B model's exact shape (config.json with the
    /// real values, bf16 safetensors shards with model.safetensors.index.json, the demo
    /// tokenizer), streamed tensor by tensor: ~14 GB on disk, a few MB of memory. Nothing is
    /// downloaded; the same seed gives the same bytes.
    ///
    /// Examples:
    ///   lorafleet bench make-model --shape falcon-7b --out /data/falcon-7b-random
    ///   lorafleet bench make-model --shape llama-2-7b --out /data/llama-2-7b-random --shard-gb 5
    #[command(verbatim_doc_comment)]
    MakeModel {
        /// falcon-7b (tiiuae/falcon-7b) or llama-2-7b (meta-llama/Llama-2-7b-hf).
        #[arg(long, value_parser = ["falcon-7b", "llama-2-7b"])]
        shape: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Standard deviation of the weights (norm weights are 1).
        #[arg(long, default_value_t = 0.02)]
        init_std: f32,
        /// Shard size in GB (a shard is closed once it reaches it).
        #[arg(long, default_value_t = 4.0)]
        shard_gb: f64,
    },
    /// Seconds per optimizer step that data parallelism spends in the TCP ring's ordered
    /// all-reduce of the LoRA gradients, for a 7B-shape model (Falcon-7B, adapters on
    /// query_key_value) at LoRA r = 8, 16, 32, 64, with the ranks as threads on loopback.
    ///
    /// Examples:
    ///   lorafleet bench allreduce
    ///   lorafleet bench allreduce --world 4 --rounds 5 --json
    #[command(verbatim_doc_comment)]
    Allreduce {
        /// Ranks in the ring (with --collective nccl: GPUs 0..world, one rank each).
        #[arg(long, default_value_t = 2)]
        world: usize,
        /// `tcp` (the ring, every build) or `nccl` (builds with the `cuda` feature).
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "nccl"])]
        collective: String,
        /// All-reduces timed per LoRA rank (the median is reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Print the results as one JSON array.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantArg {
    Nf4,
    None,
}

impl From<QuantArg> for QuantMethod {
    fn from(q: QuantArg) -> Self {
        match q {
            QuantArg::Nf4 => QuantMethod::Nf4,
            QuantArg::None => QuantMethod::None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Bf16,
    F32,
}

impl From<DtypeArg> for ComputeDtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::Bf16 => ComputeDtype::Bf16,
            DtypeArg::F32 => ComputeDtype::F32,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The job spec (YAML).
    pub spec: PathBuf,
    /// Resume from a checkpoint directory (output.dir/checkpoints/step-N).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Do not draw a progress bar (log lines only).
    #[arg(long)]
    pub no_progress: bool,
    /// Train on `cpu`, on several CPU ranks of this process (`cpu:0,1`: data parallel,
    /// the same adapter as one device), or on `cuda:0` (several, `cuda:0,1`, train data
    /// parallel) in a build with the `cuda` feature.
    #[arg(long, env = "LORAFLEET_DEVICES", default_value = "cpu")]
    pub devices: String,
    /// Print the run's memory estimate (its parts, and the memory this process may use)
    /// and exit without training. Training refuses to start when the estimate exceeds
    /// that memory; LORAFLEET_SKIP_MEMORY_CHECK=1 trains anyway.
    #[arg(long)]
    pub memory_estimate: bool,
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Base model: a local Hugging Face directory, s3://bucket/prefix or
    /// hf://org/name[@revision] (fetched once into ~/.cache/lorafleet or $LORAFLEET_CACHE;
    /// hf:// reads HF_ENDPOINT and HF_TOKEN).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter: a local directory, s3:// or hf:// (as --model).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Frozen weight format.
    #[arg(long, value_enum, default_value = "none")]
    pub quantization: QuantArg,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data file (JSON array, JSONL or CSV).
    #[arg(long)]
    pub data: PathBuf,
    /// Data format.
    #[arg(long, value_enum, default_value = "qa")]
    pub format: FormatArg,
    /// Prompt template (must contain {question}).
    #[arg(long, default_value = lorafleet_shared::spec::DEFAULT_TEMPLATE)]
    pub template: String,
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: u32,
    /// Print one JSON object {"loss", "perplexity", "tokens"}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Qa,
    Alpaca,
    Messages,
    Text,
}

impl From<FormatArg> for DataFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Qa => DataFormat::Qa,
            FormatArg::Alpaca => DataFormat::Alpaca,
            FormatArg::Messages => DataFormat::Messages,
            FormatArg::Text => DataFormat::Text,
        }
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The question (or raw text with --raw).
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// 0 = no top-k filter.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use the prompt as is, without the template.
    #[arg(long)]
    pub raw: bool,
    /// Prompt template (must contain {question}); default: how the adapter was trained
    /// (its template or the model's chat template, recorded next to its files), else the
    /// model's own chat template when it has one, else "<human>: {question}\n<assistant>:".
    #[arg(long)]
    pub template: Option<String>,
}

pub fn run(c: LocalCommand) -> anyhow::Result<()> {
    match c {
        LocalCommand::Train(a) => run_train(a),
        LocalCommand::Eval(a) => run_eval(a),
        LocalCommand::Generate(a) => run_generate(a),
        LocalCommand::Bench(BenchCommand::Generate { quant, compute_dtype, prompt_tokens, new_tokens, runs, json }) => {
            let opts = lorafleet_engine::bench::GenerateBenchOptions { quant: quant.into(), compute_dtype: compute_dtype.into(), prompt_tokens, new_tokens, runs };
            let r = lorafleet_engine::bench::bench_generate(&opts, &candle_core::Device::Cpu)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "lorafleet generate {}{}: {:.1} new tokens/s ({} prompt + {} new tokens, first token {:.3} s), peak RSS {}, threads {}",
                    if quant == QuantArg::Nf4 { "nf4" } else { "none" },
                    if compute_dtype == DtypeArg::Bf16 { " bf16" } else { "" },
                    r.tokens_per_sec,
                    prompt_tokens,
                    new_tokens,
                    r.first_token_secs,
                    r.peak_rss_mib.map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "n/a".into()),
                    r.threads
                );
            }
            Ok(())
        }
        LocalCommand::Bench(BenchCommand::Train { quant, compute_dtype, checkpointing, steps, seq, ops, json }) => {
            let opts = BenchOptions {
                quant: quant.into(),
                compute_dtype: compute_dtype.into(),
                gradient_checkpointing: checkpointing == OnOff::On,
                steps,
                seq_len: seq,
                ops,
            };
            let r = bench_train(&opts, &candle_core::Device::Cpu)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let mib = |v: Option<f64>| v.map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "n/a".into());
                let rss = format!("{} (training steps {}; estimate {})", mib(r.peak_rss_mib), mib(r.train_peak_rss_mib), mib(r.estimate_mib));
                println!(
                    "lorafleet {}{} checkpointing {} seq {}: {:.1} tokens/s ({:.3} s/step: forward+loss {:.3}, backward {:.3}, optimizer {:.3}), peak RSS {rss}, threads {}, matmul {}",
                    if quant == QuantArg::Nf4 { "nf4" } else { "none" },
                    if compute_dtype == DtypeArg::Bf16 { " bf16" } else { "" },
                    if opts.gradient_checkpointing { "on" } else { "off" },
                    opts.seq_len,
                    r.tokens_per_sec,
                    r.secs_per_step,
                    r.forward_secs,
                    r.backward_secs,
                    r.optimizer_secs,
                    r.threads,
                    lorafleet_engine::blas::backend_name()
                );
                if !r.ops.is_empty() {
                    println!("{:<56} {:>10} {:>7} {:>8}", "op", "ms/step", "share", "calls");
                    for o in &r.ops {
                        println!("{:<56} {:>10.1} {:>6.1}% {:>8.0}", o.op, o.secs_per_step * 1e3, 100.0 * o.secs_per_step / r.secs_per_step, o.calls_per_step);
                    }
                    let rest = r.secs_per_step - r.ops.iter().map(|o| o.secs_per_step).sum::<f64>();
                    println!("{:<56} {:>10.1} {:>6.1}%", "everything else (candle ops, graph, optimizer, allocation)", rest * 1e3, 100.0 * rest / r.secs_per_step);
                }
            }
            Ok(())
        }
        LocalCommand::Bench(BenchCommand::Matmul { secs, json }) => {
            if !(secs > 0.0 && secs <= 60.0) {
                anyhow::bail!("--secs: must be in (0, 60], got {secs}");
            }
            let rows = lorafleet_engine::bench::bench_matmul(secs);
            if json {
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                println!("{:<13} {:<10} {:>16} {:<6} {:<20} {:>8}", "product", "pass", "m x out x in", "weight", "backend", "GFLOP/s");
                for r in rows {
                    let shape = format!("{}x{}x{}", r.m, r.out_features, r.in_features);
                    println!("{:<13} {:<10} {:>16} {:<6} {:<20} {:>8.0}", r.role, r.pass, shape, r.weight, r.backend, r.gflops);
                }
            }
            Ok(())
        }
        LocalCommand::Bench(BenchCommand::Allreduce { world, collective, rounds, json }) => {
            if !(2..=16).contains(&world) || !(1..=100).contains(&rounds) {
                anyhow::bail!("--world must be 2..=16 and --rounds 1..=100 (got {world} and {rounds})");
            }
            let ranks = [8, 16, 32, 64];
            let rows = match collective.as_str() {
                #[cfg(feature = "cuda")]
                "nccl" => lorafleet_engine::bench::bench_allreduce_nccl(&ranks, world, rounds)?,
                #[cfg(not(feature = "cuda"))]
                "nccl" => anyhow::bail!("--collective nccl: this binary was built without the `cuda` feature (scripts/build-cuda.sh builds it)"),
                _ => lorafleet_engine::bench::bench_allreduce(&ranks, world, rounds)?,
            };
            let inexact = rows.iter().filter(|r| !r.exact).count();
            if json {
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find_map(|l| l.strip_prefix("model name")).map(|m| m.trim_start_matches([' ', '\t', ':']).to_string()));
                let what = if collective == "nccl" { format!("NCCL, {world} GPUs") } else { format!("TCP ring, {world} ranks on loopback") };
                println!("{what}, {rounds} rounds, CPU {}", cpu.unwrap_or_else(|| "unknown".into()));
                println!("{:>4} {:>12} {:>9} {:>12} {:>9}  ORDERED SUM", "r", "values", "MiB", "median s", "GiB/s");
                for r in &rows {
                    println!("{:>4} {:>12} {:>9.1} {:>12.4} {:>9.2}  {}", r.r, r.values, r.mib, r.median_secs, r.gib_per_sec, if r.exact { "exact" } else { "WRONG" });
                }
            }
            if inexact > 0 {
                anyhow::bail!("{inexact} all-reduce size(s) did not give every rank the ordered sum bit for bit");
            }
            Ok(())
        }
        LocalCommand::Bench(BenchCommand::MakeModel { shape, out, seed, init_std, shard_gb }) => {
            if !(shard_gb.is_finite() && shard_gb > 0.0 && shard_gb <= 1000.0) {
                bail!("--shard-gb: must be in (0, 1000], got {shard_gb}");
            }
            let shape = lorafleet_engine::synth::SynthShape::by_name(&shape)?;
            let opts = lorafleet_engine::synth::SynthOptions { seed, init_std, shard_bytes: (shard_gb * 1e9) as u64 };
            let t0 = std::time::Instant::now();
            let r = lorafleet_engine::synth::write_model(&shape, &out, &opts)?;
            println!(
                "wrote {} parameters ({:.2} GB of bf16 in {} shards) to {} in {:.1} s",
                r.params,
                r.bytes as f64 / 1e9,
                r.shards.len(),
                out.display(),
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        LocalCommand::Quantize { model, out, no_double_quant } => {
            let model = resolve_source("--model", &model)?;
            lorafleet_engine::quantize::quantize_model(&model, &out, !no_double_quant)?;
            println!("wrote the nf4 model to {}", out.display());
            Ok(())
        }
        LocalCommand::Merge { model, adapter, out, dtype, format } => export::run_merge(model, adapter, out, format, dtype),
        LocalCommand::Export(a) => export::run_export(a),
        LocalCommand::DemoModel { out } => {
            RandomLlama::demo().write(&out)?;
            println!("wrote the demo model to {}", out.display());
            Ok(())
        }
    }
}

/// A spec path: as given (from the current directory), else next to the spec file.
fn spec_path(spec_dir: &Path, p: &str) -> PathBuf {
    let path = PathBuf::from(p);
    if path.is_absolute() || path.exists() {
        return path;
    }
    let beside = spec_dir.join(&path);
    if beside.exists() {
        beside
    } else {
        path
    }
}

/// lorafleet's local cache: $LORAFLEET_CACHE, else $XDG_CACHE_HOME/lorafleet, else
/// ~/.cache/lorafleet.
pub fn cache_root() -> PathBuf {
    std::env::var_os("LORAFLEET_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("lorafleet")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lorafleet")))
        .unwrap_or_else(|| PathBuf::from(".lorafleet/cache"))
}

/// A model or adapter source as local commands take it: a local directory (or
/// `file://`), or `s3://bucket/prefix` / `hf://org/name[@revision]`, fetched (verified)
/// into the local cache once (`$LORAFLEET_CACHE`, default `~/.cache/lorafleet`).
pub fn resolve_source(field: &str, source: &Path) -> anyhow::Result<PathBuf> {
    let s = source.to_string_lossy();
    let s = s.as_ref();
    if let Some(p) = s.strip_prefix("file://") {
        return Ok(PathBuf::from(p));
    }
    if !s.contains("://") {
        return Ok(source.to_path_buf());
    }
    let root = cache_root();
    eprintln!("fetching {s} into {} ...", root.display());
    let cache = lorafleet_storage::Cache::new(root);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(cache.model(s, &lorafleet_storage::StorageOptions::default())).map_err(|e| anyhow::anyhow!("{field}: {e}"))
}

pub fn load_spec(path: &Path) -> anyhow::Result<JobSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read spec", path.display()))?;
    JobSpec::from_yaml(&text, SpecContext::Local).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn run_train(a: TrainArgs) -> anyhow::Result<()> {
    let devices = lorafleet_worker::parse_devices(&a.devices)
        .and_then(|ds| ds.into_iter().map(|d| d.open()).collect::<Result<Vec<_>, _>>())
        .map_err(anyhow::Error::msg)?;
    let spec = load_spec(&a.spec)?;
    let dir = a.spec.parent().map(Path::to_path_buf).unwrap_or_default();
    let model_dir = resolve_source("model.source", Path::new(&spec.model.source))?;
    let model_dir = spec_path(&dir, model_dir.to_str().unwrap_or_default());
    if !model_dir.is_dir() {
        bail!("model.source: {} is not a directory (create the demo model with `lorafleet demo-model --out {}`)", model_dir.display(), model_dir.display());
    }
    let train_data = spec_path(&dir, &spec.data.train);
    let eval_data = spec.data.eval.as_deref().map(|e| spec_path(&dir, e));
    let init_adapter = match spec.lora.init_adapter.as_deref() {
        Some(p) => Some(spec_path(&dir, resolve_source("lora.init_adapter", Path::new(p))?.to_str().unwrap_or_default())),
        None => None,
    };
    let output_dir = PathBuf::from(&spec.output.dir);
    let run = TrainRun {
        spec: spec.clone(),
        model_dir,
        train_data,
        eval_data,
        init_adapter,
        output_dir: output_dir.clone(),
        work_dir: output_dir.clone(),
        resume_from: a.resume,
        devices,
    };
    if a.memory_estimate {
        use lorafleet_engine::memory::{gib, MemoryProbe, SystemMemory};
        let (est, _) = train::memory_estimate(&run)?;
        let replicas = run.devices().iter().filter(|d| d.is_cpu()).count();
        println!("memory estimate per model replica: {}", est.describe());
        match SystemMemory.available() {
            Some(av) => {
                let need = est.total * replicas.max(1) as u64;
                let verdict = if replicas == 0 { "not checked (no CPU device)" } else if need <= av.bytes { "fits" } else { "does not fit" };
                println!("available to this process: {} ({}); {replicas} CPU replica(s): {verdict}", gib(av.bytes), av.source);
            }
            None => println!("available memory: unknown"),
        }
        return Ok(());
    }
    let mut obs = progress::CliObserver::new(!a.no_progress);
    obs.stop_on_ctrl_c();
    let summary = match train::train(&run, &mut obs) {
        Ok(s) => s,
        Err(lorafleet_engine::EngineError::Cancelled) => {
            obs.finish();
            let how = match &obs.last_checkpoint {
                Some(c) => format!("; resume with: lorafleet train {} --resume {}", a.spec.display(), c.display()),
                None => " (no checkpoint was written: set training.checkpoint_every to make runs resumable)".into(),
            };
            bail!("training stopped at step {}{how}", obs.last_step);
        }
        Err(e) => return Err(e.into()),
    };
    obs.finish();
    println!(
        "trained {} steps, final loss {:.4}{}; adapter, metrics.jsonl and loss.svg in {}",
        summary.steps,
        summary.final_loss,
        summary.final_eval.as_ref().filter(|e| e.tokens > 0).map(|e| format!(", eval loss {:.4} (perplexity {:.2})", e.loss, e.perplexity)).unwrap_or_default(),
        output_dir.display()
    );
    if !summary.train_data.skipped.is_empty() || summary.train_data.truncated > 0 {
        println!("data: {} rows skipped, {} truncated (see the warnings above)", summary.train_data.skipped.len(), summary.train_data.truncated);
    }
    Ok(())
}

fn load(m: &ModelArgs) -> anyhow::Result<(Box<dyn lorafleet_engine::model::CausalLm>, Tokenizer)> {
    let quant = match m.quantization {
        QuantArg::Nf4 => Quant::Nf4 { double_quant: true },
        QuantArg::None => Quant::None,
    };
    let model_dir = resolve_source("--model", &m.model)?;
    let adapter = match &m.adapter {
        Some(a) => Some(resolve_source("--adapter", a)?),
        None => None,
    };
    let lora = adapter.as_ref().map(|a| LoraSettingsRequest {
        // r, alpha, rslora and targets come from the adapter's config
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        rslora: false,
        target_modules: None,
        init: LoraInit::FromAdapter(a.clone()),
    });
    let opts = LoadOptions { quant, compute_dtype: candle_core::DType::F32, device: candle_core::Device::Cpu, lora };
    let model = load_model(&model_dir, &opts)?;
    let info = model.info();
    let tok = Tokenizer::from_model_dir(&model_dir, info.eos_token_ids.first().copied(), info.pad_token_id)?;
    Ok((model, tok))
}

fn run_eval(a: EvalArgs) -> anyhow::Result<()> {
    let (model, tok) = load(&a.model)?;
    let spec = DataSpec { format: a.format.into(), template: a.template.clone(), max_seq_len: a.max_seq_len, shuffle: false, ..Default::default() };
    if matches!(spec.format, DataFormat::Qa | DataFormat::Alpaca) && !spec.template.contains("{question}") {
        bail!("--template must contain {{question}}");
    }
    let ds = data::load_dataset(&a.data, &tok, &spec)?;
    let batches = data::eval_batches(&ds, 1, tok.pad_id());
    let r = eval::evaluate(model.as_ref(), &batches, &candle_core::Device::Cpu)?;
    if a.json {
        println!("{}", serde_json::json!({"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens}));
    } else {
        println!("loss {:.4}  perplexity {:.3}  tokens {}  ({} examples)", r.loss, r.perplexity, r.tokens, ds.report.examples);
    }
    Ok(())
}

fn run_generate(a: GenerateArgs) -> anyhow::Result<()> {
    if a.temperature < 0.0 || !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--temperature must be >= 0 and --top-p in (0, 1]");
    }
    if let Some(t) = &a.template {
        if !t.contains("{question}") {
            bail!("--template must contain {{question}}");
        }
    }
    let recorded = match &a.model.adapter {
        Some(dir) if a.template.is_none() && !a.raw => lorafleet_engine::peft::read_prompt_format(&resolve_source("--adapter", dir)?)?,
        _ => None,
    };
    let (model, tok) = load(&a.model)?;
    let format = match (&a.template, recorded) {
        (Some(t), _) => PromptFormat::Template(t.clone()),
        (None, Some(f)) => f,
        (None, None) => PromptFormat::default_for(&tok),
    };
    let prompt = if a.raw { tok.encode(&a.prompt, true)? } else { format.encode_question(&tok, &a.prompt)? };
    let opts = GenerateOptions { max_new_tokens: a.max_new_tokens, temperature: a.temperature, top_p: a.top_p, top_k: a.top_k, seed: a.seed, stop_ids: vec![] };
    let mut out = std::io::stdout().lock();
    let mut first = true;
    generate::generate(model.as_ref(), &tok, &prompt, &opts, &candle_core::Device::Cpu, &mut |piece| {
        // the answer starts with the separating space of the protocol
        let piece = if first && !a.raw { piece.trim_start() } else { piece };
        first = false;
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    let _ = writeln!(out);
    Ok(())
}

/// Progress-bar observer (see `progress.rs`).
pub use progress::CliObserver;


#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
    }

    fn train_err(spec_text: &str) -> String {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("spec.yaml");
        std::fs::write(&p, spec_text).unwrap();
        let e = run(LocalCommand::Train(TrainArgs { spec: p, resume: None, no_progress: true, devices: "cpu".into(), memory_estimate: false })).unwrap_err();
        format!("{e:#}")
    }

    fn spec_text(extra_data: &str, train: &Path, out: &Path) -> String {
        format!(
            "name: t\nmodel: {{ source: {} }}\nquantization: {{ method: none, compute_dtype: f32 }}\ndata: {{ train: {}{extra_data} }}\ntraining: {{ max_steps: 2, grad_accum: 1 }}\noutput: {{ dir: {} }}\n",
            fixtures().join("models/tiny-llama").display(),
            train.display(),
            out.display()
        )
    }

    #[test]
    fn train_devices_are_checked_before_anything_runs() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("spec.yaml");
        std::fs::write(&p, spec_text("", &fixtures().join("train/tiny-llama/data.jsonl"), &t.path().join("o"))).unwrap();
        let err = |devices: &str| {
            let a = TrainArgs { spec: p.clone(), resume: None, no_progress: true, devices: devices.into(), memory_estimate: false };
            format!("{:#}", run(LocalCommand::Train(a)).unwrap_err())
        };
        assert!(err("gpu").contains("expected `cpu`, `cpu:0,1` or `cuda:0,1`"), "{}", err("gpu"));
        if !lorafleet_worker::CUDA_BUILT {
            assert!(err("cuda:0").contains("built without the `cuda` feature"), "{}", err("cuda:0"));
        }
        assert!(!t.path().join("o").exists(), "nothing was written");
    }

    #[test]
    fn unknown_spec_key_is_named() {
        let t = tempfile::tempdir().unwrap();
        let e = train_err(&spec_text(", shufle: true", &fixtures().join("train/tiny-llama/data.jsonl"), &t.path().join("o")));
        assert!(e.contains("spec.yaml") && e.contains("data") && e.contains("unknown field `shufle`"), "{e}");
    }

    #[test]
    fn bad_data_is_named_through_the_cli() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("bad.csv");
        std::fs::write(&d, "question,answer\na,b,c\n").unwrap();
        let e = train_err(&spec_text("", &d, &t.path().join("o")));
        assert!(e.contains("bad.csv") && e.contains("malformed csv at line 2"), "{e}");
    }

    #[test]
    fn missing_model_dir_is_named() {
        let t = tempfile::tempdir().unwrap();
        let text = spec_text("", &fixtures().join("train/tiny-llama/data.jsonl"), &t.path().join("o")).replace("tiny-llama }", "nope }");
        let e = train_err(&text);
        assert!(e.contains("nope") && e.contains("not a directory"), "{e}");
    }

    #[test]
    fn train_writes_adapter_metrics_and_curve() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("o");
        let p = t.path().join("spec.yaml");
        std::fs::write(&p, spec_text("", &fixtures().join("train/tiny-llama/data.jsonl"), &out)).unwrap();
        run(LocalCommand::Train(TrainArgs { spec: p, resume: None, no_progress: true, devices: "cpu".into(), memory_estimate: false })).unwrap();
        for f in ["adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "loss.svg"] {
            assert!(out.join(f).is_file(), "{f}");
        }
        let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
        let m = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let first: serde_json::Value = serde_json::from_str(m.lines().next().unwrap()).unwrap();
        assert_eq!(first["step"], 1);
        assert!(first["loss"].as_f64().unwrap() > 0.0);
    }

    #[derive(Debug, clap::Parser)]
    struct TestCli {
        #[command(subcommand)]
        c: LocalCommand,
    }

    #[test]
    fn commands_parse() {
        let c = TestCli::try_parse_from(["x", "generate", "--model", "m", "--prompt", "hi", "--temperature", "0.7", "--top-k", "5", "--raw"]).unwrap();
        assert!(matches!(c.c, LocalCommand::Generate(GenerateArgs { raw: true, top_k: 5, .. })));
        let c = TestCli::try_parse_from(["x", "eval", "--model", "m", "--data", "d.json", "--quantization", "nf4", "--json"]).unwrap();
        assert!(matches!(c.c, LocalCommand::Eval(EvalArgs { json: true, model: ModelArgs { quantization: QuantArg::Nf4, .. }, .. })));
        let c = TestCli::try_parse_from(["x", "bench", "train", "--quant", "nf4", "--checkpointing", "on", "--steps", "3"]).unwrap();
        assert!(matches!(c.c, LocalCommand::Bench(BenchCommand::Train { steps: 3, checkpointing: OnOff::On, .. })));
        assert!(TestCli::try_parse_from(["x", "bench", "train", "--quant", "int3"]).is_err());
        let c = TestCli::try_parse_from(["x", "bench", "matmul", "--secs", "0.1", "--json"]).unwrap();
        assert!(matches!(c.c, LocalCommand::Bench(BenchCommand::Matmul { json: true, .. })));
        let e = run(LocalCommand::Bench(BenchCommand::Matmul { secs: -1.0, json: true })).unwrap_err().to_string();
        assert!(e.contains("--secs"), "{e}");
        let c = TestCli::try_parse_from(["x", "bench", "make-model", "--shape", "falcon-7b", "--out", "d"]).unwrap();
        assert!(matches!(c.c, LocalCommand::Bench(BenchCommand::MakeModel { seed: 0, .. })));
        assert!(TestCli::try_parse_from(["x", "bench", "make-model", "--shape", "gpt-2", "--out", "d"]).is_err());
        let bad = BenchCommand::MakeModel { shape: "falcon-7b".into(), out: "d".into(), seed: 0, init_std: 0.02, shard_gb: 0.0 };
        assert!(run(LocalCommand::Bench(bad)).unwrap_err().to_string().contains("--shard-gb"));
        let c = TestCli::try_parse_from(["x", "merge", "--model", "m", "--adapter", "a", "--out", "o", "--dtype", "bf16"]).unwrap();
        assert!(matches!(c.c, LocalCommand::Merge { dtype: export::WeightDtype::Bf16, .. }));
    }

    #[test]
    fn demo_model_quantize_merge_and_generate() {
        let t = tempfile::tempdir().unwrap();
        let m = t.path().join("demo");
        run(LocalCommand::DemoModel { out: m.clone() }).unwrap();
        let q = t.path().join("demo-nf4");
        run(LocalCommand::Quantize { model: m.clone(), out: q.clone(), no_double_quant: false }).unwrap();
        assert!(q.join("model.safetensors").is_file());
        let args = |model: &Path| GenerateArgs {
            model: ModelArgs { model: model.to_path_buf(), adapter: None, quantization: QuantArg::None },
            prompt: "hi".into(),
            max_new_tokens: 4,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            raw: false,
            template: None,
        };
        run(LocalCommand::Generate(args(&q))).unwrap();
        let e = run(LocalCommand::Merge { model: m.clone(), adapter: t.path().join("none"), out: t.path().join("merged"), dtype: export::WeightDtype::F32, format: export::MergeFormat::Safetensors })
            .unwrap_err()
            .to_string();
        assert!(e.contains("none"), "{e}");
    }
}
