//! The SQL text of one store, built once for its schema (identifiers can't be bind
//! parameters).

use std::sync::Arc;

/// The database's clock in milliseconds since the Unix epoch, read when the
/// expression is evaluated (not when the transaction began).
const CLOCK_MS: &str = "floor(extract(epoch from clock_timestamp()) * 1000)::bigint";
/// The database's clock at the start of the statement (stable within it).
const NOW_MS: &str = "floor(extract(epoch from now()) * 1000)::bigint";

/// The columns of an event, in the order [`super::rows::event`] decodes them.
const EVENT_COLUMNS: &str = "position, stream, version, id::text, event_type, data_json, data_bytes, metadata, timestamp_ms";

/// Every statement of a store.
#[derive(Debug)]
pub(super) struct Statements {
    /// The `LISTEN`/`pg_notify` channel of head changes.
    pub(super) channel: String,
    pub(super) migrate: Vec<String>,
    pub(super) head: Arc<str>,
    /// Creates (if missing) and row-locks the streams `$1::text[]`, in name order.
    pub(super) lock_streams: Arc<str>,
    /// Where the event ids `$1::text[]` are stored.
    pub(super) find_ids: Arc<str>,
    /// Sets the last version of streams, and clears a soft deletion.
    pub(super) set_versions: Arc<str>,
    /// The global serialization point: takes `$1` positions, inserts the events at
    /// them and notifies the new head.
    pub(super) position_and_insert: Arc<str>,
    /// The test hook: `pg_sleep($1 + random() * $2)`.
    pub(super) sleep: Arc<str>,
    pub(super) stream: Arc<str>,
    pub(super) stream_for_read: Arc<str>,
    pub(super) read_forward: Arc<str>,
    pub(super) read_backward: Arc<str>,
    pub(super) read_all: Arc<str>,
    pub(super) read_category: Arc<str>,
    pub(super) lock_stream: Arc<str>,
    pub(super) delete: Arc<str>,
    pub(super) set_metadata: Arc<str>,
    pub(super) save_snapshot: Arc<str>,
    pub(super) load_snapshot: Arc<str>,
    pub(super) save_checkpoint: Arc<str>,
    pub(super) load_checkpoint: Arc<str>,
}

impl Statements {
    /// The statements of the store in `schema`, a checked identifier.
    pub(super) fn new(schema: &str) -> Self {
        let q = format!("\"{schema}\"");
        let head = format!("{q}.head");
        let streams = format!("{q}.streams");
        let events = format!("{q}.events");
        let snapshots = format!("{q}.snapshots");
        let checkpoints = format!("{q}.checkpoints");
        let s = |sql: String| Arc::<str>::from(sql);
        Self {
            channel: schema.to_owned(),
            migrate: vec![
                format!("CREATE SCHEMA IF NOT EXISTS {q}"),
                // One row: the position the next event gets. Its row lock is the
                // global serialization point of appends.
                format!(
                    "CREATE TABLE IF NOT EXISTS {head} (\
                     singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton), \
                     next BIGINT NOT NULL CHECK (next >= 0))"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {streams} (\
                     name TEXT COLLATE \"C\" PRIMARY KEY, \
                     version BIGINT, \
                     deleted TEXT CHECK (deleted IN ('soft', 'hard')), \
                     max_age_ms BIGINT, \
                     max_count BIGINT, \
                     truncate_before BIGINT)"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {events} (\
                     position BIGINT PRIMARY KEY, \
                     stream TEXT COLLATE \"C\" NOT NULL, \
                     version BIGINT NOT NULL, \
                     category TEXT COLLATE \"C\" NOT NULL, \
                     id UUID NOT NULL UNIQUE, \
                     event_type TEXT NOT NULL, \
                     data_json TEXT, \
                     data_bytes BYTEA, \
                     metadata TEXT, \
                     timestamp_ms BIGINT NOT NULL, \
                     CHECK ((data_json IS NULL) <> (data_bytes IS NULL)), \
                     UNIQUE (stream, version))"
                ),
                format!(
                    "CREATE INDEX IF NOT EXISTS events_category ON {events} (category, position)"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {snapshots} (\
                     stream TEXT COLLATE \"C\" PRIMARY KEY, \
                     version BIGINT NOT NULL, \
                     data_json TEXT, \
                     data_bytes BYTEA, \
                     CHECK ((data_json IS NULL) <> (data_bytes IS NULL)))"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {checkpoints} (\
                     name TEXT COLLATE \"C\" PRIMARY KEY, \
                     position BIGINT NOT NULL)"
                ),
                format!(
                    "INSERT INTO {head} (singleton, next) \
                     SELECT true, COALESCE(max(position) + 1, 0) FROM {events} \
                     ON CONFLICT (singleton) DO NOTHING"
                ),
            ],
            head: s(format!("SELECT next FROM {head}")),
            // A no-op update of a conflicting row locks it, like SELECT … FOR UPDATE,
            // and returns its latest committed values; a missing row is inserted
            // (and locked) instead. ORDER BY: every append locks its streams in the
            // same order, so two multi-stream appends can't deadlock.
            lock_streams: s(format!(
                "INSERT INTO {streams} AS s (name) \
                 SELECT n FROM unnest($1::text[]) AS n ORDER BY n COLLATE \"C\" \
                 ON CONFLICT (name) DO UPDATE SET name = s.name \
                 RETURNING name, version, deleted, max_age_ms, max_count, truncate_before"
            )),
            find_ids: s(format!(
                "SELECT id::text, stream, version, position FROM {events} \
                 WHERE id = ANY($1::text[]::uuid[])"
            )),
            set_versions: s(format!(
                "UPDATE {streams} AS s SET version = u.version, \
                 deleted = CASE WHEN s.deleted = 'soft' THEN NULL ELSE s.deleted END \
                 FROM unnest($1::text[], $2::bigint[]) AS u(name, version) \
                 WHERE s.name = u.name"
            )),
            position_and_insert: s(format!(
                "WITH h AS (\
                   UPDATE {head} SET next = next + $1 \
                   RETURNING next - $1 AS first, next AS last, {CLOCK_MS} AS ts\
                 ), ins AS (\
                   INSERT INTO {events} (position, stream, version, category, id, event_type, \
                     data_json, data_bytes, metadata, timestamp_ms) \
                   SELECT h.first + u.ord - 1, u.stream, u.version, u.category, u.id::uuid, \
                     u.event_type, u.data_json, u.data_bytes, u.metadata, h.ts \
                   FROM h, unnest($2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], \
                     $7::text[], $8::bytea[], $9::text[]) WITH ORDINALITY \
                     AS u(stream, version, category, id, event_type, data_json, data_bytes, metadata, ord) \
                   RETURNING 1\
                 ) \
                 SELECT h.first, (SELECT count(*) FROM ins), pg_notify($10, h.last::text) IS NULL FROM h"
            )),
            sleep: s("SELECT pg_sleep($1::float8 + random() * $2::float8) IS NULL".to_owned()),
            stream: s(format!(
                "SELECT version, deleted, max_age_ms, max_count, truncate_before \
                 FROM {streams} WHERE name = $1"
            )),
            stream_for_read: s(format!(
                "SELECT version, deleted, max_age_ms, max_count, truncate_before, {NOW_MS} \
                 FROM {streams} WHERE name = $1"
            )),
            // $2..=$3: versions; $4..=$5: timestamps; $6: limit.
            read_forward: s(format!(
                "SELECT {EVENT_COLUMNS} FROM {events} \
                 WHERE stream = $1 AND version BETWEEN $2 AND $3 \
                 AND timestamp_ms BETWEEN $4 AND $5 \
                 ORDER BY version LIMIT $6"
            )),
            read_backward: s(format!(
                "SELECT {EVENT_COLUMNS} FROM {events} \
                 WHERE stream = $1 AND version BETWEEN $2 AND $3 \
                 AND timestamp_ms BETWEEN $4 AND $5 \
                 ORDER BY version DESC LIMIT $6"
            )),
            read_all: s(format!(
                "SELECT {EVENT_COLUMNS} FROM {events} \
                 WHERE position >= $1 ORDER BY position LIMIT $2"
            )),
            // What `StreamMetadata::shows` hides, as SQL: deleted streams, versions
            // before `truncate_before` or the newest `max_count`, events older than
            // `max_age`.
            read_category: s(format!(
                "SELECT e.position, e.stream, e.version, e.id::text, e.event_type, e.data_json, \
                 e.data_bytes, e.metadata, e.timestamp_ms \
                 FROM {events} e JOIN {streams} s ON s.name = e.stream \
                 WHERE e.category = $1 AND e.position >= $2 \
                 AND s.deleted IS DISTINCT FROM 'hard' \
                 AND (s.truncate_before IS NULL OR e.version >= s.truncate_before) \
                 AND (s.max_count IS NULL OR \
                      (s.max_count > 0 AND e.version >= COALESCE(s.version, 0) + 1 - s.max_count)) \
                 AND (s.max_age_ms IS NULL OR {NOW_MS} - e.timestamp_ms <= s.max_age_ms) \
                 ORDER BY e.position LIMIT $3"
            )),
            lock_stream: s(format!(
                "SELECT version, deleted, max_age_ms, max_count, truncate_before \
                 FROM {streams} WHERE name = $1 FOR UPDATE"
            )),
            delete: s(format!(
                "UPDATE {streams} SET deleted = $2, \
                 truncate_before = CASE WHEN $2 = 'soft' THEN version + 1 ELSE truncate_before END \
                 WHERE name = $1"
            )),
            // One statement, so the row lock of the upsert covers the check of a
            // hard deletion and the soft deletion's truncation it keeps.
            set_metadata: s(format!(
                "INSERT INTO {streams} AS s (name, max_age_ms, max_count, truncate_before) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO UPDATE SET \
                 max_age_ms = EXCLUDED.max_age_ms, \
                 max_count = EXCLUDED.max_count, \
                 truncate_before = CASE WHEN s.deleted = 'soft' \
                   THEN GREATEST(EXCLUDED.truncate_before, s.truncate_before) \
                   ELSE EXCLUDED.truncate_before END \
                 WHERE s.deleted IS DISTINCT FROM 'hard' \
                 RETURNING true"
            )),
            save_snapshot: s(format!(
                "INSERT INTO {snapshots} (stream, version, data_json, data_bytes) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (stream) DO UPDATE SET version = EXCLUDED.version, \
                 data_json = EXCLUDED.data_json, data_bytes = EXCLUDED.data_bytes"
            )),
            load_snapshot: s(format!(
                "SELECT version, data_json, data_bytes FROM {snapshots} WHERE stream = $1"
            )),
            save_checkpoint: s(format!(
                "INSERT INTO {checkpoints} (name, position) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position"
            )),
            load_checkpoint: s(format!(
                "SELECT position FROM {checkpoints} WHERE name = $1"
            )),
        }
    }
}
