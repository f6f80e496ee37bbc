//! Shard maps at runtime (`[shards.<name>]`): the current members, which member owns
//! each shard, the last rebalance plan and a version counter, per map.
//!
//! A key's shard is `trellis_shard::shard_for(key, shards)`; the shards are placed on
//! the members by the configured `trellis-shard` strategy (all together, so bounded
//! loads hold across them), and the owner table is kept, so a lookup is a hash and an
//! index. Every sidecar with the same members computes the same table.
//!
//! # Membership changes
//! [`ShardMap::set_members`] is the one way members change: from
//! `PUT /v1/shards/{name}/members` for static maps, and from the service registry for
//! `members = { registry = "<service>" }` ([`ShardMaps::set_registry_members`]). It
//! computes the rebalance plan (which shards move from whom to whom) against the
//! current table, swaps the new table in, bumps the version, logs a summary, records
//! metrics and publishes a `trellis.shards.rebalanced` CloudEvent to the map's
//! `publish` topic. Changes to one map are serialized, so events go out in version
//! order; lookups never wait for them.
//!
//! The pure part — new table, plan and optimum from the old table and new members —
//! is [`Placement::rebalance`]; the runtime around it does the I/O.
//!
//! # Metrics
//! `trellis_shard_rebalances_total{map}`, `trellis_shard_moves_total{map}` (shards
//! moved), `trellis_shard_map_version{map}`, `trellis_shard_members{map}` and
//! `trellis_shard_publish_failures_total{map}`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;
use serde_json::json;
use trellis_core::Clock;
use trellis_core::config::{ShardMapConfig, ShardMember, ShardMembers, ShardStrategy};
use trellis_pubsub::PubSub;
use trellis_pubsub::event::{CloudEvent, Data};
use trellis_shard::{Member, Move, ShardError, StrategyConfig, StrategyKind};

/// The CloudEvent `type` of rebalance events.
pub(crate) const REBALANCED: &str = "trellis.shards.rebalanced";
/// How long a rebalance event may take to publish before it is given up (logged and
/// counted as a failure).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a shard map could not be built, or a member list not applied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ShardsError {
    /// No map by that name.
    #[error("no shard map {0:?} in [shards]")]
    UnknownMap(String),
    /// The member list breaks a rule (`(field, message)` pairs).
    #[error("{}", .0.iter().map(|(f, m)| format!("{f}: {m}")).collect::<Vec<_>>().join("; "))]
    InvalidMembers(Vec<(String, String)>),
    /// The strategy refused the members (a validated list never is).
    #[error(transparent)]
    Strategy(#[from] ShardError),
    /// The `publish` component is not open.
    #[error("publish.pubsub: no pub/sub component {0:?} is open")]
    NoPubSub(String),
}

// === ShardMaps ===

/// Every configured shard map, by name, and which app each routes.
#[derive(Debug, Default)]
pub(crate) struct ShardMaps {
    maps: BTreeMap<String, Arc<ShardMap>>,
    /// App id → the map bound to it.
    by_app: HashMap<String, Arc<ShardMap>>,
    /// Maps over an app follow its instance list; stopped on drop.
    followers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ShardMaps {
    fn drop(&mut self) {
        for task in &self.followers {
            task.abort();
        }
    }
}

impl ShardMaps {
    /// Builds every `[shards.<name>]` with its initial members: the static list, the
    /// app's instances (followed as they change, e.g. with `discovery = "registry"`),
    /// or none yet for the registry.
    ///
    /// # Errors
    /// `(map name, error)` for the first map that can't be built (a validated config
    /// always can, given its pub/sub components are open).
    pub(crate) fn build(
        config: &trellis_core::Config,
        pubsubs: &BTreeMap<String, Arc<dyn PubSub>>,
        invoker: &trellis_proxy::Invoker,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, (String, ShardsError)> {
        let mut shards = Self::default();
        for (name, map_config) in &config.shards {
            let mut instances = None;
            let members = match &map_config.members {
                ShardMembers::Static(members) => members.clone(),
                ShardMembers::App(app) => match invoker.target(app) {
                    Some(target) => {
                        let mut rx = target.instances();
                        let members = app_members(&rx.borrow_and_update());
                        instances = Some(rx);
                        members
                    }
                    None => app_members(
                        config
                            .apps
                            .get(app)
                            .map(|a| a.instances.as_slice())
                            .unwrap_or_default(),
                    ),
                },
                ShardMembers::Registry(_) => Vec::new(),
            };
            let publisher = match &map_config.publish {
                None => None,
                Some(publish) => Some(Publisher {
                    pubsub: pubsubs.get(&publish.pubsub).cloned().ok_or_else(|| {
                        (name.clone(), ShardsError::NoPubSub(publish.pubsub.clone()))
                    })?,
                    component: publish.pubsub.clone(),
                    topic: publish.topic.clone(),
                }),
            };
            let map = ShardMap::new(
                name,
                map_config.clone(),
                members,
                publisher,
                Arc::clone(&clock),
            )
            .map_err(|e| (name.clone(), e))?;
            let map = Arc::new(map);
            if let Some(rx) = instances {
                shards
                    .followers
                    .push(tokio::spawn(follow(Arc::downgrade(&map), rx)));
            }
            if let Some(app) = map_config.bound_app() {
                shards.by_app.insert(app.to_owned(), Arc::clone(&map));
            }
            shards.maps.insert(name.clone(), map);
        }
        Ok(shards)
    }

    /// The map named `name`.
    pub(crate) fn get(&self, name: &str) -> Result<&Arc<ShardMap>, ShardsError> {
        self.maps
            .get(name)
            .ok_or_else(|| ShardsError::UnknownMap(name.to_owned()))
    }

    /// The map bound to `app`, if any.
    pub(crate) fn for_app(&self, app: &str) -> Option<&Arc<ShardMap>> {
        self.by_app.get(app)
    }

    /// Every map, by name.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<ShardMap>> {
        self.maps.values()
    }

    /// The hook of the service registry: `service`'s live instances changed to
    /// `members`. Rebalances every map with `members = { registry = "<service>" }`;
    /// returns each one's outcome, by map name.
    pub(crate) async fn set_registry_members(
        &self,
        service: &str,
        members: Vec<ShardMember>,
    ) -> Vec<(String, Result<Option<Arc<Rebalance>>, ShardsError>)> {
        let mut outcomes = Vec::new();
        for map in self.maps.values() {
            if matches!(&map.config.members, ShardMembers::Registry(s) if s == service) {
                let outcome = map.set_members(members.clone()).await;
                if let Err(e) = &outcome {
                    tracing::warn!(map = %map.name, service, error = %e, "registry members refused");
                }
                outcomes.push((map.name.clone(), outcome));
            }
        }
        outcomes
    }
}

/// Rebalances `map` on every change of its app's instance list, until either is gone.
async fn follow(
    map: std::sync::Weak<ShardMap>,
    mut instances: tokio::sync::watch::Receiver<Vec<String>>,
) {
    while instances.changed().await.is_ok() {
        let Some(map) = map.upgrade() else { return };
        let members = app_members(&instances.borrow_and_update());
        if let Err(e) = map.set_members(members).await {
            tracing::warn!(map = %map.name, error = %e, "the app's instances were refused as members");
        }
    }
}

/// One member per instance URL of an app (id = address = the URL without a trailing
/// `/`, weight 1), repeated URLs once.
pub(crate) fn app_members(instances: &[String]) -> Vec<ShardMember> {
    let mut members: Vec<ShardMember> = Vec::with_capacity(instances.len());
    for url in instances {
        let url = url.trim_end_matches('/');
        if !members.iter().any(|m| m.id == url) {
            members.push(ShardMember::new(url, url));
        }
    }
    members
}

// === ShardMap ===

/// Where a map's rebalance events go.
#[derive(Debug)]
struct Publisher {
    pubsub: Arc<dyn PubSub>,
    component: String,
    topic: String,
}

/// One shard map: its settings, and the current placement, swapped whole on change.
#[derive(Debug)]
pub(crate) struct ShardMap {
    name: String,
    config: ShardMapConfig,
    strategy: StrategyConfig,
    publisher: Option<Publisher>,
    /// Stamps `last_rebalance.at`.
    clock: Arc<dyn Clock>,
    /// The current placement. A std lock, held only to clone or swap the `Arc`:
    /// lookups never wait on a rebalance's computation or its publishing.
    current: RwLock<Arc<Placement>>,
    /// Serializes membership changes, publishing included, so versions and events
    /// stay in order.
    updates: tokio::sync::Mutex<()>,
}

/// Who owns a key.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Owner {
    /// The key's shard.
    pub(crate) shard: u32,
    /// The shard's owner; `None` when the map has no members.
    pub(crate) owner: Option<MemberRef>,
    /// The version of the placement that answered.
    pub(crate) version: u64,
}

/// A member as lookups show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct MemberRef {
    pub(crate) id: String,
    pub(crate) address: String,
}

impl ShardMap {
    fn new(
        name: &str,
        config: ShardMapConfig,
        members: Vec<ShardMember>,
        publisher: Option<Publisher>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ShardsError> {
        let problems = config.check_members(&members);
        if !problems.is_empty() {
            return Err(ShardsError::InvalidMembers(problems));
        }
        let strategy = strategy_config(&config).validate()?;
        let placement = Placement::initial(&strategy, config.shards, members)?;
        let map = Self {
            name: name.to_owned(),
            config,
            strategy,
            publisher,
            clock,
            current: RwLock::new(Arc::new(placement)),
            updates: tokio::sync::Mutex::new(()),
        };
        map.record_gauges(&map.placement());
        Ok(map)
    }

    /// The map's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Its settings.
    pub(crate) fn config(&self) -> &ShardMapConfig {
        &self.config
    }

    /// The current placement.
    pub(crate) fn placement(&self) -> Arc<Placement> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Who owns `key` now.
    pub(crate) fn owner(&self, key: &[u8]) -> Owner {
        let placement = self.placement();
        let shard = trellis_shard::shard_for(key, self.config.shards);
        Owner {
            shard,
            owner: placement.owner_of(shard).map(|m| MemberRef {
                id: m.id.clone(),
                address: m.address.clone(),
            }),
            version: placement.version,
        }
    }

    /// Where the members come from: `static`, `app:<id>` or `registry:<service>`.
    pub(crate) fn source(&self) -> String {
        match &self.config.members {
            ShardMembers::Static(_) => "static".to_owned(),
            ShardMembers::App(app) => format!("app:{app}"),
            ShardMembers::Registry(service) => format!("registry:{service}"),
        }
    }

    /// Replaces the members: computes the rebalance plan against the current
    /// placement, swaps the new placement in with the next version, logs and records
    /// it, and publishes a `trellis.shards.rebalanced` event if the map has a
    /// `publish` topic (a failed publish is logged and counted; the change stands).
    ///
    /// `Ok(None)` when `members` equals the current list: nothing changes.
    ///
    /// # Errors
    /// [`ShardsError::InvalidMembers`] for a list breaking the map's rules (ids
    /// unique, weights > 0, …); nothing changes then.
    pub(crate) async fn set_members(
        &self,
        members: Vec<ShardMember>,
    ) -> Result<Option<Arc<Rebalance>>, ShardsError> {
        let problems = self.config.check_members(&members);
        if !problems.is_empty() {
            return Err(ShardsError::InvalidMembers(problems));
        }
        let _serialized = self.updates.lock().await;
        let old = self.placement();
        if old.members == members {
            return Ok(None);
        }
        let at = self.clock.now_millis();
        let (next, rebalance) = old.rebalance(&self.strategy, self.config.shards, members, at)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
        let placement = self.placement();
        self.record(&placement, &rebalance);
        self.publish(&placement, &rebalance).await;
        Ok(Some(rebalance))
    }

    fn record_gauges(&self, placement: &Placement) {
        let map = self.name.clone();
        metrics::gauge!("trellis_shard_map_version", "map" => map.clone())
            .set(placement.version as f64);
        metrics::gauge!("trellis_shard_members", "map" => map).set(placement.members.len() as f64);
    }

    fn record(&self, placement: &Placement, rebalance: &Rebalance) {
        let flows = rebalance
            .flows()
            .into_iter()
            .map(|((from, to), n)| format!("{}→{}: {n}", from.unwrap_or("-"), to.unwrap_or("-")))
            .collect::<Vec<_>>()
            .join(", ");
        tracing::info!(
            map = %self.name,
            version = rebalance.version,
            members = placement.members.len(),
            shards = self.config.shards,
            moved = rebalance.moved,
            optimum = rebalance.optimum,
            flows = %flows,
            "shard map rebalanced"
        );
        let map = self.name.clone();
        metrics::counter!("trellis_shard_rebalances_total", "map" => map.clone()).increment(1);
        metrics::counter!("trellis_shard_moves_total", "map" => map)
            .increment(rebalance.moved as u64);
        self.record_gauges(placement);
    }

    async fn publish(&self, placement: &Placement, rebalance: &Rebalance) {
        let Some(publisher) = &self.publisher else {
            return;
        };
        let event = match self.event(placement, rebalance) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(map = %self.name, error = %e, "cannot encode the rebalance event");
                return;
            }
        };
        let publishing = publisher.pubsub.publish(&publisher.topic, vec![event]);
        // Bounded: membership changes wait for it, and must not wait on a dead broker.
        let outcome = match tokio::time::timeout(PUBLISH_TIMEOUT, publishing).await {
            Ok(outcome) => outcome.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {PUBLISH_TIMEOUT:?}")),
        };
        match outcome {
            Ok(_) => tracing::debug!(
                map = %self.name,
                version = rebalance.version,
                pubsub = %publisher.component,
                topic = %publisher.topic,
                "rebalance event published"
            ),
            Err(e) => {
                tracing::warn!(
                    map = %self.name,
                    version = rebalance.version,
                    pubsub = %publisher.component,
                    topic = %publisher.topic,
                    error = %e,
                    "publishing the rebalance event failed; the new placement stands"
                );
                metrics::counter!("trellis_shard_publish_failures_total", "map" => self.name.clone())
                    .increment(1);
            }
        }
    }

    /// `{type: "trellis.shards.rebalanced", subject: <map>, data: {map, version,
    /// strategy, shards, members, moves, moved, optimum, at}}`, ordered per map
    /// (`partitionkey` = the map's name).
    fn event(
        &self,
        placement: &Placement,
        rebalance: &Rebalance,
    ) -> Result<CloudEvent, serde_json::Error> {
        let data = json!({
            "map": self.name,
            "version": rebalance.version,
            "strategy": self.config.strategy.as_str(),
            "shards": self.config.shards,
            "members": placement.members.iter().map(|m| &m.id).collect::<Vec<_>>(),
            "moves": rebalance.moves,
            "moved": rebalance.moved,
            "optimum": rebalance.optimum,
            "at": rebalance.at,
        });
        let raw = serde_json::value::to_raw_value(&data)?;
        let mut event = CloudEvent::new(
            format!("/trellis/shards/{}", self.name),
            REBALANCED,
            Some(Data::Json(raw)),
        );
        event.datacontenttype = Some("application/json".to_owned());
        event.subject = Some(self.name.clone());
        event.time = Some(rebalance.at.clone());
        event
            .extensions
            .insert("partitionkey".to_owned(), self.name.clone().into());
        Ok(event)
    }
}

fn strategy_config(config: &ShardMapConfig) -> StrategyConfig {
    let kind = match config.strategy {
        ShardStrategy::Ring => StrategyKind::Ring,
        ShardStrategy::Jump => StrategyKind::Jump,
        ShardStrategy::Rendezvous => StrategyKind::Rendezvous,
        ShardStrategy::Maglev => StrategyKind::Maglev,
        ShardStrategy::Bounded => StrategyKind::Bounded,
    };
    StrategyConfig {
        strategy: kind,
        vnodes: config.vnodes,
        table_size: config.table_size,
        epsilon: config.epsilon,
    }
}

// === Placement ===

/// The members and who owns each shard, at one version. Immutable: a change builds
/// the next one.
#[derive(Debug)]
pub(crate) struct Placement {
    /// 1 for the members at start, then one more per membership change.
    pub(crate) version: u64,
    /// The members, in the order given (jump hash places by position).
    pub(crate) members: Vec<ShardMember>,
    /// Per shard, the index of its owner in `members`; `None` without members.
    owners: Vec<Option<usize>>,
    /// The change that led here; `None` at start.
    pub(crate) last_rebalance: Option<Arc<Rebalance>>,
}

/// A membership change: the shards that moved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Rebalance {
    /// When, RFC 3339.
    pub(crate) at: String,
    /// The version it led to.
    pub(crate) version: u64,
    /// The shards whose owner changed, in shard order; owners by member id (`null`
    /// for none).
    pub(crate) moves: Vec<Move>,
    /// How many shards moved.
    pub(crate) moved: usize,
    /// The fewest moves any placement needs for this change: shards ×
    /// ½ Σ |new share − old share| over the members (all shards when the map gains
    /// its first members or loses its last). `moved / optimum` is the strategy's
    /// overhead.
    pub(crate) optimum: usize,
}

impl Rebalance {
    /// How many shards move along each `(from, to)` pair.
    fn flows(&self) -> BTreeMap<(Option<&str>, Option<&str>), usize> {
        let mut flows = BTreeMap::new();
        for m in &self.moves {
            *flows
                .entry((m.from.as_deref(), m.to.as_deref()))
                .or_default() += 1;
        }
        flows
    }
}

impl Placement {
    /// Version 1: `members` as configured.
    fn initial(
        strategy: &StrategyConfig,
        shards: u32,
        members: Vec<ShardMember>,
    ) -> Result<Self, ShardError> {
        let placed = strategy.build(to_shard_members(&members))?;
        Ok(Self {
            version: 1,
            owners: trellis_shard::assign_shards(placed.as_ref(), shards),
            members,
            last_rebalance: None,
        })
    }

    /// The next placement, for `members`, and the plan from this one to it, stamped
    /// `at` (ms since the epoch). Pure: no I/O, no clock.
    pub(crate) fn rebalance(
        &self,
        strategy: &StrategyConfig,
        shards: u32,
        members: Vec<ShardMember>,
        at: u64,
    ) -> Result<(Self, Arc<Rebalance>), ShardError> {
        let placed = strategy.build(to_shard_members(&members))?;
        let owners = trellis_shard::assign_shards(placed.as_ref(), shards);
        let id = |list: &[ShardMember], owner: Option<usize>| owner.map(|i| list[i].id.clone());
        let moves: Vec<Move> = (0..shards)
            .zip(self.owners.iter().zip(&owners))
            .filter_map(|(shard, (before, after))| {
                let from = id(&self.members, *before);
                let to = id(&members, *after);
                (from != to).then_some(Move { shard, from, to })
            })
            .collect();
        let version = self.version + 1;
        let rebalance = Arc::new(Rebalance {
            at: humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(at))
                .to_string(),
            version,
            moved: moves.len(),
            optimum: optimum_moves(&self.members, &members, shards),
            moves,
        });
        let next = Self {
            version,
            members,
            owners,
            last_rebalance: Some(Arc::clone(&rebalance)),
        };
        Ok((next, rebalance))
    }

    /// The owner of `shard`.
    pub(crate) fn owner_of(&self, shard: u32) -> Option<&ShardMember> {
        let index = (*self.owners.get(usize::try_from(shard).ok()?)?)?;
        self.members.get(index)
    }

    /// `(shard, owner)` for every shard.
    pub(crate) fn shards(&self) -> impl Iterator<Item = (u32, Option<&ShardMember>)> {
        (0..).zip(
            self.owners
                .iter()
                .map(|owner| owner.and_then(|i| self.members.get(i))),
        )
    }

    /// How many shards each member owns, by member index.
    pub(crate) fn counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.members.len()];
        for index in self.owners.iter().flatten() {
            counts[*index] += 1;
        }
        counts
    }
}

fn to_shard_members(members: &[ShardMember]) -> Vec<Member> {
    members
        .iter()
        .map(|m| Member::weighted(m.id.clone(), m.weight))
        .collect()
}

/// The fewest shards any placement must move from `old` to `new` members: each
/// member's share of the shards is its weight over the total, and at least the
/// total variation between the two share vectors must change hands.
pub(crate) fn optimum_moves(old: &[ShardMember], new: &[ShardMember], shards: u32) -> usize {
    let total = |list: &[ShardMember]| list.iter().map(|m| f64::from(m.weight)).sum::<f64>();
    let (old_total, new_total) = (total(old), total(new));
    if old_total == 0.0 || new_total == 0.0 {
        // Every shard gains its first owner, or loses its last; or nothing at all.
        return if old_total == new_total {
            0
        } else {
            shards as usize
        };
    }
    let share = |list: &[ShardMember], sum: f64, id: &str| {
        list.iter()
            .find(|m| m.id == id)
            .map_or(0.0, |m| f64::from(m.weight) / sum)
    };
    let mut ids: Vec<&str> = old.iter().chain(new).map(|m| m.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let variation: f64 = ids
        .iter()
        .map(|id| (share(new, new_total, id) - share(old, old_total, id)).abs())
        .sum::<f64>()
        / 2.0;
    (variation * f64::from(shards)).round() as usize
}

#[cfg(test)]
mod test {
    use trellis_core::ManualClock;

    use super::*;

    fn members(ids: &[&str]) -> Vec<ShardMember> {
        ids.iter()
            .map(|id| ShardMember::new(*id, format!("http://{id}:80")))
            .collect()
    }

    fn config(strategy: ShardStrategy, shards: u32, list: Vec<ShardMember>) -> ShardMapConfig {
        let toml = format!(
            "[shards.m]\nshards = {shards}\nmembers = [{{ id = \"x\", address = \"x\" }}]\n"
        );
        let mut config = trellis_core::Config::from_sources(Some(&toml), [])
            .expect("valid")
            .shards
            .remove("m")
            .expect("map");
        config.strategy = strategy;
        config.members = ShardMembers::Static(list);
        config
    }

    fn map(strategy: ShardStrategy, shards: u32, list: Vec<ShardMember>) -> ShardMap {
        let config = config(strategy, shards, list.clone());
        ShardMap::new(
            "m",
            config,
            list,
            None,
            Arc::new(ManualClock::new(1_700_000_000_000)),
        )
        .expect("valid")
    }

    #[test]
    fn lookups_match_the_strategy() {
        for kind in [
            ShardStrategy::Ring,
            ShardStrategy::Jump,
            ShardStrategy::Rendezvous,
            ShardStrategy::Maglev,
            ShardStrategy::Bounded,
        ] {
            let list = members(&["a", "b", "c"]);
            let m = map(kind, 64, list.clone());
            let placed = strategy_config(m.config())
                .build(to_shard_members(&list))
                .expect("valid");
            let owners = trellis_shard::assign_shards(placed.as_ref(), 64);
            for key in ["customer-1", "customer-2", "order-99", ""] {
                let found = m.owner(key.as_bytes());
                let shard = trellis_shard::shard_for(key.as_bytes(), 64);
                assert_eq!(found.shard, shard);
                let expected = owners[shard as usize].map(|i| list[i].id.clone());
                assert_eq!(found.owner.map(|o| o.id), expected, "{kind:?} {key}");
                assert_eq!(found.version, 1);
            }
        }
    }

    #[tokio::test]
    async fn set_members_plans_versions_and_keeps_the_plan() {
        let m = map(ShardStrategy::Rendezvous, 128, members(&["a", "b", "c"]));
        assert!(m.placement().last_rebalance.is_none());
        assert!(
            m.set_members(members(&["a", "b", "c"]))
                .await
                .expect("valid")
                .is_none(),
            "same members: nothing to do"
        );
        assert_eq!(m.placement().version, 1);

        let before: Vec<Option<String>> = m
            .placement()
            .shards()
            .map(|(_, o)| o.map(|o| o.id.clone()))
            .collect();
        let plan = m
            .set_members(members(&["a", "b", "c", "d"]))
            .await
            .expect("valid")
            .expect("changed");
        assert_eq!(plan.version, 2);
        assert_eq!(plan.at, "2023-11-14T22:13:20.000Z");
        assert!(plan.moved > 0 && plan.moved == plan.moves.len());
        // Rendezvous moves only what `d` takes, and about the optimum (32).
        assert!(plan.moves.iter().all(|mv| mv.to.as_deref() == Some("d")));
        assert_eq!(plan.optimum, 32);
        let after = m.placement();
        assert_eq!(after.version, 2);
        assert_eq!(after.last_rebalance.as_deref(), Some(&*plan));
        for mv in &plan.moves {
            assert_eq!(before[mv.shard as usize], mv.from);
            assert_eq!(after.owner_of(mv.shard).map(|o| o.id.clone()), mv.to);
        }
        assert_eq!(after.counts().iter().sum::<usize>(), 128);

        let err = m
            .set_members(vec![ShardMember {
                weight: 0,
                ..ShardMember::new("a", "x")
            }])
            .await
            .expect_err("weight 0");
        assert_eq!(err.to_string(), "members[0].weight: must be > 0");
        assert_eq!(m.placement().version, 2, "a refused list changes nothing");

        let emptied = m
            .set_members(Vec::new())
            .await
            .expect("valid")
            .expect("changed");
        assert_eq!((emptied.moved, emptied.optimum), (128, 128));
        assert!(emptied.moves.iter().all(|mv| mv.to.is_none()));
        assert_eq!(m.owner(b"k").owner, None);
    }

    #[tokio::test]
    async fn maps_over_an_app_follow_its_instances() {
        let config = trellis_core::Config::from_sources(
            Some(
                "[apps.orders]\ninstances = [\"http://10.0.0.1:80\", \"http://10.0.0.2:80\"]\n\
                 [shards.orders]\nshards = 16\nmembers = { app = \"orders\" }\n",
            ),
            [],
        )
        .expect("valid");
        let discovery = Arc::new(trellis_proxy::StaticDiscovery::default());
        discovery.set(
            "orders",
            vec!["http://10.0.0.1:80".into(), "http://10.0.0.2:80/".into()],
        );
        let invoker =
            trellis_proxy::Invoker::new(&config, Some(discovery.clone()), 1024).expect("invoker");
        let maps = ShardMaps::build(
            &config,
            &BTreeMap::new(),
            &invoker,
            Arc::new(ManualClock::new(0)),
        )
        .expect("maps");
        let map = Arc::clone(maps.for_app("orders").expect("bound to the app"));
        let ids = |map: &ShardMap| -> Vec<String> {
            map.placement()
                .members
                .iter()
                .map(|m| m.id.clone())
                .collect()
        };
        assert_eq!(ids(&map), ["http://10.0.0.1:80", "http://10.0.0.2:80"]);

        discovery.set(
            "orders",
            vec!["http://10.0.0.2:80".into(), "http://10.0.0.3:80".into()],
        );
        for _ in 0..100 {
            if map.placement().version == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let placement = map.placement();
        assert_eq!(placement.version, 2);
        assert_eq!(ids(&map), ["http://10.0.0.2:80", "http://10.0.0.3:80"]);
        let rebalance = placement.last_rebalance.as_deref().expect("a plan");
        assert!(
            rebalance
                .moves
                .iter()
                .all(|m| m.from.as_deref() == Some("http://10.0.0.1:80")
                    || m.to.as_deref() == Some("http://10.0.0.3:80"))
        );
        drop(maps);
    }

    #[test]
    fn optimum_is_the_share_that_must_change_hands() {
        let abc = members(&["a", "b", "c"]);
        let abcd = members(&["a", "b", "c", "d"]);
        assert_eq!(optimum_moves(&abc, &abcd, 120), 30);
        assert_eq!(optimum_moves(&abcd, &abc, 120), 30);
        assert_eq!(optimum_moves(&abc, &abc, 120), 0);
        assert_eq!(optimum_moves(&[], &abc, 120), 120);
        assert_eq!(optimum_moves(&abc, &[], 120), 120);
        assert_eq!(optimum_moves(&[], &[], 120), 0);
        let mut heavier = abc.clone();
        heavier[0].weight = 2;
        // a: 1/3 → 1/2, b and c: 1/3 → 1/4 each.
        assert_eq!(optimum_moves(&abc, &heavier, 120), 20);
    }

    #[test]
    fn app_members_are_its_instance_urls() {
        let list = app_members(&[
            "http://10.0.0.1:80/".to_owned(),
            "http://10.0.0.2:80".to_owned(),
            "http://10.0.0.1:80".to_owned(),
        ]);
        assert_eq!(
            list,
            [
                ShardMember::new("http://10.0.0.1:80", "http://10.0.0.1:80"),
                ShardMember::new("http://10.0.0.2:80", "http://10.0.0.2:80"),
            ]
        );
    }
}
