//! Noticing new store paths, and the on-disk queue that Nix's post-build hook fills.
//!
//! - [`StoreScanner`] lists the store directory and reports entries it has not seen; which
//!   of them are valid (built and registered) is asked of Nix, and the rest wait.
//! - [`Queue`] is a directory of small files, one per hook invocation, each written to a
//!   temporary name and renamed into place, so a reader never sees half a file. A file is
//!   removed only after its paths were published, so nothing is lost when the uploader
//!   stops or crashes; publishing twice is harmless (the second finds the narinfo there).

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
}

impl StoreScanner {
    /// Remembers what is in the store now; only later additions are reported.
    pub fn new(dir: StoreDir) -> std::io::Result<Self> {
        let mut s = StoreScanner {
            dir,
            seen: HashSet::new(),
            pending: HashSet::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
