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
//!
//! This file holds the client and the [`Storage`] implementation; [`config`] the
//! settings, [`retry`] the retry loop and error classification, [`read`] streaming reads
//! and presigning, [`multipart`] the uploads.

mod config;
mod grant;
pub mod journal;
mod multipart;
pub mod pace;
pub mod profile;
mod read;
mod retry;

pub use config::{MAX_PARTS, MIN_PART_SIZE, S3Config};
use config::{is_aws, part_size};
pub use multipart::{Multipart, S3Staged};
use multipart::{abort_upload, fill_part};
use retry::to_error;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    Region, RequestChecksumCalculation, ResponseChecksumValidation, retry::RetryConfig,
    timeout::TimeoutConfig,
};
use aws_sdk_s3::primitives::ByteStream;
use bytes::{Bytes, BytesMut};
use tokio::sync::{Semaphore, mpsc};

use futures::StreamExt;

use super::{
    ByteRange, ObjectMeta, RequestCounters, RequestKind, RequestStats, Storage, StorageError,
    StreamOutcome, TopPage,
};
use crate::format::layout;

struct Inner {
    client: Client,
    cfg: S3Config,
    parts: Arc<Semaphore>,
    counts: RequestCounters,
    /// Multipart uploads started and not yet completed or aborted: upload id → key.
    open: Mutex<HashMap<String, String>>,
    credentials: Option<aws_sdk_s3::config::SharedCredentialsProvider>,
    /// What the server could not do that we did without (each said once).
    notes: Mutex<Vec<String>>,
    /// The adaptive limit on small requests in flight, when this client is paced.
    pace: Option<Arc<pace::Pace>>,
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

impl S3Bucket {
    /// Builds the client from the URL's settings and the standard AWS configuration chain
    /// (environment, profiles, SSO, web identity, process credentials).
    pub async fn connect(cfg: S3Config) -> Result<Self, StorageError> {
        if cfg.bucket.is_empty() {
            return Err(StorageError::Config("the S3 URL names no bucket".into()));
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        // A profile named on purpose (flag, URL, file) is the credentials to use, as with
        // the AWS CLI: the default chain would let AWS_ACCESS_KEY_ID in the environment
        // win over it without a word.
        let profile_credentials = cfg.profile.as_ref().map(|p| {
            aws_sdk_s3::config::SharedCredentialsProvider::new(
                aws_config::profile::ProfileFileCredentialsProvider::builder()
                    .profile_name(p)
                    .build(),
            )
        });
        if let Some(p) = &cfg.profile {
            loader = loader.profile_name(p);
        }
        if let Some(c) = &profile_credentials {
            loader = loader.credentials_provider(c.clone());
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
        if let (Some(p), Some(c)) = (&cfg.profile, &profile_credentials) {
            use aws_sdk_s3::config::ProvideCredentials;
            if let Err(e) = c.provide_credentials().await {
                let file = |var: &str, default: &str| {
                    std::env::var(var).unwrap_or_else(|_| format!("~/.aws/{default}"))
                };
                return Err(StorageError::Config(format!(
                    "AWS profile {p:?}: {} (looked in {} and {}; profile names are case-sensitive)",
                    crate::error_chain(&e),
                    file("AWS_CONFIG_FILE", "config"),
                    file("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
                )));
            }
        }
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
        let pace = cfg.concurrency.map(pace::Pace::new);
        Ok(S3Bucket {
            inner: Arc::new(Inner {
                pace,
                client: Client::from_conf(s3),
                cfg,
                parts,
                counts: RequestCounters::default(),
                open: Mutex::new(HashMap::new()),
                notes: Mutex::new(Vec::new()),
                credentials: sdk.credentials_provider(),
            }),
        })
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

    /// Whether the credential chain yields any credentials (CI jobs for pull requests from
    /// forks run without secrets).
    pub async fn has_credentials(&self) -> bool {
        use aws_sdk_s3::config::ProvideCredentials;
        match &self.inner.credentials {
            Some(p) => p.provide_credentials().await.is_ok(),
            None => false,
        }
    }

    /// The ceiling on small requests in flight when paced.
    pub fn concurrency_ceiling(&self) -> Option<usize> {
        self.inner.cfg.concurrency
    }

    /// Part size for an object of about `size_hint` bytes: the configured size, grown so
    /// that the object fits in well under 10,000 parts.
    fn part_size_for(&self, size_hint: u64) -> usize {
        part_size(self.inner.cfg.part_size, size_hint)
    }
}

impl Inner {
    async fn put_bytes(
        &self,
        key: &str,
        content_type: &'static str,
        body: Bytes,
        if_absent: bool,
    ) -> Result<bool, StorageError> {
        let obj = self.object_key(key);
        let md5 = self.content_md5(&body);
        let res = self
            .retry_sized(RequestKind::Put, "PUT", key, body.len(), || {
                let mut req = self
                    .client
                    .put_object()
                    .bucket(&self.cfg.bucket)
                    .key(&obj)
                    .content_type(content_type)
                    .set_content_md5(md5.clone())
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

    /// `Content-MD5` for a body, when the profile sends it: the server then refuses a body
    /// that changed on the way instead of storing it.
    fn content_md5(&self, body: &[u8]) -> Option<String> {
        use base64::Engine;
        use md5::Digest;
        self.cfg
            .content_md5
            .then(|| base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(body)))
    }

    /// Remembers something the server could not do, once.
    fn note(&self, text: String) {
        if let Ok(mut n) = self.notes.lock()
            && !n.contains(&text)
        {
            n.push(text);
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
            .retry(RequestKind::Head, "HEAD", key, || {
                i.client
                    .head_object()
                    .bucket(&i.cfg.bucket)
                    .key(&obj)
                    .send()
            })
            .await;
        match res {
            Ok(Ok(o)) => Ok(Some(o.content_length().unwrap_or(0).max(0) as u64)),
            Ok(Err(c)) if c.not_found => Ok(None),
            Ok(Err(c)) => Err(to_error("HEAD", key, c)),
            // A HEAD's 403 has no body, so no error code: unknown key, wrong secret and a
            // missing permission all read "HTTP 403". One ranged GET of the same object
            // (the same permission) brings the server's code, so the user hears which.
            Err(StorageError::Denied { message, .. }) if message == "HTTP 403" => {
                Err(self.explain_denied_head(key).await)
            }
            Err(e) => Err(e),
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
        match self.inner.put_bytes(key, ct, body.clone(), true).await {
            // A server without conditional writes: the HEAD above already found nothing
            // there, which is as good as it gets without them (two pushes creating the
            // same new cache at once both write the same nix-cache-info).
            Err(StorageError::Unsupported { message, .. }) => {
                self.inner.note(format!(
                    "the server does not support conditional writes (If-None-Match: {message}); {key} was created after a HEAD found none instead"
                ));
                self.inner.put_bytes(key, ct, body, false).await
            }
            other => other,
        }
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
        let mut mp = Multipart::start(self.clone(), key, ct, part_size).await?;
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
            .retry(RequestKind::Delete, "DELETE", key, || {
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

    async fn presign_put(&self, key: &str, ttl: Duration) -> Result<Option<String>, StorageError> {
        self.presign_put_url(key, ttl).await.map(Some)
    }

    async fn presign_parts(
        &self,
        key: &str,
        parts: u32,
        ttl: Duration,
    ) -> Result<Option<(String, Vec<String>)>, StorageError> {
        S3Bucket::presign_parts(self, key, parts, ttl)
            .await
            .map(Some)
    }

    async fn complete_parts(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), StorageError> {
        S3Bucket::complete_parts(self, key, upload_id, etags).await
    }

    async fn cancel_parts(&self, key: &str, upload_id: &str) {
        S3Bucket::cancel_parts(self, key, upload_id).await
    }

    async fn copy_checked(
        &self,
        from: &str,
        to: &str,
        etag: &str,
        size: u64,
    ) -> Result<(), StorageError> {
        S3Bucket::copy_checked(self, from, to, etag, size).await
    }

    async fn check_health(&self) -> Result<(), StorageError> {
        match self.check_bucket().await {
            // A server without HeadBucket: an object HEAD at least proves it answers.
            Err(StorageError::Unsupported { .. }) => {
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
            .map(|(k, _, _)| k)
            .collect())
    }

    async fn abort_all_open_uploads(&self) -> Result<usize, StorageError> {
        let open = self.list_uploads().await?;
        let n = open.len();
        futures::stream::iter(open)
            .for_each_concurrent(8, |(key, id, _)| async move {
                abort_upload(self, &key, &id).await;
            })
            .await;
        Ok(n)
    }

    fn stats(&self) -> RequestStats {
        let mut s = self.inner.counts.snapshot();
        if let Some(p) = &self.inner.pace {
            let (peak, cuts) = p.peak();
            (s.limit_peak, s.limit_cuts) = (peak as u64, cuts);
        }
        s
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

    fn concurrency_hint(&self) -> Option<usize> {
        self.inner.pace.as_ref().map(|p| p.limit())
    }

    fn notes(&self) -> Vec<String> {
        self.inner
            .notes
            .lock()
            .map_or_else(|_| Vec::new(), |n| n.clone())
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
            .retry(RequestKind::List, "LIST", "", || {
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
        Ok(self
            .list_meta(prefix, false)
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect())
    }

    async fn list_meta(
        &self,
        prefix: &str,
        shallow: bool,
    ) -> Result<Vec<ObjectMeta>, StorageError> {
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
                .retry(RequestKind::List, "LIST", prefix, || {
                    i.client
                        .list_objects_v2()
                        .bucket(&i.cfg.bucket)
                        .prefix(&full)
                        .set_delimiter(shallow.then(|| "/".to_owned()))
                        .set_continuation_token(token.clone())
                        .send()
                })
                .await?
                .map_err(|c| to_error("LIST", prefix, c))?;
            for o in res.contents() {
                // Folder placeholders (`dir/`, made by consoles and some servers) are not
                // objects of the cache.
                if let Some(k) = o.key().filter(|k| !k.ends_with('/')) {
                    out.push(ObjectMeta {
                        key: k.get(strip..).unwrap_or(k).to_owned(),
                        size: o.size().map_or(0, |s| s.max(0) as u64),
                        modified: o.last_modified().map_or(0, |t| t.secs()),
                        etag: o.e_tag().unwrap_or_default().to_owned(),
                    });
                }
            }
            match res.next_continuation_token() {
                Some(t) if res.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn abort_uploads_started_before(&self, cutoff: i64) -> Result<usize, StorageError> {
        let old: Vec<(String, String)> = self
            .list_uploads()
            .await?
            .into_iter()
            // An upload whose start the server does not report is never taken for old.
            .filter(|u| u.2.is_some_and(|t| t < cutoff))
            .map(|(k, id, _)| (k, id))
            .collect();
        Ok(futures::stream::iter(old)
            .map(|(key, id)| async move { abort_upload(self, &key, &id).await })
            .buffer_unordered(8)
            .filter(|gone| std::future::ready(*gone))
            .count()
            .await)
    }
}
