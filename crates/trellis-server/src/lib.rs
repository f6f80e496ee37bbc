//! The Trellis HTTP API.
//!
//! Serves every building block over HTTP/JSON next to an application written in any
//! language, following the conventions of `DESIGN.md`: `/v1` paths,
//! `application/problem+json` errors with stable `code`s, `ETag`/`If-Match` for
//! optimistic concurrency, `X-Request-Id` and W3C `traceparent` on every request,
//! bearer-token auth, `/healthz`, `/readyz`, `/metrics` and `/openapi.json`.
//!
//! # Layout
//! - [`Server`]: opens the configured components, builds the router, runs it until a
//!   shutdown signal, drains in-flight requests and closes the components.
//! - [`ApiError`]: the one place errors become HTTP responses.
//! - `extract`: extractors whose rejections are problem+json.
//! - `context`, `auth`: request ids, trace context, logs and metrics; bearer auth.
//! - `routes`: one module per API area (`ops` for health/metrics/openapi, `state`,
//!   `invoke`, `resilience`, `pubsub`).
//! - `subscriptions`: push delivery of subscriptions to apps.
//! - `outbox`: the transactional outbox (messages a state transaction stores with
//!   its writes) and its relay to pub/sub.
//! - `registry`: the service registry's wiring (HTTP checks, `[app]`
//!   self-registration, discovery for `[apps.*]` with `discovery = "registry"`).
//! - `shards`: shard maps at runtime (owners, rebalance plans, events).
//! - `telemetry`: the Prometheus recorder.
//!
//! # Example
//! ```no_run
//! use trellis_core::Config;
//! use trellis_server::Server;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::load(None)?;
//! let server = Server::build(&config).await?;
//! let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
//! server.run(Some(listener), Vec::new(), async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```

mod auth;
mod context;
mod error;
mod extract;
mod openapi;
mod outbox;
mod projections;
mod registry;
mod routes;
pub mod sagas;
mod server;
mod shards;
mod subscriptions;
pub mod telemetry;

pub use context::RequestContext;
pub use error::ApiError;
pub use openapi::openapi;
pub use server::{BuildError, Server};
