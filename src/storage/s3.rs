//! A binary cache in an S3-compatible bucket.
//!
//! Configured for every provider, not just AWS (see `shared/object-stores.md`):
//! - path-style addressing unless the endpoint is AWS (overridable);
//! - checksums only when an operation requires them, and bodies with a known length, so
//!   no `aws-chunked` encoding or trailers reach B2, R2, Ceph or SeaweedFS;
//! - our own retry loop (the SDK's is off) with exponential backoff, full jitter and
//!   `Retry-After`, so every retried request is visible to our accounting;
//! - objects below one part go in one PUT; larger ones go multipart with fixed-size parts
//!   (R2 requires equal parts), at most 10,000 of them, within a global memory budget.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    Region, RequestChecksumCalculation, ResponseChecksumValidation, retry::RetryConfig,
    timeout::TimeoutConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;

use futures::StreamExt;

use super::{
    ByteRange, ObjectStream, RequestStats, Staged, Storage, StorageError, StreamOutcome, TopPage,
};
use crate::format::layout;

/// S3 refuses more parts than this in one multipart upload.
pub const MAX_PARTS: u64 = 10_000;
/// S3's smallest part (all but the last).
pub const MIN_PART_SIZE: usize = 5 << 20;

/// Where and how to reach the bucket.
#[derive(Clone, Debug, Default)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix without leading or trailing slash; empty for the bucket root.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub profile: Option<String>,
    /// `None`: path-style for custom endpoints, virtual-hosted for AWS.
    pub path_style: Option<bool>,
    /// Multipart part size; objects smaller than this go in one PUT.
    pub part_size: usize,
    /// Parts buffered or in flight across all uploads (the memory budget in parts).
    pub parts_in_flight: usize,
    /// Attempts per request, including the first.
    pub max_attempts: u32,
    /// Longest wait for the next byte of a response.
    pub read_timeout: Duration,
}

impl S3Config {
    pub fn new(bucket: &str) -> Self {
        S3Config {
            bucket: bucket.to_owned(),
            part_size: 16 << 20,
            parts_in_flight: 8,
            max_attempts: 6,
            read_timeout: Duration::from_secs(120),
            ..S3Config::default()
        }
    }
}

/// Counts of requests by verb, for tests, `--json` and benchmarks.
#[derive(Debug, Default)]
pub struct RequestCounts {
    pub head: AtomicU64,
    pub get: AtomicU64,
    pub put: AtomicU64,
    pub multipart: AtomicU64,
    pub delete: AtomicU64,
    pub list: AtomicU64,
    pub retries: AtomicU64,
}

struct Inner {
    client: Client,
    cfg: S3Config,
    parts: Arc<Semaphore>,
    counts: RequestCounts,
    /// Multipart uploads started and not yet completed or aborted: upload id → key.
    open: Mutex<HashMap<String, String>>,
    credentials: Option<aws_sdk_s3::config::SharedCredentialsProvider>,
}

#[derive(Clone)]
pub struct S3Bucket {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for S3Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Bucket({})", self.describe())
    }
}

fn is_aws(endpoint: &str) -> bool {
    let host = endpoint
        .split("://")
        .nth(1)
        .unwrap_or(endpoint)
        .split(['/', ':'])
        .next()
        .unwrap_or("");
    host.ends_with(".amazonaws.com") || host.ends_with(".amazonaws.com.cn")
}

impl S3Bucket {
    /// Builds the client from the URL's settings and the standard AWS configuration chain
    /// (environment, profiles, SSO, web identity, process credentials).
    pub async fn connect(cfg: S3Config) -> Result<Self, StorageError> {
        if cfg.bucket.is_empty() {
            return Err(StorageError::Config("the S3 URL names no bucket".into()));
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(p) = &cfg.profile {
            loader = loader.profile_name(p);
        }
        // Region: explicit, then AWS_REGION / the profile, then us-east-1. The instance
        // metadata service is deliberately not asked: off EC2 it only adds a timeout.
        let region = match &cfg.region {
            Some(r) => RegionProviderChain::first_try(Region::new(r.clone())),
            None => {
                let mut profile = aws_config::profile::ProfileFileRegionProvider::builder();
                if let Some(p) = &cfg.profile {
                    profile = profile.profile_name(p);
                }
                RegionProviderChain::first_try(
                    aws_config::environment::EnvironmentVariableRegionProvider::new(),
                )
                .or_else(profile.build())
                .or_else(Region::new("us-east-1"))
            }
        };
        loader = loader.region(region);
        if let Some(e) = &cfg.endpoint {
            loader = loader.endpoint_url(e);
        }
        let sdk = loader.load().await;
        let endpoint = cfg
            .endpoint
            .clone()
            .or_else(|| sdk.endpoint_url().map(str::to_owned));
        let path_style = cfg
            .path_style
            .unwrap_or_else(|| endpoint.as_deref().is_some_and(|e| !is_aws(e)));
        let s3 = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(if cfg.read_timeout.is_zero() {
                        Duration::from_secs(120)
                    } else {
                        cfg.read_timeout
                    })
                    .build(),
            )
            .build();
        let parts = Arc::new(Semaphore::new(cfg.parts_in_flight.max(1)));
        Ok(S3Bucket {
            inner: Arc::new(Inner {
                client: Client::from_conf(s3),
                cfg,
                parts,
                counts: RequestCounts::default(),
                open: Mutex::new(HashMap::new()),
                credentials: sdk.credentials_provider(),
            }),
        })
    }

    pub fn counts(&self) -> &RequestCounts {
        &self.inner.counts
    }

    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub fn bucket(&self) -> &str {
        &self.inner.cfg.bucket
    }

    /// The object key for a cache key, under the prefix.
    pub fn object_key(&self, key: &str) -> String {
        self.inner.object_key(key)
    }

    /// Open multipart uploads under the prefix: (relative key, upload id).
    async fn list_uploads(&self) -> Result<Vec<(String, String)>, StorageError> {
        let i = &self.inner;
        let prefix = i.object_key("");
        let strip = prefix.len();
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let res = i
                .retry("ListMultipartUploads", "", || {
                    i.counts.list.fetch_add(1, Ordering::Relaxed);
                    i.client
                        .list_multipart_uploads()
                        .bucket(&i.cfg.bucket)
                        .prefix(&prefix)
                        .set_key_marker(key_marker.clone())
                        .set_upload_id_marker(id_marker.clone())
                        .send()
                })
                .await?
                .map_err(|c| to_error("ListMultipartUploads", "", c))?;
            for u in res.uploads() {
                if let (Some(k), Some(id)) = (u.key(), u.upload_id()) {
                    out.push((k.get(strip..).unwrap_or(k).to_owned(), id.to_owned()));
                }
            }
            if res.is_truncated() == Some(true) {
                key_marker = res.next_key_marker().map(str::to_owned);
                id_marker = res.next_upload_id_marker().map(str::to_owned);
                if key_marker.is_none() {
                    break;
                }
            } else {
                break;
            }
        }
        Ok(out)
    }

    /// Whether the credential chain yields any credentials (CI jobs for pull requests from
    /// forks run without secrets).
    pub async fn has_credentials(&self) -> bool {
        use aws_sdk_s3::config::ProvideCredentials;
        match &self.inner.credentials {
            Some(p) => p.provide_credentials().await.is_ok(),
            None => false,
        }
    }

    /// Reads a whole object into memory, refusing (before reading) one larger than
    /// `limit` bytes: for narinfos, whose real size is a few KiB, so that a huge object
    /// under that name cannot take the gateway's memory.
    async fn get_at_most(
        &self,
        key: &str,
        limit: Option<u64>,
    ) -> Result<Option<Bytes>, StorageError> {
        let i = &self.inner;
        let obj = i.object_key(key);
        let mut attempt = 0;
        loop {
            let res = i
                .retry("GET", key, || {
                    i.counts.get.fetch_add(1, Ordering::Relaxed);
                    i.client.get_object().bucket(&i.cfg.bucket).key(&obj).send()
                })
                .await?;
            let out = match res {
                Ok(o) => o,
                Err(c) if c.not_found => return Ok(None),
                Err(c) => return Err(to_error("GET", key, c)),
            };
            if let (Some(limit), Some(len)) = (limit, out.content_length())
                && len.max(0) as u64 > limit
            {
                return Err(StorageError::Remote {
                    op: "GET",
                    key: key.to_owned(),
                    message: format!("the object is {len} bytes, more than the {limit} expected"),
                    transient: false,
                });
            }
            // A body cut short is retried like any other transient failure.
            match out.body.collect().await {
                Ok(b) => return Ok(Some(b.into_bytes())),
                Err(e) => {
                    attempt += 1;
                    if attempt >= i.cfg.max_attempts {
                        return Err(StorageError::Remote {
                            op: "GET",
                            key: key.to_owned(),
                            message: format!("body cut short: {e}"),
                            transient: true,
                        });
                    }
                    i.counts.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
    }

    /// Whether the bucket itself exists and answers (`HeadBucket`). An object HEAD cannot
    /// tell: its 404 carries no error code, so a missing bucket looks like a missing key.
    pub async fn check_bucket(&self) -> Result<(), StorageError> {
        let i = &self.inner;
        let where_ = format!("s3://{}", i.cfg.bucket);
        let res = i
            .retry("HeadBucket", &where_, || {
                i.counts.head.fetch_add(1, Ordering::Relaxed);
                i.client.head_bucket().bucket(&i.cfg.bucket).send()
            })
            .await?;
        match res {
            Ok(_) => Ok(()),
            Err(c) if c.not_found => Err(StorageError::Remote {
                op: "HeadBucket",
                key: where_,
                message: "the bucket does not exist (check the bucket name in the URL, and the endpoint and region)".into(),
                transient: false,
            }),
            Err(c) => Err(to_error("HeadBucket", &where_, c)),
        }
    }

    /// A URL that lets its holder GET `key` without credentials until it expires.
    async fn presign(&self, key: &str, expires: Duration) -> Result<String, StorageError> {
        let i = &self.inner;
        let cfg = aws_sdk_s3::presigning::PresigningConfig::expires_in(expires)
            .map_err(|e| StorageError::Config(format!("presigned URL lifetime: {e}")))?;
        let req = i
            .client
            .get_object()
            .bucket(&i.cfg.bucket)
            .key(i.object_key(key))
            .presigned(cfg)
            .await
            .map_err(|e| to_error("presign GET", key, classify(&e)))?;
        Ok(req.uri().to_owned())
    }

    /// Opens `key` for streaming, optionally one byte range.
    async fn get_stream(
        &self,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<StreamOutcome, StorageError> {
        let i = &self.inner;
        let obj = i.object_key(key);
        let res = i
            .retry("GET", key, || {
                i.counts.get.fetch_add(1, Ordering::Relaxed);
                i.client
                    .get_object()
                    .bucket(&i.cfg.bucket)
                    .key(&obj)
                    .set_range(range.map(|r| r.header()))
                    .send()
            })
            .await?;
        match res {
            Ok(o) => Ok(StreamOutcome::Found(ObjectStream {
                length: o.content_length().map(|n| n.max(0) as u64),
                content_range: o.content_range().map(str::to_owned),
                etag: o.e_tag().map(str::to_owned),
                body: Box::pin(futures::stream::unfold(o.body, |mut body| async move {
                    body.next()
                        .await
                        .map(|r| (r.map_err(std::io::Error::other), body))
                })),
            })),
            Err(c) if c.not_found => Ok(StreamOutcome::NotFound),
            Err(c) if c.status == Some(416) => Ok(StreamOutcome::RangeNotSatisfiable),
            Err(c) => Err(to_error("GET", key, c)),
        }
    }

    /// Part size for an object of about `size_hint` bytes: the configured size, grown so
    /// that the object fits in well under 10,000 parts.
    fn part_size_for(&self, size_hint: u64) -> usize {
        part_size(self.inner.cfg.part_size, size_hint)
    }
}

/// The part size for a NAR of about `size_hint` bytes: the configured size (at least S3's
/// minimum), or larger when that many parts would not fit under S3's part limit.
fn part_size(configured: usize, size_hint: u64) -> usize {
    let configured = configured.max(MIN_PART_SIZE);
    // Compressed NARs can be slightly larger than the NAR; leave 10% of the parts spare.
    let needed = (size_hint + size_hint / 50).div_ceil(MAX_PARTS * 9 / 10);
    configured.max(usize::try_from(needed).unwrap_or(usize::MAX))
}

/// What a failed request means for us.
struct Classified {
    message: String,
    transient: bool,
    denied: bool,
    /// The object is absent: 404 with `NoSuchKey`, `NotFound` or no code (a HEAD has no
    /// body). Any other 404 (`NoSuchBucket`, ...) is a fault, never "absent".
    not_found: bool,
    /// 404 `NoSuchUpload`: the multipart upload is gone (completed or aborted already).
    no_such_upload: bool,
    precondition: bool,
    /// No answer at all: the endpoint is unreachable or timed out.
    unreachable: bool,
    timeout: bool,
    /// The HTTP status, when there was a response.
    status: Option<u16>,
    retry_after: Option<Duration>,
}

fn classify<E>(err: &SdkError<E, HttpResponse>) -> Classified
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let mut c = Classified {
        message: String::new(),
        transient: false,
        denied: false,
        not_found: false,
        no_such_upload: false,
        precondition: false,
        unreachable: false,
        timeout: false,
        status: None,
        retry_after: None,
    };
    match err {
        SdkError::TimeoutError(_) => {
            c.transient = true;
            c.unreachable = true;
            c.timeout = true;
            c.message = "request timed out".into();
        }
        SdkError::DispatchFailure(d) => {
            let chain = crate::error_chain(err);
            // The SDK reports "no credentials anywhere" as a failure to dispatch; it is
            // neither the network nor worth retrying, and the user must hear what it is.
            if chain.contains("provided credentials") || chain.contains("loading credentials") {
                c.denied = true;
                c.message = "no AWS credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or give the job a role (CI web identity, instance profile)".into();
                return c;
            }
            c.transient = d.is_io() || d.is_timeout() || d.is_other();
            c.unreachable = true;
            c.timeout = d.is_timeout();
            c.message = format!("cannot reach the endpoint: {chain}");
        }
        SdkError::ResponseError(_) => {
            c.transient = true;
            c.message = format!("broken response: {}", crate::error_chain(err));
        }
        SdkError::ServiceError(se) => {
            let raw = se.raw();
            let status = raw.status().as_u16();
            c.status = Some(status);
            let code = se.err().code().unwrap_or("");
            c.retry_after = raw
                .headers()
                .get("retry-after")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // 501 NotImplemented is a server without an optional API: asking again
            // changes nothing.
            c.transient = (status >= 500 && status != 501 && code != "NotImplemented")
                || status == 429
                || matches!(
                    code,
                    "SlowDown"
                        | "RequestTimeout"
                        | "InternalError"
                        | "ServiceUnavailable"
                        | "Throttling"
                        | "ThrottlingException"
                        | "TooManyRequests"
                );
            c.denied = status == 401 || status == 403;
            // Only these mean "no such object". A missing bucket must not be served as a
            // missing narinfo: Nix caches that for an hour and builds everything itself.
            c.not_found = status == 404 && matches!(code, "" | "NoSuchKey" | "NotFound");
            c.no_such_upload = status == 404 && code == "NoSuchUpload";
            c.precondition = status == 412;
            let msg = se.err().message().unwrap_or("");
            c.message = if code.is_empty() {
                format!("HTTP {status}")
            } else {
                format!(
                    "HTTP {status} {code}{}{msg}",
                    if msg.is_empty() { "" } else { ": " }
                )
            };
            // A HEAD has no body, so its 403 carries no error code: the Date header still
            // tells a wrong local clock apart from wrong credentials.
            if status == 403
                && code.is_empty()
                && let Some(skew) = clock_skew(raw.headers().get("date"))
            {
                c.message.push_str(&format!(
                    " (the server's clock and ours differ by {} minutes: the system clock is off; fix it with NTP)",
                    skew.as_secs() / 60
                ));
            }
            if code == "NoSuchBucket" {
                c.message
                    .push_str(" (check the bucket name in the URL, and the endpoint and region)");
            }
            if code == "RequestTimeTooSkewed" {
                c.message
                    .push_str(" (the system clock is off; fix it with NTP)");
            }
        }
        _ => c.message = crate::error_chain(err),
    }
    c
}

/// How far the server's `Date` is from our clock, when more than S3's 15-minute window.
fn clock_skew(date: Option<&str>) -> Option<Duration> {
    let server =
        aws_smithy_types::DateTime::from_str(date?, aws_smithy_types::date_time::Format::HttpDate)
            .ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    let diff = Duration::from_secs(now.abs_diff(server.secs()));
    (diff > Duration::from_secs(15 * 60)).then_some(diff)
}

fn to_error(op: &'static str, key: &str, c: Classified) -> StorageError {
    if c.unreachable {
        StorageError::Unavailable {
            op,
            key: key.to_owned(),
            message: c.message,
            timeout: c.timeout,
        }
    } else if c.denied {
        StorageError::Denied {
            op,
            key: key.to_owned(),
            message: c.message,
        }
    } else {
        StorageError::Remote {
            op,
            key: key.to_owned(),
            message: c.message,
            transient: c.transient,
        }
    }
}

/// The server's `Retry-After` when it gave one (at most two minutes: a server asking for
/// an hour is not worth holding a push for), else our own backoff.
fn wait_before_retry(c: &Classified, attempt: u32) -> Duration {
    c.retry_after
        .map(|d| d.min(Duration::from_secs(120)))
        .unwrap_or_else(|| backoff(attempt))
}

/// Full-jitter exponential backoff: a random wait up to min(cap, base × 2^attempt).
fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_secs(20);
    let exp = Duration::from_millis(200).saturating_mul(1u32 << attempt.min(10));
    let max = exp.min(cap);
    let ms = rand::rng().random_range(0..=max.as_millis() as u64);
    Duration::from_millis(ms.max(50))
}

impl Inner {
    /// Runs `f` until it succeeds, fails for good, or runs out of attempts.
    /// `Ok(Err(c))` hands a definite, non-transient answer (404, 412) back to the caller.
    async fn retry<T, E, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        mut f: F,
    ) -> Result<Result<T, Classified>, StorageError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let mut attempt = 0;
        loop {
            match f().await {
                Ok(v) => return Ok(Ok(v)),
                Err(e) => {
                    let c = classify(&e);
                    if c.not_found || c.no_such_upload || c.precondition || c.status == Some(416) {
                        return Ok(Err(c));
                    }
                    attempt += 1;
                    if !c.transient || attempt >= self.cfg.max_attempts {
                        return Err(to_error(op, key, c));
                    }
                    self.counts.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(wait_before_retry(&c, attempt)).await;
                }
            }
        }
    }

    async fn put_bytes(
        &self,
        key: &str,
        content_type: &'static str,
        body: Bytes,
        if_absent: bool,
    ) -> Result<bool, StorageError> {
        let obj = self.object_key(key);
        let res = self
            .retry("PUT", key, || {
                self.counts.put.fetch_add(1, Ordering::Relaxed);
                let mut req = self
                    .client
                    .put_object()
                    .bucket(&self.cfg.bucket)
                    .key(&obj)
                    .content_type(content_type)
                    .body(ByteStream::from(body.clone()));
                if if_absent {
                    req = req.if_none_match("*");
                }
                req.send()
            })
            .await?;
        match res {
            Ok(_) => Ok(true),
            Err(c) if c.precondition && if_absent => Ok(false),
            Err(c) => Err(to_error("PUT", key, c)),
        }
    }

    fn object_key(&self, key: &str) -> String {
        if self.cfg.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.cfg.prefix)
        }
    }
}

impl Storage for S3Bucket {
    type Staged = S3Staged;

    fn describe(&self) -> String {
        let c = &self.inner.cfg;
        let mut s = format!("s3://{}", c.bucket);
        if !c.prefix.is_empty() {
            s.push('/');
            s.push_str(&c.prefix);
        }
        if let Some(e) = &c.endpoint {
            s.push_str(" at ");
            s.push_str(e);
        }
        s
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        let i = &self.inner;
        let obj = i.object_key(key);
        let res = i
            .retry("HEAD", key, || {
                i.counts.head.fetch_add(1, Ordering::Relaxed);
                i.client
                    .head_object()
                    .bucket(&i.cfg.bucket)
                    .key(&obj)
                    .send()
            })
            .await?;
        match res {
            Ok(o) => Ok(Some(o.content_length().unwrap_or(0).max(0) as u64)),
            Err(c) if c.not_found => Ok(None),
            Err(c) => Err(to_error("HEAD", key, c)),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        self.get_at_most(key, None).await
    }

    async fn put(&self, key: &str, ct: &'static str, body: Bytes) -> Result<(), StorageError> {
        self.inner.put_bytes(key, ct, body, false).await.map(|_| ())
    }

    async fn put_if_absent(
        &self,
        key: &str,
        ct: &'static str,
        body: Bytes,
    ) -> Result<bool, StorageError> {
        // HEAD first: some stores ignore If-None-Match (older Garage) and would overwrite.
        if self.head(key).await?.is_some() {
            return Ok(false);
        }
        self.inner.put_bytes(key, ct, body, true).await
    }

    async fn stage(
        &self,
        key: &str,
        ct: &'static str,
        size_hint: u64,
        mut body: mpsc::Receiver<Bytes>,
    ) -> Result<S3Staged, StorageError> {
        let part_size = self.part_size_for(size_hint);
        // Each part gets an allocation of its own, of exactly its size: a part cut from a
        // shared, growing buffer would pin that whole buffer (up to twice the part size)
        // for as long as the part is in flight. Most NARs are small, so the first buffer
        // is sized by the NAR (compressed output is rarely larger), not by the part.
        let hint = usize::try_from(size_hint).unwrap_or(usize::MAX);
        let mut buf = BytesMut::with_capacity(part_size.min(hint.saturating_add(64 << 10)));
        let mut carry = None;
        // Below one part: a single PUT on commit, nothing sent yet.
        if !fill_part(&mut buf, part_size, &mut carry, &mut body).await {
            return Ok(S3Staged::Single {
                bucket: self.clone(),
                key: key.to_owned(),
                ct,
                body: buf.freeze(),
            });
        }
        let mut mp = Multipart::start(self.clone(), key, ct).await?;
        let sent: Result<(), StorageError> = async {
            loop {
                mp.send_part(std::mem::take(&mut buf).freeze()).await?;
                buf = BytesMut::with_capacity(part_size);
                if !fill_part(&mut buf, part_size, &mut carry, &mut body).await {
                    if !buf.is_empty() {
                        mp.send_part(std::mem::take(&mut buf).freeze()).await?;
                    }
                    break;
                }
            }
            mp.wait_parts().await
        }
        .await;
        match sent {
            Ok(()) => Ok(S3Staged::Multi(mp)),
            Err(e) => {
                // Aborted here and awaited, not left to Drop: the process may exit next.
                mp.abort().await;
                Err(e)
            }
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let i = &self.inner;
        let obj = i.object_key(key);
        let res = i
            .retry("DELETE", key, || {
                i.counts.delete.fetch_add(1, Ordering::Relaxed);
                i.client
                    .delete_object()
                    .bucket(&i.cfg.bucket)
                    .key(&obj)
                    .send()
            })
            .await?;
        match res {
            Ok(_) => Ok(()),
            Err(c) if c.not_found => Ok(()),
            Err(c) => Err(to_error("DELETE", key, c)),
        }
    }

    async fn get_limited(&self, key: &str, limit: u64) -> Result<Option<Bytes>, StorageError> {
        self.get_at_most(key, Some(limit)).await
    }

    async fn read_range(
        &self,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<StreamOutcome, StorageError> {
        self.get_stream(key, range).await
    }

    async fn presign_get(&self, key: &str, ttl: Duration) -> Result<Option<String>, StorageError> {
        self.presign(key, ttl).await.map(Some)
    }

    async fn check_health(&self) -> Result<(), StorageError> {
        match self.check_bucket().await {
            // A server without HeadBucket: an object HEAD at least proves it answers.
            Err(StorageError::Remote { ref message, .. })
                if message.contains("HTTP 501") || message.contains("NotImplemented") =>
            {
                self.head(layout::CACHE_INFO).await.map(|_| ())
            }
            other => other,
        }
    }

    async fn read(&self, key: &str) -> Result<Option<super::ObjectBytes>, StorageError> {
        match self.get_stream(key, None).await? {
            StreamOutcome::Found(o) => Ok(Some(o.body)),
            _ => Ok(None),
        }
    }

    async fn open_uploads(&self) -> Result<Vec<String>, StorageError> {
        Ok(self
            .list_uploads()
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    async fn abort_all_open_uploads(&self) -> Result<usize, StorageError> {
        let open = self.list_uploads().await?;
        let n = open.len();
        futures::stream::iter(open)
            .for_each_concurrent(8, |(key, id)| async move {
                abort_upload(self, &key, &id).await;
            })
            .await;
        Ok(n)
    }

    fn stats(&self) -> RequestStats {
        let c = &self.inner.counts;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RequestStats {
            head: l(&c.head),
            get: l(&c.get),
            put: l(&c.put),
            multipart: l(&c.multipart),
            delete: l(&c.delete),
            list: l(&c.list),
            retries: l(&c.retries),
        }
    }

    async fn abort_open_uploads(&self) -> usize {
        let open: Vec<(String, String)> = match self.inner.open.lock() {
            Ok(m) => m
                .iter()
                .map(|(id, key)| (id.clone(), key.clone()))
                .collect(),
            Err(_) => return 0,
        };
        // An upload whose abort failed stays registered: `left_open` reports it.
        futures::stream::iter(open)
            .map(|(id, key)| async move { abort_upload(self, &key, &id).await })
            .buffer_unordered(8)
            .filter(|gone| std::future::ready(*gone))
            .count()
            .await
    }

    fn left_open(&self) -> usize {
        self.inner.open.lock().map_or(0, |m| m.len())
    }

    async fn list_top_page(
        &self,
        next: Option<String>,
        max_keys: i32,
    ) -> Result<Option<TopPage>, StorageError> {
        let i = &self.inner;
        let full = i.object_key("");
        let strip = full.len();
        let res = i
            .retry("LIST", "", || {
                i.counts.list.fetch_add(1, Ordering::Relaxed);
                i.client
                    .list_objects_v2()
                    .bucket(&i.cfg.bucket)
                    .prefix(&full)
                    // Everything under nar/ (as many objects as narinfos) rolls up into one
                    // entry, so a page holds up to `max_keys` narinfos.
                    .delimiter("/")
                    .max_keys(max_keys)
                    .set_continuation_token(next.clone())
                    .send()
            })
            .await?
            .map_err(|c| to_error("LIST", "", c))?;
        let relative = |k: &str| k.get(strip..).unwrap_or(k).to_owned();
        let keys: Vec<String> = res
            .contents()
            .iter()
            .filter_map(|o| o.key())
            .map(relative)
            .collect();
        let next = match res.next_continuation_token() {
            Some(t) if res.is_truncated() == Some(true) => Some(t.to_owned()),
            _ => None,
        };
        // Keys and folders are each in byte order; the page reaches the greater of the last
        // of each.
        let covered_to = next.as_ref().and_then(|_| {
            let last_key = keys.last().cloned();
            let last_dir = res
                .common_prefixes()
                .iter()
                .filter_map(|p| p.prefix())
                .map(relative)
                .next_back();
            last_key.max(last_dir)
        });
        if next.is_some() && covered_to.is_none() {
            // A truncated page with nothing in it says nothing about where it got to.
            return Err(StorageError::Remote {
                op: "LIST",
                key: String::new(),
                message: "a truncated listing page holds no keys".into(),
                transient: false,
            });
        }
        Ok(Some(TopPage {
            keys,
            covered_to,
            next,
        }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let i = &self.inner;
        let full = i.object_key(prefix);
        let strip = if i.cfg.prefix.is_empty() {
            0
        } else {
            i.cfg.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let res = i
                .retry("LIST", prefix, || {
                    i.counts.list.fetch_add(1, Ordering::Relaxed);
                    i.client
                        .list_objects_v2()
                        .bucket(&i.cfg.bucket)
                        .prefix(&full)
                        .set_continuation_token(token.clone())
                        .send()
                })
                .await?
                .map_err(|c| to_error("LIST", prefix, c))?;
            for o in res.contents() {
                if let Some(k) = o.key() {
                    out.push(k.get(strip..).unwrap_or(k).to_owned());
                }
            }
            match res.next_continuation_token() {
                Some(t) if res.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        Ok(out)
    }
}

/// Fills `buf` up to `limit` bytes, first from `carry` (the rest of a chunk that crossed
/// the previous part's end), then from `body`. False when the body ended before `limit`.
async fn fill_part(
    buf: &mut BytesMut,
    limit: usize,
    carry: &mut Option<Bytes>,
    body: &mut mpsc::Receiver<Bytes>,
) -> bool {
    while buf.len() < limit {
        let mut chunk = match carry.take() {
            Some(c) => c,
            None => match body.recv().await {
                Some(c) => c,
                None => return false,
            },
        };
        let room = limit - buf.len();
        if chunk.len() > room {
            *carry = Some(chunk.split_off(room));
        }
        buf.extend_from_slice(&chunk);
    }
    true
}

/// A multipart upload in progress; aborted unless completed.
pub struct Multipart {
    bucket: S3Bucket,
    key: String,
    upload_id: String,
    next_part: i32,
    size: u64,
    in_flight: JoinSet<Result<CompletedPart, StorageError>>,
    done: Vec<CompletedPart>,
    finished: bool,
}

impl Multipart {
    async fn start(bucket: S3Bucket, key: &str, ct: &'static str) -> Result<Self, StorageError> {
        let i = &bucket.inner;
        let obj = i.object_key(key);
        let out = i
            .retry("CreateMultipartUpload", key, || {
                i.counts.multipart.fetch_add(1, Ordering::Relaxed);
                i.client
                    .create_multipart_upload()
                    .bucket(&i.cfg.bucket)
                    .key(&obj)
                    .content_type(ct)
                    .send()
            })
            .await?
            .map_err(|c| to_error("CreateMultipartUpload", key, c))?;
        let upload_id = out
            .upload_id()
            .ok_or_else(|| StorageError::Remote {
                op: "CreateMultipartUpload",
                key: key.to_owned(),
                message: "the response has no UploadId".into(),
                transient: false,
            })?
            .to_owned();
        if let Ok(mut open) = i.open.lock() {
            open.insert(upload_id.clone(), key.to_owned());
        }
        Ok(Multipart {
            bucket: bucket.clone(),
            key: key.to_owned(),
            upload_id,
            next_part: 1,
            size: 0,
            in_flight: JoinSet::new(),
            done: Vec::new(),
            finished: false,
        })
    }

    /// Uploads a part in the background once the global part budget has room.
    async fn send_part(&mut self, body: Bytes) -> Result<(), StorageError> {
        // Reap finished parts first so an early failure stops the upload promptly.
        while let Some(r) = self.in_flight.try_join_next() {
            self.done.push(joined(r, &self.key)??);
        }
        let permit: OwnedSemaphorePermit = self
            .bucket
            .inner
            .parts
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StorageError::Config("part budget closed".into()))?;
        let n = self.next_part;
        self.next_part += 1;
        self.size += body.len() as u64;
        let bucket = self.bucket.clone();
        let key = self.key.clone();
        let upload_id = self.upload_id.clone();
        self.in_flight.spawn(async move {
            let _permit = permit;
            let i = &bucket.inner;
            let obj = i.object_key(&key);
            let out = i
                .retry("UploadPart", &key, || {
                    i.counts.multipart.fetch_add(1, Ordering::Relaxed);
                    i.client
                        .upload_part()
                        .bucket(&i.cfg.bucket)
                        .key(&obj)
                        .upload_id(&upload_id)
                        .part_number(n)
                        .body(ByteStream::from(body.clone()))
                        .send()
                })
                .await?
                .map_err(|c| to_error("UploadPart", &key, c))?;
            Ok(CompletedPart::builder()
                .part_number(n)
                .set_e_tag(out.e_tag().map(str::to_owned))
                .build())
        });
        Ok(())
    }

    async fn wait_parts(&mut self) -> Result<(), StorageError> {
        while let Some(r) = self.in_flight.join_next().await {
            self.done.push(joined(r, &self.key)??);
        }
        Ok(())
    }

    async fn complete(mut self) -> Result<(), StorageError> {
        self.done.sort_by_key(|p| p.part_number());
        let parts = std::mem::take(&mut self.done);
        let i = self.bucket.inner.clone();
        let obj = i.object_key(&self.key);
        let upload = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        let res = match i
            .retry("CompleteMultipartUpload", &self.key, || {
                i.counts.multipart.fetch_add(1, Ordering::Relaxed);
                i.client
                    .complete_multipart_upload()
                    .bucket(&i.cfg.bucket)
                    .key(&obj)
                    .upload_id(&self.upload_id)
                    .multipart_upload(upload.clone())
                    .send()
            })
            .await
        {
            Err(e) => Err(e),
            Ok(Ok(_)) => Ok(()),
            // A retried Complete whose first attempt succeeded (its answer was lost) finds
            // the upload gone: the object is there, and that is success.
            Ok(Err(c)) if c.no_such_upload => match self.bucket.head(&self.key).await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(to_error("CompleteMultipartUpload", &self.key, c)),
                Err(e) => Err(e),
            },
            Ok(Err(c)) => Err(to_error("CompleteMultipartUpload", &self.key, c)),
        };
        match &res {
            Ok(()) => {
                if let Ok(mut open) = i.open.lock() {
                    open.remove(&self.upload_id);
                }
            }
            // A Complete that failed for good aborts its upload before the error is
            // reported, so no upload outlives the push that made it.
            Err(_) => {
                abort_upload(&self.bucket, &self.key, &self.upload_id).await;
            }
        }
        self.finished = true;
        res
    }

    async fn abort(mut self) {
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        // A failed abort leaves the upload registered, for `left_open` to report.
        abort_upload(&self.bucket, &self.key, &self.upload_id).await;
        self.finished = true;
    }
}

fn joined(
    r: Result<Result<CompletedPart, StorageError>, tokio::task::JoinError>,
    key: &str,
) -> Result<Result<CompletedPart, StorageError>, StorageError> {
    r.map_err(|e| StorageError::Remote {
        op: "UploadPart",
        key: key.to_owned(),
        message: format!("part task failed: {e}"),
        transient: false,
    })
}

/// Aborts one upload; true once the store confirmed it is gone.
async fn abort_upload(bucket: &S3Bucket, key: &str, upload_id: &str) -> bool {
    let i = &bucket.inner;
    let obj = i.object_key(key);
    let res = i
        .retry("AbortMultipartUpload", key, || {
            i.counts.multipart.fetch_add(1, Ordering::Relaxed);
            i.client
                .abort_multipart_upload()
                .bucket(&i.cfg.bucket)
                .key(&obj)
                .upload_id(upload_id)
                .send()
        })
        .await;
    // Forgotten only once the store confirmed, so that an abort cut short by Ctrl-C is
    // still found by `abort_open_uploads`.
    let gone =
        matches!(res, Ok(Ok(_))) || matches!(&res, Ok(Err(c)) if c.not_found || c.no_such_upload);
    if gone && let Ok(mut open) = i.open.lock() {
        open.remove(upload_id);
    }
    gone
}

impl Drop for Multipart {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Dropped mid-way (a failed part, Ctrl-C): abort it so no upload is left open and
        // billed. Best effort; on shutdown the runtime may already be gone.
        self.in_flight.abort_all();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let bucket = self.bucket.clone();
            let key = self.key.clone();
            let upload_id = self.upload_id.clone();
            handle.spawn(async move {
                abort_upload(&bucket, &key, &upload_id).await;
            });
        }
    }
}

/// Bytes stored but not yet visible.
pub enum S3Staged {
    /// Small enough for one PUT, which is the commit.
    Single {
        bucket: S3Bucket,
        key: String,
        ct: &'static str,
        body: Bytes,
    },
    /// All parts uploaded; CompleteMultipartUpload is the commit.
    Multi(Multipart),
}

impl Staged for S3Staged {
    async fn commit(self) -> Result<u64, StorageError> {
        match self {
            S3Staged::Single {
                bucket,
                key,
                ct,
                body,
            } => {
                let n = body.len() as u64;
                bucket.inner.put_bytes(&key, ct, body, false).await?;
                Ok(n)
            }
            S3Staged::Multi(mp) => {
                let n = mp.size;
                mp.complete().await?;
                Ok(n)
            }
        }
    }

    async fn abort(self) {
        if let S3Staged::Multi(mp) = self {
            mp.abort().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::error::ErrorMetadata;
    use aws_sdk_s3::operation::get_object::GetObjectError;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;

    /// An S3 error answer as the SDK hands it over: status, error code (none for a HEAD,
    /// which has no body) and headers.
    fn answer(status: u16, code: &str, headers: &[(&str, &str)]) -> Classified {
        let mut raw = HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::empty());
        for (k, v) in headers {
            raw.headers_mut().insert(k.to_string(), v.to_string());
        }
        let mut meta = ErrorMetadata::builder().message("from the server");
        if !code.is_empty() {
            meta = meta.code(code);
        }
        let err: SdkError<GetObjectError, HttpResponse> =
            SdkError::service_error(GetObjectError::generic(meta.build()), raw);
        classify(&err)
    }

    #[test]
    fn absent_means_no_such_key_or_a_bare_404_and_nothing_else() {
        for (code, absent) in [
            ("NoSuchKey", true),
            ("NotFound", true),
            ("", true),
            ("NoSuchBucket", false),
            ("NoSuchUpload", false),
            ("NoSuchLifecycleConfiguration", false),
        ] {
            let c = answer(404, code, &[]);
            assert_eq!(c.not_found, absent, "404 {code:?}");
            assert!(!c.transient, "404 {code:?}");
        }
        assert!(answer(404, "NoSuchUpload", &[]).no_such_upload);
        let bucket = answer(404, "NoSuchBucket", &[]);
        assert!(
            bucket.message.contains("check the bucket name"),
            "{}",
            bucket.message
        );
        assert!(matches!(
            to_error("GET", "x.narinfo", bucket),
            StorageError::Remote {
                transient: false,
                ..
            }
        ));
    }

    #[test]
    fn throttling_and_server_errors_are_retried_with_the_servers_pause() {
        // AWS, Ceph and MinIO say SlowDown/503; B2 and R2 say 429 or 503; GCS-style
        // gateways say 500 InternalError; a slow upload is 400 RequestTimeout.
        for (status, code) in [
            (503, "SlowDown"),
            (503, "ServiceUnavailable"),
            (429, "TooManyRequests"),
            (429, ""),
            (500, "InternalError"),
            (502, ""),
            (400, "RequestTimeout"),
            (400, "Throttling"),
            (400, "ThrottlingException"),
        ] {
            let c = answer(status, code, &[]);
            assert!(c.transient, "{status} {code:?}");
            assert!(!c.not_found && !c.denied, "{status} {code:?}");
        }
        let c = answer(503, "SlowDown", &[("retry-after", "7")]);
        assert_eq!(c.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(
            answer(503, "SlowDown", &[("retry-after", "soon")]).retry_after,
            None
        );
    }

    #[test]
    fn denials_preconditions_and_missing_features_are_final() {
        for (status, code) in [(403, "AccessDenied"), (403, "ExpiredToken"), (401, "")] {
            let c = answer(status, code, &[]);
            assert!(c.denied && !c.transient, "{status} {code:?}");
            assert!(matches!(
                to_error("PUT", "k", c),
                StorageError::Denied { .. }
            ));
        }
        let c = answer(412, "PreconditionFailed", &[]);
        assert!(c.precondition && !c.transient);
        // A server without an optional API: a definite answer, not an outage to retry.
        let c = answer(501, "NotImplemented", &[]);
        assert!(!c.transient && !c.not_found && !c.denied);
        assert!(
            c.message.contains("HTTP 501 NotImplemented"),
            "{}",
            c.message
        );
    }

    #[test]
    fn a_wrong_clock_is_named_whether_or_not_there_is_a_body() {
        let c = answer(403, "RequestTimeTooSkewed", &[]);
        assert!(
            c.message.contains("the system clock is off"),
            "{}",
            c.message
        );
        // A HEAD's 403 has no code: the server's Date tells.
        let c = answer(403, "", &[("date", "Mon, 01 Jan 2001 00:00:00 GMT")]);
        assert!(c.message.contains("clock"), "{}", c.message);
        let now = aws_smithy_types::DateTime::from(std::time::SystemTime::now())
            .fmt(aws_smithy_types::date_time::Format::HttpDate)
            .unwrap();
        let c = answer(403, "", &[("date", &now)]);
        assert!(!c.message.contains("clock"), "{}", c.message);
    }

    #[test]
    fn waits_between_attempts_are_bounded() {
        for attempt in 1..40 {
            let w = backoff(attempt);
            assert!(
                w >= Duration::from_millis(50) && w <= Duration::from_secs(20),
                "{attempt}: {w:?}"
            );
        }
        let told = |secs: &str| answer(503, "SlowDown", &[("retry-after", secs)]);
        assert_eq!(wait_before_retry(&told("3"), 1), Duration::from_secs(3));
        assert_eq!(
            wait_before_retry(&told("3600"), 1),
            Duration::from_secs(120)
        );
        // An HTTP-date Retry-After is not parsed: our own backoff applies.
        let date = told("Wed, 21 Oct 2015 07:28:00 GMT");
        assert!(wait_before_retry(&date, 1) <= Duration::from_millis(400));
    }

    #[test]
    fn parts_grow_only_when_the_nar_would_not_fit_in_the_part_limit() {
        let mib = 1usize << 20;
        assert_eq!(part_size(16 * mib, 0), 16 * mib);
        assert_eq!(
            part_size(1, 10 << 20),
            MIN_PART_SIZE,
            "never under S3's minimum"
        );
        assert_eq!(part_size(16 * mib, 100 << 30), 16 * mib);
        // 200 GiB in 16 MiB parts would be 12,800 parts: more than 10,000.
        let big = 200u64 << 30;
        let p = part_size(16 * mib, big);
        assert!(p > 16 * mib);
        let parts = (big + big / 50).div_ceil(p as u64);
        assert!(parts <= MAX_PARTS, "{parts} parts of {p}");
    }

    #[test]
    fn no_answer_at_all_is_unreachable_and_retried() {
        let err: SdkError<GetObjectError, HttpResponse> =
            SdkError::timeout_error("operation timed out");
        let c = classify(&err);
        assert!(c.unreachable && c.timeout && c.transient);
        assert!(matches!(
            to_error("GET", "k", c),
            StorageError::Unavailable { timeout: true, .. }
        ));
    }
}
