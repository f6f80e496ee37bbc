//! Why a strategy could not be built.

/// A member list or a parameter a strategy cannot be built from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// Two members share a name: every process must map a name to one member.
    #[error("member `{name}` is listed twice")]
    DuplicateMember {
        /// The repeated name.
        name: String,
    },
    /// A ring needs at least one virtual node per unit of weight.
    #[error("vnodes must be at least 1, got {vnodes}")]
    ZeroVnodes {
        /// The value given.
        vnodes: u32,
    },
    /// A ring of more points than this is refused (memory is 16 bytes a point).
    #[error(
        "the ring needs {points} points (vnodes × the sum of the weights), over the limit of {max}"
    )]
    TooManyPoints {
        /// `vnodes × Σ weights`.
        points: u64,
        /// The most accepted.
        max: u64,
    },
    /// Maglev's permutations only cover the whole table when its size is prime.
    #[error("Maglev table size {table_size} is not a prime")]
    TableSizeNotPrime {
        /// The value given.
        table_size: u64,
    },
    /// A Maglev table needs at least one entry per member that holds keys.
    #[error("Maglev table size {table_size} is smaller than the {members} weighted members")]
    TableTooSmall {
        /// The value given.
        table_size: u64,
        /// Members with a non-zero weight.
        members: usize,
    },
    /// A Maglev table larger than this is refused (memory is 4 bytes an entry).
    #[error("Maglev table size {table_size} is over the limit of {max}")]
    TableTooLarge {
        /// The value given.
        table_size: u64,
        /// The largest size accepted.
        max: u64,
    },
    /// Jump hash gives a member one bucket per unit of weight; too many buckets in all.
    #[error("jump hash needs {buckets} buckets (the sum of the weights), over the limit of {max}")]
    TooManyBuckets {
        /// The sum of the weights.
        buckets: u64,
        /// The largest sum accepted.
        max: u64,
    },
    /// Bounded loads need a finite ε > 0 (capacity is `⌈(1 + ε) × mean⌉`).
    #[error("epsilon must be finite and greater than 0, got {epsilon}")]
    InvalidEpsilon {
        /// The value given.
        epsilon: f64,
    },
}
