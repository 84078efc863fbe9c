//! `GET /nix-cache-info` and `GET /<hash>.narinfo`: small objects, from a bounded TTL
//! cache or the storage, narinfos countersigned by the gateway's key when its policy
//! allows ([`super::sign`]). Both carry an `ETag` (the hash of the bytes served), and a
//! matching `If-None-Match` is answered 304 from the cache without asking the storage.

use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use sha2::Digest;

use super::cache::Cached;
use super::error::Refusal;
use super::handler::{MAX_SMALL_OBJECT, State};
use super::response::{Body, empty, log, ok};
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

    /// 200 with `body` and its `ETag`, or 304 when the client's `If-None-Match` names that
    /// tag (RFC 9110 §13.1.2: weak comparison, `*` matches). The tag is the body's hash,
    /// so it changes exactly when the bytes do, across restarts and replicas.
    fn revalidated(
        &self,
        req: &Request<Incoming>,
        body: Bytes,
        content_type: &'static str,
        directives: &str,
    ) -> Response<Body> {
        let digest = sha2::Sha256::digest(&body);
        let tag = format!("\"{}\"", hex(&digest[..16]));
        let matches = req
            .headers()
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == "*" || t == tag);
        let mut r = if matches {
            let mut r = Response::new(empty());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r
        } else {
            ok(body, content_type)
        };
        if let Ok(v) = HeaderValue::from_str(&tag) {
            r.headers_mut().insert(header::ETAG, v);
        }
        self.cacheable(&mut r, directives);
        r
    }

    pub(super) async fn cache_info(
        &self,
        route: &Route,
        req: &Request<Incoming>,
    ) -> Response<Body> {
        let body = match self.small_object(route, layout::CACHE_INFO).await {
            Ok(Some(b)) => b,
            // A cache filled by a tool that writes no nix-cache-info still works.
            Ok(None) => Bytes::from(format!(
                "StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n",
                self.cfg.store_dir, self.cfg.priority
            )),
            Err(r) => return r.into(),
        };
        self.revalidated(req, body, content_type::CACHE_INFO, "max-age=3600")
    }

    pub(super) async fn narinfo(&self, route: &Route, req: &Request<Incoming>) -> Response<Body> {
        let key = route.object_key().unwrap_or_default();
        match self.small_object(route, &key).await {
            Ok(Some(b)) => {
                if let (Some(a), Some(hash)) = (&self.access, layout::narinfo_hash(&key)) {
                    a.record(hash);
                }
                self.revalidated(req, b, content_type::NARINFO, "max-age=60")
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
