"""Business Central webhooks: `api/v2.0/subscriptions`, the handshake, notifications, `webhookSupportedResources`.

Every fact from "Working with webhooks in Dynamics 365 Business Central" (Microsoft Learn,
https://learn.microsoft.com/dynamics365/business-central/dev-itpro/api-reference/v2.0/dynamics-subscriptions)
and the subscriptions API pages it links; tests/sandbox/test_bc_webhooks.py pins each one:

- ``POST .../api/v2.0/subscriptions`` with ``notificationUrl``, ``resource`` and optional ``clientState``;
  BC then POSTs to ``notificationUrl?validationToken=...`` and registers the subscription only when
  the answer is 200 with the token in the body (201 and the subscription). ``PATCH
  subscriptions('{id}')`` (``If-Match`` required) renews it with the same handshake; ``DELETE``
  (``If-Match`` required too) removes it.
- A subscription expires three days after creation or its last renewal (``expirationDateTime``).
- Notifications are not sent at once: BC waits 30 seconds after the first change, so several changes
  to one record become one notification; if more than 1,000 records changed in that window, one
  ``collection`` notification with a ``$filter`` on the resource is sent instead. One POST can carry
  notifications of several subscriptions (``{"value": [...]}``).
- The subscriber's answer: 408, 429 or 5xx (or no answer) is retried "over the next 36 hours"
  (modelled: bounded ``retry_delays``); any other non-2xx answer deletes the subscription.
- ``GET .../api/microsoft/runtime/beta/companies({id})/webhookSupportedResources`` lists what can be
  subscribed to. The documented list has no ``contacts``, so by default this tenant does not list them
  and refuses a contacts subscription; ``contacts_supported = True`` is the per-tenant switch for a BC
  whose contacts API page is webhook-enabled.

Not documented, so chosen and marked as such: the handshake's time limit (``validation_timeout``,
5 s), the notification time limit (``delivery_timeout``, 5 s) and the error codes and messages of a
failed handshake or an unsupported resource. The 30-second window is driven by ``flush()`` (tests) or,
with ``auto_flush_delay`` set, by a timer (the demo).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from sandbox.bc import BcError, BusinessCentralService, check_if_match, format_datetime
from sandbox.httpd import Request, Response, Route
from sandbox.notify import Deliverer, DeliveryPolicy, Job, url_problem

LIFETIME = timedelta(days=3)
COLLECTION_THRESHOLD = 1000
CLIENT_STATE_MAX = 2048  # the documented sample value is named "optionalValueOf2048"
# Documented "List of supported entities" (v2.0): contacts is not among them.
DOCUMENTED_RESOURCES = (
    "accounts", "companyInformation", "countriesRegions", "currencies", "customerPaymentJournals",
    "customers", "dimensions", "employees", "generalLedgerEntries", "itemCategories", "items", "journals",
    "paymentMethods", "paymentTerms", "purchaseInvoices", "salesCreditMemos", "salesInvoices",
    "salesOrders", "salesQuotes", "shipmentMethods", "unitsOfMeasure", "vendors",
)  # fmt: skip
# Retries "over the next 36 hours": six further attempts, 28 h 11 min in all.
DEFAULT_RETRY_DELAYS = (60.0, 600.0, 3600.0, 3 * 3600.0, 12 * 3600.0, 12 * 3600.0)
_RESOURCE = re.compile(
    r"(?:https?://[^/]+(?:/v2\.0/[^/]+/[^/]+)?)?/?api/v2\.0/companies\((?P<cid>[0-9a-fA-F-]{36})\)/(?P<entity>\w+)"
)


@dataclass
class BcSubscription:
    id: str
    notification_url: str
    resource: str
    company_id: str
    entity: str
    client_state: str | None
    expiration: datetime
    modified: datetime
    user_id: str
    version: int = 1
    pending: dict[str, tuple[str, datetime]] = field(default_factory=dict)  # contact id → change, when

    @property
    def etag(self) -> str:
        digest = hashlib.sha1(f"{self.id}:{self.version}".encode()).hexdigest()[:16]
        return f'W/"JzE5O{digest}Jw=="'

    def json(self) -> dict[str, Any]:
        return {
            "@odata.etag": self.etag,
            "subscriptionId": self.id,
            "notificationUrl": self.notification_url,
            "resource": self.resource,
            "timestamp": self.version,
            "userId": self.user_id,
            "lastModifiedDateTime": format_datetime(self.modified),
            "clientState": self.client_state or "",
            "expirationDateTime": format_datetime(self.expiration),
        }


class BcWebhooks:
    """Adds webhook subscriptions to a BusinessCentralService and delivers its contact changes."""

    def __init__(
        self, bc: BusinessCentralService, ca_bundle: str | None = None, allow_loopback_http: bool = True
    ) -> None:
        self.bc = bc
        self.allow_loopback_http = allow_loopback_http
        self.contacts_supported = False  # the per-tenant switch (see the module docstring)
        self.deliverer = Deliverer("bc", ca_bundle)
        self.retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
        self.validation_timeout = 5.0
        self.delivery_timeout = 5.0
        self.collection_threshold = COLLECTION_THRESHOLD
        self.auto_flush_delay: float | None = None  # seconds (BC: 30); None: tests call flush()
        self.subscriptions: dict[str, BcSubscription] = {}
        self._timer: threading.Timer | None = None
        bc.contact_listeners.append(self._on_change)
        p = r"/v2\.0/(?P<tenant>[^/]+)/(?P<env>[^/]+)/api"
        one = rf"{p}/v2\.0/subscriptions\('?(?P<sid>[^)']*)'?\)"
        routes: list[tuple[str, str, Callable[..., Response], str]] = [
            ("GET", rf"{p}/v2\.0/subscriptions", self._list, "subscriptions.list"),
            ("POST", rf"{p}/v2\.0/subscriptions", self._create, "subscriptions.create"),
            ("GET", one, self._get, "subscriptions.get"),
            ("PATCH", one, self._update, "subscriptions.update"),
            ("DELETE", one, self._delete, "subscriptions.delete"),
            (
                "GET",
                rf"{p}/microsoft/runtime/beta/companies\((?P<cid>[^)/]*)\)/webhookSupportedResources",
                self._supported,
                "webhookSupportedResources",
            ),
        ]
        # Before the service's catch-all 404 routes, and known to its 405 check.
        at = len(bc._known)
        for offset, (method, pattern, handler, kind) in enumerate(routes):
            route = Route(method, re.compile(f"^{pattern}$"), self._guard(handler), kind)
            bc.routes.insert(at + offset, route)
            bc._known.append(route)

    # ------------------------------------------------------------------ control API (tests, demo)
    def flush(self) -> int:
        """The 30-second window has passed: send what is pending. Returns the number of POSTs queued."""
        with self.bc.lock:
            self._expire()
            by_url: dict[str, list[dict[str, Any]]] = {}
            for sub in self.subscriptions.values():
                entries = self._entries(sub)
                sub.pending.clear()
                if entries:
                    by_url.setdefault(sub.notification_url, []).extend(entries)
            self._timer = None
        for url, entries in by_url.items():
            self.deliverer.submit(Job(url, {"value": entries}, self._policy(), self._settled))
        return len(by_url)

    def resource_list(self) -> list[str]:
        names = list(DOCUMENTED_RESOURCES) + (["contacts"] if self.contacts_supported else [])
        return [f"v2.0/{n}" for n in sorted(names, key=str.lower)]

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.deliverer.stop()

    # ------------------------------------------------------------------ handlers
    def _guard(self, handler: Callable[..., Response]) -> Callable[..., Response]:
        def run(req: Request, **groups: str) -> Response:
            groups.pop("tenant", None)
            groups.pop("env", None)
            try:
                return handler(req, **groups)
            except BcError as exc:
                return self.bc.error_response(exc.status, exc.code, str(exc.message), exc.headers)

        return run

    def _create(self, req: Request) -> Response:
        body = _object(req)
        url = self._url(body.get("notificationUrl"))
        resource, company_id, entity = self._resource(req, body.get("resource"))
        client_state = _client_state(body.get("clientState"))
        self._handshake(url)
        now = self.bc.clock.now()
        claims = self.bc._claims(req) or {}
        sub = BcSubscription(
            id=uuid.uuid4().hex,
            notification_url=url,
            resource=resource,
            company_id=company_id,
            entity=entity,
            client_state=client_state,
            expiration=now + LIFETIME,
            modified=now,
            user_id=str(claims.get("oid") or claims.get("appid") or ""),
        )
        with self.bc.lock:
            self.subscriptions[sub.id] = sub
        return Response(201, sub.json(), {"ETag": sub.etag})

    def _list(self, req: Request) -> Response:
        with self.bc.lock:
            self._expire()
            return Response(200, {"value": [s.json() for s in self.subscriptions.values()]})

    def _get(self, req: Request, sid: str) -> Response:
        sub = self._find(sid)
        return Response(200, sub.json(), {"ETag": sub.etag})

    def _update(self, req: Request, sid: str) -> Response:
        sub = self._find(sid)
        self._check_if_match(req, sub)
        body = _object(req)
        url = self._url(body.get("notificationUrl", sub.notification_url))
        resource, company_id, entity = self._resource(req, body.get("resource", sub.resource))
        client_state = _client_state(body.get("clientState", sub.client_state))
        self._handshake(url)  # "PATCH requests a handshake, just like POST requests"
        now = self.bc.clock.now()
        with self.bc.lock:
            sub.notification_url, sub.resource, sub.company_id, sub.entity = url, resource, company_id, entity
            sub.client_state = client_state
            sub.expiration, sub.modified = now + LIFETIME, now
            sub.version += 1
        return Response(200, sub.json(), {"ETag": sub.etag})

    def _delete(self, req: Request, sid: str) -> Response:
        sub = self._find(sid)
        self._check_if_match(req, sub)  # If-Match "Required" (dynamics_subscriptions_delete.md)
        with self.bc.lock:
            self.subscriptions.pop(sub.id, None)
        return Response(204)

    def _supported(self, req: Request, cid: str) -> Response:
        self.bc._company_from_url(req, cid)
        names = self.resource_list()
        wanted = req.query.get("$filter")
        if wanted:
            m = re.fullmatch(r"\s*resource\s+eq\s+'([^']*)'\s*", wanted)
            if not m:
                raise BcError(400, "BadRequest", f"The $filter '{wanted}' is not supported by the sandbox.")
            pattern = m.group(1)
            names = [
                n for n in names if (n.startswith(pattern[:-1]) if pattern.endswith("*") else n == pattern)
            ]
        return Response(200, {"value": [{"resource": n} for n in names]})

    # ------------------------------------------------------------------ checks
    def _url(self, url: Any) -> str:
        problem = url_problem(url, self.allow_loopback_http)
        if problem:
            raise BcError(400, "BadRequest", f"The notificationUrl {problem}.")
        return str(url)

    def _resource(self, req: Request, value: Any) -> tuple[str, str, str]:
        m = _RESOURCE.fullmatch(value) if isinstance(value, str) else None
        if m is None:
            raise BcError(400, "BadRequest", f"The resource '{value}' is not a valid subscription resource.")
        company = self.bc._company_from_url(req, m["cid"])
        if f"v2.0/{m['entity']}" not in self.resource_list():
            raise BcError(400, "BadRequest", f"The resource '{m['entity']}' does not support webhooks.")
        return str(value), company.id, m["entity"]

    def _handshake(self, url: str) -> None:
        token = secrets.token_urlsafe(24)
        status, _, text = self.deliverer.validate(url, token, self.validation_timeout)
        if status != 200 or token not in text:
            raise BcError(
                400,
                "BadRequest",
                "The subscription could not be validated: the notificationUrl must answer the handshake "
                "with 200 OK and the validationToken in the body.",
            )

    def _check_if_match(self, req: Request, sub: BcSubscription) -> None:
        check_if_match(req, sub.etag)

    def _find(self, sid: str) -> BcSubscription:
        with self.bc.lock:
            self._expire()
            sub = self.subscriptions.get(sid)
        if sub is None:
            raise BcError(
                404,
                "Internal_RecordNotFound",
                f"The API Webhook Subscription does not exist. Subscription Id='{sid}'",
            )
        return sub

    def _expire(self) -> None:
        now = self.bc.clock.now()
        for sid in [s.id for s in self.subscriptions.values() if s.expiration <= now]:
            del self.subscriptions[sid]

    # ------------------------------------------------------------------ notifications
    def _on_change(self, company_id: str, contact_id: str, change: str, when: datetime) -> None:
        self._expire()
        queued = False
        for sub in self.subscriptions.values():
            if sub.company_id != company_id or sub.entity != "contacts":
                continue
            earlier = sub.pending.get(contact_id)
            if earlier and earlier[0] == "created" and change == "updated":
                change = "created"  # one notification per record within the window
            sub.pending[contact_id] = (change, when)
            queued = True
        if queued and self.auto_flush_delay is not None and self._timer is None:
            self._timer = threading.Timer(self.auto_flush_delay, self.flush)
            self._timer.daemon = True
            self._timer.start()

    def _entries(self, sub: BcSubscription) -> list[dict[str, Any]]:
        # Inference, not documented: BC's pending notifications are table rows written in the change's
        # own transaction, so a change undone with its $batch is never notified. The sandbox checks at
        # send time instead: a "created" or "updated" record that no longer exists, or a "deleted" one
        # that still does, was rolled back.
        company = self.bc.companies.get(sub.company_id)
        present = company.contacts if company is not None else {}
        for contact_id in [
            c for c, (change, _) in sub.pending.items() if (change == "deleted") == (c in present)
        ]:
            del sub.pending[contact_id]
        common = {
            "subscriptionId": sub.id,
            "clientState": sub.client_state or "",
            "expirationDateTime": format_datetime(sub.expiration),
        }
        base = f"api/v2.0/companies({sub.company_id})/contacts"
        if len(sub.pending) > self.collection_threshold:
            first = min(when for _, when in sub.pending.values()) - timedelta(milliseconds=1)
            last = max(when for _, when in sub.pending.values())
            flt = quote(f"lastModifiedDateTime gt {format_datetime(first)}", safe="")
            return [
                {
                    **common,
                    "resource": f"/{base}?$filter={flt}",
                    "changeType": "collection",
                    "lastModifiedDateTime": format_datetime(last),
                }
            ]
        return [
            {
                **common,
                "resource": f"{base}({contact_id})",
                "changeType": change,
                "lastModifiedDateTime": format_datetime(when),
            }
            for contact_id, (change, when) in sub.pending.items()
        ]

    def _policy(self) -> DeliveryPolicy:
        return DeliveryPolicy(self.delivery_timeout, self.retry_delays, _retryable)

    def _settled(self, job: Job, status: int | None) -> None:
        if status is not None and not 200 <= status < 300 and not _retryable(status):
            # "If subscriber responds with any other code than listed, no retries are attempted and
            # the subscription is deleted."
            ids = {entry["subscriptionId"] for entry in job.body["value"]}
            with self.bc.lock:
                for sid in ids:
                    self.subscriptions.pop(sid, None)


def _retryable(status: int | None) -> bool:
    return status is None or status in (408, 429) or 500 <= status <= 599


def _object(req: Request) -> dict[str, Any]:
    try:
        body = req.json()
    except ValueError:
        raise BcError(400, "BadRequest", "Invalid Request Body") from None
    if not isinstance(body, dict):
        raise BcError(400, "BadRequest", "Invalid Request Body")
    return body


def _client_state(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > CLIENT_STATE_MAX:
        raise BcError(
            400, "BadRequest", f"clientState must be a string of at most {CLIENT_STATE_MAX} characters."
        )
    return value
