//! CloudEvents 1.0: the message format of every topic.
//!
//! Events arrive in structured mode (a JSON object, `application/cloudevents+json`),
//! in batches (`application/cloudevents-batch+json`), in binary mode (attributes in
//! `ce-*` headers, the body as data), or as a bare body that becomes the data of a new
//! event. Missing `id`, `source` and `type` are filled in; `specversion` must be
//! `1.0`. The ordering key is the standard `partitionkey` extension.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Longest attribute value accepted, in bytes.
const MAX_ATTRIBUTE_LEN: usize = 4096;

/// A CloudEvent.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudEvent {
    /// Unique per source; also the dedupe key.
    pub id: String,
    /// Who produced it (a URI-reference).
    pub source: String,
    /// What happened, e.g. `com.example.order.created`.
    pub ty: String,
    /// Media type of `data`.
    pub datacontenttype: Option<String>,
    /// Schema of `data`.
    pub dataschema: Option<String>,
    /// What it is about, within the source.
    pub subject: Option<String>,
    /// When it happened (RFC 3339).
    pub time: Option<String>,
    /// The payload.
    pub data: Option<Data>,
    /// Extension attributes (lowercase a-z0-9 names), e.g. `partitionkey`, `traceparent`.
    pub extensions: BTreeMap<String, Value>,
}

/// An event's payload.
#[derive(Debug, Clone)]
pub enum Data {
    /// JSON, kept as written.
    Json(Box<RawValue>),
    /// Anything else (`data_base64` in structured mode).
    Binary(Bytes),
}

impl PartialEq for Data {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Json(a), Self::Json(b)) => a.get() == b.get(),
            (Self::Binary(a), Self::Binary(b)) => a == b,
            _ => false,
        }
    }
}

/// Why something is not a valid CloudEvent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidEvent(pub String);

fn invalid(msg: impl Into<String>) -> InvalidEvent {
    InvalidEvent(msg.into())
}

/// Defaults for attributes a publisher left out.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// `source` when missing.
    pub source: String,
    /// `type` when missing.
    pub ty: String,
}

impl CloudEvent {
    /// A new event carrying `data`, with a fresh id.
    pub fn new(source: impl Into<String>, ty: impl Into<String>, data: Option<Data>) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            source: source.into(),
            ty: ty.into(),
            datacontenttype: None,
            dataschema: None,
            subject: None,
            time: None,
            data,
            extensions: BTreeMap::new(),
        }
    }

    /// The ordering key (`partitionkey` extension), if any.
    pub fn ordering_key(&self) -> Option<&str> {
        self.extensions.get("partitionkey").and_then(Value::as_str)
    }

    /// Parses a structured-mode event, filling in `id`, `source` and `type` if absent.
    ///
    /// # Errors
    /// [`InvalidEvent`] naming the attribute at fault.
    pub fn from_structured(
        value: Map<String, Value>,
        defaults: &Defaults,
    ) -> Result<Self, InvalidEvent> {
        let mut value = value;
        let mut take_string = |name: &str| -> Result<Option<String>, InvalidEvent> {
            match value.remove(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(other) => Err(invalid(format!(
                    "attribute {name:?} must be a string, got {other}"
                ))),
            }
        };
        let specversion = take_string("specversion")?;
        if specversion.as_deref().is_some_and(|v| v != "1.0") {
            return Err(invalid(format!(
                "unsupported specversion {:?}; only \"1.0\"",
                specversion.unwrap_or_default()
            )));
        }
        let id = take_string("id")?;
        let source = take_string("source")?;
        let ty = take_string("type")?;
        let datacontenttype = take_string("datacontenttype")?;
        let dataschema = take_string("dataschema")?;
        let subject = take_string("subject")?;
        let time = take_string("time")?;
        let data_base64 = take_string("data_base64")?;
        let data = match (value.remove("data"), data_base64) {
            (Some(_), Some(_)) => {
                return Err(invalid("an event has data or data_base64, not both"));
            }
            (Some(data), None) => Some(Data::Json(
                serde_json::value::to_raw_value(&data).map_err(|e| invalid(e.to_string()))?,
            )),
            (None, Some(b64)) => Some(Data::Binary(
                STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|e| invalid(format!("data_base64 is not base64: {e}")))?
                    .into(),
            )),
            (None, None) => None,
        };
        let mut event = Self {
            id: id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            source: source.unwrap_or_else(|| defaults.source.clone()),
            ty: ty.unwrap_or_else(|| defaults.ty.clone()),
            datacontenttype,
            dataschema,
            subject,
            time,
            data,
            extensions: BTreeMap::new(),
        };
        for (name, value) in value {
            event.set_extension(&name, value)?;
        }
        event.validate()?;
        Ok(event)
    }

    /// Parses a binary-mode event: attributes from `ce-*` headers (names in any case),
    /// `content-type` as `datacontenttype`, the body as data. With no `ce-*` headers at
    /// all this wraps a plain body in a new event. A JSON media type with a body that
    /// parses as JSON is stored as JSON; anything else as bytes.
    ///
    /// # Errors
    /// [`InvalidEvent`] naming the header at fault.
    pub fn from_binary<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        content_type: Option<&str>,
        body: Bytes,
        defaults: &Defaults,
    ) -> Result<Self, InvalidEvent> {
        let mut event = Self::new(defaults.source.clone(), defaults.ty.clone(), None);
        let mut specversion = None;
        for (name, value) in headers {
            let Some(attribute) = name
                .get(3..)
                .filter(|_| name.len() > 3 && name[..3].eq_ignore_ascii_case("ce-"))
            else {
                continue;
            };
            let attribute = attribute.to_ascii_lowercase();
            let value = percent_decode(value).ok_or_else(|| {
                invalid(format!(
                    "header ce-{attribute} is not valid percent-encoded UTF-8"
                ))
            })?;
            match attribute.as_str() {
                "specversion" => specversion = Some(value),
                "id" => event.id = value,
                "source" => event.source = value,
                "type" => event.ty = value,
                "subject" => event.subject = Some(value),
                "time" => event.time = Some(value),
                "dataschema" => event.dataschema = Some(value),
                "datacontenttype" => {
                    return Err(invalid(
                        "use content-type, not ce-datacontenttype, in binary mode",
                    ));
                }
                _ => event.set_extension(&attribute, Value::String(value))?,
            }
        }
        if specversion.as_deref().is_some_and(|v| v != "1.0") {
            return Err(invalid(format!(
                "unsupported specversion {:?}; only \"1.0\"",
                specversion.unwrap_or_default()
            )));
        }
        event.datacontenttype = content_type.map(str::to_owned);
        if !body.is_empty() {
            let json = content_type.is_none_or(is_json_media_type);
            let text = content_type
                .is_some_and(|c| c.trim_start().to_ascii_lowercase().starts_with("text/"));
            event.data = Some(match serde_json::from_slice::<Box<RawValue>>(&body) {
                Ok(raw) if json => Data::Json(raw),
                _ => match std::str::from_utf8(&body) {
                    // Text stays readable: a JSON string, as the JSON event format allows.
                    Ok(s) if text => Data::Json(
                        serde_json::value::to_raw_value(s).map_err(|e| invalid(e.to_string()))?,
                    ),
                    _ => Data::Binary(body),
                },
            });
        }
        event.validate()?;
        Ok(event)
    }

    /// Sets an extension attribute, checking its name and value type.
    ///
    /// # Errors
    /// [`InvalidEvent`] for a bad name or a value that is not a string, number or bool.
    pub fn set_extension(&mut self, name: &str, value: Value) -> Result<(), InvalidEvent> {
        let valid_name = (1..=20).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !valid_name {
            return Err(invalid(format!(
                "extension name {name:?} must be 1-20 of a-z and 0-9"
            )));
        }
        match &value {
            Value::String(s) if s.len() > MAX_ATTRIBUTE_LEN => {
                Err(invalid(format!("extension {name:?} is too long")))
            }
            Value::String(_) | Value::Number(_) | Value::Bool(_) => {
                self.extensions.insert(name.to_owned(), value);
                Ok(())
            }
            other => Err(invalid(format!(
                "extension {name:?} must be a string, number or boolean, got {other}"
            ))),
        }
    }

    /// Checks the required attributes.
    ///
    /// # Errors
    /// [`InvalidEvent`] naming the attribute at fault.
    pub fn validate(&self) -> Result<(), InvalidEvent> {
        for (name, value) in [
            ("id", &self.id),
            ("source", &self.source),
            ("type", &self.ty),
        ] {
            if value.is_empty() {
                return Err(invalid(format!("attribute {name:?} must not be empty")));
            }
            if value.len() > MAX_ATTRIBUTE_LEN {
                return Err(invalid(format!("attribute {name:?} is too long")));
            }
        }
        Ok(())
    }

    /// The event as a structured-mode JSON object.
    pub fn to_structured(&self) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("specversion".into(), Value::from("1.0"));
        out.insert("id".into(), Value::from(self.id.clone()));
        out.insert("source".into(), Value::from(self.source.clone()));
        out.insert("type".into(), Value::from(self.ty.clone()));
        for (name, value) in [
            ("datacontenttype", &self.datacontenttype),
            ("dataschema", &self.dataschema),
            ("subject", &self.subject),
            ("time", &self.time),
        ] {
            if let Some(v) = value {
                out.insert(name.into(), Value::from(v.clone()));
            }
        }
        for (name, value) in &self.extensions {
            out.insert(name.clone(), value.clone());
        }
        match &self.data {
            Some(Data::Json(raw)) => {
                out.insert(
                    "data".into(),
                    serde_json::from_str(raw.get()).unwrap_or(Value::Null),
                );
            }
            Some(Data::Binary(bytes)) => {
                out.insert("data_base64".into(), Value::from(STANDARD.encode(bytes)));
            }
            None => {}
        }
        out
    }

    /// Encodes the event for storage: the ordering key and id up front (so delivery
    /// needn't parse JSON), then the structured JSON.
    pub fn encode(&self) -> Bytes {
        let json = serde_json::to_vec(&Value::Object(self.to_structured())).unwrap_or_default();
        let key = self.ordering_key().unwrap_or("").as_bytes();
        let id = self.id.as_bytes();
        let mut out = Vec::with_capacity(1 + 4 + key.len() + id.len() + json.len());
        out.push(1);
        out.extend_from_slice(&(key.len() as u16).to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(&(id.len() as u16).to_le_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&json);
        Bytes::from(out)
    }
}

/// Whether a media type is JSON (`application/json`, `*/*+json`, `text/json`).
pub fn is_json_media_type(media_type: &str) -> bool {
    let essence = media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

/// Decodes `%XX` escapes (CloudEvents HTTP binding); `None` if not UTF-8 afterwards.
fn percent_decode(value: &str) -> Option<String> {
    if !value.contains('%') {
        return Some(value.to_owned());
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A stored event, split into its parts.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The ordering key, if any.
    pub key: Option<String>,
    /// The event id.
    pub id: String,
    /// The structured JSON.
    pub json: Bytes,
}

impl Stored {
    /// Decodes what [`CloudEvent::encode`] wrote.
    ///
    /// # Errors
    /// If the bytes are not such an encoding.
    pub fn decode(bytes: &Bytes) -> Result<Self, InvalidEvent> {
        let bad = || invalid("stored event is malformed");
        if bytes.first() != Some(&1) {
            return Err(bad());
        }
        let mut at = 1;
        let field = |at: &mut usize| -> Result<Bytes, InvalidEvent> {
            let len = u16::from_le_bytes(
                bytes
                    .get(*at..*at + 2)
                    .ok_or_else(bad)?
                    .try_into()
                    .map_err(|_| bad())?,
            ) as usize;
            let value = bytes.get(*at + 2..*at + 2 + len).ok_or_else(bad)?;
            let value = bytes.slice_ref(value);
            *at += 2 + len;
            Ok(value)
        };
        let key = field(&mut at)?;
        let id = field(&mut at)?;
        let utf8 = |b: Bytes| String::from_utf8(b.to_vec()).map_err(|_| bad());
        Ok(Self {
            key: (!key.is_empty()).then(|| utf8(key)).transpose()?,
            id: utf8(id)?,
            json: bytes.slice(at..),
        })
    }

    /// The structured event.
    ///
    /// # Errors
    /// If the JSON is damaged.
    pub fn event(&self) -> Result<CloudEvent, InvalidEvent> {
        let value: Map<String, Value> =
            serde_json::from_slice(&self.json).map_err(|e| invalid(e.to_string()))?;
        CloudEvent::from_structured(
            value,
            &Defaults {
                source: String::new(),
                ty: String::new(),
            },
        )
    }
}

#[cfg(test)]
mod test {
    use proptest::prelude::*;

    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            source: "/trellis".into(),
            ty: "trellis.published".into(),
        }
    }

    fn parse(json: &str) -> Result<CloudEvent, InvalidEvent> {
        let value: Map<String, Value> = serde_json::from_str(json).expect("object");
        CloudEvent::from_structured(value, &defaults())
    }

    #[test]
    fn structured_events_round_trip() {
        let e = parse(r#"{"specversion":"1.0","id":"1","source":"/orders","type":"order.created","subject":"o-1",
            "datacontenttype":"application/json","partitionkey":"customer-7","attempt":2,"data":{"total":5}}"#)
        .expect("valid");
        assert_eq!(e.ordering_key(), Some("customer-7"));
        assert_eq!(e.extensions["attempt"], Value::from(2));
        let again =
            CloudEvent::from_structured(e.to_structured(), &defaults()).expect("round trip");
        assert_eq!(again, e);
        let stored = Stored::decode(&e.encode()).expect("decode");
        assert_eq!(
            (stored.key.as_deref(), stored.id.as_str()),
            (Some("customer-7"), "1")
        );
        assert_eq!(stored.event().expect("event"), e);
    }

    #[test]
    fn missing_attributes_are_filled_in() {
        let e = parse(r#"{"data":"hello"}"#).expect("valid");
        assert_eq!(
            (e.source.as_str(), e.ty.as_str(), e.id.len()),
            ("/trellis", "trellis.published", 36)
        );
        let binary = parse(r#"{"data_base64":"AAE="}"#).expect("valid");
        assert_eq!(binary.data, Some(Data::Binary(Bytes::from_static(&[0, 1]))));
    }

    #[test]
    fn invalid_events_name_the_problem() {
        for (json, needle) in [
            (r#"{"specversion":"0.3"}"#, "specversion"),
            (r#"{"id":5}"#, "\"id\" must be a string"),
            (r#"{"id":""}"#, "\"id\" must not be empty"),
            (r#"{"data":1,"data_base64":"AA=="}"#, "not both"),
            (r#"{"data_base64":"%%"}"#, "base64"),
            (r#"{"BadName":"x"}"#, "extension name"),
            (r#"{"nested":{"a":1}}"#, "string, number or boolean"),
        ] {
            let err = parse(json).expect_err(json);
            assert!(err.0.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn binary_mode_reads_ce_headers() {
        let headers = [
            ("ce-id", "42"),
            ("CE-Source", "/orders"),
            ("ce-type", "order.created"),
            ("ce-specversion", "1.0"),
            ("ce-partitionkey", "c%2F7"),
            ("x-other", "ignored"),
        ];
        let e = CloudEvent::from_binary(
            headers,
            Some("application/json"),
            Bytes::from_static(b"{\"a\":1}"),
            &defaults(),
        )
        .expect("valid");
        assert_eq!(
            (e.id.as_str(), e.source.as_str(), e.ty.as_str()),
            ("42", "/orders", "order.created")
        );
        assert_eq!(e.ordering_key(), Some("c/7"));
        assert!(matches!(&e.data, Some(Data::Json(raw)) if raw.get() == "{\"a\":1}"));
        let raw = CloudEvent::from_binary(
            [],
            Some("application/octet-stream"),
            Bytes::from_static(b"\x00\x01"),
            &defaults(),
        )
        .expect("raw");
        assert_eq!(
            raw.data,
            Some(Data::Binary(Bytes::from_static(b"\x00\x01")))
        );
        assert_eq!(raw.ty, "trellis.published");
        let unlabelled =
            CloudEvent::from_binary([], None, Bytes::from_static(b"not json"), &defaults())
                .expect("unlabelled");
        assert_eq!(
            unlabelled.data,
            Some(Data::Binary(Bytes::from_static(b"not json")))
        );
        let text = CloudEvent::from_binary(
            [],
            Some("text/plain"),
            Bytes::from_static(b"hi"),
            &defaults(),
        )
        .expect("text");
        assert!(matches!(&text.data, Some(Data::Json(raw)) if raw.get() == "\"hi\""));
        for (headers, needle) in [
            (vec![("ce-specversion", "0.3")], "specversion"),
            (vec![("ce-id", "")], "\"id\" must not be empty"),
            (vec![("ce-Bad_Name", "x")], "extension name"),
            (vec![("ce-datacontenttype", "x")], "content-type"),
        ] {
            let err = CloudEvent::from_binary(headers, None, Bytes::new(), &defaults())
                .expect_err(needle);
            assert!(err.0.contains(needle), "{err}");
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Stored::decode(&Bytes::from(bytes));
        }
    }
}
