//! Ed25519 signing keys and signatures in Nix's text formats.
//!
//! - secret key: `NAME:base64(32-byte seed || 32-byte public key)`
//! - public key: `NAME:base64(32-byte public key)`
//! - signature:  `NAME:base64(64-byte Ed25519 signature)`
//!
//! A secret key never shows its bytes through `Debug` or `Display`, and is zeroized on drop
//! (ed25519-dalek's `SigningKey` does that).

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} has no ':' between the key name and the base64 key (expected NAME:BASE64)")]
    NoColon { what: &'static str },
    #[error("{what}: the key name is empty (expected NAME:BASE64)")]
    EmptyName { what: &'static str },
    #[error(
        "{what}: the key name {name:?} contains whitespace, a control character or ':' (key names look like cache.example.org-1)"
    )]
    BadName { what: &'static str, name: String },
    #[error(
        "{what}: the key name {name:?} looks like a file path; the name comes first, then the file (cachepush keygen cache.example.org-1 ~/.config/cachepush/cache.sk)"
    )]
    PathAsName { what: &'static str, name: String },
    #[error(
        "this is a public key (\"{name}:...\", 32 bytes), not a secret key: give the secret key file that `cachepush keygen` wrote, which holds the private half"
    )]
    PublicNotSecret { name: String },
    #[error("{what} is not valid base64 after the key name")]
    BadBase64 { what: &'static str },
    #[error(
        "{what} decodes to {got} bytes, expected {expected} (is it truncated, or the other kind of key?)"
    )]
    WrongLength {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("secret key '{name}' is corrupt: its public half does not match its private seed")]
    MismatchedPublicHalf { name: String },
    #[error("public key '{name}' is not a valid Ed25519 point")]
    InvalidPoint { name: String },
    #[error("no random numbers from the operating system: {0}")]
    Random(String),
}

fn split<'a>(what: &'static str, text: &'a str) -> Result<(&'a str, Vec<u8>), KeyError> {
    // Whitespace around the key (a CI secret pasted with a space or a newline) is noise.
    let text = text.trim();
    if text.is_empty() {
        return Err(KeyError::Empty { what });
    }
    let (name, b64) = text.split_once(':').ok_or(KeyError::NoColon { what })?;
    check_name(what, name)?;
    let bytes = B64
        .decode(b64.trim())
        .map_err(|_| KeyError::BadBase64 { what })?;
    Ok((name, bytes))
}

fn check_name(what: &'static str, name: &str) -> Result<(), KeyError> {
    if name.is_empty() {
        return Err(KeyError::EmptyName { what });
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == ':')
    {
        return Err(KeyError::BadName {
            what,
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn exact<const N: usize>(what: &'static str, bytes: &[u8]) -> Result<[u8; N], KeyError> {
    bytes.try_into().map_err(|_| KeyError::WrongLength {
        what,
        got: bytes.len(),
        expected: N,
    })
}

/// A Nix binary-cache secret key.
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// Parses the contents of a secret key file.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        const WHAT: &str = "secret key";
        let (name, bytes) = split(WHAT, text)?;
        if bytes.len() == 32 {
            return Err(KeyError::PublicNotSecret {
                name: name.to_owned(),
            });
        }
        let bytes: [u8; 64] = exact(WHAT, &bytes)?;
        let key =
            SigningKey::from_keypair_bytes(&bytes).map_err(|_| KeyError::MismatchedPublicHalf {
                name: name.to_owned(),
            })?;
        Ok(SecretKey {
            name: name.to_owned(),
            key,
        })
    }

    /// A fresh key from the operating system's random source.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        const WHAT: &str = "the new key";
        check_name(WHAT, name)?;
        // Nix allows any name, but one with a '/' or a key-file ending is almost always
        // keygen's two arguments given the wrong way round.
        if name.contains('/')
            || [".sk", ".pk", ".key", ".pem", ".pub"]
                .iter()
                .any(|e| name.ends_with(e))
        {
            return Err(KeyError::PathAsName {
                what: WHAT,
                name: name.to_owned(),
            });
        }
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SecretKey {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// The text of a secret key file (no trailing newline, as Nix writes it).
    /// Callers must write it only to a file with restrictive permissions.
    pub fn to_file_text(&self) -> zeroize::Zeroizing<String> {
        let bytes = zeroize::Zeroizing::new(self.key.to_keypair_bytes());
        zeroize::Zeroizing::new(format!("{}:{}", self.name, B64.encode(bytes.as_ref())))
    }

    /// Signs a fingerprint (see `narinfo::fingerprint`).
    pub fn sign(&self, fingerprint: &str) -> Signature {
        Signature {
            key_name: self.name.clone(),
            bytes: self.key.sign(fingerprint.as_bytes()).to_bytes(),
        }
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:<redacted>)", self.name)
    }
}

/// A Nix binary-cache public key, as in `trusted-public-keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        const WHAT: &str = "public key";
        let (name, bytes) = split(WHAT, text)?;
        let bytes: [u8; 32] = exact(WHAT, &bytes)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::InvalidPoint {
            name: name.to_owned(),
        })?;
        Ok(PublicKey {
            name: name.to_owned(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when `sig` is by this key (same name) and valid for `fingerprint`.
    pub fn verifies(&self, fingerprint: &str, sig: &Signature) -> bool {
        sig.key_name == self.name
            && self
                .key
                .verify(
                    fingerprint.as_bytes(),
                    &ed25519_dalek::Signature::from_bytes(&sig.bytes),
                )
                .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// One `Sig:` value of a narinfo.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    key_name: String,
    bytes: [u8; 64],
}

impl Signature {
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        const WHAT: &str = "signature";
        let (name, bytes) = split(WHAT, text)?;
        Ok(Signature {
            key_name: name.to_owned(),
            bytes: exact(WHAT, &bytes)?,
        })
    }

    pub fn key_name(&self) -> &str {
        &self.key_name
    }
}

impl Signature {
    /// A signature made by the key named `key_name` (the name is not checked here).
    pub fn from_bytes(key_name: &str, bytes: [u8; 64]) -> Self {
        Signature {
            key_name: key_name.to_owned(),
            bytes,
        }
    }

    pub fn to_bytes(&self) -> [u8; 64] {
        self.bytes
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, B64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_sign_verify_round_trip() {
        let sk = SecretKey::generate("test-1").unwrap();
        let again = SecretKey::parse(&sk.to_file_text()).unwrap();
        assert_eq!(again.public(), sk.public());
        let pk = PublicKey::parse(&sk.public().to_string()).unwrap();
        let sig = sk.sign("1;/nix/store/x;sha256:y;1;");
        let sig = Signature::parse(&sig.to_string()).unwrap();
        assert!(pk.verifies("1;/nix/store/x;sha256:y;1;", &sig));
        assert!(!pk.verifies("1;/nix/store/x;sha256:y;2;", &sig));
        let other = SecretKey::generate("test-1").unwrap().public();
        assert!(!other.verifies("1;/nix/store/x;sha256:y;1;", &sig));
    }

    #[test]
    fn debug_never_shows_secret() {
        let sk = SecretKey::generate("k").unwrap();
        let text = sk.to_file_text();
        let secret_b64 = text.split_once(':').unwrap().1;
        let dbg = format!("{sk:?}");
        assert!(!dbg.contains(secret_b64), "{dbg}");
        assert!(!dbg.contains(&secret_b64[..20]), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn malformed_keys_are_refused_with_reason() {
        let sk = SecretKey::generate("k").unwrap();
        let good = sk.to_file_text().to_string();
        assert!(SecretKey::parse(&good).is_ok());
        assert!(SecretKey::parse(&format!("{good}\n")).is_ok());
        let truncated = &good[..good.len() - 8];
        assert!(matches!(
            SecretKey::parse(truncated),
            Err(KeyError::BadBase64 { .. } | KeyError::WrongLength { .. })
        ));
        // Public half replaced by another key's.
        let other = SecretKey::generate("k").unwrap().to_file_text().to_string();
        let mine = B64.decode(good.split_once(':').unwrap().1).unwrap();
        let theirs = B64.decode(other.split_once(':').unwrap().1).unwrap();
        let mixed = [&mine[..32], &theirs[32..]].concat();
        assert_eq!(
            SecretKey::parse(&format!("k:{}", B64.encode(mixed))).unwrap_err(),
            KeyError::MismatchedPublicHalf { name: "k".into() }
        );
        assert!(matches!(SecretKey::parse(""), Err(KeyError::Empty { .. })));
        assert!(matches!(
            SecretKey::parse("abc"),
            Err(KeyError::NoColon { .. })
        ));
        assert!(matches!(
            SecretKey::parse(&format!(":{}", good.split_once(':').unwrap().1)),
            Err(KeyError::EmptyName { .. })
        ));
        // A public key given where a secret key is expected.
        assert!(matches!(
            SecretKey::parse(&sk.public().to_string()),
            Err(KeyError::PublicNotSecret { .. })
        ));
        assert!(SecretKey::generate("").is_err());
        assert!(SecretKey::generate("a b").is_err());
    }
}
