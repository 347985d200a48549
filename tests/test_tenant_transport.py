"""Truth on a real tenant, transport share (issue 10, items 1, 9, 10, 11), end to end through the HTTP
API: `PUT /api/users/{user}` and `POST /api/sync`, against a sandbox as strict as the real services.

Every scenario asserts what a user would see: each contact once in Business Central and once in
Outlook, nothing blanked or lost, the run not failed, and the next run writing nothing. Retry waits go
to the services' injectable `sleep` (recorded, not slept).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import pytest

from shared import services as app_services
from shared.model import WRITE_ACTIONS, user_hash

ALICE = "alice@contoso.example"
BOB = "bob@contoso.example"


# Helpers ---------------------------------------------------------------------------------------
def put_user(client, world, user: str, **settings: Any) -> None:
    world.cloud.graph.add_mailbox(user)
    resp = client("PUT", f"users/{user}", {"folderName": "Business Central", **settings})
    assert resp.status_code in (200, 201), resp.text


def sync(client, user: str = ALICE, mode: str = "incremental") -> dict[str, Any]:
    resp = client("POST", "sync", {"user": user, "mode": mode})
    assert resp.status_code == 200, resp.text
    return resp.json()


def writes(report: dict[str, Any]) -> int:
    return sum(report["counts"].get(k, 0) for k in WRITE_ACTIONS)


def no_waiting(monkeypatch) -> list[float]:
    """The app's retry waits, recorded instead of slept (the services' injectable sleep)."""
    waits: list[float] = []
    services = app_services.get_services()
    monkeypatch.setattr(services, "sleep", waits.append)
    return waits


def assert_each_once(world, emails: set[str], user: str = ALICE) -> None:
    """Every email exactly once in BC and once in the user's Outlook folder, with a name."""
    bc = world.bc_by_email()
    outlook = world.outlook_by_email(user)  # asserts no duplicate in Outlook
    for email in emails:
        assert len(bc.get(email, [])) == 1, f"{email} in BC {len(bc.get(email, []))} times"
        assert email in outlook, f"{email} missing in Outlook"
        assert outlook[email].get("displayName"), f"{email} blanked in Outlook"
        assert bc[email][0].get("displayName"), f"{email} blanked in BC"


def new_outlook_contacts(world, n: int, user: str = ALICE) -> set[str]:
    fid = world.folder_id(user)
    emails = set()
    for i in range(n):
        email = f"outlook{i}@example.org"
        world.cloud.graph.user_create_contact(
            user, fid, {"displayName": f"Outlook Person {i}", "emailAddresses": [{"address": email}]}
        )
        emails.add(email)
    return emails


class Listener:
    """A tiny TCP listener standing in for a foreign host: it records every connection it gets."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    self.received.append(conn.recv(65536))
                except OSError:
                    self.received.append(b"")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()


@contextmanager
def listener() -> Iterator[Listener]:
    lst = Listener()
    try:
        yield lst
    finally:
        lst.close()


# Item 1: Accept: application/json, and a 2xx to a write is never repeated -----------------------
def test_bc_batch_is_read_as_json_and_new_outlook_contacts_reach_bc_once(client, world):
    """BC answers `$batch` with multipart/mixed unless asked for JSON. The app asks, so a batch of
    creates is read, linked, and not sent again."""
    people = {world.person(f"Person {i}")["email"] for i in range(3)}
    put_user(client, world, ALICE)
    assert sync(client, mode="full")["status"] == "succeeded"
    fresh = new_outlook_contacts(world, 3)
    world.cloud.bc.counters.reset()

    report = sync(client)

    assert report["status"] == "succeeded", report
    assert report["counts"]["bcCreated"] == 3
    assert world.cloud.bc.counters.http_count("POST", "$batch") == 1  # one batch, not repeated
    assert_each_once(world, people | fresh)
    assert writes(sync(client)) == 0


@pytest.mark.parametrize("service", ["bc", "graph"])
def test_a_write_batch_applied_with_an_unreadable_answer_is_not_sent_again(client, world, service):
    """The sandbox applies the `$batch`, then answers 200 with an HTML page. The app must treat the
    writes as ambiguous (they were applied), not send them again: each contact exists once, the run
    is not failed, the next run resolves the ambiguity through the tag or email without writing twice,
    and the run after that writes nothing."""
    people = {world.person(f"Person {i}")["email"] for i in range(3)}
    put_user(client, world, ALICE)
    if service == "bc":
        assert sync(client, mode="full")["status"] == "succeeded"
        emails = people | new_outlook_contacts(world, 3)
    else:
        emails = people
    getattr(world.cloud, service).faults.unreadable(count=1, method="POST", path_regex=r"\$batch$")

    report = sync(client, mode="full" if service == "graph" else "incremental")

    assert getattr(world.cloud, service).faults.fired["unreadable"] == 1
    assert report["status"] in ("succeeded", "partial"), report
    key = "bcCreated" if service == "bc" else "outlookCreated"
    if service == "bc":
        assert len(world.bc_contacts()) == 6  # applied once, never twice
    else:
        assert len(world.outlook()) == 3
    follow_up = sync(client)
    assert follow_up["status"] == "succeeded", follow_up
    assert follow_up["counts"][key] == 0  # resolved by reading back, not by creating again
    assert_each_once(world, emails)
    assert writes(sync(client)) == 0


@pytest.mark.parametrize("status", [200, 201])
def test_a_folder_created_with_an_unreadable_answer_is_found_not_created_twice(client, world, status):
    """The first run creates the sync folder; Graph applies the POST and the answer is unreadable. The
    app looks the folder up instead of creating a second one (or failing the run)."""
    people = {world.person(f"Person {i}")["email"] for i in range(3)}
    put_user(client, world, ALICE)
    world.cloud.graph.faults.unreadable(count=1, status=status, method="POST", path_regex=r"/contactFolders$")

    report = sync(client, mode="full")

    assert world.cloud.graph.faults.fired["unreadable"] == 1
    assert report["status"] == "succeeded", report
    folders = world.cloud.graph.folders(ALICE)
    assert [f["displayName"] for f in folders] == ["Business Central"]
    assert_each_once(world, people)
    assert writes(sync(client)) == 0


# Item 9: BC's 429 without Retry-After -----------------------------------------------------------
def test_bc_throttling_without_retry_after_backs_off_and_the_run_succeeds(client, world, monkeypatch):
    """BC's own 429s carry no Retry-After; the app backs off (full jitter) instead of failing, and a
    throttled write batch (429 = not processed) is sent again and applied once."""
    waits = no_waiting(monkeypatch)
    people = {world.person(f"Person {i}")["email"] for i in range(3)}
    put_user(client, world, ALICE)
    assert sync(client, mode="full")["status"] == "succeeded"
    fresh = new_outlook_contacts(world, 2)
    world.cloud.bc.faults.throttle(count=2, retry_after=None, method="GET")
    world.cloud.bc.faults.throttle(count=2, retry_after=None, method="POST", path_regex=r"\$batch$")

    report = sync(client)

    assert report["status"] == "succeeded", report
    assert world.cloud.bc.faults.fired["429"] == 4
    assert len(waits) >= 4 and all(0 <= w <= 60 for w in waits)
    assert_each_once(world, people | fresh)
    assert writes(sync(client)) == 0


# Item 10: tokens only to the configured hosts -----------------------------------------------------
@pytest.mark.parametrize("link", ["@odata.nextLink", "@odata.deltaLink"])
def test_a_foreign_link_in_an_answer_is_refused_unsent_and_other_users_are_unaffected(client, world, link):
    """A Graph delta page whose nextLink (or final deltaLink) points at another host: the app sends
    nothing there (the listener standing in for that host gets no connection, so no token), stores
    nothing, the user's run fails with a message naming the foreign origin and not the mailbox, Bob's
    run is unaffected, and Alice's next run catches up with everything."""
    world.cloud.graph.delta_max_page_size = 2  # so a few changes span several delta pages
    people = {world.person(f"Person {i}")["email"] for i in range(3)}
    put_user(client, world, ALICE)
    put_user(client, world, BOB)
    assert sync(client, ALICE, "full")["status"] == "succeeded"
    assert sync(client, BOB, "full")["status"] == "succeeded"
    stored = world.services.store.get_state(ALICE).delta_link
    world.cloud.bc.edit_contact(world.company, world.bc_contacts()[0]["id"], jobTitle="Changed")
    fresh = new_outlook_contacts(world, 3) if link == "@odata.nextLink" else set()
    with listener() as foreign:
        world.cloud.graph.faults.foreign_links(
            f"https://127.0.0.1:{foreign.port}",
            count=1,
            method="GET",
            path_regex=f"/users/{ALICE}/.*delta",
        )
        alice = sync(client, ALICE)
        bob = sync(client, BOB)
        assert world.cloud.graph.faults.fired["relink"] == 1
        assert foreign.received == []

    assert alice["status"] == "failed"
    assert f"https://127.0.0.1:{foreign.port}" in alice["message"] and "refused" in alice["message"]
    assert ALICE not in alice["message"]
    assert world.services.store.get_state(ALICE).delta_link == stored  # nothing foreign was kept
    assert bob["status"] == "succeeded" and bob["counts"]["outlookUpdated"] == 1
    after = sync(client, ALICE)
    assert after["status"] == "succeeded", after
    assert after["counts"]["outlookUpdated"] == 1 and after["counts"]["bcCreated"] == len(fresh)
    assert_each_once(world, people | fresh, ALICE)
    assert_each_once(world, people, BOB)
    assert writes(sync(client, ALICE)) == 0


def test_a_stored_delta_link_to_a_foreign_host_is_not_used(client, world, caplog):
    """A delta link in Table Storage that points elsewhere (tampered, or from another cloud) is
    refused without a request: the run does a full sync instead and says why, in the report and in a
    `stored delta link refused {JSON}` warning that names the run and the user's hash; nothing is lost."""
    people = {world.person(f"Person {i}")["email"] for i in range(3)}
    put_user(client, world, ALICE)
    assert sync(client, mode="full")["status"] == "succeeded"
    with listener() as foreign:
        state = world.services.store.get_state(ALICE)
        state.delta_link = f"https://127.0.0.1:{foreign.port}/v1.0/users/x/contactFolders/y/contacts/delta"
        world.services.store.save_state(state)
        report = sync(client)
        assert foreign.received == []

    assert report["status"] == "succeeded", report
    assert report["mode"] == "full" and "delta link was not used" in report["message"]
    assert f"127.0.0.1:{foreign.port}" in report["message"]
    (refused,) = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("stored delta link refused")
    ]
    fields = json.loads(refused.removeprefix("stored delta link refused "))
    assert fields["runId"] == report["runId"] and fields["userHash"] == user_hash(ALICE)
    assert f"127.0.0.1:{foreign.port}" in fields["error"] and ALICE not in refused
    assert_each_once(world, people)
    assert writes(sync(client)) == 0


# Item 11: no mailbox address in logs ------------------------------------------------------------
def test_a_sync_logged_at_info_names_no_mailbox(client, world, caplog):
    """With the root logger at INFO, as a Functions host or an operator's terminal has it, every
    record of a sync (Azure SDK included, a failed run's warning too) identifies the user only by
    userHash, never by address. The Azure SDK's HttpLoggingPolicy logs each request URL at INFO
    ("Configure logging in the Azure libraries for Python", https://learn.microsoft.com/azure/
    developer/python/sdk/azure-sdk-logging), and Table Storage URLs hold the mailbox address."""
    for name in ("azure", "azure.core.pipeline.policies.http_logging_policy"):
        logging.getLogger(name).setLevel(logging.NOTSET)  # a fresh process: nobody set them yet
    app_services.reset_services()  # the app configures its logging as it builds its services
    caplog.set_level(logging.INFO)
    world.person("Person Logged")
    put_user(client, world, ALICE)
    new_user = sync(client, mode="full")
    new_outlook_contacts(world, 1)
    assert new_user["status"] == "succeeded" and sync(client)["status"] == "succeeded"
    world.cloud.graph.remove_mailbox(ALICE)  # a failing run logs its error, which names a Graph path
    assert sync(client)["status"] == "failed"

    texts = [r.getMessage() + repr(r.__dict__) for r in caplog.records]
    assert texts, "the sync logged nothing at INFO"
    encoded = {ALICE, quote(ALICE), quote(ALICE, safe=""), ALICE.replace("@", "%40")}
    leaked = [t for t in texts if any(e.lower() in t.lower() for e in encoded)]
    assert not leaked, leaked[:3]
