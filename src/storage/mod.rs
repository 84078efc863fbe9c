//! Where a binary cache lives: one small trait, one backend per kind of target.
//!
//! Every backend passes the same conformance suite (`tests/storage_conformance.rs`). The
//! semantics the push pipeline relies on:
//! - `put` replaces an object atomically: a reader sees the old bytes or the new, never part;
//! - `put_if_absent` never replaces (for `nix-cache-info`);
//! - `stage` takes a stream of bytes and leaves nothing visible under `key` until
//!   [`Staged::commit`]; [`Staged::abort`] (or dropping it) leaves nothing behind.

pub mod gateway;
pub mod local;
pub mod open;
pub mod s3;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::mpsc;

pub use local::LocalDir;
pub use open::{AnyStorage, OpenError, OpenOptions, S3Settings, open, open_target};
pub use s3::{S3Bucket, S3Config};

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("{op} {key}: {source}")]
    Io {
        op: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {key}: {message}")]
    Remote {
        op: &'static str,
        key: String,
        message: String,
        /// Worth retrying (throttling, 5xx, timeouts, resets).
        transient: bool,
    },
    /// No answer: the endpoint is unreachable, or did not answer in time.
    #[error("{op} {key}: {message}")]
    Unavailable {
        op: &'static str,
        key: String,
        message: String,
        timeout: bool,
    },
    #[error("{op} {key}: access denied ({message}); check the credentials and their permissions")]
    Denied {
        op: &'static str,
        key: String,
        message: String,
    },
    /// The server does not implement this API (HTTP 501, `NotImplemented`): for an API
    /// that is only a check or an optimisation, the caller does without it.
    #[error("{op} {key}: the server does not support this request ({message})")]
    Unsupported {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("{0}")]
    Config(String),
}

impl StorageError {
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StorageError::Remote {
                transient: true,
                ..
            } | StorageError::Unavailable { .. }
        )
    }
}

/// An upload whose bytes are stored but not yet visible under their key.
pub trait Staged: Send {
    /// Makes the object visible; returns its size in bytes.
    fn commit(self) -> impl Future<Output = Result<u64, StorageError>> + Send;
    /// Discards the upload; best effort, never fails the caller.
    fn abort(self) -> impl Future<Output = ()> + Send;
}

/// A binary-cache target: keys are relative (`nix-cache-info`, `<hash>.narinfo`, `nar/...`).
pub trait Storage: Send + Sync + 'static {
    type Staged: Staged + 'static;

    /// A human-readable name of the target, with no secrets in it.
    fn describe(&self) -> String;

    /// The object's size, or `None` when it does not exist.
    fn head(&self, key: &str) -> impl Future<Output = Result<Option<u64>, StorageError>> + Send;

    /// The whole object, or `None` when it does not exist. For small objects only.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Bytes>, StorageError>> + Send;

    fn put(
        &self,
        key: &str,
        content_type: &'static str,
        body: Bytes,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Creates the object unless it exists; `Ok(false)` when it already did.
    fn put_if_absent(
        &self,
        key: &str,
        content_type: &'static str,
        body: Bytes,
    ) -> impl Future<Output = Result<bool, StorageError>> + Send;

    /// Consumes `body` until the sender is dropped and stages it under `key`.
    /// `size_hint` is the expected size (e.g. the NAR size), used to choose part sizes.
    fn stage(
        &self,
        key: &str,
        content_type: &'static str,
        size_hint: u64,
        body: mpsc::Receiver<Bytes>,
    ) -> impl Future<Output = Result<Self::Staged, StorageError>> + Send;

    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Keys under `prefix`, in no particular order. Never used to decide correctness.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, StorageError>> + Send;

    /// One page of the keys at the top level of the cache (narinfos, `nix-cache-info`; the
    /// `nar/` folder as one entry), in byte order, starting after the page `next` names.
    /// `None` when the backend has no listing cheaper than asking for each key.
    fn list_top_page(
        &self,
        next: Option<String>,
        max_keys: i32,
    ) -> impl Future<Output = Result<Option<TopPage>, StorageError>> + Send {
        let _ = (next, max_keys);
        async { Ok(None) }
    }

    /// Streams an object's bytes, for objects of any size; `None` when it does not exist.
    fn read(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<ObjectBytes>, StorageError>> + Send;

    /// Reads a whole small object (a narinfo, `nix-cache-info`), refusing one larger than
    /// `limit` bytes, so that a huge object under that name cannot take a server's memory.
    fn get_limited(
        &self,
        key: &str,
        limit: u64,
    ) -> impl Future<Output = Result<Option<Bytes>, StorageError>> + Send {
        async move {
            match self.head(key).await? {
                Some(len) if len > limit => Err(StorageError::Remote {
                    op: "GET",
                    key: key.to_owned(),
                    message: format!("the object is {len} bytes, more than the {limit} expected"),
                    transient: false,
                }),
                _ => self.get(key).await,
            }
        }
    }

    /// Opens an object for streaming, the whole of it or one byte range, with the headers
    /// an HTTP answer needs (for the gateway's proxying).
    fn read_range(
        &self,
        key: &str,
        range: Option<ByteRange>,
    ) -> impl Future<Output = Result<StreamOutcome, StorageError>> + Send;

    /// A URL that lets its holder GET `key` without credentials for `ttl`; `None` when the
    /// backend cannot make one (the gateway then proxies the bytes itself).
    fn presign_get(
        &self,
        key: &str,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<Option<String>, StorageError>> + Send {
        let _ = (key, ttl);
        async { Ok(None) }
    }

    /// A URL that lets its holder PUT exactly `key` for `ttl` without credentials (the
    /// gateway's upload grants); `None` when the backend cannot make one.
    fn presign_put(
        &self,
        key: &str,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<Option<String>, StorageError>> + Send {
        let _ = (key, ttl);
        async { Ok(None) }
    }

    /// Starts a multipart upload of `key` and presigns parts 1..=`parts` for `ttl`: the
    /// upload id and one URL per part; `None` when the backend cannot.
    fn presign_parts(
        &self,
        key: &str,
        parts: u32,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<Option<(String, Vec<String>)>, StorageError>> + Send {
        let _ = (key, parts, ttl);
        async { Ok(None) }
    }

    /// Completes an upload of [`presign_parts`](Self::presign_parts) with the ETags of
    /// parts 1..=n, in order.
    fn complete_parts(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        let _ = (upload_id, etags);
        let key = key.to_owned();
        async move {
            Err(StorageError::Unsupported {
                op: "CompleteMultipartUpload",
                key,
                message: "this target has no presigned uploads".into(),
            })
        }
    }

    /// Aborts an upload of [`presign_parts`](Self::presign_parts); best effort.
    fn cancel_parts(&self, key: &str, upload_id: &str) -> impl Future<Output = ()> + Send {
        let _ = (key, upload_id);
        async {}
    }

    /// Copies `from` to `to` inside the target, only while `from` has the tag `etag` (as
    /// [`read_range`](Self::read_range) gave it), `size` bytes long.
    fn copy_checked(
        &self,
        from: &str,
        to: &str,
        etag: &str,
        size: u64,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        let _ = (from, etag, size);
        let key = to.to_owned();
        async move {
            Err(StorageError::Unsupported {
                op: "CopyObject",
                key,
                message: "this target cannot copy objects".into(),
            })
        }
    }

    /// Whether each of `keys` exists, asked all at once, for a backend that has such a
    /// question (a gateway); `None` when it has not (the caller asks key by key).
    fn exists_many(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Result<Option<Vec<bool>>, StorageError>> + Send {
        let _ = keys;
        async { Ok(None) }
    }

    /// Whether the cache itself exists and answers (for `/healthz`, and to tell a missing
    /// cache from a missing object, which a HEAD alone cannot).
    fn check_health(&self) -> impl Future<Output = Result<(), StorageError>> + Send {
        async {
            self.head(crate::format::layout::CACHE_INFO)
                .await
                .map(|_| ())
        }
    }

    /// Objects whose keys start with `prefix`, with size, modification time and tag, in
    /// byte order; with `shallow`, keys with a further `/` after the prefix are left out.
    /// What gc and stats list (one request per 1000 keys).
    fn list_meta(
        &self,
        prefix: &str,
        shallow: bool,
    ) -> impl Future<Output = Result<Vec<ObjectMeta>, StorageError>> + Send {
        let _ = shallow;
        async move {
            Err(StorageError::Unsupported {
                op: "LIST",
                key: prefix.to_owned(),
                message: "this target cannot list objects with their dates".into(),
            })
        }
    }

    /// Aborts the multipart uploads under the cache's prefix, by anyone, that were started
    /// before `cutoff` (seconds since the epoch); returns how many it aborted.
    fn abort_uploads_started_before(
        &self,
        cutoff: i64,
    ) -> impl Future<Output = Result<usize, StorageError>> + Send {
        let _ = cutoff;
        async { Ok(0) }
    }

    /// Keys of multipart uploads started and neither completed nor aborted, by anyone.
    fn open_uploads(&self) -> impl Future<Output = Result<Vec<String>, StorageError>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Aborts every open multipart upload under the cache's prefix, by anyone (run it only
    /// when no push is running); returns how many there were.
    fn abort_all_open_uploads(&self) -> impl Future<Output = Result<usize, StorageError>> + Send {
        async { Ok(0) }
    }

    /// Requests sent so far, by kind (all zero for backends that send none).
    fn stats(&self) -> RequestStats {
        RequestStats::default()
    }

    /// Aborts every upload that was started and neither committed nor aborted (called on
    /// Ctrl-C, when the tasks that own them are gone); returns how many it aborted.
    fn abort_open_uploads(&self) -> impl Future<Output = usize> + Send {
        async { 0 }
    }

    /// Uploads this process started that are still open (their abort failed too).
    fn left_open(&self) -> usize {
        0
    }

    /// Optional features the backend found missing and did without (conditional writes,
    /// say), each once, for the user to hear about.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// How many requests the backend lets out at once right now, when it paces them
    /// itself: callers keep about that many waiting, so that what they send later (a
    /// narinfo on a chain's critical path) does not queue behind hundreds of others.
    fn concurrency_hint(&self) -> Option<usize> {
        None
    }
}

/// One object as a listing shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Relative to the cache, as every other key.
    pub key: String,
    pub size: u64,
    /// Last modified, in seconds since the Unix epoch.
    pub modified: i64,
    /// Changes whenever the bytes change (the S3 ETag; size and mtime for a directory).
    pub etag: String,
}

/// One page of [`Storage::list_top_page`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopPage {
    /// Object keys in this page (folders left out).
    pub keys: Vec<String>,
    /// Every top-level key up to and including this one has now been listed; `None` when
    /// the listing is complete.
    pub covered_to: Option<String>,
    /// Where the next page starts (opaque); `None` when the listing is complete.
    pub next: Option<String>,
}

/// One byte range of an object, as a single HTTP `Range` (RFC 9110 §14.1.2) asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=A-`: from A to the end.
    From(u64),
    /// `bytes=A-B`: A to B inclusive (A <= B).
    FromTo(u64, u64),
    /// `bytes=-N`: the last N bytes (N > 0).
    Last(u64),
}

impl ByteRange {
    /// The `Range` header value.
    pub fn header(&self) -> String {
        match self {
            ByteRange::From(a) => format!("bytes={a}-"),
            ByteRange::FromTo(a, b) => format!("bytes={a}-{b}"),
            ByteRange::Last(n) => format!("bytes=-{n}"),
        }
    }

    /// The first and last byte (inclusive) of an object of `len` bytes this range covers;
    /// `None` when it covers none (416).
    pub fn resolve(&self, len: u64) -> Option<(u64, u64)> {
        let last = len.checked_sub(1)?;
        match *self {
            ByteRange::From(a) | ByteRange::FromTo(a, _) if a > last => None,
            ByteRange::From(a) => Some((a, last)),
            ByteRange::FromTo(a, b) => Some((a, b.min(last))),
            ByteRange::Last(0) => None,
            ByteRange::Last(n) => Some((len.saturating_sub(n), last)),
        }
    }
}

/// What [`Storage::read_range`] found.
pub enum StreamOutcome {
    Found(ObjectStream),
    NotFound,
    RangeNotSatisfiable,
}

/// An object being read: its headers, and its body as it arrives.
pub struct ObjectStream {
    pub length: Option<u64>,
    /// Set for a range request (`bytes 0-99/1234`).
    pub content_range: Option<String>,
    pub etag: Option<String>,
    pub body: ObjectBytes,
}

/// An object's bytes as they arrive.
pub type ObjectBytes =
    std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static>>;

/// Requests sent to a remote target, by kind; what `--json` reports and tests count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RequestStats {
    pub head: u64,
    pub get: u64,
    pub put: u64,
    /// Create, UploadPart, Complete and Abort of multipart uploads.
    pub multipart: u64,
    pub delete: u64,
    pub list: u64,
    /// Requests that were repeated after a transient failure (included above too).
    pub retries: u64,
    /// Answers that asked us to slow down (429, 503, SlowDown...; included above too).
    pub throttled: u64,
    /// When small requests were paced: the highest limit on them in flight, and how many
    /// times throttling halved it (0 and 0 when not paced).
    pub limit_peak: u64,
    pub limit_cuts: u64,
    /// Bytes of multipart parts not sent again because an earlier, killed push had sent
    /// them (the upload was resumed from its journal).
    pub resumed_bytes: u64,
}

/// A kind of request, as [`RequestStats`] counts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Head,
    Get,
    Put,
    /// Create, UploadPart, Complete and Abort of multipart uploads.
    Multipart,
    Delete,
    List,
}

/// The live counters behind [`RequestStats`], shared by every request a backend sends;
/// only its retry helper adds to them, once per attempt, so no request goes uncounted.
#[derive(Debug, Default)]
pub struct RequestCounters {
    head: AtomicU64,
    get: AtomicU64,
    put: AtomicU64,
    multipart: AtomicU64,
    delete: AtomicU64,
    list: AtomicU64,
    retries: AtomicU64,
    throttled: AtomicU64,
    resumed: AtomicU64,
}

impl RequestCounters {
    /// One request of `kind` is being sent.
    pub fn sent(&self, kind: RequestKind) {
        let c = match kind {
            RequestKind::Head => &self.head,
            RequestKind::Get => &self.get,
            RequestKind::Put => &self.put,
            RequestKind::Multipart => &self.multipart,
            RequestKind::Delete => &self.delete,
            RequestKind::List => &self.list,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` bytes of parts were found on the server and not sent again.
    pub fn resumed(&self, n: u64) {
        self.resumed.fetch_add(n, Ordering::Relaxed);
    }

    /// The server asked us to slow down.
    pub fn throttled(&self) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// A request is being repeated after a transient failure.
    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> RequestStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RequestStats {
            head: l(&self.head),
            get: l(&self.get),
            put: l(&self.put),
            multipart: l(&self.multipart),
            delete: l(&self.delete),
            list: l(&self.list),
            retries: l(&self.retries),
            throttled: l(&self.throttled),
            limit_peak: 0,
            limit_cuts: 0,
            resumed_bytes: l(&self.resumed),
        }
    }
}

impl RequestStats {
    /// Requests that write (PUTs and every multipart request).
    pub fn writes(&self) -> u64 {
        self.put + self.multipart
    }
}

pub use crate::format::layout::content_type;

#[cfg(test)]
mod tests {
    use super::ByteRange::*;

    #[test]
    fn ranges_resolve_as_rfc_9110_says() {
        assert_eq!(From(0).resolve(10), Some((0, 9)));
        assert_eq!(From(9).resolve(10), Some((9, 9)));
        assert_eq!(From(10).resolve(10), None);
        assert_eq!(FromTo(2, 4).resolve(10), Some((2, 4)));
        assert_eq!(FromTo(2, 400).resolve(10), Some((2, 9)));
        assert_eq!(FromTo(10, 12).resolve(10), None);
        assert_eq!(Last(3).resolve(10), Some((7, 9)));
        assert_eq!(Last(30).resolve(10), Some((0, 9)));
        assert_eq!(Last(0).resolve(10), None);
        assert_eq!(From(0).resolve(0), None);
        assert_eq!(FromTo(1, 2).header(), "bytes=1-2");
        assert_eq!(Last(5).header(), "bytes=-5");
        assert_eq!(From(7).header(), "bytes=7-");
    }
}
