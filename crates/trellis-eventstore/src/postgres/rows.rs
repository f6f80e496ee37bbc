//! Conversions between rows and the store's types.

use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sqlx::Row as _;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::{BACKEND, pg_error};
use crate::api::{Deletion, EventStoreError, StreamMetadata};
use crate::event::{Body, Metadata, RecordedEvent, StreamName};

/// A row of `streams`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct StreamRow {
    /// The last event's version.
    pub(super) version: Option<u64>,
    pub(super) metadata: StreamMetadata,
    pub(super) deleted: Option<Deletion>,
}

/// A stored row whose content is not what this backend writes.
pub(super) fn corrupt(what: impl std::fmt::Display) -> EventStoreError {
    EventStoreError::Backend {
        backend: BACKEND,
        reason: format!("stored data is malformed: {what}"),
    }
}

/// A version, position or count for a `BIGINT` column. Values above `i64::MAX` are
/// stored as `i64::MAX`: no stream or store gets that far, so as limits they mean
/// the same.
pub(super) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A `BIGINT` column that holds a version, position or count.
pub(super) fn to_u64(value: i64) -> Result<u64, EventStoreError> {
    u64::try_from(value).map_err(|_| corrupt(format!("negative number {value}")))
}

/// A caller's number stored bit for bit (snapshot versions, checkpoints: only read
/// back, never compared in SQL), so every `u64` round-trips.
pub(super) fn bits_to_i64(value: u64) -> i64 {
    i64::from_ne_bytes(value.to_ne_bytes())
}

/// The inverse of [`bits_to_i64`].
pub(super) fn bits_to_u64(value: i64) -> u64 {
    u64::from_ne_bytes(value.to_ne_bytes())
}

pub(super) fn get<'r, T>(row: &'r PgRow, index: usize) -> Result<T, EventStoreError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(index).map_err(pg_error)
}

fn opt_u64(row: &PgRow, index: usize) -> Result<Option<u64>, EventStoreError> {
    get::<Option<i64>>(row, index)?.map(to_u64).transpose()
}

/// Decodes `version, deleted, max_age_ms, max_count, truncate_before` from column
/// `first` on.
pub(super) fn stream_row(row: &PgRow, first: usize) -> Result<StreamRow, EventStoreError> {
    let deleted = match get::<Option<String>>(row, first + 1)?.as_deref() {
        None => None,
        Some("soft") => Some(Deletion::Soft),
        Some("hard") => Some(Deletion::Hard),
        Some(other) => return Err(corrupt(format!("deletion {other:?}"))),
    };
    Ok(StreamRow {
        version: opt_u64(row, first)?,
        metadata: StreamMetadata {
            max_age: opt_u64(row, first + 2)?.map(Duration::from_millis),
            max_count: opt_u64(row, first + 3)?,
            truncate_before: opt_u64(row, first + 4)?,
        },
        deleted,
    })
}

/// The `deleted` column's value.
pub(super) fn deletion(how: Deletion) -> &'static str {
    match how {
        Deletion::Soft => "soft",
        Deletion::Hard => "hard",
    }
}

/// A body as its two columns, `data_json` and `data_bytes`: JSON is kept as the
/// text written (`jsonb` would normalize it).
pub(super) fn body_columns(body: &Body) -> (Option<&str>, Option<&[u8]>) {
    match body {
        Body::Json(raw) => (Some(raw.get()), None),
        Body::Bytes(b) => (None, Some(b.as_ref())),
    }
}

/// The body from `data_json` and `data_bytes`.
pub(super) fn body(json: Option<String>, bytes: Option<Vec<u8>>) -> Result<Body, EventStoreError> {
    match (json, bytes) {
        (Some(text), None) => RawValue::from_string(text)
            .map(Body::Json)
            .map_err(|e| corrupt(format!("JSON body: {e}"))),
        (None, Some(b)) => Ok(Body::Bytes(Bytes::from(b))),
        _ => Err(corrupt("a body is JSON or bytes")),
    }
}

/// Metadata as the `metadata` column: JSON text, `NULL` when empty. Text, not
/// `jsonb`, because `jsonb` refuses `\u0000` in strings, which JSON allows.
pub(super) fn metadata_column(metadata: &Metadata) -> Option<String> {
    if *metadata == Metadata::default() {
        return None;
    }
    serde_json::to_string(&metadata.to_json()).ok()
}

fn metadata(column: Option<String>) -> Result<Metadata, EventStoreError> {
    let Some(text) = column else {
        return Ok(Metadata::default());
    };
    let object: Map<String, Value> =
        serde_json::from_str(&text).map_err(|e| corrupt(format!("metadata: {e}")))?;
    Metadata::from_json(object).map_err(corrupt)
}

pub(super) fn stream_name(name: String) -> Result<StreamName, EventStoreError> {
    StreamName::new(name).map_err(corrupt)
}

pub(super) fn uuid(text: &str) -> Result<Uuid, EventStoreError> {
    Uuid::parse_str(text).map_err(corrupt)
}

/// Decodes the columns `position, stream, version, id::text, event_type,
/// data_json, data_bytes, metadata, timestamp_ms`.
pub(super) fn event(row: &PgRow) -> Result<RecordedEvent, EventStoreError> {
    Ok(RecordedEvent {
        position: to_u64(get(row, 0)?)?,
        stream: stream_name(get(row, 1)?)?,
        version: to_u64(get(row, 2)?)?,
        id: uuid(&get::<String>(row, 3)?)?,
        ty: get(row, 4)?,
        data: body(get(row, 5)?, get(row, 6)?)?,
        metadata: metadata(get(row, 7)?)?,
        timestamp_ms: to_u64(get(row, 8)?)?,
    })
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn caller_numbers_round_trip_bit_for_bit() {
        for v in [0, 1, 42, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
            assert_eq!(bits_to_u64(bits_to_i64(v)), v);
        }
        assert_eq!(to_i64(u64::MAX), i64::MAX);
        assert!(to_u64(-1).is_err());
    }

    #[test]
    fn bodies_and_metadata_round_trip() {
        let json = Body::json(&serde_json::json!({"b": 1, "a": [true, null]}));
        let (j, b) = body_columns(&json);
        assert_eq!(
            body(j.map(str::to_owned), b.map(<[u8]>::to_vec)).ok(),
            Some(json)
        );
        let raw = Body::Bytes(Bytes::from_static(b"\x00\xff"));
        let (j, b) = body_columns(&raw);
        assert_eq!(
            body(j.map(str::to_owned), b.map(<[u8]>::to_vec)).ok(),
            Some(raw)
        );
        assert!(body(None, None).is_err());
        assert_eq!(metadata_column(&Metadata::default()), None);
        let m = Metadata {
            correlation_id: Some("c\u{0}".into()),
            causation_id: None,
            extra: Map::from_iter([("x".to_owned(), Value::from(1))]),
        };
        assert_eq!(metadata(metadata_column(&m)).ok(), Some(m));
    }
}
