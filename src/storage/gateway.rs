//! Pushing through a `cachepush gateway` (`copy --to https://GATEWAY`): the push pipeline
//! sees a [`Storage`] like any other, and this backend turns its requests into the
//! gateway's push API (`src/gateway/push.rs`). NAR bytes go to the bucket on the
//! presigned URLs the gateway grants, never through the gateway; narinfos go to the
//! gateway unsigned, and it publishes them once it has checked the upload.
//!
//! The client holds no S3 credentials and no signing key, only a token: `--token-file`,
//! `CACHEPUSH_TOKEN` (GitLab: name the `id_tokens` entry so), or on GitHub Actions the
//! job's identity token, asked for with the `ACTIONS_ID_TOKEN_REQUEST_*` variables.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{
    ByteRange, ObjectBytes, RequestCounters, RequestKind, RequestStats, Staged, Storage,
    StorageError, StreamOutcome,
};
use crate::format::layout;

const API: &str = "_cachepush/push/v1/";
/// Hashes per `missing` question (the gateway's limit).
const MISSING_BATCH: usize = 10_000;
/// A GitHub identity token is asked for again after this (they live 5-10 minutes).
const GITHUB_TOKEN_REUSE: Duration = Duration::from_secs(240);
const ATTEMPTS: u32 = 4;

/// A token, kept out of `Debug` and error messages.
#[derive(Clone)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Where the push token comes from.
#[derive(Debug)]
pub enum TokenSource {
    /// A scoped token, or an identity token the CI put in a variable or file.
    Fixed(Secret),
    /// GitHub Actions: asked for (and asked for again when old) with the job's
    /// `ACTIONS_ID_TOKEN_REQUEST_URL` and `_TOKEN`, for `audience`.
    GitHub {
        url: String,
        request_token: Secret,
        audience: String,
        cached: Mutex<Option<(Secret, Instant)>>,
    },
}

/// How a push through a gateway gets its token.
#[derive(Clone, Debug, Default)]
pub struct GatewayOptions {
    pub token_file: Option<PathBuf>,
    /// The audience of the identity token asked of the CI (GitHub) [default: cachepush].
    pub audience: Option<String>,
}

impl TokenSource {
    /// `--token-file`, then `CACHEPUSH_TOKEN`, then GitHub's identity-token variables.
    pub fn find(opts: &GatewayOptions) -> Result<Self, StorageError> {
        if let Some(f) = &opts.token_file {
            let text = std::fs::read_to_string(f)
                .map_err(|e| StorageError::Config(format!("--token-file {}: {e}", f.display())))?;
            let t = text.trim();
            if t.is_empty() {
                return Err(StorageError::Config(format!(
                    "--token-file {} is empty",
                    f.display()
                )));
            }
            return Ok(TokenSource::Fixed(Secret(t.to_owned())));
        }
        if let Ok(t) = std::env::var("CACHEPUSH_TOKEN")
            && !t.trim().is_empty()
        {
            return Ok(TokenSource::Fixed(Secret(t.trim().to_owned())));
        }
        if let (Ok(url), Ok(rt)) = (
            std::env::var("ACTIONS_ID_TOKEN_REQUEST_URL"),
            std::env::var("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
        ) && !url.is_empty()
            && !rt.is_empty()
        {
            return Ok(TokenSource::GitHub {
                url,
                request_token: Secret(rt),
                audience: opts.audience.clone().unwrap_or_else(|| "cachepush".into()),
                cached: Mutex::new(None),
            });
        }
        Err(StorageError::Config(
            "a push through a gateway needs a token: --token-file FILE, CACHEPUSH_TOKEN, or on GitHub Actions `permissions: id-token: write` (on GitLab, an id_tokens entry named CACHEPUSH_TOKEN)".into(),
        ))
    }

    async fn get(&self, http: &reqwest::Client, fresh: bool) -> Result<Secret, StorageError> {
        match self {
            TokenSource::Fixed(s) => Ok(s.clone()),
            TokenSource::GitHub {
                url,
                request_token,
                audience,
                cached,
            } => {
                if !fresh
                    && let Ok(c) = cached.lock()
                    && let Some((t, at)) = c.as_ref()
                    && at.elapsed() < GITHUB_TOKEN_REUSE
                {
                    return Ok(t.clone());
                }
                let sep = if url.contains('?') { '&' } else { '?' };
                let fail = |m: String| StorageError::Denied {
                    op: "identity token",
                    key: "ACTIONS_ID_TOKEN_REQUEST_URL".into(),
                    message: m,
                };
                let resp = http
                    .get(format!("{url}{sep}audience={}", urlencode(audience)))
                    .header("Authorization", format!("bearer {}", request_token.0))
                    .send()
                    .await
                    .map_err(|e| fail(e.without_url().to_string()))?;
                if !resp.status().is_success() {
                    return Err(fail(format!(
                        "GitHub answered {} (does the job have `permissions: id-token: write`?)",
                        resp.status()
                    )));
                }
                let body = resp
                    .bytes()
                    .await
                    .map_err(|e| fail(e.without_url().to_string()))?;
                let v: Value = serde_json::from_slice(&body)
                    .map_err(|e| fail(format!("the answer is not JSON: {e}")))?;
                let t = v
                    .get("value")
                    .and_then(Value::as_str)
                    .ok_or_else(|| fail("the answer has no token".into()))?;
                let s = Secret(t.to_owned());
                if let Ok(mut c) = cached.lock() {
                    *c = Some((s.clone(), Instant::now()));
                }
                Ok(s)
            }
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

struct Inner {
    base: String,
    http: reqwest::Client,
    token: TokenSource,
    counts: RequestCounters,
    notes: Mutex<Vec<String>>,
    /// Small NARs waiting for their narinfo, to go along with it, by NAR key; and their
    /// bytes in all (at most [`INLINE_BUDGET`]).
    inline: Mutex<Waiting>,
}

/// Small NARs by key, each with how many narinfos will take it (two paths with the same
/// contents share a NAR key), and their bytes in all.
type Waiting = (std::collections::HashMap<String, (Bytes, usize)>, usize);

/// Memory the small NARs waiting for their narinfos may hold; past it they are uploaded
/// on a grant at once instead.
const INLINE_BUDGET: usize = 64 << 20;

/// A gateway that takes pushes.
#[derive(Clone)]
pub struct GatewayTarget {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GatewayTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GatewayTarget({})", self.inner.base)
    }
}

/// The gateway's answer to a request, with its status.
struct Reply {
    status: reqwest::StatusCode,
    body: Bytes,
}

impl Reply {
    fn error_text(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_owned())
    }
}

impl GatewayTarget {
    pub fn new(base: &str, token: TokenSource) -> Result<Self, StorageError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(300))
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| StorageError::Config(format!("HTTP client: {e}")))?;
        Ok(GatewayTarget {
            inner: Arc::new(Inner {
                base: base.trim_end_matches('/').to_owned(),
                http,
                token,
                counts: RequestCounters::default(),
                notes: Mutex::new(Vec::new()),
                inline: Mutex::new((std::collections::HashMap::new(), 0)),
            }),
        })
    }

    /// One request to the push API, retried on 5xx and on no answer; 401 asks for a new
    /// token once (a GitHub identity token may have expired during a long push).
    async fn call(
        &self,
        op: &'static str,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Reply, StorageError> {
        let i = &self.inner;
        let url = format!("{}/{API}{path}", i.base);
        let mut fresh = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            i.counts.sent(match method {
                reqwest::Method::GET => RequestKind::Get,
                _ => RequestKind::Put,
            });
            let token = i.token.get(&i.http, fresh).await?;
            let mut rb = i.http.request(method.clone(), &url).bearer_auth(&token.0);
            if let Some((ct, b)) = &body {
                rb = rb.header("Content-Type", *ct).body(b.clone());
            }
            let res = rb.send().await;
            let retry = match res {
                Ok(r) => {
                    let status = r.status();
                    match r.bytes().await {
                        Ok(body) => {
                            let reply = Reply { status, body };
                            if status == reqwest::StatusCode::UNAUTHORIZED
                                && !fresh
                                && matches!(i.token, TokenSource::GitHub { .. })
                            {
                                fresh = true;
                                continue;
                            }
                            if !status.is_server_error() || attempt >= ATTEMPTS {
                                return Ok(reply);
                            }
                            format!("{status}: {}", reply.error_text())
                        }
                        Err(e) => e.without_url().to_string(),
                    }
                }
                Err(e) => e.without_url().to_string(),
            };
            if attempt >= ATTEMPTS {
                return Err(StorageError::Unavailable {
                    op,
                    key: key.to_owned(),
                    message: format!("the gateway {}: {retry}", i.base),
                    timeout: false,
                });
            }
            i.counts.retried();
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
    }

    /// The reply's body when it is a success, otherwise the error it means.
    fn expect_ok(op: &'static str, key: &str, r: Reply) -> Result<Bytes, StorageError> {
        let message = r.error_text();
        match r.status.as_u16() {
            200..=299 => Ok(r.body),
            401 | 403 => Err(StorageError::Denied {
                op,
                key: key.to_owned(),
                message,
            }),
            404 if message.contains("takes no pushes") => {
                Err(StorageError::Config(format!("{op} {key}: {message}")))
            }
            s => Err(StorageError::Remote {
                op,
                key: key.to_owned(),
                message,
                transient: s >= 500 || s == 429,
            }),
        }
    }

    async fn post_json(
        &self,
        op: &'static str,
        key: &str,
        path: &str,
        v: Value,
    ) -> Result<Value, StorageError> {
        let body = Bytes::from(v.to_string());
        let r = self
            .call(
                op,
                key,
                reqwest::Method::POST,
                path,
                Some(("application/json", body)),
            )
            .await?;
        let b = Self::expect_ok(op, key, r)?;
        serde_json::from_slice(&b).map_err(|e| StorageError::Remote {
            op,
            key: key.to_owned(),
            message: format!("the gateway's answer is not JSON: {e}"),
            transient: false,
        })
    }

    /// PUTs `body` to a presigned URL; returns the ETag the bucket gave.
    async fn put_url(&self, key: &str, url: &str, body: Bytes) -> Result<String, StorageError> {
        let i = &self.inner;
        let mut attempt = 0;
        loop {
            attempt += 1;
            i.counts.sent(RequestKind::Multipart);
            let res = i.http.put(url).body(body.clone()).send().await;
            let why = match res {
                Ok(r) if r.status().is_success() => {
                    return Ok(r
                        .headers()
                        .get("etag")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned());
                }
                // A URL for another key, or one that expired, is refused by the bucket
                // (403): no retry can change that.
                Ok(r) if r.status().is_client_error() => {
                    return Err(StorageError::Denied {
                        op: "PUT (presigned)",
                        key: key.to_owned(),
                        message: format!(
                            "the bucket refused the upload URL ({}); it may have expired",
                            r.status()
                        ),
                    });
                }
                Ok(r) => format!("{}", r.status()),
                Err(e) => e.without_url().to_string(),
            };
            if attempt >= ATTEMPTS {
                return Err(StorageError::Unavailable {
                    op: "PUT (presigned)",
                    key: key.to_owned(),
                    message: why,
                    timeout: false,
                });
            }
            i.counts.retried();
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
    }

    /// Uploads on a grant: the bytes of `prefix` first, then the rest of `body`.
    async fn granted_upload(
        &self,
        key: &str,
        size_hint: u64,
        mut body: mpsc::Receiver<Bytes>,
        prefix: Bytes,
    ) -> Result<GatewayStaged, StorageError> {
        let v = self
            .post_json(
                "grant",
                key,
                "uploads",
                json!({ "key": key, "size": size_hint }),
            )
            .await?;
        let grant: crate::gateway::push::UploadGrant =
            serde_json::from_value(v).map_err(|e| StorageError::Remote {
                op: "grant",
                key: key.to_owned(),
                message: format!("unexpected answer: {e}"),
                transient: false,
            })?;
        let mut staged = GatewayStaged {
            target: self.clone(),
            key: key.to_owned(),
            id: grant.id.clone(),
            etags: Vec::new(),
            size: 0,
            inline: None,
        };
        let sent = async {
            if let Some(url) = &grant.url {
                let limit = crate::gateway::push::SINGLE_PUT_MAX as usize * 2;
                let mut buf = BytesMut::from(&prefix[..]);
                while let Some(b) = body.recv().await {
                    buf.extend_from_slice(&b);
                    if buf.len() > limit {
                        return Err(StorageError::Remote {
                            op: "PUT (presigned)",
                            key: key.to_owned(),
                            message: format!(
                                "more than {limit} bytes for a single-PUT grant of a {size_hint}-byte NAR"
                            ),
                            transient: false,
                        });
                    }
                }
                staged.size = buf.len() as u64;
                self.put_url(key, url, buf.freeze()).await?;
                return Ok(());
            }
            let part_size = grant.part_size.max(5 << 20) as usize;
            let mut part = BytesMut::with_capacity(part_size);
            part.extend_from_slice(&prefix);
            let mut n = 0usize;
            loop {
                let next = body.recv().await;
                if let Some(b) = &next {
                    part.extend_from_slice(b);
                }
                while part.len() >= part_size || (next.is_none() && (!part.is_empty() || n == 0))
                {
                    let take = part.len().min(part_size);
                    let chunk = part.split_to(take).freeze();
                    let Some(url) = grant.parts.get(n) else {
                        return Err(StorageError::Remote {
                            op: "UploadPart (presigned)",
                            key: key.to_owned(),
                            message: format!(
                                "the NAR compressed to more than the {} parts granted",
                                grant.parts.len()
                            ),
                            transient: false,
                        });
                    };
                    staged.size += chunk.len() as u64;
                    let etag = self.put_url(key, url, chunk).await?;
                    staged.etags.push(etag);
                    n += 1;
                    if part.is_empty() && next.is_none() {
                        break;
                    }
                }
                if next.is_none() {
                    return Ok(());
                }
            }
        }
        .await;
        match sent {
            Ok(()) => Ok(staged),
            Err(e) => {
                staged.abort().await;
                Err(e)
            }
        }
    }

    fn note(&self, text: &str) {
        if let Ok(mut n) = self.inner.notes.lock()
            && !n.iter().any(|t| t == text)
        {
            n.push(text.to_owned());
        }
    }
}

/// An upload granted and sent, or a small NAR kept to go along with its narinfo.
pub struct GatewayStaged {
    target: GatewayTarget,
    key: String,
    id: String,
    etags: Vec<String>,
    size: u64,
    inline: Option<Bytes>,
}

impl Staged for GatewayStaged {
    async fn commit(self) -> Result<u64, StorageError> {
        if let Some(bytes) = self.inline {
            let size = bytes.len() as u64;
            let kept = {
                let mut m = self
                    .target
                    .inner
                    .inline
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if let Some((_, n)) = m.0.get_mut(&self.key) {
                    *n += 1;
                    true
                } else if m.1 + bytes.len() <= INLINE_BUDGET {
                    m.1 += bytes.len();
                    m.0.insert(self.key.clone(), (bytes.clone(), 1));
                    true
                } else {
                    false
                }
            };
            if !kept {
                // Too many waiting: this one goes to the bucket now, on a grant.
                let (tx, rx) = mpsc::channel(1);
                let _ = tx.send(bytes).await;
                drop(tx);
                let staged = self
                    .target
                    .granted_upload(&self.key, size, rx, Bytes::new())
                    .await?;
                return staged.commit_upload().await;
            }
            return Ok(size);
        }
        self.commit_upload().await
    }

    async fn abort(self) {
        if self.inline.is_some() {
            return;
        }
        let _ = self
            .target
            .call(
                "abort upload",
                &self.key,
                reqwest::Method::POST,
                &format!("uploads/{}/abort", self.id),
                None,
            )
            .await;
    }
}

impl GatewayStaged {
    async fn commit_upload(self) -> Result<u64, StorageError> {
        if self.etags.is_empty() {
            // A single PUT: whole once the bucket took it.
            return Ok(self.size);
        }
        let v = json!({ "etags": self.etags });
        self.target
            .post_json(
                "complete upload",
                &self.key,
                &format!("uploads/{}/complete", self.id),
                v,
            )
            .await?;
        Ok(self.size)
    }
}

/// Refuses what a gateway does not take, naming the key.
fn not_through_gateway(key: &str) -> StorageError {
    StorageError::Config(format!(
        "{key}: a gateway takes NARs and narinfos only (no --pin, --logs or NAR listings through a gateway)"
    ))
}

impl Storage for GatewayTarget {
    type Staged = GatewayStaged;

    fn describe(&self) -> String {
        self.inner.base.clone()
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        if layout::narinfo_hash(key).is_some() {
            let there = self.exists_many(&[key.to_owned()]).await?;
            return Ok(there
                .and_then(|v| v.first().copied())
                .filter(|b| *b)
                .map(|_| 0));
        }
        Ok(None)
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        if key != layout::CACHE_INFO {
            // The gateway keeps gc's records itself: a pusher sees none.
            return Ok(None);
        }
        let r = self
            .call("GET", key, reqwest::Method::GET, "cache-info", None)
            .await?;
        Self::expect_ok("GET", key, r).map(Some)
    }

    async fn put(&self, key: &str, _ct: &'static str, body: Bytes) -> Result<(), StorageError> {
        if layout::narinfo_hash(key).is_some() {
            // Its NAR, when it is small and waiting to go along.
            let nar = std::str::from_utf8(&body)
                .ok()
                .and_then(|t| crate::format::NarInfo::parse(t).ok())
                .and_then(|ni| {
                    let mut m = self.inner.inline.lock().unwrap_or_else(|e| e.into_inner());
                    let (b, n) = m.0.get_mut(&ni.url)?;
                    let b = b.clone();
                    *n -= 1;
                    if *n == 0 {
                        m.0.remove(&ni.url);
                        m.1 -= b.len();
                    }
                    Some(b)
                });
            let payload = match &nar {
                Some(bytes) => (
                    "application/json",
                    Bytes::from(
                        json!({
                            "narinfo": String::from_utf8_lossy(&body),
                            "nar": base64::engine::general_purpose::STANDARD.encode(bytes),
                        })
                        .to_string(),
                    ),
                ),
                None => (crate::storage::content_type::NARINFO, body),
            };
            let r = self
                .call(
                    "publish",
                    key,
                    reqwest::Method::POST,
                    "narinfo",
                    Some(payload),
                )
                .await?;
            let b = Self::expect_ok("publish", key, r)?;
            if serde_json::from_slice::<Value>(&b)
                .ok()
                .and_then(|v| v.get("quarantine").and_then(Value::as_bool))
                == Some(true)
            {
                self.note("published into the gateway's quarantine prefix (a separate cache, unsigned): this job's identity matched the quarantine rules, not the push rules");
            }
            return Ok(());
        }
        // The push's gc lease: the gateway publishes each narinfo after checking that
        // its references exist, so a pusher's lease has nothing to protect.
        if key.starts_with(layout::PUSHES_DIR) {
            return Ok(());
        }
        Err(not_through_gateway(key))
    }

    async fn put_if_absent(
        &self,
        key: &str,
        _ct: &'static str,
        _body: Bytes,
    ) -> Result<bool, StorageError> {
        if key == layout::CACHE_INFO {
            // The gateway writes `nix-cache-info` with the first narinfo it publishes.
            return Ok(false);
        }
        Err(not_through_gateway(key))
    }

    async fn stage(
        &self,
        key: &str,
        _ct: &'static str,
        size_hint: u64,
        mut body: mpsc::Receiver<Bytes>,
    ) -> Result<GatewayStaged, StorageError> {
        // A NAR that compresses to little goes along with its narinfo: no grant, no PUT.
        let mut prefix = BytesMut::new();
        loop {
            match body.recv().await {
                Some(b) => {
                    prefix.extend_from_slice(&b);
                    if prefix.len() as u64 > crate::gateway::push::INLINE_MAX {
                        break;
                    }
                }
                None => {
                    return Ok(GatewayStaged {
                        target: self.clone(),
                        key: key.to_owned(),
                        id: String::new(),
                        etags: Vec::new(),
                        size: prefix.len() as u64,
                        inline: Some(prefix.freeze()),
                    });
                }
            }
        }
        self.granted_upload(key, size_hint, body, prefix.freeze())
            .await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        if key.starts_with(layout::PUSHES_DIR) {
            return Ok(());
        }
        Err(not_through_gateway(key))
    }

    async fn list(&self, _prefix: &str) -> Result<Vec<String>, StorageError> {
        Ok(Vec::new())
    }

    async fn read(&self, _key: &str) -> Result<Option<ObjectBytes>, StorageError> {
        Ok(None)
    }

    async fn read_range(
        &self,
        _key: &str,
        _range: Option<ByteRange>,
    ) -> Result<StreamOutcome, StorageError> {
        Ok(StreamOutcome::NotFound)
    }

    async fn exists_many(&self, keys: &[String]) -> Result<Option<Vec<bool>>, StorageError> {
        let mut out = Vec::with_capacity(keys.len());
        for batch in keys.chunks(MISSING_BATCH) {
            let hashes: Vec<&str> = batch
                .iter()
                .map(|k| layout::narinfo_hash(k).unwrap_or(k.as_str()))
                .collect();
            let v = self
                .post_json(
                    "missing",
                    "narinfos",
                    "missing",
                    json!({ "hashes": hashes }),
                )
                .await?;
            let missing: std::collections::HashSet<&str> = v
                .get("missing")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            out.extend(hashes.iter().map(|h| !missing.contains(h)));
        }
        Ok(Some(out))
    }

    fn stats(&self) -> RequestStats {
        self.inner.counts.snapshot()
    }

    fn notes(&self) -> Vec<String> {
        self.inner
            .notes
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default()
    }
}
