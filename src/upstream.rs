//! Other binary caches (`--upstream`, e.g. https://cache.nixos.org) whose paths need not be
//! pushed again: a path they already serve is skipped.
//!
//! Only the presence of the narinfo is checked, as Nix itself does when it substitutes:
//! clients that trust the upstream's key fetch those paths from it directly.

use std::time::Duration;

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
}

/// One upstream cache, asked over HTTP(S).
#[derive(Clone, Debug)]
pub struct Upstream {
    base: String,
    client: reqwest::Client,
}

impl Upstream {
    pub fn new(url: &str) -> Result<Self, UpstreamError> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) || base.len() < 9 {
            return Err(UpstreamError::BadUrl { url: url.into() });
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("cachepush/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| UpstreamError::Client(e.to_string()))?;
        Ok(Upstream { base, client })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// Whether the upstream serves a narinfo for `path`. 404 and 403 mean "no" (S3 answers
    /// 403 for a missing key in a bucket without list permission, and Nix reads it the same way).
    pub async fn has(&self, path: &StorePath) -> Result<bool, UpstreamError> {
        let url = format!("{}/{}.narinfo", self.base, path.hash_part());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = self.client.head(&url).send().await;
            let err = match res {
                Ok(r) if r.status().is_success() => return Ok(true),
                Ok(r) if matches!(r.status().as_u16(), 404 | 403 | 410) => return Ok(false),
                Ok(r) => format!("HTTP {}", r.status()),
                Err(e) => crate::error_chain(&e),
            };
            if attempt >= 3 {
                return Err(UpstreamError::Request { url, message: err });
            }
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
    }
}
