use std::fmt;

use crate::{Member, ShardError, Strategy, StrategyKind};

/// The most points [`Ring::from_members`] accepts (`vnodes × Σ weights`): 16 bytes each.
pub const MAX_POINTS: u64 = 1 << 22;

/// A consistent-hash ring of nodes `N`, each placed at `vnodes` points per unit of
/// weight.
///
/// A key belongs to the first point clockwise from its hash. Adding a node moves to it
/// only the keys its new points cover; removing one hands its keys to the points after
/// them; nobody else's keys move. Many points per node spread each node's share into
/// many small arcs, so shares are even (relative spread ≈ `1/√(vnodes × weight)`).
///
/// `Ring<Member>` is the [`Strategy`] for `"ring"`; `Ring<N>` for any named `N` is the
/// same ring for callers with their own node type.
///
/// ```
/// use trellis_shard::Ring;
///
/// let ring = Ring::new(["a", "b", "c"], 128);
/// let owner = ring.get(b"customer-42").expect("non-empty ring");
/// // The same key always lands on the same node.
/// assert_eq!(ring.get(b"customer-42"), Some(owner));
///
/// // With bounded loads, a key skips nodes at their bound.
/// let loads = |node: &&str| if node == owner { 10 } else { 0 };
/// let spill = ring.pick(b"customer-42", |n| loads(n) < 5).expect("another node");
/// assert_ne!(spill, owner);
/// ```
#[derive(Clone)]
pub struct Ring<N> {
    nodes: Vec<N>,
    /// (point, index into `nodes`), sorted by point.
    points: Vec<(u64, usize)>,
    /// How many nodes have at least one point (weight > 0): a walk ends after them.
    placed: usize,
}

impl<N: fmt::Debug> fmt::Debug for Ring<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("nodes", &self.nodes)
            .field("points", &self.points.len())
            .finish()
    }
}

impl<N: AsRef<str>> Ring<N> {
    /// A ring of `nodes`, each at `vnodes` (at least 1) points derived from its name,
    /// so every process builds the same ring from the same names.
    pub fn new(nodes: impl IntoIterator<Item = N>, vnodes: u32) -> Self {
        Self::with_weights(nodes.into_iter().map(|n| (n, 1)), vnodes)
    }

    /// A ring of weighted nodes: a node of weight `w` sits at `vnodes × w` points
    /// (`vnodes` at least 1), so it owns about `w` times the keys of a node of weight 1.
    /// Weight 0 keeps the node in [`nodes`](Self::nodes) but places it nowhere.
    ///
    /// A node's points are `hash("<name>#<i>")` for `i` in `0..vnodes × w`, so raising
    /// its weight only adds points: the keys it gains come from the others, and it keeps
    /// its own. Memory is 16 bytes a point.
    pub fn with_weights(nodes: impl IntoIterator<Item = (N, u32)>, vnodes: u32) -> Self {
        let vnodes = vnodes.max(1);
        let (nodes, weights): (Vec<N>, Vec<u32>) = nodes.into_iter().unzip();
        let total: u64 = weights
            .iter()
            .map(|w| u64::from(*w) * u64::from(vnodes))
            .sum();
        let mut points = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        let mut placed = 0;
        let mut label = Vec::new();
        for (index, (node, weight)) in nodes.iter().zip(&weights).enumerate() {
            let name = node.as_ref().as_bytes();
            let count = vnodes.saturating_mul(*weight);
            placed += usize::from(count > 0);
            for v in 0..count {
                label.clear();
                label.extend_from_slice(name);
                label.push(b'#');
                label.extend_from_slice(&v.to_le_bytes());
                points.push((crate::hash(&label), index));
            }
        }
        // Ties (astronomically rare) break by node index, so the order is total.
        points.sort_unstable();
        Self {
            nodes,
            points,
            placed,
        }
    }
}

impl Ring<Member> {
    /// The `"ring"` strategy: each member at `vnodes × weight` points.
    ///
    /// # Errors
    /// [`ShardError::DuplicateMember`], [`ShardError::ZeroVnodes`], or
    /// [`ShardError::TooManyPoints`] past [`MAX_POINTS`].
    pub fn from_members(members: Vec<Member>, vnodes: u32) -> Result<Self, ShardError> {
        crate::member::check_unique(&members)?;
        if vnodes == 0 {
            return Err(ShardError::ZeroVnodes { vnodes });
        }
        let points: u64 = members
            .iter()
            .map(|m| u64::from(m.weight) * u64::from(vnodes))
            .sum();
        if points > MAX_POINTS {
            return Err(ShardError::TooManyPoints {
                points,
                max: MAX_POINTS,
            });
        }
        Ok(Self::with_weights(
            members.into_iter().map(|m| {
                let weight = m.weight;
                (m, weight)
            }),
            vnodes,
        ))
    }
}

impl<N> Ring<N> {
    /// The nodes, in the order given.
    pub fn nodes(&self) -> &[N] {
        &self.nodes
    }

    /// Whether the ring has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// How many points the nodes sit at in all.
    pub fn points(&self) -> usize {
        self.points.len()
    }

    /// The node owning `key`.
    pub fn get(&self, key: &[u8]) -> Option<&N> {
        self.owner_of(crate::hash(key)).map(|i| &self.nodes[i])
    }

    /// The first node clockwise from `key` that `accept` takes (e.g. healthy and under
    /// its load bound); `None` if it takes none.
    pub fn pick(&self, key: &[u8], mut accept: impl FnMut(&N) -> bool) -> Option<&N> {
        self.walk(key).find(|n| accept(n))
    }

    /// Every node once, clockwise from `key`: the owner first, then the nodes a key
    /// would move to if the ones before were gone. Nodes of weight 0 are not on it.
    pub fn walk(&self, key: &[u8]) -> impl Iterator<Item = &N> + '_ {
        self.walk_hash(crate::hash(key)).map(|i| &self.nodes[i])
    }

    /// The load bound of bounded-load hashing: `⌈c × (total + 1) / nodes⌉`, the most a
    /// node may carry when `total` is carried in all. `c` (> 1, typically 1.25) trades
    /// balance for key stability.
    pub fn load_bound(&self, total: u64, c: f64) -> u64 {
        let nodes = self.nodes.len().max(1) as f64;
        (c * (total as f64 + 1.0) / nodes).ceil() as u64
    }

    /// The index of the node owning a key hashed to `hash`: the first point at or after
    /// it, wrapping around.
    pub(crate) fn owner_of(&self, hash: u64) -> Option<usize> {
        let start = self.points.partition_point(|(p, _)| *p < hash);
        let (_, index) = self.points.get(start).or_else(|| self.points.first())?;
        Some(*index)
    }

    /// Node indices clockwise from `hash`, each once.
    pub(crate) fn walk_hash(&self, hash: u64) -> Walk<'_> {
        Walk {
            points: &self.points,
            start: self.points.partition_point(|(p, _)| *p < hash),
            step: 0,
            nodes: self.nodes.len(),
            remaining: self.placed,
            first: 0,
            seen: Vec::new(),
        }
    }
}

/// The walk behind [`Ring::walk`]: points clockwise from a start, each node once.
///
/// The owner comes without any bookkeeping; the `seen` set is only allocated when a
/// caller asks past it (a refused or full owner), so the common `pick` does not
/// allocate.
#[derive(Debug)]
pub(crate) struct Walk<'a> {
    points: &'a [(u64, usize)],
    /// Index of the first point at or after the key's hash (may be `points.len()`).
    start: usize,
    /// Points visited so far.
    step: usize,
    /// Number of nodes, for `seen`.
    nodes: usize,
    /// Nodes with points not yet yielded.
    remaining: usize,
    /// The owner, once yielded.
    first: usize,
    /// Nodes already yielded; empty until the second node is looked for.
    seen: Vec<bool>,
}

impl Iterator for Walk<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let n = self.points.len();
        while self.remaining > 0 && self.step < n {
            let (_, index) = self.points[(self.start + self.step) % n];
            self.step += 1;
            if self.step == 1 {
                self.first = index;
            } else {
                if self.seen.is_empty() {
                    self.seen = vec![false; self.nodes];
                    self.seen[self.first] = true;
                }
                if std::mem::replace(&mut self.seen[index], true) {
                    continue;
                }
            }
            self.remaining -= 1;
            return Some(index);
        }
        None
    }
}

impl Strategy for Ring<Member> {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Ring
    }

    fn members(&self) -> &[Member] {
        &self.nodes
    }

    fn locate(&self, hash: u64) -> Option<usize> {
        self.owner_of(hash)
    }

    fn locate_replicas(&self, hash: u64, n: usize) -> Vec<usize> {
        self.walk_hash(hash).take(n).collect()
    }

    fn has_replica_order(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod test {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::Strategy;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{i}:80")).collect()
    }

    #[test]
    fn empty_ring() {
        let ring: Ring<String> = Ring::new(Vec::new(), 10);
        assert!(ring.get(b"k").is_none());
        assert_eq!(ring.walk(b"k").count(), 0);
    }

    #[test]
    fn keys_spread_evenly_with_virtual_nodes() {
        let ring = Ring::new(names(5), 256);
        let mut counts: HashMap<&String, u32> = HashMap::new();
        for i in 0..50_000 {
            *counts
                .entry(ring.get(format!("key-{i}").as_bytes()).expect("owner"))
                .or_default() += 1;
        }
        for (node, count) in counts {
            assert!(
                (8_000..=12_000).contains(&count),
                "{node}: {count} of 50000 (expected ~10000)"
            );
        }
    }

    #[test]
    fn the_ring_is_the_same_in_every_process() {
        // Fixed expectations: a hash or placement change would re-shard every user.
        let ring = Ring::new(["a", "b", "c"], 16);
        let owners: Vec<&str> = ["x", "y", "z", "customer-1"]
            .iter()
            .map(|k| *ring.get(k.as_bytes()).expect("owner"))
            .collect();
        assert_eq!(owners, ["a", "b", "a", "a"]);
    }

    #[test]
    fn weights_multiply_points_and_share() {
        let ring = Ring::with_weights([("a", 1), ("b", 2), ("c", 0)], 200);
        assert_eq!(ring.points(), 600);
        let mut counts: HashMap<&str, u32> = HashMap::new();
        for i in 0..30_000 {
            *counts
                .entry(ring.get(format!("key-{i}").as_bytes()).expect("owner"))
                .or_default() += 1;
        }
        assert_eq!(counts.get("c"), None);
        let (a, b) = (counts["a"], counts["b"]);
        assert!((8_000..=12_000).contains(&a), "a: {a}");
        assert!((17_000..=23_000).contains(&b), "b: {b}");
        // The weight-0 node is never on a walk.
        assert_eq!(ring.walk(b"k").count(), 2);
    }

    #[test]
    fn raising_a_weight_only_pulls_keys_to_that_node() {
        let before = Ring::with_weights([("a", 1), ("b", 1), ("c", 1)], 64);
        let after = Ring::with_weights([("a", 1), ("b", 3), ("c", 1)], 64);
        for i in 0..5_000u32 {
            let key = i.to_le_bytes();
            let (old, new) = (before.get(&key), after.get(&key));
            assert!(old == new || new == Some(&"b"), "{old:?} -> {new:?}");
        }
    }

    #[test]
    fn member_rings_check_their_input() {
        assert_eq!(
            Ring::from_members(Member::all(["a"]), 0).expect_err("zero"),
            ShardError::ZeroVnodes { vnodes: 0 }
        );
        assert!(matches!(
            Ring::from_members(vec![Member::weighted("a", u32::MAX)], 160),
            Err(ShardError::TooManyPoints { .. })
        ));
        // The strategy answers like the generic ring over the same names.
        let members = Ring::from_members(Member::all(["a", "b", "c"]), 16).expect("valid");
        let names = Ring::new(["a", "b", "c"], 16);
        for key in ["x", "y", "z", "customer-1"] {
            assert_eq!(
                members.owner(key.as_bytes()).map(|m| m.name.as_str()),
                names.get(key.as_bytes()).copied()
            );
        }
    }

    proptest! {
        /// Removing a node moves only its keys; the rest stay put.
        #[test]
        fn removing_a_node_moves_only_its_keys(n in 2usize..8, removed in 0usize..8, keys in proptest::collection::vec(any::<u64>(), 1..200)) {
            let removed = removed % n;
            let all = names(n);
            let before = Ring::new(all.clone(), 64);
            let after = Ring::new(all.iter().enumerate().filter(|(i, _)| *i != removed).map(|(_, s)| s.clone()), 64);
            for key in keys {
                let key = key.to_le_bytes();
                let old = before.get(&key).expect("owner");
                let new = after.get(&key).expect("owner");
                if *old != all[removed] {
                    prop_assert_eq!(old, new);
                } else {
                    // Its keys go to the next node clockwise.
                    prop_assert_eq!(Some(new), before.walk(&key).nth(1));
                }
            }
        }

        /// `walk` yields every node exactly once, owner first.
        #[test]
        fn walk_visits_every_node_once(n in 1usize..10, key: u64) {
            let ring = Ring::new(names(n), 8);
            let walked: Vec<&String> = ring.walk(&key.to_le_bytes()).collect();
            prop_assert_eq!(walked.len(), n);
            let mut sorted = walked.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), n);
            prop_assert_eq!(walked[0], ring.get(&key.to_le_bytes()).expect("owner"));
        }

        /// With bounded loads no node ever exceeds the bound, whatever the keys.
        #[test]
        fn bounded_loads_never_exceed_the_bound(n in 1usize..8, keys in proptest::collection::vec(0u64..20, 1..300)) {
            let ring = Ring::new(names(n), 32);
            let mut load: HashMap<String, u64> = HashMap::new();
            for (total, key) in keys.into_iter().enumerate() {
                let total = total as u64;
                // A few hot keys: without the bound one node would take most.
                let bound = ring.load_bound(total, 1.25);
                let node = ring
                    .pick(&key.to_le_bytes(), |node| load.get(node).copied().unwrap_or(0) < bound)
                    .expect("some node is under the bound")
                    .clone();
                *load.entry(node).or_default() += 1;
                prop_assert!(load.values().all(|l| *l <= ring.load_bound(total, 1.25)));
            }
        }
    }
}
