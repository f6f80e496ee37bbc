//! Sharding: which member owns which key, and what moves when members change.
//!
//! Every sidecar must map a key to the same member without talking to the others, so
//! placement is a pure function of the member list and the key: a [`Strategy`] built
//! from [`Member`]s (names and weights). On a membership change, build a new one and
//! diff the two into a [`Plan`] of shard moves.
//!
//! ```
//! use trellis_shard::{Member, Plan, Strategy, StrategyConfig, StrategyKind};
//!
//! // From config: `strategy = "rendezvous"` (or ring, jump, maglev, bounded).
//! let config = StrategyConfig::new(StrategyKind::Rendezvous);
//! let members = vec![Member::new("a"), Member::new("b"), Member::weighted("c", 2)];
//! let placement = config.build(members.clone()).expect("valid members");
//!
//! // Every process answers the same.
//! let owner = placement.owner(b"customer-42").expect("non-empty");
//! let again = config.build(members.clone()).expect("valid members");
//! assert_eq!(again.owner(b"customer-42"), Some(owner));
//!
//! // `d` joins: which of 1024 shards move? Only those `d` takes.
//! let mut grown = members.clone();
//! grown.push(Member::new("d"));
//! let plan = config.plan(members, grown, 1024).expect("valid members");
//! assert!(plan.moves.iter().all(|m| m.to.as_deref() == Some("d")));
//! println!("{} of {} shards move: {:?}", plan.moves.len(), plan.total, plan.flows());
//! ```
//!
//! # Layout
//! - [`Strategy`]: the trait; [`StrategyKind`] and [`StrategyConfig`] pick and build
//!   one from config. The module docs of `strategy` compare them.
//! - [`Ring`]: consistent hashing with virtual nodes, weighted by point count.
//!   [`Ring::pick`] walks clockwise past nodes a caller refuses (unhealthy, full).
//! - [`Jump`]: jump consistent hash ([`jump_hash`]) over members as buckets.
//! - [`Rendezvous`]: weighted highest-random-weight hashing.
//! - [`Maglev`]: Maglev's prime-sized lookup table.
//! - [`BoundedLoads`]: a ring whose members never exceed `⌈(1 + ε) × mean⌉`
//!   (Mirrokni et al., 2018), with the caller's [`Loads`].
//! - [`Plan`] / [`Move`]: a rebalance plan between two placements, over shards
//!   ([`shard_for`] maps a key to its shard) or keys.
//! - [`LoadStats`]: balance figures (max/mean load).
//! - [`hash`]: the one stable 64-bit hash (XXH3) every node must agree on.

mod bounded;
mod error;
mod jump;
mod maglev;
mod member;
mod plan;
mod rendezvous;
mod ring;
mod stats;
mod strategy;

pub use bounded::{BoundedLoads, Loads};
pub use error::ShardError;
pub use jump::{Jump, MAX_BUCKETS, jump_hash};
pub use maglev::{DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE, Maglev};
pub use member::Member;
pub use plan::{Move, Plan, assign_shards, shard_for, shard_hash};
pub use rendezvous::Rendezvous;
pub use ring::{MAX_POINTS, Ring};
pub use stats::LoadStats;
pub use strategy::{Strategy, StrategyConfig, StrategyKind, UnknownStrategy};

/// The 64-bit hash of `bytes` used for keys and ring points: XXH3 (seed 0), stable
/// across processes, platforms and releases, so every sidecar maps keys the same way.
pub fn hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}
