//! What every tsr crate shares and nothing else: content digests ([`Digest`], [`fingerprint`])
//! and crash-safe file writes ([`fsio`]). It sits under both the store (`tsr-state`) and the
//! model layer (`tsr-model`), which do not know each other.

mod digest;
pub mod fsio;

pub use digest::{fingerprint, hex, BadDigest, Digest};
pub use fsio::PathError;
