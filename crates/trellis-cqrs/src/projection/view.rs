//! The view: writes a projection records for one batch ([`ViewBatch`]), and reading
//! the committed view ([`View`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value as Json;
use trellis_state::{Key, Operation, Precondition, StateStore, Value, WriteOptions};

use super::ProjectionError;

/// The suffix of the checkpoint key under a projection's prefix.
pub(crate) const CHECKPOINT: &str = "$checkpoint";

/// What a batch knows of one key.
#[derive(Debug, Clone)]
struct Slot {
    /// The value as the batch leaves it; `None`: absent or deleted.
    value: Option<Json>,
    /// Whether the batch wrote it (else it was only read).
    written: bool,
}

/// The read-model writes of one batch of a [`Projection`](super::Projection),
/// committed by the runner together with the checkpoint, or not at all.
///
/// Keys are relative to the projection's prefix (`projections/{name}/` by
/// default); keys starting with `$` are reserved. Values are JSON.
/// [`get`](Self::get) sees the batch's own earlier writes, and otherwise reads the
/// committed view (caching what it read, so a batch reads each key at most once).
#[derive(Debug)]
pub struct ViewBatch {
    store: Arc<dyn StateStore>,
    prefix: Arc<str>,
    /// Sorted by key, so every batch writes its keys in one order (no deadlocks
    /// between engines' row locks).
    slots: BTreeMap<Key, Slot>,
}

impl ViewBatch {
    pub(crate) fn new(store: Arc<dyn StateStore>, prefix: Arc<str>) -> Self {
        Self {
            store,
            prefix,
            slots: BTreeMap::new(),
        }
    }

    /// The view's key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, key: &str) -> Result<Key, ProjectionError> {
        user_key(&self.prefix, key)
    }

    /// The value at `key`: this batch's latest write of it, else the committed one.
    ///
    /// # Errors
    /// [`ProjectionError::InvalidKey`], [`ProjectionError::Json`] if the value is not
    /// a `T`, [`ProjectionError::State`] if the store fails.
    pub async fn get<T: DeserializeOwned>(
        &mut self,
        key: &str,
    ) -> Result<Option<T>, ProjectionError> {
        let key = self.key(key)?;
        let value = match self.slots.get(&key) {
            Some(slot) => slot.value.clone(),
            None => {
                let value = read(self.store.as_ref(), &key).await?;
                self.slots.insert(
                    key.clone(),
                    Slot {
                        value: value.clone(),
                        written: false,
                    },
                );
                value
            }
        };
        value
            .map(|v| {
                serde_json::from_value(v).map_err(|source| ProjectionError::Json {
                    key: key.to_string(),
                    source,
                })
            })
            .transpose()
    }

    /// Sets `key` to `value` (as JSON).
    ///
    /// # Errors
    /// [`ProjectionError::InvalidKey`], [`ProjectionError::Json`] if `value` does not
    /// serialize.
    pub fn put<T: Serialize + ?Sized>(
        &mut self,
        key: &str,
        value: &T,
    ) -> Result<(), ProjectionError> {
        let key = self.key(key)?;
        let value = serde_json::to_value(value).map_err(|source| ProjectionError::Json {
            key: key.to_string(),
            source,
        })?;
        self.slots.insert(
            key,
            Slot {
                value: Some(value),
                written: true,
            },
        );
        Ok(())
    }

    /// Deletes `key` (absent keys are fine).
    ///
    /// # Errors
    /// [`ProjectionError::InvalidKey`].
    pub fn delete(&mut self, key: &str) -> Result<(), ProjectionError> {
        let key = self.key(key)?;
        self.slots.insert(
            key,
            Slot {
                value: None,
                written: true,
            },
        );
        Ok(())
    }

    /// How many keys the batch writes.
    pub fn writes(&self) -> usize {
        self.slots.values().filter(|s| s.written).count()
    }

    /// The batch's writes as state store operations, one per key, in key order.
    pub(crate) fn into_operations(self) -> Vec<Operation> {
        self.slots
            .into_iter()
            .filter(|(_, slot)| slot.written)
            .map(|(key, slot)| match slot.value {
                Some(value) => Operation::Upsert {
                    key,
                    value: json_value(&value),
                    options: WriteOptions::default(),
                },
                None => Operation::Delete {
                    key,
                    precondition: Precondition::None,
                },
            })
            .collect()
    }
}

/// Reads a projection's committed view, for queries.
///
/// Readers see whole batches: a batch's writes are committed at once. During a
/// [`rebuild`](super::ProjectionRunner::rebuild) the view is empty, then partial.
#[derive(Debug, Clone)]
pub struct View {
    store: Arc<dyn StateStore>,
    prefix: Arc<str>,
}

impl View {
    pub(crate) fn new(store: Arc<dyn StateStore>, prefix: Arc<str>) -> Self {
        Self { store, prefix }
    }

    /// The view's key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The committed value at `key` (relative to the prefix).
    ///
    /// # Errors
    /// [`ProjectionError::InvalidKey`], [`ProjectionError::Json`] if the value is not
    /// a `T`, [`ProjectionError::State`] if the store fails.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ProjectionError> {
        let key = user_key(&self.prefix, key)?;
        read(self.store.as_ref(), &key)
            .await?
            .map(|v| {
                serde_json::from_value(v).map_err(|source| ProjectionError::Json {
                    key: key.to_string(),
                    source,
                })
            })
            .transpose()
    }
}

/// `{prefix}{key}` for a key of the view (not starting with `$`).
fn user_key(prefix: &str, key: &str) -> Result<Key, ProjectionError> {
    if key.starts_with('$') {
        return Err(ProjectionError::invalid_key(
            key,
            "view keys starting with '$' are reserved",
        ));
    }
    if key.is_empty() {
        return Err(ProjectionError::invalid_key(key, "a view key is not empty"));
    }
    let full = format!("{prefix}{key}");
    Key::new(full.clone()).map_err(|e| ProjectionError::invalid_key(&full, e))
}

pub(crate) fn json_value(value: &Json) -> Value {
    // A `serde_json::Value` always serializes.
    Value::json(serde_json::to_vec(value).unwrap_or_default())
}

/// The JSON at `key`, if any.
pub(crate) async fn read(
    store: &dyn StateStore,
    key: &Key,
) -> Result<Option<Json>, ProjectionError> {
    let Some(item) = store.get(key).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&item.value.data)
        .map(Some)
        .map_err(|source| ProjectionError::Json {
            key: key.to_string(),
            source,
        })
}

#[cfg(test)]
mod test {
    use serde_json::json;
    use trellis_state::EmbeddedStore;

    use super::*;

    #[tokio::test]
    async fn a_batch_sees_its_own_writes_then_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn StateStore> = Arc::new(
            EmbeddedStore::open(dir.path().join("s.redb"), Default::default()).expect("open"),
        );
        let prefix: Arc<str> = Arc::from("projections/p/");
        store
            .set(
                &Key::new("projections/p/a").expect("key"),
                Value::json("1"),
                WriteOptions::default(),
            )
            .await
            .expect("set");
        let mut batch = ViewBatch::new(Arc::clone(&store), Arc::clone(&prefix));
        assert_eq!(batch.get::<u64>("a").await.expect("get"), Some(1));
        assert_eq!(batch.get::<u64>("b").await.expect("get"), None);
        batch.put("b", &json!({"n": 2})).expect("put");
        assert_eq!(
            batch.get::<Json>("b").await.expect("get"),
            Some(json!({"n": 2}))
        );
        batch.delete("a").expect("delete");
        assert_eq!(batch.get::<u64>("a").await.expect("get"), None);
        assert!(batch.put("$checkpoint", &1).is_err(), "reserved");
        assert!(batch.put("", &1).is_err());
        assert!(batch.put("tab\t", &1).is_err());
        assert!(matches!(
            batch.get::<String>("b").await,
            Err(ProjectionError::Json { .. })
        ));
        assert_eq!(batch.writes(), 2);
        let ops = batch.into_operations();
        let keys: Vec<&str> = ops.iter().map(|op| op.key().as_str()).collect();
        assert_eq!(
            keys,
            ["projections/p/a", "projections/p/b"],
            "sorted, reads left out"
        );
        assert!(matches!(ops[0], Operation::Delete { .. }));
        store.transact(ops).await.expect("transact");
        let view = View::new(store, prefix);
        assert_eq!(view.get::<u64>("a").await.expect("get"), None);
        assert_eq!(
            view.get::<Json>("b").await.expect("get"),
            Some(json!({"n": 2}))
        );
    }
}
