#!/usr/bin/env bash
# The demo: starts Azurite and the simulated cloud, seeds a demo tenant, runs a full sync and then an
# incremental one through the HTTP function Azure calls, and prints the reports.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/python -m sandbox.demo "$@"
