//! The closed-loop load driver shared by the load benchmarks.

#![allow(dead_code)] // each benchmark uses its own subset

use std::future::Future;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::time::Instant;

/// Throughput and latency of one scenario.
pub(crate) struct Outcome {
    pub(crate) ops_per_sec: f64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) errors: u64,
}

/// An operation of the benchmark: `op(worker, i)` returns whether it succeeded.
pub(crate) type Op =
    Arc<dyn Fn(usize, usize) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

pub(crate) fn op<F, Fut>(f: F) -> Op
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    Arc::new(move |w, i| Box::pin(f(w, i)))
}

/// A benchmark knob: environment variable `name`, else `default`.
pub(crate) fn knob(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// A numeric knob; a value that doesn't parse stops the benchmark, naming it.
pub(crate) fn number<T: std::str::FromStr>(name: &str, default: &str) -> T {
    knob(name, default)
        .parse()
        .unwrap_or_else(|_| panic!("{name} must be a number"))
}

/// Runs `op(worker, i)` from `concurrency` workers for `seconds`.
pub(crate) async fn drive(seconds: u64, concurrency: usize, op: Op) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let op = Arc::clone(&op);
        workers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut errors = 0;
            let mut i = 0;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                if op(w, i).await {
                    hist.record(t0.elapsed().as_micros().max(1) as u64)
                        .expect("record");
                } else {
                    errors += 1;
                }
                i += 1;
            }
            (hist, errors)
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut errors = 0;
    for w in workers {
        let (hist, e) = w.await.expect("worker");
        total.add(&hist).expect("merge");
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Outcome {
        ops_per_sec: total.len() as f64 / elapsed,
        p50_us: total.value_at_quantile(0.50),
        p99_us: total.value_at_quantile(0.99),
        errors,
    }
}

/// A `trellis up` started for a benchmark.
pub(crate) struct Sidecar {
    pub(crate) child: tokio::process::Child,
    pub(crate) url: String,
    pub(crate) ready_after: Duration,
    pub(crate) _dir: tempfile::TempDir,
}

pub(crate) async fn start_sidecar(component: &str) -> Sidecar {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[log]\nfilter = \"warn\"\n{component}",
        dir.path().join("data").display()
    );
    let path = dir.path().join("trellis.toml");
    std::fs::write(&path, config).expect("config");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(crate::BIN)
        .args(["up", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn trellis");
    let stdout = child.stdout.take().expect("stdout");
    let banner = BufReader::new(stdout)
        .lines()
        .next_line()
        .await
        .expect("banner")
        .expect("banner line");
    let url = banner
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("url in banner")
        .to_owned();
    let client = reqwest::Client::new();
    loop {
        if let Ok(r) = client.get(format!("{url}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Sidecar {
        ready_after: started.elapsed(),
        child,
        url,
        _dir: dir,
    }
}
