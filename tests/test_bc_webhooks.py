"""Business Central contacts webhooks (BEHAVIOUR §8.3) end to end: the change-poll tick keeps the
subscriptions, the sandbox's BC performs the handshake with and delivers to the locally hosted
`POST /api/notify/bc`, and `QueueHost` hands the queued jobs to the worker.

No sleeps: BC's 30-second window is `flush()`, delivery is waited for with `wait_idle()`, and days
pass by moving the sandbox's BC clock and the app's clock together. What is asserted is what a user
or operator notices: what reaches Outlook, which BC requests a tick sends (counted by the sandbox on
the wire), which subscriptions BC holds, what is queued and what the endpoint answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta

import pytest
import requests
from azure.functions.timer import TimerRequest

import function_change_poll
import function_sync_worker
from sandbox.bindings import Collector
from shared.bc_webhooks import RENEW_BEFORE, VERIFY_EVERY
from shared.jobs import QUEUE_NAME
from shared.model import utcnow
from shared.services import get_services, reset_services
from tests.local_host import LocalHost

ALICE = "alice@contoso.example"
BOB = "bob@contoso.example"
CAROL = "carol@contoso.example"


class Hooks:
    """The app hosted locally at SYNC_PUBLIC_URL, and the sandbox BC's webhooks aimed at it."""

    def __init__(self, world, host: LocalHost, base: str) -> None:
        self.world, self.host, self.base = world, host, base
        self.bc = world.cloud.bc_webhooks
        self.bc.contacts_supported = True
        self.retry_waits: list[float] = []
        self.bc.deliverer.wait = self.retry_waits.append  # BC's retries without sleeping
        self.offset = timedelta(0)

    def tick(self) -> list[str]:
        """One change-poll tick (which also keeps the subscriptions): the jobs it queues."""
        jobs = Collector()
        function_change_poll.main(TimerRequest(), jobs)
        return jobs.messages()

    def deliver(self) -> list[str]:
        """BC's 30-second window ends and its POSTs are answered: the jobs the endpoint queued."""
        self.bc.flush()
        assert self.bc.deliverer.wait_idle(20)
        return self.host.queued(QUEUE_NAME)

    def later(self, delta: timedelta) -> None:
        """Time passes for BC and for the app alike."""
        self.offset += delta
        self.world.cloud.bc.clock.advance(delta.total_seconds())
        offset = self.offset
        get_services().clock = lambda: utcnow() + offset

    def subscriptions(self) -> list:
        with self.world.cloud.bc.lock:
            self.bc._expire()
            return list(self.bc.subscriptions.values())

    def post(self, body: object, **params: str) -> requests.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return requests.post(f"{self.base}/api/notify/bc", params=params, data=data, timeout=30)

    def bc_requests(self, kind: str | None = None) -> int:
        counters = self.world.cloud.bc.counters
        return counters.http_total if kind is None else counters.http_count(kind=kind)


@pytest.fixture
def hooks(world, monkeypatch) -> Iterator[Hooks]:
    host = LocalHost()
    with host.serve() as base:
        monkeypatch.setenv("SYNC_PUBLIC_URL", base)
        reset_services()
        yield Hooks(world, host, base)
    reset_services()


def _users(messages: list[str]) -> list[str]:
    return sorted(json.loads(m)["user"] for m in messages)


def _reasons(messages: list[str]) -> set[str]:
    return {json.loads(m)["reason"] for m in messages}


def test_a_bc_edit_reaches_outlook_through_the_webhook_without_the_poll_asking(world, hooks, queue):
    anna = world.person("Anna Berg", jobTitle="Buyer")
    world.user(ALICE)
    assert world.sync(ALICE).status == "succeeded"

    assert hooks.tick() == []  # subscribes (the handshake reaches the hosted endpoint)
    [sub] = hooks.subscriptions()
    assert sub.notification_url == f"{hooks.base}/api/notify/bc"
    assert sub.resource.endswith(f"companies({world.company})/contacts")
    assert len(sub.client_state or "") >= 32  # a random secret, not a constant

    world.cloud.reset_counters()
    assert hooks.tick() == []
    assert hooks.bc_requests() == 0  # subscribed: the company is not asked

    world.cloud.bc.edit_contact(world.company, anna["id"], jobTitle="Head of Purchasing")
    messages = hooks.deliver()
    assert _users(messages) == [ALICE] and _reasons(messages) == {"webhook"}
    assert hooks.bc.deliverer.log[-1].status == 202
    queue.send(messages)
    attempts = queue.drain(function_sync_worker.main)
    assert [a.error for a in attempts] == [None]
    assert world.outlook_by_email(ALICE)["anna.berg@example.com"]["jobTitle"] == "Head of Purchasing"

    world.cloud.bc.edit_contact(world.company, anna["id"], jobTitle="Owner")
    assert _users(hooks.deliver()) == [ALICE]  # the finished job no longer holds the user back


def test_a_burst_of_notifications_is_one_job_and_the_first_tick_still_asks(world, hooks, queue):
    """The tick that creates a subscription also asks the poll's question: a change made before BC
    notified anything would otherwise wait for the schedule."""
    anna = world.person("Anna Berg")
    world.user(ALICE)
    assert world.sync(ALICE).status == "succeeded"
    world.cloud.bc.edit_contact(world.company, anna["id"], city="Bergen")
    first = hooks.tick()
    assert _users(first) == [ALICE] and _reasons(first) == {"poll"}
    assert len(hooks.subscriptions()) == 1

    for city in ("Oslo", "Tromsø", "Bodø"):
        world.cloud.bc.edit_contact(world.company, anna["id"], city=city)
        assert hooks.deliver() == []  # the poll's job is still pending: coalesced
    queue.send(first)
    assert [a.error for a in queue.drain(function_sync_worker.main)] == [None]
    assert world.outlook_by_email(ALICE)["anna.berg@example.com"]["businessAddress"]["city"] == "Bodø"


def test_a_collection_notification_wakes_that_companys_users_only(world, hooks):
    other = world.cloud.bc.add_company("Fabrikam")
    world.cloud.bc.seed_contact(other, type="Person", displayName="Kari Hansen", email="kari@example.com")
    world.person("Anna Berg")
    world.user(ALICE)
    world.user(BOB)
    world.user(CAROL, companyId=other)
    world.user("dave@contoso.example", enabled=False)
    for upn in (ALICE, BOB, CAROL):
        assert world.sync(upn).status == "succeeded"
    hooks.tick()
    assert sorted(s.company_id for s in hooks.subscriptions()) == sorted([world.company, other])

    hooks.bc.collection_threshold = 2  # BC's is 1,000 records in the window
    for n in range(3):
        world.person(f"Bulk {n}")
    messages = hooks.deliver()
    [body] = [a.body for a in hooks.bc.deliverer.log if a.body][-1:]
    assert [e["changeType"] for e in body["value"]] == ["collection"]
    assert _users(messages) == [ALICE, BOB]


def test_renewal_before_the_three_day_expiry_keeps_the_subscription(world, hooks):
    world.person("Anna Berg")
    world.user(ALICE)
    assert world.sync(ALICE).status == "succeeded"
    hooks.tick()
    [sub] = hooks.subscriptions()
    first_expiry = sub.expiration

    hooks.later(timedelta(days=3) - RENEW_BEFORE + timedelta(minutes=1))
    world.cloud.reset_counters()
    assert hooks.tick() == []
    assert hooks.bc_requests("subscriptions.update") == 1  # PATCH with If-Match, another handshake
    assert hooks.bc_requests("contacts.list") == 0  # still live: not asked
    [renewed] = hooks.subscriptions()
    assert renewed.id == sub.id and renewed.expiration > first_expiry + timedelta(days=1)

    hooks.later(timedelta(days=2, hours=12))  # past the first expiry: the renewal is what kept it
    assert [s.id for s in hooks.subscriptions()] == [sub.id]


def test_a_subscription_bc_dropped_is_recreated_at_the_next_upkeep_and_polled_meanwhile(world, hooks, queue):
    anna = world.person("Anna Berg")
    world.user(ALICE)
    assert world.sync(ALICE).status == "succeeded"
    hooks.tick()
    [old] = hooks.subscriptions()
    with world.cloud.bc.lock:  # BC deletes it (e.g. after an answer it does not accept)
        hooks.bc.subscriptions.clear()
    world.cloud.bc.edit_contact(world.company, anna["id"], jobTitle="Owner")
    assert hooks.deliver() == []  # nobody is told

    hooks.later(VERIFY_EVERY)
    messages = hooks.tick()
    [new] = hooks.subscriptions()
    assert new.id != old.id and new.client_state != old.client_state
    assert _users(messages) == [ALICE] and _reasons(messages) == {"poll"}  # the poll asks this tick
    queue.send(messages)
    assert [a.error for a in queue.drain(function_sync_worker.main)] == [None]
    assert world.outlook_by_email(ALICE)["anna.berg@example.com"]["jobTitle"] == "Owner"

    # A notification of the old subscription (its secret included) wakes no one any more.
    replay = {"value": [{"subscriptionId": old.id, "clientState": old.client_state, "changeType": "updated"}]}
    assert hooks.post(replay).status_code == 202
    assert hooks.host.queued(QUEUE_NAME) == []


def test_forged_or_unknown_notifications_get_the_same_answer_and_cause_no_work(world, hooks):
    world.person("Anna Berg")
    world.user(ALICE)
    assert world.sync(ALICE).status == "succeeded"
    hooks.tick()
    [sub] = hooks.subscriptions()
    resource = f"api/v2.0/companies({world.company})/contacts(00000000-0000-0000-0000-000000000001)"

    def entry(sid: str, state: str | None) -> dict:
        return {
            "value": [
                {"subscriptionId": sid, "clientState": state, "resource": resource, "changeType": "updated"}
            ]
        }

    answers = [
        hooks.post(entry(sub.id, "forged")),
        hooks.post(entry(sub.id, None)),
        hooks.post(entry("0" * 32, sub.client_state)),
        hooks.post(entry("not-a-subscription", "anything")),
    ]
    assert {(a.status_code, a.content) for a in answers} == {(202, b"")}
    assert hooks.host.queued(QUEUE_NAME) == []
    assert world.services.store.get_wake_mark(ALICE) is None

    genuine = hooks.post(entry(sub.id, sub.client_state))
    assert (genuine.status_code, genuine.content) == (202, b"")  # the same answer, but work
    assert _users(hooks.host.queued(QUEUE_NAME)) == [ALICE]


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"value": []}', b'{"value": [{"clientState": "x"}]}', b'{"value": "x"}'],
    ids=["not json", "array", "empty value", "no subscriptionId", "value not an array"],
)
def test_a_malformed_body_is_a_clear_400_and_changes_nothing(world, hooks, body):
    world.user(ALICE)
    answer = hooks.post(body)
    assert answer.status_code == 400
    assert "value" in answer.json()["error"]["message"] or "JSON" in answer.json()["error"]["message"]
    assert hooks.host.queued(QUEUE_NAME) == []


def test_the_handshake_echoes_the_token_as_plain_text_and_refuses_markup(hooks):
    ok = hooks.post(b"", validationToken="abc-123_XYZ")
    assert (ok.status_code, ok.text) == (200, "abc-123_XYZ")
    assert ok.headers["Content-Type"].startswith("text/plain")
    bad = hooks.post(b"", validationToken="<script>alert(1)</script> x")
    assert bad.status_code == 400 and "<script>" not in bad.text


def test_a_company_without_enabled_users_loses_its_subscription(world, hooks):
    world.person("Anna Berg")
    world.user(ALICE)
    assert world.sync(ALICE).status == "succeeded"
    hooks.tick()
    assert len(hooks.subscriptions()) == 1
    world.user(ALICE, enabled=False)
    hooks.tick()
    assert hooks.subscriptions() == []
    assert world.services.store.list_bc_webhooks() == {}


def test_turning_webhooks_off_deletes_the_subscription_and_the_poll_asks_again(world, hooks, monkeypatch):
    anna = world.person("Anna Berg")
    world.user(ALICE)
    assert world.sync(ALICE).status == "succeeded"
    hooks.tick()
    assert len(hooks.subscriptions()) == 1
    monkeypatch.setenv("SYNC_BC_WEBHOOKS", "false")
    reset_services()
    world.cloud.bc.edit_contact(world.company, anna["id"], jobTitle="Owner")
    assert _users(hooks.tick()) == [ALICE]
    assert hooks.subscriptions() == []


def test_where_bc_offers_no_contacts_webhook_the_poll_works_as_before(world, hooks, queue):
    """The default sandbox tenant, like Microsoft's documented list, offers no contacts webhook."""
    hooks.bc.contacts_supported = False
    anna = world.person("Anna Berg")
    world.user(ALICE)
    assert world.sync(ALICE).status == "succeeded"
    world.cloud.reset_counters()
    assert hooks.tick() == []
    assert hooks.bc_requests("webhookSupportedResources") == 1
    assert hooks.bc_requests("subscriptions.create") == 0 and hooks.subscriptions() == []

    world.cloud.reset_counters()
    world.cloud.bc.edit_contact(world.company, anna["id"], jobTitle="Owner")
    messages = hooks.tick()
    assert hooks.bc_requests() == 1  # the poll's question; support is read again only daily
    assert _users(messages) == [ALICE] and _reasons(messages) == {"poll"}
    queue.send(messages)
    assert [a.error for a in queue.drain(function_sync_worker.main)] == [None]
    assert world.outlook_by_email(ALICE)["anna.berg@example.com"]["jobTitle"] == "Owner"


def test_the_connection_check_says_whether_contacts_webhooks_are_offered_and_live(world, hooks):
    world.user(ALICE)

    def check() -> dict:
        resp = requests.post(
            f"{hooks.base}/api/users/{ALICE}/validate", params={"code": hooks.host.key}, timeout=60
        )
        assert resp.status_code == 200, resp.text
        return next(c for c in resp.json()["checks"] if c["name"] == "bcWebhooks")

    assert "no live subscription yet" in check()["message"]
    hooks.tick()
    live = check()
    assert live["ok"] and "subscription live until" in live["message"]
    hooks.bc.contacts_supported = False
    assert "offers no contacts webhooks" in check()["message"]


def test_the_public_url_and_the_switch_are_checked_with_messages_naming_them(env):
    from shared.config import Config, ConfigError

    config = Config.from_env(env)
    assert config.public_url is None and config.bc_webhooks is True  # no address: the poll alone
    assert (
        Config.from_env({**env, "SYNC_PUBLIC_URL": "https://app.example/"}).public_url
        == "https://app.example"
    )
    assert Config.from_env({**env, "SYNC_PUBLIC_URL": "http://127.0.0.1:7071"}).public_url
    for bad in ("http://app.example", "ftp://app.example", "https://app.example/?code=x", "app.example"):
        with pytest.raises(ConfigError, match="SYNC_PUBLIC_URL"):
            Config.from_env({**env, "SYNC_PUBLIC_URL": bad})
    assert Config.from_env({**env, "SYNC_BC_WEBHOOKS": "FALSE"}).bc_webhooks is False
    with pytest.raises(ConfigError, match="SYNC_BC_WEBHOOKS"):
        Config.from_env({**env, "SYNC_BC_WEBHOOKS": "maybe"})


def test_a_quiet_hour_with_a_live_subscription_costs_four_bc_requests_instead_of_sixty(world, hooks):
    """The poll's quiet hour is one question a minute (60); with the subscription live the ticks ask
    nothing and the upkeep checks the subscription every 15 minutes."""
    world.person("Anna Berg")
    world.user(ALICE)
    assert world.sync(ALICE).status == "succeeded"
    hooks.tick()
    world.cloud.reset_counters()
    for _minute in range(60):
        hooks.later(timedelta(minutes=1))
        assert hooks.tick() == []
    assert hooks.bc_requests() == 4
    assert hooks.bc_requests("subscriptions.get") == 4
    assert world.cloud.graph.counters.http_total == 0
