//! The model's `tokenizer.json` and the prompt/answer tokenization protocol.
//!
//! Protocol (matches the HF fixtures): the prompt is encoded with special tokens
//! (`add_special_tokens = true`), the answer as `" " + answer` without them, then the eos
//! id is appended. Prompt and answer are never tokenized as one string.

use std::path::{Path, PathBuf};

use crate::{EngineError, Result};

/// A loaded HF tokenizer plus the ids the training side needs, and the model's chat
/// template when its directory has one.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: u32,
    pad_id: u32,
    path: PathBuf,
    chat: Option<crate::chat_template::ChatTemplate>,
}

impl Tokenizer {
    /// Load `tokenizer.json` from a model directory. `eos` overrides the eos id
    /// (normally the model config's); without it the tokenizer's `<|endoftext|>`, `</s>`
    /// or `<|eos|>` special token is used.
    pub fn from_model_dir(dir: &Path, eos: Option<u32>, pad: Option<u32>) -> Result<Self> {
        let mut tok = Self::from_file(&dir.join("tokenizer.json"), eos, pad)?;
        tok.chat = crate::chat_template::ChatTemplate::from_model_dir(dir)?;
        Ok(tok)
    }

    pub fn from_file(path: &Path, eos: Option<u32>, pad: Option<u32>) -> Result<Self> {
        if !path.is_file() {
            return Err(EngineError::file(path, "tokenizer.json not found (the model directory must hold a Hugging Face tokenizer.json)"));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| EngineError::file(path, format!("cannot read tokenizer: {e}")))?;
        let eos_id = match eos {
            Some(e) => e,
            None => ["<|endoftext|>", "</s>", "<|eos|>", "<|end_of_text|>", "<eos>"]
                .iter()
                .find_map(|t| inner.token_to_id(t))
                .ok_or_else(|| EngineError::file(path, "no eos token: the model config has no eos_token_id and the tokenizer has no <|endoftext|> or </s>"))?,
        };
        let pad_id = pad.unwrap_or(eos_id);
        Ok(Self { inner, eos_id, pad_id, path: path.to_path_buf(), chat: None })
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model's own chat template (tokenizer_config.json / chat_template.jinja).
    pub fn chat_template(&self) -> Option<&crate::chat_template::ChatTemplate> {
        self.chat.as_ref()
    }

    /// Encode with or without the tokenizer's special tokens (post-processor).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::Data(format!("tokenizer {}: cannot encode text: {e}", self.path.display())))?;
        Ok(enc.get_ids().to_vec())
    }

    /// A formatted prompt: special tokens added.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        self.encode(prompt, true)
    }

    /// An answer: `" " + answer` without special tokens, then eos.
    pub fn encode_answer(&self, answer: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(&format!(" {answer}"), false)?;
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// Decode ids (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| EngineError::Data(format!("tokenizer {}: cannot decode: {e}", self.path.display())))
    }

    /// A decoder that turns a growing token list into text pieces without splitting
    /// multi-byte characters.
    pub fn stream(&self) -> StreamDecoder<'_> {
        StreamDecoder { tok: self, ids: Vec::new(), emitted: 0 }
    }
}

/// Incremental decoding: each `push` returns the new complete text (if any). A piece
/// that ends in an incomplete UTF-8 sequence (decoded as U+FFFD) is held back until the
/// following tokens complete it.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// Bytes of the decoded text already returned.
    emitted: usize,
}

impl StreamDecoder<'_> {
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        if text.len() <= self.emitted || !text.is_char_boundary(self.emitted) {
            // Decoding is not always prefix-stable (e.g. a cleaned-up space); resync.
            if text.len() > self.emitted {
                self.emitted = text.len();
            }
            return Ok(None);
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(piece))
    }

    /// Whatever is left (an incomplete sequence at the very end is returned as is).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = self.tok.decode(&self.ids)?;
        if text.len() > self.emitted && text.is_char_boundary(self.emitted) {
            let piece = text[self.emitted..].to_string();
            self.emitted = text.len();
            return Ok(Some(piece));
        }
        Ok(None)
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
