"""Graph change-notification subscriptions, product side (BEHAVIOUR §8.2).

One subscription per enabled user on the sync folder's contacts (created, updated, deleted), pointing
at `{SYNC_PUBLIC_URL}/api/notify/graph` for both change and lifecycle notifications, with a random
`clientState` per subscription that the endpoint checks in constant time. The timer keeps them:
`maintain` creates what is missing (a newly enabled user, a recreated sync folder, one Graph lost or
removed), renews each well before Graph's limit for contacts (4,230 minutes, "Create subscription",
https://learn.microsoft.com/graph/api/subscription-post-subscriptions), and deletes those of disabled
or deleted users. A lifecycle event is only recorded by the endpoint (it must answer within 3 s and
calls nobody); the notify job it queues then renews or recreates (`after_notify_run`).

Delta stays the source of truth: a notification only says "run now". So a subscription that fails to be
created or renewed costs latency (the user falls back to the regular schedule), never data, and one
user's failure never stops the others.
"""

from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from shared.graph_client import GraphClient
from shared.http_client import ApiError, RequestCounter
from shared.model import UserSettings, iso, log_fields, redact, user_hash, utcnow
from shared.services import Services
from shared.store import GraphSubscriptionRow

log = logging.getLogger(__name__)

NOTIFY_ROUTE = "/api/notify/graph"
# Graph's maximum for Outlook contacts is 4,230 minutes; ask for a little less (clock skew).
LIFETIME = timedelta(minutes=4200)
# Renew once less than this is left: about every 34 hours, so a day of failed timer ticks still
# leaves the subscription alive.
RENEW_BEFORE = timedelta(hours=36)
CLIENT_STATE_BYTES = 32  # 43 characters of base64url; Graph allows 128


@dataclass
class SubscriptionTick:
    """What one maintenance pass did (the timer's log record; tests read it)."""

    live: int = 0
    created: int = 0
    renewed: int = 0
    deleted: int = 0
    failed: int = 0
    rows: dict[str, GraphSubscriptionRow] = field(default_factory=dict)  # user → live subscription

    def summary(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k != "rows"}


def notification_url(services: Services) -> str | None:
    base = services.config.public_url
    return f"{base}{NOTIFY_ROUTE}" if base else None


def is_live(row: GraphSubscriptionRow, now: datetime) -> bool:
    """Graph will notify us for this user: no lifecycle event pending and not expired."""
    return not row.action and row.expires_at > now


def maintain(
    services: Services, users: list[UserSettings], keep_users: frozenset[str] = frozenset()
) -> SubscriptionTick:
    """Bring the stored subscriptions in line with the enabled users (the timer, every tick).

    `keep_users`: users whose settings could not be read this tick; their subscriptions are left alone.
    Without SYNC_PUBLIC_URL every subscription we hold is deleted (notifications are off).
    """
    tick = SubscriptionTick()
    store = services.store
    rows = store.list_subscriptions()
    url = notification_url(services)
    if url is None and not rows:
        return tick  # notifications off and nothing to clean up: today's behaviour, no requests
    enabled = {u.user: u for u in users if u.enabled} if url else {}
    by_user: dict[str, list[GraphSubscriptionRow]] = defaultdict(list)
    for row in rows:
        by_user[row.user].append(row)
    counter = RequestCounter()
    _bc, graph = services.clients(counter)
    for user, held in by_user.items():
        if user not in enabled and user not in keep_users:
            for row in held:
                _delete(services, graph, row, tick)
    if url is None:
        return tick
    at_graph = _ids_at_graph(graph)
    for user in sorted(enabled):
        try:
            kept = _ensure(services, graph, user, url, by_user.get(user, []), at_graph, tick)
        except Exception as exc:  # one user's subscription must never stop the others
            tick.failed += 1
            log.warning(
                "graph subscription not kept %s",
                log_fields({"userHash": user_hash(user), "error": redact(str(exc), user)}),
            )
            continue
        if kept is not None:
            tick.rows[user] = kept
    return tick


def after_notify_run(services: Services, settings: UserSettings) -> None:
    """After a notify job: act on a lifecycle event the endpoint recorded (renew, or create again)."""
    url = notification_url(services)
    held = services.store.subscriptions_of(settings.user)
    if url is None or not settings.enabled or not any(r.action for r in held):
        return
    counter = RequestCounter()
    _bc, graph = services.clients(counter)
    tick = SubscriptionTick()
    try:
        _ensure(services, graph, settings.user, url, held, None, tick)
    except Exception as exc:  # the timer tries again at its next tick
        log.warning(
            "graph subscription not kept after a lifecycle event %s",
            log_fields({"userHash": user_hash(settings.user), "error": redact(str(exc), settings.user)}),
        )
        return
    log.info("graph subscription after a lifecycle event %s", log_fields(tick.summary()))


def _ids_at_graph(graph: GraphClient) -> set[str] | None:
    """The ids of the app's subscriptions Graph still has (one cheap list per tick), or None when the
    list cannot be read (then only what we know is acted on)."""
    try:
        return {str(s.get("id")) for s in graph.list_subscriptions()}
    except ApiError as exc:
        log.warning("could not list graph subscriptions %s", log_fields({"error": str(exc)}))
        return None


def _ensure(
    services: Services,
    graph: GraphClient,
    user: str,
    url: str,
    held: list[GraphSubscriptionRow],
    at_graph: set[str] | None,
    tick: SubscriptionTick,
) -> GraphSubscriptionRow | None:
    """The user's one live subscription on their current sync folder, made so if needed."""
    state = services.store.get_state(user)
    if not state.folder_id:
        return None  # the user's first run makes the folder; the next tick subscribes to it
    now = utcnow()
    keep: GraphSubscriptionRow | None = None
    for row in sorted(held, key=lambda r: r.expires_at, reverse=True):
        lost = at_graph is not None and row.id not in at_graph
        usable = row.folder_id == state.folder_id and row.action != "recreate" and row.expires_at > now
        if keep is None and usable and not lost:
            keep = row
        elif lost or row.action == "recreate":
            services.store.delete_subscription(row.id)  # Graph no longer has it
        else:
            _delete(services, graph, row, tick)  # an old folder's, or a second one
    if keep is not None and (keep.action == "renew" or keep.expires_at - now < RENEW_BEFORE):
        expires = now + LIFETIME
        try:
            graph.renew_subscription(keep.id, iso(expires))
        except ApiError as exc:
            if exc.status != 404:
                raise
            services.store.delete_subscription(keep.id)
            keep = None  # gone at Graph: create it again below
        else:
            keep.expires_at, keep.action = expires, ""
            services.store.save_subscription(keep)
            tick.renewed += 1
    if keep is None:
        return _create(services, graph, user, state.folder_id, url, tick)
    tick.live += 1
    return keep


def _create(
    services: Services, graph: GraphClient, user: str, folder_id: str, url: str, tick: SubscriptionTick
) -> GraphSubscriptionRow:
    client_state = secrets.token_urlsafe(CLIENT_STATE_BYTES)
    expires = utcnow() + LIFETIME
    created = graph.create_subscription(user, folder_id, url, client_state, iso(expires))
    sid = created.get("id")
    if not isinstance(sid, str) or not sid:
        raise RuntimeError("Graph's answer to creating a subscription held no id")
    row = GraphSubscriptionRow(sid, user, folder_id, client_state, expires)
    services.store.save_subscription(row)
    tick.created += 1
    return row


def _delete(
    services: Services, graph: GraphClient, row: GraphSubscriptionRow, tick: SubscriptionTick
) -> None:
    try:
        graph.delete_subscription(row.id)
    except ApiError as exc:
        tick.failed += 1
        log.warning(
            "graph subscription not deleted %s",
            log_fields({"userHash": user_hash(row.user), "error": redact(str(exc), row.user)}),
        )
        return  # the row stays, so the next tick tries again
    services.store.delete_subscription(row.id)
    tick.deleted += 1
