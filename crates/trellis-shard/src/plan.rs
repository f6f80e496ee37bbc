//! Rebalance plans: which shards move, from whom to whom, on a membership change.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::Strategy;

/// The shard (in `0..shards`) a key belongs to: [`jump_hash`](crate::jump_hash) of its
/// [`hash`](crate::hash).
///
/// Keys map to a fixed number of shards, and shards to members; only the second step
/// changes with membership. Jump hash makes growing the shard count cheap too: from `S`
/// to `S + 1` shards only `1/(S+1)` of the keys change shard. `shards` of 0 is taken as 1.
pub fn shard_for(key: &[u8], shards: u32) -> u32 {
    crate::jump_hash(crate::hash(key), shards)
}

/// The hash a shard is placed by: [`hash`](crate::hash) of its number as 4 big-endian
/// bytes, so a shard lands where the key `shard.to_be_bytes()` would.
pub fn shard_hash(shard: u32) -> u64 {
    crate::hash(&shard.to_be_bytes())
}

/// The owner (index into [`Strategy::members`]) of each shard in `0..shards`, placed
/// together with [`Strategy::assign`] (so bounded loads hold across the shards).
pub fn assign_shards(strategy: &dyn Strategy, shards: u32) -> Vec<Option<usize>> {
    let hashes: Vec<u64> = (0..shards).map(shard_hash).collect();
    strategy.assign(&hashes)
}

/// One shard (or key) changing owner.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Move<S = u32> {
    /// The shard number, or the key.
    pub shard: S,
    /// Its owner before, by name; `None` if it had none (no members).
    pub from: Option<String>,
    /// Its owner after, by name; `None` if it has none (no members left).
    pub to: Option<String>,
}

/// What a membership change does to a placement: the moves, out of how many shards
/// (or keys).
///
/// Computed from two strategies, so it is pure: log it, expose it, publish it, then
/// hand shards over in its order. Owners are compared by name, since members' indices
/// differ between the two lists.
///
/// ```
/// use trellis_shard::{Member, Plan, Rendezvous};
///
/// let old = Rendezvous::new(Member::all(["a", "b", "c"])).expect("valid");
/// let new = Rendezvous::new(Member::all(["a", "b", "c", "d"])).expect("valid");
/// let plan = Plan::for_shards(&old, &new, 256);
/// // Rendezvous moves only what `d` takes: about a quarter of the shards, all to `d`.
/// assert!(plan.moves.iter().all(|m| m.to.as_deref() == Some("d")));
/// assert!((0.15..0.35).contains(&plan.moved_fraction()), "{}", plan.moved_fraction());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan<S = u32> {
    /// How many shards (or keys) were compared.
    pub total: usize,
    /// The ones whose owner changes, in shard (or key) order.
    pub moves: Vec<Move<S>>,
}

impl Plan<u32> {
    /// The moves among shards `0..shards` (placed by [`shard_hash`]) from `old` to `new`.
    pub fn for_shards(old: &dyn Strategy, new: &dyn Strategy, shards: u32) -> Self {
        let before = assign_shards(old, shards);
        let after = assign_shards(new, shards);
        Self::diff(old, new, (0..shards).zip(before.into_iter().zip(after)))
    }
}

impl<S: AsRef<[u8]>> Plan<S> {
    /// The moves among `keys` (placed in this order) from `old` to `new`.
    pub fn for_keys(
        old: &dyn Strategy,
        new: &dyn Strategy,
        keys: impl IntoIterator<Item = S>,
    ) -> Self {
        let keys: Vec<S> = keys.into_iter().collect();
        let hashes: Vec<u64> = keys.iter().map(|k| crate::hash(k.as_ref())).collect();
        let before = old.assign(&hashes);
        let after = new.assign(&hashes);
        Self::diff(
            old,
            new,
            keys.into_iter().zip(before.into_iter().zip(after)),
        )
    }
}

impl<S> Plan<S> {
    fn diff(
        old: &dyn Strategy,
        new: &dyn Strategy,
        owners: impl Iterator<Item = (S, (Option<usize>, Option<usize>))>,
    ) -> Self {
        let name = |strategy: &dyn Strategy, index: Option<usize>| {
            index.map(|i| strategy.members()[i].name.clone())
        };
        let mut total = 0;
        let mut moves = Vec::new();
        for (shard, (before, after)) in owners {
            total += 1;
            let from = name(old, before);
            let to = name(new, after);
            if from != to {
                moves.push(Move { shard, from, to });
            }
        }
        Self { total, moves }
    }

    /// Whether nothing moves.
    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }

    /// The share of shards (or keys) that move, in `[0, 1]`.
    pub fn moved_fraction(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        self.moves.len() as f64 / self.total as f64
    }

    /// How many move along each `(from, to)` pair, for a summary line.
    pub fn flows(&self) -> BTreeMap<(Option<&str>, Option<&str>), usize> {
        let mut flows = BTreeMap::new();
        for m in &self.moves {
            *flows
                .entry((m.from.as_deref(), m.to.as_deref()))
                .or_default() += 1;
        }
        flows
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::{Member, StrategyConfig, StrategyKind};

    #[test]
    fn no_change_no_moves() {
        for kind in StrategyKind::ALL {
            let plan = StrategyConfig::new(kind)
                .plan(Member::all(["a", "b"]), Member::all(["a", "b"]), 64)
                .expect("valid");
            assert!(plan.is_empty(), "{kind}");
            assert_eq!(plan.total, 64);
            assert_eq!(plan.moved_fraction(), 0.0);
        }
    }

    #[test]
    fn from_and_to_nothing() {
        let config = StrategyConfig::new(StrategyKind::Ring);
        let plan = config
            .plan(Vec::new(), Member::all(["a"]), 3)
            .expect("valid");
        assert_eq!(
            plan.moves,
            (0..3)
                .map(|shard| Move {
                    shard,
                    from: None,
                    to: Some("a".into())
                })
                .collect::<Vec<_>>()
        );
        let plan = config
            .plan(Member::all(["a"]), Vec::new(), 3)
            .expect("valid");
        assert_eq!(
            plan.flows().into_iter().collect::<Vec<_>>(),
            [((Some("a"), None), 3)]
        );
    }

    #[test]
    fn removal_moves_only_the_leavers_shards() {
        let config = StrategyConfig::new(StrategyKind::Ring);
        let old = Member::all(["a", "b", "c", "d"]);
        let new = Member::all(["a", "b", "d"]);
        let plan = config.plan(old.clone(), new.clone(), 1024).expect("valid");
        assert!(!plan.is_empty());
        assert!(plan.moves.iter().all(|m| m.from.as_deref() == Some("c")));
        // Exactly the shards `c` owned.
        let before = config.build(old).expect("valid");
        let owned = assign_shards(before.as_ref(), 1024)
            .into_iter()
            .filter(|o| *o == Some(2))
            .count();
        assert_eq!(plan.moves.len(), owned);
    }

    #[test]
    fn keys_and_json() {
        let config = StrategyConfig::new(StrategyKind::Rendezvous);
        let old = config.build(Member::all(["a"])).expect("valid");
        let new = config.build(Member::all(["b"])).expect("valid");
        let plan = Plan::for_keys(old.as_ref(), new.as_ref(), ["k1", "k2"]);
        let json = serde_json::to_value(&plan).expect("serialize");
        assert_eq!(
            json,
            serde_json::json!({
                "total": 2,
                "moves": [
                    {"shard": "k1", "from": "a", "to": "b"},
                    {"shard": "k2", "from": "a", "to": "b"},
                ]
            })
        );
    }

    #[test]
    fn shards_are_stable_as_their_count_grows() {
        let mut moved = 0;
        for i in 0..10_000u32 {
            let key = i.to_le_bytes();
            let (before, after) = (shard_for(&key, 64), shard_for(&key, 65));
            assert!(after == before || after == 64);
            moved += u32::from(after != before);
        }
        // ≈ 10 000 / 65 ≈ 154.
        assert!((80..250).contains(&moved), "{moved}");
    }
}
