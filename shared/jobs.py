"""The queue side: the job message, the timer that enqueues one job per user, the worker that runs one.

A job message is all a worker knows about a run, so it is parsed strictly (an unreadable one is
dropped: retrying cannot fix it) and carries its run id, so the queue's retries of one job share one
run report. An on-demand run that outgrew the HTTP budget continues here under the same run id.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import azure.functions as func

from shared import runs
from shared.model import (
    RunReport,
    RunStatus,
    UserSettings,
    ValidationError,
    log_fields,
    normalize_user,
    redact,
    user_hash,
    utcnow,
)
from shared.planner import FULL, INCREMENTAL
from shared.services import get_services
from shared.store import MalformedRowError, Store
from shared.sync import RunInProgress, run_user

log = logging.getLogger(__name__)

QUEUE_NAME = "contact-sync-jobs"
MAX_DEQUEUE = 5  # host.json extensions.queues.maxDequeueCount (a test keeps the two equal)
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_JOB_REASONS = ("schedule", "http", "continuation", "poll", "notify", "webhook")
# Jobs queued through shared/wake.py because something changed (the change poll's answer, a Graph change
# notification, a BC webhook notification): they carry a coalescing mark, read BC afresh, and give way to
# a run in progress (BEHAVIOUR §8.1-§8.3).
WAKE_REASONS = ("poll", "notify", "webhook")


@dataclass
class Job:
    """One queue message: whose run, how, under which run id, and why it was queued."""

    user: str
    mode: str = INCREMENTAL
    runId: str | None = None
    dryRun: bool = False
    force: bool = False
    reason: str = "schedule"  # schedule | http | continuation | poll (§8.1) | notify (§8.2) | webhook (§8.3)

    def to_message(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_message(cls, text: str) -> Job:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a job message must be a JSON object")
        job = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        job.user = normalize_user(job.user)
        if job.mode not in (INCREMENTAL, FULL):
            raise ValueError(f"unknown mode {job.mode!r}")
        if job.runId is not None and not (isinstance(job.runId, str) and RUN_ID.match(job.runId)):
            raise ValueError("runId must be a run id")
        if not isinstance(job.dryRun, bool) or not isinstance(job.force, bool):
            raise ValueError("dryRun and force must be true or false")
        if job.reason not in _JOB_REASONS:
            raise ValueError(f"unknown reason {job.reason!r}")
        return job


# The timer -------------------------------------------------------------------------------------
def fan_out(timer: Any, jobs: func.Out[list[str]]) -> int:
    """One queue message per enabled user; the worker function runs each under its lease.

    Each job carries its own run id, so the queue's retries of one job share one run report (the
    last attempt's report says whether it gave up). With change notifications on (BEHAVIOUR §8.2) the
    tick first keeps the Graph subscriptions, then thins the runs: a user whose subscription is live
    gets a scheduled run only every SYNC_SAFETY_NET_MINUTES (edits arrive through notifications and the
    change poll; this run brings BC deletions and catches anything a lost notification missed).
    """
    from shared.subscriptions import is_live, maintain  # subscriptions imports services, as jobs does

    services = get_services()
    if getattr(timer, "past_due", False):
        log.warning("timer is past due; enqueuing one run per user now (missed ticks are not replayed)")
    services.bc_reader.forget()  # BC reads are shared within one tick, never carried into the next
    users, bad = services.store.list_settings_checked()
    for key, err in bad:
        log.warning(
            "skipping a user with invalid settings %s",
            log_fields({"userHash": user_hash(key), "error": redact(str(err), key)}),
        )
    try:
        subs = maintain(services, users, frozenset(key for key, _ in bad))
    except Exception as exc:  # the subscriptions must never stop the schedule itself
        log.warning("graph subscriptions not kept this tick %s", log_fields({"error": str(exc)}))
        subs = None
    now = utcnow()
    net = timedelta(minutes=services.config.safety_net_minutes)
    messages: list[str] = []
    thinned = 0
    for u in users:
        if not u.enabled:
            continue
        row = subs.rows.get(u.user) if subs is not None else None
        if row is not None and is_live(row, now):
            if row.safety_net_at is not None and now - row.safety_net_at < net:
                thinned += 1
                continue
            row.safety_net_at = now
            services.store.save_subscription(row)
        messages.append(Job(u.user, INCREMENTAL, uuid.uuid4().hex, False, False, "schedule").to_message())
    jobs.set(messages)
    scheduled: dict[str, Any] = {
        "users": len(messages),
        "thinned": thinned,
        "disabled": sum(1 for u in users if not u.enabled),
        "invalid": len(bad),
        "pastDue": bool(getattr(timer, "past_due", False)),
    }
    if subs is not None and services.config.public_url:
        scheduled["subscriptions"] = subs.summary()
    log.info("scheduled contact sync %s", log_fields(scheduled))
    return len(messages)


# The worker ------------------------------------------------------------------------------------
def _give_up(store: Store, job: Job, message: str) -> None:
    """Leave an on-demand run's report saying why it will not run (its caller is polling it)."""
    if not job.runId:
        return
    report = store.get_report(job.runId) or RunReport(
        user=job.user, mode=job.mode, dryRun=job.dryRun, runId=job.runId
    )
    if report.status in runs.DONE:
        log.info("job not run, but its run had already finished (a repeated queue delivery)")
        return
    runs.give_up(report, message)
    store.save_report(report)


def _settings(store: Store, job: Job) -> UserSettings | None:
    """The settings to run the job with, or None (after saying why) when it must not run."""
    try:
        settings = store.get_settings(job.user)
    except MalformedRowError as exc:
        log.error(
            "job skipped, the user's stored settings are invalid %s",
            log_fields({"userHash": user_hash(job.user), "error": redact(exc.detail, job.user)}),
        )
        _give_up(store, job, f"the stored settings are invalid ({exc.detail}); fix them with PUT /api/users")
        return None  # retrying cannot fix it
    if settings is None or (not settings.enabled and job.reason in ("schedule", *WAKE_REASONS)):
        log.info("job for a removed or disabled user skipped")
        if settings is None:
            _give_up(store, job, "the user's sync settings were deleted before the run started")
        return None
    return settings


def work(msg: func.QueueMessage) -> RunReport | None:
    """Run one queued job. Raising makes the queue retry it, then move it to the poison queue.

    A job the change poll or a notification queued (shared/wake.py) clears its mark once the worker is
    done with it for good (ran, dropped or given up), so the user's next one may be queued (§8.1, §8.2).
    """
    try:
        job = Job.from_message(msg.get_body().decode("utf-8"))
    except (ValueError, TypeError, ValidationError) as exc:
        log.error("dropping an unreadable job message: %s", exc)
        return None  # retrying cannot fix it
    attempt = int(getattr(msg, "dequeue_count", 1) or 1)
    if job.reason not in WAKE_REASONS or not job.runId:
        return _work(job, attempt)
    store = get_services().store
    try:
        report = _work(job, attempt)
    except Exception:
        if attempt >= MAX_DEQUEUE:
            store.clear_wake_mark(job.user, job.runId)
        raise
    store.clear_wake_mark(job.user, job.runId)
    return report


def _started(store: Store, job: Job) -> Callable[[], None]:
    """What a run calls once it holds the lease: a wake job's mark says it is running now."""
    run_id = job.runId
    if job.reason not in WAKE_REASONS or not run_id:
        return lambda: None
    return lambda: store.start_wake_mark(job.user, run_id, utcnow())


def _work(job: Job, attempt: int) -> RunReport | None:
    services = get_services()
    store = services.store
    settings = _settings(store, job)
    if settings is None:
        return None
    runs.settle_abandoned(store, job.user, keep=job.runId)  # runs of this user that died with their host
    previous = store.get_report(job.runId) if job.runId else None
    if previous is not None and previous.status in runs.DONE:
        log.info("job already done (a repeated queue delivery); skipped")
        return previous
    resume = previous if previous is not None and previous.status in runs.RESUMABLE else None
    try:
        report = run_user(
            services,
            settings,
            job.mode,
            dry_run=job.dryRun,
            force=job.force,
            run_id=job.runId,
            # Not for poll jobs: a read cached before the change the poll saw would hide it.
            reader=services.bc_reader if job.reason == "schedule" else None,
            resume=resume,
            on_started=_started(store, job),
        )
    except RunInProgress as exc:
        if job.reason == "schedule":
            log.info("scheduled run skipped: %s", exc)
            return None
        if job.reason in WAKE_REASONS and attempt >= MAX_DEQUEUE:
            log.info("change-poll or notification run dropped, another run kept the lease: %s", exc)
            return None  # the next tick (or the safety-net run) catches up through watermark and delta
        if attempt >= MAX_DEQUEUE:
            _give_up(store, job, f"gave up after {attempt} attempts: {exc}")
        raise  # an on-demand or change-poll run waits its turn through the queue's retry
    if report.status == RunStatus.FAILED:
        if attempt >= MAX_DEQUEUE:
            report.message = f"{report.message} (gave up after {attempt} attempts; moved to the poison queue)"
            store.save_report(report)
        raise RuntimeError(f"sync run {report.runId} failed (attempt {attempt}): {report.message}")
    if job.reason == "notify":
        from shared.subscriptions import after_notify_run  # subscriptions imports services, as jobs does

        after_notify_run(services, settings)
    return report
