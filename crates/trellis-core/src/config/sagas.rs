//! `[components.sagas.default]` (the saga and 2PC log) and `[sagas.<name>]`
//! (saga definitions).
//!
//! Definitions are kept here as JSON: their schema belongs to `trellis-saga`, which
//! checks them (with key paths such as `sagas.transfer.steps[0].action.path`) when
//! the sidecar starts and in `trellis config check`.

use serde::Deserialize;

/// `[components.sagas.default]`: where sagas, 2PC transactions and saga definitions
/// are logged.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SagaLogComponent {
    /// Single node: `<data_dir>/sagas.redb`, fsynced before every step.
    Embedded(EmbeddedSagaLog),
    /// PostgreSQL: one table, shared by every sidecar connected to the schema.
    Postgres(PostgresSagaLog),
}

impl SagaLogComponent {
    /// The accepted `type` values.
    pub const TYPES: [&'static str; 2] = ["embedded", "postgres"];
}

/// `type = "embedded"`: no settings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct EmbeddedSagaLog {}

/// `type = "postgres"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct PostgresSagaLog {
    /// Connection URL.
    pub url: String,
    /// Schema of the log table (created if missing).
    pub schema: String,
    /// Pool size.
    pub max_connections: u32,
    /// Who drives the sagas this sidecar starts (resumed by it after a restart).
    /// Sidecars sharing a schema need distinct owners; default: the `[app]`
    /// instance id, else `<host>-<port of server.listen>`.
    pub owner: Option<String>,
}

impl Default for PostgresSagaLog {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/test".into(),
            schema: "trellis_saga".into(),
            max_connections: 8,
            owner: None,
        }
    }
}
