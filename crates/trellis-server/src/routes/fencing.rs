//! Fencing reaches storage: a state write carrying `Trellis-Fencing: <lock>:<token>`
//! is refused with 409 `stale_fencing_token` once a newer token of that lock exists.
//! A leader fences its writes with its term's token as
//! `Trellis-Fencing: election/<name>:<token>` (`lock/<name>:<token>` is the long
//! form of a lock's).
//!
//! Two checks, so that neither a paused old holder nor a race slips through:
//! 1. the coordinator's newest token of the lock (a newer holder exists, even if it
//!    has not written yet);
//! 2. the highest token that has written to this store, kept in the store under
//!    `trellis/fence/<lock>` (`trellis/fence/election/<name>`) and advanced **in the same transaction** as the write,
//!    with an If-Match on its etag: once a newer holder has written, an older one
//!    can't, however late its request arrives.
//!
//! An old holder's write that lands before any newer token exists is simply ordered
//! before the new holder's writes, which is what a lock promises.

use axum::http::{HeaderMap, StatusCode};
use trellis_coord::{Kind, Name};
use trellis_state::{
    ETag, Key, Operation, Precondition, StateError, StateStore, Value, WriteOptions,
};

use super::AppState;
use crate::ApiError;

/// The request header.
pub(crate) const HEADER: &str = "trellis-fencing";
/// Attempts when another writer of the same lock advances the fence concurrently.
const ATTEMPTS: usize = 8;

/// A write's fence: the lock and the token its holder got.
#[derive(Debug, Clone)]
pub(crate) struct Fence {
    kind: Kind,
    lock: Name,
    token: u64,
}

/// The `Trellis-Fencing` header, if present.
pub(crate) fn fence_of(headers: &HeaderMap) -> Result<Option<Fence>, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    let bad = |why: String| ApiError::bad_request("invalid_fencing_token", why);
    let text = value
        .to_str()
        .map_err(|_| bad("Trellis-Fencing must be ASCII: <lock>:<token>".into()))?;
    let (lock, token) = text
        .rsplit_once(':')
        .ok_or_else(|| bad(format!("Trellis-Fencing is <lock>:<token>, got {text:?}")))?;
    let (kind, lock) = match lock.trim().split_once('/') {
        None => (Kind::Lock, lock.trim()),
        Some(("lock", name)) => (Kind::Lock, name),
        Some(("election", name)) => (Kind::Election, name),
        Some((other, _)) => {
            return Err(bad(format!(
                "Trellis-Fencing is [lock/|election/]<name>:<token>; unknown kind {other:?}"
            )));
        }
    };
    let lock = Name::new(lock).map_err(|e| bad(e.to_string()))?;
    let token = token.trim().parse().map_err(|_| {
        bad(format!(
            "the token in Trellis-Fencing is a number, got {token:?}"
        ))
    })?;
    Ok(Some(Fence { kind, lock, token }))
}

fn stale(fence: &Fence, newer: u64) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "stale_fencing_token",
        format!(
            "token {} of {} {} is stale: token {newer} has been issued",
            fence.token, fence.kind, fence.lock
        ),
    )
    .with_extension("latest_token", newer)
}

/// Why a fenced write failed.
#[derive(Debug)]
enum Failure {
    /// Refused before writing (stale token, bad fence, backend trouble).
    Api(ApiError),
    /// The store refused the caller's operations, with the caller's indexes.
    State(StateError),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl From<StateError> for Failure {
    fn from(e: StateError) -> Self {
        Self::Api(e.into())
    }
}

impl From<trellis_coord::CoordError> for Failure {
    fn from(e: trellis_coord::CoordError) -> Self {
        Self::Api(e.into())
    }
}

/// Applies `operations` atomically if `fence` is current; returns their etags.
/// Errors of the operations are reported with the indexes the caller gave them.
pub(crate) async fn transact(
    app: &AppState,
    store: &std::sync::Arc<dyn StateStore>,
    fence: &Fence,
    operations: Vec<Operation>,
) -> Result<Vec<Option<ETag>>, ApiError> {
    attempt(app, store, fence, operations)
        .await
        .map_err(|f| match f {
            Failure::Api(e) => e,
            Failure::State(e) => e.into(),
        })
}

async fn attempt(
    app: &AppState,
    store: &std::sync::Arc<dyn StateStore>,
    fence: &Fence,
    operations: Vec<Operation>,
) -> Result<Vec<Option<ETag>>, Failure> {
    let key = match fence.kind {
        Kind::Lock => format!("trellis/fence/{}", fence.lock),
        Kind::Election => format!("trellis/fence/election/{}", fence.lock),
    };
    let key =
        Key::new(key).map_err(|e| ApiError::bad_request("invalid_fencing_token", e.to_string()))?;
    for _ in 0..ATTEMPTS {
        if let Some(coord) = &app.coord {
            let latest = coord.latest_token(fence.kind, &fence.lock).await?;
            if fence.token < latest {
                return Err(Failure::Api(stale(fence, latest)));
            }
        }
        let stored = store.get(&key).await?;
        let seen = stored.as_ref().and_then(|item| {
            std::str::from_utf8(&item.value.data)
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
        });
        if let Some(seen) = seen
            && fence.token < seen
        {
            return Err(Failure::Api(stale(fence, seen)));
        }
        let precondition = stored.map_or(Precondition::IfAbsent, |item| {
            Precondition::IfMatch(item.etag)
        });
        let mut all = Vec::with_capacity(operations.len() + 1);
        all.push(Operation::Upsert {
            key: key.clone(),
            value: Value::new(fence.token.to_string(), "text/plain"),
            options: WriteOptions {
                precondition,
                ttl: None,
            },
        });
        all.extend(operations.iter().cloned());
        match store.transact(all).await {
            Ok(mut etags) => {
                etags.remove(0);
                return Ok(etags);
            }
            // Another writer of this lock moved the fence: look again.
            Err(StateError::TransactionConflict { index: 0, .. }) => {}
            Err(StateError::TransactionConflict { index, key, reason }) => {
                return Err(Failure::State(StateError::TransactionConflict {
                    index: index - 1,
                    key,
                    reason,
                }));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Failure::Api(ApiError::new(
        StatusCode::CONFLICT,
        "transaction_conflict",
        format!("{} {}'s fence kept moving; retry", fence.kind, fence.lock),
    )))
}

/// A single write under a fence, with the plain write's error codes
/// (`etag_mismatch`, `key_exists`) for its own precondition.
pub(crate) async fn single(
    app: &AppState,
    store: &std::sync::Arc<dyn StateStore>,
    fence: &Fence,
    operation: Operation,
) -> Result<Option<ETag>, ApiError> {
    match attempt(app, store, fence, vec![operation]).await {
        Ok(mut etags) => Ok(etags.pop().flatten()),
        Err(Failure::Api(e)) => Err(e),
        Err(Failure::State(StateError::TransactionConflict { reason, .. })) => {
            Err((*reason).into())
        }
        Err(Failure::State(e)) => Err(e.into()),
    }
}
