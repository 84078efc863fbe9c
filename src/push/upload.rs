//! Executing a plan: bounded, ordered, verified uploads.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{PathError, Plan};
use crate::compression::{self, Compression, Produced};
use crate::format::{NarInfo, SecretKey, StoreDir, StorePath, layout};
use crate::storage::{Staged, Storage, content_type};
use crate::store::{LocalStore, PathInfo};

/// Size of the pieces a NAR is cut into on its way to the target.
const CHUNK: usize = 1 << 20;
/// Chunks buffered between the NAR producer and the uploader, per upload.
const CHANNEL_DEPTH: usize = 4;
/// Memory the NARs in flight may hold at once, each counted as what it buffers (below).
/// With the part budget of the S3 client (128 MiB) this keeps a push's peak well under
/// 256 MiB however many small NARs the adaptive limit lets out at once.
const NAR_BUDGET: u64 = 96 << 20;
/// A NAR's share of [`NAR_BUDGET`]: a small one is buffered whole (compressed output is
/// rarely larger, plus slack); a large one holds at most a part being filled (16 MiB by
/// default) and its channel.
fn weight(nar_size: u64) -> u64 {
    (nar_size + (64 << 10)).min(SMALL)
        + if nar_size >= SMALL {
            (CHANNEL_DEPTH * CHUNK) as u64
        } else {
            0
        }
}
/// Below this (the default part size) a NAR is buffered whole and compressed under a CPU
/// slot (see `execute`); from it on it streams in parts.
const SMALL: u64 = 16 << 20;

#[derive(Clone, Debug)]
pub struct PushOptions {
    pub compression: Compression,
    /// Uploads (NARs and narinfos) in flight at once.
    pub jobs: usize,
    pub signing_key: Option<Arc<SecretKey>>,
    /// Also write `<hash>.ls`, the NAR listing (Nix's `write-nar-listing`).
    pub write_nar_listing: bool,
    /// Also upload `log/<drv>`, the build log of each pushed path's derivation when the
    /// local store has it (as `nix store copy-log --to` does).
    pub logs: bool,
    /// `Priority:` and `WantMassQuery:` for `nix-cache-info`: written when the cache has
    /// none, or updated when it says otherwise; `None` leaves what is there (or Nix's
    /// defaults, 40 and true, for a new cache).
    pub priority: Option<u32>,
    pub want_mass_query: Option<bool>,
}

/// Progress, for whoever shows it to the user.
#[derive(Debug)]
pub enum Event<'a> {
    NarStarted {
        path: &'a StorePath,
        nar_size: u64,
    },
    NarDone {
        path: &'a StorePath,
        nar_size: u64,
        file_size: u64,
    },
    Published {
        path: &'a StorePath,
    },
    Failed {
        path: &'a StorePath,
        error: &'a PathError,
    },
}

/// The outcome of a push.
#[derive(Debug, Default)]
pub struct Report {
    pub pushed: usize,
    pub skipped: usize,
    pub failed: Vec<(StorePath, PathError)>,
    pub nar_bytes: u64,
    pub sent_bytes: u64,
    pub seconds: f64,
    /// Build logs uploaded (`--logs`).
    pub logs: usize,
    /// Build logs that could not be uploaded, and why (their paths are published).
    pub log_failures: Vec<(StorePath, String)>,
}

enum Done {
    Nar(StorePath, Result<Box<NarInfo>, PathError>),
    NarInfo(StorePath, Result<(), PathError>),
}

/// Publishes `plan.to_send`, calling `on_event` as things happen.
pub async fn execute<S: Storage>(
    store: &LocalStore,
    storage: Arc<S>,
    plan: Plan,
    opts: &PushOptions,
    on_event: &(dyn Fn(Event<'_>) + Sync),
) -> Report {
    let started = Instant::now();
    let jobs = opts.jobs.max(1);
    let mut report = Report {
        skipped: plan.skipped(),
        ..Report::default()
    };

    // Which references each path still waits for before its narinfo may be written.
    let sending: HashSet<StorePath> = plan.to_send.iter().map(|p| p.path.clone()).collect();
    let mut waiting_on: HashMap<StorePath, HashSet<StorePath>> = HashMap::new();
    let mut dependents: HashMap<StorePath, Vec<StorePath>> = HashMap::new();
    for info in &plan.to_send {
        let refs: HashSet<StorePath> = info
            .references
            .iter()
            .filter(|r| **r != info.path && sending.contains(*r))
            .cloned()
            .collect();
        for r in &refs {
            dependents
                .entry(r.clone())
                .or_default()
                .push(info.path.clone());
        }
        waiting_on.insert(info.path.clone(), refs);
    }

    // Order: large NARs first, so that one big path does not become the tail of the push;
    // then the bottoms of the longest chains, since a chain's narinfos go out one round
    // trip after another once their NARs are there; then larger before smaller.
    let height = chain_heights(&plan.to_send, &dependents);
    let mut queue: Vec<PathInfo> = plan.to_send;
    queue.sort_by_key(|p| {
        (
            p.nar_size >= SMALL,
            height.get(&p.path).copied().unwrap_or(0),
            p.nar_size,
        )
    });

    let mut nars: JoinSet<Done> = JoinSet::new();
    let mut narinfos: JoinSet<Done> = JoinSet::new();
    let mut ready: Vec<Box<NarInfo>> = Vec::new();
    let mut staged_narinfo: HashMap<StorePath, Box<NarInfo>> = HashMap::new();
    let mut failed: HashSet<StorePath> = HashSet::new();
    // Each task's path, and the bytes of [`NAR_BUDGET`] it holds (0 for a narinfo).
    let mut task_path: HashMap<tokio::task::Id, (StorePath, u64)> = HashMap::new();
    let mut holding: u64 = 0;
    // Compressing a small NAR is pure CPU (its upload starts when it is done), so however
    // many are in flight for the network, only a few compress at once: more would only
    // add zstd contexts (a few MiB each) and thread switches, not speed.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let cpu = Arc::new(tokio::sync::Semaphore::new(cores * 2));

    loop {
        // A paced backend lets out about `limit` requests at once: keep not many more NARs
        // than that under way, so that a narinfo (the next link of a chain) waits behind a
        // short queue, not behind hundreds of NARs.
        let cap = storage
            .concurrency_hint()
            .map_or(jobs, |l| (l + l / 4 + 4).min(jobs));
        while nars.len() < cap {
            // The budget bounds memory, never progress: one NAR always goes.
            let Some(next) = queue.last() else { break };
            let w = weight(next.nar_size);
            if holding + w > NAR_BUDGET && !nars.is_empty() {
                break;
            }
            let Some(info) = queue.pop() else { break };
            on_event(Event::NarStarted {
                path: &info.path,
                nar_size: info.nar_size,
            });
            let storage = storage.clone();
            let real = store.real_path(&info.path);
            let dir = store.store_dir().clone();
            let opts = opts.clone();
            let p = info.path.clone();
            let cpu = (info.nar_size < SMALL).then(|| cpu.clone());
            let handle = nars.spawn(async move {
                let path = info.path.clone();
                let slot = match cpu {
                    Some(c) => c.acquire_owned().await.ok(),
                    None => None,
                };
                let res = upload_nar(&*storage, &dir, real, info, &opts, slot).await;
                Done::Nar(path, res.map(Box::new))
            });
            task_path.insert(handle.id(), (p, w));
            holding += w;
        }
        while narinfos.len() < jobs {
            let Some(ni) = ready.pop() else { break };
            let storage = storage.clone();
            let p = ni.store_path.clone();
            let handle = narinfos.spawn(async move {
                let key = layout::narinfo_of(&ni.store_path);
                let res = storage
                    .put(&key, content_type::NARINFO, Bytes::from(ni.to_string()))
                    .await
                    .map_err(PathError::from);
                Done::NarInfo(ni.store_path, res)
            });
            task_path.insert(handle.id(), (p, 0));
        }

        let next = tokio::select! {
            Some(r) = nars.join_next_with_id(), if !nars.is_empty() => r,
            Some(r) = narinfos.join_next_with_id(), if !narinfos.is_empty() => r,
            else => break,
        };
        let id = match &next {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        let task = task_path.remove(&id);
        holding -= task.as_ref().map_or(0, |t| t.1);
        let done = match next {
            Ok((_, d)) => d,
            // A task that panicked still fails only its own path, found by its task id.
            Err(e) => match task.map(|t| t.0) {
                Some(p) => Done::Nar(p, Err(PathError::Internal(e.to_string()))),
                None => continue,
            },
        };
        match done {
            // A dependent of a failed path may still have had its NAR in flight.
            Done::Nar(path, Ok(_)) if failed.contains(&path) => {}
            Done::Nar(path, Ok(ni)) => {
                on_event(Event::NarDone {
                    path: &path,
                    nar_size: ni.nar_size,
                    file_size: ni.file_size.unwrap_or(0),
                });
                report.nar_bytes += ni.nar_size;
                report.sent_bytes += ni.file_size.unwrap_or(0);
                if waiting_on.get(&path).is_some_and(HashSet::is_empty) {
                    ready.push(ni);
                } else {
                    staged_narinfo.insert(path, ni);
                }
            }
            Done::NarInfo(path, Ok(())) => {
                on_event(Event::Published { path: &path });
                report.pushed += 1;
                for d in dependents.remove(&path).unwrap_or_default() {
                    let Some(w) = waiting_on.get_mut(&d) else {
                        continue;
                    };
                    w.remove(&path);
                    if w.is_empty()
                        && let Some(ni) = staged_narinfo.remove(&d)
                    {
                        ready.push(ni);
                    }
                }
            }
            Done::Nar(path, Err(e)) | Done::NarInfo(path, Err(e)) => {
                // Everything that refers to a failed path, directly or not, fails with it:
                // its narinfo would otherwise point at a path the cache does not have.
                let mut stack = vec![(path, e)];
                while let Some((p, err)) = stack.pop() {
                    if !failed.insert(p.clone()) {
                        continue;
                    }
                    staged_narinfo.remove(&p);
                    queue.retain(|q| q.path != p);
                    for d in dependents.remove(&p).unwrap_or_default() {
                        stack.push((d, PathError::ReferenceFailed(p.clone())));
                    }
                    on_event(Event::Failed {
                        path: &p,
                        error: &err,
                    });
                    report.failed.push((p, err));
                }
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// For each path, the longest chain of paths (being sent) that refer to it, directly or
/// not: 0 for a path nothing being sent refers to.
fn chain_heights(
    paths: &[PathInfo],
    dependents: &HashMap<StorePath, Vec<StorePath>>,
) -> HashMap<StorePath, usize> {
    // Kahn's algorithm from the top: a path's height is known once all its dependents'.
    let mut pending: HashMap<&StorePath, usize> = paths
        .iter()
        .map(|p| (&p.path, dependents.get(&p.path).map_or(0, Vec::len)))
        .collect();
    let refs: HashMap<&StorePath, &[StorePath]> = paths
        .iter()
        .map(|p| (&p.path, p.references.as_slice()))
        .collect();
    let mut height: HashMap<StorePath, usize> = HashMap::new();
    let mut ready: Vec<&StorePath> = pending
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(p, _)| *p)
        .collect();
    while let Some(p) = ready.pop() {
        let h = *height.entry(p.clone()).or_insert(0);
        for r in refs.get(p).copied().unwrap_or_default() {
            if r == p {
                continue;
            }
            let Some(n) = pending.get_mut(r) else {
                continue;
            };
            let e = height.entry(r.clone()).or_insert(0);
            *e = (*e).max(h + 1);
            *n -= 1;
            if *n == 0 {
                ready.push(r);
            }
        }
    }
    height
}

/// Streams one NAR to the target and returns the narinfo to publish for it.
async fn upload_nar<S: Storage>(
    storage: &S,
    store_dir: &StoreDir,
    real: std::path::PathBuf,
    info: PathInfo,
    opts: &PushOptions,
    cpu_slot: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<NarInfo, PathError> {
    // Named by NarHash, known before compressing, so one pass can stream it.
    let url = layout::nar_key(&info.nar_hash, opts.compression.extension());
    let (tx, rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
    let compression = opts.compression;
    let hint = info.nar_size;
    let listing = opts.write_nar_listing;
    let producer = tokio::task::spawn_blocking(move || {
        let _slot = cpu_slot;
        compression::produce_listed(&real, compression, hint, CHUNK, tx, listing)
    });
    let staged = storage.stage(&url, content_type::NAR, hint, rx).await;
    let produced = producer
        .await
        .map_err(|e| PathError::Internal(e.to_string()))
        .and_then(|r| r.map_err(PathError::Read));
    let (staged, produced): (S::Staged, Produced) = match (staged, produced) {
        (Ok(s), Ok(p)) => (s, p),
        (Ok(s), Err(e)) => {
            s.abort().await;
            return Err(e);
        }
        // The producer stops with BrokenPipe when the upload fails; the upload's error says why.
        (Err(e), _) => return Err(e.into()),
    };
    if produced.nar_hash != info.nar_hash || produced.nar_size != info.nar_size {
        staged.abort().await;
        return Err(PathError::HashMismatch {
            expected: info.nar_hash,
            expected_size: info.nar_size,
            got: produced.nar_hash,
            got_size: produced.nar_size,
        });
    }
    staged.commit().await?;
    // As Nix does: the listing after the NAR, before the narinfo (so a visible narinfo's
    // listing is there too), uncompressed.
    if let Some(ls) = produced.listing {
        storage
            .put(
                &layout::listing_key(info.path.hash_part()),
                content_type::LISTING,
                Bytes::from(ls),
            )
            .await?;
    }
    let mut ni = NarInfo {
        store_dir: store_dir.clone(),
        store_path: info.path,
        url,
        compression: opts.compression.name().to_owned(),
        file_hash: Some(produced.file_hash),
        file_size: Some(produced.file_size),
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        references: info.references,
        deriver: info.deriver,
        system: None,
        sigs: info.sigs,
        ca: info.ca,
        extra: vec![],
    };
    if let Some(key) = &opts.signing_key {
        ni.sign(key);
    }
    Ok(ni)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::nar;
    use crate::storage::local::LocalStaged;
    use crate::storage::{LocalDir, ObjectBytes, StorageError};
    use std::sync::Mutex;

    /// A local cache that records the order in which objects became visible, and refuses
    /// the narinfo PUTs it is told to.
    struct Recording {
        inner: LocalDir,
        log: Arc<Mutex<Vec<String>>>,
        refuse: HashSet<String>,
    }

    struct RecStaged {
        inner: LocalStaged,
        key: String,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Staged for RecStaged {
        async fn commit(self) -> Result<u64, StorageError> {
            let n = self.inner.commit().await?;
            self.log.lock().unwrap().push(self.key);
            Ok(n)
        }
        async fn abort(self) {
            self.inner.abort().await
        }
    }

    impl Storage for Recording {
        type Staged = RecStaged;
        fn describe(&self) -> String {
            "recording".into()
        }
        async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
            self.inner.head(key).await
        }
        async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
            self.inner.get(key).await
        }
        async fn put(&self, key: &str, ct: &'static str, body: Bytes) -> Result<(), StorageError> {
            if self.refuse.contains(key) {
                return Err(StorageError::Denied {
                    op: "PUT",
                    key: key.into(),
                    message: "refused by the test".into(),
                });
            }
            self.inner.put(key, ct, body).await?;
            self.log.lock().unwrap().push(key.to_owned());
            Ok(())
        }
        async fn put_if_absent(
            &self,
            key: &str,
            ct: &'static str,
            body: Bytes,
        ) -> Result<bool, StorageError> {
            self.inner.put_if_absent(key, ct, body).await
        }
        async fn stage(
            &self,
            key: &str,
            ct: &'static str,
            size_hint: u64,
            body: mpsc::Receiver<Bytes>,
        ) -> Result<RecStaged, StorageError> {
            Ok(RecStaged {
                inner: self.inner.stage(key, ct, size_hint, body).await?,
                key: key.to_owned(),
                log: self.log.clone(),
            })
        }
        async fn delete(&self, key: &str) -> Result<(), StorageError> {
            self.inner.delete(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
            self.inner.list(prefix).await
        }
        async fn read(&self, key: &str) -> Result<Option<ObjectBytes>, StorageError> {
            self.inner.read(key).await
        }
        async fn read_range(
            &self,
            key: &str,
            range: Option<crate::storage::ByteRange>,
        ) -> Result<crate::storage::StreamOutcome, StorageError> {
            self.inner.read_range(key, range).await
        }
    }

    /// A store path made by hand under `dir`, with its true NarHash (or a wrong one).
    fn path(store: &Path, dir: &StoreDir, name: &str, refs: &[&PathInfo], lie: bool) -> PathInfo {
        let hash = crate::format::nix32::encode(&Sha256::digest(name.as_bytes()).as_bytes()[..20]);
        let base = format!("{hash}-{name}");
        std::fs::write(
            store.join(&base),
            format!("{name} refers to {}", refs.len()),
        )
        .unwrap();
        let mut bytes = Vec::new();
        nar::dump_path(&store.join(&base), &mut bytes).unwrap();
        let p = dir.parse_path(&format!("{}/{base}", dir.as_str())).unwrap();
        let mut references: Vec<StorePath> = refs.iter().map(|r| r.path.clone()).collect();
        references.sort();
        PathInfo {
            path: p,
            nar_hash: if lie {
                Sha256::digest(b"something else")
            } else {
                Sha256::digest(&bytes)
            },
            nar_size: bytes.len() as u64,
            references,
            deriver: None,
            sigs: vec![],
            ca: None,
        }
    }

    use crate::format::Sha256;
    use std::path::Path;

    #[test]
    fn chain_heights_count_the_longest_chain_of_referrers() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        std::fs::create_dir_all(&root).unwrap();
        let dir = StoreDir::new(root.to_str().unwrap()).unwrap();
        // a <- b <- c <- d, a <- e (e alone above a), f alone.
        let a = path(&root, &dir, "a", &[], false);
        let b = path(&root, &dir, "b", &[&a], false);
        let c = path(&root, &dir, "c", &[&b], false);
        let d = path(&root, &dir, "d", &[&c], false);
        let e = path(&root, &dir, "e", &[&a], false);
        let f = path(&root, &dir, "f", &[], false);
        let all = vec![
            a.clone(),
            b.clone(),
            c.clone(),
            d.clone(),
            e.clone(),
            f.clone(),
        ];
        let mut dependents: HashMap<StorePath, Vec<StorePath>> = HashMap::new();
        for p in &all {
            for r in &p.references {
                dependents
                    .entry(r.clone())
                    .or_default()
                    .push(p.path.clone());
            }
        }
        let h = chain_heights(&all, &dependents);
        let got: Vec<usize> = all.iter().map(|p| h[&p.path]).collect();
        assert_eq!(got, vec![3, 2, 1, 0, 0, 0]);
    }

    #[tokio::test]
    async fn order_failure_propagation_and_the_hash_gate() {
        let tmp = tempfile::tempdir().unwrap();
        let store_root = tmp.path().join("store");
        std::fs::create_dir_all(&store_root).unwrap();
        let dir = StoreDir::new(store_root.to_str().unwrap()).unwrap();
        let store = LocalStore::with_store_dir(dir.clone());
        // g cannot be read whole: a file, then a socket the NAR format has no place for.
        let g_base = format!(
            "{}-g",
            crate::format::nix32::encode(&Sha256::digest(b"g").as_bytes()[..20])
        );
        std::fs::create_dir_all(store_root.join(&g_base)).unwrap();
        std::fs::write(store_root.join(&g_base).join("a-file"), vec![7u8; 3 << 20]).unwrap();
        let _socket =
            std::os::unix::net::UnixListener::bind(store_root.join(&g_base).join("z-socket"))
                .unwrap();
        let g = PathInfo {
            path: dir
                .parse_path(&format!("{}/{g_base}", dir.as_str()))
                .unwrap(),
            nar_hash: Sha256::digest(b"unknowable"),
            nar_size: 3 << 20,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        // a <- b <- c (c does not refer to a), d alone, e lies about its hash, f refers to e.
        let a = path(&store_root, &dir, "a", &[], false);
        let b = path(&store_root, &dir, "b", &[&a], false);
        let c = path(&store_root, &dir, "c", &[&b], false);
        let d = path(&store_root, &dir, "d", &[], false);
        let e = path(&store_root, &dir, "e", &[], true);
        let f = path(&store_root, &dir, "f", &[&e], false);
        let narinfo = |p: &PathInfo| format!("{}.narinfo", p.path.hash_part());
        let cache = tmp.path().join("cache");
        let log = Arc::new(Mutex::new(Vec::new()));
        let storage = Arc::new(Recording {
            inner: LocalDir::open(&cache).unwrap(),
            log: log.clone(),
            refuse: [narinfo(&a)].into(),
        });
        let plan = Plan {
            closure: 7,
            present: vec![],
            signed_elsewhere: vec![],
            upstream: vec![],
            to_send: vec![
                a.clone(),
                b.clone(),
                c.clone(),
                d.clone(),
                e.clone(),
                f.clone(),
                g.clone(),
            ],
            upstream_errors: vec![],
            repaired: vec![],
            listing_error: None,
        };
        let opts = PushOptions {
            compression: Compression::None,
            jobs: 2,
            signing_key: Some(Arc::new(SecretKey::generate("sched-1").unwrap())),
            write_nar_listing: false,
            logs: false,
            priority: None,
            want_mass_query: None,
        };
        let report = execute(&store, storage.clone(), plan, &opts, &|_| {}).await;
        assert_eq!(report.pushed, 1, "{:?}", report.failed);
        let failed: HashMap<String, String> = report
            .failed
            .iter()
            .map(|(p, e)| (p.name().to_owned(), e.to_string()))
            .collect();
        assert_eq!(failed.len(), 6, "{failed:?}");
        assert!(failed["g"].contains("reading the store path"), "{failed:?}");
        assert!(failed["a"].contains("refused by the test"), "{failed:?}");
        assert!(failed["b"].contains("its reference") && failed["b"].contains("-a"));
        assert!(failed["c"].contains("its reference") && failed["c"].contains("-b"));
        assert!(failed["e"].contains("NAR hash mismatch"), "{failed:?}");
        assert!(failed["f"].contains("its reference") && failed["f"].contains("-e"));

        // Only d is visible, its NAR before its narinfo; nothing of e was committed.
        let log = log.lock().unwrap().clone();
        let d_nar = log
            .iter()
            .position(|k| k.starts_with("nar/") && k.contains(&d.nar_hash.nix32()));
        let d_info = log.iter().position(|k| *k == narinfo(&d));
        assert!(d_nar.is_some() && d_nar < d_info, "{log:?}");
        assert!(
            !log.iter().any(|k| k.contains(&e.nar_hash.nix32())),
            "{log:?}"
        );
        for p in [&a, &b, &c, &e, &f, &g] {
            assert!(!log.contains(&narinfo(p)), "{} published: {log:?}", p.path);
        }
        // The half-read NAR and the lying one were aborted: nothing of them under nar/, and
        // no temp file left. (NARs whose narinfo failed later may stay: unreferenced.)
        let nars: Vec<_> = std::fs::read_dir(tmp.path().join("cache/nar"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        for gone in [&e, &g] {
            let name = format!("{}.nar", gone.nar_hash.nix32());
            assert!(!nars.contains(&name), "{}: {nars:?}", gone.path);
        }
        assert!(!nars.iter().any(|n| n.starts_with(".tmp-")), "{nars:?}");

        // Nothing refused: each narinfo comes after its NAR and its references' narinfos.
        let log = Arc::new(Mutex::new(Vec::new()));
        let storage = Arc::new(Recording {
            inner: LocalDir::open(&tmp.path().join("cache2")).unwrap(),
            log: log.clone(),
            refuse: HashSet::new(),
        });
        let plan = Plan {
            closure: 4,
            present: vec![],
            signed_elsewhere: vec![],
            upstream: vec![],
            to_send: vec![a.clone(), b.clone(), c.clone(), d.clone()],
            upstream_errors: vec![],
            repaired: vec![],
            listing_error: None,
        };
        let report = execute(&store, storage, plan, &opts, &|_| {}).await;
        assert_eq!((report.pushed, report.failed.len()), (4, 0));
        let log = log.lock().unwrap().clone();
        let at = |k: &str| {
            log.iter()
                .position(|x| x == k)
                .unwrap_or_else(|| panic!("{k}: {log:?}"))
        };
        for p in [&a, &b, &c, &d] {
            let nar = format!("nar/{}.nar", p.nar_hash.nix32());
            assert!(at(&nar) < at(&narinfo(p)), "{log:?}");
            for r in &p.references {
                assert!(
                    at(&format!("{}.narinfo", r.hash_part())) < at(&narinfo(p)),
                    "{log:?}"
                );
            }
        }
    }
}
