# syntax=docker/dockerfile:1
#
# chatgate container image.
#
#   docker build -t chatgate:0.1.0 .
#   docker run --rm chatgate:0.1.0 --version
#
# Stages: `chef` (toolchain + cargo-chef), `planner` (dependency recipe from
# the manifests), `builder` (dependencies in their own cached layer, then the
# release binary), `runtime` (distroless, no shell, non-root).
#
# The builder and the runtime must share a Debian release (bookworm = the
# distroless debian12 images), so that the binary finds the glibc it was
# linked against.

ARG RUST_VERSION=1.95
ARG CARGO_CHEF_VERSION=0.1.78

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
ARG CARGO_CHEF_VERSION
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /app

# The recipe lists the dependency graph only: it changes when Cargo.toml or
# Cargo.lock change, not when the source does.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
# Dependencies: cached until the recipe changes.
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin chatgate
COPY . .
# The release binary, then smoke tests: it runs, and the configuration files
# shipped in the image load (production environment, with the two settings a
# deployment must provide: a store and an auth decision).
RUN cargo build --release --locked --bin chatgate \
    && ./target/release/chatgate --version \
    && CHATGATE_AUTH__ENABLED=false CHATGATE_STORE__BACKEND=memory \
       ./target/release/chatgate --check-config --config-dir config

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="chatgate" \
      org.opencontainers.image.description="A hardened real-time chat gateway on Redis" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /app/target/release/chatgate /usr/local/bin/chatgate
# config/<environment>.toml files, read-only (owned by root); the defaults are
# compiled into the binary.
COPY config/ /etc/chatgate/
ENV CHATGATE_CONFIG_DIR=/etc/chatgate
# distroless "nonroot": numeric, so that runAsNonRoot can verify it. Nothing is
# written to the filesystem: it runs with a read-only root.
USER 65532:65532
# 8000: REST, WebSocket, /healthz, /readyz. 9090: admin (metrics, to come).
EXPOSE 8000 9090
ENTRYPOINT ["/usr/local/bin/chatgate"]
