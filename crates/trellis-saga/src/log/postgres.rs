//! The PostgreSQL backend: one table in a schema of its own, shared by every
//! process connected to it.
//!
//! # Schema
//! ```text
//! records (kind, id COLLATE "C") PK → version, name, status, finished, owner,
//!         created_at_ms, updated_at_ms, body JSONB, idempotency_key
//!   UNIQUE (kind, idempotency_key) WHERE idempotency_key IS NOT NULL
//!   INDEX  (kind, id) WHERE NOT finished
//! ```
//! The schema, table and indexes are created if missing when a log connects, under
//! an advisory lock so that processes starting together don't race. Ids sort with
//! `COLLATE "C"` (bytes), the order of the embedded backend, so both list alike.
//!
//! # Every write is one statement
//! Each connection forces `synchronous_commit = on` (a write returns once it is on
//! disk, whatever the server's default) and `READ COMMITTED`, which the checks
//! below rely on:
//! - **create**: `INSERT … ON CONFLICT DO NOTHING`. A conflict on the idempotency
//!   index waits for the conflicting insert to commit, so of concurrent creates with
//!   one key exactly one inserts; the others then read the record by its key
//!   ([`Created::Existing`]), or find the id taken ([`LogError::Exists`]).
//! - **update**: `UPDATE … WHERE kind = $1 AND id = $2 AND version = $3`. Concurrent
//!   updaters queue on the row lock and re-check the version on the row the winner
//!   left, so exactly one of them matches; the others read the version they lost to.
//! - **put**: an upsert that keeps the record's idempotency key.
//!
//! # Failure
//! Connection trouble is [`LogError::Unavailable`] (the outcome of a write that was
//! sent is then unknown: read the record again before retrying); after
//! [`close`](SagaLog::close) calls fail with [`LogError::Closed`].

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Row};

use super::{Created, Filter, LogError, Record, RecordKind, SagaLog, not_version_one};

const BACKEND: &str = "postgres";
/// Serializes schema creation across processes starting at once ("trellisG":
/// coordination uses "trellisC", the event store "trellisE").
const MIGRATION_LOCK: i64 = 0x7472_656c_6c69_7347;
/// How often `create` tries again when its insert conflicted with a record that was
/// deleted before it could be read.
const CREATE_ATTEMPTS: usize = 3;

/// Settings of a [`PostgresLog`].
///
/// Every field has a default, so `PostgresLogConfig::default()` talks to a local
/// PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresLogConfig {
    /// Connection URL. Default `postgres://postgres@127.0.0.1:5432/test`.
    pub url: String,
    /// The schema holding the `records` table, created if missing. 1 to 63 ASCII
    /// letters, digits and `_`, not starting with a digit. Every process sharing
    /// sagas uses the same one. Default `trellis_saga`.
    pub schema: String,
    /// Most pooled connections. Calls hold one only for the duration of a
    /// statement. Default 10.
    pub max_connections: u32,
    /// How long to wait for a connection, in milliseconds; past it a call fails with
    /// [`LogError::Unavailable`]. Default 5000.
    pub connect_timeout_ms: u64,
}

impl Default for PostgresLogConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/test".to_owned(),
            schema: "trellis_saga".to_owned(),
            max_connections: 10,
            connect_timeout_ms: 5000,
        }
    }
}

/// A [`SagaLog`] on PostgreSQL: every process connected to the same schema shares
/// its sagas, transactions and definitions. See the [module docs](self) for how it
/// works.
///
/// ```no_run
/// use trellis_saga::log::postgres::{PostgresLog, PostgresLogConfig};
/// use trellis_saga::log::{Filter, RecordKind, SagaLog};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let log = PostgresLog::connect(PostgresLogConfig {
///     url: "postgres://postgres@db.internal:5432/app".into(),
///     ..PostgresLogConfig::default()
/// })
/// .await?;
/// // The sagas this process must drive on after a restart.
/// let mine = Filter {
///     unfinished: true,
///     owner: Some("sidecar-1".into()),
///     ..Filter::default()
/// };
/// for saga in log.list(RecordKind::Saga, &mine).await? {
///     println!("{} is {}", saga.id, saga.status);
/// }
/// log.close().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct PostgresLog {
    pool: PgPool,
    sql: Arc<Statements>,
}

impl PostgresLog {
    /// Connects, and creates the schema, table and indexes if missing.
    ///
    /// # Errors
    /// [`LogError::Unavailable`] if PostgreSQL can't be reached within
    /// `connect_timeout_ms`; [`LogError::Backend`] for a bad URL or schema name, or a
    /// schema that can't be created.
    pub async fn connect(config: PostgresLogConfig) -> Result<Self, LogError> {
        check_schema(&config.schema)?;
        let options = PgConnectOptions::from_str(&config.url)
            .map_err(|e| LogError::Backend(format!("invalid URL: {e}")))?
            .application_name("trellis-saga")
            .options([
                // The update's re-check of a row locked by a concurrent updater needs
                // READ COMMITTED (it is a serialization failure under REPEATABLE
                // READ), and a transition must be on disk before it is acted on,
                // whatever the server's defaults.
                ("default_transaction_isolation", "read committed"),
                ("synchronous_commit", "on"),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(Duration::from_millis(config.connect_timeout_ms))
            .connect_with(options)
            .await
            .map_err(pg_error)?;
        let sql = Arc::new(Statements::new(&config.schema));
        if let Err(e) = migrate(&pool, &sql).await {
            pool.close().await;
            return Err(pg_error(e));
        }
        tracing::info!(schema = config.schema, "postgres saga log connected");
        Ok(Self { pool, sql })
    }

    /// The record of `kind` created with `key`, if any.
    async fn by_key(&self, kind: RecordKind, key: &str) -> Result<Option<Record>, LogError> {
        sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.by_key)))
            .bind(kind.as_str())
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(pg_error)?
            .map(|row| record(kind, &row))
            .transpose()
    }

    /// The version of a record, if it exists.
    async fn version(&self, kind: RecordKind, id: &str) -> Result<Option<u64>, LogError> {
        sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.version)))
            .bind(kind.as_str())
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(pg_error)?
            .map(|row| unsigned("version", col(&row, 0)?))
            .transpose()
    }
}

#[async_trait]
impl SagaLog for PostgresLog {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn create(
        &self,
        record: &Record,
        idempotency_key: Option<&str>,
    ) -> Result<Created, LogError> {
        if record.version != 1 {
            return Err(not_version_one(record));
        }
        let row = Params::of(record)?;
        for _ in 0..CREATE_ATTEMPTS {
            let inserted = row
                .bind(sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.create))))
                .bind(idempotency_key)
                .execute(&self.pool)
                .await
                .map_err(pg_error)?
                .rows_affected();
            if inserted > 0 {
                tracing::debug!(kind = %record.kind, id = %record.id, "record created");
                return Ok(Created::New);
            }
            // The key first: a retried create whose id is also taken (by its own
            // first attempt) is answered with that record.
            if let Some(key) = idempotency_key
                && let Some(first) = self.by_key(record.kind, key).await?
            {
                tracing::debug!(kind = %record.kind, id = %first.id, "idempotency key used before; nothing created");
                return Ok(Created::Existing(Box::new(first)));
            }
            if self.version(record.kind, &record.id).await?.is_some() {
                return Err(LogError::Exists {
                    kind: record.kind,
                    id: record.id.clone(),
                });
            }
            // What the insert conflicted with was deleted since: insert again.
        }
        Err(LogError::Backend(format!(
            "creating {} {} kept conflicting with records deleted meanwhile",
            record.kind, record.id
        )))
    }

    async fn update(&self, record: &Record) -> Result<(), LogError> {
        let expected = record.version.saturating_sub(1);
        // A version that can't be stored matches nothing (version 0 replaces no
        // version -1; above i64::MAX there is no stored version either).
        let stored = (record.version > 0)
            .then(|| i64::try_from(expected).ok())
            .flatten();
        if let Some(expected_param) = stored {
            let updated = Params::of(record)?
                .bind(sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.update))))
                .bind(expected_param)
                .execute(&self.pool)
                .await
                .map_err(pg_error)?
                .rows_affected();
            if updated > 0 {
                return Ok(());
            }
        }
        let found = self.version(record.kind, &record.id).await?;
        let conflict = LogError::Conflict {
            kind: record.kind,
            id: record.id.clone(),
            expected,
            found,
        };
        tracing::debug!(kind = %record.kind, id = %record.id, error = %conflict, "update refused");
        Err(conflict)
    }

    async fn put(&self, record: &Record) -> Result<(), LogError> {
        Params::of(record)?
            .bind(sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.put))))
            .execute(&self.pool)
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn delete(&self, kind: RecordKind, id: &str) -> Result<bool, LogError> {
        let deleted = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.delete)))
            .bind(kind.as_str())
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(pg_error)?
            .rows_affected();
        Ok(deleted > 0)
    }

    async fn get(&self, kind: RecordKind, id: &str) -> Result<Option<Record>, LogError> {
        sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.get)))
            .bind(kind.as_str())
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(pg_error)?
            .map(|row| record(kind, &row))
            .transpose()
    }

    async fn list(&self, kind: RecordKind, filter: &Filter) -> Result<Vec<Record>, LogError> {
        let limit = filter.capped_limit();
        if limit == 0 {
            return Ok(Vec::new());
        }
        // The unfinished listing has a statement of its own, so that its plan can
        // use the partial index.
        let statement = if filter.unfinished {
            &self.sql.list_unfinished
        } else {
            &self.sql.list
        };
        sqlx::query(AssertSqlSafe(Arc::clone(statement)))
            .bind(kind.as_str())
            .bind(filter.name.as_deref())
            .bind(filter.status.as_deref())
            .bind(filter.owner.as_deref())
            .bind(filter.before.as_deref())
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(pg_error)?
            .iter()
            .map(|row| record(kind, row))
            .collect()
    }

    async fn health(&self) -> Result<(), LogError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn close(&self) -> Result<(), LogError> {
        self.pool.close().await;
        Ok(())
    }
}

// === statements ===

/// The SQL text of one log, built once for its schema (identifiers can't be bind
/// parameters).
#[derive(Debug)]
struct Statements {
    /// Creates the schema, table and indexes if missing (run under an advisory lock).
    migrate: Vec<String>,
    /// Inserts a record ([`Params`], then `$11` idempotency key) unless its id or key
    /// is taken.
    create: Arc<str>,
    /// Writes a record ([`Params`]) over version `$11`.
    update: Arc<str>,
    /// Writes a record ([`Params`]) whatever is stored, keeping its idempotency key.
    put: Arc<str>,
    /// Deletes `$1` kind `$2` id.
    delete: Arc<str>,
    /// The record `$1` kind `$2` id: [`COLUMNS`].
    get: Arc<str>,
    /// The record of `$1` kind created with `$2` idempotency key: [`COLUMNS`].
    by_key: Arc<str>,
    /// `version` of `$1` kind `$2` id.
    version: Arc<str>,
    /// Records of `$1` kind, `$2` name, `$3` status, `$4` owner, with ids before
    /// `$5` (each NULL: any), at most `$6`, newest first: [`COLUMNS`].
    list: Arc<str>,
    /// [`list`](Self::list) of unfinished records only.
    list_unfinished: Arc<str>,
}

/// The columns a record is read from, in the order [`record`] reads them.
const COLUMNS: &str =
    "id, version, name, status, finished, owner, created_at_ms, updated_at_ms, body::text";

impl Statements {
    /// The statements of the log in `schema`, a checked identifier.
    fn new(schema: &str) -> Self {
        let records = format!("\"{schema}\".records");
        let insert = format!(
            "INSERT INTO {records} (kind, id, version, name, status, finished, owner, \
             created_at_ms, updated_at_ms, body, idempotency_key) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11)"
        );
        let list = |unfinished: &str| {
            Arc::<str>::from(format!(
                "SELECT {COLUMNS} FROM {records} \
                 WHERE kind = $1{unfinished} \
                   AND ($2::text IS NULL OR name = $2) \
                   AND ($3::text IS NULL OR status = $3) \
                   AND ($4::text IS NULL OR owner = $4) \
                   AND ($5::text IS NULL OR id < $5 COLLATE \"C\") \
                 ORDER BY id DESC LIMIT $6"
            ))
        };
        let s = |sql: String| Arc::<str>::from(sql);
        Self {
            migrate: vec![
                format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""),
                format!(
                    "CREATE TABLE IF NOT EXISTS {records} (\
                     kind TEXT NOT NULL CHECK (kind IN ('saga', 'transaction', 'definition')), \
                     id TEXT COLLATE \"C\" NOT NULL, \
                     version BIGINT NOT NULL, \
                     name TEXT NOT NULL, \
                     status TEXT NOT NULL, \
                     finished BOOLEAN NOT NULL, \
                     owner TEXT NOT NULL, \
                     created_at_ms BIGINT NOT NULL, \
                     updated_at_ms BIGINT NOT NULL, \
                     body JSONB NOT NULL, \
                     idempotency_key TEXT, \
                     PRIMARY KEY (kind, id))"
                ),
                format!(
                    "CREATE UNIQUE INDEX IF NOT EXISTS records_idempotency_key \
                     ON {records} (kind, idempotency_key) WHERE idempotency_key IS NOT NULL"
                ),
                format!(
                    "CREATE INDEX IF NOT EXISTS records_unfinished \
                     ON {records} (kind, id) WHERE NOT finished"
                ),
            ],
            // No conflict target: a taken id and a used key both insert nothing.
            create: s(format!("{insert} ON CONFLICT DO NOTHING")),
            update: s(format!(
                "UPDATE {records} SET version = $3, name = $4, status = $5, finished = $6, \
                 owner = $7, created_at_ms = $8, updated_at_ms = $9, body = $10::jsonb \
                 WHERE kind = $1 AND id = $2 AND version = $11"
            )),
            put: s(format!(
                "INSERT INTO {records} (kind, id, version, name, status, finished, owner, \
                 created_at_ms, updated_at_ms, body) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb) \
                 ON CONFLICT (kind, id) DO UPDATE SET version = excluded.version, \
                 name = excluded.name, status = excluded.status, finished = excluded.finished, \
                 owner = excluded.owner, created_at_ms = excluded.created_at_ms, \
                 updated_at_ms = excluded.updated_at_ms, body = excluded.body"
            )),
            delete: s(format!("DELETE FROM {records} WHERE kind = $1 AND id = $2")),
            get: s(format!(
                "SELECT {COLUMNS} FROM {records} WHERE kind = $1 AND id = $2"
            )),
            by_key: s(format!(
                "SELECT {COLUMNS} FROM {records} WHERE kind = $1 AND idempotency_key = $2"
            )),
            version: s(format!(
                "SELECT version FROM {records} WHERE kind = $1 AND id = $2"
            )),
            list: list(""),
            list_unfinished: list(" AND NOT finished"),
        }
    }
}

/// A record's columns as bind parameters `$1` to `$10`.
struct Params {
    kind: &'static str,
    id: String,
    version: i64,
    name: String,
    status: String,
    finished: bool,
    owner: String,
    created_at_ms: i64,
    updated_at_ms: i64,
    body: String,
}

type Query<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

impl Params {
    fn of(record: &Record) -> Result<Self, LogError> {
        let signed = |field: &str, v: u64| {
            i64::try_from(v).map_err(|_| {
                LogError::Backend(format!(
                    "{} {}: {field} {v} is too large to store",
                    record.kind, record.id
                ))
            })
        };
        Ok(Self {
            kind: record.kind.as_str(),
            id: record.id.clone(),
            version: signed("version", record.version)?,
            name: record.name.clone(),
            status: record.status.clone(),
            finished: record.finished,
            owner: record.owner.clone(),
            created_at_ms: signed("created_at_ms", record.created_at_ms)?,
            updated_at_ms: signed("updated_at_ms", record.updated_at_ms)?,
            body: serde_json::to_string(&record.body).map_err(|e| {
                LogError::Backend(format!("cannot encode {} {}: {e}", record.kind, record.id))
            })?,
        })
    }

    fn bind<'q>(&self, query: Query<'q>) -> Query<'q> {
        query
            .bind(self.kind)
            .bind(self.id.as_str())
            .bind(self.version)
            .bind(self.name.as_str())
            .bind(self.status.as_str())
            .bind(self.finished)
            .bind(self.owner.as_str())
            .bind(self.created_at_ms)
            .bind(self.updated_at_ms)
            .bind(self.body.as_str())
    }
}

/// A record of `kind` from a row of [`COLUMNS`].
fn record(kind: RecordKind, row: &PgRow) -> Result<Record, LogError> {
    let body: String = col(row, 8)?;
    Ok(Record {
        kind,
        id: col(row, 0)?,
        version: unsigned("version", col(row, 1)?)?,
        name: col(row, 2)?,
        status: col(row, 3)?,
        finished: col(row, 4)?,
        owner: col(row, 5)?,
        created_at_ms: unsigned("created_at_ms", col(row, 6)?)?,
        updated_at_ms: unsigned("updated_at_ms", col(row, 7)?)?,
        body: serde_json::from_str(&body)
            .map_err(|e| LogError::Backend(format!("unreadable stored body: {e}")))?,
    })
}

/// A stored count that can't be negative.
fn unsigned(field: &str, stored: i64) -> Result<u64, LogError> {
    u64::try_from(stored)
        .map_err(|_| LogError::Backend(format!("stored {field} {stored} is negative")))
}

/// Column `i` of a row.
fn col<'r, T>(row: &'r PgRow, i: usize) -> Result<T, LogError>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(i).map_err(pg_error)
}

fn check_schema(schema: &str) -> Result<(), LogError> {
    let ok = schema.len() <= 63
        && schema
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && schema.bytes().next().is_some_and(|b| !b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(LogError::Backend(format!(
            "invalid schema name {schema:?}: 1 to 63 ASCII letters, digits and '_', not starting with a digit"
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

// === errors ===

/// Closed pools are [`LogError::Closed`] (only [`SagaLog::close`] closes them);
/// failing to talk to the database is [`LogError::Unavailable`] (the outcome of a
/// write is unknown); anything else the database refused is [`LogError::Backend`].
fn pg_error(e: sqlx::Error) -> LogError {
    let unavailable = match &e {
        sqlx::Error::PoolClosed => return LogError::Closed,
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions, shutdowns, too many connections.
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08") || matches!(c.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    };
    if unavailable {
        LogError::Unavailable(e.to_string())
    } else {
        LogError::Backend(e.to_string())
    }
}

#[cfg(test)]
mod test {
    use serde::de::IntoDeserializer;
    use serde::de::value::{Error as DeError, MapDeserializer};

    use super::*;

    fn parse(fields: &[(&'static str, &'static str)]) -> Result<PostgresLogConfig, DeError> {
        let map = MapDeserializer::<_, DeError>::new(
            fields
                .iter()
                .map(|(k, v)| (k.into_deserializer(), v.into_deserializer())),
        );
        PostgresLogConfig::deserialize(map)
    }

    #[test]
    fn config_defaults_and_unknown_fields() {
        let config = parse(&[]).expect("empty config");
        assert_eq!(config, PostgresLogConfig::default());
        assert_eq!(config.url, "postgres://postgres@127.0.0.1:5432/test");
        assert_eq!(config.schema, "trellis_saga");
        assert_eq!(config.max_connections, 10);
        assert_eq!(config.connect_timeout_ms, 5000);
        let config = parse(&[("schema", "saga_b")]).expect("schema");
        assert_eq!(config.schema, "saga_b");
        assert!(
            parse(&[("shema", "typo")]).is_err(),
            "unknown fields are refused"
        );
    }

    #[test]
    fn schema_names_are_checked() {
        for ok in [
            "trellis_saga",
            "t_saga_0123456789ab",
            "A_b",
            &"x".repeat(63),
        ] {
            assert!(check_schema(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "a-b",
            "a\"b",
            "a'b",
            "a b",
            "é",
            &"x".repeat(64),
        ] {
            assert!(check_schema(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_migration_lock_is_the_log_s_own() {
        // Coordination's, the state store's and the event store's keys.
        for other in [
            0x7472_656c_6c69_7343_i64,
            0x7472_656c_6c69_7301,
            0x7472_656c_6c69_7345,
        ] {
            assert_ne!(MIGRATION_LOCK, other);
        }
    }

    #[test]
    fn stored_counts_are_checked() {
        assert_eq!(unsigned("version", 3).ok(), Some(3));
        assert!(unsigned("version", -1).is_err());
        let record = Record {
            kind: RecordKind::Saga,
            id: "a".into(),
            version: u64::MAX,
            name: String::new(),
            status: String::new(),
            finished: false,
            owner: String::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            body: serde_json::Value::Null,
        };
        assert!(matches!(Params::of(&record), Err(LogError::Backend(_))));
    }

    #[tokio::test]
    async fn connect_checks_the_config_before_any_io() {
        let bad_schema = PostgresLog::connect(PostgresLogConfig {
            schema: "no-dashes".into(),
            ..PostgresLogConfig::default()
        })
        .await;
        assert!(
            matches!(bad_schema, Err(LogError::Backend(_))),
            "{bad_schema:?}"
        );
        let bad_url = PostgresLog::connect(PostgresLogConfig {
            url: "postgres://127.0.0.1:notaport/test".into(),
            ..PostgresLogConfig::default()
        })
        .await;
        assert!(matches!(bad_url, Err(LogError::Backend(_))), "{bad_url:?}");
    }
}
