//! `cachepush gateway`: a read-through HTTP server that speaks the Nix binary-cache protocol
//! to clients and S3 to a private bucket.
//!
//! Decisions, in the order a request meets them:
//! 1. method (GET and HEAD only) and request-target shape ([`route`]): refused requests
//!    never cause a request to the bucket;
//! 2. authentication ([`auth`]), when configured: failures are 401 with
//!    `WWW-Authenticate: Basic`, never 403 or 404, which Nix reads as "absent";
//! 3. narinfo and `nix-cache-info` from a bounded TTL cache ([`cache`]) or the bucket,
//!    optionally signed with the gateway's own key;
//! 4. NARs by redirect to a presigned GET URL, or proxied as a stream (with Range);
//!    HEAD is always answered here, as a presigned GET URL cannot answer a HEAD.
//!
//! Bucket 404 is 404; every other bucket failure is 502/503/504, so a client never caches
//! an outage as "absent". Error bodies are generic; details go to the log.

pub mod auth;
pub mod cache;
pub mod limit;
pub mod metrics;
pub mod route;
pub mod sign;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};

use crate::storage::{S3Bucket, Storage, StorageError, StreamOutcome, content_type};
use auth::Auth;
use cache::{Cached, SmallCache};
use limit::{CheckOutcome, Flight, NotChecked, PasswordChecks, SingleFlight};
use metrics::Metrics;
use route::{Reject, Route};
use sha2::Digest;
use sign::{Countersigned, Countersigner};

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// How long a bucket check answers for `/healthz` and for 404s that a HEAD cannot explain.
const HEALTH_TTL: Duration = Duration::from_secs(2);
/// Largest narinfo or `nix-cache-info` read into memory; real ones are a few KiB.
const MAX_SMALL_OBJECT: u64 = 1024 * 1024;

/// Where to accept connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;
    /// `127.0.0.1:8080`, `[::1]:8080`, `unix:/run/x.sock` or an absolute socket path.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(Listen::Unix(PathBuf::from(s)));
        }
        s.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
            format!("{s:?} is not an address to listen on (use 127.0.0.1:8080, [::1]:8080 or unix:/path/to.sock)")
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// 307 to a presigned GET URL: NAR bytes flow from the bucket to the client.
    Redirect,
    /// Streamed through the gateway.
    Proxy,
}

impl std::str::FromStr for Delivery {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "redirect" => Ok(Delivery::Redirect),
            "proxy" => Ok(Delivery::Proxy),
            _ => Err(format!(
                "unknown NAR delivery {s:?} (use redirect or proxy)"
            )),
        }
    }
}

pub struct GatewayConfig {
    pub listen: Vec<Listen>,
    pub delivery: Delivery,
    /// Lifetime of presigned NAR URLs.
    pub presign_ttl: Duration,
    pub narinfo_ttl: Duration,
    pub negative_ttl: Duration,
    pub cache_entries: usize,
    /// Countersigning (`--signing-key` with its policy); see [`sign`].
    pub signer: Option<Countersigner>,
    pub auth: Option<Auth>,
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    pub access_log: bool,
    /// For the `nix-cache-info` served when the bucket has none.
    pub store_dir: String,
    pub priority: u32,
    /// Longest time a client may take to send its request head, and to start its first
    /// request after connecting (for HTTP/1 and HTTP/2 alike).
    pub header_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// A connection with a response in flight that makes no progress (a client that stops
    /// reading a proxied NAR) is closed after this long.
    pub send_timeout: Duration,
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Failed password checks a peer may cause per minute (0: no per-peer limit).
    pub auth_failures_per_minute: u32,
    pub cache_control: CacheControl,
}

/// Whether shared caches (CDNs, proxies) may store responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheControl {
    /// `public` without authentication; `private` plus `Vary: Authorization` with it, so a
    /// shared cache never hands one client's authenticated answer to another.
    Auto,
    /// Always `public`: for deployments where the CDN itself authenticates every client.
    Public,
}

impl std::str::FromStr for CacheControl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(CacheControl::Auto),
            "public" => Ok(CacheControl::Public),
            _ => Err(format!(
                "unknown --cache-control {s:?} (use auto, or public when a CDN in front authenticates every client)"
            )),
        }
    }
}

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
}

struct State {
    bucket: S3Bucket,
    auth: Option<Arc<Auth>>,
    checks: PasswordChecks,
    flights: SingleFlight,
    /// The last bucket check and when it ran: `/healthz` asks the bucket at most once per
    /// [`HEALTH_TTL`], however often it is called (it needs no credentials).
    health: tokio::sync::Mutex<Option<(Instant, Result<(), Refusal>)>>,
    cfg: GatewayConfig,
    cache: SmallCache,
    metrics: Metrics,
    public_key: Option<String>,
}

fn log(line: &str) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    eprintln!("{secs:.3} {line}");
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(full(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn storage_status(e: &StorageError) -> (StatusCode, &'static str) {
    match e {
        StorageError::Unavailable { timeout: true, .. } => {
            (StatusCode::GATEWAY_TIMEOUT, "the cache storage timed out\n")
        }
        StorageError::Unavailable { .. }
        | StorageError::Remote {
            transient: true, ..
        } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the cache storage is unavailable\n",
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            "the cache storage answered with an error\n",
        ),
    }
}

/// A failed answer: the status and the generic body text (details go to the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Refusal(StatusCode, &'static str);

impl From<Refusal> for Response<Body> {
    fn from(r: Refusal) -> Self {
        plain(r.0, r.1)
    }
}

impl State {
    fn storage_failure(&self, route: &Route, e: &StorageError) -> Refusal {
        log(&format!("error: {} {e}", route.label()));
        let (status, text) = storage_status(e);
        Refusal(status, text)
    }

    /// narinfo / nix-cache-info: from memory, else from the bucket (and remembered).
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
        let got = self.bucket.get_limited(key, Some(MAX_SMALL_OBJECT)).await;
        self.metrics.upstream(started.elapsed());
        let got = got.map_err(|e| self.storage_failure(route, &e))?;
        let got = match (got, route) {
            (Some(text), Route::NarInfo(hash)) => Some(self.sign(route, hash, text)?),
            (other, _) => other,
        };
        self.cache.put(key, got.clone());
        Ok(got)
    }

    /// Adds the gateway's signature to a narinfo from the bucket, when its policy allows.
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
                Err(Refusal(
                    StatusCode::BAD_GATEWAY,
                    "the cache holds an unusable narinfo\n",
                ))
            }
        }
    }

    async fn handle(
        &self,
        req: &Request<Incoming>,
        peer: Option<IpAddr>,
    ) -> (Response<Body>, &'static str) {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return (r, "other");
        }
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let route = match Route::parse(target) {
            Ok(r) => r,
            Err(Reject::BadRequest(_)) => {
                return (plain(StatusCode::BAD_REQUEST, "bad request\n"), "other");
            }
            Err(Reject::TooLong) => {
                return (plain(StatusCode::URI_TOO_LONG, "URI too long\n"), "other");
            }
            Err(Reject::NotFound) => return (plain(StatusCode::NOT_FOUND, "not found\n"), "other"),
        };
        let label = route.label();
        if !matches!(route, Route::Healthz | Route::Metrics)
            && let Err(r) = self.authorize(req, peer).await
        {
            return (r, label);
        }
        let head = req.method() == Method::HEAD;
        let resp = match &route {
            Route::Healthz => self.healthz().await,
            Route::Metrics => {
                let mut r = Response::new(full(
                    self.metrics.render(self.bucket.stats(), self.cache.len()),
                ));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            Route::Version => plain(
                StatusCode::OK,
                concat!("cachepush ", env!("CARGO_PKG_VERSION"), "\n"),
            ),
            Route::PublicKey => match &self.public_key {
                Some(k) => {
                    let mut r = Response::new(full(format!("{k}\n")));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                    r
                }
                None => plain(StatusCode::NOT_FOUND, "no signing key configured\n"),
            },
            Route::CacheInfo => self.cache_info(&route).await,
            Route::NarInfo(_) => self.narinfo(&route).await,
            Route::Nar(_) => self.nar(&route, req, head).await,
            Route::Listing(_) | Route::Log(_) => self.proxy(&route, req, head).await,
        };
        (resp, label)
    }

    /// Lets the request through, or answers it: 401 for missing or wrong credentials; 503
    /// or 429 when the credential could not be checked now (never 401, which Nix would
    /// read as "absent" and remember).
    async fn authorize(
        &self,
        req: &Request<Incoming>,
        peer: Option<IpAddr>,
    ) -> Result<(), Response<Body>> {
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        let h = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let ok = match auth.check_cached(h) {
            Some(answer) => answer,
            None => {
                let key: [u8; 32] = sha2::Sha256::digest(h.unwrap_or_default()).into();
                let outcome = loop {
                    match self.flights.join(key) {
                        Flight::Leader(lead) => {
                            let outcome = self.check_slowly(auth, h, peer).await;
                            lead.publish(outcome);
                            break outcome;
                        }
                        Flight::Follower(rx) => {
                            if let Some(outcome) = SingleFlight::wait(rx).await {
                                break outcome;
                            }
                        }
                    }
                };
                match outcome {
                    Ok(ok) => ok,
                    Err(why) => return Err(self.not_checked(why)),
                }
            }
        };
        if ok {
            return Ok(());
        }
        self.metrics.auth_failure();
        let mut r = plain(StatusCode::UNAUTHORIZED, "authentication required\n");
        if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{}\"", auth.realm)) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        Err(r)
    }

    /// One bcrypt run for a credential not seen (or not remembered) yet.
    async fn check_slowly(
        &self,
        auth: &Arc<Auth>,
        h: Option<&[u8]>,
        peer: Option<IpAddr>,
    ) -> CheckOutcome {
        let mut slot = self.checks.acquire(peer).await?;
        // bcrypt takes milliseconds: keep it off the async workers, and keep the CPU slot
        // until it has finished even if the client hangs up.
        let permit = slot.take_permit();
        let h = h.map(<[u8]>::to_vec);
        let auth = auth.clone();
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            auth.check(h.as_deref())
        })
        .await
        .unwrap_or(false);
        slot.finish(ok);
        Ok(ok)
    }

    fn not_checked(&self, why: NotChecked) -> Response<Body> {
        let (status, text, wait) = match why {
            NotChecked::Busy => {
                self.metrics.auth_busy();
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many password checks at once; try again\n",
                    Duration::from_secs(1),
                )
            }
            NotChecked::Limited { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed logins from this address; try again later\n",
                retry_after,
            ),
        };
        let mut r = plain(status, text);
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(wait.as_secs().max(1)),
        );
        r
    }

    /// Sets `Cache-Control` for a response that may be stored for `directives` (e.g.
    /// `max-age=60`): `public` only where no credentials were needed to get it, or where
    /// the operator said a CDN in front authenticates (security review M4).
    fn cacheable(&self, r: &mut Response<Body>, directives: &str) {
        let public = self.auth.is_none() || self.cfg.cache_control == CacheControl::Public;
        let value = format!(
            "{}, {directives}",
            if public { "public" } else { "private" }
        );
        if let Ok(v) = HeaderValue::from_str(&value) {
            r.headers_mut().insert(header::CACHE_CONTROL, v);
        }
        if !public {
            r.headers_mut()
                .insert(header::VARY, HeaderValue::from_static("authorization"));
        }
    }

    /// Whether the bucket exists and answers, asked at most once per [`HEALTH_TTL`] (one
    /// caller asks, the others wait for its answer).
    async fn bucket_health(&self) -> Result<(), Refusal> {
        let mut last = self.health.lock().await;
        if let Some((at, answer)) = *last
            && at.elapsed() < HEALTH_TTL
        {
            return answer;
        }
        let started = Instant::now();
        let res = self.bucket.check_bucket().await;
        self.metrics.upstream(started.elapsed());
        let answer = match res {
            Ok(()) => Ok(()),
            // A server without HeadBucket: an object HEAD at least proves it answers.
            Err(StorageError::Remote { ref message, .. })
                if message.contains("HTTP 501") || message.contains("NotImplemented") =>
            {
                match self.bucket.head("nix-cache-info").await {
                    Ok(_) => Ok(()),
                    Err(e) => Err(self.storage_failure(&Route::Healthz, &e)),
                }
            }
            Err(e) => Err(self.storage_failure(&Route::Healthz, &e)),
        };
        *last = Some((Instant::now(), answer));
        answer
    }

    async fn healthz(&self) -> Response<Body> {
        match self.bucket_health().await {
            Ok(()) => plain(StatusCode::OK, "ok\n"),
            Err(_) => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the cache storage is unavailable\n",
            ),
        }
    }

    async fn cache_info(&self, route: &Route) -> Response<Body> {
        let body = match self.small_object(route, "nix-cache-info").await {
            Ok(Some(b)) => b,
            // A bucket filled by a tool that writes no nix-cache-info still works.
            Ok(None) => Bytes::from(format!(
                "StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n",
                self.cfg.store_dir, self.cfg.priority
            )),
            Err(r) => return r.into(),
        };
        let mut r = Response::new(full(body));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(content_type::CACHE_INFO),
        );
        self.cacheable(&mut r, "max-age=3600");
        r
    }

    async fn narinfo(&self, route: &Route) -> Response<Body> {
        let key = route.object_key().unwrap_or_default();
        match self.small_object(route, &key).await {
            Ok(Some(b)) => {
                let mut r = Response::new(full(b));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(content_type::NARINFO),
                );
                self.cacheable(&mut r, "max-age=60");
                r
            }
            Ok(None) => {
                let mut r = plain(StatusCode::NOT_FOUND, "not found\n");
                self.cacheable(&mut r, "max-age=60");
                r
            }
            Err(r) => r.into(),
        }
    }

    async fn nar(&self, route: &Route, req: &Request<Incoming>, head: bool) -> Response<Body> {
        let key = route.object_key().unwrap_or_default();
        if head {
            let started = Instant::now();
            let res = self.bucket.head(&key).await;
            self.metrics.upstream(started.elapsed());
            return match res {
                Ok(Some(len)) => {
                    let mut r = Response::new(empty());
                    let h = r.headers_mut();
                    h.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(content_type::NAR),
                    );
                    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
                    r
                }
                // A HEAD's 404 has no error code: absent object or absent bucket?
                Ok(None) => match self.bucket_health().await {
                    Ok(()) => plain(StatusCode::NOT_FOUND, "not found\n"),
                    Err(r) => r.into(),
                },
                Err(e) => self.storage_failure(route, &e).into(),
            };
        }
        match self.cfg.delivery {
            Delivery::Proxy => self.proxy(route, req, false).await,
            Delivery::Redirect => match self.bucket.presign_get(&key, self.cfg.presign_ttl).await {
                Ok(url) => match HeaderValue::from_str(&url) {
                    Ok(loc) => {
                        let mut r = Response::new(empty());
                        *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                        r.headers_mut().insert(header::LOCATION, loc);
                        // The URL carries a signature that expires: never store it.
                        r.headers_mut()
                            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                        r
                    }
                    Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n"),
                },
                Err(e) => self.storage_failure(route, &e).into(),
            },
        }
    }

    /// Streams an object from the bucket, honouring a single `Range`.
    async fn proxy(&self, route: &Route, req: &Request<Incoming>, head: bool) -> Response<Body> {
        let key = route.object_key().unwrap_or_default();
        let range = match range_of(req.headers().get(header::RANGE)) {
            RangeAsk::Whole => None,
            RangeAsk::Part(r) => Some(r),
            RangeAsk::Unsatisfiable => {
                return plain(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable\n");
            }
        };
        let started = Instant::now();
        let res = self.bucket.get_stream(&key, range.as_deref()).await;
        self.metrics.upstream(started.elapsed());
        let obj = match res {
            Ok(StreamOutcome::Found(o)) => o,
            Ok(StreamOutcome::NotFound) => return plain(StatusCode::NOT_FOUND, "not found\n"),
            Ok(StreamOutcome::RangeNotSatisfiable) => {
                return plain(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable\n");
            }
            Err(e) => return self.storage_failure(route, &e).into(),
        };
        let mut builder = Response::builder()
            .status(if obj.content_range.is_some() {
                StatusCode::PARTIAL_CONTENT
            } else {
                StatusCode::OK
            })
            .header(header::ACCEPT_RANGES, "bytes");
        let ct = match route {
            Route::Nar(_) => content_type::NAR,
            Route::Listing(_) => content_type::LISTING,
            _ => content_type::LOG,
        };
        builder = builder.header(header::CONTENT_TYPE, ct);
        if let Some(n) = obj.length {
            builder = builder.header(header::CONTENT_LENGTH, n);
        }
        if let Some(cr) = &obj.content_range {
            builder = builder.header(header::CONTENT_RANGE, cr.as_str());
        }
        if let Some(e) = &obj.etag {
            builder = builder.header(header::ETAG, e.as_str());
        }
        let body = if head {
            empty()
        } else {
            let stream = obj.into_stream().map_ok(Frame::data);
            StreamBody::new(stream).boxed_unsync()
        };
        let mut r = builder
            .body(body)
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n"));
        if matches!(route, Route::Nar(_)) && r.status().is_success() {
            // NARs are named by their hash: the bytes under a name never change.
            self.cacheable(&mut r, "max-age=31536000, immutable");
        }
        r
    }
}

/// What a `Range` header asks of the bucket.
#[derive(Debug, PartialEq, Eq)]
enum RangeAsk {
    Whole,
    /// One `bytes=A-B`, `bytes=A-` or `bytes=-N` range, passed on to the bucket as given.
    Part(String),
    /// `bytes=-0`: the empty suffix, which no object can satisfy.
    Unsatisfiable,
}

/// RFC 9110 §14.2: a server may ignore `Range`, and must ignore one it cannot parse; so a
/// malformed header, another unit, or several ranges (which Nix never sends) get the whole
/// object, 200, rather than an error.
fn range_of(v: Option<&HeaderValue>) -> RangeAsk {
    let Some(r) = v.and_then(|v| v.to_str().ok()) else {
        return RangeAsk::Whole;
    };
    let r = r.trim();
    let Some(spec) = r
        .get(..6)
        .filter(|u| u.eq_ignore_ascii_case("bytes="))
        .map(|_| r[6..].trim())
    else {
        return RangeAsk::Whole;
    };
    let Some((a, b)) = spec.split_once('-') else {
        return RangeAsk::Whole;
    };
    let num = |s: &str| {
        (!s.is_empty() && s.len() <= 19 && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    match (num(a), num(b), a.is_empty(), b.is_empty()) {
        (Some(x), None, false, true) => RangeAsk::Part(format!("bytes={x}-")),
        (None, Some(0), true, false) => RangeAsk::Unsatisfiable,
        (None, Some(n), true, false) => RangeAsk::Part(format!("bytes=-{n}")),
        (Some(x), Some(y), false, false) if x <= y => RangeAsk::Part(format!("bytes={x}-{y}")),
        _ => RangeAsk::Whole,
    }
}

/// Who is on the other end of a connection: the text for the access log, and the address
/// that per-peer limits count (none for unix sockets).
#[derive(Clone)]
struct Peer {
    label: Arc<str>,
    ip: Option<IpAddr>,
}

/// What one connection is doing, for the watchdog that closes idle and stalled ones.
///
/// hyper bounds the time to read an HTTP/1 request head, but not the time before the
/// protocol is known (a client that connects and sends nothing, or only the HTTP/2
/// preface), nor an idle HTTP/2 connection, nor a client that stops reading a response:
/// each of those would hold a socket and a task for ever (security review M1).
struct Activity {
    opened: Instant,
    /// Milliseconds after `opened` of the last sign of progress.
    last: AtomicU64,
    requests: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            last: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last.fetch_max(ms, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }

    /// Resolves when the connection has been quiet longer than its current limit: the
    /// header timeout before the first request, the send timeout while a response is in
    /// flight, the idle timeout between requests.
    async fn expired(&self, cfg: &GatewayConfig) {
        loop {
            let limit = if self.in_flight.load(Ordering::Relaxed) > 0 {
                cfg.send_timeout
            } else if self.requests.load(Ordering::Relaxed) == 0 {
                cfg.header_timeout
            } else {
                cfg.idle_timeout
            };
            let quiet = self.quiet_for();
            if quiet >= limit {
                return;
            }
            tokio::time::sleep(limit - quiet).await;
        }
    }
}

/// Counts a response as in flight until its body is dropped (sent, or the client gone).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(a: &Arc<Activity>) -> Self {
        a.requests.fetch_add(1, Ordering::Relaxed);
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        a.touch();
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

async fn serve_request(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: Peer,
    activity: Arc<Activity>,
) -> Result<Response<Body>, Infallible> {
    let guard = InFlight::start(&activity);
    let started = Instant::now();
    let (mut resp, label) = state.handle(&req, peer.ip).await;
    if req.method() == Method::HEAD {
        // Same headers as GET, no body. HTTP/1 drops a HEAD body by itself; HTTP/2 would
        // send it as DATA frames, which clients treat as a protocol error.
        if let Some(n) = hyper::body::Body::size_hint(resp.body()).exact()
            && n > 0
            && !resp.headers().contains_key(header::CONTENT_LENGTH)
        {
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        *resp.body_mut() = empty();
    }
    let status = resp.status().as_u16();
    state.metrics.request(label, status);
    let len = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or_else(|| hyper::body::Body::size_hint(resp.body()).exact())
        .unwrap_or(0);
    if req.method() != Method::HEAD {
        state.metrics.bytes(len);
    }
    if state.cfg.access_log {
        // The path only: never a query string, and never the presigned Location.
        log(&format!(
            "{} {} {} {status} {len} {:.1}ms",
            peer.label,
            req.method(),
            req.uri().path().chars().take(200).collect::<String>(),
            started.elapsed().as_secs_f64() * 1000.0
        ));
    }
    // Every frame the client takes is progress; the guard goes with the body.
    Ok(resp.map(|body| Tracked { inner: body, guard }.boxed_unsync()))
}

/// A response body that reports each frame taken as progress of its connection and counts
/// as in flight until dropped. Size hints pass through, so `Content-Length` is kept.
struct Tracked {
    inner: Body,
    guard: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_ready() {
            self.guard.0.touch();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Raises the soft limit on open files to the hard limit: every connection is a file
/// descriptor, and the usual soft limit of 1024 would make a thousand idle sockets lock
/// everyone out (and the gateway's own bucket connections with them). Returns the limit
/// now in force.
pub fn raise_open_file_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    // rlim_t is u64 on Linux but not on every Unix.
    #[allow(clippy::unnecessary_cast)]
    Some(lim.rlim_cur as u64)
}

/// A TCP listener with a backlog of 4096 (std's 128 drops SYNs under a burst of
/// connections, and each dropped SYN costs the client a one-second retransmit).
fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}

/// Binds every listener, then serves until `shutdown` resolves, then lets requests in
/// flight finish (up to 30 s).
pub async fn serve(
    mut cfg: GatewayConfig,
    bucket: S3Bucket,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GatewayError> {
    let public_key = cfg.signer.as_ref().map(|k| k.public().to_string());
    let slots = std::thread::available_parallelism().map_or(2, |n| n.get());
    let state = Arc::new(State {
        bucket,
        auth: cfg.auth.take().map(Arc::new),
        // A request waits up to 2 s for a password check slot, then gets a 503.
        checks: PasswordChecks::new(slots, Duration::from_secs(2), cfg.auth_failures_per_minute),
        flights: SingleFlight::default(),
        health: tokio::sync::Mutex::new(None),
        cache: SmallCache::new(cfg.cache_entries, cfg.narinfo_ttl, cfg.negative_ttl),
        metrics: Metrics::default(),
        public_key,
        cfg,
    });

    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Conn, Peer)>(64);
    let mut acceptors = tokio::task::JoinSet::new();
    for l in &state.cfg.listen {
        match l {
            Listen::Tcp(addr) => {
                let listener = bind_tcp(*addr).map_err(|source| GatewayError::Listen {
                    addr: l.to_string(),
                    source,
                })?;
                // Port 0 asks for any free port: say which one we got.
                let bound = listener
                    .local_addr()
                    .map_or(l.to_string(), |a| a.to_string());
                log(&format!(
                    "listening on {}://{bound}",
                    if state.cfg.tls.is_some() {
                        "https"
                    } else {
                        "http"
                    }
                ));
                let tx = tx.clone();
                acceptors.spawn(async move {
                    loop {
                        match listener.accept().await {
                            Ok((s, peer)) => {
                                let _ = s.set_nodelay(true);
                                let peer = Peer {
                                    label: peer.to_string().into(),
                                    ip: Some(peer.ip()),
                                };
                                if tx.send((Conn::Tcp(s), peer)).await.is_err() {
                                    return;
                                }
                            }
                            // Out of file descriptors and the like: wait, do not spin.
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                });
            }
            Listen::Unix(path) => {
                // A socket left by a previous run would make bind fail; anything else
                // at that path is not ours to remove.
                if let Ok(m) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if m.file_type().is_socket() {
                        let _ = std::fs::remove_file(path);
                    }
                }
                let listener = UnixListener::bind(path).map_err(|source| GatewayError::Listen {
                    addr: l.to_string(),
                    source,
                })?;
                log(&format!("listening on {l}"));
                let tx = tx.clone();
                acceptors.spawn(async move {
                    loop {
                        match listener.accept().await {
                            Ok((s, _)) => {
                                let peer = Peer {
                                    label: Arc::from("unix"),
                                    ip: None,
                                };
                                if tx.send((Conn::Unix(s), peer)).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                });
            }
        }
    }
    drop(tx);

    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.cfg.header_timeout)
        // Bounds the request head: a bigger one is answered 431 without reaching us.
        .max_buf_size(16 * 1024)
        .max_headers(64);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(16 * 1024)
        // Nix opens a few streams per connection; hyper's default of 200 only multiplies
        // what one unauthenticated connection can ask for.
        .max_concurrent_streams(64)
        // Pings find peers that vanished without closing (a dropped NAT entry).
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let tls = state.cfg.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(state.cfg.max_connections));
    tokio::pin!(shutdown);
    loop {
        let (conn, peer) = tokio::select! {
            c = rx.recv() => match c {
                Some(c) => c,
                None => break,
            },
            _ = &mut shutdown => break,
        };
        // Over the limit: close at once. Holding the socket would cost the descriptor
        // the limit is there to protect.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            state.metrics.connection_refused();
            drop(conn);
            continue;
        };
        let state = state.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let activity = Arc::new(Activity::new());
            let svc_activity = activity.clone();
            let svc_state = state.clone();
            let svc = hyper::service::service_fn(move |req| {
                serve_request(svc_state.clone(), req, peer.clone(), svc_activity.clone())
            });
            let served = async {
                match (conn, tls) {
                    (Conn::Tcp(s), Some(acceptor)) => {
                        let Ok(Ok(s)) =
                            tokio::time::timeout(state.cfg.header_timeout, acceptor.accept(s))
                                .await
                        else {
                            return;
                        };
                        let c = builder.serve_connection(TokioIo::new(s), svc).into_owned();
                        let _ = watcher.watch(c).await;
                    }
                    (Conn::Tcp(s), None) => {
                        let c = builder.serve_connection(TokioIo::new(s), svc).into_owned();
                        let _ = watcher.watch(c).await;
                    }
                    (Conn::Unix(s), _) => {
                        let c = builder.serve_connection(TokioIo::new(s), svc).into_owned();
                        let _ = watcher.watch(c).await;
                    }
                }
            };
            // Dropping the connection closes its socket.
            tokio::select! {
                _ = served => {}
                _ = activity.expired(&state.cfg) => {}
            }
        });
    }
    acceptors.abort_all();
    log("shutting down: waiting for requests in flight");
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        log("shutdown: gave up waiting for open connections after 30 s");
    }
    for l in &state.cfg.listen {
        if let Listen::Unix(p) = l {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(())
}

/// Loads a certificate chain and private key (PEM) for HTTPS.
pub fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, GatewayError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| GatewayError::Tls(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(GatewayError::Tls(format!(
            "{}: no certificate in the file",
            cert.display()
        )));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| GatewayError::Tls(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| GatewayError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| GatewayError::Tls(format!("{} and {}: {e}", cert.display(), key.display())))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let ask = |r: &str| range_of(Some(&HeaderValue::from_str(r).unwrap()));
        for (given, passed) in [
            ("bytes=0-99", "bytes=0-99"),
            ("bytes=100-", "bytes=100-"),
            ("bytes=-500", "bytes=-500"),
            ("bytes=5-5", "bytes=5-5"),
            ("Bytes=0-9", "bytes=0-9"),
            ("bytes= 0-9 ", "bytes=0-9"),
        ] {
            assert_eq!(ask(given), RangeAsk::Part(passed.into()), "{given}");
        }
        assert_eq!(ask("bytes=-0"), RangeAsk::Unsatisfiable);
        for ignored in [
            "bytes=0-1,5-6",
            "bytes=9-1",
            "bytes=-",
            "items=0-1",
            "bytes=a-b",
            "bytes=99999999999999999999-",
            "",
        ] {
            assert_eq!(ask(ignored), RangeAsk::Whole, "{ignored}");
        }
        assert_eq!(range_of(None), RangeAsk::Whole);
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "127.0.0.1:80".parse::<Listen>(),
            Ok(Listen::Tcp("127.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:80".parse::<Listen>(),
            Ok(Listen::Tcp("[::1]:80".parse().unwrap()))
        );
        assert_eq!(
            "unix:/run/x.sock".parse::<Listen>(),
            Ok(Listen::Unix("/run/x.sock".into()))
        );
        assert!("localhost".parse::<Listen>().is_err());
    }
}
