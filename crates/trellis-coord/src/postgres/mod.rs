//! The PostgreSQL backend: leases in one table, shared by every process that
//! connects to the same schema, with fencing tokens that survive anything short of
//! losing the database.
//!
//! # Schema
//! ```text
//! leases   (kind, name) PK → owner (NULL: free), token, ttl_us, expires_at
//! ```
//! A row is created by the first grant of a name and **never deleted**: releasing
//! clears `owner`, and `token` only ever grows, so tokens strictly increase per
//! (kind, name) across restarts of every process and are never issued twice. The
//! schema and table are created if missing when a coordinator connects, under an
//! advisory lock so that processes starting together don't race.
//!
//! # Every operation is one statement
//! - **Grant** (`acquire`, `campaign`): an upsert. A missing row is inserted with
//!   token 1; an existing one is updated only `WHERE owner IS NULL OR expires_at <=
//!   clock_timestamp() OR owner = <caller>`, with `token = token + 1` — or the same
//!   token when the caller still holds it (a retried request gets its lease back,
//!   extended). `INSERT … ON CONFLICT DO UPDATE` locks the conflicting row and
//!   re-checks that condition on its newest version, so of concurrent takers
//!   exactly one wins. The statement commits (with `synchronous_commit = on`, forced
//!   per connection) before the token is returned.
//! - **Extend** and **release** compare owner, token *and* "not expired" on the
//!   server (`expires_at > clock_timestamp()`): only the holder may, and an expired
//!   lease can't be revived even when nobody took the name since.
//! - A refusal reports the holder from the same statement (as of its snapshot).
//!
//! # Time
//! Expiry is decided by the database's clock alone (`clock_timestamp()`: `now()` is
//! the transaction's start), so processes with skewed clocks still agree on who
//! holds a name. The deadline handed to a holder ([`Lease::expires_at`]) is an
//! [`Instant`] taken *before* the request was sent plus the granted TTL: the server
//! computes its deadline later than that, from its own clock, plus one microsecond
//! (its clock truncates to microseconds), so a holder that stops by its deadline
//! never overlaps its successor. Granted TTLs are the requested ones rounded up to
//! whole microseconds. What this assumes: clocks that run at the same *rate* as the
//! database's, and no forward step of the database's wall clock (an NTP step
//! forward frees names early — as with any lease on a wall clock).
//!
//! # Waiting and observing
//! Every process holds one extra connection that `LISTEN`s on the schema's channel
//! (its name is the schema's); releases, resignations and new terms of elections
//! `pg_notify` it with the payload `<kind>/<name>` when they commit. Expiry is
//! nobody's call and notifies nothing, so:
//! - a blocked [`acquire`](crate::Coordinator::acquire) or
//!   [`campaign`](crate::Coordinator::campaign) tries, and while the name is busy
//!   sleeps until a notification for the name, the holder's deadline (from the
//!   refusal) or its own deadline, then tries again;
//! - [`observe`](crate::Coordinator::observe) reads the current leader, then reads
//!   again on every notification and at the leader's deadline, publishing changes of
//!   term (or of "no leader") only — keep-alives move the deadline silently, and a
//!   term older than one already published is never sent.
//!
//! If the listening connection is lost, it is opened again and every waiter and
//! observer of this process reads again (notifications sent meanwhile are gone).
//! Waiters take no pooled connection while they sleep.
//!
//! # Failure
//! Connection trouble is [`CoordError::Unavailable`] (guards retry it until their
//! lease's deadline). A grant whose caller gives up (cancelled future, lost
//! connection) may still have committed: the name then stays held until its TTL
//! runs out, which is safe but slow — keep TTLs short.
//! [`close`](crate::Coordinator::close) wakes blocked calls with
//! [`CoordError::Closed`] and closes the pools; leases stay in the table until they
//! expire or another coordinator releases them.

mod notify;
mod sql;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Row};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use self::notify::{Hub, Interest};
use self::sql::Statements;
use crate::api::{ByKind, CoordError, Kind, LeaderInfo, Lease};
use crate::name::Name;

const BACKEND: &str = "postgres";
/// Serializes schema creation across processes starting at once ("trellisC").
const MIGRATION_LOCK: i64 = 0x7472_656c_6c69_7343;
/// How long after a holder's deadline a waiter or observer reads again: the server
/// frees the name a little after the deadline the client computed.
const EXPIRY_SLACK: Duration = Duration::from_millis(2);
/// The longest a waiter or observer goes without reading the state, whatever the
/// notifications say (a safety net; wake-ups come from notifications and deadlines).
const POLL_INTERVAL: Duration = Duration::from_secs(10);
/// How long an observer waits before reading again after an error.
const OBSERVE_RETRY: Duration = Duration::from_secs(1);

/// Settings of a [`PostgresCoordinator`].
///
/// Every field has a default, so `PostgresConfig::default()` talks to a local
/// PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL. Default `postgres://postgres@127.0.0.1:5432/test`.
    pub url: String,
    /// The schema holding the `leases` table, created if missing; also the name of
    /// the `NOTIFY` channel. 1 to 63 ASCII letters, digits and `_`, not starting
    /// with a digit. Every process coordinating together uses the same one. Default
    /// `trellis_coord`.
    pub schema: String,
    /// Most pooled connections (besides the one that listens for notifications).
    /// Calls hold one only for the duration of a statement. Default 10.
    pub max_connections: u32,
    /// How long to wait for a connection, in milliseconds; past it a call fails with
    /// [`CoordError::Unavailable`]. Default 5000.
    pub connect_timeout_ms: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/test".to_owned(),
            schema: "trellis_coord".to_owned(),
            max_connections: 10,
            connect_timeout_ms: 5000,
        }
    }
}

/// A [`Coordinator`](crate::Coordinator) on PostgreSQL: every process connected to
/// the same schema shares its locks, elections and fencing tokens. See the
/// [module docs](self) for how it works.
///
/// ```no_run
/// use std::time::Duration;
/// use trellis_coord::postgres::{PostgresConfig, PostgresCoordinator};
/// use trellis_coord::{Coordinator, Name};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let coord = PostgresCoordinator::connect(PostgresConfig {
///     url: "postgres://postgres@db.internal:5432/app".into(),
///     ..PostgresConfig::default()
/// })
/// .await?;
/// let name = Name::new("nightly-report")?;
/// // Wait up to 30 s for the lock; hold it for 10 s unless extended.
/// let lease = coord.acquire(&name, "worker-1", Duration::from_secs(10), Duration::from_secs(30)).await?;
/// // ... work, passing lease.fencing_token to the storage written ...
/// coord.release(&name, "worker-1", lease.fencing_token).await?;
/// coord.close().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct PostgresCoordinator {
    pool: PgPool,
    sql: Arc<Statements>,
    /// Wakes this process's waiters and observers on notifications.
    hub: Arc<Hub>,
    /// `true` once closed. Blocked calls and observer tasks wait on it; dropping it
    /// (dropping the coordinator) ends the observer tasks too.
    closed: watch::Sender<bool>,
    relay: Relay,
}

/// The task that listens for notifications, and its own one-connection pool (so it
/// never takes one of `max_connections`).
#[derive(Debug)]
struct Relay {
    task: JoinHandle<()>,
    pool: PgPool,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PostgresCoordinator {
    /// Connects, creates the schema and table if missing, and starts listening for
    /// notifications.
    ///
    /// # Errors
    /// [`CoordError::Unavailable`] if PostgreSQL can't be reached within
    /// `connect_timeout_ms`; [`CoordError::Backend`] for a bad URL or schema name, or
    /// a schema that can't be created.
    pub async fn connect(config: PostgresConfig) -> Result<Self, CoordError> {
        check_schema(&config.schema)?;
        let options = PgConnectOptions::from_str(&config.url)
            .map_err(|e| backend(format!("invalid URL: {e}")))?
            .application_name("trellis-coord")
            .options([
                // The upsert's re-check of a locked row needs READ COMMITTED (it would
                // be a serialization failure under REPEATABLE READ), and a token must
                // be on disk before it is handed out, whatever the server's default.
                ("default_transaction_isolation", "read committed"),
                ("synchronous_commit", "on"),
            ]);
        let timeout = Duration::from_millis(config.connect_timeout_ms);
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(timeout)
            .connect_with(options.clone())
            .await
            .map_err(pg_error)?;
        let sql = Arc::new(Statements::new(&config.schema));
        migrate(&pool, &sql).await.map_err(pg_error)?;

        // Listening before `connect` returns: no wake-up is lost from the first call.
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(timeout)
            .connect_lazy_with(options);
        let listener = notify::subscribe(&listen_pool, &sql.channel)
            .await
            .map_err(pg_error)?;
        let hub = Arc::new(Hub::default());
        let task = tokio::spawn(notify::relay(
            listen_pool.clone(),
            sql.channel.clone(),
            Arc::clone(&hub),
            listener,
        ));
        tracing::info!(schema = config.schema, "postgres coordinator connected");
        Ok(Self {
            pool,
            sql,
            hub,
            closed: watch::Sender::new(false),
            relay: Relay {
                task,
                pool: listen_pool,
            },
        })
    }

    fn check_open(&self) -> Result<(), CoordError> {
        if *self.closed.borrow() {
            Err(CoordError::Closed)
        } else {
            Ok(())
        }
    }

    /// Runs a statement only the holder may (`$1` kind, `$2` name, `$3` owner, `$4`
    /// token, then `ttl_us` if any): [`CoordError::NotHolder`], naming the holder
    /// from the refusal's row, unless it applied.
    async fn as_holder(
        &self,
        statement: &Arc<str>,
        kind: Kind,
        name: &Name,
        owner: &str,
        token: u64,
        ttl_us: Option<i64>,
    ) -> Result<(), CoordError> {
        let mut query = sqlx::query(AssertSqlSafe(Arc::clone(statement)))
            .bind(kind.as_str())
            .bind(name.as_str())
            .bind(owner)
            .bind(token_param(token));
        if let Some(ttl_us) = ttl_us {
            query = query.bind(ttl_us);
        }
        let row = query.fetch_optional(&self.pool).await.map_err(pg_error)?;
        let holder = match row {
            Some(row) if col::<bool>(&row, 0)? => return Ok(()),
            Some(row) => col(&row, 1)?,
            None => None,
        };
        Err(CoordError::NotHolder {
            kind,
            name: name.clone(),
            owner: owner.to_owned(),
            token,
            holder,
        })
    }
}

impl Drop for PostgresCoordinator {
    fn drop(&mut self) {
        // Observer tasks end when `closed` is dropped; the relay when `Relay` is.
        self.closed.send_replace(true);
    }
}

#[async_trait]
impl ByKind for PostgresCoordinator {
    fn backend_name(&self) -> &'static str {
        BACKEND
    }

    async fn take_lease(
        &self,
        kind: Kind,
        name: &Name,
        owner: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, CoordError> {
        self.check_open()?;
        let (ttl_us, ttl) = granted_ttl(ttl);
        let started = Instant::now();
        let deadline = started + wait;
        // Subscribed before the first try: a release right after it still wakes us.
        let mut interest = (!wait.is_zero()).then(|| self.hub.subscribe(key(kind, name)));
        let mut closed = self.closed.subscribe();
        loop {
            let sent = Instant::now();
            let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.grant)))
                .bind(kind.as_str())
                .bind(name.as_str())
                .bind(owner)
                .bind(ttl_us)
                .fetch_optional(&self.pool)
                .await
                .map_err(pg_error)?;
            let (holder, free_at) = match row {
                Some(row) if col::<bool>(&row, 0)? => {
                    let token = token(col(&row, 1)?)?;
                    let waited = sent - started;
                    metrics::counter!("trellis_coord_granted_total", "backend" => BACKEND, "kind" => kind.as_str())
                        .increment(1);
                    metrics::histogram!("trellis_coord_wait_seconds", "backend" => BACKEND, "kind" => kind.as_str())
                        .record(waited.as_secs_f64());
                    tracing::debug!(%kind, %name, %owner, token, ?ttl, ?waited, "lease granted");
                    return Ok(lease(kind, name, owner, token, sent, ttl));
                }
                Some(row) => (col(&row, 2)?, sent + micros(col(&row, 3)?)),
                // Refused by a grant committed after this statement's snapshot.
                None => (None, sent),
            };
            let now = Instant::now();
            let Some(interest) = interest.as_mut().filter(|_| now < deadline) else {
                metrics::counter!("trellis_coord_timeouts_total", "backend" => BACKEND, "kind" => kind.as_str())
                    .increment(1);
                return Err(CoordError::Timeout {
                    kind,
                    name: name.clone(),
                    waited: now - started,
                    holder,
                });
            };
            let wake = (free_at + EXPIRY_SLACK)
                .min(deadline)
                .min(now + POLL_INTERVAL);
            tokio::select! {
                () = interest.changed() => {}
                () = sleep_until(wake) => {}
                _ = closed.wait_for(|closed| *closed) => return Err(CoordError::Closed),
            }
        }
    }

    async fn renew_lease(
        &self,
        kind: Kind,
        name: &Name,
        owner: &str,
        fencing_token: u64,
        ttl: Duration,
    ) -> Result<Lease, CoordError> {
        self.check_open()?;
        let (ttl_us, ttl) = granted_ttl(ttl);
        let sent = Instant::now();
        self.as_holder(
            &self.sql.renew,
            kind,
            name,
            owner,
            fencing_token,
            Some(ttl_us),
        )
        .await?;
        Ok(lease(kind, name, owner, fencing_token, sent, ttl))
    }

    async fn end_lease(
        &self,
        kind: Kind,
        name: &Name,
        owner: &str,
        fencing_token: u64,
    ) -> Result<(), CoordError> {
        self.check_open()?;
        self.as_holder(&self.sql.release, kind, name, owner, fencing_token, None)
            .await?;
        metrics::counter!("trellis_coord_released_total", "backend" => BACKEND, "kind" => kind.as_str())
            .increment(1);
        tracing::debug!(%kind, %name, %owner, token = fencing_token, "lease released");
        Ok(())
    }

    async fn current_lease(&self, kind: Kind, name: &Name) -> Result<Option<Lease>, CoordError> {
        self.check_open()?;
        read_holder(&self.pool, &self.sql, kind, name).await
    }

    async fn follow_leader(
        &self,
        name: &Name,
    ) -> Result<watch::Receiver<Option<LeaderInfo>>, CoordError> {
        self.check_open()?;
        // Subscribed before reading: a change right after the read is not missed.
        let interest = self.hub.subscribe(key(Kind::Election, name));
        let current = read_holder(&self.pool, &self.sql, Kind::Election, name).await?;
        let (tx, rx) = watch::channel(current.as_ref().map(LeaderInfo::from));
        tokio::spawn(
            Observer {
                pool: self.pool.clone(),
                sql: Arc::clone(&self.sql),
                name: name.clone(),
                tx,
                interest,
                closed: self.closed.subscribe(),
                term: current.as_ref().map_or(0, |l| l.fencing_token),
            }
            .run(current),
        );
        Ok(rx)
    }

    async fn newest_token(&self, kind: Kind, name: &Name) -> Result<u64, CoordError> {
        self.check_open()?;
        let latest: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.sql.latest_token)))
                .bind(kind.as_str())
                .bind(name.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(pg_error)?;
        latest.map_or(Ok(0), token)
    }

    async fn check_health(&self) -> Result<(), CoordError> {
        self.check_open()?;
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn shut_down(&self) -> Result<(), CoordError> {
        // Blocked calls and observers wake and end; later calls fail.
        self.closed.send_replace(true);
        self.relay.task.abort();
        self.relay.pool.close().await;
        self.pool.close().await;
        tracing::debug!(schema = self.sql.channel, "postgres coordinator closed");
        Ok(())
    }
}

// === observe ===

/// Follows one observer's election until the receivers are gone or the coordinator
/// closes.
#[derive(Debug)]
struct Observer {
    pool: PgPool,
    sql: Arc<Statements>,
    name: Name,
    tx: watch::Sender<Option<LeaderInfo>>,
    interest: Interest,
    closed: watch::Receiver<bool>,
    /// The newest term published: an older one is never sent after it.
    term: u64,
}

impl Observer {
    async fn run(mut self, mut current: Option<Lease>) {
        let mut wake = next_read(current.as_ref());
        loop {
            tokio::select! {
                () = self.interest.changed() => {}
                () = sleep_until(wake) => {}
                _ = self.closed.wait_for(|closed| *closed) => return,
                () = self.tx.closed() => return,
            }
            match read_holder(&self.pool, &self.sql, Kind::Election, &self.name).await {
                Ok(now) => {
                    self.publish(now.as_ref());
                    wake = next_read(now.as_ref());
                    current = now;
                }
                Err(CoordError::Closed) => return,
                Err(e) => {
                    tracing::debug!(name = %self.name, error = %e, "observing an election failed, retrying");
                    wake = next_read(current.as_ref()).min(Instant::now() + OBSERVE_RETRY);
                }
            }
        }
    }

    /// Sends a change of term (or of "no leader"); a keep-alive only updates the
    /// deadline, silently.
    fn publish(&mut self, now: Option<&Lease>) {
        let token = now.map(|l| l.fencing_token);
        if token.is_some_and(|t| t < self.term) {
            return;
        }
        self.term = self.term.max(token.unwrap_or(0));
        self.tx.send_if_modified(|seen| {
            let changed = seen.as_ref().map(|l| l.fencing_token) != token;
            *seen = now.map(LeaderInfo::from);
            changed
        });
    }
}

/// When to read again without a notification: just after the leader's deadline.
fn next_read(current: Option<&Lease>) -> Instant {
    let poll = Instant::now() + POLL_INTERVAL;
    current.map_or(poll, |l| (l.expires_at + EXPIRY_SLACK).min(poll))
}

// === helpers ===

/// The notification key of a name: `<kind>/<name>`, as `pg_notify` builds it.
fn key(kind: Kind, name: &Name) -> String {
    format!("{kind}/{name}")
}

/// The TTL granted for a requested one: rounded up to whole microseconds (the
/// database's resolution), as a bind parameter and as a duration.
fn granted_ttl(ttl: Duration) -> (i64, Duration) {
    let us = ttl.as_nanos().div_ceil(1000);
    let us = i64::try_from(us).unwrap_or(i64::MAX);
    (us, micros(Some(us)))
}

/// A count of microseconds from the database (negative or NULL: zero).
fn micros(us: Option<i64>) -> Duration {
    Duration::from_micros(us.and_then(|us| u64::try_from(us).ok()).unwrap_or(0))
}

/// A stored token; always above 0.
fn token(stored: i64) -> Result<u64, CoordError> {
    u64::try_from(stored)
        .ok()
        .filter(|t| *t > 0)
        .ok_or_else(|| backend(format!("stored fencing token {stored} is not positive")))
}

/// A caller's token as a bind parameter: one that was never issued (0) if it does
/// not fit, so that it matches no lease.
fn token_param(token: u64) -> i64 {
    i64::try_from(token).unwrap_or(0)
}

fn lease(kind: Kind, name: &Name, owner: &str, token: u64, sent: Instant, ttl: Duration) -> Lease {
    Lease {
        kind,
        name: name.clone(),
        owner: owner.to_owned(),
        fencing_token: token,
        expires_at: sent + ttl,
        ttl,
    }
}

/// The valid lease of a name; its deadline is computed from before the query.
async fn read_holder(
    pool: &PgPool,
    sql: &Statements,
    kind: Kind,
    name: &Name,
) -> Result<Option<Lease>, CoordError> {
    let sent = Instant::now();
    let Some(row) = sqlx::query(AssertSqlSafe(Arc::clone(&sql.holder)))
        .bind(kind.as_str())
        .bind(name.as_str())
        .fetch_optional(pool)
        .await
        .map_err(pg_error)?
    else {
        return Ok(None);
    };
    Ok(Some(Lease {
        kind,
        name: name.clone(),
        owner: col(&row, 0)?,
        fencing_token: token(col(&row, 1)?)?,
        expires_at: sent + micros(col(&row, 3)?),
        ttl: micros(col(&row, 2)?),
    }))
}

/// Column `i` of a row.
fn col<'r, T>(row: &'r PgRow, i: usize) -> Result<T, CoordError>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(i).map_err(pg_error)
}

fn check_schema(schema: &str) -> Result<(), CoordError> {
    let ok = schema.len() <= 63
        && schema
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && schema.bytes().next().is_some_and(|b| !b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(backend(format!(
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

fn backend(reason: String) -> CoordError {
    CoordError::Backend {
        backend: BACKEND,
        reason,
    }
}

/// Closed pools are [`CoordError::Closed`] (only [`Coordinator::close`] closes
/// them); failing to talk to the database is [`CoordError::Unavailable`] (the
/// outcome of a mutation is unknown); anything else the database refused is
/// [`CoordError::Backend`].
fn pg_error(e: sqlx::Error) -> CoordError {
    let unavailable = match &e {
        sqlx::Error::PoolClosed => return CoordError::Closed,
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
        CoordError::Unavailable {
            backend: BACKEND,
            reason: e.to_string(),
        }
    } else {
        backend(e.to_string())
    }
}

#[cfg(test)]
mod test;
