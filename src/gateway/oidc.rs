//! CI identity tokens (OIDC JWTs) as the right to push.
//!
//! A CI job (GitHub Actions, GitLab CI) asks its platform for a short-lived token that
//! names the job: the repository, the branch, the workflow. The gateway trusts a token
//! when all of these hold, and refuses it otherwise:
//! - its `iss` is one of the configured issuers, exactly;
//! - its header names RS256 or ES256 (never `none`, never HMAC: a public key must not be
//!   usable as a shared secret) and its signature verifies with a key from the issuer's
//!   JWKS, fetched from the issuer's own origin over HTTPS and cached;
//! - `exp` is in the future and `nbf`, when present, is not (60 s of leeway for clocks);
//! - `aud` is, or contains, the configured audience;
//! - every `--push-claim NAME=GLOB` matches the claim's value. A token that passes
//!   everything else but the claim rules may push into the quarantine prefix only when the
//!   quarantine rules (`--push-quarantine-claim`) match it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use thiserror::Error;

/// Clock difference tolerated on `exp` and `nbf`.
const LEEWAY: i64 = 60;
/// Keys older than this are fetched again.
const KEYS_FRESH: Duration = Duration::from_secs(3600);
/// An unknown key id fetches the JWKS again at most this often (a rotated key is found at
/// once; a flood of made-up key ids does not become a flood of fetches).
const REFETCH_EVERY: Duration = Duration::from_secs(1);
/// Largest discovery document or JWKS read.
const MAX_DOCUMENT: usize = 1 << 20;
/// Longest token read (real ones are 1-2 KiB).
pub const MAX_TOKEN: usize = 16 << 10;

/// `NAME=GLOB`: the claim `NAME` must be a string (or number, or boolean) matching `GLOB`,
/// where `*` matches any run of characters (`/` included) and `?` any one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRule {
    pub name: String,
    pub glob: String,
}

impl ClaimRule {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split_once('=') {
            Some((n, g)) if !n.trim().is_empty() && !g.is_empty() => Ok(ClaimRule {
                name: n.trim().to_owned(),
                glob: g.to_owned(),
            }),
            _ => Err(format!(
                "claim rule {text:?} is not NAME=GLOB (e.g. repository=my-org/*)"
            )),
        }
    }

    fn matches(&self, claims: &serde_json::Map<String, Value>) -> bool {
        let value = match claims.get(&self.name) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            _ => return false,
        };
        glob_match(self.glob.as_bytes(), value.as_bytes())
    }
}

/// `*` and `?` globbing, iterative (no backtracking blow-up on long values).
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Which issuers, audience and claims the gateway accepts.
#[derive(Clone, Debug, Default)]
pub struct OidcConfig {
    pub issuers: Vec<String>,
    pub audience: String,
    pub claims: Vec<ClaimRule>,
    /// Where tokens that fail `claims` but match `quarantine_claims` may push.
    pub quarantine_prefix: Option<String>,
    pub quarantine_claims: Vec<ClaimRule>,
    /// Allows `http://` issuers on loopback addresses (tests only).
    pub insecure_http: bool,
}

impl OidcConfig {
    /// Refuses a configuration that would let more in than it seems to.
    pub fn check(&self) -> Result<(), String> {
        if self.issuers.is_empty() {
            return Ok(());
        }
        if self.audience.is_empty() {
            return Err("--push-oidc-issuer needs --push-oidc-audience: without it a token minted for any other service would be accepted".into());
        }
        if self.claims.is_empty() {
            return Err("--push-oidc-issuer needs at least one --push-claim (e.g. repository=my-org/*): without one, every job of every repository on that CI could push".into());
        }
        for i in &self.issuers {
            issuer_origin(i, self.insecure_http)?;
        }
        match (&self.quarantine_prefix, self.quarantine_claims.is_empty()) {
            (Some(_), true) => Err("--push-quarantine-prefix needs at least one --push-quarantine-claim (e.g. repository=my-org/*): without one, any job anywhere could fill the quarantine".into()),
            (None, false) => Err("--push-quarantine-claim needs --push-quarantine-prefix".into()),
            _ => Ok(()),
        }
    }
}

/// `scheme://host[:port]` of an issuer URL; refuses plain HTTP except on loopback with
/// `insecure_http`.
fn issuer_origin(issuer: &str, insecure_http: bool) -> Result<String, String> {
    let (scheme, rest) = issuer
        .split_once("://")
        .ok_or_else(|| format!("OIDC issuer {issuer:?} is not a URL"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.contains('@') {
        return Err(format!("OIDC issuer {issuer:?} has no host"));
    }
    match scheme {
        "https" => {}
        "http" if insecure_http => {
            let name = host
                .rsplit_once(':')
                .map_or(host, |(h, _)| h)
                .trim_matches(['[', ']']);
            let loopback = name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(format!(
                    "OIDC issuer {issuer:?}: --push-oidc-insecure-http allows http:// on a loopback address only"
                ));
            }
        }
        _ => {
            return Err(format!(
                "OIDC issuer {issuer:?} must be https:// (its keys decide who may push)"
            ));
        }
    }
    Ok(format!("{scheme}://{host}"))
}

/// Why a token was refused (logged; the client gets the status only, and a short reason).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OidcRefusal {
    #[error("not a JWT: {0}")]
    Malformed(&'static str),
    #[error("algorithm {0:?} is not accepted (RS256 or ES256)")]
    Algorithm(String),
    #[error("issuer {0:?} is not trusted")]
    Issuer(String),
    #[error("the audience is not {0:?}")]
    Audience(String),
    #[error("expired")]
    Expired,
    #[error("not valid yet")]
    NotYetValid,
    #[error("no key {0:?} in the issuer's JWKS")]
    UnknownKey(String),
    #[error("bad signature")]
    Signature,
    #[error("claim {0:?} does not match the push rules")]
    Claims(String),
    /// The issuer's keys could not be fetched: the token could not be checked (503).
    #[error("cannot fetch the issuer's keys: {0}")]
    Keys(String),
}

impl OidcRefusal {
    /// 503 rather than 401: the token may be fine, the issuer did not answer.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, OidcRefusal::Keys(_))
    }
}

/// Where a verified token may push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OidcIdentity {
    pub issuer: String,
    /// `sub`, for the logs.
    pub subject: String,
    pub quarantine: bool,
}

#[derive(Clone, Debug)]
enum Jwk {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// P-256, as the uncompressed point `04 || x || y`.
    Ec {
        point: Vec<u8>,
    },
}

struct IssuerKeys {
    keys: HashMap<String, Jwk>,
    fetched: Instant,
}

/// Checks CI identity tokens; one per gateway, keys cached per issuer.
pub struct OidcVerifier {
    cfg: OidcConfig,
    http: reqwest::Client,
    keys: tokio::sync::Mutex<HashMap<String, IssuerKeys>>,
}

impl OidcVerifier {
    pub fn new(cfg: OidcConfig) -> Result<Self, String> {
        cfg.check()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client for the OIDC issuers: {e}"))?;
        Ok(OidcVerifier {
            cfg,
            http,
            keys: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &OidcConfig {
        &self.cfg
    }

    /// Verifies `token` at `now` (seconds since the epoch).
    pub async fn verify(&self, token: &str, now: i64) -> Result<OidcIdentity, OidcRefusal> {
        if token.len() > MAX_TOKEN {
            return Err(OidcRefusal::Malformed("too long"));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(OidcRefusal::Malformed("not three dot-separated parts"));
        };
        let header = decode_json(h).ok_or(OidcRefusal::Malformed("header"))?;
        let claims = decode_json(p).ok_or(OidcRefusal::Malformed("payload"))?;
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| OidcRefusal::Malformed("signature"))?;
        let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
        if alg != "RS256" && alg != "ES256" {
            return Err(OidcRefusal::Algorithm(alg.to_owned()));
        }
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
        let Some(issuer) = self
            .cfg
            .issuers
            .iter()
            .find(|i| i.trim_end_matches('/') == iss.trim_end_matches('/'))
        else {
            return Err(OidcRefusal::Issuer(iss.to_owned()));
        };
        let kid = header.get("kid").and_then(Value::as_str).unwrap_or("");
        let key = self.key(issuer, kid, alg).await?;
        let signed = &token[..h.len() + 1 + p.len()];
        let ok = match (&key, alg) {
            (Jwk::Rsa { n, e }, "RS256") => RsaPublicKeyComponents { n, e }
                .verify(
                    &signature::RSA_PKCS1_2048_8192_SHA256,
                    signed.as_bytes(),
                    &sig,
                )
                .is_ok(),
            (Jwk::Ec { point }, "ES256") => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(signed.as_bytes(), &sig)
                    .is_ok()
            }
            _ => false,
        };
        if !ok {
            return Err(OidcRefusal::Signature);
        }
        let exp = claims.get("exp").and_then(Value::as_i64);
        match exp {
            Some(exp) if exp + LEEWAY > now => {}
            _ => return Err(OidcRefusal::Expired),
        }
        if let Some(nbf) = claims.get("nbf").and_then(Value::as_i64)
            && nbf - LEEWAY > now
        {
            return Err(OidcRefusal::NotYetValid);
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == self.cfg.audience,
            Some(Value::Array(a)) => a
                .iter()
                .any(|v| v.as_str() == Some(self.cfg.audience.as_str())),
            _ => false,
        };
        if !aud_ok {
            return Err(OidcRefusal::Audience(self.cfg.audience.clone()));
        }
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let failed = self.cfg.claims.iter().find(|r| !r.matches(&claims));
        let quarantine = match failed {
            None => false,
            Some(rule) => {
                let allowed = self.cfg.quarantine_prefix.is_some()
                    && self
                        .cfg
                        .quarantine_claims
                        .iter()
                        .all(|r| r.matches(&claims));
                if !allowed {
                    return Err(OidcRefusal::Claims(rule.name.clone()));
                }
                true
            }
        };
        Ok(OidcIdentity {
            issuer: issuer.clone(),
            subject,
            quarantine,
        })
    }

    /// The issuer's key `kid` (any key of a matching type when the token names none),
    /// fetching the JWKS when it is stale or does not have it (rotation).
    async fn key(&self, issuer: &str, kid: &str, alg: &str) -> Result<Jwk, OidcRefusal> {
        let mut cache = self.keys.lock().await;
        let pick = |keys: &IssuerKeys| -> Option<Jwk> {
            if kid.is_empty() {
                keys.keys
                    .values()
                    .find(|k| {
                        matches!(
                            (k, alg),
                            (Jwk::Rsa { .. }, "RS256") | (Jwk::Ec { .. }, "ES256")
                        )
                    })
                    .cloned()
            } else {
                keys.keys.get(kid).cloned()
            }
        };
        if let Some(k) = cache.get(issuer) {
            let fresh = k.fetched.elapsed() < KEYS_FRESH;
            match pick(k) {
                Some(key) if fresh => return Ok(key),
                None if k.fetched.elapsed() < REFETCH_EVERY => {
                    return Err(OidcRefusal::UnknownKey(kid.to_owned()));
                }
                _ => {}
            }
        }
        match self.fetch(issuer).await {
            Ok(keys) => {
                let fresh = IssuerKeys {
                    keys,
                    fetched: Instant::now(),
                };
                let found = pick(&fresh);
                cache.insert(issuer.to_owned(), fresh);
                found.ok_or_else(|| OidcRefusal::UnknownKey(kid.to_owned()))
            }
            // A stale key set still answers while the issuer is briefly down.
            Err(e) => match cache.get(issuer).and_then(pick) {
                Some(key) => Ok(key),
                None => Err(OidcRefusal::Keys(e)),
            },
        }
    }

    async fn fetch(&self, issuer: &str) -> Result<HashMap<String, Jwk>, String> {
        let origin = issuer_origin(issuer, self.cfg.insecure_http)?;
        let discovery = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let doc = self.get_json(&discovery).await?;
        let jwks_uri = doc
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or("the discovery document has no jwks_uri")?;
        // The keys must come from where the issuer is: a discovery document that points
        // elsewhere is not followed.
        if !jwks_uri.starts_with(&format!("{origin}/")) {
            return Err(format!(
                "jwks_uri {jwks_uri:?} is not on the issuer's origin {origin}"
            ));
        }
        let jwks = self.get_json(jwks_uri).await?;
        let keys = jwks
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("the JWKS has no keys")?;
        let mut out = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            let kid = k
                .get("kid")
                .and_then(Value::as_str)
                .map_or_else(|| format!("#{i}"), str::to_owned);
            let b = |name: &str| {
                k.get(name)
                    .and_then(Value::as_str)
                    .and_then(|v| URL_SAFE_NO_PAD.decode(v.trim_end_matches('=')).ok())
            };
            let jwk = match (k.get("kty").and_then(Value::as_str), k.get("crv")) {
                (Some("RSA"), _) => match (b("n"), b("e")) {
                    (Some(n), Some(e)) => Jwk::Rsa { n, e },
                    _ => continue,
                },
                (Some("EC"), Some(Value::String(crv))) if crv == "P-256" => {
                    match (b("x"), b("y")) {
                        (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => {
                            let mut point = vec![4u8];
                            point.extend_from_slice(&x);
                            point.extend_from_slice(&y);
                            Jwk::Ec { point }
                        }
                        _ => continue,
                    }
                }
                _ => continue,
            };
            out.insert(kid, jwk);
        }
        Ok(out)
    }

    async fn get_json(&self, url: &str) -> Result<serde_json::Map<String, Value>, String> {
        let mut resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: HTTP {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {e}"))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_DOCUMENT {
                return Err(format!("{url}: larger than {MAX_DOCUMENT} bytes"));
            }
        }
        match serde_json::from_slice(&body) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(format!("{url}: not a JSON object")),
        }
    }
}

fn decode_json(part: &str) -> Option<serde_json::Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_documented() {
        let m = |p: &str, t: &str| glob_match(p.as_bytes(), t.as_bytes());
        assert!(m("my-org/*", "my-org/app"));
        assert!(m("my-org/*", "my-org/a/b"));
        assert!(!m("my-org/*", "my-orgx/app"));
        assert!(!m("my-org/*", "other/my-org/app"));
        assert!(m("refs/heads/main", "refs/heads/main"));
        assert!(!m("refs/heads/main", "refs/heads/main2"));
        assert!(m("refs/tags/v?.*", "refs/tags/v1.2"));
        assert!(m("*", ""));
        assert!(!m("a", ""));
        assert!(m("*a*b*", "xxaxxbxx"));
        assert!(!m("*a*b", "xxbxxa"));
    }

    /// ES256 (GitLab and others may sign so) with a key already fetched: the signature,
    /// an audience list, the claim rules, expiry, and the algorithm allowlist.
    #[tokio::test]
    async fn es256_tokens_are_checked_like_rs256_ones() {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        let issuer = "https://issuer.example";
        let v = OidcVerifier::new(OidcConfig {
            issuers: vec![issuer.into()],
            audience: "aud-1".into(),
            claims: vec![ClaimRule::parse("project_path=acme/*").unwrap()],
            ..Default::default()
        })
        .unwrap();
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        v.keys.lock().await.insert(
            issuer.into(),
            IssuerKeys {
                keys: HashMap::from([(
                    "e1".to_owned(),
                    Jwk::Ec {
                        point: pair.public_key().as_ref().to_vec(),
                    },
                )]),
                fetched: Instant::now(),
            },
        );
        let now = 1_800_000_000;
        let token = |alg: &str, claims: Value| {
            let signed = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(serde_json::json!({"alg": alg, "kid": "e1"}).to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let rng = aws_lc_rs::rand::SystemRandom::new();
            let sig = pair.sign(&rng, signed.as_bytes()).unwrap();
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
        };
        let claims = |project: &str, exp: i64| {
            serde_json::json!({"iss": issuer, "aud": ["other", "aud-1"], "sub": "project_path:x",
                               "project_path": project, "exp": exp})
        };
        let ok = v
            .verify(&token("ES256", claims("acme/app", now + 60)), now)
            .await;
        assert_eq!(ok.map(|i| i.quarantine), Ok(false));
        assert_eq!(
            v.verify(&token("ES256", claims("evil/app", now + 60)), now)
                .await,
            Err(OidcRefusal::Claims("project_path".into()))
        );
        assert_eq!(
            v.verify(&token("ES256", claims("acme/app", now - 61)), now)
                .await,
            Err(OidcRefusal::Expired)
        );
        // An EC key never verifies an RS256 token, and `none` is not an algorithm here.
        assert_eq!(
            v.verify(&token("RS256", claims("acme/app", now + 60)), now)
                .await,
            Err(OidcRefusal::Signature)
        );
        assert_eq!(
            v.verify(&token("none", claims("acme/app", now + 60)), now)
                .await,
            Err(OidcRefusal::Algorithm("none".into()))
        );
    }

    #[test]
    fn rules_and_issuers_are_checked_before_serving() {
        assert!(ClaimRule::parse("repository=org/*").is_ok());
        assert!(ClaimRule::parse("repository").is_err());
        assert!(ClaimRule::parse("=x").is_err());
        let ok = OidcConfig {
            issuers: vec!["https://token.actions.githubusercontent.com".into()],
            audience: "cachepush".into(),
            claims: vec![ClaimRule::parse("repository=org/*").unwrap()],
            ..Default::default()
        };
        assert_eq!(ok.check(), Ok(()));
        let no_claims = OidcConfig {
            claims: vec![],
            ..ok.clone()
        };
        assert!(no_claims.check().unwrap_err().contains("--push-claim"));
        let no_aud = OidcConfig {
            audience: String::new(),
            ..ok.clone()
        };
        assert!(no_aud.check().unwrap_err().contains("audience"));
        let http = OidcConfig {
            issuers: vec!["http://127.0.0.1:9/".into()],
            ..ok.clone()
        };
        assert!(http.check().unwrap_err().contains("https"));
        let http_loopback = OidcConfig {
            insecure_http: true,
            ..http.clone()
        };
        assert_eq!(http_loopback.check(), Ok(()));
        let http_remote = OidcConfig {
            issuers: vec!["http://ci.example.com".into()],
            insecure_http: true,
            ..ok.clone()
        };
        assert!(http_remote.check().unwrap_err().contains("loopback"));
        let open_quarantine = OidcConfig {
            quarantine_prefix: Some("quarantine".into()),
            ..ok.clone()
        };
        assert!(
            open_quarantine
                .check()
                .unwrap_err()
                .contains("--push-quarantine-claim")
        );
    }
}
