"""The performance benchmark (issue 7): the real engine against the sandbox under a latency model.

`python -m bench.run` (or `./scripts/bench.sh`) runs it and writes `bench/results.md` and
`bench/results.png`. The sandbox runs in its own process (`bench.host`) so that its CPU and memory
are not counted as the engine's, and the engine's memory high-water is its own.
"""
