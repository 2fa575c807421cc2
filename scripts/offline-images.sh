#!/usr/bin/env bash
# Test aid for machines that cannot reach Docker Hub: stands in, under the same tags,
# the base images the Dockerfile and docker-compose.yml name, built from Debian's
# packages. For each tag: kept when the engine already has it; else pulled; built here
# only when the pull fails. So on a machine that can pull, this script changes nothing.
#
#   scripts/offline-images.sh            # every tag below
#   scripts/offline-images.sh nats:2.10-alpine
#
# How the stand-ins differ from the real images (see also the README):
# - all are Debian bookworm (apt variant of mmdebstrap), not Alpine, so larger;
# - nats:2.10-alpine runs Debian's nats-server (2.9), postgres:16-alpine Debian's
#   PostgreSQL 15, nginx:1.27-alpine Debian's nginx-light (1.22);
# - rust:1.95-slim-bookworm carries this machine's own Rust toolchain (rustup's
#   sysroot copied in), not rustup;
# - they trust this machine's extra CA certificates (/usr/local/share/ca-certificates),
#   which a TLS-inspecting proxy needs (cargo in the Dockerfile reaches crates.io);
# - the entrypoints do what compose asks of the real ones (command-line flags for NATS;
#   POSTGRES_USER/PASSWORD/DB, PGDATA and /docker-entrypoint-initdb.d for PostgreSQL;
#   conf.d for nginx), not everything the real ones can.
# natsio/nats-box (the debug profile) has no stand-in: `fanout tail` reads the stream.
set -euo pipefail

TAGS=(debian:bookworm-slim rust:1.95-slim-bookworm nats:2.10-alpine postgres:16-alpine nginx:1.27-alpine)
[ "$#" -gt 0 ] && TAGS=("$@")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

log() { echo "offline-images: $*" >&2; }

have() { docker image inspect "$1" >/dev/null 2>&1; }

# Present, pulled, or to be built here.
needs_stand_in() {
  if have "$1"; then return 1; fi
  if timeout 60 docker pull -q "$1" >/dev/null 2>&1; then
    log "$1 pulled"
    return 1
  fi
  log "$1 cannot be pulled: building a stand-in"
  return 0
}

build_debian() {
  local certs=/usr/local/share/ca-certificates
  mmdebstrap --variant=apt --include=ca-certificates --quiet \
    --customize-hook="if [ -d $certs ]; then cp -r $certs/. \"\$1$certs/\"; fi" \
    --customize-hook='chroot "$1" update-ca-certificates >/dev/null' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/*' \
    bookworm - http://deb.debian.org/debian |
    docker import --change 'CMD ["bash"]' \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      - debian:bookworm-slim >/dev/null
}

# `docker build` of $WORK/$1 (a Dockerfile and its files) as tag $2.
build_dir() {
  # The classic builder: BuildKit would fetch its Dockerfile frontend from Docker Hub.
  DOCKER_BUILDKIT=0 docker build -q -t "$2" "$WORK/$1" 2>&1 >/dev/null | { grep -v -e DEPRECATED -e BuildKit -e "environment-variable" -e "^$" >&2 || true; }
}

build_rust() {
  mkdir -p "$WORK/rust"
  cp -a "$(rustc --print sysroot)" "$WORK/rust/toolchain"
  rm -rf "$WORK/rust/toolchain/share/doc"
  cat >"$WORK/rust/Dockerfile" <<'EOF'
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config make \
 && rm -rf /var/lib/apt/lists/*
COPY toolchain /usr/local/rust
ENV RUSTUP_HOME=/usr/local/rust CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /usr/local/cargo/bin && cargo --version && rustc --version
EOF
  build_dir rust rust:1.95-slim-bookworm
}

build_nats() {
  mkdir -p "$WORK/nats"
  cat >"$WORK/nats/entrypoint.sh" <<'EOF'
#!/bin/sh
# As the real image: arguments that start with "-" are nats-server's flags.
set -e
if [ "${1#-}" != "$1" ]; then set -- nats-server "$@"; fi
exec "$@"
EOF
  cat >"$WORK/nats/Dockerfile" <<'EOF'
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nats-server wget \
 && rm -rf /var/lib/apt/lists/*
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 755 /usr/local/bin/docker-entrypoint.sh
EXPOSE 4222 6222 8222
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["nats-server"]
EOF
  build_dir nats nats:2.10-alpine
}

build_postgres() {
  mkdir -p "$WORK/postgres"
  cat >"$WORK/postgres/entrypoint.sh" <<'EOF'
#!/bin/bash
# The parts of the real image's entrypoint that compose uses: a first start creates
# the cluster in $PGDATA with POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB and runs
# /docker-entrypoint-initdb.d; every start runs postgres in the foreground.
set -euo pipefail
export PGDATA=${PGDATA:-/var/lib/postgresql/data}
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
mkdir -p "$PGDATA" /var/run/postgresql
chown -R postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"
as_postgres() { runuser -u postgres -- "$@"; }
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}"
  pwfile=$(mktemp)
  printf '%s' "$POSTGRES_PASSWORD" >"$pwfile"
  chown postgres "$pwfile"
  as_postgres initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  as_postgres pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  if [ "$db" != postgres ]; then
    as_postgres psql -q -U "$user" -d postgres -c "create database \"$db\""
  fi
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sql) as_postgres psql -q -U "$user" -d "$db" -f "$f" ;;
      *.sh) . "$f" ;;
    esac
  done
  as_postgres pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec runuser -u postgres -- postgres -D "$PGDATA" "$@"
EOF
  cat >"$WORK/postgres/Dockerfile" <<'EOF'
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /docker-entrypoint-initdb.d
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 755 /usr/local/bin/docker-entrypoint.sh
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
EOF
  build_dir postgres postgres:16-alpine
}

build_nginx() {
  mkdir -p "$WORK/nginx"
  cat >"$WORK/nginx/Dockerfile" <<'EOF'
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light wget \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default \
 && ln -sf /dev/stdout /var/log/nginx/access.log \
 && ln -sf /dev/stderr /var/log/nginx/error.log
STOPSIGNAL SIGQUIT
EXPOSE 80
CMD ["nginx", "-g", "daemon off;"]
EOF
  build_dir nginx nginx:1.27-alpine
}

# The base first: every other stand-in is built on it.
if needs_stand_in debian:bookworm-slim; then
  build_debian
  log "debian:bookworm-slim built"
fi
for tag in "${TAGS[@]}"; do
  [ "$tag" = debian:bookworm-slim ] && continue
  needs_stand_in "$tag" || continue
  case "$tag" in
    rust:1.95-slim-bookworm) build_rust ;;
    nats:2.10-alpine) build_nats ;;
    postgres:16-alpine) build_postgres ;;
    nginx:1.27-alpine) build_nginx ;;
    *) log "no stand-in known for $tag"; exit 1 ;;
  esac
  log "$tag built"
done
