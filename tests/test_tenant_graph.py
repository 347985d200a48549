"""Graph as strict as a real tenant (issue 10, items 3, 4 and 8), end to end through the HTTP API.

Each scenario configures a user with `PUT /api/users/{user}`, runs `POST /api/sync` and looks where a
user would: the contacts in Outlook and in Business Central, and the run report. The sandbox is in
its strict default (tests/sandbox/test_graph.py pins each behaviour with its sources):

- delta answers an updated contact with its id and the changed properties only;
- a folder deleted in Outlook goes to Deleted Items, keeps its id and contacts, and leaves `/contactFolders`;
- folder names compare without regard to case, and a second folder of one name is refused with 409.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sandbox.graph import GraphService
from tests.world import World, tag

ALICE = "alice@contoso.example"
WRITES = ("outlookCreated", "outlookUpdated", "outlookDeleted", "outlookRecreated", "bcCreated", "bcUpdated")


def _setup(client, world: World, **settings: Any) -> None:
    world.cloud.graph.add_mailbox(ALICE)
    resp = client("PUT", f"users/{ALICE}", {"enabled": True, **settings})
    assert resp.status_code in (200, 201), resp.text


def _sync(client, mode: str = "incremental") -> dict[str, Any]:
    resp = client("POST", "sync", {"user": ALICE, "mode": mode})
    assert resp.status_code == 200, resp.text
    report = resp.json()
    assert report["status"] == "succeeded", report
    return report


def _writes(report: dict[str, Any]) -> int:
    return sum(report["counts"].get(k, 0) for k in WRITES)


def _once_each_side(world: World, emails: list[str]) -> dict[str, dict[str, Any]]:
    """Each email exactly once in the Outlook folder and once in BC; returns Outlook by email."""
    outlook = world.outlook_by_email()  # asserts no duplicate in Outlook
    assert sorted(outlook) == sorted(emails)
    bc = world.bc_by_email()
    assert all(len(bc[e]) == 1 for e in emails), {e: len(bc.get(e, [])) for e in emails}
    return outlook


# Item 3: partial delta items ---------------------------------------------------------------------
def test_outlook_edit_seen_as_a_partial_delta_item_blanks_nothing_and_loses_nothing(client, world):
    """The user edits a job title and adds a second and third email and a second phone in Outlook.
    Delta reports the contact with only those properties. With pullEditsFromOutlook the title reaches
    BC and nothing else in BC is blanked; a later BC change reaches Outlook and keeps the Outlook-only
    emails and phone."""
    ann = world.person(
        "Ann Lee", "ann@fabrikam.example", jobTitle="Buyer", phoneNumber="+47 11111111", city="Oslo"
    )
    _setup(client, world, pullEditsFromOutlook=True)
    assert _sync(client, "full")["counts"]["outlookCreated"] == 1
    graph: GraphService = world.cloud.graph
    [o] = world.outlook()
    graph.user_update_contact(
        ALICE,
        world.folder_id(),
        o["id"],
        jobTitle="Head Buyer",
        emailAddresses=[
            {"address": "ann@fabrikam.example"},
            {"address": "ann@home.example"},
            {"address": "ann.lee@mobile.example"},
        ],
        businessPhones=["+47 11111111", "+47 22222222"],
    )
    graph.reset_counters()

    report = _sync(client)
    assert report["counts"]["bcUpdated"] == 1 and report["counts"]["outlookUpdated"] == 0
    in_bc = world.cloud.bc.get_contact(world.company, ann["id"])
    assert in_bc["jobTitle"] == "Head Buyer"
    assert (in_bc["displayName"], in_bc["email"], in_bc["phoneNumber"], in_bc["city"]) == (
        "Ann Lee",
        "ann@fabrikam.example",
        "+47 11111111",
        "Oslo",
    )
    # The partial item was read whole by id, inside a $batch, never one GET per contact.
    counters = graph.mailbox_counters[ALICE]
    assert counters.item_count("GET", "contacts.get") >= 1
    assert counters.http_count("GET", "contacts.get") == 0

    world.cloud.bc.edit_contact(world.company, ann["id"], city="Bergen")
    report = _sync(client)
    assert report["counts"]["outlookUpdated"] == 1 and report["counts"]["bcUpdated"] == 0
    o = _once_each_side(world, ["ann@fabrikam.example"])["ann@fabrikam.example"]
    assert o["businessAddress"]["city"] == "Bergen" and o["jobTitle"] == "Head Buyer"
    assert [e["address"] for e in o["emailAddresses"]] == [
        "ann@fabrikam.example",
        "ann@home.example",
        "ann.lee@mobile.example",
    ]
    assert o["businessPhones"] == ["+47 11111111", "+47 22222222"]
    assert tag(o) == ann["id"]
    assert _writes(_sync(client)) == 0


def test_partial_items_are_read_in_batches_and_only_when_needed(client, world):
    """25 synced contacts edited in Outlook (default settings: Outlook edits are not pulled). While BC
    is unchanged the run needs none of them and reads none. When BC changes all 25 too, they are
    read whole in $batch calls of at most 20, and the update keeps each Outlook-only second email."""
    people = [world.person(f"Person {i:02d} Sample") for i in range(25)]
    emails = [p["email"] for p in people]
    _setup(client, world)
    _sync(client, "full")
    graph: GraphService = world.cloud.graph
    fid = world.folder_id()
    for o in world.outlook():
        first = o["emailAddresses"][0]["address"]
        graph.user_update_contact(
            ALICE, fid, o["id"], emailAddresses=[{"address": first}, {"address": "private." + first}]
        )
    graph.reset_counters()
    report = _sync(client)
    assert _writes(report) == 0
    assert graph.mailbox_counters[ALICE].item_count("GET", "contacts.get") == 0

    for p in people:
        world.cloud.bc.edit_contact(world.company, p["id"], jobTitle="Partner")
    graph.reset_counters()
    report = _sync(client)
    assert report["counts"]["outlookUpdated"] == 25 and report["counts"]["bcUpdated"] == 0
    counters = graph.mailbox_counters[ALICE]
    # 25 edited contacts read once each, in two $batch calls; then the settling round reads our 25
    # own updates (delta gives them partial too), again in two.
    assert counters.http_count("GET", "contacts.get") == 0
    assert counters.item_count("GET", "contacts.get") == 50
    outlook = _once_each_side(world, emails)
    for email, o in outlook.items():
        assert o["jobTitle"] == "Partner"
        assert [e["address"] for e in o["emailAddresses"]] == [email, "private." + email]
    assert _writes(_sync(client)) == 0


# Item 4: a folder deleted in Outlook goes to Deleted Items -------------------------------------
def test_folder_deleted_in_outlook_is_recreated_under_contacts_and_deleted_items_is_left_alone(client, world):
    people = [world.person(f"Person {i} Sample", city="Oslo") for i in range(4)]
    emails = [p["email"] for p in people]
    _setup(client, world)
    _sync(client, "full")
    graph: GraphService = world.cloud.graph
    old = world.folder_id()
    graph.user_create_contact(
        ALICE, old, {"displayName": "Own Contact", "emailAddresses": [{"address": "own@contact.example"}]}
    )
    assert _sync(client)["counts"]["bcCreated"] == 1
    emails.append("own@contact.example")
    graph.user_delete_folder(ALICE, old)
    binned = graph.folder_contacts(ALICE, old)
    # A BC change that would have been written into the old folder if the run had not noticed.
    world.cloud.bc.edit_contact(world.company, people[0]["id"], city="Bergen")

    report = _sync(client)
    assert "deleted" in report["message"] and "new folder" in report["message"]
    assert report["mode"] == "full" and report["counts"]["outlookRecreated"] == 5
    assert report["counts"]["bcCreated"] == 0  # nothing came back to BC as "new"
    new = world.folder_id()
    assert new != old
    folders = graph.folders(ALICE)
    assert [f["displayName"] for f in folders] == ["Business Central"] and folders[0]["id"] == new
    assert graph.folder(ALICE, old)["parentFolderId"] == graph.deleted_items_id(ALICE)
    assert graph.folder_contacts(ALICE, old) == binned  # nothing written into Deleted Items
    outlook = _once_each_side(world, emails)
    assert outlook[people[0]["email"]]["businessAddress"]["city"] == "Bergen"
    assert len(world.bc_contacts()) == 5
    assert _writes(_sync(client)) == 0


def test_a_noop_run_costs_one_folder_listing_more(client, world):
    """Checking the folder is still under Contacts costs one request per run: a deleted folder gives
    no other sign (its delta still answers, with nothing)."""
    for i in range(5):
        world.person(f"Person {i} Sample")
    _setup(client, world)
    _sync(client, "full")
    _sync(client)
    report = _sync(client)
    assert _writes(report) == 0
    assert report["requests"]["graph"] == 2, report["requests"]  # folder listing + delta


# Item 8: folder names compare case-insensitively ----------------------------------------------
def test_existing_folder_in_another_case_is_used_not_duplicated(client, world):
    world.person("Ann Lee", "ann@fabrikam.example")
    world.cloud.graph.add_mailbox(ALICE)
    own = world.cloud.graph.user_create_folder(ALICE, "business central")
    world.cloud.graph.user_create_contact(
        ALICE, own["id"], {"displayName": "Ann Lee", "emailAddresses": [{"address": "ann@fabrikam.example"}]}
    )
    assert client("PUT", f"users/{ALICE}", {"folderName": "Business Central"}).status_code in (200, 201)
    report = _sync(client, "full")
    assert report["counts"]["linked"] == 1 and report["counts"]["outlookCreated"] == 0
    assert world.folder_id() == own["id"]
    assert [f["displayName"] for f in world.cloud.graph.folders(ALICE)] == ["business central"]
    _once_each_side(world, ["ann@fabrikam.example"])
    assert _writes(_sync(client)) == 0


def test_a_409_on_create_is_resolved_by_using_the_existing_folder(client, world):
    """Outlook creates "BUSINESS CENTRAL" right after the run looked and found none: the create gets
    409 ErrorFolderExists, and the run uses that folder instead of failing or making another."""
    world.person("Ann Lee", "ann@fabrikam.example")
    _setup(client, world)
    graph: GraphService = world.cloud.graph
    real_list = graph._list_folders
    made: list[dict[str, Any]] = []

    def list_then_outlook_creates(req: Any, ctx: Any, user: str) -> Any:
        resp = real_list(req, ctx, user)
        if not made:  # another client (Outlook) creates it just after this listing
            folder = graph._new_folder(graph._mailbox(user, ctx), {"displayName": "BUSINESS CENTRAL"})
            made.append(graph._folder_json(folder))
        return resp

    [at] = [i for i, r in enumerate(graph.routes) if (r.method, r.kind) == ("GET", "folders.list")]
    wrapped = graph._wrap(list_then_outlook_creates, locked=True)
    graph.routes[at] = dataclasses.replace(graph.routes[at], handler=wrapped)  # this test's cloud only
    report = _sync(client, "full")
    assert made and world.folder_id() == made[0]["id"]
    assert graph.counters.statuses[409] == 1
    assert report["counts"]["outlookCreated"] == 1
    assert [f["displayName"] for f in graph.folders(ALICE)] == ["BUSINESS CENTRAL"]
    _once_each_side(world, ["ann@fabrikam.example"])
