//! Projections run for apps (`[projections.<name>]`): Trellis follows the source,
//! posts batches of events to a route on the app, and applies the read-model writes
//! the app answers with to a state store, in one transaction with the projection's
//! checkpoint (the runner is `trellis_cqrs`'s, so the guarantees are the same as
//! for a Rust projection: every event takes effect exactly once, through crashes).
//!
//! # The protocol
//! `POST <route>` with
//! `{"projection": "<name>", "events": [<event>, ...]}` (events as
//! `GET /v1/streams/...` shows them). The app answers 200 with
//! `{"operations": [{"op": "put", "key": "k", "value": <json>}, {"op": "delete",
//! "key": "k"}, {"op": "merge", "key": "k", "patch": <json merge patch>}]}` (or
//! 204, or an empty body: no writes). Operations apply in order; a `merge` patches
//! the value as the batch's earlier operations left it (RFC 7386). Keys are
//! relative to the projection's key prefix (`<name>/` by default): the app reads
//! its view through the state API at `GET /v1/state/<store>/<prefix><key>` — what
//! it reads there is exactly the effect of the events before the batch, also when
//! a batch is posted again, so computing from it is safe. Any other answer, no
//! answer, or an answer that is not that shape fails the batch: nothing of it is
//! applied and it is posted again after a backoff.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::BodyExt as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use trellis_core::config::{ProjectionConfig, StartAt};
use trellis_core::{Config, RequestId, TraceContext};
use trellis_cqrs::projection::{
    Projection, ProjectionError, ProjectionHandle, ProjectionRunner, ProjectionStatus, ViewBatch,
};
use trellis_eventstore::subscription::{Source, Start};
use trellis_eventstore::{EventStore, RecordedEvent};
use trellis_proxy::{Invoker, ProxyBody, Target, forward};
use trellis_state::StateStore;

use crate::routes::streams::event_json;

/// Largest answer read from an app.
const MAX_ANSWER: usize = 16 << 20;
/// The first pause after a failure.
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// Why a projection could not be started.
#[derive(Debug)]
pub(crate) struct ProjectionStartError {
    pub(crate) name: String,
    pub(crate) reason: String,
}

/// One running projection.
#[derive(Debug)]
struct Running {
    runner: ProjectionRunner,
    handle: Mutex<Option<ProjectionHandle>>,
    config: ProjectionConfig,
}

/// Every configured projection, running.
#[derive(Debug, Default)]
pub(crate) struct Projections {
    running: BTreeMap<String, Running>,
}

impl Projections {
    /// Starts every `[projections.<name>]`.
    pub(crate) fn start(
        config: &Config,
        eventstores: &BTreeMap<String, Arc<dyn EventStore>>,
        stores: &BTreeMap<String, Arc<dyn StateStore>>,
        invoker: &Invoker,
    ) -> Result<Self, ProjectionStartError> {
        let mut running = BTreeMap::new();
        for (name, p) in &config.projections {
            let fail = |reason: String| ProjectionStartError {
                name: name.clone(),
                reason,
            };
            let events = eventstores
                .get(&p.eventstore)
                .ok_or_else(|| fail(format!("no event store {:?}", p.eventstore)))?;
            let state = stores
                .get(&p.state)
                .ok_or_else(|| fail(format!("no state store {:?}", p.state)))?;
            let target = invoker
                .target(&p.app)
                .ok_or_else(|| fail(format!("no app {:?}", p.app)))?;
            let source: Source = p
                .source
                .parse()
                .map_err(|e: trellis_eventstore::event::Invalid| fail(e.to_string()))?;
            let start = match &p.start {
                None => Start::Beginning,
                Some(StartAt::Position(at)) => Start::At(*at),
                Some(StartAt::Named(s)) if s == "end" => Start::End,
                Some(StartAt::Named(_)) => Start::Beginning,
            };
            let projection = AppProjection {
                name: name.clone(),
                source,
                target,
                route: p.route.clone(),
            };
            let runner = ProjectionRunner::builder(projection)
                .batch_size(p.batch_size)
                .key_prefix(p.prefix(name))
                .start_from(start)
                .retry_backoff(MIN_BACKOFF, p.max_backoff)
                .build(Arc::clone(events), Arc::clone(state))
                .map_err(|e| fail(e.to_string()))?;
            let handle = runner.clone().spawn();
            running.insert(
                name.clone(),
                Running {
                    runner,
                    handle: Mutex::new(Some(handle)),
                    config: p.clone(),
                },
            );
        }
        Ok(Self { running })
    }

    /// Every projection's status and settings.
    pub(crate) fn list(&self) -> Vec<Value> {
        self.running
            .iter()
            .map(|(name, r)| status_json(name, r))
            .collect()
    }

    /// One projection's status and settings.
    pub(crate) fn get(&self, name: &str) -> Option<Value> {
        self.running.get(name).map(|r| status_json(name, r))
    }

    /// Deletes a projection's view and checkpoint and applies it again from its
    /// start; `None` if there is no such projection.
    pub(crate) async fn rebuild(&self, name: &str) -> Option<Result<(), ProjectionError>> {
        let running = self.running.get(name)?;
        let mut handle = running.handle.lock().await;
        Some(match handle.as_mut() {
            Some(handle) => handle.rebuild().await,
            None => Ok(()),
        })
    }

    /// Stops every projection after its batch in progress.
    pub(crate) async fn stop_all(&self) {
        for running in self.running.values() {
            if let Some(handle) = running.handle.lock().await.take() {
                handle.stop().await;
            }
        }
    }
}

fn status_json(name: &str, r: &Running) -> Value {
    let status: ProjectionStatus = r.runner.status();
    let mut out = serde_json::to_value(&status).unwrap_or_else(|_| json!({}));
    if let Some(object) = out.as_object_mut() {
        object.insert("name".into(), Value::from(name));
        object.insert("source".into(), Value::from(r.config.source.clone()));
        object.insert("app".into(), Value::from(r.config.app.clone()));
        object.insert("route".into(), Value::from(r.config.route.clone()));
        object.insert(
            "eventstore".into(),
            Value::from(r.config.eventstore.clone()),
        );
        object.insert("state_store".into(), Value::from(r.config.state.clone()));
        object.insert("key_prefix".into(), Value::from(r.config.prefix(name)));
    }
    out
}

/// A projection computed by an app.
#[derive(Debug)]
struct AppProjection {
    name: String,
    source: Source,
    target: Target,
    route: String,
}

/// The app's answer.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    #[serde(default)]
    operations: Vec<Operation>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Operation {
    Put { key: String, value: Value },
    Merge { key: String, patch: Value },
    Delete { key: String },
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything
/// else replaces.
fn merge_patch(target: &mut Value, patch: Value) {
    let Value::Object(patch) = patch else {
        *target = patch;
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(object) = target {
        for (key, value) in patch {
            if value.is_null() {
                object.remove(&key);
            } else {
                merge_patch(object.entry(key).or_insert(Value::Null), value);
            }
        }
    }
}

#[async_trait]
impl Projection for AppProjection {
    fn name(&self) -> &str {
        &self.name
    }

    fn source(&self) -> Source {
        self.source.clone()
    }

    async fn apply(
        &self,
        events: &[RecordedEvent],
        view: &mut ViewBatch,
    ) -> Result<(), ProjectionError> {
        let body = json!({
            "projection": self.name,
            "events": events.iter().map(event_json).collect::<Vec<_>>(),
        });
        let request_id = RequestId::generate();
        let trace = TraceContext::new_root();
        let span = tracing::info_span!("projection", projection = %self.name, request_id = %request_id.as_str(), trace_id = %trace.trace_id(), first = events.first().map_or(0, |e| e.position), events = events.len());
        let mut request = http::Request::post(self.route.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(ProxyBody::from(bytes::Bytes::from(body.to_string())))
            .map_err(|e| {
                ProjectionError::custom(format!("cannot build a request to {:?}: {e}", self.route))
            })?;
        forward::outgoing_headers(request.headers_mut(), &request_id, &trace);
        let response = {
            let _enter = span.enter();
            self.target.deliver(request)
        }
        .await
        .map_err(|e| ProjectionError::custom(format!("app {:?}: {e}", self.route)))?;
        let status = response.status();
        let bytes = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| ProjectionError::custom(format!("reading the app's answer: {e}")))?;
        if !status.is_success() {
            return Err(ProjectionError::custom(format!(
                "the app answered {status} to {}",
                self.route
            )));
        }
        let answer: Answer = if bytes.iter().all(u8::is_ascii_whitespace) {
            Answer::default()
        } else {
            serde_json::from_slice(&bytes).map_err(|e| {
                ProjectionError::custom(format!(
                    "the app's answer is not {{\"operations\": [...]}}: {e}"
                ))
            })?
        };
        for op in answer.operations {
            match op {
                Operation::Put { key, value } => view.put(&key, &value)?,
                Operation::Merge { key, patch } => {
                    let mut value = view.get::<Value>(&key).await?.unwrap_or(Value::Null);
                    merge_patch(&mut value, patch);
                    view.put(&key, &value)?;
                }
                Operation::Delete { key } => view.delete(&key)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod test {
    use serde_json::json;

    use super::merge_patch;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut v = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut v, json!({"a": "z", "c": {"f": null}}));
        assert_eq!(v, json!({"a": "z", "c": {"d": "e"}}));
        let mut missing = serde_json::Value::Null;
        merge_patch(&mut missing, json!({"status": "paid"}));
        assert_eq!(missing, json!({"status": "paid"}));
        merge_patch(&mut missing, json!([1]));
        assert_eq!(missing, json!([1]));
    }
}
