"""Transport-level truths of the simulated Business Central (issue 10, items 1, 9, 10): `$batch` content
negotiation, BC's queueing and its 429 without Retry-After, and the faults that reproduce an applied
write with an unreadable answer and a link to a foreign host. Each test cites its source."""

from __future__ import annotations

import threading
import time
from email.parser import BytesParser
from email.policy import HTTP

from tests.sandbox.test_bc import World, batch, make_world, world

__all__ = ["make_world", "world"]  # fixtures used by name


def _creates(world: World, n: int) -> list[dict]:
    url = f"companies({world.company})/contacts"
    return [{"id": str(i), "method": "POST", "url": url, "body": {"displayName": f"P{i}"}} for i in range(n)]


def test_batch_without_accept_json_is_answered_multipart_mixed(world):
    """ "If you leave the Accept header out, then the response will be multipart/mixed" (Kauffmann,
    "Batch calls with Business Central APIs (1) - Basic operation", https://www.kauffmann.nl/2020/12/
    18/batch-calls-with-business-central-apis-1-basic-operation/). `requests` sends `Accept: */*`,
    which asks for nothing in particular: multipart too. The operations are applied either way."""
    plain = world.http.post(f"{world.root}/$batch", json={"requests": _creates(world, 2)})

    assert plain.status_code == 200
    assert plain.headers["Content-Type"].startswith("multipart/mixed; boundary=batchresponse_")
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {plain.headers['Content-Type']}\r\n\r\n".encode() + plain.content
    )
    parts = [p.get_payload(decode=True).decode() for p in message.iter_parts()]
    assert [p.splitlines()[0] for p in parts] == ["HTTP/1.1 201 Created"] * 2
    assert len(world.bc.contacts(world.company)) == 2  # applied, whatever the answer's format


def test_batch_with_accept_json_is_answered_json(world):
    """The JSON answer needs `Accept: application/json` (Kauffmann, as above)."""
    resp = batch(world, _creates(world, 2), Accept="application/json")

    assert resp.headers["Content-Type"].startswith("application/json")
    assert [r["status"] for r in resp.json()["responses"]] == [201, 201]


def test_requests_beyond_five_at_once_wait_in_the_queue_not_refused(make_world):
    """ "Max concurrent requests 5 ... Max queue size 95 ... If the limit is reached, the request is
    queued" and waits up to 8 minutes ("Operational limits for Business Central online",
    https://learn.microsoft.com/en-us/dynamics365/business-central/dev-itpro/administration/
    operational-limits-online). Eight requests at once with the default limits: five run, three
    wait for a slot, none is refused."""
    w = make_world()
    w.bc.faults.latency = 0.3
    statuses: list[int] = []
    start = threading.Barrier(8)

    def call() -> None:
        start.wait()
        statuses.append(w.http.get(w.contacts_url).status_code)

    began = time.monotonic()
    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert statuses == [200] * 8
    assert w.bc.limits.peak_active.most_common(1)[0][1] == 5
    assert time.monotonic() - began >= 0.55  # the three queued ones ran after a first one finished


def test_a_full_queue_is_429_without_retry_after(make_world):
    """Beyond the queue BC answers 429 and asks for "a cool off period" without saying how long
    ("Working with API limits in Dynamics 365 Business Central", https://learn.microsoft.com/en-us/
    dynamics365/business-central/dev-itpro/api-reference/v2.0/dynamics-rate-limits)."""
    w = make_world(max_concurrent=1, max_queue=0)
    w.bc.faults.latency = 0.3
    answers: list = []
    start = threading.Barrier(2)

    def call() -> None:
        start.wait()
        answers.append(w.http.get(w.contacts_url))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    refused = [a for a in answers if a.status_code == 429]
    assert len(refused) == 1 and "Retry-After" not in refused[0].headers
    assert refused[0].json()["error"]["code"] == "Application_TooManyRequests"


def test_unreadable_fault_applies_the_write_then_garbles_its_answer(world):
    """`Faults.unreadable`: the "applied, answer unreadable" outcome (a proxy page with a 2xx) is
    reproducible from the sandbox itself. The batch's contacts exist; its answer is HTML."""
    world.bc.faults.unreadable(count=1, method="POST", path_regex=r"\$batch$")

    resp = batch(world, _creates(world, 3))

    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/html")
    assert sorted(c["displayName"] for c in world.bc.contacts(world.company)) == ["P0", "P1", "P2"]
    assert world.bc.faults.fired["unreadable"] == 1


def test_foreign_links_fault_points_next_link_at_another_host(world):
    """`Faults.foreign_links`: the answer's nextLink names another origin, keeping path and query, so a
    client that follows it blindly would send its bearer token there."""
    for i in range(3):
        world.bc.seed_contact(world.company, displayName=f"C{i}")
    world.bc.faults.foreign_links("https://evil.example:8443", count=1, method="GET")

    first = world.http.get(world.contacts_url, headers={"Prefer": "odata.maxpagesize=1"}).json()
    honest = world.http.get(world.contacts_url, headers={"Prefer": "odata.maxpagesize=1"}).json()

    assert first["@odata.nextLink"].startswith("https://evil.example:8443/v2.0/")
    assert honest["@odata.nextLink"].startswith(world.root.split("/v2.0/")[0])
