"""The change poll (BEHAVIOUR §8.1) through the real function entry points and an Azurite queue.

function_change_poll's `main` asks each company one question and hands its queue output binding the
jobs; `QueueHost` delivers them to function_sync_worker's `main` as the host does. What is asserted is
what a user or operator would notice: what reaches Outlook, how many requests a tick sends to each
service (the sandbox counts them on the wire), what is queued, and what the log says.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import pytest
from azure.functions.timer import TimerRequest
from hypothesis import given
from hypothesis import strategies as st

import function_change_poll
import function_sync_timer
import function_sync_worker
from sandbox.bc import format_datetime
from sandbox.bindings import Collector
from shared.config import Config, ConfigError
from shared.model import earliest, utcnow
from shared.sync import LEASE_SECONDS, RunInProgress

ALICE = "alice@contoso.example"
BOB = "bob@contoso.example"
CAROL = "carol@contoso.example"
DAVE = "dave@contoso.example"


def _tick() -> list[str]:
    """One change-poll tick: what the function hands its queue output binding."""
    jobs = Collector()
    function_change_poll.main(TimerRequest(), jobs)
    return jobs.messages()


def _users(messages: list[str]) -> list[str]:
    return sorted(json.loads(m)["user"] for m in messages)


def _synced(world, *people: str) -> None:
    """Each user's first run (the scheduled one in production): it sets the BC watermark."""
    for upn in people:
        assert world.sync(upn).status == "succeeded"


def _bc_requests(world) -> int:
    return world.cloud.bc.counters.http_total


def test_a_bc_edit_reaches_outlook_through_the_next_tick_and_the_worker(world, queue):
    """Right after a scheduled run (whose BC read this process still holds), an edit in BC reaches
    Outlook through the next poll tick: the poll's job reads BC afresh."""
    anna = world.person("Anna Berg", jobTitle="Buyer")
    world.person("Ola Nordmann")
    world.user(ALICE)
    scheduled = Collector()
    function_sync_timer.main(TimerRequest(), scheduled)
    queue.send(scheduled.messages())
    assert [a.error for a in queue.drain(function_sync_worker.main)] == [None]
    assert world.outlook_by_email(ALICE)["anna.berg@example.com"]["jobTitle"] == "Buyer"
    world.cloud.bc.edit_contact(world.company, anna["id"], jobTitle="Head of Purchasing")

    messages = _tick()
    assert _users(messages) == [ALICE]
    assert json.loads(messages[0])["reason"] == "poll" and json.loads(messages[0])["mode"] == "incremental"
    queue.send(messages)
    attempts = queue.drain(function_sync_worker.main)

    assert [a.error for a in attempts] == [None]
    assert world.outlook_by_email(ALICE)["anna.berg@example.com"]["jobTitle"] == "Head of Purchasing"
    report = world.services.store.get_report(attempts[0].job["runId"])
    assert report is not None and report.status == "succeeded" and report.counts["outlookUpdated"] == 1
    assert _tick() == []  # the run moved the watermark past the edit: nothing more to do


def test_an_idle_tick_sends_one_bc_request_per_company_and_queues_nothing(world):
    world.person("Anna Berg")
    other = world.cloud.bc.add_company("Fabrikam")
    world.cloud.bc.seed_contact(other, type="Person", displayName="Kari Hansen", email="kari@example.com")
    world.user(ALICE)
    world.user(CAROL, companyId=other)
    world.user(DAVE)  # enabled, never ran: no watermark, so not part of the question
    _synced(world, ALICE, CAROL)
    world.cloud.reset_counters()

    assert _tick() == []
    assert _bc_requests(world) == 2
    assert world.cloud.bc.counters.http_count("GET") == 2
    assert world.cloud.graph.counters.http_total == 0


def test_two_ticks_before_the_worker_runs_queue_one_job(world, queue):
    anna = world.person("Anna Berg")
    world.user(ALICE)
    _synced(world, ALICE)
    world.cloud.bc.edit_contact(world.company, anna["id"], city="Bergen")

    first = _tick()
    world.cloud.reset_counters()
    second = _tick()
    assert _users(first) == [ALICE] and second == []
    assert _bc_requests(world) == 1  # the second tick still asked, but coalesced its answer
    queue.send(first + second)
    attempts = queue.drain(function_sync_worker.main)
    assert [a.error for a in attempts] == [None]
    assert world.outlook_by_email(ALICE)["anna.berg@example.com"]["businessAddress"]["city"] == "Bergen"

    world.cloud.bc.edit_contact(world.company, anna["id"], city="Oslo")
    assert _users(_tick()) == [ALICE]  # the finished job no longer holds the user back


def test_a_user_whose_run_is_in_progress_gets_one_follow_up(world, queue):
    anna = world.person("Anna Berg")
    world.user(ALICE)
    _synced(world, ALICE)
    store = world.services.store
    lease = store.acquire_lease(ALICE, "0123456789abcdef0123456789abcdef", LEASE_SECONDS)
    assert lease is not None
    world.cloud.bc.edit_contact(world.company, anna["id"], jobTitle="Owner")

    follow_ups = _tick() + _tick() + _tick()
    assert _users(follow_ups) == [ALICE]
    queue.send(follow_ups)

    def worker_while_the_other_run_ends(msg) -> None:
        try:
            function_sync_worker.main(msg)
        finally:
            if store.current_lease(ALICE) is not None:
                store.release_lease(lease)  # the run in progress finishes after the first attempt

    attempts = queue.drain(worker_while_the_other_run_ends)
    assert [type(a.error) for a in attempts] == [RunInProgress, type(None)]
    assert queue.poisoned() == []
    assert world.outlook_by_email(ALICE)["anna.berg@example.com"]["jobTitle"] == "Owner"


def test_disabled_users_and_users_of_another_company_are_not_queued(world, queue):
    anna = world.person("Anna Berg")
    other = world.cloud.bc.add_company("Fabrikam")
    world.cloud.bc.seed_contact(other, type="Person", displayName="Kari Hansen", email="kari@example.com")
    for upn in (ALICE, BOB):
        world.user(upn)
    world.user(CAROL, companyId=other)
    _synced(world, ALICE, BOB, CAROL)
    world.user(BOB, enabled=False)
    world.cloud.bc.edit_contact(world.company, anna["id"], jobTitle="Owner")

    assert _users(_tick()) == [ALICE]


def test_a_failing_company_does_not_stop_the_others_and_its_log_names_no_address(world, caplog):
    anna = world.person("Anna Berg")
    other = world.cloud.bc.add_company("Fabrikam")
    world.cloud.bc.seed_contact(other, type="Person", displayName="Kari Hansen", email="kari@example.com")
    world.user(ALICE)
    world.user(CAROL, companyId=other)
    _synced(world, ALICE, CAROL)
    world.cloud.bc.edit_contact(world.company, anna["id"], jobTitle="Owner")
    world.cloud.bc.faults.error(500, method="GET", path_regex=rf"companies\({other}\)/contacts")
    caplog.set_level(logging.INFO)
    caplog.clear()

    assert _users(_tick()) == [ALICE]
    ours = [r for r in caplog.records if r.name.startswith("shared")]  # what the app logs
    warnings = [r.getMessage() for r in ours if r.levelno >= logging.WARNING]
    assert any("change poll could not ask a company" in w and other in w for w in warnings)
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("change poll {"))
    assert json.loads(summary.removeprefix("change poll "))["failed"] == 1
    assert not [r.getMessage() for r in ours if "@" in r.getMessage()]


def test_the_schedule_setting_is_checked_like_sync_schedule(env):
    assert Config.from_env(env).change_poll_schedule == "0 * * * * *"
    with pytest.raises(ConfigError, match="SYNC_CHANGE_POLL_SCHEDULE"):
        Config.from_env({**env, "SYNC_CHANGE_POLL_SCHEDULE": "every minute"})


def test_a_lost_poll_job_holds_the_user_back_for_ten_minutes_at_most(world, queue):
    """A queued message that never reaches the worker (lost, or its host died) must not stop the
    poll from ever queueing the user again."""
    anna = world.person("Anna Berg")
    world.user(ALICE)
    _synced(world, ALICE)
    world.cloud.bc.edit_contact(world.company, anna["id"], jobTitle="Owner")
    world.services.store.set_wake_mark(ALICE, "f" * 32, utcnow() - timedelta(minutes=9))
    assert _tick() == []
    world.services.store.set_wake_mark(ALICE, "f" * 32, utcnow() - timedelta(minutes=11))
    messages = _tick()
    assert _users(messages) == [ALICE]
    queue.send(messages)
    assert [a.error for a in queue.drain(function_sync_worker.main)] == [None]
    assert world.outlook_by_email(ALICE)["anna.berg@example.com"]["jobTitle"] == "Owner"


def test_the_worker_and_the_wake_helper_agree_on_which_jobs_carry_a_mark():
    """A job queued through shared/wake.py leaves a mark that only the worker clears: a reason known to
    one and not the other would leave a mark that blocks the user's wake-ups for ten minutes."""
    from shared import jobs, wake

    assert set(jobs.WAKE_REASONS) == set(wake.WAKE_REASONS) == {"poll", "notify", "webhook"}


def test_bc_timestamps_with_trimmed_fractions_leave_no_change_for_the_poll(world):
    """BC writes `lastModifiedDateTime` with the fraction's trailing zeros trimmed ("…:47.12345Z" is
    .123450). As text, "…:47.12345Z" sorts after "…:47.123456Z", so a watermark taken as the largest
    string would stop before the newest contact and every tick would queue a run for a change that
    the user already has."""
    when = utcnow().replace(microsecond=0) - timedelta(hours=1)
    ola = world.person("Ola Nordmann")
    kari = world.person("Kari Nordmann")
    world.cloud.bc.set_last_modified(world.company, ola["id"], when.replace(microsecond=123450))
    world.cloud.bc.set_last_modified(world.company, kari["id"], when.replace(microsecond=123456))
    world.user(ALICE)
    _synced(world, ALICE)

    assert _tick() == []


_TIMES = st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC))


@given(_TIMES, _TIMES)
def test_the_earlier_of_two_bc_timestamps_is_compared_as_time_not_text(a, b):
    """What holds a watermark before the oldest failed write, in BC's own format (zeros trimmed)."""
    assert earliest(format_datetime(a), format_datetime(b)) == format_datetime(min(a, b))
    assert earliest(None, format_datetime(a)) == format_datetime(a)
    assert earliest(format_datetime(a), None) == format_datetime(a)
