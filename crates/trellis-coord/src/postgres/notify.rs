//! Wake-ups from `LISTEN`/`NOTIFY`: one listening connection per coordinator relays
//! the schema's notifications (payload `<kind>/<name>`) to the calls of this process
//! that wait on, or observe, that name.
//!
//! # Why a lost notification can't strand a waiter
//! Notifications sent while the listening connection is down are gone. Whenever it
//! comes back (`LISTEN` issued again), every interested call is woken and reads the
//! current state, so a release during the outage is seen then. A waiter subscribes
//! *before* it reads the state, so a notification between its read and its wait is
//! not lost either: it is counted, and [`Interest::changed`] returns at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;

/// How long the relay waits before listening again after an error.
const RETRY: Duration = Duration::from_secs(1);

/// The names somebody in this process waits on or observes.
#[derive(Debug, Default)]
pub(super) struct Hub {
    /// `<kind>/<name>` → a counter bumped on every notification for it. A std
    /// `Mutex`: held only to look up or bump, never across an `.await`.
    ///
    /// NOTE: entries are added and removed only under this lock ([`Hub::subscribe`],
    /// [`Interest`]'s `Drop`), so the receiver count seen there is exact.
    keys: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts counting notifications for `key` (`<kind>/<name>`).
    pub(super) fn subscribe(self: &Arc<Self>, key: String) -> Interest {
        let rx = self
            .lock()
            .entry(key.clone())
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe();
        Interest {
            hub: Arc::clone(self),
            key,
            rx,
        }
    }

    /// A notification for `key` arrived.
    pub(super) fn notify(&self, key: &str) {
        if let Some(tx) = self.lock().get(key) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Notifications may have been lost: everybody reads again.
    pub(super) fn wake_all(&self) {
        for tx in self.lock().values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// One call's subscription to a name's notifications; unsubscribes when dropped.
#[derive(Debug)]
pub(super) struct Interest {
    hub: Arc<Hub>,
    key: String,
    rx: watch::Receiver<u64>,
}

impl Interest {
    /// Returns once a notification for the name (or a wake-up of everybody) arrived
    /// since the subscription or the previous call.
    pub(super) async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // Unreachable while this holds the hub; never spin if it were.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Interest {
    fn drop(&mut self) {
        let mut keys = self.hub.lock();
        // `self.rx` is still alive here: the entry is unused when it is the last.
        if keys
            .get(&self.key)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            keys.remove(&self.key);
        }
    }
}

/// A listener on `channel`, over `pool` (a pool of one connection of its own).
pub(super) async fn subscribe(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}

/// Relays notifications to `hub` until the pool is closed (or the task aborted),
/// listening again (and waking everybody) after any connection trouble.
pub(super) async fn relay(pool: PgPool, channel: String, hub: Arc<Hub>, first: PgListener) {
    let mut next = Some(first);
    loop {
        let mut listener = match next.take() {
            Some(listener) => listener,
            None => match subscribe(&pool, &channel).await {
                Ok(listener) => {
                    tracing::info!(channel, "coordination: listening again");
                    hub.wake_all();
                    listener
                }
                Err(sqlx::Error::PoolClosed) => return,
                Err(e) => {
                    tracing::warn!(channel, error = %e, "coordination: LISTEN failed, retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            },
        };
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => hub.notify(n.payload()),
                // The connection was lost and is back (listening again); what was
                // notified meanwhile is gone.
                Ok(None) => hub.wake_all(),
                Err(sqlx::Error::PoolClosed) => return,
                Err(e) => {
                    tracing::warn!(channel, error = %e, "coordination: LISTEN connection failed");
                    break;
                }
            }
        }
        // Give its connection back to the one-connection pool before the next one.
        drop(listener);
        tokio::time::sleep(RETRY).await;
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[tokio::test]
    async fn interests_count_notifications_and_clean_up() {
        let hub = Arc::new(Hub::default());
        let mut a = hub.subscribe("lock/a".into());
        let b = hub.subscribe("lock/a".into());
        hub.notify("lock/a");
        hub.notify("lock/other");
        tokio::time::timeout(Duration::from_secs(1), a.changed())
            .await
            .expect("notified");
        drop(b);
        assert_eq!(hub.lock().len(), 1, "a still listens");
        hub.wake_all();
        tokio::time::timeout(Duration::from_secs(1), a.changed())
            .await
            .expect("woken");
        drop(a);
        assert!(hub.lock().is_empty(), "nobody listens");
    }
}
