#!/usr/bin/env bash
# Every test, on a fresh machine: sets up what the tests need, then runs them all.
#
#   scripts/test.sh                 # the whole suite (what CI runs)
#   scripts/test.sh -p ingest       # arguments go to `cargo nextest run`
#
# Sets up, when absent: PostgreSQL and NATS (JetStream) on their usual local ports,
# Debian's chromium and chromium-driver (browser tests), nginx-light (gateway tests),
# and a Docker engine with Compose and the base images (scripts/docker-engine.sh, for
# the compose end-to-end test). Needs root for what it installs or starts.
set -euo pipefail
cd "$(dirname "$0")/.."

wait_for_port() { # host port name
  for _ in $(seq 1 60); do
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
    sleep 0.5
  done
  echo "error: $3 is not listening on $1:$2" >&2
  return 1
}

install() { # packages...
  echo "installing $*"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then install postgresql; fi
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
  if [ ! -x /usr/sbin/nats-server ]; then install nats-server; fi
  echo "starting NATS"
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
fi
wait_for_port 127.0.0.1 5432 PostgreSQL
wait_for_port 127.0.0.1 4222 NATS

# Browser tests drive Debian's Chromium through chromedriver; gateway tests run nginx.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  install chromium chromium-driver
fi
if [ ! -x "${NGINX_BIN:-/usr/sbin/nginx}" ]; then install nginx-light; fi

# The compose end-to-end test: dockerd, Compose and the base images.
scripts/docker-engine.sh

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"

# Tests drop their databases when they end; an interrupted run may leave some behind.
psql "$DATABASE_URL" -Atqc "select format('drop database if exists %I with (force);', datname)
  from pg_database where datname ~ '^test_[a-z0-9_]*_[0-9a-f]{32}$'" | psql "$DATABASE_URL" -q >/dev/null || true

cargo nextest run --workspace --no-fail-fast "$@"
