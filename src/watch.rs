//! Noticing new store paths, and the on-disk queue that Nix's post-build hook fills.
//!
//! - [`StoreScanner`] lists the store directory and reports entries it has not seen; which
//!   of them are valid (built and registered) is asked of Nix, and the rest wait.
//! - [`Queue`] is a directory of small files, one per hook invocation, each written to a
//!   temporary name and renamed into place, so a reader never sees half a file. A file is
//!   removed only after its paths were published, so nothing is lost when the uploader
//!   stops or crashes; publishing twice is harmless (the second finds the narinfo there).
//!   [`drain`] is that rule, for any [`BatchPusher`].

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::format::{StoreDir, StorePath};

/// Entries of the store directory that are not store paths worth publishing.
fn ignored(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with(".drv")
        || name.ends_with(".lock")
        || name.ends_with(".chroot")
        || name.ends_with(".check")
}

pub struct StoreScanner {
    dir: StoreDir,
    seen: HashSet<OsString>,
    /// New entries not valid yet (a build in progress), asked about again next scan.
    pending: HashSet<StorePath>,
    /// Valid paths whose push failed: offered again once `retry_at` has passed, with a
    /// delay that doubles after each failed round (security review M5: a failed round
    /// must not lose paths for good).
    failed: HashSet<StorePath>,
    failed_rounds: u32,
    retry_at: Option<std::time::Instant>,
}

/// Longest wait between retries of failed paths.
const MAX_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(300);

impl StoreScanner {
    /// Remembers what is in the store now; only later additions are reported.
    pub fn new(dir: StoreDir) -> std::io::Result<Self> {
        let mut s = StoreScanner {
            dir,
            seen: HashSet::new(),
            pending: HashSet::new(),
            failed: HashSet::new(),
            failed_rounds: 0,
            retry_at: None,
        };
        s.seen = s.list()?;
        Ok(s)
    }

    fn list(&self) -> std::io::Result<HashSet<OsString>> {
        std::fs::read_dir(self.dir.as_str())?
            .map(|e| e.map(|e| e.file_name()))
            .collect()
    }

    /// New store paths since the last call, plus earlier ones still waiting to be valid.
    /// The caller asks which are valid and hands the others back with [`Self::wait_for`].
    pub fn candidates(&mut self) -> std::io::Result<Vec<StorePath>> {
        let now = self.list()?;
        for name in now.difference(&self.seen) {
            let Some(name) = name.to_str() else { continue };
            if ignored(name) {
                continue;
            }
            if let Ok(p) = StorePath::from_base_name(name) {
                self.pending.insert(p);
            }
        }
        self.seen = now;
        if self
            .retry_at
            .is_some_and(|t| t <= std::time::Instant::now())
        {
            self.retry_at = None;
            self.pending.extend(self.failed.drain());
        }
        // Paths that vanished (garbage-collected, failed builds) stop being waited for.
        let dir = self.dir.clone();
        self.pending
            .retain(|p| std::fs::symlink_metadata(dir.display(p)).is_ok());
        let mut v: Vec<StorePath> = self.pending.drain().collect();
        v.sort();
        Ok(v)
    }

    /// Puts back candidates that were not valid yet.
    pub fn wait_for(&mut self, not_yet: impl IntoIterator<Item = StorePath>) {
        self.pending.extend(not_yet);
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Paths whose push failed (or whose round failed as a whole): offered again by
    /// [`Self::candidates`] after 2 s, then 4 s, 8 s ... up to 5 minutes.
    pub fn retry_later(&mut self, paths: impl IntoIterator<Item = StorePath>) {
        self.failed.extend(paths);
        if self.failed.is_empty() {
            return;
        }
        self.failed_rounds = self.failed_rounds.saturating_add(1);
        let delay =
            std::time::Duration::from_secs(1u64 << self.failed_rounds.min(9)).min(MAX_RETRY_DELAY);
        self.retry_at = Some(std::time::Instant::now() + delay);
    }

    /// A round published everything it was given: the next failure starts at 2 s again.
    pub fn round_succeeded(&mut self) {
        if self.failed.is_empty() {
            self.failed_rounds = 0;
        }
    }

    /// Offers failed paths at the next [`Self::candidates`] call, whatever the delay (a
    /// last attempt before exiting).
    pub fn retry_now(&mut self) {
        if !self.failed.is_empty() {
            self.retry_at = Some(std::time::Instant::now());
        }
    }

    /// Paths that failed and wait for a retry.
    pub fn failed(&self) -> usize {
        self.failed.len()
    }
}

/// One queued batch of store paths (absolute paths, one per line).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct QueueFile(pub PathBuf);

pub struct Queue {
    dir: PathBuf,
}

impl Queue {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Queue { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Adds a batch atomically; the name sorts by time so batches drain in order.
    pub fn enqueue(&self, paths: &[&str]) -> std::io::Result<QueueFile> {
        std::fs::create_dir_all(&self.dir)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!("{nanos:020}-{}", std::process::id());
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let dest = self.dir.join(format!("{name}.paths"));
        let mut f = std::fs::File::create(&tmp)?;
        for p in paths {
            writeln!(f, "{p}")?;
        }
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &dest)?;
        Ok(QueueFile(dest))
    }

    /// Batches waiting, oldest first.
    pub fn pending(&self) -> std::io::Result<Vec<QueueFile>> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut v: Vec<QueueFile> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "paths"))
            .map(QueueFile)
            .collect();
        v.sort();
        Ok(v)
    }

    pub fn read(&self, f: &QueueFile) -> std::io::Result<Vec<String>> {
        Ok(std::fs::read_to_string(&f.0)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Called only once the batch is published.
    pub fn done(&self, f: &QueueFile) -> std::io::Result<()> {
        match std::fs::remove_file(&f.0) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// What publishing one batch did, as [`drain`] needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batch {
    /// Every path was tried: `failed` of them were not published.
    Done { pushed: usize, failed: usize },
    /// A stop was requested: leave the rest for the next run.
    Interrupted,
}

/// Publishes batches for [`drain`] (the CLI's pusher, or a test's).
pub trait BatchPusher {
    type Error;
    /// The local store the queued paths belong to.
    fn store(&self) -> &crate::store::LocalStore;
    /// Publishes `roots` with their closure.
    fn push_batch(
        &mut self,
        roots: Vec<StorePath>,
    ) -> impl std::future::Future<Output = Result<Batch, Self::Error>>;
    /// Says something the user should know (a line dropped from the queue).
    fn warn(&self, message: &str);
}

/// Why [`drain`] stopped before trying every batch.
#[derive(Debug, thiserror::Error)]
pub enum DrainError<E> {
    #[error("cannot read the queue {}: {source}", dir.display())]
    Queue {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", file.display())]
    File {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot list the store: {0}")]
    Scan(#[source] std::io::Error),
    #[error(transparent)]
    Store(crate::store::StoreError),
    #[error(transparent)]
    Push(E),
}

/// Publishes every queued batch, oldest first. The rule that keeps the queue lossless: a
/// batch leaves the queue only once every path of it was published; a batch with a
/// failure stays for the next round, and so do all batches after an interruption. Lines
/// that are not store paths, and paths garbage-collected since they were queued, cannot
/// ever be published: they are dropped with a warning (the rest of the batch is pushed).
pub async fn drain<P: BatchPusher>(
    queue: &Queue,
    pusher: &mut P,
) -> Result<Batch, DrainError<P::Error>> {
    let files = queue.pending().map_err(|source| DrainError::Queue {
        dir: queue.dir().to_owned(),
        source,
    })?;
    let (mut pushed, mut failed) = (0, 0);
    for f in files {
        let lines = queue.read(&f).map_err(|source| DrainError::File {
            file: f.0.clone(),
            source,
        })?;
        let dir = pusher.store().store_dir().clone();
        let mut roots: Vec<StorePath> = Vec::new();
        for l in &lines {
            match dir.parse_path(l) {
                Ok(p) => roots.push(p),
                Err(e) => pusher.warn(&format!("{}: skipping {l}: {e}", f.0.display())),
            }
        }
        let valid = pusher
            .store()
            .valid_of(&roots)
            .await
            .map_err(DrainError::Store)?;
        for gone in roots.iter().filter(|r| !valid.contains(r)) {
            pusher.warn(&format!(
                "{} is no longer in the store; dropped from the queue",
                dir.display(gone)
            ));
        }
        let outcome = if valid.is_empty() {
            Batch::Done {
                pushed: 0,
                failed: 0,
            }
        } else {
            pusher.push_batch(valid).await.map_err(DrainError::Push)?
        };
        match outcome {
            Batch::Interrupted => return Ok(Batch::Interrupted),
            Batch::Done {
                pushed: p,
                failed: 0,
            } => {
                pushed += p;
                queue.done(&f).map_err(|source| DrainError::File {
                    file: f.0.clone(),
                    source,
                })?;
            }
            // Kept for the next round.
            Batch::Done {
                pushed: p,
                failed: n,
            } => {
                pushed += p;
                failed += n;
            }
        }
    }
    Ok(Batch::Done { pushed, failed })
}

/// One round of watching the store: asks Nix which new entries are valid, publishes
/// those, and hands the rest back to the scanner. Paths of a round that failed, in part or
/// as a whole, go back to the scanner to be retried with backoff: a failed round never
/// loses paths (security review M5).
pub async fn push_new<P: BatchPusher>(
    pusher: &mut P,
    scanner: &mut StoreScanner,
) -> Result<Batch, DrainError<P::Error>> {
    let nothing = Batch::Done {
        pushed: 0,
        failed: 0,
    };
    let candidates = scanner.candidates().map_err(DrainError::Scan)?;
    if candidates.is_empty() {
        return Ok(nothing);
    }
    let valid = match pusher.store().valid_of(&candidates).await {
        Ok(v) => v,
        Err(e) => {
            scanner.retry_later(candidates);
            return Err(DrainError::Store(e));
        }
    };
    scanner.wait_for(candidates.into_iter().filter(|c| !valid.contains(c)));
    if valid.is_empty() {
        return Ok(nothing);
    }
    // Re-pushing the whole round is cheap: what was published is found present.
    let res = pusher.push_batch(valid.clone()).await;
    match &res {
        Ok(Batch::Done { failed: 0, .. }) => scanner.round_succeeded(),
        Ok(Batch::Done { .. }) | Err(_) => {
            scanner.retry_later(valid);
            pusher.warn(&format!(
                "{} will be pushed again after a pause",
                if scanner.failed() == 1 {
                    "1 path".to_owned()
                } else {
                    format!("{} paths", scanner.failed())
                }
            ));
        }
        // Stopping: nothing is retried, the process ends.
        Ok(Batch::Interrupted) => {}
    }
    res.map_err(DrainError::Push)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_paths_come_back_after_a_delay_or_on_request() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StoreDir::new(tmp.path().to_str().unwrap()).unwrap();
        let mut scanner = StoreScanner::new(dir.clone()).unwrap();
        let name = "h7jx3wrzn6m9vjl9604id854qx1xyqw6-hello";
        std::fs::create_dir(tmp.path().join(name)).unwrap();
        let found = scanner.candidates().unwrap();
        assert_eq!(found.len(), 1);
        // The push failed: not offered again at once, but not lost either.
        scanner.retry_later(found.clone());
        assert_eq!(scanner.failed(), 1);
        assert!(scanner.candidates().unwrap().is_empty());
        scanner.retry_now();
        assert_eq!(scanner.candidates().unwrap(), found);
        assert_eq!(scanner.failed(), 0);
        // A failed path that was garbage-collected meanwhile is dropped.
        scanner.retry_later(found);
        std::fs::remove_dir(tmp.path().join(name)).unwrap();
        scanner.retry_now();
        assert!(scanner.candidates().unwrap().is_empty());
    }

    #[test]
    fn queue_round_trip_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let q = Queue::new(tmp.path().join("q"));
        assert!(q.pending().unwrap().is_empty());
        let a = q.enqueue(&["/nix/store/a", "/nix/store/b"]).unwrap();
        let b = q.enqueue(&["/nix/store/c"]).unwrap();
        assert_eq!(q.pending().unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(q.read(&a).unwrap(), vec!["/nix/store/a", "/nix/store/b"]);
        q.done(&a).unwrap();
        q.done(&a).unwrap();
        assert_eq!(q.pending().unwrap(), vec![b]);
    }
}
