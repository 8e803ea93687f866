#!/usr/bin/env bash
# Set up everything (apt, venv) and run the whole test suite against a real PostgreSQL
# that the harness starts itself.
set -euo pipefail
cd "$(dirname "$0")/.."
STRONGROOM_WITH_TEST_TOOLS=1 ./scripts/setup.sh
.venv/bin/ruff check proxy keys tests bench
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
