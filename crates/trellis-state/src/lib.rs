//! The state store building block: a key-value store with etags (optimistic
//! concurrency), TTLs and multi-key transactions, over interchangeable backends.
//!
//! Applications use it to keep state without choosing, deploying and wrapping a
//! database first; the same API works on an embedded file, on PostgreSQL shared by
//! several sidecars, or on Redis.
//!
//! # Layout
//! - [`StateStore`]: the backend trait and what every implementation guarantees,
//!   with its types ([`Key`], [`Value`], [`Item`], [`ETag`], [`Precondition`],
//!   [`Operation`], [`Page`]) and [`StateError`].
//! - [`backend`]: [`EmbeddedStore`] (redb, group commit), [`PostgresStore`] (sqlx),
//!   [`RedisStore`] (Lua scripts).
//! - [`Instrumented`]: a decorator recording per-operation metrics for any store.
//! - [`ResilientStore`]: a decorator applying resilience policies (timeouts, retry,
//!   breaker, bulkhead, faults) to any store.
//! - [`open`]: builds a store from a `[components.state.<name>]` config.
//! - `contract` (feature `contract`): the test suite every backend passes.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use trellis_state::{EmbeddedStore, Key, Precondition, StateError, StateStore, Value, WriteOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = EmbeddedStore::open(dir.path().join("state.redb"), Default::default())?;
//! let key = Key::new("cart-42")?;
//!
//! let etag = store.set(&key, Value::json(r#"{"items":1}"#), WriteOptions::default()).await?;
//! let item = store.get(&key).await?.expect("just written");
//! assert_eq!(item.etag, etag);
//!
//! // Compare-and-set: only succeeds against the etag we read.
//! let cas = WriteOptions { precondition: Precondition::IfMatch(etag.clone()), ttl: Some(Duration::from_secs(60)) };
//! let etag2 = store.set(&key, Value::json(r#"{"items":2}"#), cas.clone()).await?;
//! assert_ne!(etag, etag2);
//! let stale = store.set(&key, Value::json(r#"{"items":3}"#), cas).await;
//! assert!(matches!(stale, Err(StateError::EtagMismatch { .. })));
//! store.close().await?;
//! # Ok(())
//! # }
//! ```

pub mod backend;
mod error;
mod instrumented;
mod open;
mod resilient;
mod store;

#[cfg(feature = "contract")]
pub mod contract;

pub use backend::{EmbeddedOptions, EmbeddedStore, PostgresStore, RedisStore};
pub use error::{BoxError, StateError};
pub use instrumented::Instrumented;
pub use open::open;
pub use resilient::{ComponentPolicies, ResilientStore};
pub use store::{
    ETag, InvalidKey, Item, Key, MAX_KEY_LEN, MAX_TTL, Operation, Page, Precondition, StateStore,
    Value, WriteOptions,
};
