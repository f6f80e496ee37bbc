//! Participants: what a 2PC transaction prepares, commits and aborts.
//!
//! The coordinator gets a [`Participant`] for each entry of a transaction from a
//! [`Participants`] factory, from the entry's *spec* (a JSON object with a `type`).
//! [`SidecarParticipants`] is the factory the sidecar uses, with three kinds:
//!
//! | `type` | spec | prepare | commit | abort |
//! |---|---|---|---|---|
//! | `app` | `{"app","path"}` | `POST {path}/prepare` → vote | `POST {path}/commit` | `POST {path}/abort` |
//! | `state` | `{"store","operations"}` | check preconditions, lock the keys | apply atomically, unlock | unlock |
//! | `postgres` | `{"component","statements"}` | run them, `PREPARE TRANSACTION` | `COMMIT PREPARED` | `ROLLBACK PREPARED` |
//!
//! Tests plug in their own factory.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use trellis_core::config::StateComponent;
use trellis_proxy::Invoker;
use trellis_state::StateStore;

use super::app::AppParticipant;
use super::locks::KeyLocks;
use super::postgres::{PgPools, PostgresParticipant};
use super::state::Vote;
use super::store::StoreParticipant;

/// What a participant is told about the transaction on every call.
#[derive(Debug, Clone, PartialEq)]
pub struct TxContext {
    /// The transaction's id (UUIDv7).
    pub transaction_id: String,
    /// This participant's name in the transaction.
    pub participant: String,
    /// Its position in the transaction (0-based), stable across restarts.
    pub index: usize,
    /// What the caller passed to every participant.
    pub payload: Value,
    /// On prepare, the time left before the deadline (a vote after it does not
    /// count); `None` in phase two.
    pub time_left: Option<Duration>,
}

impl TxContext {
    /// The idempotency key of `call` (`prepare`, `commit` or `abort`):
    /// `{transaction id}:{participant}:{call}`.
    pub fn idempotency_key(&self, call: &str) -> String {
        format!("{}:{}:{call}", self.transaction_id, self.participant)
    }
}

/// Why a participant call failed. On prepare it counts as an abort vote; in phase
/// two the call is retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParticipantError {
    /// What went wrong.
    pub message: String,
}

impl ParticipantError {
    /// An error saying `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

/// One resource taking part in a transaction.
///
/// # To ensure correctness
/// - **Idempotent.** Every call may be repeated — after a timeout, after a restart
///   of the coordinator — with the same [`TxContext`]: a second `prepare` answers
///   the same vote without preparing twice, a second `commit` or `abort` acks
///   without doing anything twice.
/// - **Prepared means able to commit.** After voting commit, a participant must be
///   able to commit whatever happens (a crash of its own included) until it is told
///   the decision, and must not apply or release anything before.
/// - **Abort of the unknown acks.** An `abort` for a transaction the participant
///   never prepared (the prepare was lost, timed out or voted abort) must succeed.
/// - **Late prepares lose.** A `prepare` may be cancelled at the deadline, and the
///   `abort` may then arrive while it is still landing: whatever a prepare holds
///   after the abort of its transaction must be released (or the late prepare must
///   vote abort).
/// - `commit` and `abort` are retried until they succeed: fail only when trying
///   again may help.
#[async_trait]
pub trait Participant: fmt::Debug + Send + Sync {
    /// Phase one: make the work durable but not visible, and vote.
    ///
    /// # Errors
    /// Anything preventing a vote; counts as an abort vote.
    async fn prepare(&self, tx: &TxContext) -> Result<Vote, ParticipantError>;

    /// Phase two, commit: make the prepared work visible.
    ///
    /// # Errors
    /// A failure; the call is retried until it succeeds.
    async fn commit(&self, tx: &TxContext) -> Result<(), ParticipantError>;

    /// Phase two, abort: drop the prepared work, if any.
    ///
    /// # Errors
    /// A failure; the call is retried until it succeeds.
    async fn abort(&self, tx: &TxContext) -> Result<(), ParticipantError>;

    /// Called by [`TxCoordinator::recover`](super::TxCoordinator::recover), before
    /// it returns, for each participant of a transaction it will commit: re-takes
    /// what a prepare held in memory only (the `state` kind's key locks). The
    /// default does nothing.
    ///
    /// # Errors
    /// Why it could not; logged, and the commit goes ahead.
    async fn recover(&self, tx: &TxContext) -> Result<(), ParticipantError> {
        let _ = tx;
        Ok(())
    }
}

/// Why a spec can't make a participant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SpecError {
    /// `invalid_participant` (a malformed spec) or `unknown_participant_target` (it
    /// names an app, store or component that is not configured).
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
}

impl SpecError {
    /// A malformed spec.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: "invalid_participant",
            message: message.into(),
        }
    }

    /// A spec naming something that does not exist.
    pub fn unknown_target(message: impl Into<String>) -> Self {
        Self {
            code: "unknown_participant_target",
            message: message.into(),
        }
    }
}

/// Makes participants from their specs.
#[async_trait]
pub trait Participants: fmt::Debug + Send + Sync + 'static {
    /// The participant `name` described by `spec` (a JSON object). Called when a
    /// transaction starts (a failure refuses the transaction) and again after a
    /// restart, from the logged spec.
    ///
    /// # Errors
    /// [`SpecError`] saying what is wrong with `spec`.
    fn build(&self, name: &str, spec: &Value) -> Result<Arc<dyn Participant>, SpecError>;

    /// Releases resources (connection pools) when the coordinator closes.
    async fn close(&self) {}
}

/// The participants of the sidecar: apps through the invoker, state stores, and
/// PostgreSQL components.
#[derive(Debug, Clone)]
pub struct SidecarParticipants {
    invoker: Arc<Invoker>,
    stores: Arc<BTreeMap<String, Arc<dyn StateStore>>>,
    locks: KeyLocks,
    postgres: Arc<PgPools>,
}

impl SidecarParticipants {
    /// Apps through `invoker`; `state` participants on `stores`, locking keys in
    /// `locks`; `postgres` participants on the `[components.state.<name>]` of type
    /// postgres among `components` (their `url`, and their `schema` first on the
    /// `search_path`).
    pub fn new(
        invoker: Arc<Invoker>,
        stores: Arc<BTreeMap<String, Arc<dyn StateStore>>>,
        locks: KeyLocks,
        components: &BTreeMap<String, StateComponent>,
    ) -> Self {
        Self {
            invoker,
            stores,
            locks,
            postgres: Arc::new(PgPools::new(components)),
        }
    }

    /// The key locks `state` participants take.
    pub fn locks(&self) -> &KeyLocks {
        &self.locks
    }
}

/// The `type` of a spec.
fn kind(spec: &Value) -> Result<&str, SpecError> {
    let object = spec
        .as_object()
        .ok_or_else(|| SpecError::invalid("a participant is a JSON object"))?;
    match object.get("type") {
        Some(Value::String(t)) => Ok(t),
        Some(_) => Err(SpecError::invalid("type must be a string")),
        None => Err(SpecError::invalid(
            "missing type: one of \"app\", \"state\", \"postgres\"",
        )),
    }
}

/// Deserializes a spec (without its `type`) into `T`, with serde's message.
pub(crate) fn parse_spec<T: serde::de::DeserializeOwned>(spec: &Value) -> Result<T, SpecError> {
    let mut object = spec.as_object().cloned().unwrap_or_default();
    object.remove("type");
    serde_json::from_value(Value::Object(object)).map_err(|e| SpecError::invalid(e.to_string()))
}

#[async_trait]
impl Participants for SidecarParticipants {
    fn build(&self, name: &str, spec: &Value) -> Result<Arc<dyn Participant>, SpecError> {
        match kind(spec)? {
            "app" => Ok(Arc::new(AppParticipant::from_spec(
                Arc::clone(&self.invoker),
                spec,
            )?)),
            "state" => Ok(Arc::new(StoreParticipant::from_spec(
                &self.stores,
                self.locks.clone(),
                name,
                spec,
            )?)),
            "postgres" => Ok(Arc::new(PostgresParticipant::from_spec(
                Arc::clone(&self.postgres),
                spec,
            )?)),
            other => Err(SpecError::invalid(format!(
                "unknown type {other:?}: one of \"app\", \"state\", \"postgres\""
            ))),
        }
    }

    async fn close(&self) {
        self.postgres.close().await;
    }
}
