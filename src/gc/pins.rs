//! Pins: named sets of store paths gc keeps with their closures, one object per name
//! (`cachepush/pins/NAME.json`), each keeping its last few revisions. A pin is written
//! whole with one PUT, so a reader sees the old revision list or the new one; two `pin add`
//! of the same name at the same moment keep the last writer's list.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::records::{RecordError, now, read_json, write_json};
use crate::format::layout;
use crate::format::store_path::is_hash_part;
use crate::format::{NarInfo, StorePath};
use crate::storage::{Storage, StorageError};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pin {
    pub version: u32,
    pub name: String,
    /// Oldest first; at most `keep` of them.
    pub revisions: Vec<Revision>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revision {
    pub added: i64,
    /// Store paths as the narinfos give them (`/nix/store/<hash>-<name>`).
    pub paths: Vec<String>,
}

impl Pin {
    /// Hash parts of every path in every revision.
    pub fn hash_parts(&self) -> impl Iterator<Item = &str> {
        self.revisions
            .iter()
            .flat_map(|r| r.paths.iter())
            .filter_map(|p| hash_of(p))
    }
}

/// The hash part of `/nix/store/<hash>-<name>` (any store directory).
fn hash_of(path: &str) -> Option<&str> {
    let base = path.rsplit('/').next()?;
    base.get(..32).filter(|h| is_hash_part(h))
}

#[derive(Debug, Error)]
pub enum PinError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(
        "pin name {0:?}: use letters, digits, '.', '_' and '-' (up to 100), starting with a letter or digit"
    )]
    BadName(String),
    #[error("{0:?} is not a store path, a hash part or a <hash>.narinfo")]
    BadPath(String),
    #[error("{path} is not in {target}: push it first, then pin it")]
    NotInCache { path: String, target: String },
    #[error("there is no pin named {name:?} in {target}")]
    NoSuchPin { name: String, target: String },
}

pub fn check_name(name: &str) -> Result<(), PinError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(PinError::BadName(name.to_owned()))
    }
}

/// The hash part a `pin add` argument names: a store path, a hash part, or a narinfo key.
fn argument_hash(arg: &str) -> Result<&str, PinError> {
    let bad = || PinError::BadPath(arg.to_owned());
    if arg.starts_with('/') {
        let base = arg
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .ok_or_else(bad)?;
        let p = StorePath::from_base_name(base).map_err(|_| bad())?;
        let h = p.hash_part();
        return base.get(..h.len()).ok_or_else(bad);
    }
    let h = arg.strip_suffix(".narinfo").unwrap_or(arg);
    if is_hash_part(h) { Ok(h) } else { Err(bad()) }
}

/// Adds a revision of `name` holding `paths`, keeping the last `keep` revisions. Every
/// path must already be in the cache (its narinfo is read for its full store path).
pub async fn add<S: Storage>(
    storage: &S,
    name: &str,
    paths: &[String],
    keep: usize,
) -> Result<Pin, PinError> {
    check_name(name)?;
    let mut full = Vec::with_capacity(paths.len());
    for arg in paths {
        let hash = argument_hash(arg)?;
        let key = layout::narinfo_key(hash);
        let not_in = || PinError::NotInCache {
            path: arg.clone(),
            target: storage.describe(),
        };
        let text = storage
            .get_limited(&key, 1 << 20)
            .await?
            .ok_or_else(not_in)?;
        // A narinfo another tool wrote that does not parse still names its path.
        let text = String::from_utf8_lossy(&text);
        let path = match NarInfo::parse(&text) {
            Ok(ni) => ni.store_dir.display(&ni.store_path),
            Err(_) => text
                .lines()
                .find_map(|l| l.strip_prefix("StorePath: "))
                .map(str::to_owned)
                .unwrap_or_else(|| arg.clone()),
        };
        full.push(path);
    }
    let key = layout::pin_key(name);
    let mut pin = read_json::<S, Pin>(storage, &key).await?.unwrap_or(Pin {
        version: 1,
        name: name.to_owned(),
        revisions: Vec::new(),
    });
    pin.revisions.push(Revision {
        added: now(),
        paths: full,
    });
    let keep = keep.max(1);
    if pin.revisions.len() > keep {
        let drop = pin.revisions.len() - keep;
        pin.revisions.drain(..drop);
    }
    write_json(storage, &key, &pin).await?;
    Ok(pin)
}

/// Every pin, by name.
pub async fn list<S: Storage>(storage: &S) -> Result<(Vec<Pin>, Vec<String>), PinError> {
    let metas = storage.list_meta(layout::PINS_DIR, true).await?;
    let mut notes = Vec::new();
    let listed = super::index::read_records::<S, Pin>(storage, metas, &mut notes).await?;
    let mut pins: Vec<Pin> = listed.into_iter().filter_map(|l| l.record).collect();
    pins.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((pins, notes))
}

pub async fn remove<S: Storage>(storage: &S, name: &str) -> Result<(), PinError> {
    check_name(name)?;
    let key = layout::pin_key(name);
    if storage.head(&key).await?.is_none() {
        return Err(PinError::NoSuchPin {
            name: name.to_owned(),
            target: storage.describe(),
        });
    }
    storage.delete(&key).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_arguments() {
        for ok in ["release", "main-2026.12", "a", "x_y"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "-x", "sp ace", &"n".repeat(101)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let h = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a";
        assert_eq!(argument_hash(&format!("/nix/store/{h}-hello")).unwrap(), h);
        assert_eq!(argument_hash(h).unwrap(), h);
        assert_eq!(argument_hash(&format!("{h}.narinfo")).unwrap(), h);
        assert!(argument_hash("/nix/store").is_err());
        assert!(argument_hash("hello").is_err());
        assert_eq!(hash_of(&format!("/nix/store/{h}-hello")), Some(h));
    }
}
