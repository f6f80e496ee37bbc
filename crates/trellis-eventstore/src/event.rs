//! Events: what is appended ([`EventData`]), what is read back ([`RecordedEvent`]),
//! stream names, and the storage encoding.

use std::fmt;
use std::sync::Arc;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

/// Longest stream name, in bytes.
pub const MAX_STREAM_NAME: usize = 256;
/// Longest event type, in bytes.
pub const MAX_EVENT_TYPE: usize = 256;
/// The name of the global stream.
pub const ALL: &str = "$all";
/// Prefix of category streams: `$ce-order` holds the events of every `order-…` stream.
pub const CATEGORY_PREFIX: &str = "$ce-";

/// The category of Trellis's own streams (`trellis-…`).
pub const INTERNAL_CATEGORY: &str = "trellis";

/// Why something can't be a stream name, an event type or an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(message: impl Into<String>) -> Invalid {
    Invalid(message.into())
}

/// The name of a stream: 1 to 256 bytes of printable text, not starting with `$`
/// (reserved for `$all` and categories). Its category is the part before the first
/// `-`: `order-123` is in category `order`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamName(Arc<str>);

impl StreamName {
    /// Checks and wraps a stream name.
    ///
    /// # Errors
    /// [`Invalid`] saying what is wrong with it.
    pub fn new(name: impl AsRef<str>) -> Result<Self, Invalid> {
        let name = name.as_ref();
        if name.is_empty() || name.len() > MAX_STREAM_NAME {
            return Err(invalid(format!(
                "a stream name is 1 to {MAX_STREAM_NAME} bytes, got {}",
                name.len()
            )));
        }
        if name.starts_with('$') {
            return Err(invalid(format!(
                "stream names starting with '$' are reserved ({name:?})"
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(invalid(format!(
                "stream name {name:?} contains control characters"
            )));
        }
        Ok(Self(Arc::from(name)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is one of Trellis's own streams: category
    /// [`INTERNAL_CATEGORY`] (persistent subscription definitions, parked events).
    /// They are ordinary streams in `$all`, but persistent subscriptions and
    /// projections on `$all` pass over them.
    pub fn is_internal(&self) -> bool {
        self.category() == INTERNAL_CATEGORY
    }

    /// The category: the part before the first `-`, or the whole name.
    pub fn category(&self) -> &str {
        self.0
            .split_once('-')
            .map_or(&self.0, |(category, _)| category)
    }
}

impl fmt::Debug for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event's payload.
#[derive(Debug, Clone)]
pub enum Body {
    /// JSON, kept as written.
    Json(Box<RawValue>),
    /// Anything else.
    Bytes(Bytes),
}

impl PartialEq for Body {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Json(a), Self::Json(b)) => a.get() == b.get(),
            (Self::Bytes(a), Self::Bytes(b)) => a == b,
            _ => false,
        }
    }
}

impl Body {
    /// JSON from a value.
    pub fn json(value: &Value) -> Self {
        // A `Value` always serializes.
        Self::Json(
            serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned()),
        )
    }

    /// The JSON value, if this is JSON.
    pub fn to_value(&self) -> Option<Value> {
        match self {
            Self::Json(raw) => serde_json::from_str(raw.get()).ok(),
            Self::Bytes(_) => None,
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Json(raw) => raw.get().len(),
            Self::Bytes(b) => b.len(),
        }
    }
}

/// Who caused an event and what it belongs to, plus free-form fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    /// The id shared by everything one request caused.
    pub correlation_id: Option<String>,
    /// The id of the message (command or event) that caused this one.
    pub causation_id: Option<String>,
    /// Anything else.
    pub extra: Map<String, Value>,
}

impl Metadata {
    /// The metadata as one JSON object.
    pub fn to_json(&self) -> Map<String, Value> {
        let mut out = self.extra.clone();
        if let Some(c) = &self.correlation_id {
            out.insert("correlation_id".into(), Value::from(c.clone()));
        }
        if let Some(c) = &self.causation_id {
            out.insert("causation_id".into(), Value::from(c.clone()));
        }
        out
    }

    /// Metadata from one JSON object (`correlation_id` and `causation_id` must be
    /// strings).
    ///
    /// # Errors
    /// [`Invalid`] if they are not.
    pub fn from_json(mut object: Map<String, Value>) -> Result<Self, Invalid> {
        let mut take = |name: &str| match object.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(invalid(format!(
                "metadata.{name} must be a string, got {other}"
            ))),
        };
        let correlation_id = take("correlation_id")?;
        let causation_id = take("causation_id")?;
        Ok(Self {
            correlation_id,
            causation_id,
            extra: object,
        })
    }

    fn is_empty(&self) -> bool {
        self.correlation_id.is_none() && self.causation_id.is_none() && self.extra.is_empty()
    }
}

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct EventData {
    /// Unique in the store; appending an id again with the same expectation is a
    /// no-op (idempotent retries).
    pub id: Uuid,
    /// What happened, e.g. `OrderPlaced`.
    pub ty: String,
    /// The payload.
    pub data: Body,
    /// Correlation, causation and free-form metadata.
    pub metadata: Metadata,
}

impl EventData {
    /// A JSON event with a fresh id and no metadata.
    pub fn json(ty: impl Into<String>, data: &Value) -> Self {
        Self {
            id: Uuid::new_v4(),
            ty: ty.into(),
            data: Body::json(data),
            metadata: Metadata::default(),
        }
    }

    /// Checks the type.
    ///
    /// # Errors
    /// [`Invalid`] saying what is wrong.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.ty.is_empty() || self.ty.len() > MAX_EVENT_TYPE {
            return Err(invalid(format!(
                "an event type is 1 to {MAX_EVENT_TYPE} bytes, got {}",
                self.ty.len()
            )));
        }
        if self.ty.chars().any(char::is_control) {
            return Err(invalid(format!(
                "event type {:?} contains control characters",
                self.ty
            )));
        }
        Ok(())
    }

    /// About how many bytes it takes to store.
    pub fn size(&self) -> usize {
        64 + self.ty.len() + self.data.len() + if self.metadata.is_empty() { 0 } else { 64 }
    }
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// Its id.
    pub id: Uuid,
    /// Its stream.
    pub stream: StreamName,
    /// Its version in the stream: 0 for the first event.
    pub version: u64,
    /// Its position in the store's global order (`$all`): 0 for the first event,
    /// then +1 per event, with no gaps.
    pub position: u64,
    /// Its type.
    pub ty: String,
    /// Its payload.
    pub data: Body,
    /// Its metadata.
    pub metadata: Metadata,
    /// When it was appended, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

// === storage encoding ===

const ENCODING: u8 = 1;
const BODY_JSON: u8 = 0;
const BODY_BYTES: u8 = 1;

/// Why stored bytes are not an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored event is malformed: {0}")]
pub struct Malformed(&'static str);

impl RecordedEvent {
    /// The storage encoding: a version byte, fixed fields, then length-prefixed
    /// stream, type, body and metadata JSON.
    pub fn encode(&self) -> Bytes {
        let metadata = if self.metadata.is_empty() {
            Vec::new()
        } else {
            serde_json::to_vec(&self.metadata.to_json()).unwrap_or_default()
        };
        let (kind, body): (u8, &[u8]) = match &self.data {
            Body::Json(raw) => (BODY_JSON, raw.get().as_bytes()),
            Body::Bytes(b) => (BODY_BYTES, b),
        };
        let stream = self.stream.as_str().as_bytes();
        let mut out = BytesMut::with_capacity(
            1 + 16
                + 24
                + 2
                + stream.len()
                + 2
                + self.ty.len()
                + 5
                + body.len()
                + 4
                + metadata.len(),
        );
        out.put_u8(ENCODING);
        out.put_slice(self.id.as_bytes());
        out.put_u64_le(self.version);
        out.put_u64_le(self.position);
        out.put_u64_le(self.timestamp_ms);
        put_short(&mut out, stream);
        put_short(&mut out, self.ty.as_bytes());
        out.put_u8(kind);
        out.put_u32_le(u32::try_from(body.len()).unwrap_or(u32::MAX));
        out.put_slice(body);
        out.put_u32_le(u32::try_from(metadata.len()).unwrap_or(u32::MAX));
        out.put_slice(&metadata);
        out.freeze()
    }

    /// Decodes what [`encode`](Self::encode) wrote.
    ///
    /// # Errors
    /// [`Malformed`] if the bytes are not such an encoding.
    pub fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
        let mut b = bytes;
        need(b, 1 + 16 + 24)?;
        if b.get_u8() != ENCODING {
            return Err(Malformed("unknown encoding"));
        }
        let mut id = [0u8; 16];
        b.copy_to_slice(&mut id);
        let version = b.get_u64_le();
        let position = b.get_u64_le();
        let timestamp_ms = b.get_u64_le();
        let stream = std::str::from_utf8(take_short(&mut b)?)
            .map_err(|_| Malformed("stream is not UTF-8"))?;
        let stream = StreamName::new(stream).map_err(|_| Malformed("invalid stream name"))?;
        let ty = std::str::from_utf8(take_short(&mut b)?)
            .map_err(|_| Malformed("type is not UTF-8"))?
            .to_owned();
        need(b, 5)?;
        let kind = b.get_u8();
        let body = take_long(&mut b)?;
        let data = match kind {
            BODY_JSON => {
                let text =
                    std::str::from_utf8(body).map_err(|_| Malformed("JSON body is not UTF-8"))?;
                Body::Json(
                    RawValue::from_string(text.to_owned())
                        .map_err(|_| Malformed("JSON body is not JSON"))?,
                )
            }
            BODY_BYTES => Body::Bytes(Bytes::copy_from_slice(body)),
            _ => return Err(Malformed("unknown body kind")),
        };
        need(b, 4)?;
        let metadata = take_long(&mut b)?;
        let metadata = if metadata.is_empty() {
            Metadata::default()
        } else {
            let object: Map<String, Value> = serde_json::from_slice(metadata)
                .map_err(|_| Malformed("metadata is not a JSON object"))?;
            Metadata::from_json(object).map_err(|_| Malformed("invalid metadata"))?
        };
        if !b.is_empty() {
            return Err(Malformed("trailing bytes"));
        }
        Ok(Self {
            id: Uuid::from_bytes(id),
            stream,
            version,
            position,
            ty,
            data,
            metadata,
            timestamp_ms,
        })
    }
}

fn need(b: &[u8], n: usize) -> Result<(), Malformed> {
    if b.len() < n {
        Err(Malformed("truncated"))
    } else {
        Ok(())
    }
}

fn put_short(out: &mut BytesMut, field: &[u8]) {
    out.put_u16_le(u16::try_from(field.len()).unwrap_or(u16::MAX));
    out.put_slice(&field[..field.len().min(usize::from(u16::MAX))]);
}

fn take_short<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], Malformed> {
    need(b, 2)?;
    let len = usize::from(b.get_u16_le());
    need(b, len)?;
    let (field, rest) = b.split_at(len);
    *b = rest;
    Ok(field)
}

fn take_long<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], Malformed> {
    need(b, 4)?;
    let len = b.get_u32_le() as usize;
    need(b, len)?;
    let (field, rest) = b.split_at(len);
    *b = rest;
    Ok(field)
}

#[cfg(test)]
mod test {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn stream_names_and_categories() {
        assert_eq!(
            StreamName::new("order-123").expect("valid").category(),
            "order"
        );
        assert_eq!(
            StreamName::new("order-123-x").expect("valid").category(),
            "order"
        );
        assert_eq!(
            StreamName::new("inventory").expect("valid").category(),
            "inventory"
        );
        for bad in ["", "$all", "$ce-order", "a\nb"] {
            assert!(StreamName::new(bad).is_err(), "{bad:?}");
        }
        assert!(StreamName::new("x".repeat(257)).is_err());
        assert!(StreamName::new("ü-ñ/ok").is_ok());
    }

    fn body() -> impl Strategy<Value = Body> {
        prop_oneof![
            any::<i64>().prop_map(|n| Body::json(&serde_json::json!({ "n": n }))),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| Body::Bytes(Bytes::from(b))),
        ]
    }

    proptest! {
        #[test]
        fn encoding_round_trips(
            id in any::<u128>(), version: u64, position: u64, timestamp_ms: u64,
            stream in "[a-z]{1,8}(-[a-z0-9]{1,8})?", ty in "[A-Za-z.]{1,20}", data in body(),
            correlation in proptest::option::of("[a-z0-9]{1,10}"), extra in proptest::option::of(any::<bool>()),
        ) {
            let mut metadata = Metadata { correlation_id: correlation, ..Metadata::default() };
            if let Some(flag) = extra {
                metadata.extra.insert("flag".into(), Value::from(flag));
            }
            let event = RecordedEvent {
                id: Uuid::from_u128(id), stream: StreamName::new(stream).expect("valid"), version, position,
                ty, data, metadata, timestamp_ms,
            };
            prop_assert_eq!(RecordedEvent::decode(&event.encode()), Ok(event));
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = RecordedEvent::decode(&bytes);
        }
    }
}
