//! Black-box: projections run by Trellis for an app (`[projections.<name>]`), with
//! the read model in the state store, through the real binary and a real app.
//!
//! The app here is what an app in any language would be: an HTTP server that gets
//! batches of events and answers with read-model writes, reading the current view
//! through the state API when it needs to (a balance is the stored balance plus the
//! batch's deposits).

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::{Value, json};
use support::{Trellis, client};

/// The app's state: where Trellis is (it moves when restarted) and how many calls
/// it should still fail.
#[derive(Clone, Default)]
struct App {
    trellis: Arc<Mutex<String>>,
    fail: Arc<Mutex<u32>>,
    calls: Arc<Mutex<u32>>,
}

/// `balances`: for each `Deposited {account, amount}`, balance += amount.
async fn balances(State(app): State<App>, body: String) -> (StatusCode, String) {
    *app.calls.lock().expect("lock") += 1;
    {
        let mut fail = app.fail.lock().expect("lock");
        if *fail > 0 {
            *fail -= 1;
            return (StatusCode::SERVICE_UNAVAILABLE, "not yet".into());
        }
    }
    let Ok(batch) = serde_json::from_str::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "bad batch".into());
    };
    let trellis = app.trellis.lock().expect("lock").clone();
    let mut balances: BTreeMap<String, i64> = BTreeMap::new();
    let mut ops = Vec::new();
    for event in batch["events"].as_array().cloned().unwrap_or_default() {
        match event["type"].as_str() {
            Some("Deposited") => {
                let account = event["data"]["account"].as_str().unwrap_or("?").to_owned();
                let amount = event["data"]["amount"].as_i64().unwrap_or(0);
                if !balances.contains_key(&account) {
                    // The view as the events before this batch left it.
                    let stored = match client()
                        .get(format!("{trellis}/v1/state/default/balances/{account}"))
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 404 => 0,
                        Ok(r) if r.status().is_success() => r
                            .json::<Value>()
                            .await
                            .ok()
                            .and_then(|v| v["balance"].as_i64())
                            .unwrap_or(0),
                        _ => return (StatusCode::BAD_GATEWAY, "state unavailable".into()),
                    };
                    balances.insert(account.clone(), stored);
                }
                *balances.get_mut(&account).expect("inserted") += amount;
            }
            Some("AccountClosed") => {
                let account = event["data"]["account"].as_str().unwrap_or("?").to_owned();
                balances.remove(&account);
                ops.push(json!({"op": "delete", "key": account}));
            }
            _ => {}
        }
    }
    for (account, balance) in balances {
        ops.push(json!({"op": "put", "key": account, "value": {"balance": balance}}));
        ops.push(
            json!({"op": "merge", "key": format!("seen/{account}"), "patch": {"active": true}}),
        );
    }
    (StatusCode::OK, json!({ "operations": ops }).to_string())
}

async fn start_app(app: App) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let router = axum::Router::new()
        .route("/projections/balances", post(balances))
        .with_state(app);
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

fn config(app_url: &str) -> String {
    format!(
        "[apps.bank]\ninstances = [{app_url:?}]\n\n\
         [projections.balances]\nsource = \"$ce-account\"\napp = \"bank\"\n\
         route = \"/projections/balances\"\nbatch_size = 50\nmax_backoff = \"200ms\"\n"
    )
}

async fn get(t: &Trellis, path: &str) -> (u16, Value) {
    let r = client().get(t.url(path)).send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn deposit(url: &str, account: &str, amount: i64) -> bool {
    client()
        .post(format!("{url}/v1/streams/account-{account}"))
        .json(&json!({"events": [{"type": "Deposited", "data": {"account": account, "amount": amount}}]}))
        .send()
        .await
        .is_ok_and(|r| r.status().as_u16() == 201)
}

/// Waits until the projection is live with its checkpoint at `head` or beyond.
async fn caught_up(t: &Trellis, head: u64) -> Value {
    for _ in 0..600 {
        let (_, status) = get(t, "/v1/projections/balances").await;
        if status["state"] == "live" && status["checkpoint"].as_u64().unwrap_or(0) >= head {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, status) = get(t, "/v1/projections/balances").await;
    panic!("the projection did not catch up to {head}: {status}");
}

/// The position after the last account event.
async fn account_head(t: &Trellis) -> u64 {
    let mut from = 0;
    loop {
        let (_, page) = get(
            t,
            &format!("/v1/streams/$ce-account?from={from}&limit=1000"),
        )
        .await;
        let events = page["events"].as_array().cloned().unwrap_or_default();
        match events.last().and_then(|e| e["position"].as_u64()) {
            Some(last) => from = last + 1,
            None => return from,
        }
    }
}

/// Every stored balance, by account.
async fn read_model(t: &Trellis) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = "/v1/state/default?prefix=balances/&limit=1000".to_owned();
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = get(t, &url).await;
        assert_eq!(status, 200, "{page}");
        for key in page["keys"].as_array().cloned().unwrap_or_default() {
            let key = key.as_str().unwrap_or_default().to_owned();
            let Some(account) = key.strip_prefix("balances/") else {
                continue;
            };
            if account.starts_with('$') || account.starts_with("seen/") {
                continue;
            }
            let (_, value) = get(t, &format!("/v1/state/default/{key}")).await;
            out.insert(account.to_owned(), value["balance"].as_i64().unwrap_or(-1));
        }
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            return out;
        }
    }
}

/// The balances the stored events say, read from the event store.
async fn expected(t: &Trellis) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    let mut from = 0;
    loop {
        let (_, page) = get(
            t,
            &format!("/v1/streams/$ce-account?from={from}&limit=1000"),
        )
        .await;
        let events = page["events"].as_array().cloned().unwrap_or_default();
        if events.is_empty() {
            return out;
        }
        for e in &events {
            let account = e["data"]["account"].as_str().unwrap_or("?").to_owned();
            match e["type"].as_str() {
                Some("Deposited") => {
                    *out.entry(account).or_insert(0) += e["data"]["amount"].as_i64().unwrap_or(0)
                }
                Some("AccountClosed") => {
                    out.remove(&account);
                }
                _ => {}
            }
        }
        from = events
            .last()
            .and_then(|e| e["position"].as_u64())
            .unwrap_or(0)
            + 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_projection_builds_its_read_model_and_rebuilds() {
    let app = App::default();
    *app.fail.lock().expect("lock") = 2;
    let app_url = start_app(app.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), &config(&app_url)).await;
    *app.trellis.lock().expect("lock") = t.url.clone();

    for (account, amount) in [("a", 10), ("b", 5), ("a", 7), ("c", 1)] {
        assert!(deposit(&t.url, account, amount).await);
    }
    let closed = client()
        .post(t.url("/v1/streams/account-c"))
        .json(&json!({"events": [{"type": "AccountClosed", "data": {"account": "c"}}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(closed.status().as_u16(), 201);
    let status = caught_up(&t, 5).await;
    assert_eq!(status["checkpoint"], 5, "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "the app's failures are reported: {status}"
    );
    let model = read_model(&t).await;
    assert_eq!(model, BTreeMap::from([("a".into(), 17), ("b".into(), 5)]));
    assert_eq!(model, expected(&t).await);
    let (_, seen) = get(&t, "/v1/state/default/balances/seen/a").await;
    assert_eq!(seen, json!({"active": true}), "merge patches");

    let (status, list) = get(&t, "/v1/projections").await;
    assert_eq!(status, 200);
    assert_eq!(list["projections"][0]["name"], "balances");
    assert_eq!(list["projections"][0]["key_prefix"], "balances/");
    let (status, missing) = get(&t, "/v1/projections/nope").await;
    assert_eq!(
        (status, missing["code"].as_str()),
        (404, Some("projection_not_found"))
    );

    // Rebuild: the view is deleted and computed again from the first event.
    let calls_before = *app.calls.lock().expect("lock");
    let rebuilt = client()
        .post(t.url("/v1/projections/balances/rebuild"))
        .send()
        .await
        .expect("send");
    assert_eq!(rebuilt.status().as_u16(), 202);
    caught_up(&t, 5).await;
    assert!(*app.calls.lock().expect("lock") > calls_before);
    assert_eq!(read_model(&t).await, model);

    let metrics = client()
        .get(t.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("trellis_projection_lag_events{projection=\"balances\"}"),
        "lag is a metric"
    );
}

/// `kill -9` while deposits are appended and projected; after a restart the read
/// model equals both the balances the stored events say and a rebuild from zero:
/// no batch was applied twice or skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_projection_then_the_read_model_equals_a_rebuild() {
    let app = App::default();
    let app_url = start_app(app.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&app_url);
    for round in 0..2 {
        let mut t = Trellis::start_in(dir.path(), &config).await;
        *app.trellis.lock().expect("lock") = t.url.clone();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let url = t.url.clone();
                tokio::spawn(async move {
                    let mut i = 0i64;
                    // Until the process dies under it.
                    while deposit(&url, &format!("w{w}-{}", i % 5), 1 + i % 7).await {
                        i += 1;
                    }
                })
            })
            .collect();
        // Let the projection work for a while, then kill it mid-batch.
        for _ in 0..400 {
            let (_, status) = get(&t, "/v1/projections/balances").await;
            if status["applied"].as_u64().unwrap_or(0) > 300 + round * 100 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        t.kill9().await;
        for w in writers {
            w.await.expect("writer");
        }
    }
    let t = Trellis::start_in(dir.path(), &config).await;
    *app.trellis.lock().expect("lock") = t.url.clone();
    let head = account_head(&t).await;
    caught_up(&t, head).await;
    let model = read_model(&t).await;
    let truth = expected(&t).await;
    assert!(!truth.is_empty());
    assert_eq!(model, truth, "the read model after the crashes");
    let rebuilt = client()
        .post(t.url("/v1/projections/balances/rebuild"))
        .send()
        .await
        .expect("send");
    assert_eq!(rebuilt.status().as_u16(), 202);
    caught_up(&t, head).await;
    assert_eq!(read_model(&t).await, model, "equals a rebuild from zero");
}
