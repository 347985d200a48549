"""The sync decision, as a pure function: both sides + links + settings → actions.

Nothing here calls an API or the store. `sync` gathers a `Snapshot`, asks `needs()` which records
are still missing to decide (e.g. the Outlook contact behind a BC change, so its extra email
addresses are preserved), fetches them, then calls `plan()`. The executor applies the plan; a dry
run reports it and stops. Keeping the decision pure is what makes dry runs honest and lets the
tests explore it directly (tests/test_planner.py, one row per case).

`plan()` is a decision table: each contact goes to one small function per case, which returns an
action, a skip with its reason, or nothing; `plan()`'s docstring lists the cases. A new rule is a new
row there, not a new nesting level. The executor asks `after_bc_write()` what follows a BC write, so
that decision lives here too.

Rules (BEHAVIOUR §4): BC is the source of truth; a link ties one BC id to one Outlook id; every Outlook
contact we write carries its BC id in an extended property ("tag"), so a lost link or a crash between
a write and its link is healed by adopting the tagged contact instead of creating a second one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from shared.filters import ContactFilter
from shared.mapping import (
    BC_ID_PROPERTY_ID,
    DEFAULT_CONTEXT,
    BcContext,
    MappingError,
    bc_is_eligible,
    bc_to_outlook,
    bc_view,
    fingerprint,
    graph_patch,
    normalize_email,
    outlook_email,
    outlook_is_eligible,
    outlook_to_bc,
    outlook_view,
    tag_value,
)
from shared.model import ActionKind, Link, ReportItem, UserSettings

FULL = "full"
INCREMENTAL = "incremental"
SAFETY_MIN = 10  # the guard applies above this many removals (BEHAVIOUR §4.5)


@dataclass
class Snapshot:
    """What one run knows about both sides for one user."""

    mode: str
    bc: dict[str, dict[str, Any]]  # full BC records known this run, by id
    bc_index: dict[str, str]  # every current BC contact id in the company → normalized email
    outlook: dict[str, dict[str, Any]]  # Outlook contacts known this run (changed, or all in full mode)
    outlook_removed: set[str]  # Outlook ids known to be gone from the folder
    links: dict[str, Link]  # by BC id
    tags: dict[str, str | None] = field(default_factory=dict)  # Outlook id → BC id tag (None: untagged)
    outlook_complete: bool = False  # `outlook` holds every contact of the folder
    ctx: BcContext = DEFAULT_CONTEXT  # the tenant's fields, the company's countries and companies
    # Why this company's contacts are no longer synced at all (its company left `companies`,
    # BEHAVIOUR §5.4), or None: then `bc` and `bc_index` are empty and every contact leaves.
    retired: str | None = None
    # The Outlook category this run puts on every synced contact (None: none), and the categories
    # the sync wrote before and no longer writes (casefolded), which it takes off (BEHAVIOUR §4.8).
    category: str | None = None
    stale_categories: frozenset[str] = frozenset()
    # The folder is the user's default Contacts folder, shared with their own contacts (§4.8).
    default_folder: bool = False
    # A move between folders in progress: every contact still in the folder the sync is leaving
    # (their tags in `tags`), and that folder's id.
    leftover: dict[str, dict[str, Any]] = field(default_factory=dict)
    leftover_folder: str | None = None

    def gone_from_outlook(self, outlook_id: str) -> bool:
        """The Outlook contact is known to be gone: delta said so, or the whole folder was read
        without it. (Merely absent from an incremental delta means unchanged, not gone.)"""
        return outlook_id in self.outlook_removed or (
            self.outlook_complete and outlook_id not in self.outlook
        )

    def linked_bc_ids(self) -> dict[str, str]:
        """Outlook id → BC id of every link."""
        return {link.outlook_id: bc_id for bc_id, link in self.links.items()}


@dataclass
class Needs:
    """Records `plan()` needs and the snapshot lacks; `sync` fetches them and asks again."""

    tags: set[str] = field(default_factory=set)  # Outlook ids whose BC-id tag is unknown
    bc: set[str] = field(default_factory=set)  # BC ids whose full record is needed
    outlook: set[str] = field(default_factory=set)  # Outlook ids whose current content is needed
    # The plan creates an Outlook contact, and the folder may hold the user's own contact with that
    # email which this delta did not show: read the whole folder, so it is adopted, not duplicated.
    whole_folder: bool = False

    def records(self) -> bool:
        """Anything to fetch by id."""
        return bool(self.tags or self.bc or self.outlook)

    def __bool__(self) -> bool:
        return self.records() or self.whole_folder


@dataclass
class Action:
    """One write (or store-only change) of the plan, with what it is based on."""

    kind: ActionKind
    bc_id: str | None = None
    outlook_id: str | None = None
    body: dict[str, Any] | None = None  # the write's payload
    etag: str | None = None  # BC etag for update_bc
    bc: dict[str, Any] | None = None  # the BC record the action is based on
    outlook: dict[str, Any] | None = None  # the Outlook contact the action is based on
    email: str | None = None
    reason: str = ""
    # A delete_outlook also drops the link of bc_id. Not for an unlinked tagged duplicate: the link of
    # that BC id belongs to the contact that stays.
    unlinks: bool = True
    # The link this action stores ties BC to the user's own contact (adopted by email), which is
    # released, never deleted, when it stops being synced.
    adopted: bool = False
    # The folder the Outlook contact is in, when it is not the run's (a move's previous folder).
    folder_id: str | None = None
    # A delete that is half of a move: its BC contact gets (or has) a contact in the new folder, so
    # the mass-removal guard does not count it.
    move: bool = False

    def __post_init__(self) -> None:
        # A kind spelled as its string value is accepted; an unknown one raises ValueError here, so it
        # never reaches the executor.
        self.kind = _kind_named(self.kind)

    @property
    def report_as(self) -> str:
        """Counts key of the run report, or "" for actions the report does not count."""
        return self.kind.report_key

    @property
    def writes(self) -> bool:
        return self.kind.writes


def _kind_named(value: object) -> ActionKind:
    if isinstance(value, ActionKind):
        return value
    for kind in ActionKind:
        if kind.value == value:
            return kind
    raise ValueError(f"unknown action kind {value!r} (known: {', '.join(k.value for k in ActionKind)})")


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    skipped: list[ReportItem] = field(default_factory=list)
    safety_stop: str | None = None  # why the plan was stopped by the mass-deletion guard

    def count(self, kind: ActionKind) -> int:
        return sum(1 for action in self.actions if action.kind is kind)


Decision = Action | ReportItem | None  # what one case decides: an action, a skip with its reason, nothing
CREATES_IN_OUTLOOK = frozenset({ActionKind.CREATE_OUTLOOK, ActionKind.RECREATE_OUTLOOK})


def _skip(
    reason: str, bc_id: str | None = None, outlook_id: str | None = None, email: str | None = None
) -> ReportItem:
    return ReportItem("skipped", bc_id, outlook_id, email, reason)


def _out_of_scope(bc: dict[str, Any], contact_filter: ContactFilter) -> str | None:
    """Why the user's folder does not hold this BC contact (eligibility, then the filter), or None."""
    reason = bc_is_eligible(bc)
    if reason:
        return reason
    if not contact_filter.matches(bc):
        return "does not match your filter"
    return None


def _outlook_edited(outlook: dict[str, Any], link: Link, ctx: BcContext) -> bool:
    return fingerprint(outlook_view(outlook, ctx)) != link.outlook_hash


def _bc_by_email(index: dict[str, str]) -> dict[str, list[str]]:
    by_email: dict[str, list[str]] = defaultdict(list)
    for bc_id, email in index.items():
        if email:
            by_email[email].append(bc_id)
    return by_email


def categories_for(
    category: str | None, stale: frozenset[str], outlook: dict[str, Any] | None
) -> list[str] | None:
    """The categories an Outlook contact should carry: the user's own kept, the sync's earlier ones
    (`stale`, casefolded) taken off, `category` added. None when it carries exactly those already.
    Outlook compares category names without regard to case, and so does this."""
    current = [str(c) for c in (outlook or {}).get("categories") or []]
    ours = set(stale) | ({category.casefold()} if category else set())
    wanted = [c for c in current if c.casefold() not in ours] + ([category] if category else [])
    if sorted(c.casefold() for c in wanted) == sorted(c.casefold() for c in current):
        return None
    return wanted


def _categories(snap: Snapshot, outlook: dict[str, Any] | None) -> list[str] | None:
    return categories_for(snap.category, snap.stale_categories, outlook)


def _with_categories(body: dict[str, Any], snap: Snapshot, outlook: dict[str, Any] | None) -> dict[str, Any]:
    categories = _categories(snap, outlook)
    if categories is not None:
        body["categories"] = categories
    return body


def _has_category(snap: Snapshot, outlook: dict[str, Any]) -> bool:
    """The user gave this contact the sync's category: in the default folder, the only sign that a
    contact of theirs is meant for Business Central (their private contacts never go there)."""
    wanted = snap.category.casefold() if snap.category else None
    return wanted is not None and any(str(c).casefold() == wanted for c in outlook.get("categories") or [])


def _releases(snap: Snapshot, link: Link) -> bool:
    """A linked contact that is the user's own in their default folder: released, never deleted."""
    return snap.default_folder and link.adopted


# needs() ------------------------------------------------------------------------------------------


def needs(snap: Snapshot, settings: UserSettings, contact_filter: ContactFilter) -> Needs:
    """What must be fetched before `plan()` can decide every contact correctly.

    Asked again after every fetch: 1. the tags of Outlook contacts we have no link for (they decide
    which BC records matter); 2. the records those contacts and the linked pairs need; 3. the whole
    folder, when the plan would create an Outlook contact the folder may already hold.
    """
    linked = snap.linked_bc_ids()
    wanted = Needs(tags={i for i in snap.outlook if i not in linked and i not in snap.tags})
    if wanted.tags:
        return wanted
    _records_for_unlinked(snap, linked, wanted)
    _records_for_linked(snap, settings, contact_filter, wanted)
    if not snap.outlook_complete:
        planned = plan(snap, settings, contact_filter)
        wanted.whole_folder = any(action.kind in CREATES_IN_OUTLOOK for action in planned.actions)
    return wanted


def _records_for_unlinked(snap: Snapshot, linked: dict[str, str], wanted: Needs) -> None:
    """Unlinked Outlook contacts: the BC record they are tagged with or match by email."""
    bc_by_email = _bc_by_email(snap.bc_index)
    for outlook_id, contact in snap.outlook.items():
        if outlook_id in linked:
            continue
        tag = snap.tags.get(outlook_id)
        if tag:
            if tag in snap.bc_index and tag not in snap.bc:
                wanted.bc.add(tag)
            # A duplicate, or the stand-in of a linked contact that is gone (e.g. with a deleted
            # folder)? Only the linked contact's existence tells.
            link = snap.links.get(tag)
            if link and link.outlook_id not in snap.outlook and not snap.gone_from_outlook(link.outlook_id):
                wanted.outlook.add(link.outlook_id)
            continue
        email = normalize_email(outlook_email(contact))
        if email:  # an email match is adopted even with pullNewFromOutlook off: nothing goes to BC
            wanted.bc.update(i for i in bc_by_email.get(email, []) if i not in snap.bc)


def _records_for_linked(
    snap: Snapshot, settings: UserSettings, contact_filter: ContactFilter, wanted: Needs
) -> None:
    """Linked pairs: the records their case in `plan()` reads."""
    for bc_id, link in snap.links.items():
        gone = snap.gone_from_outlook(link.outlook_id)
        outlook = snap.outlook.get(link.outlook_id)
        if bc_id not in snap.bc_index:
            if _releases(snap, link) and not gone and outlook is None:
                wanted.outlook.add(link.outlook_id)  # its own categories are kept on release
            continue  # deleted in BC: nothing more to know
        bc = snap.bc.get(bc_id)
        if not link.outlook_hash and not gone:  # linked but never tagged: an interrupted run
            if bc is None:
                wanted.bc.add(bc_id)
            if outlook is None:
                wanted.outlook.add(link.outlook_id)
        elif bc is None:
            if gone:
                wanted.bc.add(bc_id)  # to recreate it
            elif (
                outlook is not None
                and settings.pull_edits_from_outlook
                and _outlook_edited(outlook, link, snap.ctx)
            ):
                wanted.bc.add(bc_id)  # to push the edit with BC's etag
        elif not gone and outlook is None:
            bc_changed = fingerprint(bc_view(bc, snap.ctx)) != link.bc_hash
            in_scope = _out_of_scope(bc, contact_filter) is None
            if (bc_changed and in_scope) or (not in_scope and _releases(snap, link)):
                wanted.outlook.add(link.outlook_id)  # the write must preserve Outlook-only values


# plan(): the decision table -------------------------------------------------------------------------


@dataclass
class _Planning:
    """One `plan()` call's inputs and what its cases have claimed so far."""

    snap: Snapshot
    settings: UserSettings
    contact_filter: ContactFilter
    linked: dict[str, str]  # Outlook id → BC id of every link
    bc_by_email: dict[str, list[str]]
    claimed_bc: set[str] = field(default_factory=set)  # BC ids that got an Outlook counterpart
    claimed_outlook: set[str] = field(default_factory=set)
    new_by_email: dict[str, str] = field(default_factory=dict)  # email → Outlook id going to BC
    result: Plan = field(default_factory=Plan)

    def record(self, decision: Decision) -> None:
        if isinstance(decision, Action):
            self.result.actions.append(decision)
        elif decision is not None:
            self.result.skipped.append(decision)


def plan(
    snap: Snapshot, settings: UserSettings, contact_filter: ContactFilter, *, force: bool | None = False
) -> Plan:
    """Decide every action of the run. Deterministic: same inputs, same plan, same order.

    | contact                   | case (first that applies)                      | function             |
    |---------------------------|------------------------------------------------|----------------------|
    | linked pair               | its company left the settings                  | `_company_removed`   |
    |                           | deleted in BC                                  | `_deleted_in_bc`     |
    |                           | unchanged in BC (not read this run)            | nothing              |
    |                           | out of scope (eligibility, filter)             | `_out_of_scope_pair` |
    |                           | gone from Outlook: adopt a stand-in / recreate | `_gone_from_outlook` |
    |                           | changed in BC, edited in Outlook, or neither   | `_pair_changed`      |
    | unlinked Outlook contact  | tagged, its company left the settings          | `_company_removed`   |
    |                           | tagged with a BC id                            | `_tagged`            |
    |                           | not eligible                                   | skip                 |
    |                           | its email is in BC                             | `_email_match`       |
    |                           | new                                            | `_new_in_outlook`    |
    | BC contact without a pair | out of scope / to create                       | `_bc_only`           |
    | contact in the folder a   | untagged (the user's own)                      | nothing              |
    | move leaves (`leftover`)  | adopted (the user's own): tag, category off    | `_left_behind`       |
    |                           | created by the sync: deleted, after its copy   | `_left_behind`       |

    In the default Contacts folder (`folderName: null`, BEHAVIOUR §4.8) the same rows apply, with
    these differences: an untagged contact without the sync's category and whose email BC lacks is
    the user's private contact and is left out (not even reported); a linked contact the sync
    adopted is released (`_release`: tag and category off) instead of deleted when it stops being
    synced. Every write to Outlook also sets the run's category (`categories_for`), keeping the
    user's own categories and taking off the sync's earlier ones.

    Then the mass-removal guard (`_mass_removal_guard`) may stop the whole plan; `force=None` leaves
    the guard to the caller, which plans several companies and guards their sum (`removal_guard`).
    Which company's plan an Outlook contact belongs to is decided before, by `route()`.
    """
    planning = _Planning(snap, settings, contact_filter, snap.linked_bc_ids(), _bc_by_email(snap.bc_index))
    for bc_id in sorted(snap.links):
        planning.record(_linked_pair(planning, bc_id, snap.links[bc_id]))
    for outlook_id in sorted(snap.outlook):
        if outlook_id not in planning.linked and outlook_id not in planning.claimed_outlook:
            planning.record(_unlinked_outlook(planning, outlook_id))
    for bc_id in sorted(snap.bc):
        if bc_id not in planning.claimed_bc:
            planning.record(_bc_only(planning, snap.bc[bc_id]))
    # Last, so that a run stopping midway leaves a contact in both folders, never in neither.
    for outlook_id in sorted(snap.leftover):
        planning.record(_left_behind(planning, outlook_id))
    if force is not None:
        _mass_removal_guard(planning.result, snap, force)
    return planning.result


def _linked_pair(planning: _Planning, bc_id: str, link: Link) -> Decision:
    snap = planning.snap
    planning.claimed_bc.add(bc_id)
    if snap.retired:
        return _company_removed(planning, bc_id, link.outlook_id, linked=True, email=link.email)
    if bc_id not in snap.bc_index:
        return _deleted_in_bc(planning, bc_id, link)
    planning.claimed_outlook.add(link.outlook_id)
    bc = snap.bc.get(bc_id)
    if bc is None:
        return None  # unchanged in BC; Outlook edits are ignored unless pulled (needs() fetched bc then)
    reason = _out_of_scope(bc, planning.contact_filter)
    if reason:
        return _out_of_scope_pair(planning, bc, link, reason)
    if snap.gone_from_outlook(link.outlook_id):
        return _gone_from_outlook(planning, bc, link)
    return _pair_changed(planning, bc, link)


def _company_removed(
    planning: _Planning, bc_id: str, outlook_id: str, *, linked: bool, email: str | None
) -> Decision:
    """A contact of a company the user no longer syncs (BEHAVIOUR §5.4): it leaves the folder like a
    contact that left the filter, under the same mass-removal guard."""
    snap = planning.snap
    reason = snap.retired or "its company is no longer synced"
    link = snap.links.get(bc_id)
    if linked and link is not None and _releases(snap, link) and not snap.gone_from_outlook(outlook_id):
        why = f"no longer synced: {reason}; your own contact is kept, without the sync's tag and category"
        return _release(snap, bc_id, outlook_id, why, email=email)
    return _stop_syncing(
        planning.settings,
        bc_id,
        outlook_id,
        linked=linked,
        gone=linked and planning.snap.gone_from_outlook(outlook_id),
        gone_reason=reason,
        delete_reason=f"no longer synced: {reason}",
        kept_reason=f"{reason}; removeFromOutlook is off",
        email=email,
    )


def _deleted_in_bc(planning: _Planning, bc_id: str, link: Link) -> Decision:
    snap = planning.snap
    if _releases(snap, link) and not snap.gone_from_outlook(link.outlook_id):
        reason = "deleted in Business Central; your own contact is kept, without the sync's tag and category"
        return _release(snap, bc_id, link.outlook_id, reason, email=link.email)
    return _stop_syncing(
        planning.settings,
        bc_id,
        link.outlook_id,
        linked=True,
        gone=planning.snap.gone_from_outlook(link.outlook_id),
        gone_reason="deleted on both sides",
        delete_reason="deleted in Business Central",
        kept_reason="deleted in BC; removeFromOutlook is off",
        email=link.email,
    )


def _out_of_scope_pair(planning: _Planning, bc: dict[str, Any], link: Link, reason: str) -> Decision:
    snap = planning.snap
    if _releases(snap, link) and not snap.gone_from_outlook(link.outlook_id):
        why = f"no longer synced: {reason}; your own contact is kept, without the sync's tag and category"
        return _release(snap, bc["id"], link.outlook_id, why, bc=bc, email=bc.get("email"))
    return _stop_syncing(
        planning.settings,
        bc["id"],
        link.outlook_id,
        linked=True,
        gone=planning.snap.gone_from_outlook(link.outlook_id),
        gone_reason=reason,
        delete_reason=f"no longer synced: {reason}",
        kept_reason=f"{reason}; removeFromOutlook is off",
        bc=bc,
        email=bc.get("email"),
    )


def _gone_from_outlook(planning: _Planning, bc: dict[str, Any], link: Link) -> Decision:
    """Deleted in Outlook, kept in BC: adopt a contact that already stands in for it, else recreate."""
    snap, email = planning.snap, bc.get("email")
    stand_in = _stand_in(planning, bc["id"], email)
    if stand_in is None:
        return Action(
            ActionKind.RECREATE_OUTLOOK,
            bc["id"],
            body=_with_categories(bc_to_outlook(bc, None, snap.ctx), snap, None),
            bc=bc,
            email=email,
            reason="deleted in Outlook, kept in Business Central",
        )
    planning.claimed_outlook.add(stand_in)
    outlook = snap.outlook[stand_in]
    tagged = bool(snap.tags.get(stand_in))
    return Action(
        ActionKind.LINK,
        bc["id"],
        stand_in,
        _align_body(snap, bc, outlook, tagged=tagged),
        bc=bc,
        outlook=outlook,
        email=email,
        adopted=not tagged,
        reason="deleted in Outlook; the folder has another contact for it (same BC id tag "
        "or email), which is adopted instead of recreating one",
    )


def _pair_changed(planning: _Planning, bc: dict[str, Any], link: Link) -> Decision:
    """Both sides are there: BC's change goes to Outlook, an Outlook edit to BC if pulled, or the
    link only learns that both sides agree again."""
    snap = planning.snap
    ctx = snap.ctx
    bc_changed = fingerprint(bc_view(bc, ctx)) != link.bc_hash
    outlook = snap.outlook.get(link.outlook_id)
    if outlook is None:
        # needs() asked for the Outlook contact; only a dry run without fetches gets here.
        return _update_outlook(snap, bc, link, None, "changed in Business Central") if bc_changed else None
    if not link.outlook_hash:
        # Created in BC from this Outlook contact, but the run stopped before tagging it.
        reason = "tagged with its Business Central id (an earlier run was interrupted)"
        return _update_outlook(snap, bc, link, outlook, reason)
    edited = _outlook_edited(outlook, link, ctx)
    in_sync = outlook_view(outlook, ctx) == bc_view(bc, ctx)
    if planning.settings.pull_edits_from_outlook and edited and not bc_changed and not in_sync:
        return _edited_in_outlook(bc, link, outlook, ctx)
    if not in_sync and (bc_changed or snap.mode == FULL):
        why = "changed in Business Central" if bc_changed else "edited in Outlook; Business Central wins"
        return _update_outlook(snap, bc, link, outlook, why)
    categories = _categories(snap, outlook)
    if categories is not None:  # the category was turned on, renamed or off, or the user removed it
        return Action(
            ActionKind.UPDATE_OUTLOOK,
            bc["id"],
            link.outlook_id,
            {"categories": categories},
            bc=bc,
            outlook=outlook,
            email=bc.get("email"),
            reason="Outlook category set",
        )
    if in_sync and (bc_changed or edited):
        return Action(ActionKind.REFRESH_LINK, bc["id"], link.outlook_id, bc=bc, outlook=outlook)
    return None


def _edited_in_outlook(bc: dict[str, Any], link: Link, outlook: dict[str, Any], ctx: BcContext) -> Decision:
    """pullEditsFromOutlook: the Outlook edit goes to BC, with BC's etag (BEHAVIOUR §4.3.2)."""
    email = bc.get("email")
    notes: list[str] = []
    try:
        body = outlook_to_bc(outlook, current=bc, ctx=ctx, notes=notes)
    except MappingError as exc:
        return _skip(f"Outlook edit not sent to BC: {exc}", bc["id"], link.outlook_id, email)
    if not body:
        return _skip(f"Outlook edit not sent to BC: {'; '.join(notes)}", bc["id"], link.outlook_id, email)
    return Action(
        ActionKind.UPDATE_BC,
        bc["id"],
        link.outlook_id,
        body,
        etag=bc.get("@odata.etag"),
        bc=bc,
        outlook=outlook,
        email=email,
        reason="; ".join(["edited in Outlook", *notes]),
    )


def _unlinked_outlook(planning: _Planning, outlook_id: str) -> Decision:
    """An Outlook contact we have no link for: ours (tagged), the user's with an email BC has, or new."""
    outlook = planning.snap.outlook[outlook_id]
    tag = planning.snap.tags.get(outlook_id)
    if tag:
        return _tagged(planning, outlook_id, outlook, tag)
    email = outlook_email(outlook)
    matches = planning.bc_by_email.get(normalize_email(email), [])
    if planning.snap.default_folder and not _has_category(planning.snap, outlook):
        # The user's own contact in their default folder: adopted when BC has its email and it is
        # synced to them, otherwise none of the sync's business (not sent to BC, not reported).
        if not matches or outlook_is_eligible(outlook):
            return None
        adopted = _email_match(planning, outlook_id, outlook, matches)
        return adopted if isinstance(adopted, Action) else None
    reason = outlook_is_eligible(outlook)
    if reason:
        return _skip(reason, None, outlook_id, email)
    if matches:
        # Adopting links the user's contact to BC's (BC's data wins) instead of making a second
        # Outlook contact for it; nothing is sent to BC, so it does not depend on pullNewFromOutlook.
        return _email_match(planning, outlook_id, outlook, matches)
    return _new_in_outlook(planning, outlook_id, outlook)


def _tagged(planning: _Planning, outlook_id: str, outlook: dict[str, Any], tag: str) -> Decision:
    """An unlinked Outlook contact carrying a BC id: ours, from a lost link or an interrupted run."""
    snap = planning.snap
    email = outlook_email(outlook)
    planning.claimed_outlook.add(outlook_id)
    if snap.retired:
        return _company_removed(planning, tag, outlook_id, linked=False, email=email)
    if tag in planning.claimed_bc:
        # Another Outlook contact already stands for this BC contact: this one is a duplicate.
        reason = "duplicate of a contact already synced from Business Central"
        return _remove_from_folder(tag, outlook_id, reason, email=email, unlinks=False)
    if tag not in snap.bc_index:
        return _stop_syncing(
            planning.settings,
            tag,
            outlook_id,
            linked=False,
            delete_reason="deleted in Business Central",
            kept_reason="deleted in BC; removeFromOutlook is off",
            email=email,
        )
    bc = snap.bc.get(tag)
    if bc is None:
        return _skip("Business Central record not read in this run", tag, outlook_id, email)
    out_of_scope = _out_of_scope(bc, planning.contact_filter)
    if out_of_scope:
        return _stop_syncing(
            planning.settings,
            tag,
            outlook_id,
            linked=False,
            delete_reason=f"no longer synced: {out_of_scope}",
            kept_reason=f"{out_of_scope}; removeFromOutlook is off",
            bc=bc,
            email=email,
        )
    planning.claimed_bc.add(tag)
    return Action(
        ActionKind.LINK,
        tag,
        outlook_id,
        _align_body(snap, bc, outlook, tagged=True),
        bc=bc,
        outlook=outlook,
        email=bc.get("email"),
        reason="found by its Business Central id tag",
    )


def _email_match(
    planning: _Planning, outlook_id: str, outlook: dict[str, Any], matches: list[str]
) -> Decision:
    """A new Outlook contact whose email BC already has: link to it, BC's data wins (BEHAVIOUR §4.3)."""
    snap = planning.snap
    free = [bc_id for bc_id in matches if bc_id not in planning.claimed_bc]
    eligible = [
        bc_id
        for bc_id in free
        if bc_id in snap.bc and _out_of_scope(snap.bc[bc_id], planning.contact_filter) is None
    ]
    if eligible:
        bc = snap.bc[eligible[0]]
        planning.claimed_bc.add(bc["id"])
        planning.claimed_outlook.add(outlook_id)
        return Action(
            ActionKind.LINK,
            bc["id"],
            outlook_id,
            _with_categories(graph_patch(bc_to_outlook(bc, outlook, snap.ctx), outlook), snap, outlook),
            bc=bc,
            outlook=outlook,
            email=bc.get("email"),
            reason="matched a Business Central contact by email; BC's data kept",
            adopted=True,
        )
    if not free:
        reason = "a contact with this email is already synced to this folder"
    else:
        known = [snap.bc[bc_id] for bc_id in free if bc_id in snap.bc]
        why = _out_of_scope(known[0], planning.contact_filter) if known else "not readable"
        reason = f"Business Central already has this email, but that contact is not synced to you ({why})"
    return _skip(reason, None, outlook_id, outlook_email(outlook))


def _new_in_outlook(planning: _Planning, outlook_id: str, outlook: dict[str, Any]) -> Decision:
    """A contact the user made in Outlook: it goes to BC if pullNewFromOutlook (BEHAVIOUR §4.3.2)."""
    email = outlook_email(outlook)
    key = normalize_email(email)
    if not planning.settings.pull_new_from_outlook:
        return _skip("new Outlook contact not sent to BC: pullNewFromOutlook is off", None, outlook_id, email)
    if key in planning.new_by_email:
        reason = "another new Outlook contact with the same email goes to BC in this run"
        return _skip(reason, None, outlook_id, email)
    notes: list[str] = []
    try:
        body = outlook_to_bc(outlook, ctx=planning.snap.ctx, notes=notes)
    except MappingError as exc:
        return _skip(f"cannot be stored in Business Central: {exc}", None, outlook_id, email)
    planning.new_by_email[key] = outlook_id
    planning.claimed_outlook.add(outlook_id)
    reason = "; ".join(["new in Outlook", *notes])
    # The user made it: in their default folder it is theirs, released rather than deleted (§4.8).
    return Action(
        ActionKind.CREATE_BC,
        None,
        outlook_id,
        body,
        outlook=outlook,
        email=email,
        reason=reason,
        adopted=True,
    )


def _bc_only(planning: _Planning, bc: dict[str, Any]) -> Decision:
    """A BC contact with no Outlook counterpart: created in the folder when it is in scope."""
    reason = _out_of_scope(bc, planning.contact_filter)
    if reason:
        return _skip(reason, bc["id"], None, bc.get("email"))
    mode = planning.snap.mode
    return Action(
        ActionKind.CREATE_OUTLOOK,
        bc["id"],
        body=_with_categories(bc_to_outlook(bc, None, planning.snap.ctx), planning.snap, None),
        bc=bc,
        email=bc.get("email"),
        reason="new in Business Central" if mode == INCREMENTAL else "missing in Outlook",
    )


# Helpers the cases share ----------------------------------------------------------------------------


def _stop_syncing(
    settings: UserSettings,
    bc_id: str,
    outlook_id: str,
    *,
    linked: bool,
    delete_reason: str,
    kept_reason: str,
    gone: bool = False,
    gone_reason: str = "",
    bc: dict[str, Any] | None = None,
    email: str | None = None,
) -> Decision:
    """A contact that is no longer synced (deleted in BC, out of scope): drop the link if Outlook lost
    it too, else remove it from the folder (removeFromOutlook) or leave it there, unlinked.

    `linked`: a link ties it to `bc_id` (a linked pair), rather than only its BC id tag (an unlinked
    tagged contact, whose BC id's link, if any, belongs to another contact)."""
    if gone:
        return Action(ActionKind.UNLINK, bc_id, outlook_id, reason=gone_reason)
    if settings.remove_from_outlook:
        return _remove_from_folder(bc_id, outlook_id, delete_reason, bc=bc, email=email, unlinks=linked)
    if linked:
        return Action(ActionKind.UNLINK, bc_id, outlook_id, reason=kept_reason)
    return _skip(kept_reason, bc_id, outlook_id, email)


def _remove_from_folder(
    bc_id: str,
    outlook_id: str | None,
    reason: str,
    *,
    bc: dict[str, Any] | None = None,
    email: str | None = None,
    unlinks: bool = True,
) -> Action:
    return Action(
        ActionKind.DELETE_OUTLOOK, bc_id, outlook_id, bc=bc, email=email, reason=reason, unlinks=unlinks
    )


def _tag_property(bc_id: str, ctx: BcContext = DEFAULT_CONTEXT) -> list[dict[str, Any]]:
    """The BC id tag ("" releases), in the companies tag format (`tag_value`, BEHAVIOUR §5.4)."""
    return [{"id": BC_ID_PROPERTY_ID, "value": tag_value(bc_id, ctx.tag_company) if bc_id else ""}]


def _align_body(
    snap: Snapshot, bc: dict[str, Any], outlook: dict[str, Any], *, tagged: bool
) -> dict[str, Any] | None:
    """The PATCH that gives an adopted Outlook contact BC's values, its BC id tag and the run's
    category, or None when it has them all."""
    body: dict[str, Any] | None = None
    if outlook_view(outlook, snap.ctx) != bc_view(bc, snap.ctx):
        body = graph_patch(bc_to_outlook(bc, outlook, snap.ctx), outlook)
    categories = _categories(snap, outlook)
    if body is None and (categories is not None or not tagged):
        body = {"singleValueExtendedProperties": _tag_property(bc["id"], snap.ctx)}
    if body is not None and categories is not None:
        body["categories"] = categories
    return body


def _release(
    snap: Snapshot,
    bc_id: str,
    outlook_id: str,
    reason: str,
    *,
    bc: dict[str, Any] | None = None,
    email: str | None = None,
    folder_id: str | None = None,
    unlinks: bool = True,
) -> Action:
    """Stop syncing the user's own contact: an empty BC id tag (Graph documents no way to delete a
    single-value extended property; an empty one reads as untagged) and the sync's categories off,
    the user's own kept. The contact itself stays where the user had it."""
    outlook = snap.outlook.get(outlook_id) or snap.leftover.get(outlook_id)
    body: dict[str, Any] = {"singleValueExtendedProperties": _tag_property("")}
    if outlook is not None:
        categories = categories_for(None, snap.stale_categories | _own(snap.category), outlook)
        if categories is not None:
            body["categories"] = categories
    return Action(
        ActionKind.RELEASE_OUTLOOK,
        bc_id,
        outlook_id,
        body,
        bc=bc,
        outlook=outlook,
        email=email,
        reason=reason,
        folder_id=folder_id,
        unlinks=unlinks,
    )


def _own(category: str | None) -> frozenset[str]:
    return frozenset({category.casefold()}) if category else frozenset()


def _left_behind(planning: _Planning, outlook_id: str) -> Decision:
    """A contact in the folder a move leaves (BEHAVIOUR §4.8). Graph v1.0 has no move for contacts,
    so a move is a copy in the new folder (the linked pair's `_gone_from_outlook` row) and this row:
    the sync's own contact is deleted, the user's own (adopted) is released, untagged ones are the
    user's and stay as they are. The links belong to the copies, so nothing here unlinks."""
    snap = planning.snap
    tag = snap.tags.get(outlook_id)
    if not tag:
        return None
    contact = snap.leftover[outlook_id]
    email = outlook_email(contact)
    link = snap.links.get(tag)
    if link is not None and link.outlook_id == outlook_id and link.adopted:
        reason = (
            "moved to the new sync folder; your own contact is kept here, without the sync's tag and category"
        )
        return _release(
            snap, tag, outlook_id, reason, email=email, folder_id=snap.leftover_folder, unlinks=False
        )
    bc = snap.bc.get(tag)
    moved = bc is not None and _out_of_scope(bc, planning.contact_filter) is None
    if not moved and not planning.settings.remove_from_outlook:
        # No longer synced, and removeFromOutlook keeps such contacts: it stays, as the user's.
        reason = "no longer synced; removeFromOutlook is off: kept in the old folder, without the sync's tag"
        return _release(
            snap, tag, outlook_id, reason, email=email, folder_id=snap.leftover_folder, unlinks=False
        )
    reason = "moved to the new sync folder" if moved else "left the old sync folder; no longer synced"
    return Action(
        ActionKind.DELETE_OUTLOOK,
        tag,
        outlook_id,
        bc=bc,
        email=email,
        reason=reason,
        unlinks=False,
        folder_id=snap.leftover_folder,
        move=moved,
    )


def _update_outlook(
    snap: Snapshot, bc: dict[str, Any], link: Link, outlook: dict[str, Any] | None, reason: str
) -> Action:
    """Write BC's values over the linked Outlook contact, keeping what only Outlook holds."""
    ctx = snap.ctx
    return Action(
        ActionKind.UPDATE_OUTLOOK,
        bc["id"],
        link.outlook_id,
        _with_categories(graph_patch(bc_to_outlook(bc, outlook, ctx), outlook), snap, outlook),
        bc=bc,
        outlook=outlook,
        email=bc.get("email"),
        reason=reason,
    )


def _stand_in(planning: _Planning, bc_id: str, email: str | None) -> str | None:
    """An unlinked Outlook contact that already stands for a BC contact whose own Outlook contact is
    gone: one carrying its BC id tag (written by an interrupted run), else an untagged one with its
    email (the user's own). Adopting it avoids putting a second contact next to it."""
    snap = planning.snap
    key = normalize_email(email)
    by_email = None
    for outlook_id in sorted(snap.outlook):
        if outlook_id in planning.linked or outlook_id in planning.claimed_outlook:
            continue
        tag = snap.tags.get(outlook_id)
        if tag == bc_id:
            return outlook_id
        outlook = snap.outlook[outlook_id]
        same = not tag and key and normalize_email(outlook_email(outlook)) == key
        if by_email is None and same and outlook_is_eligible(outlook) is None:
            by_email = outlook_id
    return by_email


def _mass_removal_guard(result: Plan, snap: Snapshot, force: bool) -> None:
    """Refuse a run that would empty much of the folder at once (a wrong filter, a wrong company)."""
    if not force:
        result.safety_stop = removal_guard(removals(result), len(snap.links))


def removals(result: Plan) -> int:
    """The deletions the mass-removal guard counts: not the half of a move whose copy is made."""
    return sum(1 for a in result.actions if a.kind is ActionKind.DELETE_OUTLOOK and not a.move)


def removal_guard(deletions: int, linked: int) -> str | None:
    """Why a run removing `deletions` of the user's `linked` synced contacts must stop, or None: more
    than SAFETY_MIN and more than half. One rule for one company or the sum of several."""
    if deletions > SAFETY_MIN and deletions * 2 > linked:
        return (
            f"this run would remove {deletions} of {linked} synced contacts from Outlook; "
            "nothing was changed. Check the filter and company, then run again with force to proceed."
        )
    return None


# Which company an Outlook contact belongs to ---------------------------------------------------------


def route(
    *,
    linked_to: str | None,
    tag_company: str | None,
    tagged: bool,
    categories: list[str] | None,
    scopes: list[tuple[str, str | None]],
    home: str,
    email_in: str | None = None,
) -> str:
    """The company whose plan decides an Outlook contact (BEHAVIOUR §5.4), first rule that applies:

    | contact                                   | company                                     |
    |-------------------------------------------|---------------------------------------------|
    | linked                                    | the company of its link                     |
    | tagged with a BC id                       | the company its tag names (bare: home)      |
    | carries the category of a synced company  | that company (the first, in settings order) |
    | its email is a BC contact's of a company  | that company (`email_in`, the first)        |
    | anything else (a new contact)             | the first company of the settings           |

    `scopes`: (company id, category or None) in settings order; `home`: the company bare tags and
    links belong to; `email_in`: the first company whose BC has the contact's email, where it is
    adopted (or skipped, naming why), never doubled as a new contact of another company. A returned
    company need not be among `scopes` (its company left the settings).
    """
    if linked_to is not None:
        return linked_to
    if tagged:
        return tag_company or home
    carried = {str(c).strip().casefold() for c in categories or [] if str(c).strip()}
    for company, category in scopes:
        if category is not None and category.casefold() in carried:
            return company
    return email_in or scopes[0][0]


# After a BC write ---------------------------------------------------------------------------------


def after_bc_write(
    written: Action,
    bc: dict[str, Any],
    settings: UserSettings,
    contact_filter: ContactFilter,
    ctx: BcContext,
    *,
    category: str | None = None,
    stale_categories: frozenset[str] = frozenset(),
) -> Action | None:
    """What follows a BC write that landed (`bc` is BC's answer), for the Outlook contact it came from.

    A contact written to BC from Outlook may fall outside the user's filter: it leaves the folder in
    the same run (removeFromOutlook), so the run's result is what the next run expects (BEHAVIOUR §4.5
    idempotence). Otherwise the Outlook contact gets its BC id tag (a create) and BC's values where
    they differ; the report counts that with the BC write.
    """
    dropped = _out_of_scope(bc, contact_filter) if settings.remove_from_outlook else None
    if dropped and settings.in_default_folder:
        # The user's own contact in their default folder: it stays, without the sync's category.
        body: dict[str, Any] = {"singleValueExtendedProperties": _tag_property("")}
        categories = categories_for(None, stale_categories | _own(category), written.outlook)
        if categories is not None:
            body["categories"] = categories
        reason = f"in Business Central now; not synced to you: {dropped}"
        return Action(
            ActionKind.RELEASE_OUTLOOK,
            bc["id"],
            written.outlook_id,
            body,
            bc=bc,
            outlook=written.outlook,
            email=bc.get("email"),
            reason=reason,
        )
    if dropped:
        reason = f"in Business Central now; removed from the sync folder: {dropped}"
        return _remove_from_folder(bc["id"], written.outlook_id, reason, bc=bc, email=bc.get("email"))
    categories = categories_for(category, stale_categories, written.outlook)
    differs = outlook_view(written.outlook or {}, ctx) != bc_view(bc, ctx)
    if written.kind is ActionKind.CREATE_BC or differs or categories is not None:
        body = graph_patch(bc_to_outlook(bc, written.outlook, ctx), written.outlook)
        if categories is not None:
            body["categories"] = categories
        return Action(
            ActionKind.TAG_OUTLOOK,
            bc["id"],
            written.outlook_id,
            body,
            adopted=written.adopted,
            bc=bc,
            outlook=written.outlook,
            email=bc.get("email"),
            reason="tagged with its BC id",
        )
    return None
