//! Deciding what to send, before anything is written.
//!
//! A path is skipped when, in this order:
//! 1. its narinfo is in the target (HEADs, and for large closures a listing of the top
//!    level at the same time, see [`super::presence`]; `list: false` for stores whose
//!    listings lag behind their writes);
//! 2. its local signatures include a key named by `--skip-signed-by` (e.g. paths built by
//!    Hydra and signed `cache.nixos.org-1`, which clients get from there);
//! 3. an `--upstream` cache serves its narinfo.

use futures::{StreamExt, TryStreamExt};

use super::presence::presence;
use crate::format::layout;
use crate::storage::{Storage, StorageError};
use crate::store::PathInfo;
use crate::upstream::{Upstream, UpstreamError};

/// The closure split by what happens to each path.
#[derive(Debug, Default)]
pub struct Plan {
    /// Every path considered.
    pub closure: usize,
    /// Paths whose narinfo is already in the target.
    pub present: Vec<PathInfo>,
    /// Paths skipped because they carry a signature by a `--skip-signed-by` key.
    pub signed_elsewhere: Vec<PathInfo>,
    /// Paths skipped because an upstream cache serves them.
    pub upstream: Vec<PathInfo>,
    /// Paths to publish, in dependency order.
    pub to_send: Vec<PathInfo>,
    /// Upstream lookups that failed; those paths are pushed (pushing too much is safe).
    pub upstream_errors: Vec<UpstreamError>,
    /// Paths whose narinfo was present but whose NAR was not (`repair`); also in `to_send`.
    pub repaired: Vec<crate::format::StorePath>,
    /// Why listing the target stopped early (HEADs answered the rest).
    pub listing_error: Option<StorageError>,
}

impl Plan {
    pub fn nar_bytes_to_send(&self) -> u64 {
        self.to_send.iter().map(|p| p.nar_size).sum()
    }

    /// Paths not sent, for whatever reason.
    pub fn skipped(&self) -> usize {
        self.present.len() + self.signed_elsewhere.len() + self.upstream.len()
    }
}

/// What to skip besides what the target has.
#[derive(Debug)]
pub struct PlanOptions {
    /// Requests in flight at once, to the target and to each upstream.
    pub concurrency: usize,
    pub skip_signed_by: Vec<String>,
    pub upstreams: Vec<Upstream>,
    /// Check that each present narinfo's NAR exists too, and push again the paths whose
    /// NAR is missing (a cache damaged by another tool or a deleted object).
    pub repair: bool,
    /// List the target's narinfos as well as asking for each (large closures only).
    pub list: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            concurrency: 16,
            skip_signed_by: Vec::new(),
            upstreams: Vec::new(),
            repair: false,
            list: true,
        }
    }
}

/// Checks which narinfos exist, with at most `opts.concurrency` requests in flight.
pub async fn plan<S: Storage>(
    storage: &S,
    closure: Vec<PathInfo>,
    opts: &PlanOptions,
) -> Result<Plan, StorageError> {
    let concurrency = opts.concurrency.max(1);
    let mut plan = Plan {
        closure: closure.len(),
        ..Plan::default()
    };
    let keys: Vec<String> = closure
        .iter()
        .map(|info| layout::narinfo_of(&info.path))
        .collect();
    let (present, listing_error) = presence(storage, &keys, concurrency, opts.list).await?;
    plan.listing_error = listing_error;
    let checks: Vec<(PathInfo, bool)> = closure.into_iter().zip(present).collect();
    let mut missing = Vec::new();
    let checks = if opts.repair {
        futures::stream::iter(checks.into_iter().map(|(info, present)| async move {
            if !present {
                return Ok((info, false, false));
            }
            let broken = nar_missing(storage, &info).await?;
            Ok::<_, StorageError>((info, !broken, broken))
        }))
        .buffered(concurrency)
        .try_collect::<Vec<_>>()
        .await?
    } else {
        checks.into_iter().map(|(i, p)| (i, p, false)).collect()
    };
    for (info, present, broken) in checks {
        if broken {
            plan.repaired.push(info.path.clone());
            missing.push(info);
        } else if present {
            plan.present.push(info);
        } else if info
            .sigs
            .iter()
            .any(|s| opts.skip_signed_by.iter().any(|k| k == s.key_name()))
        {
            plan.signed_elsewhere.push(info);
        } else {
            missing.push(info);
        }
    }
    for up in &opts.upstreams {
        let found = futures::stream::iter(missing.into_iter().map(|info| async move {
            let r = up.has(&info.path).await;
            (info, r)
        }))
        .buffered(concurrency)
        .collect::<Vec<_>>()
        .await;
        missing = Vec::with_capacity(found.len());
        // One report per upstream: its first error, and, when it was marked down, how
        // many paths were pushed without asking it (not one warning per path).
        let (mut first, mut errored) = (None, 0usize);
        for (info, r) in found {
            match r {
                Ok(true) => plan.upstream.push(info),
                Ok(false) => missing.push(info),
                Err(e) => {
                    errored += 1;
                    if first.is_none() && !matches!(e, UpstreamError::Down { .. }) {
                        first = Some(e);
                    }
                    missing.push(info);
                }
            }
        }
        plan.upstream_errors.extend(first);
        if up.is_down() {
            plan.upstream_errors.push(UpstreamError::Down {
                url: up.url().to_owned(),
                failures: up.failures(),
                paths: errored,
            });
        } else if errored > 1 {
            plan.upstream_errors.push(UpstreamError::Request {
                url: up.url().to_owned(),
                message: format!(
                    "{} more lookups failed; those paths were pushed",
                    errored - 1
                ),
            });
        }
    }
    plan.to_send = missing;
    Ok(plan)
}

/// Whether the present narinfo of `info` points at a NAR that is not there (or is
/// unreadable, which a re-push also fixes).
async fn nar_missing<S: Storage>(storage: &S, info: &PathInfo) -> Result<bool, StorageError> {
    let key = format!("{}.narinfo", info.path.hash_part());
    let Some(text) = storage.get(&key).await? else {
        return Ok(true);
    };
    let Ok(ni) = std::str::from_utf8(&text)
        .map_err(|_| ())
        .and_then(|t| crate::format::NarInfo::parse(t).map_err(|_| ()))
    else {
        return Ok(true);
    };
    match storage.head(&ni.url).await {
        // A URL that names no object (`../x`) is broken too: pushing again replaces it.
        Err(StorageError::Config(_)) => Ok(true),
        other => Ok(other?.is_none()),
    }
}
