//! Conversions between the wire types and the domain types (`lorafleet_shared`), in one
//! place for the coordinator, the worker and the CLI. Every proto -> domain conversion
//! goes through `TryFrom` (or a `*_from_pb` function taking the field path) and names
//! the offending field in its error, which becomes `INVALID_ARGUMENT`
//! (`model: missing`, `training.betas: must have exactly 2 values, got 1`).
//!
//! Absent optional sections (`quantization`, `lora`, `training`, `resources`) take the
//! spec defaults, exactly as an absent YAML section does; an enum left `UNSPECIFIED` is
//! refused.

use crate as pb;
use lorafleet_shared::ids::{Epoch, JobId, WorkerId};
use lorafleet_shared::job::{FailureClass, JobState};
use lorafleet_shared::spec::{
    ChatTemplateChoice,
    ComputeDtype, DataFormat, DataSpec, DeviceKind, EarlyStoppingSpec, EvalMetric, JobSpec, LoraSpec, MetricMode, ModelSpec,
    Optimizer, OutputSpec, QuantMethod, QuantizationSpec, ResourceSpec, SaveBestSpec, Schedule, TargetModules, TrainingSpec,
};

/// A wire value that does not convert: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConvertError {
    pub field: String,
    pub message: String,
}

impl From<ConvertError> for tonic::Status {
    fn from(e: ConvertError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

fn invalid(field: &str, msg: impl std::fmt::Display) -> ConvertError {
    ConvertError { field: field.to_string(), message: msg.to_string() }
}

fn enum_value<E: TryFrom<i32>>(field: &str, v: i32) -> Result<E, ConvertError> {
    E::try_from(v).map_err(|_| invalid(field, format!("unknown enum value {v}")))
}

pub fn parse_job_id(field: &str, s: &str) -> Result<JobId, ConvertError> {
    if s.is_empty() {
        return Err(invalid(field, "missing"));
    }
    s.parse().map_err(|e| invalid(field, e))
}

pub fn parse_worker_id(field: &str, s: &str) -> Result<WorkerId, ConvertError> {
    if s.is_empty() {
        return Err(invalid(field, "missing"));
    }
    s.parse().map_err(|e| invalid(field, e))
}

pub fn parse_epoch(field: &str, e: u64) -> Result<Epoch, ConvertError> {
    if e == 0 {
        return Err(invalid(field, "missing (epochs start at 1)"));
    }
    Ok(Epoch(e))
}

// ---- enums -------------------------------------------------------------------------

pub fn state_to_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelling => pb::JobState::Cancelling,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn state_from_pb(field: &str, v: i32) -> Result<JobState, ConvertError> {
    Ok(match enum_value::<pb::JobState>(field, v)? {
        pb::JobState::Unspecified => return Err(invalid(field, "must be set")),
        pb::JobState::Queued => JobState::Queued,
        pb::JobState::Running => JobState::Running,
        pb::JobState::Succeeded => JobState::Succeeded,
        pb::JobState::Failed => JobState::Failed,
        pb::JobState::Cancelling => JobState::Cancelling,
        pb::JobState::Cancelled => JobState::Cancelled,
    })
}

pub fn failure_class_from_pb(field: &str, v: i32) -> Result<FailureClass, ConvertError> {
    Ok(match enum_value::<pb::FailureClass>(field, v)? {
        pb::FailureClass::Unspecified => return Err(invalid(field, "must be set")),
        pb::FailureClass::Retryable => FailureClass::Retryable,
        pb::FailureClass::NonRetryable => FailureClass::NonRetryable,
    })
}

pub fn failure_class_to_pb(c: FailureClass) -> pb::FailureClass {
    match c {
        FailureClass::Retryable => pb::FailureClass::Retryable,
        FailureClass::NonRetryable => pb::FailureClass::NonRetryable,
    }
}

pub fn device_kind_from_pb(field: &str, v: i32) -> Result<DeviceKind, ConvertError> {
    Ok(match enum_value::<pb::DeviceKind>(field, v)? {
        pb::DeviceKind::Unspecified => return Err(invalid(field, "must be set")),
        pb::DeviceKind::Cpu => DeviceKind::Cpu,
        pb::DeviceKind::Cuda => DeviceKind::Cuda,
    })
}

pub fn device_kind_to_pb(k: DeviceKind) -> pb::DeviceKind {
    match k {
        DeviceKind::Cpu => pb::DeviceKind::Cpu,
        DeviceKind::Cuda => pb::DeviceKind::Cuda,
    }
}

pub fn eval_metric_from_pb(field: &str, v: i32) -> Result<EvalMetric, ConvertError> {
    Ok(match enum_value::<pb::EvalMetric>(field, v)? {
        pb::EvalMetric::Unspecified => return Err(invalid(field, "must be set")),
        pb::EvalMetric::EvalLoss => EvalMetric::EvalLoss,
        pb::EvalMetric::ExactMatch => EvalMetric::ExactMatch,
        pb::EvalMetric::RougeL => EvalMetric::RougeL,
    })
}

pub fn eval_metric_to_pb(m: EvalMetric) -> pb::EvalMetric {
    match m {
        EvalMetric::EvalLoss => pb::EvalMetric::EvalLoss,
        EvalMetric::ExactMatch => pb::EvalMetric::ExactMatch,
        EvalMetric::RougeL => pb::EvalMetric::RougeL,
    }
}

/// A mode that is present must be MIN or MAX (absent is the metric's default).
pub fn metric_mode_from_pb(field: &str, v: i32) -> Result<MetricMode, ConvertError> {
    Ok(match enum_value::<pb::MetricMode>(field, v)? {
        pb::MetricMode::Unspecified => return Err(invalid(field, "must be MIN or MAX when present (absent: the metric's default)")),
        pb::MetricMode::Min => MetricMode::Min,
        pb::MetricMode::Max => MetricMode::Max,
    })
}

pub fn metric_mode_to_pb(m: MetricMode) -> pb::MetricMode {
    match m {
        MetricMode::Min => pb::MetricMode::Min,
        MetricMode::Max => pb::MetricMode::Max,
    }
}

// ---- job spec: proto -> domain --------------------------------------------------------

/// Convert a wire spec. `field` is the path of the message itself (`spec`); errors
/// name fields relative to the spec root, as the YAML validation does
/// (`model: missing`, `training.betas: ...`).
pub fn spec_from_pb(p: pb::JobSpec) -> Result<JobSpec, ConvertError> {
    let model = p.model.ok_or_else(|| invalid("model", "missing"))?;
    let data = p.data.ok_or_else(|| invalid("data", "missing"))?;
    let output = p.output.ok_or_else(|| invalid("output", "missing"))?;
    Ok(JobSpec {
        name: p.name,
        model: ModelSpec { source: model.source },
        quantization: match p.quantization {
            None => QuantizationSpec::default(),
            Some(q) => QuantizationSpec {
                method: match enum_value::<pb::QuantMethod>("quantization.method", q.method)? {
                    pb::QuantMethod::Unspecified => return Err(invalid("quantization.method", "must be set")),
                    pb::QuantMethod::Nf4 => QuantMethod::Nf4,
                    pb::QuantMethod::None => QuantMethod::None,
                },
                double_quant: q.double_quant,
                compute_dtype: match enum_value::<pb::ComputeDtype>("quantization.compute_dtype", q.compute_dtype)? {
                    pb::ComputeDtype::Unspecified => return Err(invalid("quantization.compute_dtype", "must be set")),
                    pb::ComputeDtype::F32 => ComputeDtype::F32,
                    pb::ComputeDtype::Bf16 => ComputeDtype::Bf16,
                },
            },
        },
        lora: match p.lora {
            None => LoraSpec::default(),
            Some(l) => LoraSpec {
                r: l.r,
                alpha: l.alpha,
                dropout: l.dropout,
                target_modules: match l.target_modules {
                    None => None,
                    Some(pb::lora_spec::TargetModules::TargetModulesNamed(s)) => Some(TargetModules::Named(s)),
                    Some(pb::lora_spec::TargetModules::TargetModulesList(list)) => Some(TargetModules::List(list.modules)),
                },
                rslora: l.rslora,
                init_adapter: l.init_adapter,
            },
        },
        data: DataSpec {
            train: data.train,
            eval: data.eval,
            eval_split: data.eval_split,
            format: match enum_value::<pb::DataFormat>("data.format", data.format)? {
                pb::DataFormat::Unspecified => return Err(invalid("data.format", "must be set")),
                pb::DataFormat::Qa => DataFormat::Qa,
                pb::DataFormat::Alpaca => DataFormat::Alpaca,
                pb::DataFormat::Messages => DataFormat::Messages,
                pb::DataFormat::Text => DataFormat::Text,
            },
            question_field: data.question_field,
            answer_field: data.answer_field,
            template: data.template,
            chat_template: match data.chat_template.as_str() {
                "" | "template" => ChatTemplateChoice::Template,
                "model" => ChatTemplateChoice::Model,
                other => return Err(invalid("data.chat_template", format!("must be template or model, got {other:?}"))),
            },
            train_on_prompt: data.train_on_prompt,
            max_seq_len: data.max_seq_len,
            shuffle: data.shuffle,
            packing: data.packing,
        },
        training: match p.training {
            None => TrainingSpec::default(),
            Some(t) => TrainingSpec {
                max_steps: t.max_steps,
                epochs: t.epochs,
                micro_batch_size: t.micro_batch_size,
                grad_accum: t.grad_accum,
                lr: t.lr,
                schedule: match enum_value::<pb::Schedule>("training.schedule", t.schedule)? {
                    pb::Schedule::Unspecified => return Err(invalid("training.schedule", "must be set")),
                    pb::Schedule::Cosine => Schedule::Cosine,
                    pb::Schedule::Linear => Schedule::Linear,
                    pb::Schedule::Constant => Schedule::Constant,
                },
                warmup_ratio: t.warmup_ratio,
                warmup_steps: t.warmup_steps,
                weight_decay: t.weight_decay,
                optimizer: match enum_value::<pb::Optimizer>("training.optimizer", t.optimizer)? {
                    pb::Optimizer::Unspecified => return Err(invalid("training.optimizer", "must be set")),
                    pb::Optimizer::Adamw => Optimizer::AdamW,
                    pb::Optimizer::Adamw8bit => Optimizer::AdamW8bit,
                },
                betas: match t.betas.as_slice() {
                    [a, b] => [*a, *b],
                    other => return Err(invalid("training.betas", format!("must have exactly 2 values, got {}", other.len()))),
                },
                eps: t.eps,
                max_grad_norm: t.max_grad_norm,
                gradient_checkpointing: t.gradient_checkpointing,
                seed: t.seed,
                log_every: t.log_every,
                eval_every: t.eval_every,
                checkpoint_every: t.checkpoint_every,
                sample_prompts: t.sample_prompts,
                sample_max_new_tokens: t.sample_max_new_tokens,
                eval_generate_samples: t.eval_generate_samples,
                eval_generate_max_new_tokens: t.eval_generate_max_new_tokens,
                save_best: match t.save_best {
                    None => None,
                    Some(b) => Some(SaveBestSpec {
                        metric: eval_metric_from_pb("training.save_best.metric", b.metric)?,
                        mode: b.mode.map(|m| metric_mode_from_pb("training.save_best.mode", m)).transpose()?,
                    }),
                },
                early_stopping: t.early_stopping.map(|e| EarlyStoppingSpec { patience: e.patience, min_delta: e.min_delta }),
            },
        },
        output: OutputSpec { dir: output.dir },
        resources: match p.resources {
            None => ResourceSpec::default(),
            Some(r) => ResourceSpec {
                device: device_kind_from_pb("resources.device", r.device)?,
                count: r.count,
                memory_mib: r.memory_mib,
                // Absent (0, an older client): one node.
                nodes: r.nodes.max(1),
            },
        },
        priority: p.priority,
        labels: p.labels.into_iter().collect(),
        max_attempts: p.max_attempts,
    })
}

// ---- job spec: domain -> proto --------------------------------------------------------

pub fn spec_to_pb(s: &JobSpec) -> pb::JobSpec {
    let q = &s.quantization;
    let l = &s.lora;
    let d = &s.data;
    let t = &s.training;
    pb::JobSpec {
        name: s.name.clone(),
        model: Some(pb::ModelSpec { source: s.model.source.clone() }),
        quantization: Some(pb::QuantizationSpec {
            method: match q.method {
                QuantMethod::Nf4 => pb::QuantMethod::Nf4,
                QuantMethod::None => pb::QuantMethod::None,
            } as i32,
            double_quant: q.double_quant,
            compute_dtype: match q.compute_dtype {
                ComputeDtype::F32 => pb::ComputeDtype::F32,
                ComputeDtype::Bf16 => pb::ComputeDtype::Bf16,
            } as i32,
        }),
        lora: Some(pb::LoraSpec {
            r: l.r,
            alpha: l.alpha,
            dropout: l.dropout,
            target_modules: l.target_modules.as_ref().map(|tm| match tm {
                TargetModules::Named(n) => pb::lora_spec::TargetModules::TargetModulesNamed(n.clone()),
                TargetModules::List(v) => pb::lora_spec::TargetModules::TargetModulesList(pb::TargetModuleList { modules: v.clone() }),
            }),
            rslora: l.rslora,
            init_adapter: l.init_adapter.clone(),
        }),
        data: Some(pb::DataSpec {
            train: d.train.clone(),
            eval: d.eval.clone(),
            eval_split: d.eval_split,
            format: match d.format {
                DataFormat::Qa => pb::DataFormat::Qa,
                DataFormat::Alpaca => pb::DataFormat::Alpaca,
                DataFormat::Messages => pb::DataFormat::Messages,
                DataFormat::Text => pb::DataFormat::Text,
            } as i32,
            question_field: d.question_field.clone(),
            answer_field: d.answer_field.clone(),
            template: d.template.clone(),
            chat_template: d.chat_template.as_str().into(),
            train_on_prompt: d.train_on_prompt,
            max_seq_len: d.max_seq_len,
            shuffle: d.shuffle,
            packing: d.packing,
        }),
        training: Some(pb::TrainingSpec {
            max_steps: t.max_steps,
            epochs: t.epochs,
            micro_batch_size: t.micro_batch_size,
            grad_accum: t.grad_accum,
            lr: t.lr,
            schedule: match t.schedule {
                Schedule::Cosine => pb::Schedule::Cosine,
                Schedule::Linear => pb::Schedule::Linear,
                Schedule::Constant => pb::Schedule::Constant,
            } as i32,
            warmup_ratio: t.warmup_ratio,
            warmup_steps: t.warmup_steps,
            weight_decay: t.weight_decay,
            optimizer: match t.optimizer {
                Optimizer::AdamW => pb::Optimizer::Adamw,
                Optimizer::AdamW8bit => pb::Optimizer::Adamw8bit,
            } as i32,
            betas: t.betas.to_vec(),
            eps: t.eps,
            max_grad_norm: t.max_grad_norm,
            gradient_checkpointing: t.gradient_checkpointing,
            seed: t.seed,
            log_every: t.log_every,
            eval_every: t.eval_every,
            checkpoint_every: t.checkpoint_every,
            sample_prompts: t.sample_prompts.clone(),
            sample_max_new_tokens: t.sample_max_new_tokens,
            eval_generate_samples: t.eval_generate_samples,
            eval_generate_max_new_tokens: t.eval_generate_max_new_tokens,
            save_best: t.save_best.as_ref().map(|b| pb::SaveBest {
                metric: eval_metric_to_pb(b.metric) as i32,
                mode: b.mode.map(|m| metric_mode_to_pb(m) as i32),
            }),
            early_stopping: t.early_stopping.as_ref().map(|e| pb::EarlyStopping { patience: e.patience, min_delta: e.min_delta }),
        }),
        output: Some(pb::OutputSpec { dir: s.output.dir.clone() }),
        resources: Some(pb::ResourceSpec {
            device: device_kind_to_pb(s.resources.device) as i32,
            count: s.resources.count,
            memory_mib: s.resources.memory_mib,
            nodes: s.resources.nodes,
        }),
        priority: s.priority,
        labels: s.labels.clone().into_iter().collect(),
        max_attempts: s.max_attempts,
    }
}

/// Converted, not yet validated: call [`JobSpec::validate`] next.
impl TryFrom<pb::JobSpec> for JobSpec {
    type Error = ConvertError;
    fn try_from(p: pb::JobSpec) -> Result<Self, Self::Error> {
        spec_from_pb(p)
    }
}

impl From<&JobSpec> for pb::JobSpec {
    fn from(s: &JobSpec) -> Self {
        spec_to_pb(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lorafleet_shared::spec::SpecContext;

    const YAML: &str = "name: faq\nmodel: { source: hf://org/m }\ndata: { train: ./faq.json, eval: ./e.json }\noutput: { dir: out/faq }\nlora: { target_modules: [q_proj, v_proj], init_adapter: s3://b/a }\ntraining: { epochs: 2.5, warmup_steps: 3, optimizer: adamw_8bit }\nresources: { device: cuda, count: 2, memory_mib: 16000 }\nlabels: { team: nlp }\npriority: 4\n";

    #[test]
    fn spec_round_trips_field_for_field() {
        let s = JobSpec::from_yaml(YAML, SpecContext::Local).unwrap();
        let back = JobSpec::try_from(pb::JobSpec::from(&s)).unwrap();
        assert_eq!(back, s);
        let named = JobSpec::from_yaml(&YAML.replace("[q_proj, v_proj]", "all-linear"), SpecContext::Local).unwrap();
        assert_eq!(spec_from_pb(spec_to_pb(&named)).unwrap(), named);
    }

    #[test]
    fn answer_quality_fields_round_trip() {
        for training in [
            "{ eval_every: 5, eval_generate_samples: 8, eval_generate_max_new_tokens: 24, save_best: { metric: rouge_l }, early_stopping: { patience: 2, min_delta: 0.01 } }",
            "{ eval_every: 5, eval_generate_samples: 3, save_best: { metric: exact_match, mode: min } }",
            "{ eval_every: 5, save_best: { metric: eval_loss, mode: max } }",
            "{ eval_every: 5, early_stopping: { patience: 1 } }",
        ] {
            let s = JobSpec::from_yaml(&YAML.replace("training: { epochs: 2.5, warmup_steps: 3, optimizer: adamw_8bit }", &format!("training: {training}")), SpecContext::Local).unwrap();
            assert!(s.training.save_best.is_some() || s.training.early_stopping.is_some(), "{training}");
            let p = spec_to_pb(&s);
            assert_eq!(spec_from_pb(p.clone()).unwrap(), s, "{training}");
            // and back to the same wire message
            assert_eq!(spec_to_pb(&spec_from_pb(p.clone()).unwrap()), p);
        }
        // An older client omits the new fields: no generation, no best, no early stopping.
        let s = JobSpec::from_yaml(YAML, SpecContext::Local).unwrap();
        let mut p = spec_to_pb(&s);
        let t = p.training.as_mut().unwrap();
        (t.eval_generate_samples, t.eval_generate_max_new_tokens, t.save_best, t.early_stopping) = (0, None, None, None);
        let back = spec_from_pb(p).unwrap();
        assert_eq!((back.training.eval_generate_samples, back.training.tracked_metric()), (0, None));
        // UNSPECIFIED and unknown enum values are refused, naming the field.
        let with_best = JobSpec::from_yaml(&YAML.replace("training: { epochs: 2.5, warmup_steps: 3, optimizer: adamw_8bit }", "training: { save_best: { metric: eval_loss, mode: min } }"), SpecContext::Local).unwrap();
        for (field, metric, mode) in [("training.save_best.metric", 0, Some(1)), ("training.save_best.metric", 9, None), ("training.save_best.mode", 1, Some(0)), ("training.save_best.mode", 1, Some(7))] {
            let mut p = spec_to_pb(&with_best);
            p.training.as_mut().unwrap().save_best = Some(pb::SaveBest { metric, mode });
            assert_eq!(spec_from_pb(p).unwrap_err().field, field);
        }
    }

    #[test]
    fn missing_sections_name_the_field() {
        let s = JobSpec::from_yaml(YAML, SpecContext::Local).unwrap();
        for (field, strip) in [
            ("model", Box::new(|p: &mut pb::JobSpec| p.model = None) as Box<dyn Fn(&mut pb::JobSpec)>),
            ("data", Box::new(|p: &mut pb::JobSpec| p.data = None)),
            ("output", Box::new(|p: &mut pb::JobSpec| p.output = None)),
            ("data.format", Box::new(|p: &mut pb::JobSpec| p.data.as_mut().unwrap().format = 0)),
            ("training.optimizer", Box::new(|p: &mut pb::JobSpec| p.training.as_mut().unwrap().optimizer = 99)),
            ("training.betas", Box::new(|p: &mut pb::JobSpec| p.training.as_mut().unwrap().betas = vec![0.9])),
            ("resources.device", Box::new(|p: &mut pb::JobSpec| p.resources.as_mut().unwrap().device = 0)),
        ] {
            let mut p = spec_to_pb(&s);
            strip(&mut p);
            match spec_from_pb(p) {
                Err(e) => assert_eq!(e.field, field, "{e}"),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn absent_optional_sections_take_defaults() {
        let s = JobSpec::from_yaml(YAML, SpecContext::Local).unwrap();
        let mut p = spec_to_pb(&s);
        p.lora = None;
        p.training = None;
        p.quantization = None;
        p.resources = None;
        let back = spec_from_pb(p).unwrap();
        assert_eq!(back.lora, LoraSpec::default());
        assert_eq!(back.training, TrainingSpec::default());
        assert_eq!(back.quantization, QuantizationSpec::default());
        assert_eq!(back.resources, ResourceSpec::default());
    }

    #[test]
    fn ids_and_epochs_are_checked() {
        assert_eq!(parse_job_id("job_id", "").unwrap_err().to_string(), "job_id: missing");
        assert!(parse_job_id("job_id", "../x").unwrap_err().to_string().starts_with("job_id: invalid job id"));
        let st: tonic::Status = parse_job_id("job_id", "").unwrap_err().into();
        assert_eq!(st.code(), tonic::Code::InvalidArgument);
        assert!(parse_epoch("epoch", 0).is_err());
        assert_eq!(parse_epoch("epoch", 4).unwrap(), Epoch(4));
        assert!(state_from_pb("states[0]", 0).is_err());
        assert_eq!(state_from_pb("states[0]", 5).unwrap(), JobState::Cancelling);
        assert!(failure_class_from_pb("failure_class", 7).is_err());
    }
}
