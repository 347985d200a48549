"""Microsoft Graph change notifications for contacts: `/subscriptions`, validation, delivery, lifecycle.

What is simulated, each fact from Microsoft Learn (the tests in tests/sandbox/test_graph_subscriptions.py
cite the pages):

- ``POST /subscriptions`` (201), ``GET /subscriptions`` and ``/subscriptions/{id}``, ``PATCH`` (renew:
  new ``expirationDateTime``, or a new ``notificationUrl``; 200), ``DELETE`` (204) and
  ``POST /subscriptions/{id}/reauthorize`` ("Create subscription", "Update subscription",
  "Receive change notifications through webhooks", "Reduce missing subscriptions and change
  notifications").
- Resources ``users/{id}/contacts`` (the default Contacts folder), ``users/{id}/contactFolders/{id}/contacts``
  and ``me/...``; ``changeType`` a comma-separated subset of created, updated, deleted; ``clientState``
  at most 128 characters; the ``Contacts.Read`` (or ReadWrite) application role.
- ``expirationDateTime``: required; at most 4,230 minutes ahead for Outlook contacts (else 400
  ``ExtensionError`` "Subscription expiration can only be 4230 minutes in the future.", the message
  the service gives, microsoft-graph-docs issue 2988); a value under 45 minutes is raised to 45.
- The validation request: POST ``{url}?validationToken=...`` with ``Content-Type: text/plain``; the
  endpoint must answer 200, ``text/plain``, the decoded token, within 10 s, else the create fails with
  400 (both ``notificationUrl`` and ``lifecycleNotificationUrl`` are validated).
- Delivery: POST ``{"value": [changeNotification]}``; a 2xx within 3 s settles it, otherwise Graph
  resends "multiple times, for up to 4 hours" (modelled: bounded ``retry_delays`` adding up to under
  4 hours), then drops it.
- Lifecycle notifications to ``lifecycleNotificationUrl``: ``reauthorizationRequired`` (delivery then
  pauses until ``/reauthorize`` or a renewal; changes in between are lost), ``subscriptionRemoved``
  (the subscription is gone), ``missed``.
- Expiry: a subscription past its ``expirationDateTime`` no longer delivers and is no longer found.

Inference, not documented: a contact moved between folders is notified as ``deleted`` to a
subscription on the folder it left and ``created`` to one on the folder it entered (what delta shows).

Sandbox allowances (not in the real service): ``http://`` URLs on loopback (sandbox/notify.py), and
the control API (``send_lifecycle``, ``clock``, ``deliverer.wait``) that tests use to drive time.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sandbox.bc import Clock, format_datetime, parse_datetime
from sandbox.graph import CONTACT_READ_ROLES, GraphService, _Contact, _Ctx
from sandbox.httpd import Request, Response
from sandbox.notify import Deliverer, DeliveryPolicy, Job, url_problem

MAX_MINUTES = 4230  # Outlook message, event, contact: "4,230 minutes (under three days)"
MIN_MINUTES = 45  # "Any value under 45 minutes after the time of the request is automatically set to 45"
CLIENT_STATE_MAX = 128
VALIDATION_TIMEOUT = 10.0
DELIVERY_TIMEOUT = 3.0
CHANGE_TYPES = ("created", "updated", "deleted")
LIFECYCLE_EVENTS = ("reauthorizationRequired", "subscriptionRemoved", "missed")
# Graph resends "multiple times, for up to 4 hours": five further attempts, 3:51 h in all.
DEFAULT_RETRY_DELAYS = (60.0, 300.0, 900.0, 3600.0, 3600.0 * 2.5)
VALIDATION_FAILED = (
    "Subscription validation request failed. Notification endpoint must respond with 200 OK to "
    "validation request."
)

_RESOURCE = re.compile(
    r"/?(?:(?i:users)/(?P<user>[^/]+)|(?P<me>(?i:me)))"
    r"(?:/(?i:contactFolders)(?:/(?P<folder>[^/()']+)|\('(?P<qfolder>[^']+)'\)))?/(?i:contacts)"
)


@dataclass
class GraphSubscription:
    id: str
    resource: str
    user_id: str
    folder_id: str
    change_types: tuple[str, ...]
    notification_url: str
    lifecycle_url: str | None
    client_state: str | None
    expiration: datetime
    application_id: str
    immutable_ids: bool
    paused: bool = False  # after reauthorizationRequired, until reauthorized or renewed

    def json(self) -> dict[str, Any]:
        return {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#subscriptions/$entity",
            "id": self.id,
            "resource": self.resource,
            "applicationId": self.application_id,
            "changeType": ",".join(self.change_types),
            "clientState": self.client_state,
            "notificationUrl": self.notification_url,
            "lifecycleNotificationUrl": self.lifecycle_url,
            "expirationDateTime": format_datetime(self.expiration),
            "creatorId": self.application_id,
            "latestSupportedTlsVersion": "v1_2",
            "notificationContentType": "application/json",
            "includeResourceData": False,
        }


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class GraphSubscriptions:
    """Adds the subscriptions API to a GraphService and delivers its contact changes."""

    def __init__(
        self,
        graph: GraphService,
        tenant_id: str,
        ca_bundle: str | None = None,
        allow_loopback_http: bool = True,
    ) -> None:
        self.graph = graph
        self.tenant_id = tenant_id
        self.allow_loopback_http = allow_loopback_http
        self.clock = Clock()
        self.deliverer = Deliverer("graph", ca_bundle)
        self.retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
        self.validation_timeout = VALIDATION_TIMEOUT
        self.delivery_timeout = DELIVERY_TIMEOUT
        self.subscriptions: dict[str, GraphSubscription] = {}
        self.dropped: list[Job] = []  # notifications Graph gave up on
        graph.contact_listeners.append(self._on_change)
        base = r"/v1\.0/(?i:subscriptions)"
        one = base + r"/(?P<sid>[^/]+)"
        for method, pattern, handler, kind in (
            ("POST", base, self._create, "subscriptions.create"),
            ("GET", base, self._list, "subscriptions.list"),
            ("GET", one, self._get, "subscriptions.get"),
            ("PATCH", one, self._update, "subscriptions.update"),
            ("DELETE", one, self._delete, "subscriptions.delete"),
            (
                "POST",
                one + r"/(?i:(?:microsoft\.graph\.)?reauthorize)",
                self._reauthorize,
                "subscriptions.reauthorize",
            ),
        ):
            graph.route(method, pattern, self._guard(handler), kind)

    # ------------------------------------------------------------------ control API (tests)
    def active(self) -> list[GraphSubscription]:
        with self.graph.lock:
            self._expire()
            return list(self.subscriptions.values())

    def send_lifecycle(self, subscription_id: str, event: str) -> Job | None:
        """Graph raises a lifecycle event for a subscription (the service decides when; tests do here)."""
        if event not in LIFECYCLE_EVENTS:
            raise ValueError(f"unknown lifecycle event {event!r}")
        with self.graph.lock:
            sub = self.subscriptions[subscription_id]
            if event == "subscriptionRemoved":
                del self.subscriptions[subscription_id]
            elif event == "reauthorizationRequired":
                sub.paused = True
            if not sub.lifecycle_url:
                return (
                    None  # "Existing subscriptions without a lifecycleNotificationUrl ... don't receive" them
                )
            body = {
                "value": [
                    {
                        "subscriptionId": sub.id,
                        "subscriptionExpirationDateTime": format_datetime(sub.expiration),
                        "tenantId": self.tenant_id,
                        "clientState": sub.client_state,
                        "lifecycleEvent": event,
                    }
                ]
            }
            job = Job(sub.lifecycle_url, body, self._policy(), self._settled)
        self.deliverer.submit(job)
        return job

    def stop(self) -> None:
        self.deliverer.stop()

    # ------------------------------------------------------------------ handlers
    def _guard(self, handler: Callable[..., Response]) -> Callable[..., Response]:
        def run(req: Request, **groups: str) -> Response:
            ctx: _Ctx = self.graph._ctxs[id(req)]
            claims = self.graph._claims(req, ctx) or {}
            try:
                return handler(req, claims, **groups)
            except _Refused as err:
                return self.graph.error_response(err.status, err.code, err.message)

        return run

    def _create(self, req: Request, claims: dict[str, Any]) -> Response:
        body = _object(req)
        if not set(claims.get("roles") or ()) & CONTACT_READ_ROLES:
            # "Creating a subscription requires read scope to the resource" (Contacts.Read).
            raise _Refused(
                403,
                "ExtensionError",
                "Operation: Create; Exception: [Status Code: Forbidden; Reason: Access is denied.]",
            )
        resource = body.get("resource")
        user_id, folder_id = self._resolve(resource)
        change_types = _change_types(body.get("changeType"))
        notification_url = self._url(body, "notificationUrl", required=True)
        lifecycle_url = self._url(body, "lifecycleNotificationUrl", required=False)
        client_state = _client_state(body.get("clientState"))
        expiration = self._expiration(body.get("expirationDateTime"), required=True)
        assert expiration is not None  # required=True refuses a missing value
        for url in filter(None, (notification_url, lifecycle_url)):
            self._validate(url)
        sub = GraphSubscription(
            id=str(uuid.uuid4()),
            resource=str(resource),
            user_id=user_id,
            folder_id=folder_id,
            change_types=change_types,
            notification_url=str(notification_url),
            lifecycle_url=lifecycle_url,
            client_state=client_state,
            expiration=expiration,
            application_id=str(claims.get("appid", "")),
            immutable_ids=self.graph._ctxs[id(req)].immutable,
        )
        with self.graph.lock:
            self.subscriptions[sub.id] = sub
        return Response(201, sub.json())

    def _list(self, req: Request, claims: dict[str, Any]) -> Response:
        subs = [s.json() for s in self.active() if s.application_id == str(claims.get("appid", ""))]
        for s in subs:
            s.pop("@odata.context")
        return Response(
            200, {"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#subscriptions", "value": subs}
        )

    def _get(self, req: Request, claims: dict[str, Any], sid: str) -> Response:
        return Response(200, self._find(sid).json())

    def _update(self, req: Request, claims: dict[str, Any], sid: str) -> Response:
        body = _object(req)
        sub = self._find(sid)
        unknown = set(body) - {"expirationDateTime", "notificationUrl"}
        if unknown:
            raise _Refused(
                400,
                "InvalidRequest",
                f"Only expirationDateTime and notificationUrl can be updated, not {sorted(unknown)[0]}.",
            )
        expiration = self._expiration(body.get("expirationDateTime"), required=False)
        url = self._url(body, "notificationUrl", required=False)
        if url and url != sub.notification_url:
            self._validate(url)
        with self.graph.lock:
            if expiration is not None:
                sub.expiration = expiration
                sub.paused = False  # "renewing your subscription also reauthorizes your endpoint"
            if url:
                sub.notification_url = url
        return Response(200, sub.json())

    def _delete(self, req: Request, claims: dict[str, Any], sid: str) -> Response:
        sub = self._find(sid)
        with self.graph.lock:
            self.subscriptions.pop(sub.id, None)
        return Response(204)

    def _reauthorize(self, req: Request, claims: dict[str, Any], sid: str) -> Response:
        sub = self._find(sid)
        with self.graph.lock:
            sub.paused = False  # reauthorize "without extending its expiration date"
        return Response(204)

    # ------------------------------------------------------------------ checks
    def _resolve(self, resource: Any) -> tuple[str, str]:
        m = _RESOURCE.fullmatch(resource) if isinstance(resource, str) else None
        if m is None:
            raise _Refused(
                400,
                "InvalidRequest",
                f"Resource '{resource}' is not supported by this sandbox (contacts only).",
            )
        if m["me"]:
            raise _Refused(
                400, "InvalidRequest", "/me request is only valid with delegated authentication flow."
            )
        with self.graph.lock:
            user = self.graph._resolve_user(m["user"])
            if user is None or user.mailbox is None:
                raise _Refused(404, "ResourceNotFound", f"Resource '{resource}' does not exist.")
            mailbox = user.mailbox
            folder_id = m["folder"] or m["qfolder"] or mailbox.root_id
            if folder_id not in mailbox.folders:
                raise _Refused(404, "ResourceNotFound", f"Resource '{resource}' does not exist.")
            return user.id, folder_id

    def _url(self, body: dict[str, Any], name: str, required: bool) -> str | None:
        url = body.get(name)
        if url is None and not required:
            return None
        problem = url_problem(url, self.allow_loopback_http)
        if problem:
            raise _Refused(400, "InvalidRequest", f"The {name} {problem}.")
        return str(url)

    def _expiration(self, value: Any, required: bool) -> datetime | None:
        if value is None:
            if required:
                raise _Refused(
                    400,
                    "InvalidRequest",
                    "expirationDateTime is a required property for subscription creation.",
                )
            return None
        try:
            when = parse_datetime(str(value))
        except ValueError:
            raise _Refused(
                400,
                "InvalidRequest",
                f"Cannot convert the literal '{value}' to the expected type 'Edm.DateTimeOffset'.",
            ) from None
        now = self.clock.now()
        if when > now + timedelta(minutes=MAX_MINUTES):
            raise _Refused(
                400,
                "ExtensionError",
                f"Subscription expiration can only be {MAX_MINUTES} minutes in the future.",
            )
        return max(when, now + timedelta(minutes=MIN_MINUTES))

    def _validate(self, url: str) -> None:
        token = secrets.token_urlsafe(24) + "+/="  # characters a client must URL-decode
        status, content_type, text = self.deliverer.validate(url, token, self.validation_timeout)
        if status != 200 or not content_type.lower().startswith("text/plain") or text != token:
            raise _Refused(400, "InvalidRequest", VALIDATION_FAILED)

    def _find(self, sid: str) -> GraphSubscription:
        with self.graph.lock:
            self._expire()
            sub = self.subscriptions.get(sid)
        if sub is None:
            raise _Refused(404, "ResourceNotFound", f"The object was not found. Subscription '{sid}'.")
        return sub

    def _expire(self) -> None:
        now = self.clock.now()
        for sid in [s.id for s in self.subscriptions.values() if s.expiration <= now]:
            del self.subscriptions[sid]

    # ------------------------------------------------------------------ delivery
    def _policy(self) -> DeliveryPolicy:
        return DeliveryPolicy(self.delivery_timeout, self.retry_delays, lambda status: True)

    def _settled(self, job: Job, status: int | None) -> None:
        if status is None or not 200 <= status < 300:
            self.dropped.append(job)  # "it discards the change notification"

    def _on_change(self, user_id: str, folder_id: str, contact: _Contact, change: str) -> None:
        self._expire()
        for sub in self.subscriptions.values():
            if sub.user_id != user_id or sub.folder_id != folder_id or change not in sub.change_types:
                continue
            if sub.paused:
                continue  # lost: the app must catch up with delta
            item_id = contact.key if sub.immutable_ids else contact.rest_id
            path = f"Users/{user_id}/Contacts/{item_id}"
            body = {
                "value": [
                    {
                        "subscriptionId": sub.id,
                        "subscriptionExpirationDateTime": format_datetime(sub.expiration),
                        "changeType": change,
                        "resource": path,
                        "resourceData": {
                            "@odata.type": "#Microsoft.Graph.Contact",
                            "@odata.id": path,
                            "@odata.etag": f'W/"{contact.change_key}"',
                            "id": item_id,
                        },
                        "clientState": sub.client_state,
                        "tenantId": self.tenant_id,
                    }
                ]
            }
            self.deliverer.submit(Job(sub.notification_url, body, self._policy(), self._settled))


def _object(req: Request) -> dict[str, Any]:
    try:
        body = req.json()
    except ValueError:
        raise _Refused(400, "BadRequest", "Unable to read JSON request payload.") from None
    if not isinstance(body, dict):
        raise _Refused(400, "BadRequest", "Unable to read JSON request payload.")
    return body


def _change_types(value: Any) -> tuple[str, ...]:
    if not isinstance(value, str) or not value.strip():
        raise _Refused(400, "InvalidRequest", "changeType is a required property for subscription creation.")
    parts = tuple(p.strip() for p in value.split(","))
    bad = [p for p in parts if p not in CHANGE_TYPES]
    if bad:
        raise _Refused(
            400, "InvalidRequest", f"'{bad[0]}' is not a valid changeType (created, updated, deleted)."
        )
    return parts


def _client_state(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > CLIENT_STATE_MAX:
        raise _Refused(
            400, "InvalidRequest", f"clientState must be a string of at most {CLIENT_STATE_MAX} characters."
        )
    return value
