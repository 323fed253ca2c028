//! NIP-11 relay information document, built from the live configuration.

use serde_json::{Value, json};

use crate::config::Config;

/// NIPs this relay implements, each backed by integration tests.
pub const SUPPORTED_NIPS: &[u32] = &[1, 9, 11, 40, 42, 45, 59, 62, 70];

/// The document. `plugin_fields` are the fields loaded plugins advertise
/// (`PluginHost::relay_info_additions`): a new field is added; a list the
/// relay already has (`supported_nips`) gains the plugin's entries; any
/// other field the relay sets itself stays the relay's.
pub fn document(config: &Config, restricted_writes: bool, plugin_fields: &[(String, Value)]) -> Value {
    // No `software` field: NIP-11 wants the project's URL, and this project
    // has no public home yet; an invented one would send people nowhere.
    let l = &config.limits;
    let mut nips = SUPPORTED_NIPS.to_vec();
    if !config.admin.pubkeys.is_empty() {
        // The management API (NIP-86, authorized with NIP-98) is on.
        nips.extend([86, 98]);
    }
    if config.negentropy.enabled {
        nips.push(77);
    }
    nips.sort_unstable();
    let mut doc = json!({
        "name": config.info.name,
        "description": config.info.description,
        "version": env!("CARGO_PKG_VERSION"),
        "supported_nips": nips,
        "limitation": {
            "max_message_length": l.max_message_length,
            "max_subscriptions": l.max_subscriptions,
            "max_filters": l.max_filters,
            "max_limit": l.max_limit,
            "default_limit": l.default_limit,
            "max_subid_length": l.max_subid_length,
            "max_event_tags": l.max_event_tags,
            "max_content_length": l.max_content_length,
            "created_at_lower_limit": l.created_at_lower_limit,
            "created_at_upper_limit": l.created_at_upper_limit,
            "auth_required": false,
            "payment_required": false,
            "restricted_writes": restricted_writes,
        },
    });
    if let Some(pk) = &config.info.pubkey {
        doc["pubkey"] = pk.clone().into();
    }
    if let Some(contact) = &config.info.contact {
        doc["contact"] = contact.clone().into();
    }
    for (field, value) in plugin_fields {
        match (doc.get_mut(field.as_str()), value) {
            (None, _) => doc[field.as_str()] = value.clone(),
            (Some(Value::Array(ours)), Value::Array(theirs)) => {
                for v in theirs {
                    if !ours.contains(v) {
                        ours.push(v.clone());
                    }
                }
            }
            (Some(_), _) => {}
        }
    }
    doc
}
