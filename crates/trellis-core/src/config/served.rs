//! `[app]`: the application this sidecar serves (it registers the app in the service
//! registry and heartbeats for it), and `[components.coord.default]`: the backend of
//! locks, elections and fencing.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::units;

/// `[app]`: the application this sidecar serves.
///
/// ```toml
/// [app]
/// id = "orders"
/// url = "http://127.0.0.1:8080"
/// health_path = "/health"   # optional: heartbeat only while this answers 2xx
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct ServedApp {
    /// The app's id: its service name in the registry, and `{app}` in
    /// `/v1/invoke/{app}` for callers whose `[apps.<id>]` uses `discovery = "registry"`.
    pub id: String,
    /// Where the app listens; registered as the instance's address.
    pub url: String,
    /// The instance id; defaults to `<id>-<port of server.listen>`.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// If set, the sidecar heartbeats only while `GET <url><health_path>` answers
    /// 2xx, so a hung app is reported by the registry as well as a dead one.
    #[serde(default)]
    pub health_path: Option<String>,
    /// Whether to register the app at all.
    #[serde(default = "yes")]
    pub register: bool,
    /// The registration's TTL: missing heartbeats this long make it suspect.
    #[serde(default = "default_ttl", deserialize_with = "units::duration")]
    pub ttl: Duration,
    /// How often the sidecar heartbeats (well under `ttl`).
    #[serde(default = "default_heartbeat", deserialize_with = "units::duration")]
    pub heartbeat_interval: Duration,
    /// A dead registration is removed this long after it died.
    #[serde(default = "default_deregister", deserialize_with = "units::duration")]
    pub deregister_after: Duration,
    /// Labels registered with the instance (zone, version...).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}
fn default_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(3)
}
fn default_deregister() -> Duration {
    Duration::from_secs(60)
}

impl ServedApp {
    /// The instance id to register under, given the sidecar's port.
    pub fn instance_id(&self, port: u16) -> String {
        self.instance_id
            .clone()
            .unwrap_or_else(|| format!("{}-{port}", self.id))
    }

    /// Problems, as `(field, message)`.
    pub(crate) fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(reason) = registry_name_problem(&self.id) {
            out.push(("id", reason));
        }
        if let Some(reason) = self.instance_id.as_deref().and_then(registry_name_problem) {
            out.push(("instance_id", reason));
        }
        if let Err(e) = super::check_instance_url(&self.url) {
            out.push(("url", e));
        }
        if let Some(path) = &self.health_path
            && !path.starts_with('/')
        {
            out.push(("health_path", format!("must start with '/', got {path:?}")));
        }
        if self.ttl < Duration::from_millis(100) || self.ttl > Duration::from_secs(3600) {
            out.push(("ttl", "must be between 100ms and 1h".into()));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.ttl {
            out.push((
                "heartbeat_interval",
                format!(
                    "must be above 0 and below ttl ({})",
                    humantime::format_duration(self.ttl)
                ),
            ));
        }
        if self.deregister_after > Duration::from_secs(7 * 24 * 3600) {
            out.push(("deregister_after", "must be at most 7 days".into()));
        }
        out
    }
}

/// Why `name` can't be a registry service or instance id (the coordination name
/// alphabet: 1-128 of ASCII letters, digits, `-`, `_`, `.`).
pub(crate) fn registry_name_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    (!ok).then(|| format!("invalid name {name:?}: use 1-128 of A-Z, a-z, 0-9, '-', '_' and '.'"))
}

/// `[components.coord.default]`: where locks, elections and fencing tokens live.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CoordComponent {
    /// Single node: leases in memory, tokens fsynced to `<data_dir>/coord.redb`.
    Embedded(EmbeddedCoord),
    /// etcd (leases, revisions as tokens); needs a binary built with `--features etcd`.
    Etcd(EtcdCoord),
    /// PostgreSQL (lease rows, expiry in the database's clock).
    Postgres(PostgresCoord),
}

impl CoordComponent {
    /// The accepted `type` values.
    pub const TYPES: [&'static str; 3] = ["embedded", "etcd", "postgres"];
}

/// `type = "embedded"`: no settings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct EmbeddedCoord {}

/// `type = "etcd"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct EtcdCoord {
    /// Client URLs, e.g. `["http://127.0.0.1:2379"]`.
    pub endpoints: Vec<String>,
    /// Key prefix for everything Trellis stores.
    pub prefix: String,
    /// How long to wait for a connection.
    #[serde(deserialize_with = "units::duration")]
    pub connect_timeout: Duration,
}

impl Default for EtcdCoord {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "trellis/coord/".into(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// `type = "postgres"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct PostgresCoord {
    /// Connection URL.
    pub url: String,
    /// Schema for the lease table (created if missing).
    pub schema: String,
    /// Pool size.
    pub max_connections: u32,
}

impl Default for PostgresCoord {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/test".into(),
            schema: "trellis_coord".into(),
            max_connections: 8,
        }
    }
}
