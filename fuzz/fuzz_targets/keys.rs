#![no_main]
use cachepush_fuzz::format::{PublicKey, SecretKey, Signature};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(k) = SecretKey::parse(text) {
        // A parsed secret key signs, and its public half verifies that signature.
        let sig = k.sign("fingerprint");
        assert!(k.public().verifies("fingerprint", &sig));
        assert!(!format!("{k:?}").contains(text.trim()));
    }
    if let Ok(k) = PublicKey::parse(text) {
        assert_eq!(PublicKey::parse(&k.to_string()).ok(), Some(k));
    }
    if let Ok(s) = Signature::parse(text) {
        assert_eq!(Signature::parse(&s.to_string()).ok(), Some(s));
    }
});
