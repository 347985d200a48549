"""The transport policy of shared/http_client.py, directly (issue 10, items 1, 9, 10): backoff without
Retry-After, what is never sent twice, and where a token may go. Waits go through the injectable
`sleep` and a seeded random source; nothing here really waits."""

from __future__ import annotations

import random

import pytest

from shared.http_client import (
    AmbiguousWriteError,
    ApiError,
    Backoff,
    ForeignUrlError,
    HttpClient,
)

ALICE = "alice@contoso.example"


@pytest.fixture(autouse=True)
def product_backoff(world):
    """The product's backoff base (the World fixture shortens it), set before `clients` builds them."""
    world.services.backoff_base = 0.5


def test_backoff_is_full_jitter_under_a_growing_ceiling_within_the_budget():
    backoff = Backoff(base=0.5, cap=60.0, budget=300.0, rng=random.Random(7))

    ceilings = [backoff.ceiling(n) for n in range(1, 10)]
    waited, delays = 0.0, []
    while (d := backoff.delay(len(delays) + 1, waited)) is not None:
        delays.append(d)
        waited += d

    assert ceilings == [0.5, 1, 2, 4, 8, 16, 32, 60, 60]
    assert all(0 <= d <= backoff.ceiling(n) for n, d in enumerate(delays, 1))
    assert waited == pytest.approx(300.0)  # the budget is used up exactly, never exceeded
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule


def test_bc_429_without_retry_after_backs_off_for_the_5_minute_window_then_gives_up(clients):
    """BC's 429 carries no Retry-After: the client keeps backing off (more attempts than for other
    errors) until its waits add up to BC's 5-minute window, then names the failure."""
    world, bc, _, waits, counter = clients
    world.cloud.bc.faults.throttle(count=1000, retry_after=None)

    with pytest.raises(ApiError) as err:
        bc.companies()

    assert err.value.status == 429 and "still throttled" in str(err.value)
    assert sum(waits) <= 300.0 and sum(waits) > 120.0
    assert len(waits) > 8  # more than max_attempts: a throttled request was not processed
    assert all(w <= 60.0 for w in waits)
    assert counter.throttled["bc"] == len(waits) + 1


def test_a_throttled_write_batch_is_sent_again_and_applied_once(clients):
    """429 means "not processed", so a `$batch` of creates answered 429 may be sent again."""
    world, bc, _, waits, _ = clients
    from shared.bc_client import BcWrite

    world.cloud.bc.faults.throttle(count=2, retry_after=None, method="POST", path_regex=r"\$batch$")
    results = bc.write(world.company, [BcWrite("POST", {"displayName": f"P{i}"}) for i in range(3)])

    assert [r.status for r in results] == [201] * 3
    assert len(waits) == 2 and len(world.bc_contacts()) == 3


def test_a_single_create_answered_2xx_unreadable_is_ambiguous_and_not_repeated(clients):
    world, _, graph, _, _ = clients
    world.cloud.graph.faults.unreadable(count=1, method="POST")
    url = f"{graph.base}/users/{ALICE}/contactFolders"

    with pytest.raises(AmbiguousWriteError) as err:
        graph.http.request("POST", url, json_body={"displayName": "Business Central"})

    assert err.value.code == "UnreadableAnswer" and "text/html" in str(err.value)
    assert world.cloud.graph.counters.http_count("POST") == 1
    assert world.cloud.graph.find_folder(ALICE, "Business Central") is not None  # it was applied


def test_a_folder_create_answered_2xx_unreadable_is_resolved_by_looking_it_up(clients):
    """The same ambiguity in the client's own create_folder: the folder is found, not created again."""
    world, _, graph, _, _ = clients
    world.cloud.graph.faults.unreadable(count=1, method="POST")

    folder = graph.create_folder(ALICE, "Business Central")

    assert folder["id"] == world.cloud.graph.find_folder(ALICE, "Business Central")["id"]
    assert world.cloud.graph.counters.http_count("POST") == 1
    assert [f["displayName"] for f in world.cloud.graph.folders(ALICE)] == ["Business Central"]


def test_a_read_answered_2xx_unreadable_is_read_again(clients):
    world, _, graph, waits, _ = clients
    world.cloud.graph.faults.unreadable(count=1, method="GET")

    assert graph.get_user(ALICE)["userPrincipalName"].lower() == ALICE
    assert len(waits) == 1


BASE = "https://graph.example.com:8443/v1.0"


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/v1.0/users/x/contacts",  # another host
        "https://graph.example.com/v1.0/users/x",  # another port (443)
        "http://graph.example.com:8443/v1.0/users/x",  # another scheme
        "https://graph.example.com:8443/beta/users/x",  # outside the base path
        "https://graph.example.com:8443@evil.example/v1.0/users/x",  # userinfo trick
        "https://graph.example.com.evil.example:8443/v1.0/users/x",  # suffix trick
        "/v1.0/users/x",  # relative
    ],
)
def test_a_url_outside_the_configured_base_is_refused_before_a_token_is_asked_for(url):
    asked: list[str] = []

    def token() -> str:
        asked.append("token")
        return "t"

    client = HttpClient("graph", token, base_url=BASE)

    with pytest.raises(ForeignUrlError) as err:
        client.request("GET", url)

    assert asked == []
    assert "/users/x" not in str(err.value)  # the message names origins, not paths (mailboxes)


def test_the_configured_base_itself_passes_the_check():
    client = HttpClient("graph", lambda: "t", base_url=BASE)
    client.check_target("https://GRAPH.example.com:8443/v1.0/users/x/contacts/delta?$deltatoken=1")
    client.check_target(BASE)
    default_port = HttpClient("bc", lambda: "t", base_url="https://api.businesscentral.dynamics.com/v2.0")
    default_port.check_target("https://api.businesscentral.dynamics.com:443/v2.0/t/production/api/v2.0/x")
