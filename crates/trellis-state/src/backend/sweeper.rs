//! The background task that deletes expired keys, shared by the backends.

use std::fmt::Display;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

/// Runs a backend's sweep every interval until stopped or dropped.
#[derive(Debug)]
pub(crate) struct Sweeper {
    /// A std `Mutex`: only taken to stop the task, never across an `.await`.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Sweeper {
    /// Spawns `sweep` to run every `every` (first after one interval). Failures are
    /// logged and retried at the next tick.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub(crate) fn spawn<F, Fut, E>(backend: &'static str, every: Duration, mut sweep: F) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<u64, E>> + Send,
        E: Display,
    {
        let task = tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await; // the first tick is immediate; nothing has expired yet
            loop {
                interval.tick().await;
                match sweep().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(backend, swept = n, "deleted expired keys"),
                    Err(e) => {
                        tracing::warn!(backend, error = %e, "sweeping expired keys failed; will retry")
                    }
                }
            }
        });
        Self {
            task: Mutex::new(Some(task)),
        }
    }

    /// Stops the task. Idempotent.
    pub(crate) fn stop(&self) {
        let task = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            task.abort();
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.stop();
    }
}
