//! Client authentication: HTTP Basic against an htpasswd file with bcrypt entries (what Nix
//! sends from its netrc file), and bearer tokens from a file.
//!
//! bcrypt is deliberately slow (tens of milliseconds), and Nix sends the same credentials
//! with every request, so a verified credential is remembered for a while by its SHA-256:
//! later requests cost one hash and a map lookup. Only successes are remembered.
//!
//! A token may also be given as the password of Basic auth (any user name), so that Nix
//! clients, which can only send Basic from netrc, can use tokens too. Scoped tokens
//! (`cpt1.`..., [`super::token`]) are checked by signature, scope, cache and expiry
//! instead of by a list; here a request needs the `pull` scope.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;

use super::token::{self, Refusal, Scope, Verifier};

/// Credentials longer than this are refused without looking at them.
const MAX_CREDENTIAL_LEN: usize = 4096;
/// How long a verified credential is trusted without running bcrypt again.
const VERIFIED_TTL: Duration = Duration::from_secs(600);
/// Bound on remembered credentials (each is 32 bytes and an instant).
const VERIFIED_MAX: usize = 10_000;
/// Highest bcrypt cost accepted in an htpasswd file: each step doubles the CPU time of a
/// check (cost 14 is about a second per login on one core), and a file with a huge cost
/// would let anyone keep the gateway busy with wrong passwords.
pub const MAX_BCRYPT_COST: u32 = 14;

fn bcrypt_cost(hash: &str) -> Option<u32> {
    hash.get(4..6)?.parse().ok()
}

#[derive(Debug, Error)]
pub enum AuthFileError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}: {why}")]
    Bad {
        file: String,
        line: usize,
        why: &'static str,
    },
    #[error("{file}: no entries")]
    Empty { file: String },
}

pub struct Auth {
    /// user → bcrypt hash
    users: HashMap<String, String>,
    /// SHA-256 of each token; compared in constant time.
    tokens: Vec<[u8; 32]>,
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    /// A bcrypt hash to verify against for unknown users, so that a wrong user name takes
    /// as long as a wrong password.
    dummy: String,
    pub realm: String,
    /// Checks scoped tokens, when a token key is configured (shared across reloads).
    scoped: Option<std::sync::Arc<Verifier>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Auth({} users, {} tokens)",
            self.users.len(),
            self.tokens.len()
        )
    }
}

fn read(file: &Path) -> Result<String, AuthFileError> {
    std::fs::read_to_string(file).map_err(|source| AuthFileError::Read {
        file: file.display().to_string(),
        source,
    })
}

/// Parses an htpasswd file; only bcrypt entries (`htpasswd -B`) are accepted.
pub fn parse_htpasswd(file: &str, text: &str) -> Result<HashMap<String, String>, AuthFileError> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why| AuthFileError::Bad {
            file: file.to_owned(),
            line: i + 1,
            why,
        };
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| bad("expected user:hash"))?;
        if user.is_empty() {
            return Err(bad("empty user name"));
        }
        if !["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) || hash.len() != 60 {
            return Err(bad(
                "only bcrypt entries are supported; create them with `htpasswd -nB USER`",
            ));
        }
        match bcrypt_cost(hash) {
            Some(c) if (4..=MAX_BCRYPT_COST).contains(&c) => {}
            _ => {
                return Err(bad(
                    "bcrypt cost must be 4 to 14 (each step doubles the time of every login check); re-create the entry with `htpasswd -nB -C 10 USER`",
                ));
            }
        }
        if users.insert(user.to_owned(), hash.to_owned()).is_some() {
            return Err(bad("user listed twice"));
        }
    }
    if users.is_empty() {
        return Err(AuthFileError::Empty { file: file.into() });
    }
    Ok(users)
}

/// Parses a tokens file: one token per line, `#` comments.
pub fn parse_tokens(file: &str, text: &str) -> Result<Vec<[u8; 32]>, AuthFileError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.len() < 16 || line.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(AuthFileError::Bad {
                file: file.to_owned(),
                line: i + 1,
                why: "a token must be at least 16 printable characters without spaces (e.g. `openssl rand -hex 32`)",
            });
        }
        out.push(Sha256::digest(line.as_bytes()).into());
    }
    if out.is_empty() {
        return Err(AuthFileError::Empty { file: file.into() });
    }
    Ok(out)
}

impl Auth {
    pub fn load(htpasswd: Option<&Path>, tokens: Option<&Path>) -> Result<Self, AuthFileError> {
        let users = match htpasswd {
            Some(p) => parse_htpasswd(&p.display().to_string(), &read(p)?)?,
            None => HashMap::new(),
        };
        let tokens = match tokens {
            Some(p) => parse_tokens(&p.display().to_string(), &read(p)?)?,
            None => Vec::new(),
        };
        Ok(Self::new(users, tokens))
    }

    pub fn new(users: HashMap<String, String>, tokens: Vec<[u8; 32]>) -> Self {
        // The highest cost among the real entries, so that an unknown user takes at least
        // as long as any known one and timing does not tell them apart.
        let cost = users
            .values()
            .filter_map(|h| bcrypt_cost(h))
            .max()
            .unwrap_or(bcrypt::DEFAULT_COST);
        let dummy = bcrypt::hash("cachepush-dummy", cost)
            .unwrap_or_else(|_| "$2b$04$".to_owned() + &"a".repeat(53));
        Auth {
            users,
            tokens,
            verified: Mutex::new(HashMap::new()),
            dummy,
            realm: "cachepush".into(),
            scoped: None,
        }
    }

    /// Also accepts scoped tokens that `verifier` admits for pulling.
    pub fn with_scoped(mut self, verifier: Option<std::sync::Arc<Verifier>>) -> Self {
        self.scoped = verifier;
        self
    }

    /// The verdict on a scoped token, when this is one and scoped tokens are on.
    fn scoped_token(&self, candidate: &[u8]) -> Option<Result<(), Refusal>> {
        let v = self.scoped.as_ref()?;
        let t = std::str::from_utf8(candidate).ok()?;
        t.starts_with(token::PREFIX)
            .then(|| v.verify(t, Scope::Pull).map(|_| ()))
    }

    fn is_token(&self, candidate: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(candidate).into();
        // Every entry is compared, with no early exit.
        self.tokens
            .iter()
            .fold(subtle::Choice::from(0), |acc, t| acc | t.ct_eq(&digest))
            .into()
    }

    fn remembered(&self, key: &[u8; 32]) -> bool {
        let Ok(mut v) = self.verified.lock() else {
            return false;
        };
        match v.get(key) {
            Some(t) if t.elapsed() < VERIFIED_TTL => true,
            Some(_) => {
                v.remove(key);
                false
            }
            None => false,
        }
    }

    fn remember(&self, key: [u8; 32]) {
        if let Ok(mut v) = self.verified.lock() {
            if v.len() >= VERIFIED_MAX {
                v.retain(|_, t| t.elapsed() < VERIFIED_TTL);
                if v.len() >= VERIFIED_MAX {
                    v.clear();
                }
            }
            v.insert(key, Instant::now());
        }
    }

    /// Checks an `Authorization` header value. Runs bcrypt at most once per credential
    /// per [`VERIFIED_TTL`], so call it where blocking is allowed; [`Auth::check_cached`]
    /// first answers every case that needs no bcrypt.
    pub fn check(&self, header: Option<&[u8]>) -> bool {
        self.decide(header, true).unwrap_or(false)
    }

    /// The answer when it needs no bcrypt run (tokens, remembered and malformed
    /// credentials); `None` when it does.
    pub fn check_cached(&self, header: Option<&[u8]>) -> Option<bool> {
        self.decide(header, false)
    }

    /// Why a credential that [`Auth::check`] refused was refused, for the log: without
    /// bcrypt, and without the secret (user names only, cut to 64 characters).
    pub fn refusal(&self, header: Option<&[u8]>) -> String {
        let Some(h) = header else {
            return "no credentials".into();
        };
        let Some(h) = std::str::from_utf8(h)
            .ok()
            .filter(|h| h.len() <= MAX_CREDENTIAL_LEN)
        else {
            return "malformed credentials".into();
        };
        let (scheme, value) = h.trim().split_once(' ').unwrap_or((h, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            return match self.scoped_token(value.trim().as_bytes()) {
                Some(Err(why)) => why.to_string(),
                _ => "unknown token".into(),
            };
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return "an authentication scheme other than Basic or Bearer".into();
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok());
        let Some((user, pass)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
            return "malformed credentials".into();
        };
        if let Some(Err(why)) = self.scoped_token(pass.as_bytes()) {
            return why.to_string();
        }
        let shown: String = user.chars().filter(|c| !c.is_control()).take(64).collect();
        if self.users.contains_key(user) {
            format!("wrong password for user {shown:?}")
        } else {
            format!("unknown user {shown:?}")
        }
    }

    /// How many users and tokens the files held.
    pub fn entries(&self) -> (usize, usize) {
        (self.users.len(), self.tokens.len())
    }

    fn decide(&self, header: Option<&[u8]>, slow: bool) -> Option<bool> {
        let Some(h) = header else { return Some(false) };
        if h.len() > MAX_CREDENTIAL_LEN {
            return Some(false);
        }
        let Ok(h) = std::str::from_utf8(h) else {
            return Some(false);
        };
        let (scheme, value) = h.trim().split_once(' ').unwrap_or((h, ""));
        let value = value.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            if let Some(verdict) = self.scoped_token(value.as_bytes()) {
                return Some(verdict.is_ok());
            }
            return Some(!self.tokens.is_empty() && self.is_token(value.as_bytes()));
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return Some(false);
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(value) else {
            return Some(false);
        };
        let Some(colon) = decoded.iter().position(|&b| b == b':') else {
            return Some(false);
        };
        let (user, pass) = (&decoded[..colon], &decoded[colon + 1..]);
        if let Some(verdict) = self.scoped_token(pass) {
            return Some(verdict.is_ok());
        }
        if !self.tokens.is_empty() && self.is_token(pass) {
            return Some(true);
        }
        let mut key = Sha256::new();
        key.update(b"basic\0");
        key.update(&decoded);
        let key: [u8; 32] = key.finalize().into();
        if self.remembered(&key) {
            return Some(true);
        }
        if !slow {
            return None;
        }
        let user = String::from_utf8_lossy(user);
        let ok = match self.users.get(user.as_ref()) {
            // bcrypt reads only 72 bytes of a password: a longer one is refused rather than
            // accepted on its prefix.
            Some(hash) => bcrypt::non_truncating_verify(pass, hash).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(pass, &self.dummy);
                false
            }
        };
        if ok {
            self.remember(key);
        }
        Some(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, pass: &str) -> Vec<u8> {
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        format!("Basic {enc}").into_bytes()
    }

    #[test]
    fn basic_and_bearer() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let users = parse_htpasswd("f", &format!("alice:{hash}\n")).unwrap();
        let tokens = parse_tokens("t", "# ci\n0123456789abcdef0123\n").unwrap();
        let a = Auth::new(users, tokens);
        assert_eq!(a.check_cached(Some(&basic("alice", "s3cret"))), None);
        assert!(a.check(Some(&basic("alice", "s3cret"))));
        // The second time comes from the verified cache.
        assert_eq!(a.check_cached(Some(&basic("alice", "s3cret"))), Some(true));
        assert!(!a.check(Some(&basic("alice", "s3cre"))));
        assert_eq!(
            a.refusal(Some(&basic("alice", "s3cre"))),
            "wrong password for user \"alice\""
        );
        assert_eq!(
            a.refusal(Some(&basic("mallory", "x"))),
            "unknown user \"mallory\""
        );
        assert_eq!(a.refusal(None), "no credentials");
        assert_eq!(a.refusal(Some(b"Bearer nope")), "unknown token");
        assert_eq!(a.refusal(Some(b"Basic %%%")), "malformed credentials");
        assert!(!a.check(Some(&basic("bob", "s3cret"))));
        assert!(a.check(Some(b"Bearer 0123456789abcdef0123")));
        assert!(!a.check(Some(b"Bearer 0123456789abcdef012")));
        assert!(a.check(Some(&basic("anyone", "0123456789abcdef0123"))));
        assert!(!a.check(None));
        assert!(!a.check(Some(b"Basic !!!")));
        assert!(!a.check(Some(b"Basic")));
        assert!(!a.check(Some(b"Digest x")));
        assert!(!a.check(Some(&[0xff, 0xfe])));
        assert!(!a.check(Some(&vec![b'a'; 5000])));
    }

    #[test]
    fn bad_files_name_the_line() {
        let e = parse_htpasswd("pw", "alice:{SHA}abc\n").unwrap_err();
        assert!(e.to_string().starts_with("pw:1: only bcrypt"), "{e}");
        let e = parse_htpasswd("pw", "\nnocolon\n").unwrap_err();
        assert_eq!(e.to_string(), "pw:2: expected user:hash");
        let e = parse_tokens("tk", "short\n").unwrap_err();
        assert!(e.to_string().starts_with("tk:1: a token must be"), "{e}");
        assert!(parse_tokens("tk", "# only a comment\n").is_err());
        // Cost: 15 and above refused, naming what to run; 4..=14 accepted.
        // (A cost-4 hash relabelled: parsing reads the label, and hashing at 15 is slow.)
        let costly = bcrypt::hash("x", 4).unwrap().replacen("$04$", "$15$", 1);
        let e = parse_htpasswd("pw", &format!("alice:{costly}\n")).unwrap_err();
        assert!(e.to_string().contains("htpasswd -nB -C 10"), "{e}");
        let ok = bcrypt::hash("x", 4).unwrap();
        assert!(parse_htpasswd("pw", &format!("alice:{ok}\n")).is_ok());
    }

    #[test]
    fn passwords_past_72_bytes_are_not_checked_on_their_prefix() {
        let long = "p".repeat(80);
        let hash = bcrypt::hash(&long, 4).unwrap();
        let users = parse_htpasswd("f", &format!("alice:{hash}\n")).unwrap();
        let a = Auth::new(users, vec![]);
        let prefix_twin = format!("{}{}", &long[..72], "q".repeat(8));
        assert!(!a.check(Some(&basic("alice", &prefix_twin))));
        let short = bcrypt::hash("s3cret", 4).unwrap();
        let a = Auth::new(
            parse_htpasswd("f", &format!("alice:{short}\n")).unwrap(),
            vec![],
        );
        assert!(a.check(Some(&basic("alice", "s3cret"))));
    }
}
