//! The coordination contract against the embedded backend.

use std::sync::Arc;

use async_trait::async_trait;
use trellis_coord::Coordinator;
use trellis_coord::contract::Harness;
use trellis_coord::embedded::EmbeddedCoordinator;

struct Embedded {
    dir: tempfile::TempDir,
}

#[async_trait]
impl Harness for Embedded {
    async fn open(&self) -> Arc<dyn Coordinator> {
        Arc::new(
            EmbeddedCoordinator::open(self.dir.path().join("coord.redb"))
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

trellis_coord::coord_contract!(harness());

/// The history checker is not vacuous: a backend whose leases tell holders they last
/// longer than they do is caught.
mod the_checker_catches_a_broken_backend {
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use tokio::sync::watch;
    use trellis_coord::contract::{Harness, lock_history_is_consistent};
    use trellis_coord::embedded::EmbeddedCoordinator;
    use trellis_coord::{CoordError, Coordinator, Kind, LeaderInfo, Lease, Name};

    /// Hands out deadlines three TTLs later than the real ones.
    #[derive(Debug)]
    struct Overpromising(EmbeddedCoordinator);

    fn overpromise(r: Result<Lease, CoordError>) -> Result<Lease, CoordError> {
        r.map(|l| Lease {
            expires_at: l.expires_at + l.ttl * 3,
            ..l
        })
    }

    #[async_trait]
    impl Coordinator for Overpromising {
        fn backend(&self) -> &'static str {
            "overpromising"
        }
        async fn acquire(
            &self,
            name: &Name,
            owner: &str,
            ttl: Duration,
            wait: Duration,
        ) -> Result<Lease, CoordError> {
            overpromise(self.0.acquire(name, owner, ttl, wait).await)
        }
        async fn extend(
            &self,
            name: &Name,
            owner: &str,
            token: u64,
            ttl: Duration,
        ) -> Result<Lease, CoordError> {
            overpromise(self.0.extend(name, owner, token, ttl).await)
        }
        async fn release(&self, name: &Name, owner: &str, token: u64) -> Result<(), CoordError> {
            self.0.release(name, owner, token).await
        }
        async fn lock_holder(&self, name: &Name) -> Result<Option<Lease>, CoordError> {
            self.0.lock_holder(name).await
        }
        async fn campaign(
            &self,
            name: &Name,
            candidate: &str,
            ttl: Duration,
            wait: Duration,
        ) -> Result<Lease, CoordError> {
            overpromise(self.0.campaign(name, candidate, ttl, wait).await)
        }
        async fn keep_alive(
            &self,
            name: &Name,
            candidate: &str,
            token: u64,
            ttl: Duration,
        ) -> Result<Lease, CoordError> {
            overpromise(self.0.keep_alive(name, candidate, token, ttl).await)
        }
        async fn resign(&self, name: &Name, candidate: &str, token: u64) -> Result<(), CoordError> {
            self.0.resign(name, candidate, token).await
        }
        async fn leader(&self, name: &Name) -> Result<Option<LeaderInfo>, CoordError> {
            self.0.leader(name).await
        }
        async fn observe(
            &self,
            name: &Name,
        ) -> Result<watch::Receiver<Option<LeaderInfo>>, CoordError> {
            self.0.observe(name).await
        }
        async fn latest_token(&self, kind: Kind, name: &Name) -> Result<u64, CoordError> {
            self.0.latest_token(kind, name).await
        }
        async fn health(&self) -> Result<(), CoordError> {
            self.0.health().await
        }
        async fn close(&self) -> Result<(), CoordError> {
            self.0.close().await
        }
    }

    struct Broken(tempfile::TempDir);

    #[async_trait]
    impl Harness for Broken {
        async fn open(&self) -> Arc<dyn Coordinator> {
            Arc::new(Overpromising(
                EmbeddedCoordinator::open(self.0.path().join("coord.redb"))
                    .await
                    .expect("open"),
            ))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overpromised_deadlines_fail_the_history_check() {
        let harness = Broken(tempfile::tempdir().expect("tempdir"));
        let run = tokio::spawn(async move { lock_history_is_consistent(&harness).await });
        let outcome = run.await;
        assert!(
            outcome.as_ref().is_err_and(|e| e.is_panic()),
            "the checker passed a broken backend: {outcome:?}"
        );
    }
}
