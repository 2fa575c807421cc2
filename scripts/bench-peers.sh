#!/usr/bin/env bash
# The relay's fanout beside its peers, one command, one session, the same machine and
# the same loads: 10,000 idle connections (server memory per connection), one event at
# a time to 10,000 connections, and 1,000 events/s to 100 subscribers.
#
#   (1) fanout: JWT-checked WebSocket clients scoped by account, events from the
#       JetStream stream (durable, resumable), published by loadgen as ingest would;
#   (2) nats-server's own WebSocket listener (a server of this script's own, no
#       JetStream), clients speaking the NATS protocol over WebSocket, events published
#       with core NATS;
#   (3) Sockudo (a Pusher-protocol server): loadgen has no Pusher client yet, so it is
#       only reported whether SOCKUDO_BIN names a binary
#       (`apt-get install protobuf-compiler`, its build needs protoc, then
#       `cargo install sockudo --root /work/.cache/sockudo`);
#   (4) the kernel floor (`loadgen floor --senders 2`), for fanout's ratio to it.
#
#   cargo build --release -p fanout -p loadgen
#   scripts/bench-peers.sh
#
# A benchmark, never a test: compare the rows of one run.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${BIN:-target/release}"
NATS_SERVER_BIN="${NATS_SERVER_BIN:-/usr/sbin/nats-server}"
CONNECTIONS="${CONNECTIONS:-10000}"
LOGS="target/bench-logs"
export RELAY_DEV=1 RUST_LOG="${RUST_LOG:-warn}"
export JWT_SECRET=loadtest-secret-0123456789abcdef0123456
export STREAM_NAME=LOADTEST_PEERS SUBJECT_PREFIX=loadtest.peers NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
mkdir -p "$LOGS"
ulimit -n "$(ulimit -Hn)"

pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

wait_port() { # host:port
  for _ in $(seq 1 120); do
    if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
    sleep 0.25
  done
  echo "error: nothing listens on $1" >&2
  return 1
}

echo "=== (1) fanout, one replica, stream $STREAM_NAME on $NATS_URL"
"$BIN/loadgen" stream --stream-name "$STREAM_NAME" --subject-prefix "$SUBJECT_PREFIX"
FANOUT_LISTEN=127.0.0.1:18001 "$BIN/fanout" serve >"$LOGS/peers-fanout.log" 2>&1 &
fanout_pid=$!
pids+=("$fanout_pid")
wait_port 127.0.0.1:18001
sleep 1
ws=ws://127.0.0.1:18001/ws/messages
publish=(--subject-prefix "$SUBJECT_PREFIX" --stream-name "$STREAM_NAME")
echo "--- idle: $CONNECTIONS connections"
"$BIN/loadgen" idle --url "$ws" --connections "$CONNECTIONS" --pid "$fanout_pid" --hold 1
echo "--- one event a second to $CONNECTIONS connections, 15 events"
"$BIN/loadgen" --threads 1 broadcast --url "$ws" --connections "$CONNECTIONS" --rate 1 --duration 15 "${publish[@]}"
echo "--- 1,000 events/s to 100 subscribers, 10 s"
"$BIN/loadgen" --threads 1 broadcast --url "$ws" --connections 100 --rate 1000 --duration 10 "${publish[@]}"
kill "$fanout_pid"

echo
echo "=== (2) nats-server $("$NATS_SERVER_BIN" --version | awk '{print $2}') WebSocket listener"
cat >"$LOGS/peers-nats-ws.conf" <<CONF
listen: 127.0.0.1:14222
max_connections: 100000
websocket { listen: "127.0.0.1:18090", no_tls: true }
CONF
"$NATS_SERVER_BIN" -c "$LOGS/peers-nats-ws.conf" >"$LOGS/peers-nats-ws.log" 2>&1 &
nats_pid=$!
pids+=("$nats_pid")
wait_port 127.0.0.1:18090
nats_ws=(--url ws://127.0.0.1:18090 --nats-url nats://127.0.0.1:14222)
echo "--- idle: $CONNECTIONS connections"
"$BIN/loadgen" nats-ws "${nats_ws[@]}" --connections "$CONNECTIONS" --events 0 --pid "$nats_pid"
echo "--- one event a second to $CONNECTIONS connections, 15 events"
"$BIN/loadgen" --threads 1 nats-ws "${nats_ws[@]}" --connections "$CONNECTIONS" --rate 1 --events 15
echo "--- 1,000 events/s to 100 subscribers, 10 s"
"$BIN/loadgen" --threads 1 nats-ws "${nats_ws[@]}" --connections 100 --rate 1000 --events 10000
kill "$nats_pid"

echo
echo "=== (4) the kernel floor: the same one-event fan-out to $CONNECTIONS loopback sockets, 2 writing threads"
"$BIN/loadgen" floor --connections "$CONNECTIONS" --senders 2 --events 15

echo
if [[ -n "${SOCKUDO_BIN:-}" && -x "${SOCKUDO_BIN}" ]]; then
  echo "=== (3) Sockudo at $SOCKUDO_BIN: no Pusher client in loadgen yet; not measured"
else
  echo "=== (3) Sockudo: SOCKUDO_BIN not set or not executable; not measured"
fi
