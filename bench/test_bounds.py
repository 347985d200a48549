"""The bound arithmetic the targets are judged by (run with `pytest bench`; not in the default suite)."""

from __future__ import annotations

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
