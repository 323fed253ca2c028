//! The `wasm-relay` binary: command-line parsing, logging, and serving.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;
use wasm_relay::config::{LogFormat, PluginConfig};
use wasm_relay::{BoundRelay, Config};

#[derive(Parser)]
#[command(name = "wasm-relay", version, about = "A Nostr relay extended by WebAssembly plugins")]
struct Cli {
    /// TOML configuration file (see relay.example.toml). Without it the
    /// compiled-in defaults apply.
    #[arg(long, global = true, env = "WASM_RELAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the relay (the default).
    Serve {
        /// Listen address, overriding the configuration (e.g. 127.0.0.1:0).
        #[arg(long)]
        bind: Option<std::net::SocketAddr>,
        /// Data directory, overriding the configuration.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Load a plugin with default limits, after those in the configuration
        /// (repeatable): `--plugin mls-gateway=target/plugins/mls_gateway.wasm`.
        #[arg(long = "plugin", value_name = "NAME=PATH", value_parser = parse_plugin)]
        plugins: Vec<(String, PathBuf)>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = Config::load(cli.config.as_deref())?;
    match cli.command.unwrap_or(Command::Serve { bind: None, data_dir: None, plugins: vec![] }) {
        Command::Serve { bind, data_dir, plugins } => {
            for (name, path) in plugins {
                config.plugins.push(PluginConfig::new(name, path));
            }
            config.validate()?;
            if let Some(bind) = bind {
                config.server.bind = bind;
            }
            if let Some(dir) = data_dir {
                config.storage.data_dir = dir;
            }
            init_logging(&config);
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(config))
        }
    }
}

fn parse_plugin(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s.split_once('=').ok_or("expected NAME=PATH")?;
    Ok((name.to_string(), PathBuf::from(path)))
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let data_dir = config.storage.data_dir.clone();
    let relay =
        BoundRelay::bind(config).await.with_context(|| format!("starting the relay on {}", data_dir.display()))?;
    let addr = relay.local_addr()?;
    // Tests and scripts read this line from stdout to learn the port.
    println!("wasm-relay listening on ws://{addr}");
    tracing::info!(%addr, data_dir = %data_dir.display(), "relay started");
    let (stop_tx, stop_rx) = watch::channel(false);
    #[cfg(unix)]
    {
        // SIGHUP reloads every plugin from its file.
        let plugins = relay.relay().plugins.clone();
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading plugins");
                plugins.reload_all().await;
            }
        });
    }
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    relay.serve(stop_rx).await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
