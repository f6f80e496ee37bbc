//! GCRA in Redis, so every sidecar shares one limit, with local limiting when Redis
//! can't be reached.

use std::time::Duration;

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

/// KEYS: the limit's key. ARGV: emission interval and tolerance, in microseconds.
/// Returns 0 if allowed, else the microseconds to wait. Uses the server's clock, so
/// sidecars with skewed clocks still share one schedule.
const GCRA_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local emission = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local next = tat + emission
local ahead = next - now
if ahead > tolerance then return math.ceil(ahead - tolerance) end
redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', math.ceil(ahead / 1000) + 1)
return 0
";

/// A shared limit in Redis.
#[derive(Debug)]
pub(crate) struct RedisCells {
    url: String,
    prefix: String,
    timeout: Duration,
    /// Connected on first use, so a sidecar starts even while Redis is down.
    conn: OnceCell<ConnectionManager>,
    script: Script,
}

impl RedisCells {
    pub(crate) fn new(url: String, prefix: String, timeout: Duration) -> Self {
        Self {
            url,
            prefix,
            timeout,
            conn: OnceCell::new(),
            script: Script::new(GCRA_LUA),
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        self.conn
            .get_or_try_init(|| async {
                let client = redis::Client::open(self.url.as_str())?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(0);
                ConnectionManager::new_with_config(client, config).await
            })
            .await
            .cloned()
    }

    /// `Ok(Ok(()))` allowed, `Ok(Err(wait))` refused, `Err` Redis unreachable.
    pub(crate) async fn check(
        &self,
        emission: Duration,
        tolerance: Duration,
        key: &str,
    ) -> Result<Result<(), Duration>, String> {
        let attempt = async {
            let mut conn = self.connection().await?;
            self.script
                .key(format!("{}{key}", self.prefix))
                .arg(
                    u64::try_from(emission.as_micros())
                        .unwrap_or(u64::MAX)
                        .max(1),
                )
                .arg(u64::try_from(tolerance.as_micros()).unwrap_or(u64::MAX))
                .invoke_async::<u64>(&mut conn)
                .await
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(0)) => Ok(Ok(())),
            Ok(Ok(wait_us)) => Ok(Err(Duration::from_micros(wait_us))),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }
}
