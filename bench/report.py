"""Targets (PASS/FAIL), `results.md` and `results.png`."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.bounds import Model
from bench.cases import CaseResult


@dataclass
class Verdict:
    target: str
    case: str
    ok: bool | None  # None: not applicable in this profile
    detail: str

    @property
    def label(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.ok]


def mb(mib: float) -> float:
    return mib * 1024 * 1024 / 1e6


def evaluate(results: list[CaseResult]) -> list[Verdict]:
    """The issue's targets, each per case it applies to; a target with no case says n/a."""
    out: list[Verdict] = []

    def add(
        target: str, cases: list[CaseResult], check: Any, detail: Any, needs_correct: bool = True
    ) -> None:
        if not cases:
            out.append(Verdict(target, "-", None, "no such case in this profile"))
        for c in cases:
            if needs_correct and c.problems:
                # A fast but wrong run proves nothing about speed: it fails here as well.
                out.append(Verdict(target, c.name, False, f"the run was not correct; {detail(c)}"))
            else:
                out.append(Verdict(target, c.name, bool(check(c)), detail(c)))

    initial = [c for c in results if c.kind == "initial"]
    single_initial = [c for c in initial if c.users == 1]
    multi_initial = [c for c in initial if c.users > 1]
    add(
        "request ratio <= 1.1 (initial syncs)",
        initial,
        lambda c: c.ratio <= 1.1,
        lambda c: f"{c.requests} requests / bound {c.bound_requests} = {c.ratio:.3f}",
    )
    photos = [c for c in results if c.kind == "photos"]
    add(
        "photo requests <= 1.05 x their lower bound (photos)",
        photos,
        lambda c: c.photo_requests <= 1.05 * c.bound_photo,
        lambda c: f"{c.photo_requests} picture requests / bound {c.bound_photo}",
    )
    add(
        "request ratio <= 1.1 (initial sync with photos)",
        photos,
        lambda c: c.ratio <= 1.1,
        lambda c: f"{c.requests} requests / bound {c.bound_requests} = {c.ratio:.3f}",
    )
    add(
        "wall time <= 1.3 x concurrency bound (initial sync with photos)",
        photos,
        lambda c: c.time_ratio <= 1.3,
        lambda c: f"{c.api_wall:.1f} s / bound {c.bound_time:.1f} s = {c.time_ratio:.2f}",
    )
    add(
        "no-op run <= 3 Graph requests per user and <= 2 BC requests per company",
        [c for c in results if c.kind == "noop"],
        lambda c: c.mailbox_http_max <= 3 and c.bc_http <= 2 * c.companies,
        lambda c: f"Graph max {c.mailbox_http_max} per user, BC {c.bc_http} for {c.companies} company(ies)",
    )
    add(
        "wall time <= 1.3 x concurrency bound (initial, N >= 1,000)",
        [c for c in single_initial if c.contacts >= 1000],
        lambda c: c.time_ratio <= 1.3,
        lambda c: (
            f"{c.api_wall:.1f} s (wall {c.wall:.1f} s less store {c.store_critical:.1f} s) / "
            f"bound {c.bound_time:.1f} s = {c.time_ratio:.2f} (wall itself: {c.wall / c.bound_time:.2f})"
        ),
    )
    add(
        "1,000 contacts in under 30 s",
        [c for c in single_initial if c.contacts == 1000],
        lambda c: c.wall < 30,
        lambda c: f"wall {c.wall:.1f} s (store included)",
    )
    add(
        "many users bounded by total concurrency, not the slowest user",
        multi_initial,
        lambda c: c.time_ratio <= 1.3,
        lambda c: (
            f"{c.api_wall:.1f} s (wall {c.wall:.1f} s less store {c.store_critical:.1f} s) / "
            f"(slowest mailbox {c.bound_graph_time:.1f} s + BC {c.bound_bc_time:.2f} s) = {c.time_ratio:.2f} "
            f"(wall itself: {c.wall / c.bound_time:.2f})"
        ),
    )
    add(
        "peak memory <= 200 MB at 20,000 contacts",
        [c for c in single_initial if c.contacts >= 20_000],
        lambda c: mb(c.peak_mib) <= 200,
        lambda c: f"{mb(c.peak_mib):.0f} MB resident high-water",
    )
    add(
        "zero 429s caused by our own concurrency",
        results,
        lambda c: c.concurrency_429 == 0,
        lambda c: _refusals(c),
        needs_correct=False,
    )
    add(
        "the run is correct (succeeded, expected writes, folder complete, no duplicates)",
        results,
        lambda c: not c.problems,
        lambda c: "; ".join(c.problems) or "ok",
        needs_correct=False,
    )
    return out


def _refusals(c: CaseResult) -> str:
    r = c.refusals
    return (
        f"Graph concurrency {r.get('graph_concurrency', 0)}, BC queue full {r.get('bc_queue_full', 0)}"
        f" (rate limit: Graph {r.get('graph_rate', 0)}, BC {r.get('bc_rate', 0)})"
    )


def print_verdicts(verdicts: list[Verdict]) -> None:
    for v in verdicts:
        print(f"{v.label:4}  {v.target}  |  {v.case}  |  {v.detail}")


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical CPUs",
        "memory": mem,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "load average (1/5/15 min) at the end of the run": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


TABLE_HEAD = (
    "| case | wall s | store s | API wall s | bound s | time ratio | Graph req (bound) | BC req (bound) "
    "| req ratio | Graph items | max req/mailbox | 429 conc/rate | peak MB | engine CPU s | sandbox CPU s |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
)


def _row(c: CaseResult) -> str:
    rate = c.refusals.get("graph_rate", 0) + c.refusals.get("bc_rate", 0)
    return (
        f"| {c.name} | {c.wall:.1f} | {c.store_critical:.1f} | {c.api_wall:.1f} | {c.bound_time:.1f} "
        f"| {c.time_ratio:.2f} | {c.graph_http} ({c.bound_graph}) | {c.bc_http} ({c.bound_bc}) "
        f"| {c.ratio:.2f} | {c.graph_items} | {c.mailbox_http_max} | {c.concurrency_429}/{rate} "
        f"| {mb(c.peak_mib):.0f} | {c.engine_cpu:.1f} | {c.sandbox_cpu:.1f} |\n"
    )


def _breakdown(c: CaseResult) -> str:
    graph = ", ".join(f"{k} {n}" for k, n in sorted(c.graph_by_kind.items()))
    items = ", ".join(f"{k} {n}" for k, n in sorted(c.graph_items_by_kind.items()))
    bc = ", ".join(f"{k} {n}" for k, n in sorted(c.bc_by_kind.items()))
    store = ", ".join(
        f"{k} {n}" + (f" ({c.store_seconds[k]:.1f} s)" if k in c.store_seconds else "")
        for k, n in sorted(c.store_calls.items())
    )
    problems = "; ".join(c.problems) or "none"
    return (
        f"- **{c.name}**: Graph calls: {graph or '-'}; Graph items: {items or '-'}; BC calls: {bc or '-'}; "
        f"Entra token calls {c.entra_http}; engine's own count {c.engine_requests}; "
        f"report counts {_nonzero(c.counts)}; store {c.store_total:.1f} s in all threads, calls (seconds): "
        f"{store or '-'}; "
        f"BC peak concurrent {c.bc_peak_active}; "
        + ("" if c.engine_warnings is None else f"engine warnings logged {c.engine_warnings}; ")
        + f"problems: {problems}\n"
    )


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def write_markdown(
    path: Path,
    results: list[CaseResult],
    verdicts: list[Verdict],
    model: Model,
    calibration: dict[str, Any],
    command: str,
    started: datetime,
    memory_method: str,
    machine: dict[str, str],
    latency_markdown: str | None = None,
    latency_failed: int = 0,
) -> None:
    """`latency_markdown`: the latency case's section (bench/latency.py), placed after the targets;
    `latency_failed`: how many of its own target checks failed, counted in the verdict line."""
    info = machine
    failed = len([v for v in verdicts if v.ok is False]) + latency_failed
    lines = [
        "# Benchmark results (issue 7)\n\n",
        f"Run {started.astimezone(UTC).strftime('%Y-%m-%d %H:%M UTC')} with `{command}`; "
        f"**{'all targets PASS' if not failed else f'{failed} target check(s) FAIL'}**.\n\n",
        "## Latency model and limits\n\n",
        f"- Graph: {model.graph_latency * 1000:.0f} ms per item (every `$batch` operation and every request "
        f"outside a batch), spent while holding the mailbox's concurrency slot; {model.graph_concurrency} concurrent "
        f"per app and mailbox, excess refused with 429 (Retry-After 1 s); a `$batch` runs at most 4 of its "
        f"items at a time; {model.graph_rate_limit:,} requests per {model.graph_rate_window / 60:.0f} min "
        "per mailbox. "
        + (
            "This sandbox also spends the latency once on each `$batch` envelope, outside any slot.\n"
            if model.graph_envelope_latency
            else "The `$batch` envelope itself costs no latency (Graph fans it out to Outlook).\n"
        ),
        f"- Business Central: {model.bc_latency * 1000:.0f} ms per request and per `$batch` operation "
        f"(operations of one batch run one after another inside the envelope's slot); "
        f"{model.bc_concurrency} concurrent per principal, up to 95 queued, then 429.\n",
        "- Table Storage: a real Azurite (in memory). It is much slower than Azure for link writes, so the "
        "time spent in store calls is measured (per thread) and the time targets use *API wall* = wall "
        "minus the store time of the busiest run thread.\n",
        f"- Memory: the engine process's resident set high-water during the case ({memory_method}); the "
        "sandbox runs in a separate process and is not included.\n",
        "- Between cases the sandbox's counters and rate windows are reset (scheduled runs are 15 minutes "
        "apart, longer than either window).\n\n",
        "## Bounds\n\n",
        "- Requests: ceil(Outlook writes / 20) `$batch` calls + ceil(unknown Outlook contacts / 20) batched tag "
        "reads + delta pages (max(1, ceil(changes / 200)) for the run's own round, plus ceil(own writes / 200) "
        "for the echo of its writes) + a fixed few: 2 on a first run (folder lookup and creation), 1 after "
        "(the check that the folder is still under Contacts: a folder deleted in Outlook keeps its id and "
        "still answers delta from Deleted Items); "
        "BC: max(1, ceil(contacts / 20,000)) pages per full listing, +1 for the changed-since query, "
        "+ ceil(BC writes / 100) batches, + the reference reads: `$metadata` once per process (BC versions "
        "differ in the contact fields they have) and `countriesRegions` once per run that maps a country.\n",
        "- Time: per mailbox, chained requests (delta pages, folder calls) one latency each, batch items "
        "4 at a time, within the mailbox budget; BC reads before, BC writes spread over 5 parallel batches. "
        "Several users: BC + the slowest mailbox (mailboxes are independent).\n\n",
        "## Figures\n\n",
        TABLE_HEAD,
        *(_row(c) for c in results),
        "\n*store s*: Table Storage time on the busiest run thread; *429 conc/rate*: refusals for "
        "concurrency (Graph MailboxConcurrency, BC queue full) / for the rate windows.\n\n",
        "## Targets\n\n",
        "| result | target | case | detail |\n|---|---|---|---|\n",
        *(f"| {v.label} | {v.target} | {v.case} | {v.detail} |\n" for v in verdicts),
        *(["\n", latency_markdown] if latency_markdown else []),
        "\n## Calibration (the latency model as measured through the engine's HTTP client)\n\n",
        *(f"- {k}: {v}\n" for k, v in calibration.items()),
        "\n## Details per case\n\n",
        *(_breakdown(c) for c in results),
        "\n## Machine\n\n",
        *(f"- {k}: {v}\n" for k, v in info.items()),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))


def write_plot(path: Path, results: list[CaseResult]) -> bool:
    """Time and requests against N for the single-user initial syncs, with the bound lines."""
    points = sorted((c for c in results if c.kind == "initial" and c.users == 1), key=lambda c: c.contacts)
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    n = [c.contacts for c in points]
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(12, 4.8))
    ax_t.plot(n, [c.wall for c in points], "o-", label="wall time")
    ax_t.plot(n, [c.api_wall for c in points], "s-", label="API wall (less store time)")
    ax_t.plot(n, [c.bound_time for c in points], "kx--", label="concurrency bound")
    ax_t.plot(n, [1.3 * c.bound_time for c in points], "k+:", label="1.3 x bound (target)")
    ax_t.set(xlabel="contacts (N)", ylabel="seconds", title="Initial full sync: time")
    ax_r.plot(n, [c.requests for c in points], "o-", label="requests (Graph + BC)")
    ax_r.plot(n, [c.bound_requests for c in points], "kx--", label="lower bound")
    ax_r.plot(n, [1.1 * c.bound_requests for c in points], "k+:", label="1.1 x bound (target)")
    ax_r.set(xlabel="contacts (N)", ylabel="HTTP requests", title="Initial full sync: requests")
    wide = max(n) >= 10 * min(n)  # log-log only where N spans a decade or more
    for ax in (ax_t, ax_r):
        if wide:
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(NullFormatter())
        ax.set_xticks(n, [f"{x:,}" for x in n])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def save_json(path: Path, payload: dict[str, Any]) -> None:
    """Everything measured, so the markdown and the plot can be written again without a rerun."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**payload, "results": [asdict(c) for c in payload["results"]]}
    path.write_text(json.dumps(data, indent=1, default=str))


def load_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    data["results"] = [CaseResult(**c) for c in data["results"]]
    return data
