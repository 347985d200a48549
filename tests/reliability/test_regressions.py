"""Defects the reliability suite found, each pinned by the smallest scenario that shows it."""

from __future__ import annotations

from tests.reliability.checks import assert_converged, folder_of
from tests.reliability.conftest import batch_envelope
from tests.world import tag, writes

ALICE = "alice@contoso.example"


def test_cleaning_up_a_duplicate_keeps_the_link_of_the_contact_that_stays(world):
    """Deleting a second Outlook copy of a BC contact used to delete the BC contact's link as well, so
    the copy that stayed was orphaned and the next BC change created yet another copy."""
    world.user()
    person = world.person("Dora Duplicate", city="Oslo")
    world.sync(mode="full")
    [synced] = world.outlook()
    copy = {k: synced[k] for k in ("displayName", "emailAddresses")}
    copy["singleValueExtendedProperties"] = synced["singleValueExtendedProperties"]
    world.cloud.graph.user_create_contact(ALICE, world.folder_id(), copy)  # e.g. restored from a backup
    report = world.sync(mode="full")
    assert report.counts["outlookDeleted"] == 1
    assert [c["id"] for c in world.outlook()] == [synced["id"]]
    assert world.services.store.get_links(ALICE)[person["id"]].outlook_id == synced["id"]
    world.cloud.bc.edit_contact(world.company, person["id"], jobTitle="Chief Buyer")
    report = world.sync()
    assert report.counts["outlookUpdated"] == 1 and report.counts["outlookCreated"] == 0
    assert [(c["id"], c["jobTitle"]) for c in world.outlook()] == [(synced["id"], "Chief Buyer")]
    assert_converged(world, ALICE)


def test_new_outlook_contact_outside_the_filter_goes_to_bc_and_leaves_the_folder_in_the_same_run(world):
    """A contact the user adds to the folder is created in BC even when it does not match the user's
    filter; it then left the folder only on the *next* run, so a run right after a successful run
    wrote something (BEHAVIOUR §4.5 idempotence). Now the same run removes it and says why."""
    world.user(filter={"city": "Oslo"})
    world.sync(mode="full")
    world.cloud.graph.user_create_contact(
        ALICE,
        world.folder_id(),
        {"displayName": "No City", "emailAddresses": [{"address": "nocity@example.org"}]},
    )
    report = world.sync()
    assert report.status == "succeeded"
    assert report.counts["bcCreated"] == 1 and report.counts["outlookDeleted"] == 1
    [gone] = [i for i in report.items if i.action == "outlookDeleted"]
    assert "does not match your filter" in gone.reason
    assert "nocity@example.org" in world.bc_by_email()
    assert world.outlook() == []
    assert writes(world.sync()) == 0


def test_pulled_outlook_edit_that_leaves_the_filter_leaves_the_folder_in_the_same_run(world):
    world.user(filter={"city": "Oslo"}, pullEditsFromOutlook=True)
    person = world.person("Edna Edit", city="Oslo")
    world.sync(mode="full")
    [o] = world.outlook()
    world.cloud.graph.user_update_contact(
        ALICE, world.folder_id(), o["id"], businessAddress={"city": "Bergen"}
    )
    report = world.sync()
    assert report.counts["bcUpdated"] == 1 and report.counts["outlookDeleted"] == 1
    assert world.cloud.bc.get_contact(world.company, person["id"])["city"] == "Bergen"
    assert world.outlook() == []
    assert writes(world.sync()) == 0


def test_write_batch_answered_by_a_gateway_error_page_is_not_sent_again(world, taps):
    """A 502 HTML page after BC applied a `$batch` of creates: the client used to send the batch again
    and BC got every new contact twice. A write whose answer is a gateway's page is now ambiguous,
    like a 504, and is resolved by the next run by email instead of being repeated."""
    world.user()
    world.sync(mode="full")
    fid = folder_of(world, ALICE)
    for i in range(3):
        world.cloud.graph.user_create_contact(
            ALICE, fid, {"displayName": f"New {i}", "emailAddresses": [{"address": f"new{i}@example.org"}]}
        )
    taps["bc"].html_after_apply(batch_envelope)
    report = world.sync()
    assert report.status == "partial"
    assert all(len(v) == 1 for v in world.bc_by_email().values())
    assert world.sync().status == "succeeded"
    assert all(len(v) == 1 for v in world.bc_by_email().values()) and len(world.bc_contacts()) == 3
    assert all(tag(c) for c in world.outlook())
    assert_converged(world, ALICE)


def test_read_only_batch_is_retried_after_a_reset(world):
    """A `$batch` of GETs is as safe to repeat as a GET: a dropped connection no longer fails the run."""
    world.user()
    world.person("Rita Read")
    world.sync(mode="full")
    world.cloud.graph.user_create_contact(
        ALICE,
        world.folder_id(),
        {"displayName": "Fresh", "emailAddresses": [{"address": "fresh@example.org"}]},
    )
    world.cloud.graph.faults.reset(count=1, method="POST", in_batch=False)  # the tag lookup batch
    report = world.sync()
    assert report.status == "succeeded", report.message
    assert world.cloud.graph.faults.fired["reset"] == 1
    assert "fresh@example.org" in world.bc_by_email()


def _own_contact_then_bc_becomes_synced(world, **settings) -> None:
    world.user(**settings)
    company = world.cloud.bc.seed_contact(world.company, displayName="Ola Nordmann", email="ola@example.org")
    world.sync(mode="full")
    own = world.cloud.graph.user_create_contact(
        ALICE,
        world.folder_id(),
        {"displayName": "Ola N.", "emailAddresses": [{"address": "OLA@example.org"}]},
    )
    report = world.sync()
    assert [i.reason for i in report.items if i.outlookId == own["id"]], "the skip is reported"
    world.cloud.bc.edit_contact(world.company, company["id"], type="Person")
    report = world.sync()
    assert report.status == "succeeded"
    assert report.counts["outlookCreated"] == 0 and report.counts["linked"] == 1, report.counts
    [contact] = world.outlook()
    assert contact["id"] == own["id"] and tag(contact) == company["id"]
    assert contact["displayName"] == "Ola Nordmann"  # BC's data wins
    assert_converged(world, ALICE)


def test_own_outlook_contact_is_adopted_when_its_bc_contact_becomes_synced(world):
    """The user's own contact, skipped while its BC namesake was a Company, was left out of the next
    incremental delta; when the BC contact became a Person the run created a second Outlook contact
    with the same email. Now a run that would create reads the folder once and adopts instead."""
    _own_contact_then_bc_becomes_synced(world)


def test_own_outlook_contact_is_adopted_even_with_pull_new_off(world):
    """pullNewFromOutlook off stops sending new contacts to BC; it used to stop adoption by email too,
    so even a full run put a duplicate next to the user's own contact."""
    _own_contact_then_bc_becomes_synced(world, pullNewFromOutlook=False)


def test_own_contact_replacing_a_deleted_synced_one_is_adopted_not_duplicated(world):
    """The user deleted a synced contact and typed their own with the same email: the next run
    recreated BC's contact next to it (two contacts, one email). Now it adopts the user's contact."""
    world.user()
    person = world.person("Ada Lovelace", city="Oslo")
    world.sync(mode="full")
    [synced] = world.outlook()
    world.cloud.graph.user_delete_contact(ALICE, world.folder_id(), synced["id"])
    own = world.cloud.graph.user_create_contact(
        ALICE,
        world.folder_id(),
        {"displayName": "Ada L.", "emailAddresses": [{"address": " ADA.LOVELACE@example.com"}]},
    )
    report = world.sync()
    assert report.counts["outlookRecreated"] == 0 and report.counts["linked"] == 1, report.counts
    [contact] = world.outlook()
    assert contact["id"] == own["id"] and tag(contact) == person["id"]
    assert_converged(world, ALICE)


def test_contact_recreated_by_an_interrupted_run_is_adopted_not_recreated_again(world):
    """A run recreated a contact the user deleted, then died before linking it; the next run recreated
    it once more and deleted the first copy as a duplicate. Now it adopts the tagged copy."""
    world.user()
    world.person("Ada Lovelace", city="Oslo")
    world.sync(mode="full")
    [synced] = world.outlook()
    world.cloud.graph.user_delete_contact(ALICE, world.folder_id(), synced["id"])

    def crash(name: str) -> None:
        if name == "after_graph_batch":
            raise RuntimeError("simulated crash")

    assert world.sync(checkpoint=crash).status == "failed"
    [recreated] = world.outlook()
    report = world.sync()
    assert writes(report) == 0 and report.counts["linked"] == 1, report.counts  # no write at all
    assert [c["id"] for c in world.outlook()] == [recreated["id"]]
    assert_converged(world, ALICE)


def test_contact_recreated_with_a_recreated_folder_survives_a_lost_answer(world, taps):
    """The user deleted the sync folder; the run that recreated folder and contacts lost the answer of
    its write batch, so the links still pointed into the deleted folder. The next run took the
    recreated contacts for duplicates of those dead links and deleted them."""
    world.user()
    world.person("Fay First", city="Bergen")
    world.sync(mode="full")
    world.cloud.graph.user_delete_folder(ALICE, world.folder_id())
    world.person("Sam Second", city="Bergen")
    taps["graph"].html_after_apply(batch_envelope)
    assert world.sync().status == "partial"
    report = world.sync()
    assert report.status == "succeeded" and report.counts["outlookDeleted"] == 0, report.counts
    assert sorted(c["displayName"] for c in world.outlook()) == ["Fay First", "Sam Second"]
    assert_converged(world, ALICE)
