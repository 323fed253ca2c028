//! Helpers shared by the fuzz targets.

use nostr::event::Event;

/// An event with these fields and a dummy signature (matching and plugins
/// look at fields; signatures are the host's business, checked elsewhere).
pub fn unsigned_event(id: [u8; 32], created_at: u64, kind: u16, tags: Vec<Vec<String>>, content: String) -> Option<Event> {
    let tags: Vec<Vec<String>> = tags.into_iter().filter(|t| !t.is_empty()).collect();
    serde_json::from_value(serde_json::json!({
        "id": hex(&id),
        "pubkey": "79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798",
        "created_at": created_at,
        "kind": kind,
        "tags": tags,
        "content": content,
        "sig": "01".repeat(64),
    }))
    .ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
