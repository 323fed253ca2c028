//! What `wasm-relay plugin new` writes: a minimal plugin project, in Rust,
//! JavaScript or Python, that builds with the one command its README gives
//! and passes `plugin check`. Each is the same policy: refuse events whose
//! content holds a configured word. JavaScript and Python projects carry
//! their own copy of the WIT contract; a Rust project depends on the SDK.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The languages `plugin new` writes a project for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Language {
    Rust,
    Js,
    Python,
}

impl Language {
    /// The command that builds a project, run in its folder.
    pub fn build_command(self) -> &'static str {
        match self {
            Language::Rust => "cargo build --release --target wasm32-wasip2",
            Language::Js => "npm install && npm run build",
            Language::Python => PYTHON_BUILD,
        }
    }
}

/// The contract a JavaScript or Python project builds against.
const CONTRACT_WIT: &str = include_str!("../../wit/0.1.0/plugin.wit");

/// Where the SDK of the relay that was built from this source tree is, if
/// it is still there (a binary built elsewhere passes `--sdk`).
pub fn default_sdk() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk");
    sdk.join("Cargo.toml").exists().then(|| sdk.canonicalize().unwrap_or(sdk))
}

/// Writes a new plugin project named `name` into `dir/name`; a Rust one
/// depends on the SDK at `sdk`. Returns the project folder.
pub fn write(name: &str, language: Language, dir: &Path, sdk: Option<&Path>) -> anyhow::Result<PathBuf> {
    crate::config::validate_plugin_name(name).map_err(anyhow::Error::msg)?;
    let project = dir.join(name);
    anyhow::ensure!(!project.exists(), "{} already exists", project.display());
    let files: &[(&str, &str)] = match language {
        Language::Rust => &[
            ("Cargo.toml", CARGO_TOML),
            ("src/lib.rs", LIB_RS),
            ("README.md", RUST_README),
            ("fixtures.json", FIXTURES_JSON),
            (".gitignore", "target/\n"),
        ],
        Language::Js => &[
            ("package.json", PACKAGE_JSON),
            ("plugin.js", PLUGIN_JS),
            ("wit/plugin.wit", CONTRACT_WIT),
            ("README.md", JS_README),
            ("fixtures.json", FIXTURES_JSON),
            (".gitignore", "node_modules/\n*.wasm\n"),
        ],
        Language::Python => &[
            ("requirements.txt", REQUIREMENTS_TXT),
            ("app.py", APP_PY),
            ("wit/plugin.wit", CONTRACT_WIT),
            ("README.md", PYTHON_README),
            ("fixtures.json", FIXTURES_JSON),
            (".gitignore", ".venv/\n__pycache__/\n*.wasm\n"),
        ],
    };
    let sdk = match (language, sdk) {
        // A JSON string is a TOML basic string too (the same escapes).
        (Language::Rust, Some(sdk)) => serde_json::to_string(&sdk.display().to_string()).expect("a string serializes"),
        (Language::Rust, None) => {
            anyhow::bail!("where is the Rust SDK? pass --sdk PATH (the plugins/sdk folder of a wasm-relay checkout)")
        }
        _ => String::new(),
    };
    let module = name.replace('-', "_");
    let fill = |text: &str| {
        text.replace("{python-build}", PYTHON_BUILD)
            .replace("{name}", name)
            .replace("{crate}", &module)
            .replace("{sdk}", &sdk)
    };
    for (file, text) in files {
        let path = project.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        // The contract is copied as it is.
        let text = if *text == CONTRACT_WIT { text.to_string() } else { fill(text) };
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
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

const RUST_README: &str = r#"# {name}

A wasm-relay plugin.

```sh
rustup target add wasm32-wasip2                          # once
cargo build --release --target wasm32-wasip2
wasm-relay plugin check target/wasm32-wasip2/release/{crate}.wasm
wasm-relay plugin test target/wasm32-wasip2/release/{crate}.wasm fixtures.json
wasm-relay serve --plugin {name}=target/wasm32-wasip2/release/{crate}.wasm --setting {name}.blocked-word=spam
```

The contract and the SDK: docs/plugin-authors.md in the wasm-relay repository.
"#;

/// Cases for `wasm-relay plugin test`, the same for every language.
const FIXTURES_JSON: &str = r#"{
  "settings": { "blocked-word": "spam" },
  "cases": [
    { "name": "an ordinary note is accepted", "event": { "kind": 1, "content": "hello" }, "expect": "accept" },
    {
      "name": "a note with the blocked word is refused",
      "event": { "kind": 1, "content": "buy spam now" },
      "expect": "blocked: events mentioning 'spam' are not accepted here"
    },
    { "name": "requests are left alone", "req": [{ "kinds": [1] }], "expect": "served 0" }
  ]
}
"#;

/// The JavaScript build tools, pinned as in `plugins/examples/kind_allowlist_js`
/// (a test keeps them equal). componentize-js 0.23 loads the WASI shim
/// without declaring it, so the project declares it.
const PACKAGE_JSON: &str = r#"{
  "name": "{name}",
  "version": "0.1.0",
  "private": true,
  "type": "module",
  "scripts": {
    "build": "componentize-js plugin.js --wit wit --world-name relay-plugin --out {crate}.wasm"
  },
  "devDependencies": {
    "@bytecodealliance/componentize-js": "0.23.0",
    "@bytecodealliance/preview2-shim": "0.25.0"
  }
}
"#;

const PLUGIN_JS: &str = r#"// {name}: a wasm-relay plugin. It refuses events whose content holds the
// word in its `blocked-word` setting (none by default) and leaves requests
// alone. Build: `npm install && npm run build`.
//
// WIT to JavaScript: functions are camelCase, records are objects, `option`
// is a value or `undefined`, a variant is `{ tag, val }`, an enum is its case
// name as a string, u64 is a BigInt. An exception fails the call: the client
// gets `error:`, and the message and stack go to the relay's log.

import { setting } from 'nostr-relay:plugin/host@0.1.0';

export const plugin = {
  info() {
    return {
      name: '{name}',
      version: '0.1.0',
      managedKinds: [],
      eventKinds: undefined,
      // Never consulted on reads.
      reqKinds: [],
      tickIntervalSeconds: undefined,
      settings: [
        {
          name: 'blocked-word',
          defaultValue: '',
          description: 'Events whose content holds this word are refused (empty: none)',
        },
      ],
    };
  },

  onEvent(_ctx, event) {
    const word = setting('blocked-word') ?? '';
    if (word !== '' && event.content.includes(word)) {
      return { tag: 'reject', val: { kind: 'blocked', message: `events mentioning '${word}' are not accepted here` } };
    }
    return { tag: 'accept' };
  },

  processReq(_ctx, _filters) {
    return { tag: 'continue' };
  },

  tick(_now) {},
};
"#;

const JS_README: &str = r#"# {name}

A wasm-relay plugin in JavaScript, built with componentize-js (Node.js 18 or
newer). `wit/plugin.wit` is the relay's plugin contract, version 0.1.0.

```sh
npm install && npm run build
wasm-relay plugin check {crate}.wasm
wasm-relay plugin test {crate}.wasm fixtures.json
wasm-relay serve --plugin {name}={crate}.wasm --setting {name}.blocked-word=spam
```

`console.log` and `console.error` lines, and uncaught exceptions, appear in
the relay's log tagged with the plugin's name. The contract:
docs/plugin-authors.md in the wasm-relay repository.
"#;

/// The Python build tool, pinned as in `plugins/examples/kind_allowlist_py`
/// (a test keeps them equal).
const REQUIREMENTS_TXT: &str = "componentize-py==0.25.1\n";

const PYTHON_BUILD: &str = "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && \
                            .venv/bin/componentize-py -d wit -w relay-plugin componentize app -o {crate}.wasm";

const APP_PY: &str = r#""""{name}: a wasm-relay plugin. It refuses events whose content holds the
word in its `blocked-word` setting (none by default) and leaves requests
alone. Build: see README.md.

WIT to Python: componentize-py generates the `wit_world` package from
wit/plugin.wit at build time. Functions are snake_case methods, records are
dataclasses, `option` is a value or None, a variant case is a class of its
own (`Decision_Reject(refusal)`), an enum is an `Enum`. An exception fails
the call: the client gets `error:`, and the traceback goes to the relay's log.
"""

from typing import List

from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import (
    Decision,
    Decision_Accept,
    Decision_Reject,
    Event,
    Filter,
    PluginInfo,
    Refusal,
    RefusalKind,
    ReqResult,
    ReqResult_Continue,
    RequestContext,
    SettingSpec,
)


class Plugin(exports.Plugin):
    def info(self) -> PluginInfo:
        return PluginInfo(
            name="{name}",
            version="0.1.0",
            managed_kinds=[],
            event_kinds=None,
            # Never consulted on reads.
            req_kinds=[],
            tick_interval_seconds=None,
            settings=[
                SettingSpec(
                    "blocked-word", "", "Events whose content holds this word are refused (empty: none)"
                )
            ],
        )

    def on_event(self, ctx: RequestContext, event: Event) -> Decision:
        word = host.setting("blocked-word") or ""
        if word and word in event.content:
            return Decision_Reject(Refusal(RefusalKind.BLOCKED, f"events mentioning '{word}' are not accepted here"))
        return Decision_Accept()

    def process_req(self, ctx: RequestContext, filters: List[Filter]) -> ReqResult:
        return ReqResult_Continue()

    def tick(self, now: int) -> None:
        pass
"#;

const PYTHON_README: &str = r#"# {name}

A wasm-relay plugin in Python, built with componentize-py (Python 3.10 or
newer). `wit/plugin.wit` is the relay's plugin contract, version 0.1.0.

```sh
{python-build}
wasm-relay plugin check {crate}.wasm
wasm-relay plugin test {crate}.wasm fixtures.json
wasm-relay serve --plugin {name}={crate}.wasm --setting {name}.blocked-word=spam
```

`print` output and uncaught exceptions (with their traceback) appear in the
relay's log tagged with the plugin's name. The contract:
docs/plugin-authors.md in the wasm-relay repository.
"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// The templates pin the same build tools as the examples that
    /// `make test` builds, so a new project builds with tools known to work.
    #[test]
    fn templates_pin_the_build_tools_the_examples_are_tested_with() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let example: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("plugins/examples/kind_allowlist_js/package.json")).unwrap(),
        )
        .unwrap();
        let template: serde_json::Value = serde_json::from_str(&PACKAGE_JSON.replace("{name}", "x")).unwrap();
        assert_eq!(template["devDependencies"], example["devDependencies"]);
        let requirements =
            std::fs::read_to_string(root.join("plugins/examples/kind_allowlist_py/requirements.txt")).unwrap();
        let pins: Vec<&str> = requirements.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
        assert_eq!(pins, REQUIREMENTS_TXT.lines().collect::<Vec<_>>());
    }
}
