//! Text generation with the KV cache: greedy or seeded sampling (temperature, top-k,
//! top-p, applied in that order as Hugging Face's logits warpers do), stopping at an
//! eos id or after `max_new_tokens`. Tokens are streamed to a callback; text is
//! decoded incrementally without splitting multi-byte characters.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::{CausalLm, KvCache};
use crate::tokenizer::Tokenizer;
use crate::{EngineError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus sampling mass (1.0 disables).
    pub top_p: f64,
    /// Keep the k most likely tokens (0 disables).
    pub top_k: usize,
    pub seed: u64,
    /// Stop tokens (the model's eos ids when empty).
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_new_tokens: 64, temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0, stop_ids: vec![] }
    }
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// New token ids (the stop token excluded).
    pub ids: Vec<u32>,
    pub text: String,
    /// True when a stop token ended generation.
    pub stopped: bool,
}

/// Pick the next token from f32 logits.
pub fn sample_next(logits: &[f32], opts: &GenerateOptions, rng: &mut ChaCha8Rng) -> u32 {
    if opts.temperature <= 0.0 {
        return argmax(logits);
    }
    let t = opts.temperature as f32;
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, l)| (i as u32, l / t)).collect();
    // sort by logit, descending (stable: lower id first among equals)
    cand.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
    if opts.top_k > 0 && opts.top_k < cand.len() {
        cand.truncate(opts.top_k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|(_, l)| ((l - max) as f64).exp()).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if opts.top_p < 1.0 {
        // keep the smallest prefix whose mass reaches top_p (at least one token)
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= opts.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        cand.truncate(keep);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    let u: f64 = rng.gen();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return cand[i].0;
        }
    }
    cand[cand.len() - 1].0
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Generate token ids after `prompt`, calling `on_token` for each new one (the stop
/// token is not reported).
pub fn generate_ids(
    model: &dyn CausalLm,
    prompt: &[u32],
    opts: &GenerateOptions,
    device: &Device,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, bool)> {
    if prompt.is_empty() {
        return Err(EngineError::Config("generate: the prompt has no tokens".into()));
    }
    model.set_training(false);
    let info = model.info();
    let stop: Vec<u32> = if opts.stop_ids.is_empty() { info.eos_token_ids.clone() } else { opts.stop_ids.clone() };
    let mut cache = KvCache { layers: vec![None; info.num_layers], seq_len: 0 };
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut out = Vec::new();
    let mut input = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), device)?;
    for _ in 0..opts.max_new_tokens {
        let logits = model.forward_cached(&input, &mut cache)?;
        let logits: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let next = sample_next(&logits, opts, &mut rng);
        if stop.contains(&next) {
            return Ok((out, true));
        }
        out.push(next);
        on_token(next)?;
        input = Tensor::from_vec(vec![next], (1, 1), device)?;
    }
    Ok((out, false))
}

/// Generate text, streaming decoded pieces to `on_text`.
pub fn generate(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    device: &Device,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let mut dec = tok.stream();
    let mut text = String::new();
    let (ids, stopped) = generate_ids(model, prompt, opts, device, &mut |id| {
        if let Some(piece) = dec.push(id)? {
            on_text(&piece);
            text.push_str(&piece);
        }
        Ok(())
    })?;
    if let Some(piece) = dec.finish()? {
        on_text(&piece);
        text.push_str(&piece);
    }
    Ok(Generation { ids, text, stopped })
}

/// Greedy answer text to a question formatted with the template (used for samples
/// during training and for the memorisation check).
pub fn answer(model: &dyn CausalLm, tok: &Tokenizer, format: &crate::data::PromptFormat, question: &str, max_new_tokens: usize, device: &Device) -> Result<String> {
    let prompt = format.encode_question(tok, question)?;
    let opts = GenerateOptions { max_new_tokens, ..Default::default() };
    let g = generate(model, tok, &prompt, &opts, device, &mut |_| {})?;
    Ok(g.text.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ForwardInput, ModelInfo};
    use candle_core::{Device, Var};
    use std::collections::BTreeMap;

    /// A bigram "model": after token t the most likely next token is t + 1; token 7 is eos.
    struct Bigram {
        info: ModelInfo,
        params: BTreeMap<String, Var>,
        flat: bool,
    }

    fn bigram(flat: bool) -> Bigram {
        Bigram {
            info: ModelInfo {
                model_type: "mock".into(),
                vocab_size: 8,
                hidden_size: 8,
                num_layers: 1,
                eos_token_ids: vec![7],
                pad_token_id: None,
                max_position_embeddings: 64,
                lora: None,
            },
            params: BTreeMap::new(),
            flat,
        }
    }

    impl CausalLm for Bigram {
        fn info(&self) -> &ModelInfo {
            &self.info
        }
        fn hidden_states(&self, _input: &ForwardInput) -> Result<Tensor> {
            Err(EngineError::Config("mock".into()))
        }
        fn logits(&self, _hidden: &Tensor) -> Result<Tensor> {
            Err(EngineError::Config("mock".into()))
        }
        fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
            let ids: Vec<u32> = input_ids.flatten_all()?.to_vec1()?;
            cache.seq_len += ids.len();
            let last = *ids.last().unwrap() as usize;
            let logits: Vec<f32> = (0..8).map(|j| if j == (last + 1) % 8 { 3.0 } else if self.flat { 2.5 } else { 0.0 }).collect();
            Ok(Tensor::from_vec(logits, (1, 8), &Device::Cpu)?)
        }
        fn backward(&self, _loss: &Tensor) -> Result<BTreeMap<String, Tensor>> {
            Err(EngineError::Config("mock".into()))
        }
        fn lora_params(&self) -> &BTreeMap<String, Var> {
            &self.params
        }
        fn set_training(&self, _training: bool) {}
        fn set_dropout_seed(&self, _seed: u64) {}
        fn set_gradient_checkpointing(&self, _on: bool) {}
    }

    #[test]
    fn greedy_is_deterministic_and_stops_at_eos() {
        let m = bigram(false);
        let opts = GenerateOptions { max_new_tokens: 20, ..Default::default() };
        let mut streamed = vec![];
        let (ids, stopped) = generate_ids(&m, &[0], &opts, &Device::Cpu, &mut |t| {
            streamed.push(t);
            Ok(())
        })
        .unwrap();
        assert_eq!(ids, vec![1, 2, 3, 4, 5, 6]);
        assert!(stopped);
        assert_eq!(streamed, ids);
        let opts = GenerateOptions { max_new_tokens: 3, ..Default::default() };
        let (ids, stopped) = generate_ids(&m, &[2], &opts, &Device::Cpu, &mut |_| Ok(())).unwrap();
        assert_eq!((ids, stopped), (vec![3, 4, 5], false));
    }

    #[test]
    fn sampling_is_seeded() {
        let m = bigram(true);
        let run = |seed| {
            let opts = GenerateOptions { max_new_tokens: 30, temperature: 1.0, seed, stop_ids: vec![100], ..Default::default() };
            generate_ids(&m, &[0], &opts, &Device::Cpu, &mut |_| Ok(())).unwrap().0
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        let greedy: Vec<u32> = (1..=30).map(|i| i % 8).collect();
        assert_ne!(run(1), greedy, "a flat distribution must not sample like greedy");
    }

    #[test]
    fn top_k_and_top_p_filter() {
        let logits = [1.0f32, 3.0, 2.0, 0.5];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let k1 = GenerateOptions { temperature: 1.0, top_k: 1, ..Default::default() };
        let p_small = GenerateOptions { temperature: 1.0, top_p: 0.01, ..Default::default() };
        let k2 = GenerateOptions { temperature: 1.0, top_k: 2, ..Default::default() };
        for _ in 0..50 {
            assert_eq!(sample_next(&logits, &k1, &mut rng), 1);
            assert_eq!(sample_next(&logits, &p_small, &mut rng), 1);
            assert!(matches!(sample_next(&logits, &k2, &mut rng), 1 | 2));
        }
        let greedy = GenerateOptions::default();
        assert_eq!(sample_next(&logits, &greedy, &mut rng), 1);
    }

    #[test]
    fn stream_decoding_keeps_chinese_whole() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf/tokenizer/tokenizer.json");
        let tok = Tokenizer::from_file(&path, None, None).unwrap();
        let text = " 我们支持支付宝、微信支付和银行卡付款。ok";
        let ids = tok.encode(text, false).unwrap();
        let mut dec = tok.stream();
        let mut out = String::new();
        for id in ids {
            if let Some(p) = dec.push(id).unwrap() {
                assert!(!p.contains('\u{FFFD}'), "broken piece {p:?}");
                out.push_str(&p);
            }
        }
        if let Some(p) = dec.finish().unwrap() {
            out.push_str(&p);
        }
        assert_eq!(out.trim(), text.trim());
    }
}
