//! Publisher dedupe: an id published again within the window is stored once.
//!
//! The window lives in memory and is rebuilt on open from the log's recent records
//! (each stores its id and timestamp), so it survives restarts without a table of
//! its own. Concurrent publishes of one id: the first reserves it, the others wait
//! for its position.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

#[derive(Debug, Clone)]
enum Entry {
    /// Being appended; the receiver yields the position (or `None` if it failed).
    Pending(watch::Receiver<Option<Option<u64>>>),
    Done(u64),
}

/// What a publisher should do with one id.
#[derive(Debug)]
pub(crate) enum Claim {
    /// Append it, then [`Dedupe::done`] or [`Dedupe::failed`] with the sender.
    New(watch::Sender<Option<Option<u64>>>),
    /// Already stored at this position.
    Duplicate(u64),
    /// Being appended by another publish: wait on this.
    Wait(watch::Receiver<Option<Option<u64>>>),
}

#[derive(Debug, Default)]
struct Inner {
    ids: HashMap<String, (Entry, u64)>,
    /// (expires at ms, id), oldest first.
    expiry: VecDeque<(u64, String)>,
}

/// The dedupe window of one topic.
#[derive(Debug, Clone)]
pub(crate) struct Dedupe {
    window: Duration,
    inner: Arc<Mutex<Inner>>,
}

impl Dedupe {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            inner: Arc::default(),
        }
    }

    fn window_ms(&self) -> u64 {
        u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers a stored id (while rebuilding from the log).
    pub(crate) fn remember(&self, id: String, position: u64, stored_at_ms: u64) {
        let expires = stored_at_ms.saturating_add(self.window_ms());
        let mut inner = self.lock();
        inner
            .ids
            .insert(id.clone(), (Entry::Done(position), expires));
        inner.expiry.push_back((expires, id));
    }

    pub(crate) fn claim(&self, id: &str, now_ms: u64) -> Claim {
        if self.window.is_zero() {
            return Claim::New(watch::channel(None).0);
        }
        let mut inner = self.lock();
        while let Some((expires, _)) = inner.expiry.front()
            && *expires <= now_ms
        {
            let Some((_, old)) = inner.expiry.pop_front() else {
                break;
            };
            if inner.ids.get(&old).is_some_and(|(_, e)| *e <= now_ms) {
                inner.ids.remove(&old);
            }
        }
        match inner.ids.get(id) {
            Some((Entry::Done(position), _)) => Claim::Duplicate(*position),
            Some((Entry::Pending(rx), _)) => Claim::Wait(rx.clone()),
            None => {
                let (tx, rx) = watch::channel(None);
                let expires = now_ms.saturating_add(self.window_ms());
                inner
                    .ids
                    .insert(id.to_owned(), (Entry::Pending(rx), expires));
                inner.expiry.push_back((expires, id.to_owned()));
                Claim::New(tx)
            }
        }
    }

    pub(crate) fn done(&self, id: &str, position: u64, tx: &watch::Sender<Option<Option<u64>>>) {
        if let Some((entry, _)) = self.lock().ids.get_mut(id) {
            *entry = Entry::Done(position);
        }
        tx.send_replace(Some(Some(position)));
    }

    pub(crate) fn failed(&self, id: &str, tx: &watch::Sender<Option<Option<u64>>>) {
        self.lock().ids.remove(id);
        tx.send_replace(Some(None));
    }
}
