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
            Route::Nar(f) => Some(format!("nar/{f}")),
            Route::Listing(h) => Some(format!("{h}.ls")),
            Route::Log(d) => Some(format!("log/{d}")),
            _ => None,
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
