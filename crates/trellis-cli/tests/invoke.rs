//! Black-box: service invocation and proxying through the real binary, against real
//! upstream servers started by the test.

mod support;

use std::time::Duration;

use support::{Trellis, client, run};
use trellis_proxy::testing::{Behavior, Upstream};

fn app(name: &str, upstreams: &[&Upstream]) -> String {
    let urls: Vec<String> = upstreams.iter().map(|u| format!("{:?}", u.url)).collect();
    format!("[apps.{name}]\ninstances = [{}]\n", urls.join(", "))
}

async fn resilience(t: &Trellis) -> serde_json::Value {
    client()
        .get(t.url("/v1/resilience"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json")
}

async fn problem(response: reqwest::Response) -> (u16, String, Option<String>) {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let body: serde_json::Value = response.json().await.expect("problem+json");
    (
        status,
        body["code"].as_str().unwrap_or_default().to_owned(),
        retry_after,
    )
}

#[tokio::test]
async fn invoke_forwards_requests_and_passes_answers_through() {
    let up = Upstream::start("orders", Behavior::Ok).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), &app("orders", &[&up])).await;

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = client()
        .post(t.url("/v1/invoke/orders/orders/42/items?limit=5"))
        .header("traceparent", traceparent)
        .header("x-request-id", "req-7")
        .header("connection", "close, x-drop-me")
        .header("x-drop-me", "1")
        .body("one apple")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let echo = response.text().await.expect("text");
    assert!(
        echo.starts_with("orders POST /orders/42/items?limit=5"),
        "{echo}"
    );
    assert!(
        echo.contains("traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "same trace: {echo}"
    );
    assert!(
        !echo.contains("00f067aa0ba902b7"),
        "our own span, not the caller's: {echo}"
    );
    assert!(echo.contains("x-request-id=req-7"), "{echo}");
    assert!(echo.ends_with("body=one apple"), "{echo}");

    for status in [404u16, 409, 500, 503] {
        up.set(Behavior::Status(status));
        let r = client()
            .get(t.url("/v1/invoke/orders/x"))
            .send()
            .await
            .expect("send");
        assert_eq!(
            r.status().as_u16(),
            status,
            "the app's own answer passes through"
        );
        assert!(r.text().await.expect("text").starts_with("orders GET /x"));
    }
}

#[tokio::test]
async fn invoke_errors_are_problems() {
    let up = Upstream::start("a", Behavior::Ok).await;
    let dead = Upstream::start("dead", Behavior::Ok).await;
    let dead_url = dead.url.clone();
    drop(dead);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "{}[apps.gone]\ninstances = [{dead_url:?}]\n[apps.gone.outlier_detection]\nconsecutive_errors = 0\n",
        app("a", &[&up])
    );
    let t = Trellis::start_in(dir.path(), &config).await;
    let get = |path: &str| client().get(t.url(path)).send();

    assert_eq!(
        problem(get("/v1/invoke/nope/x").await.expect("send"))
            .await
            .1,
        "app_not_found"
    );
    assert_eq!(
        problem(get("/v1/invoke/").await.expect("send")).await.1,
        "invalid_path"
    );
    // Raw HTTP: clients normalize dot segments away before sending.
    let (status, body) = support::raw_exchange(
        &t,
        "GET /v1/invoke/a/x/../admin HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("\"code\":\"invalid_path\""), "{body}");
    let (status, code, _) = problem(get("/v1/invoke/gone/x").await.expect("send")).await;
    assert_eq!((status, code.as_str()), (502, "upstream_unavailable"));
}

#[tokio::test]
async fn breakers_faults_and_the_resilience_api() {
    let up = Upstream::start("pay", Behavior::Status(503)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "{}[apps.payments.outlier_detection]\nconsecutive_errors = 0\nlatency_factor = 0\n\
         [resiliency.policies.breakers.b]\nwindow_size = 4\nminimum_calls = 4\nopen_wait = \"500ms\"\nhalf_open_calls = 1\n\
         [resiliency.policies.faults.chaos]\n\
         [resiliency.targets.apps.payments]\nbreaker = \"b\"\nfault = \"chaos\"\n",
        app("payments", &[&up])
    );
    let t = Trellis::start_in(dir.path(), &config).await;
    let events = client()
        .get(t.url("/v1/resilience/events"))
        .send()
        .await
        .expect("subscribe");
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let call = || client().post(t.url("/v1/invoke/payments/charge")).send();
    for _ in 0..4 {
        assert_eq!(call().await.expect("send").status(), 503);
    }
    // The transition arrives as a Server-Sent Event.
    let mut stream = events.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\"to\":\"open\"") {
        let chunk = tokio::time::timeout(
            Duration::from_secs(5),
            futures_util::StreamExt::next(&mut stream),
        )
        .await
        .expect("an event within 5s")
        .expect("stream open")
        .expect("chunk");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        seen.contains("event: breaker") && seen.contains("\"breaker\":\"payments\""),
        "{seen}"
    );
    let (status, code, retry_after) = problem(call().await.expect("send")).await;
    assert_eq!((status, code.as_str()), (503, "circuit_open"));
    assert!(retry_after.is_some());
    assert_eq!(up.hits(), 4);

    let state: serde_json::Value = resilience(&t).await;
    assert_eq!(state["breakers"][0]["name"], "payments");
    assert_eq!(state["breakers"][0]["state"], "open");
    assert_eq!(
        state["upstreams"][0]["instances"][0]["url"],
        up.url.as_str()
    );

    // Recovery through half-open.
    up.set(Behavior::Ok);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(call().await.expect("send").status(), 200);
    let state: serde_json::Value = resilience(&t).await;
    assert_eq!(state["breakers"][0]["state"], "closed");

    // Chaos on: every call aborts with 500, which the breaker counts.
    let set = client()
        .put(t.url("/v1/resilience/faults/payments"))
        .json(&serde_json::json!({"abort_percent": 100, "abort_status": 500}))
        .send()
        .await
        .expect("send");
    assert_eq!(set.status(), 200);
    let (status, code, _) = problem(call().await.expect("send")).await;
    assert_eq!((status, code.as_str()), (500, "fault_injected"));
    let bad = client()
        .put(t.url("/v1/resilience/faults/payments"))
        .json(&serde_json::json!({"abort_percent": 300}))
        .send()
        .await
        .expect("send");
    assert_eq!(problem(bad).await.1, "invalid_fault");
    let missing = client()
        .put(t.url("/v1/resilience/faults/nope"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(problem(missing).await.1, "fault_not_found");
    client()
        .put(t.url("/v1/resilience/faults/payments"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("heal");

    let forced = client()
        .put(t.url("/v1/resilience/breakers/payments"))
        .json(&serde_json::json!({"mode": "forced_open"}))
        .send()
        .await
        .expect("send");
    assert_eq!(forced.status(), 200);
    assert_eq!(problem(call().await.expect("send")).await.1, "circuit_open");
    let bad = client()
        .put(t.url("/v1/resilience/breakers/payments"))
        .json(&serde_json::json!({"mode": "sideways"}))
        .send()
        .await
        .expect("send");
    assert_eq!(problem(bad).await.1, "invalid_body");
}

#[tokio::test]
async fn listeners_in_config_proxy_with_access_logs() {
    let a = Upstream::start("a", Behavior::Ok).await;
    let b = Upstream::start("b", Behavior::Ok).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[[listeners]]\nname = \"edge\"\nlisten = \"127.0.0.1:0\"\nupstreams = [{:?}, {:?}]\nlb = \"round_robin\"\n",
        a.url, b.url
    );
    let t = Trellis::start_in(dir.path(), &config).await;
    let edge = t.listener("edge");
    let mut names = Vec::new();
    for _ in 0..4 {
        let text = client()
            .get(format!("{edge}/hello?x=1"))
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("text");
        assert!(text.contains("GET /hello?x=1"), "{text}");
        names.push(
            text.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    assert_eq!(names, ["a", "b", "a", "b"]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = t.stderr();
    assert!(
        log.contains("proxied")
            && log.contains("route=listener:edge")
            && log.contains("path=/hello"),
        "{log}"
    );
}

#[tokio::test]
async fn the_proxy_command() {
    let a = Upstream::start("a", Behavior::Ok).await;
    let b = Upstream::start("b", Behavior::Ok).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let listen = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(support::BIN)
        .args([
            "proxy",
            "--listen",
            &listen,
            "--upstream",
            &a.url,
            "--upstream",
            &b.url,
            "--lb",
            "hash:header:x-user",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let banner = lines.next_line().await.expect("read").expect("banner");
    assert!(
        banner.contains(&format!("proxy proxy on http://{listen}")),
        "{banner}"
    );
    let mut owner = None;
    for _ in 0..6 {
        let text = client()
            .get(format!("http://{listen}/x"))
            .header("x-user", "alice")
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("text");
        let who = text
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        assert_eq!(
            owner.get_or_insert_with(|| who.clone()),
            &who,
            "alice sticks to one upstream"
        );
    }
    child.start_kill().expect("kill");

    let (code, _, err) = run(
        &["proxy", "--listen", "127.0.0.1:0", "--upstream", "ftp://x"],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("listeners[0].upstreams[0]"), "{err}");
}

#[tokio::test]
async fn component_targets_guard_state_store_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = "[resiliency.policies.faults.chaos]\nabort_percent = 100\n\
                  [resiliency.policies.breakers.b]\nwindow_size = 100\n\
                  [resiliency.targets.components.\"state.default\"]\nfault = \"chaos\"\nbreaker = \"b\"\n";
    let t = Trellis::start_in(dir.path(), config).await;
    let put = || client().put(t.url("/v1/state/default/k")).body("v").send();
    let (status, code, retry_after) = problem(put().await.expect("send")).await;
    assert_eq!((status, code.as_str()), (503, "backend_unavailable"));
    assert!(retry_after.is_some());
    // Readiness looks at the backend itself, not at injected faults.
    assert_eq!(
        client()
            .get(t.url("/readyz"))
            .send()
            .await
            .expect("send")
            .status(),
        200
    );

    let state: serde_json::Value = resilience(&t).await;
    assert_eq!(state["faults"][0]["name"], "state.default");
    assert_eq!(state["breakers"][0]["name"], "state.default");

    client()
        .put(t.url("/v1/resilience/faults/state.default"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("heal");
    assert_eq!(put().await.expect("send").status(), 204);
    client()
        .put(t.url("/v1/resilience/breakers/state.default"))
        .json(&serde_json::json!({"mode": "forced_open"}))
        .send()
        .await
        .expect("force");
    assert_eq!(problem(put().await.expect("send")).await.1, "circuit_open");
}

#[tokio::test]
async fn retries_budget_hedging_bulkhead_and_ejection_through_the_binary() {
    let failing = Upstream::start("failing", Behavior::Status(503)).await;
    let slow = Upstream::start("slow", Behavior::Slow(Duration::from_secs(3))).await;
    let fast = Upstream::start("fast", Behavior::Ok).await;
    let crowded = Upstream::start("crowded", Behavior::Slow(Duration::from_millis(400))).await;
    let flaky = Upstream::start("flaky", Behavior::Status(502)).await;
    let steady = Upstream::start("steady", Behavior::Ok).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[apps.retried]\ninstances = [{failing:?}]\n[apps.retried.outlier_detection]\nconsecutive_errors = 0\n\
         [apps.hedged]\ninstances = [{slow:?}, {fast:?}]\nlb = \"round_robin\"\n[apps.hedged.outlier_detection]\nlatency_factor = 0\n\
         [apps.crowded]\ninstances = [{crowded:?}]\n\
         [apps.ejecting]\ninstances = [{flaky:?}, {steady:?}]\nlb = \"round_robin\"\n\
         [apps.ejecting.outlier_detection]\nconsecutive_errors = 2\nbase_ejection = \"1m\"\n\
         [resiliency.policies.retries.r]\nmax_attempts = 3\n[resiliency.policies.retries.r.backoff]\nbase = \"5ms\"\n\
         [resiliency.policies.retries.r.budget]\npercent = 10\nmin_per_sec = 1\n\
         [resiliency.policies.hedges.h]\ndelay = \"50ms\"\n\
         [resiliency.policies.bulkheads.one]\nmax_concurrent = 1\nmax_queue = 0\n\
         [resiliency.targets.apps.retried]\nretry = \"r\"\n\
         [resiliency.targets.apps.hedged]\nhedge = \"h\"\n\
         [resiliency.targets.apps.crowded]\nbulkhead = \"one\"\n",
        failing = failing.url,
        slow = slow.url,
        fast = fast.url,
        crowded = crowded.url,
        flaky = flaky.url,
        steady = steady.url,
    );
    let t = Trellis::start_in(dir.path(), &config).await;

    // Retries are capped by the budget: 10 retries allowed (1/s × 10s floor) plus
    // 10% of 40 calls = 14 at most on top of the 40 originals.
    for _ in 0..40 {
        assert_eq!(
            client()
                .get(t.url("/v1/invoke/retried/x"))
                .send()
                .await
                .expect("send")
                .status(),
            503
        );
    }
    let hits = failing.hits();
    assert!(
        (40..=54).contains(&hits),
        "{hits} upstream hits for 40 calls with 3 attempts each"
    );

    // Hedging: every call answers fast, although half go to the slow instance first.
    for _ in 0..4 {
        let started = tokio::time::Instant::now();
        let text = client()
            .get(t.url("/v1/invoke/hedged/x"))
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("text");
        assert!(text.starts_with("fast"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    // A bulkhead of one with no queue: of 5 concurrent calls one gets through.
    let calls: Vec<_> = (0..5)
        .map(|_| tokio::spawn(client().get(t.url("/v1/invoke/crowded/x")).send()))
        .collect();
    let mut codes = Vec::new();
    for call in calls {
        let r = call.await.expect("join").expect("send");
        codes.push(r.status().as_u16());
    }
    codes.sort_unstable();
    assert_eq!(codes, [200, 503, 503, 503, 503]);

    // An instance answering 502 twice in a row is ejected; then all calls go to the other.
    for _ in 0..4 {
        let _ = client()
            .get(t.url("/v1/invoke/ejecting/x"))
            .send()
            .await
            .expect("send");
    }
    let before = flaky.hits();
    for _ in 0..6 {
        let text = client()
            .get(t.url("/v1/invoke/ejecting/x"))
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("text");
        assert!(text.starts_with("steady"), "{text}");
    }
    assert_eq!(flaky.hits(), before);
}
