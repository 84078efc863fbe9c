//! Garbage collection of a binary cache with the bucket alone: roots (pins, recent pushes,
//! recent reads, running pushes' leases), their closures through `References`, and a sweep
//! that never leaves a narinfo without its NAR or its references.
//!
//! Order of the sweep (docs/gc.md states the guarantees):
//! 1. narinfos outside the live set, referrers before what they refer to, in batches; the
//!    leases are read again before every batch, so a push that starts meanwhile adds its
//!    closure to the live set before anything it relies on can go;
//! 2. the index of what remains is saved, then the push and read records it now holds are
//!    deleted;
//! 3. NARs, `.ls` listings and `log/` objects that no remaining narinfo names, older than
//!    the grace period and not named by a lease;
//! 4. multipart uploads started before the grace period (and before every running push).
//!
//! A crash anywhere leaves a consistent cache: at worst objects a re-run deletes.

pub mod index;
pub mod pins;
pub mod records;
pub mod stats;

use std::collections::{HashMap, HashSet};

use futures::StreamExt;
use serde::Serialize;
use thiserror::Error;

use crate::format::layout;
use crate::storage::{RequestStats, Storage, StorageError};
use index::{Catalog, Listed, read_records};
use records::{GcMarker, PushRecord, RecordError, now, read_json, write_json};

/// What gc keeps and how it goes about it.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Narinfos written or pushed within this many days are roots (0: none by recency).
    pub keep_days: u64,
    /// Narinfos read through a recording gateway within this many days are roots.
    pub keep_read_days: u64,
    /// Unreferenced NARs (and listings, logs, multipart uploads) younger than this stay.
    pub grace_secs: i64,
    pub dry_run: bool,
    /// Stop after this many deletions (objects of the cache, records not counted).
    pub max_delete: Option<u64>,
    /// Deletions in flight at once.
    pub concurrency: usize,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            keep_days: 30,
            keep_read_days: 30,
            grace_secs: 6 * 3600,
            dry_run: false,
            max_delete: None,
            concurrency: 32,
        }
    }
}

/// Narinfos deleted per batch: the leases are read again between batches.
const BATCH: usize = 500;

#[derive(Debug, Error)]
pub enum GcError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(
        "another gc is running on {target} (started {started} on host {host:?}, pid {pid}); run one gc at a time"
    )]
    AnotherGc {
        target: String,
        started: String,
        host: String,
        pid: u32,
    },
}

/// Why the roots were kept, in store paths (before closing over references).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Roots {
    pub pinned: usize,
    pub recent: usize,
    pub read: usize,
    pub leased: usize,
    pub unreadable: usize,
}

/// What one gc did (or, in a dry run, would do).
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub deleted_narinfos: u64,
    pub deleted_nars: u64,
    pub deleted_listings: u64,
    pub deleted_logs: u64,
    pub deleted_records: u64,
    pub kept_narinfos: u64,
    /// NARs no narinfo names that stayed for the grace period or a lease.
    pub kept_unreferenced_nars: u64,
    pub freed_bytes: u64,
    pub aborted_uploads: u64,
    pub roots: Roots,
    /// Narinfos read this run; the others came from the index.
    pub fetched_narinfos: u64,
    /// Deletions that failed (each stays, and so does everything it names).
    pub failed: Vec<String>,
    /// Why it stopped before the end (`--max-delete`), if it did.
    pub stopped: Option<String>,
    /// In a dry run, every key that would go.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub would_delete: Vec<String>,
    pub notes: Vec<String>,
    pub requests: RequestStats,
}

/// The live set: the roots under `opts` and the leases, closed under references.
pub fn mark(
    cat: &Catalog,
    opts: &GcOptions,
    leases: &[&PushRecord],
    at: i64,
) -> (HashSet<String>, Roots) {
    let mut roots = Roots::default();
    let mut stack: Vec<&str> = Vec::new();
    let pinned: HashSet<&str> = cat.pins.iter().flat_map(|p| p.hash_parts()).collect();
    let leased: HashSet<&str> = leases
        .iter()
        .flat_map(|l| l.paths.iter().map(String::as_str))
        .collect();
    let day = 86_400i64;
    let recent_since = at - opts.keep_days as i64 * day;
    let read_since = at - opts.keep_read_days as i64 * day;
    for (h, e) in &cat.narinfos {
        let why = if pinned.contains(h.as_str()) {
            &mut roots.pinned
        } else if leased.contains(h.as_str()) {
            &mut roots.leased
        } else if e.broken.is_some() {
            &mut roots.unreadable
        } else if opts.keep_days > 0 && e.touched() >= recent_since {
            &mut roots.recent
        } else if opts.keep_read_days > 0 && e.read > 0 && e.read >= read_since {
            &mut roots.read
        } else {
            continue;
        };
        *why += 1;
        stack.push(h);
    }
    let mut live: HashSet<String> = HashSet::new();
    while let Some(h) = stack.pop() {
        if !live.insert(h.to_owned()) {
            continue;
        }
        if let Some(e) = cat.narinfos.get(h) {
            stack.extend(e.refs.iter().map(String::as_str));
        }
    }
    (live, roots)
}

/// The dead narinfos in the order they may go: one is ready once no dead narinfo still
/// present refers to it (so deleting it never leaves a reference dangling). Kahn's
/// algorithm over the dead part of the graph, so a deep chain costs no rescans.
pub struct Waves {
    /// Dead referrers still present, of each dead narinfo not yet ready.
    waiting: HashMap<String, usize>,
    ready: std::collections::BTreeSet<String>,
}

impl Waves {
    pub fn new(cat: &Catalog, live: &HashSet<String>, gone: &HashSet<String>) -> Self {
        let dead = |h: &str| cat.narinfos.contains_key(h) && !live.contains(h) && !gone.contains(h);
        let mut waiting: HashMap<String, usize> = HashMap::new();
        for (h, e) in &cat.narinfos {
            if dead(h) {
                waiting.entry(h.clone()).or_insert(0);
                for r in e.refs.iter().filter(|r| dead(r)) {
                    *waiting.entry(r.clone()).or_insert(0) += 1;
                }
            }
        }
        let ready = waiting
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(h, _)| h.clone())
            .collect();
        waiting.retain(|_, n| *n > 0);
        Waves { waiting, ready }
    }

    /// Up to `n` narinfos that may go now.
    pub fn take(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::with_capacity(n.min(self.ready.len()));
        while out.len() < n {
            let Some(h) = self.ready.pop_first() else {
                break;
            };
            out.push(h);
        }
        out
    }

    /// `h` is gone: what it referred to has one dead referrer fewer.
    pub fn deleted(&mut self, cat: &Catalog, h: &str) {
        let Some(e) = cat.narinfos.get(h) else { return };
        for r in &e.refs {
            if let Some(n) = self.waiting.get_mut(r) {
                *n -= 1;
                if *n == 0 {
                    self.waiting.remove(r);
                    self.ready.insert(r.clone());
                }
            }
        }
    }
}

/// Runs gc on `storage`; `progress` hears each phase as it starts.
pub async fn run<S: Storage>(
    storage: &S,
    opts: &GcOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<GcReport, GcError> {
    let started = now();
    if !opts.dry_run
        && let Ok(Some(m)) = read_json::<S, GcMarker>(storage, layout::GC_MARKER).await
        && m.is_running(started)
    {
        return Err(GcError::AnotherGc {
            target: storage.describe(),
            started: crate::timestamp_of(m.started),
            host: m.host,
            pid: m.pid,
        });
    }
    progress("listing the cache");
    let cat = Catalog::scan(storage).await?;
    run_with(storage, &cat, opts, progress, started).await
}

/// [`run`] on a catalog already scanned (`stats` scans once for both).
pub async fn run_with<S: Storage>(
    storage: &S,
    cat: &Catalog,
    opts: &GcOptions,
    progress: &mut dyn FnMut(&str),
    started: i64,
) -> Result<GcReport, GcError> {
    let id = records::random_id();
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..GcReport::default()
    };
    report.fetched_narinfos = cat.fetched as u64;
    report.notes.extend(cat.notes.iter().cloned());
    progress(&format!(
        "{} narinfos ({} read, the rest from the index), {} NARs",
        cat.narinfos.len(),
        cat.fetched,
        cat.nars.len()
    ));

    let mut watch = Watch {
        leases: Leases::from_listing(&cat.pushes, started),
        marker: GcMarker {
            version: 1,
            id,
            host: records::host_name(),
            pid: std::process::id(),
            started,
            deadline: started + records::MARKER_TTL,
            deleting: true,
            leases_seen: Vec::new(),
            finished: false,
        },
        refreshed: None,
        dry_run: opts.dry_run,
    };
    let (mut live, roots) = mark(cat, opts, &watch.leases.protecting(started), started);
    report.roots = roots;
    let mut budget = Budget::new(opts.max_delete);
    let mut gone: HashSet<String> = HashSet::new();

    // 1. Narinfos, referrers first, reading the leases again between batches.
    if !opts.dry_run {
        // Announced before the leases are read: a push that writes its lease after this
        // read finds the marker and waits until a later read has seen it.
        write_json(storage, layout::GC_MARKER, &watch.marker).await?;
    }
    progress(if opts.dry_run {
        "finding the narinfos outside the live set (dry run)"
    } else {
        "deleting narinfos outside the live set"
    });
    let mut waves = Waves::new(cat, &live, &gone);
    loop {
        if watch.keep_up(storage, &mut report.notes).await? {
            let (l, _) = mark(cat, opts, &watch.leases.protecting(now()), started);
            if l != live {
                live = l;
                waves = Waves::new(cat, &live, &gone);
            }
        }
        let batch = waves.take(BATCH);
        if batch.is_empty() {
            break;
        }
        let Some(batch) = budget.take(&batch, &mut report) else {
            break;
        };
        let keys: Vec<(String, u64)> = batch
            .iter()
            .map(|h| (layout::narinfo_key(h), cat.narinfos[h].size))
            .collect();
        let done = delete_all(storage, opts, keys, watch.deadline(), &mut report).await;
        for (h, outcome) in batch.iter().zip(done) {
            match outcome {
                Deletion::Done => {
                    gone.insert(h.clone());
                    report.deleted_narinfos += 1;
                    waves.deleted(cat, h);
                }
                // It stays, and so does everything it names: its references keep a
                // referrer that never goes.
                Deletion::Failed => {
                    gone.insert(h.clone());
                    report.failed.push(layout::narinfo_key(h));
                }
                Deletion::OutOfTime => out_of_time(&mut report),
            }
        }
        if report.stopped.is_some() {
            break;
        }
    }
    let failed: HashSet<String> = report
        .failed
        .iter()
        .filter_map(|k| layout::narinfo_hash(k).map(str::to_owned))
        .collect();
    let deleted: HashSet<String> = gone.difference(&failed).cloned().collect();
    report.kept_narinfos = (cat.narinfos.len() - deleted.len()) as u64;

    // 2. The index of what remains, then the records it now holds.
    if !opts.dry_run {
        progress("saving the index");
        // Unchanged (nothing read, nothing deleted, no record to fold): no need to write it.
        if cat.fetched > 0 || !deleted.is_empty() || !cat.pushes.is_empty() || !cat.reads.is_empty()
        {
            cat.save_index(storage, &deleted).await?;
        }
        let at = now();
        let folded: Vec<(String, u64)> = cat
            .pushes
            .iter()
            .filter(|l| l.record.as_ref().is_some_and(|r| !r.is_lease(at)))
            .map(|l| (l.meta.key.clone(), 0))
            .chain(
                cat.reads
                    .iter()
                    .filter(|l| l.record.is_some())
                    .map(|l| (l.meta.key.clone(), 0)),
            )
            .collect();
        let done = delete_all(
            storage,
            opts,
            folded,
            watch.deadline(),
            &mut GcReport::default(),
        )
        .await;
        report.deleted_records = done.iter().filter(|d| **d == Deletion::Done).count() as u64;
    }

    // 3. What no remaining narinfo names, past the grace period and no lease's.
    if report.stopped.is_none() {
        progress(if opts.dry_run {
            "finding unreferenced NARs, listings and logs (dry run)"
        } else {
            "deleting unreferenced NARs, listings and logs"
        });
        let remaining = cat.narinfos.iter().filter(|(h, _)| !deleted.contains(*h));
        let mut named: HashSet<&str> = HashSet::new();
        let mut derivers: HashSet<&str> = HashSet::new();
        for (_, e) in remaining {
            if let Some(n) = &e.nar {
                named.insert(n.as_str());
            }
            if let Some(d) = &e.deriver {
                derivers.insert(d.as_str());
            }
        }
        let at = now();
        // Whole seconds: with `--grace 0s` an object written this second counts as old.
        let old = |m: &crate::storage::ObjectMeta| m.modified <= at - opts.grace_secs;
        let mut nars = Vec::new();
        for m in &cat.nars {
            if named.contains(m.key.as_str()) {
                continue;
            }
            if old(m) {
                nars.push((m.key.clone(), m.size));
            } else {
                report.kept_unreferenced_nars += 1;
            }
        }
        let listings: Vec<(String, u64)> = cat
            .listings
            .iter()
            .filter(|m| {
                let h = m.key.trim_end_matches(".ls");
                (!cat.narinfos.contains_key(h) || deleted.contains(h)) && old(m)
            })
            .map(|m| (m.key.clone(), m.size))
            .collect();
        let logs: Vec<(String, u64)> = cat
            .logs
            .iter()
            .filter(|m| !derivers.contains(&m.key["log/".len()..]) && old(m))
            .map(|m| (m.key.clone(), m.size))
            .collect();
        'kinds: for (kind, keys) in [(0, nars), (1, listings), (2, logs)] {
            for batch in keys.chunks(BATCH) {
                // A running push may upload a NAR under a key this scan saw unreferenced
                // (the same bytes as a path deleted here): the NARs its lease names stay.
                watch.keep_up(storage, &mut report.notes).await?;
                let protected: HashSet<String> = watch
                    .leases
                    .protecting(now())
                    .iter()
                    .flat_map(|r| r.nar_hashes.iter().cloned())
                    .collect();
                let (batch, kept): (Vec<_>, Vec<_>) = batch.iter().cloned().partition(|(k, _)| {
                    let hash = k[layout::NAR_DIR.len().min(k.len())..]
                        .split('.')
                        .next()
                        .unwrap_or("");
                    kind != 0 || !protected.contains(hash)
                });
                report.kept_unreferenced_nars += kept.len() as u64;
                let Some(batch) = budget.take(&batch, &mut report) else {
                    break 'kinds;
                };
                let done =
                    delete_all(storage, opts, batch.to_vec(), watch.deadline(), &mut report).await;
                let mut ok = 0;
                for ((k, _), d) in batch.iter().zip(&done) {
                    match d {
                        Deletion::Done => ok += 1,
                        Deletion::Failed => report.failed.push(k.clone()),
                        Deletion::OutOfTime => out_of_time(&mut report),
                    }
                }
                match kind {
                    0 => report.deleted_nars += ok,
                    1 => report.deleted_listings += ok,
                    _ => report.deleted_logs += ok,
                }
                if report.stopped.is_some() {
                    break 'kinds;
                }
            }
        }

        // 4. Multipart uploads nobody will finish: older than the grace period and than
        // every running push.
        if !opts.dry_run && report.stopped.is_none() {
            let oldest_lease = watch.leases.protecting(at).iter().map(|r| r.started).min();
            let cutoff = (at - opts.grace_secs)
                .min(oldest_lease.map_or(i64::MAX, |s| s - records::CLOCK_SKEW));
            match storage.abort_uploads_started_before(cutoff).await {
                Ok(n) => report.aborted_uploads = n as u64,
                Err(StorageError::Unsupported { message, .. }) => report
                    .notes
                    .push(format!("open multipart uploads not checked: {message}")),
                Err(e) => return Err(e.into()),
            }
        }
    }
    if !opts.dry_run {
        // Finished: no push waits for it any more, and one that looked before it started
        // sees that it ran (records::gc_between).
        let marker = &mut watch.marker;
        marker.finished = true;
        marker.deleting = false;
        write_json(storage, layout::GC_MARKER, marker).await?;
    }
    report.requests = storage.stats();
    Ok(report)
}

/// The `--max-delete` budget.
struct Budget {
    left: Option<u64>,
}

impl Budget {
    fn new(max: Option<u64>) -> Self {
        Budget { left: max }
    }

    /// The part of `batch` the budget allows; `None` (and the report says why) when it is
    /// spent.
    fn take<'a, T>(&mut self, batch: &'a [T], report: &mut GcReport) -> Option<&'a [T]> {
        let Some(left) = self.left.as_mut() else {
            return Some(batch);
        };
        if *left == 0 {
            report.stopped.get_or_insert_with(|| {
                "stopped at --max-delete; run gc again to delete the rest".to_owned()
            });
            return None;
        }
        let n = (*left).min(batch.len() as u64) as usize;
        *left -= n as u64;
        Some(&batch[..n])
    }
}

/// What became of one deletion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deletion {
    Done,
    Failed,
    /// Not tried: the marker's deadline was too near (pushes stop waiting for this gc then).
    OutOfTime,
}

fn out_of_time(report: &mut GcReport) {
    report.stopped.get_or_insert_with(|| {
        "stopped: deletions took longer than the gc marker's lifetime; run gc again".to_owned()
    });
}

/// Deletes `keys` (key, bytes), `opts.concurrency` at once, none after `deadline`; in a
/// dry run only notes them.
async fn delete_all<S: Storage>(
    storage: &S,
    opts: &GcOptions,
    keys: Vec<(String, u64)>,
    deadline: i64,
    report: &mut GcReport,
) -> Vec<Deletion> {
    if opts.dry_run {
        for (k, bytes) in &keys {
            report.freed_bytes += bytes;
            report.would_delete.push(k.clone());
        }
        return vec![Deletion::Done; keys.len()];
    }
    let results: Vec<(usize, Option<Result<(), StorageError>>)> =
        futures::stream::iter(keys.iter().enumerate())
            .map(|(i, (k, _))| async move {
                // A margin for the request itself and the clocks' skew.
                if now() + 10 >= deadline {
                    return (i, None);
                }
                (i, Some(storage.delete(k).await))
            })
            .buffer_unordered(opts.concurrency.max(1))
            .collect()
            .await;
    let mut out = vec![Deletion::Failed; keys.len()];
    for (i, r) in results {
        out[i] = match r {
            None => Deletion::OutOfTime,
            Some(Ok(())) => {
                report.freed_bytes += keys[i].1;
                Deletion::Done
            }
            Some(Err(e)) => {
                report.notes.push(e.to_string());
                Deletion::Failed
            }
        };
    }
    out
}

/// The leases and this run's marker, kept up to date between batches of deletions.
struct Watch {
    leases: Leases,
    marker: GcMarker,
    refreshed: Option<std::time::Instant>,
    dry_run: bool,
}

/// Reading the leases more often than this only makes waiting pushes wait less; safety
/// does not depend on it (a push that wrote its lease since waits for the ack, and plans
/// again once it has it).
const REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

impl Watch {
    /// Reads the leases again when due and renews the marker when what it says changed or
    /// its deadline nears. True when the leases were read.
    async fn keep_up<S: Storage>(
        &mut self,
        storage: &S,
        notes: &mut Vec<String>,
    ) -> Result<bool, GcError> {
        if self.dry_run || self.refreshed.is_some_and(|t| t.elapsed() < REFRESH) {
            return Ok(false);
        }
        self.leases.refresh(storage, notes).await?;
        self.refreshed = Some(std::time::Instant::now());
        let at = now();
        let seen: Vec<String> = self
            .leases
            .protecting(at)
            .iter()
            .map(|r| r.id.clone())
            .collect();
        if seen != self.marker.leases_seen || at + records::MARKER_TTL / 2 > self.marker.deadline {
            self.marker.leases_seen = seen;
            self.marker.deadline = at + records::MARKER_TTL;
            write_json(storage, layout::GC_MARKER, &self.marker).await?;
        }
        Ok(true)
    }

    /// No deletion after this (a dry run deletes nothing anyway).
    fn deadline(&self) -> i64 {
        if self.dry_run {
            i64::MAX
        } else {
            self.marker.deadline
        }
    }
}

/// The push records, read once each and again only when they change, and which of them
/// protect their paths during this run.
///
/// A record protects while it is a lease, and also, for the rest of this run, once this
/// run has seen it as one, or when it was not there when the scan listed the records (its
/// push started after: it may have found paths present and published narinfos referring
/// to them that this run's scan never saw, and releasing its lease must not hand those
/// paths to this run's stale picture). A record already released at the scan belongs to a
/// push that had published everything before the scan listed the narinfos.
struct Leases {
    records: HashMap<String, (String, Option<PushRecord>)>,
    /// The keys the scan listed.
    at_scan: HashSet<String>,
    seen_live: HashSet<String>,
}

impl Leases {
    fn from_listing(listed: &[Listed<PushRecord>], scan_started: i64) -> Self {
        let mut l = Leases {
            records: listed
                .iter()
                .map(|l| (l.meta.key.clone(), (l.meta.etag.clone(), l.record.clone())))
                .collect(),
            at_scan: listed.iter().map(|l| l.meta.key.clone()).collect(),
            seen_live: HashSet::new(),
        };
        l.note_live(scan_started);
        l
    }

    fn note_live(&mut self, at: i64) {
        for (_, r) in self.records.values() {
            if let Some(r) = r.as_ref().filter(|r| r.is_lease(at)) {
                self.seen_live.insert(r.id.clone());
            }
        }
    }

    /// Lists the push records again and reads those new or changed since.
    async fn refresh<S: Storage>(
        &mut self,
        storage: &S,
        notes: &mut Vec<String>,
    ) -> Result<(), StorageError> {
        let metas = storage.list_meta(layout::PUSHES_DIR, true).await?;
        let changed: Vec<_> = metas
            .into_iter()
            .filter(|m| {
                self.records
                    .get(&m.key)
                    .is_none_or(|(etag, _)| *etag != m.etag)
            })
            .collect();
        for l in read_records::<S, PushRecord>(storage, changed, notes).await? {
            self.records.insert(l.meta.key, (l.meta.etag, l.record));
        }
        self.note_live(now());
        Ok(())
    }

    /// The records whose paths this run must keep (see the type's comment).
    fn protecting(&self, at: i64) -> Vec<&PushRecord> {
        self.records
            .iter()
            .filter_map(|(k, (_, r))| Some((k, r.as_ref()?)))
            .filter(|(k, r)| {
                r.is_lease(at) || !self.at_scan.contains(*k) || self.seen_live.contains(&r.id)
            })
            .map(|(_, r)| r)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::index::Entry;
    use super::pins::{Pin, Revision};
    use super::*;

    fn entry(refs: &[&str], modified: i64) -> Entry {
        Entry {
            etag: String::new(),
            modified,
            size: 1,
            name: "x".into(),
            nar: None,
            nar_size: 0,
            file_size: 0,
            compression: String::new(),
            refs: refs.iter().map(|r| r.to_string()).collect(),
            deriver: None,
            pushed: 0,
            read: 0,
            broken: None,
        }
    }

    /// a → b → c, d → c, e alone (written now).
    fn catalog() -> Catalog {
        let mut cat = Catalog::default();
        for (h, refs, t) in [
            ("a", &["b"][..], 0),
            ("b", &["c"][..], 0),
            ("c", &[][..], 0),
            ("d", &["c"][..], 0),
            ("e", &[][..], 1_000_000),
        ] {
            cat.narinfos.insert(h.into(), entry(refs, t));
        }
        cat
    }

    fn opts(keep_days: u64) -> GcOptions {
        GcOptions {
            keep_days,
            keep_read_days: 0,
            ..GcOptions::default()
        }
    }

    fn set(v: &[&str]) -> HashSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn roots_keep_whole_closures_and_waves_delete_referrers_first() {
        let mut cat = catalog();
        let now = 1_000_000;
        // Nothing pinned, nothing recent by keep-days 0: all goes, referrers first.
        let (live, _) = mark(&cat, &opts(0), &[], now);
        assert!(live.is_empty());
        let mut waves = Waves::new(&cat, &live, &HashSet::new());
        let mut order = Vec::new();
        loop {
            let w = waves.take(10);
            if w.is_empty() {
                break;
            }
            for h in &w {
                waves.deleted(&cat, h);
            }
            order.push(w);
        }
        assert_eq!(order, vec![vec!["a", "d", "e"], vec!["b"], vec!["c"]]);
        // A referrer that failed to go is never deleted: what it names stays waiting.
        let mut waves = Waves::new(&cat, &live, &HashSet::new());
        assert_eq!(waves.take(1), vec!["a"]);
        assert_eq!(waves.take(10), vec!["d", "e"]);
        waves.deleted(&cat, "d");
        waves.deleted(&cat, "e");
        assert!(waves.take(10).is_empty(), "b waits on a, c on b");

        // Recency keeps e only; a pin on a keeps a, b, c; d goes alone.
        let (live, roots) = mark(&cat, &opts(1), &[], now);
        assert_eq!(live, set(&["e"]));
        assert_eq!(roots.recent, 1);
        cat.pins.push(Pin {
            version: 1,
            name: "p".into(),
            revisions: vec![Revision {
                added: 0,
                paths: vec![format!("/nix/store/{}-x", "0".repeat(32))],
            }],
        });
        cat.narinfos.insert("0".repeat(32), entry(&["a"], 0));
        let (live, roots) = mark(&cat, &opts(0), &[], now);
        assert_eq!(live, set(&[&"0".repeat(32), "a", "b", "c"]));
        assert_eq!(roots.pinned, 1);
        assert_eq!(
            Waves::new(&cat, &live, &HashSet::new()).take(10),
            vec!["d", "e"]
        );

        // A lease keeps d, and with it c, even with no narinfo for some of its paths.
        let lease = PushRecord {
            version: 1,
            id: "l".into(),
            host: String::new(),
            pid: 0,
            started: now,
            expires: now + 60,
            paths: vec!["d".into(), "not-there".into()],
            nar_hashes: vec![],
        };
        // Leases are matched by id for the marker; this one is live.
        assert!(lease.is_lease(now));
        let (live, roots) = mark(&cat, &opts(0), &[&lease], now);
        assert!(live.contains("d") && live.contains("c"));
        assert_eq!(roots.leased, 1);

        // An unreadable narinfo is kept with what it names.
        cat.narinfos.get_mut("e").unwrap().broken = Some("bad".into());
        cat.narinfos.get_mut("e").unwrap().refs = vec!["d".into()];
        let (live, roots) = mark(&cat, &opts(0), &[], now);
        assert!(live.contains("e") && live.contains("d") && live.contains("c"));
        assert_eq!(roots.unreadable, 1);
    }

    /// The three ways a push record protects during a run (each a hole the concurrent
    /// push + gc test found when it was missing).
    #[test]
    fn records_protect_while_leased_once_seen_live_and_when_new_since_the_scan() {
        let now = 1_000;
        let rec = |id: &str, expires: i64| PushRecord {
            version: 1,
            id: id.into(),
            host: String::new(),
            pid: 0,
            started: now - 5,
            expires,
            paths: vec![id.into()],
            nar_hashes: vec![],
        };
        let listed = |r: PushRecord| Listed {
            meta: crate::storage::ObjectMeta {
                key: format!("cachepush/pushes/{}", r.id),
                size: 1,
                modified: now,
                etag: "1".into(),
            },
            record: Some(r),
        };
        let mut leases = Leases::from_listing(
            &[listed(rec("live", now + 600)), listed(rec("done", 0))],
            now,
        );
        let ids = |l: &Leases| -> Vec<String> {
            let mut v: Vec<String> = l.protecting(now).iter().map(|r| r.id.clone()).collect();
            v.sort();
            v
        };
        assert_eq!(ids(&leases), ["live"]);
        // The live one is released during the run: it still protects (its narinfos may be
        // newer than the scan). A record new since the scan protects even released.
        leases.records.insert(
            "cachepush/pushes/live".into(),
            ("2".into(), Some(rec("live", 0))),
        );
        leases.records.insert(
            "cachepush/pushes/new".into(),
            ("1".into(), Some(rec("new", 0))),
        );
        assert_eq!(ids(&leases), ["live", "new"]);
    }

    #[test]
    fn the_budget_stops_and_says_why() {
        let mut r = GcReport::default();
        let mut b = Budget::new(Some(3));
        assert_eq!(b.take(&[1, 2], &mut r), Some(&[1, 2][..]));
        assert_eq!(b.take(&[3, 4], &mut r), Some(&[3][..]));
        assert_eq!(b.take(&[5], &mut r), None);
        assert!(r.stopped.is_some());
        let mut unlimited = Budget::new(None);
        assert_eq!(unlimited.take(&[1], &mut r), Some(&[1][..]));
    }
}
