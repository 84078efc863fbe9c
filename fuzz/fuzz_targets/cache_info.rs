#![no_main]
use cachepush_fuzz::format::CacheInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = CacheInfo::parse(text) {
        assert_eq!(CacheInfo::parse(&c.to_string()).ok(), Some(c));
    }
});
