//! Helpers for tests that talk to the real backing services.
//!
//! Backend tests run against real PostgreSQL, Redis and friends. They are skipped
//! only when `TRELLIS_TEST_SERVICES=0` is set, and then loudly, so a skipped suite
//! never passes for a green one by accident. In CI the variable is unset and a
//! missing service fails the test.

/// The variable that turns service-backed tests off.
pub const SERVICES_ENV: &str = "TRELLIS_TEST_SERVICES";

/// Whether tests that need `service` should run.
///
/// Returns `false`, after printing a loud warning to stderr, only when
/// `TRELLIS_TEST_SERVICES=0`.
///
/// ```
/// if !trellis_core::testing::services_enabled("postgres") {
///     return;
/// }
/// // ... talk to PostgreSQL ...
/// ```
pub fn services_enabled(service: &str) -> bool {
    let off = std::env::var(SERVICES_ENV).is_ok_and(|v| v.trim() == "0");
    if off {
        eprintln!(
            "\n!!!!! SKIPPED: this test needs {service}, and {SERVICES_ENV}=0 is set. \
             It proves nothing in this run. !!!!!\n"
        );
    }
    !off
}

/// A name unique to this process and call, for schemas, key prefixes and streams, so
/// that tests can run in parallel and be re-run without cleaning up.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..12])
}

/// PostgreSQL for tests: `TRELLIS_TEST_POSTGRES_URL`, default
/// `postgres://postgres@127.0.0.1:5432/test`.
pub fn postgres_url() -> String {
    std::env::var("TRELLIS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Redis for tests: `TRELLIS_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var("TRELLIS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// NATS for tests: `TRELLIS_TEST_NATS_URL`, default `nats://127.0.0.1:4222`.
pub fn nats_url() -> String {
    std::env::var("TRELLIS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// An etcd server for tests: `TRELLIS_TEST_ETCD_URL` if set, else a fresh `etcd`
/// (Debian package `etcd-server`) started on free loopback ports with a temporary
/// data directory, stopped and removed when dropped.
#[derive(Debug)]
pub struct Etcd {
    url: String,
    child: Option<std::process::Child>,
    dir: Option<std::path::PathBuf>,
}

impl Etcd {
    /// Starts (or finds) etcd and waits until it answers `/health`.
    ///
    /// # Panics
    /// If the `etcd` binary is missing or doesn't become healthy within 30 s: tests
    /// that need etcd fail loudly rather than pass without it.
    pub fn start() -> Self {
        if let Ok(url) = std::env::var("TRELLIS_TEST_ETCD_URL") {
            return Self {
                url,
                child: None,
                dir: None,
            };
        }
        let dir = std::env::temp_dir().join(unique_name("trellis_etcd"));
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = std::process::Command::new("etcd")
            .args(["--name", "trellis-test"])
            .arg("--data-dir")
            .arg(&dir)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("trellis-test={peer_url}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start etcd ({e}): install it with `apt-get install etcd-server`")
            });
        let etcd = Self {
            url,
            child: Some(child),
            dir: Some(dir),
        };
        let deadline = std::time::Duration::from_secs(30);
        let mut waited = std::time::Duration::ZERO;
        while !etcd.healthy() {
            let step = std::time::Duration::from_millis(50);
            std::thread::sleep(step);
            waited += step;
            assert!(
                waited < deadline,
                "etcd at {} not healthy within 30s",
                etcd.url
            );
        }
        etcd
    }

    /// Its client URL, e.g. `http://127.0.0.1:23791`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether `GET /health` answers `"health":"true"`.
    pub fn healthy(&self) -> bool {
        use std::io::{Read as _, Write as _};
        let Some(addr) = self.url.strip_prefix("http://") else {
            return false;
        };
        let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
            return false;
        };
        let timeout = Some(std::time::Duration::from_secs(2));
        if stream.set_read_timeout(timeout).is_err()
            || stream
                .write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
                .is_err()
        {
            return false;
        }
        let mut answer = String::new();
        stream.read_to_string(&mut answer).is_ok() && answer.contains("\"health\":\"true\"")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn etcd_starts_on_free_ports_and_stops() {
        if !services_enabled("etcd") {
            return;
        }
        let etcd = Etcd::start();
        assert!(etcd.healthy());
        let url = etcd.url().to_owned();
        drop(etcd);
        if std::env::var("TRELLIS_TEST_ETCD_URL").is_err() {
            let probe = Etcd {
                url,
                child: None,
                dir: None,
            };
            assert!(!probe.healthy(), "stopped when dropped");
        }
    }
}
