//! The state store contract on the embedded backend.

use std::sync::Arc;

use trellis_state::{EmbeddedStore, StateStore};

async fn store() -> Option<Arc<dyn StateStore>> {
    // The directory must outlive the store; leak it for the test's duration.
    let dir = Box::leak(Box::new(tempfile::tempdir().expect("tempdir")));
    let store =
        EmbeddedStore::open(dir.path().join("state.redb"), Default::default()).expect("open");
    Some(Arc::new(store))
}

trellis_state::state_store_contract!(store());
