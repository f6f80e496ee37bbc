//! A choreographed saga between two apps over pub/sub (docs/choreography.md): the
//! correlation id rides along as the CloudEvents `correlationid` extension and the
//! `Trellis-Correlation-Id` header.

mod support;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::{Value, json};
use support::Trellis;

#[derive(Debug, Default)]
struct Shared {
    /// The sidecar's URL, known once it started.
    sidecar: OnceLock<String>,
    /// (app, event type, correlation id) of every delivery.
    seen: Mutex<Vec<(String, String, String)>>,
}

fn correlation(headers: &HeaderMap) -> String {
    headers
        .get("trellis-correlation-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn publish(shared: &Shared, topic: &str, ty: &str, correlation: &str, data: Value) {
    let url = format!(
        "{}/v1/publish/default/{topic}",
        shared.sidecar.get().expect("sidecar")
    );
    let response = reqwest::Client::new()
        .post(url)
        .header("ce-type", ty)
        .header("ce-source", "/test")
        .header("ce-specversion", "1.0")
        .header("ce-id", format!("{correlation}:{ty}"))
        .header("Trellis-Correlation-Id", correlation)
        .json(&data)
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), 201);
}

/// payments: charges an order (refusing amounts over 100) and says how it went.
async fn payments(State(shared): State<Arc<Shared>>, headers: HeaderMap, event: axum::Json<Value>) {
    let id = correlation(&headers);
    let ty = event["type"].as_str().unwrap_or_default().to_owned();
    shared
        .seen
        .lock()
        .expect("lock")
        .push(("payments".into(), ty, id.clone()));
    let amount = event["data"]["amount"].as_i64().unwrap_or(0);
    let outcome = if amount <= 100 {
        "payment.completed"
    } else {
        "payment.failed"
    };
    publish(
        &shared,
        "payments",
        outcome,
        &id,
        json!({"order": event["data"]["order"]}),
    )
    .await;
}

/// orders: confirms the order, or compensates (cancels it) when payment failed.
async fn orders(State(shared): State<Arc<Shared>>, headers: HeaderMap, event: axum::Json<Value>) {
    let id = correlation(&headers);
    let ty = event["type"].as_str().unwrap_or_default().to_owned();
    shared
        .seen
        .lock()
        .expect("lock")
        .push(("orders".into(), ty.clone(), id.clone()));
    let order = event["data"]["order"].as_str().unwrap_or_default();
    let status = if ty == "payment.completed" {
        "confirmed"
    } else {
        "cancelled"
    };
    let url = format!(
        "{}/v1/state/default/orders%2F{order}",
        shared.sidecar.get().expect("sidecar")
    );
    reqwest::Client::new()
        .put(url)
        .json(&json!({"status": status, "correlation": id}))
        .send()
        .await
        .expect("put");
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

#[tokio::test]
async fn a_choreographed_saga_carries_its_correlation_id() {
    let shared = Arc::new(Shared::default());
    let payments_url = serve(
        Router::new()
            .route("/events/orders", post(payments))
            .with_state(Arc::clone(&shared)),
    )
    .await;
    let orders_url = serve(
        Router::new()
            .route("/events/payments", post(orders))
            .with_state(Arc::clone(&shared)),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(
        dir.path(),
        &format!(
            "[apps.orders]\ninstances = [{orders_url:?}]\n[apps.payments]\ninstances = [{payments_url:?}]\n\
             [subscriptions.charge]\ntopic = \"orders\"\napp = \"payments\"\nroute = \"/events/orders\"\n\
             [subscriptions.settle]\ntopic = \"payments\"\napp = \"orders\"\nroute = \"/events/payments\"\n"
        ),
    )
    .await;
    shared.sidecar.set(t.url.clone()).expect("once");

    // The orders app places two orders; each order's id is its saga's correlation id.
    for (order, amount) in [("o-1", 40), ("o-2", 400)] {
        publish(
            &shared,
            "orders",
            "order.placed",
            order,
            json!({"order": order, "amount": amount}),
        )
        .await;
    }
    let client = reqwest::Client::new();
    let mut states = Vec::new();
    for order in ["o-1", "o-2"] {
        let mut found = None;
        for _ in 0..200 {
            let r = client
                .get(t.url(&format!("/v1/state/default/orders%2F{order}")))
                .send()
                .await
                .expect("get");
            if r.status() == 200 {
                found = Some(r.json::<Value>().await.expect("json"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        states.push(found.unwrap_or_else(|| panic!("{order} never settled")));
    }
    assert_eq!(
        states[0],
        json!({"status": "confirmed", "correlation": "o-1"})
    );
    assert_eq!(
        states[1],
        json!({"status": "cancelled", "correlation": "o-2"})
    );
    let mut seen = shared.seen.lock().expect("lock").clone();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("orders".into(), "payment.completed".into(), "o-1".into()),
            ("orders".into(), "payment.failed".into(), "o-2".into()),
            ("payments".into(), "order.placed".into(), "o-1".into()),
            ("payments".into(), "order.placed".into(), "o-2".into()),
        ] as [(String, String, String); 4]
    );
    // The extension is on the stored events too.
    let body: Value = client
        .post(t.url("/v1/pubsub/default/subscriptions/audit/pull"))
        .json(&json!({"topic": "payments", "max": 10, "wait_ms": 1000}))
        .send()
        .await
        .expect("pull")
        .json()
        .await
        .expect("json");
    let mut ids: Vec<&str> = body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["event"]["correlationid"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["o-1", "o-2"], "{body:#}");
}
