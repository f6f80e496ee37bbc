//! Black-box: shard maps through the real binary — owner lookups against the
//! `trellis-shard` strategies, the whole assignment, bad input, invocations routed by
//! `Trellis-Shard-Key` to real upstreams, and rebalance events on membership change.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Trellis, client, run};
use trellis_proxy::testing::{Behavior, Upstream};
use trellis_shard::{Member, StrategyConfig, StrategyKind, assign_shards, shard_for};

async fn get(t: &Trellis, path: &str) -> (u16, Value) {
    let r = client().get(t.url(path)).send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn put(t: &Trellis, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .put(t.url(path))
        .json(&body)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or_default()
}

/// The owner (member index) of `key` as `trellis-shard` places it.
fn expected_owner(kind: StrategyKind, members: &[Member], shards: u32, key: &str) -> usize {
    let placement = StrategyConfig::new(kind)
        .build(members.to_vec())
        .expect("valid");
    assign_shards(placement.as_ref(), shards)[shard_for(key.as_bytes(), shards) as usize]
        .expect("an owner")
}

#[tokio::test]
async fn owners_match_the_strategy_and_the_assignment_is_complete() {
    let kinds = StrategyKind::ALL;
    let members = [Member::new("a"), Member::weighted("b", 2), Member::new("c")];
    let mut config = String::new();
    for kind in kinds {
        config.push_str(&format!(
            "[shards.{kind}]\nstrategy = \"{kind}\"\nshards = 64\nmembers = [\n  \
             {{ id = \"a\", address = \"10.0.0.1:7000\" }},\n  \
             {{ id = \"b\", address = \"10.0.0.2:7000\", weight = 2 }},\n  \
             {{ id = \"c\", address = \"10.0.0.3:7000\" }},\n]\n"
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), &config).await;
    assert!(t.banner.contains("shards.maglev (maglev)"), "{}", t.banner);

    let (status, list) = get(&t, "/v1/shards").await;
    assert_eq!(status, 200, "{list}");
    let names: Vec<&str> = list["maps"]
        .as_array()
        .expect("maps")
        .iter()
        .map(|m| m["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["bounded", "jump", "maglev", "rendezvous", "ring"]);
    assert_eq!(
        (
            list["maps"][0]["members"].as_u64(),
            list["maps"][0]["source"].as_str()
        ),
        (Some(3), Some("static"))
    );

    for kind in kinds {
        for i in 0..40 {
            let key = format!("customer-{i}");
            let (status, found) = get(&t, &format!("/v1/shards/{kind}/owner?key={key}")).await;
            assert_eq!(status, 200, "{found}");
            let owner = expected_owner(kind, &members, 64, &key);
            let id = &members[owner].name;
            assert_eq!(
                found["owner"]["id"].as_str(),
                Some(id.as_str()),
                "{kind} {key}"
            );
            assert_eq!(
                found["shard"].as_u64(),
                Some(u64::from(shard_for(key.as_bytes(), 64)))
            );
            assert_eq!(found["version"], 1);
            let address = found["owner"]["address"].as_str().expect("address");
            assert!(address.starts_with("10.0.0.") && address.ends_with(":7000"));
        }

        let (status, whole) = get(&t, &format!("/v1/shards/{kind}")).await;
        assert_eq!(status, 200, "{whole}");
        assert_eq!(whole["strategy"].as_str(), Some(kind.as_str()));
        assert_eq!(
            (whole["version"].as_u64(), &whole["last_rebalance"]),
            (Some(1), &Value::Null)
        );
        let placement = StrategyConfig::new(kind)
            .build(members.to_vec())
            .expect("valid");
        let table = assign_shards(placement.as_ref(), 64);
        let shards = whole["shards"].as_array().expect("shards");
        assert_eq!(shards.len(), 64);
        for (i, s) in shards.iter().enumerate() {
            assert_eq!(s["shard"].as_u64(), Some(i as u64));
            let owner = table[i].map(|o| members[o].name.as_str());
            assert_eq!(s["owner"].as_str(), owner, "{kind} shard {i}");
        }
        let listed = whole["members"].as_array().expect("members");
        let counts: Vec<u64> = listed
            .iter()
            .map(|m| m["shards"].as_u64().expect("count"))
            .collect();
        assert_eq!(counts.iter().sum::<u64>(), 64, "{kind}: {counts:?}");
        assert_eq!(listed[1]["weight"], 2);
        assert_eq!(listed[1]["address"], "10.0.0.2:7000");
    }
}

#[tokio::test]
async fn bad_input_is_a_problem_with_a_stable_code() {
    let up = Upstream::start("u", Behavior::Ok).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[apps.orders]\ninstances = [{url:?}]\n[apps.plain]\ninstances = [{url:?}]\n\
         [shards.orders]\nmembers = {{ app = \"orders\" }}\n\
         [shards.static]\nmembers = [{{ id = \"a\", address = \"x:1\" }}]\n",
        url = up.url
    );
    let t = Trellis::start_in(dir.path(), &config).await;

    for path in ["/v1/shards/nope", "/v1/shards/nope/owner?key=k"] {
        let (status, body) = get(&t, path).await;
        assert_eq!(
            (status, code(&body)),
            (404, "unknown_shard_map"),
            "{path}: {body}"
        );
        assert_eq!(body["type"], "urn:trellis:problem:unknown_shard_map");
    }
    let (status, body) = put(&t, "/v1/shards/nope/members", json!({"members": []})).await;
    assert_eq!((status, code(&body)), (404, "unknown_shard_map"), "{body}");
    for path in ["/v1/shards/static/owner", "/v1/shards/static/owner?key="] {
        let (status, body) = get(&t, path).await;
        assert_eq!(
            (status, code(&body)),
            (400, "missing_shard_key"),
            "{path}: {body}"
        );
    }

    // Members of an app's map follow the app.
    let (status, body) = put(&t, "/v1/shards/orders/members", json!({"members": []})).await;
    assert_eq!(
        (status, code(&body)),
        (409, "shard_members_managed"),
        "{body}"
    );
    // Every broken member is named.
    let (status, body) = put(
        &t,
        "/v1/shards/static/members",
        json!({"members": [
            {"id": "a", "address": "x:1"},
            {"id": "b", "address": "x:2", "weight": 0},
            {"id": "a", "address": "x:3"},
        ]}),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "invalid_members"), "{body}");
    let detail = body["detail"].as_str().expect("detail");
    assert!(
        detail.contains("members[1].weight: must be > 0")
            && detail.contains("members[2].id: \"a\" is listed twice"),
        "{detail}"
    );
    let (status, body) = put(
        &t,
        "/v1/shards/static/members",
        json!({"members": [{"id": "a"}]}),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "invalid_body"), "{body}");
    let (status, whole) = get(&t, "/v1/shards/static").await;
    assert_eq!(
        (status, whole["version"].as_u64()),
        (200, Some(1)),
        "refusals change nothing"
    );

    // A shard key for an app without a map.
    let r = client()
        .get(t.url("/v1/invoke/plain/x"))
        .header("trellis-shard-key", "k")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("problem");
    assert_eq!(code(&body), "no_shard_map", "{body}");

    // `config check` names the key.
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[shards.orders]\nstrategy = \"bounded\"\nepsilon = 0\n\
         members = [{ id = \"a\", address = \"x:1\" }, { id = \"b\", address = \"x:2\", weight = 0 }]\n",
    )
    .expect("write");
    let (status, _, err) = run(&["config", "check", path.to_str().expect("utf8")], &[]);
    assert_eq!(status, 2, "{err}");
    assert!(
        err.contains("shards.orders.members[1].weight: must be > 0")
            && err.contains("shards.orders.epsilon: must be finite and greater than 0"),
        "{err}"
    );
}

#[tokio::test]
async fn keyed_invocations_reach_the_owner() {
    let ups = [
        Upstream::start("u0", Behavior::Ok).await,
        Upstream::start("u1", Behavior::Ok).await,
        Upstream::start("u2", Behavior::Ok).await,
    ];
    let urls: Vec<String> = ups.iter().map(|u| format!("{:?}", u.url)).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[apps.orders]\ninstances = [{}]\n\
         [apps.orders.health_check]\npath = \"/healthz\"\ninterval = \"100ms\"\nunhealthy_threshold = 1\nhealthy_threshold = 1\n\
         [shards.orders]\nstrategy = \"rendezvous\"\nshards = 32\nmembers = {{ app = \"orders\" }}\n",
        urls.join(", ")
    );
    let t = Trellis::start_in(dir.path(), &config).await;
    let members: Vec<Member> = ups.iter().map(|u| Member::new(u.url.clone())).collect();

    let invoke = |key: Option<String>| {
        let mut request = client().get(t.url("/v1/invoke/orders/orders/1"));
        if let Some(key) = key {
            request = request.header("trellis-shard-key", key);
        }
        request.send()
    };
    let mut owners = std::collections::BTreeSet::new();
    for i in 0..30 {
        let key = format!("order-{i}");
        let (status, found) = get(&t, &format!("/v1/shards/orders/owner?key={key}")).await;
        assert_eq!(status, 200, "{found}");
        let owner = &ups[expected_owner(StrategyKind::Rendezvous, &members, 32, &key)];
        assert_eq!(found["owner"]["address"].as_str(), Some(owner.url.as_str()));
        assert_eq!(found["owner"]["id"].as_str(), Some(owner.url.as_str()));
        for _ in 0..2 {
            let r = invoke(Some(key.clone())).await.expect("send");
            assert_eq!(r.status(), 200);
            let echo = r.text().await.expect("text");
            assert!(
                echo.starts_with(&format!("{} GET /orders/1", owner.name)),
                "{key}: {echo}"
            );
        }
        owners.insert(owner.name.clone());
    }
    assert_eq!(owners.len(), 3, "30 keys spread over every instance");
    let received = ups[0].received();
    assert!(
        received
            .iter()
            .all(|r| r.header("trellis-shard-key").is_some()),
        "the key reaches the app"
    );
    // Without the key: the app's load balancing.
    let before: u32 = ups.iter().map(Upstream::hits).sum();
    for _ in 0..6 {
        assert_eq!(invoke(None).await.expect("send").status(), 200);
    }
    assert_eq!(ups.iter().map(Upstream::hits).sum::<u32>(), before + 6);

    // An owner failing its health checks: its keys get a problem, never another instance.
    ups[1].set_healthy(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, status) = get(&t, "/v1/resilience").await;
        let healthy = status["upstreams"][0]["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .find(|i| i["url"] == ups[1].url.as_str())
            .and_then(|i| i["healthy"].as_bool());
        if healthy == Some(false) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never unhealthy: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key = (0..)
        .map(|i| format!("order-{i}"))
        .find(|k| expected_owner(StrategyKind::Rendezvous, &members, 32, k) == 1)
        .expect("a key of u1");
    let hits = ups[1].hits();
    let r = invoke(Some(key.clone())).await.expect("send");
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.expect("problem");
    assert_eq!(code(&body), "shard_owner_unavailable", "{body}");
    assert_eq!(
        (body["map"].as_str(), body["owner"].as_str()),
        (Some("orders"), Some(ups[1].url.as_str()))
    );
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("failing health checks")),
        "{body}"
    );
    assert_eq!(ups[1].hits(), hits);
    // Keys of the others still go through.
    let other = (0..)
        .map(|i| format!("order-{i}"))
        .find(|k| expected_owner(StrategyKind::Rendezvous, &members, 32, k) == 2)
        .expect("a key of u2");
    let r = invoke(Some(other)).await.expect("send");
    assert_eq!(r.status(), 200);
    assert!(r.text().await.expect("text").starts_with("u2 "));
}

#[tokio::test]
async fn membership_changes_rebalance_and_publish_an_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = "[shards.accounts]\nstrategy = \"ring\"\nshards = 128\n\
        members = [{ id = \"a\", address = \"10.0.0.1:7000\" }, { id = \"b\", address = \"10.0.0.2:7000\" }, { id = \"c\", address = \"10.0.0.3:7000\" }]\n\
        publish = { topic = \"shard-events\" }\n";
    let t = Trellis::start_in(dir.path(), config).await;

    let grown = json!({"members": [
        {"id": "a", "address": "10.0.0.1:7000"},
        {"id": "b", "address": "10.0.0.2:7000"},
        {"id": "c", "address": "10.0.0.3:7000"},
        {"id": "d", "address": "10.0.0.4:7000", "weight": 2},
    ]});
    let (status, changed) = put(&t, "/v1/shards/accounts/members", grown.clone()).await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(
        (changed["changed"].as_bool(), changed["version"].as_u64()),
        (Some(true), Some(2))
    );
    let rebalance = &changed["rebalance"];
    let moves = rebalance["moves"].as_array().expect("moves");
    assert_eq!(rebalance["moved"].as_u64(), Some(moves.len() as u64));
    // The ring moves only what `d` takes, close to the optimum of 128 × 2/5.
    assert!(moves.iter().all(|m| m["to"] == "d"), "{rebalance}");
    assert_eq!(rebalance["optimum"].as_u64(), Some(51));
    assert!((30..=75).contains(&moves.len()), "{}", moves.len());
    // Exactly the plan `trellis-shard` computes.
    let plan = StrategyConfig::new(StrategyKind::Ring)
        .plan(
            Member::all(["a", "b", "c"]),
            vec![
                Member::new("a"),
                Member::new("b"),
                Member::new("c"),
                Member::weighted("d", 2),
            ],
            128,
        )
        .expect("valid");
    assert_eq!(
        serde_json::to_value(&plan.moves).expect("json"),
        Value::Array(moves.clone())
    );

    let (_, whole) = get(&t, "/v1/shards/accounts").await;
    assert_eq!(whole["version"], 2);
    assert_eq!(whole["last_rebalance"], *rebalance);
    assert_eq!(whole["members"].as_array().map(Vec::len), Some(4));
    let (_, found) = get(&t, "/v1/shards/accounts/owner?key=acct-1").await;
    assert_eq!(found["version"], 2);

    // The same members again: nothing changes, no event.
    let (status, same) = put(&t, "/v1/shards/accounts/members", grown).await;
    assert_eq!(status, 200, "{same}");
    assert_eq!(
        (same["changed"].as_bool(), same["version"].as_u64()),
        (Some(false), Some(2))
    );
    assert_eq!(same["rebalance"], Value::Null);

    // Shrinking: c leaves.
    let (status, shrunk) = put(
        &t,
        "/v1/shards/accounts/members",
        json!({"members": [
            {"id": "a", "address": "10.0.0.1:7000"},
            {"id": "b", "address": "10.0.0.2:7000"},
            {"id": "d", "address": "10.0.0.4:7000", "weight": 2},
        ]}),
    )
    .await;
    assert_eq!(
        (status, shrunk["version"].as_u64()),
        (200, Some(3)),
        "{shrunk}"
    );
    assert!(
        shrunk["rebalance"]["moves"]
            .as_array()
            .expect("moves")
            .iter()
            .all(|m| m["from"] == "c")
    );

    let pull = || async {
        let r = client()
            .post(t.url("/v1/pubsub/default/subscriptions/watcher/pull"))
            .json(&json!({"topic": "shard-events", "max": 10, "wait_ms": 2000}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        let pulled: Value = r.json().await.expect("json");
        pulled["messages"].as_array().expect("messages").clone()
    };
    // Ordered per map (the map is the ordering key): one at a time.
    let messages = pull().await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    let event = &messages[0]["event"];
    assert_eq!(
        (
            event["type"].as_str(),
            event["source"].as_str(),
            event["subject"].as_str(),
            event["partitionkey"].as_str()
        ),
        (
            Some("trellis.shards.rebalanced"),
            Some("/trellis/shards/accounts"),
            Some("accounts"),
            Some("accounts")
        )
    );
    let data = &event["data"];
    assert_eq!(
        (data["map"].as_str(), data["version"].as_u64()),
        (Some("accounts"), Some(2))
    );
    assert_eq!(data["moves"], rebalance["moves"]);
    assert_eq!(data["members"], json!(["a", "b", "c", "d"]));
    let r = client()
        .post(t.url("/v1/pubsub/default/subscriptions/watcher/ack"))
        .json(&json!({"ack_ids": [messages[0]["ack_id"]]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let next = pull().await;
    assert_eq!(next.len(), 1, "one event per change: {next:?}");
    assert_eq!(next[0]["event"]["data"]["version"], 3);

    let (_, metrics) = {
        let r = client().get(t.url("/metrics")).send().await.expect("send");
        (r.status(), r.text().await.expect("text"))
    };
    assert!(
        metrics.contains("trellis_shard_rebalances_total{map=\"accounts\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("trellis_shard_map_version{map=\"accounts\"} 3"));
}
