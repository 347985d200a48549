"""The change poll (BEHAVIOUR §8.1): a second timer that asks each Business Central company one cheap
question and queues incremental runs only for that company's users when the answer is yes.

BC → Outlook edits then arrive within about a minute instead of at the next quarter hour, while an
idle tick costs one BC request per company and nothing else. Microsoft's documented list of
webhook-supported BC entities does not include contacts, so this poll is what works on every tenant.
Where a tenant does offer contacts webhooks, each tick first keeps that company's subscription
(shared/bc_webhooks.py, BEHAVIOUR §8.3) and does not ask a company whose subscription is live.

The question, `lastModifiedDateTime gt <oldest watermark>` with `$top=1&$select=id`, sees creations
and edits but not deletions (the API keeps no tombstones): those still arrive with the regular
schedule's id listing. Coalescing (shared/wake.py, shared with change notifications): a queued job
leaves a mark in the user's State partition until the worker has finished with it; while it is there
the poll queues nothing more for the user, so a burst of ticks is one job, and a user whose run is in
progress gets one follow-up at most.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import azure.functions as func

from shared.bc_client import BcClient
from shared.bc_webhooks import upkeep
from shared.http_client import RequestCounter
from shared.model import UserSettings, log_fields, parse_iso, redact, user_hash
from shared.services import Services, get_services
from shared.sync import company_watermarks
from shared.wake import wake

log = logging.getLogger(__name__)


@dataclass
class PollTick:
    """What one tick did, for its log record and for tests."""

    companies: int = 0
    asked: int = 0
    changed: int = 0
    failed: int = 0
    queued: int = 0
    coalesced: int = 0
    webhooks: int = 0  # companies not asked: their BC contacts webhook subscription is live
    messages: list[str] = field(default_factory=list)


def _by_company(services: Services, users: list[UserSettings]) -> dict[str, dict[str, str | None]]:
    """Company → {user → that user's watermark of the company}: a user with `companies` is in the
    group of each of its companies (BEHAVIOUR §5.4), with the company's own watermark."""
    groups: dict[str, dict[str, str | None]] = defaultdict(dict)
    for u in users:
        if not u.enabled:
            continue
        state = services.store.get_state(u.user)
        for company, mark in company_watermarks(u, state, services.config.bc_company_id).items():
            groups[company.lower()][u.user] = mark
    return groups


def _watermarks(members: dict[str, str | None]) -> dict[str, str]:
    """Each user's BC watermark; users without one are left out (their first run is the scheduled one)."""
    return {user: mark for user, mark in members.items() if mark}


def _queue(services: Services, users: list[str], tick: PollTick) -> None:
    """One incremental job per user, unless the user's previous job has not finished yet (shared/wake.py)."""
    messages = wake(services, users, "poll")
    tick.messages.extend(messages)
    tick.queued += len(messages)
    tick.coalesced += len(users) - len(messages)


def _ask(
    services: Services, bc: BcClient, company: str, members: dict[str, str | None], tick: PollTick
) -> None:
    watermarks = _watermarks(members)
    if not watermarks:
        return
    oldest = min(watermarks.values(), key=parse_iso)
    tick.asked += 1
    try:
        changed = bc.contacts_changed_since(company, oldest)
    except Exception as exc:  # one company's failure must not stop the others
        tick.failed += 1
        detail = str(exc)
        for user in watermarks:
            detail = redact(detail, user)
        log.warning(
            "change poll could not ask a company %s", log_fields({"company": company, "error": detail})
        )
        return
    if changed:
        tick.changed += 1
        _queue(services, sorted(watermarks), tick)


def poll(timer: Any, jobs: func.Out[list[str]]) -> PollTick:
    """One tick: one question per company with enabled users, jobs only where the answer is yes."""
    services = get_services()
    users, bad = services.store.list_settings_checked()
    for key, _err in bad:
        log.warning(
            "change poll skips a user with invalid settings %s", log_fields({"userHash": user_hash(key)})
        )
    tick = PollTick()
    counter = RequestCounter()
    bc, _graph = services.clients(counter)
    groups = _by_company(services, users)
    # Webhook upkeep first: a company whose contacts webhook is live is not asked (BEHAVIOUR §8.3).
    subscribed = upkeep(services, bc, set(groups))
    for company, members in sorted(groups.items()):
        tick.companies += 1
        if company in subscribed:
            tick.webhooks += 1
            continue
        _ask(services, bc, company, members, tick)
    jobs.set(tick.messages)
    summary = {k: v for k, v in tick.__dict__.items() if k != "messages"}
    summary["bcRequests"] = counter.counts.get("bc", 0)
    summary["pastDue"] = bool(getattr(timer, "past_due", False))
    log.info("change poll %s", log_fields(summary))
    return tick
