#!/usr/bin/env bash
# Install what Strongroom needs on a fresh Debian/Ubuntu machine: PostgreSQL server
# binaries (if initdb is missing), test/bench tools, and a venv with the package.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
need_apt=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need_apt+=(postgresql postgresql-contrib)
command -v psql >/dev/null || need_apt+=(postgresql-client)
command -v pgbench >/dev/null || need_apt+=(postgresql-contrib)
if [ "${STRONGROOM_WITH_TEST_TOOLS:-0}" = 1 ]; then
  command -v pgbouncer >/dev/null || need_apt+=(pgbouncer)
  command -v promtool >/dev/null || need_apt+=(prometheus)
  command -v softhsm2-util >/dev/null || need_apt+=(softhsm2)
  command -v javac >/dev/null || need_apt+=(default-jdk-headless)  # pgjdbc test (source launcher)
  [ -f /usr/share/java/postgresql.jar ] || need_apt+=(libpostgresql-jdbc-java)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || $PY -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'
