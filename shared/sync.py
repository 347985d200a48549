"""One user's run (BEHAVIOUR §4): lease → read both sides → plan → apply → advance watermarks → report.

Business Central is read once per company and shared by the users of that company (`BcReader`),
because BC's request budget is per service principal (6,000 / 5 min) while Graph's is per mailbox.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from shared import runs
from shared.bc_client import BcClient, BcSchema, SchemaError
from shared.executor import Executor
from shared.filters import ContactFilter, parse_filter
from shared.graph_client import (
    DeltaExpired,
    DeltaPage,
    FolderGone,
    ForeignDeltaLink,
    GraphClient,
    is_partial,
    tag_of,
)
from shared.http import ApiError, RequestCounter
from shared.mapping import (
    MAPPED_FIELDS,
    BcContext,
    CountryTable,
    bc_is_eligible,
    bc_view,
    fingerprint,
    normalize_email,
    outlook_view,
)
from shared.model import (
    ReportItem,
    RunReport,
    RunStatus,
    UserSettings,
    UserState,
    iso,
    parse_iso,
    redact,
    user_hash,
    utcnow,
)
from shared.planner import FULL, INCREMENTAL, Snapshot, needs, plan

if TYPE_CHECKING:  # the composition root builds on this module (BcReader); it is only named here
    from shared.services import Services
    from shared.store import Lease, Store

log = logging.getLogger(__name__)

LEASE_SECONDS = 15 * 60  # longer than any single batch; renewed between batches
OVERLAP = timedelta(minutes=5)  # re-read window for BC commits stamped before they became visible
MODES = (INCREMENTAL, FULL)


class RunInterrupted(Exception):
    """Raised from a checkpoint to stop a run cleanly at a batch boundary (it continues later)."""


class RunInProgress(Exception):
    """Another run holds this user's lease."""

    def __init__(self, user: str, run_id: str | None, expires_at: str | None):
        super().__init__(f"a sync for {user} is already running (run {run_id})")
        self.user = user
        self.run_id = run_id
        self.expires_at = expires_at


@dataclass
class CompanyRead:
    read_at: float  # monotonic time of the read
    since: str | None  # None: every contact was read
    contacts: dict[str, dict[str, Any]]
    index: dict[str, str]  # every current contact id → normalized email
    # casefolded name → name of every Company contact: a person's company name is checked against
    # these before it is written, instead of recognising BC's (localized) refusal afterwards.
    companies: dict[str, str] = field(default_factory=dict)
    # The company's Country/Region table, read on first use and shared like the rest of the read.
    countries: CountryTable = field(default_factory=CountryTable)


class BcReader:
    """Reads a company's contacts once and shares the result between that company's users.

    A cached read serves any user whose watermark is at or after the read's own starting point, for
    `ttl` seconds; users run within one scheduled run get the same read, and a read can never hide a
    change from a user, because each user filters by its own watermark afterwards.
    """

    def __init__(self, ttl: float = 120.0):
        self.ttl = ttl
        self._cache: dict[str, CompanyRead] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def _company_lock(self, company_id: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(company_id, threading.Lock())

    def read(self, client: BcClient, company_id: str, since: str | None) -> CompanyRead:
        with self._company_lock(company_id):
            cached = self._cache.get(company_id)
            fresh = cached is not None and time.monotonic() - cached.read_at < self.ttl
            if fresh and (cached.since is None or (since is not None and cached.since <= since)):
                return _narrow(cached, since)
            started = time.monotonic()
            if since is None:
                contacts = {c["id"]: c for c in client.list_contacts(company_id)}
                rows = list(contacts.values())
            else:
                contacts = {c["id"]: c for c in client.list_contacts(company_id, modified_after=since)}
                rows = client.list_contacts(company_id, select=("id", "email", "type", "displayName"))
            index = {c["id"]: normalize_email(c.get("email")) for c in rows}
            companies = {
                str(c["displayName"]).strip().casefold(): str(c["displayName"]).strip()
                for c in rows
                if c.get("type") == "Company" and str(c.get("displayName") or "").strip()
            }
            countries = CountryTable(loader=lambda: client.countries(company_id))
            read = CompanyRead(started, since, contacts, index, companies, countries)
            self._cache[company_id] = read
            return _narrow(read, since)

    def forget(self, company_id: str | None = None) -> None:
        with self._lock:
            if company_id is None:
                self._cache.clear()
            else:
                self._cache.pop(company_id, None)


def _narrow(read: CompanyRead, since: str | None) -> CompanyRead:
    if since is None or read.since == since:
        return read
    since_dt = parse_iso(since)
    contacts = {
        cid: c
        for cid, c in read.contacts.items()
        if c.get("lastModifiedDateTime") and parse_iso(c["lastModifiedDateTime"]) > since_dt
    }
    return CompanyRead(read.read_at, since, contacts, read.index, read.companies, read.countries)


def settings_hash(settings: UserSettings, company_id: str) -> str:
    """What the links were built under; when it changes, the next run reconciles everything."""
    scope = {
        "company": company_id,
        "filter": settings.filter,
        "pullNew": settings.pull_new_from_outlook,
        "pullEdits": settings.pull_edits_from_outlook,
        "remove": settings.remove_from_outlook,
    }
    return hashlib.sha256(json.dumps(scope, sort_keys=True).encode()).hexdigest()[:32]


def _full_due(state: UserState, hours: float) -> bool:
    if hours <= 0 or not state.last_full_sync:
        return False
    return utcnow() - parse_iso(state.last_full_sync) >= timedelta(hours=hours)


def run_user(
    services: Services,
    settings: UserSettings,
    mode: str = INCREMENTAL,
    *,
    dry_run: bool = False,
    force: bool = False,
    run_id: str | None = None,
    reader: BcReader | None = None,
    resume: RunReport | None = None,
    checkpoint: Callable[[str], None] = lambda name: None,
) -> RunReport:
    """Run one user's sync. Never raises for sync problems: they end up in the report.

    `reader` shares BC reads between users of one scheduled run; without it the run reads BC afresh,
    so an on-demand run always sees the latest BC edits. `resume` continues the report of a run that
    was interrupted (its items and counts are kept; what it wrote is linked and is not written again).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    store = services.store
    report = RunReport(user=settings.user, mode=mode, dryRun=dry_run)
    if resume is not None:
        report = runs.resume(resume)
    elif run_id:
        report.runId = run_id
    lease = None if dry_run else _take_lease(store, settings.user, report.runId)
    counter = RequestCounter()
    store.save_report(report)
    started = time.monotonic()

    def heartbeat() -> None:
        # Renew once a third of the lease has passed, not after every batch: a store write per
        # batch would cost as much as the batch's own link write.
        nonlocal lease
        if lease is not None and (lease.expires_at - utcnow()).total_seconds() < LEASE_SECONDS * 2 / 3:
            lease = store.renew_lease(lease, LEASE_SECONDS)

    try:
        _run(
            services,
            settings,
            report,
            counter,
            reader or BcReader(ttl=0),
            force=force,
            heartbeat=heartbeat,
            checkpoint=checkpoint,
        )
    except RunInterrupted:
        runs.interrupt(report)
    except Exception as exc:  # one failing user must never stop the others
        runs.fail(report, _describe(exc))
        log.warning("contact sync run failed: %s", redact(report.message, settings.user))
    finally:
        _close(store, report, counter, lease, started)
    return report


def _close(
    store: Store, report: RunReport, counter: RequestCounter, lease: Lease | None, started: float
) -> None:
    """Store the final report, then release the lease (in that order: see shared/runs.py)."""
    for service in ("bc", "graph"):
        report.requests[service] = report.requests.get(service, 0) + counter.counts.get(service, 0)
    report.finishedAt = iso(utcnow())
    try:
        store.save_report(report)
    finally:
        if lease is not None:
            store.release_lease(lease)
    if report.status != RunStatus.INTERRUPTED:  # an interrupted run logs once, when its continuation ends
        log_run(report, time.monotonic() - started, counter.throttled)


def _take_lease(store: Store, user: str, run_id: str) -> Lease:
    """The user's lease for this run, or RunInProgress naming the run that holds it."""
    lease = store.acquire_lease(user, run_id, LEASE_SECONDS)
    if lease is None:
        current = store.current_lease(user)
        raise RunInProgress(
            user, current.holder if current else None, iso(current.expires_at) if current else None
        )
    return lease


MAX_SKIP_WARNINGS = 20  # per run; the report itself lists every skipped contact


def log_run(report: RunReport, duration: float, throttled: Mapping[str, int] | None = None) -> None:
    """One structured record per run for Application Insights, and warnings for skipped contacts.

    Only ids, counts and reasons: no names, addresses, tokens or secrets. `throttled`: the requests
    answered 429 per service (RequestCounter.throttled); the operations workbook charts them.
    """
    throttled = throttled or {}
    who = {"runId": report.runId, "userHash": user_hash(report.user)}
    log.info(
        "contact sync run",
        extra={
            "custom_dimensions": {
                **who,
                "mode": report.mode,
                "dryRun": report.dryRun,
                "status": report.status,
                "durationSeconds": round(duration, 3),
                **report.counts,
                "bcRequests": report.requests.get("bc", 0),
                "graphRequests": report.requests.get("graph", 0),
                "bcThrottled": throttled.get("bc", 0),
                "graphThrottled": throttled.get("graph", 0),
            }
        },
    )
    skipped = [i for i in report.items if i.action == "skipped"]
    for item in skipped[:MAX_SKIP_WARNINGS]:
        log.warning(
            "contact skipped: %s",
            item.reason,
            extra={
                "custom_dimensions": {
                    **who,
                    "bcId": item.bcId,
                    "outlookId": item.outlookId,
                    "reason": item.reason,
                }
            },
        )
    if len(skipped) > MAX_SKIP_WARNINGS:
        reasons = Counter(i.reason for i in skipped)
        log.warning(
            "%d more contacts skipped; the run report lists them all",
            len(skipped) - MAX_SKIP_WARNINGS,
            extra={
                "custom_dimensions": {
                    **who,
                    "skipped": len(skipped),
                    "reasons": dict(reasons.most_common(10)),
                }
            },
        )


def _describe(exc: Exception) -> str:
    if isinstance(exc, SchemaError):
        return str(exc)
    if isinstance(exc, ApiError):
        hint = ""
        if exc.service == "graph" and exc.status == 403:
            hint = (
                " The app needs the Graph application permission Contacts.ReadWrite with admin consent, and "
                "access to this mailbox if mailbox access is restricted."
            )
        elif exc.service == "graph" and exc.status == 404:
            hint = " The mailbox was not found: check the user's address and that it has an Exchange Online mailbox."
        elif exc.service == "bc" and exc.status in (401, 403):
            hint = (
                " Check the app's entry on Business Central's Microsoft Entra Applications page (state Enabled, "
                "permission sets) and the API.ReadWrite.All permission."
            )
        return f"{exc}{hint}"
    return f"{type(exc).__name__}: {exc}"


def _run(
    services: Services,
    settings: UserSettings,
    report: RunReport,
    counter: RequestCounter,
    reader: BcReader,
    *,
    force: bool,
    heartbeat: Callable[[], None],
    checkpoint: Callable[[str], None],
) -> None:
    store, config = services.store, services.config
    bc, graph = services.clients(counter)
    flt = parse_filter(settings.filter)
    company_id = settings.company_id or config.bc_company_id
    state = store.get_state(settings.user)
    scope_hash = settings_hash(settings, company_id)
    mode = report.mode
    if mode == INCREMENTAL:
        if not state.delta_link or not state.bc_watermark:
            mode = FULL
            report.message = "first run for this user: a full sync was done"
        elif state.settings_hash != scope_hash:
            mode = FULL
            report.message = "settings changed since the last run: a full sync was done"
        elif state.writing_run:
            mode = FULL
            report.message = "the previous run stopped while writing: a full sync was done"
        elif _full_due(state, config.full_sync_hours):
            mode = FULL
            report.message = f"scheduled full reconcile (every {config.full_sync_hours:g} h)"
    dry = report.dryRun

    # Outlook folder --------------------------------------------------------------------------
    previous_folder = state.folder_id
    folder_id = _ensure_folder(graph, settings, state, report, dry)
    if previous_folder and folder_id != previous_folder:
        # The user deleted the folder (it sits in Deleted Items, still readable, but is no longer
        # under Contacts): never write there; fill a folder under Contacts from scratch.
        mode = FULL
        report.message = (
            "the Outlook folder had been deleted (moved to Deleted Items): a new folder was created under "
            "Contacts and fully synced"
            if folder_id
            else "the Outlook folder had been deleted (moved to Deleted Items): a dry run creates no new one"
        )
    delta = DeltaPage()
    if folder_id:
        try:
            delta = graph.delta(settings.user, folder_id, state.delta_link if mode == INCREMENTAL else None)
        except ForeignDeltaLink as exc:
            mode = FULL
            report.message = f"the stored Outlook delta link was not used ({exc}): a full sync was done"
            log.warning(
                "stored delta link refused: %s",
                exc,
                extra={"custom_dimensions": {"runId": report.runId, "userHash": user_hash(settings.user)}},
            )
            delta = graph.delta(settings.user, folder_id, None)
        except DeltaExpired:
            mode = FULL
            report.message = "Outlook asked for a full resync (delta token expired): a full sync was done"
            delta = graph.delta(settings.user, folder_id, None)
        except FolderGone:
            state.folder_id = None
            folder_id = _ensure_folder(graph, settings, state, report, dry)
            mode = FULL
            report.message = "the Outlook folder had been deleted: it was created again and fully synced"
            delta = graph.delta(settings.user, folder_id, None) if folder_id else DeltaPage()
    report.mode = mode

    # Business Central --------------------------------------------------------------------
    since = None
    if mode == INCREMENTAL and state.bc_watermark:
        since = iso(parse_iso(state.bc_watermark) - OVERLAP)
    schema = bc.schema()
    check_filter_fields(flt.to_json(), schema)
    read = reader.read(bc, company_id, since)
    ctx = BcContext(
        fields=frozenset(f for f in MAPPED_FIELDS if f in schema.contact_properties),
        countries=read.countries,
        companies=read.companies,
    )
    links = store.get_links(settings.user)
    if folder_id:
        delta = _read_partial(graph, settings, folder_id, delta, links, read.contacts, ctx)
    snap = Snapshot(
        mode=mode,
        bc=dict(read.contacts),
        bc_index=read.index,
        outlook={c["id"]: c for c in delta.changed},
        outlook_removed=set(delta.removed),
        links=links,
        tags=dict(delta.tags),
        outlook_complete=mode == FULL,
        ctx=ctx,
    )
    _complete(snap, settings, flt, bc, graph, company_id, folder_id)
    result = plan(snap, settings, flt, force=force)
    if not snap.outlook_complete and folder_id and any(a.kind in _CREATES for a in result.actions):
        # The folder may hold the user's own contact with that email, which this delta did not show
        # (skipped earlier, e.g. while the BC contact was not synced). Read the folder once and plan
        # again knowing all of it, so that contact is adopted instead of getting a duplicate.
        for contact in graph.list_contacts(settings.user, folder_id):
            snap.tags.setdefault(contact["id"], tag_of(contact))
            contact.pop("singleValueExtendedProperties", None)
            snap.outlook.setdefault(contact["id"], contact)
        snap.outlook_complete = True
        _complete(snap, settings, flt, bc, graph, company_id, folder_id)
        result = plan(snap, settings, flt, force=force)
    if mode == INCREMENTAL and state.bc_watermark:
        # BC contacts re-read only because of the overlap window were reported by an earlier run.
        seen = parse_iso(state.bc_watermark)
        result.skipped = [
            i
            for i in result.skipped
            if i.outlookId is not None
            or i.bcId not in read.contacts
            or parse_iso(read.contacts[i.bcId]["lastModifiedDateTime"]) > seen
        ]
    for item in result.skipped:
        report.add(item.action, item.bcId, item.outlookId, item.email, item.reason)
    if result.safety_stop:
        runs.stop_for_safety(report, result.safety_stop)
        report.items.append(_safety_item(result.safety_stop))
        return
    if dry:
        for a in result.actions:
            if a.report_as:
                report.add(a.report_as, a.bc_id, a.outlook_id, a.email, f"dry run: {a.reason}")
        runs.succeed(report)
        return
    if folder_id is None:
        raise RuntimeError("no Outlook folder to sync into")

    executor = Executor(
        user=settings.user,
        company_id=company_id,
        folder_id=folder_id,
        bc=bc,
        graph=graph,
        store=store,
        report=report,
        heartbeat=heartbeat,
        checkpoint=checkpoint,
        not_kept=lambda c: bc_is_eligible(c) or (None if flt.matches(c) else "does not match your filter"),
        remove_from_outlook=settings.remove_from_outlook,
        ctx=ctx,
    )
    if any(a.writes for a in result.actions):
        state.writing_run = report.runId
        state = store.save_state(state)
    outcome = executor.apply(result)

    # Watermarks advance only past what was written (BEHAVIOUR §4.3.4) ----------------------------
    checkpoint("before_watermark")
    newest = max((c.get("lastModifiedDateTime") or "" for c in read.contacts.values()), default="")
    watermark = state.bc_watermark
    if newest and (watermark is None or newest > watermark):
        watermark = newest
    if outcome.hold_bc_from is not None:
        held = iso(parse_iso(outcome.hold_bc_from) - timedelta(microseconds=1))
        watermark = min(watermark, held) if watermark else held
    if watermark is None:
        watermark = iso(utcnow() - OVERLAP)  # an empty company: start from now
    state.bc_watermark = watermark
    if not outcome.hold_delta and delta.delta_link:
        state.delta_link = _settle(graph, settings.user, folder_id, delta.delta_link, outcome, ctx)
    state.folder_id = folder_id
    state.folder_name = settings.folder_name
    state.company_id = company_id
    state.settings_hash = scope_hash
    if mode == FULL:
        state.last_full_sync = report.startedAt
    state.last_run_id = report.runId
    state.writing_run = None
    state.last_status = RunStatus.PARTIAL if outcome.failures else RunStatus.SUCCEEDED
    store.save_state(state)  # before the report says so: if this fails, the run failed
    runs.finish(report, failures=bool(outcome.failures))


_CREATES = ("create_outlook", "recreate_outlook")


def _read_partial(
    graph: GraphClient,
    settings: UserSettings,
    folder_id: str,
    delta: DeltaPage,
    links: dict[str, Any],
    bc_changed: dict[str, dict[str, Any]],
    ctx: BcContext,
) -> DeltaPage:
    """Read whole the updated contacts that delta gave as their id and changed properties only.

    Never taken as the whole contact (that would blank BC fields and lose Outlook-only values such as
    a second email). One exception needs no read: a synced contact edited in Outlook while its BC
    record is unchanged (its view still hashes as the link says) and Outlook edits are not pulled: the
    plan ignores such an edit, so the item is left out unread.
    """
    if not settings.pull_edits_from_outlook:
        by_outlook = {link.outlook_id: bc_id for bc_id, link in links.items()}

        def ignored(c: dict[str, Any]) -> bool:
            bc_id = by_outlook.get(c["id"])
            if bc_id is None or not links[bc_id].outlook_hash:
                return False
            bc = bc_changed.get(bc_id)  # also BC records re-read only for the overlap window
            return bc is None or fingerprint(bc_view(bc, ctx)) == links[bc_id].bc_hash

        delta.changed = [c for c in delta.changed if not (is_partial(c) and ignored(c))]
    return graph.fill_partial(settings.user, folder_id, delta)


def check_filter_fields(filter_spec: dict[str, str], schema: BcSchema) -> None:
    """Refuse a user's filter on a field this tenant's BC version lacks, with what to do about it.

    BC would answer such a filter with a 400 that fails every read; the sync filters locally, where
    the field would silently read as blank and match the wrong contacts. Either way the user must
    change the filter, so the run stops before reading and says so.
    """
    missing = [name for name in filter_spec if name not in schema.contact_properties]
    if missing:
        names = ", ".join(missing)
        raise SchemaError(
            f"the filter uses {names}, which this Business Central version's contacts API does not have; "
            f"remove {names} from the user's filter (PUT /api/users/{{user}})"
        )


def _complete(
    snap: Snapshot,
    settings: UserSettings,
    flt: ContactFilter,
    bc: BcClient,
    graph: GraphClient,
    company_id: str,
    folder_id: str | None,
) -> None:
    """Fetch what `plan()` still needs: tags first, then the BC/Outlook records they point at."""
    for _ in range(4):  # tags, then the BC/Outlook records they point at, then theirs
        want = needs(snap, settings, flt)
        if not want:
            break
        if want.tags or want.outlook:
            ids = sorted(want.tags | want.outlook)
            found, missing = (
                graph.get_contacts(settings.user, folder_id, ids) if folder_id else ({}, set(ids))
            )
            for oid in want.tags:
                snap.tags[oid] = tag_of(found[oid]) if oid in found else None
            for oid, contact in found.items():
                contact.pop("singleValueExtendedProperties", None)
                snap.outlook[oid] = contact
            for oid in missing:
                snap.outlook.pop(oid, None)
                snap.outlook_removed.add(oid)
        if want.bc:
            for c in bc.get_contacts(company_id, sorted(want.bc)):
                snap.bc[c["id"]] = c


def _settle(
    graph: GraphClient, user: str, folder_id: str, delta_link: str, outcome: Any, ctx: BcContext
) -> str:
    """The delta link to store: past this run's own writes when nothing else happened meanwhile.

    The link read at the start predates our writes. Keeping it would replay every write as a change
    next time, and a contact we created that the user then deletes would never show up as removed
    (delta leaves out items created and deleted between two rounds). So read one more round: if it
    holds only our own writes, store its link; if the user changed something meanwhile, keep the
    start link so the next run sees that change (and our echoes, which it recognises).
    """
    if not outcome.written and not outcome.deleted:
        return delta_link
    try:
        # Our own updates come back partial (id + what we changed): read those whole to compare.
        after = graph.fill_partial(user, folder_id, graph.delta(user, folder_id, delta_link))
    except (DeltaExpired, FolderGone, ApiError) as exc:
        log.info("could not settle the delta link (%s); keeping the start link", redact(str(exc), user))
        return delta_link
    own = all(
        outcome.written.get(c["id"]) == fingerprint(outlook_view(c, ctx)) for c in after.changed
    ) and all(oid in outcome.deleted for oid in after.removed)
    return after.delta_link if own and after.delta_link else delta_link


def _safety_item(message: str) -> ReportItem:
    return ReportItem("safetyStop", None, None, None, message)


def _ensure_folder(
    graph: GraphClient, settings: UserSettings, state: UserState, report: RunReport, dry: bool
) -> str | None:
    """The id of the user's sync folder, renaming or creating it as the settings say (BEHAVIOUR §5).

    The folder must be directly under Contacts. A listing of those folders each run tells whether ours
    still is: a folder the user deleted moves to Deleted Items, keeps its id and still answers GET and
    delta, so only its absence from the listing shows it is gone. Names are matched without
    regard to case, as Exchange does, so an existing "business central" is used, never duplicated.
    """
    name = settings.folder_name
    if state.folder_id and not _under_contacts(
        graph, settings.user, state.folder_id, state.folder_name or name
    ):
        log.info("the sync folder is no longer under Contacts (deleted in Outlook); using a new one")
        state.folder_id = None
    if state.folder_id:
        if state.folder_name != name and not dry:
            try:
                graph.rename_folder(settings.user, state.folder_id, name)
            except ApiError as exc:
                if exc.status == 404:
                    state.folder_id = None
                    return _ensure_folder(graph, settings, state, report, dry)
                if exc.status == 409:
                    raise RuntimeError(
                        f"cannot rename the Outlook folder to '{name}': a folder with that name already exists"
                    ) from None
                raise
        return state.folder_id
    found = graph.find_folder(settings.user, name)
    if found:
        return found["id"]
    if dry:
        return None
    return graph.create_folder(settings.user, name)["id"]


def _under_contacts(graph: GraphClient, user: str, folder_id: str, name: str) -> bool:
    """Is our folder still directly under Contacts? One request when it still has its name (the
    listing by name); a second, of all folders under Contacts, when the user renamed it or deleted it."""
    if any(f.get("id") == folder_id for f in graph.folders_named(user, name)):
        return True
    return any(f.get("id") == folder_id for f in graph.list_folders(user))


def run_users(
    services: Services,
    users: Iterable[UserSettings],
    mode: str = INCREMENTAL,
    *,
    dry_run: bool = False,
    max_parallel: int = 64,
) -> list[RunReport]:
    """Several users at once (CLI, benchmark): BC read once per company, mailboxes in parallel.

    Each mailbox has its own Graph budget, so users run side by side; within a mailbox the executor
    keeps one batch in flight, which is the mailbox's concurrency of four.
    """
    users = list(users)
    reader = BcReader(ttl=3600)
    _prewarm(services, reader, users, mode)

    def one(s: UserSettings) -> RunReport:
        try:
            return run_user(services, s, mode, dry_run=dry_run, reader=reader)
        except RunInProgress as exc:
            return runs.skipped(s.user, mode, dry_run, str(exc))

    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(users) or 1))) as pool:
        return list(pool.map(one, users))


def _prewarm(services: Services, reader: BcReader, users: list[UserSettings], mode: str) -> None:
    """Read each company once from the earliest watermark among its users."""
    by_company: dict[str, list[str | None]] = {}
    for s in users:
        company = s.company_id or services.config.bc_company_id
        state = services.store.get_state(s.user)
        since = None
        if mode == INCREMENTAL and state.bc_watermark and state.delta_link:
            since = iso(parse_iso(state.bc_watermark) - OVERLAP)
        by_company.setdefault(company, []).append(since)
    bc, _ = services.clients(RequestCounter())
    for company, sinces in by_company.items():
        earliest = None if any(s is None for s in sinces) else min(sinces)
        try:
            reader.read(bc, company, earliest)
        except ApiError as exc:  # each user's run reports it
            log.warning("could not read company %s: %s", company, exc)
