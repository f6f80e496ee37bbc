//! Sharding: which node owns which key.
//!
//! # Layout
//! - [`Ring`]: consistent hashing with virtual nodes. Adding or removing a node moves
//!   only the keys that node gains or loses; virtual nodes spread each node's share
//!   evenly. [`Ring::pick`] adds *bounded loads* (Mirrokni et al., 2018): a key whose
//!   node is at its load bound goes to the next node on the ring instead of
//!   overloading it, so hot keys spill over rather than melting one instance.
//! - [`hash`]: the one stable 64-bit hash (XXH3) every node must agree on.

mod ring;

pub use ring::Ring;

/// The 64-bit hash of `bytes` used for keys and ring points: XXH3, stable across
/// processes, platforms and releases, so every sidecar maps keys the same way.
pub fn hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}
