//! Countersigning at the gateway: which narinfos get the gateway key's signature.
//!
//! A signing gateway turns whatever it signs into something clients trust, so the decision
//! is the whole of its security: bucket write access must not become the power to make
//! clients install arbitrary content (security review H2). The rule:
//!
//! - the narinfo's `StorePath` must be the path the client asked for (its hash is the
//!   object's name), or nothing is served;
//! - by default the gateway signs only narinfos that already carry a valid signature by a
//!   key given with `--require-signature-by` (or by its own key); anything else is served
//!   exactly as stored, so clients that trust only the gateway refuse it, and the log says
//!   why;
//! - `--sign-unverified` signs everything, for buckets whose every writer is trusted as
//!   much as the gateway key itself. It must be asked for by name.

use bytes::Bytes;
use thiserror::Error;

use crate::format::{NarInfo, PublicKey, SecretKey};

/// Which narinfos may be signed.
pub struct Countersigner {
    key: SecretKey,
    /// Signatures that vouch for a narinfo: the required keys plus the gateway's own.
    vouchers: Vec<PublicKey>,
    unverified: bool,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignPolicyError {
    #[error(
        "--signing-key needs --require-signature-by KEY (sign only narinfos signed by a key you trust) or --sign-unverified (sign everything in the bucket)"
    )]
    NoPolicy,
    #[error("--require-signature-by and --sign-unverified exclude each other")]
    Both,
}

/// Why a narinfo is not served at all.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignRefusal {
    #[error("unreadable narinfo in the bucket: {0}")]
    Unreadable(String),
    #[error("the narinfo names {found}, not the requested hash")]
    WrongPath { found: String },
}

/// What the gateway serves for a narinfo.
#[derive(Debug, PartialEq, Eq)]
pub enum Countersigned {
    /// Verified (or `--sign-unverified`) and now signed by the gateway key.
    Signed(Bytes),
    /// No valid signature by a required key: served as stored, without the gateway's.
    Unvouched(Bytes),
}

impl Countersigner {
    pub fn new(
        key: SecretKey,
        require_signature_by: Vec<PublicKey>,
        sign_unverified: bool,
    ) -> Result<Self, SignPolicyError> {
        match (require_signature_by.is_empty(), sign_unverified) {
            (true, false) => return Err(SignPolicyError::NoPolicy),
            (false, true) => return Err(SignPolicyError::Both),
            _ => {}
        }
        let mut vouchers = require_signature_by;
        vouchers.push(key.public());
        Ok(Countersigner {
            key,
            vouchers,
            unverified: sign_unverified,
        })
    }

    pub fn public(&self) -> PublicKey {
        self.key.public()
    }

    /// Decides for the narinfo stored under `<requested_hash>.narinfo`.
    pub fn apply(&self, requested_hash: &str, text: &[u8]) -> Result<Countersigned, SignRefusal> {
        let parsed = std::str::from_utf8(text)
            .map_err(|e| SignRefusal::Unreadable(e.to_string()))
            .and_then(|t| NarInfo::parse(t).map_err(|e| SignRefusal::Unreadable(e.to_string())))?;
        if parsed.store_path.hash_part() != requested_hash {
            return Err(SignRefusal::WrongPath {
                found: parsed.store_path.to_string(),
            });
        }
        if !self.unverified && !parsed.is_signed_by_any(&self.vouchers) {
            return Ok(Countersigned::Unvouched(Bytes::copy_from_slice(text)));
        }
        let mut ni = parsed;
        // Replaces a signature under the gateway's key name that does not verify.
        ni.sign(&self.key);
        Ok(Countersigned::Signed(Bytes::from(ni.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Sha256, StoreDir};

    fn narinfo(path: &str) -> NarInfo {
        let dir = StoreDir::default();
        NarInfo {
            store_path: dir.parse_path(path).unwrap(),
            store_dir: dir,
            url: "nar/x.nar".into(),
            compression: "none".into(),
            file_hash: None,
            file_size: None,
            nar_hash: Sha256::digest(b"nar"),
            nar_size: 3,
            references: vec![],
            deriver: None,
            system: None,
            sigs: vec![],
            ca: None,
            extra: vec![],
        }
    }

    const HASH: &str = "h7jx3wrzn6m9vjl9604id854qx1xyqw6";

    fn path() -> String {
        format!("/nix/store/{HASH}-hello")
    }

    #[test]
    fn a_signing_key_alone_is_refused() {
        let gw = SecretKey::generate("gw-1").unwrap();
        assert_eq!(
            Countersigner::new(gw, vec![], false).err(),
            Some(SignPolicyError::NoPolicy)
        );
        let gw = SecretKey::generate("gw-1").unwrap();
        let ci = SecretKey::generate("ci-1").unwrap();
        assert_eq!(
            Countersigner::new(gw, vec![ci.public()], true).err(),
            Some(SignPolicyError::Both)
        );
    }

    #[test]
    fn only_narinfos_vouched_for_by_a_required_key_are_signed() {
        let gw = SecretKey::generate("gw-1").unwrap();
        let gw_pub = gw.public();
        let ci = SecretKey::generate("ci-1").unwrap();
        let intruder = SecretKey::generate("ci-1").unwrap();
        let signer = Countersigner::new(gw, vec![ci.public()], false).unwrap();

        // Signed by the trusted CI key: countersigned, and the result verifies.
        let mut good = narinfo(&path());
        good.sign(&ci);
        let out = signer.apply(HASH, good.to_string().as_bytes()).unwrap();
        let Countersigned::Signed(b) = out else {
            panic!("{out:?}")
        };
        let signed = NarInfo::parse(std::str::from_utf8(&b).unwrap()).unwrap();
        assert!(signed.is_signed_by_any(std::slice::from_ref(&gw_pub)));

        // Unsigned, and signed by a key of the same name but other bytes: left alone.
        let unsigned = narinfo(&path()).to_string();
        let mut forged = narinfo(&path());
        forged.sign(&intruder);
        for text in [unsigned, forged.to_string()] {
            assert_eq!(
                signer.apply(HASH, text.as_bytes()).unwrap(),
                Countersigned::Unvouched(Bytes::from(text.clone()))
            );
        }

        // Tampered after signing: the signature no longer covers it.
        let mut tampered = good.clone();
        tampered.nar_size = 4;
        assert!(matches!(
            signer.apply(HASH, tampered.to_string().as_bytes()),
            Ok(Countersigned::Unvouched(_))
        ));
    }

    #[test]
    fn a_narinfo_under_another_name_is_never_served() {
        let gw = SecretKey::generate("gw-1").unwrap();
        let signer = Countersigner::new(gw, vec![], true).unwrap();
        let text = narinfo(&path()).to_string();
        let other = "0".repeat(32);
        assert!(matches!(
            signer.apply(&other, text.as_bytes()),
            Err(SignRefusal::WrongPath { .. })
        ));
        // Its twin under the right name is signed (--sign-unverified).
        assert!(matches!(
            signer.apply(HASH, text.as_bytes()),
            Ok(Countersigned::Signed(_))
        ));
        assert!(matches!(
            signer.apply(HASH, b"StorePath: nonsense\n"),
            Err(SignRefusal::Unreadable(_))
        ));
    }

    /// Security review L18: a narinfo written by another tool, with fields cachepush does
    /// not know, is countersigned with those fields kept.
    #[test]
    fn fields_of_other_tools_survive_countersigning() {
        let gw = SecretKey::generate("gw-1").unwrap();
        let ci = SecretKey::generate("ci-1").unwrap();
        let signer = Countersigner::new(gw, vec![ci.public()], false).unwrap();
        let mut ni = narinfo(&path());
        ni.sign(&ci);
        let text = format!("{ni}Provenance: {{\"by\":\"determinate\"}}\n");
        let Ok(Countersigned::Signed(out)) = signer.apply(HASH, text.as_bytes()) else {
            panic!("not countersigned")
        };
        let out = std::str::from_utf8(&out).unwrap();
        assert!(
            out.contains("Provenance: {\"by\":\"determinate\"}\n"),
            "{out}"
        );
        assert!(
            out.contains("Sig: gw-1:") && out.contains("Sig: ci-1:"),
            "{out}"
        );
    }
}
