//! Black-box: the event store over HTTP through the real binary.

mod support;

use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::{Value, json};
use support::{Trellis, client};

async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let text = response.text().await.expect("text");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post(t: &Trellis, path: &str, body: Value) -> (u16, Value) {
    send(client().post(t.url(path)).json(&body)).await
}

async fn get(t: &Trellis, path: &str) -> (u16, Value) {
    send(client().get(t.url(path))).await
}

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn append_read_and_concurrency_over_http() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;

    let id = "0b8d6a9e-7a3e-4f9e-9f54-1f0e2d3c4b5a";
    let body = json!({
        "expected_version": "no_stream",
        "events": [
            {"id": id, "type": "OrderPlaced", "data": {"total": 42}, "metadata": {"correlation_id": "req-1", "user": "ann"}},
            {"id": "3c2f1e0d-9b8a-4c7d-8e6f-5a4b3c2d1e0f", "type": "ItemAdded", "data": {"sku": "apple"}},
        ]
    });
    let (status, appended) = post(&t, "/v1/streams/order-1", body.clone()).await;
    assert_eq!(status, 201, "{appended}");
    assert_eq!(
        (
            appended["version"].as_u64(),
            appended["positions"]["first"].as_u64(),
            appended["positions"]["last"].as_u64()
        ),
        (Some(1), Some(0), Some(1))
    );
    // The same request again (a client retrying after a lost answer): idempotent,
    // because the client chose the ids.
    let (status, again) = post(&t, "/v1/streams/order-1", body).await;
    assert_eq!((status, &again), (201, &appended));

    let (status, conflict) = post(
        &t,
        "/v1/streams/order-1",
        json!({"expected_version": 0, "events": [{"type": "X"}]}),
    )
    .await;
    assert_eq!(
        (status, code(&conflict), conflict["actual_version"].as_u64()),
        (409, "wrong_expected_version", Some(1)),
        "{conflict}"
    );

    let (status, read) = get(&t, "/v1/streams/order-1").await;
    assert_eq!(status, 200);
    assert_eq!(read["version"], 1);
    let first = &read["events"][0];
    assert_eq!(
        (
            first["id"].as_str(),
            first["type"].as_str(),
            first["version"].as_u64()
        ),
        (Some(id), Some("OrderPlaced"), Some(0))
    );
    assert_eq!(first["data"]["total"], 42);
    assert_eq!(
        (
            first["metadata"]["correlation_id"].as_str(),
            first["metadata"]["user"].as_str()
        ),
        (Some("req-1"), Some("ann"))
    );
    assert!(
        first["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{first}"
    );

    // Multi-stream, all or nothing.
    let transfer = |expected: Value| {
        json!({"appends": [
            {"stream": "account-a", "expected_version": "no_stream", "events": [{"type": "Debited", "data": {"amount": 5}}]},
            {"stream": "account-b", "expected_version": expected, "events": [{"type": "Credited", "data": {"amount": 5}}]},
        ]})
    };
    let (status, failed) = post(&t, "/v1/streams", transfer(json!(3))).await;
    assert_eq!(
        (status, code(&failed), failed["stream"].as_str()),
        (409, "wrong_expected_version", Some("account-b")),
        "{failed}"
    );
    assert_eq!(
        get(&t, "/v1/streams/account-a").await.0,
        404,
        "nothing of the failed transfer"
    );
    let (status, done) = post(&t, "/v1/streams", transfer(json!("no_stream"))).await;
    assert_eq!(status, 201, "{done}");
    assert_eq!(done["results"].as_array().map(Vec::len), Some(2));

    let (_, all) = get(&t, "/v1/streams/$all?from_position=1&limit=2").await;
    let positions: Vec<u64> = all["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["position"].as_u64())
        .collect();
    assert_eq!(positions, [1, 2]);
    assert_eq!(all["next"], 3);
    let (_, accounts) = get(&t, "/v1/streams/$ce-account").await;
    let streams: Vec<&str> = accounts["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["stream"].as_str())
        .collect();
    assert_eq!(streams, ["account-a", "account-b"]);
    let (_, back) = get(&t, "/v1/streams/order-1?direction=backward&limit=1").await;
    assert_eq!(
        (back["events"][0]["version"].as_u64(), back["next"].as_u64()),
        (Some(1), Some(0))
    );
    let (_, past) = get(&t, "/v1/streams/order-1?as_of_version=0").await;
    assert_eq!(past["events"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn bad_input_deletion_metadata_and_snapshots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;
    for (body, expected) in [
        (
            json!({"expected_version": "sometimes", "events": []}),
            "invalid_body",
        ),
        (
            json!({"expected_version": -1, "events": []}),
            "invalid_body",
        ),
        (json!({"events": [{"data": 1}]}), "invalid_body"),
        (json!({"events": [{"type": ""}]}), "invalid_event"),
        (
            json!({"events": [{"type": "A", "id": "not-a-uuid"}]}),
            "invalid_event",
        ),
        (
            json!({"events": [{"type": "A", "data": 1, "data_base64": "AA=="}]}),
            "invalid_event",
        ),
        (
            json!({"events": [{"type": "A", "metadata": {"correlation_id": 5}}]}),
            "invalid_event",
        ),
    ] {
        let (status, problem) = post(&t, "/v1/streams/s-1", body.clone()).await;
        assert_eq!(
            (status, code(&problem)),
            (400, expected),
            "{body}: {problem}"
        );
    }
    let (status, problem) = post(&t, "/v1/streams/$all", json!({"events": [{"type": "A"}]})).await;
    assert_eq!(
        (status, code(&problem)),
        (400, "invalid_stream"),
        "{problem}"
    );
    let (status, problem) = get(&t, "/v1/streams/nope-1").await;
    assert_eq!((status, code(&problem)), (404, "stream_not_found"));
    let (status, problem) = get(&t, "/v1/streams/s-1?store=elsewhere").await;
    assert_eq!((status, code(&problem)), (404, "eventstore_not_found"));
    let (status, problem) = get(&t, "/v1/streams/s-1?limit=0").await;
    assert_eq!((status, code(&problem)), (400, "invalid_query"));
    let id = "6f1c1b7e-3a7d-4c55-8a66-0e5c2b3f9d10";
    assert_eq!(
        post(
            &t,
            "/v1/streams/s-1",
            json!({"events": [{"id": id, "type": "A"}]})
        )
        .await
        .0,
        201
    );
    let (status, problem) = post(
        &t,
        "/v1/streams/s-2",
        json!({"events": [{"id": id, "type": "A"}]}),
    )
    .await;
    assert_eq!(
        (status, code(&problem)),
        (409, "duplicate_event_id"),
        "{problem}"
    );

    // Metadata.
    for i in 0..4 {
        assert_eq!(
            post(
                &t,
                "/v1/streams/m-1",
                json!({"events": [{"type": "N", "data": i}]})
            )
            .await
            .0,
            201
        );
    }
    let (status, _) = send(
        client()
            .put(t.url("/v1/streams/m-1/metadata"))
            .json(&json!({"max_count": 2})),
    )
    .await;
    assert_eq!(status, 204);
    let (_, read) = get(&t, "/v1/streams/m-1").await;
    assert_eq!(read["events"].as_array().map(Vec::len), Some(2));
    let (_, meta) = get(&t, "/v1/streams/m-1/metadata").await;
    assert_eq!(
        (meta["max_count"].as_u64(), meta["version"].as_u64()),
        (Some(2), Some(3))
    );

    // Snapshots: the snapshot plus the events after it.
    let (status, _) = send(
        client()
            .put(t.url("/v1/streams/m-1/snapshot"))
            .json(&json!({"version": 2, "data": {"sum": 3}})),
    )
    .await;
    assert_eq!(status, 204);
    let (_, loaded) = get(&t, "/v1/streams/m-1/snapshot").await;
    assert_eq!(loaded["snapshot"]["data"]["sum"], 3);
    let after: Vec<u64> = loaded["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["version"].as_u64())
        .collect();
    assert_eq!(after, [3]);

    // Deletion: soft (recreated by an append), then hard (410 for good).
    let (status, _) = send(client().delete(t.url("/v1/streams/m-1?expected_version=3"))).await;
    assert_eq!(status, 204);
    assert_eq!(
        get(&t, "/v1/streams/m-1").await.1["events"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );
    let (status, recreated) = post(
        &t,
        "/v1/streams/m-1",
        json!({"expected_version": "no_stream", "events": [{"type": "N"}]}),
    )
    .await;
    assert_eq!((status, recreated["version"].as_u64()), (201, Some(4)));
    let (status, _) =
        send(client().delete(t.url("/v1/streams/m-1?hard=true&expected_version=2"))).await;
    assert_eq!(status, 409);
    let (status, _) = send(client().delete(t.url("/v1/streams/m-1?hard=true"))).await;
    assert_eq!(status, 204);
    let (status, problem) = get(&t, "/v1/streams/m-1").await;
    assert_eq!((status, code(&problem)), (410, "stream_deleted"));
    let (status, problem) = post(&t, "/v1/streams/m-1", json!({"events": [{"type": "N"}]})).await;
    assert_eq!((status, code(&problem)), (410, "stream_deleted"));
}

#[tokio::test]
async fn server_sent_events_catch_up_then_go_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;
    for i in 0..3 {
        assert_eq!(
            post(
                &t,
                "/v1/streams/feed-1",
                json!({"events": [{"type": "N", "data": i}]})
            )
            .await
            .0,
            201
        );
    }
    let response = client()
        .get(t.url("/v1/streams/$all/subscribe?from=1"))
        .send()
        .await
        .expect("subscribe");
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .is_ok_and(|c| c.starts_with("text/event-stream"))
    );
    let mut body = response.bytes_stream();
    let writer = {
        let url = t.url("/v1/streams/feed-2");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let r = client()
                .post(url)
                .json(&json!({"events": [{"type": "N", "data": 3}]}))
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 201);
        })
    };
    let mut text = String::new();
    let mut data = Vec::new();
    while data.len() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            if let Some(line) = frame.lines().find_map(|l| l.strip_prefix("data:")) {
                let event: Value = serde_json::from_str(line.trim()).expect("event json");
                data.push(event["data"].as_u64().expect("n"));
            }
        }
    }
    assert_eq!(data, [1, 2, 3], "history from position 1, then live");
    writer.await.expect("writer");
}

#[tokio::test]
async fn persistent_subscriptions_over_http() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t = Trellis::start_in(dir.path(), "").await;
    for i in 0..4 {
        let stream = if i % 2 == 0 { "job-1" } else { "job-2" };
        let (status, _) = post(
            &t,
            &format!("/v1/streams/{stream}"),
            json!({"events": [{"type": "Work", "data": {"n": i}}]}),
        )
        .await;
        assert_eq!(status, 201);
    }
    let put = |path: &str, body: Value| send(client().put(t.url(path)).json(&body));
    let (status, created) = put(
        "/v1/streams/$ce-job/persistent/workers",
        json!({"max_retries": 1, "retry_delay": "10ms", "ack_timeout": "30s"}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["stream"], "$ce-job");
    let (status, _) = put(
        "/v1/streams/$ce-job/persistent/workers",
        json!({"max_retries": 1, "retry_delay": "10ms"}),
    )
    .await;
    assert_eq!(status, 200, "defining it again updates it");
    let (status, conflict) = put("/v1/streams/$all/persistent/workers", json!({})).await;
    assert_eq!((status, code(&conflict)), (409, "subscription_conflict"));
    let (status, bad) = put(
        "/v1/streams/$ce-job/persistent/w2",
        json!({"max_in_flight": 0}),
    )
    .await;
    assert_eq!((status, code(&bad)), (400, "invalid_subscription"));
    let (status, bad) = put("/v1/streams/$ce-job/persistent/bad%20name", json!({})).await;
    assert_eq!((status, code(&bad)), (400, "invalid_subscription"), "{bad}");
    let (status, missing) = get(&t, "/v1/streams/$all/persistent/workers").await;
    assert_eq!(
        (status, code(&missing)),
        (404, "subscription_not_found"),
        "the group follows $ce-job, not $all"
    );

    let base = "/v1/streams/$ce-job/persistent/workers";
    let (status, read) = post(&t, &format!("{base}/read"), json!({"max": 3})).await;
    assert_eq!(status, 200, "{read}");
    let events = read["events"].as_array().expect("events");
    assert_eq!(events.len(), 3);
    assert_eq!(events[0]["event"]["data"]["n"], 0);
    let ids: Vec<String> = events
        .iter()
        .map(|e| e["ack_id"].as_str().expect("ack id").to_owned())
        .collect();
    // Ack the first two, fail the third: with max_retries 1 it is parked.
    let (status, acked) = post(
        &t,
        &format!("{base}/ack"),
        json!({"ack_ids": [ids[0], ids[1], "nonsense"]}),
    )
    .await;
    assert_eq!(status, 200);
    let outcomes: Vec<&str> = acked["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["outcome"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(outcomes, ["ok", "ok", "not_found"]);
    let (status, nacked) = post(
        &t,
        &format!("{base}/nack"),
        json!({"ack_ids": [ids[2]], "action": "retry"}),
    )
    .await;
    assert_eq!(status, 200, "{nacked}");
    let (status, bad) = post(
        &t,
        &format!("{base}/nack"),
        json!({"ack_ids": [ids[2]], "action": "explode"}),
    )
    .await;
    assert_eq!((status, code(&bad)), (400, "invalid_body"));
    // The retry is due 10ms after the nack: read until both have come.
    let mut delivered: Vec<Value> = Vec::new();
    for _ in 0..10 {
        let (_, read) = post(
            &t,
            &format!("{base}/read"),
            json!({"max": 10, "wait_ms": 2000}),
        )
        .await;
        delivered.extend(read["events"].as_array().cloned().unwrap_or_default());
        if delivered.len() >= 2 {
            break;
        }
    }
    let mut seen: Vec<(u64, u64)> = delivered
        .iter()
        .map(|e| {
            (
                e["event"]["data"]["n"].as_u64().unwrap_or(99),
                e["attempt"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, [(2, 2), (3, 1)], "the retry and the last event");
    let ids: Vec<&str> = delivered
        .iter()
        .map(|e| e["ack_id"].as_str().unwrap_or_default())
        .collect();
    let retried = delivered
        .iter()
        .find(|e| e["event"]["data"]["n"] == 2)
        .and_then(|e| e["ack_id"].as_str())
        .expect("retried");
    post(&t, &format!("{base}/nack"), json!({"ack_ids": [retried]})).await;
    let last: Vec<&str> = ids.into_iter().filter(|id| *id != retried).collect();
    post(&t, &format!("{base}/ack"), json!({"ack_ids": last})).await;
    let (_, info) = get(&t, base).await;
    assert_eq!(info["parked"], 1, "{info}");
    let (_, parked) = get(&t, "/v1/streams/trellis-parked-workers").await;
    assert_eq!(parked["events"][0]["data"]["n"], 2);

    // The checkpoint and the definition survive a restart.
    let checkpoint = info["checkpoint"].as_u64().expect("checkpoint");
    assert_eq!(checkpoint, 4, "everything settled");
    t.signal("TERM");
    t.wait(Duration::from_secs(10)).await;
    let t = Trellis::start_in(dir.path(), "").await;
    let (status, info) = get(&t, base).await;
    assert_eq!((status, info["checkpoint"].as_u64()), (200, Some(4)));
    let (_, listed) = get(&t, "/v1/persistent-subscriptions").await;
    assert_eq!(listed["subscriptions"][0]["group"], "workers");
    let (status, replay) = post(&t, &format!("{base}/replay-parked"), json!(null)).await;
    assert_eq!(
        (status, replay["queued"].as_u64()),
        (200, Some(1)),
        "{replay}"
    );
    let (_, read) = post(&t, &format!("{base}/read"), json!({"wait_ms": 2000})).await;
    assert_eq!(read["events"][0]["replayed"], true);
    assert_eq!(read["events"][0]["event"]["stream"], "job-1");
    let status = send(client().delete(t.url(base))).await.0;
    assert_eq!(status, 204);
    let (status, _) = get(&t, base).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn config_upcasting_rules_reshape_old_events_on_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Events written before the rules exist...
    let mut t = Trellis::start_in(dir.path(), "").await;
    let (status, _) = post(
        &t,
        "/v1/streams/order-9",
        json!({"events": [
            {"type": "OrderPlaced", "data": {"total": 42, "legacy": 1}},
            {"type": "OrderPlaced", "data": {"amount": {"value": 7, "currency": "USD"}}, "metadata": {"schema_version": 2}},
        ]}),
    )
    .await;
    assert_eq!(status, 201);
    t.signal("TERM");
    t.wait(Duration::from_secs(10)).await;
    // ...are read in the current shape once they do; current events pass as they are.
    let config = r#"
[components.eventstore.default]
type = "embedded"

[[components.eventstore.default.upcasters]]
event_type = "OrderPlaced"
before_version = 2
rename = { "total" = "amount.value" }
defaults = { "amount.currency" = "EUR" }
remove = ["legacy"]
set_version = 2
"#;
    let t = Trellis::start_in(dir.path(), config).await;
    let (status, read) = get(&t, "/v1/streams/order-9").await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(
        read["events"][0]["data"],
        json!({"amount": {"value": 42, "currency": "EUR"}})
    );
    assert_eq!(read["events"][0]["metadata"]["schema_version"], 2);
    assert_eq!(
        read["events"][1]["data"],
        json!({"amount": {"value": 7, "currency": "USD"}})
    );
    let (_, all) = get(&t, "/v1/streams/$all").await;
    assert_eq!(all["events"][0]["data"]["amount"]["value"], 42);
}
