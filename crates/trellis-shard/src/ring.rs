use std::fmt;

/// A consistent-hash ring of nodes `N`, each placed at `vnodes` points.
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
        let nodes: Vec<N> = nodes.into_iter().collect();
        let vnodes = vnodes.max(1);
        let mut points = Vec::with_capacity(nodes.len() * vnodes as usize);
        for (index, node) in nodes.iter().enumerate() {
            let name = node.as_ref().as_bytes();
            for v in 0..vnodes {
                let mut label = Vec::with_capacity(name.len() + 5);
                label.extend_from_slice(name);
                label.push(b'#');
                label.extend_from_slice(&v.to_le_bytes());
                points.push((crate::hash(&label), index));
            }
        }
        // Ties (astronomically rare) break by node index, so the order is total.
        points.sort_unstable();
        Self { nodes, points }
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

    /// The node owning `key`.
    pub fn get(&self, key: &[u8]) -> Option<&N> {
        self.walk(key).next()
    }

    /// The first node clockwise from `key` that `accept` takes (e.g. healthy and under
    /// its load bound); `None` if it takes none.
    pub fn pick(&self, key: &[u8], mut accept: impl FnMut(&N) -> bool) -> Option<&N> {
        self.walk(key).find(|n| accept(n))
    }

    /// Every node once, clockwise from `key`: the owner first, then the nodes a key
    /// would move to if the ones before were gone.
    pub fn walk(&self, key: &[u8]) -> impl Iterator<Item = &N> + '_ {
        let h = crate::hash(key);
        let start = self.points.partition_point(|(p, _)| *p < h);
        let n = self.points.len();
        let mut seen = vec![false; self.nodes.len()];
        let mut remaining = self.nodes.len();
        (0..n).filter_map(move |i| {
            if remaining == 0 {
                return None;
            }
            let (_, index) = self.points[(start + i) % n];
            if std::mem::replace(&mut seen[index], true) {
                return None;
            }
            remaining -= 1;
            Some(&self.nodes[index])
        })
    }

    /// The load bound of bounded-load hashing: `⌈c × (total + 1) / nodes⌉`, the most a
    /// node may carry when `total` is carried in all. `c` (> 1, typically 1.25) trades
    /// balance for key stability.
    pub fn load_bound(&self, total: u64, c: f64) -> u64 {
        let nodes = self.nodes.len().max(1) as f64;
        (c * (total as f64 + 1.0) / nodes).ceil() as u64
    }
}

#[cfg(test)]
mod test {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

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
