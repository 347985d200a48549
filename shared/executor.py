"""Applies a plan: BC writes first, then Outlook writes, each link recorded as soon as its write lands.

Order matters for the guarantees of BEHAVIOUR §4.5:
- A new Outlook contact goes to BC first; the BC id that comes back is then written onto the Outlook
  contact (the tag) and linked, so the pair is never left without a way to find each other again.
- Links are stored after every batch, not at the end, so a crash loses at most one batch of links,
  and those contacts carry their BC id tag, which the next run adopts instead of duplicating.
- A write whose outcome is unknown is reported failed and never repeated blindly; the run then holds
  back its watermarks so the next run looks at the same changes again and resolves it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, assert_never

from shared import photos
from shared.bc_client import BcClient, BcWrite
from shared.filters import ContactFilter
from shared.graph_client import GraphClient
from shared.http_client import BatchItem, ItemResult
from shared.mapping import DEFAULT_CONTEXT, BcContext, bc_view, fingerprint, outlook_view
from shared.model import ActionKind, Link, ReportItem, RunReport, UserSettings, earliest, redact
from shared.planner import Action, Plan, after_bc_write
from shared.store import Store

log = logging.getLogger(__name__)

GRAPH_CHUNK = 20  # one Graph batch per mailbox in flight (4 run in parallel inside Graph)
BC_CHUNK = 100


@dataclass
class Outcome:
    """What the run learned while applying, for the watermark decision."""

    hold_bc_from: str | None = None  # earliest lastModifiedDateTime of a BC contact whose write failed
    hold_delta: bool = False  # an Outlook-originated change failed transiently: keep the delta link
    failures: int = 0
    # What this run did to the folder, to tell its own echoes from user changes in the next delta.
    written: dict[str, str] = field(default_factory=dict)  # Outlook id → fingerprint as written
    deleted: set[str] = field(default_factory=set)  # Outlook ids this run deleted
    photos_written: dict[str, str] = field(default_factory=dict)  # Outlook ids whose photo this run set
    # The folder a contact created through `/users/{id}/contacts` landed in: the default Contacts
    # folder's id, learnt from the first write when the folder was empty and its id unknown.
    folder_seen: str | None = None
    # The links this run stored (by BC id) and removed: with the links the run started from, what the
    # store now holds, without reading the user's whole partition again (the photo step needs it).
    links_saved: dict[str, Link] = field(default_factory=dict)
    links_removed: set[str] = field(default_factory=set)


_CREATES_CONTACT = frozenset({ActionKind.CREATE_OUTLOOK, ActionKind.RECREATE_OUTLOOK})

# A failed Outlook write based on a BC record holds the BC watermark before that record; a failed BC
# write from Outlook holds the delta link (when the failure may pass), so the next run sees it again.
_HOLDS_BC_WATERMARK = frozenset(
    {
        ActionKind.CREATE_OUTLOOK,
        ActionKind.RECREATE_OUTLOOK,
        ActionKind.UPDATE_OUTLOOK,
        ActionKind.TAG_OUTLOOK,
        ActionKind.RELEASE_OUTLOOK,
        ActionKind.LINK,
    }
)
_HOLDS_DELTA = frozenset({ActionKind.CREATE_BC, ActionKind.UPDATE_BC})

Route = Literal["store", "bc", "graph"]


def route_of(action: Action) -> Route:
    """Where an action is applied: the link table only, Business Central, or the Outlook folder.

    Exhaustive over ActionKind (the type checker proves it), so every kind the planner can make has
    exactly one way through the executor."""
    kind = action.kind
    match kind:
        case ActionKind.UNLINK | ActionKind.REFRESH_LINK:
            return "store"
        case ActionKind.LINK if action.body is None:
            return "store"  # adopted as it is: only the link is new
        case ActionKind.CREATE_BC | ActionKind.UPDATE_BC:
            return "bc"
        case (
            ActionKind.CREATE_OUTLOOK
            | ActionKind.RECREATE_OUTLOOK
            | ActionKind.UPDATE_OUTLOOK
            | ActionKind.DELETE_OUTLOOK
            | ActionKind.TAG_OUTLOOK
            | ActionKind.RELEASE_OUTLOOK
            | ActionKind.LINK
        ):
            return "graph"
        case _:
            assert_never(kind)


def _transient(result: ItemResult) -> bool:
    status = result.status
    return result.ambiguous or status is None or status in (408, 409, 412, 423, 429) or status >= 500


def _failure_reason(result: ItemResult) -> str:
    why = result.error or f"status {result.status}"
    if result.ambiguous:
        why = f"{why}; the outcome is unknown and is resolved by the next run"
    return why


class Executor:
    def __init__(
        self,
        *,
        settings: UserSettings,
        contact_filter: ContactFilter,
        company_id: str,
        folder_id: str | None,
        bc: BcClient,
        graph: GraphClient,
        store: Store,
        report: RunReport,
        heartbeat: Callable[[], None] = lambda: None,
        checkpoint: Callable[[str], None] = lambda name: None,
        ctx: BcContext = DEFAULT_CONTEXT,
        link_key: Callable[[str], str] = lambda bc_id: bc_id,
        links: dict[str, Link] | None = None,
        category: str | None = None,
        stale_categories: frozenset[str] = frozenset(),
    ):
        self.settings = settings
        self.user = settings.user
        # After a BC write, the planner decides what happens to the Outlook contact (after_bc_write).
        self.contact_filter = contact_filter
        self.company_id = company_id
        self.folder_id = folder_id
        self.bc = bc
        self.graph = graph
        self.store = store
        self.report = report
        self.heartbeat = heartbeat
        self.checkpoint = checkpoint
        self.ctx = ctx
        # Where a link of this company is stored: its BC id, or "{companyId}|{bcId}" for a company
        # other than the user's home one (BEHAVIOUR §5.4).
        self.link_key = link_key
        # The links the plan was made from: an adopted contact stays adopted while its link is kept.
        self.links = links or {}
        self.category = category
        self.stale_categories = stale_categories
        self.outcome = Outcome()

    # Bookkeeping --------------------------------------------------------------------------
    def _record_failure(self, action: Action, result: ItemResult | None, reason: str) -> None:
        self.outcome.failures += 1
        self.report.add("failed", action.bc_id, action.outlook_id, action.email, reason)
        log.warning("contact sync item failed: %s (%s)", action.kind.value, redact(reason, self.user))
        if action.bc is not None and action.kind in _HOLDS_BC_WATERMARK:
            self.outcome.hold_bc_from = earliest(
                self.outcome.hold_bc_from, action.bc.get("lastModifiedDateTime")
            )
        if action.kind in _HOLDS_DELTA and (result is None or _transient(result)):
            self.outcome.hold_delta = True

    def _link(
        self,
        bc: dict[str, Any] | None,
        outlook: dict[str, Any] | None,
        outlook_id: str | None,
        adopted: bool = False,
    ) -> Link:
        if bc is None or outlook is None or outlook_id is None:
            raise ValueError("a link needs both records and the Outlook id")
        known = self.links.get(bc["id"])
        if known is not None and known.outlook_id != outlook_id:
            known = None  # the link moves to another contact: the old one's adoption and photo are not its
        if known is not None and known.adopted:
            adopted = True
        link = Link(
            bc_id=bc["id"],
            outlook_id=outlook_id,
            bc_hash=fingerprint(bc_view(bc, self.ctx)),
            outlook_hash=fingerprint(outlook_view(outlook, self.ctx)),
            email=bc.get("email") or "",
            adopted=adopted,
        )
        if known is not None:  # the photo state is the photo step's (shared/photos.py): kept
            link.photo, link.photo_stamp, link.photo_etag = known.photo, known.photo_stamp, known.photo_etag
        return link

    def _save_links(self, upserts: list[Link], deletes: list[str]) -> None:
        self.checkpoint("before_links")
        for link in upserts:
            self.outcome.links_saved[link.bc_id] = link
            self.outcome.links_removed.discard(link.bc_id)
        for bc_id in deletes:
            self.outcome.links_saved.pop(bc_id, None)
            self.outcome.links_removed.add(bc_id)
        if upserts:
            self.store.upsert_links(
                self.user, [replace(link, bc_id=self.link_key(link.bc_id)) for link in upserts]
            )
        if deletes:
            self.store.delete_links(self.user, [self.link_key(bc_id) for bc_id in deletes])

    # The plan -------------------------------------------------------------------------------
    def apply(self, plan: Plan) -> Outcome:
        """Store-only changes first, then BC writes (with their Outlook follow-ups), then Outlook."""
        store_upserts: list[Link] = []
        store_deletes: list[str] = []
        routed: dict[Route, list[Action]] = {"bc": [], "graph": []}
        for action in plan.actions:
            route = route_of(action)
            if route != "store":
                routed[route].append(action)
            elif action.kind is ActionKind.UNLINK:
                store_deletes.append(_bc_id(action))
                self.report.items.append(_report_item("unlinked", action))
            else:  # refresh_link, or a link that writes nothing to Outlook
                store_upserts.append(self._link(action.bc, action.outlook, action.outlook_id, action.adopted))
                if action.kind is ActionKind.LINK:
                    self.report.add("linked", action.bc_id, action.outlook_id, action.email, action.reason)
        if store_upserts or store_deletes:
            self._save_links(store_upserts, store_deletes)
        graph_actions = routed["graph"] + self._apply_bc(routed["bc"])
        self._apply_graph(graph_actions)
        return self.outcome

    def _apply_bc(self, actions: list[Action]) -> list[Action]:
        """Write to BC; returns the Outlook follow-ups the planner decides (tag, align or remove)."""
        follow_ups: list[Action] = []
        for start in range(0, len(actions), BC_CHUNK):
            chunk = actions[start : start + BC_CHUNK]
            writes = [
                BcWrite("POST", action.body)
                if action.kind is ActionKind.CREATE_BC
                else BcWrite("PATCH", action.body, action.bc_id, action.etag)
                for action in chunk
            ]
            results = self._write_bc(chunk, writes)
            self.checkpoint("after_bc_batch")
            links: list[Link] = []
            for action, result in zip(chunk, results, strict=True):
                if not result.ok or not isinstance(result.body, dict):
                    why = _failure_reason(result)
                    if action.kind is ActionKind.UPDATE_BC and result.status == 412:
                        why = "changed in Business Central meanwhile; Business Central wins"
                    self._record_failure(action, result, why)
                    continue
                bc = result.body
                self.report.add(action.report_as, bc["id"], action.outlook_id, action.email, action.reason)
                # Link now; an empty Outlook hash marks "not tagged yet" until the follow-up lands, so
                # a run interrupted in between tags it next time (see planner).
                link = self._link(bc, action.outlook, action.outlook_id, action.adopted)
                if action.kind is ActionKind.CREATE_BC:
                    link.outlook_hash = ""
                links.append(link)
                follow_up = after_bc_write(
                    action,
                    bc,
                    self.settings,
                    self.contact_filter,
                    self.ctx,
                    category=self.category,
                    stale_categories=self.stale_categories,
                )
                if follow_up is not None:
                    follow_ups.append(follow_up)
            if links:
                self._save_links(links, [])
            self.heartbeat()
            self.checkpoint("batch_done")  # a clean stopping point: this batch's links are stored
        return follow_ups

    def _write_bc(self, chunk: list[Action], writes: list[BcWrite]) -> list[ItemResult]:
        """BC writes in one `$batch`. Values BC would refuse for reasons the run can see in data (an
        unknown company name or country) were left out by the mapping before this point, so no
        answer is ever recognised by its message text, which BC localizes."""
        return self.bc.write(self.company_id, writes)

    def _graph_item(self, action: Action) -> BatchItem:
        folder = action.folder_id or self.folder_id
        if action.kind in (ActionKind.CREATE_OUTLOOK, ActionKind.RECREATE_OUTLOOK):
            return self.graph.contact_op(self.user, folder, "POST", body=action.body)
        if action.kind is ActionKind.DELETE_OUTLOOK:
            return self.graph.contact_op(self.user, folder, "DELETE", action.outlook_id)
        return self.graph.contact_op(self.user, folder, "PATCH", action.outlook_id, action.body)

    def _apply_graph(self, actions: list[Action]) -> None:
        for start in range(0, len(actions), GRAPH_CHUNK):
            chunk = actions[start : start + GRAPH_CHUNK]
            results = self.graph.write([self._graph_item(action) for action in chunk])
            self.checkpoint("after_graph_batch")
            upserts: list[Link] = []
            deletes: list[str] = []
            for action, result in zip(chunk, results, strict=True):
                if action.kind is ActionKind.DELETE_OUTLOOK:
                    self._deleted(action, result, deletes)
                elif action.kind is ActionKind.RELEASE_OUTLOOK:
                    self._released(action, result, deletes)
                else:
                    self._written(action, result, upserts)
            if upserts or deletes:
                self._save_links(upserts, deletes)
            self.heartbeat()
            self.checkpoint("batch_done")  # a clean stopping point: this batch's links are stored

    def _deleted(self, action: Action, result: ItemResult, deletes: list[str]) -> None:
        outlook_id = _outlook_id(action)
        if result.ok or result.status == 404:  # already gone is as good as deleted
            self.outcome.deleted.add(outlook_id)
            self.report.add(action.report_as, action.bc_id, outlook_id, action.email, action.reason)
            if action.bc_id and action.unlinks:
                deletes.append(action.bc_id)
        else:
            self._record_failure(action, result, result.error or f"status {result.status}")

    def _released(self, action: Action, result: ItemResult, deletes: list[str]) -> None:
        """The user's own contact no longer carries our tag and category: it is theirs again. Gone
        already (404) is as good: nothing of ours is left on it."""
        outlook_id = _outlook_id(action)
        if result.ok or result.status == 404:
            if result.ok and isinstance(result.body, dict):
                # Our own write: the next delta shows it, and it must not read as a user change.
                self.outcome.written[outlook_id] = fingerprint(outlook_view(result.body, self.ctx))
            self.report.items.append(_report_item("released", action))
            if action.bc_id and action.unlinks:
                deletes.append(action.bc_id)
        else:
            self._record_failure(action, result, _failure_reason(result))

    def _written(self, action: Action, result: ItemResult, upserts: list[Link]) -> None:
        if not result.ok or not isinstance(result.body, dict):
            why = _failure_reason(result)
            if not result.ambiguous and result.status == 404:
                why = "the Outlook contact disappeared meanwhile; it is recreated by the next run"
            self._record_failure(action, result, why)
            return
        body: dict[str, Any] = result.body
        new_id: str = body["id"] if "id" in body else _outlook_id(action)  # a create answers its id
        if action.report_as:
            self.report.add(action.report_as, action.bc_id, new_id, action.email, action.reason)
        if action.kind in (ActionKind.CREATE_OUTLOOK, ActionKind.RECREATE_OUTLOOK) and body.get(
            "parentFolderId"
        ):
            self.outcome.folder_seen = self.outcome.folder_seen or str(body["parentFolderId"])
        link = self._link(action.bc, body, new_id, action.adopted)
        settled = None
        if self.settings.sync_photos and action.bc is not None and action.kind in _CREATES_CONTACT:
            settled = photos.new_contact_state(action.bc)
        if settled is not None:
            link.photo, link.photo_stamp, link.photo_etag = settled
        self.outcome.written[new_id] = link.outlook_hash
        upserts.append(link)


def _bc_id(action: Action) -> str:
    if action.bc_id is None:
        raise ValueError(f"{action.kind.value} needs a Business Central id")
    return action.bc_id


def _outlook_id(action: Action) -> str:
    if action.outlook_id is None:
        raise ValueError(f"{action.kind.value} needs an Outlook id")
    return action.outlook_id


def _report_item(action: str, planned: Action) -> ReportItem:
    return ReportItem(action, planned.bc_id, planned.outlook_id, planned.email, planned.reason)
