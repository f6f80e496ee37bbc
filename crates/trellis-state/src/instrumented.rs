use std::sync::Arc;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::{
    ETag, Item, Key, Operation, Page, Precondition, StateError, StateStore, Value, WriteOptions,
};

/// Wraps any [`StateStore`] and records, per operation, through the [`metrics`]
/// facade (install the recorder first: handles are registered on creation):
/// - `trellis_state_operations_total{store, backend, op, outcome}` — a counter, where
///   `outcome` is `ok` or [`StateError::outcome`];
/// - `trellis_state_operation_duration_seconds{store, backend, op}` — a histogram.
///
/// ```
/// use std::sync::Arc;
/// use trellis_state::{EmbeddedStore, Instrumented, StateStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let inner = Arc::new(EmbeddedStore::open(dir.path().join("s.redb"), Default::default())?);
/// let store = Instrumented::new("default", inner);
/// store.health().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Instrumented {
    inner: Arc<dyn StateStore>,
    /// Metric handles, registered once: the hot path does no label hashing or
    /// string allocation.
    metrics: Arc<[OpMetrics; OPS.len()]>,
}

/// The instrumented operations, indexing [`Instrumented::metrics`].
const OPS: [&str; 7] = [
    "get", "set", "delete", "bulk_get", "transact", "list", "health",
];
/// Every `outcome` label value: `ok`, then [`StateError::outcome`]'s.
const OUTCOMES: [&str; 6] = [
    "ok",
    "etag_mismatch",
    "key_exists",
    "conflict",
    "unavailable",
    "error",
];

#[derive(Debug)]
struct OpMetrics {
    duration: metrics::Histogram,
    outcomes: [metrics::Counter; OUTCOMES.len()],
}

impl Instrumented {
    /// Instruments `inner` under the component name `name`.
    pub fn new(name: &str, inner: Arc<dyn StateStore>) -> Self {
        let backend = inner.backend();
        let metrics = OPS.map(|op| OpMetrics {
            duration: metrics::histogram!(
                "trellis_state_operation_duration_seconds",
                "store" => name.to_owned(), "backend" => backend, "op" => op
            ),
            outcomes: OUTCOMES.map(|outcome| {
                metrics::counter!(
                    "trellis_state_operations_total",
                    "store" => name.to_owned(), "backend" => backend, "op" => op, "outcome" => outcome
                )
            }),
        });
        Self {
            inner,
            metrics: Arc::new(metrics),
        }
    }

    /// The wrapped store.
    pub fn get_ref(&self) -> &Arc<dyn StateStore> {
        &self.inner
    }

    fn record<T>(&self, op: usize, started: Instant, result: &Result<T, StateError>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        let m = &self.metrics[op];
        let index = OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(OUTCOMES.len() - 1);
        m.outcomes[index].increment(1);
        m.duration.record(started.elapsed().as_secs_f64());
    }
}

macro_rules! timed {
    ($self:ident, $op:ident, $call:expr) => {{
        let started = Instant::now();
        let result = $call.await;
        $self.record(op::$op, started, &result);
        result
    }};
}

/// Indices into [`OPS`].
mod op {
    pub(super) const GET: usize = 0;
    pub(super) const SET: usize = 1;
    pub(super) const DELETE: usize = 2;
    pub(super) const BULK_GET: usize = 3;
    pub(super) const TRANSACT: usize = 4;
    pub(super) const LIST: usize = 5;
    pub(super) const HEALTH: usize = 6;
}

#[async_trait]
impl StateStore for Instrumented {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn get(&self, key: &Key) -> Result<Option<Item>, StateError> {
        timed!(self, GET, self.inner.get(key))
    }

    async fn set(
        &self,
        key: &Key,
        value: Value,
        options: WriteOptions,
    ) -> Result<ETag, StateError> {
        timed!(self, SET, self.inner.set(key, value, options))
    }

    async fn delete(&self, key: &Key, precondition: Precondition) -> Result<bool, StateError> {
        timed!(self, DELETE, self.inner.delete(key, precondition))
    }

    async fn bulk_get(&self, keys: &[Key]) -> Result<Vec<Option<Item>>, StateError> {
        timed!(self, BULK_GET, self.inner.bulk_get(keys))
    }

    async fn transact(&self, operations: Vec<Operation>) -> Result<Vec<Option<ETag>>, StateError> {
        timed!(self, TRANSACT, self.inner.transact(operations))
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Page, StateError> {
        timed!(self, LIST, self.inner.list(prefix, after, limit))
    }

    async fn health(&self) -> Result<(), StateError> {
        timed!(self, HEALTH, self.inner.health())
    }

    async fn close(&self) -> Result<(), StateError> {
        self.inner.close().await
    }
}
