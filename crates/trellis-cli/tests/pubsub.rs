//! Black-box: pub/sub over HTTP through the real binary — publishing in every mode,
//! pull consumers, bad input, dead letters, and push delivery to a real app server.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Trellis, client};
use trellis_proxy::testing::{Behavior, Received, Script, Upstream};

async fn post(t: &Trellis, path: &str, body: Value) -> (u16, Value) {
    let response = client()
        .post(t.url(path))
        .json(&body)
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
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn pull(t: &Trellis, group: &str, topic: &str, max: usize, wait_ms: u64) -> Vec<Value> {
    let (status, body) = post(
        t,
        &format!("/v1/pubsub/default/subscriptions/{group}/pull"),
        json!({"topic": topic, "max": max, "wait_ms": wait_ms}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["messages"].as_array().expect("messages").clone()
}

async fn settle(t: &Trellis, group: &str, how: &str, ids: &[&str]) -> (u16, Value) {
    post(
        t,
        &format!("/v1/pubsub/default/subscriptions/{group}/{how}"),
        json!({ "ack_ids": ids }),
    )
    .await
}

fn ack_ids(messages: &[Value]) -> Vec<&str> {
    messages
        .iter()
        .map(|m| m["ack_id"].as_str().expect("ack_id"))
        .collect()
}

#[tokio::test]
async fn publish_in_every_mode_then_pull_and_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;

    // Structured mode.
    let response = client()
        .post(t.url("/v1/publish/default/orders"))
        .header("content-type", "application/cloudevents+json")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .body(r#"{"specversion":"1.0","id":"o-1","source":"/shop","type":"order.created","partitionkey":"c-7","data":{"total":5}}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 201);
    let receipt: Value = response.json().await.expect("json");
    assert_eq!(
        (
            receipt["id"].as_str(),
            receipt["position"].as_u64(),
            receipt["durability"].as_str()
        ),
        (Some("o-1"), Some(0), Some("fsync"))
    );
    assert_eq!(receipt["duplicate"], false);

    // Binary mode: attributes in ce-* headers, the body is the data.
    let response = client()
        .post(t.url("/v1/publish/default/orders"))
        .header("content-type", "application/json")
        .header("ce-id", "o-2")
        .header("ce-type", "order.paid")
        .header("ce-source", "/billing")
        .body(r#"{"amount":5}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 201);

    // Raw: any body becomes the data of a new event.
    let response = client()
        .post(t.url("/v1/publish/default/orders"))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 201);
    let raw: Value = response.json().await.expect("json");
    assert_eq!(
        raw["id"].as_str().map(str::len),
        Some(36),
        "an id is generated"
    );

    // Bulk.
    let (status, bulk) = post(
        &t,
        "/v1/publish/default/orders/bulk",
        json!([{"id": "o-3", "data": 3}, {"id": "o-4", "data": 4}]),
    )
    .await;
    assert_eq!(status, 201, "{bulk}");
    assert_eq!(bulk["results"].as_array().map(Vec::len), Some(2));
    assert_eq!(bulk["results"][1]["position"], 4);

    let messages = pull(&t, "billing", "orders", 10, 1000).await;
    assert_eq!(messages.len(), 5);
    let first = &messages[0]["event"];
    assert_eq!(
        (
            first["id"].as_str(),
            first["type"].as_str(),
            first["partitionkey"].as_str()
        ),
        (Some("o-1"), Some("order.created"), Some("c-7"))
    );
    assert_eq!(first["data"]["total"], 5);
    assert!(
        first["traceparent"]
            .as_str()
            .is_some_and(|t| t.contains("4bf92f3577b34da6a3ce929d0e0e4736")),
        "the publisher's trace is kept: {first}"
    );
    assert_eq!(messages[0]["key"], "c-7");
    let binary = &messages[1]["event"];
    assert_eq!(
        (
            binary["source"].as_str(),
            binary["datacontenttype"].as_str()
        ),
        (Some("/billing"), Some("application/json"))
    );
    assert_eq!(binary["data"]["amount"], 5);
    let raw = &messages[2]["event"];
    assert_eq!(
        (raw["type"].as_str(), raw["data"].as_str()),
        (Some("trellis.orders"), Some("hello"))
    );

    let (status, body) = settle(&t, "billing", "ack", &ack_ids(&messages)).await;
    assert_eq!(status, 200, "{body}");
    assert!(pull(&t, "billing", "orders", 10, 0).await.is_empty());
    // Another group gets everything.
    assert_eq!(pull(&t, "audit", "orders", 10, 0).await.len(), 5);

    let (status, stats) = get(&t, "/v1/pubsub/default/topics/orders").await;
    assert_eq!(status, 200);
    assert_eq!(
        (stats["head"].as_u64(), stats["backend"].as_str()),
        (Some(5), Some("embedded"))
    );
    let groups = stats["groups"].as_array().expect("groups");
    let billing = groups
        .iter()
        .find(|g| g["group"] == "billing")
        .expect("billing");
    let audit = groups
        .iter()
        .find(|g| g["group"] == "audit")
        .expect("audit");
    assert_eq!(
        (
            billing["lag"].as_u64(),
            audit["lag"].as_u64(),
            audit["in_flight"].as_u64()
        ),
        (Some(0), Some(5), Some(5))
    );
}

#[tokio::test]
async fn bad_input_gets_stable_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "max_body_size = \"64KiB\"\n").await;
    let code = |v: &Value| v["code"].as_str().unwrap_or_default().to_owned();

    let (status, body) = post(&t, "/v1/publish/nope/orders", json!({})).await;
    assert_eq!(
        (status, code(&body)),
        (404, "pubsub_not_found".into()),
        "{body}"
    );

    for (content_type, body, expected) in [
        (
            "application/cloudevents+json",
            r#"{"specversion":"0.3"}"#,
            "invalid_event",
        ),
        (
            "application/cloudevents+json",
            r#"{"id": 5}"#,
            "invalid_event",
        ),
        (
            "application/cloudevents+json",
            r#"{"id": "#,
            "invalid_event",
        ),
        ("application/cloudevents+json", r#"[1]"#, "invalid_event"),
        (
            "application/cloudevents-batch+json",
            r#"[]"#,
            "invalid_event",
        ),
    ] {
        let response = client()
            .post(t.url("/v1/publish/default/orders"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("send");
        let status = response.status().as_u16();
        let problem: Value = response.json().await.expect("problem");
        assert_eq!(
            (status, code(&problem)),
            (400, expected.to_owned()),
            "{body}: {problem}"
        );
    }
    let response = client()
        .post(t.url("/v1/publish/default/orders"))
        .header("ce-specversion", "2.0")
        .body("x")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 400);

    let (status, body) = post(&t, "/v1/publish/default/bad%20topic", json!({})).await;
    assert_eq!(
        (status, code(&body)),
        (400, "invalid_topic".into()),
        "{body}"
    );

    let (status, body) = post(
        &t,
        "/v1/publish/default/orders/bulk",
        json!([{"id": "a"}, {"specversion": "9"}]),
    )
    .await;
    assert_eq!(
        (status, code(&body), body["index"].as_u64()),
        (400, "invalid_event".into(), Some(1)),
        "{body}"
    );
    let (status, body) = post(&t, "/v1/publish/default/orders/bulk", json!({"id": "a"})).await;
    assert_eq!(
        (status, code(&body)),
        (400, "invalid_body".into()),
        "{body}"
    );
    assert_eq!(
        get(&t, "/v1/pubsub/default/topics/orders").await.1["head"],
        0,
        "a failed bulk stores nothing"
    );

    let big = "x".repeat(100 * 1024);
    let response = client()
        .post(t.url("/v1/publish/default/orders"))
        .body(big)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 413);

    for (body, expected) in [
        (json!({"topic": "orders", "max": 0}), "invalid_body"),
        (
            json!({"topic": "orders", "wait_ms": 600_000}),
            "invalid_body",
        ),
        (json!({"topic": "orders", "bogus": 1}), "invalid_body"),
        (json!({"topic": "a b"}), "invalid_topic"),
        (
            json!({"topic": "orders", "max_deliveries": 0}),
            "invalid_body",
        ),
    ] {
        let (status, problem) =
            post(&t, "/v1/pubsub/default/subscriptions/g/pull", body.clone()).await;
        assert_eq!(
            (status, code(&problem)),
            (400, expected.to_owned()),
            "{body}: {problem}"
        );
    }

    let (status, body) = settle(&t, "g", "ack", &["garbage"]).await;
    assert_eq!(
        (status, code(&body)),
        (404, "ack_id_not_found".into()),
        "{body}"
    );
    let (status, _) = post(&t, "/v1/publish/default/orders", json!({"n": 1})).await;
    assert_eq!(status, 201);
    let messages = pull(&t, "g", "orders", 1, 1000).await;
    let id = ack_ids(&messages)[0].to_owned();
    assert_eq!(settle(&t, "g", "ack", &[&id]).await.0, 200);
    let (status, body) = settle(&t, "g", "ack", &[&id]).await;
    assert_eq!(
        (status, code(&body)),
        (410, "ack_id_expired".into()),
        "{body}"
    );
    assert_eq!(body["results"][0]["outcome"], "expired");
    let (status, body) = post(
        &t,
        "/v1/pubsub/default/subscriptions/g/ack",
        json!({"ack_ids": [id], "delay_ms": 5}),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (400, "invalid_body".into()),
        "{body}"
    );
    let (status, body) = post(
        &t,
        "/v1/pubsub/default/subscriptions/g/extend",
        json!({"ack_ids": [id]}),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (400, "invalid_body".into()),
        "{body}"
    );
}

#[tokio::test]
async fn dedupe_dead_letters_and_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;
    let event = json!({"id": "same", "data": 1});
    let send = |e: Value| {
        let t = &t;
        async move {
            let r = client()
                .post(t.url("/v1/publish/default/jobs"))
                .header("content-type", "application/cloudevents+json")
                .json(&e)
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 201);
            r.json::<Value>().await.expect("json")
        }
    };
    assert_eq!(send(event.clone()).await["duplicate"], false);
    let again = send(event).await;
    assert_eq!(
        (again["duplicate"].as_bool(), again["position"].as_u64()),
        (Some(true), Some(0))
    );
    send(json!({"id": "other", "data": 2})).await;

    let messages = pull(&t, "workers", "jobs", 10, 1000).await;
    assert_eq!(messages.len(), 2, "stored once");
    let (status, body) = post(
        &t,
        "/v1/pubsub/default/subscriptions/workers/reject",
        json!({"ack_ids": ack_ids(&messages), "reason": "schema v1 unsupported"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let dead = pull(&t, "ops", "jobs.dlq", 10, 1000).await;
    assert_eq!(dead.len(), 2);
    assert_eq!(
        dead[0]["event"]["deadletterreason"],
        "schema v1 unsupported"
    );
    assert_eq!(dead[0]["event"]["deadlettersource"], "jobs");
    assert_eq!(dead[0]["event"]["deadlettergroup"], "workers");

    // A nack on the last allowed delivery dead-letters too (per-pull override).
    let (_, _) = post(&t, "/v1/publish/default/jobs2", json!({"x": 1})).await;
    let body = json!({"topic": "jobs2", "max_deliveries": 1, "wait_ms": 1000});
    let (_, pulled) = post(&t, "/v1/pubsub/default/subscriptions/w/pull", body).await;
    let id = pulled["messages"][0]["ack_id"]
        .as_str()
        .expect("ack id")
        .to_owned();
    assert_eq!(settle(&t, "w", "nack", &[&id]).await.0, 200);
    let dead = pull(&t, "ops", "jobs2.dlq", 10, 2000).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["event"]["deliverycount"], 1);

    let (status, replayed) = post(
        &t,
        "/v1/pubsub/default/topics/jobs/dead-letters/replay",
        json!({}),
    )
    .await;
    assert_eq!(
        (status, replayed["replayed"].as_u64()),
        (200, Some(2)),
        "{replayed}"
    );
    let again = pull(&t, "workers", "jobs", 10, 1000).await;
    assert_eq!(again.len(), 2);
    assert!(
        again
            .iter()
            .all(|m| m["event"].get("deadletterreason").is_none())
    );
    let (_, stats) = get(&t, "/v1/pubsub/default/topics/jobs").await;
    let workers = stats["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["group"] == "workers")
        .cloned()
        .expect("workers");
    assert_eq!(workers["dead_lettered"], 2);
}

fn n_of(r: &Received) -> u64 {
    let event: Value = serde_json::from_slice(&r.body).expect("a structured CloudEvent");
    event["data"]["n"].as_u64().expect("n")
}

/// The app: n = 1 is poison (DROP); n = 2 fails once with 503; n = 3 asks to RETRY
/// once; everything else succeeds.
fn app_script() -> Behavior {
    let seen = Arc::new(std::sync::Mutex::new(
        std::collections::HashMap::<u64, u32>::new(),
    ));
    Behavior::Script(Script(Arc::new(move |r: &Received| {
        let n = n_of(r);
        let mut seen = seen.lock().expect("lock");
        let count = seen.entry(n).or_default();
        *count += 1;
        match (n, *count) {
            (1, _) => (200, r#"{"status":"DROP"}"#.to_owned()),
            (2, 1) => (503, String::new()),
            (3, 1) => (200, r#"{"status":"RETRY"}"#.to_owned()),
            _ => (200, r#"{"status":"SUCCESS"}"#.to_owned()),
        }
    })))
}

async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn push_delivery_to_a_real_app() {
    let app = Upstream::start("billing", app_script()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[apps.billing]\ninstances = [{:?}]\n\n\
         [components.pubsub.default]\ntype = \"embedded\"\nsubscriptions = {{ min_backoff = \"50ms\", max_backoff = \"200ms\" }}\n\n\
         [subscriptions.invoices]\ntopic = \"orders\"\napp = \"billing\"\nroute = \"/events/orders\"\nmax_in_flight = 4\n",
        app.url
    );
    let mut t = Trellis::start_in(dir.path(), &config).await;
    for n in 0..10 {
        let (status, body) = post(&t, "/v1/publish/default/orders", json!({"n": n})).await;
        assert_eq!(status, 201, "{body}");
    }
    eventually("every message settled", || async {
        let (_, stats) = get(&t, "/v1/pubsub/default/topics/orders").await;
        stats["groups"][0]["lag"] == 0
    })
    .await;
    let received = app.received();
    assert!(
        received
            .iter()
            .all(|r| r.method == "POST" && r.uri == "/events/orders")
    );
    assert!(
        received
            .iter()
            .all(|r| r.header("content-type") == Some("application/cloudevents+json"))
    );
    assert!(
        received
            .iter()
            .all(|r| r.header("traceparent").is_some() && r.header("x-request-id").is_some())
    );
    let count = |n: u64| received.iter().filter(|r| n_of(r) == n).count();
    assert_eq!(
        (count(0), count(1), count(2), count(3), count(9)),
        (1, 1, 2, 2, 1),
        "503 and RETRY redeliver; DROP does not"
    );
    let retried: Vec<&str> = received
        .iter()
        .filter(|r| n_of(r) == 2)
        .filter_map(|r| r.header("trellis-delivery-attempt"))
        .collect();
    assert_eq!(retried, ["1", "2"]);
    let dead = pull(&t, "ops", "orders.dlq", 10, 1000).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["event"]["data"]["n"], 1);
    assert_eq!(
        dead[0]["event"]["deadletterreason"],
        "the app answered DROP"
    );

    let (status, subs) = get(&t, "/v1/subscriptions").await;
    assert_eq!(status, 200);
    let invoices = &subs["subscriptions"][0];
    assert_eq!(
        (
            invoices["name"].as_str(),
            invoices["origin"].as_str(),
            invoices["acked"].as_u64(),
            invoices["dropped"].as_u64()
        ),
        (Some("invoices"), Some("config"), Some(9), Some(1))
    );
    assert_eq!(invoices["settings"]["max_in_flight"], 4);

    // A subscription declared through the API, kept across a restart.
    let response = client()
        .put(t.url("/v1/subscriptions/audit"))
        .json(
            &json!({"topic": "orders", "app": "billing", "route": "/audit", "ack_deadline": "5s"}),
        )
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 201);
    let code = |v: Value| v["code"].as_str().unwrap_or_default().to_owned();
    let response = client()
        .put(t.url("/v1/subscriptions/invoices"))
        .json(&json!({"topic": "orders", "app": "billing", "route": "/x"}))
        .send()
        .await
        .expect("send");
    assert_eq!(
        (
            response.status().as_u16(),
            code(response.json().await.expect("json"))
        ),
        (409, "subscription_in_config".into())
    );
    let response = client()
        .put(t.url("/v1/subscriptions/bad"))
        .json(&json!({"topic": "orders", "app": "nobody", "route": "x"}))
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    let problem: Value = response.json().await.expect("json");
    assert_eq!(
        (status, problem["code"].as_str()),
        (400, Some("invalid_subscription")),
        "{problem}"
    );
    assert!(
        problem["fields"]["app"].is_string() && problem["fields"]["route"].is_string(),
        "{problem}"
    );
    eventually("the audit group catches up", || async {
        app.received().iter().filter(|r| r.uri == "/audit").count() >= 10
    })
    .await;

    t.signal("TERM");
    t.wait(Duration::from_secs(20)).await;
    let t = Trellis::start_in(dir.path(), &config).await;
    let (_, subs) = get(&t, "/v1/subscriptions/audit").await;
    assert_eq!(
        (subs["origin"].as_str(), subs["route"].as_str()),
        (Some("api"), Some("/audit")),
        "{subs}"
    );
    let before = app.received().len();
    let (status, _) = post(&t, "/v1/publish/default/orders", json!({"n": 100})).await;
    assert_eq!(status, 201);
    eventually("both subscriptions deliver after the restart", || async {
        let r = app.received();
        r[before..].iter().filter(|r| n_of(r) == 100).count() == 2
    })
    .await;
    let response = client()
        .delete(t.url("/v1/subscriptions/audit"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 204);
    assert_eq!(get(&t, "/v1/subscriptions/audit").await.0, 404);
}

#[tokio::test]
async fn cli_publish_and_subscribe() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;
    let url = t.url("");
    let env = [("TRELLIS_URL", url.as_str())];
    let (code, out, err) = support::run(
        &[
            "publish",
            "default",
            "news",
            r#"{"headline":"hi"}"#,
            "--key",
            "eu/west",
            "--type",
            "news.posted",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    let receipt: Value = serde_json::from_str(out.trim()).expect("receipt");
    assert_eq!(
        (receipt["position"].as_u64(), receipt["durability"].as_str()),
        (Some(0), Some("fsync"))
    );
    let (code, _, err) = support::run(&["publish", "default", "news", "plain text"], &env);
    assert_eq!(code, 0, "{err}");

    let (code, out, err) = support::run(
        &[
            "subscribe",
            "default",
            "news",
            "--group",
            "reader",
            "--count",
            "2",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (lines[0]["type"].as_str(), lines[0]["partitionkey"].as_str()),
        (Some("news.posted"), Some("eu/west"))
    );
    assert_eq!(lines[0]["data"]["headline"], "hi");
    assert_eq!(lines[1]["datacontenttype"], "text/plain; charset=utf-8");
    assert_eq!(lines[1]["data"], "plain text");
    // Acknowledged: the group has nothing left.
    assert!(pull(&t, "reader", "news", 10, 0).await.is_empty());

    let (code, _, err) = support::run(&["publish", "nope", "news", "x"], &env);
    assert_eq!(code, 1);
    assert!(err.contains("404 pubsub_not_found"), "{err}");
}

/// Publish, pull, nack, ack and stats through the sidecar on an external backend.
async fn through_the_sidecar(component: &str, backend: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), component).await;
    let (status, body) = post(
        &t,
        "/v1/publish/default/orders/bulk",
        json!([{"id": "a", "data": {"n": 0}}, {"id": "b", "data": {"n": 1}}]),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["durability"], "broker");
    let (_, again) = post(
        &t,
        "/v1/publish/default/orders/bulk",
        json!([{"id": "a", "data": {"n": 0}}]),
    )
    .await;
    assert_eq!(again["results"][0]["duplicate"], true, "{again}");
    let messages = pull(&t, "g", "orders", 10, 5000).await;
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["event"]["data"]["n"], 0);
    let (status, _) = post(
        &t,
        "/v1/pubsub/default/subscriptions/g/nack",
        json!({"ack_ids": [messages[0]["ack_id"]], "delay_ms": 0}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = settle(
        &t,
        "g",
        "ack",
        &[messages[1]["ack_id"].as_str().expect("id")],
    )
    .await;
    assert_eq!(status, 200);
    let redelivered = pull(&t, "g", "orders", 10, 5000).await;
    assert_eq!(
        (redelivered.len(), redelivered[0]["attempt"].as_u64()),
        (1, Some(2))
    );
    assert_eq!(settle(&t, "g", "ack", &ack_ids(&redelivered)).await.0, 200);
    let (status, stats) = get(&t, "/v1/pubsub/default/topics/orders").await;
    assert_eq!(
        (status, stats["backend"].as_str()),
        (200, Some(backend)),
        "{stats}"
    );
    let g = stats["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["group"] == "g")
        .cloned()
        .expect("g");
    assert_eq!(
        (g["lag"].as_u64(), g["in_flight"].as_u64()),
        (Some(0), Some(0)),
        "{stats}"
    );
    let (_, ready) = get(&t, "/readyz").await;
    assert_eq!(ready["components"]["pubsub.default"], "ok", "{ready}");
}

#[tokio::test]
async fn redis_backend_through_the_sidecar() {
    if !trellis_core::testing::services_enabled("Redis") {
        return;
    }
    let prefix = trellis_core::testing::unique_name("sidecar");
    let component = format!(
        "[components.pubsub.default]\ntype = \"redis\"\nurl = {:?}\nkey_prefix = \"{prefix}:\"\n",
        trellis_core::testing::redis_url()
    );
    through_the_sidecar(&component, "redis").await;
}

#[tokio::test]
async fn nats_backend_through_the_sidecar() {
    if !trellis_core::testing::services_enabled("NATS JetStream") {
        return;
    }
    let prefix = trellis_core::testing::unique_name("sidecar");
    let component = format!(
        "[components.pubsub.default]\ntype = \"nats\"\nurl = {:?}\nstream_prefix = \"{prefix}\"\n",
        trellis_core::testing::nats_url()
    );
    through_the_sidecar(&component, "nats").await;
    // Leave the server as we found it.
    let client = async_nats::connect(trellis_core::testing::nats_url())
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client);
    for topic in ["orders", "orders.dlq"] {
        let _ = js
            .delete_stream(trellis_pubsub::nats::stream_name(&prefix, topic))
            .await;
    }
}
