//! The S3 flags shared by every command that talks to a bucket.

use cachepush::storage::S3Settings;
use clap::Args;

#[derive(Args, Debug, Default, Clone)]
pub struct S3Args {
    /// S3 endpoint URL for non-AWS stores (overrides the URL's `endpoint=`; AWS_ENDPOINT_URL also works).
    #[arg(long, value_name = "URL", env = "CACHEPUSH_S3_ENDPOINT")]
    pub endpoint: Option<String>,
    /// S3 region (overrides the URL's `region=`; AWS_REGION also works).
    #[arg(long, value_name = "REGION", env = "CACHEPUSH_S3_REGION")]
    pub region: Option<String>,
    /// AWS profile for credentials and settings (overrides the URL's `profile=`; AWS_PROFILE also works).
    #[arg(long, value_name = "NAME", env = "CACHEPUSH_S3_PROFILE")]
    pub profile: Option<String>,
    /// S3 addressing: path (bucket in the path), virtual (bucket in the host name), or
    /// auto (path for custom endpoints, virtual for AWS).
    #[arg(long, value_name = "STYLE", env = "CACHEPUSH_S3_ADDRESSING_STYLE")]
    pub addressing_style: Option<String>,
    /// Seconds to wait for the next byte of an S3 response before retrying [default: 120].
    #[arg(long, value_name = "SECS", env = "CACHEPUSH_S3_READ_TIMEOUT")]
    pub read_timeout: Option<u64>,
}

impl S3Args {
    /// These flags (and their environment variables) as settings above the URL's own.
    pub fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            profile: self.profile.clone(),
            addressing_style: self.addressing_style.clone(),
            read_timeout: self.read_timeout.map(std::time::Duration::from_secs),
            part_size: None,
            max_attempts: None,
            paced: false,
            max_concurrency: None,
            resume_within: None,
        }
    }
}
