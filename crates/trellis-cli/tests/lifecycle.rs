//! Black-box: starting, stopping and restarting the real binary.

mod support;

use std::time::Duration;

use support::{Trellis, client, run};

/// A body of `n` 1 KiB chunks, one every `every`.
fn trickle(n: usize, every: Duration) -> reqwest::Body {
    let stream = futures_util::stream::unfold(n, move |left| async move {
        if left == 0 {
            return None;
        }
        tokio::time::sleep(every).await;
        Some((Ok::<_, std::io::Error>(vec![b'x'; 1024]), left - 1))
    });
    reqwest::Body::wrap_stream(stream)
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_then_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t = Trellis::start_in(dir.path(), "").await;

    // A PUT whose body trickles in over ~1s is in flight when SIGTERM arrives.
    let slow_put = tokio::spawn(
        client()
            .put(t.url("/v1/state/default/slow"))
            .body(trickle(10, Duration::from_millis(100)))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    t.signal("TERM");
    let response = slow_put
        .await
        .expect("join")
        .expect("the in-flight request completes");
    assert_eq!(response.status(), 204);
    let status = t.wait(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", t.stderr());
    assert!(t.stderr().contains("received SIGTERM"));

    // It no longer listens; the write survived the restart.
    assert!(client().get(t.url("/healthz")).send().await.is_err());
    let t = Trellis::start_in(dir.path(), "").await;
    let value = client()
        .get(t.url("/v1/state/default/slow"))
        .send()
        .await
        .expect("get");
    assert_eq!(value.bytes().await.expect("body").len(), 10 * 1024);
}

#[tokio::test]
async fn drain_is_bounded_by_drain_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t = Trellis::start_in(dir.path(), "drain_timeout = \"500ms\"\n").await;
    // This request would take 60s; shutdown must not wait for it.
    let _stuck = tokio::spawn(
        client()
            .put(t.url("/v1/state/default/stuck"))
            .body(trickle(60, Duration::from_secs(1)))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    t.signal("INT");
    let status = t.wait(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", t.stderr());
    assert!(
        t.stderr().contains("drain timeout reached"),
        "{}",
        t.stderr()
    );
}

#[tokio::test]
async fn sigint_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t = Trellis::start_in(dir.path(), "").await;
    t.signal("INT");
    assert_eq!(t.wait(Duration::from_secs(20)).await.code(), Some(0));
}

#[tokio::test]
async fn a_second_sidecar_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = Trellis::start_in(dir.path(), "").await;
    let config = dir.path().join("trellis.toml");
    let (code, _, stderr) = run(&["up", "--config", config.to_str().expect("utf8")], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("components.state.default"), "{stderr}");
}

#[tokio::test]
async fn invalid_config_stops_up_with_the_same_messages_as_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"nowhere\"\nbogus = 1\n[components.state.x]\ntype = \"mongo\"\n",
    )
    .expect("write");
    let path = path.to_str().expect("utf8");
    let (up_code, up_out, up_err) = run(&["up", "--config", path], &[]);
    let (check_code, _, check_err) = run(&["config", "check", path], &[]);
    assert_eq!((up_code, check_code), (2, 2), "{up_err}");
    assert!(
        up_out.is_empty(),
        "no banner for an invalid config: {up_out}"
    );
    for key in ["server.listen", "server.bogus", "components.state.x.type"] {
        assert!(
            up_err.contains(key) && check_err.contains(key),
            "{key}:\n{up_err}\n{check_err}"
        );
    }
    let body = |s: &str| {
        s.split_once("invalid configuration")
            .map(|(_, rest)| rest.to_owned())
    };
    assert_eq!(body(&up_err), body(&check_err));
}

#[tokio::test]
async fn non_loopback_listen_needs_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let env = [
        ("TRELLIS_SERVER__LISTEN", "0.0.0.0:0"),
        ("TRELLIS_SERVER__DATA_DIR", data.to_str().expect("utf8")),
    ];
    let (code, out, err) = run(&["up"], &env);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("server.listen") && err.contains("API token"),
        "{err}"
    );
    assert!(!data.exists(), "refused before touching the data dir");
}

#[test]
fn version_and_help_on_every_verb() {
    let (code, out, _) = run(&["version"], &[]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("trellis {}", env!("CARGO_PKG_VERSION")).as_str())
    );
    for verb in [
        vec!["--help"],
        vec!["up", "--help"],
        vec!["config", "--help"],
        vec!["config", "check", "--help"],
        vec!["version", "--help"],
        vec!["state", "--help"],
        vec!["state", "get", "--help"],
        vec!["state", "put", "--help"],
        vec!["state", "delete", "--help"],
    ] {
        let (code, out, err) = run(&verb, &[]);
        assert_eq!(code, 0, "{verb:?}: {err}");
        assert!(out.contains("Usage:"), "{verb:?}: {out}");
    }
}
