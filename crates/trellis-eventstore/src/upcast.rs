//! Upcasting: registered transforms that turn stored old shapes of events into the
//! current one as they are read, so that code (and HTTP clients) only ever see the
//! current shape while the stored events stay exactly as they were appended.
//!
//! [`Upcasting`] wraps any [`EventStore`]; every read — streams, `$all`,
//! categories, and so catch-up and persistent subscriptions — passes each event
//! through the [`Upcaster`]s in order, each seeing the output of the ones before,
//! so a chain takes an event through several versions. Appends, snapshots and
//! everything else go to the wrapped store untouched.
//!
//! Upcasters come from Rust ([`json`], [`rename_type`], or any type implementing
//! [`Upcaster`]) or from declarative config rules ([`Rule`],
//! `[[components.eventstore.<name>.upcasters]]`).
//!
//! A schema version, where one is needed, lives in the event metadata as
//! `schema_version` (absent counts as 1): [`Rule`]s can match on it and set it.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use trellis_eventstore::embedded::EmbeddedEventStore;
//! use trellis_eventstore::upcast::{self, Upcasting};
//! use trellis_eventstore::{Append, EventData, EventStore, ExpectedVersion, ReadStream, StreamName};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let raw = Arc::new(EmbeddedEventStore::open(dir.path().join("e.redb")).await?);
//! let order = StreamName::new("order-1")?;
//! // Stored long ago, when totals were plain numbers.
//! let old = EventData::json("OrderPlaced", &serde_json::json!({"total": 42}));
//! raw.append(vec![Append { stream: order.clone(), expected: ExpectedVersion::Any, events: vec![old] }]).await?;
//!
//! let store = Upcasting::new(raw).with(upcast::json("OrderPlaced", |data| {
//!     if let Some(total) = data.get_mut("total").map(serde_json::Value::take) {
//!         data["amount"] = serde_json::json!({"value": total, "currency": "EUR"});
//!         data.as_object_mut().map(|o| o.remove("total"));
//!     }
//! }));
//! let read = store.read_stream(&order, ReadStream::default()).await?;
//! assert_eq!(read.events[0].data.to_value().unwrap_or_default()["amount"]["currency"], "EUR");
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};
use tokio::sync::watch;
use trellis_core::config::UpcastRule;

use crate::{
    Append, Appended, Body, Deletion, EventStore, EventStoreError, ExpectedVersion, ReadStream,
    RecordedEvent, Snapshot, StreamInfo, StreamMetadata, StreamName, StreamSlice,
};

/// The metadata field holding an event's schema version.
pub const SCHEMA_VERSION: &str = "schema_version";

/// Turns an event as stored into its current shape.
pub trait Upcaster: fmt::Debug + Send + Sync + 'static {
    /// The event in its current shape (unchanged if this upcaster doesn't apply).
    fn upcast(&self, event: RecordedEvent) -> RecordedEvent;
}

/// An event store that upcasts every event it reads; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Upcasting {
    inner: Arc<dyn EventStore>,
    chain: Vec<Arc<dyn Upcaster>>,
}

impl Upcasting {
    /// Wraps `inner`, with no upcasters yet.
    pub fn new(inner: Arc<dyn EventStore>) -> Self {
        Self {
            inner,
            chain: Vec::new(),
        }
    }

    /// Adds an upcaster at the end of the chain.
    #[must_use]
    pub fn with(mut self, upcaster: impl Upcaster) -> Self {
        self.chain.push(Arc::new(upcaster));
        self
    }

    /// Adds a declarative rule per entry of `rules`, in order.
    #[must_use]
    pub fn with_rules(mut self, rules: &[UpcastRule]) -> Self {
        for rule in rules {
            self.chain.push(Arc::new(Rule::new(rule.clone())));
        }
        self
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn EventStore> {
        &self.inner
    }

    /// Runs one event through the chain.
    pub fn upcast(&self, event: RecordedEvent) -> RecordedEvent {
        self.chain.iter().fold(event, |event, u| u.upcast(event))
    }

    fn upcast_all(&self, events: Vec<RecordedEvent>) -> Vec<RecordedEvent> {
        if self.chain.is_empty() {
            return events;
        }
        events.into_iter().map(|e| self.upcast(e)).collect()
    }
}

#[async_trait]
impl EventStore for Upcasting {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn append(&self, appends: Vec<Append>) -> Result<Vec<Appended>, EventStoreError> {
        self.inner.append(appends).await
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        read: ReadStream,
    ) -> Result<StreamSlice, EventStoreError> {
        let mut slice = self.inner.read_stream(stream, read).await?;
        slice.events = self.upcast_all(std::mem::take(&mut slice.events));
        Ok(slice)
    }

    async fn read_all(
        &self,
        position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, EventStoreError> {
        Ok(self.upcast_all(self.inner.read_all(position, limit).await?))
    }

    async fn read_category(
        &self,
        category: &str,
        position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, EventStoreError> {
        Ok(self.upcast_all(self.inner.read_category(category, position, limit).await?))
    }

    fn head(&self) -> watch::Receiver<u64> {
        self.inner.head()
    }

    async fn stream_info(
        &self,
        stream: &StreamName,
    ) -> Result<Option<StreamInfo>, EventStoreError> {
        self.inner.stream_info(stream).await
    }

    async fn set_metadata(
        &self,
        stream: &StreamName,
        metadata: StreamMetadata,
    ) -> Result<(), EventStoreError> {
        self.inner.set_metadata(stream, metadata).await
    }

    async fn delete(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        how: Deletion,
    ) -> Result<(), EventStoreError> {
        self.inner.delete(stream, expected, how).await
    }

    async fn save_snapshot(
        &self,
        stream: &StreamName,
        snapshot: Snapshot,
    ) -> Result<(), EventStoreError> {
        self.inner.save_snapshot(stream, snapshot).await
    }

    async fn load_snapshot(
        &self,
        stream: &StreamName,
    ) -> Result<Option<Snapshot>, EventStoreError> {
        self.inner.load_snapshot(stream).await
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>, EventStoreError> {
        self.inner.load_checkpoint(name).await
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), EventStoreError> {
        self.inner.save_checkpoint(name, position).await
    }

    async fn health(&self) -> Result<(), EventStoreError> {
        self.inner.health().await
    }

    async fn close(&self) -> Result<(), EventStoreError> {
        self.inner.close().await
    }
}

/// An upcaster that edits the JSON data of events of one type in place.
pub struct JsonUpcaster<F> {
    event_type: String,
    edit: F,
}

impl<F> fmt::Debug for JsonUpcaster<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonUpcaster")
            .field("event_type", &self.event_type)
            .finish_non_exhaustive()
    }
}

/// Upcasts the JSON data of events of `event_type` with `edit`. Events with binary
/// data pass unchanged.
pub fn json<F>(event_type: impl Into<String>, edit: F) -> JsonUpcaster<F>
where
    F: Fn(&mut Value) + Send + Sync + 'static,
{
    JsonUpcaster {
        event_type: event_type.into(),
        edit,
    }
}

impl<F> Upcaster for JsonUpcaster<F>
where
    F: Fn(&mut Value) + Send + Sync + 'static,
{
    fn upcast(&self, mut event: RecordedEvent) -> RecordedEvent {
        if event.ty == self.event_type
            && let Some(mut data) = event.data.to_value()
        {
            (self.edit)(&mut data);
            event.data = Body::json(&data);
        }
        event
    }
}

/// An upcaster that renames an event type.
#[derive(Debug, Clone)]
pub struct RenameType {
    from: String,
    to: String,
}

/// Events of type `from` are read as type `to`.
pub fn rename_type(from: impl Into<String>, to: impl Into<String>) -> RenameType {
    RenameType {
        from: from.into(),
        to: to.into(),
    }
}

impl Upcaster for RenameType {
    fn upcast(&self, mut event: RecordedEvent) -> RecordedEvent {
        if event.ty == self.from {
            event.ty.clone_from(&self.to);
        }
        event
    }
}

/// A declarative rule from the config; see [`UpcastRule`] for what each field does.
/// The data edits apply to JSON objects; binary data is left alone.
#[derive(Debug, Clone)]
pub struct Rule {
    rule: UpcastRule,
}

impl Rule {
    /// The upcaster of one rule.
    pub fn new(rule: UpcastRule) -> Self {
        Self { rule }
    }

    fn applies(&self, event: &RecordedEvent) -> bool {
        event.ty == self.rule.event_type
            && self
                .rule
                .before_version
                .is_none_or(|before| schema_version(event) < before)
    }
}

/// An event's schema version: the metadata `schema_version`, or 1.
pub fn schema_version(event: &RecordedEvent) -> u64 {
    event
        .metadata
        .extra
        .get(SCHEMA_VERSION)
        .and_then(Value::as_u64)
        .unwrap_or(1)
}

impl Upcaster for Rule {
    fn upcast(&self, mut event: RecordedEvent) -> RecordedEvent {
        if !self.applies(&event) {
            return event;
        }
        let r = &self.rule;
        let edits = !r.rename.is_empty() || !r.defaults.is_empty() || !r.remove.is_empty();
        if edits && let Some(mut data) = event.data.to_value() {
            for (from, to) in &r.rename {
                if let Some(value) = take(&mut data, from) {
                    set(&mut data, to, value);
                }
            }
            for (path, value) in &r.defaults {
                if get(&data, path).is_none() {
                    set(&mut data, path, value.clone());
                }
            }
            for path in &r.remove {
                take(&mut data, path);
            }
            event.data = Body::json(&data);
        }
        if let Some(ty) = &r.rename_type {
            event.ty.clone_from(ty);
        }
        if let Some(version) = r.set_version {
            event
                .metadata
                .extra
                .insert(SCHEMA_VERSION.to_owned(), Value::from(version));
        }
        event
    }
}

fn get<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.')
        .try_fold(value, |v, field| v.as_object()?.get(field))
}

/// Removes and returns the value at `path`, if there is one.
fn take(value: &mut Value, path: &str) -> Option<Value> {
    let (parent, leaf) = match path.rsplit_once('.') {
        Some((parent, leaf)) => (parent, leaf),
        None => return value.as_object_mut()?.remove(path),
    };
    let mut v = value;
    for field in parent.split('.') {
        v = v.as_object_mut()?.get_mut(field)?;
    }
    v.as_object_mut()?.remove(leaf)
}

/// Sets `path`, creating missing objects on the way. Does nothing if a value on the
/// way is not an object (nothing is overwritten to make room).
fn set(value: &mut Value, path: &str, new: Value) {
    let mut v = value;
    let mut fields = path.split('.').peekable();
    while let Some(field) = fields.next() {
        let Some(object) = v.as_object_mut() else {
            return;
        };
        if fields.peek().is_none() {
            object.insert(field.to_owned(), new);
            return;
        }
        v = object
            .entry(field.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

#[cfg(test)]
mod test {
    use std::collections::BTreeMap;

    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::Metadata;

    fn event(ty: &str, data: Value, version: Option<u64>) -> RecordedEvent {
        let mut metadata = Metadata::default();
        if let Some(v) = version {
            metadata.extra.insert(SCHEMA_VERSION.into(), Value::from(v));
        }
        RecordedEvent {
            id: Uuid::nil(),
            stream: StreamName::new("order-1").expect("name"),
            version: 0,
            position: 0,
            ty: ty.into(),
            data: Body::json(&data),
            metadata,
            timestamp_ms: 0,
        }
    }

    fn rule(before: Option<u64>, set_version: Option<u64>) -> Rule {
        Rule::new(UpcastRule {
            event_type: "OrderPlaced".into(),
            before_version: before,
            rename_type: None,
            rename: BTreeMap::from([("total".into(), "amount.value".into())]),
            defaults: BTreeMap::from([("amount.currency".into(), json!("EUR"))]),
            remove: vec!["legacy".into()],
            set_version,
        })
    }

    #[test]
    fn rules_move_default_and_remove_fields() {
        let old = event(
            "OrderPlaced",
            json!({"total": 42, "legacy": true, "id": 7}),
            None,
        );
        let new = rule(Some(2), Some(2)).upcast(old);
        assert_eq!(
            new.data.to_value(),
            Some(json!({"amount": {"value": 42, "currency": "EUR"}, "id": 7}))
        );
        assert_eq!(schema_version(&new), 2);
        // Already current: untouched, even by a rule that would change it.
        let current = event(
            "OrderPlaced",
            json!({"amount": {"value": 1, "currency": "USD"}}),
            Some(2),
        );
        assert_eq!(rule(Some(2), Some(2)).upcast(current.clone()), current);
        // Defaults never overwrite.
        let usd = event(
            "OrderPlaced",
            json!({"total": 5, "amount": {"currency": "USD"}}),
            None,
        );
        assert_eq!(
            rule(None, None).upcast(usd).data.to_value(),
            Some(json!({"amount": {"value": 5, "currency": "USD"}}))
        );
        // Other types pass.
        let other = event("OrderShipped", json!({"total": 1}), None);
        assert_eq!(rule(None, None).upcast(other.clone()), other);
    }

    #[test]
    fn set_never_overwrites_a_non_object() {
        let mut data = json!({"amount": 3});
        set(&mut data, "amount.value", json!(3));
        assert_eq!(data, json!({"amount": 3}));
        assert_eq!(take(&mut data, "amount.value"), None);
        assert_eq!(take(&mut data, "missing.deep"), None);
    }

    #[tokio::test]
    async fn chains_run_in_order_on_every_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = crate::embedded::EmbeddedEventStore::open(dir.path().join("e.redb"))
            .await
            .expect("open");
        let stream = StreamName::new("customer-1").expect("name");
        raw.append(vec![Append {
            stream: stream.clone(),
            expected: ExpectedVersion::Any,
            events: vec![crate::EventData::json(
                "CustomerMoved",
                &json!({"city": "Delft"}),
            )],
        }])
        .await
        .expect("append");
        let store = Upcasting::new(Arc::new(raw))
            .with(rename_type("CustomerMoved", "AddressChanged"))
            .with(json("AddressChanged", |d| {
                if let Some(o) = d.as_object_mut() {
                    o.insert("country".into(), json!("NL"));
                }
            }));
        let check = |e: &RecordedEvent| {
            assert_eq!(e.ty, "AddressChanged");
            assert_eq!(
                e.data.to_value(),
                Some(json!({"city": "Delft", "country": "NL"}))
            );
        };
        let slice = store
            .read_stream(&stream, ReadStream::default())
            .await
            .expect("read");
        check(&slice.events[0]);
        check(&store.read_all(0, 10).await.expect("all")[0]);
        check(
            &store
                .read_category("customer", 0, 10)
                .await
                .expect("category")[0],
        );
        // What is stored is unchanged.
        let stored = store.inner().read_all(0, 10).await.expect("raw");
        assert_eq!(stored[0].ty, "CustomerMoved");
        store.close().await.expect("close");
    }
}
