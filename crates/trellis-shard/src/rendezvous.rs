//! Rendezvous (highest random weight) hashing, weighted by the logarithmic method.

use std::cmp::Ordering;

use crate::{Member, ShardError, Strategy, StrategyKind};

/// Seeds the per-member hash, so that a member's hash differs from a key's hash even
/// when a key equals a member name.
const MEMBER_SEED: u64 = 0x7472_656c_6c69_7352; // "trellisR"

/// The `"rendezvous"` strategy: weighted highest-random-weight hashing (Thaler &
/// Ravishankar, 1996; weights by Schindelhauer & Schomaker's logarithmic method).
///
/// Each member scores a key `-weight / ln(u)`, where `u` in `(0, 1)` is a hash of the
/// key and the member; the highest score owns the key. A member wins a key with
/// probability `weight / Σ weights` exactly, and a member's scores do not depend on
/// the other members, so a join only takes keys *to* the new member and a leave only
/// moves the leaver's keys, each to its runner-up — the optimum, with no tables.
/// The score order gives replicas for free ([`Strategy::owners`]).
///
/// The price is `O(N)` per lookup (one mix and, with unequal weights, one `ln` per
/// member): fine for tens of members, slower than a table at thousands. With equal
/// weights the scores are compared as raw hashes, skipping the `ln`.
///
/// ```
/// use trellis_shard::{Member, Rendezvous, Strategy};
///
/// let before = Rendezvous::new(Member::all(["a", "b", "c"])).expect("valid");
/// let after = Rendezvous::new(Member::all(["a", "c"])).expect("valid");
/// let key = b"customer-42";
/// let owner = before.owner(key).expect("owner");
/// if owner.name != "b" {
///     assert_eq!(after.owner(key), Some(owner)); // only b's keys move...
/// } else {
///     assert_eq!(after.owner(key), Some(before.owners(key, 2)[1])); // ...to their runner-up
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Rendezvous {
    members: Vec<Member>,
    /// Per member: its name's hash, mixed with the key hash for the member's score.
    seeds: Vec<u64>,
    /// Per member: its weight as a float (0 never wins).
    weights: Vec<f64>,
    /// All weights equal and non-zero: compare raw hashes instead of scores.
    uniform: bool,
}

impl Rendezvous {
    /// Rendezvous hashing over `members`; their order does not matter.
    ///
    /// # Errors
    /// [`ShardError::DuplicateMember`].
    pub fn new(members: Vec<Member>) -> Result<Self, ShardError> {
        crate::member::check_unique(&members)?;
        let seeds = members
            .iter()
            .map(|m| xxhash_rust::xxh3::xxh3_64_with_seed(m.name.as_bytes(), MEMBER_SEED))
            .collect();
        let weights = members.iter().map(|m| f64::from(m.weight)).collect();
        let uniform = members.first().is_some_and(|first| {
            first.weight > 0 && members.iter().all(|m| m.weight == first.weight)
        });
        Ok(Self {
            members,
            seeds,
            weights,
            uniform,
        })
    }

    /// Member `i`'s rank for a key hashed to `hash`; higher wins. With equal weights
    /// it is the raw mixed hash (monotone in the score `-w / ln(u)` for a fixed `w`);
    /// otherwise the score's bits, which order like the score since scores are finite
    /// and non-negative. Weight-0 members are never ranked.
    fn rank(&self, i: usize, hash: u64) -> u64 {
        let h = mix(hash ^ self.seeds[i]);
        if self.uniform {
            return h;
        }
        // u in (0, 1): 53 random bits, centred in their interval so ln(u) < 0.
        let u = ((h >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
        (-self.weights[i] / u.ln()).to_bits()
    }

    /// Whether `a` outranks `b`: by rank, then (for exact ties) by name, so the member
    /// order never matters.
    fn beats(&self, (a, ra): (usize, u64), (b, rb): (usize, u64)) -> bool {
        match ra.cmp(&rb) {
            Ordering::Greater => true,
            Ordering::Less => false,
            Ordering::Equal => self.members[a].name < self.members[b].name,
        }
    }

    /// Members that can win, with their ranks for `hash`.
    fn ranked(&self, hash: u64) -> impl Iterator<Item = (usize, u64)> + '_ {
        (0..self.members.len())
            .filter(|i| self.weights[*i] > 0.0)
            .map(move |i| (i, self.rank(i, hash)))
    }
}

/// MurmurHash3's 64-bit finalizer: a bijection with full avalanche, so the scores of
/// distinct members are unrelated even though their inputs differ by a fixed xor.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

impl Strategy for Rendezvous {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Rendezvous
    }

    fn members(&self) -> &[Member] {
        &self.members
    }

    fn locate(&self, hash: u64) -> Option<usize> {
        if self.uniform {
            // The hot loop: one mix and one compare per member. Exact rank ties need
            // equal seeds (a 2^-64 name-hash collision); they still break by name.
            let mut best = (0, mix(hash ^ self.seeds[0]));
            for (i, seed) in self.seeds.iter().enumerate().skip(1) {
                let rank = mix(hash ^ seed);
                if rank > best.1 || (rank == best.1 && self.beats((i, rank), best)) {
                    best = (i, rank);
                }
            }
            return Some(best.0);
        }
        let mut best: Option<(usize, u64)> = None;
        for candidate in self.ranked(hash) {
            if best.is_none_or(|b| self.beats(candidate, b)) {
                best = Some(candidate);
            }
        }
        best.map(|(i, _)| i)
    }

    fn locate_replicas(&self, hash: u64, n: usize) -> Vec<usize> {
        if n <= 1 {
            return self.locate(hash).into_iter().take(n).collect();
        }
        let mut ranked: Vec<(usize, u64)> = self.ranked(hash).collect();
        ranked.sort_unstable_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| self.members[a.0].name.cmp(&self.members[b.0].name))
        });
        ranked.into_iter().take(n).map(|(i, _)| i).collect()
    }

    fn has_replica_order(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod test {
    use proptest::prelude::*;

    use super::*;
    use crate::Strategy;

    #[test]
    fn weight_zero_never_wins() {
        let hrw = Rendezvous::new(vec![Member::weighted("a", 0), Member::new("b")]).expect("valid");
        for i in 0..1000u32 {
            assert_eq!(hrw.locate(crate::hash(&i.to_le_bytes())), Some(1));
        }
        let none = Rendezvous::new(vec![Member::weighted("a", 0)]).expect("valid");
        assert_eq!(none.locate(1), None);
        assert!(none.locate_replicas(1, 3).is_empty());
    }

    proptest! {
        /// The replica order starts with the owner, and `locate_replicas` agrees with
        /// `locate` whatever the weights.
        #[test]
        fn replicas_start_with_the_owner(weights in proptest::collection::vec(0u32..4, 1..12), key: u64) {
            let members: Vec<Member> = weights
                .iter()
                .enumerate()
                .map(|(i, w)| Member::weighted(format!("m{i}"), *w))
                .collect();
            let hrw = Rendezvous::new(members).expect("valid");
            let replicas = hrw.locate_replicas(key, weights.len());
            prop_assert_eq!(replicas.len(), weights.iter().filter(|w| **w > 0).count());
            prop_assert_eq!(replicas.first().copied(), hrw.locate(key));
        }
    }
}
