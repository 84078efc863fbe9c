//! cachepush: publish Nix store closures as a signed binary cache on any S3-compatible
//! object store (or a local directory), and serve private buckets to Nix clients.
//!
//! Module map (see `docs/architecture.md`):
//! - [`format`]: Nix's wire formats (nix32, store paths, NAR, narinfo, keys); no I/O policy.
//! - [`store`]: the local Nix store: resolving arguments, closure and path metadata.
//! - [`compression`]: one pass from a store path to compressed, hashed upload chunks.
//! - [`storage`]: the target trait and its backends.
//! - [`target`]: parsing a cache URL (`file:///DIR`, `s3://BUCKET/...`) into a backend.
//! - [`push`]: closure → plan → upload.
//! - [`gateway`]: serving a private bucket to Nix clients over HTTP.
//! - [`watch`]: noticing new store paths, and the post-build-hook queue.
//! - [`verify`]: checking a whole cache against the invariants clients rely on.
//! - [`upstream`]: other binary caches whose paths need not be pushed.

pub mod compression;
pub mod format;
pub mod gateway;
pub mod push;
pub mod storage;
pub mod store;
pub mod target;
pub mod upstream;
pub mod verify;
pub mod watch;

/// An error and all its causes on one line: the SDKs hide the useful part (connection
/// refused, DNS, TLS) a few `source()`s down.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = inner.source();
    }
    s
}
