//! The Nix-formats module of cachepush, compiled on its own for fuzzing.
#[path = "../../src/format/mod.rs"]
pub mod format;

/// The self-check of `scripts/fuzz.sh`: with `CACHEPUSH_FUZZ_CANARY=1` in the environment,
/// this exact input panics, so the script can prove that a crashing input fails its run
/// (a fuzz step that cannot fail tests nothing). Without the variable it is an input
/// like any other.
pub fn canary(data: &[u8]) {
    if data == b"cachepush fuzz canary: crash here"
        && std::env::var_os("CACHEPUSH_FUZZ_CANARY").is_some()
    {
        panic!("the fuzz canary input crashed, as the self-check asked");
    }
}
