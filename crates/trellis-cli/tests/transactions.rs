//! Black-box: two-phase commit through the real binary — PostgreSQL participants,
//! an HTTP participant app, `kill -9` at the decision boundary, and bad input.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Trellis, client};
use trellis_core::crashpoint;
use trellis_core::testing::{postgres_url, services_enabled, unique_name};

/// A fresh schema with `accounts(alice = 100)` and `stock(apple = 5)`.
struct Db {
    pool: sqlx::PgPool,
    schema: String,
}

impl Db {
    async fn new() -> Self {
        let schema = unique_name("tx_cli");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&postgres_url())
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

    /// `[components.state.pg]` on this schema.
    fn config(&self) -> String {
        format!(
            "[components.state.pg]\ntype = \"postgres\"\nurl = {:?}\nschema = \"{}\"\n",
            postgres_url(),
            self.schema
        )
    }

    /// (alice's balance, apples in stock).
    async fn values(&self) -> (i64, i64) {
        let balance: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT balance FROM {}.accounts WHERE id = 'alice'",
            self.schema
        )))
        .fetch_one(&self.pool)
        .await
        .expect("balance");
        let qty: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT qty FROM {}.stock WHERE sku = 'apple'",
            self.schema
        )))
        .fetch_one(&self.pool)
        .await
        .expect("qty");
        (balance, qty)
    }

    /// Prepared transactions of transaction `id`.
    async fn prepared(&self, id: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE $1")
            .bind(format!("trellis_{}_%", id.replace('-', "")))
            .fetch_one(&self.pool)
            .await
            .expect("pg_prepared_xacts")
    }

    async fn drop(self) {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.schema
        )))
        .execute(&self.pool)
        .await;
        self.pool.close().await;
    }
}

/// Debit alice by `amount` and take `qty` apples, as two postgres participants.
fn transfer(amount: i64, qty: i64) -> Value {
    json!({
        "participants": [
            {"name": "payments", "type": "postgres", "component": "pg", "statements": [
                {"sql": "UPDATE accounts SET balance = balance - $1 WHERE id = $2", "params": [amount, "alice"]},
            ]},
            {"name": "stock", "type": "postgres", "component": "pg", "statements": [
                {"sql": "UPDATE stock SET qty = qty - $1 WHERE sku = $2", "params": [qty, "apple"]},
            ]},
        ],
        "payload": {"order": 1},
        "timeout": "10s",
    })
}

async fn post(t: &Trellis, body: &Value) -> (u16, Value) {
    let response = client()
        .post(t.url("/v1/transactions"))
        .json(body)
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

async fn get(t: &Trellis, path: &str) -> (u16, Value) {
    let response = client().get(t.url(path)).send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

fn participant_statuses(tx: &Value) -> Vec<String> {
    tx["participants"]
        .as_array()
        .expect("participants")
        .iter()
        .map(|p| p["status"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Polls `GET /v1/transactions/{id}` until its status is `status`.
async fn until_status(t: &Trellis, id: &str, status: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, tx) = get(t, &format!("/v1/transactions/{id}")).await;
        assert_eq!(code, 200, "{tx}");
        if tx["status"] == status {
            return tx;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {} after 30s: {tx}; stderr:\n{}",
            tx["status"],
            t.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the crash point's line on stderr.
async fn until_reached(t: &Trellis, point: &str) {
    let marker = crashpoint::marker(point);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !t.stderr().contains(&marker) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{point} not reached; stderr:\n{}",
            t.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The newest transaction's id and status, from the list.
async fn newest(t: &Trellis) -> (String, String) {
    let (code, list) = get(t, "/v1/transactions?limit=1").await;
    assert_eq!(code, 200, "{list}");
    let tx = &list["transactions"][0];
    (
        tx["id"].as_str().expect("id").to_owned(),
        tx["status"].as_str().expect("status").to_owned(),
    )
}

#[tokio::test]
async fn two_postgres_participants_commit_both() {
    if !services_enabled("postgres") {
        return;
    }
    let db = Db::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), &db.config()).await;

    let (code, tx) = post(&t, &transfer(30, 2)).await;
    assert_eq!(code, 200, "{tx}");
    assert_eq!(tx["status"], "committed");
    assert_eq!(tx["decision"], "commit");
    assert_eq!(participant_statuses(&tx), ["committed", "committed"]);
    assert_eq!(db.values().await, (70, 3));
    let id = tx["id"].as_str().expect("id");
    assert_eq!(db.prepared(id).await, 0);
    let (code, again) = get(&t, &format!("/v1/transactions/{id}")).await;
    assert_eq!((code, &again["status"]), (200, &json!("committed")));

    // A statement fails in the second participant: nothing changes anywhere.
    let (code, tx) = post(&t, &transfer(10, 99)).await;
    assert_eq!(code, 200, "{tx}");
    assert_eq!(tx["status"], "aborted");
    assert_eq!(participant_statuses(&tx), ["aborted", "aborted"]);
    assert_eq!(db.values().await, (70, 3));
    assert_eq!(db.prepared(tx["id"].as_str().expect("id")).await, 0);

    let (code, list) = get(&t, "/v1/transactions?status=committed").await;
    assert_eq!(code, 200);
    assert_eq!(list["transactions"].as_array().map(Vec::len), Some(1));
    db.drop().await;
}

#[tokio::test]
async fn kill_9_after_the_decision_commits_both_on_restart() {
    if !services_enabled("postgres") {
        return;
    }
    let db = Db::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = db.config();
    let mut t = Trellis::start_with_env(
        dir.path(),
        &config,
        &[(crashpoint::ENV, "tx.after_decision")],
    )
    .await;
    let url = t.url("/v1/transactions");
    let body = transfer(25, 1);
    let pending = tokio::spawn(async move { client().post(url).json(&body).send().await });
    until_reached(&t, "tx.after_decision").await;
    let (id, status) = newest(&t).await;
    assert_eq!(status, "committing");
    assert_eq!(db.prepared(&id).await, 2, "both prepared, in doubt");
    t.kill9().await;
    let _ = pending.await;
    assert_eq!(db.values().await, (100, 5), "nothing committed yet");

    let t = Trellis::start_in(dir.path(), &config).await;
    let tx = until_status(&t, &id, "committed").await;
    assert_eq!(participant_statuses(&tx), ["committed", "committed"]);
    assert_eq!(tx["decision"], "commit");
    assert_eq!(db.values().await, (75, 4));
    assert_eq!(db.prepared(&id).await, 0);
    db.drop().await;
}

#[tokio::test]
async fn kill_9_before_the_decision_rolls_both_back_on_restart() {
    if !services_enabled("postgres") {
        return;
    }
    let db = Db::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = db.config();
    let mut t = Trellis::start_with_env(
        dir.path(),
        &config,
        &[(crashpoint::ENV, "tx.before_decision")],
    )
    .await;
    let url = t.url("/v1/transactions");
    let body = transfer(25, 1);
    let pending = tokio::spawn(async move { client().post(url).json(&body).send().await });
    until_reached(&t, "tx.before_decision").await;
    let (id, status) = newest(&t).await;
    assert_eq!(status, "preparing", "no decision logged");
    assert_eq!(db.prepared(&id).await, 2, "both prepared, in doubt");
    t.kill9().await;
    let _ = pending.await;

    let t = Trellis::start_in(dir.path(), &config).await;
    let tx = until_status(&t, &id, "aborted").await;
    assert_eq!(participant_statuses(&tx), ["aborted", "aborted"]);
    assert!(
        tx["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("presumed abort"),
        "{tx}"
    );
    assert_eq!(db.prepared(&id).await, 0, "nothing of ours left prepared");
    assert_eq!(db.values().await, (100, 5));
    db.drop().await;
}

/// What the participant app was asked: (path, Idempotency-Key, body).
type Calls = Arc<Mutex<Vec<(String, String, Value)>>>;

/// An app taking part over HTTP that votes abort.
async fn refusing_app() -> (String, Calls, tokio::task::JoinHandle<()>) {
    use axum::extract::State;
    use axum::http::HeaderMap;
    use axum::routing::post;

    async fn handle(
        State(calls): State<Calls>,
        uri: axum::http::Uri,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> ([(&'static str, &'static str); 1], &'static str) {
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let path = uri.path().to_owned();
        let answer = if path.ends_with("/prepare") {
            r#"{"vote":"abort","reason":"no stock in the warehouse"}"#
        } else {
            "{}"
        };
        calls.lock().expect("lock").push((path, key, body));
        ([("content-type", "application/json")], answer)
    }

    let calls = Calls::default();
    let app = axum::Router::new()
        .route("/tx/prepare", post(handle))
        .route("/tx/commit", post(handle))
        .route("/tx/abort", post(handle))
        .with_state(Arc::clone(&calls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    (url, calls, server)
}

#[tokio::test]
async fn an_app_voting_abort_aborts_everyone() {
    if !services_enabled("postgres") {
        return;
    }
    let db = Db::new().await;
    let (url, calls, server) = refusing_app().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!("{}[apps.warehouse]\ninstances = [{url:?}]\n", db.config());
    let t = Trellis::start_in(dir.path(), &config).await;

    let mut body = transfer(10, 1);
    body["participants"][1] =
        json!({"name": "warehouse", "type": "app", "app": "warehouse", "path": "/tx"});
    let (code, tx) = post(&t, &body).await;
    assert_eq!(code, 200, "{tx}");
    assert_eq!(tx["status"], "aborted", "{tx}");
    assert_eq!(participant_statuses(&tx), ["aborted", "aborted"]);
    assert!(
        tx["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("no stock in the warehouse"),
        "{tx}"
    );
    let id = tx["id"].as_str().expect("id").to_owned();
    assert_eq!(db.values().await, (100, 5));
    assert_eq!(db.prepared(&id).await, 0);
    let calls = calls.lock().expect("lock").clone();
    let paths: Vec<&str> = calls.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(paths, ["/tx/prepare", "/tx/abort"]);
    assert_eq!(calls[0].1, format!("{id}:warehouse:prepare"));
    assert_eq!(
        calls[0].2,
        json!({"transaction_id": id, "participant": "warehouse", "payload": {"order": 1}})
    );
    assert_eq!(calls[1].1, format!("{id}:warehouse:abort"));
    assert_eq!(
        calls[1].2,
        json!({"transaction_id": id, "participant": "warehouse"})
    );
    server.abort();
    db.drop().await;
}

#[tokio::test]
async fn bad_input_is_a_problem_with_a_stable_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(
        dir.path(),
        "[apps.warehouse]\ninstances = [\"http://127.0.0.1:9\"]\n",
    )
    .await;
    let problem = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(content_type, "application/problem+json");
        let body: Value = response.json().await.expect("problem");
        (status, body["code"].as_str().unwrap_or_default().to_owned())
    };
    let send = |body: &'static str| {
        client()
            .post(t.url("/v1/transactions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, code) in [
        ("{", "malformed_json"),
        (r#"{"participants": []}"#, "invalid_body"),
        (r#"{"participants": {}}"#, "invalid_body"),
        (
            r#"{"participants": [{"type": "app"}]}"#,
            "invalid_participant",
        ),
        (
            r#"{"participants": [{"name": "a", "type": "postgres", "component": "nope", "statements": [{"sql": "SELECT 1"}]}]}"#,
            "unknown_participant_target",
        ),
        (
            r#"{"participants": [{"name": "a", "type": "state", "store": "nope", "operations": [{"op": "delete", "key": "k"}]}]}"#,
            "unknown_participant_target",
        ),
        (
            r#"{"participants": [{"name": "a", "type": "app", "app": "nope", "path": "/tx"}]}"#,
            "unknown_participant_target",
        ),
        (
            r#"{"participants": [{"name": "a", "type": "carrier-pigeon"}]}"#,
            "invalid_participant",
        ),
        (
            r#"{"participants": [{"name": "a", "type": "app", "app": "warehouse", "path": "/tx"}, {"name": "a", "type": "app", "app": "warehouse", "path": "/tx2"}]}"#,
            "invalid_participant",
        ),
        (
            r#"{"participants": [{"name": "a", "type": "app", "app": "warehouse", "path": "/tx"}], "timeout": "soon"}"#,
            "invalid_body",
        ),
        (
            r#"{"participants": [{"name": "a", "type": "app", "app": "warehouse", "path": "/tx"}], "extra": 1}"#,
            "invalid_body",
        ),
    ] {
        let (status, got) = problem(send(body).await.expect("send")).await;
        assert_eq!((status, got.as_str()), (400, code), "{body}");
    }
    let (status, code) = problem(
        client()
            .get(t.url("/v1/transactions/0190a3b4-0000-7000-8000-000000000000"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!((status, code.as_str()), (404, "transaction_not_found"));
    let (status, code) = problem(
        client()
            .get(t.url("/v1/transactions?status=maybe"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!((status, code.as_str()), (400, "invalid_query"));
    let (code, list) = get(&t, "/v1/transactions").await;
    assert_eq!(code, 200);
    assert_eq!(list["transactions"], json!([]), "nothing was begun");
    // Documented in the OpenAPI document.
    let (_, doc) = get(&t, "/openapi.json").await;
    assert!(doc["paths"]["/v1/transactions"]["post"].is_object());
    assert!(doc["paths"]["/v1/transactions/{id}"]["get"].is_object());
}

/// A prepared state-store participant holds its keys until the outcome: plain writes
/// to them are refused with `key_locked`, other keys are writable, and after a
/// crash before the decision the transaction is aborted and the keys are free.
#[tokio::test]
async fn prepared_state_writes_hold_their_keys_until_the_outcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t =
        Trellis::start_with_env(dir.path(), "", &[(crashpoint::ENV, "tx.before_decision")]).await;
    let url = t.url("/v1/transactions");
    let body = json!({
        "participants": [{"name": "ledger", "type": "state", "store": "default", "operations": [
            {"op": "upsert", "key": "acct/alice", "value": {"balance": 70}},
            {"op": "upsert", "key": "acct/bob", "value": {"balance": 130}},
        ]}],
        "timeout": "10s",
    });
    let pending = tokio::spawn(async move { client().post(url).json(&body).send().await });
    until_reached(&t, "tx.before_decision").await;
    let put = |key: &str| {
        client()
            .put(t.url(&format!("/v1/state/default/{key}")))
            .json(&json!({"balance": 0}))
            .send()
    };
    let locked = put("acct/alice").await.expect("put");
    assert_eq!(locked.status(), 409);
    let problem: Value = locked.json().await.expect("json");
    assert_eq!(problem["code"], "key_locked", "{problem}");
    let (id, _) = newest(&t).await;
    assert_eq!(problem["transaction"], id.as_str());
    let tx = client()
        .post(t.url("/v1/state/default/transaction"))
        .json(&json!({"operations": [{"op": "delete", "key": "acct/bob"}]}))
        .send()
        .await
        .expect("transaction");
    assert_eq!(
        tx.status(),
        409,
        "transactions touching a held key wait for the outcome too"
    );
    assert_eq!(
        put("acct/carol").await.expect("put").status(),
        204,
        "other keys are free"
    );
    t.kill9().await;
    let _ = pending.await;

    let t = Trellis::start_in(dir.path(), "").await;
    until_status(&t, &id, "aborted").await;
    let after = client()
        .put(t.url("/v1/state/default/acct/alice"))
        .json(&json!({"balance": 1}))
        .send()
        .await
        .expect("put");
    assert_eq!(after.status(), 204, "released by the abort");
    let bob = client()
        .get(t.url("/v1/state/default/acct/bob"))
        .send()
        .await
        .expect("get");
    assert_eq!(bob.status(), 404, "the aborted upsert never applied");
}
