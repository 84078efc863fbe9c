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
        // Debug shows the name (which may repeat anything) and never the secret part.
        let shown = format!("{k:?}").replace(k.name(), "");
        let file_text = k.to_file_text();
        let secret = file_text.split_once(':').map_or("", |(_, s)| s);
        assert!(!shown.contains(secret));
    }
    if let Ok(k) = PublicKey::parse(text) {
        assert_eq!(PublicKey::parse(&k.to_string()).ok(), Some(k));
    }
    if let Ok(s) = Signature::parse(text) {
        assert_eq!(Signature::parse(&s.to_string()).ok(), Some(s));
    }
});
