#!/usr/bin/env bash
# One-command local run, for a machine that already has PostgreSQL and NATS (JetStream):
# builds ingest, fanout and loadgen, starts them with development settings, starts the
# traffic simulator, and prints the inbox page URL and a development token.
# Ctrl-C stops everything it started.
#
#   scripts/dev.sh                 # debug build
#   PROFILE=release scripts/dev.sh # optimised build
#   SIMULATE=0 scripts/dev.sh      # no simulated traffic
#
# Every setting below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE="${PROFILE:-debug}"
# The server's maintenance database (DATABASE_URL as CI sets it), where relay_dev is created.
ADMIN_DATABASE_URL="${ADMIN_DATABASE_URL:-${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}}"
DEV_DATABASE="${DEV_DATABASE:-relay_dev}"
export DATABASE_URL="${DEV_DATABASE_URL:-${ADMIN_DATABASE_URL%/*}/${DEV_DATABASE}}"
export NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
# Development mode: the short, documented secrets below are accepted (never in production).
export RELAY_DEV=1
export WEBHOOK_SECRET="${WEBHOOK_SECRET:-dev-webhook-secret}"
export JWT_SECRET="${JWT_SECRET:-dev-jwt-secret}"
export INGEST_LISTEN="${INGEST_LISTEN:-127.0.0.1:8000}"
export FANOUT_LISTEN="${FANOUT_LISTEN:-127.0.0.1:8001}"
INGEST_URL="http://${INGEST_LISTEN}"
PAGE_URL="http://${FANOUT_LISTEN}"
# The page is served by fanout and calls ingest's REST API on another port.
export CORS_ORIGINS="${CORS_ORIGINS:-${PAGE_URL},http://localhost:${FANOUT_LISTEN##*:}}"
# ...and the page may send its token to ingest's origin (a link naming another is ignored).
export FANOUT_PAGE_API_ORIGINS="${FANOUT_PAGE_API_ORIGINS:-${INGEST_URL},http://localhost:${INGEST_LISTEN##*:}}"
export RUST_LOG="${RUST_LOG:-info}"
SIMULATE="${SIMULATE:-1}"
SIMULATE_RATE="${SIMULATE_RATE:-1}"
LOGS="target/dev-logs"

build_flags=()
[[ "$PROFILE" == release ]] && build_flags+=(--release)
echo "building ingest, fanout, loadgen ($PROFILE)"
cargo build "${build_flags[@]}" -p ingest -p fanout -p loadgen
BIN="target/$PROFILE"

if command -v psql >/dev/null; then
  if ! psql "$ADMIN_DATABASE_URL" -tAc "select 1 from pg_database where datname = '$DEV_DATABASE'" | grep -q 1; then
    echo "creating database $DEV_DATABASE"
    psql "$ADMIN_DATABASE_URL" -qc "create database \"$DEV_DATABASE\""
  fi
else
  echo "psql not found: make sure $DATABASE_URL exists" >&2
fi

mkdir -p "$LOGS"
pids=()
cleanup() {
  trap - EXIT INT TERM
  echo
  echo "stopping ${#pids[@]} processes"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

wait_ready() { # url name pid
  for _ in $(seq 1 120); do
    if curl -fsS "$1" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$3" 2>/dev/null; then
      echo "error: $2 exited; see $LOGS/$2.log" >&2
      tail -n 20 "$LOGS/$2.log" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "error: $2 not ready at $1; see $LOGS/$2.log" >&2
  return 1
}

"$BIN/ingest" serve >"$LOGS/ingest.log" 2>&1 &
pids+=($!)
wait_ready "$INGEST_URL/readyz" ingest "${pids[-1]}"
"$BIN/fanout" serve >"$LOGS/fanout.log" 2>&1 &
pids+=($!)
wait_ready "$PAGE_URL/readyz" fanout "${pids[-1]}"

TOKEN="$("$BIN/fanout" token --sub dev --accounts '*' --ttl-secs 86400)"
cat <<INFO

  Relay is up.
    inbox page : $PAGE_URL/?api=$INGEST_URL&token=$TOKEN
                 (or open $PAGE_URL/ and paste the token; API base $INGEST_URL)
    dev token  : $TOKEN
    REST API   : curl -H "Authorization: Bearer \$TOKEN" $INGEST_URL/api/chats
    tail       : $BIN/fanout tail
    logs       : $LOGS/ingest.log, $LOGS/fanout.log
  Ctrl-C stops everything.

INFO

if [[ "$SIMULATE" == 1 ]]; then
  "$BIN/loadgen" simulate --url "$INGEST_URL" --rate "$SIMULATE_RATE" &
  pids+=($!)
fi
# Stop everything as soon as one of them exits.
wait -n "${pids[@]}"
