//! `/v1/state/{store}/...`: the state store over HTTP.

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use trellis_state::{
    ETag, Item, Key, MAX_TTL, Operation, Page, Precondition, StateError, StateStore, Value,
    WriteOptions,
};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use crate::ApiError;
use crate::context::RequestContext;
use crate::extract::{Body, Json, Query};
use crate::outbox::{self, Message};

/// Most keys in one bulk get.
pub(crate) const MAX_BULK_KEYS: usize = 1000;
/// Most operations in one transaction.
pub(crate) const MAX_OPERATIONS: usize = 1000;
/// Default and largest page of a key listing.
const DEFAULT_LIST_LIMIT: usize = 100;
const MAX_LIST_LIMIT: usize = 1000;
/// Longest accepted `Content-Type`.
const MAX_CONTENT_TYPE_LEN: usize = 256;
const OCTET_STREAM: &str = "application/octet-stream";

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/state/{store}", get(list_keys))
        .route("/v1/state/{store}/", any(empty_key))
        // `bulk` and `transaction` are also valid keys: their static routes serve
        // the key methods too, so no key is unreachable.
        .route(
            "/v1/state/{store}/bulk",
            post(bulk_get).get(get_key).put(put_key).delete(delete_key),
        )
        .route(
            "/v1/state/{store}/transaction",
            post(transaction)
                .get(get_key)
                .put(put_key)
                .delete(delete_key),
        )
        .route(
            "/v1/state/{store}/{*key}",
            get(get_key).put(put_key).delete(delete_key),
        )
}

// === request pieces ===

/// `{store}` and `{*key}` of a key route. Keys may contain `/`; a key that is not
/// valid (bad UTF-8 after percent-decoding, control characters, over 1024 bytes)
/// is `invalid_key`, one in the reserved `__trellis/` space `reserved_key`.
#[derive(Debug)]
pub(crate) struct KeyPath {
    store: String,
    key: Key,
}

impl<S: Send + Sync> FromRequestParts<S> for KeyPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let params =
            axum::extract::Path::<HashMap<String, String>>::from_request_parts(parts, state)
                .await
                .map_err(|rejection| ApiError::bad_request("invalid_key", rejection.body_text()))?;
        let store = params.get("store").cloned().unwrap_or_default();
        // The static routes (`.../bulk`, `.../transaction`) have no `key` parameter:
        // the key is their last segment.
        let key = match params.get("key") {
            Some(key) => key.clone(),
            None => parts
                .uri
                .path()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned(),
        };
        let key = Key::new(key).map_err(|e| ApiError::bad_request("invalid_key", e.to_string()))?;
        if outbox::is_reserved(key.as_str()) {
            return Err(reserved_key(key.as_str(), "the key"));
        }
        Ok(Self { store, key })
    }
}

/// `?ttl=` of a write.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct WriteQuery {
    /// Time to live in seconds (1 to 315360000, i.e. ten years).
    #[param(value_type = Option<u64>)]
    ttl: Option<String>,
}

/// `?prefix=&limit=&cursor=` of a listing.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    /// Only keys starting with this.
    prefix: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[param(value_type = Option<u32>)]
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

fn parse_ttl(ttl: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let Some(ttl) = ttl else { return Ok(None) };
    let secs: u64 = ttl.trim().parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_ttl",
            format!("ttl must be a whole number of seconds, got {ttl:?}"),
        )
    })?;
    check_ttl(secs).map(Some)
}

fn check_ttl(secs: u64) -> Result<Duration, ApiError> {
    if secs == 0 || secs > MAX_TTL.as_secs() {
        return Err(ApiError::bad_request(
            "invalid_ttl",
            format!(
                "ttl must be between 1 and {} seconds, got {secs}",
                MAX_TTL.as_secs()
            ),
        ));
    }
    Ok(Duration::from_secs(secs))
}

/// The one value of header `name`, if present; repeated headers are ambiguous.
fn single_header<'a>(
    headers: &'a HeaderMap,
    name: &header::HeaderName,
) -> Result<Option<&'a str>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "invalid_etag",
            format!("{name} given more than once"),
        ));
    }
    first
        .to_str()
        .map(Some)
        .map_err(|_| ApiError::bad_request("invalid_etag", format!("{name} is not visible ASCII")))
}

/// `If-Match` / `If-None-Match` → the write's precondition.
fn precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    let if_match = single_header(headers, &header::IF_MATCH)?;
    let if_none_match = single_header(headers, &header::IF_NONE_MATCH)?;
    match (if_match, if_none_match) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "invalid_precondition",
            "use either If-Match or If-None-Match, not both",
        )),
        (Some(v), None) if v.trim() == "*" => Ok(Precondition::IfExists),
        (Some(v), None) => parse_header_etag(v).map(Precondition::IfMatch),
        (None, Some(v)) if v.trim() == "*" => Ok(Precondition::IfAbsent),
        (None, Some(v)) => Err(ApiError::bad_request(
            "invalid_etag",
            format!("only If-None-Match: * (create-only) is supported on writes, got {v:?}"),
        )),
        (None, None) => Ok(Precondition::None),
    }
}

/// A strong entity tag as sent in a header: `"<etagc>"`.
fn parse_header_etag(v: &str) -> Result<ETag, ApiError> {
    let v = v.trim();
    if v.starts_with("W/") {
        return Err(ApiError::bad_request(
            "invalid_etag",
            "weak entity tags cannot be used for compare-and-set; send the strong ETag",
        ));
    }
    let inner = v
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_etag",
                format!("expected a quoted entity tag such as \"17\", got {v:?}"),
            )
        })?;
    parse_etag_text(inner)
}

/// An entity tag's text: 1–128 `etagc` characters (visible ASCII except `"`).
fn parse_etag_text(text: &str) -> Result<ETag, ApiError> {
    let valid = !text.is_empty()
        && text.len() <= 128
        && text.bytes().all(|b| b.is_ascii_graphic() && b != b'"');
    if valid {
        Ok(ETag::new(text))
    } else {
        Err(ApiError::bad_request(
            "invalid_etag",
            format!("invalid entity tag {text:?}"),
        ))
    }
}

/// An etag in a JSON body: `"17"`, or the header form `"\"17\""`.
fn parse_json_etag(text: &str) -> Result<ETag, ApiError> {
    match text.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) => parse_etag_text(inner),
        None => parse_etag_text(text),
    }
}

fn etag_header(etag: &ETag) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("\"{etag}\"")).ok()
}

fn content_type(headers: &HeaderMap) -> Result<String, ApiError> {
    match headers.get(header::CONTENT_TYPE) {
        None => Ok(OCTET_STREAM.to_owned()),
        Some(v) => {
            let text = v.to_str().ok().filter(|t| !t.is_empty() && t.len() <= MAX_CONTENT_TYPE_LEN).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_header",
                    format!("Content-Type must be 1-{MAX_CONTENT_TYPE_LEN} characters of visible ASCII"),
                )
            })?;
            Ok(text.to_owned())
        }
    }
}

// === JSON values ===

/// A value inside a JSON body: any JSON document (stored as `application/json`), or
/// `{"value_base64": "..."}` for raw bytes.
fn value_from_json(
    raw: &RawValue,
    content_type: Option<&str>,
    at: &str,
) -> Result<Value, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Base64Value {
        value_base64: String,
    }
    if let Ok(Base64Value { value_base64 }) = serde_json::from_str::<Base64Value>(raw.get()) {
        let data = STANDARD.decode(value_base64.as_bytes()).map_err(|e| {
            ApiError::bad_request(
                "invalid_body",
                format!("{at}.value_base64 is not valid base64: {e}"),
            )
        })?;
        return Ok(Value::new(data, content_type.unwrap_or(OCTET_STREAM)));
    }
    Ok(Value::new(
        raw.get().as_bytes().to_vec(),
        content_type.unwrap_or("application/json"),
    ))
}

/// A stored value in a JSON response: JSON documents inline, anything else as
/// `{"value_base64": "..."}`.
fn value_to_json(value: &Value) -> Box<RawValue> {
    let is_json = {
        let ct = value
            .content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        ct == "application/json" || ct.ends_with("+json")
    };
    if is_json && let Ok(raw) = serde_json::from_slice::<Box<RawValue>>(&value.data) {
        return raw;
    }
    let wrapped = serde_json::json!({ "value_base64": STANDARD.encode(&value.data) });
    serde_json::value::to_raw_value(&wrapped).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// Deserializes a present field, `null` included, as `Some`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

// === handlers ===

/// Read a key.
#[utoipa::path(
    get, path = "/v1/state/{store}/{key}", tag = "state",
    params(("store" = String, Path, description = "State store name"), ("key" = String, Path, description = "Key; may contain `/`")),
    responses(
        (status = 200, description = "The value, with the Content-Type it was written with", headers(("ETag" = String, description = "Quoted etag"))),
        (status = 404, description = "`key_not_found` (also for expired keys) or `store_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_key(
    State(app): State<AppState>,
    path: KeyPath,
) -> Result<Response, ApiError> {
    let store = app.store(&path.store)?;
    let Some(Item { value, etag }) = store.get(&path.key).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "key_not_found",
            format!("no key {:?} in store {:?}", path.key.as_str(), path.store),
        ));
    };
    let mut response = value.data.into_response();
    let headers = response.headers_mut();
    if let Ok(ct) = HeaderValue::from_str(&value.content_type) {
        headers.insert(header::CONTENT_TYPE, ct);
    }
    if let Some(etag) = etag_header(&etag) {
        headers.insert(header::ETAG, etag);
    }
    Ok(response)
}

/// Write a key. The body is the value, stored verbatim with its Content-Type.
#[utoipa::path(
    put, path = "/v1/state/{store}/{key}", tag = "state",
    params(
        ("store" = String, Path, description = "State store name"),
        ("key" = String, Path, description = "Key; may contain `/`"),
        ("If-Match" = Option<String>, Header, description = "`\"<etag>\"`: compare-and-set; `*`: only if the key exists"),
        ("If-None-Match" = Option<String>, Header, description = "`*`: create only"),
        WriteQuery,
    ),
    request_body(content = Vec<u8>, content_type = "*/*", description = "The value"),
    responses(
        (status = 204, description = "Written and durable", headers(("ETag" = String, description = "The new quoted etag"))),
        (status = 400, description = "`invalid_key`, `invalid_etag`, `invalid_ttl`, ...", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 412, description = "`etag_mismatch` or `key_exists`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn put_key(
    State(app): State<AppState>,
    path: KeyPath,
    Query(query): Query<WriteQuery>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let store = app.store(&path.store)?;
    let options = WriteOptions {
        precondition: precondition(&headers)?,
        ttl: parse_ttl(query.ttl.as_deref())?,
    };
    let value = Value::new(body, content_type(&headers)?);
    let _writing = begin_write(&app, &path.store, &[path.key.as_str().to_owned()])?;
    let etag = match super::fencing::fence_of(&headers)? {
        None => store.set(&path.key, value, options).await?,
        Some(fence) => {
            let write = Operation::Upsert {
                key: path.key.clone(),
                value,
                options,
            };
            super::fencing::single(&app, store, &fence, write)
                .await?
                .ok_or_else(|| ApiError::internal("a fenced write returned no etag"))?
        }
    };
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Some(etag) = etag_header(&etag) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    Ok(response)
}

/// Delete a key. Deleting an absent key succeeds unless `If-Match` is given.
#[utoipa::path(
    delete, path = "/v1/state/{store}/{key}", tag = "state",
    params(
        ("store" = String, Path, description = "State store name"),
        ("key" = String, Path, description = "Key; may contain `/`"),
        ("If-Match" = Option<String>, Header, description = "`\"<etag>\"` or `*`"),
    ),
    responses(
        (status = 204, description = "Deleted (or was absent)"),
        (status = 412, description = "`etag_mismatch`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn delete_key(
    State(app): State<AppState>,
    path: KeyPath,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let store = app.store(&path.store)?;
    let precondition = precondition(&headers)?;
    let _writing = begin_write(&app, &path.store, &[path.key.as_str().to_owned()])?;
    match super::fencing::fence_of(&headers)? {
        None => {
            store.delete(&path.key, precondition).await?;
        }
        Some(fence) => {
            let delete = Operation::Delete {
                key: path.key.clone(),
                precondition,
            };
            super::fencing::single(&app, store, &fence, delete).await?;
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn empty_key() -> ApiError {
    ApiError::bad_request("invalid_key", "key must not be empty")
}

/// Body of a bulk get.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkRequest {
    /// Up to 1000 keys.
    keys: Vec<String>,
}

/// One key of a bulk get.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BulkItem {
    key: String,
    found: bool,
    /// A JSON document, or `{"value_base64": "..."}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    value: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
}

/// Result of a bulk get.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BulkResponse {
    /// In request order.
    items: Vec<BulkItem>,
}

/// A key a user may read and write: valid, and outside the reserved `__trellis/`
/// space.
fn validate_key(key: String, at: impl std::fmt::Display) -> Result<Key, ApiError> {
    let key =
        Key::new(key).map_err(|e| ApiError::bad_request("invalid_key", format!("{at}: {e}")))?;
    if outbox::is_reserved(key.as_str()) {
        return Err(reserved_key(key.as_str(), at));
    }
    Ok(key)
}

fn reserved_key(key: &str, at: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(
        "reserved_key",
        format!(
            "{at}: keys starting with {:?} are reserved for Trellis, got {key:?}",
            outbox::RESERVED_PREFIX
        ),
    )
}

/// Read several keys at once.
#[utoipa::path(
    post, path = "/v1/state/{store}/bulk", tag = "state",
    params(("store" = String, Path, description = "State store name")),
    request_body = BulkRequest,
    responses(
        (status = 200, body = BulkResponse),
        (status = 400, description = "`malformed_json`, `invalid_body`, `invalid_key`, `too_many_keys`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn bulk_get(
    State(app): State<AppState>,
    crate::extract::Path(store): crate::extract::Path<String>,
    Json(request): Json<BulkRequest>,
) -> Result<axum::Json<BulkResponse>, ApiError> {
    let store = app.store(&store)?;
    if request.keys.len() > MAX_BULK_KEYS {
        return Err(ApiError::bad_request(
            "too_many_keys",
            format!(
                "{} keys requested; the limit is {MAX_BULK_KEYS}",
                request.keys.len()
            ),
        ));
    }
    let keys = request
        .keys
        .into_iter()
        .enumerate()
        .map(|(i, k)| validate_key(k, format_args!("keys[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let found = store.bulk_get(&keys).await?;
    let items = keys
        .into_iter()
        .zip(found)
        .map(|(key, item)| match item {
            Some(Item { value, etag }) => BulkItem {
                key: key.as_str().to_owned(),
                found: true,
                value: Some(value_to_json(&value)),
                content_type: Some(value.content_type),
                etag: Some(etag.to_string()),
            },
            None => BulkItem {
                key: key.as_str().to_owned(),
                found: false,
                value: None,
                content_type: None,
                etag: None,
            },
        })
        .collect();
    Ok(axum::Json(BulkResponse { items }))
}

/// Body of a transaction.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TransactionRequest {
    /// Up to 1000 operations, applied all or nothing, in order.
    operations: Vec<OperationRequest>,
    /// Up to 100 messages to publish if and only if the operations commit (the
    /// transactional outbox). They are stored in the same atomic write as the
    /// operations, under reserved keys `__trellis/outbox/<id>`, and relayed to
    /// pub/sub afterwards, at least once, with the id (returned in `published`) as
    /// the CloudEvent `id`, so the pub/sub dedupe window removes relay duplicates.
    #[serde(default)]
    publish: Vec<PublishRequest>,
}

/// A message a transaction publishes (transactional outbox). The event gets the
/// outbox id as `id`, the commit time as `time`, and the request's `X-Request-Id`
/// as `correlationid` unless `correlation_id` is given.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishRequest {
    /// The pub/sub component.
    pubsub: String,
    /// The topic: 1-249 of `A-Z a-z 0-9 . _ -`.
    topic: String,
    /// The event data: any JSON document (`null` included).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Object>)]
    data: Option<Box<RawValue>>,
    /// Binary event data, base64 (instead of `data`).
    data_base64: Option<String>,
    /// The CloudEvent `type` (default `trellis.<topic>`).
    #[serde(rename = "type")]
    ty: Option<String>,
    /// The CloudEvent `source` (default `/trellis/outbox/<store>`).
    source: Option<String>,
    /// The CloudEvent `subject`.
    subject: Option<String>,
    /// The CloudEvent `datacontenttype`.
    datacontenttype: Option<String>,
    /// The CloudEvent `dataschema`.
    dataschema: Option<String>,
    /// The ordering key (the `partitionkey` extension), as on a publish.
    ordering_key: Option<String>,
    /// The `correlationid` extension (default: the request's `X-Request-Id`).
    correlation_id: Option<String>,
}

/// One operation of a transaction.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct OperationRequest {
    op: OpKind,
    key: String,
    /// For `upsert`: a JSON document, or `{"value_base64": "..."}`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Object>)]
    value: Option<Box<RawValue>>,
    /// Compare-and-set against this etag.
    etag: Option<String>,
    /// For `upsert`: time to live in seconds.
    ttl: Option<u64>,
    /// For `upsert`: overrides the stored content type.
    content_type: Option<String>,
}

/// What an operation does.
///
/// Deserialized through `String` so that a non-string `op` is reported as a wrong
/// type (`invalid_body`), not as a JSON syntax error, which is what serde_json says
/// for an enum given a number.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(try_from = "String")]
pub(crate) enum OpKind {
    /// Insert or replace.
    Upsert,
    /// Delete.
    Delete,
}

impl TryFrom<String> for OpKind {
    type Error = String;

    fn try_from(op: String) -> Result<Self, String> {
        match op.as_str() {
            "upsert" => Ok(Self::Upsert),
            "delete" => Ok(Self::Delete),
            other => Err(format!(
                "unknown op {other:?}, expected \"upsert\" or \"delete\""
            )),
        }
    }
}

/// Result of a committed transaction.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TransactionResponse {
    /// Per operation, in order: the key and, for upserts, its new etag.
    results: Vec<OperationResult>,
    /// The ids of the messages of `publish`, in order (each is its CloudEvent `id`).
    published: Vec<String>,
}

/// One operation's result.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct OperationResult {
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
}

fn operation(index: usize, op: OperationRequest) -> Result<Operation, ApiError> {
    let at = format!("operations[{index}]");
    let key = validate_key(op.key, &at)?;
    let precondition = match op.etag.as_deref() {
        Some(etag) => Precondition::IfMatch(parse_json_etag(etag)?),
        None => Precondition::None,
    };
    match op.op {
        OpKind::Upsert => {
            let raw = op.value.ok_or_else(|| {
                ApiError::bad_request("invalid_body", format!("{at}: an upsert needs a value"))
            })?;
            let valid_type = |ct: &String| {
                !ct.is_empty()
                    && ct.len() <= MAX_CONTENT_TYPE_LEN
                    && ct.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
            };
            if op.content_type.as_ref().is_some_and(|ct| !valid_type(ct)) {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    format!("{at}.content_type is not a valid media type"),
                ));
            }
            let value = value_from_json(&raw, op.content_type.as_deref(), &format!("{at}.value"))?;
            let ttl = op.ttl.map(check_ttl).transpose()?;
            Ok(Operation::Upsert {
                key,
                value,
                options: WriteOptions { precondition, ttl },
            })
        }
        OpKind::Delete => {
            if op.value.is_some() || op.ttl.is_some() || op.content_type.is_some() {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    format!("{at}: a delete takes only key and etag"),
                ));
            }
            Ok(Operation::Delete { key, precondition })
        }
    }
}

/// An outbox message of a transaction, validated as the publish route would: the
/// component exists, the topic is valid, the event can be built and is not too
/// large.
fn outbox_message(
    app: &AppState,
    store: &str,
    index: usize,
    request: PublishRequest,
    ctx: Option<&RequestContext>,
) -> Result<(Message, Operation), ApiError> {
    let at = |e: ApiError| e.with_extension("index", index);
    app.pubsub(&request.pubsub).map_err(at)?;
    trellis_pubsub::check_topic(&request.topic).map_err(|e| at(e.into()))?;
    let message = Message {
        id: outbox::new_id(),
        ty: request
            .ty
            .unwrap_or_else(|| format!("trellis.{}", request.topic)),
        source: request
            .source
            .unwrap_or_else(|| format!("/trellis/outbox/{store}")),
        pubsub: request.pubsub,
        topic: request.topic,
        data: request.data,
        data_base64: request.data_base64,
        datacontenttype: request.datacontenttype,
        dataschema: request.dataschema,
        subject: request.subject,
        ordering_key: request.ordering_key,
        correlation_id: request
            .correlation_id
            .or_else(|| ctx.map(|c| c.request_id.as_str().to_owned())),
        traceparent: ctx.map(|c| c.trace.to_string()),
        created: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
    };
    message.event().map_err(|e| {
        at(ApiError::bad_request(
            "invalid_event",
            format!("publish[{index}]: {e}"),
        ))
    })?;
    let bytes = message.encode().map_err(ApiError::internal)?;
    if bytes.len() > outbox::MAX_MESSAGE_BYTES {
        return Err(at(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "publish[{index}] is {} bytes stored; the limit is {}",
                bytes.len(),
                outbox::MAX_MESSAGE_BYTES
            ),
        )));
    }
    let key = message.key().map_err(ApiError::internal)?;
    let upsert = Operation::Upsert {
        key,
        value: Value::new(bytes, "application/json"),
        options: WriteOptions::default(),
    };
    Ok((message, upsert))
}

/// Apply several writes atomically: all or nothing. With `publish`, also store
/// messages in the same atomic write (transactional outbox): they are published
/// at least once if and only if the writes commit.
#[utoipa::path(
    post, path = "/v1/state/{store}/transaction", tag = "state",
    params(("store" = String, Path, description = "State store name")),
    request_body = TransactionRequest,
    responses(
        (status = 200, description = "Committed; messages in `published` will be relayed", body = TransactionResponse),
        (status = 400, description = "`malformed_json`, `invalid_body`, `invalid_key`, `reserved_key`, `invalid_etag`, `invalid_ttl`, `too_many_operations`, `too_many_messages`, `invalid_topic`, `invalid_event` (with `index` of the message); nothing was applied", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`store_not_found`, `pubsub_not_found` (with `index`); nothing was applied", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`transaction_conflict`: the problem names `index` and `key`; nothing was applied. `key_locked`: a prepared 2PC transaction holds a key (Retry-After)", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body, or a message (with `index`) over 256 KiB stored", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn transaction(
    State(app): State<AppState>,
    crate::extract::Path(store_name): crate::extract::Path<String>,
    ctx: Option<axum::Extension<RequestContext>>,
    headers: HeaderMap,
    Json(request): Json<TransactionRequest>,
) -> Result<axum::Json<TransactionResponse>, ApiError> {
    let store = app.store(&store_name)?;
    if request.operations.len() > MAX_OPERATIONS {
        return Err(ApiError::bad_request(
            "too_many_operations",
            format!(
                "{} operations; the limit is {MAX_OPERATIONS}",
                request.operations.len()
            ),
        ));
    }
    if request.publish.len() > outbox::MAX_MESSAGES {
        return Err(ApiError::bad_request(
            "too_many_messages",
            format!(
                "{} messages to publish; the limit is {}",
                request.publish.len(),
                outbox::MAX_MESSAGES
            ),
        ));
    }
    let mut operations = request
        .operations
        .into_iter()
        .enumerate()
        .map(|(i, op)| operation(i, op))
        .collect::<Result<Vec<_>, _>>()?;
    let keys: Vec<String> = operations
        .iter()
        .map(|op| op.key().as_str().to_owned())
        .collect();
    let ctx = ctx.map(|axum::Extension(ctx)| ctx);
    let mut published = Vec::with_capacity(request.publish.len());
    for (i, message) in request.publish.into_iter().enumerate() {
        let (message, upsert) = outbox_message(&app, &store_name, i, message, ctx.as_ref())?;
        published.push(message.id);
        operations.push(upsert);
    }
    let _writing = begin_write(&app, &store_name, &keys)?;
    // The messages' upserts come after the caller's operations, so a conflict's
    // `index` is still the caller's.
    let etags = match super::fencing::fence_of(&headers)? {
        None => store.transact(operations).await?,
        Some(fence) => super::fencing::transact(&app, store, &fence, operations).await?,
    };
    if !published.is_empty() {
        app.outbox.notify(&store_name);
    }
    let results = keys
        .into_iter()
        .zip(etags)
        .map(|(key, etag)| OperationResult {
            key,
            etag: etag.map(|e| e.to_string()),
        })
        .collect();
    Ok(axum::Json(TransactionResponse { results, published }))
}

/// A page of keys.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct KeyPage {
    /// In ascending byte order.
    keys: Vec<String>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// List keys, optionally by prefix, a page at a time.
#[utoipa::path(
    get, path = "/v1/state/{store}", tag = "state",
    params(("store" = String, Path, description = "State store name"), ListQuery),
    responses(
        (status = 200, body = KeyPage),
        (status = 400, description = "`invalid_query`, `invalid_cursor`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list_keys(
    State(app): State<AppState>,
    crate::extract::Path(store): crate::extract::Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<axum::Json<KeyPage>, ApiError> {
    let store = app.store(&store)?;
    let limit = match query.limit.as_deref() {
        None => DEFAULT_LIST_LIMIT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIST_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("limit must be 1 to {MAX_LIST_LIMIT}, got {text:?}"),
                )
            })?,
    };
    let after = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(cursor) => Some(decode_cursor(cursor)?),
    };
    let prefix = query.prefix.unwrap_or_default();
    let page = list_visible(store.as_ref(), &prefix, after, limit).await?;
    Ok(axum::Json(KeyPage {
        keys: page.keys.iter().map(|k| k.as_str().to_owned()).collect(),
        next_cursor: page
            .next
            .as_ref()
            .map(|k| URL_SAFE_NO_PAD.encode(k.as_str())),
    }))
}

/// Most store round trips of one listing spent skipping reserved keys; the page
/// may then hold fewer than `limit` keys, with a `next_cursor`.
const MAX_LIST_ROUNDS: usize = 8;

/// A page of the keys users may see: the store's listing without the reserved
/// `__trellis/` keys, whose range is skipped in one step.
async fn list_visible(
    store: &dyn StateStore,
    prefix: &str,
    mut after: Option<Key>,
    limit: usize,
) -> Result<Page, StateError> {
    if outbox::is_reserved(prefix) {
        return Ok(Page::default());
    }
    let mut keys = Vec::new();
    for _ in 0..MAX_LIST_ROUNDS {
        let page = store
            .list(prefix, after.as_ref(), limit - keys.len())
            .await?;
        keys.extend(
            page.keys
                .into_iter()
                .filter(|k| !outbox::is_reserved(k.as_str())),
        );
        let Some(next) = page.next else {
            return Ok(Page { keys, next: None });
        };
        // Reserved keys sort together: past the last one seen, skip the rest.
        after = if outbox::is_reserved(next.as_str()) {
            outbox::past_reserved()
                .filter(|past| *past > next)
                .or(Some(next))
        } else {
            Some(next)
        };
        if keys.len() >= limit {
            break;
        }
    }
    Ok(Page { keys, next: after })
}

fn decode_cursor(cursor: &str) -> Result<Key, ApiError> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| Key::new(text).ok())
        .ok_or_else(|| {
            ApiError::bad_request("invalid_cursor", "cursor is not one this API returned")
        })
}

/// Marks a plain write of `keys` as in progress, so that a two-phase-commit prepare
/// can't lock them meanwhile; refused while a prepared transaction holds one of them
/// (its outcome decides the key's next value).
fn begin_write(
    app: &AppState,
    store: &str,
    keys: &[String],
) -> Result<trellis_saga::twopc::locks::WriteGuard, ApiError> {
    app.key_locks.begin_write(store, keys).map_err(|e| {
        ApiError::new(StatusCode::CONFLICT, "key_locked", e.to_string())
            .with_extension("key", e.key)
            .with_extension("transaction", e.holder.unwrap_or_default())
            .with_retry_after(1)
    })
}

#[cfg(test)]
mod test {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        map
    }

    #[test]
    fn preconditions_from_headers() {
        let p = |pairs: &[(&str, &str)]| precondition(&headers(pairs));
        assert_eq!(p(&[]).expect("none"), Precondition::None);
        assert_eq!(
            p(&[("if-match", "\"17\"")]).expect("cas"),
            Precondition::IfMatch(ETag::new("17"))
        );
        assert_eq!(
            p(&[("if-match", "*")]).expect("exists"),
            Precondition::IfExists
        );
        assert_eq!(
            p(&[("if-none-match", "*")]).expect("absent"),
            Precondition::IfAbsent
        );
        for bad in [
            vec![("if-match", "17")],
            vec![("if-match", "W/\"17\"")],
            vec![("if-match", "\"\"")],
            vec![("if-match", "\"a\"b\"")],
            vec![("if-match", "\"1\""), ("if-match", "\"2\"")],
            vec![("if-none-match", "\"17\"")],
        ] {
            assert_eq!(
                p(&bad).expect_err("invalid").code(),
                "invalid_etag",
                "{bad:?}"
            );
        }
        let both = p(&[("if-match", "*"), ("if-none-match", "*")]).expect_err("both");
        assert_eq!(both.code(), "invalid_precondition");
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl(None).expect("none"), None);
        assert_eq!(
            parse_ttl(Some("60")).expect("60"),
            Some(Duration::from_secs(60))
        );
        for bad in [
            "0",
            "-1",
            "1.5",
            "abc",
            "",
            "315360001",
            "99999999999999999999",
        ] {
            assert_eq!(
                parse_ttl(Some(bad)).expect_err(bad).code(),
                "invalid_ttl",
                "{bad}"
            );
        }
    }

    #[test]
    fn json_values_round_trip() {
        let raw = |s: &str| serde_json::from_str::<Box<RawValue>>(s).expect("json");
        let v = value_from_json(&raw(r#"{"b": 2, "a": [1]}"#), None, "v").expect("json value");
        assert_eq!(
            (&v.data[..], v.content_type.as_str()),
            (&br#"{"b": 2, "a": [1]}"#[..], "application/json")
        );
        assert_eq!(value_to_json(&v).get(), r#"{"b": 2, "a": [1]}"#);

        let v = value_from_json(&raw(r#"{"value_base64": "AP8="}"#), None, "v").expect("bytes");
        assert_eq!(
            (&v.data[..], v.content_type.as_str()),
            (&[0u8, 255][..], OCTET_STREAM)
        );
        assert_eq!(value_to_json(&v).get(), r#"{"value_base64":"AP8="}"#);

        let err =
            value_from_json(&raw(r#"{"value_base64": "!!"}"#), None, "v").expect_err("bad base64");
        assert_eq!(err.code(), "invalid_body");

        // Text that claims to be JSON but isn't comes back as base64, never as broken JSON.
        let broken = Value::new(&b"{not json"[..], "application/json");
        assert!(value_to_json(&broken).get().contains("value_base64"));
    }

    #[tokio::test]
    async fn listings_hide_reserved_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            trellis_state::EmbeddedStore::open(dir.path().join("s.redb"), Default::default())
                .expect("open");
        let mut keys = vec![
            "_a".to_owned(),
            "__trellis".into(),
            "__trellis/x".into(),
            "__trellis0".into(),
            "a".into(),
            "b".into(),
        ];
        keys.extend((0..30).map(|i| format!("__trellis/outbox/{i:02}")));
        for key in &keys {
            store
                .set(
                    &Key::new(key.as_str()).expect("key"),
                    Value::json("1"),
                    WriteOptions::default(),
                )
                .await
                .expect("set");
        }
        for limit in 1..=4 {
            let mut seen = Vec::new();
            let mut after = None;
            for _ in 0..20 {
                let page = list_visible(&store, "", after, limit).await.expect("list");
                assert!(page.keys.len() <= limit);
                seen.extend(page.keys.iter().map(|k| k.as_str().to_owned()));
                after = page.next;
                if after.is_none() {
                    break;
                }
            }
            assert_eq!(
                seen,
                ["__trellis", "__trellis0", "_a", "a", "b"],
                "limit {limit}"
            );
        }
        let page = list_visible(&store, "__trellis", None, 10)
            .await
            .expect("list");
        let seen: Vec<&str> = page.keys.iter().map(Key::as_str).collect();
        assert_eq!((seen, page.next), (vec!["__trellis", "__trellis0"], None));
        let page = list_visible(&store, "__trellis/", None, 10)
            .await
            .expect("list");
        assert_eq!(page, Page::default());
        // The reserved range is skipped in one step, not paged through.
        let page = list_visible(&store, "__", None, 2).await.expect("list");
        let seen: Vec<&str> = page.keys.iter().map(Key::as_str).collect();
        assert_eq!(seen, ["__trellis", "__trellis0"]);
    }

    #[test]
    fn reserved_keys_are_refused() {
        let err = validate_key("__trellis/outbox/1".into(), "operations[0]").expect_err("reserved");
        assert_eq!(err.code(), "reserved_key");
        assert!(validate_key("__trellis".into(), "k").is_ok());
        assert!(validate_key("trellis/fence/x".into(), "k").is_ok());
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let cursor = URL_SAFE_NO_PAD.encode("user/ä");
        assert_eq!(decode_cursor(&cursor).expect("valid").as_str(), "user/ä");
        assert_eq!(
            decode_cursor("%%%").expect_err("garbage").code(),
            "invalid_cursor"
        );
        assert_eq!(
            decode_cursor(&URL_SAFE_NO_PAD.encode([0xff, 0xfe]))
                .expect_err("utf8")
                .code(),
            "invalid_cursor"
        );
    }
}
