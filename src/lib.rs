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

pub mod compression;
pub mod format;
pub mod push;
pub mod storage;
pub mod store;
pub mod target;
