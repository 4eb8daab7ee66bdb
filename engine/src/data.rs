//! Training data: reading QA / Alpaca / chat / raw-text files, tokenizing them with the
//! prompt template and loss masks, optional packing, seeded ordering and micro-batches.
//!
//! Conventions:
//! - An [`Example`] is a token sequence with a `targets` mask: `targets[i]` says token
//!   `i` carries loss, i.e. the logits at position `i - 1` are scored against it. The
//!   first token of an example is never a target (nothing predicts it).
//! - Bad rows (missing field, empty answer, nothing left after truncation) are skipped
//!   with a warning naming file, line/row and reason, and counted in [`DataReport`].
//!   A file with no usable row, or one that is not valid JSON/CSV, is an error naming
//!   the file and line.
//! - Order: `shuffle: false` is file order, wrapping around; `shuffle: true` draws a
//!   fresh permutation per epoch from ChaCha8 seeded by `(seed, epoch)`, so a position
//!   in the stream (the data cursor) fully determines what comes next (exact resume).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lorafleet_shared::spec::{ChatTemplateChoice, DataFormat, DataSpec};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tokenizer::Tokenizer;
use crate::{EngineError, Result};

/// One conversation turn.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Turn {
    pub role: String,
    pub content: String,
}

/// What one row of a data file holds.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordKind {
    /// Question (already built from instruction/input for Alpaca) and answer.
    Qa { question: String, answer: String },
    Chat(Vec<Turn>),
    Text(String),
}

/// A row with where it came from (`file:line N` or `file:row N`).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub location: String,
    pub kind: RecordKind,
}

/// A row that was not used, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedRow {
    pub location: String,
    pub reason: String,
}

/// What loading a data set found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataReport {
    /// Rows read (used or not).
    pub rows: usize,
    /// Examples kept.
    pub examples: usize,
    /// Examples cut at `max_seq_len` (and still used).
    pub truncated: usize,
    pub skipped: Vec<SkippedRow>,
    /// Sequences after packing (= examples without packing).
    pub sequences: usize,
    /// Tokens carrying loss, over all examples.
    pub target_tokens: usize,
}

/// A tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub targets: Vec<bool>,
}

/// One training sequence: a single example, or several packed ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub targets: Vec<bool>,
    /// Packed sequences: segment id per token (1, 2, ...) and per-example positions.
    pub segment_ids: Option<Vec<u32>>,
    pub position_ids: Option<Vec<u32>>,
}

impl Sequence {
    pub fn target_count(&self) -> usize {
        self.targets.iter().filter(|t| **t).count()
    }
}

// ---------------------------------------------------------------------------
// reading files

fn file_err(path: &Path, msg: impl Into<String>) -> EngineError {
    EngineError::file(path, msg)
}

/// A row as a JSON object (CSV rows become objects of strings) plus its location.
struct RawRow {
    location: String,
    value: Value,
}

fn read_rows(path: &Path) -> Result<Vec<RawRow>> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read data file: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| file_err(path, format!("not valid utf-8 (byte {})", e.utf8_error().valid_up_to())))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let name = path.display().to_string();
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if text.trim().is_empty() {
        return Err(file_err(path, "data file is empty"));
    }
    match ext.as_str() {
        "csv" | "tsv" => read_csv(path, text, if ext == "tsv" { b'\t' } else { b',' }),
        "txt" | "text" | "md" => Ok(vec![RawRow { location: format!("{name}:line 1"), value: Value::String(text.to_string()) }]),
        _ => {
            let first = text.trim_start().chars().next().unwrap_or(' ');
            if first == '[' {
                let v: Vec<Value> = serde_json::from_str(text).map_err(|e| {
                    file_err(path, format!("malformed json at line {} column {}: {}", e.line(), e.column(), strip_pos(&e.to_string())))
                })?;
                Ok(v.into_iter().enumerate().map(|(i, value)| RawRow { location: format!("{name}:row {}", i + 1), value }).collect())
            } else {
                let mut rows = Vec::new();
                for (i, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let value: Value = serde_json::from_str(line).map_err(|e| {
                        file_err(path, format!("malformed json at line {} column {}: {}", i + 1, e.column(), strip_pos(&e.to_string())))
                    })?;
                    rows.push(RawRow { location: format!("{name}:line {}", i + 1), value });
                }
                Ok(rows)
            }
        }
    }
}

/// serde_json appends " at line L column C"; we print our own position.
fn strip_pos(s: &str) -> String {
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s.to_string(),
    }
}

fn read_csv(path: &Path, text: &str, delim: u8) -> Result<Vec<RawRow>> {
    let name = path.display().to_string();
    let mut rdr = csv::ReaderBuilder::new().delimiter(delim).has_headers(true).flexible(false).from_reader(text.as_bytes());
    let headers = rdr
        .headers()
        .map_err(|e| file_err(path, format!("malformed csv at line 1: {}", csv_msg(&e))))?
        .clone();
    let mut rows = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            file_err(path, format!("malformed csv at line {line}: {}", csv_msg(&e)))
        })?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        let mut obj = serde_json::Map::new();
        for (h, v) in headers.iter().zip(rec.iter()) {
            obj.insert(h.to_string(), Value::String(v.to_string()));
        }
        rows.push(RawRow { location: format!("{name}:line {line}"), value: Value::Object(obj) });
    }
    Ok(rows)
}

fn csv_msg(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            format!("found {len} fields, expected {expected_len} (as in the header)")
        }
        csv::ErrorKind::Utf8 { .. } => "invalid utf-8".into(),
        _ => e.to_string().to_lowercase(),
    }
}

/// A string field: `Ok(None)` when absent or null; numbers and booleans are written out.
fn field_str(obj: &serde_json::Map<String, Value>, key: &str) -> std::result::Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(_) => Err(format!("field {key:?} is not a string")),
    }
}

fn record_from_row(row: &RawRow, spec: &DataSpec) -> std::result::Result<RecordKind, String> {
    if spec.format == DataFormat::Text {
        if let Value::String(s) = &row.value {
            return if s.trim().is_empty() { Err("empty text".into()) } else { Ok(RecordKind::Text(s.clone())) };
        }
    }
    let obj = row.value.as_object().ok_or_else(|| "row is not a json object".to_string())?;
    match spec.format {
        DataFormat::Qa => {
            let q = field_str(obj, &spec.question_field)?.ok_or_else(|| format!("missing field {:?}", spec.question_field))?;
            let a = field_str(obj, &spec.answer_field)?.ok_or_else(|| format!("missing field {:?}", spec.answer_field))?;
            if q.trim().is_empty() {
                return Err(format!("empty {:?}", spec.question_field));
            }
            if a.trim().is_empty() {
                return Err(format!("empty {:?}", spec.answer_field));
            }
            Ok(RecordKind::Qa { question: q, answer: a })
        }
        DataFormat::Alpaca => {
            let ins = field_str(obj, "instruction")?.ok_or("missing field \"instruction\"")?;
            let input = field_str(obj, "input")?.unwrap_or_default();
            let out = field_str(obj, "output")?.ok_or("missing field \"output\"")?;
            if ins.trim().is_empty() {
                return Err("empty \"instruction\"".into());
            }
            if out.trim().is_empty() {
                return Err("empty \"output\"".into());
            }
            let question = if input.trim().is_empty() { ins } else { format!("{ins}\n{input}") };
            Ok(RecordKind::Qa { question, answer: out })
        }
        DataFormat::Messages => {
            let msgs = obj.get("messages").ok_or("missing field \"messages\"")?;
            let arr = msgs.as_array().ok_or("field \"messages\" is not a list")?;
            let mut turns = Vec::new();
            for (i, m) in arr.iter().enumerate() {
                let mo = m.as_object().ok_or_else(|| format!("messages[{i}] is not an object"))?;
                let role = field_str(mo, "role").map_err(|e| format!("messages[{i}]: {e}"))?.ok_or_else(|| format!("messages[{i}]: missing field \"role\""))?;
                let content = field_str(mo, "content").map_err(|e| format!("messages[{i}]: {e}"))?.ok_or_else(|| format!("messages[{i}]: missing field \"content\""))?;
                let role = role.to_ascii_lowercase();
                if !matches!(role.as_str(), "system" | "user" | "assistant") {
                    return Err(format!("messages[{i}]: unknown role {role:?} (system, user, assistant)"));
                }
                turns.push(Turn { role, content });
            }
            validate_chat(&turns)?;
            Ok(RecordKind::Chat(turns))
        }
        DataFormat::Text => {
            let t = field_str(obj, "text")?.ok_or("missing field \"text\"")?;
            if t.trim().is_empty() {
                return Err("empty \"text\"".into());
            }
            Ok(RecordKind::Text(t))
        }
    }
}

fn validate_chat(turns: &[Turn]) -> std::result::Result<(), String> {
    let body: Vec<&Turn> = turns.iter().skip_while(|t| t.role == "system").collect();
    if body.iter().any(|t| t.role == "system") {
        return Err("a system message may only come first".into());
    }
    if body.is_empty() {
        return Err("no user/assistant messages".into());
    }
    for (i, t) in body.iter().enumerate() {
        let want = if i % 2 == 0 { "user" } else { "assistant" };
        if t.role != want {
            return Err(format!("messages must alternate user/assistant, found {:?} where {want:?} was expected", t.role));
        }
    }
    if !body.len().is_multiple_of(2) {
        return Err("the conversation must end with an assistant message".into());
    }
    if body.iter().any(|t| t.role == "assistant" && t.content.trim().is_empty()) {
        return Err("empty assistant message".into());
    }
    Ok(())
}

/// Read a data file into records; unusable rows are returned as skipped.
pub fn read_records(path: &Path, spec: &DataSpec) -> Result<(Vec<Record>, Vec<SkippedRow>)> {
    let rows = read_rows(path)?;
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    for row in &rows {
        match record_from_row(row, spec) {
            Ok(kind) => records.push(Record { location: row.location.clone(), kind }),
            Err(reason) => skipped.push(SkippedRow { location: row.location.clone(), reason }),
        }
    }
    Ok((records, skipped))
}

// ---------------------------------------------------------------------------
// tokenizing

/// Fill the template (`{question}`).
pub fn format_prompt(template: &str, question: &str) -> String {
    template.replace("{question}", question)
}

/// A conversation's tokens in order, each piece flagged when it is an answer: system
/// text goes in front of the first prompt; each user turn is formatted with the
/// template, each assistant turn is an answer (" " + text + eos).
fn chat_pieces(tok: &Tokenizer, template: &str, turns: &[Turn]) -> Result<Vec<(Vec<u32>, bool)>> {
    let mut system = String::new();
    let mut first = true;
    let mut out = Vec::with_capacity(turns.len());
    for t in turns {
        match t.role.as_str() {
            "system" => {
                system.push_str(&t.content);
                system.push('\n');
            }
            "user" => {
                let text = format!("{}{}", if first { system.as_str() } else { "\n" }, format_prompt(template, &t.content));
                out.push((tok.encode(&text, first)?, false));
                first = false;
            }
            _ => out.push((tok.encode_answer(&t.content)?, true)),
        }
    }
    Ok(out)
}

/// The model's chat template, or the error that says it has none.
fn model_chat_template(tok: &Tokenizer) -> Result<&crate::chat_template::ChatTemplate> {
    tok.chat_template().ok_or_else(|| {
        EngineError::Data(format!(
            "data.chat_template is model, but the model has no chat template (no chat_template in tokenizer_config.json and no chat_template.jinja next to {})",
            tok.path().display()
        ))
    })
}

/// A conversation's tokens rendered by the model's chat template, each piece flagged
/// when it is an answer. Every assistant turn's text is what the rendering of the
/// conversation up to it adds to the rendering of the conversation before it with the
/// generation prompt (so the answer's end-of-turn tokens are learned too); the text is
/// tokenized without the tokenizer's own special tokens (the template writes them), as
/// transformers does for chat templates. Turns after the last assistant turn are unused.
fn model_chat_pieces(tok: &Tokenizer, turns: &[Turn]) -> Result<Vec<(Vec<u32>, bool)>> {
    let ct = model_chat_template(tok)?;
    let mut out = Vec::new();
    let mut done = String::new();
    for (i, t) in turns.iter().enumerate() {
        if t.role != "assistant" {
            continue;
        }
        let prompt = ct.render(&turns[..i], true)?;
        let full = ct.render(&turns[..=i], false)?;
        if !prompt.starts_with(&done) || !full.starts_with(&prompt) {
            return Err(EngineError::Data(format!(
                "the model's chat template does not render this conversation as a growing text, so the answer of turn {i} cannot be told apart"
            )));
        }
        out.push((tok.encode(&prompt[done.len()..], false)?, false));
        out.push((tok.encode(&full[prompt.len()..], false)?, true));
        done = full;
    }
    if out.is_empty() {
        return Err(EngineError::Data("no assistant turn".into()));
    }
    Ok(out)
}

/// How the prompts of a model (with an adapter) are formatted: the template it was
/// trained with, or the model's own chat template.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptFormat {
    Template(String),
    ModelChat,
}

impl PromptFormat {
    pub fn of(spec: &DataSpec) -> Self {
        match spec.chat_template {
            ChatTemplateChoice::Template => PromptFormat::Template(spec.template.clone()),
            ChatTemplateChoice::Model => PromptFormat::ModelChat,
        }
    }

    /// What a model is prompted with when nothing says otherwise: its own chat template
    /// when it has one, else the default template.
    pub fn default_for(tok: &Tokenizer) -> Self {
        match tok.chat_template() {
            Some(_) => PromptFormat::ModelChat,
            None => PromptFormat::Template(lorafleet_shared::spec::DEFAULT_TEMPLATE.into()),
        }
    }

    /// The prompt of a conversation that ends with a user turn, tokenized as training
    /// tokenizes conversations (the model then continues with the answer).
    pub fn encode_chat(&self, tok: &Tokenizer, turns: &[Turn]) -> Result<Vec<u32>> {
        match self {
            PromptFormat::Template(t) => Ok(chat_pieces(tok, t, turns)?.into_iter().flat_map(|(p, _)| p).collect()),
            PromptFormat::ModelChat => {
                let text = model_chat_template(tok)?.render(turns, true)?;
                tok.encode(&text, false)
            }
        }
    }

    /// The prompt of one question.
    pub fn encode_question(&self, tok: &Tokenizer, question: &str) -> Result<Vec<u32>> {
        self.encode_chat(tok, &[Turn { role: "user".into(), content: question.into() }])
    }
}

/// Tokenize one record. Returns `None` for a text file that has to be chunked (handled
/// by the caller); errors are reasons for skipping the row.
fn tokenize_record(kind: &RecordKind, tok: &Tokenizer, spec: &DataSpec) -> Result<Vec<Example>> {
    let mut ids: Vec<u32> = Vec::new();
    let mut targets: Vec<bool> = Vec::new();
    match kind {
        RecordKind::Qa { .. } | RecordKind::Chat(_) if spec.chat_template == ChatTemplateChoice::Model => {
            let qa: Vec<Turn>;
            let turns: &[Turn] = match kind {
                RecordKind::Chat(t) => t,
                RecordKind::Qa { question, answer } => {
                    qa = vec![Turn { role: "user".into(), content: question.clone() }, Turn { role: "assistant".into(), content: answer.clone() }];
                    &qa
                }
                RecordKind::Text(_) => &[],
            };
            for (piece, answer) in model_chat_pieces(tok, turns)? {
                targets.extend(std::iter::repeat_n(answer || spec.train_on_prompt, piece.len()));
                ids.extend(piece);
            }
        }
        RecordKind::Qa { question, answer } => {
            let p = tok.encode_prompt(&format_prompt(&spec.template, question))?;
            let a = tok.encode_answer(answer)?;
            targets.extend(std::iter::repeat_n(spec.train_on_prompt, p.len()));
            ids.extend(p);
            targets.extend(std::iter::repeat_n(true, a.len()));
            ids.extend(a);
        }
        RecordKind::Chat(turns) => {
            for (piece, answer) in chat_pieces(tok, &spec.template, turns)? {
                targets.extend(std::iter::repeat_n(answer || spec.train_on_prompt, piece.len()));
                ids.extend(piece);
            }
        }
        RecordKind::Text(text) => {
            let mut t = tok.encode(text, true)?;
            t.push(tok.eos_id());
            targets.extend(std::iter::repeat_n(true, t.len()));
            ids.extend(t);
        }
    }
    if let Some(f) = targets.first_mut() {
        *f = false;
    }
    Ok(vec![Example { ids, targets }])
}

/// A tokenized data set.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub sequences: Vec<Sequence>,
    pub report: DataReport,
    /// The records behind the examples (for samples and eval split).
    pub records: Vec<Record>,
}

/// Tokenize records (truncating at `max_seq_len`, skipping rows with no target left),
/// then pack if asked.
pub fn build_dataset(
    records: Vec<Record>,
    mut skipped: Vec<SkippedRow>,
    rows: usize,
    tok: &Tokenizer,
    spec: &DataSpec,
    file: &Path,
) -> Result<Dataset> {
    if spec.chat_template == ChatTemplateChoice::Model {
        // Not a reason to skip rows: the whole data set needs it.
        model_chat_template(tok)?;
    }
    let max = spec.max_seq_len as usize;
    let mut examples = Vec::new();
    let mut kept = Vec::new();
    let mut truncated = 0;
    let is_text_file = matches!(file.extension().and_then(|e| e.to_str()), Some("txt" | "text" | "md"));
    for rec in records {
        let exs = tokenize_record(&rec.kind, tok, spec)?;
        for mut ex in exs {
            if is_text_file && ex.ids.len() > max {
                // A plain text file is cut into max_seq_len windows, not truncated.
                let mut start = 0;
                while start < ex.ids.len() {
                    let end = (start + max).min(ex.ids.len());
                    let ids = ex.ids[start..end].to_vec();
                    let mut targets = vec![true; ids.len()];
                    targets[0] = false;
                    if ids.len() >= 2 {
                        examples.push(Example { ids, targets });
                        kept.push(rec.clone());
                    }
                    start = end;
                }
                continue;
            }
            if ex.ids.len() > max {
                ex.ids.truncate(max);
                ex.targets.truncate(max);
                if !ex.targets.iter().any(|t| *t) {
                    skipped.push(SkippedRow {
                        location: rec.location.clone(),
                        reason: format!("no answer token left after truncation to max_seq_len {max}"),
                    });
                    continue;
                }
                truncated += 1;
            }
            examples.push(ex);
            kept.push(rec.clone());
        }
    }
    for s in &skipped {
        tracing::warn!(location = %s.location, reason = %s.reason, "skipping data row");
    }
    if truncated > 0 {
        tracing::warn!(file = %file.display(), truncated, max_seq_len = max, "examples truncated at max_seq_len");
    }
    if examples.is_empty() {
        let why = skipped.first().map(|s| format!(" (first problem: {}: {})", s.location, s.reason)).unwrap_or_default();
        return Err(file_err(file, format!("no usable rows: {} read, {} skipped{why}", rows, skipped.len())));
    }
    let target_tokens = examples.iter().map(|e| e.targets.iter().filter(|t| **t).count()).sum();
    let sequences = if spec.packing { pack(&examples, max) } else { examples.iter().map(single).collect() };
    let report = DataReport { rows, examples: examples.len(), truncated, skipped, sequences: sequences.len(), target_tokens };
    Ok(Dataset { sequences, report, records: kept })
}

fn single(e: &Example) -> Sequence {
    Sequence { ids: e.ids.clone(), targets: e.targets.clone(), segment_ids: None, position_ids: None }
}

/// Greedy packing in order: examples are appended to the current sequence while they fit
/// in `max_len`; each gets its own segment id (1, 2, ...) and positions from 0.
pub fn pack(examples: &[Example], max_len: usize) -> Vec<Sequence> {
    let mut out = Vec::new();
    let mut cur = Sequence { ids: vec![], targets: vec![], segment_ids: Some(vec![]), position_ids: Some(vec![]) };
    let mut seg = 0u32;
    for e in examples {
        if !cur.ids.is_empty() && cur.ids.len() + e.ids.len() > max_len {
            out.push(std::mem::replace(
                &mut cur,
                Sequence { ids: vec![], targets: vec![], segment_ids: Some(vec![]), position_ids: Some(vec![]) },
            ));
            seg = 0;
        }
        seg += 1;
        cur.ids.extend_from_slice(&e.ids);
        cur.targets.extend_from_slice(&e.targets);
        if let Some(first) = cur.targets.len().checked_sub(e.targets.len()) {
            // never predict across an example boundary
            cur.targets[first] = false;
        }
        cur.segment_ids.as_mut().unwrap().extend(std::iter::repeat_n(seg, e.ids.len()));
        cur.position_ids.as_mut().unwrap().extend(0..e.ids.len() as u32);
    }
    if !cur.ids.is_empty() {
        out.push(cur);
    }
    out
}

/// Load a data file and tokenize it.
pub fn load_dataset(path: &Path, tok: &Tokenizer, spec: &DataSpec) -> Result<Dataset> {
    let (records, skipped) = read_records(path, spec)?;
    let rows = records.len() + skipped.len();
    build_dataset(records, skipped, rows, tok, spec, path)
}

/// Training and (optional) eval data sets as the spec asks: `eval` file, or an
/// `eval_split` fraction of the training rows drawn with the seed.
pub fn load_train_eval(
    train: &Path,
    eval: Option<&Path>,
    tok: &Tokenizer,
    spec: &DataSpec,
    seed: u64,
) -> Result<(Dataset, Option<Dataset>)> {
    let (records, skipped) = read_records(train, spec)?;
    let rows = records.len() + skipped.len();
    if let Some(e) = eval {
        let train_ds = build_dataset(records, skipped, rows, tok, spec, train)?;
        let eval_ds = load_dataset(e, tok, spec)?;
        return Ok((train_ds, Some(eval_ds)));
    }
    if spec.eval_split > 0.0 && records.len() >= 2 {
        let (tr, ev) = split_records(records, spec.eval_split, seed);
        let n_ev = ev.len();
        let train_ds = build_dataset(tr, skipped, rows - n_ev, tok, spec, train)?;
        let eval_ds = build_dataset(ev, vec![], n_ev, tok, spec, train)?;
        return Ok((train_ds, Some(eval_ds)));
    }
    Ok((build_dataset(records, skipped, rows, tok, spec, train)?, None))
}

/// Seeded split: `round(n * frac)` rows (at least 1, at most n - 1) go to eval; both
/// parts keep file order.
pub fn split_records(records: Vec<Record>, frac: f64, seed: u64) -> (Vec<Record>, Vec<Record>) {
    let n = records.len();
    let k = ((n as f64 * frac).round() as usize).clamp(1, n.saturating_sub(1).max(1));
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_e7a1_5911_7000u64);
    idx.shuffle(&mut rng);
    let mut is_eval = vec![false; n];
    for &i in &idx[..k] {
        is_eval[i] = true;
    }
    let mut tr = Vec::new();
    let mut ev = Vec::new();
    for (i, r) in records.into_iter().enumerate() {
        if is_eval[i] {
            ev.push(r)
        } else {
            tr.push(r)
        }
    }
    (tr, ev)
}

// ---------------------------------------------------------------------------
// order and batches

/// Which sequence comes at each position of the (endless) training stream.
#[derive(Debug, Clone)]
pub struct DataOrder {
    n: usize,
    shuffle: bool,
    seed: u64,
    cached: Option<(u64, Vec<usize>)>,
}

impl DataOrder {
    pub fn new(n: usize, shuffle: bool, seed: u64) -> Self {
        Self { n, shuffle, seed, cached: None }
    }

    /// The permutation of one epoch (identity without shuffling).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.n).collect();
        if self.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(epoch);
            idx.shuffle(&mut rng);
        }
        idx
    }

    /// Sequence index at stream position `pos`.
    pub fn at(&mut self, pos: u64) -> usize {
        let epoch = pos / self.n as u64;
        let i = (pos % self.n as u64) as usize;
        if !self.shuffle {
            return i;
        }
        if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
            self.cached = Some((epoch, self.epoch_order(epoch)));
        }
        self.cached.as_ref().unwrap().1[i]
    }

    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// A micro-batch on the host: right-padded `[batch, seq]` ids, and the flat positions
/// `b * seq + t` whose logits are scored against `targets` (the next token).
#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<u32>,
    pub position_ids: Option<Vec<u32>>,
    pub segment_ids: Option<Vec<u32>>,
    /// Flat indices into `[batch * seq]` of the positions that predict a target.
    pub loss_positions: Vec<u32>,
    pub targets: Vec<u32>,
    /// Non-padding tokens.
    pub tokens: usize,
}

impl MicroBatch {
    /// Right-pad sequences with `pad_id` into one batch.
    pub fn from_sequences(seqs: &[&Sequence], pad_id: u32) -> Self {
        let batch = seqs.len();
        let seq = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        let packed = seqs.iter().any(|s| s.segment_ids.is_some());
        let mut input_ids = vec![pad_id; batch * seq];
        let mut position_ids = if packed { Some(vec![0u32; batch * seq]) } else { None };
        let mut segment_ids = if packed { Some(vec![0u32; batch * seq]) } else { None };
        let mut loss_positions = Vec::new();
        let mut targets = Vec::new();
        let mut tokens = 0;
        for (b, s) in seqs.iter().enumerate() {
            let base = b * seq;
            input_ids[base..base + s.ids.len()].copy_from_slice(&s.ids);
            tokens += s.ids.len();
            for t in 1..s.ids.len() {
                if s.targets[t] {
                    loss_positions.push((base + t - 1) as u32);
                    targets.push(s.ids[t]);
                }
            }
            if let (Some(pos), Some(seg)) = (position_ids.as_mut(), segment_ids.as_mut()) {
                let (sp, ss) = match (&s.position_ids, &s.segment_ids) {
                    (Some(p), Some(g)) => (p.clone(), g.clone()),
                    _ => ((0..s.ids.len() as u32).collect(), vec![1; s.ids.len()]),
                };
                pos[base..base + s.ids.len()].copy_from_slice(&sp);
                seg[base..base + s.ids.len()].copy_from_slice(&ss);
                // padding: its own segment, positions continuing
                let pad_seg = ss.iter().copied().max().unwrap_or(0) + 1;
                let next = sp.last().map(|p| p + 1).unwrap_or(0);
                for (k, t) in (s.ids.len()..seq).enumerate() {
                    pos[base + t] = next + k as u32;
                    seg[base + t] = pad_seg;
                }
            }
        }
        Self { batch, seq, input_ids, position_ids, segment_ids, loss_positions, targets, tokens }
    }

    pub fn target_count(&self) -> usize {
        self.targets.len()
    }

    /// The model input and the loss index tensors on `device`.
    pub fn to_tensors(&self, device: &Device) -> Result<BatchTensors> {
        let shape = (self.batch, self.seq);
        let input_ids = Tensor::from_vec(self.input_ids.clone(), shape, device)?;
        let position_ids = match &self.position_ids {
            Some(p) => Some(Tensor::from_vec(p.clone(), shape, device)?),
            None => None,
        };
        let segment_ids = match &self.segment_ids {
            Some(s) => Some(Tensor::from_vec(s.clone(), shape, device)?),
            None => None,
        };
        let n = self.loss_positions.len();
        let loss_positions = Tensor::from_vec(self.loss_positions.clone(), n, device)?;
        let targets = Tensor::from_vec(self.targets.clone(), n, device)?;
        Ok(BatchTensors {
            input: crate::model::ForwardInput { input_ids, position_ids, segment_ids },
            loss_positions,
            targets,
        })
    }
}

/// Device tensors of a micro-batch.
pub struct BatchTensors {
    pub input: crate::model::ForwardInput,
    pub loss_positions: Tensor,
    pub targets: Tensor,
}

/// The resumable position in the training stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DataCursor {
    /// Sequences consumed so far (across epochs).
    pub position: u64,
}

/// Draws micro-batches from a data set in the seeded order.
pub struct Batcher<'a> {
    pub data: &'a Dataset,
    pub order: DataOrder,
    pub micro_batch_size: usize,
    pub pad_id: u32,
    pub cursor: DataCursor,
}

impl<'a> Batcher<'a> {
    pub fn new(data: &'a Dataset, shuffle: bool, seed: u64, micro_batch_size: usize, pad_id: u32) -> Self {
        Self {
            data,
            order: DataOrder::new(data.sequences.len(), shuffle, seed),
            micro_batch_size,
            pad_id,
            cursor: DataCursor::default(),
        }
    }

    pub fn next_batch(&mut self) -> MicroBatch {
        let mut seqs = Vec::with_capacity(self.micro_batch_size);
        for _ in 0..self.micro_batch_size {
            let i = self.order.at(self.cursor.position);
            self.cursor.position += 1;
            seqs.push(&self.data.sequences[i]);
        }
        MicroBatch::from_sequences(&seqs, self.pad_id)
    }

    /// Epochs completed, fractional.
    pub fn epoch(&self) -> f64 {
        self.cursor.position as f64 / self.data.sequences.len().max(1) as f64
    }
}

/// Eval micro-batches: every sequence once, in order.
pub fn eval_batches(data: &Dataset, micro_batch_size: usize, pad_id: u32) -> Vec<MicroBatch> {
    data.sequences.chunks(micro_batch_size.max(1)).map(|c| MicroBatch::from_sequences(&c.iter().collect::<Vec<_>>(), pad_id)).collect()
}

/// Resolve a data path from a spec relative to the spec file's directory.
pub fn resolve_path(base: Option<&Path>, p: &str) -> PathBuf {
    let path = PathBuf::from(p);
    match base {
        Some(b) if path.is_relative() => b.join(path),
        _ => path,
    }
}
