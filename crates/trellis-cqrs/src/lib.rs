//! The CQRS building block: event-sourced aggregates on the write side, checkpointed
//! projections into a state store on the read side.
//!
//! The write side keeps each aggregate as a stream of the event store
//! ([`trellis_eventstore`]): a [`CommandHandler`] loads it (from a snapshot, if any),
//! lets the [`Aggregate`] decide, and appends the resulting events with optimistic
//! concurrency, retrying when another writer won the race. The read side keeps
//! views in a state store ([`trellis_state`]): a [`ProjectionRunner`] feeds batches
//! of events to a [`Projection`] and commits the view writes with the checkpoint in
//! one transaction, so every event takes effect exactly once — across crashes,
//! restarts and competing runners.
//!
//! # Layout
//! - [`aggregate`]: the [`Aggregate`] trait (decide / evolve) and how events are
//!   stored: a serde enum's variant name is the event type ([`encode_event`],
//!   [`decode_event`]).
//! - [`command`]: [`CommandHandler`] (load, decide, append, retry, snapshot),
//!   [`Committed`] and [`CqrsError`].
//! - [`projection`]: the [`Projection`] trait, [`ViewBatch`] and [`View`],
//!   [`ProjectionRunner`] with its status, handle and rebuild.
//!
//! # Example
//! A counter aggregate, a command handler and a projection keeping the sum of every
//! counter, on the embedded event store and the embedded state store.
//! ```
//! use std::sync::Arc;
//! use serde::{Deserialize, Serialize};
//! use trellis_cqrs::{
//!     Aggregate, CommandHandler, CqrsError, Projection, ProjectionError, ProjectionRunner, Source,
//!     ViewBatch, async_trait, decode_event,
//! };
//! use trellis_eventstore::embedded::EmbeddedEventStore;
//! use trellis_eventstore::{EventStore, RecordedEvent};
//! use trellis_state::{EmbeddedStore, StateStore};
//!
//! // The write model.
//! #[derive(Debug, Default, Serialize, Deserialize)]
//! struct Counter {
//!     value: u64,
//! }
//!
//! enum Command {
//!     Add(u64),
//! }
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! enum Event {
//!     Added { n: u64 }, // stored as type "Added", data {"n": …}
//! }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("adding zero is not allowed")]
//! struct AddedZero;
//!
//! impl Aggregate for Counter {
//!     type Command = Command;
//!     type Event = Event;
//!     type Error = AddedZero;
//!     const CATEGORY: &'static str = "counter"; // streams "counter-{id}"
//!
//!     fn handle(&self, command: &Command) -> Result<Vec<Event>, AddedZero> {
//!         match *command {
//!             Command::Add(0) => Err(AddedZero),
//!             Command::Add(n) => Ok(vec![Event::Added { n }]),
//!         }
//!     }
//!
//!     fn apply(&mut self, event: Event) {
//!         match event {
//!             Event::Added { n } => self.value += n,
//!         }
//!     }
//! }
//!
//! // The read model: the sum of all counters, under the key "sum".
//! struct Sum;
//!
//! #[async_trait]
//! impl Projection for Sum {
//!     fn name(&self) -> &str {
//!         "counter-sum"
//!     }
//!
//!     fn source(&self) -> Source {
//!         Source::Category(Counter::CATEGORY.into())
//!     }
//!
//!     async fn apply(&self, events: &[RecordedEvent], view: &mut ViewBatch) -> Result<(), ProjectionError> {
//!         for recorded in events {
//!             let Event::Added { n } = decode_event(recorded)?;
//!             let sum: u64 = view.get("sum").await?.unwrap_or(0);
//!             view.put("sum", &(sum + n))?;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let events: Arc<dyn EventStore> = Arc::new(EmbeddedEventStore::open(dir.path().join("events.redb")).await?);
//! let state: Arc<dyn StateStore> = Arc::new(EmbeddedStore::open(dir.path().join("state.redb"), Default::default())?);
//!
//! // Commands.
//! let counters = CommandHandler::<Counter>::builder().snapshot_every(100).build(Arc::clone(&events));
//! counters.execute("a", Command::Add(2)).await?;
//! let committed = counters.execute("b", Command::Add(3)).await?;
//! assert_eq!((committed.stream.as_str(), committed.version), ("counter-b", Some(0)));
//! let refused = counters.execute("a", Command::Add(0)).await;
//! assert!(matches!(refused, Err(CqrsError::Rejected(AddedZero))));
//! let (a, version) = counters.load("a").await?;
//! assert_eq!((a.value, version), (2, Some(0)));
//!
//! // The projection, on a task of its own; wait until it has seen the last command.
//! let sum = ProjectionRunner::builder(Sum).build(Arc::clone(&events), Arc::clone(&state))?.spawn();
//! let status = sum.wait_for_checkpoint(committed.positions.end).await;
//! assert_eq!(status.lag, 0);
//! assert_eq!(sum.view().get::<u64>("sum").await?, Some(5));
//! sum.stop().await;
//! # Ok(())
//! # }
//! ```

pub mod aggregate;
pub mod command;
pub mod projection;

pub use aggregate::{Aggregate, CodecError, decode_event, encode_event};
pub use async_trait::async_trait;
pub use command::{CommandHandler, CommandHandlerBuilder, Committed, CqrsError};
pub use projection::{
    Projection, ProjectionError, ProjectionHandle, ProjectionRunner, ProjectionRunnerBuilder,
    ProjectionState, ProjectionStatus, View, ViewBatch,
};
pub use trellis_eventstore::subscription::{Source, Start};
