"""Several companies (BEHAVIOUR §5.4) in the default Contacts folder with the sync's categories (§4.8),
and photos (§4.6) on a contact the sync adopted there, end to end through the HTTP API.

The two designs meet here: each company's contacts carry that company's category (`category_of`), the
user's own contacts in the default folder reach Business Central only when they carry one of those
categories (and then the company whose category it is), adoption and release work per company with
that company's tag form, and a BC picture reaches a contact the user had before the sync adopted it.
"""

from __future__ import annotations

from typing import Any

import pytest

from sandbox.images import make_jpeg
from shared.model import WRITE_ACTIONS
from tests.world import World, tag

ALICE = "alice@contoso.example"
CRONUS_CAT = "CRONUS contacts"
FABRIKAM = "Fabrikam, Inc."  # the second company's display name: its default category


def _put(client, settings: dict[str, Any]) -> None:
    resp = client("PUT", f"users/{ALICE}", settings)
    assert resp.status_code in (200, 201), resp.text


def _sync(client, mode: str = "incremental") -> dict[str, Any]:
    resp = client("POST", "sync", {"user": ALICE, "mode": mode})
    assert resp.status_code == 200, resp.text
    report: dict[str, Any] = resp.json()
    assert report["status"] == "succeeded", report
    return report


def _writes(report: dict[str, Any]) -> int:
    return sum(report["counts"][key] for key in WRITE_ACTIONS)


def _default(world: World) -> dict[str, dict[str, Any]]:
    """The default Contacts folder's contacts by email (the first address), or by name without one."""
    out = {}
    for contact in world.cloud.graph.folder_contacts(ALICE, None):
        emails = contact.get("emailAddresses") or []
        out[str(emails[0]["address"]).lower() if emails else contact["displayName"]] = contact
    return out


def _own(world: World, name: str, email: str, **fields: Any) -> dict[str, Any]:
    """A contact the user keeps in their default Contacts folder."""
    data = {"displayName": name, "emailAddresses": [{"address": email, "name": name}], **fields}
    return world.cloud.graph.user_create_contact(ALICE, None, data)


def _bc_emails(world: World, company: str) -> set[str]:
    return {str(c.get("email") or "").lower() for c in world.cloud.bc.contacts(company)}


@pytest.fixture
def two(world):
    """CRONUS (the world's company) and Fabrikam, with people in each; Alice in the default folder."""
    fabrikam = world.second_company(ned_title="CEO")
    world.cloud.graph.add_mailbox(ALICE)
    settings = {
        "folderName": None,
        "companies": [
            {"companyId": world.company, "filter": {"city": "Oslo"}, "category": CRONUS_CAT},
            {"companyId": fabrikam, "filter": {"jobTitle": "CEO"}},  # category: its display name
        ],
    }
    return world, world.company, fabrikam, settings


def test_two_companies_in_the_default_folder_each_with_its_own_category(client, two):
    """Each company's contacts carry its own category; the user's contact with a Fabrikam contact's
    email is adopted into Fabrikam (tagged `{companyId}/{bcId}`) and, when BC deletes that contact,
    released: tag and Fabrikam's category off, the user's own category kept, the contact kept."""
    world, _, fabrikam, settings = two
    mine = _own(world, "Ned N.", "ned@fabrikam.example", categories=["Golf"])
    _put(client, settings)

    report = _sync(client, "full")

    assert report["counts"]["outlookCreated"] == 2 and report["counts"]["linked"] == 1, report
    assert not world.cloud.graph.folders(ALICE), "no subfolder for a default-folder user"
    folder = _default(world)
    assert sorted(folder) == ["fay@fabrikam.example", "ned@fabrikam.example", "ola@cronus.example"]
    assert folder["ola@cronus.example"]["categories"] == [CRONUS_CAT]
    assert folder["fay@fabrikam.example"]["categories"] == [FABRIKAM]
    adopted = folder["ned@fabrikam.example"]
    assert adopted["id"] == mine["id"] and adopted["categories"] == ["Golf", FABRIKAM]
    ned = next(c for c in world.cloud.bc.contacts(fabrikam) if c["email"] == "ned@fabrikam.example")
    assert tag(adopted) == f"{fabrikam}/{ned['id']}"
    assert tag(folder["ola@cronus.example"]) != "" and "/" not in str(tag(folder["ola@cronus.example"]))
    masters = {c["displayName"] for c in world.cloud.graph.master_categories(ALICE)}
    assert {CRONUS_CAT, FABRIKAM} <= masters
    assert _writes(_sync(client)) == 0 and _writes(_sync(client, "full")) == 0

    world.cloud.bc.delete_contact(fabrikam, ned["id"])
    released = _sync(client)
    assert [i["action"] for i in released["items"] if i["outlookId"] == mine["id"]] == ["released"]
    assert [i.get("company") for i in released["items"] if i["outlookId"] == mine["id"]] == [FABRIKAM]
    kept = _default(world)["ned@fabrikam.example"]
    assert kept["id"] == mine["id"] and not tag(kept) and kept["categories"] == ["Golf"]
    assert _writes(_sync(client)) == 0


def test_a_private_contact_reaches_the_company_whose_category_it_carries_and_none_without(client, two):
    """pullNewFromOutlook in the default folder with `companies`: a contact the user gives the second
    company's category is created in that company; one with neither company's category (a category
    of their own, or none) never reaches Business Central, nor the report."""
    world, cronus, fabrikam, settings = two
    _put(client, settings)
    _sync(client, "full")
    for_fabrikam = _own(world, "Pia Prospect", "pia@prospect.example", jobTitle="CEO", categories=[FABRIKAM])
    private = _own(world, "Dentist", "clinic@dentist.example", jobTitle="CEO", categories=["Health"])
    plain = _own(world, "Neighbour", "nabo@home.example", jobTitle="CEO")

    report = _sync(client)

    assert report["counts"]["bcCreated"] == 1, report
    assert "pia@prospect.example" in _bc_emails(world, fabrikam)
    assert "pia@prospect.example" not in _bc_emails(world, cronus)
    for email in ("clinic@dentist.example", "nabo@home.example"):
        assert email not in _bc_emails(world, fabrikam) | _bc_emails(world, cronus)
    reported = {i["outlookId"] for i in report["items"]}
    assert for_fabrikam["id"] in reported and not reported & {private["id"], plain["id"]}
    pia = _default(world)["pia@prospect.example"]
    bc_pia = next(c for c in world.cloud.bc.contacts(fabrikam) if c["email"] == "pia@prospect.example")
    assert tag(pia) == f"{fabrikam}/{bc_pia['id']}" and pia["categories"] == [FABRIKAM]
    assert _default(world)["clinic@dentist.example"]["categories"] == ["Health"]
    assert not tag(_default(world)["nabo@home.example"])
    assert _writes(_sync(client)) == 0


def test_a_top_level_category_with_companies_is_refused(client, two):
    """Each company names its own category: a top-level one beside `companies` would be ambiguous."""
    settings = two[3]
    resp = client("PUT", f"users/{ALICE}", {**settings, "category": "Business Central"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["field"] == "companies" and "category" in error["message"], error
    _put(client, {**settings, "category": None})  # null says nothing: accepted
    assert client("GET", f"users/{ALICE}").json()["category"] is None


def test_photos_reach_a_contact_adopted_in_the_default_folder(client, world):
    """syncPhotos with folderName null: the user's own contact, adopted by email, gets BC's picture."""
    ada = world.person("Ada Lovelace", "ada@example.com")
    picture = make_jpeg(120, 120, padding=300)
    world.cloud.bc.set_picture(world.company, ada["id"], picture)
    world.cloud.graph.add_mailbox(ALICE)
    mine = _own(world, "Ada L.", "ada@example.com", categories=["Friends"])
    _put(client, {"folderName": None, "syncPhotos": True})

    report = _sync(client, "full")

    assert report["counts"]["linked"] == 1 and report["photos"]["toOutlook"] == 1, report
    assert world.cloud.graph.contact_photo(ALICE, mine["id"]) == picture
    adopted = _default(world)["ada@example.com"]
    assert tag(adopted) == ada["id"] and adopted["categories"] == ["Friends", "Business Central"]
    again = _sync(client)
    assert _writes(again) == 0 and again["photos"]["toOutlook"] == 0


def test_moving_a_companies_user_into_the_default_folder_moves_each_companys_contacts(client, two):
    """folderName from a subfolder to null: every company's contacts are copied into the default
    folder (tags in their company's form) and then deleted from the subfolder; nothing doubles."""
    world, _, fabrikam, settings = two
    _put(client, {**settings, "folderName": "Business Central"})
    _sync(client, "full")
    [sub] = world.cloud.graph.folders(ALICE)
    before = sorted(str(tag(c)) for c in world.cloud.graph.folder_contacts(ALICE, sub["id"]))
    assert len(before) == 3 and any(t.startswith(f"{fabrikam}/") for t in before)

    _put(client, settings)
    moved = _sync(client)

    assert moved["mode"] == "full" and moved["counts"]["outlookDeleted"] == 3, moved
    assert not world.cloud.graph.folder_contacts(ALICE, sub["id"])
    folder = _default(world)
    assert sorted(str(tag(c)) for c in folder.values()) == before
    assert folder["fay@fabrikam.example"]["categories"] == [FABRIKAM]
    assert folder["ola@cronus.example"]["categories"] == [CRONUS_CAT]
    assert _writes(_sync(client)) == 0 and _writes(_sync(client, "full")) == 0
