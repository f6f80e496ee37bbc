//! The service that sends a request to one instance of an app.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{PathAndQuery, Scheme, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower::Service;
use trellis_core::config::Protocol;
use trellis_resilience::BoxError;
use trellis_resilience::error::ConnectError;

use crate::ProxyBody;
use crate::error::{NoHealthyUpstream, UpstreamError};
use crate::group::Group;

/// A pooled HTTP client (keep-alive; HTTP/1.1 or h2c).
pub(crate) type HttpClient = Client<HttpConnector, ProxyBody>;

/// Idle pooled connections are closed after this.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

pub(crate) fn client(protocol: Protocol, connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(1024)
        .http2_only(protocol == Protocol::H2c)
        .build(connector)
}

/// Attached to responses: the instance that answered (for access logs).
#[derive(Debug, Clone)]
pub struct Instance(pub String);

/// A request extension sending the request to this instance (its base URL, as in
/// `[apps.<id>].instances`) instead of the one the balancer would pick — e.g. the
/// owner of a shard. If that instance is not available the call fails with
/// [`InstanceUnavailable`](crate::InstanceUnavailable) rather than going elsewhere;
/// retries and hedges keep the pin.
///
/// ```
/// use trellis_proxy::PinnedInstance;
///
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(PinnedInstance("http://10.0.0.7:8080".into()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedInstance(pub String);

/// Sends each request to an instance the group's balancer picks, and records how
/// it went for balancing and outlier detection. Upstream 4xx/5xx are responses, not
/// errors; connection failures are [`ConnectError`]s (safe to retry), other transport
/// failures [`UpstreamError`]s.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    group: Arc<Group>,
    version: http::Version,
}

impl Upstream {
    pub(crate) fn new(group: Arc<Group>, protocol: Protocol) -> Self {
        Self {
            group,
            version: match protocol {
                Protocol::Http1 => http::Version::HTTP_11,
                Protocol::H2c => http::Version::HTTP_2,
            },
        }
    }
}

impl Service<http::Request<ProxyBody>> for Upstream {
    type Response = http::Response<ProxyBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<ProxyBody>) -> Self::Future {
        let group = Arc::clone(&self.group);
        let version = self.version;
        Box::pin(async move {
            let endpoint = match req.extensions().get::<PinnedInstance>() {
                Some(pin) => group.pinned(&pin.0, Instant::now())?,
                None => group
                    .pick(&req, Instant::now())
                    .ok_or_else(|| NoHealthyUpstream {
                        app: group.app.clone(),
                    })?,
            };
            let path = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(endpoint.authority.clone())
                .path_and_query(path)
                .build()?;
            *req.version_mut() = version;
            let _in_flight = endpoint.start();
            let started = Instant::now();
            let result = group.client.request(req).await;
            let latency = started.elapsed();
            let failed = result
                .as_ref()
                .map_or(true, |r| r.status().is_server_error());
            group.record(&endpoint, latency, failed);
            match result {
                Ok(response) => {
                    let mut response = response.map(ProxyBody::stream);
                    response
                        .extensions_mut()
                        .insert(Instance(endpoint.url.clone()));
                    Ok(response)
                }
                Err(e) if e.is_connect() => {
                    Err(ConnectError(format!("{}: {}", endpoint.url, chain(&e))).into())
                }
                Err(e) => Err(UpstreamError {
                    instance: endpoint.url.clone(),
                    reason: chain(&e),
                }
                .into()),
            }
        })
    }
}

/// An error and its causes, `: `-separated (hyper's top-level messages are terse).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
