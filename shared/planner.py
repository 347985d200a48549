"""The sync decision, as a pure function: both sides + links + settings → actions.

Nothing here calls an API or the store. `sync` gathers a `Snapshot`, asks `needs()` which records
are still missing to decide (e.g. the Outlook contact behind a BC change, so its extra email
addresses are preserved), fetches them, then calls `plan()`. The executor applies the plan; a dry
run reports it and stops. Keeping the decision pure is what makes dry runs honest and lets the
tests explore it directly.

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
)
from shared.model import Link, ReportItem, UserSettings

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


@dataclass
class Needs:
    """Records `plan()` needs and the snapshot lacks; `sync` fetches them and plans again."""

    tags: set[str] = field(default_factory=set)  # Outlook ids whose BC-id tag is unknown
    bc: set[str] = field(default_factory=set)  # BC ids whose full record is needed
    outlook: set[str] = field(default_factory=set)  # Outlook ids whose current content is needed

    def __bool__(self) -> bool:
        return bool(self.tags or self.bc or self.outlook)


@dataclass
class Action:
    kind: str  # create_outlook | recreate_outlook | update_outlook | delete_outlook | create_bc | update_bc
    #            link (adopt, optional Outlook update) | refresh_link (store only) | unlink (store only)
    report_as: str  # counts key of the run report, or "" for store-only actions
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

    @property
    def writes(self) -> bool:
        return self.kind not in ("refresh_link", "unlink")


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    skipped: list[ReportItem] = field(default_factory=list)
    safety_stop: str | None = None  # why the plan was stopped by the mass-deletion guard

    def count(self, kind: str) -> int:
        return sum(1 for a in self.actions if a.kind == kind)


def _bc_reason(bc: dict[str, Any], flt: ContactFilter) -> str | None:
    reason = bc_is_eligible(bc)
    if reason:
        return reason
    if not flt.matches(bc):
        return "does not match your filter"
    return None


def _outlook_id_index(links: dict[str, Link]) -> dict[str, str]:
    return {link.outlook_id: bc_id for bc_id, link in links.items()}


def needs(snap: Snapshot, settings: UserSettings, flt: ContactFilter) -> Needs:
    """What must be fetched before `plan()` can decide every contact correctly."""
    out = Needs()
    by_outlook = _outlook_id_index(snap.links)
    # 1. Tags of Outlook contacts we do not know: ours (crash, lost links) or the user's own?
    for oid in snap.outlook:
        if oid not in by_outlook and oid not in snap.tags:
            out.tags.add(oid)
    if out.tags:
        return out  # tags decide which BC records matter; ask again once they are known
    # 2. Unlinked Outlook contacts: the BC record they are tagged with or match by email.
    bc_by_email = _bc_by_email(snap.bc_index)
    for oid, contact in snap.outlook.items():
        if oid in by_outlook:
            continue
        tag = snap.tags.get(oid)
        if tag:
            if tag in snap.bc_index and tag not in snap.bc:
                out.bc.add(tag)
            # A duplicate, or the stand-in of a linked contact that is gone (e.g. with a deleted
            # folder)? Only the linked contact's existence tells.
            link = snap.links.get(tag)
            unknown = (
                link and link.outlook_id not in snap.outlook and link.outlook_id not in snap.outlook_removed
            )
            if unknown and not snap.outlook_complete:
                out.outlook.add(link.outlook_id)
            continue
        email = normalize_email(outlook_email(contact))
        if email:  # an email match is adopted even with pullNewFromOutlook off: nothing goes to BC
            for bc_id in bc_by_email.get(email, []):
                if bc_id not in snap.bc:
                    out.bc.add(bc_id)
    # 3. Linked pairs.
    for bc_id, link in snap.links.items():
        if bc_id not in snap.bc_index:
            continue  # deleted in BC: nothing more to know
        bc = snap.bc.get(bc_id)
        removed = link.outlook_id in snap.outlook_removed or (
            snap.outlook_complete and link.outlook_id not in snap.outlook
        )
        o = snap.outlook.get(link.outlook_id)
        if not link.outlook_hash and not removed:  # linked but never tagged: an interrupted run
            if bc is None:
                out.bc.add(bc_id)
            if o is None:
                out.outlook.add(link.outlook_id)
            continue
        if bc is None:
            if removed:
                out.bc.add(bc_id)  # to recreate it
            elif o is not None and settings.pull_edits_from_outlook and _outlook_edited(o, link, snap.ctx):
                out.bc.add(bc_id)  # to push the edit with BC's etag
            continue
        if removed or o is not None:
            continue
        if _bc_reason(bc, flt) is None and fingerprint(bc_view(bc, snap.ctx)) != link.bc_hash:
            out.outlook.add(link.outlook_id)  # the update must preserve Outlook-only values
    return out


def _outlook_edited(o: dict[str, Any], link: Link, ctx: BcContext) -> bool:
    return fingerprint(outlook_view(o, ctx)) != link.outlook_hash


def _bc_by_email(index: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for bc_id, email in index.items():
        if email:
            out[email].append(bc_id)
    return out


def plan(snap: Snapshot, settings: UserSettings, flt: ContactFilter, *, force: bool = False) -> Plan:
    """Decide every action of the run. Deterministic: same inputs, same plan, same order."""
    result = Plan()
    ctx = snap.ctx
    by_outlook = _outlook_id_index(snap.links)
    claimed_bc: set[str] = set()  # BC ids that got an Outlook counterpart in this plan
    claimed_outlook: set[str] = set()

    def skip(reason: str, bc_id: str | None = None, oid: str | None = None, email: str | None = None) -> None:
        result.skipped.append(ReportItem("skipped", bc_id, oid, email, reason))

    def removed(link: Link) -> bool:
        return link.outlook_id in snap.outlook_removed or (
            snap.outlook_complete and link.outlook_id not in snap.outlook
        )

    # 1. Linked pairs --------------------------------------------------------------------
    for bc_id in sorted(snap.links):
        link = snap.links[bc_id]
        gone = removed(link)
        o = snap.outlook.get(link.outlook_id)
        if bc_id not in snap.bc_index:  # deleted in BC
            result.actions.append(
                _leave(
                    settings,
                    bc_id,
                    link,
                    gone,
                    gone_reason="deleted on both sides",
                    delete_reason="deleted in Business Central",
                    kept_reason="deleted in BC; removeFromOutlook is off",
                    email=link.email,
                )
            )
            claimed_bc.add(bc_id)
            continue
        bc = snap.bc.get(bc_id)
        claimed_bc.add(bc_id)
        claimed_outlook.add(link.outlook_id)
        if bc is None:
            continue  # unchanged in BC; Outlook edits are ignored unless pulled (needs() fetched bc then)
        reason = _bc_reason(bc, flt)
        email = bc.get("email")
        if reason:
            result.actions.append(
                _leave(
                    settings,
                    bc_id,
                    link,
                    gone,
                    gone_reason=reason,
                    delete_reason=f"no longer synced: {reason}",
                    kept_reason=f"{reason}; removeFromOutlook is off",
                    bc=bc,
                    email=email,
                )
            )
            continue
        if gone:
            stand_in = _stand_in(snap, by_outlook, bc_id, email, claimed_outlook)
            if stand_in is not None:
                o = snap.outlook[stand_in]
                claimed_outlook.add(stand_in)
                result.actions.append(
                    Action(
                        "link",
                        "linked",
                        bc_id,
                        stand_in,
                        None
                        if outlook_view(o, ctx) == bc_view(bc, ctx)
                        else graph_patch(bc_to_outlook(bc, o, ctx), o),
                        bc=bc,
                        outlook=o,
                        email=email,
                        reason="deleted in Outlook; the folder has another contact for it (same BC id tag "
                        "or email), which is adopted instead of recreating one",
                    )
                )
                continue
            result.actions.append(
                Action(
                    "recreate_outlook",
                    "outlookRecreated",
                    bc_id,
                    None,
                    bc_to_outlook(bc, None, ctx),
                    bc=bc,
                    email=email,
                    reason="deleted in Outlook, kept in Business Central",
                )
            )
            continue
        bc_changed = fingerprint(bc_view(bc, ctx)) != link.bc_hash
        if o is None:
            if bc_changed:  # needs() asked for o; only a dry run without fetches can get here
                result.actions.append(_update_outlook(bc, link, None, "changed in Business Central", ctx))
            continue
        if not link.outlook_hash:
            # Created in BC from this Outlook contact, but the run stopped before tagging it.
            result.actions.append(
                _update_outlook(
                    bc, link, o, "tagged with its Business Central id (an earlier run was interrupted)", ctx
                )
            )
            continue
        edited = _outlook_edited(o, link, ctx)
        in_sync = outlook_view(o, ctx) == bc_view(bc, ctx)
        if settings.pull_edits_from_outlook and edited and not bc_changed and not in_sync:
            notes: list[str] = []
            try:
                body = outlook_to_bc(o, current=bc, ctx=ctx, notes=notes)
            except MappingError as exc:
                skip(f"Outlook edit not sent to BC: {exc}", bc_id, link.outlook_id, email)
                continue
            if not body:
                skip(f"Outlook edit not sent to BC: {'; '.join(notes)}", bc_id, link.outlook_id, email)
                continue
            result.actions.append(
                Action(
                    "update_bc",
                    "bcUpdated",
                    bc_id,
                    link.outlook_id,
                    body,
                    etag=bc.get("@odata.etag"),
                    bc=bc,
                    outlook=o,
                    email=email,
                    reason="; ".join(["edited in Outlook", *notes]),
                )
            )
        elif not in_sync and (bc_changed or snap.mode == FULL):
            why = "changed in Business Central" if bc_changed else "edited in Outlook; Business Central wins"
            result.actions.append(_update_outlook(bc, link, o, why, ctx))
        elif in_sync and (bc_changed or edited):
            result.actions.append(Action("refresh_link", "", bc_id, link.outlook_id, bc=bc, outlook=o))

    # 2. Outlook contacts we have no link for ------------------------------------------
    bc_by_email = _bc_by_email(snap.bc_index)
    new_by_email: dict[str, str] = {}  # normalized email → Outlook id that goes to BC in this run
    for oid in sorted(snap.outlook):
        if oid in by_outlook or oid in claimed_outlook:
            continue
        o = snap.outlook[oid]
        tag = snap.tags.get(oid)
        if tag:
            _plan_tagged(result, snap, settings, flt, oid, o, tag, claimed_bc, claimed_outlook)
            continue
        email = outlook_email(o)
        reason = outlook_is_eligible(o)
        if reason:
            skip(reason, None, oid, email)
            continue
        key = normalize_email(email)
        matches = bc_by_email.get(key, [])
        if matches:
            # Adopting links the user's contact to BC's (BC's data wins) instead of making a second
            # Outlook contact for it; nothing is sent to BC, so it does not depend on pullNewFromOutlook.
            _plan_email_match(result, snap, flt, oid, o, matches, claimed_bc, claimed_outlook)
            continue
        if not settings.pull_new_from_outlook:
            skip("new Outlook contact not sent to BC: pullNewFromOutlook is off", None, oid, email)
            continue
        if key in new_by_email:
            skip("another new Outlook contact with the same email goes to BC in this run", None, oid, email)
            continue
        notes = []
        try:
            body = outlook_to_bc(o, ctx=ctx, notes=notes)
        except MappingError as exc:
            skip(f"cannot be stored in Business Central: {exc}", None, oid, email)
            continue
        new_by_email[key] = oid
        claimed_outlook.add(oid)
        reason = "; ".join(["new in Outlook", *notes])
        result.actions.append(
            Action("create_bc", "bcCreated", None, oid, body, outlook=o, email=email, reason=reason)
        )

    # 3. BC contacts with no Outlook counterpart ----------------------------------------
    for bc_id in sorted(snap.bc):
        if bc_id in claimed_bc:
            continue
        bc = snap.bc[bc_id]
        reason = _bc_reason(bc, flt)
        if reason:
            skip(reason, bc_id, None, bc.get("email"))
            continue
        result.actions.append(
            Action(
                "create_outlook",
                "outlookCreated",
                bc_id,
                None,
                bc_to_outlook(bc, None, ctx),
                bc=bc,
                email=bc.get("email"),
                reason="new in Business Central" if snap.mode == INCREMENTAL else "missing in Outlook",
            )
        )

    _guard(result, snap, force)
    return result


def _leave(
    settings: UserSettings,
    bc_id: str,
    link: Link,
    gone: bool,
    *,
    gone_reason: str,
    delete_reason: str,
    kept_reason: str,
    bc: dict[str, Any] | None = None,
    email: str | None = None,
) -> Action:
    """A linked contact that is no longer synced: drop the link if Outlook lost it too, else remove
    it from the folder (removeFromOutlook) or leave it there unlinked."""
    if gone:
        return Action("unlink", "", bc_id, link.outlook_id, reason=gone_reason)
    if settings.remove_from_outlook:
        return Action(
            "delete_outlook",
            "outlookDeleted",
            bc_id,
            link.outlook_id,
            bc=bc,
            email=email,
            reason=delete_reason,
        )
    return Action("unlink", "", bc_id, link.outlook_id, reason=kept_reason)


def _update_outlook(
    bc: dict[str, Any], link: Link, o: dict[str, Any] | None, reason: str, ctx: BcContext
) -> Action:
    """Write BC's values over the linked Outlook contact, keeping what only Outlook holds."""
    return Action(
        "update_outlook",
        "outlookUpdated",
        bc["id"],
        link.outlook_id,
        graph_patch(bc_to_outlook(bc, o, ctx), o),
        bc=bc,
        outlook=o,
        email=bc.get("email"),
        reason=reason,
    )


def _stand_in(
    snap: Snapshot, by_outlook: dict[str, str], bc_id: str, email: str | None, claimed: set[str]
) -> str | None:
    """An unlinked Outlook contact that already stands for a BC contact whose own Outlook contact is
    gone: one carrying its BC id tag (written by an interrupted run), else an untagged one with its
    email (the user's own). Adopting it avoids putting a second contact next to it."""
    key = normalize_email(email)
    by_email = None
    for oid in sorted(snap.outlook):
        if oid in by_outlook or oid in claimed:
            continue
        tag = snap.tags.get(oid)
        if tag == bc_id:
            return oid
        o = snap.outlook[oid]
        same = not tag and key and normalize_email(outlook_email(o)) == key
        if by_email is None and same and outlook_is_eligible(o) is None:
            by_email = oid
    return by_email


def _plan_tagged(
    result: Plan,
    snap: Snapshot,
    settings: UserSettings,
    flt: ContactFilter,
    oid: str,
    o: dict[str, Any],
    tag: str,
    claimed_bc: set[str],
    claimed_outlook: set[str],
) -> None:
    """An unlinked Outlook contact carrying a BC id: ours, from a lost link or an interrupted run."""
    email = outlook_email(o)
    claimed_outlook.add(oid)
    if tag in claimed_bc:
        # Another Outlook contact already stands for this BC contact: this one is a duplicate.
        result.actions.append(
            Action(
                "delete_outlook",
                "outlookDeleted",
                tag,
                oid,
                email=email,
                reason="duplicate of a contact already synced from Business Central",
                unlinks=False,
            )
        )
        return
    if tag not in snap.bc_index:
        if settings.remove_from_outlook:
            result.actions.append(
                Action(
                    "delete_outlook",
                    "outlookDeleted",
                    tag,
                    oid,
                    email=email,
                    reason="deleted in Business Central",
                    unlinks=False,
                )
            )
        else:
            result.skipped.append(
                ReportItem("skipped", tag, oid, email, "deleted in BC; removeFromOutlook is off")
            )
        return
    bc = snap.bc.get(tag)
    if bc is None:
        result.skipped.append(
            ReportItem("skipped", tag, oid, email, "Business Central record not read in this run")
        )
        return
    reason = _bc_reason(bc, flt)
    if reason:
        if settings.remove_from_outlook:
            result.actions.append(
                Action(
                    "delete_outlook",
                    "outlookDeleted",
                    tag,
                    oid,
                    bc=bc,
                    email=email,
                    reason=f"no longer synced: {reason}",
                    unlinks=False,
                )
            )
        else:
            result.skipped.append(
                ReportItem("skipped", tag, oid, email, f"{reason}; removeFromOutlook is off")
            )
        return
    claimed_bc.add(tag)
    ctx = snap.ctx
    body = None if outlook_view(o, ctx) == bc_view(bc, ctx) else graph_patch(bc_to_outlook(bc, o, ctx), o)
    result.actions.append(
        Action(
            "link",
            "linked",
            tag,
            oid,
            body,
            bc=bc,
            outlook=o,
            email=bc.get("email"),
            reason="found by its Business Central id tag",
        )
    )


def _plan_email_match(
    result: Plan,
    snap: Snapshot,
    flt: ContactFilter,
    oid: str,
    o: dict[str, Any],
    matches: list[str],
    claimed_bc: set[str],
    claimed_outlook: set[str],
) -> None:
    """A new Outlook contact whose email BC already has: link to it, BC's data wins (BEHAVIOUR §4.3)."""
    email = outlook_email(o)
    free = [m for m in matches if m not in claimed_bc]
    eligible = [m for m in free if m in snap.bc and _bc_reason(snap.bc[m], flt) is None]
    if eligible:
        bc_id = eligible[0]
        bc = snap.bc[bc_id]
        claimed_bc.add(bc_id)
        claimed_outlook.add(oid)
        result.actions.append(
            Action(
                "link",
                "linked",
                bc_id,
                oid,
                graph_patch(bc_to_outlook(bc, o, snap.ctx), o),
                bc=bc,
                outlook=o,
                email=bc.get("email"),
                reason="matched a Business Central contact by email; BC's data kept",
            )
        )
        return
    if not free:
        reason = "a contact with this email is already synced to this folder"
    else:
        known = [snap.bc[m] for m in free if m in snap.bc]
        why = _bc_reason(known[0], flt) if known else "not readable"
        reason = f"Business Central already has this email, but that contact is not synced to you ({why})"
    result.skipped.append(ReportItem("skipped", None, oid, email, reason))


def _guard(result: Plan, snap: Snapshot, force: bool) -> None:
    """Refuse a run that would empty much of the folder at once (a wrong filter, a wrong company)."""
    deletions = result.count("delete_outlook")
    linked = len(snap.links)
    if not force and deletions > SAFETY_MIN and deletions * 2 > linked:
        result.safety_stop = (
            f"this run would remove {deletions} of {linked} synced contacts from Outlook; "
            "nothing was changed. Check the filter and company, then run again with force to proceed."
        )
