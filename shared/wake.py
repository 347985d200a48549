"""Wake a user's sync now: one coalesced incremental job per user (BEHAVIOUR §8.1, §8.2).

The change poll (a BC contact changed), Graph change notifications (an Outlook contact changed) and
BC webhooks all end here, so they coalesce with one another: a queued job leaves a mark in the user's
State partition until the worker is done with it, and while the job is still waiting nothing more is
queued for the user. Once the job holds the user's lease (its run has started reading), a change
notified after that may be missing from what it read, so a notification then queues exactly one
follow-up, which replaces the mark (further notifications coalesce into it); the follow-up waits
out the running job through the queue's retries. The change poll does not queue follow-ups: it asks
again at its next tick by watermark, so a change it saw during a run is never lost.

A mark older than `MARK_EXPIRES` no longer blocks: its message was lost, or the worker died with it.

Delivery: the change poll hands the messages to its queue output binding. A notification's job is sent
with a visibility delay (`SYNC_NOTIFY_DEBOUNCE_SECONDS`) so that a burst of notifications (Outlook
sends one per contact) is one run, which an output binding cannot do: `send_jobs` writes to the queue
with `azure-storage-queue` itself, base64-encoded as host.json's `messageEncoding` says.
"""

from __future__ import annotations

import logging
import math
import uuid
from datetime import timedelta

from shared.jobs import Job
from shared.model import utcnow
from shared.planner import INCREMENTAL
from shared.services import Services

log = logging.getLogger(__name__)

# Longer than the queue's retries of one job take (5 attempts, 30 s visibility timeout, host.json).
MARK_EXPIRES = timedelta(minutes=10)
WAKE_REASONS = ("poll", "notify", "webhook")  # jobs.WAKE_REASONS (a test keeps them equal)


def wake(services: Services, users: list[str], reason: str) -> list[str]:
    """The queue messages (one incremental job each) for those of `users` that need one now.

    `reason`: "poll" (the change poll; coalesces with any fresh mark, queued or running), or "notify"
    (a Graph change notification) or "webhook" (a BC webhook notification): these coalesce with a queued
    job and queue one follow-up for a running one (the poll skips a company with a live webhook, so a
    BC change a running run missed would otherwise wait for the safety-net run).
    """
    if reason not in WAKE_REASONS:
        raise ValueError(f"unknown wake reason {reason!r}")
    now = utcnow()
    messages: list[str] = []
    for user in dict.fromkeys(users):
        mark = services.store.get_wake_mark(user)
        fresh = mark is not None and now - mark.queued_at < MARK_EXPIRES
        if fresh and mark is not None and (mark.started_at is None or reason == "poll"):
            continue  # a job is waiting (or, for the poll, running): it will see this change
        run_id = uuid.uuid4().hex
        if not services.store.claim_wake_mark(user, run_id, now, mark):
            continue  # another caller queued the user's job at the same moment
        messages.append(Job(user, INCREMENTAL, run_id, False, False, reason).to_message())
    return messages


def send_jobs(services: Services, messages: list[str], delay_seconds: float) -> None:
    """Put `messages` on the jobs queue, each invisible for `delay_seconds` (the debounce window)."""
    if not messages:
        return
    client = services.jobs_queue()
    for message in messages:
        client.send_message(message, visibility_timeout=math.ceil(delay_seconds) or None)
