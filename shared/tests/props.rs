//! Property tests of the job spec parser (`JobSpec::from_yaml`) and `JobSpec::validate`.
//!
//! - Arbitrary text, arbitrary YAML documents, spec-shaped documents with random leaves
//!   and deeply nested or alias-expanding documents never panic, and whatever is accepted
//!   for the control plane is safe: a valid name, a safe relative `output.dir`, no NUL or
//!   control character in a location or label value, every string and list within its
//!   limit; it also reloads from the JSON the coordinator persists.
//! - A valid remote spec with one location (`model.source`, `data.train`, `data.eval`,
//!   `lora.init_adapter`, `output.dir`) replaced by a hostile value (NUL or another
//!   control character, empty, longer than `MAX_LOCATION_LEN`; for `output.dir` also a
//!   `..` or `.` component, an absolute path, a backslash or `:`) is refused, and the error
//!   names the field. `..` and absolute paths in the other locations are the
//!   coordinator's check (`check_remote_spec`, `coordinator/tests/props.rs`).
//! - The name, label keys and values, `lora.target_modules` and every bounded string and
//!   list are accepted exactly when they match their documented form and limit.
//!
//! 13 properties and one test of fixed examples, about 5 s in a debug build. No
//! failure persistence files are written.

use lorafleet_shared::spec::{JobSpec, SpecContext, TargetModules, MAX_ENTRIES, MAX_LOCATION_LEN, MAX_SHORT_LEN, MAX_SPEC_BYTES, MAX_TEXT_LEN};
use lorafleet_shared::testing::{config, control_char, insert, component};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_yaml::{Mapping, Value};

const DATASET: &str = "dataset://sha256/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// A spec the control plane accepts, with every location set.
fn valid_yaml() -> String {
    format!(
        "name: faq\nmodel: {{ source: hf://org/m }}\ndata: {{ train: {DATASET:?}, eval: s3://b/eval.json }}\n\
         lora: {{ init_adapter: s3://b/adapter, target_modules: [q_proj, v_proj] }}\noutput: {{ dir: out/faq }}\n\
         labels: {{ team: nlp }}\ntraining: {{ sample_prompts: [hi] }}\n"
    )
}

fn valid() -> JobSpec {
    JobSpec::from_yaml(&valid_yaml(), SpecContext::Remote).expect("the base spec is valid")
}


const LOCATIONS: [&str; 5] = ["model.source", "data.train", "data.eval", "lora.init_adapter", "output.dir"];

fn set_location(s: &mut JobSpec, field: &str, v: String) {
    match field {
        "model.source" => s.model.source = v,
        "data.train" => s.data.train = v,
        "data.eval" => s.data.eval = Some(v),
        "lora.init_adapter" => s.lora.init_adapter = Some(v),
        "output.dir" => s.output.dir = v,
        _ => unreachable!("{field}"),
    }
}

fn locations(s: &JobSpec) -> Vec<(&'static str, &str)> {
    let mut out = vec![("model.source", s.model.source.as_str()), ("data.train", s.data.train.as_str()), ("output.dir", s.output.dir.as_str())];
    out.extend(s.data.eval.as_deref().map(|e| ("data.eval", e)));
    out.extend(s.lora.init_adapter.as_deref().map(|a| ("lora.init_adapter", a)));
    out
}

// ---- independent oracles (not the crate's own helpers) -------------------------------

fn name_ok(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !s.starts_with('.')
        && !s.contains("..")
}

fn label_key_ok(k: &str) -> bool {
    (1..=63).contains(&k.len()) && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn label_value_ok(v: &str) -> bool {
    v.len() <= MAX_SHORT_LEN && !v.chars().any(|c| c.is_control())
}

fn module_ok(m: &str) -> bool {
    !m.is_empty() && m.len() <= MAX_SHORT_LEN && m.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// What every location must be, in either context.
fn location_ok(l: &str) -> bool {
    !l.trim().is_empty() && l.len() <= MAX_LOCATION_LEN && !l.chars().any(|c| c.is_control())
}

/// What a remote `output.dir` must be: relative, without `.`/`..` components, NUL,
/// control characters, backslashes or `:`.
fn remote_dir_ok(d: &str) -> bool {
    location_ok(d) && !d.starts_with('/') && !d.contains(['\\', ':']) && d.split('/').all(|c| c != "." && c != "..")
}

/// Everything a spec accepted for the control plane must satisfy.
fn assert_safe_remote(s: &JobSpec) -> Result<(), TestCaseError> {
    prop_assert!(name_ok(&s.name), "name {:?}", s.name);
    prop_assert!(remote_dir_ok(&s.output.dir), "output.dir {:?}", s.output.dir);
    for (field, loc) in locations(s) {
        prop_assert!(location_ok(loc), "{field} {loc:?}");
    }
    prop_assert!(s.labels.len() <= MAX_ENTRIES);
    for (k, v) in &s.labels {
        prop_assert!(label_key_ok(k) && label_value_ok(v), "label {k:?}: {v:?}");
    }
    match &s.lora.target_modules {
        Some(TargetModules::List(l)) => prop_assert!(!l.is_empty() && l.len() <= MAX_ENTRIES && l.iter().all(|m| module_ok(m)), "target_modules {l:?}"),
        Some(TargetModules::Named(n)) => prop_assert_eq!(n, "all-linear"),
        None => {}
    }
    let d = &s.data;
    prop_assert!(d.question_field.len() <= MAX_SHORT_LEN && d.answer_field.len() <= MAX_SHORT_LEN && d.template.len() <= MAX_TEXT_LEN);
    let prompts = &s.training.sample_prompts;
    prop_assert!(prompts.len() <= MAX_ENTRIES && prompts.iter().all(|p| p.len() <= MAX_TEXT_LEN && !p.contains('\0')));
    // The coordinator persists the spec as JSON and must load it back exactly (the
    // workspace's serde_json has `float_roundtrip`).
    let json = serde_json::to_string(s).expect("serializes");
    let back: JobSpec = serde_json::from_str(&json).map_err(|e| TestCaseError::fail(format!("persisted spec does not reload: {e}: {json}")))?;
    let (a, b) = (serde_json::to_value(s).unwrap(), serde_json::to_value(&back).unwrap());
    prop_assert_eq!(a, b);
    Ok(())
}

/// The paths of the errors `validate` reports.
fn error_paths(s: &JobSpec, ctx: SpecContext) -> Vec<String> {
    match s.validate(ctx) {
        Ok(()) => Vec::new(),
        Err(e) => e.errors.into_iter().map(|f| f.path).collect(),
    }
}

/// `s` is refused for the control plane, by `validate` and by `from_yaml` on its YAML,
/// and both errors name `field`.
fn assert_refused(s: &JobSpec, field: &str) -> Result<(), TestCaseError> {
    let paths = error_paths(s, SpecContext::Remote);
    prop_assert!(paths.iter().any(|p| p == field), "validate: {field} not refused ({paths:?})");
    match JobSpec::from_yaml(&s.to_yaml(), SpecContext::Remote) {
        Ok(_) => prop_assert!(false, "from_yaml accepted {field}"),
        Err(e) => prop_assert!(e.errors.iter().any(|f| f.path == field), "from_yaml: {e}"),
    }
    Ok(())
}

// ---- generators ----------------------------------------------------------------------



/// A safe relative path of 1-4 components.
fn rel_path() -> impl Strategy<Value = String> {
    prop::collection::vec(component(), 1..5).prop_map(|v| v.join("/"))
}


/// A safe path with `dot` (`..` or `.`) as one of its components.
fn with_dot_component(dot: &'static str) -> impl Strategy<Value = String> {
    (prop::collection::vec(component(), 0..4), any::<Index>()).prop_map(move |(mut v, at)| {
        v.insert(at.index(v.len() + 1), dot.to_string());
        v.join("/")
    })
}

/// Values a remote `output.dir` must refuse.
fn hostile_dir() -> impl Strategy<Value = String> {
    prop_oneof![
        with_dot_component(".."),
        with_dot_component("."),
        rel_path().prop_map(|p| format!("/{p}")),
        rel_path().prop_map(|p| format!("//{p}")),
        Just("/".to_string()),
        (rel_path(), any::<Index>(), control_char()).prop_map(|(p, at, c)| insert(&p, at, &c.to_string())),
        (rel_path(), any::<Index>(), prop::sample::select(vec!["\\", ":", "\0"])).prop_map(|(p, at, c)| insert(&p, at, c)),
        "[ \t\n]{0,4}",
        over_long(),
    ]
}

/// A safe path longer than `MAX_LOCATION_LEN` (up to three times).
fn over_long() -> impl Strategy<Value = String> {
    (rel_path(), MAX_LOCATION_LEN + 1..3 * MAX_LOCATION_LEN).prop_map(|(p, n)| format!("{p}/{}", "x".repeat(n - p.len() - 1)))
}

/// Values every location must refuse: NUL or another control character, empty,
/// over-long.
fn hostile_location() -> impl Strategy<Value = String> {
    let base = prop_oneof![rel_path(), rel_path().prop_map(|p| format!("s3://b/{p}")), Just(DATASET.to_string())];
    prop_oneof![
        4 => (base, any::<Index>(), control_char()).prop_map(|(p, at, c)| insert(&p, at, &c.to_string())),
        1 => "[ \t\r\n]{0,4}",
        1 => over_long(),
    ]
}

/// Strings biased towards what the checks look at.
fn tricky_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9._/:\\\\-]{0,80}",
        "[.a/\\\\\0\t\n:é]{0,16}",
        (1usize..400).prop_map(|n| "a".repeat(n)),
    ]
}

const KEYS: &[&str] = &[
    "name", "model", "source", "quantization", "method", "double_quant", "compute_dtype", "lora", "r", "alpha", "dropout",
    "target_modules", "rslora", "init_adapter", "data", "train", "eval", "eval_split", "format", "question_field", "answer_field",
    "template", "max_seq_len", "training", "max_steps", "epochs", "lr", "betas", "eps", "grad_accum", "sample_prompts", "output",
    "dir", "resources", "device", "count", "nodes", "memory_mib", "priority", "labels", "max_attempts",
];

fn yaml_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<u64>().prop_map(|n| Value::Number(n.into())),
        // NaN, infinities, subnormals and huge values included.
        any::<f64>().prop_map(|f| Value::Number(f.into())),
        prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 1.0, 0.5, 1e308]).prop_map(|f| Value::Number(f.into())),
        tricky_string().prop_map(Value::String),
        prop::sample::select(KEYS).prop_map(|k| Value::String(k.to_string())),
    ]
}

/// Arbitrary YAML values, nested, with keys mostly from the spec's own.
fn yaml_value() -> impl Strategy<Value = Value> {
    yaml_leaf().prop_recursive(4, 48, 6, |inner| {
        let key = prop_oneof![3 => prop::sample::select(KEYS).prop_map(|k| Value::String(k.to_string())), 1 => yaml_leaf()];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Sequence),
            prop::collection::vec((key, inner), 0..6).prop_map(|kv| Value::Mapping(kv.into_iter().collect::<Mapping>())),
        ]
    })
}

fn is_leaf(v: &Value) -> bool {
    match v {
        Value::Sequence(s) => s.is_empty(),
        Value::Mapping(m) => m.is_empty(),
        _ => true,
    }
}

/// Number of leaves of `v` (scalars, empty sequences and mappings).
fn count_leaves(v: &Value) -> usize {
    match v {
        Value::Sequence(s) if !s.is_empty() => s.iter().map(count_leaves).sum(),
        Value::Mapping(m) if !m.is_empty() => m.values().map(count_leaves).sum(),
        _ => 1,
    }
}

/// The `n`-th leaf of `v`, in order.
fn nth_leaf<'a>(v: &'a mut Value, n: &mut usize) -> Option<&'a mut Value> {
    if is_leaf(v) {
        if *n == 0 {
            return Some(v);
        }
        *n -= 1;
        return None;
    }
    match v {
        Value::Sequence(s) => s.iter_mut().find_map(|x| nth_leaf(x, n)),
        Value::Mapping(m) => m.values_mut().find_map(|x| nth_leaf(x, n)),
        _ => None,
    }
}

/// One edit of a spec-shaped document: which leaf, and what to put there. Mostly a value
/// of the leaf's own kind (so that many edited specs stay valid), else any value.
#[derive(Debug, Clone)]
struct LeafEdit {
    at: Index,
    same_kind: bool,
    string: String,
    int: i64,
    float: f64,
    boolean: bool,
    any: Value,
}

fn leaf_edit() -> impl Strategy<Value = LeafEdit> {
    let int = prop_oneof![0i64..10, 0i64..5000, any::<i64>()];
    let float = prop_oneof![0.0..1.0f64, any::<f64>(), prop::sample::select(vec![f64::NAN, f64::INFINITY, -0.0, 1.0])];
    (any::<Index>(), prop::bool::weighted(0.8), tricky_string(), int, float, any::<bool>(), yaml_value())
        .prop_map(|(at, same_kind, string, int, float, boolean, any)| LeafEdit { at, same_kind, string, int, float, boolean, any })
}

fn apply_edit(doc: &mut Value, e: &LeafEdit) {
    let mut n = e.at.index(count_leaves(doc));
    let leaf = nth_leaf(doc, &mut n).expect("n < number of leaves");
    *leaf = match (&*leaf, e.same_kind) {
        (Value::String(_), true) => Value::String(e.string.clone()),
        (Value::Number(x), true) if x.is_f64() => Value::Number(e.float.into()),
        (Value::Number(_), true) => Value::Number(e.int.into()),
        (Value::Bool(_), true) => Value::Bool(e.boolean),
        _ => e.any.clone(),
    };
}

/// Parse in both contexts; check what the control plane accepts. Returns whether it did.
fn parse_both(text: &str) -> Result<bool, TestCaseError> {
    let _ = JobSpec::from_yaml(text, SpecContext::Local);
    match JobSpec::from_yaml(text, SpecContext::Remote) {
        Ok(s) => assert_safe_remote(&s).map(|()| true),
        Err(_) => Ok(false),
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Arbitrary text (any Unicode, and YAML's punctuation) never panics the parser.
    #[test]
    fn arbitrary_text_never_panics(text in prop_oneof![any::<String>(), "[-:{}\\[\\],&*!|>'\"%@#?\n \ta-z0-9.]{0,200}"]) {
        parse_both(&text)?;
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Arbitrary YAML documents (nested mappings and sequences, random keys and values).
    #[test]
    fn arbitrary_yaml_never_panics(v in yaml_value()) {
        parse_both(&serde_yaml::to_string(&v).unwrap())?;
    }

    /// Hostile remote `output.dir` values are refused, naming `output.dir`.
    #[test]
    fn hostile_output_dir_is_refused(dir in hostile_dir()) {
        prop_assert!(!remote_dir_ok(&dir), "generator made a safe dir {:?}", dir);
        let mut s = valid();
        s.output.dir = dir;
        assert_refused(&s, "output.dir")?;
    }

    /// NUL, other control characters, empty and over-long values are refused in every
    /// location, naming it, in a local spec too.
    #[test]
    fn hostile_locations_are_refused(field in prop::sample::select(LOCATIONS.to_vec()), v in hostile_location()) {
        let mut s = valid();
        set_location(&mut s, field, v);
        assert_refused(&s, field)?;
        prop_assert!(error_paths(&s, SpecContext::Local).iter().any(|p| p == field));
    }

    /// The name is accepted exactly when it is 1-64 letters, digits, `-`, `_`, `.`, not
    /// starting with `.` nor containing `..` (so no over-long, path-like or NUL name).
    #[test]
    fn names_match_their_form(name in prop_oneof![tricky_string(), "[a-zA-Z0-9._-]{0,70}", (60usize..200).prop_map(|n| "n".repeat(n))]) {
        let mut s = valid();
        s.name = name.clone();
        prop_assert_eq!(error_paths(&s, SpecContext::Remote).iter().any(|p| p == "name"), !name_ok(&name), "{:?}", name);
        if !name_ok(&name) {
            assert_refused(&s, "name")?;
        }
    }

    /// A label is accepted exactly when its key is 1-63 letters, digits, `-_./` and its
    /// value at most `MAX_SHORT_LEN` bytes without NUL or control characters.
    #[test]
    fn labels_match_their_form(
        key in prop_oneof![tricky_string(), "[a-z0-9._/-]{0,70}", (55usize..100).prop_map(|n| "k".repeat(n))],
        value in prop_oneof![
            tricky_string(),
            "[ -~]{0,40}",
            (250usize..300).prop_map(|n| "v".repeat(n)),
            ("[ -~]{0,20}", any::<Index>(), prop_oneof![Just('\0'), control_char()]).prop_map(|(v, at, c)| insert(&v, at, &c.to_string())),
        ],
    ) {
        let mut s = valid();
        s.labels.insert(key.clone(), value.clone());
        let field = format!("labels.{key}");
        let ok = label_key_ok(&key) && label_value_ok(&value);
        prop_assert_eq!(!error_paths(&s, SpecContext::Remote).contains(&field), ok, "{:?}: {:?}", key, value);
        if !ok {
            assert_refused(&s, &field)?;
        }
    }

    /// Target modules: a non-empty list of names of letters, digits, `_`, `.`, or exactly
    /// `all-linear`.
    #[test]
    fn target_modules_match_their_form(
        list in prop::collection::vec(prop_oneof![tricky_string(), "[a-z_.]{1,12}"], 0..4),
        named in prop_oneof![tricky_string(), Just("all-linear".to_string())],
    ) {
        let mut s = valid();
        s.lora.target_modules = Some(TargetModules::List(list.clone()));
        let paths = error_paths(&s, SpecContext::Remote);
        prop_assert_eq!(paths.iter().any(|p| p == "lora.target_modules"), list.is_empty());
        for (i, m) in list.iter().enumerate() {
            prop_assert_eq!(paths.contains(&format!("lora.target_modules[{i}]")), !module_ok(m), "{:?}", m);
        }
        s.lora.target_modules = Some(TargetModules::Named(named.clone()));
        prop_assert_eq!(error_paths(&s, SpecContext::Remote).iter().any(|p| p == "lora.target_modules"), named != "all-linear");
    }

    /// Every bounded string and list is refused exactly when it is past its limit, naming
    /// the field, in both contexts.
    #[test]
    fn lengths_are_refused_exactly_past_their_limit(field in 0..BOUNDED.len(), delta in -3i64..=3, local in any::<bool>()) {
        let (path, limit, set) = BOUNDED[field];
        let n = (limit as i64 + delta) as usize;
        let mut s = valid();
        set(&mut s, n);
        let ctx = if local { SpecContext::Local } else { SpecContext::Remote };
        // `labels.k*`: the key itself is the one over its limit.
        let named = |p: &String| match path.strip_suffix('*') {
            Some(prefix) => p.starts_with(prefix),
            None => p == path,
        };
        prop_assert_eq!(error_paths(&s, ctx).iter().any(named), n > limit, "{} at {} (limit {})", path, n, limit);
    }
}

/// A string of `n` bytes that is otherwise valid where it goes.
fn filler(n: usize) -> String {
    "x".repeat(n)
}

type Setter = fn(&mut JobSpec, usize);

/// Bounded strings and lists: (error path, limit, set one of length `n`).
const BOUNDED: &[(&str, usize, Setter)] = &[
    ("name", 64, |s, n| s.name = filler(n)),
    ("model.source", MAX_LOCATION_LEN, |s, n| s.model.source = filler(n)),
    ("data.train", MAX_LOCATION_LEN, |s, n| s.data.train = filler(n)),
    ("data.eval", MAX_LOCATION_LEN, |s, n| s.data.eval = Some(filler(n))),
    ("lora.init_adapter", MAX_LOCATION_LEN, |s, n| s.lora.init_adapter = Some(filler(n))),
    ("output.dir", MAX_LOCATION_LEN, |s, n| s.output.dir = filler(n)),
    ("data.question_field", MAX_SHORT_LEN, |s, n| s.data.question_field = filler(n)),
    ("data.answer_field", MAX_SHORT_LEN, |s, n| s.data.answer_field = filler(n)),
    ("data.template", MAX_TEXT_LEN, |s, n| s.data.template = format!("{{question}}{}", filler(n - 10))),
    ("lora.target_modules[1]", MAX_SHORT_LEN, |s, n| s.lora.target_modules = Some(TargetModules::List(vec!["q".into(), filler(n)]))),
    ("lora.target_modules", MAX_ENTRIES, |s, n| s.lora.target_modules = Some(TargetModules::List(vec!["q".into(); n]))),
    ("training.sample_prompts[0]", MAX_TEXT_LEN, |s, n| s.training.sample_prompts = vec![filler(n)]),
    ("training.sample_prompts", MAX_ENTRIES, |s, n| s.training.sample_prompts = vec!["p".into(); n]),
    ("labels.k", MAX_SHORT_LEN, |s, n| drop(s.labels.insert("k".into(), filler(n)))),
    ("labels", MAX_ENTRIES, |s, n| s.labels = (0..n).map(|i| (format!("k{i}"), "v".into())).collect()),
    ("labels.kk*", 63, |s, n| s.labels = [("k".repeat(n), "v".into())].into_iter().collect()),
];

proptest! {
    #![proptest_config(config(32))]

    /// Deep nesting (closed or not) is refused, never a stack overflow: in a string
    /// field, a map, the untagged `target_modules` (buffered through `deserialize_any`)
    /// and the whole document.
    #[test]
    fn deep_nesting_is_refused(
        depth in 100usize..20_000,
        brackets in prop::sample::select(vec![("[", "]"), ("{a: ", "}"), ("{", "}")]),
        closed in any::<bool>(),
        at in prop::sample::select(vec!["name", "labels", "target_modules", "document"]),
    ) {
        let (open, close) = brackets;
        let deep = format!("{}x{}", open.repeat(depth), if closed { close.repeat(depth) } else { String::new() });
        let text = match at {
            "name" => valid_yaml().replace("name: faq", &format!("name: {deep}")),
            "labels" => valid_yaml().replace("labels: { team: nlp }", &format!("labels: {deep}")),
            "target_modules" => valid_yaml().replace("[q_proj, v_proj]", &deep),
            _ => format!("{}x", "- ".repeat(depth)),
        };
        prop_assert!(JobSpec::from_yaml(&text, SpecContext::Remote).is_err());
    }

    /// Alias expansion ("billion laughs") inside the one field deserialized through
    /// `deserialize_any` (`target_modules`) is bounded: refused, quickly.
    #[test]
    fn alias_bombs_are_refused(levels in 4usize..12, fan in 4usize..10) {
        let mut items = vec!["&a0 [x, x, x, x, x, x, x, x, x, x]".to_string()];
        for l in 1..levels {
            items.push(format!("&a{l} [{}]", vec![format!("*a{}", l - 1); fan].join(", ")));
        }
        let text = valid_yaml().replace("[q_proj, v_proj]", &format!("[{}]", items.join(", ")));
        let started = std::time::Instant::now();
        prop_assert!(JobSpec::from_yaml(&text, SpecContext::Remote).is_err());
        prop_assert!(started.elapsed() < std::time::Duration::from_secs(2), "took {:?}", started.elapsed());
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// The spec text itself is refused past `MAX_SPEC_BYTES`, before it is parsed.
    #[test]
    fn spec_text_is_bounded(delta in -3i64..=3, pad in prop::sample::select(vec!["comment", "prompt"])) {
        let base = valid_yaml();
        let n = (MAX_SPEC_BYTES as i64 + delta) as usize;
        let text = match pad {
            // A comment: nothing else changes.
            "comment" => format!("{base}#{}\n", "x".repeat(n - base.len() - 2)),
            // Unparsed: a huge value in a field that would be refused anyway.
            _ => format!("{base}extra: {}\n", "x".repeat(n - base.len() - 8)),
        };
        prop_assert_eq!(text.len(), n);
        let r = JobSpec::from_yaml(&text, SpecContext::Remote);
        match pad {
            "comment" => prop_assert_eq!(r.is_ok(), n <= MAX_SPEC_BYTES, "{:?}", r.err()),
            _ => {
                let e = r.unwrap_err();
                prop_assert_eq!(e.errors[0].path == "spec", n > MAX_SPEC_BYTES, "{}", e.errors[0].path);
            }
        }
    }
}

/// A valid spec with up to three of its leaves replaced by random values: whatever still
/// parses for the control plane is safe, and enough does for that to mean something.
#[test]
fn spec_shaped_documents_are_safe_when_accepted() {
    let cases = 256;
    let accepted = std::cell::Cell::new(0u32);
    let mut runner = proptest::test_runner::TestRunner::new(config(cases));
    runner
        .run(&prop::collection::vec(leaf_edit(), 1..4), |edits| {
            let mut doc = serde_yaml::to_value(valid()).unwrap();
            for e in &edits {
                apply_edit(&mut doc, e);
            }
            if parse_both(&serde_yaml::to_string(&doc).unwrap())? {
                accepted.set(accepted.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    assert!(accepted.get() >= cases / 16, "only {} of {cases} edited specs were accepted", accepted.get());
}

/// A spec the control plane accepted reloads, from the JSON the coordinator persists it
/// as (`jobs.spec_json`), as exactly the same, still valid spec: here with the bounded
/// floats a few ULP under their exclusive upper bound.
///
/// (Found by this test: serde_json without its `float_roundtrip` feature read
/// `0.9999999999999999` back as `1.0`, so a dropout just under 1 reloaded out of range
/// after a coordinator restart; the workspace now enables that feature.)
#[test]
fn persisted_specs_reload_exactly() {
    type Setter = fn(&mut JobSpec, f64);
    let fields: [(&str, Setter, f64); 6] = [
        ("lora.dropout", |s, x| s.lora.dropout = x, 1.0),
        ("data.eval_split", |s, x| (s.data.eval, s.data.eval_split) = (None, x), 1.0),
        ("training.warmup_ratio", |s, x| s.training.warmup_ratio = x, 1.0),
        ("training.betas[0]", |s, x| s.training.betas[0] = x, 1.0),
        ("training.betas[1]", |s, x| s.training.betas[1] = x, 1.0),
        ("training.lr", |s, x| s.training.lr = x, 10.0),
    ];
    let mut runner = proptest::test_runner::TestRunner::new(config(256));
    runner
        .run(&(0..fields.len(), 1u64..8), |(i, ulps)| {
            let (path, set, bound) = fields[i];
            let mut s = valid();
            set(&mut s, f64::from_bits(f64::to_bits(bound) - ulps));
            prop_assert!(s.validate(SpecContext::Remote).is_ok(), "{}", path);
            let back: JobSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
            prop_assert!(back.validate(SpecContext::Remote).is_ok(), "{} reloads invalid", path);
            prop_assert_eq!(back, s);
            Ok(())
        })
        .unwrap();
}

/// Regression examples of the classes above, one of each.
#[test]
fn hostile_examples() {
    for (field, v) in [
        ("output.dir", "../x"),
        ("output.dir", "a/./b"),
        ("output.dir", "/etc"),
        ("output.dir", "//host/x"),
        ("output.dir", "a\\b"),
        ("output.dir", "C:x"),
        ("output.dir", "a\0b"),
        ("output.dir", "a\nb"),
        ("model.source", "s3://b/.\t./x"),
        ("lora.init_adapter", "s3://b/m\u{1b}[2J"),
        ("data.train", "a\0"),
        ("data.eval", "x\u{85}"),
        ("model.source", " "),
    ] {
        let mut s = valid();
        set_location(&mut s, field, v.into());
        let e = s.validate(SpecContext::Remote).unwrap_err();
        assert!(e.errors.iter().any(|f| f.path == field), "{field} {v:?}: {e}");
    }
    let mut s = valid();
    s.labels.insert("team".into(), "a\0b".into());
    let e = s.validate(SpecContext::Remote).unwrap_err();
    assert_eq!(e.errors[0].path, "labels.team", "{e}");
    // Locally, an absolute or parent-relative output directory is fine (the user's own
    // disk); NUL and control characters never.
    let mut s = valid();
    s.output.dir = "../out".into();
    s.validate(SpecContext::Local).unwrap();
    s.output.dir = "/tmp/out".into();
    s.validate(SpecContext::Local).unwrap();
    for bad in ["out\0", "out\tx"] {
        s.output.dir = bad.into();
        assert!(s.validate(SpecContext::Local).is_err(), "{bad:?}");
    }
}
