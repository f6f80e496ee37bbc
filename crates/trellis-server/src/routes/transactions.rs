//! `/v1/transactions/...`: two-phase commit across apps, state stores and
//! PostgreSQL databases.
//!
//! `POST /v1/transactions` logs the transaction, prepares every participant, logs
//! the decision, and tells every participant; it answers 200 once all acknowledged,
//! or 202 if phase two is still retrying at the deadline (it goes on in the
//! background, and after a restart). A participant in doubt asks
//! `GET /v1/transactions/{id}`; an unknown id is aborted (presumed abort).

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use trellis_core::config::units;
use trellis_saga::twopc::{TxCoordinator, TxError, TxRequest, TxStatus};

use super::AppState;
use crate::ApiError;
use crate::extract::{Body, Path, Query, parse_json};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/transactions", get(list).post(begin))
        .route("/v1/transactions/{id}", get(get_transaction))
}

impl AppState {
    fn tx_coordinator(&self) -> Result<&TxCoordinator, ApiError> {
        self.transactions.as_deref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "backend_unavailable",
                "no transaction log is open",
            )
        })
    }
}

/// A coordinator error as a problem.
fn tx_error(e: TxError) -> ApiError {
    match e {
        TxError::Invalid(problems) => {
            let code = problems.first().map_or("invalid_body", |p| p.code);
            let detail = problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            let list: Vec<Value> = problems
                .iter()
                .map(|p| json!({"at": p.at, "reason": p.reason, "code": p.code}))
                .collect();
            ApiError::bad_request(code, detail).with_extension("errors", list)
        }
        TxError::NotFound(id) => not_found(&id),
        TxError::Closed => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the sidecar is shutting down",
        )
        .with_retry_after(1),
        other => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "backend_unavailable",
            other.to_string(),
        )
        .with_retry_after(1),
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "transaction_not_found",
        format!(
            "no transaction with id {id:?} (a transaction this sidecar never logged is aborted)"
        ),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BeginRequest {
    /// Each `{"name", "type", ...spec}`.
    participants: Vec<Map<String, Value>>,
    #[serde(default)]
    payload: Value,
    #[serde(default, deserialize_with = "units::option_duration")]
    timeout: Option<std::time::Duration>,
}

/// Run a two-phase-commit transaction. Body: `{participants: [{name, type, ...}],
/// payload?, timeout?}` where each participant is `{"type":"app","app","path"}`,
/// `{"type":"state","store","operations"}` or
/// `{"type":"postgres","component","statements"}`. With an `Idempotency-Key` used
/// before, runs nothing and answers with that transaction.
#[utoipa::path(
    post, path = "/v1/transactions", tag = "transactions",
    params(("Idempotency-Key" = Option<String>, Header, description = "Dedupes retried requests")),
    request_body(content = Value, description = "`{participants: [{name, type, ...}], payload?, timeout?: \"10s\"}`"),
    responses(
        (status = 200, description = "Committed or aborted everywhere: the transaction, with each participant's status"),
        (status = 202, description = "Decided, phase two still retrying (it goes on): the transaction as it is"),
        (status = 400, description = "`malformed_json`, `invalid_body`, `invalid_participant`, `unknown_participant_target`, `invalid_header`; `errors` lists every problem", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`backend_unavailable`, `shutting_down`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn begin(
    State(state): State<AppState>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let coordinator = state.tx_coordinator()?;
    let request: BeginRequest = parse_json(&body)?;
    let key = super::sagas::idempotency_key(&headers)?;
    let mut participants = Vec::with_capacity(request.participants.len());
    for (i, mut spec) in request.participants.into_iter().enumerate() {
        let name = match spec.remove("name") {
            Some(Value::String(name)) => name,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "invalid_participant",
                    format!("participants[{i}].name must be a string"),
                ));
            }
            None => {
                return Err(ApiError::bad_request(
                    "invalid_participant",
                    format!("participants[{i}]: missing name"),
                ));
            }
        };
        participants.push((name, Value::Object(spec)));
    }
    let tx = coordinator
        .begin(
            TxRequest {
                participants,
                payload: request.payload,
                timeout: request.timeout,
            },
            key.as_deref(),
        )
        .await
        .map_err(tx_error)?;
    let status = if tx.status.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let location = format!("/v1/transactions/{}", tx.id);
    Ok((
        status,
        [(axum::http::header::LOCATION, location)],
        axum::Json(tx),
    )
        .into_response())
}

/// A transaction: status, decision, each participant's status, attempts and
/// errors, and its history. 404 for an id this sidecar never logged: such a
/// transaction is aborted (presumed abort).
#[utoipa::path(
    get, path = "/v1/transactions/{id}", tag = "transactions",
    params(("id" = String, Path, description = "Transaction id")),
    responses(
        (status = 200, description = "The transaction"),
        (status = 404, description = "`transaction_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_transaction(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let tx = state
        .tx_coordinator()?
        .get(&id)
        .await
        .map_err(tx_error)?
        .ok_or_else(|| not_found(&id))?;
    Ok(axum::Json(tx).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    status: Option<String>,
    before: Option<String>,
    limit: Option<usize>,
}

/// Transactions, newest first, filtered by `status`; page with `before=<last id>`.
#[utoipa::path(
    get, path = "/v1/transactions", tag = "transactions",
    params(("status" = Option<String>, Query, description = "preparing, committing, aborting, committed or aborted"),
           ("before" = Option<String>, Query, description = "The last id of the previous page"),
           ("limit" = Option<usize>, Query, description = "At most this many (default 100, max 1000)")),
    responses(
        (status = 200, description = "`{transactions: [...], next}`"),
        (status = 400, description = "`invalid_query`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let filter = super::sagas::list_filter(
        query.status,
        query.before,
        query.limit,
        |s| TxStatus::parse(s).is_some(),
        "preparing, committing, aborting, committed, aborted",
    )?;
    let limit = filter.limit;
    let transactions = state
        .tx_coordinator()?
        .list(&filter)
        .await
        .map_err(tx_error)?;
    let next = super::sagas::next_page(&transactions, limit, |t| &t.id);
    Ok(axum::Json(json!({ "transactions": transactions, "next": next })).into_response())
}
