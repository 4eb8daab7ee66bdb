//! The fine-tuning job spec: what `lorafleet train SPEC.yaml` runs locally and what
//! `lorafleet submit` sends to the coordinator (the gRPC `JobSpec` message mirrors it).
//!
//! Parsing is strict: unknown keys are rejected with their key path
//! (`training.lr_max: unknown field`), and [`JobSpec::validate`] checks every value and
//! names the offending key (`lora.r: must be between 1 and 1024, got 0`). Defaults are
//! those of the QLoRA recipe this project starts from (NF4 double-quant, bf16 compute,
//! LoRA r=8 alpha=32 dropout 0.05, AdamW lr 2e-4, cosine with 5% warm-up, grad accum 4).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A whole job spec as written in YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Human name of the job; letters, digits, `-`, `_`, `.` (1..=64 characters).
    pub name: String,
    pub model: ModelSpec,
    #[serde(default)]
    pub quantization: QuantizationSpec,
    #[serde(default)]
    pub lora: LoraSpec,
    pub data: DataSpec,
    #[serde(default)]
    pub training: TrainingSpec,
    pub output: OutputSpec,
    /// What the job needs from a worker (control plane only; ignored by local runs).
    #[serde(default)]
    pub resources: ResourceSpec,
    /// Higher runs first; FIFO within a priority (control plane only).
    #[serde(default)]
    pub priority: i32,
    /// Free-form labels for filtering job lists (control plane only).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How many attempts a retryable failure may use before the job fails (control plane only).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A local HF model directory, or `file://`, `s3://bucket/prefix`, `az://container/prefix`, `hf://org/name`.
    pub source: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QuantMethod {
    /// Frozen linear weights stored as bitsandbytes NF4.
    #[default]
    Nf4,
    /// Frozen weights kept in full precision.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    F32,
    #[default]
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuantizationSpec {
    pub method: QuantMethod,
    pub double_quant: bool,
    pub compute_dtype: ComputeDtype,
}

impl Default for QuantizationSpec {
    fn default() -> Self {
        Self { method: QuantMethod::Nf4, double_quant: true, compute_dtype: ComputeDtype::Bf16 }
    }
}

/// `target_modules`: a list of module names (matched against the last path component,
/// as PEFT does), or the string `all-linear`. Absent means the architecture's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Named(String),
    List(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSpec {
    pub r: u32,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Option<TargetModules>,
    /// Scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
    /// Start from this PEFT adapter directory (local path or object-store URL).
    pub init_adapter: Option<String>,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self { r: 8, alpha: 32.0, dropout: 0.05, target_modules: None, rslora: false, init_adapter: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Two columns, question and answer (JSON array, JSONL or CSV).
    #[default]
    Qa,
    /// `instruction` / `input` / `output`.
    Alpaca,
    /// OpenAI-style `messages: [{role, content}]`; loss on assistant turns.
    Messages,
    /// Raw text (`text` field, or a plain .txt file); loss on every token.
    Text,
}

pub const DEFAULT_TEMPLATE: &str = "<human>: {question}\n<assistant>:";

/// What formats prompts: `data.template`, or the model's own chat template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChatTemplateChoice {
    #[default]
    Template,
    Model,
}

impl ChatTemplateChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            ChatTemplateChoice::Template => "template",
            ChatTemplateChoice::Model => "model",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    /// Training data file (local path, or a content-addressed object once submitted).
    pub train: String,
    pub eval: Option<String>,
    /// Fraction of the training rows held out for evaluation when `eval` is absent.
    pub eval_split: f64,
    pub format: DataFormat,
    pub question_field: String,
    pub answer_field: String,
    /// Prompt template; must contain `{question}`.
    pub template: String,
    /// `template`: prompts follow `template`; `model`: the model's own chat template
    /// (tokenizer_config.json / chat_template.jinja) formats every conversation, as
    /// transformers' `apply_chat_template` does, and `template` is not used.
    pub chat_template: ChatTemplateChoice,
    pub train_on_prompt: bool,
    pub max_seq_len: u32,
    pub shuffle: bool,
    /// Pack several examples into one sequence (no attention across examples).
    pub packing: bool,
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            train: String::new(),
            eval: None,
            eval_split: 0.0,
            format: DataFormat::Qa,
            question_field: "question".into(),
            answer_field: "answer".into(),
            template: DEFAULT_TEMPLATE.into(),
            chat_template: ChatTemplateChoice::Template,
            train_on_prompt: false,
            max_seq_len: 512,
            shuffle: true,
            packing: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Optimizer {
    #[default]
    #[serde(rename = "adamw")]
    AdamW,
    /// Moments stored blockwise in 8 bits (bitsandbytes' dynamic map).
    #[serde(rename = "adamw_8bit", alias = "paged_adamw_8bit")]
    AdamW8bit,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingSpec {
    pub max_steps: Option<u64>,
    pub epochs: Option<f64>,
    pub micro_batch_size: u32,
    pub grad_accum: u32,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_ratio: f64,
    /// Overrides `warmup_ratio` when set.
    pub warmup_steps: Option<u64>,
    pub weight_decay: f64,
    pub optimizer: Optimizer,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Clip by global gradient norm; 0 disables.
    pub max_grad_norm: f64,
    pub gradient_checkpointing: bool,
    pub seed: u64,
    pub log_every: u64,
    /// Evaluate every N optimizer steps (0: only at the end when eval data exists).
    pub eval_every: u64,
    /// Write a resumable checkpoint every N optimizer steps (0: never).
    pub checkpoint_every: u64,
    /// Prompts answered (greedy) at each evaluation, to watch the model learn.
    pub sample_prompts: Vec<String>,
    pub sample_max_new_tokens: u32,
    /// Answer-quality metrics at each evaluation: the first N examples of the eval set
    /// (file order) are answered greedily with `data.template` and scored against their
    /// reference answers (exact match and ROUGE-L F1). 0 (the default): none. Needs eval
    /// data in the `qa` or `alpaca` format.
    pub eval_generate_samples: u32,
    /// New tokens per generated eval answer; absent: `sample_max_new_tokens`.
    pub eval_generate_max_new_tokens: Option<u32>,
    /// Keep the adapter of the best evaluation as the job's adapter (absent: the last).
    pub save_best: Option<SaveBestSpec>,
    /// Stop a run whose evaluations stopped improving (absent: never).
    pub early_stopping: Option<EarlyStoppingSpec>,
}

/// An evaluation metric `save_best` and `early_stopping` can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalMetric {
    /// Mean token loss on the eval set.
    EvalLoss,
    /// Fraction of generated answers equal to the reference (whitespace normalised).
    ExactMatch,
    /// Mean ROUGE-L F1 of generated answers against the references.
    RougeL,
}

impl EvalMetric {
    /// The name used in the spec, metrics.jsonl and messages.
    pub fn name(self) -> &'static str {
        match self {
            EvalMetric::EvalLoss => "eval_loss",
            EvalMetric::ExactMatch => "exact_match",
            EvalMetric::RougeL => "rouge_l",
        }
    }
    /// Which direction is better when the spec does not say: min for eval_loss, max for
    /// the generation metrics.
    pub fn default_mode(self) -> MetricMode {
        match self {
            EvalMetric::EvalLoss => MetricMode::Min,
            EvalMetric::ExactMatch | EvalMetric::RougeL => MetricMode::Max,
        }
    }
    /// Does it need generated answers (`training.eval_generate_samples > 0`)?
    pub fn needs_generation(self) -> bool {
        !matches!(self, EvalMetric::EvalLoss)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricMode {
    /// Lower is better.
    Min,
    /// Higher is better.
    Max,
}

/// `training.save_best`: after every evaluation whose `metric` is better than every
/// earlier one (strictly; `min_delta` does not apply), its adapter is kept in the output's
/// `best/`; the run's adapter is that one, not the last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaveBestSpec {
    pub metric: EvalMetric,
    /// Absent: `min` for eval_loss, `max` for exact_match and rouge_l.
    #[serde(default)]
    pub mode: Option<MetricMode>,
}

impl SaveBestSpec {
    pub fn mode(&self) -> MetricMode {
        self.mode.unwrap_or(self.metric.default_mode())
    }
}

/// `training.early_stopping`: training stops (successfully) once `patience` evaluations
/// in a row did not improve the metric by more than `min_delta` over the best value that
/// did. The metric is `save_best`'s (with its mode), or eval_loss (min) without it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EarlyStoppingSpec {
    pub patience: u32,
    pub min_delta: f64,
}

impl Default for EarlyStoppingSpec {
    fn default() -> Self {
        Self { patience: 3, min_delta: 0.0 }
    }
}

impl TrainingSpec {
    /// The metric (and its direction) `save_best` and `early_stopping` follow, when
    /// either is set.
    pub fn tracked_metric(&self) -> Option<(EvalMetric, MetricMode)> {
        match (&self.save_best, &self.early_stopping) {
            (Some(b), _) => Some((b.metric, b.mode())),
            (None, Some(_)) => Some((EvalMetric::EvalLoss, MetricMode::Min)),
            (None, None) => None,
        }
    }
    /// New tokens per generated eval answer.
    pub fn eval_max_new_tokens(&self) -> u32 {
        self.eval_generate_max_new_tokens.unwrap_or(self.sample_max_new_tokens)
    }
}

impl Default for TrainingSpec {
    fn default() -> Self {
        Self {
            max_steps: Some(80),
            epochs: None,
            micro_batch_size: 1,
            grad_accum: 4,
            lr: 2.0e-4,
            schedule: Schedule::Cosine,
            warmup_ratio: 0.05,
            warmup_steps: None,
            weight_decay: 0.0,
            optimizer: Optimizer::AdamW,
            betas: [0.9, 0.999],
            eps: 1.0e-8,
            max_grad_norm: 1.0,
            gradient_checkpointing: true,
            seed: 42,
            log_every: 1,
            eval_every: 0,
            checkpoint_every: 0,
            sample_prompts: Vec::new(),
            sample_max_new_tokens: 64,
            eval_generate_samples: 0,
            eval_generate_max_new_tokens: None,
            save_best: None,
            early_stopping: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Where `lorafleet train` writes the adapter, metrics and loss curve. On the
    /// control plane it is a relative name under the job's storage prefix.
    pub dir: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourceSpec {
    pub device: DeviceKind,
    /// Number of devices per node (data parallel when > 1).
    pub count: u32,
    /// Minimum memory per device, in MiB (0: any).
    pub memory_mib: u64,
    /// Number of workers (nodes) the job spans, each with `count` devices: a gang of
    /// `nodes * count` data-parallel ranks, placed all at once or not at all.
    pub nodes: u32,
}

impl Default for ResourceSpec {
    fn default() -> Self {
        Self { device: DeviceKind::Cpu, count: 1, memory_mib: 0, nodes: 1 }
    }
}

impl ResourceSpec {
    /// Data-parallel ranks of the job: `nodes * count`.
    pub fn ranks(&self) -> u64 {
        self.nodes.max(1) as u64 * self.count.max(1) as u64
    }
}

fn default_max_attempts() -> u32 {
    3
}

/// One problem with a spec, located by its key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Everything wrong with a spec (parsing stops at the first problem; validation
/// reports all of them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.errors.iter().map(|e| e.to_string()).collect();
        write!(f, "invalid job spec: {}", parts.join("; "))
    }
}

impl SpecError {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { errors: vec![FieldError { path: path.into(), message: message.into() }] }
    }
}

/// Where a spec is going to run: local paths are fine for `lorafleet train`, but a
/// spec submitted to the coordinator must keep its output inside the job's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecContext {
    Local,
    Remote,
}

impl JobSpec {
    /// Parse YAML (or JSON, a subset of YAML) strictly, then validate. At most
    /// [`MAX_SPEC_BYTES`] of text.
    pub fn from_yaml(text: &str, ctx: SpecContext) -> Result<Self, SpecError> {
        if text.len() > MAX_SPEC_BYTES {
            return Err(SpecError::one("spec", format!("is {} bytes; a job spec is at most {MAX_SPEC_BYTES} bytes", text.len())));
        }
        let de = serde_yaml::Deserializer::from_str(text);
        let spec: JobSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { "spec".to_string() } else { path };
            let inner = e.into_inner().to_string();
            // serde_yaml appends " at line L column C"; keep it, it helps.
            SpecError::one(path, inner)
        })?;
        spec.validate(ctx)?;
        Ok(spec)
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a JobSpec always serializes")
    }

    /// Check every value; all problems are reported at once.
    pub fn validate(&self, ctx: SpecContext) -> Result<(), SpecError> {
        let mut v = Validator::default();
        v.name("name", &self.name);
        v.non_empty("model.source", &self.model.source);
        v.no_nul("model.source", &self.model.source);

        let l = &self.lora;
        v.range_u("lora.r", l.r as u64, 1, 1024);
        v.check("lora.alpha", l.alpha.is_finite() && l.alpha > 0.0, || format!("must be a positive number, got {}", l.alpha));
        v.check("lora.dropout", (0.0..1.0).contains(&l.dropout), || format!("must be in [0, 1), got {}", l.dropout));
        match &l.target_modules {
            Some(TargetModules::Named(s)) if s != "all-linear" => {
                v.push("lora.target_modules", format!("must be a list of module names or \"all-linear\", got {s:?}"))
            }
            Some(TargetModules::List(list)) => {
                if list.is_empty() {
                    v.push("lora.target_modules", "must not be empty".into());
                }
                for (i, m) in list.iter().enumerate() {
                    let ok = !m.is_empty() && m.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
                    v.check(&format!("lora.target_modules[{i}]"), ok, || format!("not a module name: {m:?}"));
                }
            }
            _ => {}
        }
        if let Some(a) = &l.init_adapter {
            v.non_empty("lora.init_adapter", a);
            v.no_nul("lora.init_adapter", a);
        }

        let d = &self.data;
        v.non_empty("data.train", &d.train);
        v.no_nul("data.train", &d.train);
        if let Some(e) = &d.eval {
            v.non_empty("data.eval", e);
            v.no_nul("data.eval", e);
            v.check("data.eval_split", d.eval_split == 0.0, || "must be 0 when data.eval is set".into());
        }
        v.check("data.eval_split", (0.0..1.0).contains(&d.eval_split), || format!("must be in [0, 1), got {}", d.eval_split));
        if d.format == DataFormat::Qa {
            v.non_empty("data.question_field", &d.question_field);
            v.non_empty("data.answer_field", &d.answer_field);
        }
        if matches!(d.format, DataFormat::Qa | DataFormat::Alpaca) && d.chat_template == ChatTemplateChoice::Template {
            v.check("data.template", d.template.contains("{question}"), || "must contain {question}".into());
        }
        if d.format == DataFormat::Text {
            v.check("data.chat_template", d.chat_template == ChatTemplateChoice::Template, || "must be template for format text (raw text has no conversation)".into());
        }
        v.range_u("data.max_seq_len", d.max_seq_len as u64, 8, 131_072);

        let t = &self.training;
        match (t.max_steps, t.epochs) {
            (None, None) => v.push("training.max_steps", "one of training.max_steps or training.epochs must be set".into()),
            (Some(0), _) => v.push("training.max_steps", "must be at least 1".into()),
            _ => {}
        }
        if let Some(e) = t.epochs {
            v.check("training.epochs", e.is_finite() && e > 0.0, || format!("must be a positive number, got {e}"));
        }
        v.range_u("training.micro_batch_size", t.micro_batch_size as u64, 1, 4096);
        v.range_u("training.grad_accum", t.grad_accum as u64, 1, 65_536);
        v.check("training.lr", t.lr.is_finite() && t.lr > 0.0 && t.lr < 10.0, || format!("must be in (0, 10), got {}", t.lr));
        v.check("training.warmup_ratio", (0.0..1.0).contains(&t.warmup_ratio), || format!("must be in [0, 1), got {}", t.warmup_ratio));
        v.check("training.weight_decay", t.weight_decay.is_finite() && t.weight_decay >= 0.0, || {
            format!("must be >= 0, got {}", t.weight_decay)
        });
        for (i, b) in t.betas.iter().enumerate() {
            v.check(&format!("training.betas[{i}]"), (0.0..1.0).contains(b), || format!("must be in [0, 1), got {b}"));
        }
        v.check("training.eps", t.eps.is_finite() && t.eps > 0.0, || format!("must be positive, got {}", t.eps));
        v.check("training.max_grad_norm", t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0, || {
            format!("must be >= 0 (0 disables clipping), got {}", t.max_grad_norm)
        });
        v.check("training.log_every", t.log_every >= 1, || "must be at least 1".into());
        v.range_u("training.sample_max_new_tokens", t.sample_max_new_tokens as u64, 1, 4096);
        // Answer-quality evaluation, best adapter, early stopping: all need eval data.
        let has_eval = d.eval.is_some() || d.eval_split > 0.0;
        v.range_u("training.eval_generate_samples", t.eval_generate_samples as u64, 0, MAX_EVAL_GENERATE_SAMPLES);
        if t.eval_generate_samples > 0 {
            v.check("training.eval_generate_samples", has_eval, || "needs eval data (data.eval or data.eval_split > 0)".into());
            v.check("training.eval_generate_samples", matches!(d.format, DataFormat::Qa | DataFormat::Alpaca), || {
                format!("needs reference answers: data.format qa or alpaca, got {}", format_name(d.format))
            });
        }
        if let Some(n) = t.eval_generate_max_new_tokens {
            v.range_u("training.eval_generate_max_new_tokens", n as u64, 1, 4096);
        }
        if let Some(b) = &t.save_best {
            v.check("training.save_best", has_eval, || "needs eval data (data.eval or data.eval_split > 0)".into());
            v.check("training.save_best.metric", !b.metric.needs_generation() || t.eval_generate_samples > 0, || {
                format!("{} needs generated answers: set training.eval_generate_samples > 0", b.metric.name())
            });
        }
        if let Some(es) = &t.early_stopping {
            v.check("training.early_stopping", has_eval, || "needs eval data (data.eval or data.eval_split > 0)".into());
            v.check("training.early_stopping", t.eval_every > 0, || "needs evaluations during training: set training.eval_every > 0".into());
            v.range_u("training.early_stopping.patience", es.patience as u64, 1, 1_000_000);
            v.check("training.early_stopping.min_delta", es.min_delta.is_finite() && es.min_delta >= 0.0, || {
                format!("must be a finite number >= 0, got {}", es.min_delta)
            });
        }

        v.non_empty("output.dir", &self.output.dir);
        v.no_nul("output.dir", &self.output.dir);
        if ctx == SpecContext::Remote {
            v.relative_path("output.dir", &self.output.dir);
        }

        v.range_u("resources.count", self.resources.count as u64, 1, 1024);
        v.range_u("resources.nodes", self.resources.nodes as u64, 1, 1024);
        let ranks = self.resources.ranks();
        // Every rank runs at least one micro-batch of each step (the batch stays global).
        v.check("training.grad_accum", ranks <= 1 || t.grad_accum as u64 >= ranks, || {
            format!(
                "{} micro-batches per step cannot be shared by {ranks} data-parallel ranks (resources.nodes {} x resources.count {}): set it to at least {ranks}",
                t.grad_accum, self.resources.nodes, self.resources.count
            )
        });
        v.range_u("max_attempts", self.max_attempts as u64, 1, 100);
        for k in self.labels.keys() {
            let ok = !k.is_empty() && k.len() <= 63 && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            v.check(&format!("labels.{k}"), ok, || "label keys are 1-63 characters of letters, digits, - _ . /".into());
        }
        for (k, val) in &self.labels {
            v.max_len(&format!("labels.{k}"), val, MAX_SHORT_LEN);
            v.no_nul(&format!("labels.{k}"), val);
            v.no_control(&format!("labels.{k}"), val);
        }
        v.max_entries("labels", self.labels.len());
        // Lengths: every string the spec carries is bounded.
        for (path, s) in [("model.source", Some(&self.model.source)), ("lora.init_adapter", l.init_adapter.as_ref()), ("data.train", Some(&d.train)), ("data.eval", d.eval.as_ref()), ("output.dir", Some(&self.output.dir))] {
            if let Some(s) = s {
                v.max_len(path, s, MAX_LOCATION_LEN);
                v.no_control(path, s);
            }
        }
        v.max_len("data.question_field", &d.question_field, MAX_SHORT_LEN);
        v.max_len("data.answer_field", &d.answer_field, MAX_SHORT_LEN);
        v.max_len("data.template", &d.template, MAX_TEXT_LEN);
        if let Some(TargetModules::List(list)) = &l.target_modules {
            v.max_entries("lora.target_modules", list.len());
            for (i, m) in list.iter().enumerate() {
                v.max_len(&format!("lora.target_modules[{i}]"), m, MAX_SHORT_LEN);
            }
        }
        v.max_entries("training.sample_prompts", t.sample_prompts.len());
        for (i, p) in t.sample_prompts.iter().enumerate() {
            v.max_len(&format!("training.sample_prompts[{i}]"), p, MAX_TEXT_LEN);
            v.no_nul(&format!("training.sample_prompts[{i}]"), p);
        }
        v.finish()
    }
}

/// Most eval examples answered at each evaluation (`training.eval_generate_samples`).
pub const MAX_EVAL_GENERATE_SAMPLES: u64 = 10_000;

fn format_name(f: DataFormat) -> &'static str {
    match f {
        DataFormat::Qa => "qa",
        DataFormat::Alpaca => "alpaca",
        DataFormat::Messages => "messages",
        DataFormat::Text => "text",
    }
}

/// Largest job spec text accepted (YAML or JSON).
pub const MAX_SPEC_BYTES: usize = 64 * 1024;
/// Longest location (model source, adapter, dataset, output directory).
pub const MAX_LOCATION_LEN: usize = 1024;
/// Longest prompt template or sample prompt.
pub const MAX_TEXT_LEN: usize = 8192;
/// Longest short string (field names, module names, label values).
pub const MAX_SHORT_LEN: usize = 256;
/// Most entries in a list or map of the spec (labels, target modules, sample prompts).
pub const MAX_ENTRIES: usize = 64;

/// Is `p` a safe relative path: not absolute, no `..` component, no NUL, no backslash?
pub fn is_safe_relative_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\0')
        && !p.contains('\\')
        && !p.contains(':')
        && p.split('/').all(|c| c != ".." && c != ".")
}

#[derive(Default)]
struct Validator {
    errors: Vec<FieldError>,
}

impl Validator {
    fn push(&mut self, path: &str, message: String) {
        self.errors.push(FieldError { path: path.to_string(), message });
    }
    fn check(&mut self, path: &str, ok: bool, message: impl FnOnce() -> String) {
        if !ok {
            self.push(path, message());
        }
    }
    fn non_empty(&mut self, path: &str, s: &str) {
        self.check(path, !s.trim().is_empty(), || "must not be empty".into());
    }
    fn no_nul(&mut self, path: &str, s: &str) {
        self.check(path, !s.contains('\0'), || "must not contain NUL".into());
    }
    fn max_len(&mut self, path: &str, s: &str, max: usize) {
        self.check(path, s.len() <= max, || format!("is {} bytes long; at most {max}", s.len()));
    }
    fn max_entries(&mut self, path: &str, n: usize) {
        self.check(path, n <= MAX_ENTRIES, || format!("has {n} entries; at most {MAX_ENTRIES}"));
    }
    /// No control characters (a location or a label value is one printable line).
    fn no_control(&mut self, path: &str, s: &str) {
        self.check(path, !s.chars().any(|c| c.is_control() && c != '\0'), || "must not contain control characters".into());
    }
    fn range_u(&mut self, path: &str, x: u64, lo: u64, hi: u64) {
        self.check(path, (lo..=hi).contains(&x), || format!("must be between {lo} and {hi}, got {x}"));
    }
    fn name(&mut self, path: &str, s: &str) {
        let ok = (1..=64).contains(&s.len())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !s.contains("..")
            && !s.starts_with('.');
        self.check(path, ok, || {
            format!("must be 1-64 letters, digits, '-', '_' or '.', not starting with '.' nor containing '..', got {s:?}")
        });
    }
    fn relative_path(&mut self, path: &str, s: &str) {
        self.check(path, is_safe_relative_path(s), || {
            format!("must be a relative path without '..', '.', ':' or backslashes, got {s:?}")
        });
    }
    fn finish(self) -> Result<(), SpecError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(SpecError { errors: self.errors })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "name: faq\nmodel: { source: ./m }\ndata: { train: ./faq.json }\noutput: { dir: out/faq }\n";

    #[test]
    fn the_models_chat_template_is_chosen_by_name() {
        let with = |data: &str| JobSpec::from_yaml(&MINIMAL.replace("data: { train: ./faq.json }", data), SpecContext::Local);
        let s = with("data: { train: ./faq.json, chat_template: model, template: unused }").unwrap();
        assert_eq!(s.data.chat_template, ChatTemplateChoice::Model);
        assert_eq!(JobSpec::from_yaml(MINIMAL, SpecContext::Local).unwrap().data.chat_template, ChatTemplateChoice::Template);
        let e = with("data: { train: ./faq.json, chat_template: jinja }").unwrap_err().to_string();
        assert!(e.contains("data.chat_template"), "{e}");
        let e = with("data: { train: ./faq.json, format: text, chat_template: model }").unwrap_err().to_string();
        assert!(e.contains("data.chat_template: must be template for format text"), "{e}");
        // with the template, the template must hold {question}
        let e = with("data: { train: ./faq.json, template: plain }").unwrap_err().to_string();
        assert!(e.contains("data.template"), "{e}");
    }

    #[test]
    fn minimal_spec_gets_recipe_defaults() {
        let s = JobSpec::from_yaml(MINIMAL, SpecContext::Remote).unwrap();
        assert_eq!(s.quantization.method, QuantMethod::Nf4);
        assert!(s.quantization.double_quant);
        assert_eq!(s.quantization.compute_dtype, ComputeDtype::Bf16);
        assert_eq!((s.lora.r, s.lora.alpha, s.lora.dropout), (8, 32.0, 0.05));
        assert_eq!(s.training.max_steps, Some(80));
        assert_eq!(s.training.grad_accum, 4);
        assert_eq!(s.training.optimizer, Optimizer::AdamW);
        assert_eq!(s.data.template, DEFAULT_TEMPLATE);
        assert_eq!(s.max_attempts, 3);
    }

    #[test]
    fn sizes_and_lengths_are_bounded() {
        let big = format!("{MINIMAL}# {}\n", "x".repeat(MAX_SPEC_BYTES));
        let e = JobSpec::from_yaml(&big, SpecContext::Remote).unwrap_err();
        assert_eq!(e.errors[0].path, "spec");
        let mut s = JobSpec::from_yaml(MINIMAL, SpecContext::Remote).unwrap();
        s.model.source = "m".repeat(MAX_LOCATION_LEN + 1);
        s.data.train = "a\nb".into();
        s.labels = (0..=MAX_ENTRIES).map(|i| (format!("k{i}"), "v".into())).collect();
        s.training.sample_prompts = vec!["p".repeat(MAX_TEXT_LEN + 1)];
        let e = s.validate(SpecContext::Remote).unwrap_err();
        let paths: Vec<&str> = e.errors.iter().map(|f| f.path.as_str()).collect();
        for want in ["model.source", "data.train", "labels", "training.sample_prompts[0]"] {
            assert!(paths.contains(&want), "{want} not in {paths:?}");
        }
    }

    #[test]
    fn issue_example_parses() {
        let y = r#"
name: faq-falcon
model: { source: ./models/falcon-7b }
quantization: { method: nf4, double_quant: true, compute_dtype: bf16 }
lora: { r: 8, alpha: 32, dropout: 0.05, target_modules: [query_key_value], rslora: false, init_adapter: null }
data:
  train: ./examples/faq.json
  eval: null
  eval_split: 0.0
  format: qa
  question_field: question
  answer_field: answer
  template: "<human>: {question}\n<assistant>:"
  chat_template: template
  train_on_prompt: false
  max_seq_len: 512
  shuffle: true
  packing: false
training:
  max_steps: 80
  epochs: null
  micro_batch_size: 1
  grad_accum: 4
  lr: 2.0e-4
  schedule: cosine
  warmup_ratio: 0.05
  weight_decay: 0.0
  optimizer: paged_adamw_8bit
  betas: [0.9, 0.999]
  eps: 1.0e-8
  max_grad_norm: 1.0
  gradient_checkpointing: true
  seed: 42
  log_every: 1
  eval_every: 0
  checkpoint_every: 0
output: { dir: ./out/faq-falcon }
"#;
        let s = JobSpec::from_yaml(y, SpecContext::Local).unwrap();
        assert_eq!(s.training.optimizer, Optimizer::AdamW8bit);
        assert_eq!(s.lora.target_modules, Some(TargetModules::List(vec!["query_key_value".into()])));
        // Round trip through YAML keeps every value.
        assert_eq!(JobSpec::from_yaml(&s.to_yaml(), SpecContext::Local).unwrap(), s);
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let y = MINIMAL.replace("data: { train: ./faq.json }", "data: { train: ./faq.json, shufle: true }");
        let e = JobSpec::from_yaml(&y, SpecContext::Local).unwrap_err();
        assert_eq!(e.errors[0].path, "data.shufle");
        assert!(e.to_string().contains("unknown field `shufle`"), "{e}");
    }

    #[test]
    fn bad_value_names_key_and_reason() {
        let y = format!("{MINIMAL}lora: {{ r: 0 }}\n");
        let e = JobSpec::from_yaml(&y, SpecContext::Local).unwrap_err();
        assert_eq!(e.to_string(), "invalid job spec: lora.r: must be between 1 and 1024, got 0");
    }

    #[test]
    fn wrong_type_names_key() {
        let y = format!("{MINIMAL}training: {{ lr: fast }}\n");
        let e = JobSpec::from_yaml(&y, SpecContext::Local).unwrap_err();
        assert_eq!(e.errors[0].path, "training.lr");
    }

    #[test]
    fn all_problems_reported_at_once() {
        let y = format!("{MINIMAL}training: {{ grad_accum: 0, betas: [1.5, 0.9] }}\n");
        let e = JobSpec::from_yaml(&y, SpecContext::Local).unwrap_err();
        let paths: Vec<_> = e.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["training.grad_accum", "training.betas[0]"]);
    }

    #[test]
    fn unsafe_names_and_remote_paths_refused() {
        for bad in ["../x", "a/b", "", ".hidden", "a\0b", "a..b"] {
            let y = MINIMAL.replace("name: faq", &format!("name: {:?}", bad));
            assert!(JobSpec::from_yaml(&y, SpecContext::Local).is_err(), "{bad:?}");
        }
        for bad in ["/etc/x", "../up", "a/../../b", "a\\b", "s3://x/y", "a/./b"] {
            let y = MINIMAL.replace("dir: out/faq", &format!("dir: {:?}", bad));
            let e = JobSpec::from_yaml(&y, SpecContext::Remote).unwrap_err();
            assert_eq!(e.errors[0].path, "output.dir", "{bad:?}");
        }
        // Locally an absolute output directory is fine.
        let y = MINIMAL.replace("dir: out/faq", "dir: /tmp/faq");
        JobSpec::from_yaml(&y, SpecContext::Local).unwrap();
    }

    #[test]
    fn steps_or_epochs_required() {
        let y = format!("{MINIMAL}training: {{ max_steps: null }}\n");
        let e = JobSpec::from_yaml(&y, SpecContext::Local).unwrap_err();
        assert_eq!(e.errors[0].path, "training.max_steps");
        let y = format!("{MINIMAL}training: {{ max_steps: null, epochs: 2 }}\n");
        JobSpec::from_yaml(&y, SpecContext::Local).unwrap();
    }

    #[test]
    fn target_modules_forms() {
        let y = format!("{MINIMAL}lora: {{ target_modules: all-linear }}\n");
        let s = JobSpec::from_yaml(&y, SpecContext::Local).unwrap();
        assert_eq!(s.lora.target_modules, Some(TargetModules::Named("all-linear".into())));
        let y = format!("{MINIMAL}lora: {{ target_modules: everything }}\n");
        assert!(JobSpec::from_yaml(&y, SpecContext::Local).is_err());
    }

    const EVAL: &str = "name: faq\nmodel: { source: ./m }\ndata: { train: ./faq.json, eval: ./e.json }\noutput: { dir: out/faq }\n";

    fn errors(y: &str) -> Vec<String> {
        match JobSpec::from_yaml(y, SpecContext::Local) {
            Ok(_) => vec![],
            Err(e) => e.errors.iter().map(|f| f.to_string()).collect(),
        }
    }

    #[test]
    fn answer_quality_keys_parse_with_defaults() {
        let s = JobSpec::from_yaml(EVAL, SpecContext::Local).unwrap();
        assert_eq!(s.training.eval_generate_samples, 0);
        assert_eq!((s.training.save_best.clone(), s.training.early_stopping.clone()), (None, None));
        assert_eq!(s.training.tracked_metric(), None);
        assert_eq!(s.training.eval_max_new_tokens(), 64);

        let y = format!("{EVAL}training: {{ eval_every: 5, eval_generate_samples: 8, eval_generate_max_new_tokens: 16, save_best: {{ metric: rouge_l }}, early_stopping: {{ patience: 2, min_delta: 0.01 }} }}\n");
        let s = JobSpec::from_yaml(&y, SpecContext::Remote).unwrap();
        let t = &s.training;
        assert_eq!(t.eval_generate_samples, 8);
        assert_eq!(t.eval_max_new_tokens(), 16);
        assert_eq!(t.save_best, Some(SaveBestSpec { metric: EvalMetric::RougeL, mode: None }));
        assert_eq!(t.tracked_metric(), Some((EvalMetric::RougeL, MetricMode::Max)), "generation metrics default to max");
        assert_eq!(t.early_stopping, Some(EarlyStoppingSpec { patience: 2, min_delta: 0.01 }));
        assert_eq!(JobSpec::from_yaml(&s.to_yaml(), SpecContext::Remote).unwrap(), s, "YAML round trip");

        // eval_loss defaults to min; an explicit mode wins; early stopping alone follows eval_loss.
        let y = format!("{EVAL}training: {{ save_best: {{ metric: eval_loss }} }}\n");
        assert_eq!(JobSpec::from_yaml(&y, SpecContext::Local).unwrap().training.tracked_metric(), Some((EvalMetric::EvalLoss, MetricMode::Min)));
        let y = format!("{EVAL}training: {{ save_best: {{ metric: eval_loss, mode: max }} }}\n");
        assert_eq!(JobSpec::from_yaml(&y, SpecContext::Local).unwrap().training.tracked_metric(), Some((EvalMetric::EvalLoss, MetricMode::Max)));
        let y = format!("{EVAL}training: {{ eval_every: 2, early_stopping: {{}} }}\n");
        let s = JobSpec::from_yaml(&y, SpecContext::Local).unwrap();
        assert_eq!(s.training.early_stopping, Some(EarlyStoppingSpec { patience: 3, min_delta: 0.0 }));
        assert_eq!(s.training.tracked_metric(), Some((EvalMetric::EvalLoss, MetricMode::Min)));
        // An eval split is eval data too.
        let y = format!("{MINIMAL}data: {{ train: ./faq.json, eval_split: 0.2 }}\ntraining: {{ eval_every: 2, eval_generate_samples: 2, save_best: {{ metric: exact_match }}, early_stopping: {{ patience: 1 }} }}\n");
        assert_eq!(errors(&y.replace("data: { train: ./faq.json }\n", "")), Vec::<String>::new());
    }

    #[test]
    fn the_evaluation_example_parses() {
        let s = JobSpec::from_yaml(include_str!("../../examples/faq-eval.yaml"), SpecContext::Local).unwrap();
        assert_eq!(s.training.tracked_metric(), Some((EvalMetric::ExactMatch, MetricMode::Max)));
        assert!(s.training.eval_generate_samples > 0 && s.training.early_stopping.is_some());
    }

    #[test]
    fn answer_quality_bad_values_name_their_key() {
        let no_eval = MINIMAL;
        for (yaml, want) in [
            (format!("{no_eval}training: {{ eval_generate_samples: 4 }}\n"), "training.eval_generate_samples: needs eval data (data.eval or data.eval_split > 0)"),
            (format!("{EVAL}training: {{ eval_generate_samples: 10001 }}\n"), "training.eval_generate_samples: must be between 0 and 10000, got 10001"),
            (
                EVAL.replace("eval: ./e.json }", "eval: ./e.json, format: text }") + "training: { eval_generate_samples: 4 }\n",
                "training.eval_generate_samples: needs reference answers: data.format qa or alpaca, got text",
            ),
            (format!("{EVAL}training: {{ eval_generate_max_new_tokens: 0 }}\n"), "training.eval_generate_max_new_tokens: must be between 1 and 4096, got 0"),
            (format!("{no_eval}training: {{ save_best: {{ metric: eval_loss }} }}\n"), "training.save_best: needs eval data (data.eval or data.eval_split > 0)"),
            (
                format!("{EVAL}training: {{ save_best: {{ metric: exact_match }} }}\n"),
                "training.save_best.metric: exact_match needs generated answers: set training.eval_generate_samples > 0",
            ),
            (
                format!("{EVAL}training: {{ save_best: {{ metric: rouge_l, mode: max }} }}\n"),
                "training.save_best.metric: rouge_l needs generated answers: set training.eval_generate_samples > 0",
            ),
            (format!("{no_eval}training: {{ eval_every: 2, early_stopping: {{ patience: 2 }} }}\n"), "training.early_stopping: needs eval data (data.eval or data.eval_split > 0)"),
            (format!("{EVAL}training: {{ early_stopping: {{ patience: 2 }} }}\n"), "training.early_stopping: needs evaluations during training: set training.eval_every > 0"),
            (format!("{EVAL}training: {{ eval_every: 2, early_stopping: {{ patience: 0 }} }}\n"), "training.early_stopping.patience: must be between 1 and 1000000, got 0"),
            (format!("{EVAL}training: {{ eval_every: 2, early_stopping: {{ min_delta: -0.1 }} }}\n"), "training.early_stopping.min_delta: must be a finite number >= 0, got -0.1"),
            (format!("{EVAL}training: {{ eval_every: 2, early_stopping: {{ min_delta: .nan }} }}\n"), "training.early_stopping.min_delta: must be a finite number >= 0, got NaN"),
            (format!("{EVAL}training: {{ eval_every: 2, early_stopping: {{ min_delta: .inf }} }}\n"), "training.early_stopping.min_delta: must be a finite number >= 0, got inf"),
        ] {
            assert_eq!(errors(&yaml), vec![want.to_string()], "{yaml}");
        }
        // Parsing: unknown keys and values name their path.
        for (yaml, path) in [
            (format!("{EVAL}training: {{ save_best: {{ metric: eval_loss, mdoe: min }} }}\n"), "training.save_best.mdoe"),
            (format!("{EVAL}training: {{ save_best: {{ metric: accuracy }} }}\n"), "training.save_best.metric"),
            (format!("{EVAL}training: {{ save_best: {{ metric: eval_loss, mode: lowest }} }}\n"), "training.save_best.mode"),
            (format!("{EVAL}training: {{ save_best: {{ mode: min }} }}\n"), "training.save_best"),
            (format!("{EVAL}training: {{ early_stopping: {{ patiense: 2 }} }}\n"), "training.early_stopping.patiense"),
            (format!("{EVAL}training: {{ early_stopping: {{ patience: -1 }} }}\n"), "training.early_stopping.patience"),
            (format!("{EVAL}training: {{ eval_generate_samples: many }}\n"), "training.eval_generate_samples"),
        ] {
            let e = JobSpec::from_yaml(&yaml, SpecContext::Local).unwrap_err();
            assert_eq!(e.errors[0].path, path, "{yaml}: {e}");
        }
    }
}
