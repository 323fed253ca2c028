//! wasm-relay: a Nostr relay whose behaviour is extended by WebAssembly
//! components.
//!
//! Where things live (ARCHITECTURE.md at the repository root has the
//! layers and the path of an EVENT and a REQ):
//! - [`config`]: configuration (defaults, TOML file, environment).
//! - [`message`]: the NIP-01 wire format; the only place a [`refusal`]
//!   becomes text.
//! - [`refusal`]: why the relay says no, as a typed value.
//! - [`event`]: checking incoming events; kind classes and NIP facts (gift
//!   wraps, expiration, relay URLs).
//! - [`filter`]: NIP-01 filters and `filter_matches`.
//! - [`store`]: the event store trait, the sled engine and the query engine.
//! - [`ingest`]: the group-commit write path.
//! - [`fanout`]: live subscriptions and delivery.
//! - [`connection`]: one client's session.
//! - [`server`]: the HTTP/WebSocket listener; [`nip11`]: relay information.
//! - [`metadata`]: the plugins' key-value store (sled or Firestore).
//! - [`firestore`]: the Firestore client; [`replication`]: replicas sharing events.
//! - [`plugin`]: the WebAssembly plugin runtime and its WIT bindings.
//! - [`policy`]: access lists and rate limits; [`capacity`]: connections one
//!   client (and the relay) may hold; [`client_address`]: which address a
//!   client is known by (behind a proxy, the one its header names).
//! - [`relay`]: shared state and start-up.
//! - [`auth`]: NIP-42 and NIP-98 checks; [`admin`]: the NIP-86 management
//!   API; [`operator_lists`]: the operator's lists as stored.
//! - [`metrics`]: Prometheus metrics.
//! - [`tools`]: offline operator tools (plugin check, export, import).

pub mod admin;
pub mod auth;
pub mod capacity;
pub mod client_address;
pub mod config;
pub mod connection;
pub mod event;
pub mod fanout;
pub mod filter;
pub mod firestore;
pub mod ingest;
pub mod intake;
pub mod lease;
pub mod message;
pub mod metadata;
pub mod metrics;
pub mod negentropy;
pub mod nip11;
pub mod operator_lists;
#[cfg(unix)]
pub mod operator_socket;
pub mod plugin;
pub mod plugin_fixtures;
pub mod plugin_template;
pub mod policy;
pub mod refusal;
pub mod relay;
pub mod replication;
pub mod server;
pub mod store;
pub mod sync;
pub mod tools;

pub use config::Config;
pub use relay::Relay;
pub use server::BoundRelay;
