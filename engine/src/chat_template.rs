//! A model's own chat template (the Jinja template Hugging Face tokenizers carry),
//! rendered as transformers' `apply_chat_template` renders it: Jinja with `trim_blocks`
//! and `lstrip_blocks`, the variables `messages`, `add_generation_prompt`, `bos_token`
//! and `eos_token`, the function `raise_exception(message)`, Python string methods
//! (`.strip()`, `.startswith()`, ...), and `tojson` as Python's `json.dumps` writes it.
//! Golden renderings by transformers: `tests/fixtures/chat_templates/`.
//!
//! Found in the model directory as `chat_template.jinja` (newer transformers) or as
//! `chat_template` in `tokenizer_config.json` (a string, or a list of named templates of
//! which `default` is used).

use std::path::{Path, PathBuf};

use minijinja::value::Value;
use minijinja::{Environment, Error as JinjaError, ErrorKind};

use crate::data::Turn;
use crate::{EngineError, Result};

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The file the template came from (for errors).
    source: PathBuf,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source).finish()
    }
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_string(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The model's chat template, `None` when it has none.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| EngineError::file(&cfg_path, format!("not valid JSON: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(e) => return Err(EngineError::file(&cfg_path, format!("cannot read: {e}"))),
        };
        let jinja = dir.join("chat_template.jinja");
        let (source, template) = if jinja.is_file() {
            let t = std::fs::read_to_string(&jinja).map_err(|e| EngineError::file(&jinja, format!("cannot read: {e}")))?;
            (jinja, t)
        } else {
            match cfg.get("chat_template") {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(serde_json::Value::String(s)) => (cfg_path.clone(), s.clone()),
                Some(serde_json::Value::Array(list)) => {
                    let named = |n: &str| list.iter().find(|t| t.get("name").and_then(|v| v.as_str()) == Some(n));
                    let t = named("default").or(list.first()).and_then(|t| t.get("template")).and_then(|t| t.as_str());
                    match t {
                        Some(t) => (cfg_path.clone(), t.to_string()),
                        None => return Err(EngineError::file(&cfg_path, "chat_template: a list without a template named \"default\"")),
                    }
                }
                Some(_) => return Err(EngineError::file(&cfg_path, "chat_template must be a string or a list of {name, template}")),
            }
        };
        Self::new(&template, &token_string(cfg.get("bos_token")), &token_string(cfg.get("eos_token")), &source).map(Some)
    }

    /// Compile `template` (from `source`, named in errors).
    pub fn new(template: &str, bos_token: &str, eos_token: &str, source: &Path) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(|e| EngineError::file(source, format!("chat template: {e}")))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, JinjaError> { Err(JinjaError::new(ErrorKind::InvalidOperation, msg)) });
        env.add_filter("tojson", python_json);
        env.add_template_owned("chat", template.to_string()).map_err(|e| EngineError::file(source, format!("chat template: {e}")))?;
        Ok(Self { env, bos_token: bos_token.into(), eos_token: eos_token.into(), source: source.to_path_buf() })
    }

    /// The conversation as text; with `add_generation_prompt`, followed by what opens
    /// the assistant's turn.
    pub fn render(&self, messages: &[Turn], add_generation_prompt: bool) -> Result<String> {
        let msgs: Vec<Value> = messages.iter().map(|m| Value::from_pairs([("role", Value::from(m.role.as_str())), ("content", Value::from(m.content.as_str()))])).collect();
        let tmpl = self.env.get_template("chat").map_err(|e| EngineError::file(&self.source, format!("chat template: {e}")))?;
        let ctx = minijinja::context! {
            messages => Value::from(msgs),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        tmpl.render(ctx).map_err(|e| {
            let msg = match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid operation").to_string(),
                _ => e.to_string(),
            };
            EngineError::Data(format!("the chat template of {} refused the conversation: {msg}", self.source.display()))
        })
    }
}

/// `tojson` as transformers defines it: Python's `json.dumps(x, ensure_ascii=False)`,
/// i.e. `", "` and `": "` separators, non-ASCII kept, no HTML escaping; `indent` and
/// `sort_keys` as in Python.
fn python_json(v: Value, indent: Option<usize>, kwargs: minijinja::value::Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let _ = kwargs.get::<Option<bool>>("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&v, indent, 0, sort_keys, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// Write a template value as Python's `json.dumps` does (maps keep their order unless
/// `sort_keys`).
fn write_json(v: &Value, indent: Option<usize>, depth: usize, sort_keys: bool, out: &mut String) -> std::result::Result<(), JinjaError> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    let quote = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&v.to_string()),
        ValueKind::String => out.push_str(&quote(v.as_str().unwrap_or_default())),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(x, indent, depth + 1, sort_keys, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&quote(&k.to_string()));
                out.push_str(": ");
                write_json(&v.get_item(k)?, indent, depth + 1, sort_keys, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => return Err(JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: cannot write a {} as JSON", v.kind()))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Case {
        template: String,
        messages: Vec<Turn>,
        add_generation_prompt: bool,
        text: Option<String>,
        error: Option<String>,
    }

    #[derive(serde::Deserialize)]
    struct Golden {
        bos_token: String,
        eos_token: String,
        templates: std::collections::BTreeMap<String, String>,
        cases: Vec<Case>,
    }

    fn fixture() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/chat_templates/expected.json")
    }

    #[test]
    fn renders_as_transformers_does() {
        let g: Golden = serde_json::from_str(&std::fs::read_to_string(fixture()).unwrap()).unwrap();
        assert!(g.cases.len() >= 32);
        for c in &g.cases {
            let t = ChatTemplate::new(&g.templates[&c.template], &g.bos_token, &g.eos_token, Path::new(&c.template)).unwrap();
            let got = t.render(&c.messages, c.add_generation_prompt);
            match (&c.text, &c.error) {
                (Some(want), _) => assert_eq!(got.as_deref().unwrap_or_else(|e| panic!("{}: {e}", c.template)), want, "{} {:?}", c.template, c.messages),
                (None, Some(msg)) => {
                    let e = got.expect_err("the template raises").to_string();
                    assert!(e.contains(msg), "{e}");
                }
                _ => panic!("case without text or error"),
            }
        }
    }

    #[test]
    fn tojson_is_pythons() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}", "", "", Path::new("t")).unwrap();
        let mut env_out = t.env.render_str("{{ {'b': [1, 'é<', none, true, 2.5], 'a': {}} | tojson }}", ()).unwrap();
        assert_eq!(env_out, r#"{"b": [1, "é<", null, true, 2.5], "a": {}}"#);
        env_out = t.env.render_str("{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}", ()).unwrap();
        assert_eq!(env_out, r#"{"a": 2, "b": 1}"#);
        env_out = t.env.render_str("{{ [1, {'k': 2}] | tojson(indent=2) }}", ()).unwrap();
        assert_eq!(env_out, "[\n  1,\n  {\n    \"k\": 2\n  }\n]");
    }

    #[test]
    fn model_directories() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::from_model_dir(dir.path()).unwrap().is_none());
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"eos_token": {"content": "</s>"}, "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"}]}"#).unwrap();
        let t = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
        assert_eq!(t.render(&[Turn { role: "user".into(), content: "q".into() }], true).unwrap(), "q</s>");
        std::fs::write(dir.path().join("chat_template.jinja"), "{{ bos_token }}J").unwrap();
        assert_eq!(ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap().render(&[], false).unwrap(), "J");
        std::fs::write(dir.path().join("chat_template.jinja"), "{% for %}").unwrap();
        let e = ChatTemplate::from_model_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("chat_template.jinja") && e.contains("chat template"), "{e}");
    }
}
