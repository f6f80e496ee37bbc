//! Black-box: the real binary on a real socket, driven over HTTP.

mod support;

use reqwest::{Method, StatusCode};
use support::{Trellis, client};

/// Sends a request and returns (status, problem code or "", body).
async fn send(
    t: &Trellis,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> (StatusCode, String, Vec<u8>) {
    let mut request = client().request(method, t.url(path)).body(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.expect("send");
    let status = response.status();
    let is_problem = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes() == b"application/problem+json");
    let body = response.bytes().await.expect("body").to_vec();
    let code = if is_problem {
        let problem: serde_json::Value = serde_json::from_slice(&body).expect("problem is JSON");
        problem["code"].as_str().expect("code").to_owned()
    } else {
        String::new()
    };
    (status, code, body)
}

#[tokio::test]
async fn state_api_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;

    let (status, _, _) = send(
        &t,
        Method::PUT,
        "/v1/state/default/cart/1",
        &[("content-type", "application/json")],
        r#"{"items":[1,2]}"#,
    )
    .await;
    assert_eq!(status, 204);
    let response = client()
        .get(t.url("/v1/state/default/cart/1"))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), 200);
    let etag = response.headers()["etag"]
        .to_str()
        .expect("etag")
        .to_owned();
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.text().await.expect("text"), r#"{"items":[1,2]}"#);

    let (status, _, _) = send(
        &t,
        Method::PUT,
        "/v1/state/default/cart/1",
        &[("if-match", &etag)],
        "v2",
    )
    .await;
    assert_eq!(status, 204);
    let (status, code, _) = send(
        &t,
        Method::PUT,
        "/v1/state/default/cart/1",
        &[("if-match", &etag)],
        "v3",
    )
    .await;
    assert_eq!((status.as_u16(), code.as_str()), (412, "etag_mismatch"));

    let (status, _, body) = send(
        &t,
        Method::POST,
        "/v1/state/default/bulk",
        &[],
        r#"{"keys":["cart/1","x"]}"#,
    )
    .await;
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["items"][1]["found"], false);

    let (status, _, _) = send(
        &t,
        Method::POST,
        "/v1/state/default/transaction",
        &[],
        r#"{"operations":[{"op":"upsert","key":"a","value":1},{"op":"delete","key":"cart/1"}]}"#,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, body) = send(&t, Method::GET, "/v1/state/default?prefix=", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).expect("json")["keys"],
        serde_json::json!(["a"])
    );

    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(send(&t, Method::GET, path, &[], "").await.0, 200, "{path}");
    }
}

/// method, path, headers, body, expected status, expected code.
type Case<'a> = (
    Method,
    &'a str,
    Vec<(&'a str, &'a str)>,
    Vec<u8>,
    u16,
    &'a str,
);

/// Every kind of bad input gets its status and stable code — never a 500 — and
/// changes nothing.
#[tokio::test]
async fn bad_input_never_500s_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "").await;
    assert_eq!(
        send(&t, Method::PUT, "/v1/state/default/k", &[], "original")
            .await
            .0,
        204
    );

    let long_key = format!("/v1/state/default/{}", "k".repeat(1025));
    let cases: Vec<Case<'_>> = vec![
        // Malformed JSON and wrong types.
        (
            Method::POST,
            "/v1/state/default/bulk",
            vec![],
            b"{\"keys\": [".to_vec(),
            400,
            "malformed_json",
        ),
        (
            Method::POST,
            "/v1/state/default/bulk",
            vec![],
            b"not json".to_vec(),
            400,
            "malformed_json",
        ),
        (
            Method::POST,
            "/v1/state/default/bulk",
            vec![],
            b"{\"keys\": \"k\"}".to_vec(),
            400,
            "invalid_body",
        ),
        (
            Method::POST,
            "/v1/state/default/bulk",
            vec![],
            b"{\"keys\": [true]}".to_vec(),
            400,
            "invalid_body",
        ),
        (
            Method::POST,
            "/v1/state/default/transaction",
            vec![],
            b"{\"operations\": [{\"op\": \"upsert\", \"key\": \"k\", \"value\": 1".to_vec(),
            400,
            "malformed_json",
        ),
        (
            Method::POST,
            "/v1/state/default/transaction",
            vec![],
            b"{\"operations\": [{\"op\": 7, \"key\": \"k\"}]}".to_vec(),
            400,
            "invalid_body",
        ),
        (
            Method::POST,
            "/v1/state/default/transaction",
            vec![],
            b"{\"operations\": [{\"op\": \"upsert\", \"key\": \"k\", \"value\": 1, \"ttl\": -1}]}"
                .to_vec(),
            400,
            "invalid_body",
        ),
        // Bad keys.
        (
            Method::PUT,
            long_key.as_str(),
            vec![],
            b"v".to_vec(),
            400,
            "invalid_key",
        ),
        (
            Method::PUT,
            "/v1/state/default/a%00b",
            vec![],
            b"v".to_vec(),
            400,
            "invalid_key",
        ),
        (
            Method::GET,
            "/v1/state/default/%E2%28%A1",
            vec![],
            vec![],
            400,
            "invalid_key",
        ),
        (
            Method::PUT,
            "/v1/state/default/",
            vec![],
            b"v".to_vec(),
            400,
            "invalid_key",
        ),
        (
            Method::POST,
            "/v1/state/default/bulk",
            vec![],
            b"{\"keys\": [\"a\\u0007\"]}".to_vec(),
            400,
            "invalid_key",
        ),
        // Unknown store.
        (
            Method::PUT,
            "/v1/state/nope/k",
            vec![],
            b"v".to_vec(),
            404,
            "store_not_found",
        ),
        (
            Method::DELETE,
            "/v1/state/nope/k",
            vec![],
            vec![],
            404,
            "store_not_found",
        ),
        // Bad etag syntax.
        (
            Method::PUT,
            "/v1/state/default/k",
            vec![("if-match", "1")],
            b"v".to_vec(),
            400,
            "invalid_etag",
        ),
        (
            Method::PUT,
            "/v1/state/default/k",
            vec![("if-match", "W/\"1\"")],
            b"v".to_vec(),
            400,
            "invalid_etag",
        ),
        (
            Method::DELETE,
            "/v1/state/default/k",
            vec![("if-match", "\"unterminated")],
            vec![],
            400,
            "invalid_etag",
        ),
        (
            Method::POST,
            "/v1/state/default/transaction",
            vec![],
            b"{\"operations\": [{\"op\": \"delete\", \"key\": \"k\", \"etag\": \"\"}]}".to_vec(),
            400,
            "invalid_etag",
        ),
        // Bad TTLs.
        (
            Method::PUT,
            "/v1/state/default/k?ttl=0",
            vec![],
            b"v".to_vec(),
            400,
            "invalid_ttl",
        ),
        (
            Method::PUT,
            "/v1/state/default/k?ttl=ten",
            vec![],
            b"v".to_vec(),
            400,
            "invalid_ttl",
        ),
        (
            Method::PUT,
            "/v1/state/default/k?ttl=-3",
            vec![],
            b"v".to_vec(),
            400,
            "invalid_ttl",
        ),
        (
            Method::POST,
            "/v1/state/default/transaction",
            vec![],
            b"{\"operations\": [{\"op\": \"upsert\", \"key\": \"k\", \"value\": 1, \"ttl\": 0}]}"
                .to_vec(),
            400,
            "invalid_ttl",
        ),
        // Routing.
        (
            Method::PATCH,
            "/v1/state/default/k",
            vec![],
            vec![],
            405,
            "method_not_allowed",
        ),
        (
            Method::GET,
            "/v1/nothing",
            vec![],
            vec![],
            404,
            "route_not_found",
        ),
    ];
    for (method, path, headers, body, status, code) in cases {
        let shown = format!("{method} {}", &path[..path.len().min(60)]);
        let (got_status, got_code, _) = send(&t, method, path, &headers, body).await;
        assert_eq!(
            (got_status.as_u16(), got_code.as_str()),
            (status, code),
            "{shown}"
        );
    }
    // Huge bodies are refused from their Content-Length, before a byte is read:
    // speak raw HTTP so the client reads the answer instead of writing the body.
    for path in [
        "/v1/state/default/k",
        "/v1/state/default/transaction",
        "/v1/state/default/bulk",
    ] {
        let method = if path.ends_with("/k") { "PUT" } else { "POST" };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            4 * 1024 * 1024 + 1
        );
        let (status, body) = support::raw_exchange(&t, &head).await;
        assert_eq!(status, 413, "{path}: {body}");
        assert!(body.contains("\"code\":\"payload_too_large\""), "{body}");
    }

    // Nothing above changed the stored value.
    let (status, _, body) = send(&t, Method::GET, "/v1/state/default/k", &[], "").await;
    assert_eq!((status.as_u16(), body.as_slice()), (200, &b"original"[..]));
    // And the server is still healthy.
    assert_eq!(send(&t, Method::GET, "/readyz", &[], "").await.0, 200);
    assert!(!t.stderr().contains("panicked"), "{}", t.stderr());
}

#[tokio::test]
async fn token_auth_on_the_real_binary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_with_env(dir.path(), "", &[("TRELLIS_API_TOKEN", "t0ken")]).await;
    let (status, code, _) = send(&t, Method::GET, "/v1/state/default/k", &[], "").await;
    assert_eq!((status.as_u16(), code.as_str()), (401, "missing_token"));
    let (status, code, _) = send(
        &t,
        Method::GET,
        "/v1/state/default/k",
        &[("authorization", "Bearer t0ken")],
        "",
    )
    .await;
    assert_eq!((status.as_u16(), code.as_str()), (404, "key_not_found"));
    assert_eq!(send(&t, Method::GET, "/healthz", &[], "").await.0, 200);
}

#[tokio::test]
async fn request_ids_reach_the_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Trellis::start_in(dir.path(), "[log]\nformat = \"json\"\n").await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let response = client()
        .put(t.url("/v1/state/default/k?ttl=bad"))
        .header("x-request-id", "req-42")
        .header("traceparent", traceparent)
        .body("v")
        .send()
        .await
        .expect("send");
    assert_eq!(response.headers()["x-request-id"], "req-42");
    // The completion line is written after the response; give it a moment.
    let mut line = None;
    for _ in 0..50 {
        line = t
            .stderr()
            .lines()
            .find(|l| l.contains("req-42"))
            .map(str::to_owned);
        if line.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let line = line.unwrap_or_else(|| panic!("no log line with the request id:\n{}", t.stderr()));
    let entry: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
    assert_eq!(entry["span"]["request_id"], "req-42", "{entry}");
    assert_eq!(
        entry["span"]["trace_id"], "0af7651916cd43dd8448eb211c80319c",
        "{entry}"
    );
    assert_eq!(entry["code"], "invalid_ttl", "{entry}");
}
