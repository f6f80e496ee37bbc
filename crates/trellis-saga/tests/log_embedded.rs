//! The saga log contract against the embedded backend, plus what only a file
//! shows. Each test has a directory of its own.

use std::sync::Arc;

use async_trait::async_trait;
use trellis_saga::log::contract::Harness;
use trellis_saga::log::{EmbeddedLog, LogError, SagaLog};

struct Embedded {
    dir: tempfile::TempDir,
}

#[async_trait]
impl Harness for Embedded {
    async fn open(&self) -> Arc<dyn SagaLog> {
        Arc::new(
            EmbeddedLog::open(self.dir.path().join("saga.redb"))
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

trellis_saga::saga_log_contract!(harness());

/// A file is opened by one log at a time; once closed, it opens again.
#[tokio::test]
async fn a_second_open_of_the_same_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nested/dir/saga.redb");
    let log = EmbeddedLog::open(&path).await.expect("open");
    assert_eq!(log.path(), path);
    let again = EmbeddedLog::open(&path).await;
    assert!(matches!(again, Err(LogError::Backend(_))), "{again:?}");
    log.close().await.expect("close");
    EmbeddedLog::open(&path)
        .await
        .expect("open after close")
        .close()
        .await
        .expect("close");
}

/// A path that can't be a file is an error, not a panic.
#[tokio::test]
async fn an_unusable_path_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a directory").expect("write");
    let r = EmbeddedLog::open(file.join("saga.redb")).await;
    assert!(matches!(r, Err(LogError::Backend(_))), "{r:?}");
    let r = EmbeddedLog::open(&file).await;
    assert!(r.is_err(), "a file that is not a redb database: {r:?}");
}
