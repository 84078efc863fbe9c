//! Cache URLs, in Nix's own syntax:
//! - `file:///DIR[?compression=..&secret-key=..]`
//! - `s3://BUCKET[/PREFIX][?endpoint=URL&region=R&profile=P&scheme=http|https&addressing-style=path|virtual&compression=..&secret-key=..]`

use std::collections::BTreeMap;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("cache URL {0:?} has no scheme; use file:///absolute/dir or s3://bucket")]
    NoScheme(String),
    #[error(
        "cache URL scheme {0:?} is not supported; use file:///absolute/dir, s3://bucket, or https://GATEWAY to push through a gateway"
    )]
    UnsupportedScheme(String),
    #[error("cache URL {0:?}: a file:// URL needs an absolute path, e.g. file:///var/cache/nix")]
    RelativeFile(String),
    #[error("cache URL {url:?}: unknown parameter {param:?} (supported: {supported})")]
    UnknownParam {
        url: String,
        param: String,
        supported: &'static str,
    },
    #[error("cache URL {0:?} names no bucket; use s3://BUCKET[/PREFIX]?endpoint=...")]
    NoBucket(String),
    #[error("cache URL {0:?}: malformed percent-encoding")]
    BadEncoding(String),
    #[error(
        "gateway URL {0:?} is not http(s)://HOST[:PORT][/PATH] (no user part: the token goes in --token-file or CACHEPUSH_TOKEN)"
    )]
    BadGateway(String),
    /// A gateway URL where a cache is needed (verify, gc, serving).
    #[error(
        "{0:?} is a gateway, which only takes pushes; give the s3:// URL of the bucket behind it"
    )]
    GatewayNotCache(String),
}

/// A parsed cache URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetUrl {
    File {
        dir: PathBuf,
        params: BTreeMap<String, String>,
    },
    S3 {
        bucket: String,
        prefix: String,
        params: BTreeMap<String, String>,
    },
    /// A `cachepush gateway` that takes pushes: `http(s)://HOST[:PORT][/PATH]`.
    Gateway {
        /// The URL without its query and without a trailing `/`.
        base: String,
        params: BTreeMap<String, String>,
    },
}

const GATEWAY_PARAMS: &str = "compression";

const FILE_PARAMS: &str = "compression, secret-key, write-nar-listing, priority, want-mass-query";
// `multipart-upload` and `parallel-compression` are Nix's; cachepush always does both,
// so URLs written for `nix copy` keep working.
const S3_PARAMS: &str = "endpoint, region, profile, provider, checksum, scheme, addressing-style, compression, secret-key, multipart-upload, parallel-compression, write-nar-listing, priority, want-mass-query";

impl TargetUrl {
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| TargetError::NoScheme(url.to_owned()))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let params = parse_query(url, query)?;
        match scheme {
            "file" => {
                if !path.starts_with('/') {
                    return Err(TargetError::RelativeFile(url.to_owned()));
                }
                check_params(url, &params, FILE_PARAMS)?;
                Ok(TargetUrl::File {
                    dir: PathBuf::from(percent_decode(url, path)?),
                    params,
                })
            }
            "s3" => {
                check_params(url, &params, S3_PARAMS)?;
                let path = percent_decode(url, path)?;
                let (bucket, prefix) = path.split_once('/').unwrap_or((&path, ""));
                if bucket.is_empty() {
                    return Err(TargetError::NoBucket(url.to_owned()));
                }
                Ok(TargetUrl::S3 {
                    bucket: bucket.to_owned(),
                    prefix: prefix.trim_matches('/').to_owned(),
                    params,
                })
            }
            "http" | "https" => {
                check_params(url, &params, GATEWAY_PARAMS)?;
                let host = path.split('/').next().unwrap_or_default();
                if host.is_empty()
                    || path.contains(['@', '#'])
                    || path.contains(char::is_whitespace)
                {
                    return Err(TargetError::BadGateway(url.to_owned()));
                }
                Ok(TargetUrl::Gateway {
                    base: format!("{scheme}://{}", path.trim_end_matches('/')),
                    params,
                })
            }
            other => Err(TargetError::UnsupportedScheme(other.to_owned())),
        }
    }

    /// As [`parse`](Self::parse), for commands that need the cache itself (verify, gc,
    /// serving): a gateway URL is refused.
    pub fn parse_cache(url: &str) -> Result<Self, TargetError> {
        match Self::parse(url)? {
            TargetUrl::Gateway { base, .. } => Err(TargetError::GatewayNotCache(base)),
            t => Ok(t),
        }
    }

    /// Whether this names a gateway (which only takes pushes) rather than a cache.
    pub fn is_gateway(&self) -> bool {
        matches!(self, TargetUrl::Gateway { .. })
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            TargetUrl::File { params, .. }
            | TargetUrl::S3 { params, .. }
            | TargetUrl::Gateway { params, .. } => params.get(name).map(String::as_str),
        }
    }
}

fn check_params(
    url: &str,
    params: &BTreeMap<String, String>,
    supported: &'static str,
) -> Result<(), TargetError> {
    for k in params.keys() {
        if !supported.split(", ").any(|s| s == k) {
            return Err(TargetError::UnknownParam {
                url: url.to_owned(),
                param: k.clone(),
                supported,
            });
        }
    }
    Ok(())
}

fn parse_query(url: &str, query: &str) -> Result<BTreeMap<String, String>, TargetError> {
    let mut out = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(percent_decode(url, k)?, percent_decode(url, v)?);
    }
    Ok(out)
}

fn percent_decode(url: &str, s: &str) -> Result<String, TargetError> {
    let bad = || TargetError::BadEncoding(url.to_owned());
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next().ok_or_else(bad)?, bytes.next().ok_or_else(bad)?];
            let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_urls() {
        let g = |u: &str| TargetUrl::parse(u);
        assert_eq!(
            g("https://cache.example.org/").unwrap(),
            TargetUrl::Gateway {
                base: "https://cache.example.org".into(),
                params: BTreeMap::new()
            }
        );
        match g("http://127.0.0.1:8080/team/?compression=xz").unwrap() {
            TargetUrl::Gateway { base, .. } => assert_eq!(base, "http://127.0.0.1:8080/team"),
            other => panic!("{other:?}"),
        }
        for bad in [
            "https://",
            "https:///x",
            "https://user:pw@cache.example.org",
            "https://cache.example.org/a b",
            "https://cache.example.org/#x",
        ] {
            assert!(
                matches!(g(bad), Err(TargetError::BadGateway(_))),
                "{bad}: {:?}",
                g(bad)
            );
        }
        assert!(matches!(
            g("https://cache.example.org?endpoint=x"),
            Err(TargetError::UnknownParam { .. })
        ));
        assert!(matches!(
            TargetUrl::parse_cache("https://cache.example.org"),
            Err(TargetError::GatewayNotCache(_))
        ));
        assert!(TargetUrl::parse_cache("s3://b").is_ok());
    }

    #[test]
    fn file_urls() {
        let t = TargetUrl::parse("file:///tmp/my%20cache?compression=xz").unwrap();
        assert_eq!(
            t,
            TargetUrl::File {
                dir: PathBuf::from("/tmp/my cache"),
                params: [("compression".to_owned(), "xz".to_owned())].into()
            }
        );
        assert_eq!(t.param("compression"), Some("xz"));
        assert!(matches!(
            TargetUrl::parse("file://tmp/x"),
            Err(TargetError::RelativeFile(_))
        ));
        assert!(matches!(
            TargetUrl::parse("/tmp/x"),
            Err(TargetError::NoScheme(_))
        ));
        assert!(matches!(
            TargetUrl::parse("ftp://x"),
            Err(TargetError::UnsupportedScheme(_))
        ));
        assert!(matches!(
            TargetUrl::parse("file:///x?bogus=1"),
            Err(TargetError::UnknownParam { .. })
        ));
    }

    #[test]
    fn s3_urls() {
        let t = TargetUrl::parse(
            "s3://cache/team/nix/?endpoint=http%3A%2F%2F127.0.0.1%3A9000&region=garage",
        )
        .unwrap();
        let TargetUrl::S3 { bucket, prefix, .. } = &t else {
            panic!("{t:?}")
        };
        assert_eq!((bucket.as_str(), prefix.as_str()), ("cache", "team/nix"));
        assert_eq!(t.param("endpoint"), Some("http://127.0.0.1:9000"));
        assert_eq!(t.param("region"), Some("garage"));
        assert!(matches!(
            TargetUrl::parse("s3://?region=x"),
            Err(TargetError::NoBucket(_))
        ));
        assert!(matches!(
            TargetUrl::parse("s3://b?endpont=x"),
            Err(TargetError::UnknownParam { .. })
        ));
    }
}
