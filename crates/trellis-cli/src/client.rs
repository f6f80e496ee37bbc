//! `trellis state ...`: a thin client of a running sidecar's state API, and the
//! connection settings every client command shares.

use std::io::{Read as _, Write as _};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use reqwest::{Method, StatusCode, header};

/// Where the sidecar is and how to authenticate.
#[derive(Debug, Args)]
pub(crate) struct Connection {
    /// The sidecar's base URL.
    #[arg(
        long,
        env = "TRELLIS_URL",
        default_value = "http://127.0.0.1:3700",
        global = true
    )]
    url: String,
    /// Bearer token, if the sidecar requires one.
    #[arg(long, env = "TRELLIS_API_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum StateCommand {
    /// Print a key's value to stdout (its etag goes to stderr).
    Get {
        /// State store name, e.g. `default`.
        store: String,
        /// The key.
        key: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Write a key; prints the new etag.
    Put {
        /// State store name.
        store: String,
        /// The key.
        key: String,
        /// The value; `-` reads it from stdin.
        value: String,
        /// Content type stored with the value.
        #[arg(long, default_value = "text/plain; charset=utf-8")]
        content_type: String,
        /// Time to live in seconds.
        #[arg(long)]
        ttl: Option<u64>,
        /// Only write if the key's current etag is this (compare-and-set).
        #[arg(long, conflicts_with = "create_only")]
        if_match: Option<String>,
        /// Only write if the key does not exist.
        #[arg(long)]
        create_only: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Delete a key.
    Delete {
        /// State store name.
        store: String,
        /// The key.
        key: String,
        /// Only delete if the key's current etag is this.
        #[arg(long)]
        if_match: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
}

impl StateCommand {
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Self::Get {
                store,
                key,
                connection,
            } => {
                let response = connection.send(Method::GET, &store, &key, |r| r).await?;
                let Some(response) = success(response).await? else {
                    return Ok(ExitCode::FAILURE);
                };
                if let Some(etag) = etag(&response) {
                    eprintln!("etag: {etag}");
                }
                let body = response.bytes().await.context("reading the value")?;
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(&body)?;
                if !body.ends_with(b"\n") && std::io::IsTerminal::is_terminal(&stdout) {
                    writeln!(stdout)?;
                }
                Ok(ExitCode::SUCCESS)
            }
            Self::Put {
                store,
                key,
                value,
                content_type,
                ttl,
                if_match,
                create_only,
                connection,
            } => {
                let body = if value == "-" {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .context("reading the value from stdin")?;
                    buf
                } else {
                    value.into_bytes()
                };
                let response = connection
                    .send_with_query(
                        Method::PUT,
                        &store,
                        &key,
                        ttl.map(|t| format!("ttl={t}")),
                        |mut r| {
                            r = r.header(header::CONTENT_TYPE, &content_type).body(body);
                            if let Some(etag) = &if_match {
                                r = r.header(header::IF_MATCH, quote(etag));
                            }
                            if create_only {
                                r = r.header(header::IF_NONE_MATCH, "*");
                            }
                            r
                        },
                    )
                    .await?;
                let Some(response) = success(response).await? else {
                    return Ok(ExitCode::FAILURE);
                };
                if let Some(etag) = etag(&response) {
                    println!("{}", etag.trim_matches('"'));
                }
                Ok(ExitCode::SUCCESS)
            }
            Self::Delete {
                store,
                key,
                if_match,
                connection,
            } => {
                let response = connection
                    .send(Method::DELETE, &store, &key, |r| match &if_match {
                        Some(etag) => r.header(header::IF_MATCH, quote(etag)),
                        None => r,
                    })
                    .await?;
                Ok(match success(response).await? {
                    Some(_) => ExitCode::SUCCESS,
                    None => ExitCode::FAILURE,
                })
            }
        }
    }
}

impl Connection {
    async fn send(
        &self,
        method: Method,
        store: &str,
        key: &str,
        build: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        self.send_with_query(method, store, key, None, build).await
    }

    async fn send_with_query(
        &self,
        method: Method,
        store: &str,
        key: &str,
        query: Option<String>,
        build: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        let segments = ["v1", "state", store].into_iter().chain(key.split('/'));
        let mut url = self.url(segments)?;
        url.set_query(query.as_deref());
        let mut request = reqwest::Client::new().request(method, url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        build(request)
            .send()
            .await
            .with_context(|| format!("cannot reach the sidecar at {}", self.url))
    }

    /// A request to the path made of `segments` (each percent-encoded), with the
    /// token.
    pub(crate) fn request<'a>(
        &self,
        client: &reqwest::Client,
        method: Method,
        segments: impl IntoIterator<Item = &'a str>,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let mut request = client.request(method, self.url(segments)?);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        Ok(request)
    }

    fn url<'a>(&self, segments: impl IntoIterator<Item = &'a str>) -> anyhow::Result<reqwest::Url> {
        let mut url = reqwest::Url::parse(&self.url)
            .with_context(|| format!("invalid --url {:?}", self.url))?;
        url.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("--url {:?} cannot have a path", self.url))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    /// Sends `request`, naming the sidecar if it can't be reached.
    pub(crate) async fn send_request(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        request
            .send()
            .await
            .with_context(|| format!("cannot reach the sidecar at {}", self.url))
    }
}

/// Returns the response on 2xx; otherwise prints the problem to stderr.
pub(crate) async fn success(
    response: reqwest::Response,
) -> anyhow::Result<Option<reqwest::Response>> {
    let status = response.status();
    if status.is_success() {
        return Ok(Some(response));
    }
    let body = response.text().await.unwrap_or_default();
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    match (problem["code"].as_str(), problem["detail"].as_str()) {
        (Some(code), Some(detail)) => eprintln!("error: {} {code}: {detail}", status.as_u16()),
        _ => eprintln!("error: {}: {}", describe(status), body.trim()),
    }
    Ok(None)
}

fn etag(response: &reqwest::Response) -> Option<&str> {
    response
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
}

fn describe(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}

fn quote(etag: &str) -> String {
    if etag == "*" || etag.starts_with('"') {
        etag.to_owned()
    } else {
        format!("\"{etag}\"")
    }
}
