//! Provider profiles: the defaults that differ between S3 implementations, chosen from the
//! endpoint's host name (or `provider=` in the URL) and each overridable on its own.
//!
//! What differs, and why it matters (see `docs/providers/`):
//! - the ceiling on small requests in flight: AWS takes thousands a second per prefix;
//!   Spaces, Wasabi and B2 throttle far earlier, and a ceiling near their limit saves a
//!   round of throttling answers at the start of every push;
//! - the part size (objects smaller than one part go in one PUT): B2 recommends large
//!   parts (its transactions are billed), the others are happy with 16 MiB;
//! - which answers mean "slow down": everyone's 503 and 429, plus the codes some
//!   providers use besides;
//! - `Content-MD5` on uploads, which every hosted provider checks (so a body corrupted on
//!   the way is refused, not stored), while self-hosted servers on a LAN are left the CPU.

use super::config::S3Config;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Provider {
    Aws,
    R2,
    B2,
    Spaces,
    Gcs,
    Wasabi,
    /// Anything else: MinIO, Garage, Ceph, SeaweedFS, and providers not listed.
    #[default]
    Generic,
}

/// The defaults of one provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Profile {
    pub provider: Provider,
    /// Ceiling on small requests in flight (`--jobs` overrides).
    pub ceiling: usize,
    /// Part size; objects below it go in one PUT (`--part-size` overrides).
    pub part_size: usize,
    /// Parts buffered or in flight across all uploads; part size × this is the memory
    /// budget for large NARs, kept at 128 MiB whatever the part size.
    pub parts_in_flight: usize,
    /// Send `Content-MD5` with every upload (`checksum=md5|none` in the URL overrides).
    pub content_md5: bool,
    /// Error codes that mean throttling here, besides 429, 503 and the common ones.
    pub throttle_codes: &'static [&'static str],
}

const MIB: usize = 1 << 20;

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Aws => "aws",
            Provider::R2 => "r2",
            Provider::B2 => "b2",
            Provider::Spaces => "spaces",
            Provider::Gcs => "gcs",
            Provider::Wasabi => "wasabi",
            Provider::Generic => "generic",
        }
    }

    pub fn parse(name: &str) -> Option<Provider> {
        [
            Provider::Aws,
            Provider::R2,
            Provider::B2,
            Provider::Spaces,
            Provider::Gcs,
            Provider::Wasabi,
            Provider::Generic,
        ]
        .into_iter()
        .find(|p| p.name() == name)
    }

    /// The provider an endpoint belongs to, by its host name; no endpoint is AWS.
    pub fn detect(endpoint: Option<&str>) -> Provider {
        let Some(e) = endpoint else {
            return Provider::Aws;
        };
        let host = e
            .split("://")
            .nth(1)
            .unwrap_or(e)
            .split(['/', ':'])
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        let under = |d: &str| host == d || host.ends_with(&format!(".{d}"));
        if under("amazonaws.com") || under("amazonaws.com.cn") {
            Provider::Aws
        } else if under("r2.cloudflarestorage.com") {
            Provider::R2
        } else if under("backblazeb2.com") {
            Provider::B2
        } else if under("digitaloceanspaces.com") {
            Provider::Spaces
        } else if under("storage.googleapis.com") {
            Provider::Gcs
        } else if under("wasabisys.com") {
            Provider::Wasabi
        } else {
            Provider::Generic
        }
    }

    pub fn profile(self) -> Profile {
        let base = Profile {
            provider: self,
            ceiling: 256,
            part_size: 16 * MIB,
            parts_in_flight: 8,
            content_md5: true,
            throttle_codes: &[],
        };
        match self {
            Provider::Aws => base,
            // R2 answers 429 per key, and otherwise scales; equal parts are required (we
            // always send equal parts).
            Provider::R2 => base,
            // B2 bills transactions and recommends 100 MB parts; 32 MiB halves the part
            // requests while the budget stays 128 MiB. Busy pods answer 503 "too busy".
            Provider::B2 => Profile {
                ceiling: 64,
                part_size: 32 * MIB,
                parts_in_flight: 4,
                ..base
            },
            // Spaces limits requests per bucket (and per second per client).
            Provider::Spaces => Profile {
                ceiling: 64,
                ..base
            },
            // GCS through its XML API: 429 and 503, and `rateLimitExceeded`.
            Provider::Gcs => Profile {
                throttle_codes: &["rateLimitExceeded", "userRateLimitExceeded"],
                ..base
            },
            Provider::Wasabi => Profile {
                ceiling: 128,
                ..base
            },
            // Self-hosted: often on a LAN, where MD5 is CPU spent for nothing.
            Provider::Generic => Profile {
                content_md5: false,
                ..base
            },
        }
    }
}

impl Profile {
    /// Sets the profile's defaults on a configuration that has none of its own yet.
    pub(crate) fn apply(&self, cfg: &mut S3Config) {
        cfg.provider = self.provider;
        cfg.part_size = self.part_size;
        cfg.parts_in_flight = self.parts_in_flight;
        cfg.content_md5 = self.content_md5;
        cfg.throttle_codes = self.throttle_codes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_are_known_by_their_endpoints_host() {
        for (endpoint, want) in [
            (None, Provider::Aws),
            (Some("https://s3.eu-west-1.amazonaws.com"), Provider::Aws),
            (
                Some("https://ACCOUNT.r2.cloudflarestorage.com"),
                Provider::R2,
            ),
            (Some("https://s3.us-west-004.backblazeb2.com"), Provider::B2),
            (
                Some("https://fra1.digitaloceanspaces.com"),
                Provider::Spaces,
            ),
            (Some("https://storage.googleapis.com"), Provider::Gcs),
            (
                Some("https://s3.eu-central-1.wasabisys.com"),
                Provider::Wasabi,
            ),
            (Some("http://127.0.0.1:9000"), Provider::Generic),
            (Some("https://minio.example.org:9000"), Provider::Generic),
            // A look-alike host is not the provider.
            (Some("https://evilamazonaws.com"), Provider::Generic),
            (
                Some("https://backblazeb2.com.example.org"),
                Provider::Generic,
            ),
        ] {
            assert_eq!(Provider::detect(endpoint), want, "{endpoint:?}");
        }
        for p in ["aws", "r2", "b2", "spaces", "gcs", "wasabi", "generic"] {
            assert_eq!(Provider::parse(p).map(Provider::name), Some(p));
        }
        assert_eq!(Provider::parse("minio"), None);
    }

    #[test]
    fn every_profile_keeps_the_part_budget_and_s3s_limits() {
        for p in ["aws", "r2", "b2", "spaces", "gcs", "wasabi", "generic"] {
            let prof = Provider::parse(p).unwrap().profile();
            assert_eq!(prof.part_size * prof.parts_in_flight, 128 * MIB, "{p}");
            assert!(prof.part_size >= super::super::MIN_PART_SIZE, "{p}");
            assert!((1..=1024).contains(&prof.ceiling), "{p}");
        }
        assert!(!Provider::Generic.profile().content_md5);
        assert!(Provider::B2.profile().content_md5);
    }
}
