//! What pushes and gateways tell gc through the bucket, and how gc tells pushes it runs.
//!
//! The protocol (its guarantee is stated in docs/gc.md):
//! - A push with anything to publish writes a **push record** (its closure's hash parts and
//!   NAR hashes) before it writes anything else, renews it while it runs, and marks it
//!   released at the end. While unreleased and unexpired it is a **lease**: gc keeps
//!   everything it names. After release it stays as the record that the paths were pushed
//!   (recency for `--keep-days`) until gc folds it into its index.
//! - gc writes its **marker** before it deletes anything, lists the leases it has seen after
//!   every reading of them, and marks itself finished at the end (the marker stays).
//! - A push reads the marker before its plan and again after its lease. A gc deleting, or a
//!   new gc, in between means the plan may be stale: it plans again. A gc deleting that has
//!   not seen the lease yet makes the push wait until it has. So every path the push relies
//!   on being present stays present until the push has finished.
//! - A gateway with `--record-access` writes **read records**: hash parts it served.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::format::layout::{self, content_type};
use crate::storage::{Storage, StorageError};

/// How long a lease lasts without renewal: a push killed without releasing its lease
/// holds its paths this long.
pub const LEASE_TTL: i64 = 600;
/// How often a running push renews its lease.
pub const LEASE_RENEW: Duration = Duration::from_secs(120);
/// How long a gc marker lasts without renewal; a gc renews it far more often.
pub const MARKER_TTL: i64 = 120;
/// How far apart the clocks of pushers and gc may be (docs/gc.md asks for NTP).
pub const CLOCK_SKEW: i64 = 30;
/// The largest record or marker read back, so that a huge object there costs no memory.
const RECORD_LIMIT: u64 = 64 << 20;

pub use crate::host::{host_name, now, process_alive, random_id};

/// A push's record and lease.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PushRecord {
    pub version: u32,
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub started: i64,
    /// The lease holds until then; 0 once the push released it.
    pub expires: i64,
    /// Hash parts of the closure the push publishes or relies on.
    pub paths: Vec<String>,
    /// The NarHash (nix32) of each: NARs named by them are kept while the lease holds.
    #[serde(default)]
    pub nar_hashes: Vec<String>,
}

impl PushRecord {
    /// Whether it still holds its paths at `now`, seen from a clock up to
    /// [`CLOCK_SKEW`] away.
    pub fn is_lease(&self, now: i64) -> bool {
        self.expires != 0 && self.expires + CLOCK_SKEW > now
    }
}

/// Hash parts served by a gateway, written in batches.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReadRecord {
    pub version: u32,
    pub at: i64,
    pub paths: Vec<String>,
}

/// What a running gc says about itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GcMarker {
    pub version: u32,
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub started: i64,
    /// The gc deletes nothing after this (it renews it while it runs).
    pub deadline: i64,
    /// Whether it may delete now; before, a push needs no wait.
    pub deleting: bool,
    /// The leases (push ids) it had seen when it wrote this.
    pub leases_seen: Vec<String>,
    /// It has ended: the marker stays, so that a push can tell that a gc ran (and may have
    /// deleted) between two looks at it.
    #[serde(default)]
    pub finished: bool,
}

impl GcMarker {
    /// Whether this gc may still be deleting at `now` (it is alive as far as anyone can
    /// tell from here).
    pub fn is_running(&self, now: i64) -> bool {
        if self.finished || self.deadline + CLOCK_SKEW <= now {
            return false;
        }
        self.host != host_name() || process_alive(self.pid)
    }
}

/// Reads one JSON record; `None` when absent. A record that does not parse is an error
/// naming its key (gc then keeps what it cannot read about).
pub async fn read_json<S: Storage, T: for<'de> Deserialize<'de>>(
    storage: &S,
    key: &str,
) -> Result<Option<T>, RecordError> {
    let Some(bytes) = storage.get_limited(key, RECORD_LIMIT).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| RecordError::Unreadable {
            key: key.to_owned(),
            reason: e.to_string(),
        })
}

pub async fn write_json<S: Storage, T: Serialize>(
    storage: &S,
    key: &str,
    value: &T,
) -> Result<(), RecordError> {
    let body = serde_json::to_vec(value).map_err(|e| RecordError::Unreadable {
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    storage
        .put(key, content_type::JSON, Bytes::from(body))
        .await
        .map_err(RecordError::from)
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{key}: not a cachepush record ({reason})")]
    Unreadable { key: String, reason: String },
}

/// The last gc's marker, if any gc ever ran (one this version cannot read counts as none:
/// it is a newer cachepush's, and a push then waits on nothing).
pub async fn last_gc<S: Storage>(storage: &S) -> Result<Option<GcMarker>, RecordError> {
    match read_json(storage, layout::GC_MARKER).await {
        Err(RecordError::Unreadable { .. }) => Ok(None),
        other => other,
    }
}

/// Whether a gc may have deleted something between two looks at the marker: one was
/// deleting at the first look, or another one started since.
pub fn gc_between(first: Option<&GcMarker>, second: Option<&GcMarker>) -> bool {
    first.is_some_and(|m| m.deleting && !m.finished)
        || first.map(|m| &m.id) != second.map(|m| &m.id)
}

/// A push's lease, from [`Lease::take`] to [`Lease::release`].
pub struct Lease {
    key: String,
    record: PushRecord,
}

impl Lease {
    /// Writes the push record for `paths` (hash part, NarHash in nix32).
    pub async fn take<S: Storage>(
        storage: &S,
        paths: impl Iterator<Item = (String, String)>,
    ) -> Result<Lease, RecordError> {
        let started = now();
        let id = random_id();
        let (paths, nar_hashes) = paths.unzip();
        let record = PushRecord {
            version: 1,
            id: id.clone(),
            host: host_name(),
            pid: std::process::id(),
            started,
            expires: started + LEASE_TTL,
            paths,
            nar_hashes,
        };
        let key = layout::record_key(layout::PUSHES_DIR, started, &id);
        write_json(storage, &key, &record).await?;
        Ok(Lease { key, record })
    }

    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// Waits until no gc could delete what this push finds present: none runs, or the one
    /// that runs has seen this lease. `waiting` is told once, with the gc's marker, when a
    /// wait begins. Returns the marker as last seen.
    pub async fn wait_for_gc<S: Storage>(
        &self,
        storage: &S,
        mut waiting: impl FnMut(&GcMarker),
    ) -> Result<Option<GcMarker>, RecordError> {
        let mut told = false;
        loop {
            let Some(m) = last_gc(storage).await? else {
                return Ok(None);
            };
            if !m.deleting || !m.is_running(now()) || m.leases_seen.iter().any(|l| l == self.id()) {
                return Ok(Some(m));
            }
            if !told {
                waiting(&m);
                told = true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Renews the lease every [`LEASE_RENEW`] until dropped; run it beside the push.
    pub async fn keep_alive<S: Storage>(&self, storage: &S) {
        let mut record = self.record.clone();
        loop {
            tokio::time::sleep(LEASE_RENEW).await;
            record.expires = now() + LEASE_TTL;
            // A failed renewal is tried again at the next tick; the lease lasts five.
            let _ = write_json(storage, &self.key, &record).await;
        }
    }

    /// Ends the lease; the record stays as the note that these paths were pushed.
    pub async fn release<S: Storage>(self, storage: &S) -> Result<(), RecordError> {
        let mut record = self.record;
        record.expires = 0;
        write_json(storage, &self.key, &record).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_and_markers_expire_with_skew() {
        let r = PushRecord {
            version: 1,
            id: "a".into(),
            host: "elsewhere".into(),
            pid: 1,
            started: 100,
            expires: 200,
            paths: vec![],
            nar_hashes: vec![],
        };
        assert!(r.is_lease(150));
        assert!(r.is_lease(200 + CLOCK_SKEW - 1));
        assert!(!r.is_lease(200 + CLOCK_SKEW));
        assert!(!PushRecord { expires: 0, ..r }.is_lease(0));
        let m = GcMarker {
            version: 1,
            id: "g".into(),
            host: "not-this-host.invalid".into(),
            pid: 1,
            started: 0,
            deadline: 100,
            deleting: true,
            leases_seen: vec![],
            finished: false,
        };
        assert!(m.is_running(100));
        assert!(
            !GcMarker {
                finished: true,
                ..m.clone()
            }
            .is_running(50)
        );
        // Two looks at the marker: a gc deleting at the first, or a new gc since, means
        // the push asks again what the cache has.
        let done = GcMarker {
            finished: true,
            deleting: false,
            ..m.clone()
        };
        let other = GcMarker {
            id: "h".into(),
            ..done.clone()
        };
        assert!(!gc_between(None, None));
        assert!(!gc_between(Some(&done), Some(&done)));
        assert!(gc_between(None, Some(&done)));
        assert!(gc_between(Some(&done), Some(&other)));
        assert!(gc_between(Some(&m), Some(&done)));
        assert!(!m.is_running(100 + CLOCK_SKEW));
        // On this host, a marker whose process is gone is not running.
        let dead = GcMarker {
            host: host_name(),
            pid: u32::MAX - 1,
            ..m.clone()
        };
        assert!(!dead.is_running(50));
        let alive = GcMarker {
            host: host_name(),
            pid: std::process::id(),
            ..m
        };
        assert!(alive.is_running(50));
    }
}
