"""The one HTTP policy (shared/http_client.py) against the sandbox: what it retries, how long it waits, and
what it refuses to repeat. Waits are recorded through the injectable `sleep`, not slept."""

from __future__ import annotations

import pytest

from shared.http_client import AmbiguousWriteError, ApiError, BatchItem

ALICE = "alice@contoso.example"


def test_retry_after_is_honoured_for_429_and_503(clients):
    world, _, graph, waits, counter = clients
    world.cloud.graph.faults.throttle(count=1, retry_after=7)
    world.cloud.graph.faults.error(503, count=1, retry_after=3)
    assert graph.get_user(ALICE)["userPrincipalName"].lower() == ALICE
    assert waits == [7.0, 3.0]
    assert counter.counts["graph"] == 3 and counter.throttled["graph"] == 1


def test_backoff_without_retry_after_grows_and_is_bounded(clients):
    world, _, graph, waits, _ = clients
    world.cloud.graph.faults.error(504, count=4)
    graph.get_user(ALICE)
    assert len(waits) == 4 and all(0 <= w <= world.services.backoff_base * 2**5 for w in waits)


def test_html_error_page_is_retried_then_named(clients):
    world, _, graph, _, _ = clients
    world.cloud.graph.faults.html(count=1)
    assert graph.get_user(ALICE)
    world.cloud.graph.faults.html(count=50)
    with pytest.raises(ApiError) as err:
        graph.get_user(ALICE)
    assert "graph GET /v1.0/users/" in str(err.value) and "text/html" in str(err.value)


def test_reset_connection_is_retried_for_reads_but_not_for_creates(clients):
    world, _, graph, _, _ = clients
    world.cloud.graph.faults.reset(count=1, method="GET")
    assert graph.get_user(ALICE)
    world.cloud.graph.faults.reset(count=1, method="POST")
    with pytest.raises(AmbiguousWriteError):
        graph.create_folder(ALICE, "Business Central")
    world.cloud.graph.faults.error(504, count=1, method="POST")
    with pytest.raises(AmbiguousWriteError):
        graph.create_folder(ALICE, "Business Central")


def test_expired_token_is_refreshed_once(clients):
    world, bc, _, _, _ = clients
    bc.companies()
    world.cloud.entra.expire_all_tokens()
    assert [c["id"] for c in bc.companies()] == [world.company]


def test_only_throttled_batch_items_are_sent_again(clients):
    world, _, graph, waits, _ = clients
    folder = graph.create_folder(ALICE, "Business Central")
    world.cloud.graph.faults.throttle(count=2, retry_after=2, method="POST", in_batch=True)
    bodies = [{"displayName": f"P{i}", "emailAddresses": [{"address": f"p{i}@x.example"}]} for i in range(5)]
    results = graph.write([graph.contact_op(ALICE, folder["id"], "POST", body=b) for b in bodies])
    assert [r.status for r in results] == [201] * 5
    assert waits == [2.0]
    assert len(world.cloud.graph.folder_contacts(ALICE, folder["id"])) == 5
    assert world.cloud.graph.counters.item_count("POST") == 5 + 2 + 1  # 5 + 2 retried + the folder


def test_failed_batch_items_report_their_own_error(clients):
    _, _, graph, _, _ = clients
    folder = graph.create_folder(ALICE, "Business Central")
    too_many = [{"address": f"a{i}@x.example"} for i in range(4)]
    results = graph.write(
        [
            BatchItem(
                "POST", f"/users/{ALICE}/contactFolders/{folder['id']}/contacts", {"displayName": "Ok"}
            ),
            BatchItem(
                "POST",
                f"/users/{ALICE}/contactFolders/{folder['id']}/contacts",
                {"displayName": "Bad", "emailAddresses": too_many},
            ),
        ]
    )
    assert results[0].ok and not results[1].ok and results[1].status == 400
    assert "EmailAddresses has 4 entries" in results[1].error


def test_pacer_waits_for_the_window_instead_of_being_throttled():
    from shared.http_client import WindowPacer

    now = [0.0]
    waits: list[float] = []

    def sleep(s: float) -> None:
        waits.append(s)
        now[0] += s

    pacer = WindowPacer(100, 600.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        pacer(20)  # five batches of 20 fill the budget
    now[0] = 30.0
    pacer(20)  # the sixth must wait until the first leaves the window
    assert waits == [570.0]
    pacer(1)  # all five left the window together: no further wait
    assert waits == [570.0] and now[0] == 600.0
