//! `[shards.<name>]`: shard maps — which member owns which key.
//!
//! The shape, and why shards rather than keys straight to members, are documented
//! on [`ShardMapConfig`].

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, units};

/// `[shards.<name>]`: a shard map.
///
/// # Why a fixed number of shards, and not keys straight to members?
///
/// A key belongs to one of `shards` shards (`jump_hash(xxh3(key), shards)`), and the
/// strategy places the *shards* on members. Only the second step depends on
/// membership, so a membership change is a finite, listable plan — "shard 17 moves
/// from `a` to `d`" — that can be logged, shown, published and acted upon (an owner
/// hands over the state of the shards it loses). With keys placed straight on
/// members, nobody could say which keys moved. Apps that only want key affinity
/// without plans already have `lb = "hash:header:<name>"` in `[apps.<id>]`.
///
/// ```toml
/// [shards.orders]
/// strategy = "rendezvous"   # ring | jump | rendezvous | maglev | bounded
/// shards = 256              # keys hash to 256 shards; shards are placed on members
/// # vnodes = 160            # ring, bounded: points per unit of weight
/// # epsilon = 0.25          # bounded: no member above ⌈(1 + ε) × mean⌉ shards
/// # table_size = 65537      # maglev: a prime; chosen from the member count if unset
/// app = "orders"            # optional: route /v1/invoke/orders by Trellis-Shard-Key
/// members = [
///   { id = "orders-1", address = "http://10.0.0.1:8080" },
///   { id = "orders-2", address = "http://10.0.0.2:8080", weight = 2 },
/// ]
/// # or: members = { app = "orders" }        the app's instances (id = address = URL), followed
/// # or: members = { registry = "orders" }   the service registry's live instances
/// publish = { pubsub = "default", topic = "shard-events" }   # optional
/// ```
///
/// # Binding to an app
///
/// A map is bound to an app — calls to `/v1/invoke/<app>/...` with a
/// `Trellis-Shard-Key` header go to the key's owner — when it says `app = "<id>"`, or
/// when its members are `{ app = "<id>" }` (then `app` may be left out). An app has
/// at most one map. The owner's `address` must be one of the app's instance URLs.
///
/// # Membership changes
///
/// Each change of members (`PUT /v1/shards/<name>/members` for a static list, the
/// app's instance list, the registry) computes a rebalance plan — the shards that
/// move, from whom to whom — bumps the map's version, and publishes a
/// `trellis.shards.rebalanced` CloudEvent to `publish` if set. Members set through
/// the API last until restart; the file wins then.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardMapConfig {
    /// The hashing strategy placing shards on members.
    #[serde(default)]
    pub strategy: ShardStrategy,
    /// Ring points per unit of weight (`ring`, `bounded`): more points, better
    /// balance, more memory.
    #[serde(default = "default_vnodes", deserialize_with = "units::lenient_u32")]
    pub vnodes: u32,
    /// Maglev's table size, a prime (`maglev`); `None` picks one from the member
    /// count. Pin it so the table never resizes as members come and go.
    #[serde(default, deserialize_with = "option_lenient_u64")]
    pub table_size: Option<u64>,
    /// Bounded loads' slack ε (`bounded`): no member owns more than
    /// `⌈(1 + ε) × mean⌉` shards (the load factor is `1 + ε`).
    #[serde(default = "default_epsilon", deserialize_with = "lenient_f64")]
    pub epsilon: f64,
    /// How many shards keys hash to; the unit of placement and of moves.
    #[serde(default = "default_shards", deserialize_with = "units::lenient_u32")]
    pub shards: u32,
    /// The `[apps.<id>]` whose invocations are routed by `Trellis-Shard-Key`; implied
    /// by `members = { app = "<id>" }`.
    #[serde(default)]
    pub app: Option<String>,
    /// Where the members come from.
    pub members: ShardMembers,
    /// Where rebalance events go; none are published when unset.
    #[serde(default)]
    pub publish: Option<ShardPublish>,
}

fn default_vnodes() -> u32 {
    ShardMapConfig::DEFAULT_VNODES
}

fn default_epsilon() -> f64 {
    ShardMapConfig::DEFAULT_EPSILON
}

fn default_shards() -> u32 {
    ShardMapConfig::DEFAULT_SHARDS
}

impl ShardMapConfig {
    /// Default `vnodes`: 160 ring points per unit of weight.
    pub const DEFAULT_VNODES: u32 = 160;
    /// Default `epsilon`: 0.25 (members stay within 125 % of the mean).
    pub const DEFAULT_EPSILON: f64 = 0.25;
    /// Default `shards`: 256.
    pub const DEFAULT_SHARDS: u32 = 256;
    /// Most shards a map may have. Plans and rebalance events list moved shards one
    /// by one, so this bounds their size (an event stays well under a megabyte).
    pub const MAX_SHARDS: u32 = 4096;
    /// Longest member id, in bytes.
    pub const MAX_ID_LEN: usize = 128;
    /// Largest member weight.
    pub const MAX_WEIGHT: u32 = 10_000;
    /// Most ring points (`vnodes × Σ weights`) and jump buckets (`Σ weights`), as
    /// `trellis-shard` accepts them.
    pub const MAX_POINTS: u64 = 1 << 22;
    /// Largest Maglev table, as `trellis-shard` accepts it.
    pub const MAX_TABLE_SIZE: u64 = 1 << 25;

    /// The app this map routes invocations of: `app`, else the app its members
    /// come from.
    pub fn bound_app(&self) -> Option<&str> {
        match (&self.app, &self.members) {
            (Some(app), _) | (None, ShardMembers::App(app)) => Some(app),
            _ => None,
        }
    }

    /// Checks the strategy parameters and a member list against this map's rules:
    /// the same checks for members from config, the API and the registry.
    ///
    /// # Errors
    /// `(field, message)` pairs, the field relative to the map (`members[1].weight`).
    pub fn check_members(&self, members: &[ShardMember]) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut seen = std::collections::HashMap::new();
        for (i, m) in members.iter().enumerate() {
            let at = |field: &str| format!("members[{i}].{field}");
            if m.id.is_empty()
                || m.id.len() > Self::MAX_ID_LEN
                || m.id.chars().any(char::is_control)
            {
                problems.push((
                    at("id"),
                    format!(
                        "must be 1-{} bytes without control characters, got {:?}",
                        Self::MAX_ID_LEN,
                        m.id
                    ),
                ));
            } else if let Some(first) = seen.insert(m.id.as_str(), i) {
                problems.push((
                    at("id"),
                    format!("{:?} is listed twice (also members[{first}])", m.id),
                ));
            }
            if m.address.is_empty()
                || m.address
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control())
            {
                problems.push((
                    at("address"),
                    format!("must be non-empty without spaces, got {:?}", m.address),
                ));
            }
            if m.weight == 0 {
                problems.push((at("weight"), "must be > 0".to_owned()));
            } else if m.weight > Self::MAX_WEIGHT {
                problems.push((
                    at("weight"),
                    format!("must be at most {}, got {}", Self::MAX_WEIGHT, m.weight),
                ));
            }
        }
        let total: u64 = members.iter().map(|m| u64::from(m.weight)).sum();
        match self.strategy {
            ShardStrategy::Ring | ShardStrategy::Bounded
                if u64::from(self.vnodes) * total > Self::MAX_POINTS =>
            {
                problems.push((
                    "members".to_owned(),
                    format!(
                        "vnodes × the sum of the weights is {} ring points, over the limit of {}",
                        u64::from(self.vnodes) * total,
                        Self::MAX_POINTS
                    ),
                ));
            }
            ShardStrategy::Jump if total > Self::MAX_POINTS => problems.push((
                "members".to_owned(),
                format!(
                    "the sum of the weights is {total}, over jump hash's limit of {} buckets",
                    Self::MAX_POINTS
                ),
            )),
            ShardStrategy::Maglev => {
                if let Some(size) = self.table_size
                    && size < members.len() as u64
                {
                    problems.push((
                        "table_size".to_owned(),
                        format!(
                            "{size} is smaller than the {} members; use a prime well above it",
                            members.len()
                        ),
                    ));
                }
            }
            _ => {}
        }
        problems
    }

    /// Every problem of `[shards.<name>]`, as `(field, message)`.
    fn validate(&self, config: &Config) -> Vec<(String, String)> {
        let mut problems: Vec<(String, String)> = Vec::new();
        let mut problem = |field: &str, message: String| problems.push((field.to_owned(), message));
        match self.strategy {
            ShardStrategy::Ring | ShardStrategy::Bounded if self.vnodes == 0 => {
                problem("vnodes", "must be at least 1".to_owned());
            }
            _ => {}
        }
        if self.strategy == ShardStrategy::Bounded
            && !(self.epsilon.is_finite() && self.epsilon > 0.0)
        {
            problem(
                "epsilon",
                format!("must be finite and greater than 0, got {}", self.epsilon),
            );
        }
        if let (ShardStrategy::Maglev, Some(size)) = (self.strategy, self.table_size) {
            if size > Self::MAX_TABLE_SIZE {
                problem(
                    "table_size",
                    format!("must be at most {}, got {size}", Self::MAX_TABLE_SIZE),
                );
            } else if !is_prime(size) {
                problem(
                    "table_size",
                    format!("must be a prime (such as 65537), got {size}"),
                );
            }
        }
        if !(1..=Self::MAX_SHARDS).contains(&self.shards) {
            problem(
                "shards",
                format!("must be 1 to {}, got {}", Self::MAX_SHARDS, self.shards),
            );
        }
        let app_instances = |app: &str| config.apps.get(app).map(|a| &a.instances);
        match &self.members {
            ShardMembers::Static(members) => {
                if members.is_empty() {
                    problem("members", "list at least one member".to_owned());
                }
                // Apps with no instances in config discover them (`discovery = "registry"`).
                if let Some(app) = &self.app
                    && let Some(instances) = app_instances(app)
                    && !instances.is_empty()
                {
                    let trimmed: Vec<&str> =
                        instances.iter().map(|u| u.trim_end_matches('/')).collect();
                    for (i, m) in members.iter().enumerate() {
                        if !m.address.is_empty()
                            && !trimmed.contains(&m.address.trim_end_matches('/'))
                        {
                            problem(
                                &format!("members[{i}].address"),
                                format!(
                                    "{:?} is not an instance of app {app:?} (instances: {})",
                                    m.address,
                                    trimmed.join(", ")
                                ),
                            );
                        }
                    }
                }
            }
            ShardMembers::App(app) => {
                if !config.apps.contains_key(app) {
                    problem("members.app", format!("no app {app:?} in [apps]"));
                }
                if let Some(bound) = &self.app
                    && bound != app
                {
                    problem(
                        "app",
                        format!(
                            "members come from app {app:?}, so the map is bound to it; set app = {app:?} or leave it out"
                        ),
                    );
                }
            }
            ShardMembers::Registry(service) => {
                if service.is_empty()
                    || service.len() > 253
                    || service.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    problem(
                        "members.registry",
                        format!("must be a service name (1-253 bytes, no spaces), got {service:?}"),
                    );
                }
            }
        }
        if let Some(app) = &self.app
            && !config.apps.contains_key(app)
        {
            problem("app", format!("no app {app:?} in [apps]"));
        }
        if let Some(publish) = &self.publish {
            if !config.components.pubsub.contains_key(&publish.pubsub) {
                let known: Vec<&str> = config
                    .components
                    .pubsub
                    .keys()
                    .map(String::as_str)
                    .collect();
                problem(
                    "publish.pubsub",
                    format!(
                        "no pub/sub component {:?}; configured: {}",
                        publish.pubsub,
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
            if !super::pubsub::is_topic_name(&publish.topic) {
                problem(
                    "publish.topic",
                    format!(
                        "invalid topic name {:?}: use 1-249 of A-Z, a-z, 0-9, '.', '_' and '-'",
                        publish.topic
                    ),
                );
            }
        }
        if let ShardMembers::Static(members) = &self.members {
            problems.extend(self.check_members(members));
        }
        problems
    }
}

/// Reports every problem of every `[shards.<name>]`, and apps bound to two maps.
pub(super) fn validate(config: &Config, errors: &mut Vec<ConfigError>) {
    let mut bound: std::collections::BTreeMap<&str, &str> = std::collections::BTreeMap::new();
    for (name, map) in &config.shards {
        for (field, message) in map.validate(config) {
            errors.push(ConfigError::new(format!("shards.{name}.{field}"), message));
        }
        if let Some(app) = map.bound_app()
            && let Some(first) = bound.insert(app, name)
        {
            let field = if map.app.is_some() {
                "app"
            } else {
                "members.app"
            };
            errors.push(ConfigError::new(
                format!("shards.{name}.{field}"),
                format!(
                    "app {app:?} is already bound to shard map {first:?}; an app has at most one"
                ),
            ));
            bound.insert(app, first);
        }
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The hashing strategies of `trellis-shard`, by their config names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardStrategy {
    /// `"ring"`: consistent hashing with virtual nodes.
    #[default]
    Ring,
    /// `"jump"`: jump consistent hash over members as buckets (placement follows
    /// member order: add members at the end).
    Jump,
    /// `"rendezvous"`: weighted highest-random-weight hashing.
    Rendezvous,
    /// `"maglev"`: Maglev's lookup table.
    Maglev,
    /// `"bounded"`: consistent hashing with bounded loads.
    Bounded,
}

impl ShardStrategy {
    /// The config name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ring => "ring",
            Self::Jump => "jump",
            Self::Rendezvous => "rendezvous",
            Self::Maglev => "maglev",
            Self::Bounded => "bounded",
        }
    }
}

/// One member of a shard map.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardMember {
    /// The stable name shards are placed by; renaming a member moves its shards.
    pub id: String,
    /// Where the member is reached: for a map bound to an app, one of its instance
    /// URLs (`http://host:port`).
    pub address: String,
    /// Relative share of the shards (> 0); 1 when omitted.
    #[serde(default = "one", deserialize_with = "units::lenient_u32")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

impl ShardMember {
    /// A member of weight 1.
    pub fn new(id: impl Into<String>, address: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            address: address.into(),
            weight: 1,
        }
    }
}

/// Where a map's members come from: `members = [...]`, `{ app = "<id>" }` or
/// `{ registry = "<service>" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardMembers {
    /// A list in the config; `PUT /v1/shards/{name}/members` replaces it at runtime.
    Static(Vec<ShardMember>),
    /// The instances of `[apps.<id>]`: one member of weight 1 per instance URL, which
    /// is both its id and its address; followed as they change (with
    /// `discovery = "registry"`, the registry's healthy instances).
    App(String),
    /// The live instances of a service in the service registry, which sets them
    /// whenever they change (empty until it first does).
    Registry(String),
}

impl<'de> Deserialize<'de> for ShardMembers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MembersVisitor;

        /// `{ app = "..." }` or `{ registry = "..." }`.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Source {
            app: Option<String>,
            registry: Option<String>,
        }

        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = ShardMembers;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a list of { id, address, weight } tables, { app = \"<id>\" } or { registry = \"<service>\" }",
                )
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ShardMembers, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = seq.next_element::<ShardMember>()? {
                    members.push(member);
                }
                Ok(ShardMembers::Static(members))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ShardMembers, A::Error> {
                let source = Source::deserialize(de::value::MapAccessDeserializer::new(map))?;
                match (source.app, source.registry) {
                    (Some(app), None) => Ok(ShardMembers::App(app)),
                    (None, Some(service)) => Ok(ShardMembers::Registry(service)),
                    _ => Err(de::Error::custom(
                        "set exactly one of app or registry (or give a list of members)",
                    )),
                }
            }
        }

        d.deserialize_any(MembersVisitor)
    }
}

/// `publish = { pubsub = "<component>", topic = "<topic>" }`: where rebalance events
/// (`trellis.shards.rebalanced` CloudEvents) go.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardPublish {
    /// The pub/sub component; `default` if unset.
    #[serde(default = "default_pubsub")]
    pub pubsub: String,
    /// The topic.
    pub topic: String,
}

fn default_pubsub() -> String {
    super::DEFAULT_COMPONENT.to_owned()
}

/// A number, or a string holding one (environment overrides are strings).
fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    struct F64;
    impl Visitor<'_> for F64 {
        type Value = f64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a number")
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
            v.trim()
                .parse()
                .map_err(|_| E::custom(format!("expected a number, got {v:?}")))
        }
    }
    d.deserialize_any(F64)
}

/// An optional non-negative integer, or a string holding one.
fn option_lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct U64;
    impl Visitor<'_> for U64 {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a non-negative integer")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("must not be negative, got {v}")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            v.trim()
                .parse()
                .map_err(|_| E::custom(format!("expected a non-negative integer, got {v:?}")))
        }
    }
    d.deserialize_any(U64).map(Some)
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::config::ConfigErrors;

    fn load(toml: &str) -> Result<Config, ConfigErrors> {
        Config::from_sources(Some(toml), [])
    }

    fn errors(toml: &str) -> Vec<(String, String)> {
        load(toml)
            .expect_err("config should be invalid")
            .into_iter()
            .map(|e| (e.key, e.message))
            .collect()
    }

    #[track_caller]
    fn assert_error(toml: &str, key: &str, needle: &str) {
        let errs = errors(toml);
        assert!(
            errs.iter().any(|(k, m)| k == key && m.contains(needle)),
            "expected an error at {key:?} containing {needle:?}, got {errs:#?}"
        );
    }

    const APP: &str =
        "[apps.orders]\ninstances = [\"http://127.0.0.1:9001\", \"http://127.0.0.1:9002/\"]\n";

    #[test]
    fn static_members_parse_with_defaults() {
        let config = load(&format!(
            r#"{APP}
            [shards.orders]
            app = "orders"
            members = [
              {{ id = "a", address = "http://127.0.0.1:9001" }},
              {{ id = "b", address = "http://127.0.0.1:9002", weight = 2 }},
            ]
            publish = {{ topic = "shard-events" }}
            "#
        ))
        .expect("valid");
        let map = &config.shards["orders"];
        assert_eq!(map.strategy, ShardStrategy::Ring);
        assert_eq!(
            (map.vnodes, map.epsilon, map.table_size, map.shards),
            (160, 0.25, None, 256)
        );
        assert_eq!(
            map.members,
            ShardMembers::Static(vec![
                ShardMember::new("a", "http://127.0.0.1:9001"),
                ShardMember {
                    weight: 2,
                    ..ShardMember::new("b", "http://127.0.0.1:9002")
                },
            ])
        );
        assert_eq!(map.bound_app(), Some("orders"));
        assert_eq!(
            map.publish,
            Some(ShardPublish {
                pubsub: "default".into(),
                topic: "shard-events".into()
            })
        );
    }

    #[test]
    fn app_and_registry_members() {
        let config = load(&format!(
            r#"{APP}
            [shards.by-app]
            strategy = "maglev"
            table_size = 65537
            members = {{ app = "orders" }}

            [shards.by-registry]
            strategy = "bounded"
            epsilon = 0.5
            vnodes = 40
            shards = 64
            members = {{ registry = "payments" }}
            "#
        ))
        .expect("valid");
        let by_app = &config.shards["by-app"];
        assert_eq!(by_app.members, ShardMembers::App("orders".into()));
        assert_eq!(by_app.bound_app(), Some("orders"), "implied by members");
        assert_eq!(by_app.table_size, Some(65537));
        let by_registry = &config.shards["by-registry"];
        assert_eq!(
            by_registry.members,
            ShardMembers::Registry("payments".into())
        );
        assert_eq!(by_registry.bound_app(), None);
        assert_eq!(
            (
                by_registry.strategy,
                by_registry.epsilon,
                by_registry.vnodes,
                by_registry.shards
            ),
            (ShardStrategy::Bounded, 0.5, 40, 64)
        );
    }

    #[test]
    fn environment_overrides_numbers() {
        let config = Config::from_sources(
            Some("[shards.m]\nstrategy = \"bounded\"\nmembers = [{ id = \"a\", address = \"x:1\" }]\n"),
            [
                ("TRELLIS_SHARDS__M__SHARDS".to_owned(), "32".to_owned()),
                ("TRELLIS_SHARDS__M__EPSILON".to_owned(), "0.1".to_owned()),
                ("TRELLIS_SHARDS__M__VNODES".to_owned(), "8".to_owned()),
            ],
        )
        .expect("valid");
        let map = &config.shards["m"];
        assert_eq!((map.shards, map.epsilon, map.vnodes), (32, 0.1, 8));
    }

    #[test]
    fn member_problems_name_the_member() {
        let bad = r#"
            [shards.orders]
            members = [
              { id = "a", address = "10.0.0.1:1" },
              { id = "b", address = "10.0.0.2:1", weight = 0 },
              { id = "a", address = "" },
              { id = "", address = "10.0.0.4:1", weight = 10001 },
            ]
            "#;
        assert_error(bad, "shards.orders.members[1].weight", "must be > 0");
        assert_error(
            bad,
            "shards.orders.members[2].id",
            "\"a\" is listed twice (also members[0])",
        );
        assert_error(bad, "shards.orders.members[2].address", "must be non-empty");
        assert_error(bad, "shards.orders.members[3].id", "must be 1-128 bytes");
        assert_error(bad, "shards.orders.members[3].weight", "at most 10000");
        assert_error(
            "[shards.x]\nmembers = [{ id = \"a\", address = \"x\", port = 1 }]\n",
            "shards.x.members[0].port",
            "unknown",
        );
        assert_error(
            "[shards.x]\nmembers = [{ id = \"a\", address = \"x\", weight = \"heavy\" }]\n",
            "shards.x.members[0].weight",
            "non-negative integer",
        );
        assert_error(
            "[shards.x]\nmembers = [{ address = \"x\" }]\n",
            "shards.x.members[0].id",
            "required key is missing",
        );
        assert_error(
            "[shards.x]\nmembers = []\n",
            "shards.x.members",
            "at least one member",
        );
        assert_error(
            "[shards.x]\nshards = 4\n",
            "shards.x.members",
            "required key is missing",
        );
        assert_error(
            "[shards.x]\nmembers = { app = \"a\", registry = \"b\" }\n",
            "shards.x.members",
            "exactly one of app or registry",
        );
        assert_error(
            "[shards.x]\nmembers = { service = \"b\" }\n",
            "shards.x.members.service",
            "unknown field `service`, expected `app` or `registry`",
        );
        assert_error(
            "[shards.x]\nmembers = \"a\"\n",
            "shards.x.members",
            "a list of { id, address, weight } tables",
        );
        assert_error(
            "[shards.x]\nmembers = { registry = \"\" }\n",
            "shards.x.members.registry",
            "service name",
        );
    }

    #[test]
    fn strategy_parameters_are_checked_for_the_chosen_strategy() {
        let members = "members = [{ id = \"a\", address = \"x\" }]\n";
        assert_error(
            &format!("[shards.x]\nstrategy = \"consistent\"\n{members}"),
            "shards.x.strategy",
            "unknown variant `consistent`",
        );
        assert_error(
            &format!("[shards.x]\nvnodes = 0\n{members}"),
            "shards.x.vnodes",
            "at least 1",
        );
        assert_error(
            &format!("[shards.x]\nstrategy = \"bounded\"\nepsilon = 0\n{members}"),
            "shards.x.epsilon",
            "greater than 0",
        );
        assert_error(
            &format!("[shards.x]\nstrategy = \"maglev\"\ntable_size = 65536\n{members}"),
            "shards.x.table_size",
            "must be a prime",
        );
        assert_error(
            "[shards.x]\nstrategy = \"maglev\"\ntable_size = 2\n\
             members = [{ id = \"a\", address = \"x\" }, { id = \"b\", address = \"x\" }, { id = \"c\", address = \"x\" }]\n",
            "shards.x.table_size",
            "smaller than the 3 members",
        );
        assert_error(
            &format!("[shards.x]\nshards = 0\n{members}"),
            "shards.x.shards",
            "must be 1 to 4096",
        );
        assert_error(
            &format!("[shards.x]\nshards = 5000\n{members}"),
            "shards.x.shards",
            "must be 1 to 4096",
        );
        assert_error(
            "[shards.x]\nvnodes = 1000\nmembers = [{ id = \"a\", address = \"x\", weight = 5000 }]\n",
            "shards.x.members",
            "over the limit of 4194304",
        );
        // Parameters of other strategies are not checked.
        load(&format!(
            "[shards.x]\nstrategy = \"jump\"\nvnodes = 0\nepsilon = -1\ntable_size = 4\n{members}"
        ))
        .expect("jump reads none of them");
        assert_error(
            &format!("[shards.X]\n{members}"),
            "shards.X",
            "invalid name",
        );
    }

    #[test]
    fn references_and_bindings_are_checked() {
        assert_error(
            "[shards.x]\nmembers = { app = \"nobody\" }\n",
            "shards.x.members.app",
            "no app \"nobody\" in [apps]",
        );
        assert_error(
            "[shards.x]\napp = \"nobody\"\nmembers = [{ id = \"a\", address = \"x\" }]\n",
            "shards.x.app",
            "no app \"nobody\" in [apps]",
        );
        assert_error(
            &format!(
                "{APP}[apps.other]\ninstances = [\"http://127.0.0.1:1\"]\n[shards.x]\napp = \"other\"\nmembers = {{ app = \"orders\" }}\n"
            ),
            "shards.x.app",
            "members come from app \"orders\"",
        );
        assert_error(
            &format!(
                "{APP}[shards.x]\napp = \"orders\"\nmembers = [{{ id = \"a\", address = \"http://127.0.0.1:9001/\" }}, {{ id = \"b\", address = \"http://127.0.0.1:9999\" }}]\n"
            ),
            "shards.x.members[1].address",
            "is not an instance of app \"orders\" (instances: http://127.0.0.1:9001, http://127.0.0.1:9002)",
        );
        assert_error(
            &format!(
                "{APP}[shards.a]\nmembers = {{ app = \"orders\" }}\n[shards.b]\napp = \"orders\"\nmembers = [{{ id = \"a\", address = \"http://127.0.0.1:9001\" }}]\n"
            ),
            "shards.b.app",
            "already bound to shard map \"a\"",
        );
        let bad_publish = "[shards.x]\nmembers = [{ id = \"a\", address = \"x\" }]\npublish = { pubsub = \"kafka\", topic = \"a b\" }\n";
        assert_error(
            bad_publish,
            "shards.x.publish.pubsub",
            "no pub/sub component \"kafka\"; configured: default",
        );
        assert_error(bad_publish, "shards.x.publish.topic", "invalid topic name");
        assert_error(
            "[shards.x]\nmembers = [{ id = \"a\", address = \"x\" }]\npublish = { pubsub = \"default\" }\n",
            "shards.x.publish.topic",
            "required key is missing",
        );
    }

    #[test]
    fn check_members_serves_runtime_updates() {
        let config =
            load("[shards.x]\nstrategy = \"jump\"\nmembers = [{ id = \"a\", address = \"x\" }]\n")
                .expect("valid");
        let map = &config.shards["x"];
        assert!(
            map.check_members(&[]).is_empty(),
            "empty is allowed at runtime"
        );
        let problems = map.check_members(&[
            ShardMember::new("a", "x"),
            ShardMember {
                weight: 0,
                ..ShardMember::new("b", "y")
            },
        ]);
        assert_eq!(
            problems,
            [("members[1].weight".to_owned(), "must be > 0".to_owned())]
        );
    }

    #[test]
    fn primes() {
        let primes: Vec<u64> = (0..30).filter(|n| is_prime(*n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65537));
        assert!(!is_prime(65536));
    }
}
