#!/usr/bin/env bash
# The whole test suite: lint, the type checker (mypy, strict on shared/), then pytest (the fixtures
# start Azurite and the sandbox themselves).
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k planner -x
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m mypy  # [tool.mypy] in pyproject.toml: which files, how strict
exec .venv/bin/python -m pytest "$@"
