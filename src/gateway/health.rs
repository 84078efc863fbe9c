//! `GET /healthz`, and the storage check that also tells a missing object from a missing
//! cache (a HEAD's 404 carries no error code).

use std::time::Instant;

use http::{Response, StatusCode};

use super::error::Refusal;
use super::handler::{HEALTH_TTL, State};
use super::response::{Body, plain};
use super::route::Route;
use crate::storage::Storage;

impl<S: Storage> State<S> {
    /// Whether the storage exists and answers, asked at most once per [`HEALTH_TTL`] (one
    /// caller asks, the others wait for its answer).
    pub(super) async fn storage_health(&self) -> Result<(), Refusal> {
        let mut last = self.health.lock().await;
        if let Some((at, answer)) = *last
            && at.elapsed() < HEALTH_TTL
        {
            return answer;
        }
        let started = Instant::now();
        let res = self.storage.check_health().await;
        self.metrics.upstream(started.elapsed());
        let answer = res.map_err(|e| self.storage_failure(&Route::Healthz, &e));
        *last = Some((Instant::now(), answer));
        answer
    }

    pub(super) async fn healthz(&self) -> Response<Body> {
        match self.storage_health().await {
            Ok(()) => plain(StatusCode::OK, "ok\n"),
            // Always 503 here, whatever the storage's error: load balancers only need
            // "take it out of rotation".
            Err(_) => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the cache storage is unavailable\n",
            ),
        }
    }
}
