//! The Redis backend: a hash per key, a sorted set as the key index, Lua scripts for
//! every conditional write.
//!
//! Layout under the store's prefix `P` (by default `trellis:state:{<name>}:`, a
//! Cluster hash tag that keeps one store in one slot so its scripts stay atomic):
//! - `P d:<key>` — hash `{v: value, ct: content type, ver: revision}`, with the key's
//!   TTL as a native `PEXPIRE`;
//! - `P idx` — sorted set of keys (all score 0) for ordered, paginated listing; keys
//!   Redis expired are dropped from it lazily by `list` and by the sweeper;
//! - `P rev` — the revision counter behind etags.
//!
//! Durability is Redis's: with `appendfsync always` an acknowledged write survives a
//! Redis crash; with the defaults it may not. Trellis acknowledges when Redis has
//! executed the script.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};
use trellis_core::config::RedisState;

use super::sweeper::Sweeper;
use super::{prefix_upper_bound, ttl_millis};
use crate::{
    ETag, Item, Key, Operation, Page, Precondition, StateError, StateStore, Value, WriteOptions,
};

const BACKEND: &str = "redis";
/// Index entries checked per sweep script call.
const SWEEP_BATCH: usize = 500;

/// KEYS: data, idx, rev. ARGV: key, value, content type, mode, expected, ttl_ms.
/// Returns the new revision, -1 for an etag mismatch, -2 if the key exists.
const SET_LUA: &str = r"
local cur = redis.call('HGET', KEYS[1], 'ver')
local mode = ARGV[4]
if mode == 'match' then
  if (not cur) or cur ~= ARGV[5] then return -1 end
elseif mode == 'exists' then
  if not cur then return -1 end
elseif mode == 'absent' then
  if cur then return -2 end
end
local ver = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'ct', ARGV[3], 'ver', ver)
local ttl = tonumber(ARGV[6])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) else redis.call('PERSIST', KEYS[1]) end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return ver
";

/// KEYS: data, idx. ARGV: key, mode, expected.
/// Returns 1 if a live key was deleted, 0 if none, -1 mismatch, -2 exists.
const DELETE_LUA: &str = r"
local cur = redis.call('HGET', KEYS[1], 'ver')
local mode = ARGV[2]
if mode == 'match' then
  if (not cur) or cur ~= ARGV[3] then return -1 end
elseif mode == 'exists' then
  if not cur then return -1 end
elseif mode == 'absent' then
  if cur then return -2 end
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if cur then return 1 end
return 0
";

/// KEYS: idx, rev, then one data key per operation. ARGV: n, then per operation
/// kind ('u'|'d'), key, mode, expected, value, content type, ttl_ms.
/// Checks every precondition (seeing earlier operations' effects) before writing
/// anything. Returns {1, rev-or-0...} on success, {0, code, index} on conflict.
const TRANSACT_LUA: &str = r"
local n = tonumber(ARGV[1])
local seen = {}
for i = 1, n do
  local k = KEYS[2 + i]
  local b = 1 + (i - 1) * 7
  local cur = seen[k]
  if cur == nil then cur = redis.call('HGET', k, 'ver') or false end
  local mode = ARGV[b + 3]
  if mode == 'match' then
    if (not cur) or cur ~= ARGV[b + 4] then return {0, -1, i - 1} end
  elseif mode == 'exists' then
    if not cur then return {0, -1, i - 1} end
  elseif mode == 'absent' then
    if cur then return {0, -2, i - 1} end
  end
  if ARGV[b + 1] == 'u' then seen[k] = 'pending' else seen[k] = false end
end
local out = {1}
for i = 1, n do
  local k = KEYS[2 + i]
  local b = 1 + (i - 1) * 7
  if ARGV[b + 1] == 'u' then
    local ver = redis.call('INCR', KEYS[2])
    redis.call('HSET', k, 'v', ARGV[b + 5], 'ct', ARGV[b + 6], 'ver', ver)
    local ttl = tonumber(ARGV[b + 7])
    if ttl > 0 then redis.call('PEXPIRE', k, ttl) else redis.call('PERSIST', k) end
    redis.call('ZADD', KEYS[1], 0, ARGV[b + 2])
    out[#out + 1] = ver
  else
    redis.call('DEL', k)
    redis.call('ZREM', KEYS[1], ARGV[b + 2])
    out[#out + 1] = 0
  end
end
return out
";

/// KEYS: idx, then data keys. ARGV: the matching index members. Drops members
/// whose data key is gone (expired), atomically with the check.
const PRUNE_LUA: &str = r"
local removed = 0
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[1 + i]) == 0 then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
";

/// A state store in Redis.
#[derive(Debug)]
pub struct RedisStore {
    conn: ConnectionManager,
    keys: Arc<KeySpace>,
    scripts: Arc<Scripts>,
    sweeper: Sweeper,
}

#[derive(Debug)]
struct Scripts {
    set: Script,
    delete: Script,
    transact: Script,
    prune: Script,
}

/// Names of the Redis keys of one store.
#[derive(Debug)]
struct KeySpace {
    data_prefix: String,
    index: String,
    revision: String,
}

impl KeySpace {
    fn new(prefix: &str) -> Self {
        Self {
            data_prefix: format!("{prefix}d:"),
            index: format!("{prefix}idx"),
            revision: format!("{prefix}rev"),
        }
    }

    fn data(&self, key: &str) -> String {
        format!("{}{key}", self.data_prefix)
    }
}

impl RedisStore {
    /// Connects to Redis and starts the index sweeper. `name` is the component name,
    /// used for the default key prefix.
    ///
    /// # Errors
    /// [`StateError::Unavailable`] if Redis can't be reached within `connect_timeout`.
    pub async fn connect(name: &str, config: &RedisState) -> Result<Self, StateError> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| StateError::backend(BACKEND, e))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.connect_timeout))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, manager_config)
            .await
            .map_err(redis_error)?;
        let keys = Arc::new(KeySpace::new(&config.key_prefix_for(name)));
        let scripts = Arc::new(Scripts {
            set: Script::new(SET_LUA),
            delete: Script::new(DELETE_LUA),
            transact: Script::new(TRANSACT_LUA),
            prune: Script::new(PRUNE_LUA),
        });
        let _: String = redis::cmd("PING")
            .query_async(&mut conn.clone())
            .await
            .map_err(redis_error)?;
        let sweeper = {
            let (conn, keys, scripts) = (conn.clone(), Arc::clone(&keys), Arc::clone(&scripts));
            Sweeper::spawn(BACKEND, config.sweep_interval, move || {
                let (conn, keys, scripts) = (conn.clone(), Arc::clone(&keys), Arc::clone(&scripts));
                async move { sweep(conn, &keys, &scripts).await }
            })
        };
        Ok(Self {
            conn,
            keys,
            scripts,
            sweeper,
        })
    }

    /// Drops index entries of keys Redis has expired; returns how many.
    ///
    /// # Errors
    /// If Redis fails.
    pub async fn sweep(&self) -> Result<u64, StateError> {
        sweep(self.conn.clone(), &self.keys, &self.scripts)
            .await
            .map_err(redis_error)
    }
}

fn mode(precondition: &Precondition) -> (&'static str, String) {
    match precondition {
        Precondition::None => ("none", String::new()),
        Precondition::IfMatch(etag) => ("match", etag.as_str().to_owned()),
        Precondition::IfExists => ("exists", String::new()),
        Precondition::IfAbsent => ("absent", String::new()),
    }
}

fn ttl_arg(ttl: Option<Duration>) -> i64 {
    ttl_millis(ttl).unwrap_or(0)
}

fn precondition_error(code: i64, key: &str) -> StateError {
    if code == -2 {
        StateError::KeyExists {
            key: key.to_owned(),
        }
    } else {
        StateError::EtagMismatch {
            key: key.to_owned(),
        }
    }
}

#[async_trait]
impl StateStore for RedisStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn get(&self, key: &Key) -> Result<Option<Item>, StateError> {
        let mut items = self.bulk_get(std::slice::from_ref(key)).await?;
        Ok(items.pop().flatten())
    }

    async fn bulk_get(&self, keys: &[Key]) -> Result<Vec<Option<Item>>, StateError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HMGET")
                .arg(self.keys.data(key.as_str()))
                .arg("v")
                .arg("ct")
                .arg("ver");
        }
        let rows: Vec<(Option<Vec<u8>>, Option<String>, Option<String>)> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        rows.into_iter()
            .map(|(v, ct, ver)| match (v, ver) {
                (Some(v), Some(ver)) => {
                    let revision = ver.parse::<u64>().map_err(|e| {
                        StateError::backend(BACKEND, format!("corrupt revision {ver:?}: {e}"))
                    })?;
                    Ok(Some(Item {
                        value: Value::new(Bytes::from(v), ct.unwrap_or_default()),
                        etag: ETag::from_revision(revision),
                    }))
                }
                _ => Ok(None),
            })
            .collect()
    }

    async fn set(
        &self,
        key: &Key,
        value: Value,
        options: WriteOptions,
    ) -> Result<ETag, StateError> {
        let (mode, expected) = mode(&options.precondition);
        let result: i64 = self
            .scripts
            .set
            .key(self.keys.data(key.as_str()))
            .key(&self.keys.index)
            .key(&self.keys.revision)
            .arg(key.as_str())
            .arg(value.data.as_ref())
            .arg(&value.content_type)
            .arg(mode)
            .arg(expected)
            .arg(ttl_arg(options.ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        if result < 0 {
            return Err(precondition_error(result, key.as_str()));
        }
        Ok(ETag::from_revision(result.unsigned_abs()))
    }

    async fn delete(&self, key: &Key, precondition: Precondition) -> Result<bool, StateError> {
        let (mode, expected) = mode(&precondition);
        let result: i64 = self
            .scripts
            .delete
            .key(self.keys.data(key.as_str()))
            .key(&self.keys.index)
            .arg(key.as_str())
            .arg(mode)
            .arg(expected)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        if result < 0 {
            return Err(precondition_error(result, key.as_str()));
        }
        Ok(result == 1)
    }

    async fn transact(&self, operations: Vec<Operation>) -> Result<Vec<Option<ETag>>, StateError> {
        if operations.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.scripts.transact.prepare_invoke();
        invocation
            .key(&self.keys.index)
            .key(&self.keys.revision)
            .arg(operations.len());
        for op in &operations {
            invocation.key(self.keys.data(op.key().as_str()));
            match op {
                Operation::Upsert {
                    key,
                    value,
                    options,
                } => {
                    let (mode, expected) = mode(&options.precondition);
                    invocation
                        .arg("u")
                        .arg(key.as_str())
                        .arg(mode)
                        .arg(expected)
                        .arg(value.data.as_ref())
                        .arg(&value.content_type)
                        .arg(ttl_arg(options.ttl));
                }
                Operation::Delete { key, precondition } => {
                    let (mode, expected) = mode(precondition);
                    invocation
                        .arg("d")
                        .arg(key.as_str())
                        .arg(mode)
                        .arg(expected)
                        .arg("")
                        .arg("")
                        .arg(0);
                }
            }
        }
        let result: Vec<i64> = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        match result.as_slice() {
            [1, revisions @ ..] if revisions.len() == operations.len() => Ok(operations
                .iter()
                .zip(revisions)
                .map(|(op, rev)| match op {
                    Operation::Upsert { .. } => Some(ETag::from_revision(rev.unsigned_abs())),
                    Operation::Delete { .. } => None,
                })
                .collect()),
            [0, code, index] => {
                let index = usize::try_from(*index).unwrap_or(usize::MAX);
                let key = operations
                    .get(index)
                    .map(|op| op.key().as_str())
                    .unwrap_or_default();
                Err(precondition_error(*code, key).in_transaction(index))
            }
            other => Err(StateError::backend(
                BACKEND,
                format!("unexpected transaction script reply {other:?}"),
            )),
        }
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Page, StateError> {
        let mut conn = self.conn.clone();
        let mut start = match after {
            Some(after) if after.as_str() >= prefix => format!("({after}"),
            _ => format!("[{prefix}"),
        };
        let end =
            prefix_upper_bound(prefix).map_or_else(|| "+".to_owned(), |upper| format!("({upper}"));
        let chunk = (limit + 1).clamp(16, 1000);
        let mut keys = Vec::with_capacity(limit + 1);
        loop {
            let candidates: Vec<String> = redis::cmd("ZRANGEBYLEX")
                .arg(&self.keys.index)
                .arg(&start)
                .arg(&end)
                .arg("LIMIT")
                .arg(0)
                .arg(chunk)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            let mut pipe = redis::pipe();
            for candidate in &candidates {
                pipe.cmd("EXISTS").arg(self.keys.data(candidate));
            }
            let exists: Vec<bool> = if candidates.is_empty() {
                Vec::new()
            } else {
                pipe.query_async(&mut conn).await.map_err(redis_error)?
            };
            for (candidate, live) in candidates.iter().zip(exists) {
                if live {
                    keys.push(Key::new(candidate.as_str()).map_err(|e| {
                        StateError::backend(
                            BACKEND,
                            format!("stored key {candidate:?} is invalid: {e}"),
                        )
                    })?);
                    if keys.len() > limit {
                        return Ok(Page::from_overfetch(keys, limit));
                    }
                }
            }
            match candidates.last() {
                Some(last) if candidates.len() == chunk => start = format!("({last}"),
                _ => return Ok(Page::from_overfetch(keys, limit)),
            }
        }
    }

    async fn health(&self) -> Result<(), StateError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    async fn close(&self) -> Result<(), StateError> {
        self.sweeper.stop();
        Ok(())
    }
}

async fn sweep(
    mut conn: ConnectionManager,
    keys: &KeySpace,
    scripts: &Scripts,
) -> Result<u64, RedisError> {
    let mut start = "-".to_owned();
    let mut removed = 0;
    loop {
        let members: Vec<String> = redis::cmd("ZRANGEBYLEX")
            .arg(&keys.index)
            .arg(&start)
            .arg("+")
            .arg("LIMIT")
            .arg(0)
            .arg(SWEEP_BATCH)
            .query_async(&mut conn)
            .await?;
        if members.is_empty() {
            return Ok(removed);
        }
        let mut invocation = scripts.prune.prepare_invoke();
        invocation.key(&keys.index);
        for member in &members {
            invocation.key(keys.data(member)).arg(member);
        }
        let n: u64 = invocation.invoke_async(&mut conn).await?;
        removed += n;
        if members.len() < SWEEP_BATCH {
            return Ok(removed);
        }
        if let Some(last) = members.last() {
            start = format!("({last}");
        }
    }
}

fn redis_error(e: RedisError) -> StateError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_refusal() || e.is_connection_dropped() {
        StateError::unavailable(BACKEND, e)
    } else {
        StateError::backend(BACKEND, e)
    }
}
