"""The benchmark command: `python -m bench.run [--quick] [--case NAME ...]` (see `--help`).

Runs the cases of issue 7 against a real Azurite and the sandbox (in its own process) under the
latency model, prints every figure and every target as PASS/FAIL, writes `bench/results.md` and
`bench/results.png` (a full run; other profiles write to `bench/out/`), and exits non-zero when any
target fails.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.bounds import Model
from bench.cases import (
    OUT,
    CaseResult,
    Rig,
    companies_group,
    engine_warnings,
    log,
    multi_user_group,
    photos_group,
    single_user_group,
)
from bench.measure import MemoryWatch
from bench.report import (
    evaluate,
    load_json,
    machine_info,
    print_verdicts,
    save_json,
    write_markdown,
    write_plot,
)

HERE = Path(__file__).resolve().parent
FULL_SIZES = (1000, 5000, 20_000)
QUICK_SIZES = (200, 1000)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="N = 200 and 1,000, and 5 users x 500 (a few minutes)"
    )
    p.add_argument(
        "--case",
        action="append",
        default=[],
        metavar="NAME",
        help=(
            "only these groups: n<N> (e.g. n1000) for one user with N contacts, users<U> for U users, "
            "photos<N> for N contacts with pictures, companies<K> for one user syncing K companies of "
            "500 contacts; repeatable; `latency`: the change-notification latency case (bench/latency.py; alone, it "
            "writes only its own report; a full run includes it in results.md)"
        ),
    )
    p.add_argument("--users", type=int, help="users in the multi-user case (default 50; --quick: 5)")
    p.add_argument("--contacts-per-user", type=int, default=500, help="contacts in the multi-user case")
    p.add_argument("--max-parallel", type=int, help="run_users' max_parallel (default: the engine's own)")
    p.add_argument("--graph-latency", type=float, default=0.1, help="seconds per Graph item (default 0.1)")
    p.add_argument("--bc-latency", type=float, default=0.05, help="seconds per BC request (default 0.05)")
    p.add_argument(
        "--profile",
        nargs="?",
        const="wall",
        choices=("wall", "cpu"),
        help="cProfile each case's calling thread into bench/out/ (wall clock, or that thread's CPU time)",
    )
    p.add_argument("--output", type=Path, help="where to write the markdown (default: see above)")
    p.add_argument("--no-calibration", action="store_true", help="skip measuring the latency model")
    p.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="no run: write the markdown and plot again from a run's saved figures (bench/out/*.json)",
    )
    return p.parse_args(argv)


def plan_groups(args: argparse.Namespace) -> list[str]:
    if args.case:
        return args.case
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    users = args.users or (5 if args.quick else 50)
    groups = [f"n{n}" for n in sizes] + [f"users{users}", "photos1000", "companies3"]
    # The latency case edits for minutes of real time: the full run has it, --quick leaves it out.
    return groups if args.quick else [*groups, "latency"]


def run_group(name: str, conn: str, model: Model, args: argparse.Namespace) -> list[CaseResult]:
    if name.startswith("n") and name[1:].isdigit():
        return single_user_group(conn, model, int(name[1:]), args.profile)
    if name.startswith("photos") and name[6:].isdigit():
        return photos_group(conn, model, int(name[6:]), args.profile)
    if name.startswith("users") and name[5:].isdigit():
        return multi_user_group(
            conn, model, int(name[5:]), args.contacts_per_user, args.max_parallel, args.profile
        )
    if name.startswith("companies") and name[9:].isdigit():
        return companies_group(conn, model, int(name[9:]), profile=args.profile)
    raise SystemExit(f"unknown case {name!r}: use n<N>, users<U>, photos<N> or companies<K>")


def calibrate(conn: str, model: Model) -> dict[str, Any]:
    """Measure the latency model through the engine's own HTTP client: one Graph request, one
    `$batch` of 20, two such batches at once (they share the mailbox's 4 slots), BC one and ten at once."""
    from shared.auth import GRAPH_SCOPE
    from shared.http_client import BatchItem, HttpClient, RequestCounter

    upn = "calibration@contoso.example"
    out: dict[str, Any] = {}
    with Rig(conn, model) as rig:
        limits = rig.host.limits()
        out["sandbox limits"] = limits
        mismatch = {
            "graph_mailbox_concurrency": model.graph_concurrency,
            "graph_rate_limit": model.graph_rate_limit,
            "bc_max_concurrent": model.bc_concurrency,
        }
        for key, want in mismatch.items():
            if limits[key] != want:
                out[f"WARNING {key}"] = f"sandbox {limits[key]} but the bound assumes {want}"
        made = rig.host.calibration_folder(upn, 20)
        bc, graph = rig.services.clients(RequestCounter())
        raw = HttpClient(
            "graph",
            lambda: rig.services.tokens.token(GRAPH_SCOPE),
            max_attempts=1,  # see the 429s instead of retrying them
            default_headers={"Prefer": 'IdType="ImmutableId"'},
        )
        base = rig.services.config.graph_base_url
        items = [
            BatchItem("GET", f"/users/{upn}/contactFolders/{made['folder_id']}/contacts/{cid}?$select=id")
            for cid in made["ids"]
        ]
        graph.find_folder(upn, "Calibration")  # warm the token and the connection
        bc.companies()

        def timed(fn: Any) -> tuple[Any, float]:
            started = time.perf_counter()
            value = fn()
            return value, time.perf_counter() - started

        _, t = timed(lambda: graph.find_folder(upn, "Calibration"))
        out["Graph, one request"] = f"{t:.3f} s (model {model.graph_latency:.3f} s)"
        res, t = timed(lambda: raw.batch(f"{base}/$batch", items, 20))
        envelope = model.graph_latency if model.graph_envelope_latency else 0.0
        expect = envelope + model.graph_latency * 20 / model.graph_concurrency
        out["Graph, one $batch of 20"] = (
            f"{t:.3f} s, statuses {_statuses(res)} (5 rounds of 4"
            + (" + the envelope" if envelope else "")
            + f" = {expect:.2f} s)"
        )
        with ThreadPoolExecutor(2) as pool:
            started = time.perf_counter()
            both = list(pool.map(lambda _: raw.batch(f"{base}/$batch", items, 20), range(2)))
            t = time.perf_counter() - started
        out["Graph, two $batch of 20 at once"] = (
            f"{t:.3f} s, statuses {_statuses(both[0] + both[1])} (the 4 slots are held during the latency, "
            "so the second batch's items are refused while the first runs)"
        )
        _, t = timed(bc.companies)
        out["BC, one request"] = f"{t:.3f} s (model {model.bc_latency:.3f} s)"
        rig.host.reset_counters()
        with ThreadPoolExecutor(10) as pool:
            started = time.perf_counter()
            list(pool.map(lambda _: bc.companies(), range(10)))
            t = time.perf_counter() - started
        snap = rig.host.snapshot()
        out["BC, ten requests at once"] = (
            f"{t:.3f} s, peak concurrent {snap['bc_peak_active']}, 429s {snap['bc']['statuses'].get(429, 0)} "
            f"(5 at a time, the rest queued: {2 * model.bc_latency:.2f} s)"
        )
    return out


def git_revision() -> str:
    """The commit the run measured, and whether the working tree differed from it."""
    root = HERE.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (" with uncommitted changes to tracked files" if dirty else "")


def _statuses(results: list[Any]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return dict(sorted(counts.items()))


def print_results(results: list[CaseResult]) -> None:
    for c in results:
        rate = c.refusals.get("graph_rate", 0) + c.refusals.get("bc_rate", 0)
        print(
            f"{c.name}: wall {c.wall:.1f}s (store {c.store_critical:.1f}s, API {c.api_wall:.1f}s) "
            f"bound {c.bound_time:.1f}s ratio {c.time_ratio:.2f} | Graph {c.graph_http} req "
            f"(bound {c.bound_graph}), {c.graph_items} items, max {c.mailbox_http_max} req/mailbox | "
            f"BC {c.bc_http} req (bound {c.bound_bc}) | ratio {c.ratio:.2f} | 429 conc {c.concurrency_429} "
            f"rate {rate} | peak {c.peak_mib * 1.048576:.0f} MB | CPU engine {c.engine_cpu:.1f}s "
            f"sandbox {c.sandbox_cpu:.1f}s | engine warnings {c.engine_warnings or 0}"
            + (f" | PROBLEMS: {'; '.join(c.problems)}" if c.problems else ""),
            flush=True,
        )


def _stop_cleanly(signum: int, frame: Any) -> None:
    """SIGTERM/SIGHUP end the run like Ctrl-C, so Azurite and the sandbox process are stopped too."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_cleanly)
    if args.from_json:
        return render(load_json(args.from_json), args.output)
    engine_warnings()  # the engine's warnings go to bench/out/engine.log, counted per case
    from sandbox.graph import GraphService

    model = Model(
        graph_latency=args.graph_latency,
        bc_latency=args.bc_latency,
        # Older sandboxes spent the latency on each $batch envelope too; say which one ran.
        graph_envelope_latency=getattr(GraphService, "envelope_latency", True),
    )
    groups = plan_groups(args)
    full = not args.quick and not args.case and args.users is None and args.max_parallel is None
    full = full and args.graph_latency == 0.1 and args.bc_latency == 0.05 and not args.profile
    started = datetime.now(UTC)
    load_at_start = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    code = git_revision()  # at the start: the engine is imported now, later commits are not measured
    command = " ".join(["python -m bench.run", *(sys.argv[1:] if argv is None else argv)])

    from sandbox.azurite import Azurite

    results: list[CaseResult] = []
    calibration: dict[str, Any] = {}
    memory_method = ""
    if args.case == ["latency"]:  # issue 15 alone: its own report (bench/latency.py), not results.md
        from bench.latency import run_latency

        with Azurite() as azurite:
            return 1 if run_latency(azurite.connection_string, model, args.output).failed else 0
    latency: dict[str, Any] | None = None
    with Azurite() as azurite:
        conn = azurite.connection_string
        if not args.no_calibration:
            log("calibrating the latency model")
            calibration = calibrate(conn, model)
            for k, v in calibration.items():
                print(f"calibration: {k}: {v}", flush=True)
        for name in groups:
            if name == "latency":  # issue 15: its own figures, a section of results.md
                from bench.latency import run_latency

                report = run_latency(conn, model, None)
                latency = {"markdown": report.markdown, "checks": report.checks}
                continue
            group_results = run_group(name, conn, model, args)
            print_results(group_results)
            results.extend(group_results)
        memory_method = MemoryWatch().method
    payload = {
        "results": results,
        "model": asdict(model),
        "calibration": calibration,
        "command": command,
        "started": started.isoformat(),
        "memory_method": memory_method,
        "machine": {
            **machine_info(),
            "load average (1/5/15 min) at the start": load_at_start,
            "code": code,
        },
        "full": full,
        "latency": latency,
    }
    save_json(OUT / ("results-full.json" if full else "results.json"), payload)
    return render(payload, args.output)


def render(payload: dict[str, Any], output: Path | None) -> int:
    """Targets, markdown and plot from a run's figures; the exit status says whether all passed."""
    results: list[CaseResult] = payload["results"]
    verdicts = evaluate(results)
    latency = payload.get("latency")  # absent in runs saved before the latency case joined
    latency_failed = [name for name, ok, _ in (latency or {}).get("checks", []) if not ok]
    print()
    print_verdicts(verdicts)
    for name, ok, value in (latency or {}).get("checks", []):
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value}", flush=True)
    md = output or (HERE / "results.md" if payload["full"] else OUT / "results.md")
    png = md.with_suffix(".png")
    write_markdown(
        md,
        results,
        verdicts,
        Model(**payload["model"]),
        payload["calibration"],
        payload["command"],
        datetime.fromisoformat(payload["started"]),
        payload["memory_method"],
        payload["machine"],
        latency["markdown"] if latency else None,
        len(latency_failed),
    )
    wrote_png = write_plot(png, results)
    log(f"wrote {md}" + (f" and {png}" if wrote_png else ""))
    failed = [v.target for v in verdicts if v.ok is False] + latency_failed
    print(f"\n{len(failed)} target check(s) FAIL" if failed else "\nall targets PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
