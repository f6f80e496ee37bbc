//! Hashing strategies: lookup cost at 10/100/1000 members against the `hashring`
//! crate, rebuild cost, and (printed before the timings) keys moved on a membership
//! change against the optimum K/N, and max/mean load.
//!
//! Every contender hashes the key itself (XXH3 for Trellis, SipHash-1-3 for
//! `hashring`), so a lookup is "bytes in, member out". `hashring` has no virtual
//! nodes of its own; it gets the same 160 per member as Trellis's ring, added the way
//! its documentation shows.
//!
//! Run with:
//! `cargo bench -p trellis-shard --features bench --bench hashing`

use std::hash::{Hash, Hasher};
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use trellis_shard::{
    BoundedLoads, Jump, LoadStats, Maglev, Member, Rendezvous, Ring, Strategy, hash,
};

/// Ring points per member, as trellis-proxy uses.
const VNODES: u32 = 160;
/// Bounded loads' ε.
const EPSILON: f64 = 0.25;
/// Keys for the movement and balance figures: at least 1 000 per member, so that
/// sampling noise (±3% of a member's share) stays below what is being measured.
fn key_count(members: usize) -> usize {
    (1000 * members).max(100_000)
}
/// Member counts.
const SIZES: [usize; 3] = [10, 100, 1000];

fn members(n: usize) -> Vec<Member> {
    Member::all((0..n).map(|i| format!("10.0.{}.{}:8080", i / 256, i % 256)))
}

fn lookup_keys() -> Vec<String> {
    (0..4096).map(|i| format!("customer-{i}")).collect()
}

/// A `hashring` virtual node: member name and replica number.
#[derive(Debug, Clone, PartialEq)]
struct VNode {
    name: String,
    id: u32,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.id.hash(state);
    }
}

fn hashring(members: &[Member]) -> hashring::HashRing<VNode> {
    let mut ring = hashring::HashRing::new();
    ring.batch_add(
        members
            .iter()
            .flat_map(|m| {
                (0..VNODES).map(|id| VNode {
                    name: m.name.clone(),
                    id,
                })
            })
            .collect(),
    );
    ring
}

/// Every Trellis contender, by name.
fn strategies(members: &[Member]) -> Vec<(&'static str, Box<dyn Strategy>)> {
    let m = || members.to_vec();
    vec![
        (
            "ring",
            Box::new(Ring::from_members(m(), VNODES).expect("ring")),
        ),
        ("jump", Box::new(Jump::new(m()).expect("jump"))),
        (
            "rendezvous",
            Box::new(Rendezvous::new(m()).expect("rendezvous")),
        ),
        ("maglev", Box::new(Maglev::new(m()).expect("maglev"))),
        (
            "bounded",
            Box::new(BoundedLoads::new(m(), VNODES, EPSILON).expect("bounded")),
        ),
    ]
}

fn fraction_moved(old: &dyn Strategy, new: &dyn Strategy, hashes: &[u64]) -> f64 {
    let name = |s: &dyn Strategy, o: Option<usize>| o.map(|i| s.members()[i].name.clone());
    let (before, after) = (old.assign(hashes), new.assign(hashes));
    let moved = before
        .into_iter()
        .zip(after)
        .filter(|(b, a)| name(old, *b) != name(new, *a))
        .count();
    moved as f64 / hashes.len() as f64
}

/// The printed tables: movement against the optimum, and balance.
fn print_figures() {
    println!(
        "\n## Keys moved on a membership change (fraction of max(100 000, 1 000 × N) keys; optimum 1/N)\n"
    );
    println!(
        "| strategy | members | add: moved | add: optimum | ratio | remove: moved | remove: optimum | ratio |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut balance = Vec::new();
    for n in SIZES {
        let count = key_count(n);
        let hashes: Vec<u64> = (0..count as u64).map(|i| hash(&i.to_le_bytes())).collect();
        let base = members(n);
        let grown = members(n + 1);
        // Remove a member from the middle; jump's rows say how they remove.
        let mut shrunk = base.clone();
        shrunk.remove(n / 2);
        let mut last_removed = base.clone();
        last_removed.pop();
        let mut swap_removed = base.clone();
        swap_removed.swap_remove(n / 2);
        let (add_opt, remove_opt) = (1.0 / (n + 1) as f64, 1.0 / n as f64);
        let row = |label: &str, add: Option<f64>, remove: f64| {
            let add = match add {
                Some(a) => format!("{a:.4} | {add_opt:.4} | {:.2}", a / add_opt),
                None => "– | – | –".to_owned(),
            };
            println!(
                "| {label} | {n} | {add} | {remove:.4} | {remove_opt:.4} | {:.2} |",
                remove / remove_opt
            );
        };
        for ((name, before), ((_, after_add), (_, after_remove))) in strategies(&base)
            .into_iter()
            .zip(strategies(&grown).into_iter().zip(strategies(&shrunk)))
        {
            let add = fraction_moved(before.as_ref(), after_add.as_ref(), &hashes);
            if name == "jump" {
                row("jump (append / remove last)", Some(add), {
                    let after = Jump::new(last_removed.clone()).expect("jump");
                    fraction_moved(before.as_ref(), &after, &hashes)
                });
                row("jump (remove middle, swap_remove)", None, {
                    let after = Jump::new(swap_removed.clone()).expect("jump");
                    fraction_moved(before.as_ref(), &after, &hashes)
                });
                row(
                    "jump (remove middle, naive)",
                    None,
                    fraction_moved(before.as_ref(), after_remove.as_ref(), &hashes),
                );
            } else {
                let remove = fraction_moved(before.as_ref(), after_remove.as_ref(), &hashes);
                row(name, Some(add), remove);
            }
            balance.push((name, n, LoadStats::measure(before.as_ref(), &hashes)));
        }
        let peer = hashring(&base);
        let peer_grown = hashring(&grown);
        let peer_shrunk = hashring(&shrunk);
        let keys: Vec<[u8; 8]> = (0..count as u64).map(|i| i.to_le_bytes()).collect();
        let moved = |a: &hashring::HashRing<VNode>, b: &hashring::HashRing<VNode>| {
            keys.iter()
                .filter(|k| a.get(k).map(|v| &v.name) != b.get(k).map(|v| &v.name))
                .count() as f64
                / count as f64
        };
        row(
            "hashring (peer)",
            Some(moved(&peer, &peer_grown)),
            moved(&peer, &peer_shrunk),
        );
        let mut counts = std::collections::HashMap::<&str, u64>::new();
        for k in &keys {
            *counts.entry(&peer.get(k).expect("node").name).or_default() += 1;
        }
        let counts = base
            .iter()
            .map(|m| counts.get(m.name.as_str()).copied().unwrap_or(0))
            .collect();
        let expected = vec![count as f64 / n as f64; n];
        balance.push(("hashring (peer)", n, LoadStats { counts, expected }));
    }
    println!("\n## Balance (max(100 000, 1 000 × N) keys, equal weights)\n");
    println!("| strategy | members | keys | max/mean | min/mean |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, n, stats) in balance {
        println!(
            "| {name} | {n} | {} | {:.3} | {:.3} |",
            key_count(n),
            stats.max_over_mean(),
            stats.min_over_mean()
        );
    }
    println!();
}

fn bench_lookups(c: &mut Criterion) {
    let keys = lookup_keys();
    for n in SIZES {
        let base = members(n);
        let mut group = c.benchmark_group(format!("lookup/{n}"));
        for (name, strategy) in strategies(&base) {
            let mut i = 0usize;
            group.bench_function(name, |b| {
                b.iter(|| {
                    i = (i + 1) & 4095;
                    strategy.owner_index(black_box(keys[i].as_bytes()))
                })
            });
        }
        // Bounded loads as a balancer uses it: pick under live loads (all at the mean).
        let bounded = BoundedLoads::new(base.clone(), VNODES, EPSILON).expect("bounded");
        let mut loads = bounded.loads();
        for member in 0..n {
            loads.set(member, 100);
        }
        let mut i = 0usize;
        group.bench_function("bounded (pick under loads)", |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                bounded.pick(black_box(keys[i].as_bytes()), &loads)
            })
        });
        let peer = hashring(&base);
        let mut i = 0usize;
        group.bench_function("hashring (peer)", |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                peer.get(&black_box(keys[i].as_bytes())).map(|v| v.id)
            })
        });
        group.finish();
    }
}

fn bench_builds(c: &mut Criterion) {
    for n in SIZES {
        let base = members(n);
        let mut group = c.benchmark_group(format!("build/{n}"));
        group.sample_size(10);
        group.bench_with_input(BenchmarkId::from_parameter("ring"), &base, |b, m| {
            b.iter(|| Ring::from_members(m.clone(), VNODES))
        });
        group.bench_with_input(BenchmarkId::from_parameter("jump"), &base, |b, m| {
            b.iter(|| Jump::new(m.clone()))
        });
        group.bench_with_input(BenchmarkId::from_parameter("rendezvous"), &base, |b, m| {
            b.iter(|| Rendezvous::new(m.clone()))
        });
        group.bench_with_input(BenchmarkId::from_parameter("maglev"), &base, |b, m| {
            b.iter(|| Maglev::new(m.clone()))
        });
        group.bench_with_input(
            BenchmarkId::from_parameter("hashring (peer)"),
            &base,
            |b, m| b.iter(|| hashring(m)),
        );
        group.finish();
    }
}

fn main() {
    print_figures();
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench_lookups(&mut criterion);
    bench_builds(&mut criterion);
    criterion.final_summary();
}
