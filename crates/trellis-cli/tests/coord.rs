//! Black-box: locks and leader election with fencing tokens over HTTP, through the
//! real binary.

mod support;

use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::{Value, json};
use support::{Trellis, client};

async fn post(t: &Trellis, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(t.url(path))
        .json(&body)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(t: &Trellis, path: &str) -> (u16, Value) {
    let r = client().get(t.url(path)).send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn locks_with_fencing_tokens_over_http() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t = Trellis::start_in(dir.path(), "").await;

    let (status, a) = post(
        &t,
        "/v1/locks/invoices/acquire",
        json!({"owner": "a", "ttl": "30s"}),
    )
    .await;
    assert_eq!(status, 200, "{a}");
    let first = a["fencing_token"].as_u64().expect("token");
    let (status, held) = post(
        &t,
        "/v1/locks/invoices/acquire",
        json!({"owner": "b", "ttl": "30s"}),
    )
    .await;
    assert_eq!((status, code(&held)), (409, "lock_held"), "{held}");
    let (status, refused) = post(
        &t,
        "/v1/locks/invoices/release",
        json!({"owner": "b", "fencing_token": first}),
    )
    .await;
    assert_eq!((status, code(&refused)), (403, "not_lock_holder"));
    let (status, extended) = post(
        &t,
        "/v1/locks/invoices/extend",
        json!({"owner": "a", "fencing_token": first, "ttl": "60s"}),
    )
    .await;
    assert_eq!(
        (status, extended["fencing_token"].as_u64()),
        (200, Some(first))
    );

    // B blocks until A releases, then holds it with a newer token.
    let waiting = {
        let url = t.url("/v1/locks/invoices/acquire");
        tokio::spawn(async move {
            client()
                .post(url)
                .json(&json!({"owner": "b", "ttl": "30s", "wait": "20s"}))
                .send()
                .await
                .expect("send")
                .json::<Value>()
                .await
                .expect("json")
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _) = post(
        &t,
        "/v1/locks/invoices/release",
        json!({"owner": "a", "fencing_token": first}),
    )
    .await;
    assert_eq!(status, 204);
    let b = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("b gets the lock")
        .expect("task");
    let second = b["fencing_token"].as_u64().expect("token");
    assert_eq!(b["owner"], "b");
    assert!(second > first);
    let (_, holder) = get(&t, "/v1/locks/invoices").await;
    assert_eq!(
        (holder["owner"].as_str(), holder["latest_token"].as_u64()),
        (Some("b"), Some(second))
    );

    // An expired lease frees the lock.
    let (status, c) = post(
        &t,
        "/v1/locks/short/acquire",
        json!({"owner": "c", "ttl": "200ms"}),
    )
    .await;
    assert_eq!(status, 200, "{c}");
    let (status, d) = post(
        &t,
        "/v1/locks/short/acquire",
        json!({"owner": "d", "ttl": "10s", "wait": "10s"}),
    )
    .await;
    assert_eq!((status, d["owner"].as_str()), (200, Some("d")));

    // Bad input.
    let (status, bad) = post(
        &t,
        "/v1/locks/x/acquire",
        json!({"owner": "a", "ttl": "1ms"}),
    )
    .await;
    assert_eq!((status, code(&bad)), (400, "invalid_ttl"), "{bad}");
    let (status, bad) = post(
        &t,
        "/v1/locks/x/acquire",
        json!({"owner": "a", "ttl": "soon"}),
    )
    .await;
    assert_eq!((status, code(&bad)), (400, "invalid_body"), "{bad}");
    let (status, bad) = post(
        &t,
        "/v1/locks/a:b/acquire",
        json!({"owner": "a", "ttl": "1s"}),
    )
    .await;
    assert_eq!((status, code(&bad)), (400, "invalid_name"), "{bad}");

    // Tokens keep growing across a restart.
    t.signal("TERM");
    t.wait(Duration::from_secs(10)).await;
    let t = Trellis::start_in(dir.path(), "").await;
    let (status, after) = post(
        &t,
        "/v1/locks/invoices/acquire",
        json!({"owner": "e", "ttl": "5s", "wait": "40s"}),
    )
    .await;
    assert_eq!(status, 200, "{after}");
    assert!(after["fencing_token"].as_u64().expect("token") > second);
}

#[tokio::test]
async fn leader_election_over_http() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;
    let (status, missing) = get(&t, "/v1/elections/restock").await;
    assert_eq!((status, code(&missing)), (404, "election_not_found"));

    let (status, one) = post(
        &t,
        "/v1/elections/restock/campaign",
        json!({"candidate": "inventory-1", "ttl": "30s"}),
    )
    .await;
    assert_eq!(
        (status, one["leader"].as_str()),
        (200, Some("inventory-1")),
        "{one}"
    );
    let term = one["fencing_token"].as_u64().expect("token");
    let (status, lost) = post(
        &t,
        "/v1/elections/restock/campaign",
        json!({"candidate": "inventory-2", "ttl": "30s"}),
    )
    .await;
    assert_eq!((status, code(&lost)), (409, "not_elected"));

    let mut observe = client()
        .get(t.url("/v1/elections/restock/observe"))
        .send()
        .await
        .expect("observe")
        .bytes_stream();
    let (status, _) = post(
        &t,
        "/v1/elections/restock/keep-alive",
        json!({"candidate": "inventory-1", "fencing_token": term, "ttl": "30s"}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, refused) = post(
        &t,
        "/v1/elections/restock/resign",
        json!({"candidate": "inventory-2", "fencing_token": term}),
    )
    .await;
    assert_eq!((status, code(&refused)), (403, "not_leader"));
    let (status, _) = post(
        &t,
        "/v1/elections/restock/resign",
        json!({"candidate": "inventory-1", "fencing_token": term}),
    )
    .await;
    assert_eq!(status, 204);
    let (status, two) = post(
        &t,
        "/v1/elections/restock/campaign",
        json!({"candidate": "inventory-2", "ttl": "30s", "wait": "10s"}),
    )
    .await;
    assert_eq!((status, two["leader"].as_str()), (200, Some("inventory-2")));
    assert!(two["fencing_token"].as_u64().expect("token") > term);

    // The observer saw the first leader and, eventually, the second.
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !seen.contains("inventory-2") {
            let chunk = observe.next().await.expect("open").expect("chunk");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("the observer sees the new leader");
    assert!(seen.contains("event: leader"));
    assert!(seen.contains("inventory-1"), "{seen}");
    let (_, current) = get(&t, "/v1/elections/restock").await;
    assert_eq!(current["leader"], "inventory-2");
}

#[tokio::test]
async fn state_writes_carrying_a_stale_fencing_token_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;
    let put = |token: u64, body: &'static str| {
        client()
            .put(t.url("/v1/state/default/stock/apples"))
            .header("Trellis-Fencing", format!("restock:{token}"))
            .body(body)
            .send()
    };
    let (_, a) = post(
        &t,
        "/v1/locks/restock/acquire",
        json!({"owner": "a", "ttl": "30s"}),
    )
    .await;
    let old = a["fencing_token"].as_u64().expect("token");
    assert_eq!(put(old, "10").await.expect("put").status().as_u16(), 204);
    post(
        &t,
        "/v1/locks/restock/release",
        json!({"owner": "a", "fencing_token": old}),
    )
    .await;
    let (_, b) = post(
        &t,
        "/v1/locks/restock/acquire",
        json!({"owner": "b", "ttl": "30s"}),
    )
    .await;
    let new = b["fencing_token"].as_u64().expect("token");

    // The old holder, paused through its lease, comes back: refused, even before the
    // new holder wrote anything.
    let late = put(old, "999").await.expect("put");
    assert_eq!(late.status().as_u16(), 409);
    let problem: Value = late.json().await.expect("json");
    assert_eq!(
        (code(&problem), problem["latest_token"].as_u64()),
        ("stale_fencing_token", Some(new))
    );
    assert_eq!(put(new, "12").await.expect("put").status().as_u16(), 204);
    let stored = client()
        .get(t.url("/v1/state/default/stock/apples"))
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    assert_eq!(stored, "12");

    // Deletes and transactions are fenced too; a write's own precondition keeps its code.
    let delete = client()
        .delete(t.url("/v1/state/default/stock/apples"))
        .header("Trellis-Fencing", format!("restock:{old}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(delete.status().as_u16(), 409);
    let tx = client()
        .post(t.url("/v1/state/default/transaction"))
        .header("Trellis-Fencing", format!("restock:{old}"))
        .json(&json!({"operations": [{"op": "upsert", "key": "stock/pears", "value": 1}]}))
        .send()
        .await
        .expect("tx");
    assert_eq!(tx.status().as_u16(), 409);
    let exists = client()
        .put(t.url("/v1/state/default/stock/apples"))
        .header("Trellis-Fencing", format!("restock:{new}"))
        .header("If-None-Match", "*")
        .body("1")
        .send()
        .await
        .expect("put");
    assert_eq!(exists.status().as_u16(), 412);
    let bad = client()
        .put(t.url("/v1/state/default/stock/apples"))
        .header("Trellis-Fencing", "restock")
        .body("1")
        .send()
        .await
        .expect("put");
    assert_eq!(bad.status().as_u16(), 400);
}
