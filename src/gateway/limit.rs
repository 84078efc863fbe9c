//! Bounds on what unauthenticated clients can make the gateway do (security review M1, M2).
//!
//! - [`PasswordChecks`]: bcrypt is slow by design, so a request with a credential the
//!   gateway has not verified yet costs tens of milliseconds of CPU. At most one check per
//!   core runs at a time; a request that cannot get a slot within a short wait is answered
//!   503 with `Retry-After` (never 401, which Nix would take as "absent"). Each peer may
//!   have only a few checks queued or running (more are 503 too), and a peer that keeps
//!   failing is refused for the rest of a one-minute window (429), so one host cannot fill
//!   the queue and delay the first login of everyone else.
//! - [`SingleFlight`]: Nix opens many connections at once, all with the same credential.
//!   Requests with a credential whose check is already running wait for that check's
//!   answer instead of starting (or being refused) one of their own.
//! - Peers are counted by IP address, IPv6 by /64 (one host usually holds a whole /64).
//!   Unix-socket peers are not limited per peer: behind a reverse proxy they are all one
//!   peer, so there the global bound applies, and per-client limits belong to the proxy.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Checks a peer may have waiting or running at once, at most: never all the slots, so
/// that one host can never hold every core (with two cores, one check per peer).
const PENDING_PER_PEER: u32 = 2;
/// Peers tracked at most; past that, new peers get only the global bound.
const MAX_PEERS: usize = 100_000;

/// Why a credential was not checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotChecked {
    /// Every check slot stayed busy: 503, try again shortly.
    Busy,
    /// This peer failed too often or has too many checks pending: 429 until the window ends.
    Limited { retry_after: Duration },
}

struct PeerState {
    window_start: Instant,
    failures: u32,
    pending: u32,
}

pub struct PasswordChecks {
    slots: Arc<Semaphore>,
    pending_per_peer: u32,
    wait: Duration,
    failures_per_window: u32,
    window: Duration,
    peers: Mutex<HashMap<IpAddr, PeerState>>,
}

/// A check in progress: holds a CPU slot and the peer's pending count.
pub struct Slot<'a> {
    owner: &'a PasswordChecks,
    peer: Option<IpAddr>,
    permit: Option<OwnedSemaphorePermit>,
}

fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
        },
    }
}

impl PasswordChecks {
    /// `slots` concurrent bcrypt runs; a request waits at most `wait` for one; a peer may
    /// fail `failures_per_window` times a minute (0: no per-peer limit).
    pub fn new(slots: usize, wait: Duration, failures_per_window: u32) -> Self {
        let slots = slots.max(1);
        PasswordChecks {
            slots: Arc::new(Semaphore::new(slots)),
            pending_per_peer: u32::try_from(slots / 2)
                .unwrap_or(u32::MAX)
                .clamp(1, PENDING_PER_PEER),
            wait,
            failures_per_window,
            window: Duration::from_secs(60),
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a slot to check a credential from `peer`.
    pub async fn acquire(&self, peer: Option<IpAddr>) -> Result<Slot<'_>, NotChecked> {
        let peer = peer.filter(|_| self.failures_per_window > 0).map(peer_key);
        if let Some(ip) = peer {
            self.enter(ip)?;
        }
        let permit = match tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()).await
        {
            Ok(Ok(p)) => p,
            _ => {
                if let Some(ip) = peer {
                    self.leave(ip, false);
                }
                return Err(NotChecked::Busy);
            }
        };
        Ok(Slot {
            owner: self,
            peer,
            permit: Some(permit),
        })
    }

    fn enter(&self, ip: IpAddr) -> Result<(), NotChecked> {
        let Ok(mut peers) = self.peers.lock() else {
            return Ok(());
        };
        let now = Instant::now();
        if peers.len() >= MAX_PEERS && !peers.contains_key(&ip) {
            peers.retain(|_, s| s.pending > 0 || now.duration_since(s.window_start) < self.window);
            if peers.len() >= MAX_PEERS {
                return Ok(());
            }
        }
        let s = peers.entry(ip).or_insert(PeerState {
            window_start: now,
            failures: 0,
            pending: 0,
        });
        if now.duration_since(s.window_start) >= self.window {
            s.window_start = now;
            s.failures = 0;
        }
        let retry_after = self
            .window
            .saturating_sub(now.duration_since(s.window_start))
            .max(Duration::from_secs(1));
        if s.failures >= self.failures_per_window {
            return Err(NotChecked::Limited { retry_after });
        }
        if s.pending >= self.pending_per_peer {
            return Err(NotChecked::Busy);
        }
        s.pending += 1;
        Ok(())
    }

    fn leave(&self, ip: IpAddr, failed: bool) {
        if let Ok(mut peers) = self.peers.lock()
            && let Some(s) = peers.get_mut(&ip)
        {
            s.pending = s.pending.saturating_sub(1);
            if failed {
                s.failures = s.failures.saturating_add(1);
            }
        }
    }
}

impl Slot<'_> {
    /// The CPU slot itself, to move into the blocking task that runs bcrypt: a client that
    /// hangs up must not free the slot while its bcrypt still runs.
    pub fn take_permit(&mut self) -> Option<OwnedSemaphorePermit> {
        self.permit.take()
    }

    /// Records the check's result for the peer's failure count.
    pub fn finish(mut self, ok: bool) {
        if let Some(ip) = self.peer.take() {
            self.owner.leave(ip, !ok);
        }
    }
}

impl Drop for Slot<'_> {
    /// A request dropped mid-check (the client went away) no longer counts as pending.
    fn drop(&mut self) {
        if let Some(ip) = self.peer.take() {
            self.owner.leave(ip, false);
        }
    }
}

/// The answer of one credential check, shared with every request that waited for it.
pub type CheckOutcome = Result<bool, NotChecked>;

type Waiters = HashMap<[u8; 32], tokio::sync::watch::Receiver<Option<CheckOutcome>>>;

/// Checks in progress, by the SHA-256 of the credential.
#[derive(Default)]
pub struct SingleFlight {
    running: Mutex<Waiters>,
}

/// What a request does about its credential.
pub enum Flight<'a> {
    /// Runs the check and publishes the outcome with [`Leader::publish`].
    Leader(Leader<'a>),
    /// Another request checks the same credential: wait for its outcome.
    Follower(tokio::sync::watch::Receiver<Option<CheckOutcome>>),
}

pub struct Leader<'a> {
    owner: &'a SingleFlight,
    key: [u8; 32],
    tx: tokio::sync::watch::Sender<Option<CheckOutcome>>,
}

impl SingleFlight {
    pub fn join(&self, key: [u8; 32]) -> Flight<'_> {
        let Ok(mut running) = self.running.lock() else {
            // A poisoned map only costs the sharing: check alone.
            let (tx, _) = tokio::sync::watch::channel(None);
            return Flight::Leader(Leader {
                owner: self,
                key,
                tx,
            });
        };
        if let Some(rx) = running.get(&key) {
            return Flight::Follower(rx.clone());
        }
        let (tx, rx) = tokio::sync::watch::channel(None);
        running.insert(key, rx);
        Flight::Leader(Leader {
            owner: self,
            key,
            tx,
        })
    }

    /// The outcome of the check a follower waits for; `None` when its leader went away
    /// (the client hung up) without one, and the follower should check for itself.
    pub async fn wait(
        mut rx: tokio::sync::watch::Receiver<Option<CheckOutcome>>,
    ) -> Option<CheckOutcome> {
        rx.wait_for(Option::is_some).await.ok().and_then(|v| *v)
    }
}

impl Leader<'_> {
    pub fn publish(self, outcome: CheckOutcome) {
        let _ = self.tx.send(Some(outcome));
    }
}

impl Drop for Leader<'_> {
    /// Published or abandoned, the check is no longer running.
    fn drop(&mut self) {
        if let Ok(mut running) = self.owner.running.lock() {
            running.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failing_peer_is_limited_and_others_are_not() {
        let checks = PasswordChecks::new(2, Duration::from_millis(50), 3);
        let bad: IpAddr = "192.0.2.1".parse().unwrap();
        let good: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            checks.acquire(Some(bad)).await.unwrap().finish(false);
        }
        assert!(matches!(
            checks.acquire(Some(bad)).await,
            Err(NotChecked::Limited { retry_after }) if retry_after > Duration::from_secs(50)
        ));
        // Another host, and successes, are unaffected.
        for _ in 0..5 {
            checks.acquire(Some(good)).await.unwrap().finish(true);
        }
        // Unix-socket peers have no per-peer limit.
        for _ in 0..5 {
            checks.acquire(None).await.unwrap().finish(false);
        }
    }

    #[tokio::test]
    async fn a_peer_never_holds_every_slot_and_a_full_gate_is_busy_not_denied() {
        let checks = PasswordChecks::new(1, Duration::from_millis(50), 100);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let same_host: IpAddr = "2001:db8::2".parse().unwrap();
        let other: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let first = checks.acquire(Some(a)).await.unwrap();
        // The one slot is taken: the same /64 may not queue behind it (one pending per
        // peer with so few slots); another host waits; both are told "busy", not "denied".
        assert_eq!(
            checks.acquire(Some(same_host)).await.err(),
            Some(NotChecked::Busy)
        );
        assert_eq!(
            checks.acquire(Some(other)).await.err(),
            Some(NotChecked::Busy)
        );
        // Busy is not a failure: once the slot is free, the other host gets it.
        first.finish(false);
        let s = checks.acquire(Some(other)).await.unwrap();
        s.finish(true);
        // Two pending from one /64 at most (with four slots; one with two).
        let checks = PasswordChecks::new(4, Duration::from_secs(5), 100);
        let _x = checks.acquire(Some(a)).await.unwrap();
        let _y = checks.acquire(Some(same_host)).await.unwrap();
        assert_eq!(checks.acquire(Some(a)).await.err(), Some(NotChecked::Busy));
        assert!(checks.acquire(Some(other)).await.is_ok());
        let checks = PasswordChecks::new(2, Duration::from_secs(5), 100);
        let _x = checks.acquire(Some(a)).await.unwrap();
        assert_eq!(
            checks.acquire(Some(same_host)).await.err(),
            Some(NotChecked::Busy)
        );
        assert!(checks.acquire(Some(other)).await.is_ok());
    }

    #[tokio::test]
    async fn one_check_per_credential_however_many_requests_carry_it() {
        let flights = SingleFlight::default();
        let key = [7u8; 32];
        let Flight::Leader(lead) = flights.join(key) else {
            panic!("the first request leads")
        };
        let followers: Vec<_> = (0..10)
            .map(|_| match flights.join(key) {
                Flight::Follower(rx) => tokio::spawn(SingleFlight::wait(rx)),
                Flight::Leader(_) => panic!("a second check of the same credential"),
            })
            .collect();
        // Another credential is checked on its own.
        assert!(matches!(flights.join([8u8; 32]), Flight::Leader(_)));
        lead.publish(Ok(true));
        for f in followers {
            assert_eq!(f.await.unwrap(), Some(Ok(true)));
        }
        // Done: the next request checks again (its answer is cached elsewhere).
        let Flight::Leader(lead) = flights.join(key) else {
            panic!("a finished check is not joined")
        };
        let Flight::Follower(rx) = flights.join(key) else {
            panic!()
        };
        // A leader that goes away without an answer sends its followers to check alone.
        drop(lead);
        assert_eq!(SingleFlight::wait(rx).await, None);
    }
}
