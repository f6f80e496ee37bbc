//! The state store contract on PostgreSQL. Each test gets its own schema.

use std::sync::Arc;

use trellis_core::config::PostgresState;
use trellis_core::testing::{postgres_url, services_enabled, unique_name};
use trellis_state::{PostgresStore, StateStore};

async fn store() -> Option<Arc<dyn StateStore>> {
    if !services_enabled("PostgreSQL") {
        return None;
    }
    let mut config = PostgresState::new(postgres_url());
    config.schema = unique_name("t_state");
    config.pool_size = 20;
    let store = PostgresStore::connect("contract", &config)
        .await
        .expect("PostgreSQL at TRELLIS_TEST_POSTGRES_URL (default 127.0.0.1:5432) must be running");
    Some(Arc::new(store))
}

trellis_state::state_store_contract!(store());

#[tokio::test]
async fn sweeping_deletes_expired_rows() {
    use std::time::Duration;
    use trellis_state::{Key, Value, WriteOptions};

    let Some(_) = services_enabled("PostgreSQL").then_some(()) else {
        return;
    };
    let mut config = PostgresState::new(postgres_url());
    config.schema = unique_name("t_state");
    let store = PostgresStore::connect("sweep", &config)
        .await
        .expect("connect");
    let ttl = WriteOptions {
        ttl: Some(Duration::from_millis(50)),
        ..Default::default()
    };
    for i in 0..3 {
        store
            .set(
                &Key::new(format!("k{i}")).expect("key"),
                Value::bytes("v"),
                ttl.clone(),
            )
            .await
            .expect("set");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.sweep().await.expect("sweep"), 3);
    assert_eq!(store.sweep().await.expect("sweep"), 0);
    store.close().await.expect("close");
}

#[tokio::test]
async fn two_stores_on_one_schema_migrate_concurrently() {
    if !services_enabled("PostgreSQL") {
        return;
    }
    let mut config = PostgresState::new(postgres_url());
    config.schema = unique_name("t_state");
    let (a, b) = tokio::join!(
        PostgresStore::connect("x", &config),
        PostgresStore::connect("x", &config)
    );
    a.expect("first").close().await.expect("close");
    b.expect("second").close().await.expect("close");
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let mut config = PostgresState::new("postgres://postgres@127.0.0.1:1/test");
    config.connect_timeout = std::time::Duration::from_millis(500);
    let err = PostgresStore::connect("x", &config)
        .await
        .expect_err("nothing listens on port 1");
    assert!(
        matches!(err, trellis_state::StateError::Unavailable { .. }),
        "{err:?}"
    );
}
