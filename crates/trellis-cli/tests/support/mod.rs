//! Starts the real `trellis` binary and talks to it over HTTP.

#![allow(dead_code)] // each test file uses its own subset

pub(crate) mod bank;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_trellis");

/// A running `trellis up`.
pub(crate) struct Trellis {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub(crate) url: String,
    /// The directory holding its config, data dir and stderr log.
    pub(crate) dir: PathBuf,
    /// The line it printed on start.
    pub(crate) banner: String,
}

impl Trellis {
    /// Starts `trellis up` in `dir` with `config` appended to a config that listens
    /// on a free port and keeps data in `dir/data`.
    pub(crate) async fn start_in(dir: &Path, config: &str) -> Self {
        Self::start_with_env(dir, config, &[]).await
    }

    pub(crate) async fn start_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Self {
        let config_path = dir.join("trellis.toml");
        let full = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{config}",
            dir.join("data").display()
        );
        std::fs::write(&config_path, full).expect("write config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("stderr.log"))
            .expect("log file");
        let mut command = Command::new(BIN);
        command
            .arg("up")
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .env_remove("TRELLIS_API_TOKEN")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn trellis");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let banner = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no banner within 30s; stderr:\n{}", read_log(dir)))
            .expect("read stdout")
            .unwrap_or_else(|| {
                panic!(
                    "trellis exited before its banner; stderr:\n{}",
                    read_log(dir)
                )
            });
        let url = banner
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in banner {banner:?}"))
            .trim_end_matches(';')
            .to_owned();
        Self {
            child,
            url,
            dir: dir.to_path_buf(),
            banner,
        }
    }

    /// The URL of the proxy listener `name`, from the banner.
    pub(crate) fn listener(&self, name: &str) -> String {
        let marker = format!("proxy {name} on ");
        self.banner
            .split("; ")
            .find_map(|part| part.strip_prefix(&marker))
            .unwrap_or_else(|| panic!("no listener {name:?} in banner {:?}", self.banner))
            .trim()
            .to_owned()
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// `kill -9`.
    pub(crate) async fn kill9(&mut self) {
        self.child.start_kill().expect("SIGKILL");
        self.child.wait().await.expect("reap");
    }

    /// Sends a signal by name (`TERM`, `INT`).
    pub(crate) fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill(1)");
        assert!(status.success());
    }

    /// Waits for exit, at most `within`.
    pub(crate) async fn wait(&mut self, within: Duration) -> ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "trellis did not exit within {within:?}; stderr:\n{}",
                    read_log(&self.dir)
                )
            })
            .expect("wait")
    }

    pub(crate) fn stderr(&self) -> String {
        read_log(&self.dir)
    }
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
}

/// Runs the binary to completion with `args`; returns (status, stdout, stderr).
pub(crate) fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = std::process::Command::new(BIN)
        .args(args)
        .env_remove("TRELLIS_API_TOKEN")
        .env_remove("TRELLIS_URL")
        .envs(env.iter().copied())
        .output()
        .expect("run trellis");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Writes `head` on a fresh connection and reads one response: (status, body).
pub(crate) async fn raw_exchange(t: &Trellis, head: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = t.url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("write head");
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("answer without waiting for the body")
            .expect("read");
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&response);
        if let Some((headers, body)) = text.split_once("\r\n\r\n") {
            let length = headers
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>())
                })
                .and_then(Result::ok);
            if length.is_some_and(|len| body.len() >= len) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
