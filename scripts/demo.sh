#!/usr/bin/env bash
# Set up and run the demo: a throwaway PostgreSQL and the proxy with the example config.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/strongroom demo "$@"
