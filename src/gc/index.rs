//! One look at the whole cache: every object listed (in parallel across key ranges), each
//! narinfo known through gc's index, and the records and pins gc reads.
//!
//! The index (`cachepush/gc-index.json.zst`) holds what gc needs of each narinfo
//! (references, NAR key, sizes, deriver, when it was last pushed or read) under the
//! narinfo's ETag. A narinfo whose listed ETag matches its entry is not read again; any
//! other (new, rewritten, or written by another tool) is read, so a cache written by
//! `nix copy` or anyone else works from the first run, and a stale or lost index only
//! costs requests.

use std::collections::HashMap;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::pins::Pin;
use super::records::{PushRecord, ReadRecord, read_json};
use crate::format::layout::{self, content_type};
use crate::format::nix32::ALPHABET;
use crate::format::store_path::is_hash_part;
use crate::format::{NarInfo, StorePath};
use crate::storage::{ObjectMeta, Storage, StorageError};

/// The largest narinfo gc reads (Nix's own are a few hundred bytes to a few KiB).
const NARINFO_LIMIT: u64 = 1 << 20;
/// The largest index gc reads back.
const INDEX_LIMIT: u64 = 1 << 30;
/// Requests in flight while listing and reading.
const PARALLEL: usize = 16;

/// What gc knows of one narinfo.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub etag: String,
    /// The narinfo's Last-Modified (a push re-writes it).
    pub modified: i64,
    /// The narinfo object's own size.
    pub size: u64,
    /// The store path's name (after the hash), for what gc prints.
    pub name: String,
    /// The NAR's key (`URL:`), when the narinfo names one.
    pub nar: Option<String>,
    pub nar_size: u64,
    pub file_size: u64,
    pub compression: String,
    /// Hash parts of the references, itself left out.
    pub refs: Vec<String>,
    /// The deriver's base name (`…-x.drv`), whose `log/` object belongs with it.
    pub deriver: Option<String>,
    /// The last push record naming it (seconds since the epoch; 0 for none).
    #[serde(default)]
    pub pushed: i64,
    /// The last read record naming it.
    #[serde(default)]
    pub read: i64,
    /// Why it did not parse; such a narinfo is kept, with whatever it names.
    #[serde(default)]
    pub broken: Option<String>,
}

impl Entry {
    /// When it was last written or pushed.
    pub fn touched(&self) -> i64 {
        self.modified.max(self.pushed)
    }

    fn from_narinfo(meta: &ObjectMeta, text: &[u8]) -> Entry {
        let hash = layout::narinfo_hash(&meta.key).unwrap_or_default();
        let text = String::from_utf8_lossy(text);
        let mut e = Entry {
            etag: meta.etag.clone(),
            modified: meta.modified,
            size: meta.size,
            name: String::new(),
            nar: None,
            nar_size: 0,
            file_size: 0,
            compression: String::new(),
            refs: Vec::new(),
            deriver: None,
            pushed: 0,
            read: 0,
            broken: None,
        };
        match NarInfo::parse(&text) {
            Ok(ni) => {
                e.name = ni.store_path.name().to_owned();
                e.nar = Some(ni.url.clone());
                e.nar_size = ni.nar_size;
                e.file_size = ni.file_size.unwrap_or(0);
                e.compression = ni.compression.clone();
                e.refs = ni
                    .references
                    .iter()
                    .map(StorePath::hash_part)
                    .filter(|h| *h != hash)
                    .map(str::to_owned)
                    .collect();
                e.deriver = ni.deriver.as_ref().map(ToString::to_string);
            }
            Err(err) => {
                // Kept, and so is whatever it can be seen to name.
                e.broken = Some(err.to_string());
                for line in text.lines() {
                    if let Some(url) = line.strip_prefix("URL: ") {
                        e.nar = Some(url.trim().to_owned());
                    } else if let Some(refs) = line.strip_prefix("References: ") {
                        e.refs = refs
                            .split_whitespace()
                            .filter_map(|r| r.get(..32))
                            .filter(|h| is_hash_part(h) && *h != hash)
                            .map(str::to_owned)
                            .collect();
                    }
                }
            }
        }
        e
    }
}

/// The index as stored.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Index {
    pub version: u32,
    /// By hash part.
    pub entries: HashMap<String, Entry>,
}

const INDEX_VERSION: u32 = 1;

impl Index {
    /// The stored index; an empty one when there is none or it cannot be read (a note
    /// says so), since the index only saves requests.
    pub async fn load<S: Storage>(
        storage: &S,
        notes: &mut Vec<String>,
    ) -> Result<Index, StorageError> {
        let Some(bytes) = storage.get_limited(layout::GC_INDEX, INDEX_LIMIT).await? else {
            return Ok(Index::default());
        };
        // Decoded as it decompresses: the JSON text is never whole in memory.
        let decoded = zstd::Decoder::new(&bytes[..])
            .map_err(|e| e.to_string())
            .and_then(|d| serde_json::from_reader::<_, Index>(d).map_err(|e| e.to_string()));
        match decoded {
            Ok(i) if i.version == INDEX_VERSION => Ok(i),
            Ok(i) => {
                notes.push(format!(
                    "{} is version {}, not {INDEX_VERSION}: every narinfo is read again",
                    layout::GC_INDEX,
                    i.version
                ));
                Ok(Index::default())
            }
            Err(e) => {
                notes.push(format!(
                    "{} is unreadable ({e}): every narinfo is read again",
                    layout::GC_INDEX
                ));
                Ok(Index::default())
            }
        }
    }
}

/// The index as written: the catalog's entries by reference, less those deleted.
#[derive(Serialize)]
struct IndexView<'a> {
    version: u32,
    entries: std::collections::BTreeMap<&'a str, &'a Entry>,
}

/// A record as listed, and what it says when it could be read.
pub struct Listed<T> {
    pub meta: ObjectMeta,
    pub record: Option<T>,
}

/// Everything gc and stats look at.
#[derive(Default)]
pub struct Catalog {
    /// Narinfos by hash part.
    pub narinfos: HashMap<String, Entry>,
    pub nars: Vec<ObjectMeta>,
    /// `<hash>.ls` objects.
    pub listings: Vec<ObjectMeta>,
    pub logs: Vec<ObjectMeta>,
    pub pushes: Vec<Listed<PushRecord>>,
    pub reads: Vec<Listed<ReadRecord>>,
    pub pins: Vec<Pin>,
    /// Narinfos read this run (the rest came from the index).
    pub fetched: usize,
    /// Things that could not be read, each said once.
    pub notes: Vec<String>,
}

impl Catalog {
    /// Lists the cache and brings the index up to date (reading only the narinfos it does
    /// not know by ETag), then folds the push and read records into it.
    pub async fn scan<S: Storage>(storage: &S) -> Result<Catalog, StorageError> {
        let mut cat = Catalog::default();
        let mut index = Index::load(storage, &mut cat.notes).await?;
        // Every narinfo and NAR key starts with a nix32 character: one listing per
        // character and folder, many at once.
        // The push records first: a record already released now belongs to a push whose
        // narinfos and pin are all written, so the listings below include them; a record
        // that appears later belongs to a push this run must protect (see gc::Leases).
        // Read at once, too: a record read as released must have been released before the
        // listings below began.
        let push_metas = storage.list_meta(layout::PUSHES_DIR, true).await?;
        cat.pushes = read_records(storage, push_metas, &mut cat.notes).await?;
        let mut prefixes: Vec<(String, bool)> = Vec::new();
        for c in ALPHABET.iter().map(|&b| b as char) {
            prefixes.push((c.to_string(), true));
            prefixes.push((format!("{}{c}", layout::NAR_DIR), false));
        }
        for dir in [
            "log/",
            layout::PUSHES_DIR,
            layout::READS_DIR,
            layout::PINS_DIR,
        ] {
            prefixes.push((dir.to_owned(), false));
        }
        let listed: Vec<Vec<ObjectMeta>> = futures::stream::iter(prefixes)
            .map(|(p, shallow)| async move { storage.list_meta(&p, shallow).await })
            .buffered(PARALLEL)
            .try_collect()
            .await?;
        let mut narinfo_metas = Vec::new();
        let (mut read_metas, mut pin_metas) = (Vec::new(), Vec::new());
        for m in listed.into_iter().flatten() {
            let k = m.key.as_str();
            if k.starts_with(layout::NAR_DIR) {
                cat.nars.push(m);
            } else if k.starts_with("log/") {
                cat.logs.push(m);
            } else if k.starts_with(layout::READS_DIR) {
                read_metas.push(m);
            } else if k.starts_with(layout::PINS_DIR) {
                pin_metas.push(m);
            } else if layout::narinfo_hash(k).is_some_and(is_hash_part) {
                narinfo_metas.push(m);
            } else if k
                .strip_suffix(".ls")
                .is_some_and(|h| !h.contains('/') && is_hash_part(h))
            {
                cat.listings.push(m);
            }
        }

        // Narinfos: from the index when the ETag matches, read otherwise.
        let mut to_read = Vec::new();
        for m in narinfo_metas {
            let hash = layout::narinfo_hash(&m.key).unwrap_or_default().to_owned();
            match index.entries.remove(&hash) {
                Some(mut e) if e.etag == m.etag && !m.etag.is_empty() => {
                    // The same bytes written again (a re-stamp) keep their ETag but not
                    // their date.
                    e.modified = m.modified;
                    cat.narinfos.insert(hash, e);
                }
                old => to_read.push((hash, m, old)),
            }
        }
        cat.fetched = to_read.len();
        let read: Vec<Option<(String, Entry)>> = futures::stream::iter(to_read)
            .map(|(hash, m, old)| async move {
                let Some(text) = storage.get_limited(&m.key, NARINFO_LIMIT).await? else {
                    // Deleted since the listing.
                    return Ok::<_, StorageError>(None);
                };
                let mut e = Entry::from_narinfo(&m, &text);
                if let Some(old) = old {
                    e.pushed = old.pushed;
                    e.read = old.read;
                }
                Ok(Some((hash, e)))
            })
            .buffer_unordered(PARALLEL * 2)
            .try_collect()
            .await?;
        cat.narinfos.extend(read.into_iter().flatten());

        cat.reads = read_records(storage, read_metas, &mut cat.notes).await?;
        for l in read_records::<S, Pin>(storage, pin_metas, &mut cat.notes).await? {
            if let Some(p) = l.record {
                cat.pins.push(p);
            }
        }
        cat.fold_records();
        Ok(cat)
    }

    /// Push and read records into the entries' `pushed` and `read` dates.
    fn fold_records(&mut self) {
        for r in self.pushes.iter().filter_map(|l| l.record.as_ref()) {
            for h in &r.paths {
                if let Some(e) = self.narinfos.get_mut(h) {
                    e.pushed = e.pushed.max(r.started);
                }
            }
        }
        for r in self.reads.iter().filter_map(|l| l.record.as_ref()) {
            for h in &r.paths {
                if let Some(e) = self.narinfos.get_mut(h) {
                    e.read = e.read.max(r.at);
                }
            }
        }
    }

    /// Writes the index of the narinfos that remain, once `deleted` are gone, compressed
    /// as it is serialised (no copy of the entries, no whole JSON text in memory).
    pub async fn save_index<S: Storage>(
        &self,
        storage: &S,
        deleted: &std::collections::HashSet<String>,
    ) -> Result<(), StorageError> {
        let view = IndexView {
            version: INDEX_VERSION,
            entries: self
                .narinfos
                .iter()
                .filter(|(h, _)| !deleted.contains(*h))
                .map(|(h, e)| (h.as_str(), e))
                .collect(),
        };
        let io = |e: std::io::Error| StorageError::Io {
            op: "compress",
            key: layout::GC_INDEX.to_owned(),
            source: e,
        };
        let mut enc = zstd::Encoder::new(Vec::new(), 3).map_err(io)?;
        serde_json::to_writer(&mut enc, &view).map_err(|e| io(std::io::Error::other(e)))?;
        let body = enc.finish().map_err(io)?;
        storage
            .put(layout::GC_INDEX, content_type::ZSTD, Bytes::from(body))
            .await
    }
}

/// Reads the JSON records listed in `metas`; one that cannot be read is noted and listed
/// with no record (gc then leaves it alone).
pub async fn read_records<S: Storage, T: for<'de> Deserialize<'de> + Send>(
    storage: &S,
    metas: Vec<ObjectMeta>,
    notes: &mut Vec<String>,
) -> Result<Vec<Listed<T>>, StorageError> {
    let got: Vec<(ObjectMeta, Result<Option<T>, super::records::RecordError>)> =
        futures::stream::iter(metas)
            .map(|meta| async move {
                let r = read_json::<S, T>(storage, &meta.key).await;
                (meta, r)
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
    let mut out = Vec::with_capacity(got.len());
    for (meta, r) in got {
        match r {
            Ok(Some(record)) => out.push(Listed {
                meta,
                record: Some(record),
            }),
            // Gone since the listing: nothing to fold, nothing to delete.
            Ok(None) => {}
            Err(super::records::RecordError::Storage(e)) => return Err(e),
            Err(e) => {
                notes.push(e.to_string());
                out.push(Listed { meta, record: None });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &str) -> ObjectMeta {
        ObjectMeta {
            key: key.into(),
            size: 10,
            modified: 5,
            etag: "e".into(),
        }
    }

    #[test]
    fn entries_keep_what_a_narinfo_names_even_when_it_does_not_parse() {
        let h = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a";
        let r = "1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b";
        let good = format!(
            "StorePath: /nix/store/{h}-x\nURL: nar/abc.nar.zst\nCompression: zstd\n\
             NarHash: sha256:{}\nNarSize: 7\nReferences: {h}-x {r}-y\nDeriver: {r}-x.drv\n",
            "0".repeat(52)
        );
        let e = Entry::from_narinfo(&meta(&format!("{h}.narinfo")), good.as_bytes());
        assert_eq!(e.broken, None);
        assert_eq!(e.refs, vec![r.to_owned()]);
        assert_eq!(e.nar.as_deref(), Some("nar/abc.nar.zst"));
        assert_eq!(e.deriver.as_deref(), Some(&*format!("{r}-x.drv")));
        assert_eq!(e.name, "x");
        let bad = format!("URL: nar/q.nar\nReferences: {r}-y junk\nNarSize: many\n");
        let e = Entry::from_narinfo(&meta(&format!("{h}.narinfo")), bad.as_bytes());
        assert!(e.broken.is_some());
        assert_eq!(e.refs, vec![r.to_owned()]);
        assert_eq!(e.nar.as_deref(), Some("nar/q.nar"));
    }
}
