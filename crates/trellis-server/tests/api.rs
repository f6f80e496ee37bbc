//! The HTTP API in process (`oneshot`): semantics and every bad-input case.

mod support;

use axum::body::Body;
use support::{app, app_with, app_with_token};

#[tokio::test]
async fn put_get_delete_round_trip_with_etags_and_content_type() {
    let app = app();
    let put = app
        .call_with(
            "PUT",
            "/v1/state/default/orders/42",
            &[("content-type", "text/csv")],
            "a,b\n1,2",
        )
        .await;
    assert_eq!(put.status, 204);
    let etag = put.header("etag").expect("etag").to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");

    let get = app
        .call("GET", "/v1/state/default/orders/42", Body::empty())
        .await;
    assert_eq!(get.status, 200);
    assert_eq!(get.header("content-type"), Some("text/csv"));
    assert_eq!(get.header("etag"), Some(etag.as_str()));
    assert_eq!(&get.body[..], b"a,b\n1,2");

    // Percent-encoded slashes and non-ASCII reach the same key space.
    let get = app
        .call("GET", "/v1/state/default/orders%2F42", Body::empty())
        .await;
    assert_eq!(get.status, 200);
    let put = app
        .call("PUT", "/v1/state/default/%C3%BCber%20key", "v")
        .await;
    assert_eq!(put.status, 204);
    assert_eq!(
        app.call("GET", "/v1/state/default/über%20key", Body::empty())
            .await
            .status,
        200
    );
    // No Content-Type: stored as bytes.
    let get = app
        .call("GET", "/v1/state/default/%C3%BCber%20key", Body::empty())
        .await;
    assert_eq!(get.header("content-type"), Some("application/octet-stream"));

    assert_eq!(
        app.call("DELETE", "/v1/state/default/orders/42", Body::empty())
            .await
            .status,
        204
    );
    app.call("GET", "/v1/state/default/orders/42", Body::empty())
        .await
        .assert_problem(404, "key_not_found");
    // Deleting again is still fine.
    assert_eq!(
        app.call("DELETE", "/v1/state/default/orders/42", Body::empty())
            .await
            .status,
        204
    );
}

#[tokio::test]
async fn if_match_and_if_none_match() {
    let app = app();
    let create = app
        .call_with("PUT", "/v1/state/default/k", &[("if-none-match", "*")], "1")
        .await;
    assert_eq!(create.status, 204);
    let e1 = create.header("etag").expect("etag").to_owned();
    app.call_with("PUT", "/v1/state/default/k", &[("if-none-match", "*")], "2")
        .await
        .assert_problem(412, "key_exists");

    let cas = app
        .call_with("PUT", "/v1/state/default/k", &[("if-match", &e1)], "2")
        .await;
    assert_eq!(cas.status, 204);
    app.call_with("PUT", "/v1/state/default/k", &[("if-match", &e1)], "3")
        .await
        .assert_problem(412, "etag_mismatch");
    app.call_with(
        "DELETE",
        "/v1/state/default/k",
        &[("if-match", &e1)],
        Body::empty(),
    )
    .await
    .assert_problem(412, "etag_mismatch");
    app.call_with("PUT", "/v1/state/default/absent", &[("if-match", "*")], "x")
        .await
        .assert_problem(412, "etag_mismatch");
    let get = app.call("GET", "/v1/state/default/k", Body::empty()).await;
    assert_eq!(&get.body[..], b"2");
    let e2 = cas.header("etag").expect("etag");
    assert_eq!(
        app.call_with(
            "DELETE",
            "/v1/state/default/k",
            &[("if-match", e2)],
            Body::empty()
        )
        .await
        .status,
        204
    );
}

#[tokio::test]
async fn bad_etags_ttls_keys_and_stores() {
    let app = app();
    for etag in ["17", "W/\"17\"", "\"\"", "\"a b\"", "\"x"] {
        app.call_with("PUT", "/v1/state/default/k", &[("if-match", etag)], "v")
            .await
            .assert_problem(400, "invalid_etag");
    }
    app.call_with(
        "PUT",
        "/v1/state/default/k",
        &[("if-none-match", "\"1\"")],
        "v",
    )
    .await
    .assert_problem(400, "invalid_etag");
    app.call_with(
        "PUT",
        "/v1/state/default/k",
        &[("if-match", "*"), ("if-none-match", "*")],
        "v",
    )
    .await
    .assert_problem(400, "invalid_precondition");

    for ttl in ["0", "-5", "abc", "1.5", "", "999999999999"] {
        app.call("PUT", &format!("/v1/state/default/k?ttl={ttl}"), "v")
            .await
            .assert_problem(400, "invalid_ttl");
    }
    app.call("PUT", "/v1/state/default/k?tll=5", "v")
        .await
        .assert_problem(400, "invalid_query");
    assert_eq!(
        app.call("PUT", "/v1/state/default/k?ttl=60", "v")
            .await
            .status,
        204
    );

    let long_key = "k".repeat(1025);
    app.call("PUT", &format!("/v1/state/default/{long_key}"), "v")
        .await
        .assert_problem(400, "invalid_key");
    app.call("PUT", "/v1/state/default/a%0Ab", "v")
        .await
        .assert_problem(400, "invalid_key");
    app.call("PUT", "/v1/state/default/a%FFb", "v")
        .await
        .assert_problem(400, "invalid_key");
    app.call("PUT", "/v1/state/default/", "v")
        .await
        .assert_problem(400, "invalid_key");
    app.call("GET", "/v1/state/default/", Body::empty())
        .await
        .assert_problem(400, "invalid_key");
    assert_eq!(
        app.call(
            "PUT",
            &format!("/v1/state/default/{}", "k".repeat(1024)),
            "v"
        )
        .await
        .status,
        204
    );

    app.call("PUT", "/v1/state/nope/k", "v")
        .await
        .assert_problem(404, "store_not_found");
    app.call("GET", "/v1/state/nope/k", Body::empty())
        .await
        .assert_problem(404, "store_not_found");
    app.call("POST", "/v1/state/nope/bulk", "{\"keys\":[]}")
        .await
        .assert_problem(404, "store_not_found");
    app.call("GET", "/v1/state/nope", Body::empty())
        .await
        .assert_problem(404, "store_not_found");
}

#[tokio::test]
async fn reserved_words_are_usable_keys() {
    let app = app();
    for key in ["bulk", "transaction"] {
        assert_eq!(
            app.call("PUT", &format!("/v1/state/default/{key}"), key)
                .await
                .status,
            204
        );
        let get = app
            .call("GET", &format!("/v1/state/default/{key}"), Body::empty())
            .await;
        assert_eq!(&get.body[..], key.as_bytes());
        assert_eq!(
            app.call("DELETE", &format!("/v1/state/default/{key}"), Body::empty())
                .await
                .status,
            204
        );
    }
}

#[tokio::test]
async fn bulk_get() {
    let app = app();
    app.call_with(
        "PUT",
        "/v1/state/default/j",
        &[("content-type", "application/json")],
        "{\"n\": 1}",
    )
    .await;
    app.call("PUT", "/v1/state/default/b", vec![0u8, 159, 255])
        .await;
    let reply = app
        .call(
            "POST",
            "/v1/state/default/bulk",
            r#"{"keys":["j","missing","b"]}"#,
        )
        .await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    let items = body["items"].as_array().expect("items");
    assert_eq!(items[0]["key"], "j");
    assert_eq!(items[0]["found"], true);
    assert_eq!(items[0]["value"], serde_json::json!({"n": 1}));
    assert!(items[0]["etag"].is_string());
    assert_eq!(
        items[1],
        serde_json::json!({"key": "missing", "found": false})
    );
    assert_eq!(
        items[2]["value"],
        serde_json::json!({"value_base64": "AJ//"})
    );

    app.call("POST", "/v1/state/default/bulk", "{")
        .await
        .assert_problem(400, "malformed_json");
    app.call("POST", "/v1/state/default/bulk", "")
        .await
        .assert_problem(400, "malformed_json");
    app.call("POST", "/v1/state/default/bulk", r#"{"keys":"a"}"#)
        .await
        .assert_problem(400, "invalid_body");
    app.call("POST", "/v1/state/default/bulk", r#"{"keys":[1]}"#)
        .await
        .assert_problem(400, "invalid_body");
    app.call("POST", "/v1/state/default/bulk", r#"{"kees":[]}"#)
        .await
        .assert_problem(400, "invalid_body");
    app.call("POST", "/v1/state/default/bulk", r#"{"keys":[""]}"#)
        .await
        .assert_problem(400, "invalid_key");
    let many: Vec<String> = (0..1001).map(|i| format!("k{i}")).collect();
    app.call(
        "POST",
        "/v1/state/default/bulk",
        serde_json::json!({ "keys": many }).to_string(),
    )
    .await
    .assert_problem(400, "too_many_keys");
}

#[tokio::test]
async fn transactions() {
    let app = app();
    let put = app.call("PUT", "/v1/state/default/a", "0").await;
    let etag = put
        .header("etag")
        .expect("etag")
        .trim_matches('"')
        .to_owned();
    app.call("PUT", "/v1/state/default/gone", "0").await;

    let ok = app
        .call(
            "POST",
            "/v1/state/default/transaction",
            serde_json::json!({"operations": [
                {"op": "upsert", "key": "a", "value": {"n": 1}, "etag": etag},
                {"op": "upsert", "key": "b", "value": {"value_base64": "AQI="}, "ttl": 60},
                {"op": "upsert", "key": "n", "value": null},
                {"op": "delete", "key": "gone"},
            ]})
            .to_string(),
        )
        .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    let results = ok.json()["results"].clone();
    assert_eq!(results[0]["key"], "a");
    assert!(results[0]["etag"].is_string());
    assert_eq!(results[3], serde_json::json!({"key": "gone"}));
    let a = app.call("GET", "/v1/state/default/a", Body::empty()).await;
    assert_eq!(
        (a.header("content-type"), &a.body[..]),
        (Some("application/json"), &b"{\"n\":1}"[..])
    );
    assert_eq!(
        &app.call("GET", "/v1/state/default/b", Body::empty())
            .await
            .body[..],
        &[1u8, 2]
    );
    assert_eq!(
        &app.call("GET", "/v1/state/default/n", Body::empty())
            .await
            .body[..],
        b"null"
    );
    app.call("GET", "/v1/state/default/gone", Body::empty())
        .await
        .assert_problem(404, "key_not_found");

    // A stale etag in the last operation: 409 naming it, nothing applied.
    let conflict = app
        .call(
            "POST",
            "/v1/state/default/transaction",
            serde_json::json!({"operations": [
                {"op": "delete", "key": "a"},
                {"op": "upsert", "key": "c", "value": 1},
                {"op": "upsert", "key": "b", "value": 2, "etag": "\"12345\""},
            ]})
            .to_string(),
        )
        .await;
    conflict.assert_problem(409, "transaction_conflict");
    assert_eq!(conflict.json()["index"], 2);
    assert_eq!(conflict.json()["key"], "b");
    assert_eq!(
        app.call("GET", "/v1/state/default/a", Body::empty())
            .await
            .status,
        200
    );
    app.call("GET", "/v1/state/default/c", Body::empty())
        .await
        .assert_problem(404, "key_not_found");

    let bad = |body: serde_json::Value| {
        let app = &app;
        async move {
            app.call("POST", "/v1/state/default/transaction", body.to_string())
                .await
        }
    };
    bad(serde_json::json!({"operations": [{"op": "merge", "key": "a"}]}))
        .await
        .assert_problem(400, "invalid_body");
    bad(serde_json::json!({"operations": [{"op": "upsert", "key": "a"}]}))
        .await
        .assert_problem(400, "invalid_body");
    bad(serde_json::json!({"operations": [{"op": "delete", "key": "a", "value": 1}]}))
        .await
        .assert_problem(400, "invalid_body");
    bad(serde_json::json!({"operations": [{"op": "upsert", "key": "", "value": 1}]}))
        .await
        .assert_problem(400, "invalid_key");
    bad(serde_json::json!({"operations": [{"op": "upsert", "key": "a", "value": 1, "etag": ""}]}))
        .await
        .assert_problem(400, "invalid_etag");
    bad(serde_json::json!({"operations": [{"op": "upsert", "key": "a", "value": 1, "ttl": 0}]}))
        .await
        .assert_problem(400, "invalid_ttl");
    bad(serde_json::json!({"operations": [{"op": "upsert", "key": "a", "value": 1, "ttl": "soon"}]}))
        .await
        .assert_problem(400, "invalid_body");
    bad(serde_json::json!({"operations": [{"op": "upsert", "key": "a", "value": {"value_base64": "%%"}}]}))
        .await
        .assert_problem(400, "invalid_body");
    bad(serde_json::json!({"operations": {}}))
        .await
        .assert_problem(400, "invalid_body");
    let many: Vec<_> = (0..1001)
        .map(|i| serde_json::json!({"op": "delete", "key": format!("k{i}")}))
        .collect();
    bad(serde_json::json!({ "operations": many }))
        .await
        .assert_problem(400, "too_many_operations");
    app.call(
        "POST",
        "/v1/state/default/transaction",
        "{\"operations\": [",
    )
    .await
    .assert_problem(400, "malformed_json");
}

#[tokio::test]
async fn listing_pages_through_every_key() {
    let app = app();
    for k in ["user/a", "user/b", "user/c", "other"] {
        app.call("PUT", &format!("/v1/state/default/{k}"), "v")
            .await;
    }
    let first = app
        .call(
            "GET",
            "/v1/state/default?prefix=user/&limit=2",
            Body::empty(),
        )
        .await
        .json();
    assert_eq!(first["keys"], serde_json::json!(["user/a", "user/b"]));
    let cursor = first["next_cursor"].as_str().expect("more pages");
    let second = app
        .call(
            "GET",
            &format!("/v1/state/default?prefix=user/&limit=2&cursor={cursor}"),
            Body::empty(),
        )
        .await
        .json();
    assert_eq!(
        second,
        serde_json::json!({"keys": ["user/c"], "next_cursor": null})
    );
    for q in ["limit=0", "limit=1001", "limit=x", "bogus=1"] {
        app.call("GET", &format!("/v1/state/default?{q}"), Body::empty())
            .await
            .assert_problem(400, "invalid_query");
    }
    app.call("GET", "/v1/state/default?cursor=!!", Body::empty())
        .await
        .assert_problem(400, "invalid_cursor");
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let app = app_with(|c| c.server.max_body_size = trellis_core::config::ByteSize::new(1024));
    app.call("PUT", "/v1/state/default/k", vec![b'x'; 1025])
        .await
        .assert_problem(413, "payload_too_large");
    app.call("POST", "/v1/state/default/bulk", vec![b' '; 2048])
        .await
        .assert_problem(413, "payload_too_large");
    // Without Content-Length (streamed), the limit still holds.
    let stream = futures_util::stream::iter(
        (0..4).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 512]))),
    );
    app.call("PUT", "/v1/state/default/k", Body::from_stream(stream))
        .await
        .assert_problem(413, "payload_too_large");
    assert_eq!(
        app.call("PUT", "/v1/state/default/k", vec![b'x'; 1024])
            .await
            .status,
        204
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let app = app();
    app.call("GET", "/v2/anything", Body::empty())
        .await
        .assert_problem(404, "route_not_found");
    app.call("PATCH", "/v1/state/default/k", Body::empty())
        .await
        .assert_problem(405, "method_not_allowed");
    app.call("POST", "/healthz", Body::empty())
        .await
        .assert_problem(405, "method_not_allowed");
}

#[tokio::test]
async fn request_ids_and_trace_context() {
    let app = app();
    let r = app.call("GET", "/healthz", Body::empty()).await;
    let generated = r.header("x-request-id").expect("generated id");
    assert_eq!(generated.len(), 36);
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = app
        .call_with(
            "GET",
            "/healthz",
            &[("x-request-id", "my-id-1"), ("traceparent", parent)],
            Body::empty(),
        )
        .await;
    assert_eq!(r.header("x-request-id"), Some("my-id-1"));
    let child = r.header("traceparent").expect("traceparent");
    assert!(
        child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "same trace: {child}"
    );
    assert!(!child.contains("00f067aa0ba902b7"), "new span id: {child}");
    // Garbage is replaced, not echoed.
    let r = app
        .call_with(
            "GET",
            "/healthz",
            &[("x-request-id", "a b"), ("traceparent", "garbage")],
            Body::empty(),
        )
        .await;
    assert_ne!(r.header("x-request-id"), Some("a b"));
    assert!(r.header("traceparent").is_some_and(|t| t.len() == 55));
}

#[tokio::test]
async fn bearer_auth_guards_v1_only() {
    let app = app_with_token("s3cret");
    app.call("GET", "/v1/state/default/k", Body::empty())
        .await
        .assert_problem(401, "missing_token");
    let wrong = app
        .call_with(
            "GET",
            "/v1/state/default/k",
            &[("authorization", "Bearer nope")],
            Body::empty(),
        )
        .await;
    wrong.assert_problem(401, "invalid_token");
    assert_eq!(wrong.header("www-authenticate"), Some("Bearer"));
    app.call_with(
        "GET",
        "/v1/state/default/k",
        &[("authorization", "Basic czNjcmV0")],
        Body::empty(),
    )
    .await
    .assert_problem(401, "missing_token");
    app.call_with(
        "GET",
        "/v1/state/default/k",
        &[("authorization", "Bearer s3cret")],
        Body::empty(),
    )
    .await
    .assert_problem(404, "key_not_found");
    // Unknown /v1 paths don't reveal what exists without a token.
    app.call("GET", "/v1/nope", Body::empty())
        .await
        .assert_problem(401, "missing_token");
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(
            app.call("GET", open, Body::empty()).await.status,
            200,
            "{open}"
        );
    }
}

#[tokio::test]
async fn ops_endpoints() {
    let app = app();
    assert_eq!(
        app.call("GET", "/healthz", Body::empty()).await.json()["status"],
        "ok"
    );
    let ready = app.call("GET", "/readyz", Body::empty()).await.json();
    assert_eq!(
        ready,
        serde_json::json!({"status": "ready", "components": {"state.default": "ok"}})
    );

    app.call("PUT", "/v1/state/default/k", "v").await;
    let metrics = app.call("GET", "/metrics", Body::empty()).await;
    assert!(
        metrics
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain"))
    );
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("trellis_http_requests_total{method=\"PUT\",route=\"/v1/state/{store}/{*key}\",status=\"204\"}"), "{text}");
    assert!(
        text.contains("trellis_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("trellis_state_operations_total{store=\"default\",backend=\"embedded\",op=\"set\",outcome=\"ok\"}"), "{text}");

    let doc = app.call("GET", "/openapi.json", Body::empty()).await.json();
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    for path in [
        "/v1/state/{store}/{key}",
        "/v1/state/{store}/bulk",
        "/v1/state/{store}/transaction",
        "/v1/state/{store}",
        "/readyz",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
}

#[tokio::test]
async fn readiness_fails_when_a_backend_is_down() {
    let app = app();
    // Close the store under the app: health checks now fail.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = std::sync::Arc::new(
        trellis_state::EmbeddedStore::open(dir.path().join("x.redb"), Default::default())
            .expect("open"),
    );
    trellis_state::StateStore::close(&*store)
        .await
        .expect("close");
    let server = trellis_server::Server::from_stores(
        Default::default(),
        std::collections::BTreeMap::from([(
            "default".to_owned(),
            store as std::sync::Arc<dyn trellis_state::StateStore>,
        )]),
    );
    let down = support::App::from_router(server.router());
    let r = down.call("GET", "/readyz", Body::empty()).await;
    r.assert_problem(503, "not_ready");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        r.json()["components"]["state.default"]
            .as_str()
            .is_some_and(|s| s != "ok")
    );
    // Writes to a closed backend: 503 backend_unavailable, not 500.
    let w = down.call("PUT", "/v1/state/default/k", "v").await;
    w.assert_problem(503, "backend_unavailable");
    drop(app);
}
