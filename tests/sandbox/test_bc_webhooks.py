"""Business Central webhooks (sandbox/bc_webhooks.py) over real HTTPS with tokens from the simulated Entra,
delivered to a local listener.

Main source for every test: "Working with webhooks in Dynamics 365 Business Central" (Microsoft Learn,
https://learn.microsoft.com/dynamics365/business-central/dev-itpro/api-reference/v2.0/dynamics-subscriptions),
called "Working with webhooks" below.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest

from sandbox.bc import parse_datetime
from sandbox.bc_webhooks import BcWebhooks
from tests.sandbox.test_bc import T0, World, batch, make_world, world
from tests.sandbox.webhook_listener import Listener, echo_validation, listener

__all__ = ["listener", "make_world", "world"]  # fixtures used by name


class Env:
    def __init__(self, world: World, listener: Listener) -> None:
        self.world, self.listener = world, listener
        self.hooks = BcWebhooks(world.bc, world.ca_bundle)
        self.waits: list[float] = []
        self.hooks.deliverer.wait = self.waits.append  # retries without sleeping; delays recorded
        world.bc.clock.freeze(T0)
        self.subscriptions_url = f"{world.root}/subscriptions"

    @property
    def resource(self) -> str:
        return f"/api/v2.0/companies({self.world.company})/contacts"

    def subscribe(self, **overrides: object) -> dict:
        body = {
            "notificationUrl": self.listener.url,
            "resource": self.resource,
            "clientState": "secret-state",
        }
        resp = self.world.http.post(self.subscriptions_url, json={**body, **overrides})
        assert resp.status_code == 201, resp.text
        return resp.json()

    def one(self, sub: dict) -> str:
        return f"{self.subscriptions_url}('{sub['subscriptionId']}')"

    def deliver(self) -> list[dict]:
        """BC's 30-second window passes; returns the notification entries the listener got."""
        self.hooks.flush()
        assert self.hooks.deliverer.wait_idle(10)
        return [entry for r in self.listener.notifications() for entry in r.json()["value"]]


@pytest.fixture
def env(world: World, listener: Listener) -> Env:
    env = Env(world, listener)
    env.hooks.contacts_supported = True
    return env


def test_webhook_supported_resources_follow_the_documented_list_and_the_tenant_switch(env: Env) -> None:
    """`GET .../api/microsoft/runtime/beta/companies({id})/webhookSupportedResources` lists what can be
    subscribed to, `$filter=resource eq 'v2.0*'` narrowing it. The documented list of supported entities
    has no contacts: a tenant like that (the default) lists none and refuses a contacts subscription.

    Source: "Working with webhooks", Supported entities.
    """
    base = env.world.root.replace("/api/v2.0", "")
    url = f"{base}/api/microsoft/runtime/beta/companies({env.world.company})/webhookSupportedResources"
    listed = [
        r["resource"]
        for r in env.world.http.get(url, params={"$filter": "resource eq 'v2.0*'"}).json()["value"]
    ]
    assert "v2.0/customers" in listed and "v2.0/contacts" in listed
    env.hooks.contacts_supported = False
    listed = [r["resource"] for r in env.world.http.get(url).json()["value"]]
    assert "v2.0/customers" in listed and "v2.0/contacts" not in listed
    resp = env.world.http.post(
        env.subscriptions_url, json={"notificationUrl": env.listener.url, "resource": env.resource}
    )
    assert resp.status_code == 400 and "contacts" in resp.json()["error"]["message"]
    assert env.listener.received == []  # refused before any handshake
    assert env.world.http.get(env.subscriptions_url).json()["value"] == []


def test_create_performs_the_handshake_and_expires_in_three_days(env: Env) -> None:
    """POST subscriptions → BC POSTs `notificationUrl?validationToken=...`; only a 200 with the token in the
    body registers the subscription (201); it expires after three days if not renewed.

    Sources: "Working with webhooks", Register a webhook subscription and Renewing the subscription;
    "subscriptions resource type" (api-reference/v2.0/resources/dynamics_subscriptions).
    """
    sub = env.subscribe()
    [validation] = env.listener.validations()
    assert validation.query["validationToken"]
    assert sub["notificationUrl"] == env.listener.url
    assert sub["resource"] == env.resource
    assert sub["clientState"] == "secret-state"
    assert parse_datetime(sub["expirationDateTime"]) == T0 + timedelta(days=3)
    assert [s["subscriptionId"] for s in env.world.http.get(env.subscriptions_url).json()["value"]] == [
        sub["subscriptionId"]
    ]


@pytest.mark.parametrize(
    "answer",
    [
        lambda r: (200, "text/plain", "not the token"),
        lambda r: (404, "text/plain", r.query.get("validationToken", "")),
    ],
    ids=["wrong body", "not 200"],
)
def test_a_failed_handshake_creates_nothing(env: Env, answer: Callable) -> None:
    """ "If Business Central receives the response containing the validationToken, the subscription is
    registered": otherwise it is not.

    Source: "Working with webhooks", Register a webhook subscription.
    """
    env.listener.answer = answer
    body = {"notificationUrl": env.listener.url, "resource": env.resource}
    assert env.world.http.post(env.subscriptions_url, json=body).status_code == 400
    assert env.world.http.get(env.subscriptions_url).json()["value"] == []


def test_changes_arrive_after_the_window_one_per_record_with_the_documented_fields(env: Env) -> None:
    """Notifications wait for the 30-second window, so a record changed several times is notified once;
    one POST carries `{"value": [...]}` with subscriptionId, clientState, expirationDateTime, resource,
    changeType and lastModifiedDateTime.

    Source: "Working with webhooks", Notifications and change types.
    """
    sub = env.subscribe()
    created = env.world.create(displayName="Ada Lovelace")
    etag = env.world.http.get(env.world.contact_url(created["id"])).json()["@odata.etag"]
    patch = env.world.http.patch(
        env.world.contact_url(created["id"]), json={"jobTitle": "CEO"}, headers={"If-Match": etag}
    )
    assert patch.status_code == 200
    doomed = env.world.bc.seed_contact(env.world.company, displayName="Gone Soon")
    env.world.bc.delete_contact(env.world.company, doomed["id"])
    assert env.listener.notifications() == []  # nothing before the window ends
    entries = env.deliver()
    assert len(env.listener.notifications()) == 1
    by_change = {e["changeType"]: e for e in entries}
    assert sorted(by_change) == ["created", "deleted"]
    first = by_change["created"]
    assert first["subscriptionId"] == sub["subscriptionId"]
    assert first["clientState"] == "secret-state"
    assert first["expirationDateTime"] == sub["expirationDateTime"]
    assert first["resource"] == f"api/v2.0/companies({env.world.company})/contacts({created['id']})"
    assert by_change["deleted"]["resource"].endswith(f"contacts({doomed['id']})")
    assert env.deliver() == entries  # nothing new pending: the same single POST


def test_more_than_1000_changes_in_the_window_become_one_collection_notification(env: Env) -> None:
    """ "During the 30-second delay, if more than a 1,000 records are changed, a single collection
    notification is sent"; "a filter is applied to the resource". Exactly 1,000 are still sent one by one.

    Source: "Working with webhooks", Notifications and change types.
    """
    env.subscribe()
    for n in range(1000):
        env.world.bc.seed_contact(env.world.company, displayName=f"Bulk {n}")
    assert len(env.deliver()) == 1000
    env.listener.received.clear()
    for n in range(1001):
        env.world.bc.seed_contact(env.world.company, displayName=f"More {n}")
    [entry] = env.deliver()
    assert entry["changeType"] == "collection"
    assert entry["resource"].startswith(f"/api/v2.0/companies({env.world.company})/contacts?$filter=")
    assert "lastModifiedDateTime%20gt%20" in entry["resource"]


def test_408_429_and_5xx_are_retried_any_other_refusal_deletes_the_subscription(env: Env) -> None:
    """ "If Business Central can't reach the subscriber, several retries are attempted over the next 36
    hours" for 408, 429 and 5xx; "If subscriber responds with any other code than listed, no retries are
    attempted and the subscription is deleted."

    Source: "Working with webhooks", Notifications and change types (note).
    """
    assert sum(env.hooks.retry_delays) <= 36 * 3600
    sub = env.subscribe()
    answers = iter([(503, "text/plain", ""), (429, "text/plain", ""), (408, "text/plain", "")])
    env.listener.answer = lambda r: next(answers, (200, "text/plain", ""))
    env.world.create(displayName="Retried")
    env.deliver()
    assert len(env.listener.notifications()) == 4
    assert env.waits == list(env.hooks.retry_delays[:3])
    assert env.world.http.get(env.one(sub)).status_code == 200

    env.listener.answer = lambda r: (400, "text/plain", "")
    env.listener.received.clear()
    env.world.create(displayName="Refused")
    env.deliver()
    assert len(env.listener.notifications()) == 1  # no retry
    assert env.world.http.get(env.one(sub)).status_code == 404
    env.world.create(displayName="After")
    env.listener.received.clear()
    assert env.deliver() == []


def test_renewal_needs_if_match_and_a_new_handshake_expiry_and_delete(env: Env) -> None:
    """PATCH renews for three more days, needs If-Match and performs the handshake again; without a renewal
    the subscription expires; DELETE (If-Match required) answers 204.

    Sources: "Working with webhooks", Renewing the subscription; "Update subscriptions" and "Delete
    subscriptions" (api-reference/v2.0/api/dynamics_subscriptions_update.md, _delete.md).
    """
    sub = env.subscribe()
    env.world.bc.clock.advance(2 * 86400)
    assert env.world.http.patch(env.one(sub), json={}).status_code == 400  # no If-Match
    stale = env.world.http.patch(env.one(sub), json={}, headers={"If-Match": 'W/"stale"'})
    assert stale.status_code == 412
    env.listener.received.clear()
    renewed = env.world.http.patch(env.one(sub), json={}, headers={"If-Match": sub["@odata.etag"]})
    assert renewed.status_code == 200, renewed.text
    assert len(env.listener.validations()) == 1
    assert parse_datetime(renewed.json()["expirationDateTime"]) == T0 + timedelta(days=5)

    env.listener.answer = lambda r: (500, "text/plain", "")
    failed = env.world.http.patch(env.one(sub), json={}, headers={"If-Match": renewed.json()["@odata.etag"]})
    assert failed.status_code == 400  # "a subscription can't be renewed unless the client returns the token"
    env.listener.answer = echo_validation

    env.world.bc.clock.advance(3 * 86400 + 1)
    assert env.world.http.get(env.one(sub)).status_code == 404
    other = env.subscribe()
    assert env.world.http.delete(env.one(other)).status_code == 400  # no If-Match
    assert (
        env.world.http.delete(env.one(other), headers={"If-Match": other["@odata.etag"]}).status_code == 204
    )
    assert env.world.http.get(env.subscriptions_url).json()["value"] == []


def test_a_change_undone_with_its_batch_is_not_notified(env: Env) -> None:
    """A `$batch` with `Isolation: snapshot` that fails is rolled back whole, so its creates never happened
    and nothing is notified; the batch that commits is.

    Sources: "Working with webhooks" (notifications are for records that changed); "Using OData $batch
    requests" (Isolation: snapshot is all or nothing; pinned for the sandbox in tests/sandbox/test_bc.py).
    That BC skips rolled-back changes is an inference (its pending notifications are table rows written
    in the change's transaction), not a documented sentence.
    """
    env.subscribe()
    url = f"companies({env.world.company})/contacts"
    failed = batch(
        env.world,
        [
            {"id": "1", "method": "POST", "url": url, "body": {"displayName": "First"}},
            {"id": "2", "method": "POST", "url": url, "body": {"displayName": "Bad", "email": "nope"}},
        ],
        Isolation="snapshot",
    )
    assert [r["status"] for r in failed.json()["responses"]] == [201, 400]
    assert env.deliver() == []
    ok = batch(
        env.world, [{"method": "POST", "url": url, "body": {"displayName": "Kept"}}], Isolation="snapshot"
    )
    assert [r["status"] for r in ok.json()["responses"]] == [201]
    assert [e["changeType"] for e in env.deliver()] == ["created"]
