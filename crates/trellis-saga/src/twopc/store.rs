//! The `state` participant: writes to a state store, applied atomically on commit.
//!
//! Spec: `{"type":"state","store":"<component>","operations":[...]}`, the operations
//! in the shape of the state transaction API (`{"op":"upsert","key","value",
//! "etag"?,"ttl"?,"content_type"?}`, `{"op":"delete","key","etag"?}`).
//!
//! - **prepare** locks every key in the sidecar's [`KeyLocks`] (a key another
//!   transaction holds, or a plain write is changing, votes abort `key_locked`),
//!   then checks every operation's `etag` against the store (a mismatch releases the
//!   locks and votes abort `precondition_failed`).
//! - **commit** applies the operations with one [`StateStore::transact`] and
//!   releases the locks. The preconditions are not checked again: they held at
//!   prepare and nothing else could change the locked keys since, so the only write
//!   they could have missed is this commit's own earlier attempt — which the retry
//!   then repeats harmlessly.
//! - **abort** releases the locks.
//!
//! The locks live in memory; the operations are in the transaction's log record, so
//! after a restart [`Participant::recover`] takes the locks again for a
//! transaction still committing, and its commit is applied then.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use trellis_state::{ETag, Key, MAX_TTL, Operation, Precondition, StateStore, WriteOptions};

use super::locks::KeyLocks;
use super::participant::{Participant, ParticipantError, SpecError, TxContext, parse_spec};
use super::state::Vote;

/// Most operations of one participant.
pub(crate) const MAX_OPERATIONS: usize = 1000;
/// Longest accepted `content_type`.
const MAX_CONTENT_TYPE_LEN: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    store: String,
    operations: Vec<OperationSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperationSpec {
    op: String,
    key: String,
    #[serde(default, deserialize_with = "present")]
    value: Option<Value>,
    etag: Option<String>,
    ttl: Option<u64>,
    content_type: Option<String>,
}

/// Deserializes a present field, `null` included, as `Some`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Writes to one state store.
#[derive(Debug)]
pub(crate) struct StoreParticipant {
    store_name: String,
    store: Arc<dyn StateStore>,
    operations: Vec<Operation>,
    /// Every key written, once each.
    keys: Vec<String>,
    locks: KeyLocks,
}

impl StoreParticipant {
    pub(crate) fn from_spec(
        stores: &BTreeMap<String, Arc<dyn StateStore>>,
        locks: KeyLocks,
        _name: &str,
        spec: &Value,
    ) -> Result<Self, SpecError> {
        let Spec {
            store: store_name,
            operations,
        } = parse_spec(spec)?;
        let store = stores.get(&store_name).cloned().ok_or_else(|| {
            SpecError::unknown_target(format!(
                "no state store named {store_name:?}; configured stores: {}",
                stores.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        if operations.is_empty() || operations.len() > MAX_OPERATIONS {
            return Err(SpecError::invalid(format!(
                "operations: between 1 and {MAX_OPERATIONS}, got {}",
                operations.len()
            )));
        }
        let operations = operations
            .into_iter()
            .enumerate()
            .map(|(i, op)| operation(i, op))
            .collect::<Result<Vec<_>, _>>()?;
        let mut keys: Vec<String> = operations
            .iter()
            .map(|op| op.key().as_str().to_owned())
            .collect();
        keys.sort();
        keys.dedup();
        Ok(Self {
            store_name,
            store,
            operations,
            keys,
            locks,
        })
    }

    /// The first operation whose precondition does not hold now, with why.
    async fn check(&self) -> Result<Option<String>, ParticipantError> {
        for (i, op) in self.operations.iter().enumerate() {
            let (key, precondition) = match op {
                Operation::Upsert { key, options, .. } => (key, &options.precondition),
                Operation::Delete { key, precondition } => (key, precondition),
            };
            if *precondition == Precondition::None {
                continue;
            }
            let current = self.store.get(key).await.map_err(|e| {
                ParticipantError::new(format!("reading {key:?} from {}: {e}", self.store_name))
            })?;
            let failed = match (precondition, &current) {
                (Precondition::IfMatch(etag), Some(item)) if item.etag == *etag => None,
                (Precondition::IfMatch(etag), Some(item)) => Some(format!(
                    "etag is {:?}, not {:?}",
                    item.etag.as_str(),
                    etag.as_str()
                )),
                (Precondition::IfMatch(_) | Precondition::IfExists, None) => {
                    Some("the key does not exist".to_owned())
                }
                (Precondition::IfAbsent, Some(_)) => Some("the key exists".to_owned()),
                _ => None,
            };
            if let Some(why) = failed {
                return Ok(Some(format!(
                    "precondition_failed: operations[{i}] (key {key:?} of store {:?}): {why}",
                    self.store_name
                )));
            }
        }
        Ok(None)
    }
}

#[async_trait]
impl Participant for StoreParticipant {
    async fn prepare(&self, tx: &TxContext) -> Result<Vote, ParticipantError> {
        if let Err(conflict) = self.locks.try_lock(
            &self.store_name,
            &self.keys,
            &tx.transaction_id,
            &tx.participant,
        ) {
            return Ok(Vote::abort(format!("key_locked: {conflict}")));
        }
        match self.check().await {
            Ok(None) => Ok(Vote::Commit),
            Ok(Some(why)) => {
                self.locks.release(&tx.transaction_id, &tx.participant);
                Ok(Vote::abort(why))
            }
            Err(e) => {
                self.locks.release(&tx.transaction_id, &tx.participant);
                Err(e)
            }
        }
    }

    async fn commit(&self, tx: &TxContext) -> Result<(), ParticipantError> {
        let operations = self
            .operations
            .iter()
            .cloned()
            .map(|op| match op {
                Operation::Upsert {
                    key,
                    value,
                    options,
                } => Operation::Upsert {
                    key,
                    value,
                    options: WriteOptions {
                        precondition: Precondition::None,
                        ..options
                    },
                },
                Operation::Delete { key, .. } => Operation::Delete {
                    key,
                    precondition: Precondition::None,
                },
            })
            .collect();
        self.store.transact(operations).await.map_err(|e| {
            ParticipantError::new(format!("applying to store {:?}: {e}", self.store_name))
        })?;
        self.locks.release(&tx.transaction_id, &tx.participant);
        Ok(())
    }

    async fn abort(&self, tx: &TxContext) -> Result<(), ParticipantError> {
        self.locks.release(&tx.transaction_id, &tx.participant);
        Ok(())
    }

    async fn recover(&self, tx: &TxContext) -> Result<(), ParticipantError> {
        self.locks
            .try_lock(
                &self.store_name,
                &self.keys,
                &tx.transaction_id,
                &tx.participant,
            )
            .map_err(|conflict| ParticipantError::new(conflict.to_string()))
    }
}

/// An operation of the spec, checked.
fn operation(index: usize, op: OperationSpec) -> Result<Operation, SpecError> {
    let at = format!("operations[{index}]");
    let key = Key::new(op.key).map_err(|e| SpecError::invalid(format!("{at}.key: {e}")))?;
    let precondition = match op.etag.as_deref() {
        Some(etag) => Precondition::IfMatch(etag_of(etag).ok_or_else(|| {
            SpecError::invalid(format!("{at}.etag: invalid entity tag {etag:?}"))
        })?),
        None => Precondition::None,
    };
    match op.op.as_str() {
        "upsert" => {
            let value = op
                .value
                .ok_or_else(|| SpecError::invalid(format!("{at}: an upsert needs a value")))?;
            if let Some(ct) = &op.content_type {
                let valid = !ct.is_empty()
                    && ct.len() <= MAX_CONTENT_TYPE_LEN
                    && ct.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
                if !valid {
                    return Err(SpecError::invalid(format!(
                        "{at}.content_type is not a valid media type"
                    )));
                }
            }
            let value = state_value(value, op.content_type, &at)?;
            let ttl = match op.ttl {
                None => None,
                Some(secs) if secs > 0 && secs <= MAX_TTL.as_secs() => {
                    Some(Duration::from_secs(secs))
                }
                Some(secs) => {
                    return Err(SpecError::invalid(format!(
                        "{at}.ttl must be between 1 and {} seconds, got {secs}",
                        MAX_TTL.as_secs()
                    )));
                }
            };
            Ok(Operation::Upsert {
                key,
                value,
                options: WriteOptions { precondition, ttl },
            })
        }
        "delete" => {
            if op.value.is_some() || op.ttl.is_some() || op.content_type.is_some() {
                return Err(SpecError::invalid(format!(
                    "{at}: a delete takes only key and etag"
                )));
            }
            Ok(Operation::Delete { key, precondition })
        }
        other => Err(SpecError::invalid(format!(
            "{at}.op: unknown op {other:?}, expected \"upsert\" or \"delete\""
        ))),
    }
}

/// A JSON document (stored as `application/json`), or `{"value_base64": "..."}` for
/// raw bytes — as the state API takes them.
fn state_value(
    value: Value,
    content_type: Option<String>,
    at: &str,
) -> Result<trellis_state::Value, SpecError> {
    if let Value::Object(object) = &value
        && object.len() == 1
        && let Some(encoded) = object.get("value_base64")
    {
        let Value::String(encoded) = encoded else {
            return Err(SpecError::invalid(format!(
                "{at}.value.value_base64 must be a string"
            )));
        };
        let data = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_bytes())
            .map_err(|e| {
                SpecError::invalid(format!("{at}.value.value_base64 is not valid base64: {e}"))
            })?;
        return Ok(trellis_state::Value::new(
            data,
            content_type.unwrap_or_else(|| "application/octet-stream".into()),
        ));
    }
    let text = serde_json::to_vec(&value).map_err(|e| SpecError::invalid(e.to_string()))?;
    Ok(trellis_state::Value::new(
        text,
        content_type.unwrap_or_else(|| "application/json".into()),
    ))
}

/// An etag as the state API takes it in a JSON body: `"17"` or `"\"17\""`.
fn etag_of(text: &str) -> Option<ETag> {
    let inner = text
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(text);
    let valid = !inner.is_empty()
        && inner.len() <= 128
        && inner.bytes().all(|b| b.is_ascii_graphic() && b != b'"');
    valid.then(|| ETag::new(inner))
}

#[cfg(test)]
mod test {
    use serde_json::json;
    use trellis_state::{EmbeddedOptions, EmbeddedStore};

    use super::*;

    async fn fixture() -> (tempfile::TempDir, BTreeMap<String, Arc<dyn StateStore>>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path().join("s.redb"), EmbeddedOptions::default())
            .expect("open");
        let stores =
            BTreeMap::from([("default".to_owned(), Arc::new(store) as Arc<dyn StateStore>)]);
        (dir, stores)
    }

    fn ctx(tx: &str) -> TxContext {
        TxContext {
            transaction_id: tx.into(),
            participant: "p".into(),
            index: 0,
            payload: Value::Null,
            time_left: None,
        }
    }

    #[tokio::test]
    async fn specs_are_checked() {
        let (_dir, stores) = fixture().await;
        let locks = KeyLocks::default();
        let build = |spec: Value| StoreParticipant::from_spec(&stores, locks.clone(), "p", &spec);
        let ok = json!({"type": "state", "store": "default", "operations": [
            {"op": "upsert", "key": "a", "value": {"n": 1}, "ttl": 60},
            {"op": "upsert", "key": "b", "value": {"value_base64": "aGk="}},
            {"op": "delete", "key": "c", "etag": "\"7\""},
        ]});
        let p = build(ok).expect("valid");
        assert_eq!(p.keys, ["a", "b", "c"]);
        for (spec, code) in [
            (
                json!({"store": "nope", "operations": [{"op": "delete", "key": "a"}]}),
                "unknown_participant_target",
            ),
            (
                json!({"store": "default", "operations": []}),
                "invalid_participant",
            ),
            (
                json!({"store": "default", "operations": [{"op": "put", "key": "a"}]}),
                "invalid_participant",
            ),
            (
                json!({"store": "default", "operations": [{"op": "upsert", "key": "a"}]}),
                "invalid_participant",
            ),
            (
                json!({"store": "default", "operations": [{"op": "upsert", "key": "", "value": 1}]}),
                "invalid_participant",
            ),
            (
                json!({"store": "default", "operations": [{"op": "delete", "key": "a", "ttl": 3}]}),
                "invalid_participant",
            ),
            (
                json!({"store": "default", "operations": [{"op": "delete", "key": "a"}], "extra": 1}),
                "invalid_participant",
            ),
        ] {
            assert_eq!(
                build(spec.clone()).expect_err("invalid").code,
                code,
                "{spec}"
            );
        }
    }

    #[tokio::test]
    async fn prepare_locks_checks_and_commit_applies() {
        let (_dir, stores) = fixture().await;
        let store = Arc::clone(&stores["default"]);
        let etag = store
            .set(
                &Key::new("a").expect("key"),
                trellis_state::Value::json("1"),
                WriteOptions::default(),
            )
            .await
            .expect("set");
        let locks = KeyLocks::default();
        let spec = json!({"type": "state", "store": "default", "operations": [
            {"op": "upsert", "key": "a", "value": 2, "etag": etag.as_str()},
            {"op": "upsert", "key": "b", "value": 3},
        ]});
        let p = StoreParticipant::from_spec(&stores, locks.clone(), "p", &spec).expect("valid");
        assert_eq!(p.prepare(&ctx("t1")).await.expect("vote"), Vote::Commit);
        assert_eq!(locks.holder("default", "a").as_deref(), Some("t1"));
        // A second transaction on the same keys votes abort.
        let Vote::Abort { reason } = p.prepare(&ctx("t2")).await.expect("vote") else {
            panic!("locked")
        };
        assert!(reason.starts_with("key_locked"), "{reason}");
        p.commit(&ctx("t1")).await.expect("commit");
        p.commit(&ctx("t1")).await.expect("again: idempotent");
        assert_eq!(locks.locked(), 0);
        let a = store
            .get(&Key::new("a").expect("key"))
            .await
            .expect("get")
            .expect("a");
        assert_eq!(a.value.data.as_ref(), b"2");
        // The etag moved on: a new prepare fails its precondition and holds nothing.
        let Vote::Abort { reason } = p.prepare(&ctx("t3")).await.expect("vote") else {
            panic!("stale etag")
        };
        assert!(reason.starts_with("precondition_failed"), "{reason}");
        assert_eq!(locks.locked(), 0);
        p.abort(&ctx("t4"))
            .await
            .expect("abort of the unknown acks");
    }
}
