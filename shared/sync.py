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
from shared.executor import Executor, Outcome
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
from shared.http_client import ApiError, RequestCounter
from shared.mapping import (
    MAPPED_FIELDS,
    BcContext,
    CountryTable,
    bc_view,
    fingerprint,
    normalize_email,
    outlook_view,
)
from shared.model import (
    Link,
    ReportItem,
    RunReport,
    RunStatus,
    UserSettings,
    UserState,
    iso,
    log_fields,
    parse_iso,
    redact,
    user_hash,
    utcnow,
)
from shared.planner import FULL, INCREMENTAL, Needs, Plan, Snapshot, needs, plan

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
            if cached is not None and self._serves(cached, since):
                return _narrow(cached, since)
            started = time.monotonic()
            if since is None:
                contacts = {contact["id"]: contact for contact in client.list_contacts(company_id)}
                rows = list(contacts.values())
            else:
                changed = client.list_contacts(company_id, modified_after=since)
                contacts = {contact["id"]: contact for contact in changed}
                rows = client.list_contacts(company_id, select=("id", "email", "type", "displayName"))
            index = {row["id"]: normalize_email(row.get("email")) for row in rows}
            companies = {
                str(row["displayName"]).strip().casefold(): str(row["displayName"]).strip()
                for row in rows
                if row.get("type") == "Company" and str(row.get("displayName") or "").strip()
            }
            countries = CountryTable(loader=lambda: client.countries(company_id))
            read = CompanyRead(started, since, contacts, index, companies, countries)
            self._cache[company_id] = read
            return _narrow(read, since)

    def _serves(self, cached: CompanyRead, since: str | None) -> bool:
        """A fresh read that started at or before `since` holds every change a user needs."""
        fresh = time.monotonic() - cached.read_at < self.ttl
        return fresh and (cached.since is None or (since is not None and cached.since <= since))

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
        contact_id: contact
        for contact_id, contact in read.contacts.items()
        if contact.get("lastModifiedDateTime") and parse_iso(contact["lastModifiedDateTime"]) > since_dt
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
    on_started: Callable[[], None] = lambda: None,
) -> RunReport:
    """Run one user's sync. Never raises for sync problems: they end up in the report.

    `reader` shares BC reads between users of one scheduled run; without it the run reads BC afresh,
    so an on-demand run always sees the latest BC edits. `resume` continues the report of a run that
    was interrupted (its items and counts are kept; what it wrote is linked and is not written again).
    `on_started`: called once the run holds the lease, before it reads (shared/wake.py's follow-ups).
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
    on_started()
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
        runs.fail(report, _failure_message(exc))
        log.warning("contact sync run failed: %s", redact(report.message or "", settings.user))
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

    Each record is `event {compact JSON}` in the message itself (shared.model.log_fields): that is
    what reaches `traces.message` whatever the worker's logging setup, and what the workbook and
    alert queries parse. Only ids, counts and reasons: no names, addresses, tokens or secrets.
    `throttled`: the requests answered 429 per service (RequestCounter.throttled); the operations
    workbook charts them.
    """
    throttled = throttled or {}
    who = {"runId": report.runId, "userHash": user_hash(report.user)}
    fields = {
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
    log.info("contact sync run %s", log_fields(fields))
    skipped = [i for i in report.items if i.action == "skipped"]
    for item in skipped[:MAX_SKIP_WARNINGS]:
        skip = {**who, "bcId": item.bcId, "outlookId": item.outlookId, "reason": item.reason}
        log.warning("contact skipped %s", log_fields(skip))
    if len(skipped) > MAX_SKIP_WARNINGS:
        reasons = Counter(i.reason for i in skipped)
        more = {
            **who,
            "notLogged": len(skipped) - MAX_SKIP_WARNINGS,
            "skipped": len(skipped),
            "reasons": dict(reasons.most_common(10)),
        }
        log.warning("more contacts skipped %s", log_fields(more))  # the run report lists them all


def _failure_message(exc: Exception) -> str:
    """The run report's message for a run that failed, with what to do for the usual causes."""
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


@dataclass
class _UserRun:
    """One user's run as its steps hand it on: the inputs of step 1 and what the later steps read."""

    settings: UserSettings
    report: RunReport
    store: Store
    bc: BcClient
    graph: GraphClient
    contact_filter: ContactFilter
    company_id: str
    state: UserState
    scope_hash: str
    mode: str


@dataclass
class _BothSides:
    """Step 2's result: the folder, its delta, the company's read and the snapshot the plan decides on."""

    folder_id: str | None
    delta: DeltaPage
    company: CompanyRead
    snapshot: Snapshot


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
    """Steps 2 to 5 of a run (the lease, step 1, is `run_user`'s): read both sides, plan, apply,
    then advance the watermarks and finish the report."""
    run = _start(services, settings, report, counter)
    sides = _read_both_sides(run, reader)
    try:
        result = _plan(run, sides, force=force)
        if result.safety_stop:
            runs.stop_for_safety(report, result.safety_stop)
            report.items.append(_safety_item(result.safety_stop))
            return
        if report.dryRun:
            _report_dry_run(report, result)
            return
        if sides.folder_id is None:
            raise RuntimeError("no Outlook folder to sync into")
        outcome = _apply(run, sides, sides.folder_id, result, heartbeat, checkpoint)
        checkpoint("before_watermark")
        _finish(run, sides, sides.folder_id, outcome)
    finally:
        _name_items(report, sides.snapshot)


def _name_items(report: RunReport, snapshot: Snapshot) -> None:
    """Give each report item the contact's display name from the records this run read, so the
    report names contacts the way a person knows them (a contact BC deleted keeps only its email)."""
    for item in report.items:
        if item.name:
            continue
        record = snapshot.bc.get(item.bcId or "") or snapshot.outlook.get(item.outlookId or "") or {}
        name = str(record.get("displayName") or "").strip()
        item.name = name or None


def _start(
    services: Services, settings: UserSettings, report: RunReport, counter: RequestCounter
) -> _UserRun:
    """What the run works with, and whether an incremental run must be a full one (BEHAVIOUR §4.4)."""
    store, config = services.store, services.config
    bc, graph = services.clients(counter)
    contact_filter = parse_filter(settings.filter)
    company_id = settings.company_id or config.bc_company_id
    state = store.get_state(settings.user)
    scope_hash = settings_hash(settings, company_id)
    mode = report.mode
    if mode == INCREMENTAL:
        why_full = _why_full(state, scope_hash, config.full_sync_hours)
        if why_full:
            mode = FULL
            report.message = why_full
    return _UserRun(settings, report, store, bc, graph, contact_filter, company_id, state, scope_hash, mode)


def _why_full(state: UserState, scope_hash: str, full_sync_hours: float) -> str | None:
    """Why an incremental run must reconcile fully, or None."""
    if not state.delta_link or not state.bc_watermark:
        return "first run for this user: a full sync was done"
    if state.settings_hash != scope_hash:
        return "settings changed since the last run: a full sync was done"
    if state.writing_run:
        return "the previous run stopped while writing: a full sync was done"
    if _full_due(state, full_sync_hours):
        return f"scheduled full reconcile (every {full_sync_hours:g} h)"
    return None


# Step 2: read both sides ----------------------------------------------------------------------------


def _read_both_sides(run: _UserRun, reader: BcReader) -> _BothSides:
    """The Outlook folder's delta, then Business Central (its changes, its ids), then the snapshot."""
    folder_id, delta = _read_outlook(run)
    run.report.mode = run.mode
    company, ctx = _read_bc(run, reader)
    links = run.store.get_links(run.settings.user)
    if folder_id:
        delta = _read_partial(run.graph, run.settings, folder_id, delta, links, company.contacts, ctx)
    snapshot = Snapshot(
        mode=run.mode,
        bc=dict(company.contacts),
        bc_index=company.index,
        outlook={contact["id"]: contact for contact in delta.changed},
        outlook_removed=set(delta.removed),
        links=links,
        tags=dict(delta.tags),
        outlook_complete=run.mode == FULL,
        ctx=ctx,
    )
    return _BothSides(folder_id, delta, company, snapshot)


def _read_outlook(run: _UserRun) -> tuple[str | None, DeltaPage]:
    """The sync folder (renamed, created or replaced as needed) and its delta since the last run."""
    settings, report, graph = run.settings, run.report, run.graph
    previous_folder = run.state.folder_id
    folder_id = _ensure_folder(graph, settings, run.state, report, report.dryRun)
    if previous_folder and folder_id != previous_folder:
        # The user deleted the folder (it sits in Deleted Items, still readable, but is no longer
        # under Contacts): never write there; fill a folder under Contacts from scratch.
        run.mode = FULL
        report.message = (
            "the Outlook folder had been deleted (moved to Deleted Items): a new folder was created under "
            "Contacts and fully synced"
            if folder_id
            else "the Outlook folder had been deleted (moved to Deleted Items): a dry run creates no new one"
        )
    if not folder_id:
        return folder_id, DeltaPage()
    try:
        delta_link = run.state.delta_link if run.mode == INCREMENTAL else None
        return folder_id, graph.delta(settings.user, folder_id, delta_link)
    except ForeignDeltaLink as exc:
        run.mode = FULL
        report.message = f"the stored Outlook delta link was not used ({exc}): a full sync was done"
        refused = {
            "runId": report.runId,
            "userHash": user_hash(settings.user),
            "error": redact(str(exc), settings.user),
        }
        log.warning("stored delta link refused %s", log_fields(refused))
        return folder_id, graph.delta(settings.user, folder_id, None)
    except DeltaExpired:
        run.mode = FULL
        report.message = "Outlook asked for a full resync (delta token expired): a full sync was done"
        return folder_id, graph.delta(settings.user, folder_id, None)
    except FolderGone:
        run.state.folder_id = None
        folder_id = _ensure_folder(graph, settings, run.state, report, report.dryRun)
        run.mode = FULL
        report.message = "the Outlook folder had been deleted: it was created again and fully synced"
        return folder_id, graph.delta(settings.user, folder_id, None) if folder_id else DeltaPage()


def _read_bc(run: _UserRun, reader: BcReader) -> tuple[CompanyRead, BcContext]:
    """The company's contacts changed since the watermark (all in a full run), and its context."""
    since = None
    if run.mode == INCREMENTAL and run.state.bc_watermark:
        since = iso(parse_iso(run.state.bc_watermark) - OVERLAP)
    schema = run.bc.schema()
    check_filter_fields(run.contact_filter.to_json(), schema)
    company = reader.read(run.bc, run.company_id, since)
    ctx = BcContext(
        fields=frozenset(name for name in MAPPED_FIELDS if name in schema.contact_properties),
        countries=company.countries,
        companies=company.companies,
    )
    return company, ctx


# Step 3: plan -------------------------------------------------------------------------------------


def _plan(run: _UserRun, sides: _BothSides, *, force: bool) -> Plan:
    """Fetch what the planner needs, plan, and put the skipped contacts in the report."""
    snapshot = sides.snapshot
    _complete(run, snapshot, sides.folder_id)
    result = plan(snapshot, run.settings, run.contact_filter, force=force)
    watermark = run.state.bc_watermark
    if run.mode == INCREMENTAL and watermark:
        # BC contacts re-read only because of the overlap window were reported by an earlier run.
        seen = parse_iso(watermark)
        contacts = sides.company.contacts
        result.skipped = [
            item
            for item in result.skipped
            if item.outlookId is not None
            or item.bcId not in contacts
            or parse_iso(contacts[item.bcId]["lastModifiedDateTime"]) > seen
        ]
    for item in result.skipped:
        run.report.add(item.action, item.bcId, item.outlookId, item.email, item.reason)
    return result


FETCH_ROUNDS = 4  # tags, then the BC/Outlook records they point at, then theirs


def _complete(run: _UserRun, snapshot: Snapshot, folder_id: str | None) -> None:
    """Fetch what `needs()` asks for until it asks nothing: records by id (at most FETCH_ROUNDS
    rounds), the whole folder at most once (it leaves the snapshot complete), then records again."""
    rounds = 0
    while True:
        wanted = needs(snapshot, run.settings, run.contact_filter)
        if wanted.records() and rounds < FETCH_ROUNDS:
            _fetch_records(run, snapshot, folder_id, wanted)
            rounds += 1
        elif wanted.whole_folder and folder_id:
            _read_whole_folder(run, snapshot, folder_id)
            rounds = 0
        else:
            return


def _fetch_records(run: _UserRun, snapshot: Snapshot, folder_id: str | None, wanted: Needs) -> None:
    if wanted.tags or wanted.outlook:
        ids = sorted(wanted.tags | wanted.outlook)
        found, missing = (
            run.graph.get_contacts(run.settings.user, folder_id, ids) if folder_id else ({}, set(ids))
        )
        for outlook_id in wanted.tags:
            snapshot.tags[outlook_id] = tag_of(found[outlook_id]) if outlook_id in found else None
        for outlook_id, contact in found.items():
            contact.pop("singleValueExtendedProperties", None)
            snapshot.outlook[outlook_id] = contact
        for outlook_id in missing:
            snapshot.outlook.pop(outlook_id, None)
            snapshot.outlook_removed.add(outlook_id)
    if wanted.bc:
        for contact in run.bc.get_contacts(run.company_id, sorted(wanted.bc)):
            snapshot.bc[contact["id"]] = contact


def _read_whole_folder(run: _UserRun, snapshot: Snapshot, folder_id: str) -> None:
    """Add every contact of the folder the delta did not show (skipped earlier, e.g. while its BC
    contact was not synced), so a create adopts it instead of putting a duplicate next to it."""
    for contact in run.graph.list_contacts(run.settings.user, folder_id):
        snapshot.tags.setdefault(contact["id"], tag_of(contact))
        contact.pop("singleValueExtendedProperties", None)
        snapshot.outlook.setdefault(contact["id"], contact)
    snapshot.outlook_complete = True


def _report_dry_run(report: RunReport, result: Plan) -> None:
    for action in result.actions:
        if action.report_as:
            report.add(
                action.report_as, action.bc_id, action.outlook_id, action.email, f"dry run: {action.reason}"
            )
    runs.succeed(report)


# Step 4: apply ------------------------------------------------------------------------------------


def _apply(
    run: _UserRun,
    sides: _BothSides,
    folder_id: str,
    result: Plan,
    heartbeat: Callable[[], None],
    checkpoint: Callable[[str], None],
) -> Outcome:
    executor = Executor(
        settings=run.settings,
        contact_filter=run.contact_filter,
        company_id=run.company_id,
        folder_id=folder_id,
        bc=run.bc,
        graph=run.graph,
        store=run.store,
        report=run.report,
        heartbeat=heartbeat,
        checkpoint=checkpoint,
        ctx=sides.snapshot.ctx,
    )
    if any(action.writes for action in result.actions):
        # Cleared by step 5: still set next time means this run stopped midway (see UserState).
        run.state.writing_run = run.report.runId
        run.state = run.store.save_state(run.state)
    return executor.apply(result)


# Step 5: watermarks and report ---------------------------------------------------------------------


def _finish(run: _UserRun, sides: _BothSides, folder_id: str, outcome: Outcome) -> None:
    """Advance the watermarks only past what was written (BEHAVIOUR §4.3.4), then finish the report."""
    state, report = run.state, run.report
    state.bc_watermark = _next_bc_watermark(state.bc_watermark, sides.company.contacts, outcome)
    if not outcome.hold_delta and sides.delta.delta_link:
        state.delta_link = _settled_delta_link(
            run.graph, run.settings.user, folder_id, sides.delta.delta_link, outcome, sides.snapshot.ctx
        )
    state.folder_id = folder_id
    state.folder_name = run.settings.folder_name
    state.company_id = run.company_id
    state.settings_hash = run.scope_hash
    if run.mode == FULL:
        state.last_full_sync = report.startedAt
    state.last_run_id = report.runId
    state.writing_run = None
    state.last_status = RunStatus.PARTIAL if outcome.failures else RunStatus.SUCCEEDED
    run.store.save_state(state)  # before the report says so: if this fails, the run failed
    runs.finish(report, failures=bool(outcome.failures))


def _next_bc_watermark(current: str | None, contacts: dict[str, dict[str, Any]], outcome: Outcome) -> str:
    """The newest change read, held back before the oldest BC record whose write failed."""
    newest = max((contact.get("lastModifiedDateTime") or "" for contact in contacts.values()), default="")
    watermark = current
    if newest and (watermark is None or newest > watermark):
        watermark = newest
    if outcome.hold_bc_from is not None:
        held = iso(parse_iso(outcome.hold_bc_from) - timedelta(microseconds=1))
        watermark = min(watermark, held) if watermark else held
    if watermark is None:
        watermark = iso(utcnow() - OVERLAP)  # an empty company: start from now
    return watermark


def _read_partial(
    graph: GraphClient,
    settings: UserSettings,
    folder_id: str,
    delta: DeltaPage,
    links: dict[str, Link],
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

        def ignored(contact: dict[str, Any]) -> bool:
            bc_id = by_outlook.get(contact["id"])
            if bc_id is None or not links[bc_id].outlook_hash:
                return False
            bc = bc_changed.get(bc_id)  # also BC records re-read only for the overlap window
            return bc is None or fingerprint(bc_view(bc, ctx)) == links[bc_id].bc_hash

        delta.changed = [
            contact for contact in delta.changed if not (is_partial(contact) and ignored(contact))
        ]
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


def _settled_delta_link(
    graph: GraphClient, user: str, folder_id: str, delta_link: str, outcome: Outcome, ctx: BcContext
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
        outcome.written.get(contact["id"]) == fingerprint(outlook_view(contact, ctx))
        for contact in after.changed
    ) and all(outlook_id in outcome.deleted for outlook_id in after.removed)
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
        return str(found["id"])
    if dry:
        return None
    return str(graph.create_folder(settings.user, name)["id"])


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

    def one(settings: UserSettings) -> RunReport:
        try:
            return run_user(services, settings, mode, dry_run=dry_run, reader=reader)
        except RunInProgress as exc:
            return runs.skipped(settings.user, mode, dry_run, str(exc))

    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(users) or 1))) as pool:
        return list(pool.map(one, users))


def _prewarm(services: Services, reader: BcReader, users: list[UserSettings], mode: str) -> None:
    """Read each company once from the earliest watermark among its users."""
    by_company: dict[str, list[str | None]] = {}
    for settings in users:
        company = settings.company_id or services.config.bc_company_id
        state = services.store.get_state(settings.user)
        since = None
        if mode == INCREMENTAL and state.bc_watermark and state.delta_link:
            since = iso(parse_iso(state.bc_watermark) - OVERLAP)
        by_company.setdefault(company, []).append(since)
    bc, _ = services.clients(RequestCounter())
    for company, starts in by_company.items():
        known = [start for start in starts if start is not None]
        earliest = min(known) if len(known) == len(starts) else None  # None: someone reads everything
        try:
            reader.read(bc, company, earliest)
        except ApiError as exc:  # each user's run reports it
            log.warning("could not read company %s: %s", company, exc)
