//! Black-box: the service registry over HTTP through the real binary — TTL, phi and
//! HTTP checks, blocking queries, change events, the sidecar registering its own app,
//! and invocation discovering instances through the registry.

mod support;

use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::{Value, json};
use support::{Trellis, client};
use trellis_proxy::testing::{Behavior, Upstream};

async fn send(r: reqwest::RequestBuilder) -> (u16, Value) {
    let r = r.send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn put(t: &Trellis, path: &str, body: Value) -> (u16, Value) {
    send(client().put(t.url(path)).json(&body)).await
}

async fn get(t: &Trellis, path: &str) -> (u16, Value) {
    send(client().get(t.url(path))).await
}

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or_default()
}

fn ids(v: &Value) -> Vec<&str> {
    v["instances"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["id"].as_str()).collect())
        .unwrap_or_default()
}

/// Polls `GET path` until `done` holds (or panics after `within`).
async fn until(t: &Trellis, path: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (_, v) = get(t, path).await;
        if done(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path}: condition not met within {within:?}; last {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn register_heartbeat_list_and_deregister() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;
    let svc = "/v1/registry/services/orders";
    let (status, a) = put(
        &t,
        &format!("{svc}/instances/a"),
        json!({"address": "10.0.0.1:80", "ttl": "30s", "metadata": {"zone": "eu-1"}}),
    )
    .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(
        (a["health"].as_str(), a["healthy"].as_bool()),
        (Some("alive"), Some(true))
    );
    assert_eq!(a["metadata"]["zone"], "eu-1");
    let (status, _) = put(
        &t,
        &format!("{svc}/instances/b"),
        json!({"address": "10.0.0.2:80", "check": {"type": "phi", "first_interval": "1s"}}),
    )
    .await;
    assert_eq!(status, 200);

    let (status, list) = get(&t, svc).await;
    assert_eq!(status, 200);
    assert_eq!(ids(&list), ["a", "b"]);
    let (status, hb) = send(client().post(t.url(&format!("{svc}/instances/a/heartbeat")))).await;
    assert_eq!(
        (status, hb["last_heartbeat_ms"].as_u64().map(|ms| ms < 1000)),
        (200, Some(true))
    );
    let (_, services) = get(&t, "/v1/registry/services").await;
    assert_eq!(services["services"][0]["service"], "orders");
    assert_eq!(services["services"][0]["instances"], 2);

    let r = client()
        .delete(t.url(&format!("{svc}/instances/b")))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 204);
    let (_, list) = get(&t, svc).await;
    assert_eq!(ids(&list), ["a"]);
    // Unknown services are empty, not errors.
    let (status, none) = get(&t, "/v1/registry/services/nobody").await;
    assert_eq!((status, ids(&none).len()), (200, 0));
}

#[tokio::test]
async fn bad_input_gets_problem_codes_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;
    let at = |id: &str| format!("/v1/registry/services/orders/instances/{id}");
    let cases = [
        (json!({"address": "x:1"}), "invalid_check"),
        (
            json!({"address": "x:1", "ttl": "5s", "check": {"type": "ttl", "ttl": "5s"}}),
            "invalid_check",
        ),
        (
            json!({"address": "x:1", "ttl": "1ms"}),
            "invalid_registration",
        ),
        (json!({"address": "x:1", "ttl": "soon"}), "invalid_body"),
        (json!({"address": "", "ttl": "5s"}), "invalid_registration"),
        (
            json!({"address": "x:1", "check": {"type": "http", "url": "ftp://x"}}),
            "invalid_registration",
        ),
        (
            json!({"address": "x:1", "check": {"type": "gossip"}}),
            "invalid_body",
        ),
        (
            json!({"address": "x:1", "ttl": "5s", "colour": "red"}),
            "invalid_body",
        ),
    ];
    for (body, expected) in cases {
        let (status, problem) = put(&t, &at("a"), body.clone()).await;
        assert_eq!(
            (status, code(&problem)),
            (400, expected),
            "{body} -> {problem}"
        );
    }
    let (status, problem) = put(
        &t,
        "/v1/registry/services/a%2Fb/instances/x",
        json!({"address": "x:1", "ttl": "5s"}),
    )
    .await;
    assert_eq!((status, code(&problem)), (400, "invalid_name"), "{problem}");
    let (status, problem) = send(client().post(t.url(&format!("{}/heartbeat", at("ghost"))))).await;
    assert_eq!((status, code(&problem)), (404, "instance_not_found"));
    let (status, problem) = get(&t, "/v1/registry/services/orders?index=1&wait=1h").await;
    assert_eq!((status, code(&problem)), (400, "invalid_wait"));
    let (status, problem) = get(&t, "/v1/registry/services/orders?index=banana").await;
    assert_eq!((status, code(&problem)), (400, "invalid_query"));
    let (_, list) = get(&t, "/v1/registry/services/orders").await;
    assert!(ids(&list).is_empty(), "{list}");
}

#[tokio::test]
async fn blocking_queries_return_when_the_set_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;
    let svc = "/v1/registry/services/pay";
    put(
        &t,
        &format!("{svc}/instances/p1"),
        json!({"address": "x:1", "ttl": "30s"}),
    )
    .await;
    let r = client().get(t.url(svc)).send().await.expect("send");
    let index: u64 = r.headers()["trellis-index"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");

    // Nothing changes: it answers after `wait` with the same index.
    let started = tokio::time::Instant::now();
    let (_, same) = get(&t, &format!("{svc}?index={index}&wait=500ms")).await;
    assert_eq!(same["index"].as_u64(), Some(index));
    assert!(started.elapsed() >= Duration::from_millis(500));

    // A registration wakes it long before `wait`.
    let blocked = {
        let url = t.url(&format!("{svc}?index={index}&wait=30s"));
        tokio::spawn(async move { send(client().get(url)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    put(
        &t,
        &format!("{svc}/instances/p2"),
        json!({"address": "x:2", "ttl": "30s"}),
    )
    .await;
    let started = tokio::time::Instant::now();
    let (status, changed) = blocked.await.expect("join");
    assert_eq!(status, 200);
    assert!(changed["index"].as_u64() > Some(index));
    assert_eq!(ids(&changed), ["p1", "p2"]);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn missed_heartbeats_go_suspect_dead_then_deregistered_with_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;
    let mut events = client()
        .get(t.url("/v1/registry/events"))
        .send()
        .await
        .expect("events")
        .bytes_stream();
    let (status, _) = put(
        &t,
        "/v1/registry/services/jobs/instances/w1",
        json!({"address": "x:1", "check": {"type": "ttl", "ttl": "300ms", "grace": "300ms"}, "deregister_after": "300ms"}),
    )
    .await;
    assert_eq!(status, 200);
    let mut seen = Vec::new();
    let mut buf = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains(&"deregistered".to_owned()) {
        let chunk = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| panic!("events so far: {seen:?}"))
            .expect("stream open")
            .expect("chunk");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data:")) {
                let e: Value = serde_json::from_str(data.trim()).expect("json event");
                seen.push(e["change"].as_str().unwrap_or_default().to_owned());
            }
        }
    }
    assert_eq!(seen, ["registered", "suspect", "dead", "deregistered"]);
    let (_, list) = get(&t, "/v1/registry/services/jobs").await;
    assert!(ids(&list).is_empty());
}

#[tokio::test]
async fn http_checks_follow_the_instance_health() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;
    let up = Upstream::start("u1", Behavior::Ok).await;
    let path = "/v1/registry/services/web/instances/u1";
    let (status, first) = put(
        &t,
        path,
        json!({"address": up.url, "check": {"type": "http", "url": format!("{}/healthz", up.url),
               "interval": "100ms", "timeout": "100ms", "healthy_threshold": 2, "unhealthy_threshold": 2}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(first["health"], "suspect", "not checked yet: {first}");
    until(&t, path, Duration::from_secs(5), |v| v["health"] == "alive").await;
    up.set_healthy(false);
    let dead = until(&t, path, Duration::from_secs(5), |v| v["health"] == "dead").await;
    assert!(
        dead["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("500")),
        "{dead}"
    );
    up.set_healthy(true);
    until(&t, path, Duration::from_secs(5), |v| v["health"] == "alive").await;
    let (status, problem) = send(client().post(t.url(&format!("{path}/heartbeat")))).await;
    assert_eq!((status, code(&problem)), (409, "not_push_check"));
}

#[tokio::test]
async fn the_sidecar_registers_its_app_and_invoke_discovers_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = Upstream::start("orders-app", Behavior::Ok).await;
    let config = format!(
        "[app]\nid = \"orders\"\nurl = {:?}\ninstance_id = \"orders-main\"\nhealth_path = \"/healthz\"\n\
         ttl = \"500ms\"\nheartbeat_interval = \"100ms\"\n\n[apps.orders]\ndiscovery = \"registry\"\n",
        app.url
    );
    let t = Trellis::start_in(dir.path(), &config).await;
    let instance = "/v1/registry/services/orders/instances/orders-main";
    let me = until(&t, instance, Duration::from_secs(5), |v| {
        v["healthy"] == true
    })
    .await;
    assert_eq!(me["address"], app.url.as_str());

    // Invocation finds it through the registry.
    let r = client()
        .get(t.url("/v1/invoke/orders/hello"))
        .send()
        .await
        .expect("invoke");
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.expect("body").starts_with("orders-app"));

    // A second instance registered over HTTP gets traffic too.
    let other = Upstream::start("orders-2", Behavior::Ok).await;
    put(
        &t,
        "/v1/registry/services/orders/instances/o2",
        json!({"address": other.url, "ttl": "30s"}),
    )
    .await;
    let mut reached_other = false;
    for _ in 0..50 {
        let body = client()
            .get(t.url("/v1/invoke/orders/x"))
            .send()
            .await
            .expect("invoke")
            .text()
            .await
            .expect("body");
        reached_other |= body.starts_with("orders-2");
        if reached_other {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reached_other, "the registered instance never got a call");

    // The app stops answering its health check: the sidecar stops heartbeating, the
    // registry marks it suspect, and invocation stops sending it work.
    app.set_healthy(false);
    until(&t, instance, Duration::from_secs(5), |v| {
        v["health"] != "alive"
    })
    .await;
    for _ in 0..10 {
        let body = client()
            .get(t.url("/v1/invoke/orders/x"))
            .send()
            .await
            .expect("invoke")
            .text()
            .await
            .expect("body");
        assert!(body.starts_with("orders-2"), "{body}");
    }
    app.set_healthy(true);
    until(&t, instance, Duration::from_secs(5), |v| {
        v["health"] == "alive"
    })
    .await;
}

#[tokio::test]
async fn shard_maps_follow_the_registry_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = "[shards.accounts]\nstrategy = \"rendezvous\"\nshards = 64\nmembers = { registry = \"ledger\" }\n";
    let t = Trellis::start_in(dir.path(), config).await;
    let (_, empty) = get(&t, "/v1/shards/accounts").await;
    assert_eq!(
        empty["members"].as_array().map(Vec::len),
        Some(0),
        "{empty}"
    );
    for id in ["l1", "l2"] {
        put(
            &t,
            &format!("/v1/registry/services/ledger/instances/{id}"),
            json!({"address": format!("10.0.0.{}:7000", &id[1..]), "ttl": "30s"}),
        )
        .await;
    }
    let two = until(&t, "/v1/shards/accounts", Duration::from_secs(5), |v| {
        v["members"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    let (status, owner) = get(&t, "/v1/shards/accounts/owner?key=acct-7").await;
    assert_eq!(status, 200, "{owner}");
    assert!(["l1", "l2"].contains(&owner["owner"]["id"].as_str().unwrap_or_default()));
    assert_eq!(
        owner["owner"]["address"]
            .as_str()
            .map(|a| a.starts_with("http://10.0.0.")),
        Some(true)
    );

    // A third instance, twice as heavy: a rebalance moves shards to it.
    put(
        &t,
        "/v1/registry/services/ledger/instances/l3",
        json!({"address": "10.0.0.3:7000", "ttl": "30s", "metadata": {"weight": "2"}}),
    )
    .await;
    let three = until(&t, "/v1/shards/accounts", Duration::from_secs(5), |v| {
        v["members"].as_array().map(Vec::len) == Some(3)
    })
    .await;
    assert!(three["version"].as_u64() > two["version"].as_u64());
    let moves = &three["last_rebalance"]["moves"];
    assert!(moves.as_array().is_some_and(|m| !m.is_empty()), "{three}");
    assert!(
        moves
            .as_array()
            .into_iter()
            .flatten()
            .all(|m| m["to"] == "l3"),
        "{moves}"
    );

    // Deregistering one gives its shards to the others.
    client()
        .delete(t.url("/v1/registry/services/ledger/instances/l1"))
        .send()
        .await
        .expect("delete");
    until(&t, "/v1/shards/accounts", Duration::from_secs(5), |v| {
        v["members"].as_array().map(Vec::len) == Some(2)
            && v["last_rebalance"]["moves"]
                .as_array()
                .is_some_and(|m| m.iter().all(|m| m["from"] == "l1"))
    })
    .await;
}

/// With the etcd coordination backend, sidecars share one registry: each judges the
/// instances registered with it, the others see the verdicts and invoke them.
#[tokio::test]
async fn sidecars_on_etcd_share_the_registry() {
    if !trellis_core::testing::services_enabled("etcd") {
        return;
    }
    let etcd = trellis_core::testing::Etcd::start();
    let coord = format!(
        "[components.coord.default]\ntype = \"etcd\"\nendpoints = [{:?}]\nprefix = \"{}/\"\n",
        etcd.url(),
        trellis_core::testing::unique_name("registry")
    );
    let app = Upstream::start("orders-on-a", Behavior::Ok).await;
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let config_a = format!(
        "{coord}\n[app]\nid = \"orders\"\nurl = {:?}\ninstance_id = \"orders-a\"\nheartbeat_interval = \"200ms\"\nttl = \"1s\"\n",
        app.url
    );
    let config_b = format!("{coord}\n[apps.orders]\ndiscovery = \"registry\"\n");
    let mut a = Trellis::start_in(dir_a.path(), &config_a).await;
    let b = Trellis::start_in(dir_b.path(), &config_b).await;

    // B sees the app A registered, judged by A, and invokes it.
    let seen = until(
        &b,
        "/v1/registry/services/orders/instances/orders-a",
        Duration::from_secs(10),
        |v| v["healthy"] == true,
    )
    .await;
    assert!(
        seen["origin"]
            .as_str()
            .is_some_and(|o| o.starts_with("sidecar-")),
        "{seen}"
    );
    let mut invoked = false;
    for _ in 0..100 {
        let r = client()
            .get(b.url("/v1/invoke/orders/hi"))
            .send()
            .await
            .expect("invoke");
        if r.status().as_u16() == 200 {
            assert!(r.text().await.expect("body").starts_with("orders-on-a"));
            invoked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(invoked, "B never reached the instance registered through A");
    // A's verdicts travel: B can't heartbeat an instance A judges.
    let (status, problem) =
        send(client().post(b.url("/v1/registry/services/orders/instances/orders-a/heartbeat")))
            .await;
    assert_eq!((status, code(&problem)), (409, "remote_instance"));

    // An instance registered through B shows on A.
    put(
        &b,
        "/v1/registry/services/orders/instances/orders-b",
        json!({"address": "10.0.0.9:80", "ttl": "30s"}),
    )
    .await;
    until(
        &a,
        "/v1/registry/services/orders/instances/orders-b",
        Duration::from_secs(10),
        |v| v["health"] == "alive",
    )
    .await;

    // A shuts down: its instances leave B's registry at once (its session is revoked).
    a.signal("TERM");
    a.wait(Duration::from_secs(30)).await;
    until(
        &b,
        "/v1/registry/services/orders",
        Duration::from_secs(5),
        |v| ids(v) == ["orders-b"],
    )
    .await;
}
