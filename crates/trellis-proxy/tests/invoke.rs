//! Invocation against real upstream servers: balancing, health, ejection, policies.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use trellis_core::Config;
use trellis_proxy::testing::{Behavior, Upstream};
use trellis_proxy::{InvokeError, Invoker, ProxyBody};

fn invoker(toml: &str) -> Invoker {
    let config = Config::from_sources(Some(toml), []).unwrap_or_else(|e| panic!("{e}"));
    Invoker::new(&config, None, 1 << 20).expect("build")
}

fn instances(upstreams: &[&Upstream]) -> String {
    let urls: Vec<String> = upstreams.iter().map(|u| format!("{:?}", u.url)).collect();
    format!("[{}]", urls.join(", "))
}

fn get(path: &str) -> http::Request<ProxyBody> {
    http::Request::get(path)
        .body(ProxyBody::empty())
        .expect("request")
}

async fn body(response: http::Response<ProxyBody>) -> String {
    String::from_utf8_lossy(
        &response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes(),
    )
    .into_owned()
}

/// Which upstream answered: the first word of the echo.
async fn who(invoker: &Invoker, app: &str, req: http::Request<ProxyBody>) -> String {
    let r = invoker.invoke(app, req).await.expect("answer");
    body(r)
        .await
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn forwards_method_path_query_body_and_passes_upstream_errors_through() {
    let a = Upstream::start("a", Behavior::Ok).await;
    let inv = invoker(&format!("[apps.svc]\ninstances = {}\n", instances(&[&a])));
    let req = http::Request::post("/orders/7?expand=1")
        .header("x-custom", "yes")
        .body(ProxyBody::full(Bytes::from("payload")))
        .expect("request");
    let text = body(inv.invoke("svc", req).await.expect("ok")).await;
    assert!(text.starts_with("a POST /orders/7?expand=1"), "{text}");
    assert!(text.ends_with("body=payload"), "{text}");

    a.set(Behavior::Status(418));
    let r = inv
        .invoke("svc", get("/"))
        .await
        .expect("a teapot is an answer, not an error");
    assert_eq!(r.status(), 418);
    a.set(Behavior::Status(500));
    assert_eq!(
        inv.invoke("svc", get("/"))
            .await
            .expect("passed through")
            .status(),
        500
    );

    let missing = inv.invoke("nope", get("/")).await.expect_err("unknown app");
    assert_eq!(
        (missing.status().as_u16(), missing.code()),
        (404, "app_not_found")
    );
}

#[tokio::test]
async fn round_robin_spreads_and_p2c_avoids_the_slow_instance() {
    let (a, b, c) = (
        Upstream::start("a", Behavior::Ok).await,
        Upstream::start("b", Behavior::Ok).await,
        Upstream::start("c", Behavior::Ok).await,
    );
    let inv = invoker(&format!(
        "[apps.svc]\ninstances = {}\nlb = \"round_robin\"\n",
        instances(&[&a, &b, &c])
    ));
    let mut seen = HashMap::new();
    for _ in 0..30 {
        *seen.entry(who(&inv, "svc", get("/")).await).or_insert(0) += 1;
    }
    assert_eq!(
        seen,
        HashMap::from([("a".into(), 10), ("b".into(), 10), ("c".into(), 10)])
    );

    let slow = Upstream::start("slow", Behavior::Slow(Duration::from_millis(50))).await;
    let fast = Upstream::start("fast", Behavior::Ok).await;
    let inv = invoker(&format!(
        "[apps.svc]\ninstances = {}\nlb = \"p2c\"\n",
        instances(&[&slow, &fast])
    ));
    for _ in 0..40 {
        inv.invoke("svc", get("/")).await.expect("ok");
    }
    assert!(
        slow.hits() <= 3,
        "p2c sends almost nothing to the slow instance once it knows: {}",
        slow.hits()
    );
}

#[tokio::test]
async fn consistent_hashing_keeps_a_customer_on_one_instance() {
    let ups = [
        Upstream::start("a", Behavior::Ok).await,
        Upstream::start("b", Behavior::Ok).await,
        Upstream::start("c", Behavior::Ok).await,
    ];
    let inv = invoker(&format!(
        "[apps.svc]\ninstances = {}\nlb = \"hash:header:x-customer\"\n",
        instances(&ups.iter().collect::<Vec<_>>())
    ));
    let mut owners = HashMap::new();
    for round in 0..3 {
        for customer in 0..20 {
            let req = http::Request::get("/")
                .header("x-customer", format!("c{customer}"))
                .body(ProxyBody::empty())
                .expect("request");
            let owner = who(&inv, "svc", req).await;
            let first = owners.entry(customer).or_insert_with(|| owner.clone());
            assert_eq!(*first, owner, "customer {customer} moved in round {round}");
        }
    }
    let distinct: std::collections::HashSet<_> = owners.values().collect();
    assert_eq!(distinct.len(), 3, "20 customers use all 3 instances");
}

#[tokio::test]
async fn failing_instances_are_ejected_and_come_back() {
    let good = Upstream::start("good", Behavior::Ok).await;
    let bad = Upstream::start("bad", Behavior::Status(503)).await;
    let inv = invoker(&format!(
        "[apps.svc]\ninstances = {}\nlb = \"round_robin\"\n[apps.svc.outlier_detection]\nconsecutive_errors = 3\nbase_ejection = \"300ms\"\nlatency_factor = 0\n",
        instances(&[&good, &bad])
    ));
    for _ in 0..10 {
        let _ = inv.invoke("svc", get("/")).await;
    }
    assert_eq!(bad.hits(), 3, "ejected after 3 errors in a row");
    let snapshot = inv.snapshot();
    let bad_state = snapshot[0]
        .instances
        .iter()
        .find(|i| i.url == bad.url)
        .expect("listed");
    assert!(bad_state.ejected_for_ms.is_some(), "{bad_state:?}");

    bad.set(Behavior::Ok);
    tokio::time::sleep(Duration::from_millis(350)).await;
    for _ in 0..10 {
        inv.invoke("svc", get("/")).await.expect("ok");
    }
    assert!(bad.hits() >= 3 + 4, "back in rotation: {}", bad.hits());
}

#[tokio::test]
async fn never_ejects_more_than_the_max_percent() {
    let a = Upstream::start("a", Behavior::Status(503)).await;
    let b = Upstream::start("b", Behavior::Status(503)).await;
    let inv = invoker(&format!(
        "[apps.svc]\ninstances = {}\nlb = \"round_robin\"\n[apps.svc.outlier_detection]\nconsecutive_errors = 1\nmax_ejection_percent = 50\nlatency_factor = 0\n",
        instances(&[&a, &b])
    ));
    for _ in 0..20 {
        let r = inv
            .invoke("svc", get("/"))
            .await
            .expect("an answer, not no_healthy_upstream");
        assert_eq!(r.status(), 503);
    }
    let ejected = inv.snapshot()[0]
        .instances
        .iter()
        .filter(|i| i.ejected_for_ms.is_some())
        .count();
    assert_eq!(ejected, 1);
}

#[tokio::test]
async fn slow_instances_are_ejected_by_latency() {
    let fast = [
        Upstream::start("f1", Behavior::Ok).await,
        Upstream::start("f2", Behavior::Ok).await,
    ];
    let slow = Upstream::start("slow", Behavior::Slow(Duration::from_millis(40))).await;
    let inv = invoker(&format!(
        "[apps.svc]\ninstances = {}\nlb = \"round_robin\"\n[apps.svc.outlier_detection]\nlatency_factor = 3\nlatency_min_requests = 5\ninterval = \"300ms\"\nbase_ejection = \"10s\"\n",
        instances(&[&fast[0], &fast[1], &slow])
    ));
    for _ in 0..30 {
        inv.invoke("svc", get("/")).await.expect("ok");
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let hits_before = slow.hits();
    for _ in 0..30 {
        inv.invoke("svc", get("/")).await.expect("ok");
    }
    assert_eq!(
        slow.hits(),
        hits_before,
        "the slow instance was ejected for its latency"
    );
}

#[tokio::test]
async fn health_checks_take_instances_out_and_back() {
    let a = Upstream::start("a", Behavior::Ok).await;
    let b = Upstream::start("b", Behavior::Ok).await;
    let inv = invoker(&format!(
        "[apps.svc]\ninstances = {}\nlb = \"round_robin\"\n[apps.svc.health_check]\npath = \"/healthz\"\ninterval = \"100ms\"\nhealthy_threshold = 1\nunhealthy_threshold = 2\n",
        instances(&[&a, &b])
    ));
    b.set_healthy(false);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let before = b.hits();
    for _ in 0..10 {
        assert_eq!(who(&inv, "svc", get("/")).await, "a");
    }
    assert_eq!(b.hits(), before);
    assert!(b.health_hits.load(std::sync::atomic::Ordering::SeqCst) >= 2);

    b.set_healthy(true);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(who(&inv, "svc", get("/")).await);
    }
    assert!(seen.contains("b"), "healthy again after one passed probe");

    a.set_healthy(false);
    b.set_healthy(false);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let err = inv
        .invoke("svc", get("/"))
        .await
        .expect_err("nobody healthy");
    assert_eq!(
        (err.status().as_u16(), err.code()),
        (503, "no_healthy_upstream")
    );
}

#[tokio::test]
async fn dead_instances_and_timeouts_map_to_gateway_errors() {
    let dead = Upstream::start("dead", Behavior::Ok).await;
    let url = dead.url.clone();
    dead.die();
    drop(dead);
    let slow = Upstream::start("slow", Behavior::Slow(Duration::from_secs(5))).await;
    let inv = invoker(&format!(
        "[apps.dead]\ninstances = [{url:?}]\n[apps.slow]\ninstances = {}\n\
         [resiliency.policies.timeouts.short]\nattempt = \"100ms\"\n\
         [resiliency.targets.apps.slow]\ntimeout = \"short\"\n",
        instances(&[&slow])
    ));
    let err = inv.invoke("dead", get("/")).await.expect_err("refused");
    assert_eq!(
        (err.status().as_u16(), err.code()),
        (502, "upstream_unavailable"),
        "{err}"
    );
    let err = inv.invoke("slow", get("/")).await.expect_err("timeout");
    assert_eq!(
        (err.status().as_u16(), err.code()),
        (504, "upstream_timeout")
    );
}

#[tokio::test]
async fn the_breaker_opens_at_its_threshold_and_recovers_through_half_open() {
    let up = Upstream::start("a", Behavior::Status(503)).await;
    let inv = invoker(&format!(
        "[apps.svc]\ninstances = {}\n[apps.svc.outlier_detection]\nconsecutive_errors = 0\nlatency_factor = 0\n\
         [resiliency.policies.breakers.b]\nwindow_size = 4\nminimum_calls = 4\nfailure_rate = 50\nopen_wait = \"300ms\"\nhalf_open_calls = 2\n\
         [resiliency.targets.apps.svc]\nbreaker = \"b\"\n",
        instances(&[&up])
    ));
    for _ in 0..4 {
        assert_eq!(
            inv.invoke("svc", get("/"))
                .await
                .expect("passed through")
                .status(),
            503
        );
    }
    let err = inv.invoke("svc", get("/")).await.expect_err("open");
    assert_eq!((err.status().as_u16(), err.code()), (503, "circuit_open"));
    assert!(err.retry_after().is_some());
    assert_eq!(up.hits(), 4, "the open breaker kept the call away");
    let state = serde_json::to_value(inv.registry().snapshot()).expect("json");
    assert_eq!(state["breakers"][0]["state"], "open");

    up.set(Behavior::Ok);
    tokio::time::sleep(Duration::from_millis(350)).await;
    for _ in 0..2 {
        assert_eq!(
            inv.invoke("svc", get("/")).await.expect("trial").status(),
            200
        );
    }
    let state = serde_json::to_value(inv.registry().snapshot()).expect("json");
    assert_eq!(state["breakers"][0]["state"], "closed");
}

#[tokio::test]
async fn the_bulkhead_refuses_a_flood() {
    let up = Upstream::start("a", Behavior::Slow(Duration::from_millis(300))).await;
    let inv = std::sync::Arc::new(invoker(&format!(
        "[apps.svc]\ninstances = {}\n[resiliency.policies.bulkheads.small]\nmax_concurrent = 2\nmax_queue = 1\nmax_wait = \"50ms\"\n\
         [resiliency.targets.apps.svc]\nbulkhead = \"small\"\n",
        instances(&[&up])
    )));
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let inv = std::sync::Arc::clone(&inv);
            tokio::spawn(async move {
                inv.invoke("svc", get("/"))
                    .await
                    .map(|r| r.status().as_u16())
                    .map_err(|e| e.code())
            })
        })
        .collect();
    let mut outcomes = HashMap::new();
    for c in calls {
        *outcomes.entry(c.await.expect("join")).or_insert(0) += 1;
    }
    assert_eq!(outcomes.get(&Ok(200)), Some(&2), "{outcomes:?}");
    assert_eq!(
        outcomes.get(&Err("bulkhead_full")),
        Some(&8),
        "{outcomes:?}"
    );
}

#[tokio::test]
async fn retries_stay_within_the_budget() {
    let up = Upstream::start("a", Behavior::Status(503)).await;
    let inv = std::sync::Arc::new(invoker(&format!(
        "[apps.svc]\ninstances = {}\n[apps.svc.outlier_detection]\nconsecutive_errors = 0\nlatency_factor = 0\n\
         [resiliency.policies.retries.r]\nmax_attempts = 3\n[resiliency.policies.retries.r.backoff]\nbase = \"10ms\"\njitter = \"none\"\n\
         [resiliency.policies.retries.r.budget]\npercent = 20\nmin_per_sec = 1\nwindow = \"10s\"\n\
         [resiliency.targets.apps.svc]\nretry = \"r\"\n",
        instances(&[&up])
    )));
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let inv = std::sync::Arc::clone(&inv);
            tokio::spawn(async move { inv.invoke("svc", get("/")).await.map(|r| r.status()) })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.expect("join").expect("answer").as_u16(), 503);
    }
    // 100 originals; retries at most 10 (floor) + 20% of 100.
    let hits = up.hits();
    assert!(
        (100..=130).contains(&hits),
        "{hits} upstream hits for 100 calls"
    );
    assert_eq!(hits, 130, "the budget is used, exactly");
}

#[tokio::test]
async fn a_post_without_idempotency_key_is_not_retried() {
    let up = Upstream::start("a", Behavior::Status(503)).await;
    let inv = invoker(&format!(
        "[apps.svc]\ninstances = {}\n[resiliency.policies.retries.r]\nmax_attempts = 3\n[resiliency.policies.retries.r.backoff]\nbase = \"1ms\"\n\
         [resiliency.targets.apps.svc]\nretry = \"r\"\n",
        instances(&[&up])
    ));
    let post = || {
        http::Request::post("/charge")
            .body(ProxyBody::full("x"))
            .expect("request")
    };
    inv.invoke("svc", post()).await.expect("answer");
    assert_eq!(up.hits(), 1);
    let keyed = http::Request::post("/charge")
        .header("idempotency-key", "k1")
        .body(ProxyBody::full("x"))
        .expect("request");
    inv.invoke("svc", keyed).await.expect("answer");
    assert_eq!(
        up.hits(),
        4,
        "an idempotency key makes it retryable, body resent each time"
    );
}

#[tokio::test]
async fn hedging_wins_against_a_slow_instance() {
    let slow = Upstream::start("slow", Behavior::Slow(Duration::from_secs(2))).await;
    let fast = Upstream::start("fast", Behavior::Ok).await;
    let inv = invoker(&format!(
        "[apps.svc]\ninstances = {}\nlb = \"round_robin\"\n[apps.svc.outlier_detection]\nlatency_factor = 0\n\
         [resiliency.policies.hedges.h]\ndelay = \"50ms\"\n[resiliency.targets.apps.svc]\nhedge = \"h\"\n",
        instances(&[&slow, &fast])
    ));
    for _ in 0..4 {
        let started = tokio::time::Instant::now();
        assert_eq!(who(&inv, "svc", get("/")).await, "fast");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn fault_injection_aborts_and_switches_at_runtime() {
    let up = Upstream::start("a", Behavior::Ok).await;
    let inv = invoker(&format!(
        "[apps.svc]\ninstances = {}\n[resiliency.policies.faults.chaos]\nabort_percent = 100\nabort_status = 503\n\
         [resiliency.targets.apps.svc]\nfault = \"chaos\"\n",
        instances(&[&up])
    ));
    let err = inv.invoke("svc", get("/")).await.expect_err("aborted");
    assert_eq!((err.status().as_u16(), err.code()), (503, "fault_injected"));
    assert_eq!(up.hits(), 0);
    inv.registry()
        .faults("svc")
        .expect("registered")
        .set(Default::default())
        .expect("valid");
    assert_eq!(
        inv.invoke("svc", get("/")).await.expect("healed").status(),
        200
    );
}

#[tokio::test]
async fn routes_get_their_own_policies() {
    let up = Upstream::start("a", Behavior::Ok).await;
    let inv = invoker(&format!(
        "[apps.svc]\ninstances = {}\n[resiliency.policies.faults.chaos]\nabort_percent = 100\nabort_status = 500\n\
         [resiliency.targets.apps.svc.routes.\"/admin\"]\nfault = \"chaos\"\n",
        instances(&[&up])
    ));
    assert_eq!(
        inv.invoke("svc", get("/orders"))
            .await
            .expect("ok")
            .status(),
        200
    );
    assert_eq!(
        inv.invoke("svc", get("/administrator"))
            .await
            .expect("not under /admin")
            .status(),
        200
    );
    assert_eq!(
        inv.invoke("svc", get("/admin/users"))
            .await
            .expect_err("faulted")
            .code(),
        "fault_injected"
    );
    assert_eq!(
        inv.invoke("svc", get("/admin"))
            .await
            .expect_err("faulted")
            .code(),
        "fault_injected"
    );
}

#[tokio::test]
async fn h2c_upstreams() {
    let up = Upstream::start("h2", Behavior::Ok).await;
    let inv = invoker(&format!(
        "[apps.svc]\ninstances = {}\nprotocol = \"h2c\"\n",
        instances(&[&up])
    ));
    let text = body(inv.invoke("svc", get("/x")).await.expect("ok")).await;
    assert!(text.contains("version=HTTP/2.0"), "{text}");
}

#[tokio::test]
async fn discovery_changes_apply_without_restart() {
    let a = Upstream::start("a", Behavior::Ok).await;
    let b = Upstream::start("b", Behavior::Ok).await;
    let discovery = std::sync::Arc::new(trellis_proxy::StaticDiscovery::default());
    discovery.set("svc", vec![a.url.clone()]);
    let config = Config::from_sources(
        Some(&format!("[apps.svc]\ninstances = {}\n", instances(&[&a]))),
        [],
    )
    .expect("valid");
    let inv = Invoker::new(
        &config,
        Some(discovery.clone() as std::sync::Arc<dyn trellis_proxy::Discovery>),
        1 << 20,
    )
    .expect("build");
    assert_eq!(who(&inv, "svc", get("/")).await, "a");
    discovery.set("svc", vec![b.url.clone()]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(who(&inv, "svc", get("/")).await, "b");
}

#[allow(dead_code)]
fn _errors_are_send(e: InvokeError) -> impl Send {
    e
}
