//! A binary cache in a local directory (`file:///DIR`), laid out as Nix lays it out.
//!
//! Every write goes to a temporary file in the same directory, is synced, and is renamed
//! into place, so a crash leaves at worst a stray `.tmp-*` file, never a torn object.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{ByteRange, ObjectMeta, ObjectStream, Staged, Storage, StorageError, StreamOutcome};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Debug)]
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    /// Opens (and creates, if needed) the cache directory.
    pub fn open(root: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(root.join("nar")).map_err(|source| StorageError::Io {
            op: "create directory",
            key: root.display().to_string(),
            source,
        })?;
        Ok(LocalDir {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        // Keys come from our own code, but a key must never escape the cache directory.
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(StorageError::Config(format!("invalid object key {key:?}")));
        }
        Ok(self.root.join(key))
    }

    /// The file to read for `key`, or `None` when there is none. A path that resolves
    /// outside the cache directory is refused: a symlink planted by someone who can write
    /// the directory must not make a gateway serve files only it may read (its own
    /// credentials, say).
    async fn readable(&self, key: &str) -> Result<Option<PathBuf>, StorageError> {
        let path = self.path(key)?;
        let real = match tokio::fs::canonicalize(&path).await {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("resolve", key)(e)),
        };
        let root = tokio::fs::canonicalize(&self.root)
            .await
            .map_err(io_err("resolve", key))?;
        if !real.starts_with(&root) {
            return Err(StorageError::Config(format!(
                "{key} resolves outside the cache directory; refusing to read it"
            )));
        }
        Ok(Some(real))
    }

    /// A temp name beside `target` that nobody can guess: with a predictable one, another
    /// local user who can write the cache directory could plant a symlink there and have
    /// cachepush (often root, in hook setups) write through it (security review L15).
    /// The file is then created with `O_EXCL` (which also refuses a symlink).
    fn tmp_path(target: &Path) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nonce: u64 = rand::random();
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        target.with_file_name(format!(
            ".tmp-{}-{n}-{nonce:016x}-{name}",
            std::process::id()
        ))
    }
}

fn io_err(op: &'static str, key: &str) -> impl FnOnce(std::io::Error) -> StorageError {
    let key = key.to_owned();
    move |source| StorageError::Io { op, key, source }
}

/// Writes `data` to a temp file beside `target`, syncs it, and returns the temp path.
fn write_tmp(target: &Path, data: &[u8]) -> std::io::Result<PathBuf> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = LocalDir::tmp_path(target);
    let mut f = std::fs::File::create_new(&tmp)?;
    let res = f.write_all(data).and_then(|_| f.sync_all());
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

async fn blocking<T: Send + 'static>(
    op: &'static str,
    key: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Io {
            op,
            key: key.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(io_err(op, key))
}

impl Storage for LocalDir {
    type Staged = LocalStaged;

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        let Some(path) = self.readable(key).await? else {
            return Ok(None);
        };
        match tokio::fs::metadata(path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", key)(e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        let Some(path) = self.readable(key).await? else {
            return Ok(None);
        };
        match tokio::fs::read(path).await {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", key)(e)),
        }
    }

    async fn read(&self, key: &str) -> Result<Option<super::ObjectBytes>, StorageError> {
        use tokio::io::AsyncReadExt;
        let Some(path) = self.readable(key).await? else {
            return Ok(None);
        };
        let file = match tokio::fs::File::open(path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", key)(e)),
        };
        let stream = futures::stream::unfold(file, |mut f| async move {
            let mut buf = bytes::BytesMut::with_capacity(1 << 20);
            match f.read_buf(&mut buf).await {
                Ok(0) => None,
                Ok(_) => Some((Ok(buf.freeze()), f)),
                Err(e) => Some((Err(e), f)),
            }
        });
        Ok(Some(Box::pin(stream)))
    }

    async fn read_range(
        &self,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<StreamOutcome, StorageError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let Some(path) = self.readable(key).await? else {
            return Ok(StreamOutcome::NotFound);
        };
        let mut file = match tokio::fs::File::open(path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(StreamOutcome::NotFound);
            }
            Err(e) => return Err(io_err("open", key)(e)),
        };
        let len = file.metadata().await.map_err(io_err("stat", key))?.len();
        let (start, count, content_range) = match range {
            None => (0, len, None),
            Some(r) => match r.resolve(len) {
                Some((a, b)) => (a, b - a + 1, Some(format!("bytes {a}-{b}/{len}"))),
                None => return Ok(StreamOutcome::RangeNotSatisfiable),
            },
        };
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(io_err("seek", key))?;
        // Objects are never rewritten in place (every write is a rename), so the open file
        // keeps the length just read.
        let stream = futures::stream::unfold(file.take(count), |mut f| async move {
            let mut buf = bytes::BytesMut::with_capacity(1 << 16);
            match f.read_buf(&mut buf).await {
                Ok(0) => None,
                Ok(_) => Some((Ok(buf.freeze()), f)),
                Err(e) => Some((Err(e), f)),
            }
        });
        Ok(StreamOutcome::Found(ObjectStream {
            length: Some(count),
            content_range,
            etag: None,
            body: Box::pin(stream),
        }))
    }

    /// The directory itself must be there: a cache directory that was moved or unmounted
    /// is an outage, not a cache in which everything is absent.
    async fn check_health(&self) -> Result<(), StorageError> {
        match tokio::fs::metadata(&self.root).await {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(io_err("stat", &self.root.display().to_string())(
                std::io::Error::other("not a directory"),
            )),
            Err(e) => Err(io_err("stat", &self.root.display().to_string())(e)),
        }
    }

    async fn put(&self, key: &str, _ct: &'static str, body: Bytes) -> Result<(), StorageError> {
        let target = self.path(key)?;
        blocking("write", key, move || {
            let tmp = write_tmp(&target, &body)?;
            std::fs::rename(&tmp, &target).inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
        })
        .await
    }

    async fn put_if_absent(
        &self,
        key: &str,
        _ct: &'static str,
        body: Bytes,
    ) -> Result<bool, StorageError> {
        let target = self.path(key)?;
        blocking("write", key, move || {
            let tmp = write_tmp(&target, &body)?;
            // link() fails with AlreadyExists instead of replacing, unlike rename().
            let res = std::fs::hard_link(&tmp, &target);
            let _ = std::fs::remove_file(&tmp);
            match res {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn stage(
        &self,
        key: &str,
        _ct: &'static str,
        _size_hint: u64,
        mut body: mpsc::Receiver<Bytes>,
    ) -> Result<LocalStaged, StorageError> {
        let target = self.path(key)?;
        let tmp = LocalDir::tmp_path(&target);
        let mut staged = LocalStaged {
            tmp: Some(tmp.clone()),
            target,
            key: key.to_owned(),
            size: 0,
        };
        // Created here, synchronously (one quick local call): with tokio's open, a stage
        // dropped while the open was in flight on a worker thread would have the file
        // created after `staged`'s Drop had already cleaned up, leaving a stray temp file.
        let mut file = tokio::fs::File::from_std(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(io_err("create", key))?,
        );
        while let Some(chunk) = body.recv().await {
            staged.size += chunk.len() as u64;
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                .await
                .map_err(io_err("write", key))?;
        }
        file.sync_all().await.map_err(io_err("sync", key))?;
        Ok(staged)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete", key)(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        Ok(self
            .list_meta(prefix, false)
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect())
    }

    async fn list_meta(
        &self,
        prefix: &str,
        shallow: bool,
    ) -> Result<Vec<ObjectMeta>, StorageError> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        blocking("list", &prefix.clone(), move || {
            let mut out = Vec::new();
            let mut dirs = vec![root.clone()];
            while let Some(d) = dirs.pop() {
                let entries = match std::fs::read_dir(&d) {
                    Ok(e) => e,
                    // A folder removed while we walk (a concurrent gc) holds nothing.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                for e in entries {
                    let e = e?;
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with(".tmp-") {
                        continue;
                    }
                    let Ok(rel) = e
                        .path()
                        .strip_prefix(&root)
                        .map(|r| r.to_string_lossy().into_owned())
                    else {
                        continue;
                    };
                    // Only walk into folders the prefix can reach.
                    if e.file_type()?.is_dir() {
                        let dir = format!("{rel}/");
                        if (dir.starts_with(&prefix) && !shallow) || prefix.starts_with(&dir) {
                            dirs.push(e.path());
                        }
                        continue;
                    }
                    if !rel.starts_with(&prefix) || (shallow && rel[prefix.len()..].contains('/')) {
                        continue;
                    }
                    let m = match e.metadata() {
                        Ok(m) => m,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    };
                    let modified = m
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .unwrap_or_default();
                    out.push(ObjectMeta {
                        key: rel,
                        size: m.len(),
                        modified: modified.as_secs() as i64,
                        etag: format!("{}-{}", m.len(), modified.as_nanos()),
                    });
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }
}

/// A NAR written to a temp file, renamed into place on commit and removed otherwise.
pub struct LocalStaged {
    tmp: Option<PathBuf>,
    target: PathBuf,
    key: String,
    size: u64,
}

impl Staged for LocalStaged {
    async fn commit(mut self) -> Result<u64, StorageError> {
        let Some(tmp) = self.tmp.take() else {
            return Ok(self.size);
        };
        let res = tokio::fs::rename(&tmp, &self.target).await;
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err("rename", &self.key)(e));
        }
        Ok(self.size)
    }

    async fn abort(mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = tokio::fs::remove_file(tmp).await;
        }
    }
}

impl Drop for LocalStaged {
    fn drop(&mut self) {
        // Cancelled (e.g. Ctrl-C) between staging and commit: leave nothing behind.
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}
