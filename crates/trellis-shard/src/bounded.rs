//! Consistent hashing with bounded loads (Mirrokni, Thorup & Zadimoghaddam, 2018).

use crate::{Member, Ring, ShardError, Strategy, StrategyKind};

/// The `"bounded"` strategy: a [`Ring`] whose members each take at most
/// `⌈(1 + ε) × mean load⌉` keys (weighted: `⌈(1 + ε) × (total + 1) × w / Σw⌉`).
///
/// A key goes to the first member clockwise that is under its capacity, so a hot key,
/// or plain bad luck, spills to the next members instead of overloading one. The
/// capacities add up to more than the keys placed, so some member always has room.
/// Mirrokni et al. show that a membership change then moves `O(1/ε²)` times the
/// optimum in expectation: ε = 0.25 caps each member at 125% of the mean for a few
/// times the optimal movement (the benchmark prints both).
///
/// The loads are the caller's, in a [`Loads`]: connections in flight, sessions, or the
/// keys placed so far. [`assign`](Self::assign) places a key and counts it;
/// [`pick`](Self::pick) only answers. As a [`Strategy`], `locate` is the ring owner (the
/// placement when every member has room) and [`Strategy::assign`] places a batch of keys
/// (e.g. all shards) in order, starting from no load, which is deterministic.
///
/// ```
/// use trellis_shard::{BoundedLoads, Member};
///
/// let bounded = BoundedLoads::new(Member::all(["a", "b", "c"]), 160, 0.25).expect("valid");
/// let mut loads = bounded.loads();
/// // One very hot key: each copy counts, and copies spill once its owner is full.
/// for _ in 0..300 {
///     bounded.assign(b"hot", &mut loads).expect("members");
/// }
/// // ⌈1.25 × 300 / 3⌉ = 125: nobody carries more, though every copy prefers one member.
/// assert_eq!(bounded.capacity(0, 299), 125);
/// assert!(loads.as_slice().iter().all(|load| *load <= 125));
/// ```
#[derive(Debug, Clone)]
pub struct BoundedLoads {
    ring: Ring<Member>,
    epsilon: f64,
    /// Σ weights, the denominator of every capacity.
    total_weight: u64,
}

impl BoundedLoads {
    /// Bounded loads over a ring of `vnodes` points per unit of weight, with slack
    /// `epsilon` (> 0; 0.25 is a good start).
    ///
    /// # Errors
    /// As [`Ring::from_members`], or [`ShardError::InvalidEpsilon`].
    pub fn new(members: Vec<Member>, vnodes: u32, epsilon: f64) -> Result<Self, ShardError> {
        check_epsilon(epsilon)?;
        let ring = Ring::from_members(members, vnodes)?;
        let total_weight = ring.nodes().iter().map(|m| u64::from(m.weight)).sum();
        Ok(Self {
            ring,
            epsilon,
            total_weight,
        })
    }

    /// The ring underneath.
    pub fn ring(&self) -> &Ring<Member> {
        &self.ring
    }

    /// The slack ε.
    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// Empty loads, one counter per member.
    pub fn loads(&self) -> Loads {
        Loads::new(self.ring.nodes().len())
    }

    /// The most member `index` may carry once one more key joins the `total` already
    /// placed: `⌈(1 + ε) × (total + 1) × w / Σw⌉` (with equal weights,
    /// `⌈(1 + ε) × mean⌉` counting the new key).
    pub fn capacity(&self, index: usize, total: u64) -> u64 {
        let weight = self.ring.nodes().get(index).map_or(0, |m| m.weight);
        if weight == 0 || self.total_weight == 0 {
            return 0;
        }
        let share = f64::from(weight) / self.total_weight as f64;
        ((1.0 + self.epsilon) * (total as f64 + 1.0) * share).ceil() as u64
    }

    /// The member `key` goes to under `loads`: the first clockwise whose load is under
    /// its capacity. `None` only when no member has a weight.
    pub fn pick(&self, key: &[u8], loads: &Loads) -> Option<usize> {
        self.pick_hash(crate::hash(key), loads)
    }

    /// [`pick`](Self::pick) for a key already hashed with [`hash`](crate::hash).
    pub fn pick_hash(&self, hash: u64, loads: &Loads) -> Option<usize> {
        let total = loads.total();
        self.ring
            .walk_hash(hash)
            .find(|i| loads.get(*i) < self.capacity(*i, total))
    }

    /// Picks the member for `key` and counts the key on it.
    pub fn assign(&self, key: &[u8], loads: &mut Loads) -> Option<usize> {
        let member = self.pick(key, loads)?;
        loads.add(member);
        Some(member)
    }
}

impl Strategy for BoundedLoads {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Bounded
    }

    fn members(&self) -> &[Member] {
        self.ring.nodes()
    }

    fn locate(&self, hash: u64) -> Option<usize> {
        self.ring.owner_of(hash)
    }

    fn locate_replicas(&self, hash: u64, n: usize) -> Vec<usize> {
        self.ring.walk_hash(hash).take(n).collect()
    }

    fn has_replica_order(&self) -> bool {
        true
    }

    fn assign(&self, hashes: &[u64]) -> Vec<Option<usize>> {
        let mut loads = self.loads();
        hashes
            .iter()
            .map(|hash| {
                let member = self.pick_hash(*hash, &loads)?;
                loads.add(member);
                Some(member)
            })
            .collect()
    }
}

/// Checks that ε is finite and positive.
pub(crate) fn check_epsilon(epsilon: f64) -> Result<(), ShardError> {
    if epsilon.is_finite() && epsilon > 0.0 {
        Ok(())
    } else {
        Err(ShardError::InvalidEpsilon { epsilon })
    }
}

/// What each member carries, by member index, and the total.
///
/// Indices past the end read as 0, so loads kept across a membership change only need
/// [`resize`](Self::resize) when members join at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loads {
    per_member: Vec<u64>,
    total: u64,
}

impl Loads {
    /// Zero loads for `members` members.
    pub fn new(members: usize) -> Self {
        Self {
            per_member: vec![0; members],
            total: 0,
        }
    }

    /// Member `index`'s load.
    pub fn get(&self, index: usize) -> u64 {
        self.per_member.get(index).copied().unwrap_or(0)
    }

    /// The sum of all loads.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The loads, by member index.
    pub fn as_slice(&self) -> &[u64] {
        &self.per_member
    }

    /// One more on member `index` (growing the list if needed).
    pub fn add(&mut self, index: usize) {
        if index >= self.per_member.len() {
            self.per_member.resize(index + 1, 0);
        }
        self.per_member[index] += 1;
        self.total += 1;
    }

    /// One less on member `index`; a load already at 0 stays there.
    pub fn remove(&mut self, index: usize) {
        if let Some(load) = self.per_member.get_mut(index)
            && *load > 0
        {
            *load -= 1;
            self.total -= 1;
        }
    }

    /// Sets member `index`'s load, e.g. from a gauge of requests in flight.
    pub fn set(&mut self, index: usize, load: u64) {
        if index >= self.per_member.len() {
            self.per_member.resize(index + 1, 0);
        }
        self.total = self.total - self.per_member[index] + load;
        self.per_member[index] = load;
    }

    /// Resizes to `members` counters, dropping the loads of indices past the end.
    pub fn resize(&mut self, members: usize) {
        self.per_member.resize(members, 0);
        self.total = self.per_member.iter().sum();
    }
}

#[cfg(test)]
mod test {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn epsilon_must_be_positive_and_finite() {
        for epsilon in [0.0, -0.5, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                BoundedLoads::new(Member::all(["a"]), 16, epsilon),
                Err(ShardError::InvalidEpsilon { .. })
            ));
        }
    }

    #[test]
    fn capacity_is_the_ceiling_of_one_plus_epsilon_times_the_mean() {
        let bounded =
            BoundedLoads::new(Member::all(["a", "b", "c", "d"]), 16, 0.25).expect("valid");
        // 99 placed + 1 joining = 100 over 4: mean 25, capacity ⌈31.25⌉.
        assert_eq!(bounded.capacity(0, 99), 32);
        assert_eq!(bounded.capacity(0, 0), 1);
        assert_eq!(bounded.capacity(9, 99), 0);
        let weighted = BoundedLoads::new(vec![Member::weighted("a", 3), Member::new("b")], 16, 0.5)
            .expect("valid");
        assert_eq!(weighted.capacity(0, 99), 113); // ⌈1.5 × 100 × 3/4⌉ = 112.5 → 113
        assert_eq!(weighted.capacity(1, 99), 38); // ⌈1.5 × 100 × 1/4⌉ = 37.5 → 38
    }

    #[test]
    fn loads_keep_their_total() {
        let mut loads = Loads::new(2);
        loads.add(0);
        loads.add(3);
        loads.set(1, 5);
        loads.remove(0);
        loads.remove(0);
        assert_eq!(loads.as_slice(), [0, 5, 0, 1]);
        assert_eq!(loads.total(), 6);
        loads.resize(2);
        assert_eq!(loads.total(), 5);
        assert_eq!(loads.get(7), 0);
    }

    proptest! {
        /// Whatever the keys (many repeated) and weights, no member ever exceeds its
        /// capacity, and a weighted member always exists to take the key.
        #[test]
        fn loads_never_exceed_capacity(
            weights in proptest::collection::vec(0u32..4, 1..8),
            keys in proptest::collection::vec(0u64..20, 1..400),
            epsilon in 0.01f64..1.0,
        ) {
            prop_assume!(weights.iter().any(|w| *w > 0));
            let members: Vec<Member> = weights
                .iter()
                .enumerate()
                .map(|(i, w)| Member::weighted(format!("m{i}"), *w))
                .collect();
            let bounded = BoundedLoads::new(members, 16, epsilon).expect("valid");
            let mut loads = bounded.loads();
            for key in keys {
                let placed = loads.total();
                let member = bounded.assign(&key.to_le_bytes(), &mut loads).expect("room somewhere");
                prop_assert!(weights[member] > 0);
                for (i, load) in loads.as_slice().iter().enumerate() {
                    prop_assert!(*load <= bounded.capacity(i, placed), "member {i}: {load}");
                }
            }
        }
    }
}
