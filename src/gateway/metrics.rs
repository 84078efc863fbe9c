//! Prometheus text-format metrics, kept with atomics and one small map.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::storage::RequestStats;

/// Upper bounds of the bucket-latency histogram, in seconds.
const BUCKETS: [f64; 11] = [
    0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    bytes_sent: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    auth_failures: AtomicU64,
    auth_busy: AtomicU64,
    unvouched: AtomicU64,
    connections_refused: AtomicU64,
    upstream_count: AtomicU64,
    upstream_sum_us: AtomicU64,
    upstream_buckets: [AtomicU64; BUCKETS.len()],
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route, status)).or_default() += 1;
        }
    }

    pub fn bytes(&self, n: u64) {
        self.bytes_sent.fetch_add(n, Ordering::Relaxed);
    }

    pub fn cache(&self, hit: bool) {
        if hit {
            &self.cache_hits
        } else {
            &self.cache_misses
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A credential check answered 503 because the bcrypt verifier was saturated.
    pub fn auth_busy(&self) {
        self.auth_busy.fetch_add(1, Ordering::Relaxed);
    }

    /// A narinfo served without the gateway's signature (no valid required signature).
    pub fn unvouched(&self) {
        self.unvouched.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection closed at once because the connection limit was reached.
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream(&self, took: Duration) {
        self.upstream_count.fetch_add(1, Ordering::Relaxed);
        self.upstream_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.upstream_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn render(&self, bucket: RequestStats, cached_objects: usize) -> String {
        let mut s = String::new();
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            s,
            "# HELP cachepush_gateway_requests_total Requests answered, by route and status.\n# TYPE cachepush_gateway_requests_total counter"
        );
        if let Ok(m) = self.requests.lock() {
            for ((route, status), n) in m.iter() {
                let _ = writeln!(
                    s,
                    "cachepush_gateway_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            &mut s,
            "cachepush_gateway_response_bytes_total",
            "Body bytes sent to clients.",
            l(&self.bytes_sent),
        );
        counter(
            &mut s,
            "cachepush_gateway_cache_hits_total",
            "narinfo and nix-cache-info requests answered from memory.",
            l(&self.cache_hits),
        );
        counter(
            &mut s,
            "cachepush_gateway_cache_misses_total",
            "narinfo and nix-cache-info requests that went to the bucket.",
            l(&self.cache_misses),
        );
        counter(
            &mut s,
            "cachepush_gateway_auth_failures_total",
            "Requests refused with 401.",
            l(&self.auth_failures),
        );
        counter(
            &mut s,
            "cachepush_gateway_auth_busy_total",
            "Requests answered 503 because every password check slot was busy.",
            l(&self.auth_busy),
        );
        counter(
            &mut s,
            "cachepush_gateway_unvouched_narinfos_total",
            "Narinfos served without the gateway's signature: no valid signature by a --require-signature-by key.",
            l(&self.unvouched),
        );
        counter(
            &mut s,
            "cachepush_gateway_connections_refused_total",
            "Connections closed at once because --max-connections were open.",
            l(&self.connections_refused),
        );
        let _ = writeln!(
            s,
            "# HELP cachepush_gateway_bucket_requests_total Requests sent to the bucket, by verb.\n# TYPE cachepush_gateway_bucket_requests_total counter"
        );
        for (verb, n) in [
            ("head", bucket.head),
            ("get", bucket.get),
            ("put", bucket.put),
            ("list", bucket.list),
            ("retry", bucket.retries),
        ] {
            let _ = writeln!(
                s,
                "cachepush_gateway_bucket_requests_total{{verb=\"{verb}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP cachepush_gateway_bucket_seconds Latency of bucket requests.\n# TYPE cachepush_gateway_bucket_seconds histogram"
        );
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                s,
                "cachepush_gateway_bucket_seconds_bucket{{le=\"{b}\"}} {}",
                l(&self.upstream_buckets[i])
            );
        }
        let count = l(&self.upstream_count);
        let _ = writeln!(
            s,
            "cachepush_gateway_bucket_seconds_bucket{{le=\"+Inf\"}} {count}\ncachepush_gateway_bucket_seconds_sum {}\ncachepush_gateway_bucket_seconds_count {count}",
            l(&self.upstream_sum_us) as f64 / 1e6
        );
        let _ = writeln!(
            s,
            "# HELP cachepush_gateway_cached_objects Objects held in the narinfo cache.\n# TYPE cachepush_gateway_cached_objects gauge\ncachepush_gateway_cached_objects {cached_objects}"
        );
        s
    }
}
