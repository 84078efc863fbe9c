//! Deciding what to send: a narinfo present in the target means the path is there.

use futures::{StreamExt, TryStreamExt};

use crate::storage::{Storage, StorageError};
use crate::store::PathInfo;

/// The closure split into what the target has and what it lacks.
#[derive(Debug, Default)]
pub struct Plan {
    /// Every path considered, in dependency order.
    pub closure: usize,
    /// Paths whose narinfo is already in the target.
    pub present: Vec<PathInfo>,
    /// Paths to publish, in dependency order.
    pub to_send: Vec<PathInfo>,
}

impl Plan {
    pub fn nar_bytes_to_send(&self) -> u64 {
        self.to_send.iter().map(|p| p.nar_size).sum()
    }
}

/// Checks which narinfos exist, with at most `concurrency` requests in flight.
pub async fn plan<S: Storage>(
    storage: &S,
    closure: Vec<PathInfo>,
    concurrency: usize,
) -> Result<Plan, StorageError> {
    let total = closure.len();
    let checks = futures::stream::iter(closure.into_iter().map(|info| async move {
        let key = format!("{}.narinfo", info.path.hash_part());
        storage.head(&key).await.map(|h| (info, h.is_some()))
    }))
    .buffered(concurrency.max(1))
    .try_collect::<Vec<_>>()
    .await?;
    let mut plan = Plan {
        closure: total,
        ..Plan::default()
    };
    for (info, present) in checks {
        if present {
            plan.present.push(info);
        } else {
            plan.to_send.push(info);
        }
    }
    Ok(plan)
}
