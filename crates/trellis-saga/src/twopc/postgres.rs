//! The `postgres` participant: SQL statements made durable with PostgreSQL's own
//! two-phase commit (`PREPARE TRANSACTION` / `COMMIT PREPARED`).
//!
//! Spec: `{"type":"postgres","component":"<[components.state.<name>] of type
//! postgres>","statements":[{"sql":"UPDATE ... WHERE id = $1","params":[...]}]}`.
//! The component's `url` is used (with its `schema` first on the `search_path`), on
//! a pool of this participant kind's own, one per component, opened on first use.
//! Parameters are JSON scalars: a string binds as `text` (cast in SQL when the
//! column is of another type: `$1::uuid`), an integer as `int8`, another number as
//! `float8`, a boolean as `bool`, `null` as an untyped NULL.
//!
//! - **prepare**, on one connection: `BEGIN`, the statements (under a
//!   `statement_timeout` of the time left), then `PREPARE TRANSACTION
//!   'trellis_<transaction id hex>_<index>'` → vote commit. Any SQL error rolls back
//!   and votes abort with the error. A transaction already prepared under that id
//!   votes commit at once (a repeated prepare).
//! - **commit**: `COMMIT PREPARED '<gid>'`; an unknown gid (SQLSTATE 42704) was
//!   committed already.
//! - **abort**: `ROLLBACK PREPARED '<gid>'`; an unknown gid was never prepared or
//!   is rolled back already.
//!
//! A prepare runs in a task of its own, so a coordinator giving up on it at the
//! deadline does not leave a connection mid-transaction; a commit or abort of the
//! same gid waits for it to finish first, so an abort can never pass a prepare that
//! is still landing.
//!
//! PostgreSQL needs `max_prepared_transactions` above 0 (and at least the number of
//! transactions in doubt at once).

use crate::sync::lock;
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sqlx::postgres::{PgArgumentBuffer, PgArguments, PgConnectOptions, PgPoolOptions, PgTypeInfo};
use sqlx::{AssertSqlSafe, PgPool, Postgres};
use trellis_core::config::StateComponent;

use super::participant::{Participant, ParticipantError, SpecError, TxContext, parse_spec};
use super::state::Vote;

/// Most statements of one participant.
pub const MAX_STATEMENTS: usize = 100;
/// Most parameters of one statement.
const MAX_PARAMS: usize = 1000;
/// Longest statement, in bytes.
const MAX_SQL: usize = 64 * 1024;
/// Connections per component pool.
const POOL_SIZE: u32 = 8;
/// How long to wait for a connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long closing waits for connections in use.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Statements that would end or nest the transaction the participant prepares.
const TRANSACTION_CONTROL: [&str; 9] = [
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "prepare",
    "savepoint",
    "release",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    component: String,
    statements: Vec<Statement>,
}

/// One statement with its parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Statement {
    sql: String,
    #[serde(default)]
    params: Vec<Value>,
}

#[derive(Debug, Clone)]
struct Target {
    url: String,
    schema: String,
}

/// The pools of the `postgres` participants, one per component, and the prepares
/// in flight.
#[derive(Debug)]
pub(crate) struct PgPools {
    targets: BTreeMap<String, Target>,
    /// Every state component, postgres or not, for error messages.
    others: Vec<String>,
    pools: Mutex<HashMap<String, PgPool>>,
    /// Per gid, held while its prepare runs.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl PgPools {
    pub(crate) fn new(components: &BTreeMap<String, StateComponent>) -> Self {
        let mut targets = BTreeMap::new();
        let mut others = Vec::new();
        for (name, component) in components {
            match component {
                StateComponent::Postgres(pg) => {
                    targets.insert(
                        name.clone(),
                        Target {
                            url: pg.url.clone(),
                            schema: pg.schema.clone(),
                        },
                    );
                }
                other => others.push(format!("{name} ({})", other.type_name())),
            }
        }
        Self {
            targets,
            others,
            pools: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    fn check(&self, component: &str) -> Result<(), SpecError> {
        if self.targets.contains_key(component) {
            return Ok(());
        }
        let postgres: Vec<&str> = self.targets.keys().map(String::as_str).collect();
        Err(SpecError::unknown_target(format!(
            "no [components.state.{component}] of type postgres; postgres components: {}{}",
            if postgres.is_empty() {
                "none".to_owned()
            } else {
                postgres.join(", ")
            },
            if self.others.is_empty() {
                String::new()
            } else {
                format!(" (others: {})", self.others.join(", "))
            }
        )))
    }

    /// The pool of `component`, opened (lazily: connections come on first use) if
    /// needed.
    fn pool(&self, component: &str) -> Result<PgPool, ParticipantError> {
        let mut pools = lock(&self.pools);
        if let Some(pool) = pools.get(component) {
            return Ok(pool.clone());
        }
        let target = self
            .targets
            .get(component)
            .ok_or_else(|| ParticipantError::new(format!("no postgres component {component:?}")))?;
        let mut options = PgConnectOptions::from_str(&target.url)
            .map_err(|e| ParticipantError::new(format!("components.state.{component}.url: {e}")))?
            .application_name("trellis-2pc");
        if target.schema != "public" {
            let schema = target.schema.replace('"', "\"\"");
            options = options.options([("search_path", format!("\"{schema}\",public"))]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        pools.insert(component.to_owned(), pool.clone());
        Ok(pool)
    }

    /// Waits for the prepare of `gid`, if one is running.
    async fn settled(&self, gid: &str) {
        let running = lock(&self.inflight).get(gid).cloned();
        if let Some(running) = running {
            let _done = running.lock().await;
        }
    }

    /// Closes the pools, waiting a little for connections in use (a prepare
    /// waiting for a row lock) before dropping them.
    pub(crate) async fn close(&self) {
        let pools: Vec<PgPool> = lock(&self.pools).drain().map(|(_, p)| p).collect();
        for pool in pools {
            if tokio::time::timeout(CLOSE_TIMEOUT, pool.close())
                .await
                .is_err()
            {
                tracing::warn!("postgres participant connections still busy at close; dropped");
            }
        }
    }
}

/// SQL run in one prepared transaction.
#[derive(Debug)]
pub(crate) struct PostgresParticipant {
    pools: Arc<PgPools>,
    component: String,
    statements: Arc<Vec<Statement>>,
}

impl PostgresParticipant {
    pub(crate) fn from_spec(pools: Arc<PgPools>, spec: &Value) -> Result<Self, SpecError> {
        let Spec {
            component,
            statements,
        } = parse_spec(spec)?;
        pools.check(&component)?;
        if statements.is_empty() || statements.len() > MAX_STATEMENTS {
            return Err(SpecError::invalid(format!(
                "statements: between 1 and {MAX_STATEMENTS}, got {}",
                statements.len()
            )));
        }
        for (i, s) in statements.iter().enumerate() {
            check_statement(s).map_err(|e| SpecError::invalid(format!("statements[{i}]: {e}")))?;
        }
        Ok(Self {
            pools,
            component,
            statements: Arc::new(statements),
        })
    }
}

fn check_statement(s: &Statement) -> Result<(), String> {
    let sql = s.sql.trim_start();
    if sql.is_empty() || s.sql.len() > MAX_SQL {
        return Err(format!("sql must be 1 to {MAX_SQL} bytes"));
    }
    if sql.starts_with("--") || sql.starts_with("/*") {
        return Err("sql must start with the statement, not a comment".into());
    }
    let first: String = sql
        .chars()
        .take_while(char::is_ascii_alphabetic)
        .collect::<String>()
        .to_ascii_lowercase();
    if TRANSACTION_CONTROL.contains(&first.as_str()) {
        return Err(format!(
            "{first:?} is transaction control; the participant runs the statements in a \
             transaction of its own"
        ));
    }
    if s.params.len() > MAX_PARAMS {
        return Err(format!("at most {MAX_PARAMS} params"));
    }
    if let Some(i) = s
        .params
        .iter()
        .position(|p| matches!(p, Value::Array(_) | Value::Object(_)))
    {
        return Err(format!(
            "params[{i}]: a parameter is a JSON string, number, boolean or null"
        ));
    }
    Ok(())
}

/// The PostgreSQL global transaction id of participant `index` of transaction
/// `id`: `trellis_<id without dashes>_<index>`. Only ASCII letters and digits of the
/// id are kept, so it is safe to put in SQL text (`PREPARE TRANSACTION` takes no
/// parameters).
pub fn gid(transaction_id: &str, index: usize) -> String {
    let hex: String = transaction_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    format!("trellis_{hex}_{index}")
}

/// Whether `e` is SQLSTATE `code`.
fn is_state(e: &sqlx::Error, code: &str) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c == code))
}

#[async_trait]
impl Participant for PostgresParticipant {
    async fn prepare(&self, tx: &TxContext) -> Result<Vote, ParticipantError> {
        let gid = gid(&tx.transaction_id, tx.index);
        let pool = self.pools.pool(&self.component)?;
        // Registered before the first await: a commit or abort of this gid waits
        // for the task even if this future is dropped.
        let running = Arc::new(tokio::sync::Mutex::new(()));
        let guard = Arc::clone(&running)
            .try_lock_owned()
            .map_err(|_| ParticipantError::new("prepare lock"))?;
        lock(&self.pools.inflight).insert(gid.clone(), Arc::clone(&running));
        let (pools, statements, timeout) = (
            Arc::clone(&self.pools),
            Arc::clone(&self.statements),
            tx.time_left,
        );
        let task_gid = gid.clone();
        let task = tokio::spawn(async move {
            let vote = run_prepare(&pool, &statements, &task_gid, timeout).await;
            drop(guard);
            let mut inflight = lock(&pools.inflight);
            if inflight
                .get(&task_gid)
                .is_some_and(|r| Arc::ptr_eq(r, &running))
            {
                inflight.remove(&task_gid);
            }
            vote
        });
        task.await
            .map_err(|e| ParticipantError::new(format!("prepare task failed: {e}")))?
    }

    async fn commit(&self, tx: &TxContext) -> Result<(), ParticipantError> {
        let gid = gid(&tx.transaction_id, tx.index);
        self.pools.settled(&gid).await;
        let pool = self.pools.pool(&self.component)?;
        match sqlx::raw_sql(AssertSqlSafe(format!("COMMIT PREPARED '{gid}'")))
            .execute(&pool)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_state(&e, "42704") => Ok(()),
            Err(e) => Err(ParticipantError::new(format!(
                "COMMIT PREPARED '{gid}' on {}: {e}",
                self.component
            ))),
        }
    }

    async fn abort(&self, tx: &TxContext) -> Result<(), ParticipantError> {
        let gid = gid(&tx.transaction_id, tx.index);
        self.pools.settled(&gid).await;
        let pool = self.pools.pool(&self.component)?;
        match sqlx::raw_sql(AssertSqlSafe(format!("ROLLBACK PREPARED '{gid}'")))
            .execute(&pool)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_state(&e, "42704") => Ok(()),
            Err(e) => Err(ParticipantError::new(format!(
                "ROLLBACK PREPARED '{gid}' on {}: {e}",
                self.component
            ))),
        }
    }
}

/// Whether `gid` is prepared now.
async fn prepared<'c, E: sqlx::PgExecutor<'c>>(e: E, gid: &str) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(
        "SELECT 1 FROM pg_prepared_xacts WHERE gid = $1 AND database = current_database()",
    )
    .bind(gid)
    .fetch_optional(e)
    .await?
    .is_some())
}

/// BEGIN, the statements, PREPARE TRANSACTION; ROLLBACK on any error.
async fn run_prepare(
    pool: &PgPool,
    statements: &[Statement],
    gid: &str,
    timeout: Option<Duration>,
) -> Result<Vote, ParticipantError> {
    let unavailable = |e: sqlx::Error| ParticipantError::new(format!("postgres: {e}"));
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let acquire = pool.acquire();
    let mut conn = match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, acquire)
            .await
            .map_err(|_| ParticipantError::new("no connection before the deadline"))?,
        None => acquire.await,
    }
    .map_err(unavailable)?;
    if prepared(&mut *conn, gid).await.map_err(unavailable)? {
        return Ok(Vote::Commit);
    }
    // What is left of the deadline bounds the statements, so the task ends soon
    // after it even when a statement waits for a lock.
    let left = match deadline {
        Some(deadline) => {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(Vote::abort("the deadline passed before the statements ran"));
            }
            Some(left)
        }
        None => None,
    };
    sqlx::raw_sql("BEGIN")
        .execute(&mut *conn)
        .await
        .map_err(unavailable)?;
    let mut failure = None;
    if let Some(left) = left {
        let ms = left.as_millis().clamp(1, u128::from(u32::MAX));
        if let Err(e) = sqlx::raw_sql(AssertSqlSafe(format!("SET LOCAL statement_timeout = {ms}")))
            .execute(&mut *conn)
            .await
        {
            failure = Some(format!("setting statement_timeout: {e}"));
        }
    }
    if failure.is_none() {
        for (i, statement) in statements.iter().enumerate() {
            let mut query = sqlx::query(AssertSqlSafe(statement.sql.clone())).persistent(false);
            for param in &statement.params {
                query = bind(query, param);
            }
            if let Err(e) = query.execute(&mut *conn).await {
                failure = Some(format!("statements[{i}]: {e}"));
                break;
            }
        }
    }
    if failure.is_none()
        && let Err(e) = sqlx::raw_sql(AssertSqlSafe(format!("PREPARE TRANSACTION '{gid}'")))
            .execute(&mut *conn)
            .await
    {
        failure = Some(format!("PREPARE TRANSACTION: {e}"));
    }
    if let Some(failure) = failure {
        if sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.is_err() {
            // Don't hand a connection in an unknown state back to the pool.
            conn.close_on_drop();
        }
        return Ok(Vote::abort(failure));
    }
    // PREPARE TRANSACTION outside a transaction block only warns: make sure the
    // statements did not end the transaction.
    if prepared(&mut *conn, gid).await.map_err(unavailable)? {
        Ok(Vote::Commit)
    } else {
        Ok(Vote::abort(
            "the transaction was not prepared (did a statement end it?)",
        ))
    }
}

type Query<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

fn bind<'q>(query: Query<'q>, param: &Value) -> Query<'q> {
    match param {
        Value::String(s) => query.bind(s.clone()),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => query.bind(i),
            (None, Some(f)) => query.bind(f),
            (None, None) => query.bind(n.to_string()),
        },
        Value::Bool(b) => query.bind(*b),
        Value::Null => query.bind(UntypedNull),
        // Rejected by the spec check; bound as their JSON text to be total.
        Value::Array(_) | Value::Object(_) => query.bind(param.to_string()),
    }
}

/// A NULL whose type PostgreSQL infers from where it is used (OID 0), so it fits
/// any column.
#[derive(Debug, Clone, Copy)]
struct UntypedNull;

impl sqlx::Type<Postgres> for UntypedNull {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(sqlx::postgres::types::Oid(0))
    }
}

impl sqlx::Encode<'_, Postgres> for UntypedNull {
    fn encode_by_ref(
        &self,
        _buf: &mut PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        Ok(sqlx::encode::IsNull::Yes)
    }
}

#[cfg(test)]
mod test {
    use serde_json::json;
    use trellis_core::config::PostgresState;

    use super::*;

    #[test]
    fn gids_are_safe() {
        assert_eq!(
            gid("0190a3b4-5c6d-7e8f-9a0b-1c2d3e4f5a6b", 2),
            "trellis_0190a3b45c6d7e8f9a0b1c2d3e4f5a6b_2"
        );
        assert_eq!(gid("x'; DROP TABLE t; --", 0), "trellis_xDROPTABLEt_0");
    }

    #[test]
    fn specs_are_checked() {
        let components = BTreeMap::from([(
            "pg".to_owned(),
            StateComponent::Postgres(PostgresState::new("postgres://x@127.0.0.1/db")),
        )]);
        let pools = Arc::new(PgPools::new(&components));
        let build = |spec: Value| PostgresParticipant::from_spec(Arc::clone(&pools), &spec);
        build(json!({"component": "pg", "statements": [
            {"sql": "UPDATE t SET n = n + $1 WHERE id = $2", "params": [1, "a"]},
            {"sql": "insert into t values ($1, $2, $3)", "params": [null, true, 1.5]},
        ]}))
        .expect("valid");
        for (spec, code) in [
            (
                json!({"component": "nope", "statements": [{"sql": "SELECT 1"}]}),
                "unknown_participant_target",
            ),
            (
                json!({"component": "pg", "statements": []}),
                "invalid_participant",
            ),
            (
                json!({"component": "pg", "statements": [{"sql": "  "}]}),
                "invalid_participant",
            ),
            (
                json!({"component": "pg", "statements": [{"sql": "COMMIT"}]}),
                "invalid_participant",
            ),
            (
                json!({"component": "pg", "statements": [{"sql": "  rollback;"}]}),
                "invalid_participant",
            ),
            (
                json!({"component": "pg", "statements": [{"sql": "/* x */ COMMIT"}]}),
                "invalid_participant",
            ),
            (
                json!({"component": "pg", "statements": [{"sql": "SELECT $1", "params": [[1]]}]}),
                "invalid_participant",
            ),
            (
                json!({"component": "pg", "statements": [{"sql": "SELECT 1", "x": 1}]}),
                "invalid_participant",
            ),
        ] {
            assert_eq!(
                build(spec.clone()).expect_err("invalid").code,
                code,
                "{spec}"
            );
        }
    }
}
