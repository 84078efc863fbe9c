//! The push API: CI jobs publish through the gateway with no S3 credentials and no signing
//! key. The NAR bytes go straight to the bucket on presigned URLs; the gateway checks
//! what arrived and signs only that.
//!
//! Under `/_cachepush/push/v1/`, every request with `Authorization: Bearer TOKEN` (a
//! push-scope token of `cachepush token issue`, or a CI identity token; see
//! [`super::oidc`]):
//! - `POST missing` `{"hashes": [...]}` → `{"missing": [...]}`: which narinfos the cache lacks;
//! - `GET cache-info` → the cache's `nix-cache-info`;
//! - `POST uploads` `{"key": "nar/<NarHash>.nar.zst", "size": NAR_SIZE}` → a grant: one
//!   presigned PUT, or a multipart upload with one presigned URL per part, for a staging
//!   key of its own (`_incoming/<id>/...`), valid for the grant's lifetime;
//! - `POST uploads/<id>/complete` `{"etags": [...]}` (multipart uploads; a single PUT
//!   needs none) and `POST uploads/<id>/abort`;
//! - `POST narinfo` (the narinfo's text, unsigned; or `{"narinfo": TEXT, "nar": BASE64}`
//!   for a NAR of at most [`INLINE_MAX`] bytes sent along) → publishes it: the object's
//!   size and FileHash, and unless `--trust-pushers` its decompressed NarHash and NarSize,
//!   must be what the narinfo says, and every reference must already be in the cache. Then
//!   the object is copied to its key (only if it is still the object that was checked),
//!   and the narinfo signed and written. Anything that fails is deleted and never signed.
//!
//! Grants live in the gateway's memory: a restart forgets them (the pusher retries), and
//! the staging objects of grants never published are deleted when they expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::handler::State;
use super::oidc::OidcVerifier;
use super::response::{Body, full, log};
use super::token::{self, Scope};
use crate::format::store_path::is_hash_part;
use crate::format::{NarInfo, SecretKey, layout};
use crate::storage::{Storage, content_type};

pub const PREFIX: &str = "/_cachepush/push/v1/";
/// Where uploads wait to be checked, at the top of the bucket's cache prefix.
pub const STAGING: &str = "_incoming/";
/// Largest request body (a `missing` question of 10,000 hashes is about 400 KiB).
const MAX_BODY: usize = 4 << 20;
const MAX_HASHES: usize = 10_000;
/// Grants open at once, all pushers together.
const MAX_GRANTS: usize = 20_000;
/// Compressed NARs up to this size may come along with their narinfo (base64, in JSON):
/// one request instead of a grant, a PUT and a narinfo, and well under any reverse
/// proxy's body limit (nginx's default is 1 MiB).
pub const INLINE_MAX: u64 = 256 << 10;
/// Compressed NARs up to this size are one PUT; larger ones are multipart.
pub const SINGLE_PUT_MAX: u64 = 16 << 20;
/// Smallest part of a multipart grant (S3 requires 5 MiB; 16 MiB is what pushes use).
const PART_SIZE: u64 = 16 << 20;
/// S3's limit on parts per upload.
const MAX_PARTS: u64 = 10_000;
/// Largest NAR a grant is given for.
const MAX_NAR: u64 = 1 << 40;
/// How long a narinfo seen present stands in for a HEAD of it (a gc keeps what a push
/// relies on far longer than this), and how many are remembered.
const PRESENT_TTL: Duration = Duration::from_secs(600);
const PRESENT_MAX: usize = 200_000;
/// How long a `missing` answer of "absent" stands in for the HEAD before the narinfo is
/// written (first writer wins): a push publishes within seconds of asking.
const ABSENT_TTL: Duration = Duration::from_secs(60);
/// Staging objects older than this, left by a gateway that stopped, are deleted.
const STALE_STAGING: i64 = 24 * 3600;

/// The push API's settings (`--push-*`, `--token-key`, `--trust-pushers`).
pub struct PushConfig {
    /// Signs what is published (the gateway's `--signing-key`).
    pub key: SecretKey,
    pub oidc: Option<OidcVerifier>,
    /// Skip decompressing uploads to check NarHash (FileHash and size are still checked).
    pub trust_pushers: bool,
    /// Lifetime of upload URLs.
    pub grant_ttl: Duration,
    pub quarantine_prefix: Option<String>,
}

/// The push API's state in a running gateway.
pub struct Pushes {
    pub(super) cfg: PushConfig,
    grants: Mutex<HashMap<String, Grant>>,
    /// Narinfo keys seen present lately (published here, or answered present), so that
    /// the references of the next narinfos cost no HEAD each.
    present: Mutex<HashMap<String, Instant>>,
    /// Narinfo keys `missing` just answered absent, with whom to: that pusher's narinfo
    /// for one of them within [`ABSENT_TTL`] needs no HEAD before it is written.
    absent: Mutex<HashMap<String, (String, Instant)>>,
    swept_staging: AtomicBool,
    cache_info_written: [AtomicBool; 2],
}

impl Pushes {
    fn seen_present(&self, keys: impl IntoIterator<Item = String>) {
        let mut m = self.present.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= PRESENT_MAX {
            m.clear();
        }
        let now = Instant::now();
        for k in keys {
            m.insert(k, now);
        }
    }

    fn seen_absent(&self, who: &str, keys: impl IntoIterator<Item = String>) {
        let mut m = self.absent.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= PRESENT_MAX {
            m.retain(|_, (_, t)| t.elapsed() < ABSENT_TTL);
            if m.len() >= PRESENT_MAX {
                m.clear();
            }
        }
        let now = Instant::now();
        for k in keys {
            m.insert(k, (who.to_owned(), now));
        }
    }

    /// Whether `missing` told `who` that `key` was absent moments ago (used once).
    fn just_absent(&self, who: &str, key: &str) -> bool {
        let mut m = self.absent.lock().unwrap_or_else(|e| e.into_inner());
        match m.remove(key) {
            Some((w, t)) => w == who && t.elapsed() < ABSENT_TTL,
            None => false,
        }
    }

    fn known_present(&self, key: &str) -> bool {
        let m = self.present.lock().unwrap_or_else(|e| e.into_inner());
        m.get(key).is_some_and(|t| t.elapsed() < PRESENT_TTL)
    }

    pub fn new(cfg: PushConfig) -> Self {
        Pushes {
            cfg,
            grants: Mutex::new(HashMap::new()),
            present: Mutex::new(HashMap::new()),
            absent: Mutex::new(HashMap::new()),
            swept_staging: AtomicBool::new(false),
            cache_info_written: [AtomicBool::new(false), AtomicBool::new(false)],
        }
    }
}

/// Who is pushing, once their token checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pusher {
    /// For logs and for matching grants to their owner: never the token.
    who: String,
    quarantine: bool,
}

struct Grant {
    owner: Pusher,
    /// The NAR key the grant is for, relative to the target cache.
    key: String,
    staging: String,
    upload: Option<String>,
    parts: u32,
    expires: Instant,
    complete: bool,
}

/// Where the NAR of a narinfo being published is.
enum Source {
    /// Sent along with the narinfo (small NARs).
    Inline(Bytes),
    /// Uploaded to this staging key on a grant.
    Staged(String),
    /// Already at its key in the cache (pushed before).
    Existing,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    narinfo: String,
    /// The compressed NAR, base64.
    nar: String,
}

/// What a narinfo submission did.
#[derive(Debug, PartialEq, Eq)]
enum Published {
    Now,
    /// The cache had the path already: nothing was replaced.
    AlreadyThere,
}

/// A refusal or failure of a push request: a status and one line for the pusher.
struct Answer {
    status: StatusCode,
    message: String,
}

fn answer(status: StatusCode, message: impl Into<String>) -> Answer {
    Answer {
        status,
        message: message.into(),
    }
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

impl From<Answer> for Response<Body> {
    fn from(a: Answer) -> Self {
        let mut r = json_response(a.status, &json!({ "error": a.message }));
        if a.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"cachepush push\""),
            );
        }
        r
    }
}

fn no_presigning() -> Answer {
    answer(
        StatusCode::NOT_IMPLEMENTED,
        "pushing through the gateway needs an S3 bucket behind it",
    )
}

pub fn is_push(path: &str) -> bool {
    path.starts_with(PREFIX)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MissingRequest {
    hashes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadRequest {
    key: String,
    size: u64,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct UploadGrant {
    pub id: String,
    /// One presigned PUT for the whole object...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// ...or one presigned URL per part, each part `part_size` bytes but the last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<String>,
    #[serde(default)]
    pub part_size: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteRequest {
    etags: Vec<String>,
}

/// The bearer token of a request: `Authorization: Bearer T`, or the password of Basic
/// (as netrc sends it).
fn bearer(req: &Request<Incoming>) -> Option<String> {
    let h = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(t) = h.strip_prefix("Bearer ") {
        return Some(t.trim().to_owned());
    }
    let b = h.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':').map(|(_, p)| p.to_owned())
}

/// A NAR key a grant may be for: `nar/<52 nix32 chars>.nar`, `.nar.zst` or `.nar.xz`.
fn nar_key_ok(key: &str) -> bool {
    let Some(file) = key.strip_prefix(layout::NAR_DIR) else {
        return false;
    };
    let Some((hash, ext)) = file.split_once('.') else {
        return false;
    };
    hash.len() == 52
        && hash
            .bytes()
            .all(|b| crate::format::nix32::ALPHABET.contains(&b))
        && matches!(ext, "nar" | "nar.zst" | "nar.xz")
}

fn compression_of(key: &str) -> &'static str {
    if key.ends_with(".zst") {
        "zstd"
    } else if key.ends_with(".xz") {
        "xz"
    } else {
        "none"
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Answer> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(_) => Err(answer(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is unreadable or over {MAX_BODY} bytes"),
        )),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Answer> {
    serde_json::from_slice(body)
        .map_err(|e| answer(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

impl<S: Storage> State<S> {
    /// Answers one request under [`PREFIX`].
    pub async fn push(
        &self,
        req: Request<Incoming>,
        _peer: Option<std::net::IpAddr>,
    ) -> (Response<Body>, &'static str) {
        let Some(p) = &self.push else {
            return (
                answer(
                    StatusCode::NOT_FOUND,
                    "this gateway takes no pushes (start it with --push-oidc-issuer or --token-key, and --signing-key)",
                )
                .into(),
                "push",
            );
        };
        let pusher = match self.pusher(p, &req).await {
            Ok(who) => who,
            Err(a) => {
                self.metrics.auth_failure();
                log(&format!("push: refused: {}", a.message));
                return (a.into(), "push");
            }
        };
        let path = req.uri().path()[PREFIX.len()..].to_owned();
        let method = req.method().clone();
        let resp = match (method, path.as_str()) {
            (Method::POST, "missing") => self.missing(p, &pusher, req).await,
            (Method::GET, "cache-info") => self.cache_info_for(p, &pusher).await,
            (Method::POST, "uploads") => self.grant(p, &pusher, req).await,
            (Method::POST, "narinfo") => self.publish(p, &pusher, req).await,
            (Method::POST, rest) => match rest
                .strip_prefix("uploads/")
                .and_then(|r| r.split_once('/'))
            {
                Some((id, "complete")) => self.complete(p, &pusher, id, req).await,
                Some((id, "abort")) => self.abort(p, &pusher, id).await,
                _ => Err(answer(StatusCode::NOT_FOUND, "no such push request")),
            },
            _ => Err(answer(StatusCode::NOT_FOUND, "no such push request")),
        };
        (resp.unwrap_or_else(Into::into), "push")
    }

    /// Checks the token; 401 when it is not one (or not valid), 403 when it is valid but
    /// not for pushing here, 503 when it could not be checked now.
    async fn pusher(&self, p: &Pushes, req: &Request<Incoming>) -> Result<Pusher, Answer> {
        let Some(t) = bearer(req) else {
            return Err(answer(
                StatusCode::UNAUTHORIZED,
                "a push needs a token (Authorization: Bearer)",
            ));
        };
        if t.starts_with(token::PREFIX) {
            let Some(v) = &self.cfg.scoped_tokens else {
                return Err(answer(
                    StatusCode::UNAUTHORIZED,
                    "this gateway takes no scoped tokens",
                ));
            };
            return match v.verify(&t, Scope::Push) {
                Ok(c) => Ok(Pusher {
                    who: format!("token {}", c.jti),
                    quarantine: false,
                }),
                Err(
                    e @ (token::Refusal::WrongScope { .. } | token::Refusal::OtherCache { .. }),
                ) => Err(answer(StatusCode::FORBIDDEN, e.to_string())),
                Err(e @ token::Refusal::RevocationsUnreadable) => {
                    Err(answer(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
                }
                Err(e) => Err(answer(StatusCode::UNAUTHORIZED, e.to_string())),
            };
        }
        let Some(oidc) = &p.cfg.oidc else {
            return Err(answer(
                StatusCode::UNAUTHORIZED,
                "not a scoped token, and this gateway trusts no CI identity tokens",
            ));
        };
        match oidc.verify(&t, crate::host::now()).await {
            Ok(id) => Ok(Pusher {
                who: format!("{} {}", id.issuer, id.subject),
                quarantine: id.quarantine,
            }),
            Err(e) if e.is_unavailable() => Err(answer(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("identity token: {e}"),
            )),
            Err(
                e @ (super::oidc::OidcRefusal::Audience(_) | super::oidc::OidcRefusal::Claims(_)),
            ) => Err(answer(
                StatusCode::FORBIDDEN,
                format!("identity token: {e}"),
            )),
            Err(e) => Err(answer(
                StatusCode::UNAUTHORIZED,
                format!("identity token: {e}"),
            )),
        }
    }

    /// The key of `key` in the cache this pusher writes to.
    fn target_key(p: &Pushes, who: &Pusher, key: &str) -> String {
        match (&p.cfg.quarantine_prefix, who.quarantine) {
            (Some(q), true) => format!("{}/{key}", q.trim_matches('/')),
            _ => key.to_owned(),
        }
    }

    async fn missing(
        &self,
        p: &Pushes,
        who: &Pusher,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Answer> {
        let q: MissingRequest = parse_json(&read_body(req).await?)?;
        if q.hashes.len() > MAX_HASHES {
            return Err(answer(
                StatusCode::BAD_REQUEST,
                format!("at most {MAX_HASHES} hashes per question"),
            ));
        }
        if let Some(bad) = q.hashes.iter().find(|h| !is_hash_part(h)) {
            return Err(answer(
                StatusCode::BAD_REQUEST,
                format!("{bad:?} is not a store path hash"),
            ));
        }
        let keys: Vec<String> = q
            .hashes
            .iter()
            .map(|h| Self::target_key(p, who, &layout::narinfo_key(h)))
            .collect();
        // The listing covers the cache's own top level, not the quarantine's: HEADs there.
        let present = exist(&self.storage, &keys, !who.quarantine)
            .await
            .map_err(|e| {
                log(&format!("push: missing: {e}"));
                answer(StatusCode::BAD_GATEWAY, "the bucket did not answer")
            })?;
        p.seen_present(
            keys.iter()
                .zip(&present)
                .filter(|(_, there)| **there)
                .map(|(k, _)| k.clone()),
        );
        p.seen_absent(
            &who.who,
            keys.iter()
                .zip(&present)
                .filter(|(_, there)| !**there)
                .map(|(k, _)| k.clone()),
        );
        let missing: Vec<&String> = q
            .hashes
            .iter()
            .zip(present)
            .filter(|(_, there)| !there)
            .map(|(h, _)| h)
            .collect();
        Ok(json_response(
            StatusCode::OK,
            &json!({ "missing": missing, "quarantine": who.quarantine }),
        ))
    }

    async fn cache_info_for(&self, p: &Pushes, who: &Pusher) -> Result<Response<Body>, Answer> {
        let key = Self::target_key(p, who, layout::CACHE_INFO);
        let text = match self.storage.get_limited(&key, 64 << 10).await {
            Ok(Some(b)) => b,
            Ok(None) => Bytes::from(self.default_cache_info()),
            Err(e) => {
                log(&format!("push: cache-info: {e}"));
                return Err(answer(StatusCode::BAD_GATEWAY, "the bucket did not answer"));
            }
        };
        let mut r = Response::new(full(text));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(content_type::CACHE_INFO),
        );
        Ok(r)
    }

    fn default_cache_info(&self) -> String {
        format!(
            "StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n",
            self.cfg.store_dir, self.cfg.priority
        )
    }

    async fn grant(
        &self,
        p: &Pushes,
        who: &Pusher,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Answer> {
        let q: UploadRequest = parse_json(&read_body(req).await?)?;
        if !nar_key_ok(&q.key) {
            return Err(answer(
                StatusCode::BAD_REQUEST,
                format!("{:?} is not a NAR key (nar/<NarHash>.nar[.zst|.xz])", q.key),
            ));
        }
        if q.size > MAX_NAR {
            return Err(answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a NAR of {} bytes is more than this gateway takes", q.size),
            ));
        }
        self.sweep(p).await;
        let id = crate::host::random_id();
        let staging = format!("{STAGING}{id}/{}", q.key);
        // What compression can make of `size` bytes at worst: a little more than them.
        let bound = q.size + q.size / 64 + (1 << 20);
        let ttl = p.cfg.grant_ttl;
        let fail = |e: crate::storage::StorageError| {
            log(&format!("push: grant {}: {e}", q.key));
            answer(
                StatusCode::BAD_GATEWAY,
                "the bucket cannot make upload URLs",
            )
        };
        let (grant, upload, parts) = if bound <= SINGLE_PUT_MAX {
            let Some(url) = self
                .storage
                .presign_put(&staging, ttl)
                .await
                .map_err(fail)?
            else {
                return Err(no_presigning());
            };
            (
                UploadGrant {
                    id: id.clone(),
                    url: Some(url),
                    parts: vec![],
                    part_size: 0,
                },
                None,
                1,
            )
        } else {
            let part_size = PART_SIZE.max(bound.div_ceil(MAX_PARTS).next_multiple_of(1 << 20));
            let n = bound.div_ceil(part_size) as u32;
            let Some((upload, urls)) = self
                .storage
                .presign_parts(&staging, n, ttl)
                .await
                .map_err(fail)?
            else {
                return Err(no_presigning());
            };
            (
                UploadGrant {
                    id: id.clone(),
                    url: None,
                    parts: urls,
                    part_size,
                },
                Some(upload),
                n,
            )
        };
        let parts_needed = if upload.is_some() { parts } else { 0 };
        let grant_entry = Grant {
            owner: who.clone(),
            key: q.key,
            staging,
            upload,
            parts,
            expires: Instant::now() + ttl,
            // A single PUT is whole once it is there; parts need completing.
            complete: parts_needed == 0,
        };
        let refused = {
            let mut g = p.grants.lock().unwrap_or_else(|e| e.into_inner());
            if g.len() >= MAX_GRANTS {
                Some(grant_entry)
            } else {
                g.insert(id, grant_entry);
                None
            }
        };
        if let Some(entry) = refused {
            self.discard(&entry).await;
            return Err(answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many uploads open; try again",
            ));
        }
        Ok(json_response(
            StatusCode::OK,
            &serde_json::to_value(&grant).unwrap_or_default(),
        ))
    }

    /// Takes the grant `id` out of the table when `who` owns it.
    fn take_grant(p: &Pushes, who: &Pusher, id: &str) -> Result<Grant, Answer> {
        let mut g = p.grants.lock().unwrap_or_else(|e| e.into_inner());
        // Another pusher's grant is left where it is, and answered as if absent.
        if g.get(id).is_some_and(|grant| grant.owner == *who)
            && let Some(grant) = g.remove(id)
        {
            return Ok(grant);
        }
        Err(answer(
            StatusCode::NOT_FOUND,
            format!("no upload {id} of yours is open (expired, or never granted)"),
        ))
    }

    fn put_back(p: &Pushes, id: &str, grant: Grant) {
        p.grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), grant);
    }

    async fn complete(
        &self,
        p: &Pushes,
        who: &Pusher,
        id: &str,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Answer> {
        let q: CompleteRequest = parse_json(&read_body(req).await?)?;
        let mut grant = Self::take_grant(p, who, id)?;
        if let Some(upload) = &grant.upload {
            if q.etags.is_empty() || q.etags.len() > grant.parts as usize {
                let n = grant.parts;
                Self::put_back(p, id, grant);
                return Err(answer(
                    StatusCode::BAD_REQUEST,
                    format!("between 1 and {n} part ETags expected"),
                ));
            }
            if let Err(e) = self
                .storage
                .complete_parts(&grant.staging, upload, &q.etags)
                .await
            {
                log(&format!("push: complete {}: {e}", grant.key));
                self.storage.cancel_parts(&grant.staging, upload).await;
                return Err(answer(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "the bucket refused to complete the upload of {}: {e}",
                        grant.key
                    ),
                ));
            }
        }
        grant.complete = true;
        Self::put_back(p, id, grant);
        Ok(json_response(StatusCode::OK, &json!({ "complete": id })))
    }

    async fn abort(&self, p: &Pushes, who: &Pusher, id: &str) -> Result<Response<Body>, Answer> {
        let grant = Self::take_grant(p, who, id)?;
        self.discard(&grant).await;
        Ok(json_response(StatusCode::OK, &json!({ "aborted": id })))
    }

    async fn discard(&self, grant: &Grant) {
        match &grant.upload {
            Some(u) if !grant.complete => self.storage.cancel_parts(&grant.staging, u).await,
            _ => {}
        }
        if let Err(e) = self.storage.delete(&grant.staging).await {
            log(&format!("push: cannot delete {}: {e}", grant.staging));
        }
    }

    /// Deletes what expired grants left behind; once per gateway run, also staging
    /// objects older than a day (a gateway that stopped with grants open).
    async fn sweep(&self, p: &Pushes) {
        let now = Instant::now();
        let expired: Vec<Grant> = {
            let mut g = p.grants.lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<String> = g
                .iter()
                // An upload may still be sent until its URLs expire; a minute more for
                // the narinfo that follows it.
                .filter(|(_, v)| v.expires + Duration::from_secs(60) < now)
                .map(|(k, _)| k.clone())
                .collect();
            ids.iter().filter_map(|id| g.remove(id)).collect()
        };
        for grant in &expired {
            self.discard(grant).await;
        }
        if !p.swept_staging.swap(true, Ordering::Relaxed)
            && let Ok(old) = self.storage.list_meta(STAGING, false).await
        {
            let cutoff = crate::host::now() - STALE_STAGING;
            for o in old.iter().filter(|o| o.modified < cutoff) {
                let _ = self.storage.delete(&o.key).await;
            }
        }
    }

    async fn publish(
        &self,
        p: &Pushes,
        who: &Pusher,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Answer> {
        let json_body = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        let body = read_body(req).await?;
        // A small NAR may come along with its narinfo: `{"narinfo": TEXT, "nar": BASE64}`.
        let (text, inline) = if json_body {
            let q: PublishRequest = parse_json(&body)?;
            let nar = base64::engine::general_purpose::STANDARD
                .decode(q.nar.as_bytes())
                .map_err(|_| answer(StatusCode::BAD_REQUEST, "the NAR is not base64"))?;
            if nar.len() as u64 > INLINE_MAX {
                return Err(answer(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "a NAR sent along with its narinfo may have {INLINE_MAX} bytes at most; upload larger ones to a grant"
                    ),
                ));
            }
            (q.narinfo, Some(Bytes::from(nar)))
        } else {
            let text = std::str::from_utf8(&body)
                .map_err(|_| answer(StatusCode::BAD_REQUEST, "the narinfo is not UTF-8"))?;
            (text.to_owned(), None)
        };
        let mut ni = NarInfo::parse(&text)
            .map_err(|e| answer(StatusCode::BAD_REQUEST, format!("narinfo: {e}")))?;
        let path = ni.store_dir.display(&ni.store_path);
        let bad = |status, why: String| answer(status, format!("{path}: {why}"));
        if ni.store_dir.as_str() != self.cfg.store_dir {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                format!("this cache is for store {}", self.cfg.store_dir),
            ));
        }
        if !nar_key_ok(&ni.url) || compression_of(&ni.url) != ni.compression {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                format!(
                    "URL {:?} with Compression {:?} is not a NAR key this gateway publishes",
                    ni.url, ni.compression
                ),
            ));
        }
        if ni.file_hash.is_none() || ni.file_size.is_none() {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "FileHash and FileSize are required".into(),
            ));
        }
        // The upload this narinfo is for: sent along, or a completed grant of this pusher
        // for its URL.
        let staged = if inline.is_some() {
            None
        } else {
            let mut g = p.grants.lock().unwrap_or_else(|e| e.into_inner());
            let id = g
                .iter()
                .find(|(_, v)| v.owner == *who && v.key == ni.url && v.complete)
                .map(|(k, _)| k.clone());
            id.and_then(|id| g.remove(&id))
        };
        let final_key = Self::target_key(p, who, &ni.url);
        // Without one, the NAR may already be in the cache (pushed before): checked the
        // same way, but never deleted, as it is not this pusher's.
        let source = match (inline, &staged) {
            (Some(bytes), _) => Source::Inline(bytes),
            (None, Some(g)) => Source::Staged(g.staging.clone()),
            (None, None) => Source::Existing,
        };
        let result = self
            .check_and_publish(p, who, &mut ni, source, &final_key)
            .await;
        if let Some(g) = &staged {
            // Published or not, the staging copy goes.
            self.discard(g).await;
        }
        match result {
            Ok(done) => {
                let already = done == Published::AlreadyThere;
                if !already {
                    log(&format!("push: published {path} by {}", who.who));
                }
                Ok(json_response(
                    StatusCode::OK,
                    &json!({ "published": path, "quarantine": who.quarantine, "already": already }),
                ))
            }
            Err(a) => {
                log(&format!(
                    "push: refused {path} from {}: {}",
                    who.who, a.message
                ));
                Err(bad(a.status, a.message))
            }
        }
    }

    async fn check_and_publish(
        &self,
        p: &Pushes,
        who: &Pusher,
        ni: &mut NarInfo,
        source: Source,
        final_key: &str,
    ) -> Result<Published, Answer> {
        let storage_err = |e: crate::storage::StorageError| {
            log(&format!("push: {e}"));
            answer(StatusCode::BAD_GATEWAY, "the bucket did not answer")
        };
        // First writer wins, as with `nix copy`: a published narinfo is never replaced
        // through the push API, so a pusher cannot swap what others already substitute.
        let key = Self::target_key(p, who, &layout::narinfo_of(&ni.store_path));
        if !p.just_absent(&who.who, &key)
            && self
                .storage
                .head(&key)
                .await
                .map_err(storage_err)?
                .is_some()
        {
            return Ok(Published::AlreadyThere);
        }
        let decompress = !p.cfg.trust_pushers;
        let check = match &source {
            Source::Inline(bytes) => {
                let (bytes, copy) = (bytes.clone(), ni.clone());
                let problems = tokio::task::spawn_blocking(move || {
                    crate::verify::check_nar_bytes(&bytes, &copy, decompress)
                })
                .await
                .map_err(|e| answer(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
                crate::verify::NarCheck {
                    problems,
                    found: true,
                    etag: None,
                    file_size: 0,
                }
            }
            Source::Staged(key) => crate::verify::check_nar_at(&self.storage, key, ni, decompress)
                .await
                .map_err(storage_err)?,
            Source::Existing => {
                crate::verify::check_nar_at(&self.storage, final_key, ni, decompress)
                    .await
                    .map_err(storage_err)?
            }
        };
        if !check.found {
            return Err(answer(
                StatusCode::CONFLICT,
                format!(
                    "no upload of {} was completed (ask for a grant, upload, then publish)",
                    ni.url
                ),
            ));
        }
        if let Some(problem) = check.problems.first() {
            return Err(answer(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the upload does not match the narinfo: {problem}"),
            ));
        }
        let refs: Vec<&crate::format::StorePath> = ni
            .references
            .iter()
            .filter(|r| **r != ni.store_path)
            .collect();
        // References seen present in the last minutes need no HEAD.
        let unknown: Vec<_> = refs
            .iter()
            .map(|r| (*r, Self::target_key(p, who, &layout::narinfo_of(r))))
            .filter(|(_, k)| !p.known_present(k))
            .collect();
        let keys: Vec<String> = unknown.iter().map(|(_, k)| k.clone()).collect();
        let there = exist(&self.storage, &keys, false)
            .await
            .map_err(storage_err)?;
        p.seen_present(
            keys.iter()
                .zip(&there)
                .filter(|(_, t)| **t)
                .map(|(k, _)| k.clone()),
        );
        let missing: Vec<String> = unknown
            .iter()
            .zip(there)
            .filter(|(_, there)| !there)
            .map(|((r, _), _)| ni.store_dir.display(r))
            .collect();
        if !missing.is_empty() {
            return Err(answer(
                StatusCode::CONFLICT,
                format!(
                    "its references are not in the cache (push them first): {}",
                    missing.join(", ")
                ),
            ));
        }
        if let Source::Inline(bytes) = &source {
            self.storage
                .put(final_key, content_type::NAR, bytes.clone())
                .await
                .map_err(storage_err)?;
        }
        if let Source::Staged(staging) = &source {
            let source = staging.as_str();
            let Some(etag) = check.etag.as_deref() else {
                return Err(answer(
                    StatusCode::BAD_GATEWAY,
                    "the bucket gave no ETag for the upload",
                ));
            };
            self.storage
                .copy_checked(source, final_key, etag, check.file_size)
                .await
                .map_err(|e| {
                    log(&format!("push: copy {source}: {e}"));
                    answer(
                        StatusCode::CONFLICT,
                        "the upload changed after it was checked, or cannot be copied",
                    )
                })?;
        }
        self.ensure_cache_info(p, who).await.map_err(storage_err)?;
        // The pusher's signatures are not the gateway's to vouch for.
        ni.sigs.clear();
        if !who.quarantine {
            ni.sign(&p.cfg.key);
        }
        // Checked absent above (a conditional write would cost every bucket without
        // conditional writes one more HEAD per path).
        self.storage
            .put(&key, content_type::NARINFO, Bytes::from(ni.to_string()))
            .await
            .map_err(storage_err)?;
        p.seen_present([key]);
        // The narinfo cache must not keep answering 404 for what was just published.
        self.cache.forget(&layout::narinfo_of(&ni.store_path));
        Ok(Published::Now)
    }

    async fn ensure_cache_info(
        &self,
        p: &Pushes,
        who: &Pusher,
    ) -> Result<(), crate::storage::StorageError> {
        let flag = &p.cache_info_written[usize::from(who.quarantine)];
        if flag.load(Ordering::Relaxed) {
            return Ok(());
        }
        let key = Self::target_key(p, who, layout::CACHE_INFO);
        self.storage
            .put_if_absent(
                &key,
                content_type::CACHE_INFO,
                Bytes::from(self.default_cache_info()),
            )
            .await?;
        flag.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// Whether each key exists: the push pipeline's question (32 HEADs in flight, and with
/// `list` a listing meeting them for large sets).
async fn exist<S: Storage>(
    storage: &S,
    keys: &[String],
    list: bool,
) -> Result<Vec<bool>, crate::storage::StorageError> {
    crate::push::presence::presence(storage, keys, 32, list)
        .await
        .map(|(answers, _)| answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_only_for_nar_keys() {
        let h = "1".repeat(52);
        assert!(nar_key_ok(&format!("nar/{h}.nar.zst")));
        assert!(nar_key_ok(&format!("nar/{h}.nar.xz")));
        assert!(nar_key_ok(&format!("nar/{h}.nar")));
        assert!(!nar_key_ok(&format!("nar/{h}.narinfo")));
        assert!(!nar_key_ok(&format!("nar/../{h}.nar")));
        assert!(!nar_key_ok(&format!("{h}.nar")));
        assert!(!nar_key_ok(&format!("nar/{}.nar", "e".repeat(52))));
        assert!(!nar_key_ok("nix-cache-info"));
        assert_eq!(compression_of("nar/x.nar.zst"), "zstd");
        assert_eq!(compression_of("nar/x.nar"), "none");
    }
}
