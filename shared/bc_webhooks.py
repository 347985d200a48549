"""Business Central contacts webhooks (BEHAVIOUR §8.3): the subscriptions' upkeep and the notification
endpoint's decisions.

Where a tenant's BC lists `v2.0/contacts` in a company's `webhookSupportedResources`, BC itself says
when a contact changed, so the change poll need not ask that company every minute. Microsoft's
documented list of webhook entities has no contacts, so on most tenants nothing here applies and the
poll does the job. Facts from "Working with webhooks in Dynamics 365 Business Central" (Microsoft Learn,
https://learn.microsoft.com/dynamics365/business-central/dev-itpro/api-reference/v2.0/dynamics-subscriptions):
the handshake echoes `validationToken` with 200; a subscription lasts three days and is renewed with a
PATCH (If-Match, another handshake); BC deletes a subscription whose endpoint answers anything but
2xx, 408, 429 or 5xx; a bulk change of more than 1,000 records is one `collection` notification.

**Upkeep** runs at the start of every change-poll tick (`upkeep`), because that timer already walks the
companies with enabled users every minute and is the one that must skip a subscribed company: a new
company is subscribed within a minute, and a company whose subscription cannot be confirmed is polled on
the same tick. It costs no BC request on most ticks: BC is asked whether the subscription still exists
every `VERIFY_EVERY`, renewal happens once `RENEW_BEFORE` is left, support is read again every
`SUPPORT_RECHECK`.

**Notifications** carry no data; each is only a hint. The endpoint (`accept`) answers without calling
BC or Graph: it checks each entry's subscription id and clientState (constant-time) against the rows
in Table Storage and wakes that company's enabled users through the change poll's coalescing (`wake`).
Everything well-formed gets the same 202, known subscription or not, so a forger learns nothing and BC
never drops a subscription because of our answer. Delta stays the source of truth: a lost notification
costs latency (the 15-minute schedule still runs), never data.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import azure.functions as func

from shared.bc_client import BcClient
from shared.http_client import ApiError
from shared.model import UserSettings, log_fields, parse_iso
from shared.services import Services, get_services
from shared.store import BcWebhookRow, StoreError
from shared.wake import wake

log = logging.getLogger(__name__)

ROUTE = "notify/bc"
SUPPORT_RECHECK = timedelta(days=1)  # webhookSupportedResources changes with a BC update at most
VERIFY_EVERY = timedelta(minutes=15)  # a subscription BC dropped is noticed within this, then recreated
RENEW_BEFORE = timedelta(days=1)  # of the documented three-day lifetime: renew with two days to spare
VALIDATION_TOKEN_MAX = 1024
MAX_ENTRIES = 10_000  # more than one 30-second window can hold (1,000 records, then a collection)
_TOKEN = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces: what a token is, and safe to echo
_COMPANY = re.compile(r"companies\(([0-9a-fA-F-]{36})\)")


class BadNotification(ValueError):
    """A notification body that is not what BC sends; the message names the problem."""


@dataclass
class Upkeep:
    """What one upkeep did, for the tick's log record and tests."""

    live: set[str] = field(default_factory=set)
    created: int = 0
    renewed: int = 0
    recreated: int = 0
    deleted: int = 0
    failed: int = 0


def notification_url(services: Services) -> str | None:
    """Where BC must send notifications, or None when webhooks are off or the public address unknown."""
    config = services.config
    if not config.bc_webhooks or not config.public_url:
        return None
    return f"{config.public_url}/api/{ROUTE}"


def is_live(row: BcWebhookRow, url: str | None, now: datetime) -> bool:
    """A subscription the change poll may rely on: for the current address and not yet expired."""
    return bool(
        url
        and row.supported
        and row.subscription_id
        and row.notification_url == url
        and row.expires_at is not None
        and row.expires_at > now
    )


def upkeep(services: Services, bc: BcClient, companies: set[str]) -> set[str]:
    """Keep one contacts subscription per company with enabled users where BC supports it, delete the
    others; returns the companies whose subscription is live (the change poll skips them)."""
    url = notification_url(services)
    try:
        rows = services.store.list_bc_webhooks()
    except StoreError as exc:
        log.warning("BC webhook upkeep could not read its rows %s", log_fields({"error": exc.detail}))
        return set()  # poll every company this tick
    done = Upkeep()
    now = services.clock()
    for company in sorted(companies):
        row = rows.get(company) or BcWebhookRow(company)
        try:
            if url is not None and _keep(services, bc, row, url, now, done):
                done.live.add(company)
        except (ApiError, StoreError) as exc:
            done.failed += 1
            log.warning(
                "BC webhook upkeep failed for a company %s",
                log_fields({"company": company, "error": str(exc)}),
            )
    for company, row in rows.items():
        if company in companies and url is not None:
            continue
        try:  # no enabled user left, or webhooks turned off: BC should stop notifying
            _drop(services, bc, row, done)
        except (ApiError, StoreError) as exc:
            done.failed += 1
            log.warning(
                "BC webhook upkeep could not delete a subscription %s",
                log_fields({"company": company, "error": str(exc)}),
            )
    if done.created or done.renewed or done.recreated or done.deleted or done.failed:
        summary = {k: v for k, v in done.__dict__.items() if k != "live"}
        log.info("BC webhook upkeep %s", log_fields({**summary, "live": len(done.live)}))
    return done.live


def _keep(services: Services, bc: BcClient, row: BcWebhookRow, url: str, now: datetime, done: Upkeep) -> bool:
    store = services.store
    if row.checked_at is None or now - row.checked_at >= SUPPORT_RECHECK:
        row.supported = bc.webhook_supports_contacts(row.company_id)
        row.checked_at = now
        if not row.supported:
            row.forget_subscription()  # BC would not keep one for an unsupported resource
        store.save_bc_webhook(row)
    if not row.supported:
        return False
    if row.subscription_id and row.notification_url != url:
        _drop(services, bc, row, done, keep_row=True)  # the app moved: a new one for the new address
    if row.subscription_id and (row.verified_at is None or now - row.verified_at >= VERIFY_EVERY):
        found = bc.subscription(row.subscription_id)
        if found is None:  # BC dropped it (a refused notification, an expiry, an admin)
            log.info("BC dropped a contacts webhook subscription %s", log_fields({"company": row.company_id}))
            row.forget_subscription()
            done.recreated += 1
        else:
            _take(row, found, now)
        store.save_bc_webhook(row)
    if row.subscription_id and row.expires_at is not None and row.expires_at - now < RENEW_BEFORE:
        _renew(services, bc, row, url, now, done)
    if not row.subscription_id:
        # Changes made before it existed are never notified: the poll still asks on this tick.
        _create(services, bc, row, url, now, done)
        return False
    return is_live(row, url, now)


def _take(row: BcWebhookRow, sub: dict[str, Any], now: datetime) -> None:
    """BC's view of the subscription: its id, etag and expiry."""
    row.subscription_id = str(sub.get("subscriptionId") or row.subscription_id or "") or None
    row.etag = str(sub.get("@odata.etag") or row.etag or "") or None
    expiry = sub.get("expirationDateTime")
    row.expires_at = parse_iso(expiry) if isinstance(expiry, str) and expiry else row.expires_at
    row.verified_at = now


def _create(
    services: Services, bc: BcClient, row: BcWebhookRow, url: str, now: datetime, done: Upkeep
) -> None:
    """A new subscription with a fresh clientState. Subscriptions for this address and company that the
    app does not hold (a create whose answer was lost, a row lost) are deleted first, so BC never
    notifies one change twice."""
    resource = bc.contacts_resource(row.company_id)
    for sub in bc.subscriptions():
        if sub.get("notificationUrl") == url and _same_resource(sub.get("resource"), resource):
            bc.delete_subscription(str(sub.get("subscriptionId")), str(sub.get("@odata.etag") or "*"))
    client_state = secrets.token_urlsafe(32)
    created = bc.create_subscription(url, resource, client_state)
    row.client_state, row.notification_url = client_state, url
    _take(row, created, now)
    services.store.save_bc_webhook(row)
    done.created += 1


def _renew(
    services: Services, bc: BcClient, row: BcWebhookRow, url: str, now: datetime, done: Upkeep
) -> None:
    assert row.subscription_id is not None
    resource = bc.contacts_resource(row.company_id)
    args = (url, resource, row.client_state or "")
    try:
        renewed = bc.renew_subscription(row.subscription_id, row.etag or "*", *args)
    except ApiError as exc:
        if exc.status != 412:
            raise
        current = bc.subscription(row.subscription_id)  # changed since we read it: take its etag
        renewed = (
            None
            if current is None
            else bc.renew_subscription(row.subscription_id, str(current.get("@odata.etag") or "*"), *args)
        )
    if renewed is None:
        row.forget_subscription()  # gone meanwhile: `_keep` creates a new one
        done.recreated += 1
    else:
        _take(row, renewed, now)
        done.renewed += 1
    services.store.save_bc_webhook(row)


def _drop(services: Services, bc: BcClient, row: BcWebhookRow, done: Upkeep, keep_row: bool = False) -> None:
    if row.subscription_id:
        try:
            bc.delete_subscription(row.subscription_id, row.etag or "*")
        except ApiError as exc:
            if exc.status != 412:
                raise
            current = bc.subscription(row.subscription_id)
            if current is not None:
                bc.delete_subscription(row.subscription_id, str(current.get("@odata.etag") or "*"))
        done.deleted += 1
    if keep_row:
        row.forget_subscription()
        services.store.save_bc_webhook(row)
    else:
        services.store.delete_bc_webhook(row.company_id)


def _same_resource(got: Any, resource: str) -> bool:
    return isinstance(got, str) and got.lower().lstrip("/").endswith(resource.lower().lstrip("/"))


# ---------------------------------------------------------------------------------------------------
# The endpoint's decisions (function_bc_notify translates HTTP)
# ---------------------------------------------------------------------------------------------------


def validation_answer(token: str) -> str:
    """The handshake's answer body: the token itself. A token that is not a plain token is refused
    (BadNotification) rather than echoed: the endpoint is anonymous and must not reflect markup."""
    if not token or len(token) > VALIDATION_TOKEN_MAX or not _TOKEN.match(token):
        raise BadNotification(
            f"validationToken must be 1-{VALIDATION_TOKEN_MAX} printable characters without spaces"
        )
    return token


def parse(body: bytes) -> list[dict[str, str]]:
    """The entries of a notification POST (`{"value": [...]}`), each with a subscriptionId."""
    try:
        data = json.loads(body.decode("utf-8-sig"))  # before BC 19 notifications carried a BOM
    except (UnicodeDecodeError, ValueError):
        raise BadNotification('the body must be JSON: {"value": [notifications]}') from None
    value = data.get("value") if isinstance(data, dict) else None
    if not isinstance(value, list) or not value:
        raise BadNotification('the body must be a JSON object with a non-empty "value" array')
    if len(value) > MAX_ENTRIES:
        raise BadNotification(f"at most {MAX_ENTRIES} notifications in one request")
    entries: list[dict[str, str]] = []
    for n, entry in enumerate(value):
        if not isinstance(entry, dict) or not isinstance(entry.get("subscriptionId"), str):
            raise BadNotification(f"value[{n}] must be an object with a subscriptionId string")
        for name in ("clientState", "resource", "changeType"):
            if entry.get(name) is not None and not isinstance(entry[name], str):
                raise BadNotification(f"value[{n}].{name} must be a string")
        entries.append({k: v for k, v in entry.items() if isinstance(v, str)})
    return entries


def companies_to_wake(rows: dict[str, BcWebhookRow], entries: list[dict[str, str]]) -> set[str]:
    """The companies whose subscription sent at least one genuine entry: a known subscription id whose
    clientState matches (constant time) and whose resource names that company. Any change type counts
    (created, updated, deleted, collection): each only means "run now"."""
    by_id = {row.subscription_id: row for row in rows.values() if row.subscription_id and row.client_state}
    woken: set[str] = set()
    for entry in entries:
        row = by_id.get(entry["subscriptionId"])
        expected = row.client_state if row is not None and row.client_state else secrets.token_urlsafe(32)
        genuine = secrets.compare_digest(entry.get("clientState", "").encode(), expected.encode())
        if row is None or not genuine:
            continue
        named = _COMPANY.search(entry.get("resource", ""))
        if named is not None and named.group(1).lower() != row.company_id:
            continue
        woken.add(row.company_id)
    return woken


def users_of(services: Services, users: list[UserSettings], company: str) -> list[str]:
    """The enabled users synced against `company` (one of their `companies`, BEHAVIOUR §5.4)."""
    default = services.config.bc_company_id
    return sorted(
        u.user for u in users if u.enabled and any(scope.company_id == company for scope in u.scopes(default))
    )


def handle(req: func.HttpRequest, jobs: func.Out[list[str]]) -> func.HttpResponse:
    """POST /api/notify/bc: the handshake, or notifications turned into coalesced incremental runs.

    No BC or Graph call: only Table Storage reads and the queue, well inside BC's wait. A store that
    cannot be read answers 503, which BC retries (a 4xx would make BC delete the subscription).
    """

    token = req.params.get("validationToken")
    try:
        if token is not None:
            return func.HttpResponse(validation_answer(token), status_code=200, mimetype="text/plain")
        entries = parse(req.get_body() or b"")
    except BadNotification as exc:
        return func.HttpResponse(
            json.dumps({"error": {"code": "BadNotification", "message": str(exc)}}),
            status_code=400,
            mimetype="application/json",
        )
    services = get_services()
    try:
        companies = companies_to_wake(services.store.list_bc_webhooks(), entries)
        messages: list[str] = []
        if companies:
            users, _bad = services.store.list_settings_checked()
            for company in sorted(companies):
                messages.extend(wake(services, users_of(services, users, company), "webhook"))
    except StoreError as exc:
        log.warning("BC notification not processed %s", log_fields({"error": exc.detail}))
        return func.HttpResponse(status_code=503, headers={"Retry-After": "60"})
    jobs.set(messages)
    log.info(
        "BC notification %s",
        log_fields({"entries": len(entries), "companies": len(companies), "queued": len(messages)}),
    )
    return func.HttpResponse(status_code=202)
