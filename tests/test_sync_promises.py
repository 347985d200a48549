"""One scenario per promise of the user guide (BEHAVIOUR §1), through the engine against the sandbox.

Each test looks where a user would: the contacts in the Outlook folder, the contacts in BC, the
run report.
"""

from __future__ import annotations

from datetime import timedelta

from shared.model import utcnow
from tests.world import tag, writes

ALICE = "alice@contoso.example"
BOB = "bob@contoso.example"


def test_1_1_outlook_gets_the_same_information_as_bc(world):
    world.user()
    bc = world.person(
        "Ann Marie Smith",
        "ann@contoso.example",
        companyName="Contoso AS",
        jobTitle="Buyer",
        phoneNumber="+47 22 33 44 55",
        mobilePhoneNumber="+47 900 00 000",
        addressLine1="Storgata 1",
        addressLine2="Floor 3",
        city="Oslo",
        state="Oslo",
        postalCode="0150",
        country="NO",
        website="www.contoso.example",
    )
    report = world.sync(mode="full")
    assert report.status == "succeeded"
    [o] = world.outlook()
    assert o["displayName"] == "Ann Marie Smith"
    assert (o["givenName"], o["surname"]) == ("Ann Marie", "Smith")
    assert o["emailAddresses"][0]["address"] == "ann@contoso.example"
    assert o["companyName"] == "Contoso AS"
    assert o["jobTitle"] == "Buyer"
    assert o["businessPhones"] == ["+47 22 33 44 55"]
    assert o["mobilePhone"] == "+47 900 00 000"
    assert o["businessAddress"] == {
        "street": "Storgata 1\r\nFloor 3",
        "city": "Oslo",
        "state": "Oslo",
        "postalCode": "0150",
        "countryOrRegion": "Norway",  # the name from BC's Country/Region table for code NO
    }
    assert o["businessHomePage"] == "www.contoso.example"
    assert tag(o) == bc["id"]


def test_1_2_default_folder_is_business_central_and_can_be_renamed(world):
    world.user()
    world.person("Kari Nordmann")
    world.sync(mode="full")
    names = [f["displayName"] for f in world.cloud.graph.folders(ALICE)]
    assert names.count("Business Central") == 1
    folder_id = world.folder_id()

    world.user(folderName="CRM contacts")
    report = world.sync()
    assert report.status == "succeeded"
    names = [f["displayName"] for f in world.cloud.graph.folders(ALICE)]
    assert "CRM contacts" in names and "Business Central" not in names
    assert world.folder_id() == folder_id  # renamed, not a second folder
    assert [c["displayName"] for c in world.outlook()] == ["Kari Nordmann"]
    assert writes(report) == 0


def test_1_3_filters_choose_which_contacts_go_to_outlook(world):
    world.user(filter={"companyName": "Contoso*|Fabrikam", "city": "<>Oslo"})
    world.person("In Scope", companyName="Contoso AS", city="Bergen")
    world.person("Also In", companyName="Fabrikam", city="Trondheim")
    world.person("Wrong City", companyName="Contoso AS", city="Oslo")
    world.person("Wrong Company", companyName="Adatum", city="Bergen")
    report = world.sync(mode="full")
    assert sorted(c["displayName"] for c in world.outlook()) == ["Also In", "In Scope"]
    reasons = {i.email: i.reason for i in report.items if i.action == "skipped"}
    assert reasons["wrong.city@example.com"] == "does not match your filter"


def test_1_4_connection_can_be_validated(world):
    from shared.validate import validate_user

    settings = world.user()
    result = validate_user(world.services, settings)
    assert result["ok"], result
    assert {c["name"] for c in result["checks"]} == {
        "bcToken",
        "graphToken",
        "bcCompany",
        "bcFields",
        "bcWebhooks",
        "mailbox",
        "contactsPermission",
        "categoryPermission",  # the sync's Outlook category (BEHAVIOUR §4.8)
    }

    # A secret revoked after a token was cached is still caught.
    world.cloud.entra.revoke_secret(world.cloud.tenant_id, world.cloud.client_id)
    result = validate_user(world.services, settings)
    token_check = next(c for c in result["checks"] if c["name"] == "bcToken")
    assert not token_check["ok"] and "invalid_client" in token_check["message"]
    assert world.cloud.client_secret not in str(result)
    world.cloud.entra.add_secret(world.cloud.tenant_id, world.cloud.client_id, world.cloud.client_secret)

    world.cloud.bc.unregister_entra_app(world.cloud.client_id)
    result = validate_user(world.services, settings)
    bc_check = next(c for c in result["checks"] if c["name"] == "bcCompany")
    assert not result["ok"] and not bc_check["ok"]
    assert "Microsoft Entra Applications" in bc_check["message"]


def test_1_5_each_colleague_has_their_own_sync_and_filters(world):
    world.user(ALICE, filter={"city": "Oslo"})
    world.user(BOB, filter={"city": "Bergen"}, folderName="Kunder")
    world.person("Oslo Person", city="Oslo")
    world.person("Bergen Person", city="Bergen")
    assert world.sync(ALICE, mode="full").status == "succeeded"
    assert world.sync(BOB, mode="full").status == "succeeded"
    assert [c["displayName"] for c in world.outlook(ALICE)] == ["Oslo Person"]
    assert [c["displayName"] for c in world.outlook(BOB)] == ["Bergen Person"]
    assert [f["displayName"] for f in world.cloud.graph.folders(BOB)].count("Kunder") == 1


def test_1_7_incremental_moves_changes_and_full_moves_everything(world):
    world.user()
    a = world.person("Anna Hansen")
    world.person("Lars Olsen")
    world.sync(mode="full")

    world.cloud.bc.edit_contact(world.company, a["id"], jobTitle="CEO")
    report = world.sync()
    assert report.mode == "incremental"
    assert report.counts["outlookUpdated"] == 1 and writes(report) == 1
    assert world.outlook_by_email()["anna.hansen@example.com"]["jobTitle"] == "CEO"

    # A change stamped long before the watermark (beyond the overlap window) escapes "Sync" but not "Full sync".
    world.cloud.bc.edit_contact(world.company, a["id"], jobTitle="Chair")
    world.cloud.bc.set_last_modified(world.company, a["id"], utcnow() - timedelta(days=3))
    assert writes(world.sync()) == 0
    full = world.sync(mode="full")
    assert full.mode == "full" and full.counts["outlookUpdated"] == 1
    assert world.outlook_by_email()["anna.hansen@example.com"]["jobTitle"] == "Chair"


def test_1_7_new_outlook_contacts_come_into_bc(world):
    world.user()
    world.person("Existing One")
    world.sync(mode="full")
    world.cloud.graph.user_create_contact(
        ALICE,
        world.folder_id(),
        {
            "givenName": "Olav",
            "surname": "Trygg",
            "displayName": "Olav Trygg",
            "emailAddresses": [{"address": "olav@trygg.example", "name": "Olav Trygg"}],
            "mobilePhone": "+47 912 34 567",
        },
    )
    report = world.sync()
    assert report.counts["bcCreated"] == 1
    [created] = world.bc_by_email()["olav@trygg.example"]
    assert created["type"] == "Person" and created["displayName"] == "Olav Trygg"
    assert created["mobilePhoneNumber"] == "+47 912 34 567"
    # The Outlook contact now carries its BC id, and nothing is left to do.
    assert tag(world.outlook_by_email()["olav@trygg.example"]) == created["id"]
    assert writes(world.sync()) == 0


def test_1_8_required_fields(world):
    world.user()
    world.person("Has Everything")
    world.cloud.bc.seed_contact(world.company, type="Person", displayName="No Email")
    world.cloud.bc.seed_contact(
        world.company, type="Company", displayName="Some Company", email="post@co.example"
    )
    world.person("Blocked Person", privacyBlocked=True)
    report = world.sync(mode="full")
    assert [c["displayName"] for c in world.outlook()] == ["Has Everything"]
    reasons = sorted(i.reason for i in report.items if i.action == "skipped")
    assert any("email" in r for r in reasons)
    assert any("Company" in r for r in reasons)
    assert any("privacy" in r.lower() for r in reasons)

    # An Outlook contact without an email (or a name) does not come into BC.
    world.cloud.graph.user_create_contact(ALICE, world.folder_id(), {"displayName": "Nameonly Person"})
    world.cloud.graph.user_create_contact(
        ALICE, world.folder_id(), {"emailAddresses": [{"address": "noname@example.org"}]}
    )
    before = len(world.bc_contacts())
    report = world.sync()
    assert len(world.bc_contacts()) == before
    assert report.counts["skipped"] == 2 and report.counts["bcCreated"] == 0


def test_1_9_bc_is_the_source_of_truth_for_duplicates(world):
    world.user()
    bc = world.person("Real Name", "dup@example.com", jobTitle="From BC")
    folder = world.cloud.graph.user_create_folder(ALICE, "Business Central")
    world.cloud.graph.user_create_contact(
        ALICE,
        folder["id"],
        {
            "displayName": "Outlook Spelling",
            "emailAddresses": [{"address": "  DUP@Example.com "}, {"address": "private@home.example"}],
            "jobTitle": "From Outlook",
        },
    )
    report = world.sync(mode="full")
    assert report.counts["linked"] == 1 and report.counts["bcCreated"] == 0
    assert len(world.bc_by_email()["dup@example.com"]) == 1  # no duplicate in BC
    [o] = world.outlook()
    assert o["displayName"] == "Real Name" and o["jobTitle"] == "From BC"  # BC's information kept
    assert [e["address"] for e in o["emailAddresses"]] == ["dup@example.com", "private@home.example"]
    assert tag(o) == bc["id"]
    assert writes(world.sync()) == 0


def test_1_10_contact_deleted_in_outlook_is_recreated(world):
    world.user()
    world.person("Keep Me")
    world.sync(mode="full")
    [o] = world.outlook()
    world.cloud.graph.user_delete_contact(ALICE, world.folder_id(), o["id"])
    report = world.sync()
    assert report.counts["outlookRecreated"] == 1
    [again] = world.outlook()
    assert again["displayName"] == "Keep Me" and again["id"] != o["id"]
    assert writes(world.sync()) == 0


def test_1_11_a_user_without_a_mailbox_fails_clearly_and_others_complete(world):
    from shared.model import UserSettings
    from shared.sync import run_users

    world.user(ALICE)
    ghost = world.services.store.put_settings(UserSettings(user="ghost@contoso.example"))
    world.person("Someone Here")
    reports = {
        r.user: r for r in run_users(world.services, [ghost, world.services.store.get_settings(ALICE)])
    }
    assert reports[ALICE].status == "succeeded"
    assert reports["ghost@contoso.example"].status == "failed"
    assert "mailbox" in reports["ghost@contoso.example"].message.lower()
    assert [c["displayName"] for c in world.outlook(ALICE)] == ["Someone Here"]
