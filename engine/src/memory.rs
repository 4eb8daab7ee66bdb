//! A training run's peak memory, estimated from the model's config before any weight is
//! read, and the check that refuses a run that cannot fit with the estimate, its parts
//! and the machine's memory (instead of the OOM killer stopping it an hour later).
//!
//! The estimate counts what the CPU path keeps (`docs/benchmarks.md`, "7B scale on one
//! machine", compares it with measured peaks):
//!
//! - **frozen weights** as held in memory: NF4 is 4 bits a value plus the f32 absmax of
//!   each 64-block (plus the 8-bit codes and nested statistics with double quantization,
//!   both kept, `nf4::Nf4Tensor`); full precision is the compute dtype;
//! - **embeddings and output head** in the compute dtype (the head is the embedding when
//!   tied), norms and biases in the activations' dtype (`model::activation_dtype`: the
//!   compute dtype, or f32 for bf16 compute on a CPU with bf16 dot products);
//! - **LoRA**: the f32 parameters, their gradient as the model returns it, the step's
//!   reduction buffers (packed, reduced, unpacked: three more f32 copies) and AdamW's two
//!   moments (f32, or one byte each with 8-bit AdamW);
//! - **activations kept for the backward pass** (in the activations' dtype): candle keeps
//!   every tensor of the forward graph until the backward pass ends, so without
//!   checkpointing every intermediate of every block (counted op by op for each
//!   architecture below, with the attention
//!   probabilities in f32: `[b, heads]` times the causal query blocks' visible keys, about
//!   `s^2 / 2`, see `fused::causal_probabilities_kept`); with checkpointing a block keeps three
//!   hidden-size tensors on a GPU (its detached output, the hook's and their sum; one on
//!   the CPU, where one op stands for all three: counted as three), and the
//!   backward pass recomputes one block at a time: one block's intermediates, plus as
//!   much again for their gradients in flight;
//! - **logits** of the labelled positions and their gradient, `[tokens, vocab]` in the
//!   activations' dtype, plus one f32 copy;
//! - the **load transient**: converting the largest tensor while the model is built (its
//!   bytes as stored, plus, for a linear quantized at load, an f32 tensor and the f32
//!   values), counted instead of the training terms when larger;
//! - a fixed **runtime** allowance (code, tokenizer, data, thread pools), and a **margin**
//!   of 10% on top of everything.

use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::model::config::{ArchConfig, ModelConfig};
use crate::model::Quant;
use crate::{EngineError, Result};

/// The environment variable that turns the fit check off (`1`/`true`/`yes`): for those
/// who know the machine has swap, a larger limit later, or a better estimate.
pub const SKIP_ENV: &str = "LORAFLEET_SKIP_MEMORY_CHECK";

/// Memory for the process besides the model (binary, tokenizer, data, thread pools).
pub const RUNTIME_BYTES: u64 = 256 << 20;

/// The margin added to every estimate, in percent.
pub const MARGIN_PERCENT: u64 = 10;

/// What a training run keeps in memory: the settings the estimate depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryParams {
    pub quant: Quant,
    /// F32 or BF16: frozen dense weights and the embedding table.
    pub compute_dtype: DType,
    /// The activations' dtype (`model::activation_dtype`: f32 for bf16 compute on a CPU
    /// with bf16 dot products).
    pub activation_dtype: DType,
    pub lora_r: usize,
    /// Resolved target module names (`model::resolve_targets`).
    pub lora_targets: Vec<String>,
    pub lora_dropout: bool,
    pub eight_bit_optimizer: bool,
    /// Tokens per sequence (the spec's `data.max_seq_len`: an upper bound).
    pub seq_len: usize,
    pub micro_batch: usize,
    pub gradient_checkpointing: bool,
}

impl MemoryParams {
    /// The settings of a run loading with `load` (its LoRA settings resolved against
    /// `cfg`) on sequences of `seq_len` tokens, `micro_batch` at a time.
    pub fn for_load(load: &crate::model::LoadOptions, cfg: &ModelConfig, seq_len: usize, micro_batch: usize, gradient_checkpointing: bool, eight_bit_optimizer: bool) -> Result<Self> {
        let lora = load.lora.as_ref().ok_or_else(|| EngineError::Config("memory estimate: the run has no LoRA settings".into()))?;
        Ok(Self {
            quant: load.quant,
            compute_dtype: load.compute_dtype,
            activation_dtype: crate::model::activation_dtype(load.compute_dtype, &load.device),
            lora_r: lora.r,
            lora_targets: crate::model::loader::resolve_targets(cfg, lora.target_modules.as_ref())?,
            lora_dropout: lora.dropout > 0.0,
            eight_bit_optimizer,
            seq_len,
            micro_batch,
            gradient_checkpointing,
        })
    }
}

/// An estimate in bytes, by part.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryEstimate {
    /// `(name, bytes)`, in the order they are reported.
    pub parts: Vec<(&'static str, u64)>,
    pub total: u64,
}

impl MemoryEstimate {
    pub fn part(&self, name: &str) -> u64 {
        self.parts.iter().find(|(n, _)| *n == name).map(|p| p.1).unwrap_or(0)
    }

    /// `"14.2 GiB (frozen weights 3.6 GiB, ...)"`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self.parts.iter().filter(|p| p.1 > 0).map(|(n, b)| format!("{n} {}", gib(*b))).collect();
        format!("{} ({})", gib(self.total), parts.join(", "))
    }
}

pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// One linear layer of a block: `(module name, out, in)`.
fn block_linears(cfg: &ModelConfig) -> Vec<(&'static str, usize, usize)> {
    match &cfg.arch {
        ArchConfig::Llama(c) => {
            let (h, qd, kv, i) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
            vec![
                ("q_proj", qd, h),
                ("k_proj", kv, h),
                ("v_proj", kv, h),
                ("o_proj", h, qd),
                ("gate_proj", i, h),
                ("up_proj", i, h),
                ("down_proj", h, i),
            ]
        }
        ArchConfig::Falcon(c) => {
            let (h, hd, nh) = (c.hidden_size, c.head_dim, c.num_heads);
            vec![
                ("query_key_value", c.qkv_out(), h),
                ("dense", h, nh * hd),
                ("dense_h_to_4h", c.ffn_hidden_size, h),
                ("dense_4h_to_h", h, c.ffn_hidden_size),
            ]
        }
    }
}

/// Bytes of one frozen `[out, in]` weight as held in memory.
fn frozen_bytes(n: u64, quant: Quant, dsize: u64) -> u64 {
    match quant {
        Quant::None => n * dsize,
        Quant::Nf4 { double_quant } => {
            let blocks = n.div_ceil(64);
            let nested = if double_quant { blocks + blocks.div_ceil(256) * 4 + 256 * 4 } else { 0 };
            n.div_ceil(2) + blocks * 4 + nested
        }
    }
}

/// Per block and per token: elements of the tensors the forward pass keeps, as
/// `(activation-dtype elements, f32 elements)`, attention probabilities excluded.
fn block_activations_per_token(cfg: &ModelConfig, f32_activations: bool, lora_in: usize) -> (u64, u64) {
    match &cfg.arch {
        ArchConfig::Llama(c) => {
            let (h, qd, kv, i) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
            // norm, q, rope(q), k, rope(k), v, split(v), attention out, o_proj, residual,
            // norm, gate, up, swiglu, down, residual.
            ((6 * h + 3 * qd + 4 * kv + 3 * i + lora_in) as u64, 0)
        }
        ArchConfig::Falcon(c) => {
            let (h, hd, nh, nkv, ffn) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.ffn_hidden_size);
            let (qd, kv) = (nh * hd, nkv * hd);
            let norms = if c.two_layernorms || !c.parallel_attn { 2 } else { 1 };
            // The composite LayerNorm works in f32: centred, squared, normalized, scaled,
            // shifted (+ the f32 input and the rounded output in bf16).
            let (ln_c, ln_f) = if f32_activations { (0, 5 * h) } else { (h, 6 * h) };
            // fused qkv, its q/k/v copies, rope(q), rope(k), attention out, dense,
            // h_to_4h, gelu, 4h_to_h, two residual adds.
            let rest = 2 * (qd + 2 * kv) + (qd + kv) + qd + h + 2 * ffn + h + 2 * h;
            ((norms * ln_c + rest + lora_in) as u64, (norms * ln_f) as u64)
        }
    }
}

/// The peak memory of a training run of `cfg` with `p` (module docs).
pub fn estimate_training(cfg: &ModelConfig, p: &MemoryParams) -> Result<MemoryEstimate> {
    for dt in [p.compute_dtype, p.activation_dtype] {
        if !matches!(dt, DType::F32 | DType::BF16) {
            return Err(EngineError::Config(format!("compute dtype {dt:?} is not supported (f32 or bf16)")));
        }
    }
    if p.seq_len == 0 || p.micro_batch == 0 {
        return Err(EngineError::Config("memory estimate: sequence length and micro-batch size must be positive".into()));
    }
    let c = p.compute_dtype.size_in_bytes() as u64;
    let act = p.activation_dtype.size_in_bytes() as u64;
    let quant = if cfg.bnb_4bit.is_some() { Quant::Nf4 { double_quant: cfg.bnb_4bit.as_ref().is_some_and(|b| b.double_quant) } } else { p.quant };
    let (vocab, hidden, layers) = (cfg.vocab_size() as u64, cfg.hidden_size() as u64, cfg.num_layers() as u64);
    let linears = block_linears(cfg);

    let frozen: u64 = linears.iter().map(|(_, o, i)| frozen_bytes((o * i) as u64, quant, c)).sum::<u64>() * layers;
    let heads = if cfg.tie_word_embeddings() { 1 } else { 2 };
    let norms = layers * 4 * hidden * act + 2 * hidden * act;
    let embeddings = heads * vocab * hidden * c + norms;

    let targeted: Vec<&(&str, usize, usize)> = linears.iter().filter(|(n, _, _)| p.lora_targets.iter().any(|t| t == n)).collect();
    let lora_params: u64 = targeted.iter().map(|(_, o, i)| (p.lora_r * (o + i)) as u64).sum::<u64>() * layers;
    let moments = if p.eight_bit_optimizer { 2 } else { 8 };
    let lora = lora_params * (4 * 5 + moments);

    let tokens = (p.seq_len * p.micro_batch) as u64;
    // The LoRA branch keeps its (dropped-out) input and the r-wide product per target.
    let lora_in: usize = targeted.iter().map(|(_, _, i)| if p.lora_dropout { *i } else { 0 } + p.lora_r).sum();
    let (act_c, act_f) = block_activations_per_token(cfg, act == 4, lora_in);
    let num_heads = match &cfg.arch {
        ArchConfig::Llama(l) => l.num_heads,
        ArchConfig::Falcon(f) => f.num_heads,
    } as u64;
    let probs = p.micro_batch as u64 * num_heads * crate::fused::causal_probabilities_kept(p.seq_len) as u64 * 4;
    let per_block = tokens * (act_c * act + act_f * 4) + probs;
    let activations = if p.gradient_checkpointing {
        // Three hidden-size tensors per block, then one block recomputed with its
        // gradients in flight.
        layers * tokens * 3 * hidden * act + 2 * per_block
    } else {
        // Every block's intermediates, plus the gradients in flight of the block whose
        // backward is running.
        layers * per_block + per_block
    };
    let logits = tokens * vocab * (2 * act + 4);

    // Building a weight reads its stored bytes (bf16 as published) into a tensor first.
    // A dense weight (the embedding, or every linear without NF4) is then converted
    // into the copy it keeps (counted above); a linear quantized at load also needs its
    // f32 tensor and f32 values while its NF4 form is made.
    let largest_linear = linears.iter().map(|(_, o, i)| (o * i) as u64).max().unwrap_or(0);
    let per_linear = if cfg.bnb_4bit.is_none() && matches!(quant, Quant::Nf4 { .. }) { 2 + 4 + 4 } else { 2 };
    let load_transient = (largest_linear * per_linear).max(vocab * hidden * 2);
    let training = lora + activations + logits;
    let (activations, logits, load) = if load_transient > training { (0, 0, load_transient) } else { (activations, logits, 0) };

    let mut parts = vec![
        ("frozen weights", frozen),
        ("embeddings and head", embeddings),
        ("lora + optimizer", lora),
        ("activations", activations),
        ("logits", logits),
        ("load transient", load),
        ("runtime", RUNTIME_BYTES),
    ];
    let sum: u64 = parts.iter().map(|p| p.1).sum();
    let margin = sum * MARGIN_PERCENT / 100;
    parts.push(("margin", margin));
    Ok(MemoryEstimate { parts, total: sum + margin })
}

/// Memory this process may still use, and where the figure came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Available {
    pub bytes: u64,
    /// e.g. `"MemAvailable 22.10 GiB of 23.40 GiB"` or `"cgroup memory.max ..."`.
    pub source: String,
}

/// Where the available memory is read from (injectable for tests).
pub trait MemoryProbe {
    /// `None` where it cannot be known (the check then passes with a log line).
    fn available(&self) -> Option<Available>;
}

/// The machine: `MemAvailable` of /proc/meminfo, or the process's cgroup (v2
/// `memory.max - memory.current + inactive_file`, v1 `memory.limit_in_bytes - usage +
/// inactive_file`) when lower.
pub struct SystemMemory;

fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn stat_value(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then(|| it.next()?.parse().ok())?
    })
}

/// The process's cgroup directories, innermost first (v2 unified, else v1 memory).
fn cgroup_dirs() -> Vec<(PathBuf, bool)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else { return vec![] };
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrl, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        let (root, v2) = if ctrl.is_empty() {
            (PathBuf::from("/sys/fs/cgroup"), true)
        } else if ctrl.split(',').any(|c| c == "memory") {
            (PathBuf::from("/sys/fs/cgroup/memory"), false)
        } else {
            continue;
        };
        let mut dir = root.join(path.trim_start_matches('/'));
        loop {
            out.push((dir.clone(), v2));
            if dir == root || !dir.pop() || !dir.starts_with(&root) {
                break;
            }
        }
    }
    out
}

fn cgroup_available() -> Option<Available> {
    let mut best: Option<Available> = None;
    for (dir, v2) in cgroup_dirs() {
        let (limit, usage, stat) = if v2 {
            (read_u64(&dir.join("memory.max")), read_u64(&dir.join("memory.current")), dir.join("memory.stat"))
        } else {
            (read_u64(&dir.join("memory.limit_in_bytes")), read_u64(&dir.join("memory.usage_in_bytes")), dir.join("memory.stat"))
        };
        // "max" (v2) does not parse; v1 reports no limit as a huge number.
        let (Some(limit), Some(usage)) = (limit, usage) else { continue };
        if limit >= 1 << 60 {
            continue;
        }
        let cache = stat_value(&stat, if v2 { "inactive_file" } else { "total_inactive_file" }).unwrap_or(0);
        let bytes = limit.saturating_sub(usage) + cache.min(usage);
        if best.as_ref().is_none_or(|b| bytes < b.bytes) {
            best = Some(Available { bytes, source: format!("cgroup {} limit {} ({})", if v2 { "memory.max" } else { "memory.limit_in_bytes" }, gib(limit), dir.display()) });
        }
    }
    best
}

impl MemoryProbe for SystemMemory {
    fn available(&self) -> Option<Available> {
        let info = std::fs::read_to_string("/proc/meminfo").ok();
        let host = info.as_deref().and_then(|t| {
            let avail = meminfo_kib(t, "MemAvailable")? * 1024;
            let total = meminfo_kib(t, "MemTotal").map(|k| k * 1024).unwrap_or(avail);
            Some(Available { bytes: avail, source: format!("MemAvailable {} of MemTotal {}", gib(avail), gib(total)) })
        });
        match (host, cgroup_available()) {
            (Some(h), Some(c)) if c.bytes < h.bytes => Some(c),
            (Some(h), _) => Some(h),
            (None, c) => c,
        }
    }
}

/// Whether [`SKIP_ENV`] asks to skip the check.
pub fn check_skipped() -> bool {
    std::env::var(SKIP_ENV).is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Refuse a run whose estimate (times `replicas`: model copies in this process) exceeds
/// what `probe` says is available.
pub fn check_fits(est: &MemoryEstimate, replicas: usize, p: &MemoryParams, probe: &dyn MemoryProbe) -> Result<()> {
    let Some(avail) = probe.available() else {
        tracing::info!(estimate = %est.describe(), "memory check skipped: available memory unknown");
        return Ok(());
    };
    let need = est.total.saturating_mul(replicas.max(1) as u64);
    if need <= avail.bytes {
        tracing::info!(estimate = %est.describe(), available = %avail.source, "memory check passed");
        return Ok(());
    }
    let mut advice = Vec::new();
    if !p.gradient_checkpointing && est.part("activations") > est.total / 5 {
        advice.push("turn on training.gradient_checkpointing".to_string());
    }
    if est.part("activations") + est.part("logits") > est.total / 5 {
        advice.push(format!("shorten data.max_seq_len (now {}) or training.micro_batch_size (now {})", p.seq_len, p.micro_batch));
    }
    if p.quant == Quant::None {
        advice.push("quantize the frozen weights (quantization.method: nf4)".to_string());
    }
    if p.compute_dtype == DType::F32 {
        // On a CPU with bf16 dot products, bf16 compute keeps f32 activations.
        let bf16_acts = crate::model::activation_dtype(DType::BF16, &candle_core::Device::Cpu) == DType::BF16;
        let what = if bf16_acts { "activations and embeddings" } else { "embeddings" };
        advice.push(format!("use quantization.compute_dtype: bf16 (halves {what})"));
    }
    let copies = if replicas > 1 { format!(" x {replicas} model replicas in this process") } else { String::new() };
    Err(EngineError::Memory(format!(
        "training needs about {}{copies}, more than the {} this process can use ({}): {}; or set {SKIP_ENV}=1 to try anyway",
        est.describe(),
        gib(avail.bytes),
        avail.source,
        if advice.is_empty() { "use a machine with more memory".to_string() } else { advice.join(", ") }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::SynthShape;

    fn cfg_of(shape: &SynthShape) -> ModelConfig {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), serde_json::to_string(&shape.config_json(0.02)).unwrap()).unwrap();
        ModelConfig::from_dir(dir.path()).unwrap()
    }

    fn params(seq: usize, ckpt: bool) -> MemoryParams {
        MemoryParams {
            quant: Quant::Nf4 { double_quant: true },
            compute_dtype: DType::F32,
            activation_dtype: DType::F32,
            lora_r: 8,
            lora_targets: vec!["query_key_value".into(), "q_proj".into(), "v_proj".into()],
            lora_dropout: true,
            eight_bit_optimizer: false,
            seq_len: seq,
            micro_batch: 1,
            gradient_checkpointing: ckpt,
        }
    }

    struct Fixed(Option<u64>);
    impl MemoryProbe for Fixed {
        fn available(&self) -> Option<Available> {
            self.0.map(|bytes| Available { bytes, source: "test".into() })
        }
    }

    #[test]
    fn falcon_7b_nf4_weights_and_monotonicity() {
        let cfg = cfg_of(&SynthShape::falcon_7b());
        let e = estimate_training(&cfg, &params(512, true)).unwrap();
        // 6.63 B block weights at 4.5 bits + the double-quantized statistics.
        let frozen = e.part("frozen weights") as f64 / (1u64 << 30) as f64;
        assert!((3.5..3.7).contains(&frozen), "{frozen}");
        // Tied: one [65024, 4544] f32 matrix.
        assert!(e.part("embeddings and head") > 65024 * 4544 * 4);
        let mut last = 0;
        for seq in [128, 256, 512, 1024, 2048] {
            let t = estimate_training(&cfg, &params(seq, false)).unwrap().total;
            assert!(t > last, "seq {seq}");
            last = t;
        }
        for seq in [256, 512, 2048] {
            let on = estimate_training(&cfg, &params(seq, true)).unwrap();
            let off = estimate_training(&cfg, &params(seq, false)).unwrap();
            assert!(on.total < off.total, "seq {seq}: {} vs {}", on.describe(), off.describe());
        }
        let none = estimate_training(&cfg, &MemoryParams { quant: Quant::None, ..params(512, true) }).unwrap();
        assert!(none.part("frozen weights") > 6 * e.part("frozen weights"));
    }

    #[test]
    fn grows_with_layers() {
        let mut last = 0;
        for layers in [1, 2, 8, 32] {
            let shape = SynthShape::Llama { vocab: 32000, hidden: 512, intermediate: 1408, heads: 8, kv_heads: 8, layers, max_positions: 1024 };
            let t = estimate_training(&cfg_of(&shape), &params(256, true)).unwrap().total;
            assert!(t > last, "layers {layers}");
            last = t;
        }
    }

    #[test]
    fn the_check_refuses_with_the_estimate_and_the_machine() {
        let cfg = cfg_of(&SynthShape::falcon_7b());
        let p = params(512, false);
        let e = estimate_training(&cfg, &p).unwrap();
        let err = check_fits(&e, 1, &p, &Fixed(Some(1 << 30))).unwrap_err();
        assert!(matches!(err, EngineError::Memory(_)));
        let msg = err.to_string();
        for want in ["frozen weights", "activations", "1.00 GiB", "test", "gradient_checkpointing", SKIP_ENV] {
            assert!(msg.contains(want), "{want:?} missing from {msg}");
        }
        check_fits(&e, 1, &p, &Fixed(Some(e.total))).unwrap();
        assert!(check_fits(&e, 2, &p, &Fixed(Some(e.total))).unwrap_err().to_string().contains("x 2 model replicas"));
        check_fits(&e, 1, &p, &Fixed(None)).unwrap();
    }

    #[test]
    fn reads_meminfo_and_cgroup_stat_lines() {
        let t = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_kib(t, "MemAvailable"), Some(20_000_000));
        assert_eq!(meminfo_kib(t, "MemTotal"), Some(24_000_000));
        assert_eq!(meminfo_kib(t, "Mem"), None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("memory.stat");
        std::fs::write(&p, "anon 5\ninactive_file 42\nactive_file 7\n").unwrap();
        assert_eq!(stat_value(&p, "inactive_file"), Some(42));
        assert_eq!(stat_value(&p, "file"), None);
        assert!(SystemMemory.available().is_some_and(|a| a.bytes > 0));
    }
}

#[cfg(test)]
mod run_tests {
    use super::*;
    use crate::synth::{write_model, SynthOptions, SynthShape};
    use crate::train::{check_memory, TrainRun};
    use candle_core::Device;
    use lorafleet_shared::spec::{JobSpec, SpecContext};

    struct Fixed(u64);
    impl MemoryProbe for Fixed {
        fn available(&self) -> Option<Available> {
            Some(Available { bytes: self.0, source: "test probe".into() })
        }
    }

    #[test]
    fn a_run_is_refused_before_loading_when_the_limit_is_tiny() {
        let dir = tempfile::tempdir().unwrap();
        let shape = SynthShape::Falcon { vocab: 1024, hidden: 64, heads: 4, layers: 2, max_positions: 128 };
        write_model(&shape, dir.path(), &SynthOptions { shard_bytes: 1 << 20, ..Default::default() }).unwrap();
        let yaml = format!(
            "name: t\nmodel: {{ source: {} }}\ndata: {{ train: x.jsonl, max_seq_len: 64 }}\noutput: {{ dir: out }}\n",
            dir.path().display()
        );
        let spec = JobSpec::from_yaml(&yaml, SpecContext::Local).unwrap();
        let run = TrainRun {
            spec,
            model_dir: dir.path().to_path_buf(),
            train_data: dir.path().join("x.jsonl"),
            eval_data: None,
            init_adapter: None,
            output_dir: dir.path().join("out"),
            work_dir: dir.path().join("out"),
            resume_from: None,
            devices: vec![],
        };
        let cpu = [Device::Cpu];
        let err = check_memory(&run, &cpu, &Fixed(1 << 20)).unwrap_err().to_string();
        assert!(err.starts_with("not enough memory: training needs about"), "{err}");
        assert!(err.contains("frozen weights") && err.contains("the 0.00 GiB this process can use (test probe)"), "{err}");
        check_memory(&run, &cpu, &Fixed(64 << 30)).unwrap();
        // Two CPU ranks in one process hold two replicas.
        let (est, _) = crate::train::memory_estimate(&run).unwrap();
        let e = check_memory(&run, &[Device::Cpu, Device::Cpu], &Fixed(est.total + est.total / 2)).unwrap_err().to_string();
        assert!(e.contains("x 2 model replicas"), "{e}");
    }
}
