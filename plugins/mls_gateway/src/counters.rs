//! Windowed counters in the plugin's key-value store, for the rate limits:
//! `<prefix><window>/<subject>` counts one subject in one time window
//! (KeyPackage requests per hour under `rl/`, group messages per minute
//! under `rate445/`). Old windows are pruned by housekeeping.

use wasm_relay_plugin_sdk::v0_2::*;

/// Adds one to a counter key; returns the new value.
pub fn increment(key: &str) -> Result<u64, KvError> {
    loop {
        let current = kv::get(key)?;
        let n: u64 = current.as_deref().and_then(|b| std::str::from_utf8(b).ok()?.parse().ok()).unwrap_or(0) + 1;
        if store::compare_and_swap(key, current.as_deref(), Some(n.to_string().as_bytes()))? {
            return Ok(n);
        }
    }
}

/// Deletes `<prefix><window>/...` keys of windows before `current`, at most
/// `page_size` keys per call. Keys sort by window, so the old ones come first and the
/// scan stops at the first current one.
pub fn prune_windows(prefix: &str, current: u64, page_size: u32) {
    let Ok(page) = kv::scan_prefix(prefix, None, page_size) else { return };
    for (key, _) in page {
        let window = key[prefix.len()..].split('/').next().and_then(|w| w.parse::<u64>().ok());
        match window {
            Some(w) if w >= current => break,
            _ => {
                let _ = kv::delete(&key);
            }
        }
    }
}
