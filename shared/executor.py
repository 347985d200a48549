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
from dataclasses import dataclass, field
from typing import Any

from shared.bc_client import BcClient, BcWrite
from shared.graph_client import GraphClient
from shared.http import BatchItem, ItemResult
from shared.mapping import (
    DEFAULT_CONTEXT,
    BcContext,
    bc_to_outlook,
    bc_view,
    fingerprint,
    graph_patch,
    outlook_view,
)
from shared.model import Link, ReportItem, RunReport, redact
from shared.planner import Action, Plan
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
    links_written: int = 0
    # What this run did to the folder, to tell its own echoes from user changes in the next delta.
    written: dict[str, str] = field(default_factory=dict)  # Outlook id → fingerprint as written
    deleted: set[str] = field(default_factory=set)  # Outlook ids this run deleted


def _transient(res: ItemResult) -> bool:
    return res.ambiguous or res.status is None or res.status in (408, 409, 412, 423, 429) or res.status >= 500


class Executor:
    def __init__(
        self,
        *,
        user: str,
        company_id: str,
        folder_id: str,
        bc: BcClient,
        graph: GraphClient,
        store: Store,
        report: RunReport,
        heartbeat: Callable[[], None] = lambda: None,
        checkpoint: Callable[[str], None] = lambda name: None,
        not_kept: Callable[[dict[str, Any]], str | None] = lambda bc: None,
        remove_from_outlook: bool = True,
        ctx: BcContext = DEFAULT_CONTEXT,
    ):
        self.user = user
        self.company_id = company_id
        self.folder_id = folder_id
        self.bc = bc
        self.graph = graph
        self.store = store
        self.report = report
        self.heartbeat = heartbeat
        self.checkpoint = checkpoint
        # Why the user's folder would not hold a BC record (eligibility, filter), or None. A contact
        # written to BC from Outlook may fall outside the user's filter; it leaves the folder in the
        # same run, so the run's result is what the next run expects (BEHAVIOUR §4.5 idempotence).
        self.not_kept = not_kept
        self.remove_from_outlook = remove_from_outlook
        self.ctx = ctx
        self.outcome = Outcome()

    # Bookkeeping --------------------------------------------------------------------------
    def _fail(self, action: Action, res: ItemResult | None, reason: str) -> None:
        self.outcome.failures += 1
        self.report.add("failed", action.bc_id, action.outlook_id, action.email, reason)
        log.warning("contact sync item failed: %s (%s)", action.kind, redact(reason, self.user))
        if action.bc is not None and action.kind in (
            "create_outlook",
            "recreate_outlook",
            "update_outlook",
            "link",
        ):
            modified = action.bc.get("lastModifiedDateTime")
            if modified and (self.outcome.hold_bc_from is None or modified < self.outcome.hold_bc_from):
                self.outcome.hold_bc_from = modified
        if action.kind in ("create_bc", "update_bc") and (res is None or _transient(res)):
            self.outcome.hold_delta = True

    def _link(self, bc: dict[str, Any], outlook: dict[str, Any], outlook_id: str) -> Link:
        return Link(
            bc_id=bc["id"],
            outlook_id=outlook_id,
            bc_hash=fingerprint(bc_view(bc, self.ctx)),
            outlook_hash=fingerprint(outlook_view(outlook, self.ctx)),
            email=bc.get("email") or "",
        )

    def _save_links(self, upserts: list[Link], deletes: list[str]) -> None:
        self.checkpoint("before_links")
        if upserts:
            self.store.upsert_links(self.user, upserts)
        if deletes:
            self.store.delete_links(self.user, deletes)
        self.outcome.links_written += len(upserts) + len(deletes)

    # The plan -------------------------------------------------------------------------------
    def apply(self, plan: Plan) -> Outcome:
        store_only_up: list[Link] = []
        store_only_del: list[str] = []
        graph_actions: list[Action] = []
        bc_actions: list[Action] = []
        for a in plan.actions:
            if a.kind == "unlink":
                store_only_del.append(a.bc_id)
                self.report.items.append(_item("unlinked", a))
            elif a.kind == "refresh_link":
                store_only_up.append(self._link(a.bc, a.outlook, a.outlook_id))
            elif a.kind in ("create_bc", "update_bc"):
                bc_actions.append(a)
            elif a.kind == "link" and a.body is None:
                store_only_up.append(self._link(a.bc, a.outlook, a.outlook_id))
                self.report.add("linked", a.bc_id, a.outlook_id, a.email, a.reason)
            else:
                graph_actions.append(a)
        if store_only_up or store_only_del:
            self._save_links(store_only_up, store_only_del)
        graph_actions.extend(self._apply_bc(bc_actions))
        self._apply_graph(graph_actions)
        return self.outcome

    def _apply_bc(self, actions: list[Action]) -> list[Action]:
        """Write to BC; returns the Outlook follow-ups (tag and align the Outlook contact)."""
        follow_ups: list[Action] = []
        for start in range(0, len(actions), BC_CHUNK):
            chunk = actions[start : start + BC_CHUNK]
            writes = [
                BcWrite("POST", a.body)
                if a.kind == "create_bc"
                else BcWrite("PATCH", a.body, a.bc_id, a.etag)
                for a in chunk
            ]
            results = self._write_bc(chunk, writes)
            self.checkpoint("after_bc_batch")
            links: list[Link] = []
            for a, res in zip(chunk, results, strict=True):
                if not res.ok or not isinstance(res.body, dict):
                    why = res.error or f"status {res.status}"
                    if res.ambiguous:
                        why = f"{why}; the outcome is unknown and is resolved by the next run"
                    if a.kind == "update_bc" and res.status == 412:
                        why = "changed in Business Central meanwhile; Business Central wins"
                    self._fail(a, res, why)
                    continue
                bc = res.body
                self.report.add(a.report_as, bc["id"], a.outlook_id, a.email, a.reason)
                # Link now; an empty Outlook hash marks "not tagged yet" until the follow-up below lands,
                # so a run interrupted in between tags it next time (see planner).
                link = self._link(bc, a.outlook, a.outlook_id)
                if a.kind == "create_bc":
                    link.outlook_hash = ""
                links.append(link)
                dropped = self.not_kept(bc) if self.remove_from_outlook else None
                if dropped:
                    follow_ups.append(
                        Action(
                            "delete_outlook",
                            "outlookDeleted",
                            bc["id"],
                            a.outlook_id,
                            bc=bc,
                            email=bc.get("email"),
                            reason=f"in Business Central now; removed from the sync folder: {dropped}",
                        )
                    )
                elif outlook_view(a.outlook, self.ctx) != bc_view(bc, self.ctx) or a.kind == "create_bc":
                    follow_ups.append(
                        Action(
                            "update_outlook",
                            "",
                            bc["id"],
                            a.outlook_id,
                            graph_patch(bc_to_outlook(bc, a.outlook, self.ctx), a.outlook),
                            bc=bc,
                            outlook=a.outlook,
                            email=bc.get("email"),
                            reason="tagged with its BC id",
                        )
                    )
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

    def _graph_item(self, a: Action) -> BatchItem:
        if a.kind in ("create_outlook", "recreate_outlook"):
            return self.graph.contact_op(self.user, self.folder_id, "POST", body=a.body)
        if a.kind == "delete_outlook":
            return self.graph.contact_op(self.user, self.folder_id, "DELETE", a.outlook_id)
        return self.graph.contact_op(self.user, self.folder_id, "PATCH", a.outlook_id, a.body)

    def _apply_graph(self, actions: list[Action]) -> None:
        for start in range(0, len(actions), GRAPH_CHUNK):
            chunk = actions[start : start + GRAPH_CHUNK]
            results = self.graph.write([self._graph_item(a) for a in chunk])
            self.checkpoint("after_graph_batch")
            upserts: list[Link] = []
            deletes: list[str] = []
            for a, res in zip(chunk, results, strict=True):
                if a.kind == "delete_outlook":
                    if res.ok or res.status == 404:  # already gone is as good as deleted
                        self.outcome.deleted.add(a.outlook_id)
                        self.report.add(a.report_as, a.bc_id, a.outlook_id, a.email, a.reason)
                        if a.bc_id and a.unlinks:
                            deletes.append(a.bc_id)
                    else:
                        self._fail(a, res, res.error or f"status {res.status}")
                    continue
                if not res.ok or not isinstance(res.body, dict):
                    why = res.error or f"status {res.status}"
                    if res.ambiguous:
                        why = f"{why}; the outcome is unknown and is resolved by the next run"
                    elif res.status == 404:
                        why = "the Outlook contact disappeared meanwhile; it is recreated by the next run"
                    self._fail(a, res, why)
                    continue
                new_id = res.body.get("id", a.outlook_id)
                if a.report_as:
                    self.report.add(a.report_as, a.bc_id, new_id, a.email, a.reason)
                link = self._link(a.bc, res.body, new_id)
                self.outcome.written[new_id] = link.outlook_hash
                upserts.append(link)
            if upserts or deletes:
                self._save_links(upserts, deletes)
            self.heartbeat()
            self.checkpoint("batch_done")  # a clean stopping point: this batch's links are stored


def _item(action: str, a: Action) -> ReportItem:
    return ReportItem(action, a.bc_id, a.outlook_id, a.email, a.reason)
