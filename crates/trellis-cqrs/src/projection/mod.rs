//! The read side: [`Projection`]s turn events into a read model (a "view") kept in a
//! [`StateStore`](trellis_state::StateStore), run by a [`ProjectionRunner`].
//!
//! # Exactly-once effect, without distributed transactions
//! A projection does not write to the state store itself: it records its writes in
//! a [`ViewBatch`], and the runner commits them in one
//! [`transact`](trellis_state::StateStore::transact) together with the
//! projection's checkpoint (the position of the next event to apply), on the
//! condition that the checkpoint is still the one the batch started from. So:
//! - a crash before the commit loses the batch *and* leaves the checkpoint where it
//!   was: the batch is applied again, once;
//! - a crash after it finds the checkpoint past the batch: nothing is applied twice;
//! - two runners of one projection (two processes, a deploy overlap) both try to
//!   commit from the same checkpoint; the state store's atomic precondition lets
//!   exactly one succeed, and the other reloads the checkpoint and goes on from
//!   there. The view is what a single runner would have built.
//!
//! This is why the checkpoint lives in the *same* state store as the view and not in
//! the event store: only one store's transaction can cover both. It is also why a
//! batch may read the view outside that transaction ([`ViewBatch::get`]): every
//! writer of the view moves the checkpoint, so a batch that read something another
//! batch changed fails its commit and is applied again. Nothing but the runner
//! should write under a projection's prefix.
//!
//! # Keys
//! View keys are relative to the projection's prefix, by default
//! `projections/{name}/`; the checkpoint is `{prefix}$checkpoint`, holding
//! `{"position": P}`. `P` is a global position for [`Source::All`] and
//! [`Source::Category`], and a stream version for [`Source::Stream`]. Keys
//! starting with `$` are reserved for the runner.
//!
//! # Rebuilding
//! [`ProjectionRunner::rebuild`] deletes the view and the checkpoint, so the
//! projection starts again from its start position. Readers see an empty, then
//! partial, view until it has caught up; runners of the projection pause while the
//! deletion is in progress (it is fenced by a marker in the checkpoint key).

mod runner;
mod view;

use async_trait::async_trait;
use trellis_eventstore::subscription::Source;
use trellis_eventstore::{EventStoreError, RecordedEvent};
use trellis_state::StateError;

use crate::aggregate::CodecError;

pub use self::runner::{
    ProjectionHandle, ProjectionRunner, ProjectionRunnerBuilder, ProjectionState, ProjectionStatus,
};
pub use self::view::{View, ViewBatch};

/// A boxed error, for a projection's own failures.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A read model built from events.
///
/// # To ensure correctness
/// 1. **No side effects outside the batch.** [`apply`](Self::apply) may run more
///    than once for the same events (after an error, a lost race with another
///    runner, or a crash before the commit); only what it writes to the
///    [`ViewBatch`] is kept, and only once. Sending e-mails from a projection is a
///    job for a persistent subscription or a saga, not for this.
/// 2. **Deterministic.** Applied again to the same events and view, it must write
///    the same thing, or a rebuild gives another view.
///
/// # Example
/// ```
/// use trellis_cqrs::{Projection, ProjectionError, Source, ViewBatch, async_trait};
/// use trellis_eventstore::RecordedEvent;
///
/// /// How many events of each type the `order` streams have.
/// struct TypeCounts;
///
/// #[async_trait]
/// impl Projection for TypeCounts {
///     fn name(&self) -> &str {
///         "order-type-counts"
///     }
///
///     fn source(&self) -> Source {
///         Source::Category("order".into())
///     }
///
///     async fn apply(&self, events: &[RecordedEvent], view: &mut ViewBatch) -> Result<(), ProjectionError> {
///         for event in events {
///             // Sees this batch's earlier writes, then the stored view.
///             let count: u64 = view.get(&event.ty).await?.unwrap_or(0);
///             view.put(&event.ty, &(count + 1))?;
///         }
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Its name: 1 to 200 bytes without `/`, control characters or a leading `$`.
    /// It names the view's key prefix, the checkpoint and the metrics.
    fn name(&self) -> &str;

    /// Which events it reads.
    fn source(&self) -> Source;

    /// Applies a batch of events, in order, by recording writes to `view`.
    ///
    /// Events of Trellis's own streams (category `trellis`) are not passed when the
    /// source is [`Source::All`].
    ///
    /// # Errors
    /// Any error: nothing of the batch is kept, the runner reports it in its status
    /// and retries the batch with backoff until it succeeds.
    async fn apply(
        &self,
        events: &[RecordedEvent],
        view: &mut ViewBatch,
    ) -> Result<(), ProjectionError>;
}

/// Why a projection or its runner failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The projection's own failure; see [`ProjectionError::custom`].
    #[error("{0}")]
    Custom(#[source] BoxError),
    /// An event could not be decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A view key is not a valid state key (or is reserved).
    #[error("view key {key:?} is not valid: {reason}")]
    InvalidKey {
        /// The key, with its prefix.
        key: String,
        /// Why.
        reason: String,
    },
    /// A view value is not the JSON expected, or does not serialize.
    #[error("view value at {key:?}: {source}")]
    Json {
        /// The key, with its prefix.
        key: String,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
    /// The stored checkpoint is not one the runner wrote.
    #[error("checkpoint {key:?} is malformed: {reason}")]
    Checkpoint {
        /// Its key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The projection's name is not usable; see [`Projection::name`].
    #[error("invalid projection name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The state store failed.
    #[error("state store: {0}")]
    State(#[from] StateError),
    /// The event store failed.
    #[error("event store: {0}")]
    EventStore(#[from] EventStoreError),
}

impl ProjectionError {
    /// A projection's own failure, from an error or a message:
    /// `ProjectionError::custom("unknown currency")`.
    pub fn custom(error: impl Into<BoxError>) -> Self {
        Self::Custom(error.into())
    }

    pub(crate) fn invalid_key(key: &str, reason: impl ToString) -> Self {
        Self::InvalidKey {
            key: key.to_owned(),
            reason: reason.to_string(),
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[allow(dead_code)]
    fn _object_safe(_: Box<dyn Projection>) {}
}
