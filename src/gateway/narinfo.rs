//! `GET /nix-cache-info` and `GET /<hash>.narinfo`: small objects, from a bounded TTL
//! cache or the storage, narinfos countersigned by the gateway's key when its policy
//! allows ([`super::sign`]).

use std::time::Instant;

use bytes::Bytes;
use http::Response;

use super::cache::Cached;
use super::error::Refusal;
use super::handler::{MAX_SMALL_OBJECT, State};
use super::response::{Body, log, ok};
use super::route::Route;
use super::sign::Countersigned;
use crate::format::layout::{self, content_type};
use crate::storage::Storage;

impl<S: Storage> State<S> {
    /// narinfo / nix-cache-info: from memory, else from the storage (and remembered).
    async fn small_object(&self, route: &Route, key: &str) -> Result<Option<Bytes>, Refusal> {
        match self.cache.get(key) {
            Cached::Present(b) => {
                self.metrics.cache(true);
                return Ok(Some(b));
            }
            Cached::Absent => {
                self.metrics.cache(true);
                return Ok(None);
            }
            Cached::Unknown => self.metrics.cache(false),
        }
        let started = Instant::now();
        let got = self.storage.get_limited(key, MAX_SMALL_OBJECT).await;
        self.metrics.upstream(started.elapsed());
        let got = got.map_err(|e| self.storage_failure(route, &e))?;
        let got = match (got, route) {
            (Some(text), Route::NarInfo(hash)) => Some(self.sign(route, hash, text)?),
            (other, _) => other,
        };
        self.cache.put(key, got.clone());
        Ok(got)
    }

    /// Adds the gateway's signature to a narinfo from the storage, when its policy allows.
    fn sign(&self, route: &Route, hash: &str, text: Bytes) -> Result<Bytes, Refusal> {
        let Some(signer) = &self.cfg.signer else {
            return Ok(text);
        };
        match signer.apply(hash, &text) {
            Ok(Countersigned::Signed(b)) => Ok(b),
            Ok(Countersigned::Unvouched(b)) => {
                self.metrics.unvouched();
                log(&format!(
                    "warning: {}: {hash}.narinfo carries no valid signature by a --require-signature-by key; served without the gateway's signature",
                    route.label()
                ));
                Ok(b)
            }
            Err(e) => {
                log(&format!("error: {}: {hash}.narinfo: {e}", route.label()));
                Err(Refusal::UnusableNarinfo)
            }
        }
    }

    pub(super) async fn cache_info(&self, route: &Route) -> Response<Body> {
        let body = match self.small_object(route, layout::CACHE_INFO).await {
            Ok(Some(b)) => b,
            // A cache filled by a tool that writes no nix-cache-info still works.
            Ok(None) => Bytes::from(format!(
                "StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n",
                self.cfg.store_dir, self.cfg.priority
            )),
            Err(r) => return r.into(),
        };
        let mut r = ok(body, content_type::CACHE_INFO);
        self.cacheable(&mut r, "max-age=3600");
        r
    }

    pub(super) async fn narinfo(&self, route: &Route) -> Response<Body> {
        let key = route.object_key().unwrap_or_default();
        match self.small_object(route, &key).await {
            Ok(Some(b)) => {
                let mut r = ok(b, content_type::NARINFO);
                self.cacheable(&mut r, "max-age=60");
                r
            }
            Ok(None) => {
                // Remembered by clients and CDNs for as long as a hit: a path pushed a
                // minute later is found a minute later.
                let mut r: Response<Body> = Refusal::NotFound.into();
                self.cacheable(&mut r, "max-age=60");
                r
            }
            Err(r) => r.into(),
        }
    }
}
