# wasm-relay: `make run` starts the relay, `make test` runs every test.
CARGO ?= cargo
WASM_TARGET := wasm32-wasip2

.PHONY: all run build plugins wasm-target test lint fmt clean

all: build

# The plugin target is the one thing cargo cannot install itself.
wasm-target:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

# Plugins are WebAssembly components built for wasm32-wasip2.
plugins: wasm-target
	$(CARGO) build --release --target $(WASM_TARGET) -p mls-gateway

build: plugins
	$(CARGO) build --release -p wasm-relay

# Starts the relay on ws://127.0.0.1:7777 with its data in ./data.
run: build
	./target/release/wasm-relay serve

# Unit tests, then integration tests that drive the real binary over WebSockets.
test: plugins
	$(CARGO) test -p wasm-relay --no-fail-fast

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy -p wasm-relay --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
