//! S3 settings: where the bucket is and how to reach it, and S3's multipart limits.

use std::time::Duration;

/// S3 refuses more parts than this in one multipart upload.
pub const MAX_PARTS: u64 = 10_000;
/// S3's smallest part (all but the last).
pub const MIN_PART_SIZE: usize = 5 << 20;

/// Where and how to reach the bucket.
#[derive(Clone, Debug, Default)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix without leading or trailing slash; empty for the bucket root.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub profile: Option<String>,
    /// `None`: path-style for custom endpoints, virtual-hosted for AWS.
    pub path_style: Option<bool>,
    /// Multipart part size; objects smaller than this go in one PUT.
    pub part_size: usize,
    /// Parts buffered or in flight across all uploads (the memory budget in parts).
    pub parts_in_flight: usize,
    /// Attempts per request, including the first.
    pub max_attempts: u32,
    /// Longest wait for the next byte of a response.
    pub read_timeout: Duration,
    /// Whose defaults these are (set by [`Profile::apply`](super::profile::Profile)).
    pub provider: super::profile::Provider,
    /// Ceiling of the adaptive limit on small requests in flight; `None`: not paced (every
    /// caller bounds its own concurrency, as the gateway and gc do).
    pub concurrency: Option<usize>,
    /// Send `Content-MD5` with PUTs and parts, so the server refuses a corrupted body.
    pub content_md5: bool,
    /// Error codes that mean throttling besides the common ones.
    pub throttle_codes: &'static [&'static str],
    /// Where multipart uploads are journaled so that a killed push can resume them;
    /// `None`: not journaled.
    pub journal: Option<super::journal::Journal>,
}

impl S3Config {
    pub fn new(bucket: &str) -> Self {
        let mut cfg = S3Config {
            bucket: bucket.to_owned(),
            max_attempts: 6,
            read_timeout: Duration::from_secs(120),
            ..S3Config::default()
        };
        super::profile::Provider::Generic.profile().apply(&mut cfg);
        cfg
    }
}

pub(super) fn is_aws(endpoint: &str) -> bool {
    super::profile::Provider::detect(Some(endpoint)) == super::profile::Provider::Aws
}

/// The part size for a NAR of about `size_hint` bytes: the configured size (at least S3's
/// minimum), or larger when that many parts would not fit under S3's part limit.
pub(super) fn part_size(configured: usize, size_hint: u64) -> usize {
    let configured = configured.max(MIN_PART_SIZE);
    // Compressed NARs can be slightly larger than the NAR; leave 10% of the parts spare.
    let needed = (size_hint + size_hint / 50).div_ceil(MAX_PARTS * 9 / 10);
    configured.max(usize::try_from(needed).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_grow_only_when_the_nar_would_not_fit_in_the_part_limit() {
        let mib = 1usize << 20;
        assert_eq!(part_size(16 * mib, 0), 16 * mib);
        assert_eq!(
            part_size(1, 10 << 20),
            MIN_PART_SIZE,
            "never under S3's minimum"
        );
        assert_eq!(part_size(16 * mib, 100 << 30), 16 * mib);
        // 200 GiB in 16 MiB parts would be 12,800 parts: more than 10,000.
        let big = 200u64 << 30;
        let p = part_size(16 * mib, big);
        assert!(p > 16 * mib);
        let parts = (big + big / 50).div_ceil(p as u64);
        assert!(parts <= MAX_PARTS, "{parts} parts of {p}");
    }
}
