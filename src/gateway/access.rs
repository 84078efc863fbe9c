//! `--record-access`: which store paths the gateway served, written to the bucket in
//! batches as read records (`cachepush/reads/`), so that gc can keep what is being used.
//!
//! Never on the request's path: a served narinfo only adds its hash part to a bounded set
//! in memory; one task writes the set out at most once per interval. When the set is full
//! further paths are dropped (and counted) until the next write, so memory stays bounded
//! whatever the traffic.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::format::layout;
use crate::gc::records::{ReadRecord, now, random_id, write_json};
use crate::storage::Storage;

/// Distinct paths held between two writes (about 50 bytes each).
pub const MAX_PENDING: usize = 100_000;

pub struct AccessRecorder {
    pending: Mutex<HashSet<String>>,
    dropped: AtomicU64,
    pub interval: Duration,
}

impl AccessRecorder {
    pub fn new(interval: Duration) -> Self {
        AccessRecorder {
            pending: Mutex::new(HashSet::new()),
            dropped: AtomicU64::new(0),
            interval,
        }
    }

    /// Notes that the narinfo of `hash` was served.
    pub fn record(&self, hash: &str) {
        let Ok(mut p) = self.pending.lock() else {
            return;
        };
        if p.len() < MAX_PENDING || p.contains(hash) {
            p.insert(hash.to_owned());
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes what was recorded since the last write as one read record; returns how many
    /// paths it wrote, or the error (the paths are then kept for the next try, as far as
    /// the bound allows).
    pub async fn flush<S: Storage>(&self, storage: &S) -> Result<usize, String> {
        let paths: Vec<String> = match self.pending.lock() {
            Ok(mut p) => p.drain().collect(),
            Err(_) => return Ok(0),
        };
        if paths.is_empty() {
            return Ok(0);
        }
        let at = now();
        let record = ReadRecord {
            version: 1,
            at,
            paths,
        };
        let key = layout::record_key(layout::READS_DIR, at, &random_id());
        match write_json(storage, &key, &record).await {
            Ok(()) => Ok(record.paths.len()),
            Err(e) => {
                if let Ok(mut p) = self.pending.lock() {
                    for h in record.paths {
                        if p.len() >= MAX_PENDING {
                            break;
                        }
                        p.insert(h);
                    }
                }
                Err(e.to_string())
            }
        }
    }

    /// Paths not recorded because the set was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_are_bounded_and_written_in_one_object() {
        let dir = std::env::temp_dir().join(format!("cachepush-access-{}", std::process::id()));
        let storage = crate::storage::LocalDir::open(&dir).unwrap();
        let r = AccessRecorder::new(Duration::from_secs(60));
        assert_eq!(r.flush(&storage).await, Ok(0));
        for i in 0..MAX_PENDING + 10 {
            r.record(&format!("{i:032}"));
        }
        r.record(&format!("{:032}", 0));
        assert_eq!(r.dropped(), 10);
        assert_eq!(r.flush(&storage).await, Ok(MAX_PENDING));
        let keys = storage.list(layout::READS_DIR).await.unwrap();
        assert_eq!(keys.len(), 1);
        let rec: ReadRecord = crate::gc::records::read_json(&storage, &keys[0])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.paths.len(), MAX_PENDING);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
