#![no_main]
//! Any bytes: parsing never panics; whatever parses renders to text that parses back to
//! the same narinfo.
use cachepush_fuzz::format::NarInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cachepush_fuzz::canary(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ni) = NarInfo::parse(text) {
        let rendered = ni.to_string();
        let again = NarInfo::parse(&rendered).expect("a rendered narinfo parses");
        assert_eq!(again, ni);
        let _ = ni.fingerprint();
    }
});
