//! SHA-256 digests as Nix prints them.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use thiserror::Error;

use super::nix32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    #[error("hash {0:?} is not SHA-256 (expected sha256:<nix32>, sha256:<hex> or sha256-<base64>)")]
    NotSha256(String),
    #[error("hash {0:?} has a malformed digest")]
    BadDigest(String),
}

/// A SHA-256 digest, printed as `sha256:<nix32>` (the narinfo form).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256([u8; 32]);

impl Sha256 {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Sha256(bytes)
    }

    pub fn digest(data: &[u8]) -> Self {
        use sha2::Digest;
        Sha256(sha2::Sha256::digest(data).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The nix32 digest alone (as used in NAR file names).
    pub fn nix32(&self) -> String {
        nix32::encode(&self.0)
    }

    /// `sha256-<base64>`, as `nix path-info --json` prints it.
    pub fn sri(&self) -> String {
        format!("sha256-{}", B64.encode(self.0))
    }

    /// Parses `sha256:<nix32|hex|base64>` or SRI `sha256-<base64>`.
    pub fn parse(text: &str) -> Result<Self, HashError> {
        let bad = || HashError::BadDigest(text.to_owned());
        if let Some(b64) = text.strip_prefix("sha256-") {
            return Self::from_base64(b64).ok_or_else(bad);
        }
        let digest = text
            .strip_prefix("sha256:")
            .ok_or_else(|| HashError::NotSha256(text.to_owned()))?;
        Self::parse_digest(digest).ok_or_else(bad)
    }

    /// Parses a bare digest in any of Nix's encodings, told apart by length.
    pub fn parse_digest(digest: &str) -> Option<Self> {
        match digest.len() {
            52 => nix32::decode_exact::<32>(digest).ok().map(Sha256),
            64 => {
                let mut out = [0u8; 32];
                for (i, chunk) in digest.as_bytes().chunks(2).enumerate() {
                    let hex = std::str::from_utf8(chunk).ok()?;
                    out[i] = u8::from_str_radix(hex, 16).ok()?;
                }
                Some(Sha256(out))
            }
            44 => Self::from_base64(digest),
            _ => None,
        }
    }

    fn from_base64(b64: &str) -> Option<Self> {
        B64.decode(b64).ok()?.try_into().ok().map(Sha256)
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.nix32())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_encodings_agree() {
        let h = Sha256::digest(b"");
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(Sha256::parse(&format!("sha256:{hex}")).unwrap(), h);
        assert_eq!(Sha256::parse(&h.to_string()).unwrap(), h);
        assert_eq!(Sha256::parse(&h.sri()).unwrap(), h);
        assert_eq!(
            h.to_string(),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert!(matches!(
            Sha256::parse("md5:abc"),
            Err(HashError::NotSha256(_))
        ));
        assert!(matches!(
            Sha256::parse("sha256:abc"),
            Err(HashError::BadDigest(_))
        ));
    }
}
