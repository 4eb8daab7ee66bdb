//! Prometheus metrics of `lorafleet serve`, at `/metrics`. Tokens per second is
//! `rate(lorafleet_serve_generated_tokens_total[1m])`.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct ServeMetrics {
    registry: Registry,
    /// Requests by endpoint and HTTP status.
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    /// Arrival to the first sampled token.
    pub time_to_first_token: Histogram,
    /// Arrival to the last byte of a response.
    pub request_seconds: Histogram,
    /// Sequences in one packed pass.
    pub batch_sequences: Histogram,
    pub pass_seconds: Histogram,
    /// Sequences being generated now.
    pub live: IntGauge,
    /// Requests waiting for a place in the batch.
    pub waiting: IntGauge,
    /// Requests dropped because their client went away.
    pub cancelled: IntCounter,
    /// Adapter lookups by `result`: `hit` (in memory), `miss` (loaded), `evicted`.
    pub adapters: IntCounterVec,
    pub adapters_loaded: IntGauge,
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric")
}

impl ServeMetrics {
    pub fn new() -> Self {
        let latency = vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
        let m = Self {
            registry: Registry::new(),
            requests: IntCounterVec::new(Opts::new("lorafleet_serve_requests_total", "requests by endpoint and status"), &["endpoint", "status"]).expect("valid metric"),
            prompt_tokens: IntCounter::new("lorafleet_serve_prompt_tokens_total", "prompt tokens of accepted requests").expect("valid metric"),
            generated_tokens: IntCounter::new("lorafleet_serve_generated_tokens_total", "tokens generated").expect("valid metric"),
            time_to_first_token: histogram("lorafleet_serve_time_to_first_token_seconds", "request arrival to its first token", latency.clone()),
            request_seconds: histogram("lorafleet_serve_request_seconds", "request arrival to the end of its response", latency),
            batch_sequences: histogram("lorafleet_serve_batch_sequences", "sequences in one packed pass", vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            pass_seconds: histogram("lorafleet_serve_pass_seconds", "time of one packed pass", vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
            live: IntGauge::new("lorafleet_serve_live_sequences", "sequences being generated").expect("valid metric"),
            waiting: IntGauge::new("lorafleet_serve_waiting_requests", "requests waiting for a place in the batch").expect("valid metric"),
            cancelled: IntCounter::new("lorafleet_serve_cancelled_total", "generations dropped because the client went away").expect("valid metric"),
            adapters: IntCounterVec::new(Opts::new("lorafleet_serve_adapter_cache_total", "adapter lookups by result (hit, miss, evicted)"), &["result"]).expect("valid metric"),
            adapters_loaded: IntGauge::new("lorafleet_serve_adapters_loaded", "adapters held in memory").expect("valid metric"),
        };
        for r in ["hit", "miss", "evicted"] {
            m.adapters.with_label_values(&[r]).reset();
        }
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.generated_tokens.clone()),
            Box::new(m.time_to_first_token.clone()),
            Box::new(m.request_seconds.clone()),
            Box::new(m.batch_sequences.clone()),
            Box::new(m.pass_seconds.clone()),
            Box::new(m.live.clone()),
            Box::new(m.waiting.clone()),
            Box::new(m.cancelled.clone()),
            Box::new(m.adapters.clone()),
            Box::new(m.adapters_loaded.clone()),
        ] {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for ServeMetrics {
    fn default() -> Self {
        Self::new()
    }
}
