//! HTTP proxy benchmark: `trellis proxy` vs HAProxy and nginx in front of the same
//! upstream, same load generator, equal CPU; and the added cost of one sidecar hop
//! (`/v1/invoke`) over calling the upstream directly.
//!
//! Needs `wrk`, `haproxy`, `nginx` and `taskset` (Debian: `apt-get install wrk
//! haproxy nginx-light util-linux`). Each proxy is pinned to one CPU (and told to use
//! one thread); wrk and the upstream (nginx answering `200 ok`) share the other.
//!
//! ```text
//! cargo bench -p trellis-cli --bench proxy_load
//! BENCH_SECONDS=10 BENCH_CONNECTIONS=64 cargo bench -p trellis-cli --bench proxy_load
//! ```

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_trellis");

struct Settings {
    seconds: u64,
    connections: u32,
    proxy_cpu: String,
    load_cpu: String,
}

impl Settings {
    fn from_env() -> Self {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            seconds: var("BENCH_SECONDS", "10").parse().expect("BENCH_SECONDS"),
            connections: var("BENCH_CONNECTIONS", "32")
                .parse()
                .expect("BENCH_CONNECTIONS"),
            proxy_cpu: if cpus > 1 { "1".into() } else { "0".into() },
            load_cpu: "0".into(),
        }
    }
}

/// A process killed on drop.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process and its children (an nginx master's workers).
    fn tree(&self) -> Vec<u32> {
        let root = self.pid();
        let mut pids = vec![root];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(root) {
                pids.push(pid);
            }
        }
        pids
    }

    /// CPU seconds used so far (user + system) by the process tree, from /proc.
    fn cpu_seconds(&self) -> f64 {
        self.tree()
            .into_iter()
            .map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
                let fields: Vec<&str> = after_comm.split_whitespace().collect();
                let ticks = |i: usize| {
                    fields
                        .get(i)
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0)
                };
                // After the comm field: state is 0, utime 11, stime 12.
                (ticks(11) + ticks(12)) / 100.0
            })
            .sum()
    }

    /// Resident memory of the process tree.
    fn rss_mib(&self) -> f64 {
        self.tree()
            .into_iter()
            .map(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find(|l| l.starts_with("VmRSS:"))
                            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                    })
                    .unwrap_or(0.0)
            })
            .sum::<f64>()
            / 1024.0
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn wait_for(port: u16, path: &str) {
    for _ in 0..200 {
        let ok = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://127.0.0.1:{port}{path}"),
            ])
            .output()
            .map(|o| o.stdout == b"200")
            .unwrap_or(false);
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing answered 200 on port {port}{path}");
}

fn pinned(cpu: &str, program: &str) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", cpu, program]);
    c
}

fn spawn(name: &'static str, mut command: Command) -> Proc {
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    Proc { child }
}

fn nginx_conf(dir: &Path, name: &str, body: &str) -> String {
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/{name}.pid;\nerror_log {d}/{name}.err warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n\
         client_body_temp_path {d}/{name}-cb; proxy_temp_path {d}/{name}-pt; fastcgi_temp_path {d}/{name}-ft;\n\
         uwsgi_temp_path {d}/{name}-ut; scgi_temp_path {d}/{name}-st;\n{body}\n}}\n"
    );
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf).expect("write nginx conf");
    path.display().to_string()
}

/// Throughput and latency of one wrk run.
struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_per_krps: f64,
    rss_mib: f64,
}

fn parse_duration_us(text: &str) -> f64 {
    let text = text.trim();
    let (number, factor) = if let Some(v) = text.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = text.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = text.strip_suffix('s') {
        (v, 1e6)
    } else {
        (text, 1.0)
    };
    number.parse::<f64>().unwrap_or(f64::NAN) * factor
}

fn wrk(settings: &Settings, url: &str, watched: Option<&Proc>) -> Run {
    let cpu_before = watched.map(Proc::cpu_seconds).unwrap_or(0.0);
    let output = pinned(&settings.load_cpu, "wrk")
        .args([
            "-t1",
            &format!("-c{}", settings.connections),
            &format!("-d{}s", settings.seconds),
            "--latency",
            url,
        ])
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {prefix:?} in wrk output:\n{text}"))
    };
    let rps: f64 = field("Requests/sec:").trim().parse().expect("rps");
    let errors = text
        .lines()
        .any(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if errors {
        eprintln!("warning: errors during {url}:\n{text}");
    }
    let cpu = watched.map(|p| p.cpu_seconds() - cpu_before).unwrap_or(0.0);
    Run {
        rps,
        p50_us: parse_duration_us(&field("50%")),
        p99_us: parse_duration_us(&field("99%")),
        cpu_per_krps: if rps > 0.0 {
            cpu / settings.seconds as f64 / (rps / 1000.0)
        } else {
            0.0
        },
        rss_mib: watched.map(Proc::rss_mib).unwrap_or(0.0),
    }
}

/// Latency percentiles of an open-loop run at a fixed request rate (µs).
struct FixedRate {
    p50: f64,
    p90: f64,
    p99: f64,
    errors: u64,
}

/// Sends `rate` requests per second for `seconds` to `url`, each on its own task
/// (open loop: a slow answer does not slow the sender), over a keep-alive pool.
fn fixed_rate(url: &str, rate: u64, seconds: u64) -> FixedRate {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .expect("client");
        let histogram = std::sync::Arc::new(std::sync::Mutex::new(
            hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
        ));
        let errors = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = Vec::with_capacity((rate * seconds) as usize);
        for _ in 0..rate * seconds {
            ticker.tick().await;
            let (client, histogram, errors, url) = (
                client.clone(),
                histogram.clone(),
                errors.clone(),
                url.to_owned(),
            );
            tasks.push(tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let ok = match client.get(&url).send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    let us = started.elapsed().as_micros().max(1) as u64;
                    histogram.lock().expect("lock").record(us).expect("record");
                } else {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        let h = histogram.lock().expect("lock");
        FixedRate {
            p50: h.value_at_quantile(0.50) as f64,
            p90: h.value_at_quantile(0.90) as f64,
            p99: h.value_at_quantile(0.99) as f64,
            errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        }
    })
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let settings = Settings::from_env();
    for tool in ["wrk", "haproxy", "nginx", "taskset", "curl"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            eprintln!(
                "proxy_load: `{tool}` is not installed (apt-get install wrk haproxy nginx-light util-linux curl); skipping"
            );
            return;
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let up_port = free_port();
    let upstream_conf = nginx_conf(
        dir.path(),
        "upstream",
        &format!("  server {{ listen 127.0.0.1:{up_port}; location / {{ return 200 \"ok\"; }} }}"),
    );
    let _upstream = spawn("upstream nginx", {
        let mut c = pinned(&settings.load_cpu, "nginx");
        c.args([
            "-c",
            &upstream_conf,
            "-e",
            &dir.path().join("upstream.err").display().to_string(),
        ]);
        c
    });
    wait_for(up_port, "/");

    println!(
        "proxy load: wrk 1 thread, {} connections, {}s per run; each proxy pinned to CPU {} with one thread/worker, \
         wrk and the upstream (nginx `return 200`) on CPU {}\n",
        settings.connections, settings.seconds, settings.proxy_cpu, settings.load_cpu
    );
    let direct = wrk(&settings, &format!("http://127.0.0.1:{up_port}/"), None);

    // trellis proxy
    let trellis_port = free_port();
    let trellis = spawn("trellis proxy", {
        let mut c = pinned(&settings.proxy_cpu, BIN);
        c.args([
            "proxy",
            "--listen",
            &format!("127.0.0.1:{trellis_port}"),
            "--upstream",
            &format!("http://127.0.0.1:{up_port}"),
            "--log-filter",
            "warn",
        ])
        .env("TRELLIS_WORKER_THREADS", "1");
        c
    });
    wait_for(trellis_port, "/");
    let trellis_run = wrk(
        &settings,
        &format!("http://127.0.0.1:{trellis_port}/"),
        Some(&trellis),
    );
    drop(trellis);

    // HAProxy
    let haproxy_port = free_port();
    let haproxy_cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &haproxy_cfg,
        format!(
            "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n\
             frontend f\n  bind 127.0.0.1:{haproxy_port}\n  default_backend b\nbackend b\n  server s1 127.0.0.1:{up_port}\n"
        ),
    )
    .expect("haproxy cfg");
    let haproxy = spawn("haproxy", {
        let mut c = pinned(&settings.proxy_cpu, "haproxy");
        c.args(["-f", &haproxy_cfg.display().to_string(), "-db"]);
        c
    });
    wait_for(haproxy_port, "/");
    let haproxy_run = wrk(
        &settings,
        &format!("http://127.0.0.1:{haproxy_port}/"),
        Some(&haproxy),
    );
    drop(haproxy);

    // nginx as a proxy
    let nginx_port = free_port();
    let nginx_conf = nginx_conf(
        dir.path(),
        "proxy",
        &format!(
            "  upstream u {{ server 127.0.0.1:{up_port}; keepalive 128; }}\n\
             server {{ listen 127.0.0.1:{nginx_port}; location / {{ proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
        ),
    );
    let nginx = spawn("nginx proxy", {
        let mut c = pinned(&settings.proxy_cpu, "nginx");
        c.args([
            "-c",
            &nginx_conf,
            "-e",
            &dir.path().join("proxy.err").display().to_string(),
        ]);
        c
    });
    wait_for(nginx_port, "/");
    let nginx_run = wrk(
        &settings,
        &format!("http://127.0.0.1:{nginx_port}/"),
        Some(&nginx),
    );
    drop(nginx);

    // The sidecar hop: /v1/invoke/up/ through `trellis up` (no policies, access logs off).
    let sidecar_port = free_port();
    let sidecar_dir = dir.path().join("sidecar");
    std::fs::create_dir_all(&sidecar_dir).expect("dir");
    let sidecar_cfg = sidecar_dir.join("trellis.toml");
    std::fs::write(
        &sidecar_cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:{sidecar_port}\"\ndata_dir = {:?}\n[log]\nfilter = \"warn\"\n[apps.up]\ninstances = [\"http://127.0.0.1:{up_port}\"]\n",
            sidecar_dir.join("data").display().to_string()
        ),
    )
    .expect("sidecar cfg");
    let sidecar = spawn("trellis up", {
        let mut c = pinned(&settings.proxy_cpu, BIN);
        c.args(["up", "--config", &sidecar_cfg.display().to_string()])
            .env("TRELLIS_WORKER_THREADS", "1");
        c
    });
    wait_for(sidecar_port, "/v1/invoke/up/");
    let invoke_run = wrk(
        &settings,
        &format!("http://127.0.0.1:{sidecar_port}/v1/invoke/up/"),
        Some(&sidecar),
    );
    // At a fixed 1000 req/s, as Dapr reports its sidecar overhead.
    let rate = 1000;
    let direct_fixed = fixed_rate(
        &format!("http://127.0.0.1:{up_port}/"),
        rate,
        settings.seconds,
    );
    let cpu_before = sidecar.cpu_seconds();
    let invoke_fixed = fixed_rate(
        &format!("http://127.0.0.1:{sidecar_port}/v1/invoke/up/"),
        rate,
        settings.seconds,
    );
    let sidecar_cpu = (sidecar.cpu_seconds() - cpu_before) / settings.seconds as f64;
    let sidecar_rss = sidecar.rss_mib();
    drop(sidecar);

    println!("| target | req/s | p50 µs | p99 µs | proxy CPU s per 1000 req/s | proxy RSS MiB |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, r) in [
        ("upstream direct", &direct),
        ("trellis proxy", &trellis_run),
        ("HAProxy", &haproxy_run),
        ("nginx", &nginx_run),
        ("trellis sidecar /v1/invoke", &invoke_run),
    ] {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.3} | {:.1} |",
            r.rps, r.p50_us, r.p99_us, r.cpu_per_krps, r.rss_mib
        );
    }
    println!();
    println!(
        "trellis proxy vs HAProxy: {:.2}x throughput, {:.2}x p50, {:.2}x p99 (lower latency ratio is better)",
        trellis_run.rps / haproxy_run.rps,
        trellis_run.p50_us / haproxy_run.p50_us,
        trellis_run.p99_us / haproxy_run.p99_us
    );
    println!(
        "trellis proxy vs nginx:   {:.2}x throughput, {:.2}x p50, {:.2}x p99",
        trellis_run.rps / nginx_run.rps,
        trellis_run.p50_us / nginx_run.p50_us,
        trellis_run.p99_us / nginx_run.p99_us
    );
    println!(
        "sidecar hop at saturation ({:.0} req/s): +{:.0} µs p50, +{:.0} µs p99 over calling the upstream directly",
        invoke_run.rps,
        invoke_run.p50_us - direct.p50_us,
        invoke_run.p99_us - direct.p99_us,
    );
    println!(
        "sidecar hop at {rate} req/s (open loop): direct p50/p90/p99 {:.0}/{:.0}/{:.0} µs, through the sidecar {:.0}/{:.0}/{:.0} µs \
         → +{:.0} µs p50, +{:.0} µs p90, +{:.0} µs p99 per hop; sidecar {:.3} vCPU and {:.1} MiB RSS at {rate} req/s{}",
        direct_fixed.p50,
        direct_fixed.p90,
        direct_fixed.p99,
        invoke_fixed.p50,
        invoke_fixed.p90,
        invoke_fixed.p99,
        invoke_fixed.p50 - direct_fixed.p50,
        invoke_fixed.p90 - direct_fixed.p90,
        invoke_fixed.p99 - direct_fixed.p99,
        sidecar_cpu,
        sidecar_rss,
        if direct_fixed.errors + invoke_fixed.errors > 0 {
            format!(
                " (errors: {} direct, {} sidecar)",
                direct_fixed.errors, invoke_fixed.errors
            )
        } else {
            String::new()
        }
    );
}
