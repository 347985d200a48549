"""Failure isolation (issue 6, item 5): one user's broken mailbox or company never stops the others,
and that user's report names the cause in words an admin can act on."""

from __future__ import annotations

import json

import azure.functions as func
import pytest

from sandbox.bindings import Collector
from shared.jobs import fan_out, work
from shared.sync import run_users
from tests.reliability.checks import assert_converged

ALICE, BOB, CAROL, DAVE, ERIN = (f"{n}@contoso.example" for n in ("alice", "bob", "carol", "dave", "erin"))
MISSING_COMPANY = "00000000-0000-0000-0000-0000000000aa"


def _setup(world) -> None:
    for u in (ALICE, BOB, CAROL, DAVE):
        world.user(u)
    world.user(ERIN, companyId=MISSING_COMPANY)
    for i in range(12):
        world.person(f"Person {i:02d} Sample")
    world.cloud.graph.remove_mailbox(BOB)  # licence removed: Graph answers 404
    # An application access policy that leaves Carol's mailbox out: Graph answers 403.
    world.cloud.graph.restrict_app(world.cloud.client_id, [ALICE, BOB, DAVE, ERIN])


def _assert_causes(reports: dict) -> None:
    for u in (ALICE, DAVE):
        assert reports[u].status == "succeeded" and reports[u].counts["outlookCreated"] == 12, reports[
            u
        ].message
    assert reports[BOB].status == "failed" and "mailbox was not found" in reports[BOB].message
    assert reports[CAROL].status == "failed" and "403" in reports[CAROL].message
    assert (
        "Contacts.ReadWrite" in reports[CAROL].message and "access to this mailbox" in reports[CAROL].message
    )
    assert reports[ERIN].status == "failed" and "404" in reports[ERIN].message
    assert MISSING_COMPANY in reports[ERIN].message or "compan" in reports[ERIN].message.lower()


@pytest.mark.parametrize("runner", ["run_users", "timer and queue worker"])
def test_one_broken_user_does_not_stop_the_others(world, env, recorder, runner):
    with recorder.case("failure isolation", f"mailbox 404, mailbox 403, unknown company ({runner})") as rec:
        _setup(world)
        if runner == "run_users":
            settings = world.services.store.list_settings()
            reports = {r.user: r for r in run_users(world.services, settings, "full")}
        else:
            jobs = Collector()
            fan_out(None, jobs)
            reports = {}
            for message in jobs.value:
                user = json.loads(message)["user"]
                try:  # the host catches a raising worker and retries the message later
                    work(func.QueueMessage(id=user, body=message.encode()))
                except RuntimeError as exc:
                    assert "failed" in str(exc)
                latest = world.services.store.list_reports(user, limit=1)
                reports[user] = latest[0]
        rec.add(len(reports))
        _assert_causes(reports)
        for u in (ALICE, DAVE):
            assert_converged(world, u)
        # The broken mailbox is fixed: its next run catches up, the others write nothing.
        world.cloud.graph.restrict_app(world.cloud.client_id, None)
        report = world.sync(CAROL)
        assert report.status == "succeeded" and report.counts["outlookCreated"] == 12
        assert_converged(world, CAROL)
