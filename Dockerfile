# syntax=docker/dockerfile:1
# One image for the whole relay: `ingest`, `fanout` and `loadgen` in /usr/local/bin.
# docker-compose.yml picks the binary per service with `command`.
#
#   docker build -t unipile-relay .
#   docker run --rm unipile-relay ingest --help
#
# Stages: `chef` (toolchain + cargo-chef), `planner` (dependency recipe from the
# manifests), `builder` (dependencies first, cached while only our sources change; then
# our crates), `runtime` (debian slim, non-root, binaries only).

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN cargo install cargo-chef --locked --version ^0.1
WORKDIR /app

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
# Dependencies only: this layer is reused until Cargo.toml/Cargo.lock change.
RUN cargo chef cook --release --recipe-path recipe.json \
    -p ingest -p fanout -p loadgen
COPY . .
RUN cargo build --release --locked -p ingest -p fanout -p loadgen \
 && mkdir -p /out \
 && cp target/release/ingest target/release/fanout target/release/loadgen /out/

FROM debian:bookworm-slim AS runtime
# ca-certificates: HTTPS to Unipile; curl: container healthchecks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --home-dir /nonexistent --shell /usr/sbin/nologin relay
COPY --from=builder /out/ /usr/local/bin/
USER relay:relay
ENV LOG_FORMAT=json RUST_LOG=info
EXPOSE 8000 8001
# No ENTRYPOINT: the command names the binary (`ingest serve`, `fanout serve`, ...).
CMD ["ingest", "serve"]
