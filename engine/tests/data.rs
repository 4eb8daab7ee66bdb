//! Data formats, masks, packing, ordering and bad input.

use std::path::{Path, PathBuf};

use lorafleet_engine::data::{self, DataOrder, MicroBatch, RecordKind};
use lorafleet_engine::tokenizer::Tokenizer;
use lorafleet_shared::spec::{DataFormat, DataSpec};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

fn tok() -> Tokenizer {
    Tokenizer::from_file(&fixtures().join("tokenizer/tokenizer.json"), None, None).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn spec() -> DataSpec {
    DataSpec::default()
}

#[test]
fn tokenization_follows_the_fixture_protocol() {
    let t = tok();
    assert_eq!(t.eos_id(), 0);
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "a.jsonl", "{\"question\": \"How do I create an account?\", \"answer\": \"Click sign up.\"}\n");
    let ds = data::load_dataset(&f, &t, &spec()).unwrap();
    let s = &ds.sequences[0];
    let p = t.encode("<human>: How do I create an account?\n<assistant>:", true).unwrap();
    let a = t.encode(" Click sign up.", false).unwrap();
    let mut want = p.clone();
    want.extend(&a);
    want.push(0);
    assert_eq!(s.ids, want);
    // loss only on answer tokens + eos
    assert!(s.targets[..p.len()].iter().all(|x| !x));
    assert!(s.targets[p.len()..].iter().all(|x| *x));
    assert_eq!(ds.report.target_tokens, a.len() + 1);
}

#[test]
fn train_on_prompt_and_custom_fields_and_template() {
    let t = tok();
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "a.json", r#"[{"q": "hi", "a": "hello"}]"#);
    let sp = DataSpec { question_field: "q".into(), answer_field: "a".into(), template: "Q: {question}\nA:".into(), train_on_prompt: true, ..spec() };
    let ds = data::load_dataset(&f, &t, &sp).unwrap();
    let s = &ds.sequences[0];
    let p = t.encode("Q: hi\nA:", true).unwrap();
    assert_eq!(&s.ids[..p.len()], &p[..]);
    assert!(!s.targets[0]);
    assert!(s.targets[1..].iter().all(|x| *x));
}

#[test]
fn csv_alpaca_messages_and_text() {
    let t = tok();
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "a.csv", "question,answer\n\"Where, exactly?\",\"Here \"\"now\"\"\"\n退款?,七天内可以退款。\n");
    let (recs, skipped) = data::read_records(&f, &spec()).unwrap();
    assert!(skipped.is_empty());
    assert_eq!(recs[0].kind, RecordKind::Qa { question: "Where, exactly?".into(), answer: "Here \"now\"".into() });
    assert!(recs[1].location.ends_with("a.csv:line 3"), "{}", recs[1].location);

    let f = write(dir.path(), "b.jsonl", "{\"instruction\": \"Translate\", \"input\": \"hello\", \"output\": \"你好\"}\n{\"instruction\": \"Say hi\", \"output\": \"hi\"}\n");
    let sp = DataSpec { format: DataFormat::Alpaca, ..spec() };
    let (recs, _) = data::read_records(&f, &sp).unwrap();
    assert_eq!(recs[0].kind, RecordKind::Qa { question: "Translate\nhello".into(), answer: "你好".into() });
    assert_eq!(recs[1].kind, RecordKind::Qa { question: "Say hi".into(), answer: "hi".into() });

    let f = write(
        dir.path(),
        "c.jsonl",
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}, {"role": "assistant", "content": "bye!"}]}
{"messages": [{"role": "user", "content": "hi"}]}
"#,
    );
    let sp = DataSpec { format: DataFormat::Messages, ..spec() };
    let ds = data::load_dataset(&f, &t, &sp).unwrap();
    assert_eq!(ds.report.skipped.len(), 1);
    assert!(ds.report.skipped[0].reason.contains("end with an assistant"), "{:?}", ds.report.skipped);
    let s = &ds.sequences[0];
    let p1 = t.encode("Be brief.\n<human>: hi\n<assistant>:", true).unwrap();
    let a1 = t.encode(" hello", false).unwrap();
    let p2 = t.encode("\n<human>: bye\n<assistant>:", false).unwrap();
    let a2 = t.encode(" bye!", false).unwrap();
    let mut want = p1.clone();
    want.extend(&a1);
    want.push(0);
    want.extend(&p2);
    want.extend(&a2);
    want.push(0);
    assert_eq!(s.ids, want);
    let n_targets = s.targets.iter().filter(|x| **x).count();
    assert_eq!(n_targets, a1.len() + a2.len() + 2, "loss on assistant turns only");

    let f = write(dir.path(), "d.jsonl", "{\"text\": \"hello world\"}\n");
    let sp = DataSpec { format: DataFormat::Text, ..spec() };
    let ds = data::load_dataset(&f, &t, &sp).unwrap();
    let s = &ds.sequences[0];
    assert!(!s.targets[0] && s.targets[1..].iter().all(|x| *x));
    assert_eq!(*s.ids.last().unwrap(), 0);
}

#[test]
fn bad_rows_are_skipped_with_location_and_reason() {
    let t = tok();
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "a.jsonl",
        "{\"question\": \"q1\", \"answer\": \"a1\"}\n\n{\"question\": \"q2\"}\n{\"question\": \"q3\", \"answer\": \"  \"}\n[1]\n",
    );
    let ds = data::load_dataset(&f, &t, &spec()).unwrap();
    assert_eq!(ds.report.examples, 1);
    assert_eq!(ds.report.rows, 4);
    let sk = &ds.report.skipped;
    assert_eq!(sk.len(), 3);
    assert!(sk[0].location.ends_with("a.jsonl:line 3") && sk[0].reason == "missing field \"answer\"", "{sk:?}");
    assert!(sk[1].location.ends_with("line 4") && sk[1].reason.contains("empty"), "{sk:?}");
    assert!(sk[2].reason.contains("not a json object"));
}

#[test]
fn malformed_files_are_errors_naming_file_and_line() {
    let t = tok();
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "bad.jsonl", "{\"question\": \"q\", \"answer\": \"a\"}\n{\"question\": \"q\" \"answer\"}\n");
    let e = data::load_dataset(&f, &t, &spec()).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl") && e.contains("malformed json at line 2"), "{e}");

    let f = write(dir.path(), "bad.json", "[\n {\"question\": \"q\", \"answer\": \"a\"},\n {\"question\": }\n]");
    let e = data::load_dataset(&f, &t, &spec()).unwrap_err().to_string();
    assert!(e.contains("bad.json") && e.contains("line 3"), "{e}");

    let f = write(dir.path(), "bad.csv", "question,answer\nq1,a1\nq2,a2,extra\n");
    let e = data::load_dataset(&f, &t, &spec()).unwrap_err().to_string();
    assert!(e.contains("bad.csv") && e.contains("malformed csv at line 3") && e.contains("3 fields, expected 2"), "{e}");

    let f = write(dir.path(), "empty.jsonl", "\n  \n");
    let e = data::load_dataset(&f, &t, &spec()).unwrap_err().to_string();
    assert!(e.contains("empty.jsonl") && e.contains("empty"), "{e}");

    let f = write(dir.path(), "none.jsonl", "{\"q\": 1}\n{\"q\": 2}\n");
    let e = data::load_dataset(&f, &t, &spec()).unwrap_err().to_string();
    assert!(e.contains("none.jsonl") && e.contains("no usable rows") && e.contains("missing field"), "{e}");

    let e = data::load_dataset(&dir.path().join("nope.jsonl"), &t, &spec()).unwrap_err().to_string();
    assert!(e.contains("nope.jsonl") && e.contains("cannot read"), "{e}");
}

#[test]
fn missing_tokenizer_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = Tokenizer::from_model_dir(dir.path(), None, None).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("not found"), "{e}");
}

#[test]
fn truncation_is_counted_and_answerless_rows_dropped() {
    let t = tok();
    let dir = tempfile::tempdir().unwrap();
    let long_q = "word ".repeat(40);
    let f = write(
        dir.path(),
        "a.jsonl",
        &format!("{{\"question\": \"hi\", \"answer\": \"{}\"}}\n{{\"question\": \"{long_q}\", \"answer\": \"x\"}}\n", "yes ".repeat(40)),
    );
    let sp = DataSpec { max_seq_len: 16, ..spec() };
    let ds = data::load_dataset(&f, &t, &sp).unwrap();
    assert_eq!(ds.report.truncated, 1);
    assert_eq!(ds.report.examples, 1);
    assert_eq!(ds.sequences[0].ids.len(), 16);
    assert!(ds.report.skipped[0].reason.contains("truncation"));
}

#[test]
fn packing_keeps_examples_apart() {
    let t = tok();
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "a.jsonl", "{\"question\": \"a\", \"answer\": \"b\"}\n{\"question\": \"c\", \"answer\": \"d\"}\n{\"question\": \"e\", \"answer\": \"f\"}\n");
    let plain = data::load_dataset(&f, &t, &spec()).unwrap();
    let n0 = plain.sequences[0].ids.len();
    let sp = DataSpec { packing: true, max_seq_len: (2 * n0 + 1) as u32, ..spec() };
    let ds = data::load_dataset(&f, &t, &sp).unwrap();
    assert_eq!(ds.sequences.len(), 2, "two examples fit in the first sequence");
    let s = &ds.sequences[0];
    let seg = s.segment_ids.as_ref().unwrap();
    let pos = s.position_ids.as_ref().unwrap();
    let n1 = plain.sequences[1].ids.len();
    assert_eq!(s.ids.len(), n0 + n1);
    assert!(seg[..n0].iter().all(|x| *x == 1) && seg[n0..].iter().all(|x| *x == 2));
    assert_eq!(pos[n0], 0);
    assert_eq!(pos[n0 - 1] as usize, n0 - 1);
    assert!(!s.targets[n0], "no loss across the example boundary");
    assert_eq!(s.target_count(), plain.sequences[0].target_count() + plain.sequences[1].target_count());
    // batches: padding gets its own segment, loss positions point at the previous token
    let b = MicroBatch::from_sequences(&[&ds.sequences[0], &ds.sequences[1]], 0);
    assert_eq!(b.seq, n0 + n1);
    assert_eq!(b.target_count(), ds.sequences[0].target_count() + ds.sequences[1].target_count());
    let segs = b.segment_ids.as_ref().unwrap();
    let len1 = ds.sequences[1].ids.len();
    assert_eq!(segs[b.seq + len1], 2, "padding after a one-segment row is segment 2");
    for (p, tgt) in b.loss_positions.iter().zip(&b.targets) {
        assert_eq!(b.input_ids[*p as usize + 1], *tgt);
    }
}

#[test]
fn right_padding_and_label_masks() {
    let a = data::Sequence { ids: vec![5, 6, 7, 8], targets: vec![false, false, true, true], segment_ids: None, position_ids: None };
    let b = data::Sequence { ids: vec![9, 10], targets: vec![false, true], segment_ids: None, position_ids: None };
    let mb = MicroBatch::from_sequences(&[&a, &b], 0);
    assert_eq!(mb.input_ids, vec![5, 6, 7, 8, 9, 10, 0, 0]);
    assert_eq!(mb.loss_positions, vec![1, 2, 4]);
    assert_eq!(mb.targets, vec![7, 8, 10]);
    assert_eq!(mb.tokens, 6);
    assert!(mb.position_ids.is_none());
}

#[test]
fn order_is_seeded_and_wraps() {
    let mut o = DataOrder::new(5, false, 1);
    let got: Vec<usize> = (0..7).map(|i| o.at(i)).collect();
    assert_eq!(got, vec![0, 1, 2, 3, 4, 0, 1]);
    let mut a = DataOrder::new(50, true, 7);
    let mut b = DataOrder::new(50, true, 7);
    let mut c = DataOrder::new(50, true, 8);
    let ea: Vec<usize> = (0..100).map(|i| a.at(i)).collect();
    let eb: Vec<usize> = (0..100).map(|i| b.at(i)).collect();
    let ec: Vec<usize> = (0..100).map(|i| c.at(i)).collect();
    assert_eq!(ea, eb);
    assert_ne!(ea, ec);
    assert_ne!(ea[..50], ea[50..], "each epoch is a new permutation");
    let mut sorted = ea[..50].to_vec();
    sorted.sort();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>());
}

#[test]
fn eval_split_is_seeded() {
    let t = tok();
    let dir = tempfile::tempdir().unwrap();
    let rows: String = (0..20).map(|i| format!("{{\"question\": \"q{i}\", \"answer\": \"a{i}\"}}\n")).collect();
    let f = write(dir.path(), "a.jsonl", &rows);
    let sp = DataSpec { eval_split: 0.2, ..spec() };
    let (tr, ev) = data::load_train_eval(&f, None, &t, &sp, 3).unwrap();
    let ev = ev.unwrap();
    assert_eq!((tr.sequences.len(), ev.sequences.len()), (16, 4));
    let (_, ev2) = data::load_train_eval(&f, None, &t, &sp, 3).unwrap();
    assert_eq!(ev.sequences, ev2.unwrap().sequences);
}

/// Packed sequences (segment ids + per-example positions) score every answer token
/// exactly as unpacked examples do: no attention or prediction crosses examples.
#[test]
fn packed_loss_equals_unpacked_loss() {
    use lorafleet_engine::eval;
    use lorafleet_engine::model::{load_model, LoadOptions};
    let model_dir = fixtures().join("models/tiny-llama");
    let model = load_model(&model_dir, &LoadOptions::default()).unwrap();
    let t = Tokenizer::from_model_dir(&model_dir, Some(0), Some(0)).unwrap();
    let f = fixtures().join("train/tiny-llama/data.jsonl");
    let plain = data::load_dataset(&f, &t, &spec()).unwrap();
    let packed = data::load_dataset(&f, &t, &DataSpec { packing: true, max_seq_len: 160, ..spec() }).unwrap();
    assert!(packed.sequences.len() < plain.sequences.len());
    let dev = candle_core::Device::Cpu;
    let a = eval::evaluate(model.as_ref(), &data::eval_batches(&plain, 1, 0), &dev).unwrap();
    let b = eval::evaluate(model.as_ref(), &data::eval_batches(&packed, 2, 0), &dev).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert!((a.loss - b.loss).abs() < 1e-5, "{} vs {}", a.loss, b.loss);
    // right padding in a batch changes nothing either
    let c = eval::evaluate(model.as_ref(), &data::eval_batches(&plain, 3, 0), &dev).unwrap();
    assert!((a.loss - c.loss).abs() < 1e-5, "{} vs {}", a.loss, c.loss);
}

#[test]
fn plain_text_file_is_cut_into_windows() {
    let t = tok();
    let dir = tempfile::tempdir().unwrap();
    let text = "We ship to over 50 countries. 我们支持支付宝、微信支付和银行卡付款。\n".repeat(20);
    let f = write(dir.path(), "corpus.txt", &text);
    let sp = DataSpec { format: DataFormat::Text, max_seq_len: 32, ..spec() };
    let ds = data::load_dataset(&f, &t, &sp).unwrap();
    let all = t.encode(&text, true).unwrap().len() + 1;
    assert_eq!(ds.sequences.len(), all.div_ceil(32));
    assert!(ds.sequences.iter().all(|s| s.ids.len() <= 32 && !s.targets[0] && s.targets[1..].iter().all(|x| *x)));
    assert_eq!(ds.report.truncated, 0);
    let joined: Vec<u32> = ds.sequences.iter().flat_map(|s| s.ids.clone()).collect();
    assert_eq!(joined.len(), all);
}

/// A model directory with the fixture tokenizer and a chat template (ChatML-like).
fn chat_model_dir(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::copy(fixtures().join("tokenizer/tokenizer.json"), m.join("tokenizer.json")).unwrap();
    let template = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    std::fs::write(m.join("tokenizer_config.json"), serde_json::json!({"eos_token": "<|endoftext|>", "chat_template": template}).to_string()).unwrap();
    m
}

#[test]
fn the_models_chat_template_formats_the_data() {
    use lorafleet_engine::data::{PromptFormat, Turn};
    use lorafleet_shared::spec::ChatTemplateChoice;
    let dir = tempfile::tempdir().unwrap();
    let t = Tokenizer::from_model_dir(&chat_model_dir(dir.path()), None, None).unwrap();
    let sp = DataSpec { chat_template: ChatTemplateChoice::Model, ..spec() };
    // question/answer rows: the rendering up to the generation prompt is the prompt, what
    // the answer's turn adds (its end-of-turn text included) is the target
    let f = write(dir.path(), "a.jsonl", "{\"question\": \"How?\", \"answer\": \"Like this.\"}\n");
    let s = &data::load_dataset(&f, &t, &sp).unwrap().sequences[0];
    let p = t.encode("<|im_start|>user\nHow?<|im_end|>\n<|im_start|>assistant\n", false).unwrap();
    let a = t.encode("Like this.<|im_end|>\n", false).unwrap();
    assert_eq!(s.ids, [p.clone(), a.clone()].concat());
    assert!(s.targets[..p.len()].iter().all(|x| !x) && s.targets[p.len()..].iter().all(|x| *x));
    // the prompt of a question is the generation prompt
    assert_eq!(PromptFormat::of(&sp).encode_question(&t, "How?").unwrap(), p);
    // conversations: every assistant turn is a target, nothing else
    let f = write(dir.path(), "c.jsonl", r#"{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]}
"#);
    let sp = DataSpec { format: DataFormat::Messages, ..sp };
    let s = &data::load_dataset(&f, &t, &sp).unwrap().sequences[0];
    let piece = |x: &str| t.encode(x, false).unwrap();
    let parts = [
        (piece("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\n"), false),
        (piece("a1<|im_end|>\n"), true),
        (piece("<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n"), false),
        (piece("a2<|im_end|>\n"), true),
    ];
    assert_eq!(s.ids, parts.iter().flat_map(|(p, _)| p.clone()).collect::<Vec<_>>());
    assert_eq!(s.targets, parts.iter().flat_map(|(p, t)| vec![*t; p.len()]).collect::<Vec<_>>());
    let turns = [Turn { role: "user".into(), content: "u1".into() }];
    assert_eq!(PromptFormat::ModelChat.encode_chat(&t, &turns).unwrap(), piece("<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\n"));
    // a model without a chat template is refused for the whole data set, naming the setting
    let plain = tok();
    let e = data::load_dataset(&f, &plain, &sp).unwrap_err().to_string();
    assert!(e.contains("data.chat_template is model") && e.contains("no chat template"), "{e}");
}
