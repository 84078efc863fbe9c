//! The request handler: the gateway's state and the order of decisions for one request
//! (method, route, authentication, then the endpoint). Each endpoint lives in its own
//! file ([`super::narinfo`], [`super::nar`], [`super::health`]); every refusal's status is
//! decided in [`super::error`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use sha2::Digest;

use super::auth::Auth;
use super::cache::SmallCache;
use super::config::{CacheControl, GatewayConfig};
use super::error::Refusal;
use super::limit::{CheckOutcome, Flight, NotChecked, PasswordChecks, SingleFlight};
use super::metrics::Metrics;
use super::response::{Body, log, ok, plain};
use super::route::{Reject, Route};
use crate::storage::{Storage, StorageError};

/// How long a storage check answers for `/healthz` and for 404s that a HEAD cannot explain.
pub(super) const HEALTH_TTL: Duration = Duration::from_secs(2);
/// Largest narinfo or `nix-cache-info` read into memory; real ones are a few KiB.
pub(super) const MAX_SMALL_OBJECT: u64 = 1024 * 1024;

/// Everything a request may use, shared by all connections.
pub struct State<S> {
    pub(super) storage: S,
    /// Swapped whole on reload; a request works with the one it read.
    pub(super) auth: std::sync::RwLock<Option<Arc<Auth>>>,
    pub(super) checks: PasswordChecks,
    pub(super) flights: SingleFlight,
    /// The last storage check and when it ran: `/healthz` asks the storage at most once
    /// per [`HEALTH_TTL`], however often it is called (it needs no credentials).
    pub(super) health: tokio::sync::Mutex<Option<(Instant, Result<(), Refusal>)>>,
    pub(super) cfg: GatewayConfig,
    pub(super) cache: SmallCache,
    pub(super) metrics: Metrics,
    pub(super) public_key: Option<String>,
    pub(super) access: Option<super::access::AccessRecorder>,
    pub(super) push: Option<super::push::Pushes>,
}

impl<S: Storage> State<S> {
    pub fn new(mut cfg: GatewayConfig, storage: S) -> Self {
        let public_key = cfg.signer.as_ref().map(|k| k.public().to_string());
        let slots = std::thread::available_parallelism().map_or(2, |n| n.get());
        State {
            storage,
            auth: std::sync::RwLock::new(cfg.auth.take().map(Arc::new)),
            // A request waits up to 2 s for a password check slot, then gets a 503.
            checks: PasswordChecks::new(
                slots,
                Duration::from_secs(2),
                cfg.auth_failures_per_minute,
            ),
            flights: SingleFlight::default(),
            health: tokio::sync::Mutex::new(None),
            cache: SmallCache::new(cfg.cache_entries, cfg.narinfo_ttl, cfg.negative_ttl),
            metrics: Metrics::default(),
            public_key,
            access: cfg.record_access.map(super::access::AccessRecorder::new),
            push: cfg.push.take().map(super::push::Pushes::new),
            cfg,
        }
    }

    pub(super) fn auth(&self) -> Option<Arc<Auth>> {
        self.auth.read().ok().and_then(|a| a.clone())
    }

    /// Reads the htpasswd and tokens files again and swaps them in; on an error the
    /// credentials in use stay. Returns how many users and tokens are now accepted.
    pub fn reload_auth(&self) -> Result<Option<(usize, usize)>, super::auth::AuthFileError> {
        let Some((htpasswd, tokens)) = &self.cfg.auth_files else {
            return Ok(None);
        };
        let fresh = Auth::load(htpasswd.as_deref(), tokens.as_deref())?
            .with_scoped(self.cfg.scoped_tokens.clone());
        let entries = fresh.entries();
        if let Ok(mut a) = self.auth.write() {
            *a = Some(Arc::new(fresh));
        }
        Ok(Some(entries))
    }

    /// Logs a storage failure with its details and gives the generic refusal.
    pub(super) fn storage_failure(&self, route: &Route, e: &StorageError) -> Refusal {
        log(&format!("error: {} {e}", route.label()));
        Refusal::from_storage(e)
    }

    /// Answers one request; also returns the route's label for the metrics.
    pub async fn handle(
        &self,
        req: &Request<Incoming>,
        peer: Option<IpAddr>,
    ) -> (Response<Body>, &'static str) {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return (Refusal::MethodNotAllowed.into(), "other");
        }
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let route = match Route::parse(target) {
            Ok(r) => r,
            Err(Reject::BadRequest(_)) => return (Refusal::BadRequest.into(), "other"),
            Err(Reject::TooLong) => return (Refusal::UriTooLong.into(), "other"),
            Err(Reject::NotFound) => return (Refusal::NotFound.into(), "other"),
        };
        let label = route.label();
        if !matches!(route, Route::Healthz | Route::Metrics)
            && let Err(r) = self.authorize(req, peer).await
        {
            return (r, label);
        }
        let head = req.method() == Method::HEAD;
        let resp = match &route {
            Route::Healthz => self.healthz().await,
            Route::Metrics => ok(
                self.metrics.render(self.storage.stats(), self.cache.len()),
                "text/plain; version=0.0.4",
            ),
            Route::Version => plain(
                StatusCode::OK,
                concat!("cachepush ", env!("CARGO_PKG_VERSION"), "\n"),
            ),
            Route::PublicKey => match &self.public_key {
                Some(k) => ok(format!("{k}\n"), "text/plain; charset=utf-8"),
                None => Refusal::NoSigningKey.into(),
            },
            Route::CacheInfo => self.cache_info(&route, req).await,
            Route::NarInfo(_) => self.narinfo(&route, req).await,
            Route::Nar(_) => self.nar(&route, req, head).await,
            Route::Listing(_) | Route::Log(_) | Route::Realisation(_) | Route::DebugInfo(_) => {
                self.proxy(&route, req, head).await
            }
        };
        (resp, label)
    }

    /// Lets the request through, or answers it: 401 for missing or wrong credentials; 503
    /// or 429 when the credential could not be checked now (never 401, which Nix would
    /// read as "absent" and remember).
    async fn authorize(
        &self,
        req: &Request<Incoming>,
        peer: Option<IpAddr>,
    ) -> Result<(), Response<Body>> {
        let Some(auth) = self.auth() else {
            return Ok(());
        };
        let auth = &auth;
        let h = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let ok = match auth.check_cached(h) {
            Some(answer) => answer,
            None => {
                let key: [u8; 32] = sha2::Sha256::digest(h.unwrap_or_default()).into();
                let outcome = loop {
                    match self.flights.join(key) {
                        Flight::Leader(lead) => {
                            let outcome = self.check_slowly(auth, h, peer).await;
                            lead.publish(outcome);
                            break outcome;
                        }
                        Flight::Follower(rx) => {
                            if let Some(outcome) = SingleFlight::wait(rx).await {
                                break outcome;
                            }
                        }
                    }
                };
                match outcome {
                    Ok(ok) => ok,
                    Err(why) => return Err(self.not_checked(why).into()),
                }
            }
        };
        if ok {
            return Ok(());
        }
        self.metrics.auth_failure();
        let mut r: Response<Body> = Refusal::Unauthorized.into();
        r.extensions_mut().insert(AuthRefused(auth.refusal(h)));
        if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{}\"", auth.realm)) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        Err(r)
    }

    /// One bcrypt run for a credential not seen (or not remembered) yet.
    async fn check_slowly(
        &self,
        auth: &Arc<Auth>,
        h: Option<&[u8]>,
        peer: Option<IpAddr>,
    ) -> CheckOutcome {
        let mut slot = self.checks.acquire(peer).await?;
        // bcrypt takes milliseconds: keep it off the async workers, and keep the CPU slot
        // until it has finished even if the client hangs up.
        let permit = slot.take_permit();
        let h = h.map(<[u8]>::to_vec);
        let auth = auth.clone();
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            auth.check(h.as_deref())
        })
        .await
        .unwrap_or(false);
        slot.finish(ok);
        Ok(ok)
    }

    fn not_checked(&self, why: NotChecked) -> Refusal {
        match why {
            NotChecked::Busy => {
                self.metrics.auth_busy();
                Refusal::AuthBusy
            }
            NotChecked::Limited { retry_after } => Refusal::AuthLimited { retry_after },
        }
    }

    /// Sets `Cache-Control` for a response that may be stored for `directives` (e.g.
    /// `max-age=60`): `public` only where no credentials were needed to get it, or where
    /// the operator said a CDN in front authenticates (security review M4).
    pub(super) fn cacheable(&self, r: &mut Response<Body>, directives: &str) {
        let public = self.auth().is_none() || self.cfg.cache_control == CacheControl::Public;
        let value = format!(
            "{}, {directives}",
            if public { "public" } else { "private" }
        );
        if let Ok(v) = HeaderValue::from_str(&value) {
            r.headers_mut().insert(header::CACHE_CONTROL, v);
        }
        if !public {
            r.headers_mut()
                .insert(header::VARY, HeaderValue::from_static("authorization"));
        }
    }
}

/// Why a request was answered 401, for the access log (never the credential itself).
#[derive(Clone, Debug)]
pub struct AuthRefused(pub String);
