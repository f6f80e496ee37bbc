//! Dead letters: what every backend stores in a dead-letter topic, and what a replay
//! publishes back.

use bytes::Bytes;

use crate::event::{CloudEvent, Data, InvalidEvent, Stored};

/// Extension attributes Trellis adds to a dead letter: why, after how many
/// deliveries, from which topic and which consumer group.
pub const DEAD_LETTER_ATTRIBUTES: [&str; 4] = [
    "deadletterreason",
    "deliverycount",
    "deadlettersource",
    "deadlettergroup",
];

/// Why a message is dead-lettered, and where from.
#[derive(Debug, Clone, Copy)]
pub struct Cause<'a> {
    /// `deadletterreason`.
    pub reason: &'a str,
    /// `deliverycount`: deliveries made.
    pub attempts: u32,
    /// `deadlettersource`: the topic.
    pub topic: &'a str,
    /// `deadlettergroup`: the consumer group.
    pub group: &'a str,
}

/// The dead letter of a message whose structured CloudEvent JSON is `json`: the
/// event with the dead-letter attributes. A message that does not decode becomes a
/// `trellis.undecodable` event carrying its bytes, so nothing is lost.
pub fn dead_letter(json: &Bytes, cause: Cause<'_>) -> CloudEvent {
    let mut event = structured(json).unwrap_or_else(|_| {
        CloudEvent::new(
            "/trellis",
            "trellis.undecodable",
            Some(Data::Binary(json.clone())),
        )
    });
    for (name, value) in [
        ("deadletterreason", cause.reason.into()),
        ("deliverycount", cause.attempts.into()),
        ("deadlettersource", cause.topic.into()),
        ("deadlettergroup", cause.group.into()),
    ] {
        // Valid names and scalar values: this cannot fail.
        let _ = event.set_extension(name, value);
    }
    event
}

/// The event a dead letter (structured JSON `json`) was made from, for replaying it
/// to its topic: the dead-letter attributes removed.
///
/// # Errors
/// If `json` is not a valid CloudEvent.
pub fn revive(json: &Bytes) -> Result<CloudEvent, InvalidEvent> {
    let mut event = structured(json)?;
    for attribute in DEAD_LETTER_ATTRIBUTES {
        event.extensions.remove(attribute);
    }
    Ok(event)
}

fn structured(json: &Bytes) -> Result<CloudEvent, InvalidEvent> {
    Stored {
        key: None,
        id: String::new(),
        json: json.clone(),
    }
    .event()
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn dead_letters_carry_their_cause_and_revive_without_it() {
        let mut original = CloudEvent::new("/shop", "order.created", None);
        original
            .set_extension("partitionkey", "c-7".into())
            .expect("key");
        let json = Bytes::from(serde_json::to_vec(&original.to_structured()).expect("json"));
        let cause = Cause {
            reason: "poison",
            attempts: 5,
            topic: "orders",
            group: "billing",
        };
        let dead = dead_letter(&json, cause);
        assert_eq!(dead.extensions["deadletterreason"], "poison");
        assert_eq!(dead.extensions["deliverycount"], 5);
        assert_eq!(dead.extensions["deadlettergroup"], "billing");
        assert_eq!(dead.ordering_key(), Some("c-7"));
        let dead_json = Bytes::from(serde_json::to_vec(&dead.to_structured()).expect("json"));
        assert_eq!(revive(&dead_json).expect("revive"), original);

        let garbage = Bytes::from_static(b"\xff not json");
        let undecodable = dead_letter(&garbage, cause);
        assert_eq!(
            (undecodable.ty.as_str(), undecodable.data),
            ("trellis.undecodable", Some(Data::Binary(garbage.clone())))
        );
        assert!(revive(&garbage).is_err());
    }
}
