//! The OpenAI wire format: request bodies (parsed by hand so that every mistake gets an
//! OpenAI-style error naming the field), response bodies and stream chunks.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: Some(param.to_string()), code: None }
    }

    pub fn body(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: None, code: None }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn context_length(limit: usize, prompt: usize, completion: usize, param: &str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({prompt} in the prompt, {completion} for the completion). Please reduce the prompt or the completion length.",
                prompt + completion
            ),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: Some("context_length_exceeded"),
        }
    }

    pub fn unauthorized() -> Self {
        Self { status: StatusCode::UNAUTHORIZED, message: "Incorrect API key provided.".into(), kind: "invalid_request_error", param: None, code: Some("invalid_api_key") }
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self { status: StatusCode::TOO_MANY_REQUESTS, message: message.into(), kind: "server_error", param: None, code: Some("overloaded") }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), kind: "server_error", param: None, code: None }
    }

    pub fn to_json(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status, &self.to_json())
    }
}

pub fn json_response(status: StatusCode, v: &Value) -> Response {
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// Sampling and stopping, common to both endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// `None`: up to the model's context.
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// A chat message's text (a string, or the parts array whose text parts are joined).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// `/v1/completions`: raw text.
    Prompt(String),
    /// `/v1/chat/completions`.
    Chat(Vec<Message>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    pub model: String,
    pub input: Input,
    pub sampling: Sampling,
}

/// Largest number of stop sequences (OpenAI's limit).
pub const MAX_STOP: usize = 4;

fn field<'a>(obj: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn number(obj: &serde_json::Map<String, Value>, name: &str, default: f64, range: std::ops::RangeInclusive<f64>) -> Result<f64, ApiError> {
    match field(obj, name) {
        None => Ok(default),
        Some(v) => {
            let x = v.as_f64().ok_or_else(|| ApiError::invalid(name, format!("'{name}' must be a number, got {v}")))?;
            if !range.contains(&x) {
                return Err(ApiError::invalid(name, format!("'{name}' must be between {} and {}, got {x}", range.start(), range.end())));
            }
            Ok(x)
        }
    }
}

fn count(obj: &serde_json::Map<String, Value>, name: &str) -> Result<Option<usize>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Ok(Some(n as usize)),
            _ => Err(ApiError::invalid(name, format!("'{name}' must be an integer >= 1, got {v}"))),
        },
    }
}

fn sampling(obj: &serde_json::Map<String, Value>, chat: bool) -> Result<Sampling, ApiError> {
    let max_tokens = match (count(obj, "max_completion_tokens")?, count(obj, "max_tokens")?) {
        (Some(a), _) if chat => Some(a),
        (_, b) => b.or(if chat { None } else { Some(16) }),
    };
    let stop = match field(obj, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            let v: Option<Vec<String>> = a.iter().map(|x| x.as_str().map(str::to_string)).collect();
            v.ok_or_else(|| ApiError::invalid("stop", "'stop' must be a string or an array of strings"))?
        }
        Some(v) => return Err(ApiError::invalid("stop", format!("'stop' must be a string or an array of strings, got {v}"))),
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid("stop", format!("'stop' takes at most {MAX_STOP} sequences, got {}", stop.len())));
    }
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid("stop", "'stop' sequences must not be empty"));
    }
    if let Some(n) = field(obj, "n") {
        if n.as_u64() != Some(1) {
            return Err(ApiError::invalid("n", format!("only n = 1 is supported, got {n}")));
        }
    }
    for unsupported in ["logprobs", "top_logprobs", "echo", "best_of", "suffix", "tools", "functions", "logit_bias"] {
        if let Some(v) = field(obj, unsupported) {
            if v != &Value::Bool(false) {
                return Err(ApiError::invalid(unsupported, format!("'{unsupported}' is not supported by this server")));
            }
        }
    }
    let seed = match field(obj, "seed") {
        None => None,
        Some(v) => Some(v.as_i64().ok_or_else(|| ApiError::invalid("seed", format!("'seed' must be an integer, got {v}")))? as u64),
    };
    let stream = match field(obj, "stream") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| ApiError::invalid("stream", format!("'stream' must be a boolean, got {v}")))?,
    };
    let include_usage = field(obj, "stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    let top_p = number(obj, "top_p", 1.0, 0.0..=1.0)?;
    if top_p == 0.0 {
        return Err(ApiError::invalid("top_p", "'top_p' must be greater than 0"));
    }
    Ok(Sampling { max_tokens, temperature: number(obj, "temperature", 1.0, 0.0..=2.0)?, top_p, seed, stop, stream, include_usage })
}

fn object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::body(format!("the request body is not valid JSON: {e}")))?;
    match v {
        Value::Object(o) => Ok(o),
        other => Err(ApiError::body(format!("the request body must be a JSON object, got {}", kind_of(&other)))),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn model(obj: &serde_json::Map<String, Value>) -> Result<String, ApiError> {
    match field(obj, "model") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(v) => Err(ApiError::invalid("model", format!("'model' must be a non-empty string, got {v}"))),
        None => Err(ApiError::invalid("model", "you must provide a model parameter")),
    }
}

/// Parse a `/v1/completions` body.
pub fn parse_completion(body: &[u8]) -> Result<GenRequest, ApiError> {
    let obj = object(body)?;
    let model = model(&obj)?;
    let prompt = match field(&obj, "prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
        Some(Value::Array(_)) => return Err(ApiError::invalid("prompt", "'prompt' must be a string or an array of one string (batches of prompts are not supported)")),
        Some(v) => return Err(ApiError::invalid("prompt", format!("'prompt' must be a string, got {}", kind_of(v)))),
        None => return Err(ApiError::invalid("prompt", "'prompt' is required")),
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "'prompt' must not be empty"));
    }
    Ok(GenRequest { model, input: Input::Prompt(prompt), sampling: sampling(&obj, false)? })
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// Parse a `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8]) -> Result<GenRequest, ApiError> {
    let obj = object(body)?;
    let model = model(&obj)?;
    let Some(Value::Array(msgs)) = field(&obj, "messages") else {
        return Err(ApiError::invalid("messages", "'messages' must be an array of messages"));
    };
    if msgs.is_empty() {
        return Err(ApiError::invalid("messages", "'messages' must not be empty"));
    }
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let param = format!("messages[{i}]");
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(&param, format!("{param}.role must be a string")))?;
        if !matches!(role, "system" | "developer" | "user" | "assistant") {
            return Err(ApiError::invalid(&param, format!("{param}.role must be system, developer, user or assistant, got {role:?}")));
        }
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    let p: Part = serde_json::from_value(p.clone()).map_err(|e| ApiError::invalid(&param, format!("{param}.content: {e}")))?;
                    if p.kind != "text" {
                        return Err(ApiError::invalid(&param, format!("{param}.content: parts of type {:?} are not supported (text only)", p.kind)));
                    }
                    text.push_str(p.text.as_deref().unwrap_or_default());
                }
                text
            }
            _ => return Err(ApiError::invalid(&param, format!("{param}.content must be a string or an array of text parts"))),
        };
        let role = if role == "developer" { "system" } else { role };
        messages.push(Message { role: role.to_string(), content });
    }
    if messages.last().map(|m| m.role.as_str()) != Some("user") {
        return Err(ApiError::invalid("messages", "the last message must be the user's"));
    }
    Ok(GenRequest { model, input: Input::Chat(messages), sampling: sampling(&obj, true)? })
}

/// Why a generation ended, as OpenAI names it.
pub fn finish_reason(stopped: bool) -> &'static str {
    if stopped {
        "stop"
    } else {
        "length"
    }
}

pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_defaults_and_fields() {
        let r = parse_completion(br#"{"model":"m","prompt":"hi","temperature":0,"stop":["\n"],"seed":3}"#).unwrap();
        assert_eq!(r.model, "m");
        assert_eq!(r.input, Input::Prompt("hi".into()));
        assert_eq!(r.sampling, Sampling { max_tokens: Some(16), temperature: 0.0, top_p: 1.0, seed: Some(3), stop: vec!["\n".into()], stream: false, include_usage: false });
    }

    #[test]
    fn chat_parts_and_roles() {
        let r = parse_chat(br#"{"model":"m","messages":[{"role":"developer","content":"be brief"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"max_completion_tokens":5,"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        let Input::Chat(m) = r.input else { panic!() };
        assert_eq!(m, vec![Message { role: "system".into(), content: "be brief".into() }, Message { role: "user".into(), content: "ab".into() }]);
        assert_eq!(r.sampling.max_tokens, Some(5));
        assert!(r.sampling.stream && r.sampling.include_usage);
    }

    #[test]
    fn mistakes_name_their_field() {
        for (body, param) in [
            (&br#"{"prompt":"x"}"#[..], "model"),
            (br#"{"model":"m"}"#, "prompt"),
            (br#"{"model":"m","prompt":5}"#, "prompt"),
            (br#"{"model":"m","prompt":"x","temperature":3}"#, "temperature"),
            (br#"{"model":"m","prompt":"x","top_p":0}"#, "top_p"),
            (br#"{"model":"m","prompt":"x","max_tokens":0}"#, "max_tokens"),
            (br#"{"model":"m","prompt":"x","max_tokens":-2}"#, "max_tokens"),
            (br#"{"model":"m","prompt":"x","n":2}"#, "n"),
            (br#"{"model":"m","prompt":"x","stop":["a","b","c","d","e"]}"#, "stop"),
            (br#"{"model":"m","prompt":"x","logprobs":2}"#, "logprobs"),
            (br#"{"model":"m","prompt":"x","stream":"yes"}"#, "stream"),
        ] {
            let e = parse_completion(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.param.as_deref(), Some(param), "{}", String::from_utf8_lossy(body));
        }
        for (body, param) in [
            (&br#"{"model":"m","messages":[]}"#[..], "messages"),
            (br#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#, "messages[0]"),
            (br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#, "messages[0]"),
            (br#"{"model":"m","messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#, "messages"),
        ] {
            assert_eq!(parse_chat(body).unwrap_err().param.as_deref(), Some(param), "{}", String::from_utf8_lossy(body));
        }
        let e = parse_chat(b"{not json").unwrap_err();
        assert!(e.message.contains("not valid JSON") && e.param.is_none());
        assert!(parse_chat(b"[1]").unwrap_err().message.contains("must be a JSON object"));
    }
}
