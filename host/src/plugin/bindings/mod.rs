//! The WIT contract as Rust: one generated module per contract version this
//! host loads ([`v0_1`], [`v0_2`]), and [`PluginExports`], which dispatches a
//! call to whichever version a plugin was built for.
//!
//! The rest of the host speaks the newest version's types ([`types`]). A
//! call into an older plugin converts its arguments down and its answer up;
//! the older version's imports are served by converting to the newest
//! version's import code. Every import is async (the metadata store may be
//! remote) and may trap; every export is called asynchronously so the epoch
//! deadline can interrupt it.

pub mod v0_1;
pub mod v0_2;

use wasmtime::Store;
use wasmtime::component::{InstancePre, Linker};

pub use v0_2::{events, host, kv, types};

use super::imports::PluginState;

/// WIT package versions this host can load, oldest first.
pub const SUPPORTED_WIT_VERSIONS: &[&str] = &["0.1.0", "0.2.0"];
/// The package every plugin must export `plugin` from.
pub const WIT_PACKAGE: &str = "nostr-relay:plugin";

/// Adds every supported version's imports to `linker`.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    v0_1::RelayPlugin::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s)?;
    v0_2::RelayPlugin::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s)?;
    Ok(())
}

/// A plugin component linked and ready to instantiate, for its version.
pub enum PluginExportsPre {
    V0_1(v0_1::RelayPluginPre<PluginState>),
    V0_2(v0_2::RelayPluginPre<PluginState>),
}

impl PluginExportsPre {
    /// `version` is the one the component exports (checked by the caller to
    /// be in [`SUPPORTED_WIT_VERSIONS`]).
    pub fn new(version: &str, pre: InstancePre<PluginState>) -> wasmtime::Result<Self> {
        Ok(match version {
            "0.1.0" => Self::V0_1(v0_1::RelayPluginPre::new(pre)?),
            "0.2.0" => Self::V0_2(v0_2::RelayPluginPre::new(pre)?),
            other => wasmtime::bail!("unsupported contract version {other}"),
        })
    }

    pub async fn instantiate_async(&self, store: &mut Store<PluginState>) -> wasmtime::Result<PluginExports> {
        Ok(match self {
            Self::V0_1(pre) => PluginExports::V0_1(pre.instantiate_async(store).await?),
            Self::V0_2(pre) => PluginExports::V0_2(pre.instantiate_async(store).await?),
        })
    }
}

/// One instance's exports, whichever contract version it was built for.
/// Each method takes and returns the newest version's types.
pub enum PluginExports {
    V0_1(v0_1::RelayPlugin),
    V0_2(v0_2::RelayPlugin),
}

impl PluginExports {
    pub async fn call_info(&self, store: &mut Store<PluginState>) -> wasmtime::Result<types::PluginInfo> {
        match self {
            Self::V0_1(p) => Ok(p.nostr_relay_plugin_plugin().call_info(store).await?.into()),
            Self::V0_2(p) => p.nostr_relay_plugin_plugin().call_info(store).await,
        }
    }

    pub async fn call_on_event(
        &self,
        store: &mut Store<PluginState>,
        ctx: &types::RequestContext,
        event: &types::Event,
    ) -> wasmtime::Result<types::Decision> {
        match self {
            Self::V0_1(p) => {
                let (ctx, event) = (ctx.clone().into(), event.clone().into());
                Ok(p.nostr_relay_plugin_plugin().call_on_event(store, &ctx, &event).await?.into())
            }
            Self::V0_2(p) => p.nostr_relay_plugin_plugin().call_on_event(store, ctx, event).await,
        }
    }

    pub async fn call_process_req(
        &self,
        store: &mut Store<PluginState>,
        ctx: &types::RequestContext,
        filters: &[types::Filter],
    ) -> wasmtime::Result<types::ReqResult> {
        match self {
            Self::V0_1(p) => {
                let ctx = ctx.clone().into();
                let filters: Vec<v0_1::types::Filter> = filters.iter().cloned().map(Into::into).collect();
                Ok(p.nostr_relay_plugin_plugin().call_process_req(store, &ctx, &filters).await?.into())
            }
            Self::V0_2(p) => p.nostr_relay_plugin_plugin().call_process_req(store, ctx, filters).await,
        }
    }

    pub async fn call_tick(&self, store: &mut Store<PluginState>, now: u64) -> wasmtime::Result<()> {
        match self {
            Self::V0_1(p) => p.nostr_relay_plugin_plugin().call_tick(store, now).await,
            Self::V0_2(p) => p.nostr_relay_plugin_plugin().call_tick(store, now).await,
        }
    }

    /// Hook `on-connect`; a 0.1 plugin cannot ask for it, so it accepts.
    pub async fn call_on_connect(
        &self,
        store: &mut Store<PluginState>,
        conn: &types::Connection,
    ) -> wasmtime::Result<types::Decision> {
        match self {
            Self::V0_1(_) => Ok(types::Decision::Accept),
            Self::V0_2(p) => p.nostr_relay_plugin_plugin().call_on_connect(store, conn).await,
        }
    }

    /// Hook `on-auth`; a 0.1 plugin cannot ask for it, so it accepts.
    pub async fn call_on_auth(
        &self,
        store: &mut Store<PluginState>,
        ctx: &types::RequestContext,
        pubkey: &str,
    ) -> wasmtime::Result<types::Decision> {
        match self {
            Self::V0_1(_) => Ok(types::Decision::Accept),
            Self::V0_2(p) => p.nostr_relay_plugin_plugin().call_on_auth(store, ctx, pubkey).await,
        }
    }

    /// Hook `on-stored`; a 0.1 plugin cannot ask for it, so it gets nothing.
    pub async fn call_on_stored(
        &self,
        store: &mut Store<PluginState>,
        events: &[types::Event],
    ) -> wasmtime::Result<()> {
        match self {
            Self::V0_1(_) => Ok(()),
            Self::V0_2(p) => p.nostr_relay_plugin_plugin().call_on_stored(store, events).await,
        }
    }

    /// Hook `on-removed`; a 0.1 plugin cannot ask for it, so it gets nothing.
    pub async fn call_on_removed(
        &self,
        store: &mut Store<PluginState>,
        events: &[types::RemovedEvent],
    ) -> wasmtime::Result<()> {
        match self {
            Self::V0_1(_) => Ok(()),
            Self::V0_2(p) => p.nostr_relay_plugin_plugin().call_on_removed(store, events).await,
        }
    }
}
