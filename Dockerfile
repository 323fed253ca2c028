# wasm-relay container image: the relay binary plus the MLS gateway plugin,
# running as an unprivileged user with its data in /var/lib/wasm-relay.
#
#   docker build -t wasm-relay .
#   docker run -p 7777:7777 -v relay-data:/var/lib/wasm-relay wasm-relay
#
# Configuration comes from the environment (WASM_RELAY_*, see
# relay.example.toml) or a mounted file passed with --config.

FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN rustup target add wasm32-wasip2
COPY . .
RUN make rust-plugins && cargo build --release -p wasm-relay

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/wasm-relay --create-home relay
COPY --from=build /src/target/release/wasm-relay /usr/local/bin/wasm-relay
COPY --from=build /src/target/plugins/mls_gateway.wasm /opt/wasm-relay/plugins/mls_gateway.wasm
COPY relay.example.toml /opt/wasm-relay/relay.example.toml
USER relay
WORKDIR /var/lib/wasm-relay
ENV WASM_RELAY_BIND=0.0.0.0:7777 \
    WASM_RELAY_DATA_DIR=/var/lib/wasm-relay/data \
    WASM_RELAY_LOG__FORMAT=json
VOLUME ["/var/lib/wasm-relay"]
EXPOSE 7777
# Load balancers and orchestrators probe GET /health and GET /ready.
ENTRYPOINT ["wasm-relay"]
CMD ["serve", "--plugin", "mls-gateway=/opt/wasm-relay/plugins/mls_gateway.wasm"]
