#!/usr/bin/env bash
# End to end, webhook sent to frame received, in one session: ingest with the relay
# alone (OUTBOX_PUBLISH_AFTER_COMMIT=false, the path before issue 17) and with the
# in-process handoff (the default), taking turns, against the same two fanout replicas,
# at RATE webhooks/s for DURATION s with CLIENTS WebSocket clients (each list is a
# space-separated set of runs). Every run prints loadgen poison's report: ack and
# end-to-end percentiles and the per-stage breakdown from the services' histograms.
#
#   cargo build --release -p ingest -p fanout -p loadgen
#   scripts/bench-e2e.sh                              # 100 then 10 clients, off/on each
#   CLIENTS="100" MODES="false true false true" scripts/bench-e2e.sh
#
# A benchmark, never a test: the machine is noisy, compare runs of one session.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${BIN:-target/release}"
RATE="${RATE:-1000}"
DURATION="${DURATION:-10}"
CLIENTS="${CLIENTS:-100 10}"
MODES="${MODES:-false true}"
ADMIN_DATABASE_URL="${ADMIN_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
DB="relay_bench_e2e"
LOGS="target/bench-logs"
export RELAY_DEV=1 RUST_LOG="${RUST_LOG:-warn}"
export WEBHOOK_SECRET=bench-webhook-secret-0123456789abcdef JWT_SECRET=bench-jwt-secret-0123456789abcdef0123
export DATABASE_URL="${ADMIN_DATABASE_URL%/*}/$DB" NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
export STREAM_NAME=BENCH_E2E SUBJECT_PREFIX=bench.e2e

mkdir -p "$LOGS"
psql "$ADMIN_DATABASE_URL" -qc "drop database if exists $DB" -c "create database $DB"

pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

wait_ready() { # url name pid
  for _ in $(seq 1 240); do
    if curl -fsS "$1" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$3" 2>/dev/null; then
      echo "error: $2 exited; see $LOGS/$2.log" >&2
      return 1
    fi
    sleep 0.25
  done
  echo "error: $2 not ready at $1" >&2
  return 1
}

ingest_pid=""
start_ingest() { # OUTBOX_PUBLISH_AFTER_COMMIT
  if [[ -n "$ingest_pid" ]]; then kill "$ingest_pid"; wait "$ingest_pid" 2>/dev/null || true; fi
  OUTBOX_PUBLISH_AFTER_COMMIT="$1" INGEST_LISTEN=127.0.0.1:18000 "$BIN/ingest" serve >"$LOGS/ingest.log" 2>&1 &
  ingest_pid=$!
  pids+=("$ingest_pid")
  wait_ready http://127.0.0.1:18000/readyz ingest "$ingest_pid"
}

start_ingest true
for port in 18001 18002; do
  FANOUT_LISTEN="127.0.0.1:$port" "$BIN/fanout" serve >"$LOGS/fanout-$port.log" 2>&1 &
  pids+=($!)
  wait_ready "http://127.0.0.1:$port/readyz" "fanout-$port" "${pids[-1]}"
done

for clients in $CLIENTS; do
  for mode in $MODES; do
    start_ingest "$mode"
    echo
    echo "=== OUTBOX_PUBLISH_AFTER_COMMIT=$mode, $clients clients over 2 replicas, $RATE/s for ${DURATION}s"
    "$BIN/loadgen" --threads 1 poison --url http://127.0.0.1:18000 \
      --ws-url ws://127.0.0.1:18001/ws/messages,ws://127.0.0.1:18002/ws/messages \
      --rate "$RATE" --duration "$DURATION" --poison 0 --clients "$clients" --grace 3
  done
done
