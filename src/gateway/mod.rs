//! `cachepush gateway`: a read-through HTTP server that speaks the Nix binary-cache protocol
//! to clients and reads any [`Storage`](crate::storage::Storage): a private S3 bucket, or a
//! local cache directory (like nix-serve for a `file://` cache).
//!
//! Decisions, in the order a request meets them ([`handler`]):
//! 1. method (GET and HEAD only) and request-target shape ([`route`]): refused requests
//!    never cause a request to the storage;
//! 2. authentication ([`auth`], [`limit`]), when configured: failures are 401 with
//!    `WWW-Authenticate: Basic`, never 403 or 404, which Nix reads as "absent";
//! 3. narinfo and `nix-cache-info` ([`narinfo`]) from a bounded TTL cache ([`cache`]) or
//!    the storage, optionally countersigned with the gateway's own key ([`sign`]);
//! 4. NARs ([`nar`]) by redirect to a presigned GET URL, or proxied as a stream (with
//!    Range), which is also the fallback for storage that cannot presign; HEAD is always
//!    answered here, as a presigned GET URL cannot answer a HEAD;
//! 5. `/healthz` ([`health`]) and `/metrics` ([`metrics`]) without credentials;
//! 6. the push API under `/_cachepush/push/v1/` ([`push`]), with rights of its own
//!    (CI identity tokens, [`oidc`]; push-scope tokens, [`token`]), when it is on.
//!
//! Storage 404 is 404; every other storage failure is 502/503/504, so a client never
//! caches an outage as "absent" ([`error`] holds every status decision). Error bodies are
//! generic; details go to the log. Connections, limits and shutdown are [`server`]'s.

pub mod access;
pub mod auth;
pub mod cache;
pub mod config;
pub mod error;
pub mod handler;
pub mod health;
pub mod limit;
pub mod metrics;
pub mod nar;
pub mod narinfo;
pub mod oidc;
pub mod push;
pub mod response;
pub mod route;
pub mod server;
pub mod sign;
pub mod tls;
pub mod token;

pub use config::{CacheControl, Delivery, GatewayConfig, GatewayError, Listen};
pub use response::Body;
pub use server::{Reload, raise_open_file_limit, serve, serve_reloading};
pub use tls::load_tls;
