#!/usr/bin/env bash
# Makes a Docker engine and Compose usable for the compose end-to-end test, as root:
# installs Debian's docker.io, docker-compose and mmdebstrap when missing, starts
# dockerd when it does not answer (log: /var/log/dockerd.log), and stands in the base
# images that cannot be pulled (scripts/offline-images.sh, which pulls first).
# Idempotent: on a machine where all of this is in place it only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "docker-engine: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  echo "docker-engine: starting dockerd" >&2
  nohup dockerd >/var/log/dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/dockerd.log" >&2; exit 1; }
fi

scripts/offline-images.sh
