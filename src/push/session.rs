//! One push from start to end: closure → plan → cache-info check → execute → abort
//! leftovers. The caller hands in the progress [`Observer`] and the cancellation (a
//! future that resolves when the push must stop); the session prints nothing and never
//! looks at signals, so the CLI, the watch commands and tests drive the same code.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use thiserror::Error;

use super::{Event, Plan, PlanOptions, PushOptions, Report, execute, plan};
use crate::format::{CacheInfo, StorePath, layout};
use crate::gc::records::{GcMarker, Lease, RecordError, gc_between, last_gc};
use crate::storage::{Storage, StorageError, content_type};
use crate::store::{LocalStore, StoreError};

/// Why a push as a whole could not run (a single path's failure is in [`Report::failed`]).
#[derive(Debug, Error)]
pub enum PushError {
    /// The local store could not say what the closure is.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Asking the target what it has failed: nothing was written.
    #[error("cannot check what {target} has: {source}")]
    Plan {
        target: String,
        #[source]
        source: StorageError,
    },
    /// Writing `nix-cache-info` failed: nothing else was written.
    #[error("cannot write to {target}: {source}")]
    Write {
        target: String,
        #[source]
        source: StorageError,
    },
    /// The push record that tells gc what this push relies on could not be written or
    /// the gc marker read: nothing else was written.
    #[error("cannot record this push in {target} for gc: {source}")]
    Lease {
        target: String,
        #[source]
        source: crate::gc::records::RecordError,
    },
    /// Everything was published but the pin could not be written.
    #[error("published, but cannot pin it in {target}: {source}")]
    Pin {
        target: String,
        #[source]
        source: crate::gc::pins::PinError,
    },
    #[error("{target}: existing nix-cache-info is unreadable: {reason}")]
    CacheInfoUnreadable { target: String, reason: String },
    /// The cache was made for another store directory (`/nix/store` vs a custom one):
    /// its paths would be useless to this store's clients and vice versa.
    #[error("{target} is a cache for store {theirs}, but the local store is {ours}")]
    OtherStore {
        target: String,
        theirs: String,
        ours: String,
    },
}

/// What to push.
#[derive(Clone, Debug)]
pub struct Request {
    pub roots: Vec<StorePath>,
    /// Everything the roots refer to as well (`false`: the roots only).
    pub closure: bool,
    /// Plan and stop; nothing is written.
    pub dry_run: bool,
    /// Once every path is published, pin the roots under this name, keeping this many
    /// revisions (before the lease ends, so no gc can take them in between).
    pub pin: Option<(String, usize)>,
}

/// How the plan split the closure, kept after the plan is consumed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanCounts {
    pub closure: usize,
    pub present: usize,
    pub upstream: usize,
    pub signed_elsewhere: usize,
    pub to_send: usize,
    pub nar_bytes_to_send: u64,
}

impl PlanCounts {
    pub fn of(p: &Plan) -> Self {
        PlanCounts {
            closure: p.closure,
            present: p.present.len(),
            upstream: p.upstream.len(),
            signed_elsewhere: p.signed_elsewhere.len(),
            to_send: p.to_send.len(),
            nar_bytes_to_send: p.nar_bytes_to_send(),
        }
    }
}

/// How a push ended.
#[derive(Debug)]
pub enum Outcome {
    /// A dry run: the plan only.
    Planned { counts: PlanCounts },
    /// Every path was tried; `report.failed` lists those not published.
    Done { counts: PlanCounts, report: Report },
    /// Cancelled while uploading; `aborted` unfinished uploads were aborted. Whatever is
    /// visible is consistent (narinfos are written whole and after their NARs).
    Interrupted { aborted: usize },
}

impl Outcome {
    /// Paths not published (0 unless `Done`).
    pub fn failed(&self) -> usize {
        match self {
            Outcome::Done { report, .. } => report.failed.len(),
            _ => 0,
        }
    }
}

/// Told what happens, as it happens. Every method has a default that ignores it.
pub trait Observer: Sync {
    /// The plan is made; nothing was written yet.
    fn planned(&mut self, plan: &Plan) {
        let _ = plan;
    }
    /// Uploading `paths` paths (`nar_bytes` of NAR) starts.
    fn uploading(&mut self, paths: usize, nar_bytes: u64) {
        let _ = (paths, nar_bytes);
    }
    /// One path's progress; called from the upload loop, so keep it quick.
    fn event(&self, e: Event<'_>) {
        let _ = e;
    }
    /// Uploading stopped (finished or cancelled).
    fn uploaded(&mut self) {}
    /// Something changed in the cache that the user should hear about (`nix-cache-info`
    /// settings updated).
    fn notice(&mut self, text: &str) {
        let _ = text;
    }
    /// A gc is deleting and has not seen this push's lease yet: the push waits for it.
    fn waiting_for_gc(&mut self, marker: &GcMarker) {
        let _ = marker;
    }
    /// Something worth a line that is not a warning (the roots were pinned).
    fn info(&mut self, text: &str) {
        let _ = text;
    }
}

/// Ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// A target and everything needed to publish to it, reused across pushes.
pub struct Session<S> {
    store: LocalStore,
    storage: Arc<S>,
    pub push_opts: PushOptions,
    pub plan_opts: PlanOptions,
}

impl<S: Storage> Session<S> {
    pub fn new(
        store: LocalStore,
        storage: Arc<S>,
        push_opts: PushOptions,
        plan_opts: PlanOptions,
    ) -> Self {
        Session {
            store,
            storage,
            push_opts,
            plan_opts,
        }
    }

    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    pub fn storage(&self) -> &Arc<S> {
        &self.storage
    }

    /// Publishes `req.roots` (and their closure). Resolves early with
    /// [`Outcome::Interrupted`] when `cancel` resolves during the upload.
    pub async fn run(
        &self,
        req: Request,
        observer: &mut impl Observer,
        cancel: impl Future<Output = ()>,
    ) -> Result<Outcome, PushError> {
        let storage = &self.storage;
        let closure = self.store.query(&req.roots, req.closure).await?;
        if req.dry_run {
            let plan = self.plan(closure).await?;
            observer.planned(&plan);
            return Ok(Outcome::Planned {
                counts: PlanCounts::of(&plan),
            });
        }
        let lease_err = |source| PushError::Lease {
            target: storage.describe(),
            source,
        };
        // The last gc as the plan starts; compared with the one after the lease, it tells
        // whether the plan can be trusted (below).
        // (Its first request: an error here, a missing bucket say, is the plan's.)
        let gc_before = last_gc(&**storage).await.map_err(|e| match e {
            RecordError::Storage(source) => PushError::Plan {
                target: storage.describe(),
                source,
            },
            other => lease_err(other),
        })?;
        let plan0 = self.plan(closure.clone()).await?;
        if plan0.to_send.is_empty() && req.pin.is_none() {
            // Nothing to publish, so nothing can be left referring to a path a gc takes
            // meanwhile: no lease, and a no-op push writes nothing.
            return self.run_planned(plan0, observer, cancel).await;
        }
        // The lease before anything is published: what the plan relies on being present,
        // gc keeps until the lease is released (docs/gc.md).
        let lease = Lease::take(
            &**storage,
            closure
                .iter()
                .map(|p| (p.path.hash_part().to_owned(), p.nar_hash.nix32())),
        )
        .await
        .map_err(lease_err)?;
        let run = async {
            let gc_after = lease
                .wait_for_gc(&**storage, |m| observer.waiting_for_gc(m))
                .await
                .map_err(lease_err)?;
            // A path the first plan found present may have gone to a gc that ran before it
            // saw the lease: then ask again. With none running since the plan began, or
            // nothing present, the plan stands.
            let plan =
                if plan0.present.is_empty() || !gc_between(gc_before.as_ref(), gc_after.as_ref()) {
                    plan0
                } else {
                    self.plan(closure).await?
                };
            let outcome = self.run_planned(plan, observer, cancel).await?;
            if let (Some((name, keep)), Outcome::Done { report, .. }) = (&req.pin, &outcome) {
                if report.failed.is_empty() {
                    let roots: Vec<String> =
                        req.roots.iter().map(|r| r.hash_part().to_owned()).collect();
                    crate::gc::pins::add(&**storage, name, &roots, *keep)
                        .await
                        .map_err(|source| PushError::Pin {
                            target: storage.describe(),
                            source,
                        })?;
                    observer.info(&format!("pinned as {name}"));
                } else {
                    observer.notice(&format!(
                        "not pinned as {name}: some paths were not published"
                    ));
                }
            }
            Ok(outcome)
        };
        let outcome = tokio::select! {
            r = run => r,
            () = lease.keep_alive(&**storage) => unreachable!("keep_alive never ends"),
        };
        // Released whatever the outcome; one that fails expires on its own.
        let _ = lease.release(&**storage).await;
        outcome
    }

    async fn plan(&self, closure: Vec<crate::store::PathInfo>) -> Result<Plan, PushError> {
        plan(&*self.storage, closure, &self.plan_opts)
            .await
            .map_err(|source| PushError::Plan {
                target: self.storage.describe(),
                source,
            })
    }

    async fn run_planned(
        &self,
        plan: Plan,
        observer: &mut impl Observer,
        cancel: impl Future<Output = ()>,
    ) -> Result<Outcome, PushError> {
        let storage = &self.storage;
        observer.planned(&plan);
        let counts = PlanCounts::of(&plan);
        let settings = (self.push_opts.priority, self.push_opts.want_mass_query);
        if !plan.to_send.is_empty() || settings != (None, None) {
            if let Some(change) = ensure_cache_info(&**storage, &self.store, settings).await? {
                observer.notice(&change);
            }
        }
        observer.uploading(counts.to_send, counts.nar_bytes_to_send);
        // Whose build logs to upload afterwards: each pushed path's derivation, once.
        let derivers: Vec<(StorePath, StorePath)> = if self.push_opts.logs {
            plan.to_send
                .iter()
                .filter_map(|p| Some((p.deriver.clone()?, p.path.clone())))
                .collect()
        } else {
            Vec::new()
        };
        let mut report = {
            let obs = &*observer;
            let on_event = |e: Event<'_>| obs.event(e);
            let exec = execute(
                &self.store,
                storage.clone(),
                plan,
                &self.push_opts,
                &on_event,
            );
            tokio::select! {
                r = exec => r,
                _ = cancel => {
                    // Dropping the pipeline stops every upload. Narinfos are only ever
                    // written whole and after their NARs, so what is visible stays
                    // consistent; open multipart uploads are aborted here so none is left
                    // behind (and billed).
                    observer.uploaded();
                    let aborted = storage.abort_open_uploads().await;
                    return Ok(Outcome::Interrupted { aborted });
                }
            }
        };
        observer.uploaded();
        // A safety net: every failed upload aborted itself, so this normally finds none.
        storage.abort_open_uploads().await;
        self.upload_logs(derivers, &mut report).await;
        Ok(Outcome::Done { counts, report })
    }
}

impl<S: Storage> Session<S> {
    /// Uploads `log/<drv>` for the derivations of the paths that were published, when
    /// the local store has their log and the cache does not. A log is an extra: one that
    /// cannot be read or uploaded is reported, and its path stays published.
    async fn upload_logs(&self, derivers: Vec<(StorePath, StorePath)>, report: &mut Report) {
        let failed: std::collections::HashSet<&StorePath> =
            report.failed.iter().map(|(p, _)| p).collect();
        let mut drvs: Vec<StorePath> = derivers
            .into_iter()
            .filter(|(_, path)| !failed.contains(path))
            .map(|(drv, _)| drv)
            .collect();
        drvs.sort();
        drvs.dedup();
        // A few at once: each is a HEAD, a `nix-store --read-log` and a PUT; memory is
        // bounded by that many logs.
        let results: Vec<(StorePath, Result<bool, String>)> = futures::stream::iter(drvs)
            .map(|drv| self.upload_log(drv))
            .buffer_unordered(LOG_UPLOADS)
            .collect()
            .await;
        for (drv, res) in results {
            match res {
                Ok(true) => report.logs += 1,
                Ok(false) => {}
                Err(e) => report.log_failures.push((drv, e)),
            }
        }
    }

    /// One derivation's log: `Ok(false)` when the cache has it or the store has none.
    async fn upload_log(&self, drv: StorePath) -> (StorePath, Result<bool, String>) {
        let key = layout::log_key(&drv.to_string());
        let text = |e: StorageError| e.to_string();
        let res = async {
            if self.storage.head(&key).await.map_err(text)?.is_some() {
                return Ok(false);
            }
            let Some(log) = self.store.read_log(&drv).await.map_err(|e| e.to_string())? else {
                return Ok(false);
            };
            self.storage
                .put(&key, content_type::LOG, Bytes::from(log))
                .await
                .map_err(text)?;
            Ok(true)
        }
        .await;
        (drv, res)
    }
}

/// Build logs uploaded at once (`--logs`).
const LOG_UPLOADS: usize = 8;

/// Creates `nix-cache-info` when missing; refuses a cache made for another store directory.
/// With `priority` / `want_mass_query` given, updates an existing file that says otherwise
/// and returns what changed.
pub async fn ensure_cache_info<S: Storage>(
    storage: &S,
    store: &LocalStore,
    (priority, want_mass_query): (Option<u32>, Option<bool>),
) -> Result<Option<String>, PushError> {
    let defaults = CacheInfo::default();
    let ours = CacheInfo {
        store_dir: store.store_dir().to_string(),
        priority: priority.unwrap_or(defaults.priority),
        want_mass_query: want_mass_query.unwrap_or(defaults.want_mass_query),
    };
    let write = |source| PushError::Write {
        target: storage.describe(),
        source,
    };
    let created = storage
        .put_if_absent(
            layout::CACHE_INFO,
            content_type::CACHE_INFO,
            Bytes::from(ours.to_string()),
        )
        .await
        .map_err(write)?;
    if created {
        return Ok(None);
    }
    let text = storage
        .get(layout::CACHE_INFO)
        .await
        .map_err(write)?
        .unwrap_or_default();
    let theirs = CacheInfo::parse(&String::from_utf8_lossy(&text)).map_err(|e| {
        PushError::CacheInfoUnreadable {
            target: storage.describe(),
            reason: e.to_string(),
        }
    })?;
    if theirs.store_dir != ours.store_dir {
        return Err(PushError::OtherStore {
            target: storage.describe(),
            theirs: theirs.store_dir,
            ours: ours.store_dir,
        });
    }
    let mut wanted = theirs.clone();
    let mut changes = Vec::new();
    if let Some(p) = priority.filter(|p| *p != theirs.priority) {
        changes.push(format!("Priority {} -> {p}", theirs.priority));
        wanted.priority = p;
    }
    if let Some(w) = want_mass_query.filter(|w| *w != theirs.want_mass_query) {
        let n = |b: bool| if b { 1 } else { 0 };
        changes.push(format!(
            "WantMassQuery {} -> {}",
            n(theirs.want_mass_query),
            n(w)
        ));
        wanted.want_mass_query = w;
    }
    if changes.is_empty() {
        return Ok(None);
    }
    storage
        .put(
            layout::CACHE_INFO,
            content_type::CACHE_INFO,
            Bytes::from(wanted.to_string()),
        )
        .await
        .map_err(write)?;
    Ok(Some(format!(
        "{}: nix-cache-info updated ({}); clients see it when their cached copy expires",
        storage.describe(),
        changes.join(", ")
    )))
}
