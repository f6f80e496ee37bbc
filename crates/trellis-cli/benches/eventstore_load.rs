//! Event store load benchmark: Trellis vs the raw engines, same run.
//!
//! Every event is 256 bytes of JSON (`{"pad":"xxx…"}`), appended with
//! `ExpectedVersion::Any`; each writer appends to its own stream (`<scenario>-<writer>`),
//! so a single writer appends to one stream. Every append is acknowledged only once
//! durable (fsynced by redb, committed by PostgreSQL).
//!
//! 1. Appends, one event per call, 1 writer; 100 events per call, 1 writer; one
//!    event per call, `BENCH_CONCURRENCY` writers:
//!    - Trellis embedded (redb + group commit) through the Rust API, against raw redb
//!      with one durable write transaction per append (the event encoded as Trellis
//!      stores it, at the next position of one table);
//!    - Trellis PostgreSQL through the Rust API, against raw sqlx `INSERT`s of the
//!      same rows into one table (`BIGSERIAL` position, `UNIQUE (stream, version)`,
//!      unique `uuid` id), a multi-row `INSERT … SELECT FROM unnest(…)` for batches;
//!    - Trellis embedded through the sidecar's HTTP API (`trellis up`),
//!      `BENCH_CONCURRENCY` clients.
//! 2. Reads of everything written: `read_all` in pages of 1000 and a catch-up
//!    subscription on `$all` from the beginning, against a keyset scan of the raw
//!    table in pages of 1000.
//!
//! ```text
//! cargo bench -p trellis-cli --bench eventstore_load
//! BENCH_SECONDS=10 BENCH_CONCURRENCY=64 cargo bench -p trellis-cli --bench eventstore_load
//! ```

#[path = "support/load.rs"]
mod load;

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use load::{Op, Outcome, op, start_sidecar};
use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde_json::value::RawValue;
use tokio::time::Instant;
use trellis_eventstore::embedded::EmbeddedEventStore;
use trellis_eventstore::postgres::PostgresEventStore;
use trellis_eventstore::subscription::{Source, Start, subscribe};
use trellis_eventstore::{
    Append, Body, EventData, EventStore, ExpectedVersion, Metadata, RecordedEvent, StreamName,
};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_trellis");
const EVENT_DATA: usize = 256;
const EVENT_TYPE: &str = "BenchEvent";
const BATCH: usize = 100;
const PAGE: usize = 1000;

/// The raw redb peer's table: position → the event, encoded as Trellis stores it.
const RAW: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("events");

struct Settings {
    seconds: u64,
    concurrency: usize,
    postgres_url: String,
}

impl Settings {
    fn from_env() -> Self {
        let var = load::knob;
        Self {
            seconds: load::number("BENCH_SECONDS", "5"),
            concurrency: load::number("BENCH_CONCURRENCY", "16"),
            postgres_url: var(
                "TRELLIS_TEST_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/test",
            ),
        }
    }
}

/// 256 bytes of JSON: `{"pad":"xxx…"}`.
fn data() -> String {
    format!("{{\"pad\":\"{}\"}}", "x".repeat(EVENT_DATA - 10))
}

fn body() -> Arc<Box<RawValue>> {
    Arc::new(RawValue::from_string(data()).expect("json"))
}

fn event(body: &RawValue) -> EventData {
    EventData {
        id: Uuid::new_v4(),
        ty: EVENT_TYPE.to_owned(),
        data: Body::Json(body.to_owned()),
        metadata: Metadata::default(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One append load: `writers` writers, `batch` events per call.
#[derive(Clone, Copy)]
struct Load {
    name: &'static str,
    writers: usize,
    batch: usize,
}

fn loads(settings: &Settings) -> [Load; 3] {
    [
        Load {
            name: "single",
            writers: 1,
            batch: 1,
        },
        Load {
            name: "batch",
            writers: 1,
            batch: BATCH,
        },
        Load {
            name: "concurrent",
            writers: settings.concurrency,
            batch: 1,
        },
    ]
}

impl Load {
    fn label(&self) -> String {
        match (self.writers, self.batch) {
            (1, 1) => "1 writer, 1 event/append".to_owned(),
            (1, b) => format!("1 writer, {b} events/append"),
            (w, 1) => format!("{w} writers, 1 event/append"),
            (w, b) => format!("{w} writers, {b} events/append"),
        }
    }

    fn stream(&self, writer: usize) -> String {
        format!("{}-{writer}", self.name)
    }
}

/// Drives `op` (one append of `load.batch` events) and reports events, not appends.
async fn drive_events(settings: &Settings, load: Load, op: Op) -> Outcome {
    let mut outcome = load::drive(settings.seconds, load.writers, op).await;
    outcome.ops_per_sec *= load.batch as f64;
    outcome
}

// === Trellis, Rust API ===

fn trellis_append(store: &Arc<dyn EventStore>, load: Load) -> Op {
    let (store, body) = (Arc::clone(store), body());
    op(move |w, _| {
        let (store, body) = (Arc::clone(&store), Arc::clone(&body));
        let stream = StreamName::new(load.stream(w)).expect("stream name");
        async move {
            let events = (0..load.batch).map(|_| event(&body)).collect();
            store
                .append(vec![Append {
                    stream,
                    expected: ExpectedVersion::Any,
                    events,
                }])
                .await
                .is_ok()
        }
    })
}

// === Trellis, HTTP ===

/// `BENCH_CONCURRENCY` clients appending one event per request to the sidecar's
/// default (embedded) event store, each to its own stream.
async fn http_append(settings: &Settings) -> Outcome {
    let sidecar = start_sidecar("").await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(settings.concurrency)
        .build()
        .expect("client");
    let base = Arc::new(format!("{}/v1/streams", sidecar.url));
    let body = Bytes::from(format!(
        "{{\"expected_version\":\"any\",\"events\":[{{\"type\":\"{EVENT_TYPE}\",\"data\":{}}}]}}",
        data()
    ));
    load::drive(
        settings.seconds,
        settings.concurrency,
        op(move |w, _| {
            let request = client
                .post(format!("{base}/http-{w}"))
                .header("content-type", "application/json")
                .body(body.clone())
                .send();
            async move { matches!(request.await, Ok(r) if r.status() == 201) }
        }),
    )
    .await
}

// === raw redb ===

/// One durable (fsynced, redb's default) write transaction per append: the events,
/// encoded as Trellis encodes them, at the next positions of one table.
fn redb_append(db: &Arc<redb::Database>, load: Load) -> Op {
    let (db, body) = (Arc::clone(db), body());
    op(move |w, i| {
        let (db, body) = (Arc::clone(&db), Arc::clone(&body));
        let stream = StreamName::new(load.stream(w)).expect("stream name");
        async move {
            tokio::task::spawn_blocking(move || {
                let write = || -> Result<(), redb::Error> {
                    let txn = db.begin_write()?;
                    {
                        let mut table = txn.open_table(RAW)?;
                        let first = table.last()?.map_or(0, |(k, _)| k.value() + 1);
                        for j in 0..load.batch {
                            let e = event(&body);
                            let position = first + j as u64;
                            let recorded = RecordedEvent {
                                id: e.id,
                                stream: stream.clone(),
                                version: (i * load.batch + j) as u64,
                                position,
                                ty: e.ty,
                                data: e.data,
                                metadata: e.metadata,
                                timestamp_ms: now_ms(),
                            };
                            table.insert(position, recorded.encode().as_ref())?;
                        }
                    }
                    txn.commit()?;
                    Ok(())
                };
                write().is_ok()
            })
            .await
            .unwrap_or(false)
        }
    })
}

/// Keyset scan of the raw table in pages of [`PAGE`], decoding every event.
async fn redb_scan(db: &Arc<redb::Database>) -> (Outcome, u64) {
    scan(|from| {
        let db = Arc::clone(db);
        async move {
            tokio::task::spawn_blocking(move || {
                let txn = db.begin_read().expect("read");
                let table = txn.open_table(RAW).expect("table");
                let mut count = 0;
                let mut last = None;
                for entry in table.range(from..).expect("range").take(PAGE) {
                    let (k, v) = entry.expect("entry");
                    let e = RecordedEvent::decode(v.value()).expect("decode");
                    debug_assert_eq!(e.position, k.value());
                    last = Some(e.position);
                    count += 1;
                }
                (count, last.map(|p| p + 1))
            })
            .await
            .expect("scan")
        }
    })
    .await
}

// === raw PostgreSQL ===

struct RawPostgres {
    pool: sqlx::PgPool,
    insert: Arc<str>,
    insert_batch: Arc<str>,
    select: Arc<str>,
}

impl RawPostgres {
    async fn create(settings: &Settings, schema: &str) -> Self {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(settings.concurrency.max(1) as u32)
            .connect(&settings.postgres_url)
            .await
            .expect("PostgreSQL");
        let table = format!("\"{schema}\".raw_events");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {table} (\
             position BIGSERIAL PRIMARY KEY, \
             stream TEXT COLLATE \"C\" NOT NULL, \
             version BIGINT NOT NULL, \
             id UUID NOT NULL UNIQUE, \
             event_type TEXT NOT NULL, \
             data TEXT NOT NULL, \
             metadata TEXT, \
             timestamp_ms BIGINT NOT NULL \
               DEFAULT floor(extract(epoch from clock_timestamp()) * 1000)::bigint, \
             UNIQUE (stream, version))"
        )))
        .execute(&pool)
        .await
        .expect("create raw table");
        Self {
            pool,
            insert: format!(
                "INSERT INTO {table} (stream, version, id, event_type, data) \
                 VALUES ($1, $2, $3::uuid, $4, $5)"
            )
            .into(),
            insert_batch: format!(
                "INSERT INTO {table} (stream, version, id, event_type, data) \
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[]::uuid[], \
                 $4::text[], $5::text[])"
            )
            .into(),
            select: format!(
                "SELECT position, stream, version, id::text, event_type, data, metadata, \
                 timestamp_ms FROM {table} WHERE position >= $1 ORDER BY position LIMIT {PAGE}"
            )
            .into(),
        }
    }

    /// Autocommitted `INSERT`s: one commit (WAL flush) per append.
    fn append(&self, load: Load) -> Op {
        let (pool, insert, insert_batch) = (
            self.pool.clone(),
            Arc::clone(&self.insert),
            Arc::clone(&self.insert_batch),
        );
        let data: Arc<str> = data().into();
        op(move |w, i| {
            let pool = pool.clone();
            let stream = load.stream(w);
            let version = (i * load.batch) as i64;
            let (insert, insert_batch, data) = (
                Arc::clone(&insert),
                Arc::clone(&insert_batch),
                Arc::clone(&data),
            );
            async move {
                if load.batch == 1 {
                    sqlx::query(sqlx::AssertSqlSafe(insert))
                        .bind(stream)
                        .bind(version)
                        .bind(Uuid::new_v4().to_string())
                        .bind(EVENT_TYPE)
                        .bind(data.to_string())
                        .execute(&pool)
                        .await
                        .is_ok()
                } else {
                    let n = load.batch;
                    sqlx::query(sqlx::AssertSqlSafe(insert_batch))
                        .bind(vec![stream; n])
                        .bind((0..n as i64).map(|j| version + j).collect::<Vec<_>>())
                        .bind(
                            (0..n)
                                .map(|_| Uuid::new_v4().to_string())
                                .collect::<Vec<_>>(),
                        )
                        .bind(vec![EVENT_TYPE.to_owned(); n])
                        .bind(vec![data.to_string(); n])
                        .execute(&pool)
                        .await
                        .is_ok()
                }
            }
        })
    }

    /// Keyset scan in pages of [`PAGE`], decoding every row.
    async fn scan(&self) -> (Outcome, u64) {
        type Row = (
            i64,
            String,
            i64,
            String,
            String,
            String,
            Option<String>,
            i64,
        );
        scan(|from| {
            let (pool, select) = (self.pool.clone(), Arc::clone(&self.select));
            async move {
                let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(select))
                    .bind(from as i64)
                    .fetch_all(&pool)
                    .await
                    .expect("select");
                (rows.len(), rows.last().map(|r| r.0 as u64 + 1))
            }
        })
        .await
    }
}

// === reads ===

/// Reads pages until one is empty: events/s, and the latency of a page.
async fn scan<F, Fut>(mut page: F) -> (Outcome, u64)
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = (usize, Option<u64>)>,
{
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut from = 0;
    let mut total = 0u64;
    let started = Instant::now();
    loop {
        let t0 = Instant::now();
        let (count, next) = page(from).await;
        hist.record(t0.elapsed().as_micros().max(1) as u64)
            .expect("record");
        match next {
            Some(next) if count > 0 => {
                total += count as u64;
                from = next;
            }
            _ => break,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    (
        Outcome {
            ops_per_sec: total as f64 / elapsed,
            p50_us: hist.value_at_quantile(0.50),
            p99_us: hist.value_at_quantile(0.99),
            errors: 0,
        },
        total,
    )
}

async fn trellis_read_all(store: &Arc<dyn EventStore>) -> (Outcome, u64) {
    scan(|from| {
        let store = Arc::clone(store);
        async move {
            let events = store.read_all(from, PAGE).await.expect("read_all");
            (events.len(), events.last().map(|e| e.position + 1))
        }
    })
    .await
}

/// A catch-up subscription on `$all` from the beginning, consuming every event
/// stored when it starts; p50/p99 are the gaps between consecutive events.
async fn trellis_catch_up(store: &Arc<dyn EventStore>) -> (Outcome, u64) {
    let n = *store.head().borrow();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let started = Instant::now();
    let mut subscription = subscribe(Arc::clone(store), Source::All, Start::Beginning);
    let mut t0 = Instant::now();
    for _ in 0..n {
        subscription
            .next()
            .await
            .expect("an event")
            .expect("subscription");
        hist.record(t0.elapsed().as_micros().max(1) as u64)
            .expect("record");
        t0 = Instant::now();
    }
    let elapsed = started.elapsed().as_secs_f64();
    (
        Outcome {
            ops_per_sec: n as f64 / elapsed,
            p50_us: hist.value_at_quantile(0.50),
            p99_us: hist.value_at_quantile(0.99),
            errors: 0,
        },
        n,
    )
}

// === report ===

fn header(title: &str, unit: &str) {
    println!();
    println!("{title}");
    println!(
        "{:<56} {:>10} {:>9} {:>9} {:>6}",
        "scenario", unit, "p50 µs", "p99 µs", "errors"
    );
}

fn row(name: &str, o: &Outcome, peers: &[(&str, &Outcome)]) {
    let ratios: String = peers
        .iter()
        .map(|(peer, p)| format!("  {:.2}x {peer}", o.ops_per_sec / p.ops_per_sec))
        .collect();
    println!(
        "{name:<56} {:>10.0} {:>9} {:>9} {:>6}{ratios}",
        o.ops_per_sec, o.p50_us, o.p99_us, o.errors
    );
}

/// Raw, then Trellis, for each append load.
async fn appends(
    settings: &Settings,
    store: &Arc<dyn EventStore>,
    raw: impl Fn(Load) -> Op,
    raw_name: &str,
) -> Vec<(Outcome, Outcome)> {
    let mut outcomes = Vec::new();
    for load in loads(settings) {
        let r = drive_events(settings, load, raw(load)).await;
        row(&format!("{raw_name}, {}", load.label()), &r, &[]);
        let t = drive_events(settings, load, trellis_append(store, load)).await;
        row(&format!("Trellis, {}", load.label()), &t, &[("raw", &r)]);
        outcomes.push((r, t));
    }
    outcomes
}

async fn embedded(settings: &Settings) {
    header(
        "embedded (redb file on local disk, every append fsynced)",
        "events/s",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Arc::new(redb::Database::create(dir.path().join("raw.redb")).expect("redb"));
    let store: Arc<dyn EventStore> = Arc::new(
        EmbeddedEventStore::open(dir.path().join("events.redb"))
            .await
            .expect("open embedded"),
    );
    let outcomes = appends(
        settings,
        &store,
        |load| redb_append(&db, load),
        "raw redb, 1 txn/append",
    )
    .await;
    let http = http_append(settings).await;
    let (raw_concurrent, trellis_concurrent) = &outcomes[2];
    row(
        &format!(
            "Trellis HTTP (trellis up), {} clients, 1 event",
            settings.concurrency
        ),
        &http,
        &[("raw", raw_concurrent), ("Rust API", trellis_concurrent)],
    );

    header(
        "embedded reads (pages of 1000; catch-up: p50/p99 between events)",
        "events/s",
    );
    let (raw_scan, raw_n) = redb_scan(&db).await;
    row(
        &format!("raw redb scan + decode, {raw_n} events"),
        &raw_scan,
        &[],
    );
    let (read_all, n) = trellis_read_all(&store).await;
    row(
        &format!("Trellis read_all, {n} events"),
        &read_all,
        &[("raw", &raw_scan)],
    );
    let (catch_up, n) = trellis_catch_up(&store).await;
    row(
        &format!("Trellis catch-up subscription, {n} events"),
        &catch_up,
        &[("raw", &raw_scan)],
    );
    let _ = store.close().await;
}

async fn postgres(settings: &Settings) {
    let schema = trellis_core::testing::unique_name("bench_es");
    header(
        &format!(
            "PostgreSQL (local, fsync=on, synchronous_commit=on; schema {schema}), every append committed"
        ),
        "events/s",
    );
    let mut config = trellis_core::config::PostgresEventStore::new(settings.postgres_url.clone());
    config.schema = Some(schema.clone());
    config.pool_size = settings.concurrency.max(1) as u32;
    let store: Arc<dyn EventStore> = Arc::new(
        PostgresEventStore::connect("bench", &config)
            .await
            .expect("connect PostgreSQL event store"),
    );
    let raw = RawPostgres::create(settings, &schema).await;
    appends(
        settings,
        &store,
        |load| raw.append(load),
        "raw sqlx INSERT, autocommit",
    )
    .await;

    header(
        "PostgreSQL reads (pages of 1000; catch-up: p50/p99 between events)",
        "events/s",
    );
    let (raw_scan, raw_n) = raw.scan().await;
    row(
        &format!("raw sqlx SELECT page, {raw_n} events"),
        &raw_scan,
        &[],
    );
    let (read_all, n) = trellis_read_all(&store).await;
    row(
        &format!("Trellis read_all, {n} events"),
        &read_all,
        &[("raw", &raw_scan)],
    );
    let (catch_up, n) = trellis_catch_up(&store).await;
    row(
        &format!("Trellis catch-up subscription, {n} events"),
        &catch_up,
        &[("raw", &raw_scan)],
    );
    let _ = store.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(&raw.pool)
    .await
    .expect("drop schema");
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let settings = Settings::from_env();
    println!(
        "event store: 256-byte JSON events, ExpectedVersion::Any, each writer its own stream, \
         {}s per append scenario; events/s, latency per append (reads: per page)",
        settings.seconds
    );
    embedded(&settings).await;
    postgres(&settings).await;
    println!();
    println!("published reference points (not measured here, other hardware):");
    println!("  commanded (Elixir, PostgreSQL)   4.9k–8.6k events/s");
    println!("  dcb-event-store (PostgreSQL)     22k events/s single, 314k events/s batched");
}
