//! Push subscriptions: each delivers one consumer group's messages of a topic to a
//! route on an app, through the invoke path (its timeouts, breaker, bulkheads and
//! rate limit, but never its retries: the broker redelivers).
//!
//! Subscriptions come from `[subscriptions.<name>]` in the config, or from
//! `PUT /v1/subscriptions/{name}`; the latter are kept in
//! `<data_dir>/subscriptions.json` (written atomically) so they survive restarts.
//!
//! The app's answer settles each message:
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx with an empty body, any non-JSON body, or `{"status":"SUCCESS"}` | ack |
//! | `{"status":"RETRY"}`, 5xx, 408, 429, no answer, timeout | redeliver (after `Retry-After` if given, else the backoff) |
//! | `{"status":"DROP"}`, any other 4xx | dead-letter, with the reason |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::http::StatusCode;
use http_body_util::BodyExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use trellis_core::config::SubscriptionConfig;
use trellis_core::{Config, RequestId, TraceContext};
use trellis_proxy::{InvokeError, Invoker, ProxyBody, Target, forward};
use trellis_pubsub::push::{Handler, Push, Verdict};
use trellis_pubsub::{Delivery, PubSub};

use crate::ApiError;

/// Largest app answer read to find a `status`.
const MAX_ANSWER: usize = 64 << 10;

/// Where a subscription was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Origin {
    /// `[subscriptions.<name>]`.
    Config,
    /// `PUT /v1/subscriptions/{name}`.
    Api,
}

#[derive(Debug)]
struct Running {
    config: SubscriptionConfig,
    /// The body it was declared with (API subscriptions), as persisted.
    declared: serde_json::Value,
    origin: Origin,
    push: Push,
}

/// Every push subscription of this sidecar.
#[derive(Debug)]
pub(crate) struct Subscriptions {
    config: Arc<Config>,
    pubsubs: Arc<BTreeMap<String, Arc<dyn PubSub>>>,
    invoker: Arc<Invoker>,
    /// `None` for servers without a data directory (tests).
    file: Option<PathBuf>,
    running: Mutex<BTreeMap<String, Running>>,
}

/// A subscription as `GET /v1/subscriptions` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct SubscriptionView {
    name: String,
    origin: Origin,
    pubsub: String,
    topic: String,
    group: String,
    app: String,
    route: String,
    /// The effective settings (overrides on top of the component's defaults).
    #[schema(value_type = Object)]
    settings: serde_json::Value,
    /// Deliveries acknowledged since start.
    acked: u64,
    /// Deliveries returned for redelivery since start.
    retried: u64,
    /// Deliveries dead-lettered on the app's answer since start.
    dropped: u64,
}

impl Subscriptions {
    /// None, and none can be added (no apps).
    pub(crate) fn empty(config: Arc<Config>) -> Self {
        Self {
            config,
            pubsubs: Arc::default(),
            invoker: Arc::default(),
            file: None,
            running: Mutex::new(BTreeMap::new()),
        }
    }

    /// Starts every subscription in the config and every one persisted by the API.
    pub(crate) async fn start(
        config: Arc<Config>,
        pubsubs: Arc<BTreeMap<String, Arc<dyn PubSub>>>,
        invoker: Arc<Invoker>,
        data_dir: Option<&Path>,
    ) -> Self {
        let this = Self {
            file: data_dir.map(|d| d.join("subscriptions.json")),
            config: Arc::clone(&config),
            pubsubs,
            invoker,
            running: Mutex::new(BTreeMap::new()),
        };
        let mut running = this.running.lock().await;
        for (name, sub) in &config.subscriptions {
            if let Some(push) = this.launch(name, sub) {
                running.insert(
                    name.clone(),
                    Running {
                        config: sub.clone(),
                        declared: serde_json::Value::Null,
                        origin: Origin::Config,
                        push,
                    },
                );
            }
        }
        for (name, declared) in this.load() {
            if running.contains_key(&name) {
                tracing::warn!(subscription = %name, "a subscription declared through the API has the name of one in the config; the config's wins");
                continue;
            }
            let parsed = serde_json::from_value::<SubscriptionConfig>(declared.clone())
                .map_err(|e| e.to_string())
                .and_then(|sub| {
                    let problems = sub.validate(&name, &config);
                    if problems.is_empty() {
                        Ok(sub)
                    } else {
                        Err(describe(&problems))
                    }
                });
            match parsed {
                Ok(sub) => {
                    if let Some(push) = this.launch(&name, &sub) {
                        running.insert(
                            name,
                            Running {
                                config: sub,
                                declared,
                                origin: Origin::Api,
                                push,
                            },
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(subscription = %name, error = %e, "a persisted subscription is no longer valid; not started (replace or delete it)")
                }
            }
        }
        drop(running);
        this
    }

    fn launch(&self, name: &str, sub: &SubscriptionConfig) -> Option<Push> {
        let pubsub = self.pubsubs.get(&sub.pubsub)?;
        let target = self.invoker.target(&sub.app)?;
        let defaults = self
            .config
            .components
            .pubsub
            .get(&sub.pubsub)
            .map(|c| c.defaults().clone())
            .unwrap_or_default();
        let settings = sub.settings(&defaults);
        let handler = AppHandler {
            target,
            route: sub.route.clone(),
            subscription: name.to_owned(),
        };
        tracing::info!(subscription = %name, pubsub = %sub.pubsub, topic = %sub.topic, group = %sub.group(name), app = %sub.app, route = %sub.route, "push subscription started");
        Some(Push::start(
            Arc::clone(pubsub),
            sub.topic.clone(),
            sub.group(name).to_owned(),
            settings,
            Arc::new(handler),
        ))
    }

    fn load(&self) -> BTreeMap<String, serde_json::Value> {
        let Some(file) = &self.file else {
            return BTreeMap::new();
        };
        match std::fs::read(file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(file = %file.display(), error = %e, "cannot parse persisted subscriptions; starting without them");
                BTreeMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                tracing::error!(file = %file.display(), error = %e, "cannot read persisted subscriptions; starting without them");
                BTreeMap::new()
            }
        }
    }

    /// Writes the API subscriptions: temp file, fsync, rename, fsync the directory.
    async fn persist(&self, running: &BTreeMap<String, Running>) -> Result<(), ApiError> {
        let Some(file) = self.file.clone() else {
            return Ok(());
        };
        let declared: BTreeMap<&String, &serde_json::Value> = running
            .iter()
            .filter(|(_, r)| r.origin == Origin::Api)
            .map(|(n, r)| (n, &r.declared))
            .collect();
        let bytes = serde_json::to_vec_pretty(&declared).map_err(ApiError::internal)?;
        tokio::task::spawn_blocking(move || write_atomically(&file, &bytes))
            .await
            .map_err(ApiError::internal)?
            .map_err(|e| ApiError::internal(format!("cannot persist subscriptions: {e}")))
    }

    /// Creates or replaces an API subscription; `true` if it was created.
    pub(crate) async fn put(
        &self,
        name: &str,
        declared: serde_json::Value,
    ) -> Result<bool, ApiError> {
        let sub: SubscriptionConfig = serde_json::from_value(declared.clone())
            .map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
        let problems = sub.validate(name, &self.config);
        if !problems.is_empty() {
            let fields: serde_json::Map<String, serde_json::Value> = problems
                .iter()
                .map(|(f, m)| ((*f).to_owned(), serde_json::Value::from(m.clone())))
                .collect();
            let code = if problems.iter().any(|(f, _)| *f == "pubsub") {
                "pubsub_not_found"
            } else {
                "invalid_subscription"
            };
            let status = if code == "pubsub_not_found" {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_REQUEST
            };
            return Err(
                ApiError::new(status, code, describe(&problems)).with_extension("fields", fields)
            );
        }
        let mut running = self.running.lock().await;
        if running
            .get(name)
            .is_some_and(|r| r.origin == Origin::Config)
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "subscription_in_config",
                format!("subscription {name:?} is declared in the config file; change it there"),
            ));
        }
        let push = self
            .launch(name, &sub)
            .ok_or_else(|| ApiError::internal("validated subscription could not start"))?;
        let previous = running.insert(
            name.to_owned(),
            Running {
                config: sub,
                declared,
                origin: Origin::Api,
                push,
            },
        );
        if let Err(e) = self.persist(&running).await {
            // Not durable, so not accepted: put things back.
            if let Some(new) = running.remove(name) {
                new.push.stop().await;
            }
            if let Some(previous) = previous {
                // Still running: it was only taken out of the map.
                running.insert(name.to_owned(), previous);
            }
            return Err(e);
        }
        let created = previous.is_none();
        if let Some(previous) = previous {
            previous.push.stop().await;
        }
        Ok(created)
    }

    /// Stops and forgets an API subscription; `false` if there was none.
    pub(crate) async fn delete(&self, name: &str) -> Result<bool, ApiError> {
        let mut running = self.running.lock().await;
        match running.get(name).map(|r| r.origin) {
            None => return Ok(false),
            Some(Origin::Config) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "subscription_in_config",
                    format!(
                        "subscription {name:?} is declared in the config file; remove it there"
                    ),
                ));
            }
            Some(Origin::Api) => {}
        }
        let Some(removed) = running.remove(name) else {
            return Ok(false);
        };
        if let Err(e) = self.persist(&running).await {
            let name = name.to_owned();
            running.insert(name, removed);
            return Err(e);
        }
        removed.push.stop().await;
        Ok(true)
    }

    /// Every subscription, by name.
    pub(crate) async fn list(&self) -> Vec<SubscriptionView> {
        let running = self.running.lock().await;
        running.iter().map(|(name, r)| self.view(name, r)).collect()
    }

    /// One subscription.
    pub(crate) async fn get(&self, name: &str) -> Option<SubscriptionView> {
        let running = self.running.lock().await;
        running.get(name).map(|r| self.view(name, r))
    }

    fn view(&self, name: &str, r: &Running) -> SubscriptionView {
        use std::sync::atomic::Ordering::Relaxed;
        let defaults = self
            .config
            .components
            .pubsub
            .get(&r.config.pubsub)
            .map(|c| c.defaults().clone())
            .unwrap_or_default();
        let s = r.config.settings(&defaults);
        let stats = r.push.stats();
        SubscriptionView {
            name: name.to_owned(),
            origin: r.origin,
            pubsub: r.config.pubsub.clone(),
            topic: r.config.topic.clone(),
            group: r.config.group(name).to_owned(),
            app: r.config.app.clone(),
            route: r.config.route.clone(),
            settings: serde_json::json!({
                "ack_deadline_ms": s.ack_deadline.as_millis() as u64,
                "max_deliveries": s.max_deliveries,
                "min_backoff_ms": s.min_backoff.as_millis() as u64,
                "max_backoff_ms": s.max_backoff.as_millis() as u64,
                "max_in_flight": s.max_in_flight,
                "dead_letter_topic": trellis_pubsub::dead_letter_topic(&r.config.topic, &s),
            }),
            acked: stats.acked.load(Relaxed),
            retried: stats.retried.load(Relaxed),
            dropped: stats.dropped.load(Relaxed),
        }
    }

    /// The settings of the subscription of `group` on `topic` of `pubsub`, if one is
    /// declared (pull consumers share them).
    pub(crate) async fn settings_of(
        &self,
        pubsub: &str,
        topic: &str,
        group: &str,
    ) -> Option<SubscriptionConfig> {
        let running = self.running.lock().await;
        running
            .iter()
            .find(|(name, r)| {
                r.config.pubsub == pubsub
                    && r.config.topic == topic
                    && r.config.group(name) == group
            })
            .map(|(_, r)| r.config.clone())
    }

    /// Stops every subscription, letting deliveries in progress finish.
    pub(crate) async fn stop_all(&self) {
        let running = std::mem::take(&mut *self.running.lock().await);
        futures_util::future::join_all(running.into_values().map(|r| r.push.stop())).await;
    }
}

fn describe(problems: &[(&'static str, String)]) -> String {
    problems
        .iter()
        .map(|(field, message)| {
            if field.is_empty() {
                message.clone()
            } else {
                format!("{field}: {message}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn write_atomically(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = file.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, file)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Delivers to a route on an app.
#[derive(Debug)]
struct AppHandler {
    target: Target,
    route: String,
    subscription: String,
}

/// The part of an app's answer that matters.
#[derive(Debug, Deserialize)]
struct Answer {
    status: Option<String>,
}

/// The part of an event that matters for tracing.
#[derive(Debug, Deserialize)]
struct Traced {
    traceparent: Option<String>,
    correlationid: Option<serde_json::Value>,
}

#[async_trait]
impl Handler for AppHandler {
    async fn handle(&self, delivery: &Delivery) -> Verdict {
        let traced = serde_json::from_slice::<Traced>(&delivery.event).ok();
        let correlation = traced
            .as_ref()
            .and_then(|t| t.correlationid.as_ref())
            .map(|c| match c {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            });
        let trace = traced
            .and_then(|t| t.traceparent)
            .and_then(|t| TraceContext::parse(&t))
            .map_or_else(TraceContext::new_root, |parent| parent.child());
        let request_id = RequestId::generate();
        let span = tracing::info_span!("delivery", subscription = %self.subscription, request_id = %request_id.as_str(), trace_id = %trace.trace_id(), position = delivery.position, attempt = delivery.attempt);
        let _enter = span.enter();
        let request = http::Request::post(self.route.as_str())
            .header(http::header::CONTENT_TYPE, "application/cloudevents+json")
            .body(ProxyBody::from(delivery.event.clone()));
        let mut request = match request {
            Ok(r) => r,
            Err(e) => {
                return Verdict::Drop {
                    reason: format!("cannot build a request to {:?}: {e}", self.route),
                };
            }
        };
        forward::outgoing_headers(request.headers_mut(), &request_id, &trace);
        if let Ok(v) = http::HeaderValue::from_str(&delivery.attempt.to_string()) {
            request.headers_mut().insert("trellis-delivery-attempt", v);
        }
        // Choreography: the subscriber echoes it on what it publishes next.
        if let Some(v) = correlation.and_then(|c| http::HeaderValue::from_str(&c).ok()) {
            request
                .headers_mut()
                .insert(crate::routes::pubsub::CORRELATION_HEADER, v);
        }
        drop(_enter);
        let response = match self.target.deliver(request).await {
            Ok(response) => response,
            Err(e) => return verdict_of_failure(&e),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        verdict_of_answer(status, retry_after, &body)
    }
}

fn verdict_of_failure(e: &InvokeError) -> Verdict {
    tracing::debug!(error = %e, "delivery failed; will redeliver");
    Verdict::Retry {
        delay: e.retry_after(),
    }
}

fn verdict_of_answer(status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> Verdict {
    let said = serde_json::from_slice::<Answer>(body)
        .ok()
        .and_then(|a| a.status)
        .map(|s| s.to_ascii_uppercase());
    match said.as_deref() {
        Some("RETRY") => return Verdict::Retry { delay: retry_after },
        Some("DROP") => {
            return Verdict::Drop {
                reason: "the app answered DROP".into(),
            };
        }
        Some("SUCCESS") if status.is_success() => return Verdict::Ack,
        _ => {}
    }
    if status.is_success() {
        if let Some(other) = said.filter(|s| s != "SUCCESS") {
            tracing::warn!(status = %other, "unknown status in the app's answer; will redeliver");
            return Verdict::Retry { delay: None };
        }
        Verdict::Ack
    } else if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        Verdict::Retry { delay: retry_after }
    } else {
        Verdict::Drop {
            reason: format!("the app answered {status}"),
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn answers_decide_the_verdict() {
        let ok = StatusCode::OK;
        assert_eq!(verdict_of_answer(ok, None, b""), Verdict::Ack);
        assert_eq!(verdict_of_answer(ok, None, b"thanks"), Verdict::Ack);
        assert_eq!(
            verdict_of_answer(ok, None, br#"{"status":"SUCCESS"}"#),
            Verdict::Ack
        );
        assert_eq!(
            verdict_of_answer(StatusCode::NO_CONTENT, None, b""),
            Verdict::Ack
        );
        assert_eq!(
            verdict_of_answer(ok, None, br#"{"status":"retry"}"#),
            Verdict::Retry { delay: None }
        );
        assert!(matches!(
            verdict_of_answer(ok, None, br#"{"status":"DROP"}"#),
            Verdict::Drop { .. }
        ));
        assert_eq!(
            verdict_of_answer(ok, None, br#"{"status":"MAYBE"}"#),
            Verdict::Retry { delay: None }
        );
        assert_eq!(
            verdict_of_answer(
                StatusCode::SERVICE_UNAVAILABLE,
                Some(Duration::from_secs(3)),
                b""
            ),
            Verdict::Retry {
                delay: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(
            verdict_of_answer(StatusCode::TOO_MANY_REQUESTS, None, b""),
            Verdict::Retry { delay: None }
        );
        assert!(
            matches!(verdict_of_answer(StatusCode::BAD_REQUEST, None, b""), Verdict::Drop { reason } if reason.contains("400"))
        );
        // A status in an error answer still counts.
        assert_eq!(
            verdict_of_answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                br#"{"status":"SUCCESS"}"#
            ),
            Verdict::Retry { delay: None }
        );
    }
}
