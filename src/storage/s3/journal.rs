//! Multipart uploads that outlive their process: a small journal per upload in the user's
//! cache directory, so that a push killed mid-NAR (SIGKILL, OOM, a lost runner) and run
//! again resumes the upload instead of sending every part again.
//!
//! One file per (target, object key) — the key is named by NarHash and compression, so the
//! same NAR to the same cache finds it — holding the upload id, the part size, and for each
//! part the server confirmed: its number, length, CRC-32 and ETag. A re-run asks the server
//! which parts it has (ListParts) and skips a part only when the server has it with the
//! journal's length and ETag *and* the bytes produced now have the journal's length and
//! CRC-32; anything else is sent again. A journal that does not match the server (the
//! upload was completed, aborted by gc, or belongs to other bytes) is discarded, never
//! trusted. The journal is an optimisation: failing to read or write it only costs a
//! resend.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::Digest;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JournalPart {
    pub n: i32,
    pub size: u64,
    pub crc32: u32,
    pub etag: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub target: String,
    pub key: String,
    pub upload_id: String,
    pub part_size: usize,
    /// Seconds since the epoch when the upload was created.
    pub started: i64,
    /// The push that owns the upload while it runs: a journal whose process is alive on
    /// this host belongs to a push in progress, whose upload must not be taken over.
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub pid: u32,
    pub parts: Vec<JournalPart>,
}

impl Entry {
    /// Whether the push that wrote this journal is still running (here).
    pub fn owner_alive(&self) -> bool {
        self.pid != std::process::id()
            && self.host == crate::host::host_name()
            && crate::host::process_alive(self.pid)
    }
}

/// Where the journals of one target live, and how old one may be and still be resumed.
#[derive(Clone, Debug)]
pub struct Journal {
    pub dir: PathBuf,
    pub max_age: Duration,
}

pub use crate::host::now;

/// The checksum a part is recognised by (with its length): cheap enough for every part
/// of every large NAR, where a SHA-256 would cost a second of CPU per GiB.
pub fn part_crc(body: &[u8]) -> u32 {
    crc32fast::hash(body)
}

impl Journal {
    /// The default place: `$XDG_CACHE_HOME/cachepush/uploads`, else `~/.cache/...`.
    pub fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| PathBuf::from(h).join(".cache"))
            })?;
        Some(base.join("cachepush").join("uploads"))
    }

    fn file(&self, target: &str, key: &str) -> PathBuf {
        let mut h = sha2::Sha256::new();
        h.update(target.as_bytes());
        h.update([0]);
        h.update(key.as_bytes());
        let d = h.finalize();
        let name: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{name}.json"))
    }

    /// The journal of an upload of `key` to `target`, if one is there, readable, for
    /// exactly this target and key, and young enough.
    pub fn load(&self, target: &str, key: &str) -> Option<Entry> {
        let path = self.file(target, key);
        let text = std::fs::read(&path).ok()?;
        let e: Entry = match serde_json::from_slice(&text) {
            Ok(e) => e,
            Err(_) => {
                let _ = std::fs::remove_file(&path);
                return None;
            }
        };
        let fresh = now().saturating_sub(e.started) <= self.max_age.as_secs() as i64;
        if e.target != target || e.key != key || !fresh {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        Some(e)
    }

    /// Writes the entry whole (a temporary file renamed over the old), so a kill never
    /// leaves half a journal.
    pub fn save(&self, e: &Entry) {
        let path = self.file(&e.target, &e.key);
        let Ok(text) = serde_json::to_vec(e) else {
            return;
        };
        let _ = std::fs::create_dir_all(&self.dir);
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    pub fn remove(&self, target: &str, key: &str) {
        let _ = std::fs::remove_file(self.file(target, key));
    }
}

/// The parts of a journal that the server still has as the journal says (same length,
/// same ETag when both know it): number → journal part.
pub fn confirmed(
    entry: &Entry,
    server: &HashMap<i32, (u64, Option<String>)>,
) -> HashMap<i32, JournalPart> {
    entry
        .parts
        .iter()
        .filter(|p| {
            server.get(&p.n).is_some_and(|(size, etag)| {
                *size == p.size
                    && match (etag, &p.etag) {
                        (Some(a), Some(b)) => a.trim_matches('"') == b.trim_matches('"'),
                        _ => true,
                    }
            })
        })
        .map(|p| (p.n, p.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn journal(dir: &Path, max_age: u64) -> Journal {
        Journal {
            dir: dir.to_owned(),
            max_age: Duration::from_secs(max_age),
        }
    }

    fn entry(started: i64) -> Entry {
        Entry {
            target: "s3://b at http://x".into(),
            key: "nar/abc.nar.zst".into(),
            upload_id: "up-1".into(),
            part_size: 5 << 20,
            started,
            host: crate::host::host_name(),
            pid: 1,
            parts: vec![
                JournalPart {
                    n: 1,
                    size: 5,
                    crc32: part_crc(b"hello"),
                    etag: Some("\"e1\"".into()),
                },
                JournalPart {
                    n: 2,
                    size: 5,
                    crc32: part_crc(b"world"),
                    etag: Some("\"e2\"".into()),
                },
                JournalPart {
                    n: 3,
                    size: 3,
                    crc32: 7,
                    etag: None,
                },
            ],
        }
    }

    #[test]
    fn a_journal_is_found_only_for_its_target_and_key_and_while_fresh() {
        let tmp = tempfile::tempdir().unwrap();
        let j = journal(tmp.path(), 3600);
        let e = entry(now());
        j.save(&e);
        let back = j.load(&e.target, &e.key).unwrap();
        assert_eq!(back.parts, e.parts);
        assert!(j.load("s3://other", &e.key).is_none());
        assert!(j.load(&e.target, "nar/other.nar.zst").is_none());
        // Too old: discarded, and gone from disk.
        j.save(&entry(now() - 7200));
        assert!(j.load(&e.target, &e.key).is_none());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        // Garbage: discarded.
        j.save(&e);
        let f = std::fs::read_dir(tmp.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        std::fs::write(f.path(), b"{not json").unwrap();
        assert!(j.load(&e.target, &e.key).is_none());
        j.save(&e);
        j.remove(&e.target, &e.key);
        assert!(j.load(&e.target, &e.key).is_none());
    }

    #[test]
    fn a_journal_of_a_running_push_is_not_taken_over() {
        // pid 1 is always alive; our own pid is not "another push"; a pid on another
        // host says nothing about this one.
        let mut e = entry(now());
        assert!(e.owner_alive());
        e.pid = std::process::id();
        assert!(!e.owner_alive());
        e.pid = 1;
        e.host = "elsewhere.example".into();
        assert!(!e.owner_alive());
    }

    #[test]
    fn only_parts_the_server_has_as_journaled_are_confirmed() {
        let e = entry(now());
        let server: HashMap<i32, (u64, Option<String>)> = [
            (1, (5, Some("e1".into()))),        // same (quotes aside)
            (2, (5, Some("\"other\"".into()))), // another ETag: other bytes
            (3, (3, None)),                     // no ETag to compare: length decides
            (4, (5, Some("e4".into()))),        // not in the journal
        ]
        .into();
        let c = confirmed(&e, &server);
        let mut n: Vec<i32> = c.keys().copied().collect();
        n.sort();
        assert_eq!(n, vec![1, 3]);
        let short: HashMap<i32, (u64, Option<String>)> = [(1, (4, Some("e1".into())))].into();
        assert!(confirmed(&e, &short).is_empty());
    }
}
