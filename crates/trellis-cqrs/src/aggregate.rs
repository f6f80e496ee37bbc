//! The write model: [`Aggregate`]s decide on commands and evolve by their events,
//! and the encoding of their events as [`EventData`].
//!
//! # Event types without ceremony
//! An aggregate's events are one serde enum with the default (externally tagged)
//! representation. The variant name is the stored event type and the variant's
//! content is the stored data, so the store holds what a reader of another language
//! expects — `{"type": "Deposited", "data": {"amount": 5}}` — and nothing needs a
//! hand-written type name:
//!
//! | Rust                                  | type          | data           |
//! |---------------------------------------|---------------|----------------|
//! | `Deposited { amount: 5 }`             | `"Deposited"` | `{"amount":5}` |
//! | `Renamed(String::from("x"))`          | `"Renamed"`   | `"x"`          |
//! | `Closed` (a unit variant)             | `"Closed"`    | `null`         |
//!
//! `#[serde(rename = "…")]` and `#[serde(rename_all = "…")]` rename the stored
//! types. Other representations (`#[serde(tag = "…")]`, `untagged`) and
//! non-enums are refused with [`CodecError::NotAVariant`] when appending — as far
//! as the JSON shows: a struct or map with exactly one field looks like a variant
//! named after that field, so keep events in an enum.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use trellis_eventstore::event::Invalid;
use trellis_eventstore::{Body, EventData, RecordedEvent, StreamName};

/// An event-sourced aggregate: a consistency boundary whose state is the fold of its
/// stream's events (the "decide / evolve" pair of cqrs-es and Axon).
///
/// Each instance lives in the stream `{CATEGORY}-{id}`; its state is rebuilt by
/// [`apply`](Self::apply)ing the stream's events to [`Default::default`], and a
/// command is decided by [`handle`](Self::handle) against that state. Neither does
/// I/O: [`CommandHandler`](crate::CommandHandler) loads, decides, appends with
/// optimistic concurrency and retries.
///
/// # Example
/// ```
/// use serde::{Deserialize, Serialize};
/// use trellis_cqrs::Aggregate;
///
/// #[derive(Debug, Default)]
/// struct Account { open: bool, balance: u64 }
///
/// enum Command { Open, Withdraw(u64) }
///
/// #[derive(Debug, Serialize, Deserialize)]
/// enum Event { Opened, Withdrew { amount: u64 } }
///
/// #[derive(Debug, thiserror::Error)]
/// enum Refused {
///     #[error("the account is not open")]
///     NotOpen,
///     #[error("insufficient funds: balance {balance}, asked {asked}")]
///     InsufficientFunds { balance: u64, asked: u64 },
/// }
///
/// impl Aggregate for Account {
///     type Command = Command;
///     type Event = Event;
///     type Error = Refused;
///     const CATEGORY: &'static str = "account";
///
///     fn handle(&self, command: &Command) -> Result<Vec<Event>, Refused> {
///         match *command {
///             Command::Open if self.open => Ok(vec![]), // already open: nothing to do
///             Command::Open => Ok(vec![Event::Opened]),
///             Command::Withdraw(_) if !self.open => Err(Refused::NotOpen),
///             Command::Withdraw(asked) if asked > self.balance => {
///                 Err(Refused::InsufficientFunds { balance: self.balance, asked })
///             }
///             Command::Withdraw(amount) => Ok(vec![Event::Withdrew { amount }]),
///         }
///     }
///
///     fn apply(&mut self, event: Event) {
///         match event {
///             Event::Opened => self.open = true,
///             Event::Withdrew { amount } => self.balance -= amount,
///         }
///     }
/// }
///
/// let account = Account::default();
/// assert!(matches!(account.handle(&Command::Withdraw(1)), Err(Refused::NotOpen)));
/// assert_eq!(Account::stream_name("7").expect("valid").as_str(), "account-7");
/// ```
pub trait Aggregate: Default + Send + Sync + 'static {
    /// What callers ask of it.
    type Command: Send + Sync;
    /// What happened to it: an enum in serde's default (externally tagged)
    /// representation; see the [module docs](self).
    type Event: Serialize + DeserializeOwned + Send;
    /// Why it refuses a command (the domain's own errors).
    type Error: std::error::Error + Send + Sync + 'static;

    /// The category of its streams: `{CATEGORY}-{id}`. It must be a valid stream name
    /// without `-` (the category is the part of a stream name before the first `-`),
    /// and not `trellis` (Trellis's own streams).
    const CATEGORY: &'static str;

    /// Decides: the events that `command` causes in the current state, or why it is
    /// refused. No events means nothing to do; nothing is appended. Called again with
    /// fresh state when the append lost a race, so it must not have side effects.
    ///
    /// # Errors
    /// The aggregate's refusal, returned to the caller as
    /// [`CqrsError::Rejected`](crate::CqrsError::Rejected).
    fn handle(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Evolves: the state after `event`. It cannot fail: the event has happened.
    fn apply(&mut self, event: Self::Event);

    /// The stream of the instance `id`: `{CATEGORY}-{id}`.
    ///
    /// # Errors
    /// [`Invalid`] if that is not a valid stream name, or [`CATEGORY`](Self::CATEGORY)
    /// breaks the rules above.
    fn stream_name(id: &str) -> Result<StreamName, Invalid> {
        let category = Self::CATEGORY;
        if category.is_empty()
            || category.contains('-')
            || category == trellis_eventstore::event::INTERNAL_CATEGORY
        {
            return Err(Invalid(format!(
                "aggregate category {category:?} must be non-empty, contain no '-' and not be {:?}",
                trellis_eventstore::event::INTERNAL_CATEGORY
            )));
        }
        if id.is_empty() {
            return Err(Invalid(format!(
                "an aggregate id of category {category:?} must not be empty"
            )));
        }
        StreamName::new(format!("{category}-{id}"))
    }
}

/// Why an event could not be encoded as [`EventData`] or decoded from a
/// [`RecordedEvent`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The event did not serialize as one enum variant in serde's default
    /// representation (`{"Type": data}` or `"Type"`).
    #[error(
        "an event must serialize as an externally tagged enum variant ({{\"Type\": data}} or \"Type\"), got {found}"
    )]
    NotAVariant {
        /// What it serialized as instead.
        found: &'static str,
    },
    /// The event's `Serialize` implementation failed.
    #[error("serializing an event failed: {source}")]
    Serialize {
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
    /// A stored event's body is bytes, not JSON.
    #[error("event {ty:?} at {stream} version {version} is not JSON")]
    NotJson {
        /// Its type.
        ty: String,
        /// Its stream.
        stream: StreamName,
        /// Its version.
        version: u64,
    },
    /// A stored event does not deserialize as the expected event type.
    #[error("event {ty:?} at {stream} version {version} does not deserialize: {source}")]
    Deserialize {
        /// Its type.
        ty: String,
        /// Its stream.
        stream: StreamName,
        /// Its version.
        version: u64,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
}

/// Encodes an event as JSON [`EventData`] (fresh id, no metadata): the variant name
/// is the type, its content the data; see the [module docs](self).
///
/// # Errors
/// [`CodecError::NotAVariant`] if `event` is not an externally tagged enum variant,
/// [`CodecError::Serialize`] if it does not serialize.
pub fn encode_event<E: Serialize + ?Sized>(event: &E) -> Result<EventData, CodecError> {
    let value = serde_json::to_value(event).map_err(|source| CodecError::Serialize { source })?;
    let (ty, data) = match value {
        Value::String(ty) => (ty, Value::Null),
        Value::Object(map) if map.len() == 1 => match map.into_iter().next() {
            Some(pair) => pair,
            None => return Err(CodecError::NotAVariant { found: "an object" }),
        },
        Value::Object(_) => {
            return Err(CodecError::NotAVariant {
                found: "an object without exactly one field",
            });
        }
        Value::Null => return Err(CodecError::NotAVariant { found: "null" }),
        Value::Bool(_) => return Err(CodecError::NotAVariant { found: "a boolean" }),
        Value::Number(_) => return Err(CodecError::NotAVariant { found: "a number" }),
        Value::Array(_) => return Err(CodecError::NotAVariant { found: "an array" }),
    };
    Ok(EventData::json(ty, &data))
}

/// Decodes a stored event written by [`encode_event`] (or by anyone storing JSON
/// data under the variant's name): `{type: data}` deserialized as `E`.
///
/// Projections use it to read an aggregate's events:
/// `let event: AccountEvent = decode_event(&recorded)?;`.
///
/// # Errors
/// [`CodecError::NotJson`] for a bytes body, [`CodecError::Deserialize`] if the event
/// is not a variant of `E` or its data does not fit.
pub fn decode_event<E: DeserializeOwned>(event: &RecordedEvent) -> Result<E, CodecError> {
    let Body::Json(raw) = &event.data else {
        return Err(CodecError::NotJson {
            ty: event.ty.clone(),
            stream: event.stream.clone(),
            version: event.version,
        });
    };
    let deserialize = |source| CodecError::Deserialize {
        ty: event.ty.clone(),
        stream: event.stream.clone(),
        version: event.version,
        source,
    };
    // `{"<type>": <data>}`, built as text so the data is parsed once. A unit variant
    // accepts `{"<type>": null}` as well as `"<type>"`.
    let ty = serde_json::to_string(&event.ty).map_err(deserialize)?;
    let tagged = format!("{{{ty}:{}}}", raw.get());
    serde_json::from_str(&tagged).map_err(deserialize)
}

#[cfg(test)]
mod test {
    use serde::Deserialize;
    use serde_json::json;
    use trellis_eventstore::Metadata;

    use super::*;

    /// A `RecordedEvent` as a store would return it.
    fn recorded(data: EventData) -> RecordedEvent {
        RecordedEvent {
            id: data.id,
            stream: StreamName::new("thing-1").expect("name"),
            version: 3,
            position: 9,
            ty: data.ty,
            data: data.data,
            metadata: Metadata::default(),
            timestamp_ms: 0,
        }
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Event {
        Deposited {
            amount: u64,
        },
        Renamed(String),
        Maybe(Option<u32>),
        Closed,
        #[serde(rename = "thing.frozen")]
        Frozen,
    }

    #[test]
    fn variants_round_trip_with_their_names_as_types() {
        let cases = [
            (
                Event::Deposited { amount: 5 },
                "Deposited",
                json!({"amount": 5}),
            ),
            (Event::Renamed("x".into()), "Renamed", json!("x")),
            (Event::Maybe(None), "Maybe", json!(null)),
            (Event::Maybe(Some(2)), "Maybe", json!(2)),
            (Event::Closed, "Closed", json!(null)),
            (Event::Frozen, "thing.frozen", json!(null)),
        ];
        for (event, ty, data) in cases {
            let encoded = encode_event(&event).expect("encodes");
            assert_eq!(encoded.ty, ty);
            assert_eq!(encoded.data.to_value(), Some(data));
            let decoded: Event = decode_event(&recorded(encoded)).expect("decodes");
            assert_eq!(decoded, event);
        }
    }

    #[test]
    fn other_shapes_are_refused() {
        #[derive(Serialize)]
        #[serde(tag = "type")]
        enum Internally {
            A { x: u8 },
        }
        #[derive(Serialize)]
        struct Plain {
            x: u8,
            y: u8,
        }
        assert!(matches!(
            encode_event(&Internally::A { x: 1 }),
            Err(CodecError::NotAVariant { .. })
        ));
        assert!(matches!(
            encode_event(&Plain { x: 1, y: 2 }),
            Err(CodecError::NotAVariant { .. })
        ));
        assert!(matches!(
            encode_event(&3),
            Err(CodecError::NotAVariant { .. })
        ));
    }

    #[test]
    fn unknown_types_and_bytes_do_not_decode() {
        let unknown = recorded(EventData::json("Exploded", &json!({})));
        let err = decode_event::<Event>(&unknown).expect_err("not a variant");
        assert!(err.to_string().contains("Exploded"), "{err}");
        let mut bytes = recorded(EventData::json("Closed", &json!(null)));
        bytes.data = Body::Bytes(Default::default());
        assert!(matches!(
            decode_event::<Event>(&bytes),
            Err(CodecError::NotJson { .. })
        ));
        // A type with quotes cannot break out of the JSON it is put in.
        let quoted = recorded(EventData::json("a\"b", &json!(null)));
        assert!(matches!(
            decode_event::<Event>(&quoted),
            Err(CodecError::Deserialize { .. })
        ));
    }
}
