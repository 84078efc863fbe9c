//! Which object a request path names, decided before anything reaches the bucket.
//!
//! Nix clients only ever ask for a handful of shapes, so the gateway accepts exactly those
//! and nothing else: no percent-encoding (none of the shapes needs it, and decoding is where
//! traversal tricks live), no `..`, no empty segments, hashes of exactly 32 nix32 chars.

use crate::format::store_path::is_hash_part;
use crate::format::{StorePath, layout};

/// Longest request target accepted; real ones are under 100 bytes.
pub const MAX_URI_LEN: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    CacheInfo,
    /// `/<hash>.narinfo`
    NarInfo(String),
    /// `/nar/<file>`: the bucket key is `nar/<file>`.
    Nar(String),
    /// `/<hash>.ls`
    Listing(String),
    /// `/log/<drv base name>`
    Log(String),
    /// `/realisations/sha256:<hex>!<output>.doi` (content-addressed derivations): the id.
    Realisation(String),
    /// `/debuginfo/<build id>` (Nix's `index-debug-info`): the build id.
    DebugInfo(String),
    PublicKey,
    Version,
    Healthz,
    Metrics,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Malformed: 400.
    BadRequest(&'static str),
    /// Well-formed but not something a cache serves: 404.
    NotFound,
    /// 414.
    TooLong,
}

impl Route {
    /// The label used in metrics and access logs.
    pub fn label(&self) -> &'static str {
        match self {
            Route::CacheInfo => "nix-cache-info",
            Route::NarInfo(_) => "narinfo",
            Route::Nar(_) => "nar",
            Route::Listing(_) => "ls",
            Route::Log(_) => "log",
            Route::Realisation(_) => "realisation",
            Route::DebugInfo(_) => "debuginfo",
            Route::PublicKey => "public-key",
            Route::Version => "version",
            Route::Healthz => "healthz",
            Route::Metrics => "metrics",
        }
    }

    /// The object key in the cache (relative to the bucket prefix), for routes backed by one.
    pub fn object_key(&self) -> Option<String> {
        match self {
            Route::CacheInfo => Some(layout::CACHE_INFO.into()),
            Route::NarInfo(h) => Some(layout::narinfo_key(h)),
            Route::Nar(f) => Some(format!("{}{f}", layout::NAR_DIR)),
            Route::Listing(h) => Some(layout::listing_key(h)),
            Route::Log(d) => Some(layout::log_key(d)),
            Route::Realisation(id) => Some(layout::realisation_key(id)),
            Route::DebugInfo(id) => Some(layout::debuginfo_key(id)),
            Route::PublicKey | Route::Version | Route::Healthz | Route::Metrics => None,
        }
    }

    /// Parses the path of a request target (the query string is ignored, as Nix sends none).
    pub fn parse(target: &str) -> Result<Route, Reject> {
        if target.len() > MAX_URI_LEN {
            return Err(Reject::TooLong);
        }
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        if !path.starts_with('/') {
            return Err(Reject::BadRequest("the path must start with /"));
        }
        if path
            .bytes()
            .any(|b| b == b'%' || b == b'\\' || !b.is_ascii_graphic())
        {
            return Err(Reject::BadRequest("unexpected character in path"));
        }
        let segments: Vec<&str> = path[1..].split('/').collect();
        if segments
            .iter()
            .any(|s| *s == "." || *s == ".." || (s.is_empty() && segments.len() > 1))
        {
            return Err(Reject::BadRequest(
                "path segments must not be empty, . or ..",
            ));
        }
        match segments.as_slice() {
            ["nix-cache-info"] => Ok(Route::CacheInfo),
            ["healthz"] => Ok(Route::Healthz),
            ["metrics"] => Ok(Route::Metrics),
            ["v1", "public-key"] => Ok(Route::PublicKey),
            ["v1", "version"] => Ok(Route::Version),
            ["nar", file] => parse_nar_file(file).map(|f| Route::Nar(f.to_owned())),
            ["log", drv] => parse_drv(drv).map(|d| Route::Log(d.to_owned())),
            ["realisations", file] => {
                parse_realisation(file).map(|r| Route::Realisation(r.to_owned()))
            }
            ["debuginfo", id] => parse_build_id(id).map(|i| Route::DebugInfo(i.to_owned())),
            [one] => {
                if let Some(hash) = one.strip_suffix(".narinfo") {
                    check_hash(hash).map(|h| Route::NarInfo(h.to_owned()))
                } else if let Some(hash) = one.strip_suffix(".ls") {
                    check_hash(hash).map(|h| Route::Listing(h.to_owned()))
                } else {
                    Err(Reject::NotFound)
                }
            }
            _ => Err(Reject::NotFound),
        }
    }
}

fn check_hash(h: &str) -> Result<&str, Reject> {
    if is_hash_part(h) {
        Ok(h)
    } else {
        Err(Reject::BadRequest(
            "not a 32-character nix32 store path hash",
        ))
    }
}

/// `<nix32 or hex hash>.nar[.<compression>]`, as written by Nix, cachepush and others.
fn parse_nar_file(f: &str) -> Result<&str, Reject> {
    let Some((stem, rest)) = f.split_once(".nar") else {
        return Err(Reject::BadRequest("not a NAR file name"));
    };
    let ext_ok = rest.is_empty()
        || (rest.len() <= 8
            && rest.starts_with('.')
            && rest[1..].bytes().all(|b| b.is_ascii_alphanumeric()));
    let stem_ok = (32..=128).contains(&stem.len())
        && stem
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
    if ext_ok && stem_ok {
        Ok(f)
    } else {
        Err(Reject::BadRequest("not a NAR file name"))
    }
}

/// `sha256:<64 hex>!<output name>.doi`, as Nix names a realisation; returns the id (the
/// name without `.doi`).
fn parse_realisation(f: &str) -> Result<&str, Reject> {
    let bad = Reject::BadRequest("not a realisation's name");
    let id = f.strip_suffix(".doi").ok_or(bad)?;
    let (hash, output) = id.split_once('!').ok_or(bad)?;
    let hex = hash.strip_prefix("sha256:").ok_or(bad)?;
    let hex_ok = hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    // Output names are derivation attribute names: letters, digits and a few marks.
    let output_ok = !output.is_empty()
        && output.len() <= 64
        && output
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
        && !output.starts_with('.');
    if hex_ok && output_ok {
        Ok(id)
    } else {
        Err(bad)
    }
}

/// A build id in lower-case hex (20 bytes for GNU's, but any even length up to 64 bytes).
fn parse_build_id(id: &str) -> Result<&str, Reject> {
    if (2..=128).contains(&id.len())
        && id.len() % 2 == 0
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(id)
    } else {
        Err(Reject::BadRequest("not a build id"))
    }
}

fn parse_drv(d: &str) -> Result<&str, Reject> {
    if d.ends_with(".drv") && StorePath::from_base_name(d).is_ok() {
        Ok(d)
    } else {
        Err(Reject::BadRequest("not a derivation's base name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "0zmlp8zf0ryq8vcpzbqbzgncrnn1q1xa";

    #[test]
    fn never_serves_cachepushs_own_objects() {
        // Pins, push and read records, gc's index and marker: bookkeeping, not cache.
        for p in [
            "/cachepush/pins/release.json",
            "/cachepush/gc-index.json.zst",
            "/cachepush/gc-running.json",
            "/cachepush/reads/000000000001-ab.json",
            "/cachepush",
        ] {
            assert_eq!(Route::parse(p), Err(Reject::NotFound), "{p}");
        }
    }

    #[test]
    fn accepts_what_nix_asks_for() {
        assert_eq!(Route::parse("/nix-cache-info"), Ok(Route::CacheInfo));
        assert_eq!(
            Route::parse(&format!("/{H}.narinfo")),
            Ok(Route::NarInfo(H.into()))
        );
        assert_eq!(
            Route::parse(&format!("/{H}.ls")),
            Ok(Route::Listing(H.into()))
        );
        let nar = "1bb7q10qimpar3z3hac26xxhyvis7j1pq8891b9a99y5zmy4zsv9.nar.zst";
        assert_eq!(
            Route::parse(&format!("/nar/{nar}")),
            Ok(Route::Nar(nar.into()))
        );
        assert_eq!(
            Route::parse(&format!("/nar/{}.nar", "a".repeat(52))),
            Ok(Route::Nar(format!("{}.nar", "a".repeat(52))))
        );
        let drv = format!("{H}-hello-2.12.drv");
        assert_eq!(
            Route::parse(&format!("/log/{drv}")),
            Ok(Route::Log(drv.clone()))
        );
        assert_eq!(Route::parse("/v1/public-key"), Ok(Route::PublicKey));
        assert_eq!(Route::parse("/healthz?x=1"), Ok(Route::Healthz));
        let id = format!("sha256:{}!out", "ab".repeat(32));
        assert_eq!(
            Route::parse(&format!("/realisations/{id}.doi")),
            Ok(Route::Realisation(id.clone()))
        );
        assert_eq!(
            Route::parse(&format!("/realisations/{id}.doi"))
                .unwrap()
                .object_key(),
            Some(format!("realisations/{id}.doi"))
        );
        let build_id = "8a2c1f9e0b7d6c5a4f3e2d1c0b9a8f7e6d5c4b3a";
        assert_eq!(
            Route::parse(&format!("/debuginfo/{build_id}")),
            Ok(Route::DebugInfo(build_id.into()))
        );
    }

    #[test]
    fn realisations_and_debuginfo_are_as_strict_as_the_rest() {
        let hex = "ab".repeat(32);
        for bad in [
            format!("/realisations/sha256:{hex}!out"),
            format!("/realisations/sha256:{hex}.doi"),
            format!("/realisations/sha256:{}!out.doi", &hex[1..]),
            format!("/realisations/sha256:{}!out.doi", hex.to_uppercase()),
            format!("/realisations/md5:{hex}!out.doi"),
            format!("/realisations/sha256:{hex}!.doi"),
            format!("/realisations/sha256:{hex}!..doi"),
            format!("/realisations/sha256:{hex}!a/b.doi"),
            "/debuginfo/abc".into(),
            "/debuginfo/XYZ0".into(),
            format!("/debuginfo/{}", "a".repeat(130)),
        ] {
            assert!(
                matches!(
                    Route::parse(&bad),
                    Err(Reject::BadRequest(_) | Reject::NotFound)
                ),
                "{bad}: {:?}",
                Route::parse(&bad)
            );
        }
    }

    #[test]
    fn rejects_traversal_bad_hashes_and_unknown_paths() {
        for bad in [
            "/../etc/passwd",
            "/nar/../secret",
            "/nar/%2e%2e/x",
            "/%2e%2e/nix-cache-info",
            "/nar/..%2fsecret.nar",
            "/nar/%252e%252e",
            "//nix-cache-info",
            "/nar//x",
            "/nar/x\\..\\y",
            "/./nix-cache-info",
            &format!("/{}.narinfo", &H[..31]),
            &format!("/{H}e.narinfo"),
            "/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo",
            &format!("/{}.narinfo", H.to_uppercase()),
            "/nar/short.nar",
            "/nar/../../x.nar.zst",
            "/log/not-a-drv",
            "nix-cache-info",
        ] {
            assert!(
                matches!(Route::parse(bad), Err(Reject::BadRequest(_))),
                "{bad}: {:?}",
                Route::parse(bad)
            );
        }
        for unknown in [
            "/",
            "/index.html",
            "/a/b/c",
            "/v1/other",
            "/nix-cache-info/x",
        ] {
            assert_eq!(Route::parse(unknown), Err(Reject::NotFound), "{unknown}");
        }
        let long = format!("/{}", "a".repeat(8192));
        assert_eq!(Route::parse(&long), Err(Reject::TooLong));
    }
}
