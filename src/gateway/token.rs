//! Scoped tokens: credentials the gateway can check without a list of them, that expire,
//! that name what they allow, and that can be revoked.
//!
//! A token is `cpt1.PAYLOAD.SIGNATURE`: the payload is JSON (key name, scope, cache prefix,
//! issued-at, expiry, a random id), both parts base64url without padding, and the
//! signature is Ed25519 by the gateway's *token key* over `cachepush-token-1.` + the
//! encoded payload. The token key is a key pair of its own (`cachepush keygen`), never the
//! cache's signing key: a leaked token key must not let anyone sign store paths, and the
//! gateway needs only its public half.
//!
//! Who may do what:
//! - whoever holds the token key's secret half issues tokens (`cachepush token issue`);
//! - a token allows exactly its scope (`pull` reads the cache; `push` is for the push API
//!   and does not read), for the cache its prefix names, until its expiry;
//! - whoever can write the revocation file revokes tokens by id (`cachepush token revoke`);
//!   the gateway rereads it when it changes and refuses every scoped token while it cannot
//!   read it (fail closed).
//!
//! The token itself is a secret: it is never logged (only its id, which grants nothing)
//! and never taken on a command line.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::format::keys::{PublicKey, SecretKey, Signature};

/// What every scoped token starts with.
pub const PREFIX: &str = "cpt1.";
/// What the signature covers besides the payload: a token signature can never be taken
/// for a narinfo signature or the other way round.
const CONTEXT: &str = "cachepush-token-1.";
/// Tokens longer than this are refused unread.
const MAX_LEN: usize = 2048;
/// How far in the future a token's issue time may be (clocks of issuer and gateway).
const SKEW: i64 = 60;
/// How often the revocation file's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(5);

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Pull,
    Push,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "pull" => Some(Scope::Pull),
            "push" => Some(Scope::Push),
            _ => None,
        }
    }
}

/// What a token says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// The name of the token key that signed it.
    pub kid: String,
    pub scope: Scope,
    /// The cache it is for: the key prefix in the bucket (empty for the bucket's root).
    pub prefix: String,
    pub iat: i64,
    pub exp: i64,
    /// Random id, for revocation and logs.
    pub jti: String,
}

/// Why a token was refused. The messages name no secret.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("a malformed scoped token")]
    Malformed,
    #[error("a scoped token signed by another key")]
    BadSignature,
    #[error("an expired token (id {0})")]
    Expired(String),
    #[error("a token issued in the future (id {0}; check the clocks)")]
    NotYetValid(String),
    #[error("a {have:?} token (id {id}) used to {need:?}")]
    WrongScope {
        id: String,
        have: Scope,
        need: Scope,
    },
    #[error("a token (id {id}) for another cache ({prefix:?})")]
    OtherCache { id: String, prefix: String },
    #[error("a revoked token (id {0})")]
    Revoked(String),
    #[error("a scoped token while the revocation list cannot be read")]
    RevocationsUnreadable,
}

#[derive(Debug, Error)]
pub enum TokenError {
    #[error("--expires must be more than zero seconds")]
    NoLifetime,
    #[error("--prefix {0:?} must not start or end with '/'")]
    BadPrefix(String),
    #[error("{0}")]
    Malformed(&'static str),
}

fn now() -> i64 {
    crate::host::now()
}

/// Issues a token signed by `key`, valid for `ttl` from now.
pub fn issue(
    key: &SecretKey,
    scope: Scope,
    prefix: &str,
    ttl: Duration,
) -> Result<(String, Claims), TokenError> {
    if ttl.is_zero() {
        return Err(TokenError::NoLifetime);
    }
    if prefix.starts_with('/') || prefix.ends_with('/') {
        return Err(TokenError::BadPrefix(prefix.to_owned()));
    }
    let iat = now();
    let claims = Claims {
        kid: key.name().to_owned(),
        scope,
        prefix: prefix.to_owned(),
        iat,
        exp: iat.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
        jti: crate::host::random_id(),
    };
    let payload =
        B64.encode(serde_json::to_vec(&claims).map_err(|_| TokenError::Malformed("claims"))?);
    let sig = key.sign(&format!("{CONTEXT}{payload}"));
    Ok((
        format!("{PREFIX}{payload}.{}", B64.encode(sig.to_bytes())),
        claims,
    ))
}

/// The claims of a token without checking its signature: for `token revoke` and
/// `token show`, never for a decision.
pub fn read_unverified(token: &str) -> Result<(Claims, String, [u8; 64]), Refusal> {
    let token = token.trim();
    if token.len() > MAX_LEN {
        return Err(Refusal::Malformed);
    }
    let rest = token.strip_prefix(PREFIX).ok_or(Refusal::Malformed)?;
    let (payload, sig) = rest.split_once('.').ok_or(Refusal::Malformed)?;
    let json = B64.decode(payload).map_err(|_| Refusal::Malformed)?;
    let claims: Claims = serde_json::from_slice(&json).map_err(|_| Refusal::Malformed)?;
    let sig: [u8; 64] = B64
        .decode(sig)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(Refusal::Malformed)?;
    Ok((claims, payload.to_owned(), sig))
}

/// Checks scoped tokens for one gateway: its token key, the cache it serves, and the
/// revocation list.
pub struct Verifier {
    key: PublicKey,
    prefix: String,
    revocations: Option<PathBuf>,
    revoked: Mutex<Revoked>,
}

struct Revoked {
    ids: Option<HashSet<String>>,
    modified: Option<SystemTime>,
    checked: Option<Instant>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({}, prefix {:?})", self.key.name(), self.prefix)
    }
}

/// The ids in a revocation file: one per line; `#` starts a comment.
pub fn parse_revocations(text: &str) -> HashSet<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Verifier {
    pub fn new(key: PublicKey, prefix: &str, revocations: Option<&Path>) -> Verifier {
        let v = Verifier {
            key,
            prefix: prefix.to_owned(),
            revocations: revocations.map(Path::to_owned),
            revoked: Mutex::new(Revoked {
                ids: None,
                modified: None,
                checked: None,
            }),
        };
        v.refresh(true);
        v
    }

    pub fn key_name(&self) -> &str {
        self.key.name()
    }

    /// Rereads the revocation file when it changed (at most every few seconds unless
    /// `force`). `false` when it cannot be read.
    pub fn refresh(&self, force: bool) -> bool {
        let Some(path) = &self.revocations else {
            return true;
        };
        let mut r = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        if !force && r.checked.is_some_and(|t| t.elapsed() < RECHECK) {
            return r.ids.is_some();
        }
        r.checked = Some(Instant::now());
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if !force && modified.is_some() && modified == r.modified && r.ids.is_some() {
            return true;
        }
        match std::fs::read_to_string(path) {
            Ok(text) => {
                r.ids = Some(parse_revocations(&text));
                r.modified = modified;
                true
            }
            Err(_) => {
                r.ids = None;
                r.modified = None;
                false
            }
        }
    }

    /// The claims of `token` when it allows `need` on this gateway's cache now.
    pub fn verify(&self, token: &str, need: Scope) -> Result<Claims, Refusal> {
        let (claims, payload, sig) = read_unverified(token)?;
        let sig = Signature::from_bytes(&claims.kid, sig);
        if !self.key.verifies(&format!("{CONTEXT}{payload}"), &sig) {
            return Err(Refusal::BadSignature);
        }
        let t = now();
        if claims.exp <= t {
            return Err(Refusal::Expired(claims.jti));
        }
        if claims.iat > t + SKEW {
            return Err(Refusal::NotYetValid(claims.jti));
        }
        if claims.scope != need {
            return Err(Refusal::WrongScope {
                id: claims.jti,
                have: claims.scope,
                need,
            });
        }
        if claims.prefix != self.prefix {
            return Err(Refusal::OtherCache {
                id: claims.jti,
                prefix: claims.prefix,
            });
        }
        if self.revocations.is_some() {
            self.refresh(false);
            let r = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
            match &r.ids {
                None => return Err(Refusal::RevocationsUnreadable),
                Some(ids) if ids.contains(&claims.jti) => return Err(Refusal::Revoked(claims.jti)),
                Some(_) => {}
            }
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> SecretKey {
        SecretKey::generate(name).unwrap()
    }

    fn day() -> Duration {
        Duration::from_secs(86_400)
    }

    /// A token with chosen claims, signed by `k`.
    fn forge(k: &SecretKey, claims: &Claims) -> String {
        let payload = B64.encode(serde_json::to_vec(claims).unwrap());
        let sig = k.sign(&format!("{CONTEXT}{payload}"));
        format!("{PREFIX}{payload}.{}", B64.encode(sig.to_bytes()))
    }

    #[test]
    fn a_token_allows_its_scope_on_its_cache_until_it_expires() {
        let k = key("tokens-1");
        let v = Verifier::new(k.public(), "team", None);
        let (pull, claims) = issue(&k, Scope::Pull, "team", day()).unwrap();
        assert_eq!(v.verify(&pull, Scope::Pull).unwrap(), claims);
        // The same with surrounding whitespace (a netrc line, a file with a newline).
        assert!(v.verify(&format!("{pull}\n"), Scope::Pull).is_ok());
        // Pull and push are separate rights, both ways.
        assert!(matches!(
            v.verify(&pull, Scope::Push),
            Err(Refusal::WrongScope { .. })
        ));
        let (push, _) = issue(&k, Scope::Push, "team", day()).unwrap();
        assert!(matches!(
            v.verify(&push, Scope::Pull),
            Err(Refusal::WrongScope { .. })
        ));
        assert!(v.verify(&push, Scope::Push).is_ok());
        // Another cache.
        let (other, _) = issue(&k, Scope::Pull, "other", day()).unwrap();
        assert!(matches!(
            v.verify(&other, Scope::Pull),
            Err(Refusal::OtherCache { .. })
        ));
        let (root, _) = issue(&k, Scope::Pull, "", day()).unwrap();
        assert!(matches!(
            v.verify(&root, Scope::Pull),
            Err(Refusal::OtherCache { .. })
        ));
        // Expired, and issued in the future.
        let mut c = claims.clone();
        c.exp = now() - 1;
        assert!(matches!(
            v.verify(&forge(&k, &c), Scope::Pull),
            Err(Refusal::Expired(_))
        ));
        let mut c = claims.clone();
        c.iat = now() + 3600;
        c.exp = now() + 7200;
        assert!(matches!(
            v.verify(&forge(&k, &c), Scope::Pull),
            Err(Refusal::NotYetValid(_))
        ));
        assert!(issue(&k, Scope::Pull, "team", Duration::ZERO).is_err());
        assert!(issue(&k, Scope::Pull, "/team", day()).is_err());
    }

    #[test]
    fn forged_altered_and_malformed_tokens_are_refused() {
        let k = key("tokens-1");
        let v = Verifier::new(k.public(), "", None);
        let (t, claims) = issue(&k, Scope::Pull, "", day()).unwrap();
        // Another key of the same name.
        let (forged, _) = issue(&key("tokens-1"), Scope::Pull, "", day()).unwrap();
        assert_eq!(v.verify(&forged, Scope::Pull), Err(Refusal::BadSignature));
        // A payload changed after signing (a push scope grafted onto a pull token).
        let mut c = claims.clone();
        c.scope = Scope::Push;
        let payload = B64.encode(serde_json::to_vec(&c).unwrap());
        let sig = t.rsplit_once('.').unwrap().1;
        let grafted = format!("{PREFIX}{payload}.{sig}");
        assert_eq!(v.verify(&grafted, Scope::Push), Err(Refusal::BadSignature));
        // No signature at all ("alg: none"), a short one, garbage, unknown fields, huge.
        let unsigned = format!(
            "{PREFIX}{}.",
            t.strip_prefix(PREFIX).unwrap().split('.').next().unwrap()
        );
        for bad in [
            unsigned.as_str(),
            &t[..t.len() - 4],
            "cpt1.",
            "cpt1.x.y",
            "Bearer cpt1",
            &"cpt1.".repeat(1000),
        ] {
            assert_eq!(
                v.verify(bad, Scope::Pull),
                Err(Refusal::Malformed),
                "{bad:.40}"
            );
        }
        let extra = B64.encode(br#"{"kid":"tokens-1","scope":"pull","prefix":"","iat":0,"exp":99999999999,"jti":"x","admin":true}"#);
        let sig = k.sign(&format!("{CONTEXT}{extra}"));
        let t2 = format!("{PREFIX}{extra}.{}", B64.encode(sig.to_bytes()));
        assert_eq!(v.verify(&t2, Scope::Pull), Err(Refusal::Malformed));
        // A narinfo-style signature over the bare payload does not verify.
        let payload = t.strip_prefix(PREFIX).unwrap().split('.').next().unwrap();
        let bare = k.sign(payload);
        let t3 = format!("{PREFIX}{payload}.{}", B64.encode(bare.to_bytes()));
        assert_eq!(v.verify(&t3, Scope::Pull), Err(Refusal::BadSignature));
    }

    #[test]
    fn revoked_tokens_are_refused_and_an_unreadable_list_refuses_all() {
        let tmp = tempfile::tempdir().unwrap();
        let list = tmp.path().join("revoked");
        std::fs::write(&list, "# revoked tokens\n").unwrap();
        let k = key("tokens-1");
        let v = Verifier::new(k.public(), "", Some(&list));
        let (a, ca) = issue(&k, Scope::Pull, "", day()).unwrap();
        let (b, _) = issue(&k, Scope::Pull, "", day()).unwrap();
        assert!(v.verify(&a, Scope::Pull).is_ok());
        std::fs::write(&list, format!("{}  # laptop stolen\n", ca.jti)).unwrap();
        assert!(v.refresh(true));
        assert_eq!(
            v.verify(&a, Scope::Pull),
            Err(Refusal::Revoked(ca.jti.clone()))
        );
        assert!(v.verify(&b, Scope::Pull).is_ok());
        std::fs::remove_file(&list).unwrap();
        assert!(!v.refresh(true));
        assert_eq!(
            v.verify(&b, Scope::Pull),
            Err(Refusal::RevocationsUnreadable)
        );
    }
}
