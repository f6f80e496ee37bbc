use std::path::PathBuf;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The database file could not be opened or created.
    #[error("cannot open database {}: {source}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// What redb reported.
        #[source]
        source: redb::DatabaseError,
    },
    /// The engine was closed; no more operations are accepted.
    #[error("storage engine is closed")]
    Closed,
    /// The write's batch was aborted, so nothing in it was committed. The reason was
    /// logged by the writer thread; retrying is safe.
    #[error("write not committed: {0}")]
    Aborted(String),
    /// The engine reported an error.
    #[error(transparent)]
    Engine(#[from] redb::Error),
    /// A blocking task could not run to completion.
    #[error("storage task failed: {0}")]
    Task(String),
}
