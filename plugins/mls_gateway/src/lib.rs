//! The MLS gateway: makes the relay a correct and safe home for MLS over
//! Nostr (Marmot).
//!
//! - KeyPackages (kinds 443 and 30443) are checked on arrival and indexed in
//!   the plugin's key-value store ([`index`]); they are served only through
//!   `process-req` ([`delivery`]), and only to filters whose `kinds` name
//!   them (a profile view `{"authors":[pk]}` never sees one). An owner
//!   authenticated as itself (NIP-42) sees all its own and consumes none.
//! - Kind 444 (a Welcome outside its gift wrap) is refused; kind 445 needs
//!   exactly one 64-hex `h` tag.
//! - `tick` expires KeyPackages and prunes rate-limit counters, a page at a
//!   time.
//! - Built for contract 0.2, it asks for `on-removed`: KeyPackages the relay
//!   removes for any reason (an operator's ban, NIP-62, NIP-09, NIP-40, a
//!   newer slot version) leave the index when they leave the store.
//!
//! # Who gets which KeyPackage: the per-device rule
//!
//! The Marmot spec gives each account one or more *KeyPackage slots*: a kind
//! 30443 event whose `d` tag is "a random non-empty KeyPackage slot id"
//! (`transports/nostr.md`), kept by a device and replaced by it (NIP-01
//! addressable events: one live event per slot). Inviters "prefer valid
//! non-`last_resort` candidates when available, then prefer the freshest
//! valid candidate", and a client that processed a Welcome "SHOULD publish a
//! fresh replacement" (`foundation/key-packages.md`). Current clients (mdk)
//! mark their KeyPackages last-resort, keep one per device slot, and take the
//! newest valid one per device. The gateway therefore treats each 30443 slot
//! as one device, and every legacy kind 443 without a 30443 twin (same `i`
//! KeyPackageRef) as one more device, the *legacy pool*:
//!
//! 1. An inviter gets the newest servable KeyPackage of each device, slots
//!    before the legacy pool and newer devices first, up to
//!    `max_keypackages_per_author` devices, the request's `limit`s and
//!    `max_keypackages_per_request`. A KeyPackage and its twin count once;
//!    the 30443 is served.
//! 2. Consumption and "keep the last one" apply per device. Handing out a
//!    device's KeyPackage consumes it (and its twin) unless it is the last
//!    servable one of that device. A slot holds one live KeyPackage, so a
//!    device's slot is never emptied by inviters: the device retires it by
//!    replacing it. The legacy pool is consumed one KeyPackage at a time,
//!    newest first, down to its last. No consumed KeyPackage is handed out
//!    again, on this replica or another.
//! 3. When a device replaces its slot, the old KeyPackage's 443 twin is
//!    retired with it (the device may have deleted its private key).
//! 4. A KeyPackage is served until the earliest of its `expiration` tag and
//!    its MLS `Lifetime.not_after` (read from the KeyPackage when
//!    `read_mls_lifetime` is on), or for `default_ttl_seconds` (90 days)
//!    when it has neither.

// Built for the host only to run the unit tests, where nothing calls the
// hooks (the component export is wasm-only).
#![cfg_attr(not(target_family = "wasm"), allow(dead_code))]

mod counters;
mod delivery;
mod index;
mod key_package;
mod rules;

use wasm_relay_plugin_sdk::v0_2::*;

pub const KIND_KEY_PACKAGE: u16 = 443;
pub const KIND_KEY_PACKAGE_ADDRESSABLE: u16 = 30443;
pub const KIND_WELCOME: u16 = 444;
pub const KIND_GROUP_MESSAGE: u16 = 445;
pub const KIND_DELETION: u16 = 5;

/// How long a KeyPackage without an `expiration` tag is served: 90 days.
/// Current clients publish none and keep KeyPackages up to about 90 days
/// (mdk rotates 14-21 days before that).
const DEFAULT_TTL_SECONDS: u64 = 90 * 24 * 3600;

/// Devices whose KeyPackage one request gets per author: enough for a
/// phone, a desktop and a few more, so no device of an account is hidden.
const DEFAULT_PER_AUTHOR: usize = 8;
/// KeyPackages one request gets in total (below the relay's default
/// `limits.max_limit`, 5,000, so the host never cuts what was consumed).
const DEFAULT_PER_REQUEST: usize = 256;
/// Owners one request may ask KeyPackages of (each costs index reads).
const DEFAULT_AUTHORS_PER_REQUEST: usize = 256;
/// How long after indexing a KeyPackage whose event is not in the store yet
/// is assumed to be on its way there (`on-event` runs before the store
/// commit), rather than removed.
const DEFAULT_INDEX_GRACE_SECONDS: u64 = 60;

/// Operator settings, read once per call.
pub(crate) struct Settings {
    pub per_author: usize,
    pub max_per_request: usize,
    pub max_authors_per_request: usize,
    pub requests_per_hour: u64,
    pub default_ttl: u64,
    pub read_mls_lifetime: bool,
    pub max_per_owner: usize,
    pub index_grace: u64,
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
            per_author: setting_or("max_keypackages_per_author", DEFAULT_PER_AUTHOR).max(1),
            max_per_request: setting_or("max_keypackages_per_request", DEFAULT_PER_REQUEST).max(1),
            max_authors_per_request: setting_or("max_authors_per_request", DEFAULT_AUTHORS_PER_REQUEST).max(1),
            requests_per_hour: setting_or("requests_per_hour", 10u64),
            default_ttl: setting_or("default_ttl_seconds", DEFAULT_TTL_SECONDS),
            read_mls_lifetime: setting_or("read_mls_lifetime", true),
            max_per_owner: setting_or("max_keypackages_per_owner", 15usize).max(1),
            index_grace: setting_or("index_grace_seconds", DEFAULT_INDEX_GRACE_SECONDS),
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
                spec(
                    "max_keypackages_per_author",
                    &DEFAULT_PER_AUTHOR.to_string(),
                    "Devices (30443 slots, plus the legacy 443 pool) whose newest KeyPackage an inviter gets per author per request",
                ),
                spec(
                    "max_keypackages_per_request",
                    &DEFAULT_PER_REQUEST.to_string(),
                    "KeyPackages one request gets in total; keep it at or below the relay's limits.max_limit",
                ),
                spec(
                    "max_authors_per_request",
                    &DEFAULT_AUTHORS_PER_REQUEST.to_string(),
                    "Authors one request may ask KeyPackages of; more is refused with invalid:",
                ),
                spec("requests_per_hour", "10", "KeyPackage requests per (requester, author) per hour; 0: unlimited"),
                spec(
                    "default_ttl_seconds",
                    &DEFAULT_TTL_SECONDS.to_string(),
                    "Lifetime of a KeyPackage without an expiration tag (clients rotate within about 90 days)",
                ),
                spec(
                    "read_mls_lifetime",
                    "true",
                    "Read the MLS Lifetime inside each KeyPackage: refuse it past not_after, stop serving it then",
                ),
                spec("max_keypackages_per_owner", "15", "KeyPackages kept per owner; the oldest are dropped"),
                spec(
                    "index_grace_seconds",
                    &DEFAULT_INDEX_GRACE_SECONDS.to_string(),
                    "How long a freshly indexed KeyPackage not yet in the store counts as on its way, not removed",
                ),
                // Advertised in the relay's NIP-11 document while the
                // gateway is loaded, in nostream's shape: the Marmot
                // proposals this relay carries (MIP-00 KeyPackages, MIP-01
                // groups, MIP-02 Welcomes in gift wraps, MIP-03 group
                // messages).
                spec(
                    "nip11.supported_mips",
                    "[0, 1, 2, 3]",
                    "Marmot MIPs advertised in NIP-11 (JSON list) while the gateway is loaded; empty: none",
                ),
                spec(
                    "group_messages_per_minute",
                    "0",
                    "Kind 445 events accepted per group (h tag) per minute; 0: unlimited",
                ),
            ],
            // Contract 0.2: KeyPackages the relay removes (banned, vanished,
            // expired, deleted, replaced) leave the index at once.
            hooks: vec![Hook::OnRemoved],
            capabilities: vec![],
            relay_info: Nip11Contribution { supported_nips: vec![], fields: vec![] },
        }
    }

    fn on_event(ctx: RequestContext, event: Event) -> Decision {
        let settings = Settings::get();
        let now = host::now();
        let result = match event.kind {
            KIND_KEY_PACKAGE | KIND_KEY_PACKAGE_ADDRESSABLE => {
                rules::check_key_package(&event, settings, now).and_then(|kp| index::add(&event, kp, settings, now))
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

    fn on_removed(events: Vec<RemovedEvent>) {
        let key_packages: Vec<RemovedEvent> =
            events.into_iter().filter(|e| matches!(e.kind, KIND_KEY_PACKAGE | KIND_KEY_PACKAGE_ADDRESSABLE)).collect();
        index::forget_removed(&key_packages);
    }

    // Hooks the gateway does not ask for: never called.
    fn on_stored(_events: Vec<Event>) {}

    fn on_connect(_conn: Connection) -> Decision {
        accept()
    }

    fn on_auth(_ctx: RequestContext, _pubkey: String) -> Decision {
        accept()
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

// Exported only in the component: the crate's unit tests build for the
// host, whose linker rejects the component's export names.
#[cfg(target_family = "wasm")]
export_plugin_v0_2!(MlsGateway);
