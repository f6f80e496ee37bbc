//! The event store on PostgreSQL: the contract, the no-skip guarantee under many
//! writers with randomly delayed commits, parallel appends to different streams, and
//! head notifications between processes. Each test has a schema of its own.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use serde_json::json;
use sqlx::Connection;
use trellis_core::config::PostgresEventStore as Config;
use trellis_core::testing::{postgres_url, services_enabled, unique_name};
use trellis_eventstore::contract::Harness;
use trellis_eventstore::postgres::{CommitDelays, PostgresEventStore};
use trellis_eventstore::subscription::{Source, Start, subscribe};
use trellis_eventstore::{Append, EventData, EventStore, ExpectedVersion, StreamName};

fn config() -> Config {
    let mut config = Config::new(postgres_url());
    config.schema = Some(unique_name("t_events"));
    config.pool_size = 24;
    config
}

async fn connect(config: &Config) -> PostgresEventStore {
    PostgresEventStore::connect("test", config)
        .await
        .expect("PostgreSQL at TRELLIS_TEST_POSTGRES_URL (default 127.0.0.1:5432) must be running")
}

struct Postgres {
    config: Config,
}

#[async_trait]
impl Harness for Postgres {
    async fn open(&self) -> Arc<dyn EventStore> {
        Arc::new(connect(&self.config).await)
    }
}

async fn harness() -> Option<Postgres> {
    services_enabled("PostgreSQL").then(|| Postgres { config: config() })
}

trellis_eventstore::event_store_contract!(harness());

fn append(stream: &str, events: usize) -> Append {
    Append {
        stream: StreamName::new(stream).expect("name"),
        expected: ExpectedVersion::Any,
        events: (0..events)
            .map(|i| EventData::json("Tick", &json!({ "i": i })))
            .collect(),
    }
}

/// The failure the backend is built to avoid, shown on a plain `BIGSERIAL` table: a
/// transaction takes a lower number, commits after one with a higher number, and a
/// reader that has moved past the higher one never sees the lower one.
#[tokio::test]
async fn a_bigserial_log_lets_a_reader_skip() {
    if !services_enabled("PostgreSQL") {
        return;
    }
    let url = postgres_url();
    let table = unique_name("t_serial");
    let mut setup = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (position BIGSERIAL PRIMARY KEY, body TEXT)"
    )))
    .execute(&mut setup)
    .await
    .expect("create");
    let insert = format!("INSERT INTO {table} (body) VALUES ('x') RETURNING position");
    let mut slow = sqlx::PgConnection::connect(&url).await.expect("connect");
    let mut fast = sqlx::PgConnection::connect(&url).await.expect("connect");
    let mut slow_tx = slow.begin().await.expect("begin");
    let low: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(insert.clone()))
        .fetch_one(&mut *slow_tx)
        .await
        .expect("insert");
    let high: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(insert))
        .fetch_one(&mut fast)
        .await
        .expect("insert");
    assert!(low < high);
    let read = format!("SELECT position FROM {table} WHERE position > $1 ORDER BY position");
    let seen: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(read.clone()))
        .bind(0_i64)
        .fetch_all(&mut setup)
        .await
        .expect("read");
    assert_eq!(seen, [high], "the reader sees the later number first");
    slow_tx.commit().await.expect("commit");
    let after: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(read))
        .bind(high)
        .fetch_all(&mut setup)
        .await
        .expect("read");
    assert!(
        after.is_empty(),
        "and, reading on from there, never finds {low}"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(&mut setup)
        .await
        .expect("drop");
}

/// Many writers to many streams with random delays inside their transactions, both
/// before taking positions (so appends overlap) and after (so commits are late),
/// while a `$all` subscriber and a polling reader follow: each sees every event
/// exactly once, in position order, with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_of_all_never_skips_under_delayed_commits() {
    if !services_enabled("PostgreSQL") {
        return;
    }
    const WRITERS: usize = 16;
    const APPENDS: usize = 25;
    let config = config();
    let store: Arc<dyn EventStore> =
        Arc::new(connect(&config).await.with_commit_delays(CommitDelays {
            before_position: Some(Duration::ZERO..Duration::from_millis(6)),
            after_position: Some(Duration::ZERO..Duration::from_millis(2)),
        }));

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut stored = 0u64;
                for a in 0..APPENDS {
                    let n = 1 + (w + a) % 3;
                    let mut batch = vec![append(&format!("w{w}-{}", a % 4), n)];
                    if a % 5 == 0 {
                        batch.push(append(&format!("shared-{}", a % 2), 1));
                    }
                    let appended = store.append(batch).await.expect("append");
                    stored += appended
                        .iter()
                        .map(|x| x.positions.end - x.positions.start)
                        .sum::<u64>();
                }
                stored
            })
        })
        .collect();

    // A live subscriber from the beginning.
    let sub_store = Arc::clone(&store);
    let subscriber = tokio::spawn(async move {
        let mut events = Box::pin(subscribe(sub_store, Source::All, Start::Beginning));
        let mut positions = Vec::new();
        while let Some(event) = events.next().await {
            let event = event.expect("subscription");
            positions.push(event.position);
            if positions.len() as u64 == total_expected() {
                break;
            }
        }
        positions
    });
    // A reader that polls from just past the last position it saw.
    let poll_store = Arc::clone(&store);
    let poller = tokio::spawn(async move {
        let mut next = 0u64;
        let mut seen = Vec::new();
        while next < total_expected() {
            let page = poll_store.read_all(next, 50).await.expect("read");
            for event in page {
                assert_eq!(event.position, next, "a gap: {next} was never seen");
                seen.push(event.position);
                next += 1;
            }
            tokio::task::yield_now().await;
        }
        seen
    });

    let mut total = 0;
    for writer in writers {
        total += writer.await.expect("writer");
    }
    assert_eq!(total, total_expected());
    let within = Duration::from_secs(120);
    let positions = tokio::time::timeout(within, subscriber)
        .await
        .expect("the subscriber sees every event")
        .expect("subscriber");
    let polled = tokio::time::timeout(within, poller)
        .await
        .expect("the poller sees every event")
        .expect("poller");
    let expected: Vec<u64> = (0..total).collect();
    assert_eq!(positions, expected, "subscriber: each once, in order");
    assert_eq!(polled, expected, "poller: each once, in order");
    store.close().await.expect("close");

    fn total_expected() -> u64 {
        let mut total = 0;
        for w in 0..WRITERS {
            for a in 0..APPENDS {
                total += (1 + (w + a) % 3) as u64 + u64::from(a % 5 == 0);
            }
        }
        total
    }
}

/// While one stream's row is locked (an append to it in progress), appends to other
/// streams complete; the one to the locked stream waits for it.
#[tokio::test]
async fn appends_to_different_streams_do_not_wait_for_each_other() {
    if !services_enabled("PostgreSQL") {
        return;
    }
    let config = config();
    let store = Arc::new(connect(&config).await);
    store
        .append(vec![append("busy-1", 1)])
        .await
        .expect("append");

    let schema = config.schema.clone().expect("schema");
    let mut locker = sqlx::PgConnection::connect(&postgres_url())
        .await
        .expect("connect");
    let mut tx = locker.begin().await.expect("begin");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT 1 FROM \"{schema}\".streams WHERE name = 'busy-1' FOR UPDATE"
    )))
    .execute(&mut *tx)
    .await
    .expect("lock");

    let blocked = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.append(vec![append("busy-1", 1)]).await })
    };
    for i in 0..5 {
        tokio::time::timeout(
            Duration::from_secs(30),
            store.append(vec![append(&format!("free-{i}"), 2)]),
        )
        .await
        .expect("an append to another stream does not wait for the lock")
        .expect("append");
    }
    assert!(!blocked.is_finished(), "the locked stream's append waits");
    tx.commit().await.expect("release");
    let appended = blocked.await.expect("task").expect("append");
    assert_eq!(appended[0].version, Some(1));
    assert_eq!(appended[0].positions, 11..12, "after the others");
    store.close().await.expect("close");
}

/// A second process on the same schema learns of the first one's appends through
/// `LISTEN`/`NOTIFY`, so its subscribers go live without polling.
#[tokio::test]
async fn head_moves_with_another_process_appends() {
    if !services_enabled("PostgreSQL") {
        return;
    }
    let config = config();
    let writer = connect(&config).await;
    let reader: Arc<dyn EventStore> = Arc::new(connect(&config).await);
    let mut head = reader.head();
    assert_eq!(*head.borrow_and_update(), 0);
    let mut live = Box::pin(subscribe(Arc::clone(&reader), Source::All, Start::End));

    writer
        .append(vec![append("other-1", 3)])
        .await
        .expect("append");
    tokio::time::timeout(Duration::from_secs(30), async {
        while *head.borrow_and_update() < 3 {
            head.changed().await.expect("head");
        }
    })
    .await
    .expect("the notification arrives");
    let mut got = HashSet::new();
    for _ in 0..3 {
        let event = tokio::time::timeout(Duration::from_secs(30), live.next())
            .await
            .expect("live event")
            .expect("open")
            .expect("event");
        got.insert(event.position);
    }
    assert_eq!(got, HashSet::from([0, 1, 2]));
    writer.close().await.expect("close");
    reader.close().await.expect("close");
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let mut config = Config::new("postgres://postgres@127.0.0.1:1/test");
    config.connect_timeout = Duration::from_millis(500);
    let err = PostgresEventStore::connect("x", &config)
        .await
        .expect_err("nothing listens on port 1");
    assert!(
        matches!(err, trellis_eventstore::EventStoreError::Unavailable { .. }),
        "{err:?}"
    );
}
