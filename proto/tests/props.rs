//! Property tests of the wire-to-domain conversion of a submitted spec
//! (`convert::spec_from_pb`, then `JobSpec::validate(SpecContext::Remote)` as the
//! coordinator runs them) and of prost's decoding of `SubmitJobRequest`.
//!
//! - Wire specs with every field random (strings with NUL, `..`, absolute paths, control
//!   characters, up to 100 kB; floats NaN, infinite, negative, huge; integers at their
//!   extremes; enum values out of range; sections absent) and valid specs with a few
//!   fields replaced that way never panic either step. What both accept has a valid name,
//!   a safe relative `output.dir`, no NUL or control character in any location or label
//!   value, every string and list within the spec's limits (the wire has no overall
//!   bound but the request size), and converts back to the same wire spec. (`..` and
//!   absolute paths in the other locations are refused by the coordinator's
//!   `check_remote_spec`: `coordinator/tests/props.rs`.)
//! - Hostile locations (NUL, control characters, empty, over-long; for `output.dir` also
//!   `..`, `.`, absolute, a backslash, `:`) are refused naming the field; out-of-range enum values
//!   and a `betas` of the wrong length are refused by the conversion, naming the field.
//! - Non-UTF-8 bytes in any string field of an encoded `SubmitJobRequest` make
//!   `prost::Message::decode` fail (so no spec is ever built from them); arbitrary and
//!   bit-flipped encodings never panic the decoder or the conversion.
//!
//! 7 properties, 8,192 cases in all (under a second in a debug build); no failure
//! persistence files are written.

use lorafleet_proto as pb;
use lorafleet_proto::convert::{spec_from_pb, spec_to_pb};
use lorafleet_shared::spec::{JobSpec, SpecContext, TargetModules, MAX_ENTRIES, MAX_LOCATION_LEN, MAX_SHORT_LEN, MAX_TEXT_LEN};
use lorafleet_shared::testing::{config, control_char, insert};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestRunner;
use prost::Message;

const DATASET: &str = "dataset://sha256/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// A spec the control plane accepts, with every section and location set.
fn valid() -> pb::JobSpec {
    let y = format!(
        "name: faq\nmodel: {{ source: hf://org/m }}\ndata: {{ train: {DATASET:?}, eval: s3://b/eval.json }}\n\
         lora: {{ init_adapter: s3://b/adapter, target_modules: [q_proj, v_proj] }}\noutput: {{ dir: out/faq }}\n\
         labels: {{ team: nlp }}\ntraining: {{ sample_prompts: [hi] }}\nresources: {{ device: cpu }}\n"
    );
    spec_to_pb(&JobSpec::from_yaml(&y, SpecContext::Remote).expect("the base spec is valid"))
}


// ---- one wire field at a time ----------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Kind {
    Str,
    OptStr,
    Strs,
    Labels,
    Modules,
    F64,
    OptF64,
    F64s,
    U32,
    OptU32,
    U64,
    OptU64,
    I32,
    Enum,
    OptEnum,
    Bool,
    Section,
}

#[derive(Debug, Clone)]
enum Wire {
    Str(String),
    OptStr(Option<String>),
    Strs(Vec<String>),
    Labels(Vec<(String, String)>),
    Modules(Option<pb::lora_spec::TargetModules>),
    F64(f64),
    OptF64(Option<f64>),
    F64s(Vec<f64>),
    U32(u32),
    OptU32(Option<u32>),
    U64(u64),
    OptU64(Option<u64>),
    I32(i32),
    OptI32(Option<i32>),
    Bool(bool),
    Section(bool),
}

const FIELDS: &[(&str, Kind)] = &[
    ("name", Kind::Str),
    ("model", Kind::Section),
    ("model.source", Kind::Str),
    ("quantization", Kind::Section),
    ("quantization.method", Kind::Enum),
    ("quantization.double_quant", Kind::Bool),
    ("quantization.compute_dtype", Kind::Enum),
    ("lora", Kind::Section),
    ("lora.r", Kind::U32),
    ("lora.alpha", Kind::F64),
    ("lora.dropout", Kind::F64),
    ("lora.target_modules", Kind::Modules),
    ("lora.rslora", Kind::Bool),
    ("lora.init_adapter", Kind::OptStr),
    ("data", Kind::Section),
    ("data.train", Kind::Str),
    ("data.eval", Kind::OptStr),
    ("data.eval_split", Kind::F64),
    ("data.format", Kind::Enum),
    ("data.question_field", Kind::Str),
    ("data.answer_field", Kind::Str),
    ("data.template", Kind::Str),
    ("data.chat_template", Kind::Str),
    ("data.train_on_prompt", Kind::Bool),
    ("data.max_seq_len", Kind::U32),
    ("data.shuffle", Kind::Bool),
    ("data.packing", Kind::Bool),
    ("training", Kind::Section),
    ("training.max_steps", Kind::OptU64),
    ("training.epochs", Kind::OptF64),
    ("training.micro_batch_size", Kind::U32),
    ("training.grad_accum", Kind::U32),
    ("training.lr", Kind::F64),
    ("training.schedule", Kind::Enum),
    ("training.warmup_ratio", Kind::F64),
    ("training.warmup_steps", Kind::OptU64),
    ("training.weight_decay", Kind::F64),
    ("training.optimizer", Kind::Enum),
    ("training.betas", Kind::F64s),
    ("training.eps", Kind::F64),
    ("training.max_grad_norm", Kind::F64),
    ("training.gradient_checkpointing", Kind::Bool),
    ("training.seed", Kind::U64),
    ("training.log_every", Kind::U64),
    ("training.eval_every", Kind::U64),
    ("training.checkpoint_every", Kind::U64),
    ("training.sample_prompts", Kind::Strs),
    ("training.sample_max_new_tokens", Kind::U32),
    ("training.eval_generate_samples", Kind::U32),
    ("training.eval_generate_max_new_tokens", Kind::OptU32),
    ("training.save_best", Kind::Section),
    ("training.save_best.metric", Kind::Enum),
    ("training.save_best.mode", Kind::OptEnum),
    ("training.early_stopping", Kind::Section),
    ("training.early_stopping.patience", Kind::U32),
    ("training.early_stopping.min_delta", Kind::F64),
    ("output", Kind::Section),
    ("output.dir", Kind::Str),
    ("resources", Kind::Section),
    ("resources.device", Kind::Enum),
    ("resources.count", Kind::U32),
    ("resources.memory_mib", Kind::U64),
    ("resources.nodes", Kind::U32),
    ("priority", Kind::I32),
    ("labels", Kind::Labels),
    ("max_attempts", Kind::U32),
];

const ENUMS: &[&str] =
    &["quantization.method", "quantization.compute_dtype", "data.format", "training.schedule", "training.optimizer", "training.save_best.metric", "resources.device"];

/// Set `path` of `p` to `w` (a section is created when one of its fields is set).
fn apply(p: &mut pb::JobSpec, path: &str, w: Wire) {
    use Wire::*;
    macro_rules! sec {
        ($f:ident) => {
            p.$f.get_or_insert_with(Default::default)
        };
    }
    match (path, w) {
        ("name", Str(s)) => p.name = s,
        ("model", Section(on)) => p.model = on.then(Default::default),
        ("model.source", Str(s)) => sec!(model).source = s,
        ("quantization", Section(on)) => p.quantization = on.then(Default::default),
        ("quantization.method", I32(v)) => sec!(quantization).method = v,
        ("quantization.double_quant", Bool(b)) => sec!(quantization).double_quant = b,
        ("quantization.compute_dtype", I32(v)) => sec!(quantization).compute_dtype = v,
        ("lora", Section(on)) => p.lora = on.then(Default::default),
        ("lora.r", U32(v)) => sec!(lora).r = v,
        ("lora.alpha", F64(v)) => sec!(lora).alpha = v,
        ("lora.dropout", F64(v)) => sec!(lora).dropout = v,
        ("lora.target_modules", Modules(m)) => sec!(lora).target_modules = m,
        ("lora.rslora", Bool(b)) => sec!(lora).rslora = b,
        ("lora.init_adapter", OptStr(s)) => sec!(lora).init_adapter = s,
        ("data", Section(on)) => p.data = on.then(Default::default),
        ("data.train", Str(s)) => sec!(data).train = s,
        ("data.eval", OptStr(s)) => sec!(data).eval = s,
        ("data.eval_split", F64(v)) => sec!(data).eval_split = v,
        ("data.format", I32(v)) => sec!(data).format = v,
        ("data.question_field", Str(s)) => sec!(data).question_field = s,
        ("data.answer_field", Str(s)) => sec!(data).answer_field = s,
        ("data.template", Str(s)) => sec!(data).template = s,
        ("data.chat_template", Str(s)) => sec!(data).chat_template = s,
        ("data.train_on_prompt", Bool(b)) => sec!(data).train_on_prompt = b,
        ("data.max_seq_len", U32(v)) => sec!(data).max_seq_len = v,
        ("data.shuffle", Bool(b)) => sec!(data).shuffle = b,
        ("data.packing", Bool(b)) => sec!(data).packing = b,
        ("training", Section(on)) => p.training = on.then(Default::default),
        ("training.max_steps", OptU64(v)) => sec!(training).max_steps = v,
        ("training.epochs", OptF64(v)) => sec!(training).epochs = v,
        ("training.micro_batch_size", U32(v)) => sec!(training).micro_batch_size = v,
        ("training.grad_accum", U32(v)) => sec!(training).grad_accum = v,
        ("training.lr", F64(v)) => sec!(training).lr = v,
        ("training.schedule", I32(v)) => sec!(training).schedule = v,
        ("training.warmup_ratio", F64(v)) => sec!(training).warmup_ratio = v,
        ("training.warmup_steps", OptU64(v)) => sec!(training).warmup_steps = v,
        ("training.weight_decay", F64(v)) => sec!(training).weight_decay = v,
        ("training.optimizer", I32(v)) => sec!(training).optimizer = v,
        ("training.betas", F64s(v)) => sec!(training).betas = v,
        ("training.eps", F64(v)) => sec!(training).eps = v,
        ("training.max_grad_norm", F64(v)) => sec!(training).max_grad_norm = v,
        ("training.gradient_checkpointing", Bool(b)) => sec!(training).gradient_checkpointing = b,
        ("training.seed", U64(v)) => sec!(training).seed = v,
        ("training.log_every", U64(v)) => sec!(training).log_every = v,
        ("training.eval_every", U64(v)) => sec!(training).eval_every = v,
        ("training.checkpoint_every", U64(v)) => sec!(training).checkpoint_every = v,
        ("training.sample_prompts", Strs(v)) => sec!(training).sample_prompts = v,
        ("training.sample_max_new_tokens", U32(v)) => sec!(training).sample_max_new_tokens = v,
        ("training.eval_generate_samples", U32(v)) => sec!(training).eval_generate_samples = v,
        ("training.eval_generate_max_new_tokens", OptU32(v)) => sec!(training).eval_generate_max_new_tokens = v,
        ("training.save_best", Section(on)) => sec!(training).save_best = on.then(Default::default),
        ("training.save_best.metric", I32(v)) => sec!(training).save_best.get_or_insert_with(Default::default).metric = v,
        ("training.save_best.mode", OptI32(v)) => sec!(training).save_best.get_or_insert_with(Default::default).mode = v,
        ("training.early_stopping", Section(on)) => sec!(training).early_stopping = on.then(Default::default),
        ("training.early_stopping.patience", U32(v)) => sec!(training).early_stopping.get_or_insert_with(Default::default).patience = v,
        ("training.early_stopping.min_delta", F64(v)) => sec!(training).early_stopping.get_or_insert_with(Default::default).min_delta = v,
        ("output", Section(on)) => p.output = on.then(Default::default),
        ("output.dir", Str(s)) => sec!(output).dir = s,
        ("resources", Section(on)) => p.resources = on.then(Default::default),
        ("resources.device", I32(v)) => sec!(resources).device = v,
        ("resources.count", U32(v)) => sec!(resources).count = v,
        ("resources.memory_mib", U64(v)) => sec!(resources).memory_mib = v,
        ("resources.nodes", U32(v)) => sec!(resources).nodes = v,
        ("priority", I32(v)) => p.priority = v,
        ("labels", Labels(v)) => p.labels = v.into_iter().collect(),
        ("max_attempts", U32(v)) => p.max_attempts = v,
        (path, w) => unreachable!("{path}: {w:?}"),
    }
}



/// Strings as a hostile client sends them.
fn wire_string() -> BoxedStrategy<String> {
    let good = prop::sample::select(vec!["faq", "hf://org/m", DATASET, "s3://b/x", "out/faq", "models/tiny", "q_proj", "all-linear", "{question}"]);
    prop_oneof![
        3 => good.clone().prop_map(String::from),
        2 => any::<String>(),
        2 => "[./a\\\\\0:]{0,12}",
        2 => (prop::sample::select(vec!["/", "//", "../", "a/../", "./", "a/./", "\\", "C:"]), good.clone())
            .prop_map(|(pre, g)| format!("{pre}{g}")),
        2 => (good, any::<Index>(), control_char()).prop_map(|(g, at, c)| insert(g, at, &c.to_string())),
        1 => (1usize..100_000).prop_map(|n| "a".repeat(n)),
    ]
    .boxed()
}

fn wire_f64() -> BoxedStrategy<f64> {
    prop_oneof![
        any::<f64>(),
        prop::sample::select(vec![f64::NAN, -f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 0.0, f64::MIN_POSITIVE, f64::MAX, f64::MIN, 1.0, 0.999_999, 9.999_999, 10.0, 2e-4, 1e-8, 5e-324]),
        0.0..1.0f64,
        -1.0..20.0f64,
    ]
    .boxed()
}

fn wire_u32() -> BoxedStrategy<u32> {
    prop_oneof![any::<u32>(), 0u32..10, prop::sample::select(vec![u32::MAX, 1024, 1025, 4096, 4097, 65_536, 65_537, 131_072, 131_073, 100, 101])].boxed()
}

fn wire_u64() -> BoxedStrategy<u64> {
    prop_oneof![any::<u64>(), 0u64..10, prop::sample::select(vec![u64::MAX, u64::MAX - 1, i64::MAX as u64, u32::MAX as u64 + 1])].boxed()
}

fn value(kind: Kind) -> BoxedStrategy<Wire> {
    use pb::lora_spec::TargetModules as Tm;
    match kind {
        Kind::Str => wire_string().prop_map(Wire::Str).boxed(),
        Kind::OptStr => prop::option::of(wire_string()).prop_map(Wire::OptStr).boxed(),
        Kind::Strs => prop::collection::vec(wire_string(), 0..4).prop_map(Wire::Strs).boxed(),
        Kind::Labels => prop::collection::vec((wire_string(), wire_string()), 0..4).prop_map(Wire::Labels).boxed(),
        Kind::Modules => prop_oneof![
            Just(None),
            wire_string().prop_map(|s| Some(Tm::TargetModulesNamed(s))),
            prop::collection::vec(wire_string(), 0..4).prop_map(|modules| Some(Tm::TargetModulesList(pb::TargetModuleList { modules }))),
        ]
        .prop_map(Wire::Modules)
        .boxed(),
        Kind::F64 => wire_f64().prop_map(Wire::F64).boxed(),
        Kind::OptF64 => prop::option::of(wire_f64()).prop_map(Wire::OptF64).boxed(),
        Kind::F64s => prop::collection::vec(wire_f64(), 0..4).prop_map(Wire::F64s).boxed(),
        Kind::U32 => wire_u32().prop_map(Wire::U32).boxed(),
        Kind::OptU32 => prop::option::of(wire_u32()).prop_map(Wire::OptU32).boxed(),
        Kind::U64 => wire_u64().prop_map(Wire::U64).boxed(),
        Kind::OptU64 => prop::option::of(wire_u64()).prop_map(Wire::OptU64).boxed(),
        Kind::I32 => any::<i32>().prop_map(Wire::I32).boxed(),
        Kind::Enum => prop_oneof![3 => 0i32..5, 1 => any::<i32>()].prop_map(Wire::I32).boxed(),
        Kind::OptEnum => prop::option::of(prop_oneof![3 => 0i32..5, 1 => any::<i32>()]).prop_map(Wire::OptI32).boxed(),
        Kind::Bool => any::<bool>().prop_map(Wire::Bool).boxed(),
        Kind::Section => prop_oneof![3 => Just(true), 1 => Just(false)].prop_map(Wire::Section).boxed(),
    }
}

/// One field and a random value for it.
fn edit() -> impl Strategy<Value = (&'static str, Wire)> {
    prop::sample::select(FIELDS).prop_flat_map(|(f, k)| value(k).prop_map(move |w| (f, w)))
}

/// A wire spec with every field random.
fn random_spec() -> impl Strategy<Value = pb::JobSpec> {
    FIELDS.iter().map(|&(f, k)| value(k).prop_map(move |w| (f, w))).collect::<Vec<_>>().prop_map(|edits| {
        let mut p = pb::JobSpec::default();
        for (f, w) in edits {
            apply(&mut p, f, w);
        }
        p
    })
}

// ---- checks ----------------------------------------------------------------------------

fn name_ok(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !s.starts_with('.') && !s.contains("..")
}

fn location_ok(l: &str) -> bool {
    !l.trim().is_empty() && l.len() <= MAX_LOCATION_LEN && !l.chars().any(|c| c.is_control())
}

fn remote_dir_ok(d: &str) -> bool {
    location_ok(d) && !d.starts_with('/') && !d.contains(['\\', ':']) && d.split('/').all(|c| c != "." && c != "..")
}

/// Convert and validate as the coordinator does; for a spec both accept, check what must
/// hold. Returns whether it was accepted.
fn convert_and_check(p: pb::JobSpec) -> Result<bool, TestCaseError> {
    let Ok(spec) = spec_from_pb(p) else { return Ok(false) };
    if spec.validate(SpecContext::Remote).is_err() {
        return Ok(false);
    }
    prop_assert!(name_ok(&spec.name), "name {:?}", spec.name);
    prop_assert!(remote_dir_ok(&spec.output.dir), "output.dir {:?}", spec.output.dir);
    let mut locs = vec![&spec.model.source, &spec.data.train, &spec.output.dir];
    locs.extend(spec.data.eval.as_ref());
    locs.extend(spec.lora.init_adapter.as_ref());
    for l in locs {
        prop_assert!(location_ok(l), "location {l:?}");
    }
    prop_assert!(spec.labels.len() <= MAX_ENTRIES);
    for (k, v) in &spec.labels {
        prop_assert!((1..=63).contains(&k.len()) && v.len() <= MAX_SHORT_LEN && !v.chars().any(|c| c.is_control()), "label {k:?}: {v:?}");
    }
    let d = &spec.data;
    prop_assert!(d.question_field.len() <= MAX_SHORT_LEN && d.answer_field.len() <= MAX_SHORT_LEN && d.template.len() <= MAX_TEXT_LEN);
    if let Some(TargetModules::List(l)) = &spec.lora.target_modules {
        prop_assert!(!l.is_empty() && l.len() <= MAX_ENTRIES && l.iter().all(|m| !m.is_empty() && m.len() <= MAX_SHORT_LEN));
    }
    let prompts = &spec.training.sample_prompts;
    prop_assert!(prompts.len() <= MAX_ENTRIES && prompts.iter().all(|p| p.len() <= MAX_TEXT_LEN && !p.contains('\0')));
    prop_assert!(spec.training.betas.iter().all(|b| (0.0..1.0).contains(b)));
    prop_assert!(spec.lora.alpha.is_finite() && spec.training.lr.is_finite() && spec.training.eps.is_finite());
    if let Some(es) = &spec.training.early_stopping {
        prop_assert!(es.patience >= 1 && es.min_delta.is_finite() && es.min_delta >= 0.0, "{:?}", es);
    }
    // What the coordinator shows back converts to the same spec.
    let back = spec_from_pb(spec_to_pb(&spec)).map_err(|e| TestCaseError::fail(format!("round trip: {e}")))?;
    prop_assert_eq!(back, spec);
    Ok(true)
}

fn validate_errors(p: pb::JobSpec) -> Vec<String> {
    let spec = spec_from_pb(p).expect("converts");
    match spec.validate(SpecContext::Remote) {
        Ok(()) => Vec::new(),
        Err(e) => e.errors.into_iter().map(|f| f.path).collect(),
    }
}

proptest! {
    #![proptest_config(config(1024))]

    /// Every field random: neither step panics; what both accept is safe.
    #[test]
    fn random_wire_specs_never_panic(p in random_spec()) {
        convert_and_check(p)?;
    }

    /// Hostile values in a location are refused by validation, naming the field: NUL,
    /// other control characters, empty and over-long everywhere; `..`, `.`, absolute,
    /// a backslash and `:` in `output.dir`.
    #[test]
    fn hostile_locations_are_refused(
        field in prop::sample::select(vec!["model.source", "data.train", "data.eval", "lora.init_adapter", "output.dir"]),
        base in prop::sample::select(vec!["out/faq", "s3://b/x", DATASET, "hf://org/m", "a"]),
        at in any::<Index>(),
        bad in prop_oneof![
            3 => control_char().prop_map(|c| c.to_string()),
            1 => Just(String::new()),
            1 => (MAX_LOCATION_LEN + 1..4 * MAX_LOCATION_LEN).prop_map(|n| "x".repeat(n)),
        ],
        dir_bad in prop::sample::select(vec!["/", "//", "../", "/../", "./", "/./", "\\", ":", "/.."]),
    ) {
        let hostile = if bad.is_empty() { "  ".to_string() } else { insert(base, at, &bad) };
        let mut p = valid();
        let w = if field.contains("eval") || field.contains("init_adapter") { Wire::OptStr(Some(hostile.clone())) } else { Wire::Str(hostile.clone()) };
        apply(&mut p, field, w);
        prop_assert!(validate_errors(p).iter().any(|e| e == field), "{} {:?} accepted", field, hostile);

        let dir = match dir_bad {
            "/" | "//" => format!("{dir_bad}{base}"),
            "/.." => format!("out{dir_bad}"),
            _ => insert(base, at, dir_bad),
        };
        // (`./` or `../` inserted mid-component can leave a valid name, `ou./t`: skip those.)
        if !remote_dir_ok(&dir) {
            let mut p = valid();
            apply(&mut p, "output.dir", Wire::Str(dir.clone()));
            prop_assert!(validate_errors(p).iter().any(|e| e == "output.dir"), "output.dir {:?} accepted", dir);
        }
    }

    /// Enum values: only the defined, non-zero ones convert; others name the field.
    #[test]
    fn enum_values_out_of_range_are_refused(field in prop::sample::select(ENUMS.to_vec()), v in prop_oneof![-2i32..6, any::<i32>()]) {
        let defined = match field {
            "data.format" => 1..=4,
            "training.schedule" | "training.save_best.metric" => 1..=3,
            _ => 1..=2,
        };
        let mut p = valid();
        apply(&mut p, field, Wire::I32(v));
        match spec_from_pb(p) {
            Ok(_) => prop_assert!(defined.contains(&v), "{} = {} converted", field, v),
            Err(e) => {
                prop_assert!(!defined.contains(&v), "{} = {}: {}", field, v, e);
                prop_assert_eq!(e.field, field);
            }
        }
    }

    /// `training.betas` converts only with exactly two values.
    #[test]
    fn betas_need_two_values(betas in prop::collection::vec(wire_f64(), 0..6)) {
        let n = betas.len();
        let mut p = valid();
        apply(&mut p, "training.betas", Wire::F64s(betas));
        match spec_from_pb(p) {
            Ok(_) => prop_assert_eq!(n, 2),
            Err(e) => {
                prop_assert_ne!(n, 2);
                prop_assert_eq!(e.field, "training.betas");
            }
        }
    }

    /// Arbitrary bytes, and valid encodings with a few bytes overwritten: decoding never
    /// panics, nor does converting what decodes.
    #[test]
    fn arbitrary_encodings_never_panic(
        junk in prop::collection::vec(any::<u8>(), 0..512),
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 1..8),
    ) {
        if let Ok(req) = pb::SubmitJobRequest::decode(&junk[..]) {
            if let Some(spec) = req.spec {
                convert_and_check(spec)?;
            }
        }
        let mut bytes = pb::SubmitJobRequest { spec: Some(valid()), idempotency_key: "k".into() }.encode_to_vec();
        for (at, b) in flips {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        if let Ok(req) = pb::SubmitJobRequest::decode(&bytes[..]) {
            if let Some(spec) = req.spec {
                convert_and_check(spec)?;
            }
        }
    }
}

/// String fields of a `SubmitJobRequest` (its spec's, labels and the idempotency key).
const STRING_FIELDS: usize = 14;

/// A request whose string field `i` holds `marker`, every other string field a different
/// ASCII marker (so `marker`'s bytes occur exactly once in the encoding).
fn request_with_marker(i: usize, marker: &str) -> pb::SubmitJobRequest {
    let m = |j: usize| if j == i { marker.to_string() } else { format!("other-field-{j:02}") };
    let mut p = valid();
    p.name = m(0);
    p.model.as_mut().unwrap().source = m(1);
    let d = p.data.as_mut().unwrap();
    d.train = m(2);
    d.eval = Some(m(3));
    d.question_field = m(4);
    d.answer_field = m(5);
    d.template = m(6);
    let l = p.lora.as_mut().unwrap();
    l.init_adapter = Some(m(7));
    l.target_modules = Some(pb::lora_spec::TargetModules::TargetModulesList(pb::TargetModuleList { modules: vec![m(8)] }));
    p.output.as_mut().unwrap().dir = m(9);
    p.training.as_mut().unwrap().sample_prompts = vec![m(10)];
    p.labels = [(m(11), m(12))].into_iter().collect();
    pb::SubmitJobRequest { spec: Some(p), idempotency_key: m(13) }
}

proptest! {
    #![proptest_config(config(1024))]

    /// Invalid UTF-8 written over part of any string field: decoding fails.
    #[test]
    fn non_utf8_strings_do_not_decode(
        field in 0..STRING_FIELDS,
        at in any::<Index>(),
        bad in prop::sample::select(vec![
            vec![0xff], vec![0xfe], vec![0xc0, 0x80], vec![0xc1, 0xbf], vec![0x80], vec![0xbf],
            vec![0xed, 0xa0, 0x80], vec![0xf4, 0x90, 0x80, 0x80], vec![0xf8, 0x88, 0x80, 0x80], vec![0xe2, 0x82, b'x'], vec![0xc3, b'('],
        ]),
    ) {
        let marker = "MARKER-with-some-room-0123456789";
        let mut bytes = request_with_marker(field, marker).encode_to_vec();
        let start = bytes.windows(marker.len()).position(|w| w == marker.as_bytes()).expect("marker is in the encoding");
        let off = start + at.index(marker.len() - bad.len() + 1);
        bytes[off..off + bad.len()].copy_from_slice(&bad);
        prop_assert!(std::str::from_utf8(&bytes[start..start + marker.len()]).is_err());
        prop_assert!(pb::SubmitJobRequest::decode(&bytes[..]).is_err(), "field {} decoded with {:02x?}", field, bad);
    }
}

/// Valid specs with one to five fields replaced by random values: neither step panics,
/// what both accept is safe, and enough are accepted for that check to mean something.
#[test]
fn mutated_valid_specs_are_safe_when_accepted() {
    let cases = 2048;
    let mut runner = TestRunner::new(config(cases));
    let accepted = std::cell::Cell::new(0u32);
    runner
        .run(&prop::collection::vec(edit(), 1..6), |edits| {
            let mut p = valid();
            for (f, w) in edits {
                apply(&mut p, f, w);
            }
            if convert_and_check(p)? {
                accepted.set(accepted.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    assert!(accepted.get() >= cases / 10, "only {} of {cases} mutated specs were accepted", accepted.get());
}
