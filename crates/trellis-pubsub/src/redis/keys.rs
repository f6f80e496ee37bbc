//! Key names and the mapping between stream ids and positions.

/// Bits of a position that hold the stream id's sequence number.
const SEQ_BITS: u32 = 20;
/// The largest sequence number a position can hold.
const MAX_SEQ: u64 = (1 << SEQ_BITS) - 1;
/// The largest millisecond time a position can hold (the year 2527).
const MAX_MS: u64 = u64::MAX >> SEQ_BITS;

/// The position of stream id `ms-seq`: `ms << 20 | seq`. `None` if the id is malformed
/// or out of range (`seq` ≥ 2²⁰ or `ms` ≥ 2⁴⁴).
///
/// Monotonic and injective: a later id always has a larger position, and
/// [`stream_id`] gives the id back.
pub fn position(id: &str) -> Option<u64> {
    let (ms, seq) = id.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(ms) || !digits(seq) {
        return None;
    }
    let ms: u64 = ms.parse().ok()?;
    let seq: u64 = seq.parse().ok()?;
    (ms <= MAX_MS && seq <= MAX_SEQ).then_some(ms << SEQ_BITS | seq)
}

/// The stream id (`ms-seq`) of a position.
pub fn stream_id(position: u64) -> String {
    format!("{}-{}", position >> SEQ_BITS, position & MAX_SEQ)
}

/// Names of the Redis keys under one prefix `P`.
#[derive(Debug, Clone)]
pub(super) struct KeySpace {
    prefix: String,
}

impl KeySpace {
    pub(super) fn new(prefix: String) -> Self {
        Self { prefix }
    }

    /// `P s:<topic>`: the topic's stream.
    pub(super) fn stream(&self, topic: &str) -> String {
        format!("{}s:{topic}", self.prefix)
    }

    /// `P d:<topic>:<event id>`: the stream id of a recently published event id.
    pub(super) fn dedupe(&self, topic: &str, id: &str) -> String {
        format!("{}d:{topic}:{id}", self.prefix)
    }

    /// `P f:<topic>:` + group: in-flight deliveries → ack deadline.
    pub(super) fn inflight_prefix(&self, topic: &str) -> String {
        format!("{}f:{topic}:", self.prefix)
    }

    /// `P r:<topic>:` + group: deliveries waiting for redelivery → when due.
    pub(super) fn retry_prefix(&self, topic: &str) -> String {
        format!("{}r:{topic}:", self.prefix)
    }

    /// `P c:<topic>:` + group: counters (`parked`, `dead`).
    pub(super) fn counters_prefix(&self, topic: &str) -> String {
        format!("{}c:{topic}:", self.prefix)
    }

    /// The per-group keys the scripts take: inflight, retry, holders, counters.
    pub(super) fn group(&self, topic: &str, group: &str) -> GroupKeys {
        GroupKeys {
            stream: self.stream(topic),
            inflight: format!("{}{group}", self.inflight_prefix(topic)),
            retry: format!("{}{group}", self.retry_prefix(topic)),
            holders: format!("{}h:{topic}:{group}", self.prefix),
            counters: format!("{}{group}", self.counters_prefix(topic)),
            queue_prefix: format!("{}q:{topic}:{group}:", self.prefix),
        }
    }

    /// `P cfg:<topic>`: hash of group → its subscription settings as of its latest pull.
    pub(super) fn settings(&self, topic: &str) -> String {
        format!("{}cfg:{topic}", self.prefix)
    }
}

/// The keys of one consumer group on one topic.
#[derive(Debug, Clone)]
pub(super) struct GroupKeys {
    pub(super) stream: String,
    pub(super) inflight: String,
    pub(super) retry: String,
    pub(super) holders: String,
    pub(super) counters: String,
    /// `P q:<topic>:<group>:` + ordering key: entries waiting for the key.
    pub(super) queue_prefix: String,
}
