//! Black-box: `trellis config check` and the `trellis state` client.

mod support;

use support::{Trellis, run};

fn check(toml: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.toml");
    std::fs::write(&path, toml).expect("write");
    run(&["config", "check", path.to_str().expect("utf8")], &[])
}

#[test]
fn config_check_accepts_a_valid_file() {
    let (code, out, err) = check(
        "[server]\nlisten = \"127.0.0.1:3701\"\n[components.state.pg]\ntype = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1/test\"\n",
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ok")
            && out.contains("state.pg (postgres)")
            && out.contains("state.default (embedded)"),
        "{out}"
    );
}

#[test]
fn config_check_names_the_key_of_every_kind_of_error() {
    let cases = [
        ("[server\n", "invalid TOML"),
        ("[nope]\n", "nope: unknown key"),
        ("[server]\nlisten = 1\n", "server.listen: invalid type"),
        (
            "[server]\nlisten = \"x\"\n",
            "server.listen: invalid socket address",
        ),
        (
            "[server]\nlisten = \"0.0.0.0:1\"\n",
            "server.listen: 0.0.0.0:1 is reachable from other machines",
        ),
        (
            "[server]\nmax_body_size = \"big\"\n",
            "server.max_body_size: invalid size",
        ),
        (
            "[server]\ndrain_timeout = \"later\"\n",
            "server.drain_timeout: invalid duration",
        ),
        ("[log]\nformat = \"xml\"\n", "log.format: unknown variant"),
        (
            "[log]\nfilter = \"info,[bad\"\n",
            "log.filter: invalid log filter",
        ),
        (
            "[components.state.a]\n",
            "components.state.a.type: required key is missing",
        ),
        (
            "[components.state.a]\ntype = \"etcd\"\n",
            "components.state.a.type: unknown type \"etcd\"",
        ),
        (
            "[components.state.a]\ntype = \"redis\"\n",
            "components.state.a.url: required key is missing",
        ),
        (
            "[components.state.a]\ntype = \"redis\"\nurl = \"http://x\"\n",
            "components.state.a.url: expected a redis:// URL",
        ),
        (
            "[components.state.a]\ntype = \"postgres\"\nurl = \"postgres://x\"\npool_size = 0\n",
            "components.state.a.pool_size: must be between 1 and 1000",
        ),
        (
            "[components.state.a]\ntype = \"embedded\"\nfoo = 1\n",
            "components.state.a.foo: unknown key",
        ),
        (
            "[components.state.A]\ntype = \"embedded\"\n",
            "components.state.A: invalid component name",
        ),
    ];
    for (toml, expected) in cases {
        let (code, out, err) = check(toml);
        assert_eq!(code, 2, "{toml:?}: {out}");
        assert!(
            err.contains(expected),
            "{toml:?}: expected {expected:?} in:\n{err}"
        );
    }
    let (code, _, err) = run(&["config", "check", "/definitely/not/here.toml"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read config file"), "{err}");
}

#[test]
fn config_check_applies_environment_overrides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.toml");
    std::fs::write(&path, "").expect("write");
    let path = path.to_str().expect("utf8");
    let (code, _, err) = run(
        &["config", "check", path],
        &[("TRELLIS_SERVER__MAX_BODY_SIZE", "0")],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("server.max_body_size") && err.contains("TRELLIS_SERVER__MAX_BODY_SIZE"),
        "{err}"
    );
}

#[tokio::test]
async fn state_verbs_against_a_running_sidecar() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_with_env(dir.path(), "", &[("TRELLIS_API_TOKEN", "tok")]).await;
    let url = t.url.clone();
    tokio::task::spawn_blocking(move || {
        let auth = [("TRELLIS_URL", url.as_str()), ("TRELLIS_API_TOKEN", "tok")];
        let (code, etag, err) = run(&["state", "put", "default", "greeting/en", "hello"], &auth);
        assert_eq!(code, 0, "{err}");
        let etag = etag.trim().to_owned();
        assert!(!etag.is_empty());

        let (code, out, err) = run(&["state", "get", "default", "greeting/en"], &auth);
        assert_eq!((code, out.as_str()), (0, "hello"), "{err}");
        assert!(err.contains(&format!("etag: \"{etag}\"")), "{err}");

        let (code, _, err) = run(
            &[
                "state",
                "put",
                "default",
                "greeting/en",
                "x",
                "--create-only",
            ],
            &auth,
        );
        assert_eq!(code, 1);
        assert!(err.contains("412 key_exists"), "{err}");
        let (code, _, err) = run(
            &[
                "state",
                "put",
                "default",
                "greeting/en",
                "hi",
                "--if-match",
                &etag,
                "--ttl",
                "60",
            ],
            &auth,
        );
        assert_eq!(code, 0, "{err}");
        let (code, _, err) = run(
            &[
                "state",
                "delete",
                "default",
                "greeting/en",
                "--if-match",
                &etag,
            ],
            &auth,
        );
        assert_eq!(code, 1);
        assert!(err.contains("etag_mismatch"), "{err}");
        let (code, _, _) = run(&["state", "delete", "default", "greeting/en"], &auth);
        assert_eq!(code, 0);
        let (code, _, err) = run(&["state", "get", "default", "greeting/en"], &auth);
        assert_eq!(code, 1);
        assert!(err.contains("404 key_not_found"), "{err}");

        let (code, _, err) = run(
            &["state", "get", "default", "k"],
            &[("TRELLIS_URL", url.as_str())],
        );
        assert_eq!(code, 1);
        assert!(err.contains("401 missing_token"), "{err}");
        let (code, _, err) = run(
            &[
                "state",
                "get",
                "default",
                "k",
                "--url",
                "http://127.0.0.1:1",
            ],
            &[],
        );
        assert_eq!(code, 1);
        assert!(err.contains("cannot reach the sidecar"), "{err}");
    })
    .await
    .expect("cli checks");
}

#[test]
fn config_check_reports_saga_definition_errors_with_key_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.toml");
    std::fs::write(
        &path,
        "[sagas.t]\n[[sagas.t.steps]]\nname = \"a\"\ntimeout = \"0s\"\n\
         action = { type = \"invoke\", app = \"x\", path = \"nope/{{steps.b.output}}\" }\n\
         [sagas.u]\nsteps = [{ name = \"a\", action = { type = \"teleport\" } }]\n",
    )
    .expect("write");
    let (code, _, err) = run(&["config", "check", path.to_str().expect("utf8")], &[]);
    assert_eq!(code, 2, "{err}");
    for expected in [
        "sagas.t.steps[0].action: {{steps.b.output}} refers to step \"b\"",
        "sagas.t.steps[0].action.path: must start with /",
        "sagas.t.steps[0].timeout",
        "sagas.u.steps[0].action",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}
