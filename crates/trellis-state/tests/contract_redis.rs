//! The state store contract on Redis. Each test gets its own key prefix.

use std::sync::Arc;

use trellis_core::config::RedisState;
use trellis_core::testing::{redis_url, services_enabled, unique_name};
use trellis_state::{RedisStore, StateStore};

async fn store() -> Option<Arc<dyn StateStore>> {
    if !services_enabled("Redis") {
        return None;
    }
    let mut config = RedisState::new(redis_url());
    config.key_prefix = Some(format!("{{{}}}:", unique_name("t_state")));
    let store = RedisStore::connect("contract", &config)
        .await
        .expect("Redis at TRELLIS_TEST_REDIS_URL (default 127.0.0.1:6379) must be running");
    Some(Arc::new(store))
}

trellis_state::state_store_contract!(store());

#[tokio::test]
async fn sweeping_drops_expired_keys_from_the_index() {
    use std::time::Duration;
    use trellis_state::{Key, Value, WriteOptions};

    if !services_enabled("Redis") {
        return;
    }
    let mut config = RedisState::new(redis_url());
    config.key_prefix = Some(format!("{{{}}}:", unique_name("t_state")));
    let store = RedisStore::connect("sweep", &config)
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
    store
        .set(
            &Key::new("stays").expect("key"),
            Value::bytes("v"),
            WriteOptions::default(),
        )
        .await
        .expect("set");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(store.sweep().await.expect("sweep"), 3);
    assert_eq!(store.sweep().await.expect("sweep"), 0);
    store.close().await.expect("close");
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let mut config = RedisState::new("redis://127.0.0.1:1");
    config.connect_timeout = std::time::Duration::from_millis(500);
    let err = RedisStore::connect("x", &config)
        .await
        .expect_err("nothing listens on port 1");
    assert!(
        matches!(err, trellis_state::StateError::Unavailable { .. }),
        "{err:?}"
    );
}
