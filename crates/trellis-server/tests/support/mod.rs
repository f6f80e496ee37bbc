//! Shared helpers of the API tests.
// Builds an in-process app over a fresh embedded store and drives it with `oneshot`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;
use trellis_core::Config;
use trellis_core::config::Secret;
use trellis_server::Server;
use trellis_state::{EmbeddedStore, Instrumented, StateStore};

pub(crate) struct App {
    pub(crate) router: Router,
    _dir: tempfile::TempDir,
}

pub(crate) fn app() -> App {
    app_with(|_| {})
}

pub(crate) fn app_with_token(token: &str) -> App {
    app_with(|c| c.server.api_token = Some(Secret::new(token)))
}

pub(crate) fn app_with(configure: impl FnOnce(&mut Config)) -> App {
    trellis_server::telemetry::prometheus();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default();
    configure(&mut config);
    let store: Arc<dyn StateStore> =
        Arc::new(EmbeddedStore::open(dir.path().join("s.redb"), Default::default()).expect("open"));
    let store: Arc<dyn StateStore> = Arc::new(Instrumented::new("default", store));
    let server = Server::from_stores(
        config.server,
        BTreeMap::from([("default".to_owned(), store)]),
    );
    App {
        router: server.router(),
        _dir: dir,
    }
}

pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: axum::http::HeaderMap,
    pub(crate) body: bytes::Bytes,
}

impl Reply {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a problem+json error with `status` and `code`.
    pub(crate) fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {:?}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        let problem = self.json();
        assert_eq!(problem["code"], code, "{problem}");
        assert_eq!(problem["status"], status, "{problem}");
        assert_eq!(problem["type"], format!("urn:trellis:problem:{code}"));
        assert!(
            problem["title"].is_string() && problem["detail"].is_string(),
            "{problem}"
        );
    }
}

impl App {
    pub(crate) async fn send(&self, request: Request<Body>) -> Reply {
        let response: Response<Body> = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub(crate) async fn call(&self, method: &str, uri: &str, body: impl Into<Body>) -> Reply {
        self.send(
            Request::builder()
                .method(method)
                .uri(uri)
                .body(body.into())
                .expect("request"),
        )
        .await
    }

    pub(crate) async fn call_with(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Reply {
        let mut builder = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        self.send(builder.body(body.into()).expect("request")).await
    }
}

impl App {
    pub(crate) fn from_router(router: Router) -> Self {
        App {
            router,
            _dir: tempfile::tempdir().expect("tempdir"),
        }
    }
}
