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

#[path = "support.rs"]
mod support;
use support::unsigned_event;
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
            PluginHost::start(wasm_relay::plugin::PluginHostSetup {
                configs: &configs,
                cache_dir: dir.join("cache"),
                metadata,
                events,
                fanout: Arc::new(Fanout::new(true)),
                max_results: 5000,
                metrics: Arc::new(Metrics::new()),
            })
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
    let kind = if input.addressable { 30443 } else { 443 };
    let Some(event) =
        unsigned_event(input.id, u64::from(input.created_at), kind, input.tags, input.content)
    else {
        return;
    };
    let caller = Caller::new(1, SocketAddr::from(([127, 0, 0, 1], 1)));
    match g.runtime.block_on(g.host.on_event(&caller, &event)) {
        Ok(()) => {}
        Err(refusal) => assert!(
            !refusal.starts_with("error: plugin"),
            "the gateway failed instead of answering: {refusal}"
        ),
    }
});
