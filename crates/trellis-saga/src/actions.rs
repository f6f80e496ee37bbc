//! Running a step's action: the I/O side of the orchestrator.
//!
//! The orchestrator renders a step's templates into a [`Call`] and hands it to an
//! [`Actions`] implementation. [`SidecarActions`] is the one the sidecar uses: it
//! invokes app routes through the [`Invoker`] (so each call gets the app's
//! resilience policies) and publishes through the pub/sub components. Tests plug in
//! their own.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use serde_json::Value;
use trellis_core::{RequestId, TraceContext};
use trellis_proxy::{Invoker, ProxyBody, forward};
use trellis_pubsub::PubSub;
use trellis_pubsub::event::{CloudEvent, Data};

use crate::definition::Action;
use crate::machine::{CallKind, Failure};

/// Most bytes of an answer kept as a step's output.
pub const MAX_OUTPUT: usize = 1024 * 1024;

/// A rendered action, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Rendered {
    /// An invoke of an app route.
    Invoke {
        /// The app.
        app: String,
        /// The method.
        method: http::Method,
        /// The path (and query) on the app, placeholders filled and encoded.
        path: String,
        /// The JSON body.
        body: Option<Value>,
        /// Extra headers.
        headers: Vec<(String, String)>,
    },
    /// A publish.
    Publish {
        /// The pub/sub component.
        pubsub: String,
        /// The topic.
        topic: String,
        /// The event's data.
        data: Value,
        /// The CloudEvents type.
        event_type: String,
    },
}

/// One call of a step's action or compensation.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// The saga's id, also its correlation id.
    pub saga_id: String,
    /// The definition's name.
    pub saga: String,
    /// The step's name.
    pub step: String,
    /// Action or compensation.
    pub kind: CallKind,
    /// Which attempt this is (1-based).
    pub attempt: u32,
    /// `{saga id}:{step}:{action|compensate}`, the same on every attempt.
    pub idempotency_key: String,
    /// What to do.
    pub action: Rendered,
}

/// Runs calls.
#[async_trait]
pub trait Actions: fmt::Debug + Send + Sync + 'static {
    /// Runs `call`; its output (an invoke's JSON answer, `null` for a publish).
    ///
    /// # Errors
    /// A [`Failure`] saying whether trying again may help and whether the call may
    /// have been applied.
    async fn run(&self, call: &Call) -> Result<Value, Failure>;

    /// Checks that an action names things that exist (apps, pub/sub components),
    /// when a definition is registered.
    ///
    /// # Errors
    /// What is unknown.
    fn check(&self, action: &Action) -> Result<(), String> {
        let _ = action;
        Ok(())
    }
}

/// Runs calls through this sidecar's invoker and pub/sub components.
#[derive(Debug, Clone)]
pub struct SidecarActions {
    invoker: Arc<Invoker>,
    pubsubs: Arc<BTreeMap<String, Arc<dyn PubSub>>>,
}

impl SidecarActions {
    /// Calls through `invoker`, publishes through `pubsubs`.
    pub fn new(invoker: Arc<Invoker>, pubsubs: Arc<BTreeMap<String, Arc<dyn PubSub>>>) -> Self {
        Self { invoker, pubsubs }
    }

    async fn invoke(
        &self,
        call: &Call,
        app: &str,
        method: &http::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(String, String)],
    ) -> Result<Value, Failure> {
        let uri: http::Uri = path
            .parse()
            .map_err(|_| Failure::rejected(format!("invalid path {path:?}")))?;
        let payload = match body {
            Some(v) => {
                Bytes::from(serde_json::to_vec(v).map_err(|e| Failure::rejected(e.to_string()))?)
            }
            None => Bytes::new(),
        };
        let mut request = http::Request::builder()
            .method(method.clone())
            .uri(uri)
            .body(ProxyBody::full(payload))
            .map_err(|e| Failure::rejected(format!("invalid request: {e}")))?;
        let h = request.headers_mut();
        for (name, value) in headers {
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| Failure::rejected(format!("invalid header name {name:?}")))?;
            let value = http::HeaderValue::from_str(value)
                .map_err(|_| Failure::rejected(format!("invalid value for header {name}")))?;
            h.insert(name, value);
        }
        if body.is_some() {
            h.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
        for (name, value) in [
            ("idempotency-key", call.idempotency_key.as_str()),
            ("trellis-saga-id", call.saga_id.as_str()),
            ("trellis-saga-step", call.step.as_str()),
        ] {
            if let Ok(value) = http::HeaderValue::from_str(value) {
                h.insert(http::HeaderName::from_static(name), value);
            }
        }
        forward::outgoing_headers(h, &RequestId::generate(), &TraceContext::new_root());
        let response = self
            .invoker
            .invoke(app, request)
            .await
            .map_err(|e| match e.code() {
                "app_not_found" => Failure::rejected(e.to_string()),
                // Refused before reaching the app: nothing was applied.
                "circuit_open" | "bulkhead_full" | "rate_limited" | "no_healthy_upstream" => {
                    Failure::refused(format!("{}: {e}", e.code()))
                }
                code => Failure::transient(format!("{code}: {e}")),
            })?;
        let status = response.status();
        let bytes = http_body_util::Limited::new(response.into_body(), MAX_OUTPUT)
            .collect()
            .await
            .map_err(|e| Failure::transient(format!("reading the answer failed: {e}")))?
            .to_bytes();
        let output = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if status.is_success() {
            return Ok(output);
        }
        let message = format!("{app} answered {status}: {}", summary(&output));
        let code = status.as_u16();
        if code == 408 || code == 429 || status.is_server_error() {
            Err(Failure::transient(message))
        } else {
            Err(Failure::rejected(message))
        }
    }

    async fn publish(
        &self,
        call: &Call,
        pubsub: &str,
        topic: &str,
        data: &Value,
        event_type: &str,
    ) -> Result<Value, Failure> {
        let ps = self
            .pubsubs
            .get(pubsub)
            .ok_or_else(|| Failure::rejected(format!("no pub/sub component {pubsub:?}")))?;
        let raw =
            serde_json::value::to_raw_value(data).map_err(|e| Failure::rejected(e.to_string()))?;
        let mut event = CloudEvent::new(
            format!("/trellis/sagas/{}", call.saga),
            event_type,
            Some(Data::Json(raw)),
        );
        // The same id on every attempt: the dedupe window drops repeats.
        event.id.clone_from(&call.idempotency_key);
        event.datacontenttype = Some("application/json".into());
        event
            .set_extension("correlationid", Value::String(call.saga_id.clone()))
            .map_err(|e| Failure::rejected(e.to_string()))?;
        ps.publish(topic, vec![event])
            .await
            .map_err(|e| Failure::transient(format!("publish to {pubsub}/{topic} failed: {e}")))?;
        Ok(Value::Null)
    }
}

fn summary(output: &Value) -> String {
    let text = match output {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.len() > 300 {
        let cut = (0..=300)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}…", &text[..cut])
    } else {
        text
    }
}

#[async_trait]
impl Actions for SidecarActions {
    async fn run(&self, call: &Call) -> Result<Value, Failure> {
        match &call.action {
            Rendered::Invoke {
                app,
                method,
                path,
                body,
                headers,
            } => {
                self.invoke(call, app, method, path, body.as_ref(), headers)
                    .await
            }
            Rendered::Publish {
                pubsub,
                topic,
                data,
                event_type,
            } => self.publish(call, pubsub, topic, data, event_type).await,
        }
    }

    fn check(&self, action: &Action) -> Result<(), String> {
        match action {
            Action::Invoke { app, .. } if self.invoker.target(app).is_none() => {
                let known: Vec<&str> = self.invoker.apps().collect();
                Err(format!(
                    "no app {app:?} is configured; apps: {}",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ))
            }
            Action::Publish { pubsub, .. } if !self.pubsubs.contains_key(pubsub) => Err(format!(
                "no pub/sub component {pubsub:?}; components: {}",
                self.pubsubs.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
            _ => Ok(()),
        }
    }
}
