//! The MLS gateway's KeyPackage checks (tags and content), run as the relay
//! runs them: the real `mls_gateway.wasm` component (build it with `make
//! plugins`) loaded in the plugin runtime, called with arbitrary kind 443 and
//! 30443 events. Every call must answer accept or a refusal; a trap or a
//! timeout is a bug in the gateway.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nostr::event::{Event, EventId, Kind, Tag, Tags};
use nostr::key::PublicKey;
use nostr::secp256k1::schnorr::Signature;
use nostr::types::Timestamp;
use wasm_relay::config::PluginConfig;
use wasm_relay::fanout::Fanout;
use wasm_relay::metadata::{MetadataStore, SledMetadataStore};
use wasm_relay::metrics::Metrics;
use wasm_relay::plugin::{Caller, PluginHost};
use wasm_relay::store::{EventStore, SledEventStore};

struct Gateway {
    runtime: tokio::runtime::Runtime,
    host: Arc<PluginHost>,
    _dir: std::path::PathBuf,
}

fn gateway() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = std::env::temp_dir().join(format!("mls-fuzz-{}", std::process::id()));
        let wasm = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins/mls_gateway.wasm");
        assert!(wasm.exists(), "{} is missing: run `make plugins`", wasm.display());
        let host = runtime.block_on(async {
            let metadata: Arc<dyn MetadataStore> = Arc::new(SledMetadataStore::temporary().unwrap());
            let events: Arc<dyn EventStore> = Arc::new(SledEventStore::open(&dir, 8 << 20).unwrap());
            let mut config = PluginConfig::new("mls-gateway", wasm);
            config.call_timeout_ms = 1000;
            let configs = [config];
            PluginHost::start(
                &configs,
                dir.join("cache"),
                metadata,
                events,
                Arc::new(Fanout::new(true)),
                5000,
                Arc::new(Metrics::new()),
            )
            .await
            .unwrap()
        });
        Gateway { runtime, host, _dir: dir }
    })
}

#[derive(Arbitrary, Debug)]
struct Input {
    addressable: bool,
    id: [u8; 32],
    created_at: u32,
    tags: Vec<Vec<String>>,
    content: String,
}

fuzz_target!(|input: Input| {
    let g = gateway();
    let pubkey = PublicKey::from_slice(&[
        0x79, 0xbe, 0x66, 0x7e, 0xf9, 0xdc, 0xbb, 0xac, 0x55, 0xa0, 0x62, 0x95, 0xce, 0x87, 0x0b, 0x07, 0x02, 0x9b,
        0xfc, 0xdb, 0x2d, 0xce, 0x28, 0xd9, 0x59, 0xf2, 0x81, 0x5b, 0x16, 0xf8, 0x17, 0x98,
    ])
    .expect("valid key");
    let kind = if input.addressable { 30443 } else { 443 };
    let tags: Vec<Tag> = input.tags.into_iter().filter_map(|t| Tag::parse(t).ok()).collect();
    let event = Event::new(
        EventId::from_byte_array(input.id),
        pubkey,
        Timestamp::from(u64::from(input.created_at)),
        Kind::from(kind),
        Tags::from_list(tags),
        input.content,
        Signature::from_slice(&[1u8; 64]).expect("64 bytes"),
    );
    let caller = Caller { connection_id: 1, authed_pubkeys: vec![], remote: SocketAddr::from(([127, 0, 0, 1], 1)) };
    match g.runtime.block_on(g.host.on_event(&caller, &event)) {
        Ok(()) => {}
        Err(refusal) => assert!(
            !refusal.starts_with("error: plugin"),
            "the gateway failed instead of answering: {refusal}"
        ),
    }
});
