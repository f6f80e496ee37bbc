//! The durable log that sagas, 2PC transactions and saga definitions are kept in.
//!
//! The orchestrator and the 2PC coordinator are state machines whose every
//! transition is written here *before* the action it leads to runs. A record is one
//! JSON document per `(kind, id)` with a version: each transition replaces the
//! document with the next version, conditionally on the version it was computed
//! from, so two processes that both believe they drive a saga can never both
//! write — the loser gets [`LogError::Conflict`] and stops.
//!
//! Two backends pass one [`contract`] suite:
//! - [`embedded::EmbeddedLog`] — redb in the data directory, group-committed and
//!   fsynced before a write returns;
//! - [`postgres::PostgresLog`] — one table in a schema of its own, shared by every
//!   sidecar connected to it.

#[cfg(any(test, feature = "contract"))]
pub mod contract;
pub mod embedded;
pub mod postgres;

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use self::embedded::EmbeddedLog;
pub use self::postgres::{PostgresLog, PostgresLogConfig};

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A saga instance.
    Saga,
    /// A two-phase-commit transaction.
    Transaction,
    /// A saga definition (its id is the definition's name).
    Definition,
}

impl RecordKind {
    /// The kind as stored: `saga`, `transaction` or `definition`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Saga => "saga",
            Self::Transaction => "transaction",
            Self::Definition => "definition",
        }
    }

    /// The kind stored as `s`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "saga" => Some(Self::Saga),
            "transaction" => Some(Self::Transaction),
            "definition" => Some(Self::Definition),
            _ => None,
        }
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One versioned document.
///
/// The indexed fields (`name`, `status`, `finished`, `owner`) are copies of what the
/// body says, kept apart so that backends can filter without parsing bodies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// What it is.
    pub kind: RecordKind,
    /// Unique within its kind. Sagas and transactions use UUIDv7 text, so ids sort
    /// by creation time.
    pub id: String,
    /// 1 when created, +1 on every update.
    pub version: u64,
    /// The saga definition's name (sagas, definitions); empty otherwise.
    pub name: String,
    /// The status, as the body's owner names it (`running`, `committed`, ...).
    pub status: String,
    /// Whether the record reached a final state (nothing left to drive).
    pub finished: bool,
    /// The process driving it (resumed by that process after a restart).
    pub owner: String,
    /// Milliseconds since the Unix epoch when created.
    pub created_at_ms: u64,
    /// Milliseconds since the Unix epoch of the last update.
    pub updated_at_ms: u64,
    /// The document.
    pub body: serde_json::Value,
}

/// What [`SagaLog::create`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// The record was written.
    New,
    /// The idempotency key was used before: nothing was written, and this is the
    /// record it created (as it is now).
    Existing(Box<Record>),
}

/// Which records [`SagaLog::list`] returns, newest (greatest id) first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// Only records with this name.
    pub name: Option<String>,
    /// Only records with this status.
    pub status: Option<String>,
    /// Only unfinished records.
    pub unfinished: bool,
    /// Only records driven by this owner.
    pub owner: Option<String>,
    /// Only records whose id sorts before this one (the previous page's last id).
    pub before: Option<String>,
    /// At most this many (capped at [`MAX_LIST`]).
    pub limit: usize,
}

impl Default for Filter {
    fn default() -> Self {
        Self {
            name: None,
            status: None,
            unfinished: false,
            owner: None,
            before: None,
            limit: 100,
        }
    }
}

impl Filter {
    /// Whether `record` passes every condition but `before` and `limit`.
    pub fn matches(&self, record: &Record) -> bool {
        self.name.as_ref().is_none_or(|n| *n == record.name)
            && self.status.as_ref().is_none_or(|s| *s == record.status)
            && (!self.unfinished || !record.finished)
            && self.owner.as_ref().is_none_or(|o| *o == record.owner)
    }

    /// The limit, capped.
    pub fn capped_limit(&self) -> usize {
        self.limit.min(MAX_LIST)
    }
}

/// The most records one [`SagaLog::list`] call returns.
pub const MAX_LIST: usize = 1000;

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The record changed since the version the caller read (or does not exist).
    #[error("{kind} {id} is at version {found:?}, not {expected}")]
    Conflict {
        /// The record's kind.
        kind: RecordKind,
        /// The record's id.
        id: String,
        /// The version the caller expected to replace.
        expected: u64,
        /// The version found (`None`: no such record).
        found: Option<u64>,
    },
    /// A record with this id already exists (and no idempotency key matched).
    #[error("{kind} {id} already exists")]
    Exists {
        /// The record's kind.
        kind: RecordKind,
        /// The record's id.
        id: String,
    },
    /// The backend can't be reached now; retry later.
    #[error("saga log unavailable: {0}")]
    Unavailable(String),
    /// The backend failed or holds data this version can't read.
    #[error("saga log backend error: {0}")]
    Backend(String),
    /// The log was closed.
    #[error("the saga log is closed")]
    Closed,
}

/// The durable log of sagas, transactions and definitions.
///
/// # To ensure correctness
/// Every implementation must guarantee, and [`contract`] checks:
/// 1. **Durable before return.** A write that returns `Ok` survives a crash of this
///    process (embedded: fsynced; PostgreSQL: committed).
/// 2. **Compare and set.** [`update`](Self::update) writes version `v` only over
///    version `v - 1`, atomically: of concurrent updaters from the same version,
///    exactly one succeeds.
/// 3. **Idempotent creation.** Of concurrent [`create`](Self::create) calls with one
///    idempotency key, exactly one writes; the others get [`Created::Existing`] with
///    that record.
/// 4. **Newest first.** [`list`](Self::list) returns records in descending id order.
#[async_trait]
pub trait SagaLog: fmt::Debug + Send + Sync + 'static {
    /// The backend's name: `embedded` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Writes `record` (whose version must be 1). With an `idempotency_key` this kind
    /// has seen before, writes nothing and returns the record that key created.
    ///
    /// # Errors
    /// [`LogError::Exists`] if the id is taken.
    async fn create(
        &self,
        record: &Record,
        idempotency_key: Option<&str>,
    ) -> Result<Created, LogError>;

    /// Replaces version `record.version - 1` of the record with `record`.
    ///
    /// # Errors
    /// [`LogError::Conflict`] if the stored version is another (or there is none).
    async fn update(&self, record: &Record) -> Result<(), LogError>;

    /// Writes `record` whatever is stored (definitions), at the version it carries.
    async fn put(&self, record: &Record) -> Result<(), LogError>;

    /// Deletes a record; returns whether it existed.
    async fn delete(&self, kind: RecordKind, id: &str) -> Result<bool, LogError>;

    /// The record, if any.
    async fn get(&self, kind: RecordKind, id: &str) -> Result<Option<Record>, LogError>;

    /// Records of `kind` passing `filter`, newest first.
    async fn list(&self, kind: RecordKind, filter: &Filter) -> Result<Vec<Record>, LogError>;

    /// Checks that the backend is reachable.
    async fn health(&self) -> Result<(), LogError>;

    /// Releases resources once in-flight calls finish.
    async fn close(&self) -> Result<(), LogError>;
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A new time-ordered id (UUIDv7 text).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Why `record` can't be created: a new record is at version 1.
fn not_version_one(record: &Record) -> LogError {
    LogError::Backend(format!(
        "{} {} is created at version {}: a new record must be at version 1",
        record.kind, record.id, record.version
    ))
}

/// Writes `record` as the next version (compare-and-set on `record.version - 1`),
/// retrying with capped backoff while the log is unavailable, until `closed` says to
/// give up. `true` once written — including when a write committed but its answer
/// was lost (the stored record is this one) — and `false` if another writer got
/// there first, the log closed, or `closed()` became true.
pub async fn write_next(log: &dyn SagaLog, record: &Record, closed: impl Fn() -> bool) -> bool {
    let mut backoff = std::time::Duration::from_millis(50);
    loop {
        match log.update(record).await {
            Ok(()) => return true,
            Err(LogError::Conflict { found, .. }) => {
                if found == Some(record.version)
                    && let Ok(Some(stored)) = log.get(record.kind, &record.id).await
                    && stored.body == record.body
                {
                    return true;
                }
                tracing::warn!(kind = %record.kind, id = record.id, ?found, "changed by another writer; this driver stops");
                return false;
            }
            Err(LogError::Closed) => return false,
            Err(e) => {
                tracing::warn!(kind = %record.kind, id = record.id, error = %e, "writing to the log failed; retrying");
                if closed() {
                    return false;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}
