//! The event store contract against the embedded backend.

use std::sync::Arc;

use async_trait::async_trait;
use trellis_eventstore::EventStore;
use trellis_eventstore::contract::Harness;
use trellis_eventstore::embedded::EmbeddedEventStore;

struct Embedded {
    dir: tempfile::TempDir,
}

#[async_trait]
impl Harness for Embedded {
    async fn open(&self) -> Arc<dyn EventStore> {
        Arc::new(
            EmbeddedEventStore::open(self.dir.path().join("events.redb"))
                .await
                .expect("open"),
        )
    }
}

async fn harness() -> Option<Embedded> {
    Some(Embedded {
        dir: tempfile::tempdir().expect("tempdir"),
    })
}

trellis_eventstore::event_store_contract!(harness());
