# wasm-relay: `make run` starts the relay, `make test` runs every test.
CARGO ?= cargo
WASM_TARGET := wasm32-wasip2

.PHONY: all run build plugins rust-plugins test-plugins wasm-target test lint fmt clean bench peers profile fuzz

all: build

# The plugin target is the one thing cargo cannot install itself.
wasm-target:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

PLUGIN_BUILD := target/$(WASM_TARGET)/plugin
PLUGIN_OUT := target/plugins
# Plugin components and where they end up: target/plugins/<name>.wasm.
# Shipped plugins (what `make run` and the bench load), then the test-only ones.
SHIPPED_PLUGINS := mls-gateway kind-allowlist pinned-events search http-policy
TEST_PLUGINS := probe future-wit contract-hooks
PLUGIN_CRATES := $(SHIPPED_PLUGINS) $(TEST_PLUGINS)

# Plugins are WebAssembly components built for wasm32-wasip2. The Rust ones
# are all that `make run`, `make build` and the Docker image need; `plugins`
# adds the JavaScript and Python examples (below).
plugins: rust-plugins $(PLUGIN_OUT)/kind_allowlist_js.wasm $(PLUGIN_OUT)/kind_allowlist_py.wasm
rust-plugins: wasm-target
	$(CARGO) build --profile plugin --target $(WASM_TARGET) $(addprefix -p ,$(SHIPPED_PLUGINS))
	mkdir -p $(PLUGIN_OUT)
	cp $(PLUGIN_BUILD)/mls_gateway.wasm $(PLUGIN_BUILD)/kind_allowlist.wasm $(PLUGIN_BUILD)/pinned_events.wasm \
		$(PLUGIN_BUILD)/search.wasm $(PLUGIN_BUILD)/http_policy.wasm $(PLUGIN_OUT)/

# Plugins in JavaScript and Python. Their build tools come from npm and PyPI,
# pinned by the JS example's package-lock.json and the Python example's
# requirements.txt, and are installed here on first use (and again only when
# a pin changes): componentize-js into the JS example's node_modules,
# componentize-py into a virtualenv under target/.
JS_EXAMPLE := plugins/examples/kind_allowlist_js
PY_EXAMPLE := plugins/examples/kind_allowlist_py
COMPONENTIZE_JS := $(JS_EXAMPLE)/node_modules/.bin/componentize-js
PY_VENV := target/toolchains/python
COMPONENTIZE_PY := $(PY_VENV)/bin/componentize-py
CONTRACT := wit/0.1.0

$(COMPONENTIZE_JS): $(JS_EXAMPLE)/package-lock.json
	cd $(JS_EXAMPLE) && npm ci --no-audit --no-fund --loglevel=error
	touch $@
$(COMPONENTIZE_PY): $(PY_EXAMPLE)/requirements.txt
	python3 -m venv $(PY_VENV)
	$(PY_VENV)/bin/pip install --quiet --disable-pip-version-check -r $<
	touch $@

# build-js OUT, DIR, MODULE: componentize DIR/MODULE.js into OUT.
build-js = cd $(2) && $(CURDIR)/$(COMPONENTIZE_JS) $(3).js --wit $(CURDIR)/$(CONTRACT) \
	--world-name relay-plugin --out $(CURDIR)/$(1) >/dev/null
# build-py OUT, DIR, MODULE: componentize DIR/MODULE.py into OUT.
build-py = cd $(2) && PYTHONDONTWRITEBYTECODE=1 $(CURDIR)/$(COMPONENTIZE_PY) -d $(CURDIR)/$(CONTRACT) \
	-w relay-plugin componentize $(3) -o $(CURDIR)/$(1) >/dev/null

$(PLUGIN_OUT)/kind_allowlist_js.wasm: $(JS_EXAMPLE)/kind-allowlist.js $(COMPONENTIZE_JS) $(CONTRACT)/plugin.wit
	@mkdir -p $(PLUGIN_OUT)
	$(call build-js,$@,$(JS_EXAMPLE),kind-allowlist)
$(PLUGIN_OUT)/kind_allowlist_py.wasm: $(PY_EXAMPLE)/app.py $(COMPONENTIZE_PY) $(CONTRACT)/plugin.wit
	@mkdir -p $(PLUGIN_OUT)
	$(call build-py,$@,$(PY_EXAMPLE),app)
$(PLUGIN_OUT)/faults_js.wasm: plugins/testing/faults_js/faults.js $(COMPONENTIZE_JS) $(CONTRACT)/plugin.wit
	$(call build-js,$@,plugins/testing/faults_js,faults)
$(PLUGIN_OUT)/faults_py.wasm: plugins/testing/faults_py/faults.py $(COMPONENTIZE_PY) $(CONTRACT)/plugin.wit
	$(call build-py,$@,plugins/testing/faults_py,faults)

# Test instruments, for `make test` only: the probe plugin twice (v1, v2) for
# the hot-swap tests; future-wit targets a contract version the relay refuses;
# contract-hooks counts the contract 0.2 hook calls it gets; faults-js and faults-py
# misbehave in JavaScript and Python on request.
test-plugins: plugins $(PLUGIN_OUT)/faults_js.wasm $(PLUGIN_OUT)/faults_py.wasm
	$(CARGO) build --profile plugin --target $(WASM_TARGET) $(addprefix -p ,$(TEST_PLUGINS))
	cp $(PLUGIN_BUILD)/probe.wasm $(PLUGIN_BUILD)/future_wit.wasm $(PLUGIN_BUILD)/contract_hooks.wasm $(PLUGIN_OUT)/
	$(CARGO) build --profile plugin --target $(WASM_TARGET) -p probe --features v2
	cp $(PLUGIN_BUILD)/probe.wasm $(PLUGIN_OUT)/probe_v2.wasm

build: rust-plugins
	$(CARGO) build --release -p wasm-relay

# Starts the relay on ws://127.0.0.1:7777 with its data in ./data and the MLS
# gateway loaded (edit target/plugins/mls_gateway.wasm to hot-swap it).
run: build
	./target/release/wasm-relay serve --plugin mls-gateway=$(PLUGIN_OUT)/mls_gateway.wasm

# Unit tests, integration tests that drive the real binary over WebSockets,
# and the MLS client tests (mdk-core) against the relay with the gateway.
# The suite, then a check that the Rust SDK stands alone: it packages, and
# builds from the package.
test: test-plugins
	$(CARGO) test -p wasm-relay -p mls-e2e -p mls-gateway --no-fail-fast
	$(CARGO) package -p wasm-relay-plugin-sdk --allow-dirty --quiet

# Load and micro benchmarks against release builds on loopback ports; prints a
# table and writes target/bench/results.json, then criterion's single plugin
# call figures. `make bench ONLY=ingest` runs one group (ONLY=calls: criterion;
# ONLY=peer: this relay beside rnostr under nostr-bench, installing both first;
# ONLY=scale: a store grown to 1M events; ONLY=disk: where disk space goes;
# ONLY=replicas: Firestore operations per event, per KeyPackage request and at
# rest, and a new replica's join time, on the Firestore emulator; ONLY=sync:
# NIP-77 sync of 100k events against a REQ download, and export while serving).
# One cargo build makes the relay, the load generator and the criterion
# executable, which then runs directly (`cargo bench` would build it again).
bench: test-plugins
	@if [ -z "$(ONLY)" ] || [ "$(ONLY)" = peer ]; then $(MAKE) --no-print-directory peers; fi
	$(CARGO) build --release -p wasm-relay -p relay-bench --bins --benches
	@if [ "$(ONLY)" != "calls" ]; then ./target/release/relay-bench $(ONLY); fi
	@if [ -z "$(ONLY)" ] || [ "$(ONLY)" = "calls" ]; then \
		exe=$$($(CARGO) build --release -p relay-bench --benches --message-format=json 2>/dev/null \
			| grep -o '"executable":"[^"]*plugin_calls[^"]*"' | cut -d'"' -f4); \
		[ -x "$$exe" ] || { echo "error: the plugin_calls benchmark was not built"; exit 1; }; \
		"$$exe" --bench --warm-up-time 1 --measurement-time 3; fi

# The peer side of `make bench ONLY=peer`: rnostr (a relay) and nostr-bench
# (the public load client), pinned, from crates.io into target/peers, built
# only when missing. Versions here and in bench/src/peer.rs agree.
PEERS := target/peers/bin
RNOSTR_VERSION := 0.4.8
NOSTR_BENCH_VERSION := 0.4.0
peers: $(PEERS)/rnostr $(PEERS)/nostr-bench
# rnostr always compiles its search extension, whose CJK dictionaries
# (lindera) download from outside crates.io at build time; DOCS_RS makes
# lindera build stub dictionaries instead. Search is off in the bench's
# rnostr config, so the relay measured is unchanged.
$(PEERS)/rnostr:
	DOCS_RS=1 $(CARGO) install --locked --root target/peers --version $(RNOSTR_VERSION) rnostr
$(PEERS)/nostr-bench:
	$(CARGO) install --locked --root target/peers --version $(NOSTR_BENCH_VERSION) nostr-bench

# Where the relay's CPU goes under one bench scenario (perf; a flamegraph too
# when inferno is installed): `make profile ONLY=ingest`, ONLY=query with
# PROFILE_RELAY=2 for the relay with the MLS gateway. See bench/profile.sh.
profile: rust-plugins
	$(CARGO) build --release -p wasm-relay -p relay-bench --bins --benches
	bash bench/profile.sh $(or $(ONLY),ingest)

# Fuzz targets (fuzz/fuzz_targets), each for FUZZ_SECONDS, on the nightly
# toolchain with cargo-fuzz (installed if missing). A crash stops the run and
# leaves its input in fuzz/artifacts/<target>/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := client_message filter_matching event_check plugin_results mls_key_packages
fuzz: rust-plugins
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz
	# Leak checks are off: the gateway target keeps one plugin host for the
	# whole run, and wasmtime's pooled fibers are still allocated at exit.
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		ASAN_OPTIONS=detect_leaks=0 cargo +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) \
			-rss_limit_mb=4096 -detect_leaks=0 || exit 1; \
	done

lint: wasm-target
	$(CARGO) fmt --all --check
	$(CARGO) clippy -p wasm-relay -p mls-e2e -p relay-bench --all-targets -- -D warnings
	$(CARGO) clippy --target $(WASM_TARGET) -p wasm-relay-plugin-sdk $(addprefix -p ,$(PLUGIN_CRATES)) -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
