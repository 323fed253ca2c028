//! The MLS gateway: makes the relay a correct and safe home for MLS over
//! Nostr (Marmot).
//!
//! - KeyPackages (kinds 443 and 30443) are checked on arrival and indexed in
//!   the plugin's key-value store ([`index`]); they are served only through
//!   `process-req` ([`delivery`]), and only to filters whose `kinds` name
//!   them. An inviter gets at most N per author, newest first, consumed in
//!   the same atomic store operation, so no KeyPackage is ever given to two
//!   requesters; an owner's last KeyPackage is served without being
//!   consumed (last resort). An owner authenticated as itself sees its own
//!   and consumes none.
//! - Kind 444 (a Welcome outside its gift wrap) is refused; kind 445 needs
//!   exactly one 64-hex `h` tag.
//! - `tick` expires KeyPackages and prunes rate-limit counters, a page at a
//!   time.

mod delivery;
mod index;
mod rules;

use wasm_relay_plugin_sdk::*;

pub const KIND_KEY_PACKAGE: u16 = 443;
pub const KIND_KEY_PACKAGE_ADDRESSABLE: u16 = 30443;
pub const KIND_WELCOME: u16 = 444;
pub const KIND_GROUP_MESSAGE: u16 = 445;
pub const KIND_DELETION: u16 = 5;

/// How long a KeyPackage without an `expiration` tag is served: 90 days.
/// Current clients publish none and keep KeyPackages up to about 90 days
/// (mdk rotates 14-21 days before that).
const DEFAULT_TTL_SECONDS: u64 = 90 * 24 * 3600;

/// Operator settings, read once per call.
pub(crate) struct Settings {
    pub per_author: usize,
    pub requests_per_hour: u64,
    pub default_ttl: u64,
    pub max_per_owner: usize,
    pub group_messages_per_minute: u64,
}

impl Settings {
    /// The settings, read once per instance: they cannot change during an
    /// instance's life (a new plugin version gets new instances), so hooks
    /// need not ask the host five times per call.
    pub fn get() -> &'static Self {
        static SETTINGS: std::sync::OnceLock<Settings> = std::sync::OnceLock::new();
        SETTINGS.get_or_init(Self::read)
    }

    fn read() -> Self {
        Self {
            per_author: setting_or("max_keypackages_per_author", 1usize).max(1),
            requests_per_hour: setting_or("requests_per_hour", 10u64),
            default_ttl: setting_or("default_ttl_seconds", DEFAULT_TTL_SECONDS),
            max_per_owner: setting_or("max_keypackages_per_owner", 15usize).max(1),
            group_messages_per_minute: setting_or("group_messages_per_minute", 0u64),
        }
    }
}

struct MlsGateway;

impl Plugin for MlsGateway {
    fn info() -> PluginInfo {
        let spec = |name: &str, default: &str, description: &str| SettingSpec {
            name: name.into(),
            default_value: default.into(),
            description: description.into(),
        };
        PluginInfo {
            name: "mls-gateway".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            managed_kinds: vec![KIND_KEY_PACKAGE, KIND_KEY_PACKAGE_ADDRESSABLE],
            event_kinds: Some(vec![
                KIND_KEY_PACKAGE,
                KIND_KEY_PACKAGE_ADDRESSABLE,
                KIND_WELCOME,
                KIND_GROUP_MESSAGE,
                KIND_DELETION,
            ]),
            req_kinds: Some(vec![]),
            tick_interval_seconds: Some(60),
            settings: vec![
                spec("max_keypackages_per_author", "1", "KeyPackages handed out per author per request"),
                spec("requests_per_hour", "10", "KeyPackage requests per (requester, author) per hour; 0: unlimited"),
                spec(
                    "default_ttl_seconds",
                    &DEFAULT_TTL_SECONDS.to_string(),
                    "Lifetime of a KeyPackage without an expiration tag (clients rotate within about 90 days)",
                ),
                spec("max_keypackages_per_owner", "15", "KeyPackages kept per owner; the oldest are dropped"),
                spec(
                    "group_messages_per_minute",
                    "0",
                    "Kind 445 events accepted per group (h tag) per minute; 0: unlimited",
                ),
            ],
        }
    }

    fn on_event(ctx: RequestContext, event: Event) -> Decision {
        let settings = Settings::get();
        let now = host::now();
        let result = match event.kind {
            KIND_KEY_PACKAGE | KIND_KEY_PACKAGE_ADDRESSABLE => {
                rules::check_key_package(&event, now).and_then(|kp| index::add(&event, kp, settings, now))
            }
            KIND_WELCOME => Err(refusal(
                RefusalKind::Blocked,
                "kind 444 Welcomes must travel inside a NIP-59 gift wrap (kind 1059) addressed to the new member, never on their own",
            )),
            // Events from other replicas arrive as `replica`: their origin applied the rate.
            KIND_GROUP_MESSAGE => rules::check_group_message(&event, settings, now, ctx.remote_addr == "replica"),
            KIND_DELETION => index::apply_deletion(&event),
            _ => Ok(()),
        };
        match result {
            Ok(()) => accept(),
            Err(r) => {
                host::count(&format!("refused_{}", r.counter), 1);
                Decision::Reject(Refusal { kind: r.kind, message: r.message })
            }
        }
    }

    fn process_req(ctx: RequestContext, filters: Vec<Filter>) -> ReqResult {
        delivery::answer(&ctx, &filters, Settings::get(), host::now)
    }

    fn tick(now: u64) {
        index::housekeeping(now);
    }
}

/// A refusal with the counter it is recorded under.
pub(crate) struct Refused {
    pub kind: RefusalKind,
    pub message: String,
    pub counter: &'static str,
}

pub(crate) fn refusal(kind: RefusalKind, message: &str) -> Refused {
    Refused { kind, message: message.into(), counter: "other" }
}

export_plugin!(MlsGateway);
