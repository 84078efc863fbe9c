//! Where a binary cache lives: one small trait, one backend per kind of target.
//!
//! Every backend passes the same conformance suite (`tests/storage_conformance.rs`). The
//! semantics the push pipeline relies on:
//! - `put` replaces an object atomically: a reader sees the old bytes or the new, never part;
//! - `put_if_absent` never replaces (for `nix-cache-info`);
//! - `stage` takes a stream of bytes and leaves nothing visible under `key` until
//!   [`Staged::commit`]; [`Staged::abort`] (or dropping it) leaves nothing behind.

pub mod local;

use std::future::Future;

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::mpsc;

pub use local::LocalDir;

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
    #[error("{op} {key}: access denied ({message}); check the credentials and their permissions")]
    Denied {
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
            }
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
    fn stage(
        &self,
        key: &str,
        content_type: &'static str,
        body: mpsc::Receiver<Bytes>,
    ) -> impl Future<Output = Result<Self::Staged, StorageError>> + Send;

    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Keys under `prefix`, in no particular order. Never used to decide correctness.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, StorageError>> + Send;
}

/// Content types as Nix's own binary-cache stores set them.
pub mod content_type {
    pub const CACHE_INFO: &str = "text/x-nix-cache-info";
    pub const NARINFO: &str = "text/x-nix-narinfo";
    pub const NAR: &str = "application/x-nix-nar";
    pub const LISTING: &str = "application/json";
    pub const LOG: &str = "text/plain; charset=utf-8";
}
