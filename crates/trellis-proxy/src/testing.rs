//! Real upstream HTTP servers for tests (feature `testing`): they answer, fail,
//! stall or die on command, and count what they get.
//!
//! Each answer's body echoes the upstream's name, the request's method, URI,
//! `traceparent`, `X-Request-Id`, HTTP version and body, so tests can see what
//! arrived. `GET /healthz` answers 200 or 500 as [`Upstream::set_healthy`] says and
//! is counted separately.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// What an upstream does with the next request.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Behavior {
    /// 200 with the echo as the body.
    Ok,
    /// This status.
    Status(u16),
    /// Wait, then 200.
    Slow(Duration),
    /// Answer with what the function returns for the request: `(status, body)`.
    Script(Script),
}

/// Decides the answer to a request: `(status, body)`.
pub type Answer = dyn Fn(&Received) -> (u16, String) + Send + Sync;

/// A function deciding each answer; see [`Behavior::Script`].
#[derive(Clone)]
pub struct Script(pub Arc<Answer>);

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Script")
    }
}

/// A request an upstream received (health checks not recorded).
#[derive(Debug, Clone)]
pub struct Received {
    /// The method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Headers, lowercase names.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl Received {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A running upstream, stopped when dropped.
#[derive(Debug)]
pub struct Upstream {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Its name, first word of every answer.
    pub name: String,
    /// Requests received, health checks not counted.
    pub hits: Arc<AtomicU32>,
    /// Health checks received.
    pub health_hits: Arc<AtomicU32>,
    behavior: Arc<Mutex<Behavior>>,
    healthy: Arc<Mutex<bool>>,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Starts an upstream named `name` on a free port of 127.0.0.1, speaking HTTP/1.1
    /// and h2c.
    ///
    /// # Panics
    /// If it can't bind.
    pub async fn start(name: &str, behavior: Behavior) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a test upstream");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let hits = Arc::new(AtomicU32::new(0));
        let health_hits = Arc::new(AtomicU32::new(0));
        let behavior = Arc::new(Mutex::new(behavior));
        let healthy = Arc::new(Mutex::new(true));
        let received = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared {
            name: name.to_owned(),
            hits: Arc::clone(&hits),
            health_hits: Arc::clone(&health_hits),
            behavior: Arc::clone(&behavior),
            healthy: Arc::clone(&healthy),
            received: Arc::clone(&received),
        };
        let task = {
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let service =
                            hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                                let shared = shared.clone();
                                async move { Ok::<_, Infallible>(handle(req, &shared).await) }
                            });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        };
        Self {
            url,
            name: name.to_owned(),
            hits,
            health_hits,
            behavior,
            healthy,
            received,
            task,
        }
    }

    /// Every request received so far (health checks not included).
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// Changes what it does with the next requests.
    pub fn set(&self, behavior: Behavior) {
        *self.behavior.lock().expect("lock") = behavior;
    }

    /// Makes `/healthz` answer 200 (`true`) or 500.
    pub fn set_healthy(&self, healthy: bool) {
        *self.healthy.lock().expect("lock") = healthy;
    }

    /// Requests received, health checks not counted.
    pub fn hits(&self) -> u32 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops accepting connections (existing ones finish).
    pub fn die(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Shared {
    name: String,
    hits: Arc<AtomicU32>,
    health_hits: Arc<AtomicU32>,
    behavior: Arc<Mutex<Behavior>>,
    healthy: Arc<Mutex<bool>>,
    received: Arc<Mutex<Vec<Received>>>,
}

async fn handle(req: hyper::Request<Incoming>, shared: &Shared) -> hyper::Response<Full<Bytes>> {
    let Shared {
        name,
        hits,
        health_hits,
        behavior,
        healthy,
        received,
    } = shared;
    if req.uri().path() == "/healthz" {
        health_hits.fetch_add(1, Ordering::SeqCst);
        let ok = *healthy.lock().expect("lock");
        return response(if ok { 200 } else { 500 }, "health".into());
    }
    hits.fetch_add(1, Ordering::SeqCst);
    let echo = format!(
        "{name} {} {} traceparent={} x-request-id={} version={:?}",
        req.method(),
        req.uri(),
        req.headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-"),
        req.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-"),
        req.version(),
    );
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let request = Received {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.clone(),
    };
    received.lock().expect("lock").push(request.clone());
    let behavior = behavior.lock().expect("lock").clone();
    match behavior {
        Behavior::Ok => response(
            200,
            format!("{echo} body={}", String::from_utf8_lossy(&body)),
        ),
        Behavior::Status(s) => response(s, echo),
        Behavior::Slow(d) => {
            tokio::time::sleep(d).await;
            response(200, echo)
        }
        Behavior::Script(script) => {
            let (status, body) = (script.0)(&request);
            response(status, body)
        }
    }
}

fn response(status: u16, body: String) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}
