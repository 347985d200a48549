"""Outlook → Business Central within a minute: Graph change notifications (BEHAVIOUR §8.2), end to end.

The functions run in the local host (tests/local_host.py) on a loopback port that is `SYNC_PUBLIC_URL`;
the sandbox's Graph validates the endpoint and delivers notifications to it from its own thread; the
jobs the endpoint queues land on Azurite's queue and reach function_sync_worker through `QueueHost`,
as the Functions host would deliver them. Nothing sleeps: delivery is awaited with
`deliverer.wait_idle()`, time with the stored expiry. What is asserted is what a user or operator
notices: what ends up in BC, what Graph holds, what the endpoint answers and what is queued.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import requests
from azure.functions.timer import TimerRequest

import function_sync_timer
import function_sync_worker
from sandbox.bindings import Collector
from shared.config import Config, ConfigError
from shared.model import utcnow
from shared.services import get_services, reset_services
from shared.sync import LEASE_SECONDS
from tests.local_host import LocalHost, QueueHost
from tests.world import World, writes

ALICE = "alice@contoso.example"
BOB = "bob@contoso.example"


@dataclass
class App:
    world: World
    queue: QueueHost
    url: str  # the function app's public base URL

    @property
    def notify_url(self) -> str:
        return f"{self.url}/api/notify/graph"

    def tick(self) -> list[str]:
        """One regular timer tick: keeps the subscriptions, returns the jobs it queued."""
        jobs = Collector()
        function_sync_timer.main(TimerRequest(), jobs)
        return jobs.messages()

    def settle(self) -> None:
        """Wait until Graph has delivered everything it queued (no sleeping)."""
        assert self.world.cloud.graph_subscriptions.deliverer.wait_idle(30)

    def pending(self) -> list[dict[str, Any]]:
        """The jobs on the queue (visible or not yet), without taking them."""
        count = self.queue.queue.get_queue_properties().approximate_message_count
        return [{"count": count}] if count else []

    def work(self) -> list[Any]:
        return self.queue.drain(function_sync_worker.main)

    def subscriptions(self) -> list[Any]:
        return self.world.cloud.graph_subscriptions.active()

    def stored(self) -> list[Any]:
        return get_services().store.list_subscriptions()

    def post(self, body: Any, **params: str) -> requests.Response:
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        return requests.post(self.notify_url, data=data, params=params, timeout=10)


@pytest.fixture
def app(world: World, queue: QueueHost, monkeypatch: pytest.MonkeyPatch) -> Iterator[App]:
    with LocalHost().serve() as base:
        monkeypatch.setenv("SYNC_PUBLIC_URL", base)
        monkeypatch.setenv("SYNC_NOTIFY_DEBOUNCE_SECONDS", "0")
        reset_services()
        yield App(world, queue, base)
    reset_services()


def _subscribed(app: App, user: str = ALICE) -> Any:
    """The user set up, synced once (which makes the folder), and subscribed by the next tick."""
    app.world.user(user)
    assert app.world.sync(user).status == "succeeded"
    app.tick()
    app.queue.queue.clear_messages()  # the tick's own scheduled run is not what these tests look at
    (sub,) = [s for s in app.subscriptions() if s.user_id == app.world.cloud.graph._resolve_user(user).id]
    return sub


def _new_outlook_contact(app: App, user: str, name: str) -> None:
    first, last = name.split()
    app.world.cloud.graph.user_create_contact(
        user,
        app.world.folder_id(user),
        {
            "givenName": first,
            "surname": last,
            "emailAddresses": [{"address": f"{first.lower()}@example.com"}],
        },
    )


def test_an_outlook_contact_reaches_bc_without_a_timer_tick(app: App) -> None:
    sub = _subscribed(app)
    assert sub.folder_id == app.world.folder_id(ALICE)
    assert sub.change_types == ("created", "updated", "deleted")
    assert sub.notification_url == sub.lifecycle_url == app.notify_url
    assert (sub.expiration - utcnow()) > timedelta(hours=60)  # close to Graph's 4,230 minutes

    _new_outlook_contact(app, ALICE, "Ada Lovelace")
    app.settle()
    attempts = app.work()

    # The run tags the new Outlook contact with its BC id: Graph notifies that write too, which earns
    # one follow-up (the notification came while the run held the lease), and that one writes nothing.
    assert [(a.job["reason"], a.error) for a in attempts] == [("notify", None), ("notify", None)]
    assert "ada@example.com" in app.world.bc_by_email()
    first, echo = (get_services().store.get_report(a.job["runId"]) for a in attempts)
    assert first is not None and first.counts["bcCreated"] == 1
    assert echo is not None and writes(echo) == 0
    delivered = app.world.cloud.graph_subscriptions.deliverer.log
    assert {a.status for a in delivered if a.body} == {202}


def test_the_validation_request_is_echoed_as_plain_text(app: App) -> None:
    token = "Validation: abc+/= ünicode"
    resp = requests.post(app.notify_url, params={"validationToken": token}, timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert resp.text == token
    assert app.pending() == []


def test_forged_client_state_and_unknown_subscription_are_refused_alike_without_work(app: App) -> None:
    sub = _subscribed(app)
    forged = {"subscriptionId": sub.id, "clientState": "guess", "changeType": "created"}
    unknown = {"subscriptionId": str(uuid.uuid4()), "clientState": sub.client_state, "changeType": "created"}
    answers = [app.post({"value": [item]}) for item in (forged, unknown)]

    forged_answer, unknown_answer = ((r.status_code, r.content, dict(r.headers)) for r in answers)
    for headers in (forged_answer[2], unknown_answer[2]):
        headers.pop("Date", None)
    assert forged_answer == unknown_answer
    assert forged_answer[:2] == (202, b"")
    assert app.pending() == []
    assert get_services().store.get_wake_mark(ALICE) is None
    genuine = app.post({"value": [{**forged, "clientState": sub.client_state}]})
    headers = dict(genuine.headers)
    headers.pop("Date", None)
    assert (genuine.status_code, genuine.content, headers) == forged_answer  # the same answer
    assert app.pending() != []  # but this one wakes the user


def test_bad_bodies_get_a_clear_400_and_change_nothing(app: App) -> None:
    _subscribed(app)
    for body, words in (
        (b"not json", "must be JSON"),
        ({"value": []}, "at least one notification"),
        ({"value": ["x"]}, "JSON object"),
        ([1, 2], "value"),
    ):
        resp = app.post(body)
        assert resp.status_code == 400, body
        assert words in resp.json()["error"]["message"]
    assert app.pending() == []


def test_a_burst_of_fifty_notifications_is_one_run(app: App) -> None:
    sub = _subscribed(app)
    item = {"subscriptionId": sub.id, "clientState": sub.client_state, "changeType": "updated"}
    for _ in range(50):
        assert app.post({"value": [item]}).status_code == 202
    attempts = app.work()
    assert [a.job["reason"] for a in attempts] == ["notify"]
    assert [a.error for a in attempts] == [None]


def test_the_debounce_window_holds_the_run_back(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = _subscribed(app)
    monkeypatch.setenv("SYNC_NOTIFY_DEBOUNCE_SECONDS", "30")
    reset_services()
    item = {"subscriptionId": sub.id, "clientState": sub.client_state, "changeType": "updated"}
    for _ in range(5):
        assert app.post({"value": [item]}).status_code == 202
    assert app.queue.queue.get_queue_properties().approximate_message_count == 1
    assert list(app.queue.queue.receive_messages()) == []  # not visible before the window ends


def test_a_run_in_progress_gets_exactly_one_follow_up(app: App) -> None:
    sub = _subscribed(app)
    store = get_services().store
    item = {"subscriptionId": sub.id, "clientState": sub.client_state, "changeType": "created"}
    assert app.post({"value": [item]}).status_code == 202
    mark = store.get_wake_mark(ALICE)
    assert mark is not None
    # The queued job has taken the lease and started reading: a change from now on may be missed by it.
    lease = store.acquire_lease(ALICE, mark.run_id, LEASE_SECONDS)
    assert lease is not None
    store.start_wake_mark(ALICE, mark.run_id, utcnow())
    _new_outlook_contact(app, ALICE, "Grace Hopper")
    for _ in range(10):
        assert app.post({"value": [item]}).status_code == 202
    app.settle()

    assert app.queue.queue.get_queue_properties().approximate_message_count == 2  # the job + one follow-up
    store.release_lease(lease)  # the run in progress ends
    attempts = app.work()
    assert [a.error for a in attempts] == [None] * len(attempts)
    assert "grace@example.com" in app.world.bc_by_email()


def test_reauthorization_required_is_answered_by_a_renewal(app: App) -> None:
    sub = _subscribed(app)
    before = sub.expiration
    graph_subs = app.world.cloud.graph_subscriptions
    graph_subs.send_lifecycle(sub.id, "reauthorizationRequired")
    app.settle()
    assert graph_subs.subscriptions[sub.id].paused
    attempts = app.work()
    assert [(a.job["reason"], a.error) for a in attempts] == [("notify", None)]
    assert not graph_subs.subscriptions[sub.id].paused  # renewing reauthorizes
    assert graph_subs.subscriptions[sub.id].expiration >= before
    _new_outlook_contact(app, ALICE, "Ada Lovelace")
    app.settle()
    app.work()
    assert "ada@example.com" in app.world.bc_by_email()


def test_a_removed_subscription_is_created_again(app: App) -> None:
    sub = _subscribed(app)
    app.world.cloud.graph_subscriptions.send_lifecycle(sub.id, "subscriptionRemoved")
    app.settle()
    app.work()
    (again,) = app.subscriptions()
    assert again.id != sub.id
    assert [r.id for r in app.stored()] == [again.id]
    _new_outlook_contact(app, ALICE, "Ada Lovelace")
    app.settle()
    app.work()
    assert "ada@example.com" in app.world.bc_by_email()


def test_a_missed_event_queues_a_run(app: App) -> None:
    sub = _subscribed(app)
    app.world.cloud.graph_subscriptions.send_lifecycle(sub.id, "missed")
    app.settle()
    attempts = app.work()
    assert [(a.job["reason"], a.error) for a in attempts] == [("notify", None)]
    assert [r.id for r in app.stored()] == [sub.id]


def test_the_timer_renews_a_subscription_well_before_it_expires(app: App) -> None:
    sub = _subscribed(app)
    store = get_services().store
    (row,) = store.list_subscriptions()
    row.expires_at = utcnow() + timedelta(hours=20)  # as if two days had passed
    store.save_subscription(row)
    graph_subs = app.world.cloud.graph_subscriptions
    graph_subs.subscriptions[sub.id].expiration = utcnow() + timedelta(hours=20)

    app.tick()
    assert graph_subs.subscriptions[sub.id].expiration > utcnow() + timedelta(hours=60)
    (row,) = store.list_subscriptions()
    assert row.id == sub.id and row.expires_at > utcnow() + timedelta(hours=60)


def test_a_subscription_graph_lost_is_created_again_by_the_timer(app: App) -> None:
    sub = _subscribed(app)
    graph_subs = app.world.cloud.graph_subscriptions
    with app.world.cloud.graph.lock:
        del graph_subs.subscriptions[sub.id]  # expired or lost without a lifecycle event
    app.tick()
    (again,) = app.subscriptions()
    assert again.id != sub.id
    assert [r.id for r in app.stored()] == [again.id]


def test_a_recreated_folder_gets_a_subscription_of_its_own(app: App) -> None:
    """The user deletes the sync folder; the next run makes a new one, the next tick moves the
    subscription there (the old one is deleted), and Outlook edits in the new folder reach BC."""
    sub = _subscribed(app)
    app.world.cloud.graph.user_delete_folder(ALICE, sub.folder_id)
    assert app.world.sync(ALICE).status == "succeeded"
    new_folder = app.world.folder_id(ALICE)
    assert new_folder != sub.folder_id
    app.tick()
    app.queue.queue.clear_messages()
    (again,) = app.subscriptions()
    assert again.folder_id == new_folder and again.id != sub.id
    assert [(r.id, r.folder_id) for r in app.stored()] == [(again.id, new_folder)]
    _new_outlook_contact(app, ALICE, "Ada Lovelace")
    app.settle()
    app.work()
    assert "ada@example.com" in app.world.bc_by_email()


def test_a_disabled_or_deleted_user_loses_the_subscription(app: App) -> None:
    _subscribed(app, ALICE)
    _subscribed(app, BOB)
    app.world.user(ALICE, enabled=False)
    get_services().store.delete_settings(BOB)
    app.tick()
    assert app.subscriptions() == []
    assert app.stored() == []


def test_a_live_subscription_thins_the_scheduled_runs_to_the_safety_net(app: App) -> None:
    """With a live subscription the user's scheduled run happens once per SYNC_SAFETY_NET_MINUTES."""
    _subscribed(app)  # that tick queued the safety-net run
    assert app.tick() == []
    store = get_services().store
    (row,) = store.list_subscriptions()
    row.safety_net_at = utcnow() - timedelta(minutes=61)
    store.save_subscription(row)
    assert [json.loads(m)["reason"] for m in app.tick()] == ["schedule"]


def test_without_a_public_url_there_are_no_subscriptions_and_every_tick_runs_everyone(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SYNC_PUBLIC_URL", raising=False)
    reset_services()
    world.user(ALICE)
    assert world.sync(ALICE).status == "succeeded"
    world.cloud.reset_counters()
    for _ in range(2):
        jobs = Collector()
        function_sync_timer.main(TimerRequest(), jobs)
        assert [json.loads(m)["user"] for m in jobs.messages()] == [ALICE]
    assert world.cloud.graph_subscriptions.active() == []
    assert world.cloud.graph.counters.http_total == 0


def test_the_new_settings_are_checked(env: dict[str, str]) -> None:
    config = Config.from_env(env)
    assert config.public_url is None and config.notify_debounce_seconds == 5
    assert config.safety_net_minutes == 60
    assert Config.from_env({**env, "SYNC_PUBLIC_URL": "https://app.example.net/"}).public_url == (
        "https://app.example.net"
    )
    for name, value in (
        ("SYNC_PUBLIC_URL", "http://app.example.net"),
        ("SYNC_NOTIFY_DEBOUNCE_SECONDS", "600"),
        ("SYNC_SAFETY_NET_MINUTES", "5"),
    ):
        with pytest.raises(ConfigError, match=name):
            Config.from_env({**env, name: value})
