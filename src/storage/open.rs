//! Opening a cache: the one place that decides which backend a cache URL means and how it
//! is configured. Commands hand in a URL and the settings given apart from it; nothing
//! else in the crate matches on a URL's scheme or builds an S3 configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::mpsc;

use super::gateway::{GatewayStaged, GatewayTarget, TokenSource};
use super::local::LocalStaged;
use super::s3::S3Staged;
use super::s3::journal::Journal;
use super::s3::profile::Provider;
use super::{
    ByteRange, LocalDir, ObjectBytes, ObjectMeta, RequestStats, S3Bucket, S3Config, Staged,
    Storage, StorageError, StreamOutcome, TopPage,
};
use crate::target::{TargetError, TargetUrl};

/// S3 settings given apart from the cache URL (a flag, its environment variable, a
/// settings file). Every field is optional: `None` leaves the decision to the next source.
#[derive(Clone, Debug, Default)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub profile: Option<String>,
    /// `path`, `virtual` or `auto`.
    pub addressing_style: Option<String>,
    pub read_timeout: Option<Duration>,
    /// Multipart part size in bytes.
    pub part_size: Option<usize>,
    /// Attempts per request, including the first.
    pub max_attempts: Option<u32>,
    /// Pace small requests with an adaptive limit (pushes do; the gateway and gc bound
    /// their own concurrency).
    pub paced: bool,
    /// Ceiling of that limit (`--jobs`); `None`: the provider's.
    pub max_concurrency: Option<usize>,
    /// Journal multipart uploads so that a killed push resumes them within this long
    /// (pushes); `None` or zero: no journal.
    pub resume_within: Option<Duration>,
}

/// How to open a cache.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Above the URL's own parameters (flags and environment variables).
    pub given: S3Settings,
    /// Below the URL's parameters: a settings file found on the way to the current
    /// directory must not redirect an explicit `s3://b?endpoint=...` elsewhere (security
    /// review L9).
    pub fallback: S3Settings,
    /// Only read: a `file://` directory must exist already (a push creates it).
    pub read_only: bool,
    /// The token of a push through a gateway (`http(s)://` URLs).
    pub gateway: super::gateway::GatewayOptions,
}

#[derive(Debug, Error)]
pub enum OpenError {
    #[error(transparent)]
    Url(#[from] TargetError),
    /// A setting that cannot be used, named.
    #[error("{0}")]
    Setting(String),
    #[error("cannot open the cache directory {}: {reason}", dir.display())]
    Directory { dir: PathBuf, reason: String },
    #[error(transparent)]
    Storage(StorageError),
}

impl OpenError {
    /// Bad input (exit 2) rather than a target that cannot be reached (exit 3).
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            OpenError::Url(_) | OpenError::Setting(_) | OpenError::Storage(StorageError::Config(_))
        )
    }
}

/// The S3 configuration a URL and its settings describe: flags over the URL's parameters
/// over the settings file.
pub fn s3_config(url: &TargetUrl, opts: &OpenOptions) -> Result<S3Config, OpenError> {
    let TargetUrl::S3 { bucket, prefix, .. } = url else {
        return Err(OpenError::Setting("not an s3:// URL".into()));
    };
    let (given, fallback) = (&opts.given, &opts.fallback);
    let pick = |flag: &Option<String>, param: &str, file: &Option<String>| {
        flag.clone()
            .or_else(|| url.param(param).map(str::to_owned))
            .or_else(|| file.clone())
    };
    let mut cfg = S3Config::new(bucket);
    cfg.prefix = prefix.clone();
    cfg.endpoint = match pick(&given.endpoint, "endpoint", &fallback.endpoint) {
        Some(e) => Some(endpoint(&e, url.param("scheme"))?),
        None => None,
    };
    let provider = match url.param("provider") {
        Some(p) => Provider::parse(p).ok_or_else(|| {
            OpenError::Setting(format!(
                "unknown provider={p} in the cache URL (use aws, r2, b2, spaces, gcs, wasabi or generic)"
            ))
        })?,
        None => Provider::detect(cfg.endpoint.as_deref()),
    };
    let profile = provider.profile();
    profile.apply(&mut cfg);
    match url.param("checksum") {
        None => {}
        Some("md5") => cfg.content_md5 = true,
        Some("none") => cfg.content_md5 = false,
        Some(other) => {
            return Err(OpenError::Setting(format!(
                "unknown checksum={other} in the cache URL (use md5 or none)"
            )));
        }
    }
    if given.paced || fallback.paced {
        cfg.concurrency = Some(
            given
                .max_concurrency
                .or(fallback.max_concurrency)
                .unwrap_or(profile.ceiling)
                .max(1),
        );
    }
    if let Some(age) = given.resume_within.filter(|d| !d.is_zero())
        && let Some(dir) = Journal::default_dir()
    {
        cfg.journal = Some(Journal { dir, max_age: age });
    }
    cfg.region = pick(&given.region, "region", &fallback.region);
    cfg.profile = pick(&given.profile, "profile", &fallback.profile);
    cfg.path_style = match pick(
        &given.addressing_style,
        "addressing-style",
        &fallback.addressing_style,
    )
    .as_deref()
    {
        None | Some("auto") => None,
        Some("path") => Some(true),
        Some("virtual") => Some(false),
        Some(other) => {
            return Err(OpenError::Setting(format!(
                "unknown S3 addressing style {other:?} (use path, virtual or auto)"
            )));
        }
    };
    if let Some(t) = given.read_timeout.or(fallback.read_timeout) {
        cfg.read_timeout = t.max(Duration::from_secs(1));
    }
    if let Some(p) = given.part_size.or(fallback.part_size) {
        // The memory budget stays what the profile's parts make it.
        let budget = cfg.part_size * cfg.parts_in_flight;
        cfg.part_size = p;
        cfg.parts_in_flight = (budget / p.max(1)).clamp(2, 64);
    }
    if let Some(n) = given.max_attempts.or(fallback.max_attempts) {
        cfg.max_attempts = n.max(1);
    }
    Ok(cfg)
}

/// Checks an endpoint: the server's base URL, `http(s)://host[:port]`, nothing after it. A
/// path (`http://host:9000/bucket`, as provider consoles show a bucket's URL) would put
/// every key under another bucket than the URL names, so it is refused, as is a missing
/// scheme unless `scheme=` gives it (Nix's own `endpoint=host:port&scheme=http`).
fn endpoint(e: &str, scheme: Option<&str>) -> Result<String, OpenError> {
    let e = e.trim();
    let full = match (e.split_once("://"), scheme) {
        (Some(_), _) => e.to_owned(),
        (None, Some(s @ ("http" | "https"))) => format!("{s}://{e}"),
        (None, Some(other)) => {
            return Err(OpenError::Setting(format!(
                "scheme={other} is not http or https"
            )));
        }
        (None, None) => {
            return Err(OpenError::Setting(format!(
                "endpoint {e:?} has no scheme: write https://{e} (or http://{e} for a server without TLS, such as a local MinIO or SeaweedFS)"
            )));
        }
    };
    let Some((s, rest)) = full.split_once("://") else {
        return Err(OpenError::Setting(format!("endpoint {e:?} is not a URL")));
    };
    if s != "http" && s != "https" {
        return Err(OpenError::Setting(format!(
            "endpoint {e:?}: the scheme must be http or https, not {s}"
        )));
    }
    let host = rest.strip_suffix('/').unwrap_or(rest);
    if host.is_empty() || host.contains(['/', '?', '#', '@']) {
        return Err(OpenError::Setting(format!(
            "endpoint {e:?} has a path, query or user part: an endpoint is the S3 server's base URL, {s}://HOST[:PORT]; the bucket goes in s3://BUCKET"
        )));
    }
    Ok(format!("{s}://{host}"))
}

/// Opens the cache `url` names.
pub async fn open(url: &str, opts: &OpenOptions) -> Result<AnyStorage, OpenError> {
    open_target(&TargetUrl::parse(url)?, opts).await
}

/// As [`open`], for a URL already parsed.
pub async fn open_target(url: &TargetUrl, opts: &OpenOptions) -> Result<AnyStorage, OpenError> {
    match url {
        TargetUrl::File { dir, .. } => open_dir(dir, opts.read_only).map(AnyStorage::Local),
        TargetUrl::S3 { .. } => S3Bucket::connect(s3_config(url, opts)?)
            .await
            .map(AnyStorage::S3)
            .map_err(OpenError::Storage),
        TargetUrl::Gateway { base, .. } => {
            if opts.read_only {
                return Err(OpenError::Url(TargetError::GatewayNotCache(base.clone())));
            }
            let token = TokenSource::find(&opts.gateway).map_err(OpenError::Storage)?;
            GatewayTarget::new(base, token)
                .map(AnyStorage::Gateway)
                .map_err(OpenError::Storage)
        }
    }
}

fn open_dir(dir: &Path, read_only: bool) -> Result<LocalDir, OpenError> {
    if read_only && !dir.is_dir() {
        return Err(OpenError::Directory {
            dir: dir.to_owned(),
            reason: "it does not exist or is not a directory".into(),
        });
    }
    LocalDir::open(dir).map_err(|e| OpenError::Directory {
        dir: dir.to_owned(),
        reason: e.to_string(),
    })
}

/// Any backend a cache URL can name.
#[derive(Clone, Debug)]
pub enum AnyStorage {
    Local(LocalDir),
    S3(S3Bucket),
    Gateway(GatewayTarget),
}

impl AnyStorage {
    /// Whether credentials were found (always, for a directory): lets a push from a fork's
    /// pull request, where CI secrets are empty, skip cleanly.
    pub async fn has_credentials(&self) -> bool {
        match self {
            AnyStorage::Local(_) | AnyStorage::Gateway(_) => true,
            AnyStorage::S3(b) => b.has_credentials().await,
        }
    }

    /// Whether the backend can hand out presigned URLs (S3) or the bytes must be proxied.
    pub fn can_presign(&self) -> bool {
        matches!(self, AnyStorage::S3(_))
    }

    /// The ceiling of the adaptive limit on requests in flight, when paced.
    pub fn concurrency_ceiling(&self) -> Option<usize> {
        match self {
            AnyStorage::Local(_) | AnyStorage::Gateway(_) => None,
            AnyStorage::S3(b) => b.concurrency_ceiling(),
        }
    }
}

/// The staged upload of either backend.
pub enum AnyStaged {
    Local(LocalStaged),
    S3(S3Staged),
    Gateway(GatewayStaged),
}

impl Staged for AnyStaged {
    async fn commit(self) -> Result<u64, StorageError> {
        match self {
            AnyStaged::Local(s) => s.commit().await,
            AnyStaged::S3(s) => s.commit().await,
            AnyStaged::Gateway(s) => s.commit().await,
        }
    }

    async fn abort(self) {
        match self {
            AnyStaged::Local(s) => s.abort().await,
            AnyStaged::S3(s) => s.abort().await,
            AnyStaged::Gateway(s) => s.abort().await,
        }
    }
}

/// Calls the same method on whichever backend this is.
macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStorage::Local($s) => $e,
            AnyStorage::S3($s) => $e,
            AnyStorage::Gateway($s) => $e,
        }
    };
}

impl Storage for AnyStorage {
    type Staged = AnyStaged;

    fn describe(&self) -> String {
        each!(self, s => s.describe())
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        each!(self, s => s.head(key).await)
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        each!(self, s => s.get(key).await)
    }

    async fn put(&self, key: &str, ct: &'static str, body: Bytes) -> Result<(), StorageError> {
        each!(self, s => s.put(key, ct, body).await)
    }

    async fn put_if_absent(
        &self,
        key: &str,
        ct: &'static str,
        body: Bytes,
    ) -> Result<bool, StorageError> {
        each!(self, s => s.put_if_absent(key, ct, body).await)
    }

    async fn stage(
        &self,
        key: &str,
        ct: &'static str,
        size_hint: u64,
        body: mpsc::Receiver<Bytes>,
    ) -> Result<AnyStaged, StorageError> {
        match self {
            AnyStorage::Local(s) => s
                .stage(key, ct, size_hint, body)
                .await
                .map(AnyStaged::Local),
            AnyStorage::S3(s) => s.stage(key, ct, size_hint, body).await.map(AnyStaged::S3),
            AnyStorage::Gateway(s) => s
                .stage(key, ct, size_hint, body)
                .await
                .map(AnyStaged::Gateway),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        each!(self, s => s.delete(key).await)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        each!(self, s => s.list(prefix).await)
    }

    async fn list_meta(
        &self,
        prefix: &str,
        shallow: bool,
    ) -> Result<Vec<ObjectMeta>, StorageError> {
        each!(self, s => s.list_meta(prefix, shallow).await)
    }

    async fn abort_uploads_started_before(&self, cutoff: i64) -> Result<usize, StorageError> {
        each!(self, s => s.abort_uploads_started_before(cutoff).await)
    }

    async fn list_top_page(
        &self,
        next: Option<String>,
        max_keys: i32,
    ) -> Result<Option<TopPage>, StorageError> {
        each!(self, s => s.list_top_page(next, max_keys).await)
    }

    async fn read(&self, key: &str) -> Result<Option<ObjectBytes>, StorageError> {
        each!(self, s => s.read(key).await)
    }

    async fn get_limited(&self, key: &str, limit: u64) -> Result<Option<Bytes>, StorageError> {
        each!(self, s => s.get_limited(key, limit).await)
    }

    async fn read_range(
        &self,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<StreamOutcome, StorageError> {
        each!(self, s => s.read_range(key, range).await)
    }

    async fn presign_get(&self, key: &str, ttl: Duration) -> Result<Option<String>, StorageError> {
        each!(self, s => s.presign_get(key, ttl).await)
    }

    async fn presign_put(&self, key: &str, ttl: Duration) -> Result<Option<String>, StorageError> {
        each!(self, s => s.presign_put(key, ttl).await)
    }

    async fn presign_parts(
        &self,
        key: &str,
        parts: u32,
        ttl: Duration,
    ) -> Result<Option<(String, Vec<String>)>, StorageError> {
        each!(self, s => s.presign_parts(key, parts, ttl).await)
    }

    async fn complete_parts(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), StorageError> {
        each!(self, s => s.complete_parts(key, upload_id, etags).await)
    }

    async fn cancel_parts(&self, key: &str, upload_id: &str) {
        each!(self, s => s.cancel_parts(key, upload_id).await)
    }

    async fn copy_checked(
        &self,
        from: &str,
        to: &str,
        etag: &str,
        size: u64,
    ) -> Result<(), StorageError> {
        each!(self, s => s.copy_checked(from, to, etag, size).await)
    }

    async fn exists_many(&self, keys: &[String]) -> Result<Option<Vec<bool>>, StorageError> {
        each!(self, s => s.exists_many(keys).await)
    }

    async fn check_health(&self) -> Result<(), StorageError> {
        each!(self, s => s.check_health().await)
    }

    async fn open_uploads(&self) -> Result<Vec<String>, StorageError> {
        each!(self, s => s.open_uploads().await)
    }

    async fn abort_all_open_uploads(&self) -> Result<usize, StorageError> {
        each!(self, s => s.abort_all_open_uploads().await)
    }

    fn stats(&self) -> RequestStats {
        each!(self, s => s.stats())
    }

    async fn abort_open_uploads(&self) -> usize {
        each!(self, s => s.abort_open_uploads().await)
    }

    fn left_open(&self) -> usize {
        each!(self, s => s.left_open())
    }

    fn notes(&self) -> Vec<String> {
        each!(self, s => s.notes())
    }

    fn concurrency_hint(&self) -> Option<usize> {
        each!(self, s => s.concurrency_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str, given: S3Settings, fallback: S3Settings) -> Result<S3Config, OpenError> {
        let opts = OpenOptions {
            given,
            fallback,
            ..OpenOptions::default()
        };
        s3_config(&TargetUrl::parse(url).unwrap(), &opts)
    }

    #[test]
    fn flags_beat_the_url_which_beats_the_file() {
        let file = S3Settings {
            endpoint: Some("http://file:1".into()),
            region: Some("file-region".into()),
            ..S3Settings::default()
        };
        let c = cfg(
            "s3://b/p?endpoint=http://url:2",
            S3Settings::default(),
            file.clone(),
        )
        .unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://url:2"));
        assert_eq!(c.region.as_deref(), Some("file-region"));
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("b", "p"));
        let flag = S3Settings {
            endpoint: Some("http://flag:3".into()),
            ..S3Settings::default()
        };
        let c = cfg("s3://b?endpoint=http://url:2", flag, file).unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://flag:3"));
    }

    #[test]
    fn nix_endpoint_spelling_and_addressing() {
        let c = cfg(
            "s3://b?endpoint=host:9000&scheme=http",
            S3Settings::default(),
            S3Settings::default(),
        )
        .unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://host:9000"));
        let e = cfg(
            "s3://b?endpoint=host:9000",
            S3Settings::default(),
            S3Settings::default(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("http://host:9000") && e.is_input(),
            "{e}"
        );
        for bad in [
            "http://host:9000/bucket",
            "http://host:9000/b/",
            "https://host?x=1",
            "http://user:pw@host",
            "ftp://host",
            "http://",
        ] {
            let e = cfg(
                &format!("s3://b?endpoint={bad}"),
                S3Settings::default(),
                S3Settings::default(),
            )
            .unwrap_err();
            assert!(e.is_input(), "{bad}: {e}");
        }
        let c = cfg(
            "s3://b?endpoint=http://host:9000/",
            S3Settings::default(),
            S3Settings::default(),
        )
        .unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://host:9000"));
        let c = cfg(
            "s3://b?addressing-style=virtual",
            S3Settings::default(),
            S3Settings::default(),
        )
        .unwrap();
        assert_eq!(c.path_style, Some(false));
        let e = cfg(
            "s3://b?addressing-style=sideways",
            S3Settings::default(),
            S3Settings::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("sideways") && e.is_input(), "{e}");
    }

    #[tokio::test]
    async fn a_directory_to_read_must_exist_and_one_to_write_is_made() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cache");
        let url = format!("file://{}", dir.display());
        let read = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let e = open(&url, &read).await.unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let s = open(&url, &OpenOptions::default()).await.unwrap();
        assert!(matches!(s, AnyStorage::Local(_)) && !s.can_presign());
        assert!(open(&url, &read).await.is_ok());
    }
}
