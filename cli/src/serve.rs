//! `lorafleet serve`: an OpenAI-compatible HTTP server over one base model and many LoRA
//! adapters (local directories, or finished jobs read from the job store), with
//! continuous batching of concurrent requests (`batcher.rs`) in which every request may
//! use a different adapter.
//!
//! Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
//! (both streaming with server-sent events or not), `GET /health`, `GET /metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use futures::StreamExt;
use lorafleet_engine::data::{PromptFormat, Turn};
use lorafleet_engine::model::{load_model, LoadOptions, Quant};
use lorafleet_engine::tokenizer::Tokenizer;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::local::{resolve_source, QuantArg};

pub mod adapters;
pub mod api;
pub mod batcher;
pub mod metrics;

use adapters::{Registry, RegistryConfig};
use api::{ApiError, Input};
use batcher::{BatchLimits, Batcher, Event, Job};
use metrics::ServeMetrics;

/// Serve a base model and LoRA adapters with the OpenAI API.
///
/// The request's `model` picks what answers: the base model's name (--model-name), a
/// name given with --adapter NAME=DIR, or the id of a finished job whose adapter is read
/// from the job store given with --adapters-from (downloaded once, sha256-verified,
/// cached on disk). Chat messages are formatted as the adapter was trained (its template
/// or the model's chat template, recorded next to its files); for the base model and
/// adapters that record nothing, with --template, else the model's own chat template,
/// else "<human>: {question}\n<assistant>:".
///
/// Examples:
///   lorafleet serve --model models/demo --adapter faq=out/adapter
///   lorafleet serve --model models/demo --adapters-from file:///var/lib/lorafleet/store
///   curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \
///     -d '{"model":"faq","messages":[{"role":"user","content":"What is lorafleet?"}]}'
///   python -c 'from openai import OpenAI; c = OpenAI(base_url="http://localhost:8000/v1", api_key="-"); print(c.models.list())'
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ServeArgs {
    /// Base model: a Hugging Face directory, s3://, hf:// (as for `train`).
    #[arg(long)]
    pub model: PathBuf,
    /// The base model's id in the API (default: the directory's name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// A local PEFT adapter served as NAME (repeatable).
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<String>,
    /// Job store (file://, s3://, az://) whose finished jobs' adapters are served by job id.
    #[arg(long, value_name = "STORAGE_URL", env = "LORAFLEET_STORAGE")]
    pub adapters_from: Option<String>,
    /// Where downloaded adapters are kept (default: the lorafleet cache, `serve/`).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Adapters held in memory at once (least recently used dropped first).
    #[arg(long, default_value_t = 8)]
    pub max_adapters: usize,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Device: `cpu` (or `cuda:N` in a CUDA build). One device per server: serving one
    /// model over several devices is not supported (run one server per device).
    #[arg(long = "devices", alias = "device", default_value = "cpu")]
    pub device: String,
    /// Frozen weight format of the base model.
    #[arg(long, value_enum, default_value = "none")]
    pub quantization: QuantArg,
    /// Prompt template for chat messages to the base model and adapters that record
    /// none (must contain {question}); default: the model's own chat template when it
    /// has one, else "<human>: {question}\n<assistant>:".
    #[arg(long)]
    pub template: Option<String>,
    /// Sequences generated together in one batch.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Prompt tokens fed per pass (longer prompts are fed over several passes).
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Requests waiting for a place in the batch before new ones get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` on /v1 requests.
    #[arg(long, env = "LORAFLEET_SERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

struct App {
    registry: Registry,
    batcher: Batcher,
    tok: Arc<Tokenizer>,
    context: usize,
    metrics: Arc<ServeMetrics>,
    api_key: Option<String>,
    started: u64,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn device(s: &str) -> anyhow::Result<candle_core::Device> {
    if s.contains(',') {
        bail!("--devices {s}: one device per server (serving over several devices is not supported; run one server per device)");
    }
    if s == "cpu" || s == "cpu:0" {
        return Ok(candle_core::Device::Cpu);
    }
    if let Some(n) = s.strip_prefix("cuda:") {
        let n: usize = n.parse().with_context(|| format!("--devices {s}: not cuda:N"))?;
        return candle_core::Device::new_cuda(n).with_context(|| format!("--devices {s}"));
    }
    bail!("--devices {s}: expected cpu or cuda:N")
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    if a.template.as_ref().is_some_and(|t| !t.contains("{question}")) {
        bail!("--template must contain {{question}}");
    }
    if a.max_batch == 0 || a.max_batch_tokens == 0 {
        bail!("--max-batch and --max-batch-tokens must be at least 1");
    }
    let mut local = BTreeMap::new();
    for s in &a.adapters {
        let (name, dir) = adapters::parse_named(s).map_err(anyhow::Error::msg)?;
        let dir = resolve_source("--adapter", &dir)?;
        if local.insert(name.clone(), dir).is_some() {
            bail!("--adapter {name}: given twice");
        }
    }
    let model_dir = resolve_source("--model", &a.model)?;
    let base = a.model_name.clone().unwrap_or_else(|| model_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "base".into()));
    if local.contains_key(&base) {
        bail!("--adapter {base}: the base model is already called {base} (see --model-name)");
    }
    let device = device(&a.device)?;
    let quant = match a.quantization {
        QuantArg::Nf4 => Quant::Nf4 { double_quant: true },
        QuantArg::None => Quant::None,
    };
    let opts = LoadOptions { quant, device: device.clone(), ..LoadOptions::default() };
    let model = load_model(&model_dir, &opts).with_context(|| format!("--model {}", model_dir.display()))?;
    let info = model.info().clone();
    let tok = Arc::new(Tokenizer::from_model_dir(&model_dir, info.eos_token_ids.first().copied(), info.pad_token_id)?);
    let linears = model.linear_shapes();
    // Every local adapter must fit the base model: check them all now, not per request.
    for (name, dir) in &local {
        lorafleet_engine::multi_lora::ServedAdapter::load(name, dir, &linears, opts.compute_dtype, &device).with_context(|| format!("--adapter {name}={}", dir.display()))?;
        if lorafleet_engine::peft::read_prompt_format(dir).with_context(|| format!("--adapter {name}"))? == Some(PromptFormat::ModelChat) && tok.chat_template().is_none() {
            bail!("--adapter {name}: it was trained with the model's chat template, but {} has none", model_dir.display());
        }
    }
    let store = match &a.adapters_from {
        Some(url) => Some(lorafleet_storage::Storage::open(url).map_err(|e| anyhow::anyhow!("--adapters-from {url}: {e}"))?),
        None => None,
    };
    let format = match &a.template {
        Some(t) => PromptFormat::Template(t.clone()),
        None => PromptFormat::default_for(&tok),
    };
    let cache_dir = a.cache_dir.clone().unwrap_or_else(|| crate::local::cache_root().join("serve"));
    let metrics = Arc::new(ServeMetrics::new());
    let registry = Registry::new(
        RegistryConfig { base: base.clone(), format, local, store, cache_dir, linears, dtype: opts.compute_dtype, device, max_loaded: a.max_adapters },
        metrics.clone(),
    );
    let limits = BatchLimits { max_batch: a.max_batch, max_batch_tokens: a.max_batch_tokens, max_queue: a.max_queue };
    let batcher = Batcher::start(model, tok.clone(), limits, metrics.clone())?;
    let app = Arc::new(App { registry, batcher, tok, context: info.max_position_embeddings, metrics, api_key: a.api_key.clone(), started: now_secs() });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("--listen {}", a.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, model = %base, "serving");
        // The line scripts and tests wait for (with the port actually bound).
        println!("lorafleet serve: listening on http://{addr}/v1 (model {base})");
        axum::serve(listener, router(app)).with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        Ok(())
    })
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(|| async { api::json_response(StatusCode::OK, &json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async { ApiError { status: StatusCode::NOT_FOUND, message: "no such endpoint".into(), kind: "invalid_request_error", param: None, code: None } })
        .with_state(app)
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.api_key else { return Ok(()) };
    let given = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // Compare in constant time: the key is a secret.
    let ok = given.is_some_and(|g| g.len() == key.len() && g.bytes().zip(key.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0);
    if ok {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

fn model_card(id: &str, created: u64, base: &str) -> Value {
    json!({"id": id, "object": "model", "created": created, "owned_by": "lorafleet", "root": base})
}

async fn list_models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        return e.into_response();
    }
    let data: Vec<Value> = app.registry.model_ids().iter().map(|id| model_card(id, app.started, app.registry.base())).collect();
    api::json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

async fn get_model(State(app): State<Arc<App>>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        return e.into_response();
    }
    match app.registry.resolve(&id).await {
        Ok(_) => api::json_response(StatusCode::OK, &model_card(&id, app.started, app.registry.base())),
        Err(e) => e.into_response(),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat",
        }
    }
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(app, headers, body, Endpoint::Completions).await
}

async fn chat_completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(app, headers, body, Endpoint::Chat).await
}

async fn handle(app: Arc<App>, headers: HeaderMap, body: Bytes, ep: Endpoint) -> Response {
    let arrived = Instant::now();
    let resp = match start(&app, &headers, &body, ep, arrived).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(endpoint = ep.name(), status = e.status.as_u16(), error = %e.message, "request refused");
            e.into_response()
        }
    };
    app.metrics.requests.with_label_values(&[ep.name(), resp.status().as_str()]).inc();
    resp
}

/// Validate, queue, and answer (a stream or one body).
async fn start(app: &Arc<App>, headers: &HeaderMap, body: &[u8], ep: Endpoint, arrived: Instant) -> Result<Response, ApiError> {
    authorize(app, headers)?;
    let req = match ep {
        Endpoint::Completions => api::parse_completion(body)?,
        Endpoint::Chat => api::parse_chat(body)?,
    };
    let model = app.registry.resolve(&req.model).await?;
    let (prompt, param) = match &req.input {
        Input::Prompt(text) => (app.tok.encode(text, true), "prompt"),
        Input::Chat(msgs) => {
            let turns: Vec<Turn> = msgs.iter().map(|m| Turn { role: m.role.clone(), content: m.content.clone() }).collect();
            (model.format.encode_chat(&app.tok, &turns), "messages")
        }
    };
    let prompt = prompt.map_err(|e| ApiError::invalid(param, format!("the {param} cannot be tokenized: {e}")))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(param, format!("the {param} has no tokens")));
    }
    let room = app.context.saturating_sub(prompt.len());
    let max_tokens = match req.sampling.max_tokens {
        Some(m) if m > room => return Err(ApiError::context_length(app.context, prompt.len(), m, if room == 0 { param } else { "max_tokens" })),
        Some(m) => m,
        None if room == 0 => return Err(ApiError::context_length(app.context, prompt.len(), 1, param)),
        None => room,
    };
    app.metrics.prompt_tokens.inc_by(prompt.len() as u64);
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_tokens = prompt.len();
    let job = Job {
        prompt,
        adapter: model.adapter.clone(),
        max_tokens,
        temperature: req.sampling.temperature,
        top_p: req.sampling.top_p,
        seed: req.sampling.seed.unwrap_or_else(rand::random),
        stop: req.sampling.stop.clone(),
        trim_start: ep == Endpoint::Chat,
        events: tx,
        queued_at: arrived,
    };
    app.batcher.submit(job).map_err(ApiError::overloaded)?;
    let id = format!("{}-{}", if ep == Endpoint::Chat { "chatcmpl" } else { "cmpl" }, uuid::Uuid::new_v4().simple());
    let reply = Reply { id, created: now_secs(), model: req.model.clone(), ep, prompt_tokens, include_usage: req.sampling.include_usage };
    if req.sampling.stream {
        Ok(stream(app.clone(), reply, rx, arrived))
    } else {
        collect(app, reply, rx, arrived).await
    }
}

/// What every response of one request repeats.
struct Reply {
    id: String,
    created: u64,
    model: String,
    ep: Endpoint,
    prompt_tokens: usize,
    include_usage: bool,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.ep, chunk) {
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "system_fingerprint": null, "choices": choices})
    }

    /// One streamed choice: a text delta and/or the finish reason.
    fn chunk(&self, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        let choice = match self.ep {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completions => json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}),
        };
        self.envelope(true, json!([choice]))
    }
}

async fn collect(app: &Arc<App>, reply: Reply, mut rx: mpsc::UnboundedReceiver<Event>, arrived: Instant) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done { stopped, completion_tokens }) => {
                let finish = api::finish_reason(stopped);
                let choice = match reply.ep {
                    Endpoint::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish}),
                    Endpoint::Completions => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
                };
                let mut body = reply.envelope(false, json!([choice]));
                body["usage"] = api::usage(reply.prompt_tokens, completion_tokens);
                app.metrics.request_seconds.observe(arrived.elapsed().as_secs_f64());
                return Ok(api::json_response(StatusCode::OK, &body));
            }
            Some(Event::Failed(msg)) => return Err(ApiError::internal(msg)),
            None => return Err(ApiError::internal("the engine stopped before the answer was complete")),
        }
    }
}

fn stream(app: Arc<App>, reply: Reply, rx: mpsc::UnboundedReceiver<Event>, arrived: Instant) -> Response {
    struct S {
        app: Arc<App>,
        reply: Reply,
        rx: mpsc::UnboundedReceiver<Event>,
        first: bool,
        done: bool,
        arrived: Instant,
    }
    let state = S { app, reply, rx, first: true, done: false, arrived };
    let events = futures::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let mut out: Vec<String> = Vec::new();
        match s.rx.recv().await {
            Some(Event::Text(t)) => {
                out.push(s.reply.chunk(Some(&t), s.first, None).to_string());
                s.first = false;
            }
            Some(Event::Done { stopped, completion_tokens }) => {
                let first = s.first;
                out.push(s.reply.chunk(first.then_some(""), first, Some(api::finish_reason(stopped))).to_string());
                if s.reply.include_usage {
                    let mut u = s.reply.envelope(true, json!([]));
                    u["usage"] = api::usage(s.reply.prompt_tokens, completion_tokens);
                    out.push(u.to_string());
                }
                out.push("[DONE]".into());
                s.app.metrics.request_seconds.observe(s.arrived.elapsed().as_secs_f64());
                s.done = true;
            }
            Some(Event::Failed(msg)) => {
                out.push(ApiError::internal(msg).to_json().to_string());
                s.done = true;
            }
            None => {
                out.push(ApiError::internal("the engine stopped before the answer was complete").to_json().to_string());
                s.done = true;
            }
        }
        let items: Vec<Result<SseEvent, std::convert::Infallible>> = out.into_iter().map(|d| Ok(SseEvent::default().data(d))).collect();
        Some((futures::stream::iter(items), s))
    })
    .flatten();
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
