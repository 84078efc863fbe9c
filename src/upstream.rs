//! Other binary caches (`--upstream`, e.g. https://cache.nixos.org) whose paths need not be
//! pushed again: a path they already serve is skipped.
//!
//! Only the presence of the narinfo is checked, as Nix itself does when it substitutes:
//! clients that trust the upstream's key fetch those paths from it directly.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::format::StorePath;

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("upstream cache URL {url:?} is not an http:// or https:// URL")]
    BadUrl { url: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("{url}: {message}")]
    Request { url: String, message: String },
    /// Marked down after failures: not asked again during this run.
    #[error(
        "{url} is not answering, so it was not asked again (failed lookups: {failures}); paths pushed without knowing whether it serves them: {paths}"
    )]
    Down {
        url: String,
        failures: u32,
        paths: usize,
    },
}

/// Consecutive failed lookups after which an upstream is not asked again for a while.
const MARK_DOWN_AFTER: u32 = 3;
/// How long a marked-down upstream is left alone (a watcher runs for days; an outage ends).
const DOWN_FOR: Duration = Duration::from_secs(300);

/// One upstream cache, asked over HTTP(S).
#[derive(Clone, Debug)]
pub struct Upstream {
    base: String,
    client: reqwest::Client,
    /// Lookups that failed in a row, and whether it is marked down: an unreachable
    /// upstream must cost a few seconds, not a timeout and retries per path.
    failures: Arc<AtomicU32>,
    down_until: Arc<Mutex<Option<Instant>>>,
}

impl Upstream {
    pub fn new(url: &str) -> Result<Self, UpstreamError> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) || base.len() < 9 {
            return Err(UpstreamError::BadUrl { url: url.into() });
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("cachepush/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| UpstreamError::Client(e.to_string()))?;
        Ok(Upstream {
            base,
            client,
            failures: Arc::new(AtomicU32::new(0)),
            down_until: Arc::new(Mutex::new(None)),
        })
    }

    /// Whether failed lookups marked it down (it is then not asked for [`DOWN_FOR`]).
    pub fn is_down(&self) -> bool {
        self.down_until
            .lock()
            .is_ok_and(|d| d.is_some_and(|until| Instant::now() < until))
    }

    fn mark_down(&self) {
        if let Ok(mut d) = self.down_until.lock() {
            *d = Some(Instant::now() + DOWN_FOR);
        }
    }

    /// Failed lookups so far in a row.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// Whether the upstream serves a narinfo for `path`. 404 and 403 mean "no" (S3 answers
    /// 403 for a missing key in a bucket without list permission, and Nix reads it the same way).
    /// Marked down (after [`MARK_DOWN_AFTER`] failed lookups in a row, or at once when
    /// it cannot be connected to), it answers `Err(Down)` without a request.
    pub async fn has(&self, path: &StorePath) -> Result<bool, UpstreamError> {
        let url = format!("{}/{}.narinfo", self.base, path.hash_part());
        let mut attempt = 0;
        loop {
            if self.is_down() {
                return Err(UpstreamError::Down {
                    url: self.base.clone(),
                    failures: self.failures(),
                    paths: 0,
                });
            }
            attempt += 1;
            let res = self.client.head(&url).send().await;
            let (err, unreachable) = match res {
                Ok(r) if r.status().is_success() => {
                    self.failures.store(0, Ordering::Relaxed);
                    return Ok(true);
                }
                Ok(r) if matches!(r.status().as_u16(), 404 | 403 | 410) => {
                    self.failures.store(0, Ordering::Relaxed);
                    return Ok(false);
                }
                Ok(r) => (format!("HTTP {}", r.status()), false),
                Err(e) => (crate::error_chain(&e), e.is_connect() || e.is_timeout()),
            };
            // No connection at all: retrying each path would only multiply the timeouts.
            if unreachable || attempt >= 3 {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if unreachable || n >= MARK_DOWN_AFTER {
                    self.mark_down();
                }
                return Err(UpstreamError::Request { url, message: err });
            }
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
    }
}
