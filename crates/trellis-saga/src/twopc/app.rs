//! The `app` participant: an application taking part over HTTP, through the
//! invoker (so every call gets the app's load balancing and resilience policies).
//!
//! Spec: `{"type":"app","app":"<[apps] id>","path":"/tx"}`. Protocol (see
//! `docs/two-phase-commit.md`):
//! - `POST {path}/prepare` with `{"transaction_id","participant","payload"}` →
//!   200 `{"vote":"commit"}` or `{"vote":"abort","reason":"..."}`; any other
//!   answer (a non-2xx status, a body that is not a vote, a timeout) counts as an
//!   abort vote.
//! - `POST {path}/commit` and `POST {path}/abort` with
//!   `{"transaction_id","participant"}` → any 2xx acks; anything else is retried.
//!
//! Every call carries `Idempotency-Key: {transaction id}:{participant}:{call}` and
//! `Trellis-Transaction-Id`.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use serde::Deserialize;
use serde_json::{Value, json};
use trellis_core::{RequestId, TraceContext};
use trellis_proxy::{Invoker, ProxyBody, forward};

use super::participant::{Participant, ParticipantError, SpecError, TxContext, parse_spec};
use super::state::Vote;

/// Most bytes of an answer read.
const MAX_ANSWER: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    app: String,
    path: String,
}

/// An app taking part over HTTP.
#[derive(Debug)]
pub(crate) struct AppParticipant {
    invoker: Arc<Invoker>,
    app: String,
    /// The path without a trailing `/`.
    base: String,
}

impl AppParticipant {
    pub(crate) fn from_spec(invoker: Arc<Invoker>, spec: &Value) -> Result<Self, SpecError> {
        let Spec { app, path } = parse_spec(spec)?;
        if invoker.target(&app).is_none() {
            let known: Vec<&str> = invoker.apps().collect();
            return Err(SpecError::unknown_target(format!(
                "no app {app:?} is configured; apps: {}",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )));
        }
        let base = path.trim_end_matches('/').to_owned();
        let valid = path.starts_with('/')
            && !path.contains(['?', '#'])
            && format!("{base}/prepare").parse::<http::Uri>().is_ok();
        if !valid {
            return Err(SpecError::invalid(format!(
                "path must be an absolute path without query, such as \"/tx\"; got {path:?}"
            )));
        }
        Ok(Self { invoker, app, base })
    }

    /// POSTs `body` to `{path}/{call}`: the status and the answer's bytes.
    async fn call(
        &self,
        tx: &TxContext,
        call: &str,
        body: &Value,
    ) -> Result<(http::StatusCode, Bytes), ParticipantError> {
        let uri: http::Uri = format!("{}/{call}", self.base)
            .parse()
            .map_err(|_| ParticipantError::new(format!("invalid path {:?}", self.base)))?;
        let payload = serde_json::to_vec(body).map_err(|e| ParticipantError::new(e.to_string()))?;
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(uri)
            .body(ProxyBody::full(Bytes::from(payload)))
            .map_err(|e| ParticipantError::new(format!("invalid request: {e}")))?;
        let h = request.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        for (name, value) in [
            ("idempotency-key", tx.idempotency_key(call)),
            ("trellis-transaction-id", tx.transaction_id.clone()),
        ] {
            if let Ok(value) = http::HeaderValue::from_str(&value) {
                h.insert(http::HeaderName::from_static(name), value);
            }
        }
        forward::outgoing_headers(h, &RequestId::generate(), &TraceContext::new_root());
        let response = self
            .invoker
            .invoke(&self.app, request)
            .await
            .map_err(|e| ParticipantError::new(format!("{}: {e}", e.code())))?;
        let status = response.status();
        let bytes = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| ParticipantError::new(format!("reading the answer failed: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    }

    async fn decide(&self, tx: &TxContext, call: &str) -> Result<(), ParticipantError> {
        let body = json!({"transaction_id": tx.transaction_id, "participant": tx.participant});
        let (status, bytes) = self.call(tx, call, &body).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(ParticipantError::new(format!(
                "{} answered {call} with {status}: {}",
                self.app,
                summary(&bytes)
            )))
        }
    }
}

#[async_trait]
impl Participant for AppParticipant {
    async fn prepare(&self, tx: &TxContext) -> Result<Vote, ParticipantError> {
        let body = json!({
            "transaction_id": tx.transaction_id,
            "participant": tx.participant,
            "payload": tx.payload,
        });
        let (status, bytes) = self.call(tx, "prepare", &body).await?;
        if !status.is_success() {
            return Err(ParticipantError::new(format!(
                "{} answered prepare with {status}: {}",
                self.app,
                summary(&bytes)
            )));
        }
        serde_json::from_slice::<Vote>(&bytes).map_err(|_| {
            ParticipantError::new(format!(
                "{} answered prepare with {status} but no vote \
                 ({{\"vote\":\"commit\"}} or {{\"vote\":\"abort\",\"reason\":...}}): {}",
                self.app,
                summary(&bytes)
            ))
        })
    }

    async fn commit(&self, tx: &TxContext) -> Result<(), ParticipantError> {
        self.decide(tx, "commit").await
    }

    async fn abort(&self, tx: &TxContext) -> Result<(), ParticipantError> {
        self.decide(tx, "abort").await
    }
}

/// The start of an answer, for error messages.
fn summary(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.into_owned(),
    }
}
