/// A boxed error from a backend's driver.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a state store operation failed.
///
/// Precondition failures ([`EtagMismatch`](Self::EtagMismatch),
/// [`KeyExists`](Self::KeyExists), [`TransactionConflict`](Self::TransactionConflict))
/// are answers about the data and changed nothing. [`Unavailable`](Self::Unavailable)
/// means the backend could not be reached and the caller may retry;
/// [`Backend`](Self::Backend) is anything else the backend reported.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// `If-Match` named an etag that is not the key's current one (or the key is absent).
    #[error("etag mismatch for key {key:?}")]
    EtagMismatch {
        /// The key.
        key: String,
    },
    /// `If-None-Match: *` but the key exists.
    #[error("key {key:?} already exists")]
    KeyExists {
        /// The key.
        key: String,
    },
    /// A transaction's precondition failed; nothing in it was applied.
    #[error("transaction conflict at operation {index} (key {key:?}): {reason}")]
    TransactionConflict {
        /// Index of the failing operation in the request.
        index: usize,
        /// Its key.
        key: String,
        /// Which precondition failed.
        reason: Box<StateError>,
    },
    /// The backend could not be reached (connection refused, timeout, pool exhausted).
    #[error("{backend} backend unavailable: {source}")]
    Unavailable {
        /// `embedded`, `postgres` or `redis`.
        backend: &'static str,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// Any other backend failure.
    #[error("{backend} backend error: {source}")]
    Backend {
        /// `embedded`, `postgres` or `redis`.
        backend: &'static str,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
}

impl StateError {
    pub(crate) fn backend(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Backend {
            backend,
            source: source.into(),
        }
    }

    pub(crate) fn unavailable(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Unavailable {
            backend,
            source: source.into(),
        }
    }

    /// Wraps a precondition failure of operation `index` as a transaction conflict.
    pub(crate) fn in_transaction(self, index: usize) -> Self {
        let key = match &self {
            Self::EtagMismatch { key } | Self::KeyExists { key } => key.clone(),
            _ => return self,
        };
        Self::TransactionConflict {
            index,
            key,
            reason: Box::new(self),
        }
    }

    /// A short, stable name for metrics: `ok` is not an error, so this is one of
    /// `etag_mismatch`, `key_exists`, `conflict`, `unavailable`, `error`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::EtagMismatch { .. } => "etag_mismatch",
            Self::KeyExists { .. } => "key_exists",
            Self::TransactionConflict { .. } => "conflict",
            Self::Unavailable { .. } => "unavailable",
            Self::Backend { .. } => "error",
        }
    }
}
