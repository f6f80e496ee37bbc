//! Catch-up subscriptions: read history from any point, then follow live appends,
//! as one [`Stream`] of events.
//!
//! A subscription reads a page only when its consumer asks for more, so a slow
//! consumer slows the subscription down instead of being dropped ("consumer too
//! slow") or buffering without bound: the store is the buffer. Going live needs no
//! switch-over either: at the end of history it waits for the store's
//! [`head`](EventStore::head) to move and reads on from where it was, so no event
//! is missed or delivered twice between the two phases.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use futures_util::StreamExt as _;
//! use trellis_eventstore::embedded::EmbeddedEventStore;
//! use trellis_eventstore::subscription::{Source, Start, subscribe};
//! use trellis_eventstore::{Append, EventData, EventStore, ExpectedVersion, StreamName};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store: Arc<dyn EventStore> = Arc::new(EmbeddedEventStore::open(dir.path().join("e.redb")).await?);
//! let mut all = subscribe(Arc::clone(&store), Source::All, Start::Beginning);
//! let stream = StreamName::new("order-1")?;
//! let placed = EventData::json("OrderPlaced", &serde_json::json!({}));
//! store.append(vec![Append { stream, expected: ExpectedVersion::Any, events: vec![placed] }]).await?;
//! let first = all.next().await.expect("an event")?;
//! assert_eq!((first.position, first.ty.as_str()), (0, "OrderPlaced"));
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::watch;

use crate::{Direction, EventStore, EventStoreError, ReadStream, RecordedEvent, StreamName};

/// Events read per page.
const PAGE: usize = 256;

/// What to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Every event (`$all`).
    All,
    /// One stream.
    Stream(StreamName),
    /// The streams of a category (`$ce-<category>`).
    Category(String),
}

impl std::str::FromStr for Source {
    type Err = crate::event::Invalid;

    /// `$all`, `$ce-<category>`, or a stream name.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if name == crate::event::ALL {
            return Ok(Self::All);
        }
        match name.strip_prefix(crate::event::CATEGORY_PREFIX) {
            Some("") => Err(crate::event::Invalid(
                "a category stream is $ce-<category>".into(),
            )),
            Some(category) => Ok(Self::Category(category.to_owned())),
            None => StreamName::new(name).map(Self::Stream),
        }
    }
}

impl std::fmt::Display for Source {
    /// The name that parses back to it: `$all`, `$ce-<category>` or the stream.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => f.write_str(crate::event::ALL),
            Self::Category(c) => write!(f, "{}{c}", crate::event::CATEGORY_PREFIX),
            Self::Stream(s) => f.write_str(s.as_str()),
        }
    }
}

/// Where to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// From the first event.
    Beginning,
    /// After the last event now stored: only new ones.
    End,
    /// From this point, inclusive: a global position for `$all` and categories, a
    /// version for a stream.
    At(u64),
}

struct State {
    store: Arc<dyn EventStore>,
    source: Source,
    /// The next global position (`$all`, categories) or version (a stream); `None`
    /// until `Start::End` of a stream is resolved.
    next: Option<u64>,
    /// The head when subscribed: `Start::End` means events from this position on.
    end: u64,
    head: watch::Receiver<u64>,
    buffer: VecDeque<RecordedEvent>,
    done: bool,
}

/// A running subscription: a boxed (so `Unpin`) stream of events.
pub type Subscription = Pin<Box<dyn Stream<Item = Result<RecordedEvent, EventStoreError>> + Send>>;

/// Follows `source` from `start`: history first, then live events, in order.
///
/// The stream ends only with an error (the subscription stops after it): the
/// followed stream was hard-deleted, or the store failed.
pub fn subscribe(store: Arc<dyn EventStore>, source: Source, start: Start) -> Subscription {
    let head = store.head();
    // "The end" is fixed now, not when the consumer first polls.
    let end = *head.borrow();
    let next = match (start, &source) {
        (Start::Beginning, _) => Some(0),
        (Start::At(p), _) => Some(p),
        (Start::End, Source::All | Source::Category(_)) => Some(end),
        (Start::End, Source::Stream(_)) => None,
    };
    let state = State {
        store,
        source,
        next,
        end,
        head,
        buffer: VecDeque::new(),
        done: false,
    };
    Box::pin(futures_util::stream::unfold(
        state,
        |mut state| async move {
            if state.done {
                return None;
            }
            loop {
                if let Some(event) = state.buffer.pop_front() {
                    return Some((Ok(event), state));
                }
                // Seen before reading, so an append that lands during the read is not missed.
                state.head.borrow_and_update();
                match state.fill().await {
                    Ok(true) => {}
                    Ok(false) => {
                        if state.head.changed().await.is_err() {
                            // The store is gone: nothing more will come.
                            return None;
                        }
                    }
                    Err(e) => {
                        state.done = true;
                        return Some((Err(e), state));
                    }
                }
            }
        },
    ))
}

impl State {
    /// Reads the next page into the buffer; `false` if there was nothing new.
    async fn fill(&mut self) -> Result<bool, EventStoreError> {
        let next = match self.next {
            Some(next) => next,
            None => {
                let end = self.end().await?;
                self.next = Some(end);
                end
            }
        };
        let page = match &self.source {
            Source::All => self.store.read_all(next, PAGE).await?,
            Source::Category(category) => self.store.read_category(category, next, PAGE).await?,
            Source::Stream(stream) => {
                let read = ReadStream {
                    from: Some(next),
                    limit: PAGE,
                    direction: Direction::Forward,
                    as_of: None,
                };
                match self.store.read_stream(stream, read).await {
                    Ok(slice) => slice.events,
                    // Not there yet: it may be created later.
                    Err(EventStoreError::StreamNotFound(_)) => Vec::new(),
                    Err(e) => return Err(e),
                }
            }
        };
        let Some(last) = page.last() else {
            return Ok(false);
        };
        self.next = Some(match self.source {
            Source::Stream(_) => last.version + 1,
            Source::All | Source::Category(_) => last.position + 1,
        });
        self.buffer.extend(page);
        Ok(true)
    }

    /// The first version of the followed stream at or after the global position
    /// `end`: found by reading back from the stream's last event.
    async fn end(&self) -> Result<u64, EventStoreError> {
        let Source::Stream(stream) = &self.source else {
            return Ok(self.end);
        };
        let mut from = None;
        loop {
            let read = ReadStream {
                from,
                limit: PAGE,
                direction: Direction::Backward,
                as_of: None,
            };
            let slice = match self.store.read_stream(stream, read).await {
                Ok(slice) => slice,
                Err(EventStoreError::StreamNotFound(_)) => return Ok(0),
                Err(e) => return Err(e),
            };
            let fallback = slice.version.map_or(0, |v| v + 1);
            let Some(oldest) = slice.events.last() else {
                return Ok(fallback);
            };
            if let Some(before) = slice.events.iter().find(|e| e.position < self.end) {
                return Ok(before.version + 1);
            }
            match slice.next {
                Some(next) => from = Some(next),
                None => return Ok(oldest.version),
            }
        }
    }
}

#[cfg(test)]
mod test {
    use std::time::Duration;

    use futures_util::StreamExt as _;
    use serde_json::json;

    use super::*;
    use crate::embedded::EmbeddedEventStore;
    use crate::{Append, Deletion, EventData, ExpectedVersion};

    #[test]
    fn sources_parse_and_print_back() {
        for name in ["$all", "$ce-order", "order-17"] {
            let source: Source = name.parse().expect("valid");
            assert_eq!(source.to_string(), name);
        }
        assert_eq!(
            "$ce-order".parse::<Source>().ok(),
            Some(Source::Category("order".into()))
        );
        assert!("$ce-".parse::<Source>().is_err());
        assert!("$other".parse::<Source>().is_err());
    }

    async fn store() -> (Arc<dyn EventStore>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedEventStore::open(dir.path().join("e.redb"))
            .await
            .expect("open");
        (Arc::new(store), dir)
    }

    async fn put(store: &Arc<dyn EventStore>, stream: &str, n: u64) {
        let e = EventData::json("N", &json!({ "n": n }));
        let stream = StreamName::new(stream).expect("name");
        store
            .append(vec![Append {
                stream,
                expected: ExpectedVersion::Any,
                events: vec![e],
            }])
            .await
            .expect("append");
    }

    fn n(e: &RecordedEvent) -> u64 {
        e.data.to_value().and_then(|v| v["n"].as_u64()).expect("n")
    }

    async fn take(
        s: &mut (impl Stream<Item = Result<RecordedEvent, EventStoreError>> + Unpin),
        count: usize,
    ) -> Vec<u64> {
        let mut out = Vec::new();
        for _ in 0..count {
            let e = tokio::time::timeout(Duration::from_secs(5), s.next())
                .await
                .expect("in time")
                .expect("open")
                .expect("ok");
            out.push(n(&e));
        }
        out
    }

    #[tokio::test]
    async fn catches_up_then_follows_live_without_gaps_or_repeats() {
        let (store, _dir) = store().await;
        for i in 0..600 {
            put(&store, "a-1", i).await;
        }
        let mut all = Box::pin(subscribe(Arc::clone(&store), Source::All, Start::Beginning));
        assert_eq!(
            take(&mut all, 600).await,
            (0..600).collect::<Vec<_>>(),
            "history, across pages"
        );
        let writer = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                for i in 600..700 {
                    put(&store, "a-1", i).await;
                }
            })
        };
        assert_eq!(
            take(&mut all, 100).await,
            (600..700).collect::<Vec<_>>(),
            "live"
        );
        writer.await.expect("writer");
    }

    #[tokio::test]
    async fn streams_categories_and_the_end() {
        let (store, _dir) = store().await;
        put(&store, "order-1", 0).await;
        put(&store, "user-1", 1).await;
        let mut from_end = Box::pin(subscribe(Arc::clone(&store), Source::All, Start::End));
        let mut orders = Box::pin(subscribe(
            Arc::clone(&store),
            Source::Category("order".into()),
            Start::Beginning,
        ));
        let stream = StreamName::new("order-2").expect("name");
        let mut one = Box::pin(subscribe(
            Arc::clone(&store),
            Source::Stream(stream.clone()),
            Start::Beginning,
        ));
        put(&store, "order-2", 2).await;
        put(&store, "user-1", 3).await;
        put(&store, "order-2", 4).await;
        assert_eq!(take(&mut from_end, 3).await, [2, 3, 4]);
        assert_eq!(take(&mut orders, 3).await, [0, 2, 4]);
        assert_eq!(
            take(&mut one, 2).await,
            [2, 4],
            "a stream created after subscribing"
        );
        let mut one_from = Box::pin(subscribe(
            Arc::clone(&store),
            Source::Stream(stream.clone()),
            Start::At(1),
        ));
        assert_eq!(take(&mut one_from, 1).await, [4]);
        let mut one_end = Box::pin(subscribe(
            Arc::clone(&store),
            Source::Stream(stream.clone()),
            Start::End,
        ));
        put(&store, "order-2", 5).await;
        assert_eq!(
            take(&mut one_end, 1).await,
            [5],
            "only what came after subscribing"
        );

        store
            .delete(&stream, ExpectedVersion::Any, Deletion::Hard)
            .await
            .expect("delete");
        let mut deleted = Box::pin(subscribe(
            Arc::clone(&store),
            Source::Stream(stream),
            Start::Beginning,
        ));
        let end = tokio::time::timeout(Duration::from_secs(5), deleted.next())
            .await
            .expect("in time");
        assert!(
            matches!(end, Some(Err(EventStoreError::StreamDeleted(_)))),
            "{end:?}"
        );
        assert!(deleted.next().await.is_none(), "and then it ends");
    }
}
