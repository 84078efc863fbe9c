//! `cachepush stats`: what the cache holds, by age, pin and compression, and what a gc
//! with given options would free, from one scan (the same index gc keeps).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::index::Catalog;
use super::{GcError, GcOptions, GcReport, run_with};
use crate::storage::{Storage, StorageError};

/// Store paths and their bytes.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Amount {
    pub paths: u64,
    /// Uncompressed NAR bytes.
    pub nar_bytes: u64,
    /// Bytes stored (compressed NARs).
    pub file_bytes: u64,
}

impl Amount {
    fn add(&mut self, nar: u64, file: u64) {
        self.paths += 1;
        self.nar_bytes += nar;
        self.file_bytes += file;
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Stats {
    pub total: Amount,
    /// By when each path was last written or pushed: `<1d`, `1-7d`, `7-30d`, `30-90d`, `>90d`.
    pub by_age: BTreeMap<String, Amount>,
    /// Each pin's whole closure (paths shared between pins count in each).
    pub by_pin: BTreeMap<String, Amount>,
    pub by_compression: BTreeMap<String, Amount>,
    pub unreadable_narinfos: u64,
    /// NARs no narinfo names.
    pub orphaned_nars: u64,
    pub orphaned_nar_bytes: u64,
    /// `None` when the server cannot list them.
    pub open_uploads: Option<u64>,
    /// What `cachepush gc` with the given options would do.
    pub gc: GcReport,
}

const AGES: [(i64, &str); 4] = [(1, "<1d"), (7, "1-7d"), (30, "7-30d"), (90, "30-90d")];

fn age_bucket(age_secs: i64) -> &'static str {
    AGES.iter()
        .find(|(days, _)| age_secs < days * 86_400)
        .map_or(">90d", |(_, name)| name)
}

pub async fn stats<S: Storage>(
    storage: &S,
    opts: &GcOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Stats, GcError> {
    progress("listing the cache");
    let cat = Catalog::scan(storage).await?;
    let at = super::records::now();
    let mut s = summarize(&cat, at);
    s.open_uploads = match storage.open_uploads().await {
        Ok(v) => Some(v.len() as u64),
        Err(StorageError::Unsupported { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let dry = GcOptions {
        dry_run: true,
        ..opts.clone()
    };
    progress("working out what gc would free");
    s.gc = run_with(storage, &cat, &dry, &mut |_| {}, at).await?;
    s.gc.would_delete.clear();
    Ok(s)
}

/// The counts of [`Stats`] that come from the catalog alone.
pub fn summarize(cat: &Catalog, at: i64) -> Stats {
    let mut s = Stats::default();
    let sizes: HashMap<&str, u64> = cat.nars.iter().map(|m| (m.key.as_str(), m.size)).collect();
    let file_of = |e: &super::index::Entry| {
        e.nar
            .as_deref()
            .and_then(|k| sizes.get(k).copied())
            .unwrap_or(e.file_size)
    };
    for e in cat.narinfos.values() {
        let file = file_of(e);
        s.total.add(e.nar_size, file);
        s.by_age
            .entry(age_bucket(at - e.touched()).to_owned())
            .or_default()
            .add(e.nar_size, file);
        let comp = if e.compression.is_empty() {
            "unknown"
        } else {
            &e.compression
        };
        s.by_compression
            .entry(comp.to_owned())
            .or_default()
            .add(e.nar_size, file);
        if e.broken.is_some() {
            s.unreadable_narinfos += 1;
        }
    }
    for pin in &cat.pins {
        let mut seen: HashSet<&str> = HashSet::new();
        let mut stack: Vec<&str> = pin.hash_parts().collect();
        let mut amount = Amount::default();
        while let Some(h) = stack.pop() {
            if !seen.insert(h) {
                continue;
            }
            if let Some(e) = cat.narinfos.get(h) {
                amount.add(e.nar_size, file_of(e));
                stack.extend(e.refs.iter().map(String::as_str));
            }
        }
        s.by_pin.insert(pin.name.clone(), amount);
    }
    let named: HashSet<&str> = cat
        .narinfos
        .values()
        .filter_map(|e| e.nar.as_deref())
        .collect();
    for m in &cat.nars {
        if !named.contains(m.key.as_str()) {
            s.orphaned_nars += 1;
            s.orphaned_nar_bytes += m.size;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn ages_fall_in_buckets() {
        let d = 86_400;
        assert_eq!(super::age_bucket(0), "<1d");
        assert_eq!(super::age_bucket(d), "1-7d");
        assert_eq!(super::age_bucket(29 * d), "7-30d");
        assert_eq!(super::age_bucket(89 * d), "30-90d");
        assert_eq!(super::age_bucket(400 * d), ">90d");
    }
}
