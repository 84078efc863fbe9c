//! The Nix-formats module of cachepush, compiled on its own for fuzzing.
#[path = "../../src/format/mod.rs"]
pub mod format;
