//! The pub/sub contract against the embedded backend.

use std::sync::Arc;

use async_trait::async_trait;
use trellis_pubsub::PubSub;
use trellis_pubsub::contract::Harness;
use trellis_pubsub::embedded::{EmbeddedOptions, EmbeddedPubSub};

struct Embedded {
    dir: tempfile::TempDir,
}

#[async_trait]
impl Harness for Embedded {
    async fn open(&self) -> Arc<dyn PubSub> {
        EmbeddedPubSub::open(self.dir.path(), EmbeddedOptions::default()).expect("open")
    }
}

async fn harness() -> Option<Embedded> {
    Some(Embedded {
        dir: tempfile::tempdir().expect("tempdir"),
    })
}

trellis_pubsub::pubsub_contract!(harness());
