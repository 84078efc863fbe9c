//! A bounded in-memory cache of small objects (narinfos, `nix-cache-info`) with a TTL, and
//! a shorter TTL for "absent" so that a path pushed a moment ago shows up soon.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

pub struct SmallCache {
    inner: Mutex<Inner>,
    capacity: usize,
    ttl: Duration,
    negative_ttl: Duration,
}

struct Inner {
    map: HashMap<String, (Option<Bytes>, Instant)>,
    /// Insertion order, for evicting the oldest entry when full.
    order: VecDeque<String>,
}

/// What the cache knows about a key.
#[derive(Debug, PartialEq, Eq)]
pub enum Cached {
    Present(Bytes),
    Absent,
    Unknown,
}

impl SmallCache {
    pub fn new(capacity: usize, ttl: Duration, negative_ttl: Duration) -> Self {
        SmallCache {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            capacity,
            ttl,
            negative_ttl,
        }
    }

    pub fn get(&self, key: &str) -> Cached {
        let Ok(inner) = self.inner.lock() else {
            return Cached::Unknown;
        };
        match inner.map.get(key) {
            Some((v, at)) => {
                let ttl = if v.is_some() {
                    self.ttl
                } else {
                    self.negative_ttl
                };
                if at.elapsed() >= ttl {
                    Cached::Unknown
                } else {
                    match v {
                        Some(b) => Cached::Present(b.clone()),
                        None => Cached::Absent,
                    }
                }
            }
            None => Cached::Unknown,
        }
    }

    pub fn put(&self, key: &str, value: Option<Bytes>) {
        if self.capacity == 0 {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner
            .map
            .insert(key.to_owned(), (value, Instant::now()))
            .is_none()
        {
            inner.order.push_back(key.to_owned());
        }
        while inner.map.len() > self.capacity {
            match inner.order.pop_front() {
                Some(old) => {
                    inner.map.remove(&old);
                }
                None => break,
            }
        }
    }

    /// Drops what is remembered for `key` (it was just written).
    pub fn forget(&self, key: &str) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.map.remove(key);
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.map.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_expiring() {
        let c = SmallCache::new(2, Duration::from_secs(60), Duration::from_millis(0));
        c.put("a", Some(Bytes::from_static(b"1")));
        c.put("b", None);
        assert_eq!(c.get("a"), Cached::Present(Bytes::from_static(b"1")));
        // A negative TTL of zero means misses are never served from the cache.
        assert_eq!(c.get("b"), Cached::Unknown);
        c.put("c", Some(Bytes::from_static(b"3")));
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("a"), Cached::Unknown, "oldest evicted");
        assert_eq!(c.get("c"), Cached::Present(Bytes::from_static(b"3")));
    }
}
