//! `observe`: the current leader, then a watch on the election's holder key.
//!
//! Each `observe` call gets its own task and watch, ending when every receiver is
//! dropped or the coordinator closes (the receivers then see the channel close).
//! The task publishes *changes of term* only: a put with a create revision (token)
//! other than the current one is a new leader, a deletion is no leader, and a put
//! with the current token is the leader's key moving to a lease with another TTL.
//! Tokens are revisions and watch events arrive in revision order, so terms only
//! move forward; `publish` refuses an older one anyway, which keeps that true
//! across the re-reads done after a broken watch.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tokio::sync::watch;
use tokio::time::sleep;

use super::record::Held;
use super::{Inner, error};
use crate::api::{CoordError, Kind, LeaderInfo};
use crate::name::Name;

/// Longest pause between attempts to re-establish a broken watch.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Starts following the election `name`.
pub(super) async fn start(
    inner: Arc<Inner>,
    name: &Name,
) -> Result<watch::Receiver<Option<LeaderInfo>>, CoordError> {
    inner.check_open()?;
    let key = inner.keys(Kind::Election, name).holder;
    let (current, revision) = leader_now(&inner, name, &key).await?;
    let (tx, rx) = watch::channel(current);
    tokio::spawn(follow(inner, name.clone(), key, revision, tx));
    Ok(rx)
}

/// The leader, and the revision it was read at.
async fn leader_now(
    inner: &Inner,
    name: &Name,
    key: &str,
) -> Result<(Option<LeaderInfo>, i64), CoordError> {
    let seen = inner.read(key).await?;
    let leader = match seen.holder {
        Some(held) => inner
            .describe(Kind::Election, name, held)
            .await?
            .map(|l| LeaderInfo::from(&l)),
        None => None,
    };
    Ok((leader, seen.revision))
}

/// Publishes `now` if it is another term than the one published (a newer one, or
/// none); the same term only refreshes the deadline, without notifying.
fn publish(tx: &watch::Sender<Option<LeaderInfo>>, now: Option<LeaderInfo>) {
    tx.send_if_modified(|seen| {
        let token = |l: &Option<LeaderInfo>| l.as_ref().map(|l| l.fencing_token);
        match (token(seen), token(&now)) {
            (old, new) if old == new => {
                *seen = now;
                false
            }
            (Some(old), Some(new)) if new < old => false,
            _ => {
                *seen = now;
                true
            }
        }
    });
}

async fn follow(
    inner: Arc<Inner>,
    name: Name,
    key: String,
    revision: i64,
    tx: watch::Sender<Option<LeaderInfo>>,
) {
    let mut closed = inner.closed.subscribe();
    tokio::select! {
        () = follow_key(&inner, &name, &key, revision, &tx) => {}
        () = tx.closed() => {}
        _ = closed.wait_for(|c| *c) => {}
    }
    tracing::debug!(%name, "observer stopped");
}

/// Watches from `revision + 1`; after a broken watch, re-reads the leader and
/// watches again from there. Never returns: `follow` stops it.
async fn follow_key(
    inner: &Inner,
    name: &Name,
    key: &str,
    mut revision: i64,
    tx: &watch::Sender<Option<LeaderInfo>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match watch_from(inner, name, key, &mut revision, tx).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(%name, error = %e, "election watch broke; re-reading the leader");
                sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        match leader_now(inner, name, key).await {
            Ok((now, at)) => {
                publish(tx, now);
                revision = at;
            }
            // The watch resumes from the last revision seen.
            Err(e) => tracing::warn!(%name, error = %e, "leader not re-read"),
        }
    }
}

/// Follows the key until the watch ends (cancelled, e.g. by compaction) or fails,
/// publishing each change of term and advancing `revision`.
async fn watch_from(
    inner: &Inner,
    name: &Name,
    key: &str,
    revision: &mut i64,
    tx: &watch::Sender<Option<LeaderInfo>>,
) -> Result<(), CoordError> {
    let mut watches = inner.client.watch_client();
    let options = WatchOptions::new().with_start_revision(*revision + 1);
    let mut stream = inner
        .call("watch", watches.watch(key, Some(options)))
        .await?;
    loop {
        let Some(resp) = stream.message().await.map_err(|e| error("watch", e))? else {
            return Ok(());
        };
        if resp.canceled() {
            return Ok(());
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            *revision = (*revision).max(kv.mod_revision());
            match event.event_type() {
                EventType::Delete => publish(tx, None),
                EventType::Put => {
                    let held = Held::parse(kv)?;
                    let current = tx.borrow().as_ref().map(|l| l.fencing_token);
                    if current == Some(held.token) {
                        // The same term on another lease.
                        continue;
                    }
                    // `None` if that leader's lease is already gone: its deletion
                    // follows.
                    let leader = inner
                        .describe(Kind::Election, name, held)
                        .await?
                        .map(|l| LeaderInfo::from(&l));
                    publish(tx, leader);
                }
            }
        }
    }
}
