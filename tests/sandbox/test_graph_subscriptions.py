"""Graph change notifications for contacts (sandbox/graph_subscriptions.py), over real HTTPS, delivered to
a local listener. Each test names the Microsoft page that states the behaviour it pins."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import requests

from sandbox.bc import format_datetime, parse_datetime
from sandbox.graph_subscriptions import GraphSubscriptions
from sandbox.tls import SandboxTls
from tests.sandbox.graph_fixtures import ALICE, BOB, GraphClient, graph_tls, start_graph
from tests.sandbox.webhook_listener import Listener, echo_validation, listener, slow

__all__ = ["graph_tls", "listener"]  # fixtures used by name

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
TENANT = "7e1f0c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6"


class Env:
    def __init__(self, subs: GraphSubscriptions, client: GraphClient, listener: Listener) -> None:
        self.subs, self.client, self.listener = subs, client, listener
        self.waits: list[float] = []
        subs.deliverer.wait = self.waits.append  # retries without sleeping; the delays are recorded
        subs.clock.freeze(T0)
        self.alice_id = subs.graph._resolve_user(ALICE).id  # type: ignore[union-attr]

    def body(self, **overrides: object) -> dict:
        body = {
            "changeType": "created,updated,deleted",
            "notificationUrl": self.listener.url,
            "lifecycleNotificationUrl": self.listener.url + "/lifecycle",
            "resource": f"users/{self.alice_id}/contacts",
            "expirationDateTime": format_datetime(T0 + timedelta(minutes=4000)),
            "clientState": "secret-state",
        }
        body.update(overrides)
        return {k: v for k, v in body.items() if v is not None}

    def subscribe(self, **overrides: object) -> dict:
        resp = self.client.post("/subscriptions", json=self.body(**overrides))
        assert resp.status_code == 201, resp.text
        return resp.json()

    def settle(self) -> None:
        assert self.subs.deliverer.wait_idle(10)


@pytest.fixture
def env(graph_tls: SandboxTls, listener: Listener) -> Iterator[Env]:
    service, server = start_graph(graph_tls)
    service.add_mailbox(ALICE)
    service.add_mailbox(BOB)
    subs = GraphSubscriptions(service, TENANT, str(graph_tls.ca_bundle))
    session = requests.Session()
    yield Env(subs, GraphClient(server.url, str(graph_tls.ca_bundle), session), listener)
    subs.stop()
    session.close()
    server.stop()


def error(resp: requests.Response) -> tuple[int, str, str]:
    err = resp.json()["error"]
    return resp.status_code, err["code"], err["message"]


def test_create_validates_both_urls_then_answers_201_with_the_subscription(env: Env) -> None:
    """Create subscription → 201 and the subscription; before that Graph POSTs `?validationToken=` with
    `Content-Type: text/plain` to notificationUrl and to lifecycleNotificationUrl.

    Sources: "Create subscription" (https://learn.microsoft.com/graph/api/subscription-post-subscriptions);
    "Receive change notifications through webhooks", notificationUrl validation
    (https://learn.microsoft.com/graph/change-notifications-delivery-webhooks); "Reduce missing subscriptions
    and change notifications" ("you must validate both lifecycleNotificationUrl and notificationUrl",
    https://learn.microsoft.com/graph/change-notifications-lifecycle-events).
    """
    sub = env.subscribe()
    assert sub["changeType"] == "created,updated,deleted"
    assert sub["clientState"] == "secret-state"
    assert sub["notificationUrl"] == env.listener.url
    assert parse_datetime(sub["expirationDateTime"]) == T0 + timedelta(minutes=4000)
    validations = env.listener.validations()
    assert [v.path for v in validations] == ["/api/notify", "/api/notify/lifecycle"]
    assert all(v.headers["Content-Type"].startswith("text/plain") for v in validations)
    assert env.client.get(f"/subscriptions/{sub['id']}").json()["id"] == sub["id"]
    assert [s["id"] for s in env.client.get("/subscriptions").json()["value"]] == [sub["id"]]


@pytest.mark.parametrize(
    "answer",
    [
        lambda r: (200, "text/plain", "wrong-token"),
        lambda r: (200, "application/json", r.query.get("validationToken", "")),
        lambda r: (500, "text/plain", r.query.get("validationToken", "")),
    ],
    ids=["wrong body", "not text/plain", "not 200"],
)
def test_a_failed_validation_fails_the_create_and_creates_nothing(env: Env, answer) -> None:
    """The endpoint must answer 200, `text/plain`, the decoded token; otherwise "Microsoft Graph doesn't create
    the subscription" and the create returns 400 Bad Request.

    Sources: "Receive change notifications through webhooks" (notificationUrl validation,
    https://learn.microsoft.com/graph/change-notifications-delivery-webhooks); "Create subscription"
    ("If validation fails, the request to create the subscription returns a 400 Bad Request error",
    https://learn.microsoft.com/graph/api/subscription-post-subscriptions). The message is the one the
    service gives (quoted in abraunegg/onedrive's handling of it; not in the docs).
    """
    env.listener.answer = answer
    status, code, message = error(env.client.post("/subscriptions", json=env.body()))
    assert (status, code) == (400, "InvalidRequest")
    assert message.startswith("Subscription validation request failed.")
    assert env.client.get("/subscriptions").json()["value"] == []


def test_a_validation_answer_after_the_time_limit_fails_the_create(env: Env) -> None:
    """ "The client must respond ... within 10 seconds" (the sandbox's limit is lowered for the test).

    Source: "Receive change notifications through webhooks"
    (https://learn.microsoft.com/graph/change-notifications-delivery-webhooks).
    """
    assert env.subs.validation_timeout == 10.0
    env.subs.validation_timeout = 0.2
    env.listener.answer = slow(env.listener)
    assert error(env.client.post("/subscriptions", json=env.body()))[:2] == (400, "InvalidRequest")
    assert env.client.get("/subscriptions").json()["value"] == []


def test_expiration_is_capped_at_4230_minutes_for_contacts_and_raised_to_45(env: Env) -> None:
    """Outlook contact subscriptions live at most 4,230 minutes; beyond it the service answers 400
    ExtensionError "Subscription expiration can only be 4230 minutes in the future."; a value under 45
    minutes is set to 45 minutes after the request; expirationDateTime is required.

    Sources: "Microsoft Graph API change notifications", Subscription lifetime
    (https://learn.microsoft.com/graph/change-notifications-overview#subscription-lifetime);
    "subscription resource type", expirationDateTime (https://learn.microsoft.com/graph/api/resources/subscription);
    the error text as reported in microsoftgraph/microsoft-graph-docs issue 2988.
    """
    too_far = format_datetime(T0 + timedelta(minutes=4231))
    assert error(env.client.post("/subscriptions", json=env.body(expirationDateTime=too_far))) == (
        400,
        "ExtensionError",
        "Subscription expiration can only be 4230 minutes in the future.",
    )
    assert env.client.post("/subscriptions", json=env.body(expirationDateTime=None)).status_code == 400
    at_max = env.subscribe(expirationDateTime=format_datetime(T0 + timedelta(minutes=4230)))
    assert parse_datetime(at_max["expirationDateTime"]) == T0 + timedelta(minutes=4230)
    short = env.subscribe(expirationDateTime=format_datetime(T0 + timedelta(minutes=5)))
    assert parse_datetime(short["expirationDateTime"]) == T0 + timedelta(minutes=45)


def test_bad_subscription_requests_are_refused_by_name(env: Env) -> None:
    """clientState is at most 128 characters; changeType is created, updated, deleted; the URL must be
    HTTPS (the sandbox also allows http to loopback only); Contacts.Read is needed.

    Sources: "subscription resource type" (https://learn.microsoft.com/graph/api/resources/subscription);
    "Receive change notifications through webhooks" ("a publicly accessible, HTTPS-secured endpoint");
    "Create subscription", Permissions (https://learn.microsoft.com/graph/api/subscription-post-subscriptions).
    """
    assert env.client.post("/subscriptions", json=env.body(clientState="x" * 129)).status_code == 400
    assert env.subscribe(clientState="x" * 128)["clientState"] == "x" * 128
    status, _, message = error(env.client.post("/subscriptions", json=env.body(changeType="created,moved")))
    assert status == 400 and "moved" in message
    status, _, message = error(
        env.client.post("/subscriptions", json=env.body(notificationUrl="http://example.com/hook"))
    )
    assert status == 400 and "notificationUrl must use https" in message
    assert env.client.with_token("tok-none").post("/subscriptions", json=env.body()).status_code == 403
    assert len(env.client.get("/subscriptions").json()["value"]) == 1


def test_a_change_in_the_subscribed_folder_is_delivered_with_the_documented_fields(env: Env) -> None:
    """Delivery: POST `{"value": [changeNotification]}` with subscriptionId, subscriptionExpirationDateTime,
    clientState, changeType, resource, tenantId and resourceData (@odata.type, @odata.id, @odata.etag, id);
    only the subscribed folder and change types.

    Sources: "Receive change notifications through webhooks", change notification example
    (https://learn.microsoft.com/graph/change-notifications-delivery-webhooks); "changeNotification resource
    type" (https://learn.microsoft.com/graph/api/resources/changenotification).
    """
    folder = env.subs.graph.user_create_folder(ALICE, "Business Central")["id"]
    sub = env.subscribe(
        resource=f"users/{env.alice_id}/contactFolders/{folder}/contacts", changeType="created"
    )
    contact = env.subs.graph.user_create_contact(ALICE, folder, {"givenName": "Ada"})
    env.subs.graph.user_update_contact(ALICE, folder, contact["id"], givenName="Ada B")  # not subscribed
    env.subs.graph.user_create_contact(ALICE, None, {"givenName": "Elsewhere"})  # another folder
    env.settle()
    [note] = env.listener.notifications()
    [item] = note.json()["value"]
    assert item["subscriptionId"] == sub["id"]
    assert item["clientState"] == "secret-state"
    assert item["changeType"] == "created"
    assert item["tenantId"] == TENANT
    assert item["subscriptionExpirationDateTime"] == sub["expirationDateTime"]
    assert item["resourceData"]["@odata.type"] == "#Microsoft.Graph.Contact"
    assert item["resource"] == item["resourceData"]["@odata.id"]
    assert item["resourceData"]["id"]


def test_a_failed_or_slow_delivery_is_retried_a_bounded_number_of_times_then_dropped(env: Env) -> None:
    """No 2xx within 3 seconds: Graph resends "multiple times, for up to 4 hours", then discards the
    notification (bounded here: the retry delays add up to under 4 hours).

    Source: "Receive change notifications through webhooks", Processing the change notification and
    Throttling (https://learn.microsoft.com/graph/change-notifications-delivery-webhooks).
    """
    assert env.subs.delivery_timeout == 3.0
    assert sum(env.subs.retry_delays) < 4 * 3600
    env.subscribe()
    answers = iter([(500, "text/plain", ""), (503, "text/plain", "")])
    env.listener.answer = lambda r: (
        echo_validation(r) if "validationToken" in r.query else next(answers, (202, "", ""))
    )
    env.subs.graph.user_create_contact(ALICE, None, {"givenName": "Ada"})
    env.settle()
    assert len(env.listener.notifications()) == 3
    assert env.waits == list(env.subs.retry_delays[:2])
    assert env.subs.dropped == []

    env.waits.clear()
    env.subs.delivery_timeout = 0.2
    env.listener.answer = slow(env.listener)
    env.subs.graph.user_create_contact(ALICE, None, {"givenName": "Bob"})
    env.settle()
    assert env.waits == list(env.subs.retry_delays)
    assert len(env.subs.dropped) == 1
    assert len(env.subs.dropped[0].attempts) == len(env.subs.retry_delays) + 1


def test_lifecycle_events_reach_the_lifecycle_url_and_change_the_subscription(env: Env) -> None:
    """reauthorizationRequired pauses delivery until `/reauthorize` (changes in between are lost);
    subscriptionRemoved removes the subscription; missed is only a notice. Each arrives at
    lifecycleNotificationUrl as `{"value": [{subscriptionId, subscriptionExpirationDateTime, tenantId,
    clientState, lifecycleEvent}]}`.

    Source: "Reduce missing subscriptions and change notifications"
    (https://learn.microsoft.com/graph/change-notifications-lifecycle-events).
    """
    sub = env.subscribe()
    env.subs.send_lifecycle(sub["id"], "reauthorizationRequired")
    env.subs.graph.user_create_contact(ALICE, None, {"givenName": "Lost"})
    env.settle()
    [event] = [r.json()["value"][0] for r in env.listener.notifications()]
    assert event["lifecycleEvent"] == "reauthorizationRequired"
    assert event["subscriptionId"] == sub["id"] and event["clientState"] == "secret-state"
    assert event["tenantId"] == TENANT
    assert env.client.post(f"/subscriptions/{sub['id']}/reauthorize").status_code == 204
    env.subs.graph.user_create_contact(ALICE, None, {"givenName": "Seen"})
    env.subs.send_lifecycle(sub["id"], "missed")
    env.settle()
    bodies = [r.json()["value"][0] for r in env.listener.notifications()]
    assert [b.get("lifecycleEvent") or b["changeType"] for b in bodies] == [
        "reauthorizationRequired",
        "created",
        "missed",
    ]
    env.subs.send_lifecycle(sub["id"], "subscriptionRemoved")
    env.settle()
    assert env.listener.notifications()[-1].json()["value"][0]["lifecycleEvent"] == "subscriptionRemoved"
    assert env.client.get(f"/subscriptions/{sub['id']}").status_code == 404


def test_renewal_by_patch_and_expiry_and_delete(env: Env) -> None:
    """PATCH with a new expirationDateTime renews (200, same 4,230-minute cap); a subscription not renewed
    in time is deleted by Graph and delivers nothing; DELETE answers 204.

    Sources: "Receive change notifications through webhooks", Renew / Delete a subscription
    (https://learn.microsoft.com/graph/change-notifications-delivery-webhooks); "Update subscription"
    (https://learn.microsoft.com/graph/api/subscription-update).
    """
    sub = env.subscribe()
    env.subs.clock.advance(3000 * 60)
    renewed_to = T0 + timedelta(minutes=3000 + 4230)
    resp = env.client.patch(
        f"/subscriptions/{sub['id']}", json={"expirationDateTime": format_datetime(renewed_to)}
    )
    assert resp.status_code == 200 and parse_datetime(resp.json()["expirationDateTime"]) == renewed_to
    too_far = format_datetime(renewed_to + timedelta(minutes=1))
    assert (
        env.client.patch(f"/subscriptions/{sub['id']}", json={"expirationDateTime": too_far}).status_code
        == 400
    )
    env.subs.clock.advance(4231 * 60)
    assert env.client.get(f"/subscriptions/{sub['id']}").status_code == 404
    env.subs.graph.user_create_contact(ALICE, None, {"givenName": "Late"})
    env.settle()
    assert env.listener.notifications() == []

    other = env.subscribe(expirationDateTime=format_datetime(env.subs.clock.now() + timedelta(hours=2)))
    assert env.client.delete(f"/subscriptions/{other['id']}").status_code == 204
    assert env.client.get(f"/subscriptions/{other['id']}").status_code == 404


def test_a_move_out_of_the_folder_is_a_deletion_there_and_a_creation_in_the_other(env: Env) -> None:
    """A folder subscription hears of a contact dragged out as `deleted` and of one dragged in as `created`
    (inference, matching what the folder's delta reports; Graph's pages do not say).

    Sources: "Receive change notifications through webhooks"
    (https://learn.microsoft.com/graph/change-notifications-delivery-webhooks); "contact: delta"
    (https://learn.microsoft.com/graph/api/contact-delta).
    """
    folder = env.subs.graph.user_create_folder(ALICE, "Business Central")["id"]
    env.subscribe(resource=f"users/{env.alice_id}/contactFolders/{folder}/contacts")
    outside = env.subs.graph.user_create_contact(ALICE, None, {"givenName": "Comes In"})
    inside = env.subs.graph.user_create_contact(ALICE, folder, {"givenName": "Goes Out"})
    env.subs.graph.user_move_contact(ALICE, outside["id"], folder)
    env.subs.graph.user_move_contact(ALICE, inside["id"], None)
    env.settle()
    changes = [r.json()["value"][0]["changeType"] for r in env.listener.notifications()]
    assert changes == ["created", "created", "deleted"]
