//! The push pipeline, in stages: closure → plan → upload; [`session`] runs them in order
//! for one push, with progress and cancellation handed in.
//!
//! 1. **Closure**: `store::LocalStore::query` gives every path with its metadata.
//! 2. **Plan** ([`plan`]): asks the target which narinfos exist (bounded concurrency;
//!    HEADs meeting a listing, [`presence`]) and
//!    splits the closure into "already there" and "to send". Nothing is written.
//! 3. **Upload** ([`execute`]): NARs are streamed, largest first, at most `jobs` at once
//!    and within a memory budget (an S3 target then paces the requests themselves);
//!    each is staged, its NarHash checked against the store's, then committed. A narinfo
//!    is written only after its NAR and after the narinfos of all its references, so a
//!    visible narinfo never points at something missing, whatever fails or stops.

mod plan;
pub mod presence;
pub mod session;
mod upload;

pub use plan::{Plan, PlanOptions, plan};
pub use session::{Observer, Outcome, PlanCounts, PushError, Request, Session};
pub use upload::{Event, PushOptions, Report, execute};

use thiserror::Error;

use crate::format::{Sha256, StorePath};
use crate::storage::StorageError;

/// Why one path was not published.
#[derive(Debug, Error)]
pub enum PathError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("reading the store path: {0}")]
    Read(std::io::Error),
    #[error(
        "NAR hash mismatch: the store database says {expected} ({expected_size} bytes) but the files hash to {got} ({got_size} bytes); the path changed or the store is corrupt (try nix-store --verify-path)"
    )]
    HashMismatch {
        expected: Sha256,
        expected_size: u64,
        got: Sha256,
        got_size: u64,
    },
    #[error("not published because its reference {0} failed")]
    ReferenceFailed(StorePath),
    #[error("internal error: {0}")]
    Internal(String),
}
