//! Nix's binary-cache formats: pure data and (de)serialisation, no I/O policy.
//!
//! One module per wire artifact. Everything that touches the network, the local store or
//! a target directory lives outside this tree.

pub mod cache_info;
pub mod hash;
pub mod keys;
pub mod layout;
pub mod nar;
pub mod narinfo;
pub mod nix32;
pub mod store_path;

pub use cache_info::CacheInfo;
pub use hash::Sha256;
pub use keys::{KeyError, PublicKey, SecretKey, Signature};
pub use narinfo::{NarInfo, NarInfoError};
pub use store_path::{StoreDir, StorePath, StorePathError};
