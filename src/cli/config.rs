//! `cachepush.toml`: settings for developers' shells and projects, so that `cachepush push`
//! with no URL publishes where the project says.
//!
//! Looked up in this order, the first value found winning:
//! 1. flags, then `CACHEPUSH_*` environment variables (what a `.envrc` sets);
//! 2. `$CACHEPUSH_CONFIG` if set, else `cachepush.toml` in the current directory or the
//!    nearest parent that has one (the project's);
//! 3. `$XDG_CONFIG_HOME/cachepush/config.toml` (default `~/.config/cachepush/config.toml`).
//!
//! No secrets go in these files: only the path of the signing key. Bucket credentials come
//! from the AWS chain (`AWS_*` variables, profiles, SSO, web identity).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Failure;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileSettings {
    pub to: Option<String>,
    pub signing_key_file: Option<PathBuf>,
    pub compression: Option<String>,
    pub compression_level: Option<i32>,
    pub jobs: Option<u16>,
    pub upstream: Option<Vec<String>>,
    pub skip_signed_by: Option<Vec<String>>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub profile: Option<String>,
    pub addressing_style: Option<String>,
    pub part_size: Option<u32>,
    pub queue_dir: Option<PathBuf>,
    pub write_nar_listing: Option<bool>,
    pub logs: Option<bool>,
    pub priority: Option<u32>,
    pub want_mass_query: Option<bool>,
}

impl FileSettings {
    /// The S3 settings of the file, which rank below the URL's own parameters.
    pub fn s3_settings(&self) -> cachepush::storage::S3Settings {
        cachepush::storage::S3Settings {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            profile: self.profile.clone(),
            addressing_style: self.addressing_style.clone(),
            ..Default::default()
        }
    }

    /// `self`'s values, with `other`'s where `self` has none.
    fn or(self, other: FileSettings) -> FileSettings {
        FileSettings {
            to: self.to.or(other.to),
            signing_key_file: self.signing_key_file.or(other.signing_key_file),
            compression: self.compression.or(other.compression),
            compression_level: self.compression_level.or(other.compression_level),
            jobs: self.jobs.or(other.jobs),
            upstream: self.upstream.or(other.upstream),
            skip_signed_by: self.skip_signed_by.or(other.skip_signed_by),
            endpoint: self.endpoint.or(other.endpoint),
            region: self.region.or(other.region),
            profile: self.profile.or(other.profile),
            addressing_style: self.addressing_style.or(other.addressing_style),
            part_size: self.part_size.or(other.part_size),
            write_nar_listing: self.write_nar_listing.or(other.write_nar_listing),
            logs: self.logs.or(other.logs),
            priority: self.priority.or(other.priority),
            want_mass_query: self.want_mass_query.or(other.want_mass_query),
            queue_dir: self.queue_dir.or(other.queue_dir),
        }
    }
}

/// Reads a TOML file into `T`; the error names the file, the line and the problem (toml's
/// own message spans lines with a caret; its first part is what users need).
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::input(format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        let at = e
            .span()
            .map(|s| {
                let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default();
        Failure::input(format!("{}: {}{at}", path.display(), e.message()))
    })
}

/// Parses one settings file; the error names the file, the line and the problem.
pub fn parse_file(path: &Path) -> Result<FileSettings, Failure> {
    let mut s: FileSettings = read_toml(path)?;
    // `~/` is the home directory; other relative paths in a project file are relative to
    // the file, not to where one stands.
    let base = path.parent().unwrap_or(Path::new("."));
    let home = std::env::var_os("HOME").map(PathBuf::from);
    for p in [&mut s.signing_key_file, &mut s.queue_dir]
        .into_iter()
        .flatten()
    {
        if let (Ok(rest), Some(h)) = (p.strip_prefix("~"), &home) {
            *p = h.join(rest);
        } else if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok(s)
}

fn project_file() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CACHEPUSH_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors()
        .map(|d| d.join("cachepush.toml"))
        .find(|p| p.is_file())
}

fn user_file() -> Option<PathBuf> {
    let dir = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(dir.join("cachepush/config.toml")).filter(|p| p.is_file())
}

/// The project's settings over the user's.
pub fn load() -> Result<FileSettings, Failure> {
    let project = match project_file() {
        Some(p) => parse_file(&p)?,
        None => FileSettings::default(),
    };
    let user = match user_file() {
        Some(p) => parse_file(&p)?,
        None => FileSettings::default(),
    };
    Ok(project.or(user))
}

/// Where `post-build-hook` leaves paths and watchers pick them up.
pub fn queue_dir(flag: Option<PathBuf>, file: &FileSettings) -> PathBuf {
    if let Some(d) = flag.or_else(|| file.queue_dir.clone()) {
        return d;
    }
    if is_root() {
        return PathBuf::from("/var/lib/cachepush/queue");
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    state.join("cachepush/queue")
}

fn is_root() -> bool {
    // The owner of /proc/self is the effective user; no libc call needed.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
