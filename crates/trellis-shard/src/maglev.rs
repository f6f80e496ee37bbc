//! Maglev hashing (Eisenbud et al., NSDI 2016, §3.4).

use crate::{Member, ShardError, Strategy, StrategyKind};

/// The default (and smallest automatic) table size: a prime, ≥ 100 × 655 members.
pub const DEFAULT_TABLE_SIZE: u64 = 65_537;

/// The largest table accepted: 4 bytes an entry, so 128 MiB.
pub const MAX_TABLE_SIZE: u64 = 1 << 25;

/// Seed of the hash giving a member's `offset` into its permutation.
const OFFSET_SEED: u64 = 0x7472_656c_6c69_734f; // "trellisO"
/// Seed of the hash giving a member's `skip` through the table.
const SKIP_SEED: u64 = 0x7472_656c_6c69_7353; // "trellisS"

/// The `"maglev"` strategy: Google's Maglev consistent hashing, a lookup table of
/// prime size `M` filled from per-member permutations.
///
/// Each member `i` has a permutation of the table slots, `(offset_i + j × skip_i) mod M`
/// with `offset` and `skip` (in `1..M`) hashed from its name; as `M` is prime every
/// permutation visits every slot. Members take turns claiming their next free slot
/// until the table is full, so every member gets `M/N` slots ± 1: the best balance of
/// all strategies here. A lookup is one array index.
///
/// A membership change refills the table. Most slots keep their member, since each
/// member still prefers the same slots, but the new turn order cascades into other
/// slots, so more than the optimum `1/N` of keys move, the more so as `N/M` grows.
/// The benchmark measured about 1.05× the optimum at 10 members, 1.6× at 100
/// (M = 65 537) and 4× at 1 000 (M = 655 373). Maglev is the choice for constant-time
/// lookups and near-perfect balance, not for minimal movement. Keep `M` ≥ 100 ×
/// members for balance within about 1%.
///
/// Weights: in pass `p` over the members, a member of weight `w` claims a slot when
/// `⌊(p+1)·w/w_max⌋ > ⌊p·w/w_max⌋`, so its share is `w/Σw` to within rounding.
/// Members take turns in name order, so the member list's order does not matter.
///
/// ```
/// use trellis_shard::{Maglev, Member, Strategy};
///
/// let maglev = Maglev::new(Member::all(["a", "b", "c"])).expect("valid");
/// assert_eq!(maglev.table_size(), 65_537);
/// assert!(maglev.owner(b"customer-42").is_some());
/// ```
#[derive(Clone)]
pub struct Maglev {
    members: Vec<Member>,
    /// The member (index) of each slot; empty when no member has weight.
    table: Vec<u32>,
}

impl std::fmt::Debug for Maglev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maglev")
            .field("members", &self.members)
            .field("table_size", &self.table.len())
            .finish()
    }
}

impl Maglev {
    /// Maglev over `members` with the table size from [`auto_table_size`](Self::auto_table_size).
    ///
    /// # Errors
    /// [`ShardError::DuplicateMember`], or [`ShardError::TableTooLarge`] for more
    /// members than a table of [`MAX_TABLE_SIZE`] serves.
    pub fn new(members: Vec<Member>) -> Result<Self, ShardError> {
        let size = Self::auto_table_size(members.len());
        Self::with_table_size(members, size)
    }

    /// Maglev over `members` with a table of `table_size` slots: a prime, at least the
    /// number of members of non-zero weight (≥ 100 × them for good balance).
    ///
    /// # Errors
    /// [`ShardError::DuplicateMember`], [`ShardError::TableSizeNotPrime`],
    /// [`ShardError::TableTooSmall`] or [`ShardError::TableTooLarge`].
    pub fn with_table_size(members: Vec<Member>, table_size: u64) -> Result<Self, ShardError> {
        crate::member::check_unique(&members)?;
        let weighted = members.iter().filter(|m| m.weight > 0).count();
        check_table_size(table_size, weighted)?;
        let table = populate(&members, table_size);
        Ok(Self { members, table })
    }

    /// The table size used when none is given: [`DEFAULT_TABLE_SIZE`] up to 655
    /// members, then the smallest prime ≥ 65 537 × 10^k for the smallest `k` that keeps
    /// the table ≥ 100 × members. The size (and so most placements) changes only when
    /// the member count crosses 655, 6 553, …; pin a size to rule that out.
    pub fn auto_table_size(members: usize) -> u64 {
        let wanted = 100 * members as u64;
        let mut base = DEFAULT_TABLE_SIZE;
        while base < wanted && base < MAX_TABLE_SIZE {
            base *= 10;
        }
        next_prime(base)
    }

    /// The number of slots.
    pub fn table_size(&self) -> usize {
        self.table.len()
    }
}

impl Strategy for Maglev {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Maglev
    }

    fn members(&self) -> &[Member] {
        &self.members
    }

    fn locate(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(hash % self.table.len() as u64) as usize] as usize)
    }
}

/// Checks a table size for `weighted` members of non-zero weight.
pub(crate) fn check_table_size(table_size: u64, weighted: usize) -> Result<(), ShardError> {
    if table_size > MAX_TABLE_SIZE {
        return Err(ShardError::TableTooLarge {
            table_size,
            max: MAX_TABLE_SIZE,
        });
    }
    if !is_prime(table_size) {
        return Err(ShardError::TableSizeNotPrime { table_size });
    }
    if table_size < weighted as u64 {
        return Err(ShardError::TableTooSmall {
            table_size,
            members: weighted,
        });
    }
    Ok(())
}

/// The paper's population loop (Pseudocode 1), with weighted turns.
fn populate(members: &[Member], size: u64) -> Vec<u32> {
    const EMPTY: u32 = u32::MAX;
    // Turns go in name order, so the list's order does not matter.
    let mut order: Vec<usize> = (0..members.len())
        .filter(|i| members[*i].weight > 0)
        .collect();
    if order.is_empty() {
        return Vec::new();
    }
    order.sort_unstable_by(|a, b| members[*a].name.cmp(&members[*b].name));
    let max_weight = order
        .iter()
        .map(|i| u64::from(members[*i].weight))
        .max()
        .unwrap_or(1);
    // Per member: the next slot of its permutation and its step.
    let mut next = vec![0u64; members.len()];
    let mut skip = vec![1u64; members.len()];
    for &i in &order {
        let name = members[i].name.as_bytes();
        next[i] = xxhash_rust::xxh3::xxh3_64_with_seed(name, OFFSET_SEED) % size;
        skip[i] = xxhash_rust::xxh3::xxh3_64_with_seed(name, SKIP_SEED) % (size - 1).max(1) + 1;
    }
    let mut table = vec![EMPTY; size as usize];
    let mut filled = 0u64;
    let mut pass = 0u64;
    // Terminates: every pass the heaviest members claim a slot, and a member always
    // finds a free slot while one exists (its permutation visits them all).
    loop {
        for &i in &order {
            let weight = u64::from(members[i].weight);
            if (pass + 1) * weight / max_weight == pass * weight / max_weight {
                continue;
            }
            // `slot + skip < 2 × size`: a subtraction instead of a division.
            let advance = |slot: u64| {
                let next = slot + skip[i];
                if next >= size { next - size } else { next }
            };
            let mut slot = next[i];
            while table[slot as usize] != EMPTY {
                slot = advance(slot);
            }
            // Fewer than 2^25 members (table ≤ MAX_TABLE_SIZE): fits u32.
            table[slot as usize] = i as u32;
            next[i] = advance(slot);
            filled += 1;
            if filled == size {
                return table;
            }
        }
        pass += 1;
    }
}

/// Trial division; sizes are at most [`MAX_TABLE_SIZE`], so at most ~3 000 divisions.
fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

fn next_prime(mut n: u64) -> u64 {
    while !is_prime(n) {
        n += 1;
    }
    n
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::Strategy;

    #[test]
    fn primes() {
        let small: Vec<u64> = (0..30).filter(|n| is_prime(*n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65_537));
        assert!(!is_prime(65_536));
    }

    #[test]
    fn table_size_grows_in_steps_with_the_member_count() {
        assert_eq!(Maglev::auto_table_size(0), 65_537);
        assert_eq!(Maglev::auto_table_size(655), 65_537);
        let next = Maglev::auto_table_size(656);
        assert!(next >= 655_370 && is_prime(next), "{next}");
        assert_eq!(Maglev::auto_table_size(6553), next);
        assert!(Maglev::auto_table_size(6554) > next);
    }

    #[test]
    fn every_member_gets_its_share_of_slots() {
        let members = Member::all((0..10).map(|i| format!("m{i}")));
        let maglev = Maglev::with_table_size(members, 1009).expect("valid");
        let mut slots = [0u32; 10];
        for member in &maglev.table {
            slots[*member as usize] += 1;
        }
        // Turns are round-robin: 1009 = 10 × 100 + 9.
        assert!(slots.iter().all(|s| (100..=101).contains(s)), "{slots:?}");
    }

    #[test]
    fn weighted_members_get_proportional_slots() {
        let members = vec![
            Member::weighted("a", 1),
            Member::weighted("b", 2),
            Member::weighted("c", 3),
            Member::weighted("d", 0),
        ];
        let maglev = Maglev::with_table_size(members, 6007).expect("valid");
        let mut slots = [0u32; 4];
        for member in &maglev.table {
            slots[*member as usize] += 1;
        }
        assert_eq!(slots[3], 0);
        assert!((995..=1005).contains(&slots[0]), "{slots:?}");
        assert!((1995..=2010).contains(&slots[1]), "{slots:?}");
        assert!((2995..=3010).contains(&slots[2]), "{slots:?}");
    }

    #[test]
    fn bad_table_sizes_are_refused() {
        let members = Member::all(["a", "b", "c"]);
        assert_eq!(
            Maglev::with_table_size(members.clone(), 100).expect_err("not prime"),
            ShardError::TableSizeNotPrime { table_size: 100 }
        );
        assert_eq!(
            Maglev::with_table_size(members.clone(), 2).expect_err("too small"),
            ShardError::TableTooSmall {
                table_size: 2,
                members: 3
            }
        );
        assert!(matches!(
            Maglev::with_table_size(members.clone(), MAX_TABLE_SIZE + 1),
            Err(ShardError::TableTooLarge { .. })
        ));
        // Exactly one slot each still works.
        let tiny = Maglev::with_table_size(members, 3).expect("valid");
        let mut owners: Vec<u32> = tiny.table.clone();
        owners.sort_unstable();
        assert_eq!(owners, [0, 1, 2]);
    }

    #[test]
    fn member_order_does_not_matter() {
        let forward = Maglev::new(Member::all(["a", "b", "c", "d"])).expect("valid");
        let backward = Maglev::new(Member::all(["d", "c", "b", "a"])).expect("valid");
        for i in 0..2000u32 {
            let key = i.to_le_bytes();
            assert_eq!(forward.owner(&key), backward.owner(&key));
        }
    }
}
