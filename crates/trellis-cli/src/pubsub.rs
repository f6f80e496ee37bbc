//! `trellis publish` and `trellis subscribe`: a thin client of a running sidecar's
//! pub/sub API.

use std::io::{Read as _, Write as _};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use reqwest::{Method, header};
use serde_json::{Value, json};

use crate::client::{Connection, success};

/// `trellis publish PUBSUB TOPIC DATA`.
#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// Pub/sub component, e.g. `default`.
    pubsub: String,
    /// Topic.
    topic: String,
    /// The event's data; `-` reads it from stdin.
    data: String,
    /// Content type of the data; default `application/json` if it parses as JSON,
    /// else `text/plain; charset=utf-8`.
    #[arg(long)]
    content_type: Option<String>,
    /// Event id (the dedupe key); generated if absent.
    #[arg(long)]
    id: Option<String>,
    /// Event type.
    #[arg(long = "type")]
    ty: Option<String>,
    /// Event source.
    #[arg(long)]
    source: Option<String>,
    /// Ordering key: events with the same key are delivered in order.
    #[arg(long)]
    key: Option<String>,
    #[command(flatten)]
    connection: Connection,
}

impl PublishArgs {
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        let data = if self.data == "-" {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading the data from stdin")?;
            buf
        } else {
            self.data.clone().into_bytes()
        };
        let content_type = self.content_type.clone().unwrap_or_else(|| {
            if serde_json::from_slice::<Value>(&data).is_ok() {
                "application/json".to_owned()
            } else {
                "text/plain; charset=utf-8".to_owned()
            }
        });
        let client = reqwest::Client::new();
        let mut request = self
            .connection
            .request(
                &client,
                Method::POST,
                ["v1", "publish", &self.pubsub, &self.topic],
            )?
            .header(header::CONTENT_TYPE, content_type)
            .body(data);
        for (name, value) in [
            ("ce-id", &self.id),
            ("ce-type", &self.ty),
            ("ce-source", &self.source),
            ("ce-partitionkey", &self.key),
        ] {
            if let Some(value) = value {
                request = request.header(name, percent_encode(value));
            }
        }
        let Some(response) = success(self.connection.send_request(request).await?).await? else {
            return Ok(ExitCode::FAILURE);
        };
        let receipt: Value = response.json().await.context("reading the receipt")?;
        println!("{receipt}");
        Ok(ExitCode::SUCCESS)
    }
}

/// Header values are ASCII; CloudEvents' HTTP binding percent-encodes the rest.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_graphic() && b != b'%' || b == b' ' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `trellis subscribe PUBSUB TOPIC --group G`.
#[derive(Debug, Args)]
pub(crate) struct SubscribeArgs {
    /// Pub/sub component.
    pubsub: String,
    /// Topic.
    topic: String,
    /// Consumer group; consumers of one group share the messages.
    #[arg(long, short)]
    group: String,
    /// Print without acknowledging (they are redelivered after the ack deadline).
    #[arg(long)]
    no_ack: bool,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Print only each event's data, not the whole CloudEvent.
    #[arg(long)]
    data_only: bool,
    #[command(flatten)]
    connection: Connection,
}

impl SubscribeArgs {
    /// Tails the topic: one JSON line per message on stdout; acknowledged after it is
    /// written.
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        let client = reqwest::Client::new();
        let mut printed = 0u64;
        let group = ["v1", "pubsub", &self.pubsub, "subscriptions", &self.group];
        loop {
            let remaining = self
                .count
                .map_or(100, |c| c.saturating_sub(printed).min(100));
            if remaining == 0 {
                return Ok(ExitCode::SUCCESS);
            }
            let pull = self
                .connection
                .request(&client, Method::POST, group.into_iter().chain(["pull"]))?
                .json(&json!({ "topic": self.topic, "max": remaining, "wait_ms": 10_000 }));
            let Some(response) = success(self.connection.send_request(pull).await?).await? else {
                return Ok(ExitCode::FAILURE);
            };
            let body: Value = response.json().await.context("reading pulled messages")?;
            let messages = body["messages"].as_array().cloned().unwrap_or_default();
            if messages.is_empty() {
                continue;
            }
            {
                let mut stdout = std::io::stdout().lock();
                for m in &messages {
                    let line = if self.data_only {
                        m["event"]["data"].clone()
                    } else {
                        m["event"].clone()
                    };
                    writeln!(stdout, "{line}")?;
                }
                stdout.flush()?;
            }
            printed += messages.len() as u64;
            if !self.no_ack {
                let ids: Vec<&Value> = messages.iter().map(|m| &m["ack_id"]).collect();
                let ack = self
                    .connection
                    .request(&client, Method::POST, group.into_iter().chain(["ack"]))?
                    .json(&json!({ "ack_ids": ids }));
                if success(self.connection.send_request(ack).await?)
                    .await?
                    .is_none()
                {
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
    }
}
