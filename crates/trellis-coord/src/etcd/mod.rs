//! The etcd backend: locks and elections shared by every Trellis node that talks to
//! the same etcd cluster.
//!
//! # Why not etcd's own lock and election services
//! etcd ships `v3lock` and `v3election`, but their fencing value is the revision of a
//! *waiter* key created when a caller starts waiting. A holder that started waiting
//! early can then carry a smaller number than a write made under an earlier holder
//! that started waiting later — useless as a fencing token. Here the token is the
//! revision of the transaction that *grants* the name, so tokens grow in grant order.
//!
//! # How it works
//! Two keys per (kind, name) under the configured prefix (see the `record` module):
//! `…/{kind}/{name}/holder` exists while the name is held, attached to an etcd lease
//! with the holder's TTL, and `…/{kind}/{name}/fence` is never deleted.
//! - **Grant**: grant a lease, then one transaction "holder key absent → put the
//!   holder key on the lease, and the fence key on no lease". The transaction's
//!   revision is the fencing token: it is the holder key's create revision and the
//!   fence key's mod revision, which
//!   [`latest_token`](crate::Coordinator::latest_token) reports. etcd's revision
//!   counter is durable and never goes back, so tokens grow across restarts of etcd
//!   and of Trellis.
//! - **Extend**: with the same TTL, one keep-alive renews the lease, then a read
//!   checks the holder key is unchanged (still on that lease, same term). A
//!   different TTL needs a new lease (a keep-alive renews to the *granted* TTL): the
//!   key is re-attached to it in a transaction guarded by the key's mod revision,
//!   and the old lease is revoked. The token (create revision) does not change.
//! - **Release**: delete the holder key in a transaction guarded by its mod
//!   revision, then revoke the lease. Expiry needs nobody: etcd deletes the holder
//!   key when its lease runs out, and a keep-alive of an expired lease fails, so
//!   expiry is final.
//! - **Waiting**: a blocked call watches the holder key, from the revision at which
//!   it saw it held, for its deletion — release, resign and expiry all delete it —
//!   then tries again. No waiter keys, so nothing to clean up and no FIFO order.
//! - **Observing**: read the current leader, then watch the holder key from that
//!   revision, publishing only changes of term (a new create revision, or a
//!   deletion); re-attaching a key to a new lease is a put with the same token.
//!
//! # Time
//! etcd leases count whole seconds and have a minimum (1.5 election timeouts,
//! rounded up: 2 s with default settings). Requested TTLs are rounded up to whole
//! seconds, and [`Lease::ttl`] reports what etcd granted. Deadlines are computed by
//! the client: [`Lease::expires_at`] is an `Instant` taken *before* the grant or
//! keep-alive was sent plus the granted TTL, so it is never later than the moment
//! etcd frees the name. Deadlines read back
//! ([`lock_holder`](crate::Coordinator::lock_holder),
//! [`leader`](crate::Coordinator::leader)) come from the lease's remaining TTL,
//! which etcd truncates to whole seconds, again erring early.
//!
//! # Failures
//! A request that can't reach etcd (or gets no answer within
//! [`EtcdConfig::request_timeout`]) fails with [`CoordError::Unavailable`]; the
//! guards retry those until their lease's deadline. A lease granted for a request
//! that then failed or was cancelled is revoked in the background, so it can't keep
//! a name held that nobody knows it holds. [`close`](crate::Coordinator::close)
//! wakes blocked calls and stops observers; leases already granted stay in etcd
//! until released or expired.
//!
//! ```no_run
//! use std::time::Duration;
//! use trellis_coord::etcd::{EtcdConfig, EtcdCoordinator};
//! use trellis_coord::{Coordinator, Name};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let coord = EtcdCoordinator::connect(EtcdConfig {
//!     endpoints: vec!["http://10.0.0.1:2379".into(), "http://10.0.0.2:2379".into()],
//!     prefix: "orders/coord/".into(),
//!     ..EtcdConfig::default()
//! })
//! .await?;
//! let name = Name::new("nightly-report")?;
//! let lease = coord.acquire(&name, "worker-1", Duration::from_secs(10), Duration::from_secs(30)).await?;
//! // etcd grants whole seconds, at least its minimum.
//! assert!(lease.ttl >= Duration::from_secs(10));
//! // ... work, passing lease.fencing_token to the storage written ...
//! coord.release(&name, "worker-1", lease.fencing_token).await?;
//! coord.close().await?;
//! # Ok(())
//! # }
//! ```

mod follow;
mod record;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetResponse, LeaseClient, PutOptions, Txn, TxnOp,
    TxnOpResponse, TxnResponse, WatchFilterType, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

use self::record::{Held, Keys, ceil_secs, holder_value, secs};
use crate::api::{ByKind, CoordError, Kind, LeaderInfo, Lease};
use crate::name::Name;

pub(crate) const BACKEND: &str = "etcd";

/// HTTP/2 pings on open streams, so a blocked call or an observer notices a dead
/// connection. etcd refuses pings more often than every 5 s (its default
/// `--grpc-keepalive-min-time`).
const PING_INTERVAL: Duration = Duration::from_secs(10);

/// gRPC status codes after which the same request may succeed: CANCELLED, UNKNOWN
/// (how transport failures often surface), DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
/// ABORTED, UNAVAILABLE (etcd's "no leader", "request timed out", "leader changed").
const TRANSIENT_CODES: [i32; 6] = [1, 2, 4, 8, 10, 14];
/// gRPC NOT_FOUND (etcd: "requested lease not found").
const NOT_FOUND: i32 = 5;

// === config ===

/// How to reach etcd, and where in its key space locks and elections live.
///
/// In a configuration file (durations in milliseconds):
/// ```toml
/// endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
/// prefix = "trellis/coord/"
/// connect_timeout = 5000
/// request_timeout = 5000
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the cluster's members (`http://host:port`); requests are
    /// balanced across them.
    pub endpoints: Vec<String>,
    /// Put in front of every key (`{prefix}lock/{name}/holder`), so that several
    /// deployments — or tests — can share one cluster. End it with `/`.
    pub prefix: String,
    /// How long connecting to an endpoint may take.
    #[serde(with = "crate::detector::millis")]
    pub connect_timeout: Duration,
    /// How long one request may go unanswered before it fails with
    /// [`CoordError::Unavailable`] (also how long a dead connection may go
    /// unnoticed under a blocked call, on top of 10 s between pings).
    #[serde(with = "crate::detector::millis")]
    pub request_timeout: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            prefix: "trellis/coord/".to_owned(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl EtcdConfig {
    /// Checks the fields.
    ///
    /// # Errors
    /// [`CoordError::Backend`] naming the field: no endpoints, an empty prefix, or
    /// a zero timeout.
    pub fn validate(self) -> Result<Self, CoordError> {
        let problem = if self.endpoints.is_empty() {
            Some("endpoints: at least one is needed")
        } else if self.prefix.is_empty() {
            Some("prefix: must not be empty (keys would mix with other data)")
        } else if self.connect_timeout.is_zero() {
            Some("connect_timeout: must be above 0")
        } else if self.request_timeout.is_zero() {
            Some("request_timeout: must be above 0")
        } else {
            None
        };
        match problem {
            Some(problem) => Err(CoordError::Backend {
                backend: BACKEND,
                reason: format!("invalid config: {problem}"),
            }),
            None => Ok(self),
        }
    }
}

// === impl EtcdCoordinator ===

/// A [`Coordinator`](crate::Coordinator) on an etcd cluster: every Trellis node
/// connected to the same cluster and prefix shares its locks and elections.
///
/// See the [module docs](self) for how it maps onto etcd, and an example.
#[derive(Debug)]
pub struct EtcdCoordinator {
    inner: Arc<Inner>,
}

/// What requests and the observer tasks share.
struct Inner {
    /// Cheap to clone: clones share one balanced channel.
    client: Client,
    prefix: String,
    request_timeout: Duration,
    /// `true` once closed; blocked calls and observers wait on it.
    closed: watch::Sender<bool>,
    /// The smallest TTL etcd grants, in seconds, as learnt from grants that came
    /// back longer than asked (1 until then). Knowing it lets an extend to a TTL
    /// that would be rounded up to the current one use a keep-alive instead of a
    /// new lease.
    min_ttl_secs: AtomicI64,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("prefix", &self.prefix)
            .field("request_timeout", &self.request_timeout)
            .field("closed", &*self.closed.borrow())
            .field("min_ttl_secs", &self.min_ttl_secs)
            .finish_non_exhaustive()
    }
}

impl EtcdCoordinator {
    /// Connects to the cluster and checks that it answers.
    ///
    /// # Errors
    /// [`CoordError::Backend`] for an invalid config (see
    /// [`EtcdConfig::validate`]) or endpoint URL; [`CoordError::Unavailable`] if
    /// etcd can't be reached.
    pub async fn connect(config: EtcdConfig) -> Result<Self, CoordError> {
        let (client, config) = connect_client(config).await?;
        let this = Self {
            inner: Arc::new(Inner {
                client,
                prefix: config.prefix,
                request_timeout: config.request_timeout,
                closed: watch::Sender::new(false),
                min_ttl_secs: AtomicI64::new(1),
            }),
        };
        tracing::info!(endpoints = ?config.endpoints, prefix = %this.inner.prefix, "connected to etcd");
        Ok(this)
    }

    /// The prefix of every key this coordinator uses.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }
}

impl Drop for EtcdCoordinator {
    fn drop(&mut self) {
        // Observer tasks hold `inner`: tell them to stop.
        self.inner.closed.send_replace(true);
    }
}

/// Validates `config`, connects to the cluster and checks that it answers. Shared by
/// the coordinator and the registry's etcd mirror.
///
/// # Errors
/// As [`EtcdCoordinator::connect`].
pub(crate) async fn connect_client(config: EtcdConfig) -> Result<(Client, EtcdConfig), CoordError> {
    let config = config.validate()?;
    let options = ConnectOptions::new()
        .with_connect_timeout(config.connect_timeout)
        .with_keep_alive(PING_INTERVAL, config.request_timeout)
        // etcd answers pings on a connection without streams with GOAWAY.
        .with_keep_alive_while_idle(false);
    let client = tokio::time::timeout(
        config.connect_timeout,
        Client::connect(&config.endpoints, Some(options)),
    )
    .await
    .map_err(|_| CoordError::Unavailable {
        backend: BACKEND,
        reason: format!("connect: no connection within {:?}", config.connect_timeout),
    })?
    .map_err(|e| error("connect", e))?;
    let mut maintenance = client.maintenance_client();
    tokio::time::timeout(config.request_timeout, maintenance.status())
        .await
        .map_err(|_| CoordError::Unavailable {
            backend: BACKEND,
            reason: format!("status: no answer within {:?}", config.request_timeout),
        })?
        .map_err(|e| error("status", e))?;
    Ok((client, config))
}

/// The holder key as read, and the revision it was read at (where a watch for
/// what happens next starts).
#[derive(Debug)]
struct Seen {
    holder: Option<Held>,
    revision: i64,
}

impl Seen {
    fn from_get(resp: &GetResponse, revision: i64) -> Result<Self, CoordError> {
        Ok(Self {
            holder: resp.kvs().first().map(Held::parse).transpose()?,
            revision,
        })
    }

    /// From a transaction that failed and read the holder key instead.
    fn from_failed_txn(resp: &TxnResponse) -> Result<Self, CoordError> {
        let revision = resp.header().map_or(0, |h| h.revision());
        match resp.op_responses().first() {
            Some(TxnOpResponse::Get(get)) => Self::from_get(get, revision),
            _ => Err(CoordError::Backend {
                backend: BACKEND,
                reason: "transaction failed without reading the holder".to_owned(),
            }),
        }
    }
}

fn not_holder(
    kind: Kind,
    name: &Name,
    owner: &str,
    token: u64,
    holder: Option<Held>,
) -> CoordError {
    CoordError::NotHolder {
        kind,
        name: name.clone(),
        owner: owner.to_owned(),
        token,
        holder: holder.map(|h| h.owner),
    }
}

fn lease(kind: Kind, name: &Name, owner: &str, token: u64, base: Instant, ttl_secs: i64) -> Lease {
    Lease {
        kind,
        name: name.clone(),
        owner: owner.to_owned(),
        fencing_token: token,
        expires_at: base + secs(ttl_secs),
        ttl: secs(ttl_secs),
    }
}

/// Maps a client error: connection trouble is [`CoordError::Unavailable`].
pub(crate) fn error(what: &str, e: etcd_client::Error) -> CoordError {
    use etcd_client::Error as E;
    let transient = match &e {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => true,
        E::GRpcStatus(status) => TRANSIENT_CODES.contains(&i32::from(status.code())),
        _ => false,
    };
    let reason = format!("{what}: {e}");
    if transient {
        CoordError::Unavailable {
            backend: BACKEND,
            reason,
        }
    } else {
        CoordError::Backend {
            backend: BACKEND,
            reason,
        }
    }
}

/// Whether `e` says the lease does not exist (any more).
pub(crate) fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        // The client's answer to a keep-alive that comes back with TTL 0.
        etcd_client::Error::LeaseKeepAliveError(msg) => msg.contains("not found"),
        etcd_client::Error::GRpcStatus(status) => i32::from(status.code()) == NOT_FOUND,
        _ => false,
    }
}

impl Inner {
    fn keys(&self, kind: Kind, name: &Name) -> Keys {
        Keys::new(&self.prefix, kind, name)
    }

    fn check_open(&self) -> Result<(), CoordError> {
        if *self.closed.borrow() {
            Err(CoordError::Closed)
        } else {
            Ok(())
        }
    }

    /// Runs one request: refused once closed, abandoned when closing or after the
    /// request timeout (both leave the outcome unknown), client errors as they are.
    async fn call_raw<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<Result<T, etcd_client::Error>, CoordError> {
        let mut closed = self.closed.subscribe();
        if *closed.borrow_and_update() {
            return Err(CoordError::Closed);
        }
        tokio::select! {
            outcome = tokio::time::timeout(self.request_timeout, request) => {
                outcome.map_err(|_| CoordError::Unavailable {
                    backend: BACKEND,
                    reason: format!("{what}: no answer within {:?}", self.request_timeout),
                })
            }
            _ = closed.wait_for(|c| *c) => Err(CoordError::Closed),
        }
    }

    /// [`call_raw`](Self::call_raw), with client errors mapped.
    async fn call<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, CoordError> {
        self.call_raw(what, request)
            .await?
            .map_err(|e| error(what, e))
    }

    async fn ping(&self) -> Result<(), CoordError> {
        let mut maintenance = self.client.maintenance_client();
        self.call("status", maintenance.status()).await.map(drop)
    }

    /// The holder of `key`, if any.
    async fn read(&self, key: &str) -> Result<Seen, CoordError> {
        let mut kv = self.client.kv_client();
        let resp = self.call("get", kv.get(key, None)).await?;
        Seen::from_get(&resp, resp.header().map_or(0, |h| h.revision()))
    }

    async fn txn(&self, what: &str, txn: Txn) -> Result<TxnResponse, CoordError> {
        let mut kv = self.client.kv_client();
        self.call(what, kv.txn(txn)).await
    }

    /// What etcd will grant for `ttl`, in seconds, as far as we know.
    fn grantable_secs(&self, ttl: Duration) -> i64 {
        ceil_secs(ttl).max(self.min_ttl_secs.load(Ordering::Relaxed))
    }

    /// Grants a lease for about `ttl`; the lease (revoked unless kept) and the TTL
    /// granted, in seconds.
    async fn grant_lease(&self, ttl: Duration) -> Result<(PendingLease, i64), CoordError> {
        let asked = self.grantable_secs(ttl);
        let mut leases = self.client.lease_client();
        let resp = self.call("grant lease", leases.grant(asked, None)).await?;
        let pending = PendingLease {
            client: leases,
            id: resp.id(),
            armed: true,
        };
        if resp.ttl() <= 0 || !resp.error().is_empty() {
            return Err(CoordError::Backend {
                backend: BACKEND,
                reason: format!(
                    "grant lease: ttl {} ({:?}) for {asked}s",
                    resp.ttl(),
                    resp.error()
                ),
            });
        }
        if resp.ttl() > asked {
            self.min_ttl_secs.fetch_max(resp.ttl(), Ordering::Relaxed);
        }
        Ok((pending, resp.ttl()))
    }

    /// Revokes a lease that carries no key we still want. Best effort, closed or
    /// not: a lease left behind only runs out.
    async fn revoke_lease(&self, id: i64) {
        let mut leases = self.client.lease_client();
        match tokio::time::timeout(self.request_timeout, leases.revoke(id)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if lease_not_found(&e) => {}
            Ok(Err(e)) => {
                tracing::debug!(lease = id, error = %e, "lease not revoked; it will run out")
            }
            Err(_) => tracing::debug!(lease = id, "lease revoke timed out; it will run out"),
        }
    }

    /// `held` as a [`Lease`], its deadline from the lease's remaining TTL; `None` if
    /// the lease is gone (its key is about to be, too).
    async fn describe(
        &self,
        kind: Kind,
        name: &Name,
        held: Held,
    ) -> Result<Option<Lease>, CoordError> {
        let base = Instant::now();
        let mut leases = self.client.lease_client();
        let resp = self
            .call("lease time to live", leases.time_to_live(held.lease, None))
            .await?;
        // etcd truncates the remaining time to whole seconds: early, as it must be.
        Ok((resp.ttl() >= 0).then(|| Lease {
            kind,
            name: name.clone(),
            owner: held.owner.clone(),
            fencing_token: held.token,
            expires_at: base + secs(resp.ttl()),
            ttl: held.ttl(),
        }))
    }

    /// One attempt to take a free name: `Err(seen)` if someone else was faster.
    async fn try_take(
        &self,
        kind: Kind,
        name: &Name,
        keys: &Keys,
        owner: &str,
        ttl: Duration,
    ) -> Result<Result<Lease, Seen>, CoordError> {
        // NOTE: taken before the grant is sent, so `expires_at` errs early.
        let base = Instant::now();
        let (pending, granted) = self.grant_lease(ttl).await?;
        let txn = Txn::new()
            .when([Compare::create_revision(
                keys.holder.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(
                    keys.holder.as_str(),
                    holder_value(granted, owner),
                    Some(PutOptions::new().with_lease(pending.id)),
                ),
                TxnOp::put(keys.fence.as_str(), owner, None),
            ])
            .or_else([TxnOp::get(keys.holder.as_str(), None)]);
        let resp = self.txn("grant", txn).await?;
        if !resp.succeeded() {
            let seen = Seen::from_failed_txn(&resp)?;
            pending.discard(self).await;
            return Ok(Err(seen));
        }
        pending.keep();
        let token = resp
            .header()
            .and_then(|h| u64::try_from(h.revision()).ok())
            .filter(|t| *t > 0)
            .ok_or_else(|| CoordError::Backend {
                backend: BACKEND,
                reason: "grant: no revision in the answer".to_owned(),
            })?;
        Ok(Ok(lease(kind, name, owner, token, base, granted)))
    }

    /// Extends `held` (the caller's, as just read) to `ttl` from now.
    async fn renew_held(
        &self,
        kind: Kind,
        name: &Name,
        keys: &Keys,
        ttl: Duration,
        held: Held,
    ) -> Result<Lease, CoordError> {
        // NOTE: taken before the keep-alive or grant is sent, so `expires_at` errs early.
        let base = Instant::now();
        if self.grantable_secs(ttl) == held.ttl_secs {
            // A keep-alive renews the lease to the TTL it was granted...
            let mut leases = self.client.lease_client();
            match self
                .call_raw("keep alive", leases.keep_alive(held.lease))
                .await?
            {
                // (Dropping the keeper and its stream ends the keep-alive stream.)
                Ok(_) => {}
                Err(e) if lease_not_found(&e) => {
                    return Err(not_holder(kind, name, &held.owner, held.token, None));
                }
                Err(e) => return Err(error("keep alive", e)),
            }
            // ...but counts only if the key is still on it, unchanged: the holder may
            // have released it meanwhile (deleting the key before revoking).
            let now = self.read(&keys.holder).await?;
            return match now.holder {
                Some(h) if h.mod_revision == held.mod_revision => Ok(lease(
                    kind,
                    name,
                    &held.owner,
                    held.token,
                    base,
                    held.ttl_secs,
                )),
                other => Err(not_holder(kind, name, &held.owner, held.token, other)),
            };
        }
        // Another TTL: a new lease, the key moved onto it if it is still as read.
        let (pending, granted) = self.grant_lease(ttl).await?;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                keys.holder.as_str(),
                CompareOp::Equal,
                held.mod_revision,
            )])
            .and_then([TxnOp::put(
                keys.holder.as_str(),
                holder_value(granted, &held.owner),
                Some(PutOptions::new().with_lease(pending.id)),
            )])
            .or_else([TxnOp::get(keys.holder.as_str(), None)]);
        let resp = self.txn("re-attach", txn).await?;
        if !resp.succeeded() {
            let seen = Seen::from_failed_txn(&resp)?;
            pending.discard(self).await;
            return Err(not_holder(kind, name, &held.owner, held.token, seen.holder));
        }
        pending.keep();
        self.revoke_lease(held.lease).await;
        Ok(lease(kind, name, &held.owner, held.token, base, granted))
    }

    /// Waits until the holder key is deleted after `revision` (released, resigned,
    /// expired), or `deadline` passes.
    async fn wait_for_release(
        &self,
        key: &str,
        revision: i64,
        deadline: Instant,
    ) -> Result<(), CoordError> {
        let mut closed = self.closed.subscribe();
        let deleted = async {
            let mut watches = self.client.watch_client();
            let options = WatchOptions::new()
                .with_start_revision(revision + 1)
                .with_filters([WatchFilterType::NoPut]);
            let mut stream = self
                .call("watch", watches.watch(key, Some(options)))
                .await?;
            loop {
                match stream.message().await {
                    // A deletion, or the watch was cancelled (compaction): look again.
                    Ok(Some(resp)) if resp.canceled() || !resp.events().is_empty() => {
                        return Ok(());
                    }
                    // Created, or progress.
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(error("watch", e)),
                }
            }
        };
        tokio::select! {
            outcome = deleted => outcome,
            () = sleep_until(deadline) => Ok(()),
            _ = closed.wait_for(|c| *c) => Err(CoordError::Closed),
        }
    }
}

/// A lease granted for a grant or a re-attach whose transaction has not succeeded
/// yet. Revoked if it is not kept — also when the call is cancelled, or failed
/// with an unknown outcome — so a name can't stay held by a call that gave up.
struct PendingLease {
    client: LeaseClient,
    id: i64,
    armed: bool,
}

impl PendingLease {
    /// The holder key is on it now.
    fn keep(mut self) {
        self.armed = false;
    }

    /// Not needed: revoke it now.
    async fn discard(mut self, inner: &Inner) {
        self.armed = false;
        inner.revoke_lease(self.id).await;
    }
}

impl Drop for PendingLease {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (mut client, id) = (self.client.clone(), self.id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = client.revoke(id).await
                    && !lease_not_found(&e)
                {
                    tracing::debug!(lease = id, error = %e, "abandoned lease not revoked; it will run out");
                }
            });
        }
    }
}

#[async_trait]
impl ByKind for EtcdCoordinator {
    fn backend_name(&self) -> &'static str {
        BACKEND
    }

    async fn take_lease(
        &self,
        kind: Kind,
        name: &Name,
        owner: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, CoordError> {
        let inner = &*self.inner;
        inner.check_open()?;
        let started = Instant::now();
        let deadline = started + wait;
        let keys = inner.keys(kind, name);
        let mut seen = inner.read(&keys.holder).await?;
        // A holder taking its name again whose lease just ran out sees its key a
        // moment longer; bounded so a confused server can't spin us.
        let mut retakes = 0;
        loop {
            match seen.holder.take() {
                None => match inner.try_take(kind, name, &keys, owner, ttl).await? {
                    Ok(lease) => {
                        let waited = started.elapsed();
                        metrics::counter!("trellis_coord_granted_total", "backend" => BACKEND, "kind" => kind.as_str())
                            .increment(1);
                        metrics::histogram!("trellis_coord_wait_seconds", "backend" => BACKEND, "kind" => kind.as_str())
                            .record(waited.as_secs_f64());
                        tracing::debug!(%kind, %name, %owner, token = lease.fencing_token, ttl = ?lease.ttl, ?waited, "lease granted");
                        return Ok(lease);
                    }
                    Err(now) => seen = now,
                },
                // The holder again (a retried request): its lease, extended.
                Some(held) if held.owner == owner && retakes < 3 => {
                    retakes += 1;
                    match inner.renew_held(kind, name, &keys, ttl, held).await {
                        Err(CoordError::NotHolder { .. }) => {
                            seen = inner.read(&keys.holder).await?
                        }
                        renewed => return renewed,
                    }
                }
                Some(held) => {
                    let now = Instant::now();
                    if now >= deadline {
                        metrics::counter!("trellis_coord_timeouts_total", "backend" => BACKEND, "kind" => kind.as_str())
                            .increment(1);
                        return Err(CoordError::Timeout {
                            kind,
                            name: name.clone(),
                            waited: now - started,
                            holder: Some(held.owner),
                        });
                    }
                    inner
                        .wait_for_release(&keys.holder, seen.revision, deadline)
                        .await?;
                    seen = inner.read(&keys.holder).await?;
                }
            }
        }
    }

    async fn renew_lease(
        &self,
        kind: Kind,
        name: &Name,
        owner: &str,
        fencing_token: u64,
        ttl: Duration,
    ) -> Result<Lease, CoordError> {
        let inner = &*self.inner;
        inner.check_open()?;
        let keys = inner.keys(kind, name);
        match inner.read(&keys.holder).await?.holder {
            Some(held) if held.owner == owner && held.token == fencing_token => {
                inner.renew_held(kind, name, &keys, ttl, held).await
            }
            other => Err(not_holder(kind, name, owner, fencing_token, other)),
        }
    }

    async fn end_lease(
        &self,
        kind: Kind,
        name: &Name,
        owner: &str,
        fencing_token: u64,
    ) -> Result<(), CoordError> {
        let inner = &*self.inner;
        inner.check_open()?;
        let keys = inner.keys(kind, name);
        let mut seen = inner.read(&keys.holder).await?;
        loop {
            let held = match seen.holder {
                Some(held) if held.owner == owner && held.token == fencing_token => held,
                other => return Err(not_holder(kind, name, owner, fencing_token, other)),
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    keys.holder.as_str(),
                    CompareOp::Equal,
                    held.mod_revision,
                )])
                .and_then([TxnOp::delete(keys.holder.as_str(), None)])
                .or_else([TxnOp::get(keys.holder.as_str(), None)]);
            let resp = inner.txn("release", txn).await?;
            if resp.succeeded() {
                inner.revoke_lease(held.lease).await;
                metrics::counter!("trellis_coord_released_total", "backend" => BACKEND, "kind" => kind.as_str())
                    .increment(1);
                tracing::debug!(%kind, %name, %owner, token = fencing_token, "lease released");
                return Ok(());
            }
            // Changed since read: gone, someone else's — or re-attached by the holder
            // itself, and then it is still ours to release.
            seen = Seen::from_failed_txn(&resp)?;
        }
    }

    async fn current_lease(&self, kind: Kind, name: &Name) -> Result<Option<Lease>, CoordError> {
        let inner = &*self.inner;
        inner.check_open()?;
        match inner.read(&inner.keys(kind, name).holder).await?.holder {
            Some(held) => inner.describe(kind, name, held).await,
            None => Ok(None),
        }
    }

    async fn follow_leader(
        &self,
        name: &Name,
    ) -> Result<watch::Receiver<Option<LeaderInfo>>, CoordError> {
        follow::start(Arc::clone(&self.inner), name).await
    }

    async fn newest_token(&self, kind: Kind, name: &Name) -> Result<u64, CoordError> {
        let inner = &*self.inner;
        inner.check_open()?;
        let mut kv = inner.client.kv_client();
        let resp = inner
            .call("get", kv.get(inner.keys(kind, name).fence, None))
            .await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| u64::try_from(kv.mod_revision()).ok())
            .unwrap_or(0))
    }

    async fn check_health(&self) -> Result<(), CoordError> {
        self.inner.ping().await
    }

    async fn shut_down(&self) -> Result<(), CoordError> {
        self.inner.closed.send_replace(true);
        tracing::debug!(prefix = %self.inner.prefix, "etcd coordinator closed");
        Ok(())
    }
}
