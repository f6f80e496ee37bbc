//! Exclusive locks on state keys, held by 2PC transactions between prepare and
//! phase two.
//!
//! A `state` participant locks every key it will write when it prepares, so that
//! nothing else can change them before it commits (which would break the
//! preconditions it checked) — neither another transaction (whose prepare then
//! votes abort with `key_locked`) nor a plain write through the sidecar's state API,
//! which asks [`KeyLocks::holder`] (or takes a [`WriteGuard`] with
//! [`KeyLocks::begin_write`]) first.
//!
//! The table is in memory and shared by one sidecar: after a restart, recovery
//! takes the locks of every transaction still committing again, before the sidecar
//! serves requests. Sidecars sharing a store do not see each other's locks.
//!
//! ```
//! use trellis_saga::twopc::locks::KeyLocks;
//!
//! let locks = KeyLocks::default();
//! let keys = vec!["a".to_owned(), "b".to_owned()];
//! locks.try_lock("default", &keys, "tx-1", "ledger").expect("free");
//! assert_eq!(locks.holder("default", "a").as_deref(), Some("tx-1"));
//! // Another transaction can't take them, nor can a plain write.
//! assert!(locks.try_lock("default", &keys[1..], "tx-2", "ledger").is_err());
//! assert!(locks.begin_write("default", &keys[..1]).is_err());
//! locks.release("tx-1", "ledger");
//! assert_eq!(locks.holder("default", "a"), None);
//! let guard = locks.begin_write("default", &keys).expect("free again");
//! // While a plain write is in progress, a prepare can't lock its keys.
//! assert!(locks.try_lock("default", &keys, "tx-3", "ledger").is_err());
//! drop(guard);
//! assert!(locks.try_lock("default", &keys, "tx-3", "ledger").is_ok());
//! ```

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Why keys could not be locked (or written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key {key:?} of store {store:?} is {}", match holder {
    Some(tx) => format!("locked by transaction {tx}"),
    None => "being written".to_owned(),
})]
pub struct LockConflict {
    /// The store.
    pub store: String,
    /// The first key that is taken.
    pub key: String,
    /// The transaction holding it; `None` when a plain write is in progress.
    pub holder: Option<String>,
}

#[derive(Debug, Default)]
struct Entry {
    /// The transaction holding the key, and which of its participants do.
    holder: Option<(String, BTreeSet<String>)>,
    /// Plain writes in progress.
    writers: usize,
}

#[derive(Debug, Default)]
struct Table {
    keys: HashMap<(String, String), Entry>,
    /// The keys each (transaction, participant) holds.
    held: HashMap<(String, String), Vec<(String, String)>>,
}

/// The key locks of one sidecar: `(store, key)` → the transaction holding it. Cheap
/// to clone (clones share the table).
#[derive(Debug, Clone, Default)]
pub struct KeyLocks {
    table: Arc<Mutex<Table>>,
}

impl KeyLocks {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks every key of `keys` in `store` for `participant` of transaction `tx`,
    /// all or none. Keys the same transaction holds already are fine.
    ///
    /// # Errors
    /// [`LockConflict`] naming the first key another transaction holds or a plain
    /// write is changing; nothing was locked.
    pub fn try_lock(
        &self,
        store: &str,
        keys: &[String],
        tx: &str,
        participant: &str,
    ) -> Result<(), LockConflict> {
        let mut table = self.table();
        for key in keys {
            if let Some(entry) = table.keys.get(&(store.to_owned(), key.clone())) {
                let other = entry.holder.as_ref().filter(|(holder, _)| holder != tx);
                if other.is_some() || entry.writers > 0 {
                    return Err(LockConflict {
                        store: store.to_owned(),
                        key: key.clone(),
                        holder: other.map(|(holder, _)| holder.clone()),
                    });
                }
            }
        }
        let mut taken = Vec::with_capacity(keys.len());
        for key in keys {
            let id = (store.to_owned(), key.clone());
            let entry = table.keys.entry(id.clone()).or_default();
            let (_, participants) = entry
                .holder
                .get_or_insert_with(|| (tx.to_owned(), BTreeSet::new()));
            if participants.insert(participant.to_owned()) {
                taken.push(id);
            }
        }
        table
            .held
            .entry((tx.to_owned(), participant.to_owned()))
            .or_default()
            .extend(taken);
        Ok(())
    }

    /// Releases every key `participant` of transaction `tx` holds. Releasing
    /// nothing is fine.
    pub fn release(&self, tx: &str, participant: &str) {
        let mut table = self.table();
        let Some(keys) = table.held.remove(&(tx.to_owned(), participant.to_owned())) else {
            return;
        };
        for id in keys {
            let Some(entry) = table.keys.get_mut(&id) else {
                continue;
            };
            if let Some((holder, participants)) = &mut entry.holder
                && holder == tx
            {
                participants.remove(participant);
                if participants.is_empty() {
                    entry.holder = None;
                }
            }
            if entry.holder.is_none() && entry.writers == 0 {
                table.keys.remove(&id);
            }
        }
    }

    /// The transaction holding `key` of `store`, if any.
    pub fn holder(&self, store: &str, key: &str) -> Option<String> {
        self.table()
            .keys
            .get(&(store.to_owned(), key.to_owned()))
            .and_then(|e| e.holder.as_ref().map(|(tx, _)| tx.clone()))
    }

    /// How many keys are locked by transactions now.
    pub fn locked(&self) -> usize {
        self.table()
            .keys
            .values()
            .filter(|e| e.holder.is_some())
            .count()
    }

    /// Marks a plain write of `keys` in `store` as in progress until the guard is
    /// dropped: a prepare can't lock them meanwhile (it votes abort instead).
    ///
    /// # Errors
    /// [`LockConflict`] if a transaction holds one of them; write nothing then
    /// (HTTP: 409 or 423 with the holder).
    pub fn begin_write(&self, store: &str, keys: &[String]) -> Result<WriteGuard, LockConflict> {
        let mut table = self.table();
        for key in keys {
            if let Some((tx, _)) = table
                .keys
                .get(&(store.to_owned(), key.clone()))
                .and_then(|e| e.holder.as_ref())
            {
                return Err(LockConflict {
                    store: store.to_owned(),
                    key: key.clone(),
                    holder: Some(tx.clone()),
                });
            }
        }
        let ids: Vec<(String, String)> =
            keys.iter().map(|k| (store.to_owned(), k.clone())).collect();
        for id in &ids {
            table.keys.entry(id.clone()).or_default().writers += 1;
        }
        Ok(WriteGuard {
            locks: self.clone(),
            ids,
        })
    }
}

/// A plain write in progress (see [`KeyLocks::begin_write`]); ends when dropped.
#[derive(Debug)]
#[must_use = "the write counts as in progress only while the guard lives"]
pub struct WriteGuard {
    locks: KeyLocks,
    ids: Vec<(String, String)>,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let mut table = self.locks.table();
        for id in &self.ids {
            if let Some(entry) = table.keys.get_mut(id) {
                entry.writers = entry.writers.saturating_sub(1);
                if entry.writers == 0 && entry.holder.is_none() {
                    table.keys.remove(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn all_or_nothing() {
        let locks = KeyLocks::default();
        locks.try_lock("s", &keys(&["b"]), "t1", "p").expect("b");
        let conflict = locks
            .try_lock("s", &keys(&["a", "b", "c"]), "t2", "p")
            .expect_err("b is taken");
        assert_eq!(conflict.key, "b");
        assert_eq!(conflict.holder.as_deref(), Some("t1"));
        assert_eq!(locks.holder("s", "a"), None, "nothing taken");
        assert_eq!(locks.holder("other", "b"), None, "per store");
        assert_eq!(locks.locked(), 1);
    }

    #[test]
    fn participants_of_one_transaction_share_keys() {
        let locks = KeyLocks::default();
        locks.try_lock("s", &keys(&["a"]), "t1", "p1").expect("p1");
        locks
            .try_lock("s", &keys(&["a", "a"]), "t1", "p2")
            .expect("p2");
        locks.release("t1", "p1");
        assert_eq!(locks.holder("s", "a").as_deref(), Some("t1"), "p2 holds it");
        locks.release("t1", "p2");
        locks.release("t1", "p2");
        assert_eq!(locks.holder("s", "a"), None);
        assert_eq!(locks.locked(), 0);
        assert!(locks.table().keys.is_empty(), "no leftovers");
    }

    #[test]
    fn plain_writes_and_locks_exclude_each_other() {
        let locks = KeyLocks::default();
        let g1 = locks.begin_write("s", &keys(&["a"])).expect("free");
        let g2 = locks.begin_write("s", &keys(&["a"])).expect("writes share");
        let busy = locks
            .try_lock("s", &keys(&["a"]), "t", "p")
            .expect_err("busy");
        assert_eq!(busy.holder, None);
        assert!(busy.to_string().contains("being written"));
        drop(g1);
        assert!(locks.try_lock("s", &keys(&["a"]), "t", "p").is_err());
        drop(g2);
        locks.try_lock("s", &keys(&["a"]), "t", "p").expect("free");
        let held = locks.begin_write("s", &keys(&["a"])).expect_err("locked");
        assert!(held.to_string().contains("locked by transaction t"));
        locks.release("t", "p");
        assert!(locks.table().keys.is_empty());
    }
}
