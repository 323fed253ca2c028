//! `wasm-relay plugin test FILE FIXTURES`: runs a plugin's hooks against a
//! fixture file, without a relay or a client, and says which answers differ
//! from the expected ones. The plugin is loaded exactly as the relay loads
//! it (same runtime, limits and imports), with a scratch key-value store
//! and a scratch event store, where every event the plugin accepts is
//! stored, so later cases can serve it.
//!
//! A fixture file is JSON:
//!
//! ```json
//! { "settings": { "allowed-kinds": "1,7" },
//!   "cases": [
//!     { "name": "a note is accepted", "event": { "kind": 1, "content": "hi" }, "expect": "accept" },
//!     { "name": "a DM is refused", "event": { "kind": 4 }, "expect": "blocked: kind 4 is not accepted by this relay" },
//!     { "name": "reads pass", "req": [{ "kinds": [1] }], "expect": "served 0" },
//!     { "name": "housekeeping", "tick": 1700000000, "expect": "ok" } ] }
//! ```
//!
//! An `event` needs only `kind`; `content` (""), `tags` ([]) and
//! `created_at` (now) have defaults, and the runner signs it with a fresh key
//! (or `secret_key`, 64 hex characters). A complete signed event is used as
//! it is. `expect` is the `OK` text (`accept`, or `prefix: message`; a bare
//! `prefix:` matches any message with that prefix), for a `req` either the
//! `CLOSED` text or `served N` (events the plugin served: its `add-events`,
//! or stored events its `filter-query` named that match the filters), for a
//! `tick` `ok`. Cases run in order against the same plugin state.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;

use crate::config::{PluginConfig, SettingValue};
use crate::event::AcceptedEvent;
use crate::fanout::Fanout;
use crate::filter::{Filter, FilterLimits};
use crate::metadata::{MetadataStore, SledMetadataStore};
use crate::metrics::Metrics;
use crate::plugin::{Caller, PluginHost, PluginHostSetup, ReadPurpose};
use crate::refusal::Refusal;
use crate::store::{EventStore, ReadAccess, SledEventStore};

/// A fixture file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixtures {
    /// Settings for the plugin, as `[plugins.settings]` would give them.
    #[serde(default)]
    pub settings: serde_json::Map<String, serde_json::Value>,
    pub cases: Vec<Case>,
}

/// One call and the answer expected from it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// An EVENT: calls `on-event`.
    #[serde(default)]
    pub event: Option<serde_json::Value>,
    /// Signs `event` with this key (hex) instead of a fresh one.
    #[serde(default)]
    pub secret_key: Option<String>,
    /// A REQ's filters: calls `process-req`.
    #[serde(default)]
    pub req: Option<Vec<serde_json::Value>>,
    /// Calls `tick` with this time.
    #[serde(default)]
    pub tick: Option<u64>,
    pub expect: String,
}

/// What one case gave.
#[derive(Debug)]
pub struct CaseOutcome {
    pub name: String,
    pub expected: String,
    pub got: String,
}

impl CaseOutcome {
    pub fn passed(&self) -> bool {
        self.got == self.expected || (self.expected.ends_with(':') && self.got.starts_with(&self.expected))
    }
}

/// Reads a fixture file.
pub fn read(path: &std::path::Path) -> anyhow::Result<Fixtures> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a fixture file", path.display()))
}

/// Loads the plugin of `config` (its settings overridden by the fixtures')
/// and runs every case in order.
pub async fn run(mut config: PluginConfig, fixtures: &Fixtures) -> anyhow::Result<Vec<CaseOutcome>> {
    for (key, value) in &fixtures.settings {
        let value = match value {
            serde_json::Value::String(s) => SettingValue::Text(s.clone()),
            serde_json::Value::Bool(b) => SettingValue::Bool(*b),
            serde_json::Value::Number(n) if n.is_i64() => SettingValue::Integer(n.as_i64().unwrap_or_default()),
            serde_json::Value::Number(n) => SettingValue::Float(n.as_f64().unwrap_or_default()),
            other => anyhow::bail!("setting {key}: {other} is not a string, number or boolean"),
        };
        config.settings.entry(key.clone()).or_insert(value);
    }
    let scratch = tempfile::tempdir().context("creating a scratch folder")?;
    let metadata: Arc<dyn MetadataStore> = Arc::new(SledMetadataStore::temporary()?);
    let events: Arc<dyn EventStore> = Arc::new(SledEventStore::open(scratch.path(), 8 << 20)?);
    let configs = [config];
    let host = PluginHost::start(PluginHostSetup {
        configs: &configs,
        cache_dir: scratch.path().join("cache"),
        cache_max_bytes: u64::MAX,
        metadata,
        events: events.clone(),
        fanout: Arc::new(Fanout::new(true)),
        max_results: 5000,
        metrics: Arc::new(Metrics::new()),
    })
    .await?;
    let caller = Caller::new(1, SocketAddr::from(([127, 0, 0, 1], 40000)));
    let mut outcomes = Vec::new();
    for case in &fixtures.cases {
        let got = run_case(&host, &events, &caller, case).await.unwrap_or_else(|e| format!("fixture error: {e:#}"));
        outcomes.push(CaseOutcome { name: case.name.clone(), expected: case.expect.clone(), got });
    }
    Ok(outcomes)
}

fn wire_text(refusal: &Refusal) -> String {
    format!("{}: {}", refusal.kind.prefix(), refusal.message)
}

async fn run_case(
    host: &PluginHost,
    events: &Arc<dyn EventStore>,
    caller: &Caller,
    case: &Case,
) -> anyhow::Result<String> {
    match (&case.event, &case.req, case.tick) {
        (Some(event), None, None) => {
            let event = fixture_event(event, case.secret_key.as_deref())?;
            Ok(match host.on_event(caller, &event).await {
                Ok(()) => {
                    // Stored as the relay would, so later cases can serve it.
                    events.write_batch(&[Arc::new(AcceptedEvent::new(event))]).context("storing the event")?;
                    "accept".into()
                }
                Err(refusal) => wire_text(&refusal),
            })
        }
        (None, Some(filters), None) => {
            let filters = filters
                .iter()
                .map(|f| Filter::parse(f, FilterLimits { max_values: 5000 }).map_err(|e| anyhow::anyhow!("{e}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let access = ReadAccess::trusted(crate::event::unix_now());
            Ok(match host.process_req(caller, "fixture", ReadPurpose::Req, &filters, &access).await {
                Ok(served) => format!("served {}", served.len()),
                Err(refusal) => wire_text(&refusal),
            })
        }
        (None, None, Some(now)) => Ok(match host.tick_once(now).await {
            Ok(()) => "ok".into(),
            Err(failure) => format!("failed: {failure}"),
        }),
        _ => anyhow::bail!("a case has exactly one of `event`, `req` and `tick`"),
    }
}

/// The event a case describes: used as it is when signed, otherwise built
/// from its fields and signed.
fn fixture_event(value: &serde_json::Value, secret_key: Option<&str>) -> anyhow::Result<nostr::event::Event> {
    use nostr::event::{EventBuilder, Kind, Tag};
    use nostr::prelude::FinalizeEvent;
    if value.get("sig").is_some() {
        let event: nostr::event::Event = serde_json::from_value(value.clone()).context("reading a signed event")?;
        event.verify().context("the fixture's signed event does not verify")?;
        return Ok(event);
    }
    let kind = value.get("kind").and_then(|k| k.as_u64()).context("an event needs a `kind`")?;
    let kind = u16::try_from(kind).context("`kind` is 0 to 65535")?;
    let content = value.get("content").and_then(|c| c.as_str()).unwrap_or_default();
    let tags: Vec<Vec<String>> =
        serde_json::from_value(value.get("tags").cloned().unwrap_or(serde_json::json!([]))).context("`tags`")?;
    let tags = tags.into_iter().map(|t| Tag::parse(t).context("a tag")).collect::<anyhow::Result<Vec<_>>>()?;
    let keys = match secret_key {
        Some(hex) => nostr::key::Keys::parse(hex).context("`secret_key`")?,
        None => nostr::key::Keys::generate(),
    };
    let mut builder = EventBuilder::new(Kind::from(kind), content).tags(tags);
    if let Some(at) = value.get("created_at").and_then(|c| c.as_u64()) {
        builder = builder.custom_created_at(nostr::types::Timestamp::from(at));
    }
    builder.finalize(&keys).context("signing the fixture's event")
}
