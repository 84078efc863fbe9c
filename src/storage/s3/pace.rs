//! How many small requests to keep in flight: a limit that follows the link.
//!
//! A push of many small paths is a stream of small requests (HEADs, narinfo and small NAR
//! PUTs) whose cost is the round trip, not the bytes: at 100 ms a fixed 16 in flight caps
//! it at 160 requests a second whatever the link could carry. The limit here starts at
//! 16 (what the fixed default was, so loopback and LAN pushes behave as before) and
//!
//! - **grows** while the link keeps up: by one per answered request (doubling every round
//!   trip, as TCP's slow start) until the first sign of congestion, then by one per round
//!   trip's worth of answers; but only while requests are queueing for a slot (an idle
//!   limit proves nothing) and while their average latency stays within three times the
//!   lowest seen plus a few milliseconds (latency that climbs means a queue is building somewhere, in the
//!   server or on the link, and more in flight would only lengthen it);
//! - **halves** on a throttling answer (503 SlowDown, B2's 503 "too busy", 429,
//!   `RequestTimeout`), at most once per round trip, since one burst of throttling
//!   answers to requests sent together is one signal, not many (AIMD, as TCP);
//! - stays between 4 and the ceiling (`--jobs`, or the provider's).
//!
//! Large multipart parts are not paced here: their number in flight is the memory budget
//! (`parts_in_flight`), and each of them is long enough to fill the link on its own.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limit a push starts with (the fixed default before the limit adapted).
pub const INITIAL: usize = 16;
/// Cuts stop here (or at the ceiling, if lower). A server that throttles a share of
/// requests whatever the rate would otherwise drive the limit to one and the push to a
/// crawl; every throttled request still waits out its own backoff, so four in flight is
/// still a client that slows down.
pub const FLOOR: usize = 4;
/// A smoothed latency within `FACTOR` × the lowest seen + `SLACK` still counts as
/// "holding". Not 2: a request on a new connection pays the TCP (and TLS) handshake too,
/// and while the limit grows, many requests open new connections.
const FACTOR: u32 = 3;
const SLACK: Duration = Duration::from_millis(5);
/// The shortest time between two cuts, whatever the round trip.
const MIN_CUT_INTERVAL: Duration = Duration::from_millis(100);

/// What the answer to a paced request says about the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Answered (whatever the answer) in this time; `sample` is false for requests whose
    /// time is mostly their body (large PUTs), which say nothing about the round trip.
    Answered { sample: bool },
    /// The server asked us to slow down.
    Throttled,
    /// No answer, or an answer that says nothing about load.
    Nothing,
}

#[derive(Debug)]
struct State {
    limit: f64,
    /// Permits that exist, in the semaphore or out with requests.
    granted: usize,
    /// Permits to retire as they come back (the limit dropped below those out).
    debt: usize,
    slow_start: bool,
    base: Option<Duration>,
    /// Exponentially weighted average latency (weight 1/10 per answer).
    avg: Option<Duration>,
    last_cut: Option<Instant>,
    peak: usize,
    cuts: u64,
}

/// The limiter, shared by every request of one client.
#[derive(Debug)]
pub struct Pace {
    sem: Arc<Semaphore>,
    state: Mutex<State>,
    ceiling: usize,
}

/// A slot for one request; hand it back with [`PacePermit::finish`] (dropping it is
/// [`Signal::Nothing`]).
pub struct PacePermit {
    pace: Arc<Pace>,
    permit: Option<OwnedSemaphorePermit>,
    started: Instant,
    /// All slots were taken once this one was: the limit, not demand, was the bound.
    saturated: bool,
}

impl Pace {
    pub fn new(ceiling: usize) -> Arc<Pace> {
        let ceiling = ceiling.max(1);
        let initial = INITIAL.min(ceiling);
        Arc::new(Pace {
            sem: Arc::new(Semaphore::new(initial)),
            state: Mutex::new(State {
                limit: initial as f64,
                granted: initial,
                debt: 0,
                slow_start: true,
                base: None,
                avg: None,
                last_cut: None,
                peak: initial,
                cuts: 0,
            }),
            ceiling,
        })
    }

    pub async fn acquire(self: &Arc<Self>) -> PacePermit {
        // The semaphore is never closed, so acquiring only waits.
        let permit = self.sem.clone().acquire_owned().await.ok();
        // More than half the slots taken: demand is at the limit.
        let saturated = self.sem.available_permits() * 2 < self.lock().granted;
        PacePermit {
            pace: self.clone(),
            saturated,
            permit,
            started: Instant::now(),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.lock().granted
    }

    /// The highest limit reached, and how many times it was cut.
    pub fn peak(&self) -> (usize, u64) {
        let s = self.lock();
        (s.peak, s.cuts)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn observe(&self, signal: Signal, took: Duration, saturated: bool) {
        let mut s = self.lock();
        match signal {
            Signal::Nothing => return,
            Signal::Answered { sample } => {
                if !sample {
                    return;
                }
                let base = *s.base.get_or_insert(took);
                if took < base {
                    s.base = Some(took);
                }
                let avg = s.avg.map_or(took, |a| (a * 9 + took) / 10);
                s.avg = Some(avg);
                let holds = avg <= base * FACTOR + SLACK;
                if !holds {
                    // A queue is building: stop doubling, but do not cut (only throttling
                    // does; latency alone can be the server's disk).
                    s.slow_start = false;
                    return;
                }
                if !saturated {
                    return;
                }
                s.limit += if s.slow_start { 1.0 } else { 1.0 / s.limit };
            }
            Signal::Throttled => {
                let interval = s.base.map_or(MIN_CUT_INTERVAL, |b| b.max(MIN_CUT_INTERVAL));
                if s.last_cut.is_some_and(|t| t.elapsed() < interval) {
                    return;
                }
                s.last_cut = Some(Instant::now());
                s.slow_start = false;
                s.limit = (s.limit / 2.0).max(FLOOR.min(self.ceiling) as f64);
                s.cuts += 1;
            }
        }
        s.limit = s.limit.min(self.ceiling as f64);
        let want = (s.limit as usize).clamp(1, self.ceiling);
        if want > s.granted {
            let mut more = want - s.granted;
            let repaid = more.min(s.debt);
            s.debt -= repaid;
            more -= repaid;
            self.sem.add_permits(more);
        } else if want < s.granted {
            let fewer = s.granted - want;
            let now = self.sem.forget_permits(fewer);
            s.debt += fewer - now;
        }
        s.granted = want;
        s.peak = s.peak.max(want);
    }
}

impl PacePermit {
    pub fn finish(mut self, signal: Signal) {
        let took = self.started.elapsed();
        self.pace.observe(signal, took, self.saturated);
        self.release();
    }

    fn release(&mut self) {
        let Some(p) = self.permit.take() else { return };
        let mut s = self.pace.lock();
        if s.debt > 0 {
            s.debt -= 1;
            p.forget();
        }
    }
}

impl Drop for PacePermit {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes `n` slots (waiting for none), answers them all with `signal` after `took`.
    async fn round(pace: &Arc<Pace>, n: usize, signal: Signal, took: Duration) {
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(pace.acquire().await);
        }
        for mut p in held {
            p.started = Instant::now() - took;
            p.finish(signal);
        }
    }

    #[tokio::test]
    async fn grows_while_latency_holds_and_halves_on_throttling() {
        let pace = Pace::new(256);
        assert_eq!(pace.limit(), INITIAL);
        let rtt = Duration::from_millis(100);
        let ok = Signal::Answered { sample: true };
        // Slow start: a full round grows the limit by half (the answers that found more
        // than half the slots taken), up to the ceiling.
        let mut rounds = 0;
        while pace.limit() < 256 {
            let n = pace.limit();
            round(&pace, n, ok, rtt).await;
            assert!(
                pace.limit() * 10 >= n * 14 || pace.limit() == 256,
                "{n} -> {}",
                pace.limit()
            );
            rounds += 1;
        }
        assert!(rounds <= 8, "{rounds} rounds to the ceiling");
        round(&pace, 256, ok, rtt).await;
        assert_eq!(pace.limit(), 256, "never above the ceiling");
        // One round of throttling answers is one cut, not one per answer.
        round(&pace, 256, Signal::Throttled, rtt).await;
        assert_eq!(pace.limit(), 128);
        assert_eq!(pace.peak(), (256, 1));
        // After a cut: about one more per two rounds (1/limit per answer), not doubling.
        for _ in 0..4 {
            let n = pace.limit();
            round(&pace, n, ok, rtt).await;
        }
        assert!((129..=131).contains(&pace.limit()), "{}", pace.limit());
    }

    #[tokio::test]
    async fn latency_that_climbs_stops_growth_and_idle_slots_prove_nothing() {
        let pace = Pace::new(256);
        let ok = Signal::Answered { sample: true };
        round(&pace, 16, ok, Duration::from_millis(1)).await;
        let grown = pace.limit();
        assert!(grown > 16, "{grown}");
        // Twenty times the lowest latency: a queue, not the link. The average needs a few
        // answers to get there; then growth stops.
        round(&pace, grown, ok, Duration::from_millis(20)).await;
        let grown = pace.limit();
        round(&pace, grown, ok, Duration::from_millis(20)).await;
        assert_eq!(pace.limit(), grown);
        // Fewer requests than slots: none saw the limit bind.
        round(&pace, 4, ok, Duration::from_millis(1)).await;
        assert_eq!(pace.limit(), grown);
        // Samples flagged as body-bound change nothing either.
        round(
            &pace,
            grown,
            Signal::Answered { sample: false },
            Duration::from_secs(9),
        )
        .await;
        assert_eq!(pace.limit(), grown);
    }

    #[tokio::test]
    async fn a_cut_with_every_slot_taken_retires_slots_as_they_return() {
        let pace = Pace::new(64);
        let mut held = Vec::new();
        for _ in 0..16 {
            held.push(pace.acquire().await);
        }
        let first = held.pop().unwrap();
        first.finish(Signal::Throttled);
        assert_eq!(pace.limit(), 8);
        // 15 out, limit 8: seven come back and are retired, the next ones are free again.
        for p in held.drain(..) {
            p.finish(Signal::Nothing);
        }
        assert_eq!(pace.sem.available_permits(), 8);
        // Never below the floor, never above the ceiling.
        for _ in 0..3 {
            tokio::time::sleep(MIN_CUT_INTERVAL).await;
            pace.acquire().await.finish(Signal::Throttled);
        }
        assert_eq!(pace.limit(), FLOOR);
        assert_eq!(Pace::new(2).limit(), 2);
        let small = Pace::new(2);
        small.acquire().await.finish(Signal::Throttled);
        assert_eq!(small.limit(), 2);
    }
}
