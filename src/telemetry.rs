//! Logging: `tracing` to stderr, filtered by `KLUIS_LOG` (default `info`), as text or JSON
//! (`KLUIS_LOG_FORMAT=json`). Log lines carry ids, callers, methods and field paths — never values.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls do nothing.
pub fn init() {
    let filter = EnvFilter::try_from_env("KLUIS_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,h2=warn"));
    let json = std::env::var("KLUIS_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
