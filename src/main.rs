//! The `chatgate` binary: flags → config → logs → `Application` → run until a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use chatgate::config::Overrides;
use chatgate::{Application, Config};
use clap::Parser;
use toml::Value;

/// mimalloc instead of the system allocator: the message path allocates and frees many
/// small buffers across threads, where glibc malloc spent ~15% of the server's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A hardened real-time chat gateway on Redis.
///
/// Configuration is layered: built-in defaults < config/<environment>.toml < --config FILE
/// < CHATGATE_<SECTION>__<KEY> environment variables (and REDIS_URL, REDIS_HOST, REDIS_PORT,
/// REDIS_DB, API_HOST, API_PORT) < these flags. See docs/configuration.md.
#[derive(Debug, Parser)]
#[command(name = "chatgate", version, about, long_about)]
struct Cli {
    /// Development mode: authentication off, CORS open, readable logs, and an in-memory
    /// store when no Redis is configured. Never use it in production.
    #[arg(long)]
    dev: bool,
    /// Environment whose file (<config-dir>/<environment>.toml) is layered in
    /// [default: development with --dev, production otherwise].
    #[arg(long, env = "CHATGATE_ENVIRONMENT")]
    environment: Option<String>,
    /// Directory holding <environment>.toml files.
    #[arg(long, env = "CHATGATE_CONFIG_DIR", default_value = "config")]
    config_dir: PathBuf,
    /// An extra TOML file, layered after the environment file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen address (server.host).
    #[arg(long)]
    host: Option<String>,
    /// Listen port (server.port).
    #[arg(long)]
    port: Option<u16>,
    /// Redis URL (redis.url), e.g. redis://127.0.0.1:6379/0.
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
    /// Load and validate the configuration, print a summary, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut flags = Vec::new();
    if let Some(host) = &cli.host {
        flags.push(("server", "host", Value::String(host.clone())));
    }
    if let Some(port) = cli.port {
        flags.push(("server", "port", Value::Integer(port.into())));
    }
    if let Some(url) = &cli.redis_url {
        flags.push(("redis", "url", Value::String(url.clone())));
    }
    let overrides = Overrides {
        dev: cli.dev,
        environment: cli.environment.clone(),
        config_dir: Some(cli.config_dir.clone()),
        config_file: cli.config.clone(),
        vars: std::env::vars().collect(),
        flags,
    };
    let config = match Config::load(&overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("chatgate: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!(
            "configuration OK (environment {}, store {}, redis {})",
            config.environment,
            if config.uses_redis() {
                "redis"
            } else {
                "memory"
            },
            if config.redis.is_configured() {
                config.redis.describe()
            } else {
                "none".to_string()
            }
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("chatgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    chatgate::install_tls_provider();
    let telemetry = match chatgate::telemetry::init(&config, &runtime) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("chatgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    raise_fd_limit();
    if config.dev {
        tracing::warn!(
            "DEVELOPMENT MODE: authentication is OFF, CORS allows any origin, anyone can post \
             as anyone and delete anything. Never expose this to a network you do not trust."
        );
    }
    tracing::info!(
        instance = %config.instance_id,
        traces = telemetry.tracing(),
        "starting"
    );
    let status = runtime.block_on(async move {
        let app = match Application::build(config).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!(error = %e, "startup failed");
                return ExitCode::FAILURE;
            }
        };
        let token = app.shutdown_token();
        // The signal listener lives as long as the process; nothing waits for it.
        #[allow(clippy::disallowed_methods)]
        tokio::spawn(chatgate::shutdown::on_signal(token));
        match app.run_until_stopped().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    });
    // The last spans are flushed while the runtime still runs (a gRPC exporter's
    // connection lives on it), from a blocking thread (the HTTP exporter's client is a
    // blocking one).
    runtime.block_on(async move {
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    });
    status
}

/// Every WebSocket is a file descriptor, and many container runtimes start processes with
/// a soft limit of 1024. Raise the soft limit to the hard limit, as Go programs do.
fn raise_fd_limit() {
    #[cfg(unix)]
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open file limit"),
    }
}
