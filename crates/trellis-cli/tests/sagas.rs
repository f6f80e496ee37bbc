//! Sagas through the real binary: definitions, compensation, operator commands, bad
//! input, and `kill -9` at every boundary of a saga.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::Trellis;
use support::bank::{Bank, Fault};

/// Two banks (two services); the transfer saga debits one and credits the other.
/// Compensations undo by the original call's idempotency key, so undoing an
/// operation that never happened is a no-op.
fn config(a: &Bank, b: &Bank) -> String {
    format!(
        r#"
[apps.bank-a]
instances = ["{a}"]
[apps.bank-a.outlier_detection]
consecutive_errors = 0
[apps.bank-b]
instances = ["{b}"]
[apps.bank-b.outlier_detection]
consecutive_errors = 0

[sagas.transfer]
description = "Moves money from an account at bank A to one at bank B"
pivot = "credit"
compensation_retry = {{ max_attempts = 50, initial_backoff = "20ms", max_backoff = "200ms" }}

[[sagas.transfer.steps]]
name = "debit"
timeout = "2s"
retry = {{ max_attempts = 5, initial_backoff = "20ms", max_backoff = "100ms" }}
action = {{ type = "invoke", app = "bank-a", path = "/accounts/{{{{input.from}}}}/debit", body = {{ amount = "{{{{input.amount}}}}" }} }}
compensation = {{ type = "invoke", app = "bank-a", path = "/accounts/{{{{input.from}}}}/undo", body = {{ of = "{{{{saga.id}}}}:debit:action" }} }}

[[sagas.transfer.steps]]
name = "credit"
timeout = "2s"
retry = {{ max_attempts = 5, initial_backoff = "20ms", max_backoff = "100ms" }}
action = {{ type = "invoke", app = "bank-b", path = "/accounts/{{{{input.to}}}}/credit", body = {{ amount = "{{{{input.amount}}}}", debit = "{{{{steps.debit.output.ref}}}}" }} }}
compensation = {{ type = "invoke", app = "bank-b", path = "/accounts/{{{{input.to}}}}/undo", body = {{ of = "{{{{saga.id}}}}:credit:action" }} }}

[[sagas.transfer.steps]]
name = "receipt"
action = {{ type = "publish", pubsub = "default", topic = "receipts", data = {{ saga = "{{{{saga.id}}}}", amount = "{{{{input.amount}}}}" }} }}
"#,
        a = a.url,
        b = b.url
    )
}

async fn banks() -> (Bank, Bank) {
    (
        Bank::start(&[("alice", 1000), ("carol", 1000)]).await,
        Bank::start(&[("bob", 1000), ("dave", 1000)]).await,
    )
}

async fn start_saga(client: &reqwest::Client, t: &Trellis, input: Value) -> String {
    let response = client
        .post(t.url("/v1/sagas/transfer"))
        .json(&json!({ "input": input }))
        .send()
        .await
        .expect("start");
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.expect("json");
    body["id"].as_str().expect("id").to_owned()
}

async fn wait_saga(client: &reqwest::Client, t: &Trellis, id: &str) -> Value {
    for _ in 0..30 {
        let saga: Value = client
            .get(t.url(&format!("/v1/sagas/{id}?wait=2s")))
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        let status = saga["status"].as_str().unwrap_or_default();
        if !matches!(status, "running" | "compensating") {
            return saga;
        }
    }
    panic!("saga {id} did not finish");
}

#[tokio::test]
async fn a_transfer_completes_and_a_refused_one_is_compensated() {
    let (a, b) = banks().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), &config(&a, &b)).await;
    let client = reqwest::Client::new();

    let id = start_saga(
        &client,
        &t,
        json!({"from": "alice", "to": "bob", "amount": 100}),
    )
    .await;
    let saga = wait_saga(&client, &t, &id).await;
    assert_eq!(saga["status"], "completed", "{saga:#}");
    assert_eq!((a.balance("alice"), b.balance("bob")), (900, 1100));
    assert_eq!(
        saga["steps"][0]["output"]["ref"],
        format!("{id}:debit:action")
    );
    assert!(a.is_applied(&format!("{id}:debit:action")));

    // bob's bank refuses the credit (no such account): the debit is undone.
    let id = start_saga(
        &client,
        &t,
        json!({"from": "alice", "to": "nobody", "amount": 50}),
    )
    .await;
    let saga = wait_saga(&client, &t, &id).await;
    assert_eq!(saga["status"], "compensated", "{saga:#}");
    assert_eq!(a.balance("alice"), 900);
    let events: Vec<&str> = saga["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["event"].as_str())
        .collect();
    assert!(
        events.ends_with(&[
            "compensation_started",
            "compensation_succeeded",
            "compensated"
        ]),
        "{events:?}"
    );

    // Listing with filters.
    let list: Value = client
        .get(t.url("/v1/sagas?name=transfer&status=compensated"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = list["sagas"]
        .as_array()
        .expect("sagas")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, [id.as_str()]);
}

#[tokio::test]
async fn idempotency_keys_and_operator_commands() {
    let (a, b) = banks().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), &config(&a, &b)).await;
    let client = reqwest::Client::new();
    let input = json!({"input": {"from": "carol", "to": "dave", "amount": 5}});
    let first = client
        .post(t.url("/v1/sagas/transfer"))
        .header("Idempotency-Key", "order-17")
        .json(&input)
        .send()
        .await
        .expect("start");
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.expect("json");
    let again = client
        .post(t.url("/v1/sagas/transfer"))
        .header("Idempotency-Key", "order-17")
        .json(&input)
        .send()
        .await
        .expect("start");
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.expect("json");
    assert_eq!(first["id"], again["id"]);
    let id = first["id"].as_str().expect("id");
    assert_eq!(wait_saga(&client, &t, id).await["status"], "completed");
    assert_eq!(a.balance("carol"), 995, "one transfer for one key");

    // Bank A's undo keeps failing: a refused credit leaves the saga parked.
    let def: Value = client
        .get(t.url("/v1/sagas/definitions/transfer"))
        .send()
        .await
        .expect("def")
        .json()
        .await
        .expect("json");
    let mut quick = def.clone();
    quick["compensation_retry"] =
        json!({"max_attempts": 2, "initial_backoff": "10ms", "max_backoff": "10ms"});
    quick["steps"][0]["retry"] = json!({"max_attempts": 1});
    quick.as_object_mut().expect("object").remove("name");
    let put = client
        .put(t.url("/v1/sagas/definitions/quick"))
        .json(&quick)
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), 201);
    // The debit goes through; its undo keeps failing.
    a.set_fault_on("undo", Fault::Unavailable);
    let id = {
        let r: Value = client
            .post(t.url("/v1/sagas/quick"))
            .json(&json!({"input": {"from": "carol", "to": "nobody", "amount": 1}}))
            .send()
            .await
            .expect("start")
            .json()
            .await
            .expect("json");
        r["id"].as_str().expect("id").to_owned()
    };
    let saga = wait_saga(&client, &t, &id).await;
    assert_eq!(saga["status"], "needs_attention", "{saga:#}");
    let metrics = client
        .get(t.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("trellis_sagas_needs_attention{saga=\"quick\"} 1")),
        "alert metric missing"
    );
    let abort = client
        .post(t.url(&format!("/v1/sagas/{id}/abort")))
        .send()
        .await
        .expect("abort");
    assert_eq!(abort.status(), 409, "compensating sagas can't be aborted");
    a.set_fault(Fault::None, 0);
    let retry = client
        .post(t.url(&format!("/v1/sagas/{id}/retry")))
        .send()
        .await
        .expect("retry");
    assert_eq!(retry.status(), 200);
    assert_eq!(wait_saga(&client, &t, &id).await["status"], "compensated");
    assert_eq!(a.balance("carol"), 995, "the debit was undone");
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_changes_nothing() {
    let (a, b) = banks().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), &config(&a, &b)).await;
    let client = reqwest::Client::new();
    let problem = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body: Value = r.json().await.expect("problem json");
        (
            status,
            body["code"].as_str().unwrap_or_default().to_owned(),
            body,
        )
    };

    let r = client
        .post(t.url("/v1/sagas/nope"))
        .json(&json!({"input": {}}))
        .send()
        .await
        .expect("post");
    assert_eq!(problem(r).await.1, "definition_not_found");
    let r = client
        .post(t.url("/v1/sagas/transfer"))
        .body("{not json")
        .send()
        .await
        .expect("post");
    assert_eq!(problem(r).await.1, "malformed_json");
    let r = client
        .post(t.url("/v1/sagas/transfer"))
        .json(&json!({"inptu": {}}))
        .send()
        .await
        .expect("post");
    assert_eq!(problem(r).await.1, "invalid_body");
    let r = client
        .get(t.url("/v1/sagas/0000"))
        .send()
        .await
        .expect("get");
    assert_eq!(problem(r).await.1, "saga_not_found");
    let r = client
        .get(t.url("/v1/sagas?status=weird"))
        .send()
        .await
        .expect("get");
    assert_eq!(problem(r).await.1, "invalid_query");

    // Invalid template references: a later step, a bad root, unclosed braces.
    let bad = json!({"steps": [
        {"name": "a", "action": {"type": "invoke", "app": "bank-a", "path": "/x/{{steps.b.output.id}}"}},
        {"name": "b", "action": {"type": "invoke", "app": "bank-a", "path": "/y/{{env.HOME}}", "body": {"x": "{{input.x"}}}
    ]});
    let r = client
        .put(t.url("/v1/sagas/definitions/bad"))
        .json(&bad)
        .send()
        .await
        .expect("put");
    let (status, code, body) = problem(r).await;
    assert_eq!(
        (status, code.as_str()),
        (400, "invalid_template"),
        "{body:#}"
    );
    let at: Vec<&str> = body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["at"].as_str())
        .collect();
    assert_eq!(at, ["steps[0].action", "steps[1].action"], "{body:#}");
    let r = client
        .put(t.url("/v1/sagas/definitions/bad2"))
        .json(&json!({"steps": [
            {"name": "a", "action": {"type": "invoke", "app": "no-such-app", "path": "/x"}}
        ]}))
        .send()
        .await
        .expect("put");
    assert_eq!(problem(r).await.1, "unknown_target");
    let r = client
        .put(t.url("/v1/sagas/definitions/bad3"))
        .json(&json!({"steps": [
            {"name": "a", "action": {"type": "teleport"}}
        ]}))
        .send()
        .await
        .expect("put");
    assert_eq!(problem(r).await.1, "invalid_definition");
    let r = client
        .get(t.url("/v1/sagas/definitions/bad"))
        .send()
        .await
        .expect("get");
    assert_eq!(problem(r).await.1, "definition_not_found");

    // A participant answering garbage: the step "succeeds" with a text output, the
    // next step can't use it, and the saga compensates — with its state intact.
    a.set_fault(Fault::Garbage, 1);
    let id = start_saga(
        &client,
        &t,
        json!({"from": "alice", "to": "bob", "amount": 10}),
    )
    .await;
    let saga = wait_saga(&client, &t, &id).await;
    assert_eq!(saga["status"], "compensated", "{saga:#}");
    assert_eq!(saga["steps"][0]["output"], "<html>not json</html>");
    assert!(
        saga["error"]
            .as_str()
            .expect("error")
            .contains("steps.debit.output.ref"),
        "{saga:#}"
    );
    assert_eq!((a.balance("alice"), b.balance("bob")), (1000, 1000));
}

/// `kill -9` at each boundary of a saga; after a restart every saga ends completed
/// or fully compensated, and money is conserved.
#[tokio::test]
async fn kill_9_at_every_boundary() {
    let points = [
        ("saga.before_action:debit", "bob"),
        ("saga.after_action:debit", "bob"),
        ("saga.before_action:credit", "bob"),
        ("saga.after_action:credit", "bob"),
        ("saga.before_action:receipt", "bob"),
        // The credit is refused (no account): crash inside compensation.
        ("saga.before_compensation:debit", "nobody"),
        ("saga.after_compensation:debit", "nobody"),
    ];
    for (point, to) in points {
        let (a, b) = banks().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = Trellis::start_with_env(
            dir.path(),
            &config(&a, &b),
            &[(trellis_core::crashpoint::ENV, point)],
        )
        .await;
        let client = reqwest::Client::new();
        let id = start_saga(
            &client,
            &t,
            json!({"from": "alice", "to": to, "amount": 30}),
        )
        .await;
        let marker = trellis_core::crashpoint::marker(point);
        let mut reached = false;
        for _ in 0..500 {
            if t.stderr().contains(&marker) {
                reached = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(reached, "{point} not reached; stderr:\n{}", t.stderr());
        t.kill9().await;

        let t = Trellis::start_in(dir.path(), &config(&a, &b)).await;
        let saga = wait_saga(&client, &t, &id).await;
        let status = saga["status"].as_str().expect("status");
        let total = a.total() + b.total();
        assert_eq!(total, 4000, "{point}: money not conserved: {saga:#}");
        match to {
            "bob" => {
                assert_eq!(status, "completed", "{point}: {saga:#}");
                assert_eq!(
                    (a.balance("alice"), b.balance("bob")),
                    (970, 1030),
                    "{point}"
                );
            }
            _ => {
                assert_eq!(status, "compensated", "{point}: {saga:#}");
                assert_eq!(a.balance("alice"), 1000, "{point}");
            }
        }
    }
}

/// Concurrent transfers both ways between two services, with random participant
/// failures (some applied with their answer lost) and the sidecar killed twice:
/// every saga ends completed or compensated and the total is conserved.
#[tokio::test]
async fn money_is_conserved_through_failures_and_crashes() {
    let (a, b) = banks().await;
    a.set_random_fault(0.15);
    b.set_random_fault(0.15);
    a.set_latency(Duration::from_millis(10));
    b.set_latency(Duration::from_millis(10));
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(&a, &b);
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    let mut t = Trellis::start_in(dir.path(), &cfg).await;
    for round in 0..3u64 {
        let mut starts = Vec::new();
        for i in 0..20u64 {
            let (from, to) = if i % 2 == 0 {
                ("alice", "bob")
            } else {
                ("carol", "nobody")
            };
            let amount = 1 + (i * 7 + round) % 40;
            let client = client.clone();
            let url = t.url("/v1/sagas/transfer");
            starts.push(tokio::spawn(async move {
                let r = client
                    .post(url)
                    .json(&json!({"input": {"from": from, "to": to, "amount": amount}}))
                    .send()
                    .await
                    .ok()?;
                let body: Value = r.json().await.ok()?;
                body["id"].as_str().map(str::to_owned)
            }));
        }
        for s in starts {
            if let Ok(Some(id)) = s.await {
                ids.push(id);
            }
        }
        // Crash mid-flight, then start again on the same data.
        tokio::time::sleep(Duration::from_millis(30 * round)).await;
        t.kill9().await;
        t = Trellis::start_in(dir.path(), &cfg).await;
    }
    assert!(ids.len() >= 40, "only {} sagas started", ids.len());
    let mut ended = std::collections::BTreeMap::<String, usize>::new();
    let mut retried = 0;
    for id in &ids {
        let saga = wait_saga(&client, &t, id).await;
        let status = saga["status"].as_str().expect("status");
        assert!(
            status == "completed" || status == "compensated",
            "saga {id} ended {status}: {saga:#}"
        );
        *ended.entry(status.to_owned()).or_default() += 1;
        retried += saga["history"]
            .as_array()
            .expect("history")
            .iter()
            .filter(|h| h["event"] == "action_failed" || h["event"] == "compensation_failed")
            .count();
    }
    eprintln!(
        "{} sagas: {ended:?}, {retried} failed calls retried",
        ids.len()
    );
    assert!(retried > 0, "the random faults never hit");
    assert!(
        t.stderr().contains("resumed in-flight sagas"),
        "no crash landed mid-saga"
    );
    assert_eq!(a.total() + b.total(), 4000, "money created or destroyed");
}
