//! Store paths: `<store dir>/<32 nix32 chars>-<name>`.
//!
//! A [`StorePath`] is validated in its constructors only, so the rest of the crate never
//! re-checks one. It holds the base name parts; the store directory is kept apart in
//! [`StoreDir`] because a cache records absolute paths for one store directory.

use std::fmt;

use thiserror::Error;

use super::nix32;

/// Longest name Nix accepts (`Store::MaxPathLen` minus the hash and dash).
pub const MAX_NAME_LEN: usize = 211;
/// Length of the nix32 hash part of a store path.
pub const HASH_LEN: usize = 32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StorePathError {
    #[error("'{0}' is not in the Nix store {1} (expected {1}/<hash>-<name>)")]
    NotInStore(String, String),
    #[error("'{0}' is not a store path base name (expected <32-char hash>-<name>)")]
    Malformed(String),
    #[error("'{0}' has an invalid hash part: {1}")]
    BadHash(String, nix32::Nix32Error),
    #[error("'{path}' has an invalid name: {why}")]
    BadName { path: String, why: &'static str },
}

/// The store directory, without a trailing slash (`/nix/store` by default).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl Default for StoreDir {
    fn default() -> Self {
        StoreDir("/nix/store".to_owned())
    }
}

impl StoreDir {
    /// A store directory must be absolute; trailing slashes are dropped.
    pub fn new(dir: &str) -> Result<Self, StorePathError> {
        let trimmed = dir.trim_end_matches('/');
        if !trimmed.starts_with('/') || trimmed.is_empty() {
            return Err(StorePathError::NotInStore(
                dir.to_owned(),
                "an absolute directory".into(),
            ));
        }
        Ok(StoreDir(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses an absolute store path such as `/nix/store/<hash>-<name>`.
    pub fn parse_path(&self, abs: &str) -> Result<StorePath, StorePathError> {
        let base = abs
            .strip_prefix(self.0.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|b| !b.contains('/'))
            .ok_or_else(|| StorePathError::NotInStore(abs.to_owned(), self.0.clone()))?;
        StorePath::from_base_name(base)
    }

    /// The absolute path of `p` in this store.
    pub fn display(&self, p: &StorePath) -> String {
        format!("{}/{}", self.0, p)
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated store path, independent of the store directory.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath {
    // Kept as text: it is what every format prints, and the digest is only ever compared.
    hash: String,
    name: String,
}

impl StorePath {
    /// Parses `<hash>-<name>`.
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        let (hash, name) = base
            .split_at_checked(HASH_LEN)
            .filter(|(_, rest)| rest.starts_with('-'))
            .map(|(h, rest)| (h, &rest[1..]))
            .ok_or_else(|| StorePathError::Malformed(base.to_owned()))?;
        nix32::decode_exact::<20>(hash).map_err(|e| StorePathError::BadHash(base.to_owned(), e))?;
        validate_name(name).map_err(|why| StorePathError::BadName {
            path: base.to_owned(),
            why,
        })?;
        Ok(StorePath {
            hash: hash.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The 32-character nix32 hash part, which names the `.narinfo`.
    pub fn hash_part(&self) -> &str {
        &self.hash
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Nix's rules for the name part of a store path.
fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("the name is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("the name is longer than 211 characters");
    }
    if name == "." || name == ".." {
        return Err("the name may not be '.' or '..'");
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
    {
        return Err("the name may only contain A-Z a-z 0-9 + - . _ ? =");
    }
    Ok(())
}

/// True when `s` is a well-formed store-path hash part (used to vet URL paths).
pub fn is_hash_part(s: &str) -> bool {
    s.len() == HASH_LEN && nix32::is_nix32(s)
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.hash, self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "h7jx3wrzn6m9vjl9604id854qx1xyqw6-dep-1.0_x+y?=z";

    #[test]
    fn parses_and_prints() {
        let p = StorePath::from_base_name(GOOD).unwrap();
        assert_eq!(p.hash_part(), "h7jx3wrzn6m9vjl9604id854qx1xyqw6");
        assert_eq!(p.name(), "dep-1.0_x+y?=z");
        assert_eq!(p.to_string(), GOOD);
        let dir = StoreDir::default();
        let abs = dir.display(&p);
        assert_eq!(dir.parse_path(&abs).unwrap(), p);
    }

    #[test]
    fn rejects_bad_paths() {
        let dir = StoreDir::default();
        assert!(matches!(
            dir.parse_path("/tmp/h7jx3wrzn6m9vjl9604id854qx1xyqw6-dep"),
            Err(StorePathError::NotInStore(..))
        ));
        assert!(matches!(
            dir.parse_path(&format!("/nix/store/{GOOD}/bin")),
            Err(StorePathError::NotInStore(..))
        ));
        for (base, want) in [
            ("h7jx3wrzn6m9vjl9604id854qx1xyqw6", "malformed"),
            ("h7jx3wrzn6m9vjl9604id854qx1xyqw6-", "name"),
            ("e7jx3wrzn6m9vjl9604id854qx1xyqw6-x", "hash"),
            ("h7jx3wrzn6m9vjl9604id854qx1xyqw6-a b", "name"),
            ("h7jx3wrzn6m9vjl9604id854qx1xyqw6-..", "name"),
            ("h7jx3wrzn6m9vjl9604id854qx1xyqw6-é", "name"),
        ] {
            let err = StorePath::from_base_name(base).unwrap_err();
            let kind = match err {
                StorePathError::Malformed(_) => "malformed",
                StorePathError::BadHash(..) => "hash",
                StorePathError::BadName { .. } => "name",
                StorePathError::NotInStore(..) => "store",
            };
            assert_eq!(kind, want, "{base}");
        }
        let long = format!("h7jx3wrzn6m9vjl9604id854qx1xyqw6-{}", "a".repeat(212));
        assert!(StorePath::from_base_name(&long).is_err());
        let ok = format!("h7jx3wrzn6m9vjl9604id854qx1xyqw6-{}", "a".repeat(211));
        assert!(StorePath::from_base_name(&ok).is_ok());
    }
}
