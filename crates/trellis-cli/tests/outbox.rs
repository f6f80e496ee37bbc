//! Black-box: the transactional outbox through the real binary — messages committed
//! with a state transaction are published, also across a `kill -9` between commit
//! and relay or between publish and delete (the dedupe window keeps one copy), on
//! the embedded and the PostgreSQL state backends; bad input writes nothing.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Trellis, client};
use trellis_core::crashpoint;
use trellis_core::testing::{postgres_url, services_enabled, unique_name};

async fn post(t: &Trellis, path: &str, body: &Value) -> (u16, Value) {
    let response = client()
        .post(t.url(path))
        .header("x-request-id", "req-outbox-1")
        .json(body)
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    let text = response.text().await.expect("text");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn get(t: &Trellis, path: &str) -> (u16, Value) {
    let response = client().get(t.url(path)).send().await.expect("send");
    let status = response.status().as_u16();
    let text = response.text().await.expect("text");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn transaction(t: &Trellis, body: &Value) -> (u16, Value) {
    post(t, "/v1/state/default/transaction", body).await
}

/// Pulls for `group`, waiting up to `wait_ms` for the first message, and acks what
/// it got; returns the events.
async fn pull(t: &Trellis, group: &str, topic: &str, wait_ms: u64) -> Vec<Value> {
    let (status, body) = post(
        t,
        &format!("/v1/pubsub/default/subscriptions/{group}/pull"),
        &json!({"topic": topic, "max": 100, "wait_ms": wait_ms}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let messages = body["messages"].as_array().expect("messages").clone();
    if !messages.is_empty() {
        let ack_ids: Vec<&str> = messages
            .iter()
            .map(|m| m["ack_id"].as_str().expect("ack_id"))
            .collect();
        let (status, body) = post(
            t,
            &format!("/v1/pubsub/default/subscriptions/{group}/ack"),
            &json!({ "ack_ids": ack_ids }),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    messages.into_iter().map(|m| m["event"].clone()).collect()
}

/// Every message the group gets within `wait_ms` of the last one.
async fn drain(t: &Trellis, group: &str, topic: &str, wait_ms: u64) -> Vec<Value> {
    let mut events = pull(t, group, topic, wait_ms).await;
    loop {
        let more = pull(t, group, topic, 1500).await;
        if more.is_empty() {
            return events;
        }
        events.extend(more);
    }
}

/// How many messages the topic holds.
async fn topic_head(t: &Trellis, topic: &str) -> u64 {
    let (status, stats) = get(t, &format!("/v1/pubsub/default/topics/{topic}")).await;
    assert_eq!(status, 200, "{stats}");
    stats["head"].as_u64().expect("head")
}

/// A metric's value, e.g. `metric(t, "trellis_outbox_relayed_total{store=\"default\"}")`.
async fn metric(t: &Trellis, series: &str) -> Option<f64> {
    let text = client()
        .get(t.url("/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .filter(|rest| rest.starts_with(' '))
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// Waits until the relay of `default` relayed `n` messages (in this process).
async fn wait_relayed(t: &Trellis, n: f64) {
    for _ in 0..200 {
        if metric(t, "trellis_outbox_relayed_total{store=\"default\"}").await >= Some(n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the outbox did not relay {n} messages within 10s; stderr:\n{}",
        t.stderr()
    );
}

async fn wait_for_crash_point(t: &Trellis, point: &str) {
    let marker = crashpoint::marker(point);
    for _ in 0..400 {
        if t.stderr().contains(&marker) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "crash point {point} not reached within 10s; stderr:\n{}",
        t.stderr()
    );
}

fn published(body: &Value) -> Vec<String> {
    body["published"]
        .as_array()
        .unwrap_or_else(|| panic!("no `published` in {body}"))
        .iter()
        .map(|id| id.as_str().expect("id").to_owned())
        .collect()
}

fn order_transaction() -> Value {
    json!({
        "operations": [
            {"op": "upsert", "key": "order/1", "value": {"total": 5}},
            {"op": "upsert", "key": "stock/apple", "value": 3},
        ],
        "publish": [
            {"pubsub": "default", "topic": "orders", "type": "order.created", "data": {"order": 1, "total": 5}, "ordering_key": "customer-7", "subject": "order/1"},
            {"pubsub": "default", "topic": "stock", "data": {"apple": 3}},
        ],
    })
}

#[tokio::test]
async fn a_transaction_writes_its_keys_and_publishes_its_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;

    let (status, body) = transaction(&t, &order_transaction()).await;
    assert_eq!(status, 200, "{body}");
    let ids = published(&body);
    assert_eq!(ids.len(), 2);
    assert!(ids[0] < ids[1], "ids sort in publish order: {ids:?}");
    assert_eq!(body["results"][0]["key"], "order/1");
    assert_eq!(body["results"].as_array().map(Vec::len), Some(2));

    let (status, order) = get(&t, "/v1/state/default/order/1").await;
    assert_eq!((status, order), (200, json!({"total": 5})));
    let (status, stock) = get(&t, "/v1/state/default/stock/apple").await;
    assert_eq!((status, stock), (200, json!(3)));

    let orders = drain(&t, "billing", "orders", 10_000).await;
    assert_eq!(orders.len(), 1, "{orders:?}");
    let event = &orders[0];
    assert_eq!(event["id"], ids[0].as_str());
    assert_eq!(event["type"], "order.created");
    assert_eq!(event["source"], "/trellis/outbox/default");
    assert_eq!(event["subject"], "order/1");
    assert_eq!(event["partitionkey"], "customer-7");
    assert_eq!(event["correlationid"], "req-outbox-1");
    assert_eq!(event["data"], json!({"order": 1, "total": 5}));
    assert!(event["time"].is_string(), "{event}");
    assert!(event["traceparent"].is_string(), "{event}");

    let stock = drain(&t, "billing", "stock", 10_000).await;
    assert_eq!(stock.len(), 1, "{stock:?}");
    assert_eq!(stock[0]["id"], ids[1].as_str());
    assert_eq!(stock[0]["type"], "trellis.stock");
    assert_eq!(stock[0]["data"], json!({"apple": 3}));

    // Relayed messages leave the outbox.
    wait_relayed(&t, 2.0).await;
    assert_eq!(
        metric(&t, "trellis_outbox_pending{store=\"default\"}").await,
        Some(0.0)
    );
    // Without `publish` the response still says what was published: nothing.
    let (status, body) = transaction(
        &t,
        &json!({"operations": [{"op": "delete", "key": "stock/apple"}]}),
    )
    .await;
    assert_eq!((status, body["published"].clone()), (200, json!([])));
}

#[tokio::test]
async fn a_crash_between_commit_and_relay_publishes_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t =
        Trellis::start_with_env(dir.path(), "", &[(crashpoint::ENV, "outbox.before_relay")]).await;
    let (status, body) = transaction(&t, &order_transaction()).await;
    assert_eq!(status, 200, "{body}");
    let ids = published(&body);
    wait_for_crash_point(&t, "outbox.before_relay").await;

    // Committed, not yet published; the outbox keys are there but hidden.
    assert_eq!(topic_head(&t, "orders").await, 0);
    let (status, listing) = get(&t, "/v1/state/default").await;
    assert_eq!(status, 200);
    assert_eq!(listing["keys"], json!(["order/1", "stock/apple"]));
    let (status, listing) = get(&t, "/v1/state/default?prefix=__trellis/").await;
    assert_eq!((status, listing["keys"].clone()), (200, json!([])));
    let (status, problem) = get(
        &t,
        &format!("/v1/state/default/__trellis/outbox/{}", ids[0]),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (400, Some("reserved_key"))
    );

    t.kill9().await;
    let t = Trellis::start_in(dir.path(), "").await;

    let orders = drain(&t, "billing", "orders", 10_000).await;
    let got: Vec<&str> = orders.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(got, [ids[0].as_str()], "exactly once");
    let stock = drain(&t, "billing", "stock", 10_000).await;
    let got: Vec<&str> = stock.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(got, [ids[1].as_str()], "exactly once");
    assert_eq!(topic_head(&t, "orders").await, 1);
    let (status, order) = get(&t, "/v1/state/default/order/1").await;
    assert_eq!((status, order), (200, json!({"total": 5})));
    wait_relayed(&t, 2.0).await;
}

#[tokio::test]
async fn a_crash_between_publish_and_delete_is_deduped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t =
        Trellis::start_with_env(dir.path(), "", &[(crashpoint::ENV, "outbox.after_publish")]).await;
    let body = json!({
        "operations": [{"op": "upsert", "key": "order/2", "value": {"total": 9}}],
        "publish": [{"pubsub": "default", "topic": "orders", "data": {"order": 2}}],
    });
    let (status, body) = transaction(&t, &body).await;
    assert_eq!(status, 200, "{body}");
    let ids = published(&body);
    wait_for_crash_point(&t, "outbox.after_publish").await;
    // Published, but still in the outbox.
    assert_eq!(topic_head(&t, "orders").await, 1);

    t.kill9().await;
    let t = Trellis::start_in(dir.path(), "").await;
    // The relay publishes it again (and deletes it this time) ...
    wait_relayed(&t, 1.0).await;
    // ... and the dedupe window stored it once.
    assert_eq!(topic_head(&t, "orders").await, 1);
    let orders = drain(&t, "billing", "orders", 10_000).await;
    let got: Vec<&str> = orders.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(got, [ids[0].as_str()]);
    assert_eq!(orders[0]["data"], json!({"order": 2}));
    assert_eq!(
        metric(&t, "trellis_outbox_pending{store=\"default\"}").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn postgres_state_commits_messages_with_the_writes() {
    if !services_enabled("postgres") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[components.state.default]\ntype = \"postgres\"\nurl = {:?}\nschema = \"{}\"\n",
        postgres_url(),
        unique_name("outbox")
    );
    let mut t = Trellis::start_with_env(
        dir.path(),
        &config,
        &[(crashpoint::ENV, "outbox.before_relay")],
    )
    .await;
    assert!(
        t.banner.contains("state.default (postgres)"),
        "{}",
        t.banner
    );

    let (status, body) = post(
        &t,
        "/v1/state/default/transaction",
        &json!({"operations": [{"op": "upsert", "key": "account/1", "value": 100}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let etag = body["results"][0]["etag"]
        .as_str()
        .expect("etag")
        .to_owned();

    // A failed precondition: nothing written, nothing to publish.
    let (status, problem) = transaction(
        &t,
        &json!({
            "operations": [
                {"op": "upsert", "key": "account/2", "value": 1},
                {"op": "upsert", "key": "account/1", "value": 50, "etag": "999999"},
            ],
            "publish": [{"pubsub": "default", "topic": "accounts", "data": {"lost": true}}],
        }),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("transaction_conflict")),
        "{problem}"
    );

    let (status, body) = transaction(
        &t,
        &json!({
            "operations": [
                {"op": "upsert", "key": "account/1", "value": 50, "etag": etag},
                {"op": "upsert", "key": "account/2", "value": 50},
            ],
            "publish": [{"pubsub": "default", "topic": "accounts", "type": "transfer.done", "data": {"from": 1, "to": 2, "amount": 50}}],
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let ids = published(&body);
    wait_for_crash_point(&t, "outbox.before_relay").await;
    assert_eq!(topic_head(&t, "accounts").await, 0);
    let (_, listing) = get(&t, "/v1/state/default").await;
    assert_eq!(listing["keys"], json!(["account/1", "account/2"]));

    t.kill9().await;
    let t = Trellis::start_in(dir.path(), &config).await;
    let events = drain(&t, "ledger", "accounts", 10_000).await;
    let got: Vec<&str> = events.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(
        got,
        [ids[0].as_str()],
        "only the committed transaction's message"
    );
    assert_eq!(events[0]["type"], "transfer.done");
    assert_eq!(topic_head(&t, "accounts").await, 1);
    let (status, value) = get(&t, "/v1/state/default/account/2").await;
    assert_eq!((status, value), (200, json!(50)));
    wait_relayed(&t, 1.0).await;
}

#[tokio::test]
async fn bad_input_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;
    let code = |v: &Value| v["code"].as_str().unwrap_or_default().to_owned();
    let with_publish = |message: Value| {
        json!({
            "operations": [{"op": "upsert", "key": "bad/1", "value": 1}],
            "publish": [{"pubsub": "default", "topic": "orders", "data": 1}, message],
        })
    };

    // Unknown component: the publish route's 404, with the message's index.
    let (status, body) = transaction(
        &t,
        &with_publish(json!({"pubsub": "nope", "topic": "orders", "data": 1})),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (404, "pubsub_not_found".into()),
        "{body}"
    );
    assert_eq!(body["index"], 1);
    assert_eq!(
        body["type"], "urn:trellis:problem:pubsub_not_found",
        "problem+json: {body}"
    );

    for (message, want_status, want_code) in [
        (
            json!({"pubsub": "default", "topic": "bad topic!", "data": 1}),
            400,
            "invalid_topic",
        ),
        (json!({"pubsub": "default", "data": 1}), 400, "invalid_body"),
        (
            json!({"pubsub": "default", "topic": "orders", "colour": "red"}),
            400,
            "invalid_body",
        ),
        (
            json!({"pubsub": "default", "topic": "orders", "data": 1, "ordering_key": 7}),
            400,
            "invalid_body",
        ),
        (
            json!({"pubsub": "default", "topic": "orders", "data": 1, "data_base64": "AQ=="}),
            400,
            "invalid_event",
        ),
        (
            json!({"pubsub": "default", "topic": "orders", "data_base64": "%%"}),
            400,
            "invalid_event",
        ),
        (
            json!({"pubsub": "default", "topic": "orders", "type": ""}),
            400,
            "invalid_event",
        ),
        (
            json!({"pubsub": "default", "topic": "orders", "data": "x".repeat(300 * 1024)}),
            413,
            "payload_too_large",
        ),
        (json!("not an object"), 400, "invalid_body"),
    ] {
        let (status, body) = transaction(&t, &with_publish(message.clone())).await;
        assert_eq!(
            (status, code(&body)),
            (want_status, want_code.to_owned()),
            "{message}: {body}"
        );
    }
    let (status, body) = transaction(
        &t,
        &json!({"operations": [{"op": "upsert", "key": "bad/1", "value": 1}], "publish": {}}),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (400, "invalid_body".into()),
        "{body}"
    );
    let many: Vec<Value> = (0..101)
        .map(|i| json!({"pubsub": "default", "topic": "orders", "data": i}))
        .collect();
    let (status, body) = transaction(
        &t,
        &json!({"operations": [{"op": "upsert", "key": "bad/1", "value": 1}], "publish": many}),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (400, "too_many_messages".into()),
        "{body}"
    );

    // Reserved keys: every way in is refused.
    let reserved = "__trellis/outbox/00000000-0000-7000-8000-000000000000";
    let (status, body) = transaction(
        &t,
        &json!({"operations": [
            {"op": "upsert", "key": "bad/1", "value": 1},
            {"op": "delete", "key": reserved},
        ]}),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (400, "reserved_key".into()),
        "{body}"
    );
    for method in ["GET", "PUT", "DELETE"] {
        let response = client()
            .request(
                method.parse().expect("method"),
                t.url("/v1/state/default/__trellis/anything"),
            )
            .body("1")
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 400, "{method}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(code(&body), "reserved_key", "{method}: {body}");
    }
    let (status, body) = post(
        &t,
        "/v1/state/default/bulk",
        &json!({"keys": ["bad/1", reserved]}),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (400, "reserved_key".into()),
        "{body}"
    );

    // None of it wrote anything, or published anything.
    let (status, body) = get(&t, "/v1/state/default/bad/1").await;
    assert_eq!((status, code(&body)), (404, "key_not_found".into()));
    let (_, listing) = get(&t, "/v1/state/default").await;
    assert_eq!(listing["keys"], json!([]));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(topic_head(&t, "orders").await, 0);
    assert_eq!(
        metric(&t, "trellis_outbox_pending{store=\"default\"}").await,
        Some(0.0)
    );
}
