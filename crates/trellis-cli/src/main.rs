//! `trellis`: run the sidecar, check a config, or try the API from a shell.
//!
//! `main` parses the command line, sets up logging and hands over to
//! `trellis-server`; the `state` verbs are a thin HTTP client.

mod client;
mod logging;
mod pubsub;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use trellis_core::Config;
use trellis_core::config::LogFormat;
use trellis_server::Server;

/// Trellis: distributed-system building blocks as a sidecar.
#[derive(Debug, Parser)]
#[command(name = "trellis", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the sidecar (embedded defaults when no config is given).
    Up(UpArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the version.
    Version,
    /// Read and write a running sidecar's state store.
    #[command(subcommand)]
    State(client::StateCommand),
    /// Run an ambassador proxy in front of upstreams, with load balancing, health,
    /// outlier ejection and resilience policies.
    Proxy(ProxyArgs),
    /// Publish an event to a topic of a running sidecar.
    Publish(pubsub::PublishArgs),
    /// Tail a topic as a consumer group: print each message, then acknowledge it.
    Subscribe(pubsub::SubscribeArgs),
}

#[derive(Debug, Args)]
struct ProxyArgs {
    /// Address to accept connections on.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Upstream base URL (`http://host:port`); repeat for several.
    #[arg(long, required = true)]
    upstream: Vec<String>,
    /// Load balancing: `p2c` (default), `round_robin`, `hash:header:<name>` or
    /// `hash:path:<segment>`.
    #[arg(long)]
    lb: Option<String>,
    /// Config file: policies for this proxy go in [resiliency.targets.apps.proxy];
    /// its [[listeners]] run too.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Also serve the admin API (/healthz, /metrics, /v1/resilience) here.
    #[arg(long)]
    admin: Option<std::net::SocketAddr>,
    /// Log format; overrides `log.format`.
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
    /// Log filter; overrides `RUST_LOG` and `log.filter`.
    #[arg(long)]
    log_filter: Option<String>,
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Config file (TOML). Every key can also be set as TRELLIS_<SECTION>__<KEY>.
    #[arg(long, short, env = "TRELLIS_CONFIG")]
    config: Option<PathBuf>,
    /// Log format; overrides `log.format`.
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
    /// Log filter such as `info,trellis_state=debug`; overrides `RUST_LOG` and
    /// `log.filter`.
    #[arg(long)]
    log_filter: Option<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a config file (with environment overrides applied) and print every
    /// error with its key path. Exits non-zero when invalid.
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("trellis {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Config(ConfigCommand::Check { file }) => config_check(&file),
        Command::Up(args) => match runtime().and_then(|rt| rt.block_on(up(args))) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("trellis: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Proxy(args) => match runtime().and_then(|rt| rt.block_on(proxy(args))) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("trellis: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Publish(args) => match runtime().and_then(|rt| rt.block_on(args.run())) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("trellis: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Subscribe(args) => match runtime().and_then(|rt| rt.block_on(args.run())) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("trellis: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::State(command) => match runtime().and_then(|rt| rt.block_on(command.run())) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("trellis: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The async runtime: one worker per CPU, or `TRELLIS_WORKER_THREADS`. With one
/// worker, a current-thread runtime: no cross-thread wake-ups, which is measurably
/// faster for a proxy pinned to one core.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let threads = match std::env::var("TRELLIS_WORKER_THREADS") {
        Ok(v) => Some(
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=1024).contains(n))
                .with_context(|| format!("TRELLIS_WORKER_THREADS must be 1 to 1024, got {v:?}"))?,
        ),
        Err(_) => None,
    };
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder
        .enable_all()
        .thread_name("trellis")
        .build()
        .context("starting the async runtime")
}

/// Exit code for an invalid configuration.
const INVALID_CONFIG: u8 = 2;

fn config_check(file: &std::path::Path) -> ExitCode {
    let config = match Config::load(Some(file)) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{}: {errors}", file.display());
            return ExitCode::from(INVALID_CONFIG);
        }
    };
    if let Err(e) = logging::filter(&config.log.filter) {
        eprintln!(
            "{}: invalid configuration (1 error):\n  log.filter: {e}",
            file.display()
        );
        return ExitCode::from(INVALID_CONFIG);
    }
    if let Err(errors) = trellis_server::sagas::check_definitions(&config) {
        eprintln!(
            "{}: {}",
            file.display(),
            trellis_core::ConfigErrors::new(errors)
        );
        return ExitCode::from(INVALID_CONFIG);
    }
    let components: Vec<String> = config
        .components
        .state
        .iter()
        .map(|(name, c)| format!("state.{name} ({})", c.type_name()))
        .chain(
            config
                .components
                .pubsub
                .iter()
                .map(|(name, c)| format!("pubsub.{name} ({})", c.type_name())),
        )
        .chain(
            config
                .subscriptions
                .keys()
                .map(|name| format!("subscription.{name}")),
        )
        .collect();
    println!(
        "{}: ok; components: {}",
        file.display(),
        components.join(", ")
    );
    ExitCode::SUCCESS
}

/// Loads the config (extra `env` pairs override the process environment) and starts
/// logging; on failure prints the errors and returns the exit code.
fn prepare(
    file: Option<&std::path::Path>,
    extra_toml: &str,
    extra_env: &[(String, String)],
    log_format: Option<LogFormatArg>,
    log_filter: Option<String>,
) -> Result<Config, ExitCode> {
    let text = match file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) => {
                eprintln!("trellis: cannot read config file {}: {e}", path.display());
                return Err(ExitCode::from(INVALID_CONFIG));
            }
        },
        None => None,
    };
    let text = match (text, extra_toml.is_empty()) {
        (Some(text), _) => Some(format!("{text}\n{extra_toml}")),
        (None, false) => Some(extra_toml.to_owned()),
        (None, true) => None,
    };
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .chain(extra_env.iter().cloned());
    let config = match Config::from_sources(text.as_deref(), env) {
        Ok(config) => config,
        Err(errors) => {
            let source = file.map_or_else(|| "environment".to_owned(), |p| p.display().to_string());
            eprintln!("trellis: {source}: {errors}");
            return Err(ExitCode::from(INVALID_CONFIG));
        }
    };
    let format = match log_format {
        Some(LogFormatArg::Pretty) => LogFormat::Pretty,
        Some(LogFormatArg::Json) => LogFormat::Json,
        None => config.log.format,
    };
    let filter = log_filter
        .or_else(|| std::env::var("RUST_LOG").ok().filter(|f| !f.is_empty()))
        .unwrap_or_else(|| config.log.filter.clone());
    if let Err(e) = logging::init(format, &filter) {
        eprintln!("trellis: invalid configuration (1 error):\n  log.filter: {e}");
        return Err(ExitCode::from(INVALID_CONFIG));
    }
    Ok(config)
}

async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let config = match prepare(
        args.config.as_deref(),
        "",
        &[],
        args.log_format,
        args.log_filter,
    ) {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    std::fs::create_dir_all(&config.server.data_dir)
        .with_context(|| format!("creating data dir {}", config.server.data_dir.display()))?;
    serve(config, true).await
}

async fn proxy(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    // The command line becomes one more [[listeners]] entry named "proxy", so its
    // policies come from [resiliency.targets.apps.proxy] of --config.
    let upstreams: Vec<String> = args.upstream.iter().map(|u| format!("{u:?}")).collect();
    let mut listener = format!(
        "\n[[listeners]]\nname = \"proxy\"\nlisten = {:?}\nupstreams = [{}]\n",
        args.listen.to_string(),
        upstreams.join(", ")
    );
    if let Some(lb) = &args.lb {
        listener.push_str(&format!("lb = {lb:?}\n"));
    }
    let admin = args
        .admin
        .map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
    let env = [("TRELLIS_SERVER__LISTEN".to_owned(), admin)];
    let mut config = match prepare(
        args.config.as_deref(),
        &listener,
        &env,
        args.log_format,
        args.log_filter,
    ) {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    // A proxy keeps no state and has no topics.
    config.components.state.clear();
    config.components.pubsub.clear();
    config.components.eventstore.clear();
    config.subscriptions.clear();
    serve(config, args.admin.is_some()).await
}

/// Builds the server, binds the API (if `api`) and every listener, prints the banner,
/// and serves until SIGINT/SIGTERM.
async fn serve(config: Config, api: bool) -> anyhow::Result<ExitCode> {
    let server = Server::build(&config).await.context("starting")?;
    let api_listener = if api {
        match tokio::net::TcpListener::bind(config.server.listen).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                server.close().await;
                return Err(e)
                    .with_context(|| format!("cannot listen on {}", config.server.listen));
            }
        }
    } else {
        None
    };
    let listeners = match server.bind_listeners().await {
        Ok(listeners) => listeners,
        Err(e) => {
            server.close().await;
            return Err(e.into());
        }
    };
    let mut banner = format!("trellis {}", env!("CARGO_PKG_VERSION"));
    if let Some(api) = &api_listener {
        let addr = api.local_addr().context("reading the bound address")?;
        banner.push_str(&format!(" listening on http://{addr}"));
        let components = server.components();
        if !components.is_empty() {
            banner.push_str(&format!(" with {}", components.join(", ")));
        }
        tracing::info!(%addr, data_dir = %config.server.data_dir.display(), "ready");
    }
    for l in &listeners {
        let addr = l.local_addr().context("reading a listener's address")?;
        banner.push_str(&format!("; proxy {} on http://{addr}", l.name()));
        tracing::info!(listener = l.name(), %addr, "proxy ready");
    }
    let shutdown = match shutdown_signal() {
        Ok(shutdown) => shutdown,
        Err(e) => {
            server.close().await;
            return Err(e);
        }
    };
    println!("{banner}");
    server
        .run(api_listener, listeners, shutdown)
        .await
        .context("serving HTTP")?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// A future resolving on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed
/// now, before the banner tells anyone we are up, so an early signal is not lost.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => tracing::info!("received SIGINT"),
                _ = terminate.recv() => tracing::info!("received SIGTERM"),
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("received Ctrl-C");
            } else {
                std::future::pending::<()>().await;
            }
        })
    }
}
