"""Scenarios on a Business Central that is as strict as a real tenant (issue 10, BC data rules),
driven end to end through the HTTP API as an admin or a Power Automate flow would: a BC version
without jobTitle, countries as codes in BC and names in Outlook, a Norwegian company whose error
messages are not English, and an Outlook edit of a person whose company was renamed since.

Each asserts what a user sees: every contact once on each side, nothing blanked or lost, the run not
failed, and a next run that writes nothing.
"""

from __future__ import annotations

from typing import Any

from shared.model import WRITE_ACTIONS
from tests.world import World

ALICE = "alice@contoso.example"


def setup_user(client: Any, world: World, **settings: Any) -> None:
    """Alice's mailbox and her settings, as an admin adds a salesperson."""
    world.cloud.graph.add_mailbox(ALICE)
    put_settings(client, **settings)


def put_settings(client: Any, **settings: Any) -> None:
    resp = client("PUT", f"users/{ALICE}", settings)
    assert resp.status_code in (200, 201), resp.text


def sync(client: Any, mode: str = "incremental") -> dict[str, Any]:
    resp = client("POST", "sync", {"user": ALICE, "mode": mode})
    assert resp.status_code == 200, resp.text
    return resp.json()


def assert_settled(client: Any) -> None:
    """A next run (incremental, then a full reconcile) writes nothing."""
    for mode in ("incremental", "full"):
        report = sync(client, mode)
        assert report["status"] == "succeeded", report
        assert sum(report["counts"][k] for k in WRITE_ACTIONS) == 0, (mode, report["counts"], report["items"])


def outlook(world: World) -> dict[str, dict[str, Any]]:
    """The sync folder by email; each email at most once."""
    out: dict[str, dict[str, Any]] = {}
    for c in world.outlook(ALICE):
        email = c["emailAddresses"][0]["address"].lower()
        assert email not in out, f"duplicate Outlook contact for {email}"
        out[email] = c
    return out


def bc(world: World) -> dict[str, dict[str, Any]]:
    """BC's persons by email; each email at most once."""
    out: dict[str, dict[str, Any]] = {}
    for c in world.bc_contacts():
        if c["type"] == "Person":
            assert c["email"].lower() not in out, f"duplicate BC contact for {c['email']}"
            out[c["email"].lower()] = c
    return out


def new_outlook_contact(world: World, name: str, email: str, **fields: Any) -> dict[str, Any]:
    folder = world.folder_id(ALICE)
    return world.cloud.graph.user_create_contact(
        ALICE, folder, {"displayName": name, "emailAddresses": [{"address": email}], **fields}
    )


def checks(client: Any) -> dict[str, dict[str, Any]]:
    resp = client("POST", f"users/{ALICE}/validate")
    assert resp.status_code == 200, resp.text
    return {c["name"]: c for c in resp.json()["checks"]}


def test_a_bc_version_without_job_title_syncs_the_rest_and_keeps_outlook_job_titles(client, world):
    world.cloud.bc.contact_fields_absent = frozenset({"jobTitle"})
    world.person("Kari Nordmann", "kari@example.com", city="Oslo")
    setup_user(client, world, pullNewFromOutlook=True)
    check = checks(client)["bcFields"]
    assert check["ok"] and "jobTitle" in check["message"]

    first = sync(client, "full")
    assert first["status"] == "succeeded" and first["counts"]["outlookCreated"] == 1, first
    new_outlook_contact(world, "Per Hansen", "per@example.com", jobTitle="CTO", companyName="")
    second = sync(client)
    assert second["status"] == "succeeded" and second["counts"]["bcCreated"] == 1, second

    people, folder = bc(world), outlook(world)
    assert set(people) == set(folder) == {"kari@example.com", "per@example.com"}
    assert folder["per@example.com"]["jobTitle"] == "CTO"  # BC cannot hold it; Outlook keeps it
    assert folder["kari@example.com"]["businessAddress"]["city"] == "Oslo"
    assert_settled(client)
    assert outlook(world)["per@example.com"]["jobTitle"] == "CTO"

    # A filter on the field this version lacks is an actionable error for this user, not a crash.
    put_settings(client, pullNewFromOutlook=True, filter={"jobTitle": "CTO"})
    check = checks(client)["bcFields"]
    assert not check["ok"] and "remove jobTitle" in check["message"]
    failed = sync(client)
    assert failed["status"] == "failed" and "jobTitle" in failed["message"], failed
    assert "Traceback" not in failed["message"]
    assert set(outlook(world)) == {"kari@example.com", "per@example.com"}  # nothing removed


def test_countries_are_codes_in_bc_and_names_in_outlook_without_a_change_loop(client, world):
    world.person("Kari Nordmann", "kari@example.com", country="NO")
    setup_user(client, world, pullNewFromOutlook=True)
    assert sync(client, "full")["status"] == "succeeded"
    assert outlook(world)["kari@example.com"]["businessAddress"]["countryOrRegion"] == "Norway"

    new_outlook_contact(
        world, "Sven Svensson", "sven@example.com", businessAddress={"countryOrRegion": "sweden"}
    )
    new_outlook_contact(world, "Dina Dane", "dina@example.com", businessAddress={"countryOrRegion": "dk"})
    new_outlook_contact(
        world, "Atle Atlantis", "atle@example.com", businessAddress={"countryOrRegion": "Atlantis"}
    )
    report = sync(client)
    assert report["status"] == "succeeded" and report["counts"]["bcCreated"] == 3, report
    people = bc(world)
    assert {e: people[e]["country"] for e in people} == {
        "kari@example.com": "NO",
        "sven@example.com": "SE",
        "dina@example.com": "DK",
        "atle@example.com": "",
    }
    [atle] = [i for i in report["items"] if i["email"] == "atle@example.com"]
    assert atle["action"] == "bcCreated" and "country 'Atlantis'" in atle["reason"]
    folder = outlook(world)
    assert set(folder) == set(people)
    assert folder["sven@example.com"]["businessAddress"]["countryOrRegion"].lower() == "sweden"
    assert folder["atle@example.com"]["businessAddress"]["countryOrRegion"] == "Atlantis"  # not blanked
    assert_settled(client)

    # BC -> Outlook after a change in BC, and back again without a loop.
    world.cloud.bc.edit_contact(world.company, people["atle@example.com"]["id"], country="IS")
    assert sync(client)["counts"]["outlookUpdated"] == 1
    assert outlook(world)["atle@example.com"]["businessAddress"]["countryOrRegion"] == "Iceland"
    assert_settled(client)


def test_a_norwegian_company_unknown_company_names_are_left_out_before_writing(client, world):
    world.cloud.bc.set_company_language(world.company, "nb-NO")
    world.cloud.bc.seed_contact(world.company, type="Company", displayName="Fabrikam AS")
    setup_user(client, world, pullNewFromOutlook=True)
    assert sync(client, "full")["status"] == "succeeded"
    new_outlook_contact(world, "Ola Nordmann", "ola@example.com", companyName="fabrikam as")
    new_outlook_contact(world, "Kari Ukjent", "kari@example.com", companyName="Ukjent Firma AS")
    report = sync(client)
    assert report["status"] == "succeeded" and report["counts"]["bcCreated"] == 2, report
    assert report["counts"]["failed"] == 0
    people = bc(world)
    assert people["ola@example.com"]["companyName"] == "Fabrikam AS"
    assert people["ola@example.com"]["companyNumber"] != ""
    assert people["kari@example.com"]["companyName"] == ""
    [kari] = [i for i in report["items"] if i["email"] == "kari@example.com"]
    assert "company 'Ukjent Firma AS' is not a company contact" in kari["reason"]
    assert set(outlook(world)) == set(people)
    assert_settled(client)


def test_an_outlook_edit_lands_in_bc_although_unchanged_values_are_ones_bc_now_refuses(client, world):
    """BC validates every property a PATCH names. Here two unchanged values would fail: the company
    name (its company contact was renamed since) and a phone number imported with letters. Only the
    edited field is sent, so the edit lands."""
    company = world.cloud.bc.seed_contact(world.company, type="Company", displayName="Fabrikam Ltd")
    person = world.person(
        "Ola Nordmann", "ola@example.com", companyName="Fabrikam Ltd", phoneNumber="22 ext. 12"
    )
    assert person["companyNumber"] == company["number"]
    # Imported without the link to its company contact, as migrated data often is.
    world.cloud.bc.edit_contact(world.company, person["id"], companyNumber="")
    setup_user(client, world, pullEditsFromOutlook=True)
    assert sync(client, "full")["status"] == "succeeded"
    [o] = world.outlook(ALICE)
    assert (o["companyName"], o["businessPhones"]) == ("Fabrikam Ltd", ["22 ext. 12"])

    # The company is renamed in BC: the person's company name is no longer one BC accepts.
    world.cloud.bc.edit_contact(world.company, company["id"], displayName="Fabrikam AS")
    world.cloud.graph.user_update_contact(ALICE, world.folder_id(ALICE), o["id"], jobTitle="Buyer")
    report = sync(client)
    assert report["status"] == "succeeded" and report["counts"]["bcUpdated"] == 1, report
    ola = bc(world)["ola@example.com"]
    assert (ola["jobTitle"], ola["companyName"], ola["phoneNumber"]) == (
        "Buyer",
        "Fabrikam Ltd",
        "22 ext. 12",
    )
    folder = outlook(world)
    assert set(folder) == {"ola@example.com"} and folder["ola@example.com"]["jobTitle"] == "Buyer"
    assert folder["ola@example.com"]["companyName"] == "Fabrikam Ltd"
    assert_settled(client)
