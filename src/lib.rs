//! cachepush: publish Nix store closures as a signed binary cache on any S3-compatible
//! object store (or a local directory), and serve private buckets to Nix clients.
//!
//! Module map (see `docs/architecture.md`):
//! - [`format`]: Nix's wire formats (nix32, store paths, NAR, narinfo, keys); no I/O policy.
//! - [`store`]: the local Nix store: resolving arguments, closure and path metadata.
//! - [`compression`]: one pass from a store path to compressed, hashed upload chunks.
//! - [`storage`]: the target trait and its backends.
//! - [`target`]: parsing a cache URL (`file:///DIR`, `s3://BUCKET/...`) into a backend.
//! - [`push`]: closure → plan → upload.
//! - [`gateway`]: serving a private bucket to Nix clients over HTTP.
//! - [`watch`]: noticing new store paths, and the post-build-hook queue.
//! - [`verify`]: checking a whole cache against the invariants clients rely on.
//! - [`upstream`]: other binary caches whose paths need not be pushed.

pub mod compression;
pub mod format;
pub mod gateway;
pub mod gc;
pub mod host;
pub mod push;
pub mod storage;
pub mod store;
pub mod target;
pub mod upstream;
pub mod verify;
pub mod watch;

/// An error and all its causes on one line: the SDKs hide the useful part (connection
/// refused, DNS, TLS) a few `source()`s down.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = inner.source();
    }
    s
}

/// Now, as every log line of cachepush starts: RFC 3339 in UTC with milliseconds
/// (`2026-12-01T19:13:13.123Z`), the same for the CLI and the gateway, and sortable.
pub fn timestamp() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs(), d.subsec_millis())
}

/// A time in seconds since the Unix epoch, as [`timestamp`] prints times (without ms).
pub fn timestamp_of(secs: i64) -> String {
    let t = rfc3339(secs.max(0) as u64, 0);
    t.replace(".000Z", "Z")
}

/// `secs` after the Unix epoch as an RFC 3339 UTC time (civil-from-days, H. Hinnant).
fn rfc3339(secs: u64, millis: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(super::rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(
            super::rfc3339(1_796_151_193, 123),
            "2026-12-01T18:53:13.123Z"
        );
        assert_eq!(
            super::rfc3339(4_102_444_799, 999),
            "2099-12-31T23:59:59.999Z"
        );
    }
}
