//! The saga log contract against PostgreSQL, plus what only a shared database
//! shows. Each test has a schema of its own.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use trellis_core::testing::{postgres_url, services_enabled, unique_name};
use trellis_saga::log::contract::Harness;
use trellis_saga::log::{
    Created, Filter, LogError, PostgresLog, PostgresLogConfig, Record, RecordKind, SagaLog, new_id,
    now_ms,
};

fn config() -> PostgresLogConfig {
    PostgresLogConfig {
        url: postgres_url(),
        schema: unique_name("t_saga"),
        ..PostgresLogConfig::default()
    }
}

async fn connect(config: &PostgresLogConfig) -> PostgresLog {
    PostgresLog::connect(config.clone())
        .await
        .expect("PostgreSQL at TRELLIS_TEST_POSTGRES_URL (default 127.0.0.1:5432) must be running")
}

struct Postgres {
    config: PostgresLogConfig,
}

#[async_trait]
impl Harness for Postgres {
    async fn open(&self) -> Arc<dyn SagaLog> {
        Arc::new(connect(&self.config).await)
    }
}

async fn harness() -> Option<Postgres> {
    services_enabled("PostgreSQL").then(|| Postgres { config: config() })
}

trellis_saga::saga_log_contract!(harness());

fn saga(owner: &str) -> Record {
    Record {
        kind: RecordKind::Saga,
        id: new_id(),
        version: 1,
        name: "order".into(),
        status: "running".into(),
        finished: false,
        owner: owner.into(),
        created_at_ms: now_ms(),
        updated_at_ms: now_ms(),
        body: serde_json::json!({ "owner": owner }),
    }
}

/// Two processes on one schema share records, idempotency keys and versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_share_one_schema() {
    if !services_enabled("PostgreSQL") {
        return;
    }
    let config = config();
    let (a, b) = tokio::join!(connect(&config), connect(&config));
    let r = saga("a");
    assert_eq!(
        a.create(&r, Some("shared-key")).await.expect("create"),
        Created::New
    );
    assert_eq!(
        b.create(&saga("b"), Some("shared-key"))
            .await
            .expect("create"),
        Created::Existing(Box::new(r.clone()))
    );
    let v2 = Record {
        version: 2,
        owner: "b".into(),
        ..r.clone()
    };
    b.update(&v2).await.expect("b takes over");
    let stale = Record {
        version: 2,
        status: "stale".into(),
        ..r.clone()
    };
    assert!(matches!(
        a.update(&stale).await,
        Err(LogError::Conflict { found: Some(2), .. })
    ));
    let mine = Filter {
        owner: Some("b".into()),
        unfinished: true,
        ..Filter::default()
    };
    assert_eq!(
        a.list(RecordKind::Saga, &mine).await.expect("list"),
        vec![v2]
    );
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// Logs connecting at once to a new schema create it once, without errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_connecting_together_migrate_once() {
    if !services_enabled("PostgreSQL") {
        return;
    }
    let config = config();
    let (a, b, c) = tokio::join!(
        PostgresLog::connect(config.clone()),
        PostgresLog::connect(config.clone()),
        PostgresLog::connect(config.clone()),
    );
    for log in [a, b, c] {
        let log = log.expect("connect");
        log.health().await.expect("health");
        log.close().await.expect("close");
    }
}

/// Text PostgreSQL refuses (NUL characters) is an error, not a panic, and writes
/// nothing.
#[tokio::test]
async fn refused_text_is_a_backend_error() {
    if !services_enabled("PostgreSQL") {
        return;
    }
    let log = connect(&config()).await;
    let mut r = saga("a");
    r.body = serde_json::json!({ "nul": "a\u{0}b" });
    let refused = log.create(&r, None).await;
    assert!(matches!(refused, Err(LogError::Backend(_))), "{refused:?}");
    r.body = serde_json::json!({});
    r.owner = "a\u{0}b".into();
    let refused = log.create(&r, None).await;
    assert!(matches!(refused, Err(LogError::Backend(_))), "{refused:?}");
    assert_eq!(log.get(RecordKind::Saga, &r.id).await.expect("get"), None);
    log.close().await.expect("close");
}

/// An unreachable database is `Unavailable`, within the connect timeout.
#[tokio::test]
async fn an_unreachable_database_is_unavailable() {
    let started = Instant::now();
    let refused = PostgresLog::connect(PostgresLogConfig {
        url: "postgres://postgres@127.0.0.1:1/test".into(),
        connect_timeout_ms: 1000,
        ..PostgresLogConfig::default()
    })
    .await;
    assert!(
        matches!(refused, Err(LogError::Unavailable(_))),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}
