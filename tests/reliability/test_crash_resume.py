"""Crash-resume (issue 6, item 2): stop a run at every kind of point and show the next run completes
with no duplicates and nothing lost.

`tests/test_sync_guarantees.py::test_crash_mid_run_then_resume_without_duplicates` stops a small run
at the first of each checkpoint. This extends it to runs of several batches (stopping at a later
batch, after earlier batches' links were stored), to writes the server applied whose answer never
arrived (a reset or a gateway's error page after the `$batch` was applied; the sandbox's own faults
refuse before applying, so `WireTap` wraps the service's dispatch), to incremental runs with
updates, deletions and recreations in flight, and to the queue's continuation of an interrupted run.
"""

from __future__ import annotations

import pytest

from shared.sync import RunInterrupted
from tests.reliability.checks import assert_converged, new_outlook_contacts
from tests.reliability.conftest import batch_envelope

ALICE = "alice@contoso.example"
N_BC = 30  # two Graph batches of creates …
N_OUTLOOK = 25  # … one BC batch of creates, then two more Graph batches to tag those contacts


def _setup(world) -> None:
    world.user()
    for i in range(N_BC):
        world.person(f"Person {i:02d} Sample", city="Oslo")
    new_outlook_contacts(world, ALICE, N_OUTLOOK)


def _crash_at(point: str, nth: int):
    seen: dict[str, int] = {}

    def checkpoint(name: str) -> None:
        seen[name] = seen.get(name, 0) + 1
        if name == point and seen[name] == nth:
            raise RuntimeError(f"simulated crash at {name} #{nth}")

    return checkpoint, seen


def _assert_first_contact(world) -> None:
    bc = world.bc_by_email()
    assert len(world.bc_contacts()) == N_BC + N_OUTLOOK
    assert all(len(bc[f"new{i}@outlook.example"]) == 1 for i in range(N_OUTLOOK))
    assert len(world.outlook_by_email()) == N_BC + N_OUTLOOK


@pytest.mark.parametrize(
    ("point", "nth"),
    [
        ("after_bc_batch", 1),  # BC created the contacts; no link, no tag yet
        ("before_links", 1),  # same, one step later
        ("batch_done", 1),  # BC batch linked, Outlook contacts not tagged yet
        ("after_graph_batch", 1),  # first Graph batch applied, its links not stored
        ("before_links", 3),  # second Graph batch applied, its links not stored
        ("batch_done", 3),  # a clean boundary in the middle of the Graph batches
        ("after_graph_batch", 3),  # the last Graph batch applied, its links not stored
        ("before_watermark", 1),  # everything written and linked; watermarks not advanced
    ],
)
def test_crash_at_any_point_of_a_multi_batch_run(world, recorder, point, nth):
    with recorder.case("crash-resume", f"crash at {point} (#{nth} of the run)") as rec:
        _setup(world)
        checkpoint, seen = _crash_at(point, nth)
        report = world.sync(mode="full", checkpoint=checkpoint)
        assert seen.get(point, 0) >= nth and report.status == "failed", seen
        assert world.services.store.current_lease(ALICE) is None
        report = world.sync()
        assert report.status == "succeeded", [i.reason for i in report.items if i.action == "failed"]
        _assert_first_contact(world)
        assert_converged(world, ALICE)
        rec.add()


@pytest.mark.parametrize(("service", "nth_batch"), [("bc", 1), ("graph", 1), ("graph", 2)])
@pytest.mark.parametrize("how", ["drop", "html"])
def test_batch_applied_but_the_answer_lost(world, taps, recorder, service, how, nth_batch):
    """The server applied the `$batch`, then the connection reset (or a gateway answered 502 HTML):
    the writes happened, the client cannot know. Nothing may be written twice."""
    label = "connection reset" if how == "drop" else "502 HTML page"
    with recorder.case("crash-resume", f"{service} $batch #{nth_batch} applied, then {label}") as rec:
        _setup(world)
        seen = {"n": 0}

        def nth_write_batch(req) -> bool:
            if not batch_envelope(req) or {r["method"] for r in req.json()["requests"]} == {"GET"}:
                return False
            seen["n"] += 1
            return seen["n"] == nth_batch

        tap = taps[service]
        (tap.drop_after_apply if how == "drop" else tap.html_after_apply)(nth_write_batch)
        first = world.sync(mode="full")
        assert tap.fired.get(how) == 1, tap.fired
        assert first.status in ("partial", "failed"), first.status
        unknown = [i for i in first.items if i.action == "failed"]
        assert unknown and all("unknown" in (i.reason or "") for i in unknown), [i.reason for i in unknown]
        report = world.sync()
        assert report.status == "succeeded", [i.reason for i in report.items if i.action == "failed"]
        _assert_first_contact(world)
        assert_converged(world, ALICE)
        rec.add()


def test_crash_in_an_incremental_run_with_updates_deletions_and_recreations(world, recorder):
    with recorder.case("crash-resume", "crash mid-way through updates, deletions and recreations") as rec:
        world.user()
        people = [world.person(f"Person {i:02d} Sample", jobTitle="Buyer") for i in range(40)]
        world.sync(mode="full")
        fid = world.folder_id()
        for p in people[:22]:
            world.cloud.bc.edit_contact(world.company, p["id"], jobTitle="Head Buyer")
        for p in people[22:27]:
            world.cloud.bc.delete_contact(world.company, p["id"])
        by_email = world.outlook_by_email()
        for p in people[27:30]:
            world.cloud.graph.user_delete_contact(ALICE, fid, by_email[p["email"]]["id"])
        for point, nth in (("after_graph_batch", 1), ("before_links", 2)):
            checkpoint, _ = _crash_at(point, nth)
            assert world.sync(checkpoint=checkpoint).status == "failed"
            rec.add()
        report = world.sync()
        assert report.status == "succeeded"
        assert {c["jobTitle"] for c in world.outlook()} == {"Head Buyer", "Buyer"}
        assert len(world.outlook_by_email()) == 35
        assert_converged(world, ALICE)


def test_interrupted_run_continues_from_the_queue(world, recorder):
    """The HTTP path stops a long run at a batch boundary and the queue worker continues it with the
    same report (`resume`): the final report counts every write once, the folder has no duplicate."""
    with recorder.case("crash-resume", "interrupted at a batch boundary, continued with resume=") as rec:
        _setup(world)
        stops = {"n": 0}

        def checkpoint(name: str) -> None:
            if name == "batch_done":
                stops["n"] += 1
                if stops["n"] == 2:
                    raise RunInterrupted()

        first = world.sync(mode="full", checkpoint=checkpoint)
        assert first.status == "interrupted"
        final = world.sync(mode="full", resume=first, run_id=first.runId)
        assert final.runId == first.runId and final.status == "succeeded"
        assert final.counts["bcCreated"] == N_OUTLOOK
        assert final.counts["outlookCreated"] == N_BC
        _assert_first_contact(world)
        assert_converged(world, ALICE)
        rec.add()


def test_crash_then_lost_link_table(world, recorder):
    """The worst case: the run dies after writing, and the links are lost too. Tags heal it."""
    with recorder.case("crash-resume", "crash after writes, then the link table lost") as rec:
        _setup(world)
        checkpoint, _ = _crash_at("before_watermark", 1)
        assert world.sync(mode="full", checkpoint=checkpoint).status == "failed"
        store = world.services.store
        store.delete_links(ALICE, list(store.get_links(ALICE)))
        report = world.sync(mode="full")
        assert report.status == "succeeded"
        assert report.counts["outlookCreated"] == 0 and report.counts["bcCreated"] == 0
        _assert_first_contact(world)
        assert_converged(world, ALICE)
        rec.add()
