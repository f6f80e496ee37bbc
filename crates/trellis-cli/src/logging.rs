//! Log output: human-readable or JSON lines on stderr, each carrying the fields of
//! the spans it happened in (request id, trace id, route).

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;
use trellis_core::config::LogFormat;

/// Parses a `RUST_LOG`-style filter.
pub(crate) fn filter(directives: &str) -> Result<EnvFilter, String> {
    EnvFilter::builder()
        .with_regex(false)
        .parse(directives)
        .map_err(|e| format!("invalid log filter {directives:?}: {e}"))
}

/// Installs the global subscriber.
pub(crate) fn init(format: LogFormat, directives: &str) -> Result<(), String> {
    let filter = filter(directives)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_span_events(FmtSpan::NONE)
        .with_target(true);
    let result = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .try_init(),
    };
    result.map_err(|e| e.to_string())
}
