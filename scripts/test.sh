#!/usr/bin/env bash
# The whole test suite: lint, then pytest (the fixtures start Azurite and the sandbox themselves).
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k planner -x
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
