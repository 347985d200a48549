"""The bound arithmetic the targets are judged by (run with `pytest bench`; not in the default suite)."""

from __future__ import annotations

import math

import pytest

from bench.bounds import Model, Need, bc_time, graph_time, time_bound

MODEL = Model()


def test_initial_sync_of_1000_needs_59_requests_and_26_seconds():
    need = Need(graph_writes=1000, echo=1000, graph_fixed=2)
    # 50 batches + 1 delta page (empty folder) + 5 echo pages + folder lookup and creation.
    assert need.graph_requests == 58
    assert Need(bc_read_rows=1000).bc_requests == 1
    # 8 chained requests, then 250 rounds of 4 items.
    assert graph_time(need, MODEL) == pytest.approx((8 + 250) * 0.1)


def test_no_op_incremental_needs_one_delta_page_and_two_bc_requests():
    assert Need().graph_requests == 1
    assert Need(bc_read_rows=20_000, bc_read_requests=1).bc_requests == 2
    assert Need(bc_read_rows=20_001, bc_read_requests=1).bc_requests == 3
    assert Need(bc_read_rows=1000, bc_reference_reads=2).bc_requests == 3  # $metadata, countriesRegions
    assert Need(graph_fixed=1).graph_requests == 2  # the folder check, one delta page


def test_the_mailbox_budget_binds_above_10000_items():
    # 20,103 items cannot fit in two 10-minute windows: the last ones wait for the third.
    need = Need(graph_writes=20_000, echo=20_000, graph_fixed=2)
    assert need.graph_items == 20_103
    assert graph_time(need, MODEL) > 1200
    # Without the budget it would be the plain concurrency bound.
    unlimited = Model(graph_rate_limit=10**9)
    assert graph_time(need, unlimited) == pytest.approx((103 + 5000) * 0.1)


def test_mailboxes_are_independent_and_bc_comes_first():
    mailbox = Need(graph_writes=500, echo=500, graph_fixed=2)
    bc = Need(bc_read_rows=500)
    assert time_bound([mailbox] * 50, bc, MODEL) == pytest.approx(
        bc_time(bc, MODEL) + graph_time(mailbox, MODEL)
    )


def test_photos_are_one_request_each_and_run_side_by_side():
    need = Need(graph_writes=1000, echo=1000, graph_fixed=2, photo_graph=1000)
    assert need.graph_requests == 58 + 1000 and need.photo_requests == 1000
    # The 1,000 photo writes join the batch items in rounds of 4.
    assert graph_time(need, MODEL) == pytest.approx((8 + 500) * 0.1)
    bc = Need(bc_read_rows=1000, bc_reference_reads=2, photo_bc=1000)
    assert bc.bc_requests == 3 + 1000
    assert bc_time(bc, MODEL) == pytest.approx((3 + 200) * 0.05)


def test_bc_writes_spread_over_five_parallel_batches():
    assert bc_time(Need(bc_writes=100), MODEL) == pytest.approx(20 * 0.05)


def test_several_companies_are_read_each_on_its_own():
    # 3 companies of 500: one page and one changed-since query each; a no-op is 2 per company.
    assert Need(bc_read_rows=500, bc_read_requests=1, companies=3).bc_requests == 6
    # The initial sync: a page each, $metadata, each Country/Region table and the companies' names.
    assert Need(bc_read_rows=500, bc_reference_reads=1 + 3 + 1, companies=3).bc_requests == 8


def test_percentiles_are_nearest_rank():
    from bench.latency import percentile

    values = [float(v) for v in range(20, 0, -1)]  # 20 readings, unordered
    assert percentile(values, 95) == 19.0  # the 19th of 20, not the maximum
    assert percentile(values, 50) == 10.0
    assert percentile(values, 100) == 20.0
    assert percentile([7.0], 95) == 7.0
    assert math.isnan(percentile([], 95))


def test_idle_cost_shares_the_company_part_among_its_users():
    from bench.latency import IdleCost

    # Graph per user, BC per company: 4 no-op runs of 2 Graph requests each, their BC reads shared.
    today = IdleCost(per_user=8, per_company=8)
    # One safety-net run, 4 subscription listings for 10 users, the renewal; its BC read and 60 questions.
    poll = IdleCost(per_user=2 + 0.4 + 1 / 34, per_company=2 + 60)
    hooks = IdleCost(per_user=2 + 0.4 + 1 / 34, per_company=2 + 4 + 1 / 48 + 1 / 24)
    assert [round(today.per_user_hour(k), 2) for k in (1, 3, 10)] == [16, 10.67, 8.8]
    assert [round(poll.per_user_hour(k), 2) for k in (1, 3, 10)] == [64.43, 23.1, 8.63]
    # The poll costs more than today's schedule up to 9 users a company; webhooks less from one user on.
    assert poll.per_user_hour(9) > today.per_user_hour(9)
    assert poll.per_user_hour(10) < today.per_user_hour(10)
    assert hooks.per_user_hour(1) < today.per_user_hour(1)
    with pytest.raises(ValueError, match="at least 1"):
        poll.per_user_hour(0)


def test_an_edit_that_never_arrives_fails_the_case_whatever_the_p95():
    from datetime import UTC, datetime

    from bench.latency import UPNS, Edit, IdleCost, ModeResult, render

    def mode(name: str, lost: bool) -> ModeResult:
        edits = [Edit("outlook", f"a{i}@x.example", 0.0, seen={"bc": 10.0}) for i in range(40)]
        for i in range(40):
            seen = {u: 20.0 for u in UPNS[: len(UPNS) - (1 if lost and i == 0 else 0)]}
            edits.append(Edit("bc", f"Title {i}", 0.0, f"c{i}", seen))
        return ModeResult(name, edits)

    idle = {"today": IdleCost(8, 8), "poll": IdleCost(2, 62), "webhooks": IdleCost(2, 6)}
    report = render(
        {"poll": mode("poll", False), "webhooks": mode("webhooks", True)}, idle, MODEL, datetime.now(UTC), 5
    )
    assert report.failed == ["BC → Outlook p95 ≤ 60 s, every edit arrived (BC webhooks)"]
    assert (
        "| BC webhooks | BC → Outlook (job title, per mailbox) | 40 (399) | 20.0 s | 20.0 s | 20.0 s | 1 |"
        in (report.markdown)
    )
    assert "| BC webhooks | BC → Outlook, only the 5 mailboxes without Outlook edits | 40 (199) |" in (
        report.markdown
    )
    assert "| today's 15-minute schedule | 16.0 | 10.7 | 8.8 |" in report.markdown
    assert "| notifications + change poll | 64.0 | 22.7 | 8.2 |" in report.markdown


def test_a_full_run_writes_the_latency_section_and_fails_with_its_targets(tmp_path):
    from dataclasses import asdict
    from datetime import UTC, datetime

    from bench.run import render

    def payload(ok: bool) -> dict:
        return {
            "results": [],
            "model": asdict(MODEL),
            "calibration": {},
            "command": "python -m bench.run",
            "started": datetime.now(UTC).isoformat(),
            "memory_method": "VmHWM",
            "machine": {},
            "full": True,
            "latency": {
                "markdown": "## Latency (issue 15): edit on one side → visible on the other\n",
                "checks": [("Outlook → BC p95 ≤ 60 s", ok, "30.0 s")],
            },
        }

    md = tmp_path / "results.md"
    assert render(payload(True), md) == 0
    assert "all targets PASS" in md.read_text() and "## Latency (issue 15)" in md.read_text()
    assert render(payload(False), md) == 1
    assert "**1 target check(s) FAIL**" in md.read_text()
