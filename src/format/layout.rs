//! Where each artifact lives in a binary cache, and the content type it is served with:
//! the one place that spells out the cache's key layout (Nix's own, so caches written by
//! `nix copy`, attic or harmonia read the same).
//!
//! - `nix-cache-info` at the top;
//! - `<hash>.narinfo` at the top, one per store path (`<hash>` is the store path's hash part);
//! - `nar/<filehash or narhash>.nar[.zst|.xz]`, named by hash so the bytes never change;
//! - `<hash>.ls` (NAR listings) and `log/<drv name>` (build logs), which Nix also writes;
//! - `realisations/<id>.doi` and `debuginfo/<build id>`, which some Nix setups write;
//! - `cachepush/`: what gc keeps between runs and what push and the gateway tell it (pins,
//!   push records, read records, the index, the running gc's marker). Nix never reads it,
//!   and the gateway serves none of it.

use crate::format::{Sha256, StorePath};

/// The key of the cache's description.
pub const CACHE_INFO: &str = "nix-cache-info";

/// The folder of NAR files.
pub const NAR_DIR: &str = "nar/";

/// The narinfo of the store path with this hash part.
pub fn narinfo_key(hash_part: &str) -> String {
    format!("{hash_part}.narinfo")
}

/// The narinfo of a store path.
pub fn narinfo_of(path: &StorePath) -> String {
    narinfo_key(path.hash_part())
}

/// The hash part a top-level narinfo key names; `None` for any other key.
pub fn narinfo_hash(key: &str) -> Option<&str> {
    if key.contains('/') {
        return None;
    }
    key.strip_suffix(".narinfo")
}

/// A NAR's key: named by the hash of the uncompressed NAR, known before compressing, so
/// one pass can stream it; `extension` is the compression's (`.nar.zst`).
pub fn nar_key(nar_hash: &Sha256, extension: &str) -> String {
    format!("{NAR_DIR}{}{extension}", nar_hash.nix32())
}

/// The NAR listing of the store path with this hash part.
pub fn listing_key(hash_part: &str) -> String {
    format!("{hash_part}.ls")
}

/// The build log of a derivation (`name` is the `.drv` file's base name).
pub fn log_key(drv_name: &str) -> String {
    format!("log/{drv_name}")
}

/// The realisation of a content-addressed derivation's output (`id` is
/// `sha256:<hex>!<output>`).
pub fn realisation_key(id: &str) -> String {
    format!("realisations/{id}.doi")
}

/// The debug-info index entry of an ELF build id (Nix's `index-debug-info`).
pub fn debuginfo_key(build_id: &str) -> String {
    format!("debuginfo/{build_id}")
}

/// The folder of cachepush's own bookkeeping (see [`pin_key`] and below).
pub const META_DIR: &str = "cachepush/";

/// The folder of pins, one object per name.
pub const PINS_DIR: &str = "cachepush/pins/";

/// A pin: the store paths kept under `name`, with their last revisions.
pub fn pin_key(name: &str) -> String {
    format!("{PINS_DIR}{name}.json")
}

/// The pin name a key in [`PINS_DIR`] holds.
pub fn pin_name(key: &str) -> Option<&str> {
    key.strip_prefix(PINS_DIR)?.strip_suffix(".json")
}

/// Push records: each push's closure, a lease while it runs and a recency record after.
pub const PUSHES_DIR: &str = "cachepush/pushes/";

/// Read records: store paths the gateway served, batched.
pub const READS_DIR: &str = "cachepush/reads/";

/// A record in `dir`, named so that keys sort by time.
pub fn record_key(dir: &str, at: i64, id: &str) -> String {
    format!("{dir}{at:012}-{id}.json")
}

/// gc's index of narinfos (references, NAR key, sizes), keyed by each narinfo's ETag.
pub const GC_INDEX: &str = "cachepush/gc-index.json.zst";

/// Present while a gc runs: pushes read it to learn whether the gc has seen their lease.
pub const GC_MARKER: &str = "cachepush/gc-running.json";

/// Content types as Nix's own binary-cache stores set them.
pub mod content_type {
    pub const CACHE_INFO: &str = "text/x-nix-cache-info";
    pub const NARINFO: &str = "text/x-nix-narinfo";
    pub const NAR: &str = "application/x-nix-nar";
    pub const LISTING: &str = "application/json";
    pub const LOG: &str = "text/plain; charset=utf-8";
    pub const JSON: &str = "application/json";
    pub const ZSTD: &str = "application/zstd";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_nixs() {
        let h = "h7jx3wrzn6m9vjl9604id854qx1xyqw6";
        assert_eq!(narinfo_key(h), format!("{h}.narinfo"));
        assert_eq!(narinfo_hash(&narinfo_key(h)), Some(h));
        assert_eq!(narinfo_hash("nar/x.narinfo"), None);
        assert_eq!(narinfo_hash(CACHE_INFO), None);
        assert_eq!(listing_key(h), format!("{h}.ls"));
        assert_eq!(log_key("abc-x.drv"), "log/abc-x.drv");
        assert_eq!(pin_name(&pin_key("release")), Some("release"));
        assert_eq!(pin_name("cachepush/pins/x"), None);
        assert_eq!(
            record_key(PUSHES_DIR, 1_700_000_000, "ab"),
            "cachepush/pushes/001700000000-ab.json"
        );
        let zero = Sha256::from_bytes([0; 32]);
        assert_eq!(
            nar_key(&zero, ".nar.zst"),
            format!("nar/{}.nar.zst", "0".repeat(52))
        );
    }
}
