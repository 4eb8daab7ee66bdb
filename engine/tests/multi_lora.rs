//! Batched serving (`CausalLm::forward_packed`): several sequences with different
//! adapters (or none) in one packed pass, prompts and decoding steps mixed, give each
//! sequence the logits Hugging Face computes for it alone (base and base + PEFT adapter
//! fixtures), and the logits of a model loaded with that adapter.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lorafleet_engine::model::{load_model, CausalLm, ForwardInput, KvCache, LoadOptions, LoraInit, LoraSettingsRequest, Quant};
use lorafleet_engine::multi_lora::{PackedSeq, ServedAdapter};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

fn expected(model: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(format!("expected/{model}.safetensors")), &Device::Cpu).unwrap()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::U32).unwrap().to_vec1().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// The fixture adapter with B negated and doubled: another valid adapter of the model.
fn other_adapter(model: &str, dir: &Path) {
    let src = fixtures().join(format!("adapters/{model}"));
    std::fs::copy(src.join("adapter_config.json"), dir.join("adapter_config.json")).unwrap();
    let tensors = lorafleet_engine::peft::read_adapter_tensors(&src).unwrap();
    let mut out = BTreeMap::new();
    for (k, (shape, v)) in tensors {
        let v: Vec<f32> = if k.contains("lora_B") { v.iter().map(|x| -2.0 * x).collect() } else { v };
        out.insert(k, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    }
    lorafleet_engine::peft::write_safetensors_f32(&dir.join("adapter_model.safetensors"), &out, HashMap::new()).unwrap();
}

fn with_adapter(dir: &Path, quant: Quant) -> LoadOptions {
    LoadOptions {
        quant,
        lora: Some(LoraSettingsRequest { r: 8, alpha: 16.0, dropout: 0.0, rslora: false, target_modules: None, init: LoraInit::FromAdapter(dir.to_path_buf()) }),
        ..LoadOptions::default()
    }
}

fn full_logits(m: &dyn CausalLm, ids: &[u32]) -> Tensor {
    let input_ids = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    let h = m.hidden_states(&ForwardInput { input_ids, position_ids: None, segment_ids: None }).unwrap();
    m.logits(&h).unwrap().squeeze(0).unwrap()
}

struct Seq {
    ids: Vec<u32>,
    adapter: Option<Arc<ServedAdapter>>,
    /// Logits of every position, as the sequence alone gets them.
    want: Tensor,
    cache: KvCache,
    fed: usize,
}

/// Feed every sequence through packed passes: first a prompt chunk of a different length
/// each, then one token per pass; sequences leave the batch as they run out.
fn run_packed(base: &dyn CausalLm, seqs: &mut [Seq], tol: f32, what: &str) {
    let mut pass = 0;
    loop {
        let live: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].fed < seqs[i].ids.len()).collect();
        if live.is_empty() {
            break;
        }
        let takes: Vec<usize> = live.iter().map(|&i| if pass == 0 { (i + 2).min(seqs[i].ids.len()) } else { 1 }).collect();
        let ends: Vec<usize> = live.iter().zip(&takes).map(|(&i, t)| seqs[i].fed + t).collect();
        let mut packed: Vec<PackedSeq<'_>> = Vec::new();
        let mut refs: Vec<&mut Seq> = seqs.iter_mut().enumerate().filter(|(i, _)| live.contains(i)).map(|(_, s)| s).collect();
        for (s, &end) in refs.iter_mut().zip(&ends) {
            let s: &mut Seq = s;
            packed.push(PackedSeq { tokens: &s.ids[s.fed..end], cache: &mut s.cache, adapter: s.adapter.clone() });
        }
        let logits = base.forward_packed(&mut packed).unwrap();
        drop(packed);
        for (k, (&i, &end)) in live.iter().zip(&ends).enumerate() {
            let d = max_diff(&logits.get(k).unwrap(), &seqs[i].want.get(end - 1).unwrap());
            assert!(d < tol, "{what}: sequence {i} at position {}: max abs diff {d}", end - 1);
            seqs[i].fed = end;
            assert_eq!(seqs[i].cache.seq_len, end);
        }
        pass += 1;
    }
}

fn check_model(model: &str, quant: Quant, tol: f32) {
    let exp = expected(model);
    let mdir = fixtures().join(format!("models/{model}"));
    let adir = fixtures().join(format!("adapters/{model}"));
    let odir = tempfile::tempdir().unwrap();
    other_adapter(model, odir.path());
    let opts = LoadOptions { quant, ..LoadOptions::default() };
    let base = load_model(&mdir, &opts).unwrap();
    let fixture = Arc::new(ServedAdapter::load("fixture", &adir, &base.linear_shapes(), DType::F32, &Device::Cpu).unwrap());
    let other = Arc::new(ServedAdapter::load("other", odir.path(), &base.linear_shapes(), DType::F32, &Device::Cpu).unwrap());
    assert!(fixture.module_count() > 0 && fixture.scaling == 2.0);
    let with_other = load_model(&mdir, &with_adapter(odir.path(), quant)).unwrap();
    let (base_key, adapter_key) = match quant {
        Quant::None => ("logits_base", "logits_adapter"),
        _ => ("", "logits_nf4_adapter"),
    };
    let mut seqs = Vec::new();
    for i in 0..4 {
        let ids = ids(&exp[&format!("input_ids.{i}")]);
        // Hugging Face's logits for the fixture adapter and (full precision) the base;
        // the other adapter against the model loaded with it.
        let (adapter, want) = match i % 3 {
            0 => (Some(fixture.clone()), exp[&format!("{adapter_key}.{i}")].clone()),
            1 if !base_key.is_empty() => (None, exp[&format!("{base_key}.{i}")].clone()),
            1 => (None, full_logits(base.as_ref(), &ids)),
            _ => (Some(other.clone()), full_logits(with_other.as_ref(), &ids)),
        };
        seqs.push(Seq { ids, adapter, want, cache: KvCache::default(), fed: 0 });
    }
    // The same adapter twice in a row, apart, and between others: ranges merge and split.
    let again = Seq { ids: seqs[0].ids.clone(), adapter: seqs[0].adapter.clone(), want: seqs[0].want.clone(), cache: KvCache::default(), fed: 0 };
    seqs.insert(1, again);
    run_packed(base.as_ref(), &mut seqs, tol, model);
}

#[test]
fn packed_passes_match_each_sequence_alone() {
    check_model("tiny-llama", Quant::None, 1e-4);
    check_model("tiny-falcon", Quant::None, 1e-4);
}

#[test]
fn packed_passes_match_on_an_nf4_base() {
    check_model("tiny-falcon", Quant::Nf4 { double_quant: true }, 1e-4);
}

#[test]
fn adapters_that_do_not_fit_the_base_are_refused() {
    let base = load_model(&fixtures().join("models/tiny-llama"), &LoadOptions::default()).unwrap();
    // The falcon adapter names modules the llama model does not have.
    let err = ServedAdapter::load("x", &fixtures().join("adapters/tiny-falcon"), &base.linear_shapes(), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("does not have") || err.contains("shape"), "{err}");
    let err = ServedAdapter::load("x", Path::new("/nonexistent/adapter"), &base.linear_shapes(), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("adapter_config.json"), "{err}");
}
