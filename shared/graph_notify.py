"""The Graph change-notification endpoint, POST /api/notify/graph (BEHAVIOUR §8.2, §11).

Graph calls it three ways ("Receive change notifications through webhooks",
https://learn.microsoft.com/graph/change-notifications-delivery-webhooks): the validation request
(`?validationToken=…`, answered 200 `text/plain` with the token within 10 s), change notifications and
lifecycle notifications (`{"value": [...]}`, answered 202 within 3 s, else Graph retries and may drop
the subscription's notifications).

It is anonymous, so anyone can call it. What protects it: a notification counts only when its
`subscriptionId` is one we hold and its `clientState` equals that subscription's random secret
(compared in constant time). Whatever the outcome, the answer is the same 202 with no body, so a caller
learns nothing about which subscriptions exist. A notification only wakes the user's incremental run
(shared/wake.py, coalesced and debounced): delta is the source of truth, so a forged or replayed one
costs at most one cheap run for a user we sync, and a lost one costs latency, never data. It makes no
Graph or BC call: a lifecycle event is recorded on the subscription and acted on by the job it queues.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

import azure.functions as func

from shared.model import log_fields
from shared.services import get_services
from shared.wake import send_jobs, wake

log = logging.getLogger(__name__)

MAX_TOKEN = 1024  # Graph's tokens are short; a longer one is not Graph's
MAX_ITEMS = 1000  # Graph batches notifications; far more in one request is not Graph
_LIFECYCLE_ACTIONS = {"reauthorizationRequired": "renew", "subscriptionRemoved": "recreate", "missed": ""}
# Compared against when the subscription id is unknown, so both cases do the same work.
_NO_SECRET = b"\x00" * 43


def _plain(status: int, text: str) -> func.HttpResponse:
    return func.HttpResponse(
        text,
        status_code=status,
        mimetype="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
    )


def _bad(message: str) -> func.HttpResponse:
    body = json.dumps({"error": {"code": "InvalidNotification", "message": message}})
    return func.HttpResponse(body, status_code=400, mimetype="application/json", charset="utf-8")


def _items(req: func.HttpRequest) -> list[dict[str, Any]] | str:
    """The notifications of the body, or why the body is not a notification collection."""
    try:
        body = json.loads(req.get_body() or b"")
    except (ValueError, UnicodeDecodeError):
        return 'the body must be JSON: {"value": [notification, ...]}'
    value = body.get("value") if isinstance(body, dict) else None
    if not isinstance(value, list) or not value:
        return 'the body must be {"value": [notification, ...]} with at least one notification'
    if len(value) > MAX_ITEMS:
        return f"at most {MAX_ITEMS} notifications per request"
    if not all(isinstance(item, dict) for item in value):
        return "each notification must be a JSON object"
    return value


def handle(req: func.HttpRequest) -> func.HttpResponse:
    token = req.params.get("validationToken")
    if token is not None:
        # The validation request: echo the (already URL-decoded) token as plain text, nothing else.
        if not token or len(token) > MAX_TOKEN:
            return _bad(f"validationToken must be 1-{MAX_TOKEN} characters")
        return _plain(200, token)
    items = _items(req)
    if isinstance(items, str):
        return _bad(items)
    services = get_services()
    store = services.store
    users: list[str] = []
    counts = {"received": len(items), "accepted": 0, "refused": 0, "lifecycle": 0}
    for item in items:
        sid, given = item.get("subscriptionId"), item.get("clientState")
        row = store.get_subscription(sid) if isinstance(sid, str) else None
        expected = row.client_state.encode() if row is not None else _NO_SECRET
        matches = hmac.compare_digest(str(given or "").encode(), expected)
        if row is None or not matches:
            counts["refused"] += 1
            continue
        event = item.get("lifecycleEvent")
        if event is not None:
            action = _LIFECYCLE_ACTIONS.get(str(event))
            if action is None:
                counts["refused"] += 1
                continue
            counts["lifecycle"] += 1
            if action and row.action != action:
                row.action = action  # the queued job renews or recreates it (no Graph call here)
                store.save_subscription(row)
        counts["accepted"] += 1
        users.append(row.user)
    messages = wake(services, users, "notify")
    send_jobs(services, messages, services.config.notify_debounce_seconds)
    log.info("graph notifications %s", log_fields({**counts, "queued": len(messages)}))
    return func.HttpResponse(status_code=202)
