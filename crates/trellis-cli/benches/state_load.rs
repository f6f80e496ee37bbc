//! State store load benchmark: Trellis over HTTP vs the raw engine, same run.
//!
//! For each backend (embedded, PostgreSQL, Redis) it starts the real `trellis`
//! binary, drives PUT and GET load over HTTP with a fixed number of concurrent
//! clients, then drives the same load straight at the engine Trellis uses (redb, an
//! sqlx upsert, redis SET/GET), and prints throughput, p50/p99 and the ratio
//! Trellis/raw. It also measures the time from `trellis up` to a 200 from `/readyz`
//! and the idle RSS.
//!
//! ```text
//! cargo bench -p trellis-cli --bench state_load
//! BENCH_SECONDS=10 BENCH_CONCURRENCY=64 BENCH_BACKENDS=embedded cargo bench -p trellis-cli --bench state_load
//! ```

use std::sync::Arc;
use std::time::Duration;

#[path = "support/load.rs"]
mod load;

use load::{Op, Outcome, Sidecar, op, start_sidecar};

const BIN: &str = env!("CARGO_BIN_EXE_trellis");
const VALUE_SIZE: usize = 256;
const KEYS_PER_WORKER: usize = 1000;

struct Settings {
    seconds: u64,
    concurrency: usize,
    backends: Vec<String>,
    postgres_url: String,
    redis_url: String,
}

impl Settings {
    fn from_env() -> Self {
        let var = load::knob;
        Self {
            seconds: load::number("BENCH_SECONDS", "5"),
            concurrency: load::number("BENCH_CONCURRENCY", "32"),
            backends: var("BENCH_BACKENDS", "embedded,postgres,redis")
                .split(',')
                .map(str::to_owned)
                .collect(),
            postgres_url: var(
                "TRELLIS_TEST_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/test",
            ),
            redis_url: var("TRELLIS_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
        }
    }
}

/// Writes every key once, so that GETs always hit.
async fn fill(settings: &Settings, put: &Op) {
    let mut workers = Vec::new();
    for w in 0..settings.concurrency {
        let put = Arc::clone(put);
        workers.push(tokio::spawn(async move {
            for i in 0..KEYS_PER_WORKER {
                assert!(put(w, i).await, "fill failed");
            }
        }));
    }
    for w in workers {
        w.await.expect("fill worker");
    }
}

/// Fills the keys, then measures PUT and GET.
async fn put_get(settings: &Settings, put: Op, get: Op) -> (Outcome, Outcome) {
    fill(settings, &put).await;
    (
        load::drive(settings.seconds, settings.concurrency, put).await,
        load::drive(settings.seconds, settings.concurrency, get).await,
    )
}

fn key(worker: usize, i: usize) -> String {
    format!("bench/{worker}/{}", i % KEYS_PER_WORKER)
}

fn value() -> Vec<u8> {
    vec![b'v'; VALUE_SIZE]
}

// === Trellis over HTTP ===

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn http_client(settings: &Settings) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(settings.concurrency)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

async fn http_put_get(settings: &Settings, sidecar: &Sidecar) -> (Outcome, Outcome) {
    let client = http_client(settings);
    let base = format!("{}/v1/state/default", sidecar.url);
    let put = {
        let (client, base) = (client.clone(), base.clone());
        op(move |w, i| {
            let request = client
                .put(format!("{base}/{}", key(w, i)))
                .body(value())
                .send();
            async move { request.await.is_ok_and(|r| r.status() == 204) }
        })
    };
    let get = op(move |w, i| {
        let request = client.get(format!("{base}/{}", key(w, i))).send();
        async move {
            match request.await {
                Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                _ => false,
            }
        }
    });
    put_get(settings, put, get).await
}

/// What the load generator and the HTTP stack reach with no backend work at all: the
/// ceiling of every HTTP column on this machine.
async fn http_floor(settings: &Settings, sidecar: &Sidecar) -> Outcome {
    let client = http_client(settings);
    let url = format!("{}/healthz", sidecar.url);
    load::drive(
        settings.seconds,
        settings.concurrency,
        op(move |_, _| {
            let request = client.get(&url).send();
            async move {
                match request.await {
                    Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                    _ => false,
                }
            }
        }),
    )
    .await
}

/// The same backend through the Rust API (`trellis-state`), without HTTP.
async fn api_put_get(settings: &Settings, component: &str) -> (Outcome, Outcome) {
    use trellis_state::{Key, Value, WriteOptions};
    let dir = tempfile::tempdir().expect("tempdir");
    let config = trellis_core::Config::from_sources(Some(component), []).expect("config");
    let store = trellis_state::open("default", &config.components.state["default"], dir.path())
        .await
        .expect("open store");
    let put = {
        let store = Arc::clone(&store);
        op(move |w, i| {
            let store = Arc::clone(&store);
            async move {
                let k = Key::new(key(w, i)).expect("key");
                store
                    .set(&k, Value::bytes(value()), WriteOptions::default())
                    .await
                    .is_ok()
            }
        })
    };
    let get = {
        let store = Arc::clone(&store);
        op(move |w, i| {
            let store = Arc::clone(&store);
            async move {
                let k = Key::new(key(w, i)).expect("key");
                store.get(&k).await.is_ok_and(|v| v.is_some())
            }
        })
    };
    let outcome = put_get(settings, put, get).await;
    store.close().await.expect("close");
    outcome
}

// === raw engines ===

async fn redb_put_get(settings: &Settings) -> (Outcome, Outcome) {
    use redb::{ReadableDatabase as _, TableDefinition};
    const T: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("bench");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Arc::new(redb::Database::create(dir.path().join("raw.redb")).expect("redb"));
    let put = {
        let db = Arc::clone(&db);
        op(move |w, i| {
            let db = Arc::clone(&db);
            async move {
                tokio::task::spawn_blocking(move || {
                    // One durable (fsynced) transaction per write: redb's default.
                    let txn = db.begin_write().expect("begin");
                    txn.open_table(T)
                        .expect("table")
                        .insert(key(w, i).as_str(), value().as_slice())
                        .expect("insert");
                    txn.commit().is_ok()
                })
                .await
                .unwrap_or(false)
            }
        })
    };
    let get = op(move |w, i| {
        let db = Arc::clone(&db);
        async move {
            tokio::task::spawn_blocking(move || {
                let txn = db.begin_read().expect("read");
                let table = txn.open_table(T).expect("table");
                table.get(key(w, i).as_str()).expect("get").is_some()
            })
            .await
            .unwrap_or(false)
        }
    });
    put_get(settings, put, get).await
}

async fn postgres_put_get(settings: &Settings) -> (Outcome, Outcome) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .connect(&settings.postgres_url)
        .await
        .expect("PostgreSQL");
    let table = format!("bench_raw_{}", std::process::id());
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (key TEXT COLLATE \"C\" PRIMARY KEY, value BYTEA NOT NULL, version BIGINT NOT NULL)"
    )))
    .execute(&pool)
    .await
    .expect("create table");
    let upsert: Arc<str> = format!(
        "INSERT INTO {table} (key, value, version) VALUES ($1, $2, 1) \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, version = {table}.version + 1"
    )
    .into();
    let select: Arc<str> = format!("SELECT value FROM {table} WHERE key = $1").into();
    let put = {
        let pool = pool.clone();
        op(move |w, i| {
            let (pool, sql) = (pool.clone(), Arc::clone(&upsert));
            async move {
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(key(w, i))
                    .bind(value())
                    .execute(&pool)
                    .await
                    .is_ok()
            }
        })
    };
    let get = {
        let pool = pool.clone();
        op(move |w, i| {
            let (pool, sql) = (pool.clone(), Arc::clone(&select));
            async move {
                sqlx::query_scalar::<_, Vec<u8>>(sqlx::AssertSqlSafe(sql))
                    .bind(key(w, i))
                    .fetch_optional(&pool)
                    .await
                    .is_ok_and(|v| v.is_some())
            }
        })
    };
    let outcome = put_get(settings, put, get).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(&pool)
        .await
        .expect("drop");
    outcome
}

async fn redis_put_get(settings: &Settings) -> (Outcome, Outcome) {
    let client = redis::Client::open(settings.redis_url.as_str()).expect("redis url");
    let conn = redis::aio::ConnectionManager::new(client)
        .await
        .expect("Redis");
    let prefix = format!("bench_raw_{}:", std::process::id());
    let put = {
        let (conn, prefix) = (conn.clone(), prefix.clone());
        op(move |w, i| {
            let mut conn = conn.clone();
            let k = format!("{prefix}{}", key(w, i));
            async move {
                redis::cmd("SET")
                    .arg(k)
                    .arg(value())
                    .query_async::<()>(&mut conn)
                    .await
                    .is_ok()
            }
        })
    };
    let get = {
        let prefix = prefix.clone();
        op(move |w, i| {
            let mut conn = conn.clone();
            let k = format!("{prefix}{}", key(w, i));
            async move {
                redis::cmd("GET")
                    .arg(k)
                    .query_async::<Option<Vec<u8>>>(&mut conn)
                    .await
                    .is_ok_and(|v| v.is_some())
            }
        })
    };
    put_get(settings, put, get).await
}

// === report ===

fn cells(o: &Outcome) -> String {
    format!("{:>7.0} | {:>5} | {:>6}", o.ops_per_sec, o.p50_us, o.p99_us)
}

fn row(backend: &str, op: &str, http: &Outcome, api: &Outcome, raw: &Outcome, raw_name: &str) {
    let errors = http.errors + api.errors + raw.errors;
    println!(
        "| {backend} | {op} | {} | {} | {raw_name} | {} | {:.2}x | {:.2}x |{}",
        cells(http),
        cells(api),
        cells(raw),
        http.ops_per_sec / raw.ops_per_sec,
        api.ops_per_sec / raw.ops_per_sec,
        if errors > 0 {
            format!(" errors: {}/{}/{}", http.errors, api.errors, raw.errors)
        } else {
            String::new()
        }
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let settings = Settings::from_env();
    println!(
        "state load: {} concurrent clients, {}s per scenario, {VALUE_SIZE}-byte values, {KEYS_PER_WORKER} keys per client (all written before measuring), {} cores shared by load generator, Trellis and engine\n",
        settings.concurrency,
        settings.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| backend | op | HTTP ops/s | p50 µs | p99 µs | Rust API ops/s | p50 µs | p99 µs | raw engine | raw ops/s | p50 µs | p99 µs | HTTP/raw | API/raw |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|");
    let mut startup = Vec::new();
    let mut floor = None;
    for backend in settings.backends.clone() {
        let unique = format!("{}_{}", backend, std::process::id());
        let (component, raw_name) = match backend.as_str() {
            "embedded" => (String::new(), "redb, 1 txn/write"),
            "postgres" => (
                format!(
                    "[components.state.default]\ntype = \"postgres\"\nurl = \"{}\"\nschema = \"bench_{unique}\"\n",
                    settings.postgres_url
                ),
                "sqlx upsert/select",
            ),
            "redis" => (
                format!(
                    "[components.state.default]\ntype = \"redis\"\nurl = \"{}\"\nkey_prefix = \"bench:{{{unique}}}:\"\n",
                    settings.redis_url
                ),
                "redis SET/GET",
            ),
            other => panic!("unknown backend {other:?}"),
        };
        let sidecar = start_sidecar(&component).await;
        let pid = sidecar.child.id().expect("pid");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle_rss = rss_kib(pid);
        startup.push((backend.clone(), sidecar.ready_after, idle_rss));
        if floor.is_none() {
            floor = Some(http_floor(&settings, &sidecar).await);
        }
        let (http_put, http_get) = http_put_get(&settings, &sidecar).await;
        eprintln!(
            "{backend}: sidecar RSS idle {idle_rss} KiB, after load {} KiB",
            rss_kib(pid)
        );
        drop(sidecar);
        let api_component =
            component.replace(&format!("bench_{unique}"), &format!("bench_api_{unique}"));
        let (api_put, api_get) = api_put_get(&settings, &api_component).await;
        let (raw_put, raw_get) = match backend.as_str() {
            "embedded" => redb_put_get(&settings).await,
            "postgres" => postgres_put_get(&settings).await,
            _ => redis_put_get(&settings).await,
        };
        row(&backend, "PUT", &http_put, &api_put, &raw_put, raw_name);
        row(&backend, "GET", &http_get, &api_get, &raw_get, raw_name);
    }
    if let Some(floor) = floor {
        println!(
            "\nHTTP floor (same load generator, `GET /healthz`, no backend): {:.0} ops/s, p50 {} µs, p99 {} µs",
            floor.ops_per_sec, floor.p50_us, floor.p99_us
        );
    }
    println!("\n| backend | `trellis up` → `/readyz` 200 | idle RSS |");
    println!("|---|---:|---:|");
    for (backend, ready, rss) in startup {
        println!(
            "| {backend} | {:.0} ms | {:.1} MiB |",
            ready.as_secs_f64() * 1e3,
            rss as f64 / 1024.0
        );
    }
}
