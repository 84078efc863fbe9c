//! `cachepush gateway --from s3://... --listen ADDR`: settings from flags, environment
//! variables and an optional TOML file (flags and variables win; unknown keys are errors).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use cachepush::format::PublicKey;
use cachepush::gateway::{
    self, CacheControl, Delivery, GatewayConfig, Listen, auth::Auth, sign::Countersigner,
    token::Verifier,
};
use cachepush::storage::{OpenOptions, Storage, StorageError, open_target};
use cachepush::target::TargetUrl;
use clap::Args;
use serde::Deserialize;

use super::Failure;
use super::keys::read_secret_key;
use super::s3args::S3Args;
use cachepush::gateway::oidc::{ClaimRule, OidcConfig, OidcVerifier};

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// The cache to serve: s3://BUCKET[/PREFIX]?endpoint=URL&region=R, or file:///DIR.
    #[arg(long, value_name = "URL", env = "CACHEPUSH_GATEWAY_FROM")]
    from: Option<String>,
    /// Address to listen on: 127.0.0.1:8080, [::]:8080 or unix:/run/cachepush.sock;
    /// repeatable [default: 127.0.0.1:8080].
    #[arg(
        long,
        value_name = "ADDR",
        env = "CACHEPUSH_GATEWAY_LISTEN",
        value_delimiter = ','
    )]
    listen: Vec<String>,
    /// TOML file with any of these settings (keys are the flag names without `--`).
    #[arg(long, value_name = "FILE", env = "CACHEPUSH_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// How NARs reach clients: redirect (307 to a presigned URL) or proxy [default: redirect].
    #[arg(long, value_name = "MODE", env = "CACHEPUSH_GATEWAY_NAR_DELIVERY")]
    nar_delivery: Option<String>,
    /// Lifetime of presigned NAR URLs, in seconds [default: 3600].
    #[arg(long, value_name = "SECS", env = "CACHEPUSH_GATEWAY_PRESIGN_TTL")]
    presign_ttl: Option<u64>,
    /// How long a narinfo is served from memory, in seconds [default: 60].
    #[arg(long, value_name = "SECS", env = "CACHEPUSH_GATEWAY_NARINFO_TTL")]
    narinfo_ttl: Option<u64>,
    /// How long "no such narinfo" is remembered, in seconds [default: 10].
    #[arg(long, value_name = "SECS", env = "CACHEPUSH_GATEWAY_NEGATIVE_TTL")]
    negative_ttl: Option<u64>,
    /// Most narinfos held in memory [default: 100000].
    #[arg(long, value_name = "N", env = "CACHEPUSH_GATEWAY_CACHE_ENTRIES")]
    cache_entries: Option<usize>,
    /// Add this key's signature to narinfos served: only to those validly signed by a
    /// --require-signature-by key, or to all with --sign-unverified.
    #[arg(long, value_name = "FILE", env = "CACHEPUSH_GATEWAY_SIGNING_KEY_FILE")]
    signing_key: Option<PathBuf>,
    /// Countersign only narinfos carrying a valid signature by this public key
    /// (NAME:BASE64, as in trusted-public-keys); repeatable. Others are served unsigned.
    #[arg(
        long,
        value_name = "PUBKEY",
        env = "CACHEPUSH_GATEWAY_REQUIRE_SIGNATURE_BY",
        value_delimiter = ' '
    )]
    require_signature_by: Vec<String>,
    /// Countersign every narinfo in the bucket, signed or not. DANGEROUS: whoever can
    /// write to the bucket can then make clients install anything.
    #[arg(long)]
    sign_unverified: bool,
    /// Require HTTP Basic auth checked against this htpasswd file (bcrypt, `htpasswd -nB`).
    #[arg(long, value_name = "FILE", env = "CACHEPUSH_GATEWAY_HTPASSWD")]
    htpasswd: Option<PathBuf>,
    /// Accept the bearer tokens in this file (one per line; also as a Basic password).
    #[arg(long, value_name = "FILE", env = "CACHEPUSH_GATEWAY_TOKENS")]
    tokens: Option<PathBuf>,
    /// Accept scoped tokens (`cachepush token issue`) signed by this token key: its public
    /// key file, or its secret key file. Never the cache's signing key.
    #[arg(long, value_name = "FILE", env = "CACHEPUSH_GATEWAY_TOKEN_KEY")]
    token_key: Option<PathBuf>,
    /// Refuse scoped tokens whose ids this file lists (`cachepush token revoke`); reread
    /// when it changes. While it cannot be read, every scoped token is refused.
    #[arg(long, value_name = "FILE", env = "CACHEPUSH_GATEWAY_TOKEN_REVOCATIONS")]
    token_revocations: Option<PathBuf>,
    /// Let CI jobs push with identity tokens from this OIDC issuer (e.g.
    /// https://token.actions.githubusercontent.com); repeatable. Needs --signing-key,
    /// --push-oidc-audience and at least one --push-claim.
    #[arg(
        long,
        value_name = "URL",
        env = "CACHEPUSH_GATEWAY_PUSH_OIDC_ISSUER",
        value_delimiter = ' '
    )]
    push_oidc_issuer: Vec<String>,
    /// The audience identity tokens must be minted for (the pushers' --audience).
    #[arg(long, value_name = "AUD", env = "CACHEPUSH_GATEWAY_PUSH_OIDC_AUDIENCE")]
    push_oidc_audience: Option<String>,
    /// NAME=GLOB: a claim every identity token must match to push (e.g.
    /// repository=my-org/*, ref=refs/heads/main); repeatable, all must match.
    #[arg(long, value_name = "NAME=GLOB")]
    push_claim: Vec<String>,
    /// Tokens that fail the --push-claim rules but match every --push-quarantine-claim
    /// push into this prefix of the bucket instead: a separate, unsigned cache (fork pull
    /// requests).
    #[arg(long, value_name = "PREFIX")]
    push_quarantine_prefix: Option<String>,
    /// NAME=GLOB: what a token must match to push into the quarantine; repeatable.
    #[arg(long, value_name = "NAME=GLOB")]
    push_quarantine_claim: Vec<String>,
    /// Allow an http:// OIDC issuer on a loopback address (tests only).
    #[arg(long)]
    push_oidc_insecure_http: bool,
    /// Publish pushed NARs after checking their size and FileHash only, without
    /// decompressing them to check NarHash (faster; trusts the pusher's NarHash).
    #[arg(long)]
    trust_pushers: bool,
    /// Lifetime of upload URLs handed to pushers, in seconds [default: 900].
    #[arg(long, value_name = "SECS")]
    push_grant_ttl: Option<u64>,
    /// Serve HTTPS with this certificate chain (PEM).
    #[arg(
        long,
        value_name = "FILE",
        env = "CACHEPUSH_GATEWAY_TLS_CERT",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(
        long,
        value_name = "FILE",
        env = "CACHEPUSH_GATEWAY_TLS_KEY",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Store directory announced when the bucket has no nix-cache-info [default: /nix/store].
    #[arg(long, value_name = "DIR", env = "CACHEPUSH_GATEWAY_STORE_DIR")]
    store_dir: Option<String>,
    /// Priority announced when the bucket has no nix-cache-info [default: 40].
    #[arg(long, value_name = "N", env = "CACHEPUSH_GATEWAY_PRIORITY")]
    priority: Option<u32>,
    /// Seconds a client has to start its first request and to send a request head
    /// [default: 10].
    #[arg(long, value_name = "SECS", env = "CACHEPUSH_GATEWAY_HEADER_TIMEOUT")]
    header_timeout: Option<u64>,
    /// Seconds a connection with no request in flight stays open [default: 60].
    #[arg(long, value_name = "SECS", env = "CACHEPUSH_GATEWAY_IDLE_TIMEOUT")]
    idle_timeout: Option<u64>,
    /// Seconds a response may make no progress (a client that stops reading) before its
    /// connection is closed [default: 120].
    #[arg(long, value_name = "SECS", env = "CACHEPUSH_GATEWAY_SEND_TIMEOUT")]
    send_timeout: Option<u64>,
    /// Connections open at once; more are closed when accepted [default: 4096, lowered to
    /// fit the open-file limit].
    #[arg(long, value_name = "N", env = "CACHEPUSH_GATEWAY_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Failed logins a client address may cause per minute before it gets 429 (0: no
    /// per-address limit) [default: 30].
    #[arg(
        long,
        value_name = "N",
        env = "CACHEPUSH_GATEWAY_AUTH_FAILURES_PER_MINUTE"
    )]
    auth_failures_per_minute: Option<u32>,
    /// `auto`: `Cache-Control: private` and `Vary: Authorization` when auth is on, so no
    /// shared cache serves private content; `public`: only when a CDN in front
    /// authenticates every client [default: auto].
    #[arg(long, value_name = "MODE", env = "CACHEPUSH_GATEWAY_CACHE_CONTROL")]
    cache_control: Option<String>,
    /// No access log lines (errors are still logged).
    #[arg(short, long, env = "CACHEPUSH_GATEWAY_QUIET",
          value_parser = clap::builder::BoolishValueParser::new())]
    quiet: bool,
    /// Record which store paths are read through the gateway, in the bucket
    /// (`cachepush/reads/`), so that `gc --keep-read-days` keeps them. Needs write access.
    #[arg(long, env = "CACHEPUSH_GATEWAY_RECORD_ACCESS",
          value_parser = clap::builder::BoolishValueParser::new())]
    record_access: bool,
    /// How often --record-access writes a record (at most one request per interval).
    #[arg(long, value_name = "DURATION", env = "CACHEPUSH_GATEWAY_RECORD_INTERVAL",
          value_parser = super::gc::parse_duration)]
    record_interval: Option<i64>,
    #[command(flatten)]
    s3: S3Args,
}

/// The settings a config file may hold; the same names as the flags.
/// `listen = "127.0.0.1:8080"` or `listen = ["127.0.0.1:8080", "[::1]:8080"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    from: Option<String>,
    /// One address as a string, or a list of them.
    listen: Option<OneOrMany>,
    nar_delivery: Option<String>,
    presign_ttl: Option<u64>,
    narinfo_ttl: Option<u64>,
    negative_ttl: Option<u64>,
    cache_entries: Option<usize>,
    signing_key: Option<PathBuf>,
    require_signature_by: Option<Vec<String>>,
    sign_unverified: Option<bool>,
    htpasswd: Option<PathBuf>,
    tokens: Option<PathBuf>,
    token_key: Option<PathBuf>,
    token_revocations: Option<PathBuf>,
    push_oidc_issuer: Option<OneOrMany>,
    push_oidc_audience: Option<String>,
    push_claim: Option<OneOrMany>,
    push_quarantine_prefix: Option<String>,
    push_quarantine_claim: Option<OneOrMany>,
    push_oidc_insecure_http: Option<bool>,
    trust_pushers: Option<bool>,
    push_grant_ttl: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    store_dir: Option<String>,
    priority: Option<u32>,
    header_timeout: Option<u64>,
    idle_timeout: Option<u64>,
    send_timeout: Option<u64>,
    max_connections: Option<usize>,
    auth_failures_per_minute: Option<u32>,
    cache_control: Option<String>,
    quiet: Option<bool>,
    record_access: Option<bool>,
    record_interval: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    profile: Option<String>,
    addressing_style: Option<String>,
}

/// The cache a gateway serves, as scoped tokens name it: the key prefix of an S3 URL (a
/// directory is one cache: empty).
fn target_prefix(t: &TargetUrl) -> &str {
    match t {
        TargetUrl::S3 { prefix, .. } => prefix,
        TargetUrl::File { .. } | TargetUrl::Gateway { .. } => "",
    }
}

/// The push API's settings from the flags and the file.
fn push_config(
    a: &GatewayArgs,
    file: &mut FileConfig,
    issuers: Vec<String>,
    key: cachepush::format::SecretKey,
) -> Result<gateway::push::PushConfig, Failure> {
    let list = |flag: &Vec<String>, f: Option<OneOrMany>| {
        if flag.is_empty() {
            f.map(OneOrMany::into_vec).unwrap_or_default()
        } else {
            flag.clone()
        }
    };
    let rules = |texts: Vec<String>| {
        texts
            .iter()
            .map(|t| ClaimRule::parse(t).map_err(Failure::input))
            .collect::<Result<Vec<_>, _>>()
    };
    let quarantine_prefix = pick(
        a.push_quarantine_prefix.clone(),
        file.push_quarantine_prefix.clone(),
    )
    .map(|p| p.trim_matches('/').to_owned());
    if let Some(q) = &quarantine_prefix
        && (q.is_empty() || q.split('/').any(|s| s.is_empty() || s == "." || s == ".."))
    {
        return Err(Failure::input(format!(
            "--push-quarantine-prefix {q:?} is not a key prefix (e.g. quarantine)"
        )));
    }
    let oidc_cfg = OidcConfig {
        issuers,
        audience: pick(
            a.push_oidc_audience.clone(),
            file.push_oidc_audience.clone(),
        )
        .unwrap_or_default(),
        claims: rules(list(&a.push_claim, file.push_claim.take()))?,
        quarantine_prefix: quarantine_prefix.clone(),
        quarantine_claims: rules(list(
            &a.push_quarantine_claim,
            file.push_quarantine_claim.take(),
        ))?,
        insecure_http: a.push_oidc_insecure_http || file.push_oidc_insecure_http.unwrap_or(false),
    };
    let oidc = if oidc_cfg.issuers.is_empty() {
        if quarantine_prefix.is_some() {
            return Err(Failure::input(
                "--push-quarantine-prefix applies to identity tokens: it needs --push-oidc-issuer",
            ));
        }
        None
    } else {
        Some(OidcVerifier::new(oidc_cfg).map_err(Failure::input)?)
    };
    let ttl = pick(a.push_grant_ttl, file.push_grant_ttl).unwrap_or(900);
    if !(1..=7 * 24 * 3600).contains(&ttl) {
        return Err(Failure::input(
            "--push-grant-ttl must be between 1 second and 7 days (S3's limit)",
        ));
    }
    Ok(gateway::push::PushConfig {
        key,
        oidc,
        trust_pushers: a.trust_pushers || file.trust_pushers.unwrap_or(false),
        grant_ttl: Duration::from_secs(ttl),
        quarantine_prefix,
    })
}

/// Flags and variables first, then the file, then the default.
fn pick<T>(flag: Option<T>, file: Option<T>) -> Option<T> {
    flag.or(file)
}

pub fn run(a: GatewayArgs) -> Result<ExitCode, Failure> {
    let mut file = match &a.config {
        Some(p) => super::config::read_toml::<FileConfig>(p)?,
        None => FileConfig::default(),
    };
    let from = pick(a.from.clone(), file.from.clone()).ok_or_else(|| {
        Failure::input("no cache to serve")
            .hint("pass --from s3://BUCKET?endpoint=... or --from file:///DIR (or `from` in the --config file)")
    })?;
    let target = TargetUrl::parse_cache(&from).map_err(|e| Failure::input(e.to_string()))?;
    let s3 = S3Args {
        endpoint: pick(a.s3.endpoint.clone(), file.endpoint.clone()),
        region: pick(a.s3.region.clone(), file.region.clone()),
        profile: pick(a.s3.profile.clone(), file.profile.clone()),
        addressing_style: pick(a.s3.addressing_style.clone(), file.addressing_style.clone()),
        read_timeout: a.s3.read_timeout,
    };
    let mut given = s3.settings();
    // A client is waiting: fail over to 5xx quickly rather than retry for a minute.
    given.max_attempts = Some(3);
    given.read_timeout.get_or_insert(Duration::from_secs(30));
    let open_opts = OpenOptions {
        given,
        read_only: true,
        ..OpenOptions::default()
    };

    let listen_text = if !a.listen.is_empty() {
        a.listen.clone()
    } else {
        file.listen
            .take()
            .map(OneOrMany::into_vec)
            .unwrap_or_else(|| vec!["127.0.0.1:8080".into()])
    };
    let listen = listen_text
        .iter()
        .map(|l| l.parse::<Listen>().map_err(Failure::input))
        .collect::<Result<Vec<_>, _>>()?;
    if listen.is_empty() {
        return Err(Failure::input("no address to listen on"));
    }
    let delivery = pick(a.nar_delivery.clone(), file.nar_delivery.clone())
        .unwrap_or_else(|| "redirect".into())
        .parse::<Delivery>()
        .map_err(Failure::input)?;
    let require_by = if a.require_signature_by.is_empty() {
        file.require_signature_by.clone().unwrap_or_default()
    } else {
        a.require_signature_by.clone()
    };
    let require_by = require_by
        .iter()
        .filter(|k| !k.trim().is_empty())
        .map(|k| {
            PublicKey::parse(k.trim()).map_err(|e| {
                Failure::input(format!("--require-signature-by {:?}: {e}", k.trim()))
                    .hint("give a public key as in trusted-public-keys: NAME:BASE64 (`cachepush pubkey FILE` prints it)")
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let sign_unverified = a.sign_unverified || file.sign_unverified.unwrap_or(false);
    let push_issuers = if a.push_oidc_issuer.is_empty() {
        file.push_oidc_issuer
            .take()
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
    } else {
        a.push_oidc_issuer.clone()
    };
    let token_key = pick(a.token_key.clone(), file.token_key.clone());
    let signing_key = pick(a.signing_key.clone(), file.signing_key.clone());
    // Pushing is on with a signing key and a way to push (identity tokens, push-scope
    // tokens); a pushing gateway vouches for what it signed itself without a policy.
    let pushing = signing_key.is_some() && (!push_issuers.is_empty() || token_key.is_some());
    let push = if pushing {
        let key_file = signing_key.clone().unwrap_or_default();
        Some(push_config(
            &a,
            &mut file,
            push_issuers.clone(),
            read_secret_key(&key_file)?,
        )?)
    } else if !push_issuers.is_empty() {
        return Err(Failure::input(
            "--push-oidc-issuer needs --signing-key: the gateway signs what is pushed through it",
        ));
    } else {
        None
    };
    if push.is_some() && matches!(target, TargetUrl::File { .. }) {
        return Err(Failure::input(
            "pushing through the gateway needs an s3:// bucket behind it (pushers upload to presigned URLs)",
        ));
    }
    let signer = match signing_key {
        Some(p) => {
            let key = read_secret_key(&p)?;
            let require_by = if pushing && require_by.is_empty() && !sign_unverified {
                vec![key.public()]
            } else {
                require_by
            };
            let signer = Countersigner::new(key, require_by, sign_unverified)
                .map_err(|e| Failure::input(e.to_string()))?;
            if sign_unverified {
                cachepush::gateway::response::log(
                    "warning: --sign-unverified: every narinfo in the bucket gets the gateway's signature; anyone who can write to the bucket can make clients install anything",
                );
            }
            Some(signer)
        }
        None if !require_by.is_empty() || sign_unverified => {
            return Err(Failure::input(
                "--require-signature-by and --sign-unverified only apply with --signing-key",
            ));
        }
        None => None,
    };
    let htpasswd = pick(a.htpasswd.clone(), file.htpasswd.clone());
    let tokens = pick(a.tokens.clone(), file.tokens.clone());
    let auth_files =
        (htpasswd.is_some() || tokens.is_some()).then(|| (htpasswd.clone(), tokens.clone()));
    let revocations = pick(a.token_revocations.clone(), file.token_revocations.clone());
    let scoped_tokens = match token_key {
        Some(k) => {
            let verifier = Verifier::new(
                super::keys::read_verifying_key(&k, "--token-key")?,
                target_prefix(&target),
                revocations.as_deref(),
            );
            if revocations.is_some() && !verifier.refresh(true) {
                return Err(Failure::input(format!(
                    "--token-revocations {}: cannot be read (create it empty if no token is revoked yet)",
                    revocations
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )));
            }
            Some(Arc::new(verifier))
        }
        None if revocations.is_some() => {
            return Err(Failure::input(
                "--token-revocations only applies with --token-key",
            ));
        }
        None => None,
    };
    let auth = if htpasswd.is_some() || tokens.is_some() || scoped_tokens.is_some() {
        Some(
            Auth::load(htpasswd.as_deref(), tokens.as_deref())
                .map_err(|e| Failure::input(e.to_string()))?
                .with_scoped(scoped_tokens.clone()),
        )
    } else {
        None
    };
    let tls = match (
        pick(a.tls_cert.clone(), file.tls_cert.clone()),
        pick(a.tls_key.clone(), file.tls_key.clone()),
    ) {
        (Some(c), Some(k)) => {
            Some(gateway::load_tls(&c, &k).map_err(|e| Failure::input(e.to_string()))?)
        }
        (None, None) => None,
        _ => return Err(Failure::input("--tls-cert and --tls-key go together")),
    };
    let secs = |flag: Option<u64>, file: Option<u64>, default: u64| {
        Duration::from_secs(pick(flag, file).unwrap_or(default))
    };
    let presign_ttl = secs(a.presign_ttl, file.presign_ttl, 3600);
    if presign_ttl.is_zero() || presign_ttl > Duration::from_secs(7 * 24 * 3600) {
        return Err(Failure::input(
            "--presign-ttl must be between 1 second and 7 days (S3's limit)",
        ));
    }
    let cache_control = pick(a.cache_control.clone(), file.cache_control.clone())
        .unwrap_or_else(|| "auto".into())
        .parse::<CacheControl>()
        .map_err(Failure::input)?;
    // Every connection is a file descriptor, and so is every bucket connection: keep room
    // for the latter below the open-file limit.
    let open_files = gateway::raise_open_file_limit();
    let wanted = pick(a.max_connections, file.max_connections).unwrap_or(4096);
    if wanted == 0 {
        return Err(Failure::input("--max-connections must be at least 1"));
    }
    let max_connections = match open_files {
        Some(n) if (wanted as u64).saturating_add(256) > n => {
            let fit = n.saturating_sub(256).max(16) as usize;
            cachepush::gateway::response::log(&format!(
                "warning: the open-file limit is {n}: serving at most {fit} connections instead of {wanted} (raise LimitNOFILE / ulimit -n)"
            ));
            fit
        }
        _ => wanted,
    };
    let record_interval = match (a.record_interval, &file.record_interval) {
        (Some(s), _) => s,
        (None, Some(text)) => super::gc::parse_duration(text)
            .map_err(|e| Failure::input(format!("record-interval in the config file: {e}")))?,
        (None, None) => 60,
    };
    if record_interval < 1 {
        return Err(Failure::input("--record-interval must be at least 1s"));
    }
    let record_access = (a.record_access || file.record_access.unwrap_or(false))
        .then(|| Duration::from_secs(record_interval as u64));
    let cfg = GatewayConfig {
        record_access,
        auth_files,
        scoped_tokens,
        push,
        listen,
        delivery,
        presign_ttl,
        narinfo_ttl: secs(a.narinfo_ttl, file.narinfo_ttl, 60),
        negative_ttl: secs(a.negative_ttl, file.negative_ttl, 10),
        cache_entries: pick(a.cache_entries, file.cache_entries).unwrap_or(100_000),
        signer,
        auth,
        tls,
        access_log: !(a.quiet || file.quiet.unwrap_or(false)),
        store_dir: pick(a.store_dir.clone(), file.store_dir.clone())
            .unwrap_or_else(|| "/nix/store".into()),
        priority: pick(a.priority, file.priority).unwrap_or(40),
        header_timeout: secs(a.header_timeout, file.header_timeout, 10),
        idle_timeout: secs(a.idle_timeout, file.idle_timeout, 60),
        send_timeout: secs(a.send_timeout, file.send_timeout, 120),
        max_connections,
        auth_failures_per_minute: pick(a.auth_failures_per_minute, file.auth_failures_per_minute)
            .unwrap_or(30),
        cache_control,
    };
    for (name, d) in [
        ("--header-timeout", cfg.header_timeout),
        ("--idle-timeout", cfg.idle_timeout),
        ("--send-timeout", cfg.send_timeout),
    ] {
        if d.is_zero() {
            return Err(Failure::input(format!("{name} must be at least 1 second")));
        }
    }
    if cfg.auth.is_none() {
        let everywhere = cfg.listen.iter().any(|l| match l {
            Listen::Tcp(a) => a.ip().is_unspecified(),
            Listen::Unix(_) => false,
        });
        cachepush::gateway::response::log(&format!(
            "warning: no --htpasswd or --tokens: anyone who can reach the gateway can read the cache{}",
            if everywhere {
                " (it listens on every network interface)"
            } else {
                ""
            }
        ));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::input(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async {
        let storage = open_target(&target, &open_opts).await?;
        // Serve even when the bucket is down or missing now (it may come back); say so
        // loudly. A key that may not list the bucket gets 403 for every missing object,
        // so misses would be 502s: name the permission.
        match storage.check_health().await {
            Ok(()) => {}
            Err(StorageError::Denied { message, .. }) => cachepush::gateway::response::log(&format!(
                "warning: the bucket refused HeadBucket ({message}): the gateway's key needs s3:ListBucket as well as s3:GetObject, or every missing narinfo is answered 502"
            )),
            Err(e) => cachepush::gateway::response::log(&format!(
                "warning: the cache is not usable now ({e}); serving anyway, with 5xx answers and /healthz reporting it until it is"
            )),
        }
        // An address that cannot be bound (in use, not ours) is the environment, not the
        // command line: exit 3, as for a target that cannot be reached.
        // SIGHUP reloads the credential files (and never stops the gateway).
        let reload = super::signal::hangups();
        gateway::serve_reloading(cfg, storage, super::signal::terminated(), reload)
            .await
            .map_err(|e| Failure::target(e.to_string()))
    })?;
    Ok(ExitCode::SUCCESS)
}
