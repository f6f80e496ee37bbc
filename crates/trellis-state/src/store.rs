use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::StateError;

/// Longest key, in bytes of UTF-8.
pub const MAX_KEY_LEN: usize = 1024;

/// Longest TTL, ten years; longer TTLs are clamped to it by every backend.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A state key: 1–1024 bytes of UTF-8 without control characters.
///
/// Keys sort by their UTF-8 bytes in [`StateStore::list`].
///
/// ```
/// use trellis_state::Key;
/// assert!(Key::new("orders/2024/42").is_ok());
/// assert!(Key::new("").is_err());
/// assert!(Key::new("tab\there").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

/// Why a string is not a valid [`Key`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidKey {
    /// The key is empty.
    #[error("key must not be empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    #[error("key is {0} bytes long; the limit is 1024")]
    TooLong(usize),
    /// The key contains a control character.
    #[error("key contains control character U+{0:04X}")]
    ControlCharacter(u32),
}

impl Key {
    /// Validates `key`.
    ///
    /// # Errors
    /// [`InvalidKey`] naming the rule it breaks.
    pub fn new(key: impl Into<String>) -> Result<Self, InvalidKey> {
        let key = key.into();
        if key.is_empty() {
            return Err(InvalidKey::Empty);
        }
        if key.len() > MAX_KEY_LEN {
            return Err(InvalidKey::TooLong(key.len()));
        }
        if let Some(c) = key.chars().find(|c| c.is_control()) {
            return Err(InvalidKey::ControlCharacter(c as u32));
        }
        Ok(Self(key))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// An opaque entity tag naming one version of one key.
///
/// Every backend draws etags from a store-wide counter that never repeats, so an etag
/// read before a key was deleted can never match the key after it is re-created
/// (no ABA).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ETag(String);

impl ETag {
    /// Wraps an etag's text (without the HTTP quotes).
    pub fn new(tag: impl Into<String>) -> Self {
        Self(tag.into())
    }

    /// The etag's text, without quotes.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The revision number behind an etag this crate issued; `None` for any other
    /// text, which then matches nothing.
    pub(crate) fn revision(&self) -> Option<u64> {
        self.0.parse().ok()
    }

    pub(crate) fn from_revision(revision: u64) -> Self {
        Self(revision.to_string())
    }
}

impl fmt::Display for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A value and its content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// The bytes, stored and returned verbatim.
    pub data: Bytes,
    /// The media type the writer gave, returned to readers.
    pub content_type: String,
}

impl Value {
    /// A value with an explicit content type.
    pub fn new(data: impl Into<Bytes>, content_type: impl Into<String>) -> Self {
        Self {
            data: data.into(),
            content_type: content_type.into(),
        }
    }

    /// A JSON document (`application/json`), given as its text.
    pub fn json(text: impl Into<Bytes>) -> Self {
        Self::new(text, "application/json")
    }

    /// Raw bytes (`application/octet-stream`).
    pub fn bytes(data: impl Into<Bytes>) -> Self {
        Self::new(data, "application/octet-stream")
    }
}

/// A stored value with its current etag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The value and its content type.
    pub value: Value,
    /// The etag of this version.
    pub etag: ETag,
}

/// A condition a write checks atomically with applying it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Precondition {
    /// Write unconditionally.
    #[default]
    None,
    /// `If-Match: "<etag>"`: the key exists and its etag is this one.
    IfMatch(ETag),
    /// `If-Match: *`: the key exists.
    IfExists,
    /// `If-None-Match: *`: the key does not exist (an expired key does not exist).
    IfAbsent,
}

/// Options of a [`StateStore::set`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Checked atomically with the write.
    pub precondition: Precondition,
    /// Time to live from now; `None` stores the value without expiry (and clears any
    /// previous expiry of the key).
    pub ttl: Option<Duration>,
}

/// One operation of a [`StateStore::transact`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// Insert or replace a value.
    Upsert {
        /// The key.
        key: Key,
        /// The new value.
        value: Value,
        /// Precondition and TTL.
        options: WriteOptions,
    },
    /// Delete a key (absent keys are fine unless a precondition says otherwise).
    Delete {
        /// The key.
        key: Key,
        /// Checked atomically with the whole transaction.
        precondition: Precondition,
    },
}

impl Operation {
    /// The operation's key.
    pub fn key(&self) -> &Key {
        match self {
            Self::Upsert { key, .. } | Self::Delete { key, .. } => key,
        }
    }
}

/// One page of [`StateStore::list`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// Keys in ascending byte order.
    pub keys: Vec<Key>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next: Option<Key>,
}

impl Page {
    /// Builds a page from up to `limit + 1` keys fetched in order: the extra key, if
    /// present, only tells that a next page exists.
    pub(crate) fn from_overfetch(mut keys: Vec<Key>, limit: usize) -> Self {
        let next = if keys.len() > limit {
            keys.truncate(limit);
            keys.last().cloned()
        } else {
            None
        };
        Self { keys, next }
    }
}

/// A key-value store with etags, TTLs and transactions.
///
/// # To ensure correctness
/// Every implementation must guarantee, and `contract` checks:
/// 1. **Durable before return.** When a write method returns `Ok`, the write survives
///    a crash of this process (embedded: fsynced; engines: committed).
/// 2. **Atomic preconditions.** A [`Precondition`] is checked in the same atomic step
///    as the write: of N concurrent writers with `IfMatch(e)`, exactly one succeeds.
/// 3. **Fresh etags.** Every successful write yields an etag never issued before by
///    this store, even for a key deleted and re-created.
/// 4. **Expired means absent.** A key past its TTL is never returned by `get`,
///    `bulk_get` or `list`, and counts as absent for preconditions; it is deleted in
///    the background.
/// 5. **All or nothing.** [`transact`](Self::transact) applies every operation or none,
///    as if alone; operations see the effects of earlier ones in the same call.
#[async_trait]
pub trait StateStore: fmt::Debug + Send + Sync + 'static {
    /// The backend's name: `embedded`, `postgres` or `redis`.
    fn backend(&self) -> &'static str;

    /// The current value of `key`, or `None` if it is absent or expired.
    async fn get(&self, key: &Key) -> Result<Option<Item>, StateError>;

    /// Writes `value` at `key` if `options.precondition` holds, returning the new etag.
    ///
    /// # Errors
    /// [`StateError::EtagMismatch`] for a failed `IfMatch`/`IfExists`,
    /// [`StateError::KeyExists`] for a failed `IfAbsent`.
    async fn set(&self, key: &Key, value: Value, options: WriteOptions)
    -> Result<ETag, StateError>;

    /// Deletes `key` if `precondition` holds. Returns whether a live key was deleted.
    ///
    /// # Errors
    /// [`StateError::EtagMismatch`] for a failed `IfMatch`/`IfExists`.
    async fn delete(&self, key: &Key, precondition: Precondition) -> Result<bool, StateError>;

    /// The values of several keys, in order. The default calls [`get`](Self::get) for
    /// each; backends override it with one round trip.
    async fn bulk_get(&self, keys: &[Key]) -> Result<Vec<Option<Item>>, StateError> {
        let mut items = Vec::with_capacity(keys.len());
        for key in keys {
            items.push(self.get(key).await?);
        }
        Ok(items)
    }

    /// Applies every operation or none. Returns, per operation, the new etag of an
    /// upsert or `None` for a delete.
    ///
    /// # Errors
    /// [`StateError::TransactionConflict`] naming the first operation whose
    /// precondition failed; nothing was applied.
    async fn transact(&self, operations: Vec<Operation>) -> Result<Vec<Option<ETag>>, StateError>;

    /// Up to `limit` live keys starting with `prefix` and sorting after `after`.
    async fn list(
        &self,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Page, StateError>;

    /// Checks that the backend is reachable.
    async fn health(&self) -> Result<(), StateError>;

    /// Stops background work and releases resources once in-flight operations finish.
    /// Acknowledged writes are already durable, so there is nothing to flush.
    async fn close(&self) -> Result<(), StateError>;
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn key_rules() {
        assert!(Key::new("a").is_ok());
        assert!(Key::new("ünïcødé/键/🔑 with spaces").is_ok());
        assert!(Key::new("x".repeat(MAX_KEY_LEN)).is_ok());
        assert_eq!(Key::new(""), Err(InvalidKey::Empty));
        assert_eq!(
            Key::new("x".repeat(MAX_KEY_LEN + 1)),
            Err(InvalidKey::TooLong(1025))
        );
        assert_eq!(Key::new("a\nb"), Err(InvalidKey::ControlCharacter(10)));
        assert_eq!(Key::new("a\u{7f}"), Err(InvalidKey::ControlCharacter(0x7f)));
        assert_eq!(Key::new("a\u{85}"), Err(InvalidKey::ControlCharacter(0x85)));
        assert_eq!(Key::new("\0"), Err(InvalidKey::ControlCharacter(0)));
    }

    #[test]
    fn overfetched_pages() {
        let keys = |n: usize| {
            (0..n)
                .map(|i| Key::new(format!("k{i}")).expect("valid"))
                .collect::<Vec<_>>()
        };
        let page = Page::from_overfetch(keys(3), 2);
        assert_eq!(page.keys.len(), 2);
        assert_eq!(page.next.as_ref().map(Key::as_str), Some("k1"));
        let page = Page::from_overfetch(keys(2), 2);
        assert_eq!((page.keys.len(), page.next), (2, None));
    }

    #[allow(dead_code)]
    fn _object_safe(_: Box<dyn StateStore>) {}
}
