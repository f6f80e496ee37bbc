//! The one trait every hashing strategy implements, and the config that picks one.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{BoundedLoads, Jump, Maglev, Member, Plan, Rendezvous, Ring, ShardError};

/// A placement of keys on members: who owns a key, built from a member list.
///
/// Implementations are immutable: on a membership change build a new one from the new
/// list and swap it in. Rebuilds are cheap (benchmark, 100 / 1 000 members): jump and
/// rendezvous 4 / 40 µs, ring (160 points each) 0.4 / 5 ms, Maglev 1.3 / 18 ms.
///
/// # Which strategy?
///
/// | strategy | lookup | memory | movement on add/remove | weights | replica order |
/// | --- | --- | --- | --- | --- | --- |
/// | [`Ring`] (virtual nodes) | `O(log(V·N))` binary search | `16 B × V × Σw` | minimal; only to/from the changed member | `V × w` points | yes (clockwise walk) |
/// | [`Jump`] | `O(ln Σw)`, no table walk | `4 B × Σw` | minimal when appending or removing the *last* member; see [`Jump`] | `w` buckets | no |
/// | [`Rendezvous`] (weighted HRW) | `O(N)` scores | `16 B × N` | minimal; only to/from the changed member | exact (logarithmic method) | yes (score order) |
/// | [`Maglev`] | `O(1)` table index | `4 B × M` | above the optimum: ≈1.05× at 10 members, 1.6× at 100, 4× at 1 000 | entries `∝ w` | no |
/// | [`BoundedLoads`] | ring walk | as ring | as ring plus spill-over: ≈1.15× at 100 members, 1.4× at 1 000 (ε = 0.25, 1 000 keys a member; more with fewer keys) | as ring, capacity `∝ w` | yes |
///
/// Ring and rendezvous guarantee that a membership change only moves keys to the new
/// member or away from the removed one. Maglev trades some of that for constant-time
/// lookups and better balance; jump hash needs no memory beyond its bucket list but
/// identifies members by position. Bounded loads caps every member at
/// `⌈(1 + ε) × mean⌉` for the price of moving a few more keys.
///
/// Every strategy hashes a key once with [`hash`](crate::hash) (XXH3) and derives
/// everything else from that 64-bit value and the member names, so two processes that
/// build the same strategy from the same members give the same answers.
///
/// # To ensure correctness
/// 1. Answers depend only on the member list (names, weights and, for [`Jump`], order)
///    and the key: never on time, randomness or the process.
/// 2. [`locate`](Self::locate) returns an index into [`members`](Self::members), and
///    `None` only when no member has a non-zero weight.
/// 3. [`locate_replicas`](Self::locate_replicas) returns distinct members, the owner
///    first.
///
/// ```
/// use trellis_shard::{Member, Rendezvous, Strategy};
///
/// let placement = Rendezvous::new(Member::all(["a", "b", "c"])).expect("unique names");
/// let owner = placement.owner(b"order-7").expect("members");
/// let replicas = placement.owners(b"order-7", 2);
/// assert_eq!(replicas[0], owner);
/// assert_ne!(replicas[1], owner);
/// ```
pub trait Strategy: fmt::Debug + Send + Sync {
    /// Which strategy this is.
    fn kind(&self) -> StrategyKind;

    /// The members, in the order given.
    fn members(&self) -> &[Member];

    /// The index (into [`members`](Self::members)) of the owner of a key whose
    /// [`hash`](crate::hash) is `hash`.
    fn locate(&self, hash: u64) -> Option<usize>;

    /// Up to `n` distinct members for a key, the owner first, then the members the key
    /// would fall to if those before it were gone. Strategies without such an order
    /// ([`has_replica_order`](Self::has_replica_order) is false) return only the owner.
    fn locate_replicas(&self, hash: u64, n: usize) -> Vec<usize> {
        self.locate(hash).into_iter().take(n).collect()
    }

    /// Whether [`locate_replicas`](Self::locate_replicas) gives more than the owner.
    fn has_replica_order(&self) -> bool {
        false
    }

    /// The owners of a batch of keys placed together, in order. By default each key's
    /// owner; a strategy whose answer depends on what else is placed
    /// ([`BoundedLoads`]) places them one after the other.
    fn assign(&self, hashes: &[u64]) -> Vec<Option<usize>> {
        hashes.iter().map(|h| self.locate(*h)).collect()
    }

    /// The member owning `key`.
    fn owner(&self, key: &[u8]) -> Option<&Member> {
        self.locate(crate::hash(key)).map(|i| &self.members()[i])
    }

    /// The index of the member owning `key`.
    fn owner_index(&self, key: &[u8]) -> Option<usize> {
        self.locate(crate::hash(key))
    }

    /// Up to `n` distinct members for `key`, owner first (see
    /// [`locate_replicas`](Self::locate_replicas)).
    fn owners(&self, key: &[u8], n: usize) -> Vec<&Member> {
        let members = self.members();
        self.locate_replicas(crate::hash(key), n)
            .into_iter()
            .map(|i| &members[i])
            .collect()
    }
}

// === StrategyKind ===

/// The hashing strategies, by their config names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StrategyKind {
    /// `"ring"`: consistent hashing with virtual nodes ([`Ring`]).
    #[default]
    Ring,
    /// `"jump"`: jump consistent hash ([`Jump`]).
    Jump,
    /// `"rendezvous"`: weighted highest-random-weight hashing ([`Rendezvous`]).
    Rendezvous,
    /// `"maglev"`: Maglev's lookup table ([`Maglev`]).
    Maglev,
    /// `"bounded"`: consistent hashing with bounded loads ([`BoundedLoads`]).
    Bounded,
}

impl StrategyKind {
    /// Every strategy, in a fixed order.
    pub const ALL: [Self; 5] = [
        Self::Ring,
        Self::Jump,
        Self::Rendezvous,
        Self::Maglev,
        Self::Bounded,
    ];

    /// The config name: `ring`, `jump`, `rendezvous`, `maglev` or `bounded`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ring => "ring",
            Self::Jump => "jump",
            Self::Rendezvous => "rendezvous",
            Self::Maglev => "maglev",
            Self::Bounded => "bounded",
        }
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of [`StrategyKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown strategy `{0}` (expected ring, jump, rendezvous, maglev or bounded)")]
pub struct UnknownStrategy(pub String);

impl FromStr for StrategyKind {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| UnknownStrategy(s.to_owned()))
    }
}

// === StrategyConfig ===

/// Which strategy to build, with its parameters; each parameter is read only by the
/// strategies it concerns, so one flat table serves them all:
///
/// ```toml
/// strategy = "bounded"   # ring | jump | rendezvous | maglev | bounded
/// vnodes = 160           # ring, bounded
/// epsilon = 0.25         # bounded
/// # table_size = 65537   # maglev: a prime; chosen from the member count when absent
/// ```
///
/// ```
/// use trellis_shard::{Member, StrategyConfig, StrategyKind};
///
/// let config: StrategyConfig = serde_json::from_str(r#"{"strategy": "maglev"}"#).expect("valid");
/// assert_eq!(config.strategy, StrategyKind::Maglev);
/// let placement = config.build(Member::all(["a", "b"])).expect("valid");
/// assert!(placement.owner(b"k").is_some());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StrategyConfig {
    /// The strategy.
    pub strategy: StrategyKind,
    /// Ring points per unit of weight (ring, bounded): more points, better balance,
    /// more memory and a slower rebuild.
    pub vnodes: u32,
    /// Maglev's lookup table size, a prime well above the member count (the paper
    /// keeps it ≥ 100 × members). `None` picks one from the member count
    /// ([`Maglev::auto_table_size`]); pin it so the table never resizes.
    pub table_size: Option<u64>,
    /// Bounded loads' slack ε: no member carries more than `⌈(1 + ε) × mean⌉`.
    /// Smaller is better balanced but moves more keys on a change.
    pub epsilon: f64,
}

impl StrategyConfig {
    /// The defaults: a ring of 160 virtual nodes per unit of weight, automatic Maglev
    /// table size, ε = 0.25.
    pub const DEFAULTS: Self = Self {
        strategy: StrategyKind::Ring,
        vnodes: 160,
        table_size: None,
        epsilon: 0.25,
    };

    /// The defaults for `strategy`.
    pub const fn new(strategy: StrategyKind) -> Self {
        Self {
            strategy,
            ..Self::DEFAULTS
        }
    }

    /// Checks the parameters the chosen strategy reads.
    ///
    /// # Errors
    /// [`ShardError::ZeroVnodes`], [`ShardError::InvalidEpsilon`],
    /// [`ShardError::TableSizeNotPrime`] or [`ShardError::TableTooLarge`].
    pub fn validate(self) -> Result<Self, ShardError> {
        match self.strategy {
            StrategyKind::Ring | StrategyKind::Bounded if self.vnodes == 0 => {
                return Err(ShardError::ZeroVnodes {
                    vnodes: self.vnodes,
                });
            }
            _ => {}
        }
        if self.strategy == StrategyKind::Bounded {
            crate::bounded::check_epsilon(self.epsilon)?;
        }
        if let (StrategyKind::Maglev, Some(size)) = (self.strategy, self.table_size) {
            crate::maglev::check_table_size(size, 0)?;
        }
        Ok(self)
    }

    /// The chosen strategy over `members`.
    ///
    /// # Errors
    /// A [`ShardError`] for a repeated member name or an invalid parameter.
    pub fn build(&self, members: Vec<Member>) -> Result<Box<dyn Strategy>, ShardError> {
        Ok(match self.strategy {
            StrategyKind::Ring => Box::new(Ring::from_members(members, self.vnodes)?),
            StrategyKind::Jump => Box::new(Jump::new(members)?),
            StrategyKind::Rendezvous => Box::new(Rendezvous::new(members)?),
            StrategyKind::Maglev => Box::new(match self.table_size {
                Some(size) => Maglev::with_table_size(members, size)?,
                None => Maglev::new(members)?,
            }),
            StrategyKind::Bounded => {
                Box::new(BoundedLoads::new(members, self.vnodes, self.epsilon)?)
            }
        })
    }

    /// Which of `shards` shards move, from whom to whom, when the members change from
    /// `old` to `new` (see [`Plan::for_shards`]).
    ///
    /// # Errors
    /// As [`build`](Self::build), for either list.
    pub fn plan(
        &self,
        old: Vec<Member>,
        new: Vec<Member>,
        shards: u32,
    ) -> Result<Plan, ShardError> {
        let old = self.build(old)?;
        let new = self.build(new)?;
        Ok(Plan::for_shards(old.as_ref(), new.as_ref(), shards))
    }
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self::DEFAULTS
    }
}

impl From<StrategyKind> for StrategyConfig {
    fn from(strategy: StrategyKind) -> Self {
        Self::new(strategy)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn _obj_safe(_: Box<dyn Strategy>) {}

    #[test]
    fn kinds_round_trip_by_name() {
        for kind in StrategyKind::ALL {
            let json = serde_json::to_string(&kind).expect("serialize");
            assert_eq!(json, format!("\"{kind}\""));
            let back: StrategyKind = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back, kind);
            assert_eq!(kind.as_str().parse::<StrategyKind>(), Ok(kind));
        }
        assert!("consistent".parse::<StrategyKind>().is_err());
        assert!(serde_json::from_str::<StrategyKind>("\"hrw\"").is_err());
    }

    #[test]
    fn config_reads_a_flat_toml_table() {
        let config: StrategyConfig = toml::from_str(
            r#"
            strategy = "bounded"
            vnodes = 64
            epsilon = 0.5
            "#,
        )
        .expect("parse");
        assert_eq!(
            config,
            StrategyConfig {
                strategy: StrategyKind::Bounded,
                vnodes: 64,
                epsilon: 0.5,
                ..StrategyConfig::DEFAULTS
            }
        );
        let config: StrategyConfig = toml::from_str("").expect("parse");
        assert_eq!(config, StrategyConfig::default());
        assert!(toml::from_str::<StrategyConfig>("vnode = 3").is_err());
        assert!(toml::from_str::<StrategyConfig>(r#"strategy = "nope""#).is_err());
    }

    #[test]
    fn validate_rejects_bad_parameters() {
        let bad = |config: StrategyConfig| config.validate().expect_err("invalid");
        assert_eq!(
            bad(StrategyConfig {
                vnodes: 0,
                ..StrategyConfig::new(StrategyKind::Ring)
            }),
            ShardError::ZeroVnodes { vnodes: 0 }
        );
        assert!(matches!(
            bad(StrategyConfig {
                epsilon: 0.0,
                ..StrategyConfig::new(StrategyKind::Bounded)
            }),
            ShardError::InvalidEpsilon { .. }
        ));
        assert_eq!(
            bad(StrategyConfig {
                table_size: Some(65536),
                ..StrategyConfig::new(StrategyKind::Maglev)
            }),
            ShardError::TableSizeNotPrime { table_size: 65536 }
        );
        // Parameters of other strategies are not checked.
        let jump = StrategyConfig {
            vnodes: 0,
            epsilon: -1.0,
            table_size: Some(4),
            ..StrategyConfig::new(StrategyKind::Jump)
        };
        assert_eq!(jump.clone().validate(), Ok(jump));
    }

    #[test]
    fn every_kind_builds_and_reports_itself() {
        let members = vec![Member::new("a"), Member::weighted("b", 2), Member::new("c")];
        for kind in StrategyKind::ALL {
            let placement = StrategyConfig::new(kind)
                .build(members.clone())
                .expect("valid");
            assert_eq!(placement.kind(), kind);
            assert_eq!(placement.members(), members.as_slice());
            let owner = placement.owner(b"key").expect("owner");
            assert_eq!(placement.owners(b"key", 1), [owner]);
            assert!(placement.owners(b"key", 0).is_empty());
            let replicas = placement.owners(b"key", 5);
            let expected = if placement.has_replica_order() { 3 } else { 1 };
            assert_eq!(replicas.len(), expected, "{kind}");

            let empty = StrategyConfig::new(kind).build(Vec::new()).expect("valid");
            assert!(empty.owner(b"key").is_none());
            assert!(empty.owners(b"key", 3).is_empty());
        }
    }

    #[test]
    fn duplicate_names_are_refused_by_every_kind() {
        for kind in StrategyKind::ALL {
            let err = StrategyConfig::new(kind)
                .build(Member::all(["a", "b", "a"]))
                .expect_err("duplicate");
            assert_eq!(err, ShardError::DuplicateMember { name: "a".into() });
        }
    }
}
