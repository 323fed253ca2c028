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
        /// Set a plugin's setting, over the configuration (repeatable):
        /// `--setting mls-gateway.requests_per_hour=100`.
        #[arg(long = "setting", value_name = "PLUGIN.KEY=VALUE", value_parser = parse_plugin_setting)]
        settings: Vec<(String, String, String)>,
    },
    /// Inspect plugin components.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Write every stored event and tombstone as JSON lines: from the
    /// relay serving the data directory (through its operator socket), or
    /// from the store itself when no relay is serving it.
    Export {
        /// Data directory, overriding the configuration.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Output file; `-` or nothing: standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Store events and tombstones from JSON lines: into the relay serving
    /// the data directory, through its write path (every check, plugins'
    /// hooks), or straight into the store (ids and signatures checked) when
    /// no relay is serving it.
    Import {
        /// Data directory, overriding the configuration.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Input file of JSON lines; `-`: standard input.
        input: PathBuf,
    },
    /// Call a management method (NIP-86, and the plugin methods) on the
    /// relay serving the data directory, through its operator socket: no
    /// keys needed, only access to the socket file.
    Admin {
        /// The method, e.g. `banpubkey`, `listplugins`, `supportedmethods`.
        method: String,
        /// Its parameters, as a JSON array.
        #[arg(default_value = "[]")]
        params: String,
        /// Data directory, overriding the configuration.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Reconcile with another relay over NIP-77 and move the difference,
    /// like `strfry sync`. Runs inside the relay serving the data directory
    /// (through its operator socket), or in this process when none is.
    Sync {
        /// The other relay (ws:// or wss://).
        url: String,
        /// The events to reconcile, as a NIP-01 filter.
        #[arg(long, default_value = "{}")]
        filter: String,
        /// down: fetch what the other relay has; up: send what it lacks.
        #[arg(long, value_enum, default_value = "down")]
        dir: wasm_relay::sync::Direction,
        /// Data directory, overriding the configuration.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Load a component as the relay would and print its info() and WIT version.
    Check {
        /// The component (.wasm).
        file: PathBuf,
        /// Settings to check against what the plugin declares (repeatable).
        #[arg(long = "setting", value_name = "NAME=VALUE", value_parser = parse_setting)]
        settings: Vec<(String, String)>,
    },
    /// Load every plugin in the configuration and print one line for each.
    List,
    /// Run a plugin's hooks against a fixture file (events, REQs, ticks and
    /// the answers expected), without a relay: one line per case, and a
    /// failing exit status if any answer differs. The format is in the
    /// plugin authors' guide.
    Test {
        /// The component (.wasm).
        file: PathBuf,
        /// The fixture file (JSON).
        fixtures: PathBuf,
        /// Settings, over the fixture file's (repeatable).
        #[arg(long = "setting", value_name = "NAME=VALUE", value_parser = parse_setting)]
        settings: Vec<(String, String)>,
    },
    /// Write a new plugin project (`NAME/`) that builds with one command.
    New {
        /// The plugin's name (a-z, 0-9, '-', '_'), also its folder's.
        name: String,
        #[arg(long, value_enum, default_value = "rust")]
        lang: wasm_relay::plugin_template::Language,
        /// Where the project folder goes.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// For Rust: the SDK (`plugins/sdk` of a wasm-relay checkout); by
        /// default the one this binary was built beside.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

/// Every connection, event and query allocates many short-lived buffers
/// (frames, parsed events, index keys, sled node copies), from many threads.
/// mimalloc serves them from per-thread free lists; glibc's malloc spent a
/// fifth of the relay's CPU on them under ingest (`make bench ONLY=peer`
/// figures in the README).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::load(cli.config.as_deref())?;
    let runtime = || tokio::runtime::Builder::new_multi_thread().enable_all().build();
    match cli.command.unwrap_or(Command::Serve { bind: None, data_dir: None, plugins: vec![], settings: vec![] }) {
        Command::Plugin(PluginCommand::Check { file, settings }) => {
            let plugin = plugin_from_file(&file, settings);
            let report = runtime()?
                .block_on(wasm_relay::tools::check_plugin(&plugin))
                .with_context(|| format!("{} cannot be loaded", file.display()))?;
            print!("{report}");
            Ok(())
        }
        Command::Plugin(PluginCommand::Test { file, fixtures, settings }) => {
            use wasm_relay::plugin_fixtures;
            // What the plugin prints, and why a call failed, on standard error.
            init_logging(&config);
            let plugin = plugin_from_file(&file, settings);
            let cases = plugin_fixtures::read(&fixtures)?;
            let outcomes = runtime()?
                .block_on(plugin_fixtures::run(plugin, &cases))
                .with_context(|| format!("{} cannot be loaded", file.display()))?;
            let failed = outcomes.iter().filter(|o| !o.passed()).count();
            for o in &outcomes {
                if o.passed() {
                    println!("ok      {}", o.name);
                } else {
                    println!("FAILED  {}\n        expected: {}\n        got:      {}", o.name, o.expected, o.got);
                }
            }
            println!("{} passed, {failed} failed", outcomes.len() - failed);
            if failed > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Plugin(PluginCommand::New { name, lang, dir, sdk }) => {
            use wasm_relay::plugin_template;
            let sdk = sdk.or_else(plugin_template::default_sdk);
            let project = plugin_template::write(&name, lang, &dir, sdk.as_deref())?;
            println!("wrote {}", project.display());
            let build = lang.build_command().replace("{crate}", &name.replace('-', "_"));
            println!("build it: cd {} && {build}", project.display());
            Ok(())
        }
        Command::Plugin(PluginCommand::List) => {
            let rt = runtime()?;
            if config.plugins.is_empty() {
                println!("no plugins configured");
            }
            let mut failed = 0;
            for p in &config.plugins {
                match rt.block_on(wasm_relay::tools::check_plugin(p)) {
                    Ok(r) => println!(
                        "{}\t{}\t{} {}\twit@{}\tsha256:{}",
                        p.name,
                        p.path.display(),
                        r.info.name,
                        r.info.version,
                        r.wit_version,
                        &r.sha256[..16]
                    ),
                    Err(e) => {
                        failed += 1;
                        println!("{}\t{}\tFAILED: {e:#}", p.name, p.path.display());
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} plugin(s) cannot be loaded");
            }
            Ok(())
        }
        Command::Export { data_dir, output } => {
            let dir = data_dir.unwrap_or(config.storage.data_dir);
            let mut out = wasm_relay::tools::output(output.as_ref())?;
            if let Some(socket) = runtime()?.block_on(wasm_relay::operator_socket::connect(&dir)) {
                return online::export(socket, &mut out, &dir);
            }
            // A replica's export starts with its position in the shared log.
            let position = wasm_relay::replication::snapshot::log_position(&dir);
            let (n, tombstones) = wasm_relay::tools::export(&dir, position, &mut out)?;
            eprintln!("exported {n} events and {tombstones} tombstones from {}", dir.display());
            Ok(())
        }
        Command::Import { data_dir, input } => {
            let dir = data_dir.unwrap_or(config.storage.data_dir);
            if let Some(socket) = runtime()?.block_on(wasm_relay::operator_socket::connect(&dir)) {
                return online::import(socket, &input, &dir);
            }
            // A replica's import goes to the shared log too, so every
            // replica receives the events (not tombstones: those stay here).
            let summary = if config.replication.enabled {
                let runtime = tokio::runtime::Runtime::new()?;
                let _entered = runtime.enter();
                let firestore = runtime
                    .block_on(wasm_relay::firestore::Firestore::connect(&config.firestore))
                    .context("connecting to Firestore")?;
                let replicator = wasm_relay::replication::Replicator::new(
                    firestore,
                    config.server.public_url.clone(),
                    &dir,
                    &config.replication,
                );
                let publish = |events: &[std::sync::Arc<wasm_relay::event::AcceptedEvent>]| -> anyhow::Result<()> {
                    let outcomes = runtime.block_on(replicator.publish_events(events));
                    match outcomes.into_iter().find_map(Result::err) {
                        Some(e) => anyhow::bail!("{e}; the import stopped (running it again is harmless)"),
                        None => Ok(()),
                    }
                };
                wasm_relay::tools::import(&dir, &input, Some(&publish))?
            } else {
                wasm_relay::tools::import(&dir, &input, None)?
            };
            eprintln!("import into {}: {summary}", dir.display());
            Ok(())
        }
        Command::Admin { method, params, data_dir } => {
            let params: serde_json::Value =
                serde_json::from_str(&params).context("the parameters are not JSON (a JSON array)")?;
            let dir = data_dir.unwrap_or(config.storage.data_dir);
            let rt = runtime()?;
            let Some(socket) = rt.block_on(wasm_relay::operator_socket::connect(&dir)) else {
                anyhow::bail!(
                    "no relay is serving {} (its operator socket {} does not answer)",
                    dir.display(),
                    wasm_relay::operator_socket::path(&dir).display()
                );
            };
            let request = serde_json::json!({"method": method, "params": params});
            let result = rt.block_on(wasm_relay::operator_socket::call(socket, request, None, &mut |_| Ok(())))?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(())
        }
        Command::Sync { url, filter, dir, data_dir } => {
            let filter: serde_json::Value =
                serde_json::from_str(&filter).context("--filter is not JSON (a NIP-01 filter object)")?;
            if let Some(dir) = data_dir {
                config.storage.data_dir = dir;
            }
            let rt = runtime()?;
            if let Some(socket) = rt.block_on(wasm_relay::operator_socket::connect(&config.storage.data_dir)) {
                return online::sync(socket, &url, filter, dir);
            }
            // No relay serves this data directory: open it here, with its
            // plugins, and sync through the same write path.
            config.validate()?;
            init_logging(&config);
            rt.block_on(async {
                let relay = wasm_relay::relay::Relay::open(config).await?;
                let bar = online::sync_bar();
                let mut report = |r: &wasm_relay::sync::SyncReport| online::show_sync(&bar, r);
                let done = wasm_relay::sync::run(&relay, &url, &filter, dir, &mut report).await;
                bar.finish_and_clear();
                let done = done?;
                eprintln!("{}", online::sync_summary(&done));
                anyhow::Ok(())
            })
        }
        Command::Serve { bind, data_dir, plugins, settings } => {
            for (name, path) in plugins {
                config.plugins.push(PluginConfig::new(name, path));
            }
            for (name, key, value) in settings {
                let Some(plugin) = config.plugins.iter_mut().find(|p| p.name == name) else {
                    let known: Vec<&str> = config.plugins.iter().map(|p| p.name.as_str()).collect();
                    anyhow::bail!(
                        "--setting {name}.{key}: no plugin named '{name}' is configured (configured: {})",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    );
                };
                plugin.settings.insert(key, wasm_relay::config::SettingValue::Text(value));
            }
            config.validate()?;
            if let Some(bind) = bind {
                config.server.bind = bind;
            }
            if let Some(dir) = data_dir {
                config.storage.data_dir = dir;
            }
            init_logging(&config);
            runtime()?.block_on(serve(config))
        }
    }
}

/// The CLI's side of the operator socket: a relay is serving the data
/// directory, so the work happens there.
mod online {
    use std::io::Write;
    use std::path::Path;

    use anyhow::Context;
    use indicatif::{ProgressBar, ProgressStyle};
    use serde_json::json;
    use tokio::net::UnixStream;
    use wasm_relay::operator_socket::call;
    use wasm_relay::sync::{Direction, SyncReport};

    fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
        Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
    }

    fn spinner(what: &str) -> ProgressBar {
        let bar = ProgressBar::new_spinner()
            .with_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("static template"));
        bar.set_message(what.to_owned());
        bar
    }

    pub fn export(socket: UnixStream, out: &mut dyn Write, dir: &Path) -> anyhow::Result<()> {
        let bar = spinner("exporting from the running relay");
        let mut lines = 0u64;
        let result = runtime()?.block_on(call(socket, json!({"method": "export"}), None, &mut |line| {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
            lines += 1;
            if lines.is_multiple_of(10_000) {
                bar.set_message(format!("{lines} lines exported from the running relay"));
            }
            Ok(())
        }))?;
        out.flush()?;
        bar.finish_and_clear();
        eprintln!(
            "exported {} events and {} tombstones from the relay serving {}",
            result["events"],
            result["tombstones"],
            dir.display()
        );
        Ok(())
    }

    pub fn import(socket: UnixStream, input: &Path, dir: &Path) -> anyhow::Result<()> {
        let rt = runtime()?;
        let (body, len): (Box<dyn tokio::io::AsyncRead + Unpin + Send>, Option<u64>) = if input == Path::new("-") {
            (Box::new(tokio::io::stdin()), None)
        } else {
            let file =
                rt.block_on(tokio::fs::File::open(input)).with_context(|| format!("opening {}", input.display()))?;
            let len = rt.block_on(file.metadata()).ok().map(|m| m.len());
            (Box::new(file), len)
        };
        let bar = spinner(&format!(
            "importing {} into the running relay",
            len.map_or("standard input".into(), |n| format!("{n} bytes"))
        ));
        let result = rt.block_on(call(socket, json!({"method": "import"}), Some(body), &mut |_| Ok(())));
        bar.finish_and_clear();
        let result: wasm_relay::operator_socket::OnlineImport = serde_json::from_value(result?)?;
        eprintln!("import into the relay serving {}: {result}", dir.display());
        Ok(())
    }

    pub fn sync_bar() -> ProgressBar {
        ProgressBar::new(0).with_style(
            ProgressStyle::with_template("{msg:>30} {bar:40} {pos}/{len} ({elapsed})").expect("static template"),
        )
    }

    pub fn show_sync(bar: &ProgressBar, r: &SyncReport) {
        match r.phase.as_str() {
            "reconciling" => {
                bar.set_length(r.local_events);
                bar.set_position(0);
                bar.set_message(format!("reconciling ({} rounds)", r.rounds));
            }
            "fetching" => {
                bar.set_length(r.need);
                bar.set_position(r.fetched);
                bar.set_message("fetching");
            }
            "sending" => {
                bar.set_length(r.have);
                bar.set_position(r.sent);
                bar.set_message("sending");
            }
            _ => {}
        }
    }

    pub fn sync_summary(r: &SyncReport) -> String {
        let authenticated =
            r.authenticated_as.as_ref().map_or(String::new(), |key| format!(" (authenticated as {key})"));
        format!(
            "sync{authenticated}: {} local events; {} rounds, {} bytes of negentropy; {} only there, {} only here; \
             fetched {} ({} bytes; stored {}, already present {}, refused {} {:?}); sent {} (accepted {}, refused {})",
            r.local_events,
            r.rounds,
            r.negentropy_bytes,
            r.need,
            r.have,
            r.fetched,
            r.fetched_bytes,
            r.stored,
            r.duplicates,
            r.refused,
            r.refusals,
            r.sent,
            r.accepted,
            r.rejected
        )
    }

    pub fn sync(socket: UnixStream, url: &str, filter: serde_json::Value, dir: Direction) -> anyhow::Result<()> {
        let bar = sync_bar();
        let request = json!({"method": "sync", "params": [url, filter, dir]});
        let result = runtime()?.block_on(call(socket, request, None, &mut |line| {
            if let Ok(serde_json::Value::Array(parts)) = serde_json::from_str::<serde_json::Value>(line)
                && parts.first().and_then(|p| p.as_str()) == Some("progress")
                && let Some(report) = parts.get(1).and_then(|p| serde_json::from_value::<SyncReport>(p.clone()).ok())
            {
                show_sync(&bar, &report);
            }
            Ok(())
        }));
        bar.finish_and_clear();
        let report: SyncReport = serde_json::from_value(result?)?;
        eprintln!("{}", sync_summary(&report));
        Ok(())
    }
}

fn parse_setting(s: &str) -> Result<(String, String), String> {
    let (name, value) = s.split_once('=').ok_or("expected NAME=VALUE")?;
    Ok((name.to_string(), value.to_string()))
}

/// A plugin given by its file alone (`plugin check`, `plugin test`): named
/// after the file, as an operator would likely configure it.
fn plugin_from_file(file: &std::path::Path, settings: Vec<(String, String)>) -> PluginConfig {
    let name = file.file_stem().map_or("plugin".into(), |s| s.to_string_lossy().replace('_', "-"));
    let mut plugin = PluginConfig::new(name, file);
    for (k, v) in settings {
        plugin.settings.insert(k, wasm_relay::config::SettingValue::Text(v));
    }
    plugin
}

/// `PLUGIN.KEY=VALUE`: plugin names hold no dot, setting names may.
fn parse_plugin_setting(s: &str) -> Result<(String, String, String), String> {
    let (target, value) = s.split_once('=').ok_or("expected PLUGIN.KEY=VALUE")?;
    let (plugin, key) = target.split_once('.').ok_or("expected PLUGIN.KEY=VALUE")?;
    Ok((plugin.to_string(), key.to_string(), value.to_string()))
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
    let snapshot = &config.replication.snapshot_url;
    if config.replication.enabled
        && !snapshot.is_empty()
        && wasm_relay::replication::snapshot::is_new_replica(&data_dir)
    {
        wasm_relay::replication::snapshot::join_from_snapshot(snapshot, &data_dir)
            .await
            .with_context(|| format!("joining the replicas from the snapshot at {snapshot}"))?;
    }
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
