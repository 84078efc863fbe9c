//! Reading the local Nix store: resolving user arguments to store paths and querying the
//! closure's metadata (NarHash, NarSize, references, deriver, signatures, CA).
//!
//! Metadata comes from one `nix path-info --json --recursive` call per batch of roots,
//! never one process per path. Going through `nix` means the same code works with a
//! nix-daemon (multi-user) and without one (single-user), whatever the database schema.
//! The JSON has changed shape across versions, and all of them are accepted:
//! - Nix ≤ 2.18 and Lix: an array of objects with a `path` field;
//! - Nix 2.19+: an object keyed by store path (`null` for an invalid path);
//! - newer Nix: `{"version": N, "info": {<path or base name>: {...}}}`, with hashes that
//!   may be objects `{"algorithm", "format", "hash"}` and references as base names.
//!
//! NAR contents are read in-process from the store directory (see `format::nar`).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;
use tokio::process::Command;

use crate::format::{Sha256, Signature, StoreDir, StorePath, StorePathError};

/// Most roots handed to one `nix path-info` call, to stay far below ARG_MAX.
const ROOTS_PER_CALL: usize = 512;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{0} does not exist")]
    Missing(PathBuf),
    #[error(
        "{0} looks like a flake reference or an attribute: cachepush takes store paths; build it first (nix build {0}) and pass ./result"
    )]
    FlakeRef(String),
    #[error("{arg} is inside the store path {path}: pass {path}")]
    InsideStorePath { arg: PathBuf, path: String },
    #[error(
        "{0} is a derivation, not a build output: build it (nix-store --realise {0}) and pass its outputs, e.g. ./result"
    )]
    Derivation(String),
    #[error(
        "{path} is not in the Nix store {store} (pass a store path, or a symlink to one such as ./result)"
    )]
    NotInStore { path: PathBuf, store: String },
    #[error(transparent)]
    BadPath(#[from] StorePathError),
    #[error(
        "{0} is not a valid path in the local Nix store (build or realise it first, e.g. nix-store --realise)"
    )]
    NotValid(String),
    #[error("could not run `{program}`: {source} (is Nix installed and on PATH?)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`nix path-info` failed ({status}): {stderr}")]
    NixFailed { status: String, stderr: String },
    #[error("unexpected output from `nix path-info --json`: {0}")]
    BadJson(String),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How flake references begin (a `#` anywhere also gives one away).
const FLAKE_SCHEMES: [&str; 7] = [
    "github:",
    "gitlab:",
    "sourcehut:",
    "path:",
    "flake:",
    "git+",
    "nixpkgs#",
];

/// What the local store knows about one valid path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub sigs: Vec<Signature>,
    pub ca: Option<String>,
}

/// The local Nix store, reached through the `nix` command and the store directory.
#[derive(Clone, Debug)]
pub struct LocalStore {
    store_dir: StoreDir,
    nix: PathBuf,
}

impl LocalStore {
    /// The store named by `NIX_STORE_DIR` (as Nix reads it), else `/nix/store`.
    pub fn from_env() -> Result<Self, StoreError> {
        let store_dir = match std::env::var("NIX_STORE_DIR") {
            Ok(d) if !d.is_empty() => StoreDir::new(&d)?,
            _ => StoreDir::default(),
        };
        Ok(LocalStore {
            store_dir,
            nix: PathBuf::from("nix"),
        })
    }

    /// A store whose files are under `store_dir` (tests build such stores by hand).
    pub fn with_store_dir(store_dir: StoreDir) -> Self {
        LocalStore {
            store_dir,
            nix: PathBuf::from("nix"),
        }
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// Where the files of `p` are on disk.
    pub fn real_path(&self, p: &StorePath) -> PathBuf {
        PathBuf::from(self.store_dir.display(p))
    }

    /// Resolves a user argument (a store path, a path inside one, or a chain of symlinks
    /// ending in the store such as `./result` or a profile) to its store path.
    pub fn resolve(&self, arg: &Path) -> Result<StorePath, StoreError> {
        let io = |source| StoreError::Io {
            path: arg.to_owned(),
            source,
        };
        let mut cur = std::path::absolute(arg).map_err(io)?;
        // Symlinks are followed one hop at a time, not canonicalised: a store path may be
        // a symlink itself, and it is that path, not its target, that must be pushed.
        for _ in 0..64 {
            if let Some(p) = self.store_path_prefix(&cur)? {
                if std::fs::symlink_metadata(self.real_path(&p)).is_err() {
                    return Err(StoreError::NotValid(self.store_dir.display(&p)));
                }
                if p.name().ends_with(".drv") {
                    return Err(StoreError::Derivation(self.store_dir.display(&p)));
                }
                return Ok(p);
            }
            let meta = std::fs::symlink_metadata(&cur).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    let text = arg.to_string_lossy();
                    if text.contains('#') || FLAKE_SCHEMES.iter().any(|s| text.starts_with(s)) {
                        StoreError::FlakeRef(text.into_owned())
                    } else {
                        StoreError::Missing(arg.to_owned())
                    }
                }
                _ => io(e),
            })?;
            if !meta.file_type().is_symlink() {
                // Not a link, and not in the store as written: it may still be inside a
                // store path through a link higher up (./result/bin/hello).
                if let Ok(real) = std::fs::canonicalize(arg)
                    && let Ok(Some(p)) = self.store_path_prefix(&real)
                {
                    return Err(StoreError::InsideStorePath {
                        arg: arg.to_owned(),
                        path: self.store_dir.display(&p),
                    });
                }
                break;
            }
            let target = std::fs::read_link(&cur).map_err(io)?;
            let parent = cur.parent().unwrap_or(Path::new("/")).to_owned();
            cur = normalise(&parent.join(target));
        }
        Err(StoreError::NotInStore {
            path: arg.to_owned(),
            store: self.store_dir.to_string(),
        })
    }

    /// `Some(store path)` when `abs` lies in the store directory.
    fn store_path_prefix(&self, abs: &Path) -> Result<Option<StorePath>, StoreError> {
        let Ok(rest) = abs.strip_prefix(self.store_dir.as_str()) else {
            return Ok(None);
        };
        let Some(first) = rest.components().next() else {
            return Ok(None);
        };
        let base = first.as_os_str().to_string_lossy();
        Ok(Some(StorePath::from_base_name(&base)?))
    }

    /// Metadata for `roots` and, with `closure`, everything they refer to, in an order
    /// where every path comes after its references.
    pub async fn query(
        &self,
        roots: &[StorePath],
        closure: bool,
    ) -> Result<Vec<PathInfo>, StoreError> {
        let mut all: BTreeMap<StorePath, PathInfo> = BTreeMap::new();
        for batch in roots.chunks(ROOTS_PER_CALL) {
            for info in self.path_info(batch, closure).await? {
                all.insert(info.path.clone(), info);
            }
        }
        for r in roots {
            if !all.contains_key(r) {
                return Err(StoreError::NotValid(self.store_dir.display(r)));
            }
        }
        Ok(topological(all))
    }

    /// Which of `candidates` are valid (registered, complete) store paths, asking
    /// `nix-store --check-validity` about 512 at a time (one command line for tens of
    /// thousands would fail with E2BIG). Paths still being built are not valid yet.
    pub async fn valid_of(&self, candidates: &[StorePath]) -> Result<Vec<StorePath>, StoreError> {
        let mut valid = Vec::with_capacity(candidates.len());
        for batch in candidates.chunks(512) {
            valid.extend(self.valid_of_batch(batch).await?);
        }
        Ok(valid)
    }

    /// The build log of derivation `drv` as Nix keeps it (`nix-store --read-log`, which
    /// also undoes its compression), or `None` when the store has none. Substituters are
    /// not asked: a log that is not local is not ours to publish.
    pub async fn read_log(&self, drv: &StorePath) -> Result<Option<Vec<u8>>, StoreError> {
        let program = "nix-store";
        let out = Command::new(program)
            .args(["--read-log", "--option", "substituters", ""])
            .arg(self.store_dir.display(drv))
            .env_remove("CACHEPUSH_SIGNING_KEY")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|source| StoreError::Spawn {
                program: program.into(),
                source,
            })?;
        if out.status.success() {
            return Ok(Some(out.stdout));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("not available") {
            return Ok(None);
        }
        Err(StoreError::NixFailed {
            status: out.status.to_string(),
            stderr: stderr.trim().to_owned(),
        })
    }

    async fn valid_of_batch(&self, candidates: &[StorePath]) -> Result<Vec<StorePath>, StoreError> {
        let program = "nix-store";
        let out = Command::new(program)
            .args(["--check-validity", "--print-invalid"])
            .args(candidates.iter().map(|p| self.store_dir.display(p)))
            .env_remove("CACHEPUSH_SIGNING_KEY")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|source| StoreError::Spawn {
                program: program.into(),
                source,
            })?;
        if !out.status.success() {
            return Err(StoreError::NixFailed {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        let invalid: std::collections::HashSet<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .collect();
        Ok(candidates
            .iter()
            .filter(|p| !invalid.contains(&self.store_dir.display(p)))
            .cloned()
            .collect())
    }

    async fn path_info(
        &self,
        batch: &[StorePath],
        closure: bool,
    ) -> Result<Vec<PathInfo>, StoreError> {
        let mut cmd = Command::new(&self.nix);
        // Nix needs no signing key; a process that has none cannot leak it.
        cmd.env_remove("CACHEPUSH_SIGNING_KEY");
        cmd.args([
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--json",
            // Never try substituters for a path we were asked to read locally.
            "--offline",
        ]);
        if closure {
            cmd.arg("--recursive");
        }
        cmd.args(batch.iter().map(|p| self.store_dir.display(p)));
        cmd.stdin(std::process::Stdio::null());
        let out = cmd.output().await.map_err(|source| StoreError::Spawn {
            program: self.nix.display().to_string(),
            source,
        })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            // Nix says "path '...' is not valid" or "don't know how to build"; find which.
            for p in batch {
                let abs = self.store_dir.display(p);
                if stderr.contains(&abs) {
                    return Err(StoreError::NotValid(abs));
                }
            }
            return Err(StoreError::NixFailed {
                status: out.status.to_string(),
                stderr: stderr.trim().to_owned(),
            });
        }
        parse_path_info_json(&self.store_dir, &out.stdout)
    }
}

/// Removes `.` and `..` lexically (symlink targets are resolved hop by hop).
fn normalise(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Orders paths so that each comes after all of its references (self-references aside).
/// Ties break by name, so the order is deterministic.
fn topological(mut all: BTreeMap<StorePath, PathInfo>) -> Vec<PathInfo> {
    let mut out = Vec::with_capacity(all.len());
    let mut done: HashSet<StorePath> = HashSet::new();
    let keys: Vec<StorePath> = all.keys().cloned().collect();
    for k in keys {
        // Iterative depth-first post-order; references outside the set are ignored.
        let mut stack = vec![(k, false)];
        while let Some((p, expanded)) = stack.pop() {
            if done.contains(&p) {
                continue;
            }
            if expanded {
                done.insert(p.clone());
                if let Some(info) = all.remove(&p) {
                    out.push(info);
                }
                continue;
            }
            stack.push((p.clone(), true));
            if let Some(info) = all.get(&p) {
                for r in info.references.iter().rev() {
                    if *r != p && !done.contains(r) && all.contains_key(r) {
                        stack.push((r.clone(), false));
                    }
                }
            }
        }
    }
    out
}

/// Parses any of the shapes `nix path-info --json` has printed.
pub fn parse_path_info_json(dir: &StoreDir, json: &[u8]) -> Result<Vec<PathInfo>, StoreError> {
    let v: Value = serde_json::from_slice(json).map_err(|e| StoreError::BadJson(e.to_string()))?;
    let mut out = Vec::new();
    match v {
        Value::Array(items) => {
            for item in items {
                let path = item
                    .get("path")
                    .and_then(Value::as_str)
                    .ok_or_else(|| StoreError::BadJson("array entry without \"path\"".into()))?
                    .to_owned();
                if let Some(info) = one(dir, &path, &item)? {
                    out.push(info);
                }
            }
        }
        Value::Object(map) => {
            let versioned = map.get("version").is_some_and(Value::is_number);
            let entries = if versioned {
                map.get("info")
                    .and_then(Value::as_object)
                    .cloned()
                    .ok_or_else(|| {
                        StoreError::BadJson("versioned output without \"info\"".into())
                    })?
            } else {
                map
            };
            for (path, item) in entries {
                if let Some(info) = one(dir, &path, &item)? {
                    out.push(info);
                }
            }
        }
        _ => return Err(StoreError::BadJson("neither an array nor an object".into())),
    }
    Ok(out)
}

fn path_of(dir: &StoreDir, s: &str) -> Result<StorePath, StoreError> {
    if s.starts_with('/') {
        Ok(dir.parse_path(s)?)
    } else {
        Ok(StorePath::from_base_name(s)?)
    }
}

fn hash_of(v: &Value) -> Result<Sha256, StoreError> {
    let bad = |what: &str| StoreError::BadJson(format!("narHash {what}: {v}"));
    match v {
        Value::String(s) => Sha256::parse(s).map_err(|e| bad(&e.to_string())),
        Value::Object(o) => {
            let algo = o
                .get("algorithm")
                .and_then(Value::as_str)
                .unwrap_or("sha256");
            if algo != "sha256" {
                return Err(bad("is not SHA-256"));
            }
            let digest = o
                .get("hash")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("has no \"hash\""))?;
            let digest = digest.strip_prefix("sha256-").unwrap_or(digest);
            let digest = digest.strip_prefix("sha256:").unwrap_or(digest);
            Sha256::parse_digest(digest).ok_or_else(|| bad("is malformed"))
        }
        _ => Err(bad("is neither a string nor an object")),
    }
}

/// A content address, in the string form narinfo `CA:` uses.
fn ca_of(v: &Value) -> Result<Option<String>, StoreError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(o) => {
            let method = o.get("method").and_then(Value::as_str).unwrap_or("");
            let hash = hash_of(o.get("hash").unwrap_or(&Value::Null))?;
            let prefix = match method {
                "nar" => "fixed:r:",
                "flat" => "fixed:",
                "text" => "text:",
                other => {
                    return Err(StoreError::BadJson(format!("unknown CA method {other:?}")));
                }
            };
            Ok(Some(format!("{prefix}{hash}")))
        }
        other => Err(StoreError::BadJson(format!("ca: {other}"))),
    }
}

fn one(dir: &StoreDir, path: &str, item: &Value) -> Result<Option<PathInfo>, StoreError> {
    let path = path_of(dir, path)?;
    if item.is_null() || item.get("valid").and_then(Value::as_bool) == Some(false) {
        return Err(StoreError::NotValid(dir.display(&path)));
    }
    let nar_hash = hash_of(item.get("narHash").unwrap_or(&Value::Null))?;
    let nar_size = item
        .get("narSize")
        .and_then(Value::as_u64)
        .ok_or_else(|| StoreError::BadJson(format!("no narSize for {path}")))?;
    let mut references = Vec::new();
    for r in item
        .get("references")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let r = r
            .as_str()
            .ok_or_else(|| StoreError::BadJson(format!("reference of {path} is not a string")))?;
        references.push(path_of(dir, r)?);
    }
    references.sort();
    references.dedup();
    let deriver = match item.get("deriver").and_then(Value::as_str) {
        Some(d) if !d.is_empty() => Some(path_of(dir, d)?),
        _ => None,
    };
    let mut sigs = Vec::new();
    for s in item
        .get("signatures")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let s = s.as_str().unwrap_or_default();
        sigs.push(
            Signature::parse(s)
                .map_err(|e| StoreError::BadJson(format!("signature of {path}: {e}")))?,
        );
    }
    let ca = ca_of(item.get("ca").unwrap_or(&Value::Null))?;
    Ok(Some(PathInfo {
        path,
        nar_hash,
        nar_size,
        references,
        deriver,
        sigs,
        ca,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "h7jx3wrzn6m9vjl9604id854qx1xyqw6-dep";
    const TOP: &str = "m6hd1hdwizjp3zaaw01jy028xpri1s94-top";

    fn check(infos: Vec<PathInfo>) {
        let infos = topological(infos.into_iter().map(|i| (i.path.clone(), i)).collect());
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[0].path.to_string(), DEP, "references come first");
        let top = &infos[1];
        assert_eq!(top.nar_size, 792);
        assert_eq!(
            top.nar_hash.sri(),
            "sha256-njSdd7lxuKZ2k/7cz0uRRgHwq1vfbhbw6ViJrzQy8y0="
        );
        let refs: Vec<String> = top.references.iter().map(|r| r.to_string()).collect();
        assert_eq!(refs, vec![DEP.to_string(), TOP.to_string()]);
        assert_eq!(
            top.deriver.as_ref().map(|d| d.to_string()).as_deref(),
            Some("6fh5xgb3isklgy3f6qmd0k9h3kkx58wj-top.drv")
        );
    }

    #[test]
    fn nix_2_8_array_shape() {
        // Printed by Nix 2.8 (Debian) for a two-path closure.
        let json = br#"[{"path":"/nix/store/h7jx3wrzn6m9vjl9604id854qx1xyqw6-dep","narHash":"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=","narSize":120,"references":[],"deriver":"/nix/store/ajdmyr1krfvikp250yajghwqfbdyjfr5-dep.drv","registrationTime":1795368212,"ultimate":true},{"path":"/nix/store/m6hd1hdwizjp3zaaw01jy028xpri1s94-top","narHash":"sha256-njSdd7lxuKZ2k/7cz0uRRgHwq1vfbhbw6ViJrzQy8y0=","narSize":792,"references":["/nix/store/h7jx3wrzn6m9vjl9604id854qx1xyqw6-dep","/nix/store/m6hd1hdwizjp3zaaw01jy028xpri1s94-top"],"deriver":"/nix/store/6fh5xgb3isklgy3f6qmd0k9h3kkx58wj-top.drv","registrationTime":1795368247,"ultimate":true}]"#;
        check(parse_path_info_json(&StoreDir::default(), json).unwrap());
    }

    #[test]
    fn keyed_object_shape() {
        let json = br#"{"/nix/store/m6hd1hdwizjp3zaaw01jy028xpri1s94-top":{"ca":null,"deriver":"/nix/store/6fh5xgb3isklgy3f6qmd0k9h3kkx58wj-top.drv","narHash":"sha256-njSdd7lxuKZ2k/7cz0uRRgHwq1vfbhbw6ViJrzQy8y0=","narSize":792,"references":["/nix/store/h7jx3wrzn6m9vjl9604id854qx1xyqw6-dep","/nix/store/m6hd1hdwizjp3zaaw01jy028xpri1s94-top"],"signatures":[]},"/nix/store/h7jx3wrzn6m9vjl9604id854qx1xyqw6-dep":{"ca":null,"deriver":null,"narHash":"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=","narSize":120,"references":[],"signatures":[]}}"#;
        check(parse_path_info_json(&StoreDir::default(), json).unwrap());
    }

    #[test]
    fn versioned_shape_with_structured_hashes() {
        let json = br#"{"version":2,"info":{"m6hd1hdwizjp3zaaw01jy028xpri1s94-top":{"deriver":"6fh5xgb3isklgy3f6qmd0k9h3kkx58wj-top.drv","narHash":{"algorithm":"sha256","format":"base64","hash":"njSdd7lxuKZ2k/7cz0uRRgHwq1vfbhbw6ViJrzQy8y0="},"narSize":792,"references":["h7jx3wrzn6m9vjl9604id854qx1xyqw6-dep","m6hd1hdwizjp3zaaw01jy028xpri1s94-top"],"signatures":[],"ca":null},"h7jx3wrzn6m9vjl9604id854qx1xyqw6-dep":{"narHash":{"algorithm":"sha256","format":"base16","hash":"1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13"},"narSize":120,"references":[],"signatures":[]}}}"#;
        check(parse_path_info_json(&StoreDir::default(), json).unwrap());
    }

    #[test]
    fn invalid_paths_are_errors() {
        let json = br#"[{"path":"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x","valid":false}]"#;
        let e = parse_path_info_json(&StoreDir::default(), json).unwrap_err();
        assert!(
            e.to_string()
                .contains("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x is not a valid path")
        );
        let json = br#"{"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x":null}"#;
        assert!(parse_path_info_json(&StoreDir::default(), json).is_err());
    }
}
