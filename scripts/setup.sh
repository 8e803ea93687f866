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
stamp=.venv/.strongroom-installed
[ -x .venv/bin/python ] || { rm -f "$stamp"; $PY -m venv .venv; }
# pip only when pyproject.toml changed since the last successful install: the package is
# installed editable, so code changes need no reinstall, and every start of demo.sh or
# test.sh would otherwise pay for (and print) a full resolve. rm the stamp to force it.
want="$(sha256sum pyproject.toml | cut -d' ' -f1) .[test]"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test]'
  printf '%s\n' "$want" >"$stamp"
fi
