//! The S3 flags shared by every command that talks to a bucket.

use cachepush::storage::S3Config;
use cachepush::target::TargetUrl;
use clap::Args;

use super::Failure;

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
    /// S3 settings from the URL, overridden by these flags and their environment variables.
    pub fn config(&self, url: &TargetUrl) -> Result<S3Config, Failure> {
        self.config_over(url, &S3Args::default())
    }

    /// As [`Self::config`], with `fallback` (a settings file found on the way to the
    /// current directory) only where neither a flag nor the URL says anything: a
    /// `cachepush.toml` in an untrusted checkout must not redirect an explicit
    /// `s3://b?endpoint=...` elsewhere (security review L9).
    pub fn config_over(&self, url: &TargetUrl, fallback: &S3Args) -> Result<S3Config, Failure> {
        let TargetUrl::S3 { bucket, prefix, .. } = url else {
            return Err(Failure::input("not an s3:// URL"));
        };
        let mut cfg = S3Config::new(bucket);
        cfg.prefix = prefix.clone();
        let endpoint = self
            .endpoint
            .clone()
            .or_else(|| url.param("endpoint").map(str::to_owned))
            .or_else(|| fallback.endpoint.clone());
        cfg.endpoint = match endpoint {
            // Nix's `endpoint=host:port&scheme=http` form: add the scheme.
            Some(e) if !e.contains("://") => {
                let scheme = url.param("scheme").unwrap_or("https");
                Some(format!("{scheme}://{e}"))
            }
            other => other,
        };
        cfg.region = self
            .region
            .clone()
            .or_else(|| url.param("region").map(str::to_owned))
            .or_else(|| fallback.region.clone());
        cfg.profile = self
            .profile
            .clone()
            .or_else(|| url.param("profile").map(str::to_owned))
            .or_else(|| fallback.profile.clone());
        cfg.path_style = match self
            .addressing_style
            .as_deref()
            .or(url.param("addressing-style"))
            .or(fallback.addressing_style.as_deref())
        {
            None | Some("auto") => None,
            Some("path") => Some(true),
            Some("virtual") => Some(false),
            Some(other) => {
                return Err(Failure::input(format!(
                    "unknown S3 addressing style {other:?} (use path, virtual or auto)"
                )));
            }
        };
        if let Some(t) = self.read_timeout {
            cfg.read_timeout = std::time::Duration::from_secs(t.max(1));
        }
        Ok(cfg)
    }
}
