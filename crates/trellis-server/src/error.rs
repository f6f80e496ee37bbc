//! The one place errors become HTTP responses: `application/problem+json`
//! (RFC 9457) with a stable machine-readable `code`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use trellis_state::StateError;
use utoipa::ToSchema;

/// A problem+json body: `{"type","title","status","detail","code"}` plus any
/// extension members.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Problem {
    /// `urn:trellis:problem:<code>`.
    #[serde(rename = "type")]
    kind: String,
    /// A short summary of the problem type; the same for every instance of `code`.
    title: &'static str,
    /// The HTTP status code.
    status: u16,
    /// What went wrong this time.
    detail: String,
    /// A stable machine-readable code, e.g. `etag_mismatch`.
    code: &'static str,
    /// Extension members, e.g. `index` and `key` of a transaction conflict.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    extensions: serde_json::Map<String, serde_json::Value>,
}

/// An API error: status, stable code and detail, rendered as problem+json.
///
/// 5xx details are replaced by a generic message in the body (the real cause is
/// logged with the request's id), so internals never leak to clients.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
    retry_after: Option<u64>,
    extensions: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    /// An error with `status`, a stable `code` and a human `detail`.
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
            extensions: serde_json::Map::new(),
        }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    /// 500 `internal`; `cause` is logged, not sent.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            cause.to_string(),
        )
    }

    /// Adds `Retry-After: <seconds>`.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// Adds an extension member to the body.
    pub fn with_extension(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extensions.insert(name.to_owned(), value.into());
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// What went wrong.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

/// Titles per code: stable summaries of each problem type.
fn title(code: &str, status: StatusCode) -> &'static str {
    match code {
        "malformed_json" => "Request body is not valid JSON",
        "invalid_body" => "Request body does not match the expected shape",
        "invalid_key" => "Invalid key",
        "invalid_etag" => "Invalid entity tag",
        "invalid_precondition" => "Invalid combination of preconditions",
        "invalid_ttl" => "Invalid TTL",
        "invalid_query" => "Invalid query parameter",
        "invalid_cursor" => "Invalid pagination cursor",
        "invalid_path" => "Invalid path parameter",
        "invalid_header" => "Invalid header value",
        "too_many_keys" => "Too many keys in one request",
        "too_many_operations" => "Too many operations in one transaction",
        "too_many_messages" => "Too many messages in one transaction",
        "reserved_key" => "The key is reserved for Trellis",
        "missing_token" => "Authentication required",
        "invalid_token" => "Invalid bearer token",
        "store_not_found" => "No such state store",
        "key_not_found" => "Key not found",
        "route_not_found" => "No such route",
        "method_not_allowed" => "Method not allowed on this route",
        "transaction_conflict" => "A transaction precondition failed",
        "key_locked" => "The key is held by a prepared two-phase-commit transaction",
        "etag_mismatch" => "The entity tag does not match",
        "key_exists" => "The key already exists",
        "payload_too_large" => "Request body too large",
        "backend_unavailable" => "A backend is unavailable",
        "not_ready" => "Not ready",
        "app_not_found" => "No such app",
        "no_healthy_upstream" => "No healthy instance",
        "circuit_open" => "Circuit breaker open",
        "bulkhead_full" => "Bulkhead full",
        "rate_limited" => "Rate limit exceeded",
        "upstream_timeout" => "Upstream timed out",
        "upstream_unavailable" => "Upstream unavailable",
        "fault_injected" => "Fault injected",
        "fault_not_found" => "No such fault injector",
        "invalid_fault" => "Invalid fault settings",
        "breaker_not_found" => "No such circuit breaker",
        "pubsub_not_found" => "No such pub/sub component",
        "invalid_topic" => "Invalid topic name",
        "invalid_group" => "Invalid consumer group name",
        "invalid_event" => "Invalid event",
        "ack_id_not_found" => "Unknown ack id",
        "ack_id_expired" => "Ack id no longer current",
        "subscription_not_found" => "No such subscription",
        "invalid_subscription" => "Invalid subscription",
        "subscription_in_config" => "Subscription declared in the config file",
        "subscription_conflict" => "The subscription group follows another stream",
        "eventstore_not_found" => "No such event store",
        "projection_not_found" => "No such projection",
        "lock_held" => "The lock is held by someone else",
        "not_elected" => "Not elected",
        "not_lock_holder" => "Not the lock's holder",
        "not_leader" => "Not the leader",
        "election_not_found" => "No such election",
        "invalid_name" => "Invalid name",
        "stale_fencing_token" => "A newer fencing token has been issued",
        "invalid_fencing_token" => "Invalid Trellis-Fencing header",
        "invalid_stream" => "Invalid stream name",
        "stream_not_found" => "Stream not found",
        "stream_deleted" => "Stream deleted",
        "wrong_expected_version" => "The stream is not at the expected version",
        "duplicate_event_id" => "Event id already stored",
        "unknown_shard_map" => "No such shard map",
        "missing_shard_key" => "Shard key missing",
        "no_shard_map" => "No shard map bound to the app",
        "shard_map_empty" => "The shard map has no members",
        "shard_owner_unavailable" => "The shard's owner is unavailable",
        "shard_members_managed" => "The shard map's members are managed elsewhere",
        "invalid_members" => "Invalid shard map members",
        "instance_unavailable" => "The requested instance is unavailable",
        "internal" => "Internal error",
        _ => status.canonical_reason().unwrap_or("Error"),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let detail = if self.status.is_server_error() && self.code == "internal" {
            "internal error; the server log has details under this request's X-Request-Id"
                .to_owned()
        } else {
            self.detail.clone()
        };
        let problem = Problem {
            kind: format!("urn:trellis:problem:{}", self.code),
            title: title(self.code, self.status),
            status: self.status.as_u16(),
            detail,
            code: self.code,
            extensions: self.extensions.clone(),
        };
        let body = serde_json::to_vec(&problem).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        // The request-context middleware logs it with the request's span.
        response.extensions_mut().insert(LoggedError {
            code: self.code,
            detail: self.detail,
        });
        response
    }
}

/// Attached to error responses so the middleware that owns the request span logs
/// the cause (including 5xx details hidden from the body).
#[derive(Debug, Clone)]
pub(crate) struct LoggedError {
    pub(crate) code: &'static str,
    pub(crate) detail: String,
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::EtagMismatch { key } => Self::new(
                StatusCode::PRECONDITION_FAILED,
                "etag_mismatch",
                format!("key {key:?} does not exist with the given etag"),
            ),
            StateError::KeyExists { key } => Self::new(
                StatusCode::PRECONDITION_FAILED,
                "key_exists",
                format!("key {key:?} already exists"),
            ),
            StateError::TransactionConflict { index, key, reason } => Self::new(
                StatusCode::CONFLICT,
                "transaction_conflict",
                format!(
                    "operation {index} failed its precondition ({reason}); nothing was applied"
                ),
            )
            .with_extension("index", index)
            .with_extension("key", key),
            StateError::Unavailable { backend, source } => {
                use trellis_resilience::error::{BulkheadFull, CircuitOpen, cause_ref};
                let detail = format!("{backend} backend unavailable: {source}");
                let (code, retry_after) = if let Some(open) = cause_ref::<CircuitOpen>(&*source) {
                    ("circuit_open", open.retry_after)
                } else if let Some(full) = cause_ref::<BulkheadFull>(&*source) {
                    ("bulkhead_full", full.retry_after)
                } else {
                    ("backend_unavailable", std::time::Duration::from_secs(1))
                };
                Self::new(StatusCode::SERVICE_UNAVAILABLE, code, detail)
                    .with_retry_after(retry_after.as_secs().max(1))
            }
            e => Self::internal(e),
        }
    }
}
