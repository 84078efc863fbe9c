#![no_main]
use cachepush_fuzz::format::{StoreDir, StorePath};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = StorePath::from_base_name(text) {
        assert_eq!(p.to_string(), text);
        assert_eq!(p.hash_part().len(), 32);
    }
    let dir = StoreDir::default();
    if let Ok(p) = dir.parse_path(text) {
        assert!(text.starts_with(&dir.display(&p)));
    }
});
