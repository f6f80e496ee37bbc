//! Coordination benchmark: failover after `kill -9`, and lock throughput, Trellis vs
//! the raw engines, same run.
//!
//! 1. **Failover** (etcd, PostgreSQL): two `trellis up` sidecars share the backend.
//!    Candidate `a` is elected through sidecar A with lease TTL `T` and kept alive;
//!    `b` blocks in a campaign through sidecar B. Right after one of `a`'s
//!    keep-alives is acknowledged — the worst moment, a whole TTL left — sidecar A
//!    gets SIGKILL; the figure is the time from the kill to B answering `b`'s
//!    campaign with 200. Every TTL of `BENCH_TTLS`, `BENCH_REPEATS` times (a fresh
//!    sidecar A and election name each time).
//! 2. **Locks**: acquire then release in a closed loop, through the Rust API
//!    (`trellis_coord::Coordinator`, no HTTP), 1 worker; `BENCH_CONCURRENCY` workers
//!    on distinct names; `BENCH_CONCURRENCY` workers on one name (waiting up to
//!    30 s). Peers in the same run, on the same engines:
//!    - etcd: a lease grant, a transaction "holder key absent → put it on the lease
//!      (and a fence key)", a delete and a lease revoke; and etcd's own `Lock` /
//!      `Unlock` service on a granted lease (grant, lock, unlock, revoke). On a busy
//!      name the transaction peer retries every 2 ms; `Lock` queues on the server.
//!    - PostgreSQL: an `INSERT … ON CONFLICT DO UPDATE … WHERE free RETURNING token`
//!      upsert and a guarded `UPDATE` to release, on a plain table (each statement
//!      its own commit, like Trellis's), retrying every 2 ms on a busy name; the
//!      same with a `pg_notify` in the release's transaction (Trellis's release
//!      notifies, to wake waiters); and `pg_advisory_lock` / `pg_advisory_unlock`
//!      (in memory: no token, no commit).
//!    - embedded: an in-process mutex per name plus one durable (fsynced) redb write
//!      transaction bumping the name's token per acquire — Trellis's promise without
//!      its group commit.
//!
//! ```text
//! cargo bench -p trellis-cli --bench coord_load
//! BENCH_SECONDS=10 BENCH_TTLS=2,5,10 BENCH_REPEATS=10 cargo bench -p trellis-cli --bench coord_load
//! BENCH_BACKENDS=postgres BENCH_PARTS=locks cargo bench -p trellis-cli --bench coord_load
//! ```
//!
//! etcd is started on free loopback ports (`trellis_core::testing::Etcd`, or
//! `TRELLIS_TEST_ETCD_URL`); PostgreSQL is `TRELLIS_TEST_POSTGRES_URL`.

#[path = "support/load.rs"]
mod load;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, LockOptions, PutOptions, Txn, TxnOp};
use load::{Op, Outcome, op, start_sidecar};
use redb::{ReadableTable as _, TableDefinition};
use serde_json::{Value, json};
use tokio::time::Instant;
use trellis_coord::embedded::EmbeddedCoordinator;
use trellis_coord::etcd::{EtcdConfig, EtcdCoordinator};
use trellis_coord::postgres::{PostgresConfig, PostgresCoordinator};
use trellis_coord::{Coordinator, Name};
use trellis_core::testing::{Etcd, unique_name};

const BIN: &str = env!("CARGO_BIN_EXE_trellis");
/// The lease of every lock in the throughput runs (never reached: each is released).
const LOCK_TTL: Duration = Duration::from_secs(10);
/// How long a worker waits for a busy name.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// How often the polling peers retry a busy name.
const POLL: Duration = Duration::from_millis(2);
/// Keep-alives by the leader before its sidecar is killed.
const KEEP_ALIVES: u32 = 2;

/// The raw redb peer's table: name → newest token.
const RAW_TOKENS: TableDefinition<'_, &str, u64> = TableDefinition::new("tokens");

struct Settings {
    seconds: u64,
    concurrency: usize,
    ttls: Vec<u64>,
    repeats: usize,
    backends: Vec<String>,
    parts: Vec<String>,
    postgres_url: String,
}

impl Settings {
    fn from_env() -> Self {
        let var = load::knob;
        let list = |name: &str, default: &str| -> Vec<String> {
            var(name, default)
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        Self {
            seconds: load::number("BENCH_SECONDS", "3"),
            concurrency: load::number("BENCH_CONCURRENCY", "16"),
            ttls: list("BENCH_TTLS", "2,5")
                .iter()
                .map(|t| t.parse().expect("BENCH_TTLS: whole seconds"))
                .collect(),
            repeats: load::number("BENCH_REPEATS", "3"),
            backends: list("BENCH_BACKENDS", "embedded,etcd,postgres"),
            parts: list("BENCH_PARTS", "failover,locks"),
            postgres_url: var(
                "TRELLIS_TEST_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/test",
            ),
        }
    }

    fn runs(&self, backend: &str, part: &str) -> bool {
        self.backends.iter().any(|b| b == backend) && self.parts.iter().any(|p| p == part)
    }
}

// === failover ===

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    match client.post(url).json(&body).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(Value::Null))
        }
        Err(e) => (0, json!({ "error": e.to_string() })),
    }
}

fn ttl_text(ttl: Duration) -> String {
    format!("{}ms", ttl.as_millis())
}

/// One failover: `a` leads through a fresh sidecar A, `b` waits through `survivor`;
/// A is killed right after a keep-alive. Returns kill → `b` elected.
async fn one_failover(
    client: &reqwest::Client,
    config: &str,
    survivor: &str,
    election: &str,
    ttl: Duration,
) -> Duration {
    let mut a = start_sidecar(config).await;
    let base = format!("{}/v1/elections/{election}", a.url);
    let (status, led) = post(
        client,
        format!("{base}/campaign"),
        json!({"candidate": "a", "ttl": ttl_text(ttl), "wait": "10s"}),
    )
    .await;
    assert_eq!(status, 200, "a's campaign: {led}");
    let token = led["fencing_token"].as_u64().expect("token");

    let waiting = {
        let (client, url) = (
            client.clone(),
            format!("{survivor}/v1/elections/{election}/campaign"),
        );
        let body = json!({"candidate": "b", "ttl": ttl_text(ttl), "wait": "60s"});
        tokio::spawn(async move {
            let answer = post(&client, url, body).await;
            (answer, Instant::now())
        })
    };
    let interval = (ttl / 4).min(Duration::from_millis(500));
    for _ in 0..KEEP_ALIVES {
        tokio::time::sleep(interval).await;
        let (status, kept) = post(
            client,
            format!("{base}/keep-alive"),
            json!({"candidate": "a", "fencing_token": token, "ttl": ttl_text(ttl)}),
        )
        .await;
        assert_eq!(status, 200, "a's keep-alive: {kept}");
    }
    assert!(!waiting.is_finished(), "b was elected while a kept alive");
    a.child.start_kill().expect("SIGKILL");
    let killed = Instant::now();
    a.child.wait().await.expect("reap");
    let ((status, elected), at) = waiting.await.expect("campaign task");
    assert_eq!(status, 200, "b's campaign: {elected}");
    assert_eq!(elected["leader"], "b", "{elected}");
    let new_token = elected["fencing_token"].as_u64().expect("token");
    assert!(new_token > token, "fencing token {new_token} after {token}");
    // Leave nothing held behind.
    let (status, resigned) = post(
        client,
        format!("{survivor}/v1/elections/{election}/resign"),
        json!({"candidate": "b", "fencing_token": new_token}),
    )
    .await;
    if status / 100 != 2 {
        eprintln!("b's resign: {status} {resigned}");
    }
    at.saturating_duration_since(killed)
}

struct Failover {
    backend: &'static str,
    ttl: Duration,
    samples: Vec<Duration>,
}

impl Failover {
    fn sorted(&self) -> Vec<Duration> {
        let mut s = self.samples.clone();
        s.sort();
        s
    }

    fn median(&self) -> Duration {
        let s = self.sorted();
        if s.is_empty() {
            return Duration::ZERO;
        }
        if s.len() % 2 == 1 {
            s[s.len() / 2]
        } else {
            (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2
        }
    }
}

async fn failovers(settings: &Settings, backend: &'static str, config: &str) -> Vec<Failover> {
    let client = http();
    let survivor = start_sidecar(config).await;
    let mut results = Vec::new();
    for &secs in &settings.ttls {
        let ttl = Duration::from_secs(secs);
        let mut samples = Vec::new();
        for rep in 0..settings.repeats {
            let election = format!("failover-{secs}s-{rep}");
            let took = one_failover(&client, config, &survivor.url, &election, ttl).await;
            eprintln!("  {backend}, ttl {secs}s, run {}: {took:.3?}", rep + 1);
            samples.push(took);
        }
        results.push(Failover {
            backend,
            ttl,
            samples,
        });
    }
    results
}

fn print_failovers(results: &[Failover]) {
    println!();
    println!(
        "failover: kill -9 of the leader's sidecar right after a keep-alive → the waiting \
         candidate elected through the other sidecar"
    );
    println!(
        "{:<12} {:>6} {:>4} {:>9} {:>9} {:>9} {:>13} {:>15}",
        "backend", "ttl", "runs", "min s", "median s", "max s", "median/ttl", "median - ttl"
    );
    for f in results {
        let s = f.sorted();
        let (min, max) = (
            s.first().copied().unwrap_or_default(),
            s.last().copied().unwrap_or_default(),
        );
        let median = f.median();
        let over = median.as_secs_f64() - f.ttl.as_secs_f64();
        println!(
            "{:<12} {:>5}s {:>4} {:>9.3} {:>9.3} {:>9.3} {:>12.2}x {:>13.0} ms",
            f.backend,
            f.ttl.as_secs(),
            s.len(),
            min.as_secs_f64(),
            median.as_secs_f64(),
            max.as_secs_f64(),
            median.as_secs_f64() / f.ttl.as_secs_f64(),
            over * 1000.0,
        );
    }
}

// === lock throughput ===

/// One lock load: `workers` workers, each on its own name or all on one.
#[derive(Clone, Copy)]
struct LockLoad {
    workers: usize,
    contended: bool,
}

fn loads(settings: &Settings) -> [LockLoad; 3] {
    [
        LockLoad {
            workers: 1,
            contended: false,
        },
        LockLoad {
            workers: settings.concurrency,
            contended: false,
        },
        LockLoad {
            workers: settings.concurrency,
            contended: true,
        },
    ]
}

impl LockLoad {
    fn label(&self) -> String {
        match (self.workers, self.contended) {
            (1, _) => "1 worker".to_owned(),
            (w, false) => format!("{w} workers, distinct names"),
            (w, true) => format!("{w} workers, one name"),
        }
    }

    fn name(&self, worker: usize) -> String {
        if self.contended {
            "hot".to_owned()
        } else {
            format!("w{worker}")
        }
    }

    fn names(&self) -> Arc<Vec<String>> {
        Arc::new((0..self.workers).map(|w| self.name(w)).collect())
    }
}

/// Runs `op` under `load`; with one name, also how evenly the workers got it
/// (fewest / most acquisitions of one worker).
async fn measure(settings: &Settings, load: LockLoad, op: Op) -> (Outcome, Option<f64>) {
    let counts: Arc<Vec<AtomicU64>> =
        Arc::new((0..load.workers).map(|_| AtomicU64::new(0)).collect());
    let counted = {
        let counts = Arc::clone(&counts);
        load::op(move |w, i| {
            let (run, counts) = (op(w, i), Arc::clone(&counts));
            async move {
                let ok = run.await;
                if ok {
                    counts[w].fetch_add(1, Ordering::Relaxed);
                }
                ok
            }
        })
    };
    let outcome = load::drive(settings.seconds, load.workers, counted).await;
    let fairness = load.contended.then(|| {
        let per: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let (min, max) = (
            per.iter().copied().min().unwrap_or(0),
            per.iter().copied().max().unwrap_or(0),
        );
        if max == 0 {
            0.0
        } else {
            min as f64 / max as f64
        }
    });
    (outcome, fairness)
}

fn lock_header(title: &str) {
    println!();
    println!("{title}");
    println!(
        "{:<64} {:>9} {:>9} {:>9} {:>6} {:>8}",
        "scenario", "ops/s", "p50 µs", "p99 µs", "errors", "min/max"
    );
}

fn lock_row(name: &str, (o, fairness): &(Outcome, Option<f64>), peers: &[(&str, &Outcome)]) {
    let ratios: String = peers
        .iter()
        .map(|(peer, p)| format!("  {:.2}x {peer}", o.ops_per_sec / p.ops_per_sec))
        .collect();
    let fairness = fairness.map_or_else(|| "-".to_owned(), |f| format!("{f:.2}"));
    println!(
        "{name:<64} {:>9.0} {:>9} {:>9} {:>6} {fairness:>8}{ratios}",
        o.ops_per_sec, o.p50_us, o.p99_us, o.errors
    );
}

/// Trellis: `acquire` (waiting up to [`LOCK_WAIT`]) then `release`, owner `w<worker>`.
fn trellis_lock(coord: &Arc<dyn Coordinator>, load: LockLoad) -> Op {
    let coord = Arc::clone(coord);
    let names: Arc<Vec<Name>> = Arc::new(
        (0..load.workers)
            .map(|w| Name::new(load.name(w)).expect("name"))
            .collect(),
    );
    op(move |w, _| {
        let (coord, names) = (Arc::clone(&coord), Arc::clone(&names));
        async move {
            let name = &names[w];
            let owner = format!("w{w}");
            match coord.acquire(name, &owner, LOCK_TTL, LOCK_WAIT).await {
                Ok(lease) => coord
                    .release(name, &owner, lease.fencing_token)
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        }
    })
}

/// Each peer, then Trellis, for each load; the ratios are Trellis over each peer.
async fn lock_loads(
    settings: &Settings,
    coord: &Arc<dyn Coordinator>,
    peers: &[(&str, &dyn Fn(LockLoad) -> Op)],
) {
    for load in loads(settings) {
        let mut outcomes = Vec::new();
        for (peer, make) in peers {
            let o = measure(settings, load, make(load)).await;
            lock_row(&format!("{peer}, {}", load.label()), &o, &[]);
            outcomes.push((*peer, o.0));
        }
        let t = measure(settings, load, trellis_lock(coord, load)).await;
        let refs: Vec<(&str, &Outcome)> = outcomes.iter().map(|(p, o)| (*p, o)).collect();
        lock_row(&format!("Trellis, {}", load.label()), &t, &refs);
    }
}

// --- embedded ---

/// In-process mutex per name, plus a durable redb transaction bumping the name's
/// token per acquire; release drops the mutex guard.
fn redb_lock(db: &Arc<redb::Database>, load: LockLoad) -> Op {
    let db = Arc::clone(db);
    let names = load.names();
    let mutexes: Arc<Vec<Arc<tokio::sync::Mutex<()>>>> = {
        let hot = Arc::new(tokio::sync::Mutex::new(()));
        Arc::new(
            (0..load.workers)
                .map(|_| {
                    if load.contended {
                        Arc::clone(&hot)
                    } else {
                        Arc::new(tokio::sync::Mutex::new(()))
                    }
                })
                .collect(),
        )
    };
    op(move |w, _| {
        let (db, names, mutexes) = (Arc::clone(&db), Arc::clone(&names), Arc::clone(&mutexes));
        async move {
            let mutex = Arc::clone(&mutexes[w]);
            let _held = mutex.lock().await;
            tokio::task::spawn_blocking(move || {
                let bump = || -> Result<u64, redb::Error> {
                    let txn = db.begin_write()?;
                    let token = {
                        let mut table = txn.open_table(RAW_TOKENS)?;
                        let name = names[w].as_str();
                        let token = table.get(name)?.map_or(0, |v| v.value()) + 1;
                        table.insert(name, token)?;
                        token
                    };
                    txn.commit()?;
                    Ok(token)
                };
                bump().is_ok()
            })
            .await
            .unwrap_or(false)
        }
    })
}

async fn embedded(settings: &Settings) {
    lock_header("embedded (leases in memory, tokens fsynced to redb on local disk)");
    let dir = tempfile::tempdir().expect("tempdir");
    let coord: Arc<dyn Coordinator> = Arc::new(
        EmbeddedCoordinator::open(dir.path().join("coord.redb"))
            .await
            .expect("open embedded coordinator"),
    );
    let db = Arc::new(redb::Database::create(dir.path().join("raw.redb")).expect("redb"));
    let raw = |load: LockLoad| redb_lock(&db, load);
    lock_loads(
        settings,
        &coord,
        &[("raw mutex + fsynced redb token", &raw)],
    )
    .await;
    let _ = coord.close().await;
}

// --- etcd ---

/// Grant, put-if-absent (holder on the lease, plus a fence key), delete, revoke;
/// a busy name is retried every [`POLL`].
fn etcd_txn_lock(client: &etcd_client::Client, prefix: &str, load: LockLoad) -> Op {
    let client = client.clone();
    let keys: Arc<Vec<(String, String)>> = Arc::new(
        (0..load.workers)
            .map(|w| {
                let name = load.name(w);
                (
                    format!("{prefix}txn/{name}/holder"),
                    format!("{prefix}txn/{name}/fence"),
                )
            })
            .collect(),
    );
    op(move |w, _| {
        let (mut client, keys) = (client.clone(), Arc::clone(&keys));
        async move {
            let (holder, fence) = &keys[w];
            let owner = format!("w{w}");
            let run = async {
                let lease = client
                    .lease_grant(LOCK_TTL.as_secs() as i64, None)
                    .await?
                    .id();
                let deadline = Instant::now() + LOCK_WAIT;
                loop {
                    let txn = Txn::new()
                        .when([Compare::create_revision(
                            holder.as_str(),
                            CompareOp::Equal,
                            0,
                        )])
                        .and_then([
                            TxnOp::put(
                                holder.as_str(),
                                owner.as_str(),
                                Some(PutOptions::new().with_lease(lease)),
                            ),
                            TxnOp::put(fence.as_str(), owner.as_str(), None),
                        ]);
                    if client.txn(txn).await?.succeeded() {
                        break;
                    }
                    if Instant::now() >= deadline {
                        client.lease_revoke(lease).await?;
                        return Ok(false);
                    }
                    tokio::time::sleep(POLL).await;
                }
                client.delete(holder.as_str(), None).await?;
                client.lease_revoke(lease).await?;
                Ok::<_, etcd_client::Error>(true)
            };
            run.await.unwrap_or(false)
        }
    })
}

/// etcd's lock service: grant, `Lock` on the lease (queues on a busy name),
/// `Unlock`, revoke.
fn etcd_lock_api(client: &etcd_client::Client, prefix: &str, load: LockLoad) -> Op {
    let client = client.clone();
    let names: Arc<Vec<String>> = Arc::new(
        (0..load.workers)
            .map(|w| format!("{prefix}lock/{}", load.name(w)))
            .collect(),
    );
    op(move |w, _| {
        let (mut client, names) = (client.clone(), Arc::clone(&names));
        async move {
            let run = async {
                let lease = client
                    .lease_grant(LOCK_TTL.as_secs() as i64, None)
                    .await?
                    .id();
                let locked = client
                    .lock(
                        names[w].as_str(),
                        Some(LockOptions::new().with_lease(lease)),
                    )
                    .await?;
                client.unlock(locked.key()).await?;
                client.lease_revoke(lease).await?;
                Ok::<_, etcd_client::Error>(true)
            };
            run.await.unwrap_or(false)
        }
    })
}

async fn etcd_locks(settings: &Settings, etcd: &Etcd) {
    lock_header(&format!(
        "etcd 3.4 (one member on loopback, data dir on local disk; {})",
        etcd.url()
    ));
    let prefix = format!("{}/", unique_name("bench_coord"));
    let coord: Arc<dyn Coordinator> = Arc::new(
        EtcdCoordinator::connect(EtcdConfig {
            endpoints: vec![etcd.url().to_owned()],
            prefix: format!("{prefix}trellis/"),
            ..EtcdConfig::default()
        })
        .await
        .expect("connect etcd coordinator"),
    );
    let client = etcd_client::Client::connect([etcd.url()], None)
        .await
        .expect("connect etcd");
    let raw_prefix = format!("{prefix}raw/");
    let txn = |load: LockLoad| etcd_txn_lock(&client, &raw_prefix, load);
    let lock = |load: LockLoad| etcd_lock_api(&client, &raw_prefix, load);
    lock_loads(
        settings,
        &coord,
        &[
            ("raw grant+txn+delete+revoke", &txn),
            ("raw etcd Lock/Unlock", &lock),
        ],
    )
    .await;
    let _ = coord.close().await;
}

// --- PostgreSQL ---

struct RawPostgres {
    pool: sqlx::PgPool,
    acquire: Arc<str>,
    release: Arc<str>,
    /// The release, also notifying a channel, as Trellis's release does.
    release_notify: Arc<str>,
}

impl RawPostgres {
    async fn create(settings: &Settings, schema: &str) -> Self {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(settings.concurrency.max(1) as u32)
            .connect(&settings.postgres_url)
            .await
            .expect("PostgreSQL");
        let table = format!("\"{schema}\".raw_locks");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {table} (\
             name TEXT COLLATE \"C\" PRIMARY KEY, \
             owner TEXT, \
             token BIGINT NOT NULL, \
             expires_at TIMESTAMPTZ)"
        )))
        .execute(&pool)
        .await
        .expect("create raw table");
        Self {
            pool,
            acquire: format!(
                "INSERT INTO {table} AS l (name, owner, token, expires_at) \
                 VALUES ($1, $2, 1, clock_timestamp() + $3 * interval '1 second') \
                 ON CONFLICT (name) DO UPDATE SET \
                   owner = excluded.owner, token = l.token + 1, expires_at = excluded.expires_at \
                 WHERE l.owner IS NULL OR l.expires_at <= clock_timestamp() \
                 RETURNING l.token"
            )
            .into(),
            release: format!(
                "UPDATE {table} SET owner = NULL, expires_at = NULL \
                 WHERE name = $1 AND owner = $2 AND token = $3"
            )
            .into(),
            release_notify: format!(
                "WITH released AS (\
                   UPDATE {table} SET owner = NULL, expires_at = NULL \
                   WHERE name = $1 AND owner = $2 AND token = $3 RETURNING name) \
                 SELECT pg_notify('{schema}_raw', 'lock/' || name)::text FROM released"
            )
            .into(),
        }
    }

    /// Upsert (no row back: busy, retry every [`POLL`]), then the guarded release,
    /// with a `pg_notify` in its transaction if `notify`.
    fn upsert_lock(&self, load: LockLoad, notify: bool) -> Op {
        let (pool, acquire, release) = (
            self.pool.clone(),
            Arc::clone(&self.acquire),
            Arc::clone(if notify {
                &self.release_notify
            } else {
                &self.release
            }),
        );
        let names = load.names();
        op(move |w, _| {
            let (pool, acquire, release, names) = (
                pool.clone(),
                Arc::clone(&acquire),
                Arc::clone(&release),
                Arc::clone(&names),
            );
            async move {
                let name = names[w].as_str();
                let owner = format!("w{w}");
                let deadline = Instant::now() + LOCK_WAIT;
                let token = loop {
                    let granted: Result<Option<i64>, _> =
                        sqlx::query_scalar(sqlx::AssertSqlSafe(Arc::clone(&acquire)))
                            .bind(name)
                            .bind(&owner)
                            .bind(LOCK_TTL.as_secs_f64())
                            .fetch_optional(&pool)
                            .await;
                    match granted {
                        Ok(Some(token)) => break token,
                        Ok(None) if Instant::now() < deadline => {
                            tokio::time::sleep(POLL).await;
                        }
                        _ => return false,
                    }
                };
                sqlx::query(sqlx::AssertSqlSafe(release))
                    .bind(name)
                    .bind(&owner)
                    .bind(token)
                    .execute(&pool)
                    .await
                    .is_ok_and(|r| r.rows_affected() == 1)
            }
        })
    }

    /// `pg_advisory_lock` then `pg_advisory_unlock` on one pooled connection.
    fn advisory_lock(&self, load: LockLoad) -> Op {
        let pool = self.pool.clone();
        let names = load.names();
        op(move |w, _| {
            let (pool, names) = (pool.clone(), Arc::clone(&names));
            async move {
                let run = async {
                    let mut conn = pool.acquire().await?;
                    let name = names[w].as_str();
                    sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
                        .bind(name)
                        .execute(&mut *conn)
                        .await?;
                    let unlocked: bool =
                        sqlx::query_scalar("SELECT pg_advisory_unlock(hashtext($1))")
                            .bind(name)
                            .fetch_one(&mut *conn)
                            .await?;
                    Ok::<_, sqlx::Error>(unlocked)
                };
                run.await.unwrap_or(false)
            }
        })
    }
}

async fn postgres_locks(settings: &Settings) {
    let schema = unique_name("bench_coord");
    lock_header(&format!(
        "PostgreSQL (local, fsync=on, synchronous_commit=on; schema {schema})"
    ));
    let coord: Arc<dyn Coordinator> = Arc::new(
        PostgresCoordinator::connect(PostgresConfig {
            url: settings.postgres_url.clone(),
            schema: schema.clone(),
            max_connections: settings.concurrency.max(1) as u32,
            ..PostgresConfig::default()
        })
        .await
        .expect("connect PostgreSQL coordinator"),
    );
    let raw = RawPostgres::create(settings, &schema).await;
    let upsert = |load: LockLoad| raw.upsert_lock(load, false);
    let notify = |load: LockLoad| raw.upsert_lock(load, true);
    let advisory = |load: LockLoad| raw.advisory_lock(load);
    lock_loads(
        settings,
        &coord,
        &[
            ("raw upsert + UPDATE", &upsert),
            ("raw upsert + UPDATE with pg_notify", &notify),
            ("raw pg_advisory_lock/unlock", &advisory),
        ],
    )
    .await;
    let _ = coord.close().await;
    drop_schema(&raw.pool, &schema).await;
}

async fn drop_schema(pool: &sqlx::PgPool, schema: &str) {
    if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(pool)
    .await
    {
        eprintln!("schema {schema} not dropped: {e}");
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let settings = Settings::from_env();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "coordination: failover after kill -9 (TTLs {:?} s, {} runs each), then lock \
         acquire+release through the Rust API vs the raw engines, {}s per scenario; \
         {cores} cores shared by everything",
        settings.ttls, settings.repeats, settings.seconds
    );
    let etcd = if settings.backends.iter().any(|b| b == "etcd") {
        Some(
            tokio::task::spawn_blocking(Etcd::start)
                .await
                .expect("start etcd"),
        )
    } else {
        None
    };

    let mut failover_results = Vec::new();
    if let Some(etcd) = &etcd
        && settings.runs("etcd", "failover")
    {
        let config = format!(
            "[components.coord.default]\ntype = \"etcd\"\nendpoints = [{:?}]\nprefix = \"{}/\"\n",
            etcd.url(),
            unique_name("bench_failover")
        );
        failover_results.extend(failovers(&settings, "etcd", &config).await);
    }
    if settings.runs("postgres", "failover") {
        let schema = unique_name("bench_failover");
        let config = format!(
            "[components.coord.default]\ntype = \"postgres\"\nurl = {:?}\nschema = \"{schema}\"\n",
            settings.postgres_url
        );
        failover_results.extend(failovers(&settings, "postgres", &config).await);
        if let Ok(pool) = sqlx::PgPool::connect(&settings.postgres_url).await {
            drop_schema(&pool, &schema).await;
        }
    }
    if !failover_results.is_empty() {
        print_failovers(&failover_results);
    }

    if settings.runs("embedded", "locks") {
        embedded(&settings).await;
    }
    if let Some(etcd) = &etcd
        && settings.runs("etcd", "locks")
    {
        etcd_locks(&settings, etcd).await;
    }
    if settings.runs("postgres", "locks") {
        postgres_locks(&settings).await;
    }
    if let Some(etcd) = etcd {
        tokio::task::spawn_blocking(move || drop(etcd))
            .await
            .expect("stop etcd");
    }
}
