//! Command handling: load an aggregate, decide, append with optimistic concurrency,
//! and retry when another writer got there first.
//!
//! # Why retry and not lock
//! Two commands for one aggregate may be decided at once, by two tasks or two
//! processes. Each append states the version it decided on
//! ([`ExpectedVersion::Exact`], or [`ExpectedVersion::NoStream`] for a new
//! aggregate), so the store admits exactly one of them; the other gets
//! [`EventStoreError::WrongExpectedVersion`], reloads the state that now includes
//! the winner's events and decides again — possibly differently (the withdrawal that
//! fitted the old balance may not fit the new one). The number of such retries is
//! bounded; past it the caller gets [`CqrsError::Conflict`].
//!
//! # Snapshots
//! With [`snapshot_every`](CommandHandlerBuilder::snapshot_every) (for aggregates
//! that are `Serialize + DeserializeOwned`), the handler saves the state as a
//! snapshot once that many events have been appended since the last one, and loads
//! start from the latest snapshot, reading only the events after it. A snapshot
//! that no longer deserializes (the state type changed) is ignored with a warning
//! and the stream is replayed from the start; saving one is best effort, since the
//! events it summarizes are already committed.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use trellis_eventstore::event::Invalid;
use trellis_eventstore::{
    Append, Body, Direction, EventStore, EventStoreError, ExpectedVersion, Metadata, ReadStream,
    Snapshot, StreamName,
};

use crate::aggregate::{Aggregate, CodecError, decode_event, encode_event};

/// Events read per page when loading an aggregate.
const LOAD_PAGE: usize = 512;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CqrsError<E> {
    /// The aggregate refused the command (its own domain error). Nothing was
    /// appended.
    #[error("command rejected: {0}")]
    Rejected(E),
    /// Other writers kept appending to the stream between load and append, through
    /// every allowed attempt. Nothing was appended.
    #[error("stream {stream}: other writers kept winning, {attempts} attempts failed")]
    Conflict {
        /// The aggregate's stream.
        stream: StreamName,
        /// How many times the command was decided and its append refused.
        attempts: u32,
    },
    /// An event could not be encoded, or a stored one decoded.
    #[error("stream {stream}: {source}")]
    Codec {
        /// The aggregate's stream.
        stream: StreamName,
        /// What went wrong.
        #[source]
        source: CodecError,
    },
    /// The id does not make a valid stream name with the aggregate's category.
    #[error("invalid aggregate id: {0}")]
    InvalidId(#[source] Invalid),
    /// The event store failed.
    #[error("event store: {0}")]
    Store(#[from] EventStoreError),
}

impl<E> CqrsError<E> {
    /// The aggregate's refusal, if that is what this is.
    pub fn rejection(&self) -> Option<&E> {
        match self {
            Self::Rejected(e) => Some(e),
            _ => None,
        }
    }
}

/// The outcome of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The aggregate's stream.
    pub stream: StreamName,
    /// The stream's version after the command (its last event's); `None` if the
    /// aggregate still has no events.
    pub version: Option<u64>,
    /// The global positions of the appended events; empty if the command caused
    /// none. A projection whose checkpoint has passed `positions.end` has seen them
    /// (see [`ProjectionRunner::wait_for_checkpoint`](crate::ProjectionRunner::wait_for_checkpoint)).
    pub positions: Range<u64>,
    /// How many events were appended.
    pub events: usize,
}

/// Saves and restores an aggregate's state; set only for `Serialize +
/// DeserializeOwned` aggregates, by [`CommandHandlerBuilder::snapshot_every`].
struct Snapshots<A> {
    every: u64,
    encode: fn(&A) -> serde_json::Result<Value>,
    decode: fn(&str) -> serde_json::Result<A>,
}

// Written by hand: a derive would require `A: Clone`.
impl<A> Clone for Snapshots<A> {
    fn clone(&self) -> Self {
        Self {
            every: self.every,
            encode: self.encode,
            decode: self.decode,
        }
    }
}

fn encode_state<A: Serialize>(state: &A) -> serde_json::Result<Value> {
    serde_json::to_value(state)
}

fn decode_state<A: DeserializeOwned>(text: &str) -> serde_json::Result<A> {
    serde_json::from_str(text)
}

/// Configures a [`CommandHandler`]; see [`CommandHandler::builder`].
pub struct CommandHandlerBuilder<A> {
    max_retries: u32,
    snapshots: Option<Snapshots<A>>,
    metadata: Metadata,
}

impl<A> fmt::Debug for CommandHandlerBuilder<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandHandlerBuilder")
            .field("max_retries", &self.max_retries)
            .field("snapshot_every", &self.snapshots.as_ref().map(|s| s.every))
            .field("metadata", &self.metadata)
            .finish()
    }
}

impl<A: Aggregate> Default for CommandHandlerBuilder<A> {
    fn default() -> Self {
        Self {
            max_retries: 3,
            snapshots: None,
            metadata: Metadata::default(),
        }
    }
}

impl<A: Aggregate> CommandHandlerBuilder<A> {
    /// How many times a command is decided again after losing a race to another
    /// writer, before [`CqrsError::Conflict`]. Default 3; 0 means no retry.
    pub fn max_retries(&mut self, retries: u32) -> &mut Self {
        self.max_retries = retries;
        self
    }

    /// Metadata every appended event carries (e.g. the application's name in
    /// `extra`); [`CommandHandler::execute_with`] adds per-command correlation and
    /// causation ids on top. Default: none.
    pub fn metadata(&mut self, metadata: Metadata) -> &mut Self {
        self.metadata = metadata;
        self
    }

    /// Builds the handler on `store`.
    pub fn build(&self, store: Arc<dyn EventStore>) -> CommandHandler<A> {
        CommandHandler {
            store,
            max_retries: self.max_retries,
            snapshots: self.snapshots.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

impl<A: Aggregate + Serialize + DeserializeOwned> CommandHandlerBuilder<A> {
    /// Saves a snapshot of the state (its JSON) once `events` events have been
    /// appended since the last one, and loads from the latest snapshot. Default: off;
    /// 0 turns it off.
    pub fn snapshot_every(&mut self, events: u64) -> &mut Self {
        self.snapshots = (events > 0).then_some(Snapshots {
            every: events,
            encode: encode_state::<A>,
            decode: decode_state::<A>,
        });
        self
    }
}

/// Executes commands on aggregates of type `A` stored in an [`EventStore`]: load,
/// [`handle`](Aggregate::handle), append, retry on conflict; see the
/// [module docs](self).
///
/// It holds no per-aggregate state, so one handler serves every instance and any
/// number of concurrent commands.
pub struct CommandHandler<A> {
    store: Arc<dyn EventStore>,
    max_retries: u32,
    snapshots: Option<Snapshots<A>>,
    metadata: Metadata,
}

impl<A> fmt::Debug for CommandHandler<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandHandler")
            .field("store", &self.store)
            .field("max_retries", &self.max_retries)
            .field("snapshot_every", &self.snapshots.as_ref().map(|s| s.every))
            .finish_non_exhaustive()
    }
}

// Written by hand: a derive would require `A: Clone`.
impl<A> Clone for CommandHandler<A> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            max_retries: self.max_retries,
            snapshots: self.snapshots.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

/// A loaded aggregate.
struct Loaded<A> {
    state: A,
    /// The stream's version; `None` if it has no events.
    version: Option<u64>,
    /// The version of the snapshot the load started from.
    snapshot: Option<u64>,
}

impl<A: Aggregate> CommandHandler<A> {
    /// A builder with the defaults: 3 retries, no snapshots, no metadata.
    pub fn builder() -> CommandHandlerBuilder<A> {
        CommandHandlerBuilder::default()
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Executes `command` on the aggregate `id`.
    ///
    /// # Errors
    /// [`CqrsError::Rejected`] if the aggregate refuses it, [`CqrsError::Conflict`]
    /// if other writers won every attempt, and the codec, id and store errors of
    /// [`CqrsError`]. On any error nothing was appended.
    pub async fn execute(
        &self,
        id: &str,
        command: A::Command,
    ) -> Result<Committed, CqrsError<A::Error>> {
        self.execute_with(id, command, Metadata::default()).await
    }

    /// Executes `command` on the aggregate `id`; its events carry `metadata` (e.g. the
    /// request's correlation id and the command's id as causation id) over the
    /// builder's [`metadata`](CommandHandlerBuilder::metadata).
    ///
    /// # Errors
    /// As [`execute`](Self::execute).
    pub async fn execute_with(
        &self,
        id: &str,
        command: A::Command,
        metadata: Metadata,
    ) -> Result<Committed, CqrsError<A::Error>> {
        let stream = A::stream_name(id).map_err(CqrsError::InvalidId)?;
        let metadata = merge(&self.metadata, metadata);
        let outcome = self.decide_and_append(&stream, &command, &metadata).await;
        let label = match &outcome {
            Ok(c) if c.events == 0 => "unchanged",
            Ok(_) => "committed",
            Err(CqrsError::Rejected(_)) => "rejected",
            Err(CqrsError::Conflict { .. }) => "conflict",
            Err(_) => "error",
        };
        metrics::counter!("trellis_cqrs_commands_total", "aggregate" => A::CATEGORY, "outcome" => label)
            .increment(1);
        outcome
    }

    async fn decide_and_append(
        &self,
        stream: &StreamName,
        command: &A::Command,
        metadata: &Metadata,
    ) -> Result<Committed, CqrsError<A::Error>> {
        let attempts = self.max_retries.saturating_add(1);
        for attempt in 1..=attempts {
            let Loaded {
                mut state,
                version,
                snapshot,
            } = self.load_stream(stream).await?;
            let events = state.handle(command).map_err(CqrsError::Rejected)?;
            if events.is_empty() {
                tracing::debug!(%stream, ?version, "command caused no events");
                return Ok(Committed {
                    stream: stream.clone(),
                    version,
                    positions: 0..0,
                    events: 0,
                });
            }
            let mut data = Vec::with_capacity(events.len());
            for event in &events {
                let mut event = encode_event(event).map_err(|source| CqrsError::Codec {
                    stream: stream.clone(),
                    source,
                })?;
                event.metadata = metadata.clone();
                data.push(event);
            }
            let expected = version.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
            let append = Append {
                stream: stream.clone(),
                expected,
                events: data,
            };
            match self.store.append(vec![append]).await {
                Ok(mut appended) => {
                    let Some(appended) = appended.pop() else {
                        return Err(CqrsError::Store(EventStoreError::Backend {
                            backend: self.store.backend(),
                            reason: "an append of one stream returned no outcome".into(),
                        }));
                    };
                    let committed = Committed {
                        stream: stream.clone(),
                        version: appended.version,
                        positions: appended.positions,
                        events: events.len(),
                    };
                    tracing::debug!(%stream, version = ?committed.version, events = committed.events, attempt, "command committed");
                    if let Some(snapshots) = &self.snapshots {
                        for event in events {
                            state.apply(event);
                        }
                        self.maybe_snapshot(snapshots, stream, &state, &committed, snapshot)
                            .await;
                    }
                    return Ok(committed);
                }
                Err(EventStoreError::WrongExpectedVersion { actual, .. }) => {
                    metrics::counter!("trellis_cqrs_command_conflicts_total", "aggregate" => A::CATEGORY)
                        .increment(1);
                    tracing::debug!(%stream, %expected, ?actual, attempt, attempts, "lost a race to another writer; reloading");
                }
                Err(e) => return Err(CqrsError::Store(e)),
            }
        }
        Err(CqrsError::Conflict {
            stream: stream.clone(),
            attempts,
        })
    }

    /// Saves a snapshot if `every` events were appended since the last one. Best
    /// effort: the events are committed whatever happens here.
    async fn maybe_snapshot(
        &self,
        snapshots: &Snapshots<A>,
        stream: &StreamName,
        state: &A,
        committed: &Committed,
        previous: Option<u64>,
    ) {
        let Some(version) = committed.version else {
            return;
        };
        let since = previous.map_or(version + 1, |p| version.saturating_sub(p));
        if since < snapshots.every {
            return;
        }
        let data = match (snapshots.encode)(state) {
            Ok(value) => Body::json(&value),
            Err(e) => {
                tracing::warn!(%stream, version, error = %e, "aggregate state does not serialize; no snapshot");
                return;
            }
        };
        match self
            .store
            .save_snapshot(stream, Snapshot { version, data })
            .await
        {
            Ok(()) => tracing::debug!(%stream, version, "snapshot saved"),
            Err(e) => {
                tracing::warn!(%stream, version, error = %e, "saving a snapshot failed; the next load replays more events");
            }
        }
    }

    /// The current state of the aggregate `id` and its stream's version (`None`: no
    /// events yet, and the state is `A::default()`), for queries against the write
    /// model.
    ///
    /// # Errors
    /// The codec, id and store errors of [`CqrsError`].
    pub async fn load(&self, id: &str) -> Result<(A, Option<u64>), CqrsError<A::Error>> {
        let stream = A::stream_name(id).map_err(CqrsError::InvalidId)?;
        let loaded = self.load_stream(&stream).await?;
        Ok((loaded.state, loaded.version))
    }

    async fn load_stream(&self, stream: &StreamName) -> Result<Loaded<A>, CqrsError<A::Error>> {
        let mut loaded = Loaded {
            state: A::default(),
            version: None,
            snapshot: None,
        };
        if let Some(snapshots) = &self.snapshots
            && let Some(snapshot) = self.store.load_snapshot(stream).await?
        {
            let restored = match &snapshot.data {
                Body::Json(raw) => (snapshots.decode)(raw.get()).map_err(|e| e.to_string()),
                Body::Bytes(_) => Err("the snapshot is not JSON".to_owned()),
            };
            match restored {
                Ok(state) => {
                    loaded = Loaded {
                        state,
                        version: Some(snapshot.version),
                        snapshot: Some(snapshot.version),
                    };
                }
                Err(error) => {
                    tracing::warn!(%stream, version = snapshot.version, %error, "ignoring a snapshot that does not deserialize; replaying the stream");
                }
            }
        }
        let mut from = loaded.version.map_or(0, |v| v + 1);
        loop {
            let read = ReadStream {
                from: Some(from),
                limit: LOAD_PAGE,
                direction: Direction::Forward,
                as_of: None,
            };
            let slice = match self.store.read_stream(stream, read).await {
                Ok(slice) => slice,
                Err(EventStoreError::StreamNotFound(_)) if loaded.snapshot.is_none() => {
                    return Ok(loaded);
                }
                Err(e) => return Err(e.into()),
            };
            for recorded in &slice.events {
                let event = decode_event(recorded).map_err(|source| CqrsError::Codec {
                    stream: stream.clone(),
                    source,
                })?;
                loaded.state.apply(event);
            }
            // The stream's version as of this read: events it hides (truncated, or
            // before a soft deletion) still count for the expected version.
            loaded.version = slice.version.max(loaded.version);
            match slice.next {
                Some(next) => from = next,
                None => return Ok(loaded),
            }
        }
    }
}

/// `call`'s fields over `base`'s.
fn merge(base: &Metadata, call: Metadata) -> Metadata {
    let mut extra = base.extra.clone();
    extra.extend(call.extra);
    Metadata {
        correlation_id: call.correlation_id.or_else(|| base.correlation_id.clone()),
        causation_id: call.causation_id.or_else(|| base.causation_id.clone()),
        extra,
    }
}

#[cfg(test)]
mod test {
    use serde_json::json;

    use super::*;

    #[test]
    fn call_metadata_overrides_the_defaults() {
        let mut base = Metadata {
            correlation_id: Some("base".into()),
            causation_id: Some("base-cause".into()),
            ..Metadata::default()
        };
        base.extra.insert("app".into(), json!("orders"));
        base.extra.insert("shared".into(), json!(1));
        let mut call = Metadata {
            correlation_id: Some("req-7".into()),
            ..Metadata::default()
        };
        call.extra.insert("shared".into(), json!(2));
        let merged = merge(&base, call);
        assert_eq!(merged.correlation_id.as_deref(), Some("req-7"));
        assert_eq!(merged.causation_id.as_deref(), Some("base-cause"));
        assert_eq!(merged.extra["app"], json!("orders"));
        assert_eq!(merged.extra["shared"], json!(2));
    }
}
