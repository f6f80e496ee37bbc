//! The SQL text of one coordinator, built once for its schema (identifiers can't be
//! bind parameters).
//!
//! Every statement binds `$1` = kind (`'lock'` | `'election'`) and `$2` = name.
//! Time is always `clock_timestamp()` — the database's clock when the expression is
//! evaluated — never `now()`, which is the start of the transaction.

use std::sync::Arc;

/// The server-side deadline of a lease granted or renewed for `ttl_us` (a bind
/// parameter) microseconds: one microsecond more than granted, because
/// `clock_timestamp()` truncates to microseconds and the name must not be freed
/// before the client's deadline (an instant taken before the request was sent, plus
/// the granted TTL).
fn deadline(ttl_us: &str) -> String {
    format!("clock_timestamp() + ({ttl_us}::bigint + 1) * interval '1 microsecond'")
}

/// Microseconds until a lease's deadline, never negative.
const REMAINING_US: &str =
    "GREATEST(floor(extract(epoch from l.expires_at - clock_timestamp()) * 1000000), 0)::bigint";

/// Every statement of a coordinator.
#[derive(Debug)]
pub(super) struct Statements {
    /// The `LISTEN` / `pg_notify` channel: the schema's name.
    pub(super) channel: String,
    /// Creates the schema and the table if missing (run under an advisory lock).
    pub(super) migrate: Vec<String>,
    /// Takes a name for `$3` (owner) for `$4` microseconds. One row:
    /// `(granted, token, holder, remaining_us, _)` — granted: the lease's token; not
    /// granted: the holder (if the lease is still valid) and when it runs out, as of
    /// the statement's snapshot. No row: refused, but the snapshot does not show the
    /// row that won (a concurrent grant committed after it was taken).
    pub(super) grant: Arc<str>,
    /// Extends `$3`'s lease with token `$4` to `$5` microseconds. One row
    /// `(renewed, holder)`, or none: nobody holds it.
    pub(super) renew: Arc<str>,
    /// Frees the name held by `$3` with token `$4`, and notifies. One row
    /// `(released, holder)`, or none: nobody holds it.
    pub(super) release: Arc<str>,
    /// The valid lease: `(owner, token, ttl_us, remaining_us)`, or no row.
    pub(super) holder: Arc<str>,
    /// The newest token issued: `token`, or no row (never used).
    pub(super) latest_token: Arc<str>,
}

impl Statements {
    /// The statements of the coordinator in `schema`, a checked identifier.
    pub(super) fn new(schema: &str) -> Self {
        let leases = format!("\"{schema}\".leases");
        // The channel is a checked identifier too, so it is safe as a literal.
        let notify = format!("pg_notify('{schema}', $1 || '/' || $2)::text");
        let granted_until = deadline("$4");
        let renewed_until = deadline("$5");
        let s = |sql: String| Arc::<str>::from(sql);
        Self {
            channel: schema.to_owned(),
            migrate: vec![
                format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""),
                // One row per (kind, name), never deleted: `token` only ever grows,
                // across restarts of every process. A free name has `owner` NULL; an
                // expired lease keeps its owner until the next grant overwrites it.
                format!(
                    "CREATE TABLE IF NOT EXISTS {leases} (\
                     kind TEXT COLLATE \"C\" NOT NULL CHECK (kind IN ('lock', 'election')), \
                     name TEXT COLLATE \"C\" NOT NULL, \
                     owner TEXT, \
                     token BIGINT NOT NULL CHECK (token > 0), \
                     ttl_us BIGINT, \
                     expires_at TIMESTAMPTZ, \
                     PRIMARY KEY (kind, name))"
                ),
            ],
            // An upsert, so a name's first grant needs no separate insert: the
            // conflicting row is locked and the WHERE re-checked on its newest
            // version, so of concurrent takers exactly one wins. The holder taking
            // it again keeps its token (a retried request); everyone else gets the
            // next one. New terms of an election are notified (observers); new
            // lock holders are not (nobody waits for a lock to be taken).
            grant: s(format!(
                "WITH granted AS (\
                   INSERT INTO {leases} AS l (kind, name, owner, token, ttl_us, expires_at) \
                   VALUES ($1, $2, $3, 1, $4, {granted_until}) \
                   ON CONFLICT (kind, name) DO UPDATE SET \
                     owner = excluded.owner, \
                     token = CASE WHEN l.owner = excluded.owner AND l.expires_at > clock_timestamp() \
                             THEN l.token ELSE l.token + 1 END, \
                     ttl_us = excluded.ttl_us, \
                     expires_at = excluded.expires_at \
                   WHERE l.owner IS NULL OR l.expires_at <= clock_timestamp() OR l.owner = excluded.owner \
                   RETURNING l.token) \
                 SELECT true, g.token, NULL::text, NULL::bigint, \
                   CASE WHEN $1 = 'election' THEN {notify} END \
                 FROM granted g \
                 UNION ALL \
                 SELECT false, l.token, CASE WHEN l.expires_at > clock_timestamp() THEN l.owner END, \
                   {REMAINING_US}, NULL \
                 FROM {leases} l \
                 WHERE l.kind = $1 AND l.name = $2 AND NOT EXISTS (SELECT 1 FROM granted)"
            )),
            renew: s(format!(
                "WITH renewed AS (\
                   UPDATE {leases} SET ttl_us = $5, expires_at = {renewed_until} \
                   WHERE kind = $1 AND name = $2 AND owner = $3 AND token = $4 \
                     AND expires_at > clock_timestamp() \
                   RETURNING token) \
                 SELECT true, NULL::text FROM renewed \
                 UNION ALL \
                 SELECT false, l.owner FROM {leases} l \
                 WHERE l.kind = $1 AND l.name = $2 AND l.expires_at > clock_timestamp() \
                   AND NOT EXISTS (SELECT 1 FROM renewed)"
            )),
            release: s(format!(
                "WITH released AS (\
                   UPDATE {leases} SET owner = NULL, ttl_us = NULL, expires_at = NULL \
                   WHERE kind = $1 AND name = $2 AND owner = $3 AND token = $4 \
                     AND expires_at > clock_timestamp() \
                   RETURNING token) \
                 SELECT true, NULL::text, {notify} FROM released \
                 UNION ALL \
                 SELECT false, l.owner, NULL FROM {leases} l \
                 WHERE l.kind = $1 AND l.name = $2 AND l.expires_at > clock_timestamp() \
                   AND NOT EXISTS (SELECT 1 FROM released)"
            )),
            holder: s(format!(
                "SELECT l.owner, l.token, l.ttl_us, {REMAINING_US} FROM {leases} l \
                 WHERE l.kind = $1 AND l.name = $2 AND l.owner IS NOT NULL \
                   AND l.expires_at > clock_timestamp()"
            )),
            latest_token: s(format!(
                "SELECT token FROM {leases} WHERE kind = $1 AND name = $2"
            )),
        }
    }
}
