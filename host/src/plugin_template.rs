//! What `wasm-relay plugin new` writes: a minimal plugin project that builds
//! with one command and passes `plugin check`. Rust only so far.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The languages `plugin new` writes a project for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Language {
    Rust,
    Js,
    Python,
}

/// Where the SDK of the relay that was built from this source tree is, if
/// it is still there (a binary built elsewhere passes `--sdk`).
pub fn default_sdk() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk");
    sdk.join("Cargo.toml").exists().then(|| sdk.canonicalize().unwrap_or(sdk))
}

/// Writes a new plugin project named `name` into `dir/name`, depending on
/// the Rust SDK at `sdk` (a path); returns the project folder.
pub fn write(name: &str, language: Language, dir: &Path, sdk: &Path) -> anyhow::Result<PathBuf> {
    crate::config::validate_plugin_name(name).map_err(anyhow::Error::msg)?;
    if language != Language::Rust {
        anyhow::bail!(
            "templates for {language:?} are not written yet: build a component that exports \
             nostr-relay:plugin@0.1.0 (see docs/plugin-authors.md), or use --lang rust"
        );
    }
    let project = dir.join(name);
    anyhow::ensure!(!project.exists(), "{} already exists", project.display());
    let src = project.join("src");
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    // A JSON string is a TOML basic string too (the same escapes).
    let sdk = serde_json::to_string(&sdk.display().to_string()).expect("a string serializes");
    let fill =
        |text: &str| text.replace("{name}", name).replace("{crate}", &name.replace('-', "_")).replace("{sdk}", &sdk);
    for (path, text) in [
        (project.join("Cargo.toml"), CARGO_TOML),
        (src.join("lib.rs"), LIB_RS),
        (project.join("README.md"), README),
        (project.join(".gitignore"), "target/\n"),
    ] {
        std::fs::write(&path, fill(text)).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(project)
}

const CARGO_TOML: &str = r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib"]

[dependencies]
wasm-relay-plugin-sdk = { path = {sdk} }

[profile.release]
opt-level = "s"
lto = true
strip = true
"#;

const LIB_RS: &str = r#"//! {name}: a wasm-relay plugin. It refuses events whose content holds the
//! word in its `blocked-word` setting (none by default) and leaves requests
//! alone. Build: `cargo build --release --target wasm32-wasip2`.

use wasm_relay_plugin_sdk::*;

struct Policy;

impl Plugin for Policy {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "{name}".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            managed_kinds: vec![],
            event_kinds: None,
            // Never consulted on reads.
            req_kinds: Some(vec![]),
            tick_interval_seconds: None,
            settings: vec![SettingSpec {
                name: "blocked-word".into(),
                default_value: String::new(),
                description: "Events whose content holds this word are refused (empty: none)".into(),
            }],
        }
    }

    fn on_event(_ctx: RequestContext, event: Event) -> Decision {
        let word: String = setting_or("blocked-word", String::new());
        if !word.is_empty() && event.content.contains(&word) {
            return reject(RefusalKind::Blocked, format!("events mentioning '{word}' are not accepted here"));
        }
        accept()
    }

    fn process_req(_ctx: RequestContext, _filters: Vec<Filter>) -> ReqResult {
        ReqResult::Continue
    }

    fn tick(_now: u64) {}
}

export_plugin!(Policy);
"#;

const README: &str = r#"# {name}

A wasm-relay plugin.

```sh
rustup target add wasm32-wasip2                          # once
cargo build --release --target wasm32-wasip2
wasm-relay plugin check target/wasm32-wasip2/release/{crate}.wasm
wasm-relay serve --plugin {name}=target/wasm32-wasip2/release/{crate}.wasm --setting {name}.blocked-word=spam
```

The contract and the SDK: docs/plugin-authors.md in the wasm-relay repository.
"#;
