//! Black-box failover: a leader's process is killed with SIGKILL mid-term; another
//! candidate is elected within the TTL plus a margin, with a larger fencing token,
//! and a state write fenced with the dead leader's token is refused — on the etcd and
//! PostgreSQL backends (two sidecars sharing the backend; the leader's sidecar is
//! killed) and on the embedded one (apps sharing one sidecar; the leader app is
//! killed).

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Trellis, client};
use tokio::time::Instant;
use trellis_core::testing::{Etcd, postgres_url, services_enabled, unique_name};

const TTL: Duration = Duration::from_secs(2);
/// etcd rounds leases to whole seconds and checks expiry twice a second; the
/// PostgreSQL backend wakes waiters at the holder's expiry; the rest is scheduling.
const MARGIN: Duration = Duration::from_secs(3);

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn fenced_put(base: &str, fence: &str, value: &str) -> (u16, Value) {
    let r = client()
        .put(format!("{base}/v1/state/default/stock"))
        .header("trellis-fencing", fence)
        .header("content-type", "application/json")
        .body(value.to_owned())
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A campaign through `base`, blocking up to 60 s, from its own task.
fn campaign(base: &str, candidate: &str) -> tokio::task::JoinHandle<(u16, Value, Instant)> {
    let base = base.to_owned();
    let candidate = candidate.to_owned();
    tokio::spawn(async move {
        let (status, body) = post(
            &base,
            "/v1/elections/primary/campaign",
            json!({"candidate": candidate, "ttl": "2s", "wait": "60s"}),
        )
        .await;
        (status, body, Instant::now())
    })
}

/// Checks what must hold after the leader died at `killed`: `b` was elected in
/// time with a newer token; the old token is refused for writes, the new one is not.
async fn check_failover(
    survivor: &str,
    old_token: u64,
    waiting: tokio::task::JoinHandle<(u16, Value, Instant)>,
    killed: Instant,
) -> Duration {
    let (status, elected, at) = waiting.await.expect("join");
    assert_eq!(status, 200, "{elected}");
    assert_eq!(elected["leader"], "b");
    let new_token = elected["fencing_token"].as_u64().expect("token");
    assert!(new_token > old_token, "{new_token} > {old_token}");
    let failover = at.saturating_duration_since(killed);
    assert!(
        failover <= TTL + MARGIN,
        "new leader after {failover:?}, more than ttl {TTL:?} + {MARGIN:?}"
    );
    let (status, refused) =
        fenced_put(survivor, &format!("election/primary:{old_token}"), "1").await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (409, Some("stale_fencing_token")),
        "{refused}"
    );
    let (status, body) = fenced_put(survivor, &format!("election/primary:{new_token}"), "2").await;
    assert_eq!(status, 204, "{body}");
    failover
}

/// Two sidecars on one shared backend: `a` leads through sidecar A, keeps alive,
/// and A is killed; `b` campaigns through sidecar B.
async fn two_sidecars(coord: &str) {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let mut a = Trellis::start_in(dir_a.path(), coord).await;
    let b = Trellis::start_in(dir_b.path(), coord).await;
    assert!(a.banner.contains("coord.default"), "{}", a.banner);

    let (status, led) = post(
        &a.url,
        "/v1/elections/primary/campaign",
        json!({"candidate": "a", "ttl": "2s"}),
    )
    .await;
    assert_eq!(status, 200, "{led}");
    let old_token = led["fencing_token"].as_u64().expect("token");
    let waiting = campaign(&b.url, "b");
    // A term with keep-alives, then the leader's process dies mid-term.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (status, kept) = post(
            &a.url,
            "/v1/elections/primary/keep-alive",
            json!({"candidate": "a", "fencing_token": old_token, "ttl": "2s"}),
        )
        .await;
        assert_eq!(status, 200, "{kept}");
    }
    assert!(!waiting.is_finished(), "b was elected while a kept alive");
    a.kill9().await;
    let killed = Instant::now();
    let failover = check_failover(&b.url, old_token, waiting, killed).await;
    eprintln!("failover after kill -9: {failover:?} (ttl {TTL:?})");
}

#[tokio::test]
async fn etcd_leader_killed_fails_over_within_the_ttl() {
    if !services_enabled("etcd") {
        return;
    }
    let etcd = Etcd::start();
    let coord = format!(
        "[components.coord.default]\ntype = \"etcd\"\nendpoints = [{:?}]\nprefix = \"{}/\"\n",
        etcd.url(),
        unique_name("failover")
    );
    two_sidecars(&coord).await;
}

#[tokio::test]
async fn postgres_leader_killed_fails_over_within_the_ttl() {
    if !services_enabled("postgres") {
        return;
    }
    let coord = format!(
        "[components.coord.default]\ntype = \"postgres\"\nurl = {:?}\nschema = \"{}\"\n",
        postgres_url(),
        unique_name("failover")
    );
    two_sidecars(&coord).await;
}

/// The embedded backend serves the processes sharing one sidecar: the leader is an
/// app process (a shell loop keeping alive with curl) that is killed.
#[tokio::test]
async fn embedded_leader_process_killed_fails_over_within_the_ttl() {
    let dir = tempfile::tempdir().expect("tmp");
    let t = Trellis::start_in(dir.path(), "").await;
    let (status, led) = post(
        &t.url,
        "/v1/elections/primary/campaign",
        json!({"candidate": "a", "ttl": "2s"}),
    )
    .await;
    assert_eq!(status, 200, "{led}");
    let old_token = led["fencing_token"].as_u64().expect("token");
    let body = json!({"candidate": "a", "fencing_token": old_token, "ttl": "2s"}).to_string();
    let script = format!(
        "while true; do curl -sf -o /dev/null -X POST -H 'content-type: application/json' \
         -d '{body}' {}/v1/elections/primary/keep-alive || exit 1; sleep 0.3; done",
        t.url
    );
    let mut leader = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the leader process");
    let waiting = campaign(&t.url, "b");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        leader.try_wait().expect("wait").is_none(),
        "the leader process failed a keep-alive"
    );
    assert!(!waiting.is_finished(), "b was elected while a kept alive");
    leader.start_kill().expect("SIGKILL");
    leader.wait().await.expect("reap");
    let killed = Instant::now();
    check_failover(&t.url, old_token, waiting, killed).await;
}
