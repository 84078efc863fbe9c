//! Executing a plan: bounded, ordered, verified uploads.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{PathError, Plan};
use crate::compression::{self, Compression, Produced};
use crate::format::{NarInfo, SecretKey, StoreDir, StorePath};
use crate::storage::{Staged, Storage, content_type};
use crate::store::{LocalStore, PathInfo};

/// Size of the pieces a NAR is cut into on its way to the target.
const CHUNK: usize = 1 << 20;
/// Chunks buffered between the NAR producer and the uploader, per upload.
const CHANNEL_DEPTH: usize = 4;

#[derive(Clone, Debug)]
pub struct PushOptions {
    pub compression: Compression,
    /// Uploads (NARs and narinfos) in flight at once.
    pub jobs: usize,
    pub signing_key: Option<Arc<SecretKey>>,
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

    // Largest NARs first, so that one big path does not become the tail of the push.
    let mut queue: Vec<PathInfo> = plan.to_send;
    queue.sort_by_key(|p| p.nar_size);

    let mut nars: JoinSet<Done> = JoinSet::new();
    let mut narinfos: JoinSet<Done> = JoinSet::new();
    let mut ready: Vec<Box<NarInfo>> = Vec::new();
    let mut staged_narinfo: HashMap<StorePath, Box<NarInfo>> = HashMap::new();
    let mut failed: HashSet<StorePath> = HashSet::new();
    let mut task_path: HashMap<tokio::task::Id, StorePath> = HashMap::new();

    loop {
        while nars.len() < jobs {
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
            let handle = nars.spawn(async move {
                let path = info.path.clone();
                let res = upload_nar(&*storage, &dir, real, info, &opts).await;
                Done::Nar(path, res.map(Box::new))
            });
            task_path.insert(handle.id(), p);
        }
        while narinfos.len() < jobs {
            let Some(ni) = ready.pop() else { break };
            let storage = storage.clone();
            let p = ni.store_path.clone();
            let handle = narinfos.spawn(async move {
                let key = format!("{}.narinfo", ni.store_path.hash_part());
                let res = storage
                    .put(&key, content_type::NARINFO, Bytes::from(ni.to_string()))
                    .await
                    .map_err(PathError::from);
                Done::NarInfo(ni.store_path, res)
            });
            task_path.insert(handle.id(), p);
        }

        let next = tokio::select! {
            Some(r) = nars.join_next_with_id(), if !nars.is_empty() => r,
            Some(r) = narinfos.join_next_with_id(), if !narinfos.is_empty() => r,
            else => break,
        };
        let done = match next {
            Ok((id, d)) => {
                task_path.remove(&id);
                d
            }
            // A task that panicked still fails only its own path, found by its task id.
            Err(e) => match task_path.remove(&e.id()) {
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

/// Streams one NAR to the target and returns the narinfo to publish for it.
async fn upload_nar<S: Storage>(
    storage: &S,
    store_dir: &StoreDir,
    real: std::path::PathBuf,
    info: PathInfo,
    opts: &PushOptions,
) -> Result<NarInfo, PathError> {
    // Named by NarHash, known before compressing, so one pass can stream it.
    let url = format!(
        "nar/{}{}",
        info.nar_hash.nix32(),
        opts.compression.extension()
    );
    let (tx, rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
    let compression = opts.compression;
    let hint = info.nar_size;
    let producer = tokio::task::spawn_blocking(move || {
        compression::produce(&real, compression, hint, CHUNK, tx)
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
    };
    if let Some(key) = &opts.signing_key {
        ni.sign(key);
    }
    Ok(ni)
}
