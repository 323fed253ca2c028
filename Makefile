# wasm-relay: `make run` starts the relay, `make test` runs every test.
CARGO ?= cargo
WASM_TARGET := wasm32-wasip2

.PHONY: all run build plugins test-plugins wasm-target test lint fmt clean bench peers profile fuzz

all: build

# The plugin target is the one thing cargo cannot install itself.
wasm-target:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

PLUGIN_BUILD := target/$(WASM_TARGET)/plugin
PLUGIN_OUT := target/plugins
# Plugin components and where they end up: target/plugins/<name>.wasm.
# Shipped plugins (what `make run` and the bench load), then the test-only ones.
SHIPPED_PLUGINS := mls-gateway kind-allowlist pinned-events
TEST_PLUGINS := probe future-wit
PLUGIN_CRATES := $(SHIPPED_PLUGINS) $(TEST_PLUGINS)

# Plugins are WebAssembly components built for wasm32-wasip2.
plugins: wasm-target
	$(CARGO) build --profile plugin --target $(WASM_TARGET) $(addprefix -p ,$(SHIPPED_PLUGINS))
	mkdir -p $(PLUGIN_OUT)
	cp $(PLUGIN_BUILD)/mls_gateway.wasm $(PLUGIN_BUILD)/kind_allowlist.wasm $(PLUGIN_BUILD)/pinned_events.wasm $(PLUGIN_OUT)/

# Test instruments, for `make test` only: the probe plugin twice (v1, v2) for
# the hot-swap tests; future-wit targets a contract version the relay refuses.
test-plugins: plugins
	$(CARGO) build --profile plugin --target $(WASM_TARGET) $(addprefix -p ,$(TEST_PLUGINS))
	cp $(PLUGIN_BUILD)/probe.wasm $(PLUGIN_BUILD)/future_wit.wasm $(PLUGIN_OUT)/
	$(CARGO) build --profile plugin --target $(WASM_TARGET) -p probe --features v2
	cp $(PLUGIN_BUILD)/probe.wasm $(PLUGIN_OUT)/probe_v2.wasm

build: plugins
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
# rest, and a new replica's join time, on the Firestore emulator).
# One cargo build makes the relay, the load generator and the criterion
# executable, which then runs directly (`cargo bench` would build it again).
bench: plugins
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
profile: plugins
	$(CARGO) build --release -p wasm-relay -p relay-bench --bins --benches
	bash bench/profile.sh $(or $(ONLY),ingest)

# Fuzz targets (fuzz/fuzz_targets), each for FUZZ_SECONDS, on the nightly
# toolchain with cargo-fuzz (installed if missing). A crash stops the run and
# leaves its input in fuzz/artifacts/<target>/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := client_message filter_matching event_check plugin_results mls_key_packages
fuzz: plugins
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
