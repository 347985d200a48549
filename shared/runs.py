"""The run lifecycle: the statuses a run report goes through, and the only code that changes them.

Callers follow a run through its report (Power Automate polls the 202's Location, an admin reads it,
the CLI prints it), so a status must never claim what cannot be true: a finished run that is
"running" again, a queued run that "succeeded" without running. Every change of status is a named
`Transition` below; a change the table does not allow raises `IllegalTransition`.

    (new) ──► running ──succeed──────────► succeeded
                      ──finish_partial───► partial
                      ──stop_for_safety──► safetyStop
                      ──fail─────────────► failed
                      ──abandon──────────► failed       (its host died: no lease, never finished)
                      ──interrupt────────► interrupted ──requeue──► queued
    (new) ──► queued ──resume──► running;  interrupted ──resume──► running
    queued | running | interrupted | failed ──give_up──► failed   (the worker will not run it)

A queue retry after a failed attempt starts a fresh report under the same run id (`sync.run_user`);
that is a new report, not a transition of the failed one.

A run that is not a dry run holds its user's lease from before it stores "running" until after it
stores its final report, so a stored "running" report whose run holds no lease died with its host
(restart, timeout). Reading never writes: `as_seen` shows such a run as failed to a reader, and the
writers (the user's next POST /api/sync, the queue worker) store it with `settle_abandoned`.

The status values themselves (`RunStatus`) live in `shared/model.py` with the report record, which
every module imports; they are re-exported here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from shared.model import RunReport, RunStatus, iso, utcnow
from shared.store import Store

__all__ = [
    "DONE",
    "IN_PROGRESS",
    "RESUMABLE",
    "TRANSITIONS",
    "IllegalTransition",
    "RunStatus",
    "Transition",
    "abandon",
    "as_seen",
    "fail",
    "finish",
    "give_up",
    "interrupt",
    "queued",
    "requeue",
    "resume",
    "settle_abandoned",
    "skipped",
    "stop_for_safety",
    "succeed",
]

log = logging.getLogger(__name__)

QUEUED, RUNNING, INTERRUPTED = RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.INTERRUPTED
SUCCEEDED, PARTIAL, FAILED = RunStatus.SUCCEEDED, RunStatus.PARTIAL, RunStatus.FAILED
SAFETY_STOP = RunStatus.SAFETY_STOP

# A GET of a run in one of these answers 202 (keep polling).
IN_PROGRESS = frozenset({QUEUED, RUNNING, INTERRUPTED})
# Finished for good: a repeated queue delivery of its job does not run it again. (A failed run is
# not here: the queue's retry runs it again.)
DONE = frozenset({SUCCEEDED, PARTIAL, SAFETY_STOP})

ABANDONED_MESSAGE = (
    "the run stopped without finishing (its host was restarted or timed out); what it wrote is "
    "linked, and the next run continues from there"
)
INTERRUPTED_MESSAGE = "stopped at a batch boundary; the run continues from the queue"
REQUEUED_MESSAGE = "continuing in the background; poll the Location for the report"
QUEUED_MESSAGE = "queued; poll the Location for the report"
_SETTLE_LIMIT = 20  # stale "running" reports settled per call; the next writer settles the rest


@dataclass(frozen=True)
class Transition:
    """A named change of status, allowed only from `sources`."""

    name: str
    sources: frozenset[RunStatus]
    target: RunStatus


RESUME = Transition("resume", frozenset({QUEUED, INTERRUPTED}), RUNNING)
INTERRUPT = Transition("interrupt", frozenset({RUNNING}), INTERRUPTED)
REQUEUE = Transition("requeue", frozenset({INTERRUPTED}), QUEUED)
SUCCEED = Transition("succeed", frozenset({RUNNING}), SUCCEEDED)
FINISH_PARTIAL = Transition("finish_partial", frozenset({RUNNING}), PARTIAL)
STOP_FOR_SAFETY = Transition("stop_for_safety", frozenset({RUNNING}), SAFETY_STOP)
FAIL = Transition("fail", frozenset({RUNNING}), FAILED)
ABANDON = Transition("abandon", frozenset({RUNNING}), FAILED)
GIVE_UP = Transition("give_up", frozenset({QUEUED, RUNNING, INTERRUPTED, FAILED}), FAILED)
TRANSITIONS = (RESUME, INTERRUPT, REQUEUE, SUCCEED, FINISH_PARTIAL, STOP_FOR_SAFETY, FAIL, ABANDON, GIVE_UP)
RESUMABLE = RESUME.sources  # a queued job continues the stored report of these


class IllegalTransition(RuntimeError):
    """A status change the lifecycle does not allow: a bug, never a user's mistake."""

    def __init__(self, transition: Transition, report: RunReport):
        allowed = ", ".join(sorted(transition.sources))
        super().__init__(
            f"cannot {transition.name} run {report.runId}: it is {report.status} (allowed from {allowed})"
        )
        self.transition = transition
        self.status = report.status


def _move(report: RunReport, transition: Transition) -> RunReport:
    if report.status not in transition.sources:
        raise IllegalTransition(transition, report)
    report.status = transition.target
    return report


# New reports -----------------------------------------------------------------------------------
def queued(user: str, mode: str, dry_run: bool) -> RunReport:
    """The report of an on-demand run handed to the queue before it starts."""
    return RunReport(user=user, mode=mode, dryRun=dry_run, status=QUEUED, message=QUEUED_MESSAGE)


def skipped(user: str, mode: str, dry_run: bool, why: str) -> RunReport:
    """The CLI's answer for a user whose run could not start (another run holds the lease); not stored."""
    return RunReport(user=user, mode=mode, dryRun=dry_run, status=RunStatus.SKIPPED, message=why)


# Transitions -----------------------------------------------------------------------------------
def resume(report: RunReport) -> RunReport:
    """A queued or interrupted run starts (again): its items and counts are kept."""
    _move(report, RESUME)
    report.finishedAt = None
    report.message = None
    return report


def interrupt(report: RunReport) -> RunReport:
    """Stopped at a batch boundary (the inline budget was spent); what it wrote is linked."""
    _move(report, INTERRUPT)
    report.message = INTERRUPTED_MESSAGE
    return report


def requeue(report: RunReport) -> RunReport:
    """An interrupted run is handed to the queue, which continues it under the same run id."""
    _move(report, REQUEUE)
    report.message = REQUEUED_MESSAGE
    return report


def succeed(report: RunReport) -> RunReport:
    """Every planned action was applied (or, for a dry run, reported). The message is kept."""
    return _move(report, SUCCEED)


def finish(report: RunReport, *, failures: bool) -> RunReport:
    """The end of a run that wrote: partial when some contacts failed (they are in the items)."""
    return _move(report, FINISH_PARTIAL if failures else SUCCEED)


def stop_for_safety(report: RunReport, why: str) -> RunReport:
    """The run would remove too many contacts; nothing was written and a forced run is needed."""
    _move(report, STOP_FOR_SAFETY)
    report.message = why
    return report


def fail(report: RunReport, why: str) -> RunReport:
    """The run raised; `why` says what to fix (never a token or a secret)."""
    _move(report, FAIL)
    report.message = why
    return report


def abandon(report: RunReport) -> RunReport:
    """The run died with its host: no lease, never finished. The next run continues from its links."""
    _move(report, ABANDON)
    report.finishedAt = iso(utcnow())
    report.message = ABANDONED_MESSAGE
    return report


def give_up(report: RunReport, why: str) -> RunReport:
    """The worker will not run this job (settings gone or invalid, retries used up)."""
    _move(report, GIVE_UP)
    report.finishedAt = iso(utcnow())
    report.message = why
    return report


# Runs that died with their host ------------------------------------------------------------------
def _latest(store: Store, report: RunReport) -> tuple[RunReport, bool]:
    """The latest report of a stored run, and whether that run died with its host.

    The lease is read before the report is read again: a run releases its lease only after storing
    its final report, so once the lease is gone the re-read shows the final report or a dead run.
    """
    if report.status != RUNNING or report.dryRun:  # a dry run holds no lease: nothing to tell by
        return report, False
    lease = store.current_lease(report.user)
    if lease is not None and lease.holder == report.runId:
        return report, False
    again = store.get_report(report.runId) or report
    return again, again.status == RUNNING


def as_seen(store: Store, report: RunReport) -> RunReport:
    """The report as a reader should see it: a dead run shows as failed. Never writes."""
    latest, dead = _latest(store, report)
    return abandon(replace(latest)) if dead else latest


def settle_abandoned(store: Store, user: str, *, keep: str | None = None) -> list[str]:
    """Store as failed the user's runs that died with their host; returns their run ids.

    Called by writers only (never by a GET). `keep` is a run the caller is about to run again (a
    redelivered job), which needs no settling.
    """
    settled: list[str] = []
    for summary in store.list_reports(user, _SETTLE_LIMIT, items=False, status=RUNNING):
        if summary.dryRun or summary.runId == keep:
            continue
        report = store.get_report(summary.runId)
        if report is None:
            continue
        latest, dead = _latest(store, report)
        if dead:
            store.save_report(abandon(latest))
            settled.append(latest.runId)
    if settled:
        log.info("marked %d run(s) that died with their host as failed", len(settled))
    return settled
