//! The push session in-process, over a local cache directory wrapped in a storage that
//! refuses chosen keys: the invariants the push promises, checked without the CLI.
//! - no narinfo is visible before its NAR and before its references' narinfos;
//! - a path whose NAR or narinfo failed fails its dependents, transitively, and nothing
//!   else;
//! - nothing is left open (no upload, no temp file), whether the push ends, fails or is
//!   cancelled; and a second run publishes what the first could not.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cachepush::compression::Compression;
use cachepush::format::{NarInfo, StorePath, layout};
use cachepush::push::{Outcome, PathError, PlanOptions, PushOptions, Request, Session};
use cachepush::storage::{
    ByteRange, LocalDir, ObjectBytes, Staged, Storage, StorageError, StreamOutcome,
};
use cachepush::store::LocalStore;
use cachepush::watch::{Batch, Queue, drain};
use common::*;
use tokio::sync::mpsc;

/// A local directory that refuses to publish chosen keys (by prefix) and records the
/// order in which objects became visible.
struct Refusing {
    inner: LocalDir,
    refuse: Vec<String>,
    visible: Arc<Mutex<Vec<String>>>,
}

impl Refusing {
    fn refused(&self, op: &'static str, key: &str) -> Result<(), StorageError> {
        if self.refuse.iter().any(|r| key.starts_with(r.as_str())) {
            return Err(StorageError::Remote {
                op,
                key: key.into(),
                message: "refused by the test".into(),
                transient: false,
            });
        }
        Ok(())
    }
}

struct RefusingStaged {
    inner: <LocalDir as Storage>::Staged,
    key: String,
    visible: Arc<Mutex<Vec<String>>>,
}

impl Staged for RefusingStaged {
    async fn commit(self) -> Result<u64, StorageError> {
        let n = self.inner.commit().await?;
        self.visible.lock().unwrap().push(self.key);
        Ok(n)
    }
    async fn abort(self) {
        self.inner.abort().await
    }
}

impl Storage for Refusing {
    type Staged = RefusingStaged;
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        self.inner.head(key).await
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, ct: &'static str, body: Bytes) -> Result<(), StorageError> {
        self.refused("PUT", key)?;
        self.inner.put(key, ct, body).await?;
        self.visible.lock().unwrap().push(key.to_owned());
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
    ) -> Result<RefusingStaged, StorageError> {
        self.refused("stage", key)?;
        Ok(RefusingStaged {
            inner: self.inner.stage(key, ct, size_hint, body).await?,
            key: key.to_owned(),
            visible: self.visible.clone(),
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
        range: Option<ByteRange>,
    ) -> Result<StreamOutcome, StorageError> {
        self.inner.read_range(key, range).await
    }
}

/// The closure fixture: dep <- tree <- link, and top -> tree, link.
struct Fixture {
    store: LocalStore,
    paths: Vec<StorePath>,
    top: StorePath,
}

impl Fixture {
    fn new(salt: &str) -> Fixture {
        let top_path = build("", salt);
        let store = LocalStore::from_env().unwrap();
        let paths: Vec<StorePath> = closure_of(&top_path)
            .iter()
            .map(|p| store.resolve(p).unwrap())
            .collect();
        let top = store.resolve(&top_path).unwrap();
        Fixture { store, paths, top }
    }

    fn named(&self, name: &str) -> &StorePath {
        self.paths
            .iter()
            .find(|p| p.name() == name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.paths))
    }
}

fn session(
    fx: &Fixture,
    dir: &Path,
    refuse: &[String],
) -> (Session<Refusing>, Arc<Mutex<Vec<String>>>) {
    let visible = Arc::new(Mutex::new(Vec::new()));
    let storage = Refusing {
        inner: LocalDir::open(dir).unwrap(),
        refuse: refuse.to_vec(),
        visible: visible.clone(),
    };
    let s = Session::new(
        fx.store.clone(),
        Arc::new(storage),
        PushOptions {
            compression: Compression::Zstd {
                level: 3,
                threads: 1,
            },
            jobs: 4,
            signing_key: None,
            write_nar_listing: false,
            logs: false,
            priority: None,
            want_mass_query: None,
        },
        PlanOptions::default(),
    );
    (s, visible)
}

fn request(fx: &Fixture) -> Request {
    Request {
        roots: vec![fx.top.clone()],
        closure: true,
        dry_run: false,
        pin: None,
    }
}

/// Every visible narinfo's NAR and references' narinfos became visible before it, and the
/// directory holds no temp file.
fn assert_consistent(dir: &Path, visible: &[String]) {
    let at = |k: &str| visible.iter().position(|v| v == k);
    for (i, key) in visible.iter().enumerate() {
        let Some(_) = layout::narinfo_hash(key) else {
            continue;
        };
        let text = std::fs::read_to_string(dir.join(key)).unwrap();
        let ni = NarInfo::parse(&text).unwrap();
        let nar = at(&ni.url).unwrap_or_else(|| panic!("{key}: its NAR {} is not there", ni.url));
        assert!(nar < i, "{key} became visible before its NAR");
        for r in ni.references.iter().filter(|r| **r != ni.store_path) {
            let rk = layout::narinfo_of(r);
            let ri = at(&rk).unwrap_or_else(|| panic!("{key}: reference {rk} is not there"));
            assert!(ri < i, "{key} became visible before its reference {rk}");
        }
    }
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let n = e.file_name().to_string_lossy().into_owned();
                assert!(
                    !n.starts_with(".tmp-"),
                    "temp file left: {}",
                    e.path().display()
                );
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_refused_nar_fails_its_dependents_and_a_second_run_finishes() {
    let fx = Fixture::new(&unique("session-nar"));
    let tmp = tempfile::tempdir().unwrap();
    let dep = fx.named("dep").clone();
    let info = runtime()
        .block_on(fx.store.query(std::slice::from_ref(&dep), false))
        .unwrap();
    // The dep's NAR is refused: everything above it (tree, link, top) must fail too.
    let refuse = vec![layout::nar_key(&info[0].nar_hash, "")];
    let (s, visible) = session(&fx, tmp.path(), &refuse);
    let outcome = runtime()
        .block_on(s.run(
            request(&fx),
            &mut cachepush::push::session::Quiet,
            std::future::pending(),
        ))
        .unwrap();
    let Outcome::Done { counts, report } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(counts.to_send, fx.paths.len());
    let failed: HashSet<&str> = report.failed.iter().map(|(p, _)| p.name()).collect();
    assert_eq!(
        failed,
        ["dep", "tree", "link-to-tree", "top"].into_iter().collect(),
        "{:?}",
        report.failed
    );
    for (p, e) in &report.failed {
        if p.name() == "dep" {
            assert!(matches!(e, PathError::Storage(_)), "{p}: {e}");
        } else {
            assert!(matches!(e, PathError::ReferenceFailed(_)), "{p}: {e}");
        }
    }
    assert_eq!(report.pushed, fx.paths.len() - 4);
    assert_eq!(s.storage().left_open(), 0);
    let seen = visible.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|k| k == &layout::narinfo_of(&fx.top)),
        "top published: {seen:?}"
    );
    assert_consistent(tmp.path(), &seen);

    // The same session without the refusal publishes the rest; the first run's paths are
    // found present.
    let (s, visible) = session(&fx, tmp.path(), &[]);
    let outcome = runtime()
        .block_on(s.run(
            request(&fx),
            &mut cachepush::push::session::Quiet,
            std::future::pending(),
        ))
        .unwrap();
    let Outcome::Done { counts, report } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!((counts.to_send, report.pushed), (4, 4));
    assert_consistent(tmp.path(), &visible.lock().unwrap());
    let all: Vec<String> = fx.paths.iter().map(layout::narinfo_of).collect();
    for k in &all {
        assert!(
            tmp.path().join(k).is_file(),
            "{k} missing after the second run"
        );
    }
}

#[test]
fn a_refused_narinfo_keeps_its_dependents_out() {
    let fx = Fixture::new(&unique("session-narinfo"));
    let tmp = tempfile::tempdir().unwrap();
    let tree = fx.named("tree").clone();
    let (s, visible) = session(&fx, tmp.path(), &[layout::narinfo_of(&tree)]);
    let outcome = runtime()
        .block_on(s.run(
            request(&fx),
            &mut cachepush::push::session::Quiet,
            std::future::pending(),
        ))
        .unwrap();
    let Outcome::Done { report, .. } = outcome else {
        panic!("{outcome:?}")
    };
    let failed: HashSet<&str> = report.failed.iter().map(|(p, _)| p.name()).collect();
    assert_eq!(
        failed,
        ["tree", "link-to-tree", "top"].into_iter().collect(),
        "{:?}",
        report.failed
    );
    let seen = visible.lock().unwrap().clone();
    assert!(
        seen.contains(&layout::narinfo_of(fx.named("dep"))),
        "{seen:?}"
    );
    assert_consistent(tmp.path(), &seen);
}

/// Tells the cancellation future when the first upload starts.
struct FirstEvent(tokio::sync::Notify);

impl cachepush::push::Observer for &FirstEvent {
    fn event(&self, _: cachepush::push::Event<'_>) {
        self.0.notify_one();
    }
}

#[test]
fn cancelled_in_the_middle_leaves_a_consistent_cache_and_nothing_open() {
    let fx = Fixture::new(&unique("session-cancel"));
    let tmp = tempfile::tempdir().unwrap();
    let (s, visible) = session(&fx, tmp.path(), &[]);
    // Cancelled as soon as the first NAR starts: whatever got out is consistent.
    let started = FirstEvent(tokio::sync::Notify::new());
    let mut observer = &started;
    let outcome = runtime()
        .block_on(s.run(request(&fx), &mut observer, started.0.notified()))
        .unwrap();
    assert!(
        matches!(outcome, Outcome::Interrupted { .. }),
        "{outcome:?}"
    );
    assert_eq!(s.storage().left_open(), 0);
    assert_consistent(tmp.path(), &visible.lock().unwrap());
    // A dry run writes nothing, not even nix-cache-info.
    let empty = tempfile::tempdir().unwrap();
    let (s, visible) = session(&fx, empty.path(), &[]);
    let mut req = request(&fx);
    req.dry_run = true;
    let outcome = runtime()
        .block_on(s.run(
            req,
            &mut cachepush::push::session::Quiet,
            std::future::pending(),
        ))
        .unwrap();
    let Outcome::Planned { counts } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(counts.to_send, fx.paths.len());
    assert!(visible.lock().unwrap().is_empty());
    assert!(!empty.path().join(layout::CACHE_INFO).exists());
}

/// The post-build-hook queue drained by the library over the same session: a batch leaves
/// the queue only once every path of it is published; lines that can never be published
/// are dropped with a warning; the failed batch is pushed by the next drain.
struct Drainer {
    session: Session<Refusing>,
}

impl cachepush::watch::BatchPusher for Drainer {
    type Error = cachepush::push::PushError;
    fn store(&self) -> &LocalStore {
        self.session.store()
    }
    async fn push_batch(&mut self, roots: Vec<StorePath>) -> Result<Batch, Self::Error> {
        let req = Request {
            roots,
            closure: true,
            dry_run: false,
            pin: None,
        };
        let quiet = &mut cachepush::push::session::Quiet;
        Ok(
            match self.session.run(req, quiet, std::future::pending()).await? {
                Outcome::Done { report, .. } => Batch::Done {
                    pushed: report.pushed,
                    failed: report.failed.len(),
                },
                Outcome::Interrupted { .. } => Batch::Interrupted,
                Outcome::Planned { .. } => unreachable!("not a dry run"),
            },
        )
    }
    fn warn(&self, message: &str) {
        // The drain's effect on the queue is what the test checks.
        eprintln!("warning: {message}");
    }
}

#[test]
fn a_queued_batch_leaves_the_queue_only_once_published() {
    let fx = Fixture::new(&unique("session-queue"));
    let tmp = tempfile::tempdir().unwrap();
    let queue = Queue::new(tmp.path().join("queue"));
    let dir = fx.store.store_dir().clone();
    let show = |p: &StorePath| dir.display(p).to_string();
    let dep = show(fx.named("dep"));
    let top = show(&fx.top);
    let gone = format!("{}/{}-gone", dir.as_str(), "0".repeat(32));
    let first = queue.enqueue(&[&dep]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2));
    let second = queue.enqueue(&[&top]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2));
    let third = queue.enqueue(&["not a store path", &gone]).unwrap();

    // top's narinfo is refused: its batch stays, the others go.
    let (refusing, _) = session(
        &fx,
        &tmp.path().join("cache"),
        &[layout::narinfo_of(&fx.top)],
    );
    let mut d = Drainer { session: refusing };
    let rt = runtime();
    let got = rt.block_on(drain(&queue, &mut d)).unwrap();
    assert!(matches!(got, Batch::Done { failed: 1, .. }), "{got:?}");
    let left: Vec<_> = queue.pending().unwrap().into_iter().map(|f| f.0).collect();
    assert_eq!(
        left,
        vec![second.0.clone()],
        "first {first:?}, third {third:?}"
    );

    // Without the refusal the next drain publishes it and empties the queue.
    d.session = session(&fx, &tmp.path().join("cache"), &[]).0;
    let got = rt.block_on(drain(&queue, &mut d)).unwrap();
    assert_eq!(
        got,
        Batch::Done {
            pushed: 1,
            failed: 0
        }
    );
    assert!(queue.pending().unwrap().is_empty());
    assert!(
        tmp.path()
            .join("cache")
            .join(layout::narinfo_of(&fx.top))
            .is_file()
    );
}
