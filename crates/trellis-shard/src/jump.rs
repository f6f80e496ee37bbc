//! Jump consistent hash (Lamping & Veach, 2014).

use crate::{Member, ShardError, Strategy, StrategyKind};

/// The most buckets (the sum of the weights) [`Jump::new`] accepts: 4 bytes each.
pub const MAX_BUCKETS: u64 = 1 << 22;

/// The bucket in `0..buckets` of a key hashed to `key`, by jump consistent hash
/// (Lamping & Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm", 2014).
///
/// Growing `buckets` by one moves exactly the keys that land in the new bucket, about
/// `1/buckets` of them, and nothing else. It takes `O(ln buckets)` steps and no memory.
/// `buckets` of 0 is taken as 1.
///
/// ```
/// use trellis_shard::jump_hash;
///
/// let key = trellis_shard::hash(b"customer-42");
/// let before = jump_hash(key, 10);
/// let after = jump_hash(key, 11);
/// assert!(after == before || after == 10);
/// ```
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let buckets = i64::from(buckets.max(1));
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    // 0 <= b < buckets <= u32::MAX.
    b as u32
}

/// The `"jump"` strategy: [`jump_hash`] over the members as buckets, in the order
/// given; a member of weight `w` occupies `w` consecutive buckets.
///
/// Jump hash is the cheapest strategy in memory and close to it in time, and its
/// balance is exact in expectation. The price is that members are *positions*:
///
/// - Appending a member, or removing (or re-weighting) the **last** one, moves the
///   optimum: only keys of the new buckets, or of the removed ones.
/// - Removing a member from the middle shifts every member after it one position
///   down, so most of their keys move too. To remove member `k`, move the last member
///   into its place instead (`Vec::swap_remove`): then the removed member's keys go to
///   the moved one, and the moved member's old keys spread over everyone — about
///   `2/N` of the keys move instead of the optimum `1/N` (the benchmark reports both).
/// - Keep the member list in an order every process agrees on (e.g. join order kept
///   in the shard map), not sorted by name, or a join moves keys from everyone.
///
/// ```
/// use trellis_shard::{Jump, Member, Strategy};
///
/// let three = Jump::new(Member::all(["a", "b", "c"])).expect("valid");
/// let four = Jump::new(Member::all(["a", "b", "c", "d"])).expect("valid");
/// let key = b"customer-42";
/// let (before, after) = (three.owner(key).expect("a"), four.owner(key).expect("b"));
/// // Appending `d` only moves keys to `d`.
/// assert!(after == before || after.name == "d");
/// ```
#[derive(Debug, Clone)]
pub struct Jump {
    members: Vec<Member>,
    /// The member (index) of each bucket; as long as the sum of the weights.
    buckets: Vec<u32>,
}

impl Jump {
    /// Jump hash over `members`, in this order.
    ///
    /// # Errors
    /// [`ShardError::DuplicateMember`], or [`ShardError::TooManyBuckets`] when the
    /// weights add up to more than [`MAX_BUCKETS`].
    pub fn new(members: Vec<Member>) -> Result<Self, ShardError> {
        crate::member::check_unique(&members)?;
        let total: u64 = members.iter().map(|m| u64::from(m.weight)).sum();
        if total > MAX_BUCKETS {
            return Err(ShardError::TooManyBuckets {
                buckets: total,
                max: MAX_BUCKETS,
            });
        }
        let mut buckets = Vec::with_capacity(members.len());
        for (index, member) in members.iter().enumerate() {
            // `MAX_BUCKETS` keeps the count and the index within u32.
            let index = index as u32;
            buckets.extend(std::iter::repeat_n(index, member.weight as usize));
        }
        Ok(Self { members, buckets })
    }

    /// The number of buckets: the sum of the weights.
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }
}

impl Strategy for Jump {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Jump
    }

    fn members(&self) -> &[Member] {
        &self.members
    }

    fn locate(&self, hash: u64) -> Option<usize> {
        if self.buckets.is_empty() {
            return None;
        }
        // `buckets.len() <= MAX_BUCKETS` fits in u32.
        let bucket = jump_hash(hash, self.buckets.len() as u32);
        Some(self.buckets[bucket as usize] as usize)
    }
}

#[cfg(test)]
mod test {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn matches_the_golden_values_shared_across_languages() {
        // Guava's `Hashing.consistentHash` compatibility vectors (same LCG as the
        // paper's C++ code): any change here would move every key.
        let golden100 = [
            0, 55, 62, 8, 45, 59, 86, 97, 82, 59, 73, 37, 17, 56, 86, 21, 90, 37, 38, 83,
        ];
        for (key, expected) in golden100.into_iter().enumerate() {
            assert_eq!(jump_hash(key as u64, 100), expected, "key {key}");
        }
        assert_eq!(jump_hash(10_863_919_174_838_991, 11), 6);
        assert_eq!(jump_hash(2_016_238_256_797_177_309, 11), 3);
        assert_eq!(jump_hash(1_673_758_223_894_951_030, 11), 5);
        assert_eq!(jump_hash(2, 100_001), 80_343);
        assert_eq!(jump_hash(2201, 100_001), 22_152);
        assert_eq!(jump_hash(2202, 100_001), 15_018);
        assert_eq!(jump_hash(7, 0), 0);
    }

    #[test]
    fn weights_become_consecutive_buckets() {
        let jump = Jump::new(vec![
            Member::weighted("a", 2),
            Member::weighted("b", 0),
            Member::weighted("c", 1),
        ])
        .expect("valid");
        assert_eq!(jump.buckets, [0, 0, 2]);
        assert_eq!(jump.buckets(), 3);
    }

    #[test]
    fn refuses_too_many_buckets() {
        let err = Jump::new(vec![Member::weighted("a", u32::MAX)]).expect_err("too many");
        assert!(matches!(err, ShardError::TooManyBuckets { .. }));
    }

    proptest! {
        /// Growing by one bucket moves a key only into the new bucket.
        #[test]
        fn growing_moves_keys_only_to_the_new_bucket(key: u64, buckets in 1u32..5000) {
            let before = jump_hash(key, buckets);
            prop_assert!(before < buckets);
            let after = jump_hash(key, buckets + 1);
            prop_assert!(after == before || after == buckets);
        }
    }
}
