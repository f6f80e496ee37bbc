//! The 2PC coordinator over the embedded log, with scripted participants, and with
//! real PostgreSQL participants.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use trellis_core::config::{PostgresState, StateComponent};
use trellis_saga::log::embedded::EmbeddedLog;
use trellis_saga::log::{Filter, SagaLog};
use trellis_saga::twopc::coordinator::MAX_PARTICIPANTS;
use trellis_saga::twopc::{
    Decision, Participant, ParticipantError, ParticipantStatus, Participants, SidecarParticipants,
    SpecError, TxContext, TxCoordinator, TxError, TxOptions, TxRequest, TxStatus, Vote,
};

/// What a scripted participant does on a call.
#[derive(Debug, Clone)]
enum Script {
    Vote(Vote),
    Ok,
    Fail(&'static str),
    /// Never answers (a hung participant, or a crash mid-call).
    Hang,
}

/// Scripted participants: per (participant name, call) a queue of scripts (default:
/// vote commit / ack), recording every call.
#[derive(Debug, Default)]
struct Scripted {
    scripts: Mutex<HashMap<(String, &'static str), VecDeque<Script>>>,
    calls: Mutex<Vec<(String, &'static str, TxContext)>>,
}

impl Scripted {
    fn on(&self, name: &str, call: &'static str, script: Script) {
        self.scripts
            .lock()
            .expect("lock")
            .entry((name.to_owned(), call))
            .or_default()
            .push_back(script);
    }

    fn clear(&self) {
        self.scripts.lock().expect("lock").clear();
    }

    /// `name:call` of every call so far, in order.
    fn trace(&self) -> Vec<String> {
        self.calls
            .lock()
            .expect("lock")
            .iter()
            .map(|(n, c, _)| format!("{n}:{c}"))
            .collect()
    }

    fn count(&self, name: &str, call: &str) -> usize {
        self.trace()
            .iter()
            .filter(|t| **t == format!("{name}:{call}"))
            .count()
    }

    async fn run(&self, call: &'static str, tx: &TxContext) -> Script {
        self.calls
            .lock()
            .expect("lock")
            .push((tx.participant.clone(), call, tx.clone()));
        let script = self
            .scripts
            .lock()
            .expect("lock")
            .get_mut(&(tx.participant.clone(), call))
            .and_then(VecDeque::pop_front);
        let script = script.unwrap_or(match call {
            "prepare" => Script::Vote(Vote::Commit),
            _ => Script::Ok,
        });
        if let Script::Hang = script {
            std::future::pending::<()>().await;
        }
        script
    }
}

#[derive(Debug)]
struct Fake(Arc<Scripted>);

#[async_trait]
impl Participant for Fake {
    async fn prepare(&self, tx: &TxContext) -> Result<Vote, ParticipantError> {
        match self.0.run("prepare", tx).await {
            Script::Vote(v) => Ok(v),
            Script::Fail(e) => Err(ParticipantError::new(e)),
            _ => Ok(Vote::Commit),
        }
    }

    async fn commit(&self, tx: &TxContext) -> Result<(), ParticipantError> {
        match self.0.run("commit", tx).await {
            Script::Fail(e) => Err(ParticipantError::new(e)),
            _ => Ok(()),
        }
    }

    async fn abort(&self, tx: &TxContext) -> Result<(), ParticipantError> {
        match self.0.run("abort", tx).await {
            Script::Fail(e) => Err(ParticipantError::new(e)),
            _ => Ok(()),
        }
    }
}

/// `{"type":"fake"}` → a scripted participant; anything else → the sidecar's
/// participants, if any.
#[derive(Debug)]
struct Factory {
    scripted: Arc<Scripted>,
    sidecar: Option<SidecarParticipants>,
}

#[async_trait]
impl Participants for Factory {
    fn build(&self, name: &str, spec: &Value) -> Result<Arc<dyn Participant>, SpecError> {
        match (spec["type"].as_str(), &self.sidecar) {
            (Some("fake"), _) => Ok(Arc::new(Fake(Arc::clone(&self.scripted)))),
            (_, Some(sidecar)) => sidecar.build(name, spec),
            _ => Err(SpecError::invalid("unknown type")),
        }
    }

    async fn close(&self) {
        if let Some(sidecar) = &self.sidecar {
            sidecar.close().await;
        }
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    scripted: Arc<Scripted>,
    postgres: BTreeMap<String, StateComponent>,
}

struct Open {
    coordinator: TxCoordinator,
    log: Arc<EmbeddedLog>,
}

impl Open {
    async fn close(self) {
        self.coordinator.close().await;
        self.log.close().await.expect("close log");
    }
}

fn options() -> TxOptions {
    TxOptions {
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        answer_grace: Duration::from_millis(300),
        phase_two_timeout: Duration::from_secs(2),
        ..TxOptions::default()
    }
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tx.redb");
        Self {
            _dir: dir,
            path,
            scripted: Arc::new(Scripted::default()),
            postgres: BTreeMap::new(),
        }
    }

    async fn open(&self) -> Open {
        let log = Arc::new(EmbeddedLog::open(&self.path).await.expect("open log"));
        let sidecar = (!self.postgres.is_empty()).then(|| {
            SidecarParticipants::new(
                Arc::default(),
                Arc::default(),
                trellis_saga::twopc::KeyLocks::default(),
                &self.postgres,
            )
        });
        let coordinator = TxCoordinator::open(
            Arc::clone(&log) as Arc<dyn SagaLog>,
            Arc::new(Factory {
                scripted: Arc::clone(&self.scripted),
                sidecar,
            }),
            options(),
        )
        .await
        .expect("open");
        Open { coordinator, log }
    }
}

fn fakes(names: &[&str]) -> Vec<(String, Value)> {
    names
        .iter()
        .map(|n| ((*n).to_owned(), json!({"type": "fake"})))
        .collect()
}

fn request(names: &[&str]) -> TxRequest {
    TxRequest {
        participants: fakes(names),
        payload: json!({"order": 7}),
        timeout: Some(Duration::from_secs(5)),
    }
}

const WAIT: Duration = Duration::from_secs(10);

fn statuses(tx: &trellis_saga::twopc::Transaction) -> Vec<ParticipantStatus> {
    tx.participants.iter().map(|p| p.status).collect()
}

#[tokio::test]
async fn every_participant_commits_when_all_vote_commit() {
    let f = Fixture::new();
    let o = f.open().await;
    let tx = o
        .coordinator
        .begin(request(&["a", "b", "c"]), None)
        .await
        .expect("begin");
    assert_eq!(tx.status, TxStatus::Committed, "{tx:#?}");
    assert_eq!(tx.decision, Some(Decision::Commit));
    assert_eq!(statuses(&tx), [ParticipantStatus::Committed; 3]);
    for name in ["a", "b", "c"] {
        assert_eq!(f.scripted.count(name, "prepare"), 1);
        assert_eq!(f.scripted.count(name, "commit"), 1);
        assert_eq!(f.scripted.count(name, "abort"), 0);
    }
    let calls = f.scripted.calls.lock().expect("lock").clone();
    let (_, _, ctx) = &calls[0];
    assert_eq!(ctx.transaction_id, tx.id);
    assert_eq!(ctx.payload, json!({"order": 7}));
    assert!(ctx.time_left.is_some_and(|t| t <= Duration::from_secs(5)));
    assert_eq!(
        ctx.idempotency_key("prepare"),
        format!("{}:{}:prepare", tx.id, ctx.participant)
    );
    assert_eq!(
        o.coordinator.get(&tx.id).await.expect("get"),
        Some(tx.clone())
    );
    let listed = o
        .coordinator
        .list(&Filter {
            status: Some("committed".into()),
            ..Filter::default()
        })
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].participants.len(), 3);
    o.close().await;
}

#[tokio::test]
async fn one_abort_vote_aborts_everyone() {
    let f = Fixture::new();
    f.scripted
        .on("b", "prepare", Script::Vote(Vote::abort("out of stock")));
    let o = f.open().await;
    let tx = o
        .coordinator
        .begin(request(&["a", "b", "c"]), None)
        .await
        .expect("begin");
    assert_eq!(tx.status, TxStatus::Aborted, "{tx:#?}");
    assert_eq!(tx.decision, Some(Decision::Abort));
    assert!(
        tx.reason.as_deref().unwrap_or("").contains("out of stock"),
        "{tx:#?}"
    );
    assert_eq!(statuses(&tx), [ParticipantStatus::Aborted; 3]);
    for name in ["a", "b", "c"] {
        assert_eq!(f.scripted.count(name, "commit"), 0);
        assert_eq!(f.scripted.count(name, "abort"), 1, "{name} told to abort");
    }
    // A failed prepare counts as an abort vote too.
    f.scripted.on("c", "prepare", Script::Fail("500 from c"));
    let tx = o
        .coordinator
        .begin(request(&["a", "c"]), None)
        .await
        .expect("begin");
    assert_eq!(tx.status, TxStatus::Aborted);
    assert!(
        tx.participants[1]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("500 from c")
    );
    o.close().await;
}

#[tokio::test]
async fn a_prepare_past_the_deadline_aborts() {
    let f = Fixture::new();
    f.scripted.on("slow", "prepare", Script::Hang);
    let o = f.open().await;
    let started = tokio::time::Instant::now();
    let tx = o
        .coordinator
        .begin(
            TxRequest {
                timeout: Some(Duration::from_millis(300)),
                ..request(&["fast", "slow"])
            },
            None,
        )
        .await
        .expect("begin");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(tx.status, TxStatus::Aborted, "{tx:#?}");
    assert!(
        tx.reason.as_deref().unwrap_or("").contains("deadline"),
        "{tx:#?}"
    );
    assert_eq!(
        f.scripted.count("slow", "abort"),
        1,
        "the silent one is told too"
    );
    assert_eq!(f.scripted.count("fast", "abort"), 1);
    o.close().await;
}

#[tokio::test]
async fn phase_two_failures_are_retried_until_acknowledged() {
    let f = Fixture::new();
    f.scripted
        .on("a", "commit", Script::Fail("connection reset"));
    f.scripted.on("a", "commit", Script::Fail("503"));
    let o = f.open().await;
    let tx = o
        .coordinator
        .begin(request(&["a", "b"]), None)
        .await
        .expect("begin");
    assert_eq!(tx.status, TxStatus::Committed, "{tx:#?}");
    assert_eq!(f.scripted.count("a", "commit"), 3);
    assert_eq!(tx.participants[0].attempts, 3);
    assert_eq!(tx.participants[0].error, None);
    let events: Vec<&str> = tx.history.iter().map(|h| h.event.as_str()).collect();
    assert_eq!(
        events.iter().filter(|e| **e == "phase_two_failed").count(),
        2
    );
    o.close().await;
}

#[tokio::test]
async fn recovery_after_the_decision_commits_everywhere() {
    let f = Fixture::new();
    f.scripted.on("b", "commit", Script::Hang);
    let o = f.open().await;
    let tx = o
        .coordinator
        .begin(
            TxRequest {
                timeout: Some(Duration::from_millis(500)),
                ..request(&["a", "b", "c"])
            },
            None,
        )
        .await
        .expect("begin");
    // b hangs: begin answers after the deadline with phase two still going.
    assert_eq!(tx.status, TxStatus::Committing, "{tx:#?}");
    assert_eq!(tx.decision, Some(Decision::Commit));
    assert_eq!(tx.participants[1].status, ParticipantStatus::Prepared);
    // "Crash": stop everything before b acknowledged.
    o.close().await;
    f.scripted.clear();
    let o = f.open().await;
    let stored = o.coordinator.get(&tx.id).await.expect("get").expect("tx");
    assert_eq!(stored.status, TxStatus::Committing);
    assert_eq!(o.coordinator.recover().await.expect("recover"), 1);
    let tx = o.coordinator.wait(&tx.id, WAIT).await.expect("wait");
    assert_eq!(tx.status, TxStatus::Committed, "{tx:#?}");
    assert_eq!(statuses(&tx), [ParticipantStatus::Committed; 3]);
    assert_eq!(f.scripted.count("b", "commit"), 2, "b told again");
    assert_eq!(
        f.scripted.count("a", "commit") + f.scripted.count("c", "commit"),
        2,
        "a and c acknowledged before the crash"
    );
    assert_eq!(f.scripted.count("b", "abort"), 0);
    assert_eq!(o.coordinator.recover().await.expect("again"), 0);
    o.close().await;
}

#[tokio::test]
async fn recovery_of_an_undecided_transaction_aborts_everywhere() {
    let f = Fixture::new();
    f.scripted.on("b", "prepare", Script::Hang);
    let o = f.open().await;
    let coordinator = o.coordinator.clone();
    let begin = tokio::spawn(async move {
        coordinator
            .begin(
                TxRequest {
                    timeout: Some(Duration::from_secs(30)),
                    ..request(&["a", "b"])
                },
                Some("order-1"),
            )
            .await
    });
    while f.scripted.count("b", "prepare") == 0 || f.scripted.count("a", "prepare") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let id = f.scripted.calls.lock().expect("lock")[0]
        .2
        .transaction_id
        .clone();
    // "Crash" with a prepared and an undecided participant, nothing decided.
    o.close().await;
    // Answered with the transaction as it was, or that the log is closed.
    if let Ok(tx) = begin.await.expect("join") {
        assert_eq!(tx.status, TxStatus::Preparing);
    }
    f.scripted.clear();
    let o = f.open().await;
    let stored = o.coordinator.get(&id).await.expect("get").expect("logged");
    assert_eq!(stored.status, TxStatus::Preparing, "no decision logged");
    assert_eq!(o.coordinator.recover().await.expect("recover"), 1);
    let tx = o.coordinator.wait(&id, WAIT).await.expect("wait");
    assert_eq!(tx.status, TxStatus::Aborted, "{tx:#?}");
    assert!(
        tx.reason
            .as_deref()
            .unwrap_or("")
            .contains("presumed abort"),
        "{tx:#?}"
    );
    assert_eq!(f.scripted.count("a", "abort"), 1);
    assert_eq!(f.scripted.count("b", "abort"), 1);
    assert_eq!(f.scripted.count("a", "commit"), 0);
    // The idempotency key still names it.
    let again = o
        .coordinator
        .begin(request(&["a", "b"]), Some("order-1"))
        .await
        .expect("begin");
    assert_eq!(again.id, tx.id);
    assert_eq!(again.status, TxStatus::Aborted);
    o.close().await;
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_transaction() {
    let f = Fixture::new();
    let o = f.open().await;
    let first = o
        .coordinator
        .begin(request(&["a", "b"]), Some("k1"))
        .await
        .expect("begin");
    let second = o
        .coordinator
        .begin(request(&["a", "b"]), Some("k1"))
        .await
        .expect("begin");
    assert_eq!(first.id, second.id);
    assert_eq!(second.status, TxStatus::Committed);
    assert_eq!(f.scripted.count("a", "prepare"), 1, "ran once");
    let other = o
        .coordinator
        .begin(request(&["a", "b"]), Some("k2"))
        .await
        .expect("begin");
    assert_ne!(other.id, first.id);
    o.close().await;
}

#[tokio::test]
async fn invalid_requests_are_refused_with_stable_codes() {
    let f = Fixture::new();
    let o = f.open().await;
    let codes = |e: TxError| match e {
        TxError::Invalid(problems) => problems.iter().map(|p| p.code).collect::<Vec<_>>(),
        other => panic!("not invalid: {other}"),
    };
    let err = |r: TxRequest| {
        let c = o.coordinator.clone();
        async move { c.begin(r, None).await.expect_err("invalid") }
    };
    assert_eq!(codes(err(request(&[])).await), ["invalid_body"]);
    let many: Vec<String> = (0..=MAX_PARTICIPANTS).map(|i| format!("p{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(codes(err(request(&many)).await), ["invalid_body"]);
    assert_eq!(
        codes(err(request(&["a", "b", "a"])).await),
        ["invalid_participant"]
    );
    assert_eq!(codes(err(request(&["a:b"])).await), ["invalid_participant"]);
    let mut bad_spec = request(&["a"]);
    bad_spec.participants[0].1 = json!({"type": "nope"});
    assert_eq!(codes(err(bad_spec).await), ["invalid_participant"]);
    let mut bad_timeout = request(&["a"]);
    bad_timeout.timeout = Some(Duration::ZERO);
    assert_eq!(codes(err(bad_timeout).await), ["invalid_body"]);
    assert!(f.scripted.trace().is_empty(), "nothing ran");
    assert!(
        o.coordinator
            .list(&Filter::default())
            .await
            .expect("list")
            .is_empty(),
        "nothing logged"
    );
    o.close().await;
}

// === PostgreSQL participants ===

struct Pg {
    pool: sqlx::PgPool,
    schema: String,
}

impl Pg {
    async fn new() -> Self {
        let schema = trellis_core::testing::unique_name("twopc");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&trellis_core::testing::postgres_url())
            .await
            .expect("connect");
        for sql in [
            format!("CREATE SCHEMA {schema}"),
            format!(
                "CREATE TABLE {schema}.accounts (id text PRIMARY KEY, balance int8 NOT NULL CHECK (balance >= 0))"
            ),
            format!(
                "CREATE TABLE {schema}.stock (sku text PRIMARY KEY, qty int8 NOT NULL CHECK (qty >= 0))"
            ),
            format!("INSERT INTO {schema}.accounts VALUES ('alice', 100)"),
            format!("INSERT INTO {schema}.stock VALUES ('apple', 5)"),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .expect("setup");
        }
        Self { pool, schema }
    }

    fn components(&self) -> BTreeMap<String, StateComponent> {
        let mut pg = PostgresState::new(trellis_core::testing::postgres_url());
        pg.schema.clone_from(&self.schema);
        BTreeMap::from([("pg".to_owned(), StateComponent::Postgres(pg))])
    }

    async fn balances(&self) -> (i64, i64) {
        let one = |sql: String| {
            let pool = self.pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql))
                    .fetch_one(&pool)
                    .await
                    .expect("read")
            }
        };
        (
            one(format!(
                "SELECT balance FROM {}.accounts WHERE id = 'alice'",
                self.schema
            ))
            .await,
            one(format!(
                "SELECT qty FROM {}.stock WHERE sku = 'apple'",
                self.schema
            ))
            .await,
        )
    }

    /// Prepared transactions of `tx`.
    async fn prepared(&self, tx: &str) -> i64 {
        let prefix = format!("trellis_{}_%", tx.replace('-', ""));
        sqlx::query_scalar("SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE $1")
            .bind(prefix)
            .fetch_one(&self.pool)
            .await
            .expect("pg_prepared_xacts")
    }

    async fn drop_schema(self) {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.schema
        )))
        .execute(&self.pool)
        .await;
        self.pool.close().await;
    }
}

/// Debit alice by `amount` (unqualified table: the component's schema is first on
/// the search path) and take `qty` apples.
fn transfer(amount: i64, qty: i64) -> Vec<(String, Value)> {
    vec![
        (
            "payments".into(),
            json!({"type": "postgres", "component": "pg", "statements": [
                {"sql": "UPDATE accounts SET balance = balance - $1 WHERE id = $2", "params": [amount, "alice"]},
            ]}),
        ),
        (
            "stock".into(),
            json!({"type": "postgres", "component": "pg", "statements": [
                {"sql": "UPDATE stock SET qty = qty - $1 WHERE sku = $2", "params": [qty, "apple"]},
                {"sql": "UPDATE stock SET qty = qty WHERE sku = $1 AND $2::text IS NULL", "params": ["apple", null]},
            ]}),
        ),
    ]
}

#[tokio::test]
async fn postgres_participants_commit_abort_and_recover() {
    if !trellis_core::testing::services_enabled("postgres") {
        return;
    }
    let pg = Pg::new().await;
    let mut f = Fixture::new();
    f.postgres = pg.components();
    let o = f.open().await;

    // Both commit.
    let tx = o
        .coordinator
        .begin(
            TxRequest {
                participants: transfer(30, 2),
                payload: Value::Null,
                timeout: Some(Duration::from_secs(10)),
            },
            None,
        )
        .await
        .expect("begin");
    assert_eq!(tx.status, TxStatus::Committed, "{tx:#?}");
    assert_eq!(pg.balances().await, (70, 3));
    assert_eq!(pg.prepared(&tx.id).await, 0);

    // The second participant's statement fails (qty would go negative): neither
    // table changes, and nothing stays prepared.
    let tx = o
        .coordinator
        .begin(
            TxRequest {
                participants: transfer(10, 4),
                payload: Value::Null,
                timeout: Some(Duration::from_secs(10)),
            },
            None,
        )
        .await
        .expect("begin");
    assert_eq!(tx.status, TxStatus::Aborted, "{tx:#?}");
    assert!(
        tx.participants[1]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("statements[0]"),
        "{tx:#?}"
    );
    assert_eq!(pg.balances().await, (70, 3));
    assert_eq!(pg.prepared(&tx.id).await, 0);

    // Unknown components are refused up front.
    let mut unknown = transfer(1, 1);
    unknown[0].1["component"] = json!("nope");
    match o
        .coordinator
        .begin(
            TxRequest {
                participants: unknown,
                payload: Value::Null,
                timeout: None,
            },
            None,
        )
        .await
    {
        Err(TxError::Invalid(problems)) => {
            assert_eq!(problems[0].code, "unknown_participant_target");
        }
        other => panic!("{other:?}"),
    }

    // Both prepared, a third participant never votes, and the coordinator "crashes"
    // before deciding: recovery rolls the prepared ones back.
    f.scripted.on("slow", "prepare", Script::Hang);
    let mut participants = transfer(5, 1);
    participants.push(("slow".into(), json!({"type": "fake"})));
    let coordinator = o.coordinator.clone();
    let begin = tokio::spawn(async move {
        coordinator
            .begin(
                TxRequest {
                    participants,
                    payload: Value::Null,
                    timeout: Some(Duration::from_secs(60)),
                },
                None,
            )
            .await
    });
    let id = loop {
        let calls = f.scripted.calls.lock().expect("lock").clone();
        if let Some((_, _, ctx)) = calls.first() {
            let id = ctx.transaction_id.clone();
            if pg.prepared(&id).await == 2 {
                break id;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    o.close().await;
    begin.abort();
    assert_eq!(pg.prepared(&id).await, 2, "in doubt across the crash");
    f.scripted.clear();
    let o = f.open().await;
    assert_eq!(o.coordinator.recover().await.expect("recover"), 1);
    let tx = o.coordinator.wait(&id, WAIT).await.expect("wait");
    assert_eq!(tx.status, TxStatus::Aborted, "{tx:#?}");
    assert_eq!(pg.prepared(&id).await, 0);
    assert_eq!(pg.balances().await, (70, 3));
    o.close().await;
    pg.drop_schema().await;
}
