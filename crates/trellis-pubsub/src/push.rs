//! Push delivery: a loop that pulls a subscription's messages and hands each to a
//! [`Handler`] (for the sidecar, an HTTP call to the app), settling it by the
//! handler's [`Verdict`].
//!
//! At most `max_in_flight` deliveries are with the handler at once: the loop pulls
//! only as many messages as it has free slots, so a slow app slows delivery down
//! instead of piling messages up (backpressure). Each delivery is bounded by the
//! subscription's ack deadline: a handler still busy then is abandoned and the
//! message redelivered later, as a pull consumer's would be.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use trellis_pubsub::embedded::{EmbeddedOptions, EmbeddedPubSub};
//! use trellis_pubsub::event::CloudEvent;
//! use trellis_pubsub::push::{Handler, Push, Verdict};
//! use trellis_pubsub::{Delivery, PubSub, SubscriptionSettings};
//!
//! #[derive(Debug)]
//! struct Print(tokio::sync::mpsc::Sender<u64>);
//!
//! #[async_trait::async_trait]
//! impl Handler for Print {
//!     async fn handle(&self, delivery: &Delivery) -> Verdict {
//!         let _ = self.0.send(delivery.position).await;
//!         Verdict::Ack
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let pubsub: Arc<dyn PubSub> = EmbeddedPubSub::open(dir.path(), EmbeddedOptions::default())?;
//! let (tx, mut rx) = tokio::sync::mpsc::channel(8);
//! let push = Push::start(Arc::clone(&pubsub), "orders", "billing", SubscriptionSettings::default(), Arc::new(Print(tx)));
//! pubsub.publish("orders", vec![CloudEvent::new("/shop", "order.created", None)]).await?;
//! assert_eq!(rx.recv().await, Some(0));
//! push.stop().await;
//! # Ok(())
//! # }
//! ```

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::{Delivery, PubSub, SubscriptionSettings};

/// What to do with a delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Processed: acknowledge it.
    Ack,
    /// Not now: redeliver, after `delay` or the subscription's backoff.
    Retry {
        /// Overrides the backoff.
        delay: Option<Duration>,
    },
    /// Never processable: send it to the dead-letter topic.
    Drop {
        /// Recorded in the dead letter's `deadletterreason`.
        reason: String,
    },
}

/// Processes one delivery.
#[async_trait]
pub trait Handler: Debug + Send + Sync + 'static {
    /// Handles `delivery`; the returned verdict settles it.
    async fn handle(&self, delivery: &Delivery) -> Verdict;
}

/// Figures of a push subscription.
#[derive(Debug, Default)]
pub struct PushStats {
    /// Deliveries acknowledged.
    pub acked: AtomicU64,
    /// Deliveries returned for redelivery (answer, error or timeout).
    pub retried: AtomicU64,
    /// Deliveries the handler dropped to the dead-letter topic.
    pub dropped: AtomicU64,
    /// Pulls that failed (the backend was unreachable).
    pub pull_errors: AtomicU64,
}

/// A running push subscription; stops when [`stop`](Self::stop) is called or it is
/// dropped.
#[derive(Debug)]
pub struct Push {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    stats: Arc<PushStats>,
}

impl Push {
    /// Starts delivering `group`'s messages of `topic` to `handler`.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn start(
        pubsub: Arc<dyn PubSub>,
        topic: impl Into<String>,
        group: impl Into<String>,
        settings: SubscriptionSettings,
        handler: Arc<dyn Handler>,
    ) -> Self {
        let (stop, stopped) = watch::channel(false);
        let stats = Arc::new(PushStats::default());
        let run = Run {
            pubsub,
            topic: topic.into(),
            group: group.into(),
            settings,
            handler,
            stats: Arc::clone(&stats),
        };
        let task = tokio::spawn(run.run(stopped));
        Self {
            stop,
            task: Some(task),
            stats,
        }
    }

    /// Its figures.
    pub fn stats(&self) -> &Arc<PushStats> {
        &self.stats
    }

    /// Stops pulling, waits for deliveries in progress (each bounded by the ack
    /// deadline) and settles them.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Push {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

struct Run {
    pubsub: Arc<dyn PubSub>,
    topic: String,
    group: String,
    settings: SubscriptionSettings,
    handler: Arc<dyn Handler>,
    stats: Arc<PushStats>,
}

/// How long one pull waits for messages before pulling again.
const POLL: Duration = Duration::from_secs(5);
/// Pause after a failed pull, doubling up to [`MAX_PAUSE`].
const MIN_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(10);

impl Run {
    async fn run(self, mut stopped: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.settings.max_in_flight.max(1) as usize));
        let mut deliveries = JoinSet::new();
        let mut pause = MIN_PAUSE;
        loop {
            // Reap finished deliveries so the set doesn't grow.
            while deliveries.try_join_next().is_some() {}
            let first = tokio::select! {
                permit = Arc::clone(&slots).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = stopped.wait_for(|s| *s) => break,
            };
            let mut permits = vec![first];
            while let Ok(p) = Arc::clone(&slots).try_acquire_owned() {
                permits.push(p);
                if permits.len() >= 256 {
                    break;
                }
            }
            let pulled = tokio::select! {
                pulled = this.pubsub.pull(&this.topic, &this.group, &this.settings, permits.len(), POLL) => pulled,
                _ = stopped.wait_for(|s| *s) => break,
            };
            match pulled {
                Ok(batch) => {
                    pause = MIN_PAUSE;
                    for delivery in batch {
                        let Some(permit) = permits.pop() else { break };
                        let this = Arc::clone(&this);
                        deliveries.spawn(async move {
                            this.deliver(delivery).await;
                            drop(permit);
                        });
                    }
                }
                Err(e) => {
                    this.stats.pull_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(topic = %this.topic, group = %this.group, error = %e, ?pause, "pull failed; retrying");
                    drop(permits);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = stopped.wait_for(|s| *s) => break,
                    }
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
        }
        while deliveries.join_next().await.is_some() {}
    }

    async fn deliver(&self, delivery: Delivery) {
        let verdict = match tokio::time::timeout(
            self.settings.ack_deadline,
            self.handler.handle(&delivery),
        )
        .await
        {
            Ok(verdict) => verdict,
            Err(_) => {
                tracing::warn!(topic = %self.topic, group = %self.group, position = delivery.position, deadline = ?self.settings.ack_deadline, "delivery timed out; will redeliver");
                Verdict::Retry { delay: None }
            }
        };
        let ids = [delivery.ack_id];
        let settled = match &verdict {
            Verdict::Ack => {
                self.stats.acked.fetch_add(1, Ordering::Relaxed);
                self.pubsub.ack(&self.group, &ids).await
            }
            Verdict::Retry { delay } => {
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
                self.pubsub.nack(&self.group, &ids, *delay).await
            }
            Verdict::Drop { reason } => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                self.pubsub.reject(&self.group, &ids, reason).await
            }
        };
        if let Err(e) = settled {
            // The delivery's deadline will expire and it will be redelivered.
            tracing::warn!(topic = %self.topic, group = %self.group, error = %e, ?verdict, "settling a delivery failed");
        }
    }
}

#[cfg(test)]
mod test {
    use std::sync::Mutex;

    use super::*;
    use crate::embedded::{EmbeddedOptions, EmbeddedPubSub};
    use crate::event::CloudEvent;

    /// Answers by position: even → ack, 1 → drop, 3 → retry once then ack; records
    /// the most deliveries in progress at once.
    #[derive(Debug, Default)]
    struct Script {
        seen: Mutex<Vec<(u64, u32)>>,
        busy: AtomicU64,
        peak: AtomicU64,
    }

    #[async_trait]
    impl Handler for Script {
        async fn handle(&self, d: &Delivery) -> Verdict {
            let now = self.busy.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.busy.fetch_sub(1, Ordering::SeqCst);
            self.seen
                .lock()
                .expect("lock")
                .push((d.position, d.attempt));
            match (d.position, d.attempt) {
                (1, _) => Verdict::Drop {
                    reason: "bad".into(),
                },
                (3, 1) => Verdict::Retry {
                    delay: Some(Duration::from_millis(10)),
                },
                _ => Verdict::Ack,
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verdicts_settle_deliveries_within_max_in_flight() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ps: Arc<dyn PubSub> =
            EmbeddedPubSub::open(dir.path(), EmbeddedOptions::default()).expect("open");
        let events = (0..20).map(|_| CloudEvent::new("/t", "t", None)).collect();
        ps.publish("t", events).await.expect("publish");
        let handler = Arc::new(Script::default());
        let settings = SubscriptionSettings {
            max_in_flight: 3,
            ..SubscriptionSettings::default()
        };
        let push = Push::start(
            Arc::clone(&ps),
            "t",
            "g",
            settings,
            Arc::clone(&handler) as Arc<dyn Handler>,
        );
        let stats = Arc::clone(push.stats());
        for _ in 0..500 {
            if stats.acked.load(Ordering::SeqCst) == 19 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        push.stop().await;
        assert_eq!(stats.acked.load(Ordering::SeqCst), 19);
        assert_eq!(stats.dropped.load(Ordering::SeqCst), 1);
        assert_eq!(stats.retried.load(Ordering::SeqCst), 1);
        assert!(
            handler.peak.load(Ordering::SeqCst) <= 3,
            "peak {}",
            handler.peak.load(Ordering::SeqCst)
        );
        assert!(handler.seen.lock().expect("lock").contains(&(3, 2)));
        let topic = ps.stats("t").await.expect("stats");
        assert_eq!((topic.groups[0].lag, topic.groups[0].dead_lettered), (0, 1));
    }
}
