//! The coordination contract against PostgreSQL, plus what only a shared database
//! shows: processes waking each other through `NOTIFY`, and wake-ups surviving a
//! lost `LISTEN` connection. Each test has a schema of its own.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Connection;
use tokio::time::{Instant, timeout};
use trellis_coord::contract::{Harness, PATIENCE};
use trellis_coord::postgres::{PostgresConfig, PostgresCoordinator};
use trellis_coord::{CoordError, Coordinator, Name};
use trellis_core::testing::{postgres_url, services_enabled, unique_name};

const LONG: Duration = Duration::from_secs(120);

fn config() -> PostgresConfig {
    PostgresConfig {
        url: postgres_url(),
        schema: unique_name("t_coord"),
        ..PostgresConfig::default()
    }
}

async fn connect(config: &PostgresConfig) -> PostgresCoordinator {
    PostgresCoordinator::connect(config.clone())
        .await
        .expect("PostgreSQL at TRELLIS_TEST_POSTGRES_URL (default 127.0.0.1:5432) must be running")
}

struct Postgres {
    config: PostgresConfig,
}

#[async_trait]
impl Harness for Postgres {
    async fn open(&self) -> Arc<dyn Coordinator> {
        Arc::new(connect(&self.config).await)
    }
}

async fn harness() -> Option<Postgres> {
    services_enabled("PostgreSQL").then(|| Postgres { config: config() })
}

trellis_coord::coord_contract!(harness());

fn name(s: &str) -> Name {
    Name::new(s).expect("valid name")
}

/// Two processes sharing a schema: a call blocked in one wakes when the other
/// releases, and an observer in one sees the other's terms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_wake_each_other() {
    if !services_enabled("PostgreSQL") {
        return;
    }
    let config = config();
    let (a, b) = (
        Arc::new(connect(&config).await),
        Arc::new(connect(&config).await),
    );
    let n = name("shared");
    let held = a
        .acquire(&n, "a", LONG, Duration::ZERO)
        .await
        .expect("a acquires");
    let waiter = {
        let (b, n) = (Arc::clone(&b), n.clone());
        tokio::spawn(async move { b.acquire(&n, "b", LONG, PATIENCE).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "b waits while a holds the lock");
    a.release(&n, "a", held.fencing_token)
        .await
        .expect("release");
    let got = waiter.await.expect("waiter").expect("b wakes");
    assert!(got.fencing_token > held.fencing_token);
    assert!(
        Instant::now() < held.expires_at,
        "b waited for a's lease to run out"
    );

    let mut observed = b.observe(&n).await.expect("observe");
    let term = a
        .campaign(&n, "a", LONG, Duration::ZERO)
        .await
        .expect("a elected");
    let seen = timeout(
        PATIENCE,
        observed.wait_for(|l| l.as_ref().is_some_and(|l| l.candidate == "a")),
    )
    .await
    .expect("b's observer sees a's term")
    .expect("open")
    .clone();
    assert_eq!(seen.map(|l| l.fencing_token), Some(term.fencing_token));
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// A release while the listening connection is down still wakes a blocked call
/// promptly: the listener comes back and everybody reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listen_connection_loses_no_wake_up() {
    if !services_enabled("PostgreSQL") {
        return;
    }
    let config = config();
    let c = Arc::new(connect(&config).await);
    let n = name("relisten");
    let held = c
        .acquire(&n, "a", LONG, Duration::ZERO)
        .await
        .expect("a acquires");
    let waiter = {
        let (c, n) = (Arc::clone(&c), n.clone());
        tokio::spawn(async move { c.acquire(&n, "b", LONG, PATIENCE).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut admin = sqlx::PgConnection::connect(&config.url)
        .await
        .expect("connect");
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query = $1) AS t",
    )
    .bind(format!("LISTEN \"{}\"", config.schema))
    .fetch_one(&mut admin)
    .await
    .expect("terminate the listener");
    assert_eq!(killed, 1, "one listening connection");
    let released = Instant::now();
    c.release(&n, "a", held.fencing_token)
        .await
        .expect("release");
    let got = timeout(PATIENCE, waiter)
        .await
        .expect("b wakes")
        .expect("waiter")
        .expect("b acquires");
    assert!(got.fencing_token > held.fencing_token);
    assert!(
        released.elapsed() < Duration::from_secs(5),
        "b woke only after {:?}",
        released.elapsed()
    );
    c.close().await.expect("close");
}

/// An unreachable database is `Unavailable`, within the connect timeout.
#[tokio::test]
async fn an_unreachable_database_is_unavailable() {
    let started = Instant::now();
    let refused = PostgresCoordinator::connect(PostgresConfig {
        url: "postgres://postgres@127.0.0.1:1/test".into(),
        connect_timeout_ms: 1000,
        ..PostgresConfig::default()
    })
    .await;
    assert!(
        matches!(refused, Err(CoordError::Unavailable { .. })),
        "{refused:?}"
    );
    assert!(started.elapsed() < PATIENCE);
}
