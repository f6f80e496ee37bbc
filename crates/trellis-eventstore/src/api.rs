//! The event store contract every backend implements.

use std::fmt::Debug;
use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use crate::event::{Body, EventData, Invalid, RecordedEvent, StreamName};

/// What the writer believes about a stream before appending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream has no events (or was soft-deleted).
    NoStream,
    /// The stream has at least one event.
    Exists,
    /// The stream's last event has this version.
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream whose last version is `current` (`None`: no events, or
    /// soft-deleted with last version `deleted_at`) meets this expectation.
    pub fn admits(self, current: Option<u64>) -> bool {
        match (self, current) {
            (Self::Any, _) | (Self::NoStream, None) => true,
            (Self::Exists, current) => current.is_some(),
            (Self::Exact(v), Some(c)) => v == c,
            (Self::NoStream | Self::Exact(_), _) => false,
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no_stream"),
            Self::Exists => f.write_str("exists"),
            Self::Exact(v) => write!(f, "{v}"),
        }
    }
}

/// Events to append to one stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Append {
    /// The stream.
    pub stream: StreamName,
    /// The stream's expected version.
    pub expected: ExpectedVersion,
    /// The events, in order.
    pub events: Vec<EventData>,
}

/// The outcome of an append to one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The stream.
    pub stream: StreamName,
    /// The stream's version after the append: its last event's. `None` if it still
    /// has none.
    pub version: Option<u64>,
    /// The global positions of the appended events (of the first append, for an
    /// idempotent repeat).
    pub positions: Range<u64>,
}

/// Which way to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    /// Oldest first.
    #[default]
    Forward,
    /// Newest first.
    Backward,
}

/// A point in a stream's past, for reading it as it was then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// Up to and including this version.
    Version(u64),
    /// Events appended at or before this time (ms since the Unix epoch).
    Timestamp(u64),
}

/// A stream read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadStream {
    /// The first version to read (forward: default 0; backward: default the last).
    pub from: Option<u64>,
    /// Most events to return.
    pub limit: usize,
    /// Which way.
    pub direction: Direction,
    /// Read the stream as it was at this point.
    pub as_of: Option<AsOf>,
}

impl Default for ReadStream {
    fn default() -> Self {
        Self {
            from: None,
            limit: 100,
            direction: Direction::Forward,
            as_of: None,
        }
    }
}

/// Events read from a stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamSlice {
    /// The events, in the direction read.
    pub events: Vec<RecordedEvent>,
    /// The stream's version (its last event's, deleted or not), as of the read.
    pub version: Option<u64>,
    /// Where the next page starts, if there is one.
    pub next: Option<u64>,
}

/// Limits on what a stream's reads return. Events they hide stay in `$all`
/// until removed from storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamMetadata {
    /// Events older than this are not returned.
    pub max_age: Option<Duration>,
    /// Only the newest this many events are returned.
    pub max_count: Option<u64>,
    /// Events with a lower version are not returned.
    pub truncate_before: Option<u64>,
}

impl StreamMetadata {
    /// Whether the event at `version` appended at `timestamp_ms` is visible in a
    /// stream whose last version is `last`, at `now_ms`.
    pub fn shows(&self, version: u64, timestamp_ms: u64, last: u64, now_ms: u64) -> bool {
        if self.truncate_before.is_some_and(|t| version < t) {
            return false;
        }
        if self
            .max_count
            .is_some_and(|n| n == 0 || version < (last + 1).saturating_sub(n))
        {
            return false;
        }
        if let Some(age) = self.max_age {
            let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
            if now_ms.saturating_sub(timestamp_ms) > age_ms {
                return false;
            }
        }
        true
    }
}

/// How a stream was deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    /// Its events are hidden; appending recreates it, continuing its versions.
    Soft,
    /// Tombstoned: reads and appends fail with [`EventStoreError::StreamDeleted`].
    Hard,
}

/// What the store knows of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// The stream.
    pub stream: StreamName,
    /// Its last event's version (visible or not).
    pub version: Option<u64>,
    /// Its read limits.
    pub metadata: StreamMetadata,
    /// Whether it is deleted, and how.
    pub deleted: Option<Deletion>,
}

/// A snapshot of an aggregate's state at a stream version.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The version of the last event folded into it.
    pub version: u64,
    /// The state.
    pub data: Body,
}

/// Why an event store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventStoreError {
    /// The stream's version is not what the append expected.
    #[error("stream {stream} is at version {}, the append expected {expected}", actual.map_or_else(|| "none (no stream)".to_owned(), |v| v.to_string()))]
    WrongExpectedVersion {
        /// The stream.
        stream: StreamName,
        /// What was expected.
        expected: ExpectedVersion,
        /// Its version.
        actual: Option<u64>,
    },
    /// The stream was hard-deleted.
    #[error("stream {0} is deleted")]
    StreamDeleted(StreamName),
    /// The stream has never had events.
    #[error("stream {0} not found")]
    StreamNotFound(StreamName),
    /// An event id already stored elsewhere (not an idempotent repeat).
    #[error("event id {id} is already stored in stream {stream} at version {version}")]
    DuplicateEventId {
        /// The id.
        id: Uuid,
        /// Where it is.
        stream: StreamName,
        /// At which version.
        version: u64,
    },
    /// No persistent subscription group of that name.
    #[error("no persistent subscription group {0:?}")]
    SubscriptionNotFound(String),
    /// A request that is not valid.
    #[error("{0}")]
    Invalid(#[from] Invalid),
    /// The backend could not be reached.
    #[error("{backend} backend unavailable: {reason}")]
    Unavailable {
        /// The backend.
        backend: &'static str,
        /// Why.
        reason: String,
    },
    /// Any other backend failure.
    #[error("{backend} backend error: {reason}")]
    Backend {
        /// The backend.
        backend: &'static str,
        /// Why.
        reason: String,
    },
}

/// An event store backend.
///
/// # To ensure correctness
/// Every implementation must guarantee, and `contract` checks:
/// 1. **Durable before return**: an append that returned is fsynced (embedded) or
///    committed (engine); an append that failed stored nothing.
/// 2. **Atomic batches**: all events of one call to [`append`](Self::append), across
///    all its streams, are stored, or none; every expectation is checked first.
/// 3. **Optimistic concurrency**: of concurrent appends expecting the same version,
///    one wins; stream versions are contiguous from 0.
/// 4. **Idempotence**: appending the same event ids again with the same expectation
///    succeeds without storing them twice and returns the first outcome.
/// 5. **A gap-free global order that never skips**: positions go 0, 1, 2, … in
///    commit order; once [`read_all`](Self::read_all) has returned position `p`, no
///    event below `p` is committed later.
/// 6. **Reads honour stream metadata and deletion**.
#[async_trait]
pub trait EventStore: Debug + Send + Sync + 'static {
    /// The backend's name.
    fn backend(&self) -> &'static str;

    /// Appends to one or more streams, atomically; see the guarantees above.
    async fn append(&self, appends: Vec<Append>) -> Result<Vec<Appended>, EventStoreError>;

    /// Reads a stream. An unknown stream is [`EventStoreError::StreamNotFound`]; a
    /// hard-deleted one [`EventStoreError::StreamDeleted`].
    async fn read_stream(
        &self,
        stream: &StreamName,
        read: ReadStream,
    ) -> Result<StreamSlice, EventStoreError>;

    /// Up to `limit` events of every stream from `position`, in order.
    async fn read_all(
        &self,
        position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, EventStoreError>;

    /// Up to `limit` events of the streams of `category` from global `position`,
    /// in order (deleted and truncated events hidden).
    async fn read_category(
        &self,
        category: &str,
        position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, EventStoreError>;

    /// The position the next event will get, updated as appends commit (for live
    /// subscriptions).
    fn head(&self) -> watch::Receiver<u64>;

    /// What the store knows of a stream; `None` if it never existed.
    async fn stream_info(&self, stream: &StreamName)
    -> Result<Option<StreamInfo>, EventStoreError>;

    /// Sets a stream's read limits (the stream needn't exist yet).
    async fn set_metadata(
        &self,
        stream: &StreamName,
        metadata: StreamMetadata,
    ) -> Result<(), EventStoreError>;

    /// Deletes a stream if it is at `expected`.
    async fn delete(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        how: Deletion,
    ) -> Result<(), EventStoreError>;

    /// Saves a snapshot of `stream` (replacing an older one).
    async fn save_snapshot(
        &self,
        stream: &StreamName,
        snapshot: Snapshot,
    ) -> Result<(), EventStoreError>;

    /// The latest snapshot of `stream`.
    async fn load_snapshot(&self, stream: &StreamName)
    -> Result<Option<Snapshot>, EventStoreError>;

    /// A named checkpoint (subscriptions, projections).
    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>, EventStoreError>;

    /// Stores a named checkpoint durably.
    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), EventStoreError>;

    /// Checks the backend is reachable.
    async fn health(&self) -> Result<(), EventStoreError>;

    /// Stops background work; acknowledged appends are already durable.
    async fn close(&self) -> Result<(), EventStoreError>;
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn expectations() {
        use ExpectedVersion::*;
        assert!(Any.admits(None) && Any.admits(Some(3)));
        assert!(NoStream.admits(None) && !NoStream.admits(Some(0)));
        assert!(Exists.admits(Some(0)) && !Exists.admits(None));
        assert!(Exact(3).admits(Some(3)) && !Exact(3).admits(Some(2)) && !Exact(0).admits(None));
    }

    #[test]
    fn metadata_hides_what_it_should() {
        let now = 1_000_000;
        let m = StreamMetadata {
            max_count: Some(2),
            ..Default::default()
        };
        let shown: Vec<u64> = (0..5).filter(|v| m.shows(*v, now, 4, now)).collect();
        assert_eq!(shown, [3, 4]);
        let m = StreamMetadata {
            truncate_before: Some(3),
            ..Default::default()
        };
        assert!(!m.shows(2, now, 4, now) && m.shows(3, now, 4, now));
        let m = StreamMetadata {
            max_age: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        assert!(m.shows(0, now - 1000, 0, now) && !m.shows(0, now - 1001, 0, now));
        let m = StreamMetadata {
            max_count: Some(0),
            ..Default::default()
        };
        assert!(!m.shows(4, now, 4, now));
    }
}
