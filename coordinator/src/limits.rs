//! Limits on what one caller may ask of the coordinator, each refused with a clear
//! status naming the limit:
//!
//! - request size: every gRPC message at most `max_request_bytes` (tonic answers
//!   `OUT_OF_RANGE` naming both sizes); a dataset upload at most `max_upload_bytes`
//!   (`RESOURCE_EXHAUSTED`). Job specs are bounded by the spec's own limits
//!   (`lorafleet_shared::spec::MAX_SPEC_BYTES` and the string lengths).
//! - a rate limit per token on the JobService and AdminService: a token bucket of
//!   `rate_burst` calls refilled at `rate_per_sec` (`RESOURCE_EXHAUSTED` with the time to
//!   wait). Worker tokens are not rate limited: a pool of workers shares one token and
//!   their calls are paced by the coordinator (heartbeat interval, long polls).
//! - at most `max_streams_per_caller` open streams per token (WatchJob, UploadDataset,
//!   DownloadAdapter), counted until each stream ends.
//!
//! The per-token limits need tokens: without `--auth` there are none (a coordinator
//! without it trusts its network).

use crate::auth::Identity;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tonic::Status;

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_upload_bytes: u64,
    /// Calls per second per token (0: no rate limit).
    pub rate_per_sec: f64,
    pub rate_burst: f64,
    /// Open streams per token (0: unlimited).
    pub max_streams_per_caller: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 4 * 1024 * 1024,
            max_upload_bytes: 16 * 1024 * 1024 * 1024,
            rate_per_sec: 50.0,
            rate_burst: 200.0,
            max_streams_per_caller: 32,
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The counters behind the per-token limits.
#[derive(Debug, Default)]
pub struct Guards {
    pub limits: Limits,
    buckets: Mutex<HashMap<String, Bucket>>,
    streams: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open stream of a caller; the slot frees when this drops.
#[derive(Debug)]
pub struct StreamSlot {
    id: String,
    streams: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut m = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.id);
            }
        }
    }
}

impl Guards {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self { limits, ..Default::default() })
    }

    /// Take one call from `who`'s bucket.
    pub fn rate(&self, who: &Identity) -> Result<(), Status> {
        let (rate, burst) = (self.limits.rate_per_sec, self.limits.rate_burst.max(1.0));
        if rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut m = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = m.entry(who.id.clone()).or_insert(Bucket { tokens: burst, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait_ms = ((1.0 - b.tokens) / rate * 1000.0).ceil() as u64;
        Err(Status::resource_exhausted(format!(
            "rate limit: token {:?} may make {rate} calls per second (bursts of {burst}); retry in {wait_ms} ms",
            who.id
        )))
    }

    /// Open a stream for `who` (None: no token, no limit).
    pub fn stream(&self, who: Option<&Identity>) -> Result<Option<StreamSlot>, Status> {
        let (Some(who), max) = (who, self.limits.max_streams_per_caller) else { return Ok(None) };
        if max == 0 {
            return Ok(None);
        }
        let mut m = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(who.id.clone()).or_default();
        if *n >= max {
            return Err(Status::resource_exhausted(format!(
                "token {:?} has {max} streams open (watch, upload, download), the most one caller may: close one first",
                who.id
            )));
        }
        *n += 1;
        Ok(Some(StreamSlot { id: who.id.clone(), streams: self.streams.clone() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn who(id: &str) -> Identity {
        Identity { id: id.into(), role: Role::User, tenant: Some("t".into()), labels: Default::default() }
    }

    #[test]
    fn buckets_refill_and_streams_free_on_drop() {
        let g = Guards::new(Limits { rate_per_sec: 1000.0, rate_burst: 3.0, max_streams_per_caller: 2, ..Limits::default() });
        let a = who("a");
        for _ in 0..3 {
            g.rate(&a).unwrap();
        }
        let e = g.rate(&a).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("\"a\"") && e.message().contains("retry in"), "{}", e.message());
        g.rate(&who("b")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        g.rate(&a).unwrap();
        let s1 = g.stream(Some(&a)).unwrap();
        let _s2 = g.stream(Some(&a)).unwrap();
        assert_eq!(g.stream(Some(&a)).unwrap_err().code(), tonic::Code::ResourceExhausted);
        drop(s1);
        assert!(g.stream(Some(&a)).unwrap().is_some());
        assert!(g.stream(None).unwrap().is_none());
    }
}
