//! The PostgreSQL backend: one table per store, one sequence for etags.
//!
//! Every single-key write is one statement, so its precondition is checked by the
//! row lock PostgreSQL takes for it: a conditional `UPDATE ... WHERE version = $v`
//! blocked behind a concurrent writer re-checks the row after that writer commits,
//! and finds the new version. Transactions run their statements in one SQL
//! transaction and roll back at the first failed precondition.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, PgExecutor, PgPool, Row};
use trellis_core::config::PostgresState;

use super::sweeper::Sweeper;
use super::{expected_revision, prefix_upper_bound, ttl_millis};
use crate::{
    ETag, Item, Key, Operation, Page, Precondition, StateError, StateStore, Value, WriteOptions,
};

const BACKEND: &str = "postgres";
/// Serializes schema creation across sidecars starting at once.
const MIGRATION_LOCK: i64 = 0x7472_656c_6c69_7301;
/// Rows deleted per sweep statement.
const SWEEP_BATCH: i64 = 1000;
/// Attempts for a transaction that hits a deadlock or serialization failure.
const TRANSACTION_ATTEMPTS: usize = 5;

/// A state store in a PostgreSQL table.
#[derive(Debug)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Arc<Statements>,
    sweeper: Sweeper,
}

/// SQL text for one table, built once: identifiers can't be bind parameters.
#[derive(Debug)]
struct Statements {
    get: Arc<str>,
    bulk_get: Arc<str>,
    upsert: Arc<str>,
    update_if_match: Arc<str>,
    update_if_exists: Arc<str>,
    insert_if_absent: Arc<str>,
    delete: Arc<str>,
    delete_if_match: Arc<str>,
    delete_if_exists: Arc<str>,
    exists: Arc<str>,
    list_from: Arc<str>,
    list_from_bounded: Arc<str>,
    list_after: Arc<str>,
    list_after_bounded: Arc<str>,
    sweep: Arc<str>,
    migrate: Vec<String>,
}

impl Statements {
    fn new(schema: &str, table: &str) -> Self {
        let t = format!("\"{schema}\".\"{table}\"");
        let seq = format!("\"{schema}\".\"{table}_rev\"");
        let live = "(expires_at IS NULL OR expires_at > now())";
        let expires = "now() + $4::bigint * interval '1 millisecond'";
        let s = |sql: String| Arc::<str>::from(sql);
        Self {
            get: s(format!(
                "SELECT value, content_type, version FROM {t} WHERE key = $1 AND {live}"
            )),
            bulk_get: s(format!(
                "SELECT key, value, content_type, version FROM {t} WHERE key = ANY($1) AND {live}"
            )),
            upsert: s(format!(
                "INSERT INTO {t} (key, value, content_type, version, expires_at) \
                 VALUES ($1, $2, $3, nextval('{seq}'), {expires}) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, content_type = EXCLUDED.content_type, \
                 version = EXCLUDED.version, expires_at = EXCLUDED.expires_at RETURNING version"
            )),
            update_if_match: s(format!(
                "UPDATE {t} SET value = $2, content_type = $3, version = nextval('{seq}'), expires_at = {expires} \
                 WHERE key = $1 AND version = $5 AND {live} RETURNING version"
            )),
            update_if_exists: s(format!(
                "UPDATE {t} SET value = $2, content_type = $3, version = nextval('{seq}'), expires_at = {expires} \
                 WHERE key = $1 AND {live} RETURNING version"
            )),
            insert_if_absent: s(format!(
                "INSERT INTO {t} AS cur (key, value, content_type, version, expires_at) \
                 VALUES ($1, $2, $3, nextval('{seq}'), {expires}) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, content_type = EXCLUDED.content_type, \
                 version = EXCLUDED.version, expires_at = EXCLUDED.expires_at \
                 WHERE cur.expires_at IS NOT NULL AND cur.expires_at <= now() RETURNING version"
            )),
            delete: s(format!("DELETE FROM {t} WHERE key = $1 RETURNING {live}")),
            delete_if_match: s(format!(
                "DELETE FROM {t} WHERE key = $1 AND version = $2 AND {live} RETURNING true"
            )),
            delete_if_exists: s(format!(
                "DELETE FROM {t} WHERE key = $1 AND {live} RETURNING true"
            )),
            exists: s(format!("SELECT true FROM {t} WHERE key = $1 AND {live}")),
            list_from: s(format!(
                "SELECT key FROM {t} WHERE key >= $1 AND {live} ORDER BY key LIMIT $2"
            )),
            list_from_bounded: s(format!(
                "SELECT key FROM {t} WHERE key >= $1 AND key < $3 AND {live} ORDER BY key LIMIT $2"
            )),
            list_after: s(format!(
                "SELECT key FROM {t} WHERE key > $1 AND {live} ORDER BY key LIMIT $2"
            )),
            list_after_bounded: s(format!(
                "SELECT key FROM {t} WHERE key > $1 AND key < $3 AND {live} ORDER BY key LIMIT $2"
            )),
            sweep: s(format!(
                "DELETE FROM {t} WHERE key IN \
                 (SELECT key FROM {t} WHERE expires_at <= now() LIMIT {SWEEP_BATCH} FOR UPDATE SKIP LOCKED)"
            )),
            migrate: vec![
                format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""),
                format!("CREATE SEQUENCE IF NOT EXISTS {seq}"),
                // COLLATE "C": keys sort by their UTF-8 bytes, as on every backend,
                // and prefix scans are index ranges.
                format!(
                    "CREATE TABLE IF NOT EXISTS {t} (\
                     key TEXT COLLATE \"C\" PRIMARY KEY, \
                     value BYTEA NOT NULL, \
                     content_type TEXT NOT NULL, \
                     version BIGINT NOT NULL, \
                     expires_at TIMESTAMPTZ)"
                ),
                format!(
                    "CREATE INDEX IF NOT EXISTS \"{table}_expires\" ON {t} (expires_at) WHERE expires_at IS NOT NULL"
                ),
            ],
        }
    }
}

impl PostgresStore {
    /// Connects to PostgreSQL, creates the schema, table and sequence if needed, and
    /// starts the TTL sweeper. `name` is the component name, used for the default
    /// table name.
    ///
    /// # Errors
    /// [`StateError::Unavailable`] if PostgreSQL can't be reached within
    /// `connect_timeout`; [`StateError::Backend`] for a bad URL or identifier.
    pub async fn connect(name: &str, config: &PostgresState) -> Result<Self, StateError> {
        let table = config.table_for(name);
        for ident in [config.schema.as_str(), table.as_str()] {
            let ok = !ident.is_empty()
                && ident.len() <= 63
                && ident
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !ident.as_bytes()[0].is_ascii_digit();
            if !ok {
                return Err(StateError::backend(
                    BACKEND,
                    format!("invalid SQL identifier {ident:?}"),
                ));
            }
        }
        let options =
            PgConnectOptions::from_str(&config.url).map_err(|e| StateError::backend(BACKEND, e))?;
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_size)
            .acquire_timeout(config.connect_timeout)
            .connect_with(options)
            .await
            .map_err(pg_error)?;
        let sql = Arc::new(Statements::new(&config.schema, &table));
        migrate(&pool, &sql).await.map_err(pg_error)?;
        let sweeper = {
            let (pool, sql) = (pool.clone(), Arc::clone(&sql));
            Sweeper::spawn(BACKEND, config.sweep_interval, move || {
                let (pool, sql) = (pool.clone(), Arc::clone(&sql));
                async move { sweep(&pool, &sql).await }
            })
        };
        Ok(Self { pool, sql, sweeper })
    }

    /// Deletes every expired row now; returns how many.
    ///
    /// # Errors
    /// If PostgreSQL fails.
    pub async fn sweep(&self) -> Result<u64, StateError> {
        sweep(&self.pool, &self.sql).await.map_err(pg_error)
    }

    /// Runs the transaction once; the outer `Result` is the database's, the inner
    /// one a failed precondition (after rollback).
    async fn try_transact(
        &self,
        operations: &[Operation],
    ) -> Result<Result<Vec<Option<ETag>>, StateError>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut etags = Vec::with_capacity(operations.len());
        for (index, op) in operations.iter().enumerate() {
            let result = match op {
                Operation::Upsert {
                    key,
                    value,
                    options,
                } => set(&mut *tx, &self.sql, key, value, options)
                    .await?
                    .map(Some),
                Operation::Delete { key, precondition } => {
                    delete(&mut *tx, &self.sql, key, precondition)
                        .await?
                        .map(|_| None)
                }
            };
            match result {
                Ok(etag) => etags.push(etag),
                Err(e) => {
                    tx.rollback().await?;
                    return Ok(Err(e.in_transaction(index)));
                }
            }
        }
        tx.commit().await?;
        Ok(Ok(etags))
    }
}

#[async_trait]
impl StateStore for PostgresStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn get(&self, key: &Key) -> Result<Option<Item>, StateError> {
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.get)))
            .bind(key.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(pg_error)?;
        row.map(|row| item(&row, 0)).transpose()
    }

    async fn bulk_get(&self, keys: &[Key]) -> Result<Vec<Option<Item>>, StateError> {
        let names: Vec<&str> = keys.iter().map(Key::as_str).collect();
        let rows = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.bulk_get)))
            .bind(&names)
            .fetch_all(&self.pool)
            .await
            .map_err(pg_error)?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in rows {
            let key: String = row.try_get(0).map_err(pg_error)?;
            found.insert(key, item(&row, 1)?);
        }
        Ok(names.iter().map(|k| found.get(*k).cloned()).collect())
    }

    async fn set(
        &self,
        key: &Key,
        value: Value,
        options: WriteOptions,
    ) -> Result<ETag, StateError> {
        set(&self.pool, &self.sql, key, &value, &options)
            .await
            .map_err(pg_error)?
    }

    async fn delete(&self, key: &Key, precondition: Precondition) -> Result<bool, StateError> {
        delete(&self.pool, &self.sql, key, &precondition)
            .await
            .map_err(pg_error)?
    }

    async fn transact(&self, operations: Vec<Operation>) -> Result<Vec<Option<ETag>>, StateError> {
        let mut attempt = 1;
        loop {
            match self.try_transact(&operations).await {
                Ok(result) => return result,
                Err(e) if attempt < TRANSACTION_ATTEMPTS && is_retryable(&e) => {
                    tracing::debug!(attempt, error = %e, "retrying state transaction");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
                }
                Err(e) => return Err(pg_error(e)),
            }
        }
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Page, StateError> {
        let (start, sql_from, sql_bounded) = match after {
            Some(after) if after.as_str() >= prefix => (
                after.as_str(),
                &self.sql.list_after,
                &self.sql.list_after_bounded,
            ),
            _ => (prefix, &self.sql.list_from, &self.sql.list_from_bounded),
        };
        let fetch = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
        let query = match prefix_upper_bound(prefix) {
            Some(upper) => sqlx::query(AssertSqlSafe(Arc::clone(sql_bounded)))
                .bind(start)
                .bind(fetch)
                .bind(upper),
            None => sqlx::query(AssertSqlSafe(Arc::clone(sql_from)))
                .bind(start)
                .bind(fetch),
        };
        let rows = query.fetch_all(&self.pool).await.map_err(pg_error)?;
        let keys = rows
            .iter()
            .map(|row| {
                let k: String = row.try_get(0).map_err(pg_error)?;
                Key::new(k).map_err(|e| {
                    StateError::backend(BACKEND, format!("stored key is invalid: {e}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_overfetch(keys, limit))
    }

    async fn health(&self) -> Result<(), StateError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn close(&self) -> Result<(), StateError> {
        self.sweeper.stop();
        self.pool.close().await;
        Ok(())
    }
}

// === statements ===

async fn set<'c>(
    db: impl PgExecutor<'c>,
    sql: &Statements,
    key: &Key,
    value: &Value,
    options: &WriteOptions,
) -> Result<Result<ETag, StateError>, sqlx::Error> {
    let statement = match &options.precondition {
        Precondition::None => &sql.upsert,
        Precondition::IfMatch(_) => &sql.update_if_match,
        Precondition::IfExists => &sql.update_if_exists,
        Precondition::IfAbsent => &sql.insert_if_absent,
    };
    let mut query = sqlx::query_scalar::<_, i64>(AssertSqlSafe(Arc::clone(statement)))
        .bind(key.as_str())
        .bind(value.data.as_ref())
        .bind(value.content_type.as_str())
        .bind(ttl_millis(options.ttl));
    if let Precondition::IfMatch(etag) = &options.precondition {
        query = query.bind(expected_revision(etag));
    }
    Ok(match query.fetch_optional(db).await? {
        Some(version) => Ok(ETag::from_revision(version.unsigned_abs())),
        None if options.precondition == Precondition::IfAbsent => Err(StateError::KeyExists {
            key: key.as_str().to_owned(),
        }),
        None => Err(StateError::EtagMismatch {
            key: key.as_str().to_owned(),
        }),
    })
}

async fn delete<'c>(
    db: impl PgExecutor<'c>,
    sql: &Statements,
    key: &Key,
    precondition: &Precondition,
) -> Result<Result<bool, StateError>, sqlx::Error> {
    let k = key.as_str();
    let deleted: Option<bool> = match precondition {
        Precondition::None => {
            sqlx::query_scalar(AssertSqlSafe(Arc::clone(&sql.delete)))
                .bind(k)
                .fetch_optional(db)
                .await?
        }
        Precondition::IfMatch(etag) => {
            sqlx::query_scalar(AssertSqlSafe(Arc::clone(&sql.delete_if_match)))
                .bind(k)
                .bind(expected_revision(etag))
                .fetch_optional(db)
                .await?
        }
        Precondition::IfExists => {
            sqlx::query_scalar(AssertSqlSafe(Arc::clone(&sql.delete_if_exists)))
                .bind(k)
                .fetch_optional(db)
                .await?
        }
        Precondition::IfAbsent => {
            // Deleting "if absent" deletes nothing; it only asserts absence.
            let exists: Option<bool> = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&sql.exists)))
                .bind(k)
                .fetch_optional(db)
                .await?;
            return Ok(match exists {
                Some(_) => Err(StateError::KeyExists { key: k.to_owned() }),
                None => Ok(false),
            });
        }
    };
    Ok(match (precondition, deleted) {
        (Precondition::None, live) => Ok(live.unwrap_or(false)),
        (_, Some(_)) => Ok(true),
        (_, None) => Err(StateError::EtagMismatch { key: k.to_owned() }),
    })
}

fn item(row: &PgRow, first: usize) -> Result<Item, StateError> {
    let data: Vec<u8> = row.try_get(first).map_err(pg_error)?;
    let content_type: String = row.try_get(first + 1).map_err(pg_error)?;
    let version: i64 = row.try_get(first + 2).map_err(pg_error)?;
    Ok(Item {
        value: Value::new(Bytes::from(data), content_type),
        etag: ETag::from_revision(version.unsigned_abs()),
    })
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

async fn sweep(pool: &PgPool, sql: &Statements) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let n = sqlx::query(AssertSqlSafe(Arc::clone(&sql.sweep)))
            .execute(pool)
            .await?
            .rows_affected();
        total += n;
        if n < SWEEP_BATCH.unsigned_abs() {
            return Ok(total);
        }
    }
}

// === errors ===

/// SQLSTATEs meaning "could not talk to the database", as opposed to "the database
/// refused this".
fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08") || matches!(c.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

fn is_retryable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c == "40001" || c == "40P01"))
}

fn pg_error(e: sqlx::Error) -> StateError {
    if is_unavailable(&e) {
        StateError::unavailable(BACKEND, e)
    } else {
        StateError::backend(BACKEND, e)
    }
}
