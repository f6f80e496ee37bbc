//! The PostgreSQL backend: events, streams and their indexes in tables of one
//! schema, appended by ordinary `READ COMMITTED` transactions.
//!
//! # Schema
//! ```text
//! head         one row: next                       the position the next event gets
//! streams      name → version (last event's), deleted ('soft' | 'hard'),
//!              max_age_ms, max_count, truncate_before
//! events       position (PK) → stream, version, category, id (UUID, UNIQUE),
//!              event_type, data_json (TEXT) | data_bytes (BYTEA), metadata (TEXT),
//!              timestamp_ms;   UNIQUE (stream, version);   INDEX (category, position)
//! snapshots    stream → version, data_json | data_bytes
//! checkpoints  name → position
//! ```
//! Everything is created if missing when the store connects, under an advisory lock
//! so that processes starting together don't race. JSON bodies and metadata are
//! stored as the text written: `jsonb` would reorder keys (bodies round-trip as
//! text) and refuses `\u0000`. Timestamps are the database's clock in milliseconds
//! since the Unix epoch, so every process sharing a store agrees on `max_age` and
//! on reads as of a time.
//!
//! # Appending
//! One transaction per call to [`append`](EventStore::append):
//! 1. **Lock the streams**: an upsert of every stream of the call (a no-op update of
//!    an existing row, an insert of a missing one) row-locks them, in name order so
//!    multi-stream appends can't deadlock, and returns their latest committed state.
//! 2. **Find the event ids** already stored (one `= ANY` on the unique index).
//! 3. **Check** every expectation, with exactly the embedded backend's rules: a hard
//!    deletion refuses; a first id already stored is an idempotent repeat if all ids
//!    line up with the stream's events from there and the expectation is the one
//!    that append had (what the stream was before it), else a conflict or
//!    [`DuplicateEventId`](EventStoreError::DuplicateEventId); otherwise the
//!    expectation must admit the locked row's version (a soft-deleted stream admits
//!    `any`, `no_stream` and its last version, and appending recreates it) and no id
//!    may be stored. Any refusal rolls the transaction back: nothing is stored.
//! 4. **Per-stream writes**: the streams' new last versions.
//! 5. **The global serialization point**, last: one statement updates the single
//!    `head` row (`next = next + n RETURNING next - n`), inserts the events at
//!    those positions and queues a `pg_notify` of the new head.
//! 6. **`COMMIT`**.
//!
//! Steps 1–4 hold only the locks of the call's own streams, so appends to different
//! streams run them in parallel; only step 5 (one round trip) and the commit are
//! serialized, by the `head` row lock. Appends to one stream queue on its row lock
//! and see each other's committed versions, so of concurrent appends expecting the
//! same version exactly one wins, and `UNIQUE (stream, version)` backs that up. A
//! race on an event id between streams (both passing step 2) ends in a unique
//! violation at step 5 for the later one, which is retried from step 1 and then
//! finds the id; deadlocks and serialization failures are retried too.
//!
//! # Why the global order never skips
//! A row lock is held until the transaction ends, so the transaction that updated
//! `head` keeps every other append out of step 5 until it commits or rolls back.
//! Positions are therefore handed out in commit order: the next append reads
//! `next` only after the previous one's `COMMIT` (PostgreSQL releases a
//! transaction's locks after making it visible, and a blocked `UPDATE` in
//! `READ COMMITTED` re-reads the row's committed version). Hence:
//! - **gap-free**: a rollback releases the lock without having consumed `next`, so
//!   the next append takes the same positions;
//! - **never skips**: when a reader's snapshot includes the transaction that wrote
//!   position `p`, every transaction that wrote below `p` committed earlier and is
//!   in the snapshot too. A reader of `$all` that has seen `p` never later finds a
//!   new event below it.
//!
//! A `BIGSERIAL` (or a sequence) hands out numbers at `nextval`, not at commit: a
//! transaction can take 10, another 11, the second commit first, and a reader that
//! has already moved past 11 never sees 10. The test suite shows that happening.
//! The price of the `head` row is that commits of appends are serialized (each
//! holds the lock for one statement and its commit's WAL flush); the per-stream
//! work before it is not.
//!
//! Connections are opened with `default_transaction_isolation = 'read committed'`:
//! the re-read of a blocked `UPDATE` above needs it (under `REPEATABLE READ` it
//! would fail with a serialization error).
//!
//! # Head notifications
//! [`head`](EventStore::head) is updated right after this process's own appends
//! commit. Appends by other processes are noticed through `LISTEN`/`NOTIFY`: each
//! append's `pg_notify(<schema>, <new head>)` is delivered when it commits, to a
//! background task that holds one listening connection (in its own one-connection
//! pool, so it never takes one of `pool_size`). When that connection is lost, the
//! task reconnects, listens again and re-reads `head`, since notifications sent
//! meanwhile are lost.
//!
//! # Test hooks
//! [`PostgresEventStore::with_commit_delays`] (hidden from the docs) makes every
//! append sleep inside its transaction before and/or after taking positions, so
//! that tests can widen the windows in which a weaker design would skip.

mod append;
mod rows;
mod sql;

use std::collections::HashSet;
use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_core::config::PostgresEventStore as Config;

use self::rows::{
    bits_to_i64, bits_to_u64, body, body_columns, deletion, get, stream_row, to_i64, to_u64,
};
use self::sql::Statements;
use crate::api::{
    Append, Appended, AsOf, Deletion, Direction, EventStore, EventStoreError, ExpectedVersion,
    ReadStream, Snapshot, StreamInfo, StreamMetadata, StreamSlice,
};
use crate::event::{Invalid, RecordedEvent, StreamName};

const BACKEND: &str = "postgres";
/// Serializes schema creation across processes starting at once ("trellisE").
const MIGRATION_LOCK: i64 = 0x7472_656c_6c69_7345;
/// Attempts for an append that hits a deadlock, a serialization failure or an
/// event id stored concurrently.
const APPEND_ATTEMPTS: usize = 5;
/// How long the head follower waits before retrying after an error.
const FOLLOW_RETRY: Duration = Duration::from_secs(1);

/// Delays injected into every append that stores events, inside its transaction.
/// **For tests only**: they widen the windows in which a weaker position scheme
/// would let a reader skip events (see the module docs). Each is a random duration
/// in its range (`start..start` is exactly `start`).
#[doc(hidden)]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitDelays {
    /// Slept after the per-stream work and before taking positions: appends to other
    /// streams proceed meanwhile.
    pub before_position: Option<Range<Duration>>,
    /// Slept after taking positions and inserting the events, before `COMMIT`, while
    /// holding the head lock: every other append that stores events waits.
    pub after_position: Option<Range<Duration>>,
}

/// An event store in a PostgreSQL schema.
#[derive(Debug)]
pub struct PostgresEventStore {
    pool: PgPool,
    sql: Arc<Statements>,
    head: Arc<watch::Sender<u64>>,
    follower: Follower,
    delays: CommitDelays,
}

/// The background task that follows other processes' appends.
#[derive(Debug)]
struct Follower {
    task: JoinHandle<()>,
    pool: PgPool,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PostgresEventStore {
    /// Connects to PostgreSQL, creates the schema and tables if needed, and starts
    /// following the head. `name` is the component name, for the default schema.
    ///
    /// # Errors
    /// [`EventStoreError::Unavailable`] if PostgreSQL can't be reached within
    /// `connect_timeout`; [`EventStoreError::Backend`] for a bad URL or schema name.
    pub async fn connect(name: &str, config: &Config) -> Result<Self, EventStoreError> {
        let schema = config.schema_for(name);
        check_identifier(&schema)?;
        let options = PgConnectOptions::from_str(&config.url)
            .map_err(|e| backend(format!("invalid URL: {e}")))?
            .options([("default_transaction_isolation", "read committed")]);
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_size.max(1))
            .acquire_timeout(config.connect_timeout)
            .connect_with(options.clone())
            .await
            .map_err(pg_error)?;
        let sql = Arc::new(Statements::new(&schema));
        migrate(&pool, &sql).await.map_err(pg_error)?;
        let next = read_head(&pool, &sql).await?;
        let head = Arc::new(watch::Sender::new(next));
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(config.connect_timeout)
            .connect_lazy_with(options);
        let task = tokio::spawn(follow(
            listen_pool.clone(),
            pool.clone(),
            Arc::clone(&sql),
            Arc::clone(&head),
        ));
        tracing::debug!(schema, head = next, "postgres event store connected");
        Ok(Self {
            pool,
            sql,
            head,
            follower: Follower {
                task,
                pool: listen_pool,
            },
            delays: CommitDelays::default(),
        })
    }

    /// **For tests only**: sleeps inside every append transaction that stores
    /// events; see [`CommitDelays`].
    #[doc(hidden)]
    #[must_use]
    pub fn with_commit_delays(mut self, delays: CommitDelays) -> Self {
        self.delays = delays;
        self
    }
}

fn check_identifier(ident: &str) -> Result<(), EventStoreError> {
    let ok = !ident.is_empty()
        && ident.len() <= 63
        && ident
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !ident.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(backend(format!(
            "invalid schema name {ident:?}: 1 to 63 ASCII letters, digits and '_', not starting with a digit"
        )))
    }
}

async fn migrate(pool: &PgPool, sql: &Statements) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    for statement in &sql.migrate {
        sqlx::query(AssertSqlSafe(statement.as_str()))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

async fn read_head(pool: &PgPool, sql: &Statements) -> Result<u64, EventStoreError> {
    let next: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&sql.head)))
        .fetch_one(pool)
        .await
        .map_err(pg_error)?;
    to_u64(next)
}

fn advance(head: &watch::Sender<u64>, next: u64) {
    head.send_if_modified(|h| {
        let moved = next > *h;
        *h = (*h).max(next);
        moved
    });
}

/// Follows the head as other processes append: `LISTEN` on the schema's channel,
/// and a re-read of `head` whenever notifications may have been lost.
async fn follow(
    listen_pool: PgPool,
    pool: PgPool,
    sql: Arc<Statements>,
    head: Arc<watch::Sender<u64>>,
) {
    let catch_up = || async {
        match read_head(&pool, &sql).await {
            Ok(next) => advance(&head, next),
            Err(e) => tracing::debug!(error = %e, "re-reading the event store head failed"),
        }
    };
    let mut listener = loop {
        let subscribed = async {
            let mut listener = PgListener::connect_with(&listen_pool).await?;
            listener.listen(&sql.channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match subscribed.await {
            Ok(listener) => break listener,
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "event store head: LISTEN failed, retrying");
                tokio::time::sleep(FOLLOW_RETRY).await;
            }
        }
    };
    // Appends committed between reading the head at connect and LISTEN.
    catch_up().await;
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => match notification.payload().parse::<u64>() {
                Ok(next) => advance(&head, next),
                Err(_) => tracing::debug!(
                    payload = notification.payload(),
                    "ignoring a malformed head notification"
                ),
            },
            // The connection was lost; the listener has reconnected and listens
            // again, but notifications sent meanwhile are gone.
            Ok(None) => catch_up().await,
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "event store head: LISTEN connection failed, retrying");
                tokio::time::sleep(FOLLOW_RETRY).await;
                catch_up().await;
            }
        }
    }
}

/// Refuses malformed appends before anything is stored (as the embedded backend).
fn validate(appends: &[Append]) -> Result<(), EventStoreError> {
    let mut seen = HashSet::new();
    let mut ids = HashSet::new();
    for append in appends {
        if !seen.insert(append.stream.clone()) {
            return Err(Invalid(format!(
                "stream {} appears twice in one append",
                append.stream
            ))
            .into());
        }
        for event in &append.events {
            event.validate()?;
            if !ids.insert(event.id) {
                return Err(
                    Invalid(format!("event id {} appears twice in one append", event.id)).into(),
                );
            }
        }
    }
    Ok(())
}

/// The row limit for a read of `limit` events.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[async_trait]
impl EventStore for PostgresEventStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn append(&self, appends: Vec<Append>) -> Result<Vec<Appended>, EventStoreError> {
        validate(&appends)?;
        if appends.is_empty() {
            return Ok(Vec::new());
        }
        let mut attempt = 1;
        let (appended, head) = loop {
            match append::try_append(&self.pool, &self.sql, &self.delays, &appends).await {
                Ok(outcome) => break outcome?,
                Err(e) if attempt < APPEND_ATTEMPTS && is_retryable(&e) => {
                    tracing::debug!(attempt, error = %e, "retrying an event store append");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
                }
                Err(e) => return Err(pg_error(e)),
            }
        };
        if let Some(head) = head {
            advance(&self.head, head);
        }
        Ok(appended)
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        read: ReadStream,
    ) -> Result<StreamSlice, EventStoreError> {
        let Some(row) = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.stream_for_read)))
            .bind(stream.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(pg_error)?
        else {
            return Err(EventStoreError::StreamNotFound(stream.clone()));
        };
        let record = stream_row(&row, 0)?;
        let now: i64 = get(&row, 5)?;
        if record.deleted == Some(Deletion::Hard) {
            return Err(EventStoreError::StreamDeleted(stream.clone()));
        }
        let Some(last) = record.version else {
            return Err(EventStoreError::StreamNotFound(stream.clone()));
        };
        let empty = StreamSlice {
            events: Vec::new(),
            version: Some(last),
            next: None,
        };
        // What `StreamMetadata::shows` and `as_of` let through, as bounds: versions
        // in `lowest..=upper`, timestamps in `oldest..=newest`.
        let meta = record.metadata;
        let mut upper = last;
        let mut newest = i64::MAX;
        match read.as_of {
            Some(AsOf::Version(v)) => upper = upper.min(v),
            Some(AsOf::Timestamp(t)) => newest = to_i64(t),
            None => {}
        }
        let mut lowest = meta.truncate_before.unwrap_or(0);
        match meta.max_count {
            Some(0) => return Ok(empty),
            Some(n) => lowest = lowest.max((last + 1).saturating_sub(n)),
            None => {}
        }
        let oldest = meta.max_age.map_or(i64::MIN, |age| {
            now.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
        });
        let (statement, from, to) = match read.direction {
            Direction::Forward => (
                &self.sql.read_forward,
                read.from.unwrap_or(0).max(lowest),
                upper,
            ),
            Direction::Backward => (
                &self.sql.read_backward,
                lowest,
                read.from.unwrap_or(upper).min(upper),
            ),
        };
        if from > to {
            return Ok(empty);
        }
        let limit = read.limit.max(1);
        let rows = sqlx::query(AssertSqlSafe(Arc::clone(statement)))
            .bind(stream.as_str())
            .bind(to_i64(from))
            .bind(to_i64(to))
            .bind(oldest)
            .bind(newest)
            .bind(sql_limit(limit).saturating_add(1))
            .fetch_all(&self.pool)
            .await
            .map_err(pg_error)?;
        let mut events = rows
            .iter()
            .map(rows::event)
            .collect::<Result<Vec<_>, _>>()?;
        let next = if events.len() > limit {
            let next = events.get(limit).map(|e| e.version);
            events.truncate(limit);
            next
        } else {
            None
        };
        Ok(StreamSlice {
            events,
            version: Some(last),
            next,
        })
    }

    async fn read_all(
        &self,
        position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, EventStoreError> {
        sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.read_all)))
            .bind(to_i64(position))
            .bind(sql_limit(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(pg_error)?
            .iter()
            .map(rows::event)
            .collect()
    }

    async fn read_category(
        &self,
        category: &str,
        position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, EventStoreError> {
        sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.read_category)))
            .bind(category)
            .bind(to_i64(position))
            .bind(sql_limit(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(pg_error)?
            .iter()
            .map(rows::event)
            .collect()
    }

    fn head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    async fn stream_info(
        &self,
        stream: &StreamName,
    ) -> Result<Option<StreamInfo>, EventStoreError> {
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.stream)))
            .bind(stream.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(pg_error)?;
        row.map(|row| {
            let r = stream_row(&row, 0)?;
            Ok(StreamInfo {
                stream: stream.clone(),
                version: r.version,
                metadata: r.metadata,
                deleted: r.deleted,
            })
        })
        .transpose()
    }

    async fn set_metadata(
        &self,
        stream: &StreamName,
        metadata: StreamMetadata,
    ) -> Result<(), EventStoreError> {
        let max_age = metadata
            .max_age
            .map(|age| i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
        let updated: Option<bool> =
            sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.sql.set_metadata)))
                .bind(stream.as_str())
                .bind(max_age)
                .bind(metadata.max_count.map(to_i64))
                .bind(metadata.truncate_before.map(to_i64))
                .fetch_optional(&self.pool)
                .await
                .map_err(pg_error)?;
        match updated {
            Some(_) => Ok(()),
            // The upsert skips only a hard-deleted stream's row.
            None => Err(EventStoreError::StreamDeleted(stream.clone())),
        }
    }

    async fn delete(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        how: Deletion,
    ) -> Result<(), EventStoreError> {
        let mut tx = self.pool.begin().await.map_err(pg_error)?;
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.lock_stream)))
            .bind(stream.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(pg_error)?;
        let Some(row) = row else {
            return Err(EventStoreError::StreamNotFound(stream.clone()));
        };
        let record = stream_row(&row, 0)?;
        if record.deleted == Some(Deletion::Hard) {
            return Err(EventStoreError::StreamDeleted(stream.clone()));
        }
        let current = if record.deleted.is_some() {
            None
        } else {
            record.version
        };
        if !expected.admits(current) {
            return Err(EventStoreError::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual: current,
            });
        }
        sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.delete)))
            .bind(stream.as_str())
            .bind(deletion(how))
            .execute(&mut *tx)
            .await
            .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)
    }

    async fn save_snapshot(
        &self,
        stream: &StreamName,
        snapshot: Snapshot,
    ) -> Result<(), EventStoreError> {
        let (json, bytes) = body_columns(&snapshot.data);
        sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.save_snapshot)))
            .bind(stream.as_str())
            .bind(bits_to_i64(snapshot.version))
            .bind(json)
            .bind(bytes)
            .execute(&self.pool)
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn load_snapshot(
        &self,
        stream: &StreamName,
    ) -> Result<Option<Snapshot>, EventStoreError> {
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.load_snapshot)))
            .bind(stream.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(pg_error)?;
        row.map(|row| {
            Ok(Snapshot {
                version: bits_to_u64(get(&row, 0)?),
                data: body(get(&row, 1)?, get(&row, 2)?)?,
            })
        })
        .transpose()
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>, EventStoreError> {
        let position: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.sql.load_checkpoint)))
                .bind(name)
                .fetch_optional(&self.pool)
                .await
                .map_err(pg_error)?;
        Ok(position.map(bits_to_u64))
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), EventStoreError> {
        sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.save_checkpoint)))
            .bind(name)
            .bind(bits_to_i64(position))
            .execute(&self.pool)
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn health(&self) -> Result<(), EventStoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn close(&self) -> Result<(), EventStoreError> {
        self.follower.task.abort();
        self.follower.pool.close().await;
        self.pool.close().await;
        Ok(())
    }
}

// === errors ===

fn backend(reason: String) -> EventStoreError {
    EventStoreError::Backend {
        backend: BACKEND,
        reason,
    }
}

/// Whether an error means "could not talk to the database", as opposed to "the
/// database refused this".
fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08") || matches!(c.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// Serialization failures, deadlocks, and unique violations (an event id stored
/// by a concurrent append between the check and the insert): retrying finds the
/// winner's rows.
fn is_retryable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| matches!(c.as_ref(), "40001" | "40P01" | "23505")))
}

fn pg_error(e: sqlx::Error) -> EventStoreError {
    if is_unavailable(&e) {
        EventStoreError::Unavailable {
            backend: BACKEND,
            reason: e.to_string(),
        }
    } else {
        backend(e.to_string())
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn schema_names_are_checked() {
        for ok in ["trellis_events_main", "es_0123456789ab", "A_b"] {
            assert!(check_identifier(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1abc", "a-b", "a\"b", "a b", &"x".repeat(64)] {
            assert!(check_identifier(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn connection_errors_are_unavailable() {
        assert!(matches!(
            pg_error(sqlx::Error::PoolTimedOut),
            EventStoreError::Unavailable { .. }
        ));
        assert!(matches!(
            pg_error(sqlx::Error::RowNotFound),
            EventStoreError::Backend { .. }
        ));
    }
}
