"""The guarantees of BEHAVIOUR §4.5 and the sync semantics of §4.3 to §4.4, each as a scenario."""

from __future__ import annotations

import pytest

from shared.sync import RunInProgress
from tests.world import tag, writes

ALICE = "alice@contoso.example"


def _seed(world, n: int, **fields):
    return [world.person(f"Person {i:03d} Sample", **fields) for i in range(n)]


def test_idempotent_a_run_right_after_a_run_writes_nothing(world):
    world.user()
    _seed(world, 30)
    world.sync(mode="full")
    world.cloud.reset_counters()
    for mode in ("incremental", "full"):
        report = world.sync(mode=mode)
        assert report.status == "succeeded"
        assert writes(report) == 0, report.counts
    graph_writes = sum(
        n
        for (method, _), n in world.cloud.graph.counters.items.items()
        if method in ("POST", "PATCH", "DELETE")
    )
    bc_writes = sum(
        n for (method, _), n in world.cloud.bc.counters.items.items() if method in ("POST", "PATCH", "DELETE")
    )
    assert (graph_writes, bc_writes) == (0, 0)


def test_noop_incremental_run_is_cheap(world):
    world.user()
    _seed(world, 50)
    world.sync(mode="full")
    world.sync()
    report = world.sync()
    assert report.requests["graph"] <= 3 and report.requests["bc"] <= 2, report.requests


def test_bc_deletion_and_filter_change_remove_from_outlook(world):
    world.user()
    people = _seed(world, 6, city="Oslo")
    world.sync(mode="full")
    world.cloud.bc.delete_contact(world.company, people[0]["id"])
    world.cloud.bc.edit_contact(world.company, people[1]["id"], type="Company")
    report = world.sync()
    assert report.counts["outlookDeleted"] == 2
    assert len(world.outlook()) == 4

    # Narrowing the filter removes what falls outside it (BEHAVIOUR §4.3.3) ...
    world.cloud.bc.edit_contact(world.company, people[2]["id"], city="Bergen")
    world.user(filter={"city": "Oslo"})
    report = world.sync()
    assert report.mode == "full"  # a settings change reconciles everything
    assert report.counts["outlookDeleted"] == 1
    assert sorted(c["displayName"] for c in world.outlook()) == [p["displayName"] for p in people[3:]]


def test_remove_from_outlook_off_keeps_contacts(world):
    world.user(removeFromOutlook=False)
    people = _seed(world, 3)
    world.sync(mode="full")
    world.cloud.bc.delete_contact(world.company, people[0]["id"])
    report = world.sync()
    assert report.counts["outlookDeleted"] == 0
    assert len(world.outlook()) == 3
    assert writes(world.sync(mode="full")) == 0


def test_outlook_edits_are_ignored_by_default_and_bc_wins_on_full(world):
    world.user()
    [p] = _seed(world, 1, jobTitle="Buyer")
    world.sync(mode="full")
    [o] = world.outlook()
    world.cloud.graph.user_update_contact(ALICE, world.folder_id(), o["id"], jobTitle="Edited in Outlook")
    report = world.sync()
    assert writes(report) == 0
    assert world.cloud.bc.get_contact(world.company, p["id"])["jobTitle"] == "Buyer"
    report = world.sync(mode="full")
    assert report.counts["outlookUpdated"] == 1
    assert world.outlook()[0]["jobTitle"] == "Buyer"


def test_pull_edits_from_outlook_pushes_edits_when_bc_is_unchanged(world):
    world.user(pullEditsFromOutlook=True)
    a, b = _seed(world, 2, jobTitle="Buyer")
    world.sync(mode="full")
    by_email = world.outlook_by_email()
    oa, ob = by_email[a["email"]], by_email[b["email"]]
    world.cloud.graph.user_update_contact(ALICE, world.folder_id(), oa["id"], jobTitle="Head Buyer")
    # b was edited on both sides: BC wins.
    world.cloud.graph.user_update_contact(ALICE, world.folder_id(), ob["id"], jobTitle="Outlook says")
    world.cloud.bc.edit_contact(world.company, b["id"], jobTitle="BC says")
    report = world.sync()
    assert report.counts["bcUpdated"] == 1 and report.counts["outlookUpdated"] == 1
    assert world.cloud.bc.get_contact(world.company, a["id"])["jobTitle"] == "Head Buyer"
    assert world.cloud.bc.get_contact(world.company, b["id"])["jobTitle"] == "BC says"
    assert world.outlook_by_email()[b["email"]]["jobTitle"] == "BC says"
    assert writes(world.sync()) == 0


def test_one_run_per_user_at_a_time(world):
    settings = world.user()
    lease = world.services.store.acquire_lease(ALICE, "someone-else", 60)
    with pytest.raises(RunInProgress) as err:
        world.sync(settings)
    assert err.value.run_id == "someone-else"
    world.services.store.release_lease(lease)
    assert world.sync(settings).status == "succeeded"


def test_mass_deletion_guard(world):
    world.user()
    people = _seed(world, 20)
    world.sync(mode="full")
    for p in people[:15]:
        world.cloud.bc.delete_contact(world.company, p["id"])
    report = world.sync()
    assert report.status == "safetyStop"
    assert "15 of 20" in report.message
    assert len(world.outlook()) == 20  # nothing removed
    assert world.sync().status == "safetyStop"  # the watermark did not move past the deletions
    report = world.sync(force=True)
    assert report.status == "succeeded" and report.counts["outlookDeleted"] == 15
    assert len(world.outlook()) == 5


def test_dry_run_writes_nothing_anywhere(world):
    world.user()
    _seed(world, 5)
    world.cloud.graph.add_mailbox("carol@contoso.example")
    store = world.services.store
    report = world.sync(mode="full", dry_run=True)
    assert report.dryRun and report.counts["outlookCreated"] == 5
    assert all(i.reason.startswith("dry run") for i in report.items if i.action == "outlookCreated")
    assert world.cloud.graph.folders(ALICE) == [] or all(
        f["displayName"] != "Business Central" for f in world.cloud.graph.folders(ALICE)
    )
    assert store.get_links(ALICE) == {}
    assert store.get_state(ALICE).etag is None
    assert store.current_lease(ALICE) is None
    world.sync(mode="full")
    before = {c["id"]: c["changeKey"] for c in world.outlook()}
    world.cloud.bc.edit_contact(world.company, world.bc_contacts()[0]["id"], jobTitle="Changed")
    report = world.sync(dry_run=True)
    assert report.counts["outlookUpdated"] == 1
    assert {c["id"]: c["changeKey"] for c in world.outlook()} == before


def test_throttling_inside_batches_is_retried(world):
    world.user()
    _seed(world, 45)
    # Every 7th write operation is throttled once with a short Retry-After; resets and 503s too.
    world.cloud.graph.faults.throttle(count=5, retry_after=0.05, method="POST", in_batch=True)
    world.cloud.graph.faults.error(503, count=2, retry_after=0.05, method="POST", in_batch=True)
    world.cloud.bc.faults.throttle(count=1, retry_after=0.05)
    report = world.sync(mode="full")
    assert report.status == "succeeded", [i.reason for i in report.items if i.action == "failed"]
    assert report.counts["outlookCreated"] == 45
    assert len(world.outlook_by_email()) == 45  # and no duplicates
    assert world.cloud.graph.faults.fired["429"] == 5


def test_lost_link_table_heals_without_duplicates(world):
    world.user()
    people = _seed(world, 12)
    world.sync(mode="full")
    store = world.services.store
    store.delete_links(ALICE, [p["id"] for p in people])
    state = store.get_state(ALICE)
    state.delta_link = None
    store.save_state(state)
    report = world.sync()
    assert report.mode == "full"
    assert report.counts["linked"] == 12 and report.counts["outlookCreated"] == 0
    assert len(world.outlook_by_email()) == 12
    assert writes(world.sync()) == 0


@pytest.mark.parametrize("point", ["after_graph_batch", "before_links", "before_watermark", "after_bc_batch"])
def test_crash_mid_run_then_resume_without_duplicates(world, point):
    world.user()
    _seed(world, 45)
    world.cloud.graph.user_create_folder(ALICE, "Business Central")
    fid = world.cloud.graph.find_folder(ALICE, "Business Central")["id"]
    world.cloud.graph.user_create_contact(
        ALICE, fid, {"displayName": "New Person", "emailAddresses": [{"address": "new@person.example"}]}
    )
    fired = []

    def crash(name: str) -> None:
        if name == point and not fired:
            fired.append(name)
            raise RuntimeError(f"simulated crash at {name}")

    report = world.sync(mode="full", checkpoint=crash)
    assert fired and report.status == "failed"
    assert world.services.store.current_lease(ALICE) is None  # a failed run releases its lease
    report = world.sync()
    assert report.status == "succeeded", report.to_json()
    contacts = world.outlook_by_email()  # asserts no duplicate emails
    assert len(contacts) == 46
    assert all(tag(c) for c in contacts.values())
    assert len(world.bc_by_email()["new@person.example"]) == 1
    assert writes(world.sync()) == 0


def test_expired_delta_token_resyncs_without_duplicates(world):
    world.user()
    _seed(world, 8)
    world.sync(mode="full")
    world.cloud.graph.expire_delta_tokens(ALICE)
    report = world.sync()
    assert report.status == "succeeded" and report.mode == "full"
    assert writes(report) == 0
    assert len(world.outlook_by_email()) == 8


def test_folder_deleted_by_the_user_is_recreated(world):
    world.user()
    _seed(world, 4)
    world.sync(mode="full")
    world.cloud.graph.user_delete_folder(ALICE, world.folder_id())
    report = world.sync()
    assert report.status == "succeeded"
    assert report.counts["outlookRecreated"] == 4
    assert len(world.outlook_by_email()) == 4
    assert [f["displayName"] for f in world.cloud.graph.folders(ALICE)].count("Business Central") == 1


def test_one_bad_contact_does_not_stop_the_others(world):
    world.user()
    world.sync(mode="full")
    fid = world.folder_id()
    world.cloud.graph.user_create_contact(
        ALICE,
        fid,
        {
            "displayName": "Bad Phone",
            "emailAddresses": [{"address": "bad@phone.example"}],
            "businessPhones": ["call me maybe"],
        },
    )
    world.cloud.graph.user_create_contact(
        ALICE, fid, {"displayName": "Good One", "emailAddresses": [{"address": "good@one.example"}]}
    )
    report = world.sync()
    assert report.counts["bcCreated"] == 1 and report.counts["skipped"] == 1
    [skipped] = [i for i in report.items if i.action == "skipped"]
    assert skipped.email == "bad@phone.example" and "letters" in skipped.reason
    assert "good@one.example" in world.bc_by_email()


def test_two_new_outlook_contacts_with_one_email_make_one_bc_contact(world):
    world.user()
    world.sync(mode="full")
    for name in ("Twin One", "Twin Two"):
        world.cloud.graph.user_create_contact(
            ALICE,
            world.folder_id(),
            {"displayName": name, "emailAddresses": [{"address": "twin@example.org"}]},
        )
    report = world.sync()
    assert report.counts["bcCreated"] == 1
    assert len(world.bc_by_email()["twin@example.org"]) == 1


def test_contact_created_then_deleted_after_an_interrupted_run_is_recreated(world):
    """A run stopped after writing but before saving its watermarks; the user then deletes a contact
    it created. Delta leaves out items created and deleted between two rounds, so only a full
    reconcile can see it is gone: the next run does one."""
    world.user()
    world.person("First Person")
    world.sync(mode="full")
    world.person("Second Person")

    def crash(name: str) -> None:
        if name == "before_watermark":
            raise RuntimeError("simulated crash")

    assert world.sync(checkpoint=crash).status == "failed"
    second = world.outlook_by_email()["second.person@example.com"]
    world.cloud.graph.user_delete_contact(ALICE, world.folder_id(), second["id"])
    report = world.sync()
    assert report.mode == "full" and report.counts["outlookRecreated"] == 1
    assert sorted(world.outlook_by_email()) == ["first.person@example.com", "second.person@example.com"]
    assert writes(world.sync()) == 0


def test_an_outlook_edit_made_while_the_run_writes_reaches_bc_on_the_next_run(world):
    """The run reads one more delta round after its writes to store a link past its own echoes; an edit
    the user made meanwhile, even on the echo's second page, must keep the start link so the next run
    sees it (pullEditsFromOutlook: the edit goes to BC), and nothing is written twice."""
    world.user(pullEditsFromOutlook=True)
    people = _seed(world, 250, jobTitle="Buyer")  # the echo of 250 creates is two delta pages

    def user_edits(name: str) -> None:
        if name == "before_watermark":  # the run's state, folder id included, is not saved yet
            folder = world.cloud.graph.find_folder(ALICE, "Business Central")["id"]
            mine = world.cloud.graph.folder_contacts(ALICE, folder)
            last = next(c for c in mine if c["emailAddresses"][0]["address"] == people[-1]["email"])
            world.cloud.graph.user_update_contact(ALICE, folder, last["id"], jobTitle="Head Buyer")

    first = world.sync(mode="full", checkpoint=user_edits)
    assert first.status == "succeeded" and first.counts["outlookCreated"] == 250
    report = world.sync()
    assert report.counts["bcUpdated"] == 1 and writes(report) == 1, report.counts
    assert world.cloud.bc.get_contact(world.company, people[-1]["id"])["jobTitle"] == "Head Buyer"
    assert writes(world.sync()) == 0
