#!/usr/bin/env bash
# The demo: starts Azurite and the simulated cloud, seeds a demo tenant, runs a full sync and then an
# incremental one through the HTTP function Azure calls, and prints the reports. With --serve it then
# keeps the self-service page up on http://127.0.0.1:7071/api/selfservice and prints who can sign in.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/python -m sandbox.demo "$@"
