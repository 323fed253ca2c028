//! The MLS gateway plugin (KeyPackage delivery, Welcome and group-message
//! rules). Built for `wasm32-wasip2` as a WebAssembly component once the
//! plugin runtime and its WIT contract land; empty until then.
