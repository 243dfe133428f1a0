#!/usr/bin/env bash
# Throwaway PostgreSQL on 127.0.0.1 for the Optuna-storage test (tests/test_sweep_postgres.py).
#
#   eval "$(bash .ci/postgres.sh)"        start (installing the Debian package if missing) and export
#                                         STEEL_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:PORT/steel_test
#                                         and STEEL_TEST_POSTGRES_DIR (the cluster's directory)
#   bash .ci/postgres.sh stop DIR         stop the cluster started in DIR and delete it
#
# Only `export ...` lines go to stdout; all else to stderr. The cluster listens on loopback only, with trust
# auth and fsync off: for tests, never for data. Env: STEEL_PG_PORT (54329), STEEL_PG_DIR (a new temp dir),
# STEEL_PG_NO_INSTALL=1 (fail instead of apt-get install).
set -euo pipefail
exec 3>&1 1>&2

PORT="${STEEL_PG_PORT:-54329}"
DB=steel_test

pg_bin() { find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1; }

BIN="$(pg_bin)"
if [ -z "$BIN" ] && command -v initdb >/dev/null 2>&1; then
  BIN="$(dirname "$(readlink -f "$(command -v initdb)")")"
fi

as_pg() {  # initdb/postgres refuse to run as root: use the postgres account then
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ "${1:-}" = stop ]; then
  dir="${2:?usage: postgres.sh stop DIR}"
  if [ -n "$BIN" ] && [ -d "$dir/data" ]; then as_pg "$BIN/pg_ctl" -D "$dir/data" -m immediate -w stop || true; fi
  rm -rf "$dir"
  exit 0
fi

if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
  if [ "${STEEL_PG_NO_INSTALL:-0}" = 1 ]; then
    echo "postgres.sh: PostgreSQL is not installed (and STEEL_PG_NO_INSTALL=1)"; exit 1
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "postgres.sh: PostgreSQL is not installed and apt-get needs root"; exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  BIN="$(pg_bin)"
  [ -n "$BIN" ] || { echo "postgres.sh: no /usr/lib/postgresql/*/bin after installing"; exit 1; }
fi

URL="postgresql+psycopg://postgres@127.0.0.1:$PORT/$DB"
if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
  echo "postgres.sh: a server already listens on 127.0.0.1:$PORT; reusing it"
  "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$DB'" | grep -q 1 \
    || "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
  printf 'export STEEL_TEST_POSTGRES_URL=%s\n' "$URL" >&3
  exit 0
fi

if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
fi
DIR="${STEEL_PG_DIR:-$(mktemp -d /tmp/steel-pg.XXXXXX)}"
mkdir -p "$DIR"
chmod 755 "$DIR"
[ "$(id -u)" = 0 ] && chown postgres "$DIR"
as_pg "$BIN/initdb" -D "$DIR/data" -U postgres -A trust -E UTF8 --no-sync >/dev/null
as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
  -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
  start >/dev/null 3>&- || { cat "$DIR/server.log"; exit 1; }  # the server must not hold our stdout
"$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
echo "postgres.sh: $("$BIN/postgres" --version) on 127.0.0.1:$PORT, cluster in $DIR"
printf 'export STEEL_TEST_POSTGRES_URL=%s\nexport STEEL_TEST_POSTGRES_DIR=%s\n' "$URL" "$DIR" >&3
