//! The gateway's settings: where to listen, how NARs are delivered, limits and timeouts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use super::auth::Auth;
use super::sign::Countersigner;

/// Where to accept connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;
    /// `127.0.0.1:8080`, `[::1]:8080`, `unix:/run/x.sock` or an absolute socket path.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(Listen::Unix(PathBuf::from(s)));
        }
        s.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
            format!("{s:?} is not an address to listen on (use 127.0.0.1:8080, [::1]:8080 or unix:/path/to.sock)")
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// 307 to a presigned GET URL: NAR bytes flow from the bucket to the client.
    Redirect,
    /// Streamed through the gateway.
    Proxy,
}

impl std::str::FromStr for Delivery {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "redirect" => Ok(Delivery::Redirect),
            "proxy" => Ok(Delivery::Proxy),
            _ => Err(format!(
                "unknown NAR delivery {s:?} (use redirect or proxy)"
            )),
        }
    }
}

pub struct GatewayConfig {
    pub listen: Vec<Listen>,
    pub delivery: Delivery,
    /// Lifetime of presigned NAR URLs.
    pub presign_ttl: Duration,
    pub narinfo_ttl: Duration,
    pub negative_ttl: Duration,
    pub cache_entries: usize,
    /// Countersigning (`--signing-key` with its policy); see [`super::sign`].
    pub signer: Option<Countersigner>,
    pub auth: Option<Auth>,
    /// The htpasswd and tokens files `auth` came from: reloaded when they change, and when
    /// asked ([`super::serve_reloading`]: SIGHUP), so users can be added or removed without
    /// a restart.
    pub auth_files: Option<(Option<PathBuf>, Option<PathBuf>)>,
    /// Checks scoped tokens (`--token-key`), kept across reloads of the files above.
    pub scoped_tokens: Option<std::sync::Arc<super::token::Verifier>>,
    /// The push API (`--push-oidc-issuer`, or push-scope tokens), when it is on.
    pub push: Option<super::push::PushConfig>,
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    pub access_log: bool,
    /// For the `nix-cache-info` served when the bucket has none.
    pub store_dir: String,
    pub priority: u32,
    /// Longest time a client may take to send its request head, and to start its first
    /// request after connecting (for HTTP/1 and HTTP/2 alike).
    pub header_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// A connection with a response in flight that makes no progress (a client that stops
    /// reading a proxied NAR) is closed after this long.
    pub send_timeout: Duration,
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Failed password checks a peer may cause per minute (0: no per-peer limit).
    pub auth_failures_per_minute: u32,
    pub cache_control: CacheControl,
    /// `--record-access`: write which paths were served to the bucket this often, for gc.
    pub record_access: Option<Duration>,
}

/// Whether shared caches (CDNs, proxies) may store responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheControl {
    /// `public` without authentication; `private` plus `Vary: Authorization` with it, so a
    /// shared cache never hands one client's authenticated answer to another.
    Auto,
    /// Always `public`: for deployments where the CDN itself authenticates every client.
    Public,
}

impl std::str::FromStr for CacheControl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(CacheControl::Auto),
            "public" => Ok(CacheControl::Public),
            _ => Err(format!(
                "unknown --cache-control {s:?} (use auto, or public when a CDN in front authenticates every client)"
            )),
        }
    }
}

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "127.0.0.1:80".parse::<Listen>(),
            Ok(Listen::Tcp("127.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:80".parse::<Listen>(),
            Ok(Listen::Tcp("[::1]:80".parse().unwrap()))
        );
        assert_eq!(
            "unix:/run/x.sock".parse::<Listen>(),
            Ok(Listen::Unix("/run/x.sock".into()))
        );
        assert!("localhost".parse::<Listen>().is_err());
    }
}
