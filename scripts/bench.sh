#!/usr/bin/env bash
# The performance benchmark (issue 7): starts Azurite and the simulated cloud (in its own process),
# drives the real engine through the cases under the latency model, prints every target as PASS/FAIL
# and writes bench/results.md and bench/results.png. Exits non-zero when a target fails.
# The full run takes a long while (the 20,000-contact sync alone is bound by Graph's per-mailbox
# budget); ./scripts/bench.sh --quick is the few-minute sanity check. Extra arguments go to
# `python -m bench.run` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/python -m bench.run "$@"
