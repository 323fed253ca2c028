//! NIP-50 search as a real client does it: nostr-sdk publishes notes and
//! fetches with `Filter::search`, against a relay with the search plugin
//! (contract 0.2) loaded. Without the plugin, the relay refuses the search
//! and the client gets no events rather than unfiltered ones.

#[path = "../../harness/mod.rs"]
mod harness;

use std::time::Duration;

use harness::{TestRelay, plugin_path};
use nostr_sdk::prelude::*;

const WAIT: Duration = Duration::from_secs(10);

async fn client(url: &str, keys: &Keys) -> Client {
    let client = Client::builder().signer(keys.clone()).build();
    client.add_relay(url).await.expect("add relay");
    client.connect().await;
    client.wait_for_connection(WAIT).await;
    client
}

async fn publish(client: &Client, content: &str) -> EventId {
    let out = client.send_event_builder(EventBuilder::text_note(content)).await.expect("send");
    assert!(out.failed.is_empty() && !out.success.is_empty(), "refused: {:?}", out.failed);
    *out.id()
}

/// The ids a search fetch returns, newest first.
async fn search(client: &Client, filter: Filter) -> Vec<EventId> {
    let events = client.fetch_events(filter, WAIT).await.expect("fetch");
    events.into_iter().map(|e| e.id).collect()
}

#[tokio::test]
async fn a_nostr_sdk_client_finds_notes_by_search() {
    let config = format!(
        "[[plugins]]\nname = \"search\"\npath = {}\n",
        serde_json::to_string(&plugin_path("search.wasm").display().to_string()).unwrap()
    );
    let relay = TestRelay::start_with_config(&config).await;
    let (alice, bob) = (Keys::generate(), Keys::generate());
    let writer = client(&relay.url, &alice).await;
    let marmot = publish(&writer, "Marmot brings MLS groups to Nostr").await;
    let weather = publish(&writer, "Sunny weather today").await;

    let reader = client(&relay.url, &bob).await;
    // The index is fed after the acknowledgement: allow it a moment.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if search(&reader, Filter::new().search("mls")).await == vec![marmot] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the note never became searchable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(search(&reader, Filter::new().search("SUNNY Weather")).await, vec![weather]);
    assert!(search(&reader, Filter::new().search("mls").author(bob.public_key())).await.is_empty());
    // Without a search plugin the same request is refused, not answered
    // with everything the other fields match.
    let plain = TestRelay::start().await;
    let writer = client(&plain.url, &alice).await;
    publish(&writer, "Marmot brings MLS groups to Nostr").await;
    let reader = client(&plain.url, &bob).await;
    assert!(search(&reader, Filter::new().search("mls")).await.is_empty());
}
