"""Issue 12: the default Contacts folder (the one phones show), the sync's Outlook category, and moving
between a subfolder and the default folder (BEHAVIOUR §4.8, §5), end to end through the HTTP API.

Each scenario configures a user with `PUT /api/users/{user}`, runs `POST /api/sync` and looks where a
user would: every contact in the mailbox (default folder and subfolders), Business Central, the master
category list and the run report. The user's own contacts are checked field by field before and after:
the sync may change one only by adopting it (same email as a BC contact synced to them).
"""

from __future__ import annotations

from typing import Any

from sandbox.entra import GRAPH_RESOURCE
from sandbox.graph import GraphService
from tests.world import World, tag

ALICE = "alice@contoso.example"
CAT = "Business Central"
WRITES = ("outlookCreated", "outlookUpdated", "outlookDeleted", "outlookRecreated", "bcCreated", "bcUpdated")
USER_FIELDS = ("displayName", "emailAddresses", "companyName", "jobTitle", "categories", "businessPhones")


def _setup(client, world: World, *, grant_categories: bool = True, **settings: Any) -> None:
    if ALICE not in {m.lower() for m in world._mailboxes}:
        world.cloud.graph.add_mailbox(ALICE)
        world._mailboxes.add(ALICE)
    # The sandbox app has what the deployment grants (docs/DEPLOY.md), MailboxSettings.ReadWrite too;
    # an older deployment may lack it.
    roles = ["Contacts.ReadWrite", "User.Read.All"] + (
        ["MailboxSettings.ReadWrite"] if grant_categories else []
    )
    world.cloud.entra.set_roles(world.cloud.tenant_id, world.cloud.client_id, GRAPH_RESOURCE, roles)
    _put(client, **settings)


def _put(client, **settings: Any) -> None:
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


def _graph(world: World) -> GraphService:
    return world.cloud.graph


def _default(world: World) -> list[dict[str, Any]]:
    return _graph(world).folder_contacts(ALICE, None)


def _everywhere(world: World) -> list[dict[str, Any]]:
    """Every contact of the mailbox: the default folder and every folder under it."""
    graph = _graph(world)
    out = list(_default(world))
    for folder in graph.folders(ALICE):
        out += graph.folder_contacts(ALICE, folder["id"])
    return out


def _own(world: World, name: str, email: str | None, **fields: Any) -> dict[str, Any]:
    """A contact the user keeps in their default Contacts folder."""
    data: dict[str, Any] = {"displayName": name, **fields}
    if email:
        data["emailAddresses"] = [{"address": email, "name": name}]
    return _graph(world).user_create_contact(ALICE, None, data)


def _as_user_sees(contact: dict[str, Any]) -> dict[str, Any]:
    return {k: contact.get(k) for k in USER_FIELDS}


def _by_id(world: World) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in _everywhere(world)}


def _one_copy_each(world: World, bc_ids: list[str]) -> None:
    """Each BC contact has exactly one tagged Outlook contact in the whole mailbox."""
    tags = [tag(c) for c in _everywhere(world) if tag(c)]
    assert sorted(tags) == sorted(bc_ids), tags


def test_default_folder_sync_adopts_by_email_and_leaves_the_users_own_contacts_alone(client, world):
    """folderName null: BC's contacts land in the default Contacts folder with the category. The user's
    contact with the same email is adopted (BC's values win, its own categories kept); the one with
    the same name but another email, and the one BC does not know, are not touched, nor reported."""
    ann = world.person("Ann Lee", "ann@fabrikam.example", jobTitle="Buyer")
    bo = world.person("Bo Berg", "bo@fabrikam.example", jobTitle="CEO")
    _setup(client, world, folderName=None)
    same_name = _own(world, "Ann Lee", "ann.lee@home.example", categories=["Family"])
    same_email = _own(world, "Bo B.", "bo@fabrikam.example", jobTitle="boss", categories=["Red category"])
    private = _own(world, "Dentist", "clinic@dentist.example", businessPhones=["+47 1234"])
    no_email = _own(world, "Neighbour", None, businessPhones=["+47 5678"])
    before = {c["id"]: _as_user_sees(c) for c in (same_name, private, no_email)}

    report = _sync(client, "full")
    assert report["counts"]["outlookCreated"] == 1 and report["counts"]["linked"] == 1
    assert not [c for c in _graph(world).folders(ALICE)], "no subfolder is made for a default-folder user"
    contacts = _by_id(world)
    for own_id, seen in before.items():
        assert _as_user_sees(contacts[own_id]) == seen and not tag(contacts[own_id])
    adopted = contacts[same_email["id"]]
    assert tag(adopted) == bo["id"] and adopted["jobTitle"] == "CEO" and adopted["displayName"] == "Bo Berg"
    assert adopted["categories"] == ["Red category", CAT]
    [created] = [c for c in contacts.values() if tag(c) == ann["id"]]
    assert created["categories"] == [CAT] and created["id"] not in before
    named = {i["outlookId"] for i in report["items"]}
    assert not named & set(before), "the user's private contacts are not in the report"
    assert {"displayName": CAT, "color": "preset7"}.items() <= next(
        c for c in _graph(world).master_categories(ALICE) if c["displayName"] == CAT
    ).items()

    # BC deletes both: the contact the sync created is deleted, the adopted one is released.
    world.cloud.bc.delete_contact(world.company, bo["id"])
    world.cloud.bc.delete_contact(world.company, ann["id"])
    report = _sync(client)
    assert report["counts"]["outlookDeleted"] == 1
    assert [i["action"] for i in report["items"] if i["outlookId"] == same_email["id"]] == ["released"]
    contacts = _by_id(world)
    assert created["id"] not in contacts
    kept = contacts[same_email["id"]]
    assert not tag(kept) and kept["categories"] == ["Red category"] and kept["displayName"] == "Bo Berg"
    for own_id, seen in before.items():
        assert _as_user_sees(contacts[own_id]) == seen
    assert _writes(_sync(client)) == 0


def test_in_the_default_folder_only_a_contact_with_the_category_goes_to_bc(client, world):
    """pullNewFromOutlook in the default folder: the user's private contacts never reach BC; one they
    gave the sync's category does, and is then tagged like any synced contact."""
    world.person("Ann Lee", "ann@fabrikam.example")
    _setup(client, world, folderName=None, pullNewFromOutlook=True)
    _sync(client, "full")
    _own(world, "Private Pete", "pete@private.example")
    nina = _own(world, "New Nina", "nina@customer.example", categories=[CAT])

    report = _sync(client)
    assert report["counts"]["bcCreated"] == 1
    in_bc = world.bc_by_email()
    assert "nina@customer.example" in in_bc and "pete@private.example" not in in_bc
    assert tag(_by_id(world)[nina["id"]]) == in_bc["nina@customer.example"][0]["id"]
    assert not [i for i in report["items"] if i.get("email") == "pete@private.example"]
    assert _writes(_sync(client)) == 0


def test_a_no_op_run_in_the_default_folder_costs_at_most_three_graph_and_two_bc_requests(client, world):
    """No folder check is needed (the default folder cannot be deleted): the delta is Graph's only cost."""
    for n in range(5):
        world.person(f"Person {n}", f"p{n}@fabrikam.example")
    _setup(client, world, folderName=None)
    _own(world, "Dentist", "clinic@dentist.example")
    _sync(client, "full")
    _sync(client)
    report = _sync(client)
    assert _writes(report) == 0
    assert report["requests"]["graph"] <= 3 and report["requests"]["bc"] <= 2, report["requests"]


def test_switching_between_a_subfolder_and_the_default_folder_twice_moves_without_duplicates(client, world):
    """Graph v1.0 cannot move a contact: the sync copies it into the new folder, then deletes its own
    contact from the old one (the copy first, so a stop midway leaves two, never none). The user's
    own contact it had adopted is released where it is; their other contacts are never touched."""
    people = [world.person(f"Person {n}", f"p{n}@fabrikam.example", city="Oslo") for n in range(12)]
    bo = world.person("Bo Berg", "bo@fabrikam.example", city="Oslo")
    ids = [p["id"] for p in [*people, bo]]
    _setup(client, world)  # today's default: the "Business Central" subfolder
    mine = _own(world, "Bo B.", "bo@fabrikam.example", categories=["Red category"])
    private = _own(world, "Dentist", "clinic@dentist.example")
    _sync(client, "full")
    _one_copy_each(world, ids)
    [sub] = _graph(world).folders(ALICE)

    for round_ in range(2):
        _put(client, folderName=None)
        report = _sync(client)
        assert report["status"] == "succeeded" and not report["counts"]["skipped"]
        _one_copy_each(world, ids)
        contacts = _by_id(world)
        assert tag(contacts[mine["id"]]) == bo["id"], "the user's own contact is adopted, not duplicated"
        assert contacts[mine["id"]]["categories"] == ["Red category", CAT]
        assert not _graph(world).folder_contacts(ALICE, sub["id"]), f"round {round_}: subfolder emptied"
        assert _as_user_sees(contacts[private["id"]]) == _as_user_sees(private)
        assert _writes(_sync(client)) == 0

        _put(client, folderName="Business Central")
        report = _sync(client)
        assert report["status"] == "succeeded"
        _one_copy_each(world, ids)
        contacts = _by_id(world)
        released = contacts[mine["id"]]
        assert not tag(released) and released["categories"] == ["Red category"]
        assert [tag(c) for c in _default(world) if tag(c)] == []
        assert len(_graph(world).folder_contacts(ALICE, sub["id"])) == len(ids)
        assert _as_user_sees(contacts[private["id"]]) == _as_user_sees(private)
        assert [f["id"] for f in _graph(world).folders(ALICE)] == [sub["id"]]
        assert _writes(_sync(client)) == 0


def test_category_on_renamed_and_off_keeps_the_users_own_categories(client, world):
    """Changing `category` re-labels every synced contact in one full run; the user's own categories
    on them stay. null takes the sync's category off. A settings row from before the setting (no
    category column) keeps syncing without one."""
    for n in range(3):
        world.person(f"Person {n}", f"p{n}@fabrikam.example")
    _setup(client, world)
    _sync(client, "full")
    assert {tuple(c["categories"]) for c in world.outlook()} == {(CAT,)}
    first = world.outlook()[0]
    _graph(world).user_update_contact(ALICE, world.folder_id(), first["id"], categories=[CAT, "VIP"])

    _put(client, category="Kunder")
    report = _sync(client)
    assert report["counts"]["outlookUpdated"] == 3
    seen = {c["id"]: c["categories"] for c in world.outlook()}
    assert seen.pop(first["id"]) == ["VIP", "Kunder"] and set(map(tuple, seen.values())) == {("Kunder",)}
    assert "Kunder" in {c["displayName"] for c in _graph(world).master_categories(ALICE)}
    assert _writes(_sync(client)) == 0

    _put(client, category=None)
    _sync(client)
    seen = {c["id"]: c["categories"] for c in world.outlook()}
    assert seen.pop(first["id"]) == ["VIP"] and set(map(tuple, seen.values())) == {()}
    assert _writes(_sync(client)) == 0
    assert client("GET", f"users/{ALICE}").json()["category"] is None


def test_without_mailbox_settings_permission_the_category_is_still_set_and_the_report_says_so_once(
    client, world
):
    world.person("Ann Lee", "ann@fabrikam.example")
    _setup(client, world, grant_categories=False, folderName=None)
    report = _sync(client, "full")
    notes = [i for i in report["items"] if i["action"] == "note"]
    assert len(notes) == 1 and "MailboxSettings.ReadWrite" in notes[0]["reason"]
    [contact] = [c for c in _default(world) if tag(c)]
    assert contact["categories"] == [CAT]
    assert CAT not in {c["displayName"] for c in _graph(world).master_categories(ALICE)}
    world.person("Bo Berg", "bo@fabrikam.example")
    report = _sync(client)
    assert report["counts"]["outlookCreated"] == 1
    assert not [i for i in report["items"] if i["action"] == "note"]


def test_settings_validation_names_the_problem_and_changes_nothing(client, world):
    _setup(client, world, folderName="Kunder")
    for body, field in (({"folderName": ""}, "folderName"), ({"category": "a,b"}, "category")):
        resp = client("PUT", f"users/{ALICE}", body)
        assert resp.status_code == 400 and field in resp.text
    assert client("GET", f"users/{ALICE}").json()["folderName"] == "Kunder"


def test_the_connection_check_names_the_missing_category_permission(client, world):
    _setup(client, world, grant_categories=False)
    checks = {c["name"]: c for c in client("POST", f"users/{ALICE}/validate").json()["checks"]}
    check = checks["categoryPermission"]
    assert not check["ok"] and "403" in check["message"] and "MailboxSettings.ReadWrite" in check["message"]
    assert checks["contactsPermission"]["ok"]


def test_a_contact_the_user_sent_to_bc_that_the_filter_leaves_out_stays_in_their_folder(client, world):
    """In the default folder, a contact given the category goes to BC; when BC's record falls outside
    the user's filter it is not deleted (it is theirs): the sync's tag and category come off."""
    _setup(client, world, folderName=None, filter={"city": "Oslo"})
    _sync(client, "full")
    nina = _own(world, "New Nina", "nina@customer.example", categories=["VIP", CAT])
    report = _sync(client)
    assert report["counts"]["bcCreated"] == 1 and report["counts"]["outlookDeleted"] == 0
    kept = _by_id(world)[nina["id"]]
    assert not tag(kept) and kept["categories"] == ["VIP"]
    assert "nina@customer.example" in world.bc_by_email()
    assert _writes(_sync(client)) == 0


def test_many_private_contacts_cost_one_listing_not_a_tag_read_each(client, world):
    """A full run reads the tags of the default folder's untagged contacts with one listing (1,000 a
    page) instead of 5 `$batch` reads of 20 for these 100."""
    world.person("Ann Lee", "ann@fabrikam.example")
    _setup(client, world, folderName=None)
    for n in range(100):
        _own(world, f"Private {n}", f"friend{n}@home.example")
    report = _sync(client, "full")
    assert report["counts"]["outlookCreated"] == 1
    # the default folder's id (no subfolder: asked of the folders, then of the contacts), delta,
    # listing, category, one write batch, the settling delta round; reading the tags by id would add 4
    assert report["requests"]["graph"] <= 7, report["requests"]
    assert _writes(_sync(client, "full")) == 0
