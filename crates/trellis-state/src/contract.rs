//! The contract every [`StateStore`] backend must pass.
//!
//! Each check is a public `async fn` taking a fresh, empty store, so a backend's
//! test file is one line with [`state_store_contract!`](crate::state_store_contract):
//!
//! ```ignore
//! trellis_state::state_store_contract!(async { my_backend_for_tests().await });
//! ```
//!
//! The expression must evaluate to a future of `Option<Arc<dyn StateStore>>`
//! (`None` skips the test, e.g. when `TRELLIS_TEST_SERVICES=0`); it is evaluated
//! once per test, and each evaluation must give a store no other test uses.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{ETag, Key, Operation, Precondition, StateError, StateStore, Value, WriteOptions};

fn key(s: &str) -> Key {
    Key::new(s).expect("test keys are valid")
}

fn when(precondition: Precondition) -> WriteOptions {
    WriteOptions {
        precondition,
        ttl: None,
    }
}

async fn value_of(store: &Arc<dyn StateStore>, k: &str) -> Option<Bytes> {
    store.get(&key(k)).await.expect("get").map(|i| i.value.data)
}

/// Generates one `#[tokio::test]` per contract check for the store built by `$make`.
#[macro_export]
macro_rules! state_store_contract {
    ($make:expr) => {
        $crate::state_store_contract!(@tests $make;
            get_of_a_missing_key_is_none,
            set_then_get_returns_value_content_type_and_etag,
            every_write_gets_a_fresh_etag,
            if_match_is_compare_and_set,
            if_exists_and_if_absent,
            delete_honours_preconditions,
            etags_are_never_reused_after_delete,
            values_are_binary_safe_and_keys_unicode,
            ttl_expires_keys,
            bulk_get_keeps_order_and_reports_missing,
            transaction_applies_all,
            transaction_conflict_applies_nothing,
            transaction_sees_its_own_earlier_operations,
            list_is_ordered_prefixed_and_paginated,
            concurrent_compare_and_set_has_one_winner,
            concurrent_create_only_has_one_winner,
            health_is_ok,
        );
    };
    (@tests $make:expr; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some(store) = $make.await else { return };
                $crate::contract::$check(&store).await;
                store.close().await.expect("close");
            }
        )+
    };
}

/// `get` of a key never written is `None`.
pub async fn get_of_a_missing_key_is_none(store: &Arc<dyn StateStore>) {
    assert_eq!(store.get(&key("nope")).await.expect("get"), None);
}

/// What `set` stores, `get` returns: bytes, content type and etag.
pub async fn set_then_get_returns_value_content_type_and_etag(store: &Arc<dyn StateStore>) {
    let etag = store
        .set(
            &key("k"),
            Value::new(&b"{\"a\":1}"[..], "application/json"),
            WriteOptions::default(),
        )
        .await
        .expect("set");
    let item = store.get(&key("k")).await.expect("get").expect("present");
    assert_eq!(item.value.data, Bytes::from_static(b"{\"a\":1}"));
    assert_eq!(item.value.content_type, "application/json");
    assert_eq!(item.etag, etag);
}

/// Overwrites get new etags; the latest value wins.
pub async fn every_write_gets_a_fresh_etag(store: &Arc<dyn StateStore>) {
    let mut seen = HashSet::new();
    for i in 0..5 {
        let etag = store
            .set(
                &key("k"),
                Value::bytes(format!("v{i}")),
                WriteOptions::default(),
            )
            .await
            .expect("set");
        assert!(seen.insert(etag), "etag repeated");
    }
    assert_eq!(value_of(store, "k").await, Some(Bytes::from("v4")));
}

/// `IfMatch` succeeds only against the current etag; a stale or foreign etag, or an
/// absent key, is `EtagMismatch` and changes nothing.
pub async fn if_match_is_compare_and_set(store: &Arc<dyn StateStore>) {
    let k = key("cas");
    let missing = store
        .set(
            &k,
            Value::bytes("x"),
            when(Precondition::IfMatch(ETag::new("1"))),
        )
        .await;
    assert!(
        matches!(missing, Err(StateError::EtagMismatch { .. })),
        "{missing:?}"
    );
    assert_eq!(value_of(store, "cas").await, None);

    let e1 = store
        .set(&k, Value::bytes("1"), WriteOptions::default())
        .await
        .expect("set");
    let e2 = store
        .set(
            &k,
            Value::bytes("2"),
            when(Precondition::IfMatch(e1.clone())),
        )
        .await
        .expect("cas with the current etag");
    for stale in [e1, ETag::new("not-an-etag"), ETag::new("")] {
        let r = store
            .set(&k, Value::bytes("3"), when(Precondition::IfMatch(stale)))
            .await;
        assert!(matches!(r, Err(StateError::EtagMismatch { .. })), "{r:?}");
    }
    let item = store.get(&k).await.expect("get").expect("present");
    assert_eq!((item.value.data, item.etag), (Bytes::from("2"), e2));
}

/// `IfExists` needs the key, `IfAbsent` needs it gone.
pub async fn if_exists_and_if_absent(store: &Arc<dyn StateStore>) {
    let k = key("k");
    let r = store
        .set(&k, Value::bytes("x"), when(Precondition::IfExists))
        .await;
    assert!(matches!(r, Err(StateError::EtagMismatch { .. })), "{r:?}");
    store
        .set(&k, Value::bytes("1"), when(Precondition::IfAbsent))
        .await
        .expect("create");
    let r = store
        .set(&k, Value::bytes("2"), when(Precondition::IfAbsent))
        .await;
    assert!(matches!(r, Err(StateError::KeyExists { .. })), "{r:?}");
    store
        .set(&k, Value::bytes("3"), when(Precondition::IfExists))
        .await
        .expect("update");
    assert_eq!(value_of(store, "k").await, Some(Bytes::from("3")));
}

/// `delete` removes; with a stale etag it fails and keeps the value; deleting an
/// absent key is fine unless a precondition says otherwise.
pub async fn delete_honours_preconditions(store: &Arc<dyn StateStore>) {
    let k = key("d");
    assert!(
        !store
            .delete(&k, Precondition::None)
            .await
            .expect("delete absent")
    );
    let r = store.delete(&k, Precondition::IfExists).await;
    assert!(matches!(r, Err(StateError::EtagMismatch { .. })), "{r:?}");

    let e1 = store
        .set(&k, Value::bytes("1"), WriteOptions::default())
        .await
        .expect("set");
    let e2 = store
        .set(&k, Value::bytes("2"), WriteOptions::default())
        .await
        .expect("set");
    let r = store.delete(&k, Precondition::IfMatch(e1)).await;
    assert!(matches!(r, Err(StateError::EtagMismatch { .. })), "{r:?}");
    assert_eq!(value_of(store, "d").await, Some(Bytes::from("2")));
    assert!(
        store
            .delete(&k, Precondition::IfMatch(e2))
            .await
            .expect("delete")
    );
    assert_eq!(value_of(store, "d").await, None);
    assert!(
        store
            .list("", None, 10)
            .await
            .expect("list")
            .keys
            .is_empty()
    );
}

/// An etag from before a delete never matches the re-created key (no ABA).
pub async fn etags_are_never_reused_after_delete(store: &Arc<dyn StateStore>) {
    let k = key("aba");
    let old = store
        .set(&k, Value::bytes("old"), WriteOptions::default())
        .await
        .expect("set");
    store.delete(&k, Precondition::None).await.expect("delete");
    let new = store
        .set(&k, Value::bytes("new"), WriteOptions::default())
        .await
        .expect("set");
    assert_ne!(old, new);
    let r = store
        .set(&k, Value::bytes("x"), when(Precondition::IfMatch(old)))
        .await;
    assert!(matches!(r, Err(StateError::EtagMismatch { .. })), "{r:?}");
}

/// Every byte value round-trips, including empty and 1 MiB values, under keys with
/// spaces, slashes, non-ASCII and the maximum length.
pub async fn values_are_binary_safe_and_keys_unicode(store: &Arc<dyn StateStore>) {
    let all_bytes: Vec<u8> = (0..=255).collect();
    let big = vec![0xA5u8; 1 << 20];
    let long_key = "k".repeat(crate::MAX_KEY_LEN);
    let cases: [(&str, &[u8]); 5] = [
        ("bytes", &all_bytes),
        ("empty", b""),
        ("a/b c/ünï/键/🔑", b"unicode key"),
        (&long_key, b"long key"),
        ("big", &big),
    ];
    for (k, v) in cases {
        store
            .set(
                &key(k),
                Value::new(Bytes::copy_from_slice(v), "application/octet-stream"),
                WriteOptions::default(),
            )
            .await
            .expect("set");
    }
    for (k, v) in cases {
        assert_eq!(
            value_of(store, k).await.as_deref(),
            Some(v),
            "key {}",
            &k[..k.len().min(20)]
        );
    }
}

/// A key past its TTL is absent for `get`, `list` and `IfAbsent`; writing without a
/// TTL clears an earlier one.
pub async fn ttl_expires_keys(store: &Arc<dyn StateStore>) {
    let short = WriteOptions {
        ttl: Some(Duration::from_millis(600)),
        ..Default::default()
    };
    store
        .set(&key("ttl"), Value::bytes("v"), short.clone())
        .await
        .expect("set");
    store
        .set(&key("cleared"), Value::bytes("v"), short)
        .await
        .expect("set");
    store
        .set(&key("cleared"), Value::bytes("v2"), WriteOptions::default())
        .await
        .expect("set without ttl");
    assert_eq!(value_of(store, "ttl").await, Some(Bytes::from("v")));

    // Real time: Redis and PostgreSQL expire by their own clocks. Bounded wait.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while value_of(store, "ttl").await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "key did not expire within 10s of a 600ms TTL"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed: Vec<String> = store
        .list("", None, 10)
        .await
        .expect("list")
        .keys
        .iter()
        .map(|k| k.as_str().to_owned())
        .collect();
    assert_eq!(listed, ["cleared"]);
    assert_eq!(
        store.bulk_get(&[key("ttl")]).await.expect("bulk"),
        vec![None]
    );
    let r = store
        .set(
            &key("ttl"),
            Value::bytes("again"),
            when(Precondition::IfAbsent),
        )
        .await;
    assert!(r.is_ok(), "an expired key counts as absent: {r:?}");
    assert_eq!(value_of(store, "cleared").await, Some(Bytes::from("v2")));
}

/// `bulk_get` answers in request order, `None` for missing keys.
pub async fn bulk_get_keeps_order_and_reports_missing(store: &Arc<dyn StateStore>) {
    for k in ["a", "b"] {
        store
            .set(&key(k), Value::bytes(k.to_owned()), WriteOptions::default())
            .await
            .expect("set");
    }
    let items = store
        .bulk_get(&[key("b"), key("missing"), key("a"), key("b")])
        .await
        .expect("bulk");
    let values: Vec<Option<Bytes>> = items.into_iter().map(|i| i.map(|i| i.value.data)).collect();
    assert_eq!(
        values,
        [Some("b".into()), None, Some("a".into()), Some("b".into())]
    );
    assert!(store.bulk_get(&[]).await.expect("empty bulk").is_empty());
}

/// A transaction applies every operation and returns etags for upserts.
pub async fn transaction_applies_all(store: &Arc<dyn StateStore>) {
    let e = store
        .set(&key("x"), Value::bytes("0"), WriteOptions::default())
        .await
        .expect("set");
    store
        .set(&key("gone"), Value::bytes("0"), WriteOptions::default())
        .await
        .expect("set");
    let etags = store
        .transact(vec![
            Operation::Upsert {
                key: key("x"),
                value: Value::bytes("1"),
                options: when(Precondition::IfMatch(e)),
            },
            Operation::Upsert {
                key: key("y"),
                value: Value::json("2"),
                options: when(Precondition::IfAbsent),
            },
            Operation::Delete {
                key: key("gone"),
                precondition: Precondition::IfExists,
            },
        ])
        .await
        .expect("transaction");
    assert_eq!(etags.len(), 3);
    assert!(etags[0].is_some() && etags[1].is_some() && etags[2].is_none());
    let x = store.get(&key("x")).await.expect("get").expect("x");
    assert_eq!(
        (x.value.data, Some(x.etag)),
        (Bytes::from("1"), etags[0].clone())
    );
    assert_eq!(value_of(store, "y").await, Some(Bytes::from("2")));
    assert_eq!(value_of(store, "gone").await, None);
    assert!(
        store
            .transact(vec![])
            .await
            .expect("empty transaction")
            .is_empty()
    );
}

/// A failed precondition anywhere applies nothing and names the operation.
pub async fn transaction_conflict_applies_nothing(store: &Arc<dyn StateStore>) {
    let e = store
        .set(&key("a"), Value::bytes("a0"), WriteOptions::default())
        .await
        .expect("set");
    store
        .set(&key("b"), Value::bytes("b0"), WriteOptions::default())
        .await
        .expect("set");
    let r = store
        .transact(vec![
            Operation::Upsert {
                key: key("a"),
                value: Value::bytes("a1"),
                options: when(Precondition::IfMatch(e)),
            },
            Operation::Delete {
                key: key("b"),
                precondition: Precondition::None,
            },
            Operation::Upsert {
                key: key("new"),
                value: Value::bytes("n"),
                options: WriteOptions::default(),
            },
            Operation::Upsert {
                key: key("b"),
                value: Value::bytes("b1"),
                options: when(Precondition::IfMatch(ETag::new("999999"))),
            },
        ])
        .await;
    match r {
        Err(StateError::TransactionConflict { index, key, reason }) => {
            assert_eq!((index, key.as_str()), (3, "b"));
            assert!(
                matches!(*reason, StateError::EtagMismatch { .. }),
                "{reason:?}"
            );
        }
        other => panic!("expected a conflict at index 3, got {other:?}"),
    }
    assert_eq!(value_of(store, "a").await, Some(Bytes::from("a0")));
    assert_eq!(value_of(store, "b").await, Some(Bytes::from("b0")));
    assert_eq!(value_of(store, "new").await, None);

    let r = store
        .transact(vec![Operation::Upsert {
            key: key("a"),
            value: Value::bytes("x"),
            options: when(Precondition::IfAbsent),
        }])
        .await;
    assert!(
        matches!(&r, Err(StateError::TransactionConflict { index: 0, reason, .. }) if matches!(**reason, StateError::KeyExists { .. })),
        "{r:?}"
    );
}

/// Later operations see earlier ones: create-then-update of one key works, and
/// delete-then-`IfExists` fails.
pub async fn transaction_sees_its_own_earlier_operations(store: &Arc<dyn StateStore>) {
    store
        .transact(vec![
            Operation::Upsert {
                key: key("k"),
                value: Value::bytes("1"),
                options: when(Precondition::IfAbsent),
            },
            Operation::Upsert {
                key: key("k"),
                value: Value::bytes("2"),
                options: when(Precondition::IfExists),
            },
        ])
        .await
        .expect("create then update");
    assert_eq!(value_of(store, "k").await, Some(Bytes::from("2")));
    let r = store
        .transact(vec![
            Operation::Delete {
                key: key("k"),
                precondition: Precondition::None,
            },
            Operation::Upsert {
                key: key("k"),
                value: Value::bytes("3"),
                options: when(Precondition::IfExists),
            },
        ])
        .await;
    assert!(
        matches!(r, Err(StateError::TransactionConflict { index: 1, .. })),
        "{r:?}"
    );
    assert_eq!(value_of(store, "k").await, Some(Bytes::from("2")));
}

/// `list` returns live keys with the prefix in byte order, `limit` at a time, and
/// the cursor walks every key exactly once.
pub async fn list_is_ordered_prefixed_and_paginated(store: &Arc<dyn StateStore>) {
    let names = [
        "user/b", "user/a", "user/ä", "user/a/1", "users", "other", "user0", "user/",
    ];
    for n in names {
        store
            .set(&key(n), Value::bytes("v"), WriteOptions::default())
            .await
            .expect("set");
    }
    let mut all = Vec::new();
    let mut cursor: Option<Key> = None;
    let mut pages = 0;
    loop {
        let page = store.list("user/", cursor.as_ref(), 2).await.expect("list");
        assert!(page.keys.len() <= 2);
        all.extend(page.keys.iter().map(|k| k.as_str().to_owned()));
        pages += 1;
        assert!(pages < 10, "pagination does not end");
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(all, ["user/", "user/a", "user/a/1", "user/b", "user/ä"]);
    let everything = store.list("", None, 100).await.expect("list all");
    assert_eq!(everything.keys.len(), names.len());
    assert_eq!(everything.next, None);
    assert!(
        store
            .list("zzz", None, 10)
            .await
            .expect("list")
            .keys
            .is_empty()
    );
}

/// Of N writers racing with the same `IfMatch`, exactly one wins each round, and the
/// stored value is the winner's.
pub async fn concurrent_compare_and_set_has_one_winner(store: &Arc<dyn StateStore>) {
    const WRITERS: usize = 16;
    const ROUNDS: usize = 5;
    let k = key("race");
    let mut etag = store
        .set(&k, Value::bytes("start"), WriteOptions::default())
        .await
        .expect("set");
    for round in 0..ROUNDS {
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let (store, k, etag) = (Arc::clone(store), k.clone(), etag.clone());
            tasks.push(tokio::spawn(async move {
                let value = Value::bytes(format!("r{round}w{writer}"));
                (
                    writer,
                    store
                        .set(&k, value, when(Precondition::IfMatch(etag)))
                        .await,
                )
            }));
        }
        let mut winners = Vec::new();
        for task in tasks {
            match task.await.expect("join") {
                (writer, Ok(new_etag)) => winners.push((writer, new_etag)),
                (_, Err(StateError::EtagMismatch { .. })) => {}
                (_, Err(e)) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one CAS must win, got {winners:?}"
        );
        let (writer, new_etag) = winners.remove(0);
        let item = store.get(&k).await.expect("get").expect("present");
        assert_eq!(item.value.data, Bytes::from(format!("r{round}w{writer}")));
        assert_eq!(item.etag, new_etag);
        etag = new_etag;
    }
}

/// Of N writers racing to create one key with `IfAbsent`, exactly one wins.
pub async fn concurrent_create_only_has_one_winner(store: &Arc<dyn StateStore>) {
    const WRITERS: usize = 16;
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = Arc::clone(store);
        tasks.push(tokio::spawn(async move {
            store
                .set(
                    &key("once"),
                    Value::bytes(format!("w{writer}")),
                    when(Precondition::IfAbsent),
                )
                .await
        }));
    }
    let mut wins = 0;
    for task in tasks {
        match task.await.expect("join") {
            Ok(_) => wins += 1,
            Err(StateError::KeyExists { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(wins, 1);
}

/// `health` succeeds on a reachable backend.
pub async fn health_is_ok(store: &Arc<dyn StateStore>) {
    store.health().await.expect("healthy");
}
