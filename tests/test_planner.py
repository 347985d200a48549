"""The sync rules, tested where they live: hand-built snapshots in, the planner's decision out.

`shared/planner.py` is pure, so its rules (BEHAVIOUR §4.3) are checked here without Azurite or the
sandbox: one row per case of the decision table in `plan()`'s docstring, one per answer of
`needs()`, and the decision after a BC write. The end-to-end tests (tests/test_sync_*.py,
tests/reliability/) stay the acceptance layer; this file is where a new rule gets its row first.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from shared.executor import route_of
from shared.filters import ContactFilter, parse_filter
from shared.mapping import (
    BC_ID_PROPERTY_ID,
    DEFAULT_CONTEXT,
    bc_to_outlook,
    bc_view,
    fingerprint,
    normalize_email,
    outlook_view,
)
from shared.model import ACTIONS, WRITE_ACTIONS, ActionKind, Link, UserSettings
from shared.planner import (
    FULL,
    INCREMENTAL,
    SAFETY_MIN,
    Action,
    Needs,
    Plan,
    Snapshot,
    after_bc_write,
    categories_for,
    needs,
    plan,
    removal_guard,
    route,
)

USER = UserSettings(user="alice@contoso.example")
NO_REMOVE = replace(USER, remove_from_outlook=False)
PULL_EDITS = replace(USER, pull_edits_from_outlook=True)
NO_PULL_NEW = replace(USER, pull_new_from_outlook=False)
OSLO_ONLY = parse_filter({"city": "Oslo"})
EVERYONE = parse_filter({})


def bc(bc_id: str, name: str = "Ada Lovelace", email: str | None = None, **fields: Any) -> dict[str, Any]:
    """A BC contact as the API returns it (the fields the mapping reads)."""
    return {
        "id": bc_id,
        "type": "Person",
        "displayName": name,
        "email": email if email is not None else f"{bc_id}@example.com",
        "lastModifiedDateTime": "2026-01-01T00:00:00Z",
        "@odata.etag": f'W/"{bc_id}"',
        **fields,
    }


def outlook(outlook_id: str, of: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """An Outlook contact as the planner holds it (tag stripped): BC's values by default."""
    contact = bc_to_outlook(of or bc("x"))
    contact.pop("singleValueExtendedProperties", None)
    return {**contact, "id": outlook_id, **fields}


def link(bc_record: dict[str, Any], contact: dict[str, Any]) -> Link:
    """The link a run leaves after writing `bc_record` as `contact`."""
    return Link(
        bc_id=bc_record["id"],
        outlook_id=contact["id"],
        bc_hash=fingerprint(bc_view(bc_record)),
        outlook_hash=fingerprint(outlook_view(contact)),
        email=bc_record["email"],
    )


@dataclass
class Sides:
    """A snapshot, spelled the way a test thinks of it."""

    read: list[dict[str, Any]] = field(default_factory=list)  # BC records read this run
    unread: list[dict[str, Any]] = field(default_factory=list)  # in BC, unchanged, not read
    contacts: list[dict[str, Any]] = field(default_factory=list)  # Outlook contacts known this run
    removed: set[str] = field(default_factory=set)  # Outlook ids delta reported removed
    links: list[Link] = field(default_factory=list)
    tags: dict[str, str | None] = field(default_factory=dict)  # unlisted known contacts: untagged
    unknown_tags: set[str] = field(default_factory=set)  # contacts whose tag was not read yet
    mode: str = INCREMENTAL
    complete: bool | None = None  # default: a full run has read the whole folder
    retired: str | None = None  # the company left the settings (BEHAVIOUR §5.4)
    default_folder: bool = False  # folderName null: the user's default Contacts folder
    category: str | None = None  # the category the run writes
    leftover: list[dict[str, Any]] = field(default_factory=list)  # in the folder a move leaves

    def snapshot(self) -> Snapshot:
        tags: dict[str, str | None] = {c["id"]: None for c in [*self.contacts, *self.leftover]}
        tags.update(self.tags)
        for outlook_id in self.unknown_tags:
            tags.pop(outlook_id, None)
        return Snapshot(
            mode=self.mode,
            bc={r["id"]: r for r in self.read},
            bc_index={r["id"]: normalize_email(r["email"]) for r in [*self.read, *self.unread]},
            outlook={c["id"]: c for c in self.contacts},
            outlook_removed=set(self.removed),
            links={item.bc_id: item for item in self.links},
            tags=tags,
            outlook_complete=self.mode == FULL if self.complete is None else self.complete,
            retired=self.retired,
            default_folder=self.default_folder,
            category=self.category,
            leftover={c["id"]: c for c in self.leftover},
            leftover_folder="old" if self.leftover else None,
        )


def decided(result: Plan) -> list[tuple[str, str | None, str | None, str]]:
    """The plan as a reader checks it: what happens to which contact, and why."""
    actions = [(a.kind.value, a.bc_id, a.outlook_id, a.reason) for a in result.actions]
    skipped = [("skipped", i.bcId, i.outlookId, i.reason or "") for i in result.skipped]
    return actions + skipped


ADA = bc("b1", "Ada Lovelace", "ada@example.com")
ADA_IN_OUTLOOK = outlook("o1", ADA)
ADA_LINK = link(ADA, ADA_IN_OUTLOOK)
ADA_CHANGED = {**ADA, "jobTitle": "Analyst", "lastModifiedDateTime": "2026-02-01T00:00:00Z"}
ADA_EDITED_IN_OUTLOOK = {**ADA_IN_OUTLOOK, "jobTitle": "Countess"}
ADA_IN_OSLO = {**ADA, "city": "Oslo"}
BOB = bc("b2", "Bob Baker", "bob@example.com")
NEW_IN_OUTLOOK = outlook("o9", bc("n", "Nia New", "nia@example.com"))
NO_MAIL = outlook("o8", bc("n", "Nemo Nomail", "x@example.com"), emailAddresses=[])
CAT = "Business Central"
ADA_ADOPTED = replace(ADA_LINK, adopted=True)
PRIVATE = outlook("o7", bc("p", "Pat Private", "pat@home.example"))

GONE = "its company is no longer in your settings"
Row = tuple[Sides, UserSettings, ContactFilter, list[tuple[str, str | None, str | None, str]]]

# fmt: off
PLAN_CASES: dict[str, Row] = {
    # Linked pair ---------------------------------------------------------------------------------
    "linked/deleted in BC: removed from Outlook": (
        Sides(contacts=[ADA_IN_OUTLOOK], links=[ADA_LINK]), USER, EVERYONE,
        [("delete_outlook", "b1", "o1", "deleted in Business Central")]),
    "linked/deleted in BC, removeFromOutlook off: unlinked, left in Outlook": (
        Sides(contacts=[ADA_IN_OUTLOOK], links=[ADA_LINK]), NO_REMOVE, EVERYONE,
        [("unlink", "b1", "o1", "deleted in BC; removeFromOutlook is off")]),
    "linked/deleted on both sides: unlinked": (
        Sides(removed={"o1"}, links=[ADA_LINK]), USER, EVERYONE,
        [("unlink", "b1", "o1", "deleted on both sides")]),
    "linked/unchanged in BC, not read: nothing": (
        Sides(unread=[ADA], contacts=[ADA_EDITED_IN_OUTLOOK], links=[ADA_LINK]), USER, EVERYONE,
        []),
    "linked/out of scope: removed from Outlook": (
        Sides(read=[ADA], links=[ADA_LINK]), USER, OSLO_ONLY,
        [("delete_outlook", "b1", "o1", "no longer synced: does not match your filter")]),
    "linked/out of scope, removeFromOutlook off: unlinked": (
        Sides(read=[ADA], links=[ADA_LINK]), NO_REMOVE, OSLO_ONLY,
        [("unlink", "b1", "o1", "does not match your filter; removeFromOutlook is off")]),
    "linked/out of scope and gone from Outlook: unlinked": (
        Sides(read=[ADA], removed={"o1"}, links=[ADA_LINK]), USER, OSLO_ONLY,
        [("unlink", "b1", "o1", "does not match your filter")]),
    "linked/deleted in Outlook: recreated": (
        Sides(read=[ADA], removed={"o1"}, links=[ADA_LINK]), USER, EVERYONE,
        [("recreate_outlook", "b1", None, "deleted in Outlook, kept in Business Central")]),
    "linked/missing from a complete folder: recreated": (
        Sides(read=[ADA], links=[ADA_LINK], mode=FULL), USER, EVERYONE,
        [("recreate_outlook", "b1", None, "deleted in Outlook, kept in Business Central")]),
    "linked/deleted in Outlook, a tagged stand-in is there: adopted": (
        Sides(read=[ADA], contacts=[outlook("o2", ADA)], removed={"o1"}, links=[ADA_LINK],
              tags={"o2": "b1"}), USER, EVERYONE,
        [("link", "b1", "o2", "deleted in Outlook; the folder has another contact for it (same BC id tag "
          "or email), which is adopted instead of recreating one")]),
    "linked/deleted in Outlook, the user's own contact has its email: adopted": (
        Sides(read=[ADA], contacts=[outlook("o2", ADA)], removed={"o1"}, links=[ADA_LINK]), USER, EVERYONE,
        [("link", "b1", "o2", "deleted in Outlook; the folder has another contact for it (same BC id tag "
          "or email), which is adopted instead of recreating one")]),
    "linked/changed in BC: Outlook updated": (
        Sides(read=[ADA_CHANGED], contacts=[ADA_IN_OUTLOOK], links=[ADA_LINK]), USER, EVERYONE,
        [("update_outlook", "b1", "o1", "changed in Business Central")]),
    "linked/changed in BC, Outlook contact not read (dry run): Outlook updated": (
        Sides(read=[ADA_CHANGED], links=[ADA_LINK]), USER, EVERYONE,
        [("update_outlook", "b1", "o1", "changed in Business Central")]),
    "linked/edited in Outlook, incremental: ignored": (
        Sides(read=[ADA], contacts=[ADA_EDITED_IN_OUTLOOK], links=[ADA_LINK]), USER, EVERYONE,
        []),
    "linked/edited in Outlook, full: BC wins": (
        Sides(read=[ADA], contacts=[ADA_EDITED_IN_OUTLOOK], links=[ADA_LINK], mode=FULL), USER, EVERYONE,
        [("update_outlook", "b1", "o1", "edited in Outlook; Business Central wins")]),
    "linked/edited in Outlook, pullEditsFromOutlook: BC updated": (
        Sides(read=[ADA], contacts=[ADA_EDITED_IN_OUTLOOK], links=[ADA_LINK]), PULL_EDITS, EVERYONE,
        [("update_bc", "b1", "o1", "edited in Outlook")]),
    "linked/both sides agree again: link refreshed": (
        Sides(read=[ADA_CHANGED], contacts=[outlook("o1", ADA_CHANGED)], links=[ADA_LINK]), USER, EVERYONE,
        [("refresh_link", "b1", "o1", "")]),
    "linked/never tagged (interrupted run): tagged": (
        Sides(read=[ADA], contacts=[ADA_IN_OUTLOOK], links=[replace(ADA_LINK, outlook_hash="")]),
        USER, EVERYONE,
        [("update_outlook", "b1", "o1",
          "tagged with its Business Central id (an earlier run was interrupted)")]),
    "linked/in step: nothing": (
        Sides(read=[ADA], contacts=[ADA_IN_OUTLOOK], links=[ADA_LINK], mode=FULL), USER, EVERYONE,
        []),
    "linked/its company left the settings: removed from Outlook": (
        Sides(contacts=[ADA_IN_OUTLOOK], links=[ADA_LINK], retired=GONE), USER, EVERYONE,
        [("delete_outlook", "b1", "o1", f"no longer synced: {GONE}")]),
    "linked/its company left the settings, removeFromOutlook off: unlinked, left in Outlook": (
        Sides(contacts=[ADA_IN_OUTLOOK], links=[ADA_LINK], retired=GONE), NO_REMOVE, EVERYONE,
        [("unlink", "b1", "o1", f"{GONE}; removeFromOutlook is off")]),
    "linked/its company left the settings, gone from Outlook: unlinked": (
        Sides(removed={"o1"}, links=[ADA_LINK], retired=GONE), USER, EVERYONE,
        [("unlink", "b1", "o1", GONE)]),
    # Unlinked Outlook contact ----------------------------------------------------------------------
    "unlinked/tagged, its company left the settings: removed": (
        Sides(contacts=[ADA_IN_OUTLOOK], tags={"o1": "b1"}, retired=GONE), USER, EVERYONE,
        [("delete_outlook", "b1", "o1", f"no longer synced: {GONE}")]),
    "unlinked/tagged, its company left the settings, removeFromOutlook off: skipped": (
        Sides(contacts=[ADA_IN_OUTLOOK], tags={"o1": "b1"}, retired=GONE), NO_REMOVE, EVERYONE,
        [("skipped", "b1", "o1", f"{GONE}; removeFromOutlook is off")]),
    "unlinked/tagged: adopted": (
        Sides(read=[ADA], contacts=[ADA_IN_OUTLOOK], tags={"o1": "b1"}), USER, EVERYONE,
        [("link", "b1", "o1", "found by its Business Central id tag")]),
    "unlinked/tagged duplicate of a linked contact: removed": (
        Sides(read=[ADA], contacts=[ADA_IN_OUTLOOK, outlook("o2", ADA)], links=[ADA_LINK],
              tags={"o2": "b1"}), NO_REMOVE, EVERYONE,
        [("delete_outlook", "b1", "o2", "duplicate of a contact already synced from Business Central")]),
    "unlinked/tagged, deleted in BC: removed": (
        Sides(contacts=[ADA_IN_OUTLOOK], tags={"o1": "b1"}), USER, EVERYONE,
        [("delete_outlook", "b1", "o1", "deleted in Business Central")]),
    "unlinked/tagged, deleted in BC, removeFromOutlook off: skipped": (
        Sides(contacts=[ADA_IN_OUTLOOK], tags={"o1": "b1"}), NO_REMOVE, EVERYONE,
        [("skipped", "b1", "o1", "deleted in BC; removeFromOutlook is off")]),
    "unlinked/tagged, out of scope: removed": (
        Sides(read=[ADA], contacts=[ADA_IN_OUTLOOK], tags={"o1": "b1"}), USER, OSLO_ONLY,
        [("delete_outlook", "b1", "o1", "no longer synced: does not match your filter"),
         ("skipped", "b1", None, "does not match your filter")]),  # the BC contact's own row
    "unlinked/tagged, out of scope, removeFromOutlook off: skipped": (
        Sides(read=[ADA], contacts=[ADA_IN_OUTLOOK], tags={"o1": "b1"}), NO_REMOVE, OSLO_ONLY,
        [("skipped", "b1", "o1", "does not match your filter; removeFromOutlook is off"),
         ("skipped", "b1", None, "does not match your filter")]),
    "unlinked/tagged, BC record not read: skipped": (
        Sides(unread=[ADA], contacts=[ADA_IN_OUTLOOK], tags={"o1": "b1"}), USER, EVERYONE,
        [("skipped", "b1", "o1", "Business Central record not read in this run")]),
    "unlinked/not eligible: skipped": (
        Sides(contacts=[NO_MAIL]), USER, EVERYONE,
        [("skipped", None, "o8", "no email address")]),
    "unlinked/email in BC: adopted, BC's data kept": (
        Sides(read=[ADA], contacts=[outlook("o5", ADA, jobTitle="Countess")]), NO_PULL_NEW, EVERYONE,
        [("link", "b1", "o5", "matched a Business Central contact by email; BC's data kept")]),
    "unlinked/email in BC, that contact out of scope: skipped": (
        Sides(read=[ADA], contacts=[outlook("o5", ADA)]), USER, OSLO_ONLY,
        [("skipped", None, "o5", "Business Central already has this email, but that contact is not "
          "synced to you (does not match your filter)"),
         ("skipped", "b1", None, "does not match your filter")]),
    "unlinked/email already synced to this folder: skipped": (
        Sides(read=[ADA], contacts=[ADA_IN_OUTLOOK, outlook("o5", ADA)], links=[ADA_LINK]), USER, EVERYONE,
        [("skipped", None, "o5", "a contact with this email is already synced to this folder")]),
    "unlinked/new: goes to BC": (
        Sides(contacts=[NEW_IN_OUTLOOK]), USER, EVERYONE,
        [("create_bc", None, "o9", "new in Outlook")]),
    "unlinked/new, pullNewFromOutlook off: skipped": (
        Sides(contacts=[NEW_IN_OUTLOOK]), NO_PULL_NEW, EVERYONE,
        [("skipped", None, "o9", "new Outlook contact not sent to BC: pullNewFromOutlook is off")]),
    "unlinked/two new with one email: the first goes to BC": (
        Sides(contacts=[NEW_IN_OUTLOOK, {**NEW_IN_OUTLOOK, "id": "o99"}]), USER, EVERYONE,
        [("create_bc", None, "o9", "new in Outlook"),
         ("skipped", None, "o99", "another new Outlook contact with the same email goes to BC in this run")]),
    # BC contact without a pair -------------------------------------------------------------------
    "bc only/new in BC: created in Outlook": (
        Sides(read=[BOB]), USER, EVERYONE,
        [("create_outlook", "b2", None, "new in Business Central")]),
    "bc only/full run: created in Outlook": (
        Sides(read=[BOB], mode=FULL), USER, EVERYONE,
        [("create_outlook", "b2", None, "missing in Outlook")]),
    # The default Contacts folder (BEHAVIOUR §4.8) ---------------------------------------------------
    "default folder/adopted, deleted in BC: released, not deleted": (
        Sides(contacts=[ADA_IN_OUTLOOK], links=[ADA_ADOPTED], default_folder=True), USER, EVERYONE,
        [("release_outlook", "b1", "o1",
          "deleted in Business Central; your own contact is kept, without the sync's tag and category")]),
    "default folder/adopted, out of scope: released, not deleted": (
        Sides(read=[ADA], contacts=[ADA_IN_OUTLOOK], links=[ADA_ADOPTED], default_folder=True), USER, OSLO_ONLY,
        [("release_outlook", "b1", "o1", "no longer synced: does not match your filter; your own contact is "
          "kept, without the sync's tag and category")]),
    "default folder/created by the sync, deleted in BC: removed": (
        Sides(contacts=[ADA_IN_OUTLOOK], links=[ADA_LINK], default_folder=True), USER, EVERYONE,
        [("delete_outlook", "b1", "o1", "deleted in Business Central")]),
    "default folder/the user's contact without the category: left alone, not reported": (
        Sides(contacts=[PRIVATE, NO_MAIL], default_folder=True, category=CAT), USER, EVERYONE,
        []),
    "default folder/the user's contact with the category: goes to BC": (
        Sides(contacts=[{**PRIVATE, "categories": ["business central"]}], default_folder=True, category=CAT),
        USER, EVERYONE,
        [("create_bc", None, "o7", "new in Outlook")]),
    "default folder/the user's contact, its email BC has: adopted": (
        Sides(read=[ADA], contacts=[outlook("o5", ADA, jobTitle="Countess")], default_folder=True, category=CAT),
        NO_PULL_NEW, EVERYONE,
        [("link", "b1", "o5", "matched a Business Central contact by email; BC's data kept")]),
    "default folder/the user's contact, its email BC has but not for them: left alone": (
        Sides(read=[ADA], contacts=[outlook("o5", ADA)], default_folder=True, category=CAT), USER, OSLO_ONLY,
        [("skipped", "b1", None, "does not match your filter")]),
    # The category -----------------------------------------------------------------------------------
    "category/a synced contact without it, full run: set": (
        Sides(read=[ADA], contacts=[ADA_IN_OUTLOOK], links=[ADA_LINK], mode=FULL, category=CAT), USER, EVERYONE,
        [("update_outlook", "b1", "o1", "Outlook category set")]),
    "category/a synced contact with it: nothing": (
        Sides(read=[ADA], contacts=[{**ADA_IN_OUTLOOK, "categories": ["VIP", CAT]}], links=[ADA_LINK], mode=FULL,
              category=CAT), USER, EVERYONE,
        []),
    # A move between folders: the contacts left in the previous folder ---------------------------------
    "move/the sync's contact, now in the new folder: deleted from the old one": (
        Sides(read=[ADA], contacts=[outlook("o2", ADA)], links=[replace(ADA_LINK, outlook_id="o2")],
              leftover=[ADA_IN_OUTLOOK], tags={"o2": "b1", "o1": "b1"}, mode=FULL), USER, EVERYONE,
        [("delete_outlook", "b1", "o1", "moved to the new sync folder")]),
    "move/the user's own contact the sync had adopted: released where it is": (
        Sides(read=[ADA], leftover=[ADA_IN_OUTLOOK], links=[ADA_ADOPTED], tags={"o1": "b1"}, mode=FULL),
        USER, EVERYONE,
        [("recreate_outlook", "b1", None, "deleted in Outlook, kept in Business Central"),
         ("release_outlook", "b1", "o1", "moved to the new sync folder; your own contact is kept here, "
          "without the sync's tag and category")]),
    "move/an untagged contact in the old folder: the user's, left alone": (
        Sides(leftover=[PRIVATE], mode=FULL), USER, EVERYONE,
        []),
    "bc only/out of scope: skipped": (
        Sides(read=[BOB, {**ADA_IN_OSLO, "type": "Company"}]), USER, OSLO_ONLY,
        [("skipped", "b1", None, "type is Company, only Person contacts are synchronized"),
         ("skipped", "b2", None, "does not match your filter")]),
}
# fmt: on


@pytest.mark.parametrize("sides, settings, contact_filter, expected", PLAN_CASES.values(), ids=PLAN_CASES)
def test_plan_decides_each_case_of_the_table(
    sides: Sides, settings: UserSettings, contact_filter: ContactFilter, expected: list[Any]
) -> None:
    result = plan(sides.snapshot(), settings, contact_filter)
    assert decided(result) == expected
    assert result.safety_stop is None


def test_a_move_copies_first_and_its_deletes_do_not_trip_the_mass_removal_guard() -> None:
    """Every contact of a folder moves: as many deletes as links, all halves of moves, none a loss.
    The copies come before the deletes, so a run that stops midway leaves two, never none."""
    people = [bc(f"b{n}", f"Person {n}", f"p{n}@example.com") for n in range(SAFETY_MIN + 5)]
    old = [outlook(f"old{n}", person) for n, person in enumerate(people)]
    sides = Sides(
        read=people,
        leftover=old,
        links=[link(person, contact) for person, contact in zip(people, old, strict=True)],
        tags={contact["id"]: person["id"] for person, contact in zip(people, old, strict=True)},
        mode=FULL,
    )
    result = plan(sides.snapshot(), USER, EVERYONE)
    assert result.safety_stop is None
    kinds = [action.kind for action in result.actions]
    assert kinds == [ActionKind.RECREATE_OUTLOOK] * len(people) + [ActionKind.DELETE_OUTLOOK] * len(people)
    assert all(
        a.folder_id == "old" and not a.unlinks for a in result.actions if a.kind is ActionKind.DELETE_OUTLOOK
    )


def test_categories_keep_the_users_own_and_replace_the_syncs_earlier_one() -> None:
    contact = {"categories": ["VIP", "Old name", "Red category"]}
    assert categories_for("New name", frozenset({"old name"}), contact) == ["VIP", "Red category", "New name"]
    assert categories_for(None, frozenset({"old name"}), contact) == ["VIP", "Red category"]
    assert categories_for("vip", frozenset(), contact) is None  # Outlook ignores case
    assert categories_for("CRM", frozenset(), None) == ["CRM"]


def test_in_the_default_folder_an_adopted_contact_is_released_with_its_own_categories_kept() -> None:
    mine = {**ADA_IN_OUTLOOK, "categories": ["Red category", CAT]}
    snap = Sides(contacts=[mine], links=[ADA_ADOPTED], default_folder=True, category=CAT).snapshot()
    [release] = plan(snap, USER, EVERYONE).actions
    assert release.body == {
        "singleValueExtendedProperties": [{"id": BC_ID_PROPERTY_ID, "value": ""}],
        "categories": ["Red category"],
    }
    assert route_of(release) == "graph"


def test_releasing_needs_the_contacts_own_categories_first() -> None:
    sides = Sides(links=[ADA_ADOPTED], default_folder=True, category=CAT)
    assert needs(sides.snapshot(), USER, EVERYONE).outlook == {"o1"}


def test_an_adopted_contact_that_already_has_bcs_values_is_not_written() -> None:
    result = plan(Sides(read=[ADA], contacts=[ADA_IN_OUTLOOK], tags={"o1": "b1"}).snapshot(), USER, EVERYONE)
    [adopt] = result.actions
    assert (adopt.kind, adopt.body) == (ActionKind.LINK, None)
    assert route_of(adopt) == "store"


def test_a_pulled_outlook_edit_is_sent_with_bcs_etag() -> None:
    sides = Sides(read=[ADA], contacts=[ADA_EDITED_IN_OUTLOOK], links=[ADA_LINK])
    [update] = plan(sides.snapshot(), PULL_EDITS, EVERYONE).actions
    assert update.etag == ADA["@odata.etag"]
    assert update.body == {"jobTitle": "Countess"}


def many_linked(count: int) -> Sides:
    records = [bc(f"b{i:02}") for i in range(count)]
    contacts = [outlook(f"o{i:02}", r) for i, r in enumerate(records)]
    return Sides(
        read=records, contacts=contacts, links=[link(r, c) for r, c in zip(records, contacts, strict=True)]
    )


@pytest.mark.parametrize(
    "count, force, stopped",
    [
        pytest.param(SAFETY_MIN + 1, False, True, id="more than half and more than ten: stopped"),
        pytest.param(SAFETY_MIN + 1, True, False, id="forced: goes ahead"),
        pytest.param(SAFETY_MIN, False, False, id="ten or fewer: goes ahead"),
    ],
)
def test_mass_removal_guard(count: int, force: bool, stopped: bool) -> None:
    result = plan(many_linked(count).snapshot(), USER, OSLO_ONLY, force=force)
    assert result.count(ActionKind.DELETE_OUTLOOK) == count
    assert (result.safety_stop is not None) is stopped
    if stopped:
        assert f"would remove {count} of {count} synced contacts" in str(result.safety_stop)


# needs() ----------------------------------------------------------------------------------------------

NEEDS_CASES: dict[str, tuple[Sides, UserSettings, Needs]] = {
    "nothing missing: asks nothing": (
        Sides(read=[ADA], contacts=[ADA_IN_OUTLOOK], links=[ADA_LINK]),
        USER,
        Needs(),
    ),
    "unlinked contact with an unknown tag: its tag first": (
        Sides(read=[ADA], contacts=[NEW_IN_OUTLOOK], unknown_tags={"o9"}),
        USER,
        Needs(tags={"o9"}),
    ),
    "tagged contact whose BC record was not read: that record": (
        Sides(unread=[ADA], contacts=[ADA_IN_OUTLOOK], tags={"o1": "b1"}),
        USER,
        Needs(bc={"b1"}),
    ),
    "tagged contact, its BC id's linked contact unknown: that contact": (
        Sides(read=[ADA], contacts=[outlook("o2", ADA)], links=[ADA_LINK], tags={"o2": "b1"}),
        USER,
        Needs(outlook={"o1"}),
    ),
    "user's contact with an email BC has: that BC record": (
        Sides(unread=[ADA], contacts=[outlook("o5", ADA)]),
        USER,
        Needs(bc={"b1"}),
    ),
    "linked pair gone from Outlook, BC not read: the record to recreate it": (
        Sides(unread=[ADA], removed={"o1"}, links=[ADA_LINK]),
        USER,
        Needs(bc={"b1"}),
    ),
    "linked pair never tagged: both sides": (
        Sides(unread=[ADA], links=[replace(ADA_LINK, outlook_hash="")]),
        USER,
        Needs(bc={"b1"}, outlook={"o1"}),
    ),
    "Outlook edit to pull, BC not read: the BC record and its etag": (
        Sides(unread=[ADA], contacts=[ADA_EDITED_IN_OUTLOOK], links=[ADA_LINK]),
        PULL_EDITS,
        Needs(bc={"b1"}),
    ),
    "Outlook edit not pulled: nothing": (
        Sides(unread=[ADA], contacts=[ADA_EDITED_IN_OUTLOOK], links=[ADA_LINK]),
        USER,
        Needs(),
    ),
    "changed in BC, Outlook contact not read: the Outlook contact": (
        Sides(read=[ADA_CHANGED], links=[ADA_LINK]),
        USER,
        Needs(outlook={"o1"}),
    ),
    "a create in an incremental run: the whole folder": (Sides(read=[BOB]), USER, Needs(whole_folder=True)),
    "a recreate in an incremental run: the whole folder": (
        Sides(read=[ADA], removed={"o1"}, links=[ADA_LINK]),
        USER,
        Needs(whole_folder=True),
    ),
    "a create in a full run: nothing, the folder is read": (Sides(read=[BOB], mode=FULL), USER, Needs()),
}


@pytest.mark.parametrize("sides, settings, expected", NEEDS_CASES.values(), ids=NEEDS_CASES)
def test_needs_asks_for_what_the_plan_lacks(sides: Sides, settings: UserSettings, expected: Needs) -> None:
    assert needs(sides.snapshot(), settings, EVERYONE) == expected


def test_gone_from_outlook_is_one_rule() -> None:
    incremental = Sides(contacts=[ADA_IN_OUTLOOK], removed={"o2"}).snapshot()
    complete = Sides(contacts=[ADA_IN_OUTLOOK], mode=FULL).snapshot()
    assert [incremental.gone_from_outlook(i) for i in ("o1", "o2", "o3")] == [False, True, False]
    assert [complete.gone_from_outlook(i) for i in ("o1", "o2", "o3")] == [False, True, True]


# After a BC write --------------------------------------------------------------------------------------


def created_from(contact: dict[str, Any]) -> Action:
    return Action(ActionKind.CREATE_BC, None, contact["id"], {}, outlook=contact, reason="new in Outlook")


AFTER_CASES: dict[str, tuple[Action, dict[str, Any], UserSettings, ContactFilter, tuple[str, str] | None]] = {
    "created in BC: Outlook contact tagged": (
        created_from(ADA_IN_OUTLOOK),
        ADA,
        USER,
        EVERYONE,
        ("tag_outlook", "tagged with its BC id"),
    ),
    "created in BC outside the filter: removed from the folder": (
        created_from(ADA_IN_OUTLOOK),
        ADA,
        USER,
        OSLO_ONLY,
        (
            "delete_outlook",
            "in Business Central now; removed from the sync folder: does not match your filter",
        ),
    ),
    "created outside the filter, removeFromOutlook off: tagged": (
        created_from(ADA_IN_OUTLOOK),
        ADA,
        NO_REMOVE,
        OSLO_ONLY,
        ("tag_outlook", "tagged with its BC id"),
    ),
    "created in BC outside the filter, in the default folder: released, it is the user's": (
        created_from(ADA_IN_OUTLOOK),
        ADA,
        replace(USER, folder_name=None),
        OSLO_ONLY,
        ("release_outlook", "in Business Central now; not synced to you: does not match your filter"),
    ),
    "updated in BC, BC answers what Outlook has: nothing": (
        replace(created_from(ADA_IN_OUTLOOK), kind=ActionKind.UPDATE_BC, bc_id="b1"),
        ADA,
        USER,
        EVERYONE,
        None,
    ),
    "updated in BC, BC answers other values: Outlook aligned": (
        replace(created_from(ADA_IN_OUTLOOK), kind=ActionKind.UPDATE_BC, bc_id="b1"),
        ADA_CHANGED,
        USER,
        EVERYONE,
        ("tag_outlook", "tagged with its BC id"),
    ),
}


@pytest.mark.parametrize(
    "written, answer, settings, contact_filter, expected", AFTER_CASES.values(), ids=AFTER_CASES
)
def test_after_a_bc_write_the_planner_decides_the_outlook_follow_up(
    written: Action,
    answer: dict[str, Any],
    settings: UserSettings,
    contact_filter: ContactFilter,
    expected: tuple[str, str] | None,
) -> None:
    follow_up = after_bc_write(written, answer, settings, contact_filter, DEFAULT_CONTEXT)
    if expected is None:
        assert follow_up is None
        return
    assert follow_up is not None
    assert (follow_up.kind.value, follow_up.reason) == expected
    assert (follow_up.bc_id, follow_up.outlook_id) == ("b1", "o1")
    if follow_up.kind is ActionKind.TAG_OUTLOOK:
        assert follow_up.kind.report_key == ""  # counted with the BC write, not again


# Action kinds ------------------------------------------------------------------------------------------


def test_an_unknown_action_kind_is_refused_before_the_executor() -> None:
    with pytest.raises(ValueError, match="unknown action kind 'update_everything'"):
        Action("update_everything", "b1", "o1")  # type: ignore[arg-type]
    assert Action("delete_outlook", "b1", "o1").kind is ActionKind.DELETE_OUTLOOK  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", list(ActionKind), ids=[k.value for k in ActionKind])
def test_the_executor_has_a_way_for_every_kind(kind: ActionKind) -> None:
    action = Action(kind, "b1", "o1", body={"displayName": "x"})
    assert route_of(action) in ("store", "bc", "graph")
    assert kind.writes is (route_of(action) != "store")


def test_report_counts_keep_their_keys_and_order() -> None:
    assert ACTIONS == (
        "outlookCreated",
        "outlookUpdated",
        "outlookDeleted",
        "outlookRecreated",
        "bcCreated",
        "bcUpdated",
        "linked",
        "skipped",
        "failed",
    )
    assert ACTIONS[:6] == WRITE_ACTIONS


# Which company's plan an Outlook contact goes to (BEHAVIOUR §5.4) -----------------------------------
SCOPES = [("c1", "Cronus"), ("c2", "Fabrikam"), ("c3", None)]
# fmt: off
ROUTE_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "linked: the company of its link, whatever it carries": (
        {"linked_to": "c3", "tag_company": "c2", "tagged": True, "categories": ["Fabrikam"]}, "c3"),
    "tagged with a company: that company": (
        {"linked_to": None, "tag_company": "c2", "tagged": True, "categories": ["Cronus"]}, "c2"),
    "tagged with a bare BC id: the home company": (
        {"linked_to": None, "tag_company": None, "tagged": True, "categories": ["Fabrikam"]}, "home"),
    "tagged with a company no longer listed: that company (its contacts leave)": (
        {"linked_to": None, "tag_company": "c9", "tagged": True, "categories": []}, "c9"),
    "new, with a company's category: that company": (
        {"linked_to": None, "tag_company": None, "tagged": False, "categories": ["Other", " fabrikam "]}, "c2"),
    "new, with two companies' categories: the first in settings order": (
        {"linked_to": None, "tag_company": None, "tagged": False, "categories": ["Fabrikam", "Cronus"]}, "c1"),
    "new, without a company's category: the first company": (
        {"linked_to": None, "tag_company": None, "tagged": False, "categories": ["Private"]}, "c1"),
    "new, no categories at all: the first company": (
        {"linked_to": None, "tag_company": None, "tagged": False, "categories": None}, "c1"),
    "its email is a BC contact's of a company: that company (adopted there, not doubled)": (
        {"linked_to": None, "tag_company": None, "tagged": False, "categories": ["Private"], "email_in": "c3"}, "c3"),
    "a company's category wins over another company's email": (
        {"linked_to": None, "tag_company": None, "tagged": False, "categories": ["Fabrikam"], "email_in": "c3"}, "c2"),
}
# fmt: on


@pytest.mark.parametrize("contact, company", ROUTE_CASES.values(), ids=ROUTE_CASES)
def test_route_decides_each_case_of_its_table(contact: dict[str, Any], company: str) -> None:
    assert route(**contact, scopes=SCOPES, home="home") == company


@pytest.mark.parametrize(
    ("deletions", "linked", "stopped"),
    [
        (SAFETY_MIN, SAFETY_MIN, False),
        (SAFETY_MIN + 1, 2 * SAFETY_MIN + 2, False),
        (SAFETY_MIN + 1, 2 * SAFETY_MIN + 1, True),
    ],
)
def test_the_removal_guard_is_one_rule_for_one_company_or_the_sum_of_several(
    deletions: int, linked: int, stopped: bool
) -> None:
    assert (removal_guard(deletions, linked) is not None) == stopped
