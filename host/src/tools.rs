//! Offline operator tools behind the CLI subcommands: checking plugin
//! components, and exporting or importing the event store as JSON lines.
//! Export and import open the store directly, so the relay must be stopped
//! (sled holds a lock on its folder).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use nostr::event::Event;

use crate::config::PluginConfig;
use crate::event::{AcceptedEvent, unix_now};
use crate::metadata::{MetadataStore, SledMetadataStore};
use crate::metrics::Metrics;
use crate::plugin::bindings::types as wit;
use crate::plugin::{PluginCounters, PluginRuntime};
use crate::store::{EventStore, SledEventStore, Tombstone, WriteOutcome};

/// What `plugin check` reports about a component.
pub struct PluginReport {
    pub info: wit::PluginInfo,
    pub wit_version: String,
    pub sha256: String,
}

/// Loads a plugin the way the relay would (compile, WIT version, link,
/// `info()`, settings), against throwaway stores.
pub async fn check_plugin(config: &PluginConfig) -> anyhow::Result<PluginReport> {
    let scratch = tempfile::tempdir().context("creating a scratch folder")?;
    let runtime = PluginRuntime::new(scratch.path().join("cache"))?;
    let metadata: Arc<dyn MetadataStore> = Arc::new(SledMetadataStore::temporary()?);
    let events: Arc<dyn EventStore> = Arc::new(SledEventStore::open(scratch.path(), 8 << 20)?);
    let counters = Arc::new(PluginCounters::new(&config.name, Metrics::new().plugin_counter.clone()));
    let loaded = runtime.load(config, metadata, events, counters).await?;
    Ok(PluginReport { info: loaded.info.clone(), wit_version: loaded.wit_version.clone(), sha256: loaded.hash.clone() })
}

impl std::fmt::Display for PluginReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.info;
        let kinds = |k: &Option<Vec<u16>>| k.as_ref().map_or("all".to_string(), |k| format!("{k:?}"));
        writeln!(f, "name:          {}", i.name)?;
        writeln!(f, "version:       {}", i.version)?;
        writeln!(f, "wit:           nostr-relay:plugin@{}", self.wit_version)?;
        writeln!(f, "sha256:        {}", self.sha256)?;
        writeln!(f, "managed kinds: {:?}", i.managed_kinds)?;
        writeln!(f, "event kinds:   {}", kinds(&i.event_kinds))?;
        writeln!(f, "req kinds:     {}", kinds(&i.req_kinds))?;
        match i.tick_interval_seconds {
            Some(s) => writeln!(f, "tick:          every {s} s")?,
            None => writeln!(f, "tick:          none")?,
        }
        if i.settings.is_empty() {
            writeln!(f, "settings:      none")?;
        }
        for s in &i.settings {
            writeln!(f, "setting:       {} = {} ({})", s.name, s.default_value, s.description)?;
        }
        let hooks: Vec<&str> = i.hooks.iter().map(|h| crate::plugin::hook_name(*h)).collect();
        writeln!(f, "hooks:         {}", if hooks.is_empty() { "none".into() } else { hooks.join(", ") })?;
        let capabilities: Vec<String> = i
            .capabilities
            .iter()
            .map(|c| match c {
                wit::Capability::OutboundHttp(hosts) => format!("outbound-http to {}", hosts.join(", ")),
                wit::Capability::Publish => "publish".into(),
            })
            .collect();
        if capabilities.is_empty() {
            writeln!(f, "capabilities:  none asked")?;
        } else {
            writeln!(
                f,
                "capabilities:  {} (asked; the operator grants them in the plugin's `grants`)",
                capabilities.join("; ")
            )?;
        }
        let contribution = &i.relay_info;
        let mut nips = contribution.supported_nips.clone();
        if i.hooks.contains(&wit::Hook::Search) {
            nips.push(50);
        }
        if !nips.is_empty() || !contribution.fields.is_empty() {
            let fields: Vec<&str> = contribution.fields.iter().map(|f| f.name.as_str()).collect();
            writeln!(f, "nip-11 adds:   supported_nips {nips:?}; fields: {}", fields.join(", "))?;
        }
        Ok(())
    }
}

fn open_store(data_dir: &Path) -> anyhow::Result<SledEventStore> {
    SledEventStore::open(data_dir, 64 << 20).with_context(|| {
        format!(
            "opening the event store in {} (is a relay running on it? stop it first: the store allows one process)",
            data_dir.display()
        )
    })
}

fn progress(len: Option<u64>, what: &str) -> ProgressBar {
    let bar = match len {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} ({elapsed})").expect("static template"),
        ),
        None => ProgressBar::new_spinner()
            .with_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("static template")),
    };
    bar.set_message(what.to_owned());
    bar
}

/// Writes every tombstone, then every stored event, as one JSON line each to
/// `out`; returns how many of each. Tombstone lines (`{"tombstone": ...}`)
/// come first, so an import refuses the events they name. A replica's
/// export starts with its position in the shared log
/// (`{"log_position": ...}`, given as `log_position`), so a new replica can
/// start from it (see `replication.snapshot_url`).
pub fn export(
    data_dir: &Path,
    log_position: Option<serde_json::Value>,
    out: &mut dyn Write,
) -> anyhow::Result<(u64, u64)> {
    let store = open_store(data_dir)?;
    if let Some(position) = log_position {
        let line = serde_json::json!({ LOG_POSITION: position }).to_string();
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
    }
    let bar = progress(None, "events exported");
    let mut tombstones = 0u64;
    let mut failed: Option<std::io::Error> = None;
    store.visit_tombstones(&mut |t| {
        if failed.is_none() {
            let line = serde_json::to_string(&t).expect("tombstones serialize");
            failed = out.write_all(line.as_bytes()).and_then(|_| out.write_all(b"\n")).err();
            tombstones += 1;
        }
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    let mut after = None;
    let mut n = 0u64;
    loop {
        let page = store.scan_all(after.as_ref(), 1000)?;
        for json in &page.events {
            out.write_all(json.as_bytes())?;
            out.write_all(b"\n")?;
        }
        n += page.events.len() as u64;
        bar.set_message(format!("{n} events exported"));
        bar.tick();
        after = page.next;
        if after.is_none() {
            break;
        }
    }
    out.flush()?;
    bar.finish_with_message(format!("{n} events exported"));
    Ok((n, tombstones))
}

/// The key of an export's first line when it comes from a replica.
pub const LOG_POSITION: &str = "log_position";

/// What an import did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// The shared-log position the input starts with, if it came from a replica.
    pub log_position: Option<serde_json::Value>,
    pub stored: u64,
    pub duplicates: u64,
    /// Older versions of replaceable events, deleted or vanished events.
    pub skipped: u64,
    /// Lines that are not a valid signed event, or expired events.
    pub invalid: u64,
    /// Deletion and vanish tombstones restored.
    pub tombstones: u64,
}

impl std::fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} stored, {} already present, {} skipped (superseded or deleted), {} invalid, {} tombstones",
            self.stored, self.duplicates, self.skipped, self.invalid, self.tombstones
        )
    }
}

/// Reads JSON lines of events from `input` (or stdin for `-`), checks each
/// id and signature, and stores them with the relay's rules (replaceable,
/// deletions) in batches, each durable before the next.
/// Where imported events also go before they are stored: the shared log of
/// replicas, so the others receive them too. `Err` stops the import (what
/// was imported before stays; importing again is harmless).
pub type PublishImported<'a> = &'a dyn Fn(&[Arc<AcceptedEvent>]) -> anyhow::Result<()>;

pub fn import(data_dir: &Path, input: &Path, shared_log: Option<PublishImported>) -> anyhow::Result<ImportSummary> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let store = open_store(data_dir)?;
    let (reader, len): (Box<dyn BufRead>, Option<u64>) = if input == Path::new("-") {
        (Box::new(std::io::stdin().lock()), None)
    } else {
        let file = std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
        let len = file.metadata().ok().map(|m| m.len());
        (Box::new(std::io::BufReader::new(file)), len)
    };
    let bar = progress(len, "importing");
    let mut summary = ImportSummary::default();
    let mut batch: Vec<Arc<AcceptedEvent>> = Vec::with_capacity(1000);
    let now = unix_now();
    let flush = |batch: &mut Vec<Arc<AcceptedEvent>>, summary: &mut ImportSummary| -> anyhow::Result<()> {
        if let (Some(publish), false) = (shared_log, batch.is_empty()) {
            publish(batch)?;
        }
        for outcome in store.write_batch(batch)? {
            match outcome {
                WriteOutcome::Stored => summary.stored += 1,
                WriteOutcome::Duplicate => summary.duplicates += 1,
                _ => summary.skipped += 1,
            }
        }
        batch.clear();
        Ok(())
    };
    for (number, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading line {}", number + 1))?;
        bar.inc(line.len() as u64 + 1);
        if line.trim().is_empty() {
            continue;
        }
        if number == 0 && line.contains(LOG_POSITION) {
            let header = serde_json::from_str::<serde_json::Value>(&line).ok();
            if let Some(position) = header.as_ref().and_then(|h| h.get(LOG_POSITION)) {
                summary.log_position = Some(position.clone());
                continue;
            }
        }
        if line.contains("\"tombstone\"") {
            match serde_json::from_str::<Tombstone>(&line) {
                Ok(t) => {
                    // Events of the batch so far go first: a tombstone must
                    // not be undone by an earlier line's event, nor miss it.
                    flush(&mut batch, &mut summary)?;
                    store.restore_tombstones(std::slice::from_ref(&t))?;
                    summary.tombstones += 1;
                    continue;
                }
                Err(_) if serde_json::from_str::<Event>(&line).is_ok() => {}
                Err(e) => {
                    bar.suspend(|| eprintln!("line {}: not a tombstone: {e}", number + 1));
                    summary.invalid += 1;
                    continue;
                }
            }
        }
        let event: Event = match serde_json::from_str(&line) {
            Ok(e) => e,
            Err(e) => {
                bar.suspend(|| eprintln!("line {}: not an event: {e}", number + 1));
                summary.invalid += 1;
                continue;
            }
        };
        if !event.verify_id() || !event.verify_signature() {
            bar.suspend(|| eprintln!("line {}: bad id or signature", number + 1));
            summary.invalid += 1;
            continue;
        }
        if crate::event::kind_class(event.kind.as_u16()) == crate::event::KindClass::Ephemeral
            || event.tags.expiration().is_some_and(|t| t.as_secs() <= now)
        {
            summary.invalid += 1;
            continue;
        }
        batch.push(Arc::new(AcceptedEvent::new(event)));
        if batch.len() == 1000 {
            flush(&mut batch, &mut summary)?;
            bar.set_message(summary.to_string());
        }
    }
    flush(&mut batch, &mut summary)?;
    bar.finish_with_message(summary.to_string());
    Ok(summary)
}

/// Where a `--output` of `-` or nothing writes.
pub fn output(path: Option<&PathBuf>) -> anyhow::Result<Box<dyn Write>> {
    match path {
        None => Ok(Box::new(std::io::BufWriter::new(std::io::stdout().lock()))),
        Some(p) if p.as_os_str() == "-" => Ok(Box::new(std::io::BufWriter::new(std::io::stdout().lock()))),
        Some(p) => {
            let file = std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
            Ok(Box::new(std::io::BufWriter::new(file)))
        }
    }
}
