//! The event store building block: streams of events with optimistic concurrency,
//! atomic appends across streams, a gap-free global order (`$all`) that never skips,
//! categories, stream metadata and deletion, snapshots and checkpoints.
//!
//! # Layout
//! - [`event`]: stream names, [`EventData`] to append, [`RecordedEvent`] read back,
//!   and their storage encoding.
//! - [`EventStore`]: the backend contract and its types ([`Append`],
//!   [`ExpectedVersion`], [`ReadStream`], [`StreamMetadata`], …) and
//!   [`EventStoreError`].
//! - [`embedded`]: the default backend, on redb with group commit.
//! - [`postgres`]: tables in a PostgreSQL schema; positions taken at commit time.
//! - [`subscription`]: catch-up subscriptions (history, then live) as a `Stream`.
//! - [`persistent`]: persistent subscriptions: consumer groups with a stored
//!   checkpoint, acks, retries and parking.
//! - [`upcast`]: transforms that turn stored old event shapes into the current
//!   one on read, in Rust or as declarative config rules.
//! - `contract` (feature `contract`): the test suite every backend passes.
//!
//! # Example
//! ```
//! use trellis_eventstore::embedded::EmbeddedEventStore;
//! use trellis_eventstore::{Append, EventData, EventStore, ExpectedVersion, ReadStream, StreamName};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = EmbeddedEventStore::open(dir.path().join("events.redb")).await?;
//! let order = StreamName::new("order-17")?;
//! let placed = EventData::json("OrderPlaced", &serde_json::json!({"total": 42}));
//! store.append(vec![Append { stream: order.clone(), expected: ExpectedVersion::NoStream, events: vec![placed] }]).await?;
//!
//! // A second writer that also thinks the stream is new loses.
//! let late = EventData::json("OrderPlaced", &serde_json::json!({"total": 1}));
//! let conflict = store.append(vec![Append { stream: order.clone(), expected: ExpectedVersion::NoStream, events: vec![late] }]).await;
//! assert!(conflict.is_err());
//!
//! let read = store.read_stream(&order, ReadStream::default()).await?;
//! assert_eq!(read.events[0].ty, "OrderPlaced");
//! # Ok(())
//! # }
//! ```

mod api;
pub mod embedded;
pub mod event;
mod open;
pub mod persistent;
pub mod postgres;
pub mod subscription;
pub mod upcast;

#[cfg(feature = "contract")]
pub mod contract;

pub use api::{
    Append, Appended, AsOf, Deletion, Direction, EventStore, EventStoreError, ExpectedVersion,
    ReadStream, Snapshot, StreamInfo, StreamMetadata, StreamSlice,
};
pub use event::{Body, EventData, Metadata, RecordedEvent, StreamName};
pub use open::open;
