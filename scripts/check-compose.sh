#!/usr/bin/env bash
# Checks docker-compose.yml, alone and with docker-compose.cluster.yml over it (NATS as
# a three-server cluster), without needing a Docker engine:
#  1. with a Compose implementation when one is installed (`docker compose` v2 or
#     `docker-compose`), which parses and validates the file without the engine;
#  2. mechanically against the binaries: the e2e `compose` test turns every relay
#     service's command and environment into the argument list its binary would see and
#     parses it with that binary's own clap definition, and checks
#     ports, health-gated start order, profiles and the gateway routes; nats-server
#     itself checks every NATS command of both (`nats-server -t`).
# The second step also runs in `cargo nextest run --workspace`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Compose refuses to interpolate the file without the secrets; check it with stand-ins.
export WEBHOOK_SECRET="${WEBHOOK_SECRET:-check-compose-stand-in-0123456789abcdef}"
export JWT_SECRET="${JWT_SECRET:-check-compose-stand-in-0123456789abcdef}"
export NATS_PASSWORD="${NATS_PASSWORD:-check-compose-stand-in-0123456789abcdef}"
export POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-check-compose-stand-in-0123456789abcdef}"

if docker compose version >/dev/null 2>&1; then
  docker compose --profile debug --profile demo config -q
  docker compose -f docker-compose.yml -f docker-compose.cluster.yml --profile debug --profile demo config -q
  echo "docker compose config: ok"
elif command -v docker-compose >/dev/null 2>&1; then
  docker-compose --profile debug --profile demo config -q
  docker-compose -f docker-compose.yml -f docker-compose.cluster.yml --profile debug --profile demo config -q
  echo "docker-compose config: ok"
else
  echo "no Compose CLI installed: skipping its validation; the mechanical check still runs"
fi

cargo test -q -p e2e --test compose
