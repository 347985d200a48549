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
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from shared import photos, runs
from shared.bc_client import BcClient, BcSchema, SchemaError
from shared.executor import Executor, Outcome
from shared.filters import ContactFilter, parse_filter
from shared.graph_client import (
    CATEGORY_COLOR,
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
    DEFAULT_CONTEXT,
    MAPPED_FIELDS,
    BcContext,
    CountryTable,
    bc_view,
    fingerprint,
    normalize_email,
    outlook_email,
    outlook_view,
    parse_tag,
)
from shared.model import (
    Link,
    ReportItem,
    RunReport,
    RunStatus,
    Scope,
    UserSettings,
    UserState,
    earliest,
    iso,
    log_fields,
    parse_iso,
    redact,
    user_hash,
    utcnow,
)
from shared.planner import (
    CREATES_IN_OUTLOOK,
    FULL,
    INCREMENTAL,
    Needs,
    Plan,
    Snapshot,
    needs,
    plan,
    removal_guard,
    removals,
    route,
)

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
    pictures: bool = False  # the contacts carry their picture's metadata (`$expand=picture`)


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
        self._names: tuple[float, dict[str, str]] | None = None

    def _company_lock(self, company_id: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(company_id, threading.Lock())

    def read(
        self, client: BcClient, company_id: str, since: str | None, *, pictures: bool = False
    ) -> CompanyRead:
        """`pictures`: the read must carry each contact's picture metadata (users with syncPhotos)."""
        with self._company_lock(company_id):
            cached = self._cache.get(company_id)
            if cached is not None and self._serves(cached, since) and (cached.pictures or not pictures):
                return _narrow(cached, since)
            started = time.monotonic()
            if since is None:
                contacts = {c["id"]: c for c in client.list_contacts(company_id, pictures=pictures)}
                rows = list(contacts.values())
            else:
                changed = client.list_contacts(company_id, modified_after=since, pictures=pictures)
                contacts = {contact["id"]: contact for contact in changed}
                rows = client.list_contacts(company_id, select=("id", "email", "type", "displayName"))
            index = {row["id"]: normalize_email(row.get("email")) for row in rows}
            companies = {
                str(row["displayName"]).strip().casefold(): str(row["displayName"]).strip()
                for row in rows
                if row.get("type") == "Company" and str(row.get("displayName") or "").strip()
            }
            countries = CountryTable(loader=lambda: client.countries(company_id))
            read = CompanyRead(started, since, contacts, index, companies, countries, pictures)
            self._cache[company_id] = read
            return _narrow(read, since)

    def company_names(self, client: BcClient) -> dict[str, str]:
        """Company id → display name (BC's companies endpoint), shared like the contact reads: the
        names of the companies of `companies` (report items, default categories)."""
        with self._lock:
            cached = self._names
        if cached is not None and time.monotonic() - cached[0] < self.ttl:
            return cached[1]
        names = {
            str(row["id"]).lower(): str(row.get("displayName") or row.get("name") or "").strip()
            for row in client.companies()
        }
        with self._lock:
            self._names = (time.monotonic(), names)
        return names

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
    return CompanyRead(
        read.read_at, since, contacts, read.index, read.companies, read.countries, read.pictures
    )


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


LINK_SEPARATOR = "|"  # a link's RowKey for a company other than the home one: "{companyId}|{bcId}"
RETIRED_REASON = "its company is no longer in your settings"


def split_link_key(key: str) -> tuple[str | None, str]:
    """(company id or None for the home company, BC id) of a stored link key."""
    company, sep, bc_id = key.partition(LINK_SEPARATOR)
    return (company.lower(), bc_id) if sep else (None, key)


@dataclass
class _ScopeRun:
    """One company's part of a user's run (BEHAVIOUR §5.4): its settings, what was read, its plan.

    The home company (the user's one company before `companies`, or the first of them) keeps bare
    link keys and bare BC-id tags, so a user synced before issue 12 needs no migration; every other
    company's links and tags name it."""

    scope: Scope
    contact_filter: ContactFilter
    home: bool
    scope_hash: str
    watermark: str | None  # None: read every contact of the company
    retired: str | None = None  # the company left the settings: its contacts leave the folder
    links: dict[str, Link] = field(default_factory=dict)
    link_keys: dict[str, str] = field(default_factory=dict)  # BC id → stored RowKey, when not preferred
    stale_keys: list[str] = field(default_factory=list)  # the other form of a link stored twice
    company: CompanyRead | None = None
    ctx: BcContext = field(default_factory=BcContext)
    snapshot: Snapshot | None = None
    result: Plan | None = None
    outcome: Outcome | None = None
    error: str | None = None  # the company could not be read: its contacts wait for the next run
    category: str | None = None  # a company's default category (its name), once `category_of` knows it

    @property
    def company_id(self) -> str:
        return self.scope.company_id

    @property
    def active(self) -> bool:
        return self.error is None and self.snapshot is not None

    def link_key(self, bc_id: str) -> str:
        """Where this company's link of `bc_id` is stored."""
        if bc_id in self.link_keys:
            return self.link_keys[bc_id]
        return bc_id if self.home else f"{self.company_id}{LINK_SEPARATOR}{bc_id}"


@dataclass
class _UserRun:
    """One user's run as its steps hand it on: the inputs of step 1 and what the later steps read."""

    settings: UserSettings
    report: RunReport
    store: Store
    bc: BcClient
    graph: GraphClient
    state: UserState
    scope_hash: str  # of the whole settings: when it changes, the run reconciles fully
    mode: str
    home: str  # the company bare tags and link keys belong to
    listed: bool  # the settings have `companies` (report items then name their company)
    scopes: list[_ScopeRun]  # the settings' companies in order, then companies that left them
    reader: BcReader | None = None
    names: dict[str, str] | None = None  # company id → display name, read when first needed

    @property
    def company_id(self) -> str:
        """The first company (for a user without `companies`, the only one)."""
        return self.scopes[0].company_id

    def scope_of(self, company_id: str) -> _ScopeRun:
        """The scope of a company, made (retired) on first sight when it left the settings."""
        for scope in self.scopes:
            if scope.company_id == company_id:
                return scope
        retired = _ScopeRun(
            Scope(company_id, {}),
            parse_filter({}),
            home=company_id == self.home,
            scope_hash="",
            watermark=None,
            retired=RETIRED_REASON,
        )
        retired.ctx = BcContext(tag_company=None if retired.home else company_id)
        self.scopes.append(retired)
        return retired

    def company_names(self) -> dict[str, str]:
        """Company id → display name from BC's companies endpoint: one request, only for a run that
        needs a name (a default category, a report item to label)."""
        if self.names is None:
            reader = self.reader or BcReader(ttl=0)
            self.names = reader.company_names(self.bc)
        return self.names

    def category_of(self, scope: _ScopeRun) -> str | None:
        """THE category of a company's contacts (BEHAVIOUR §4.8, §5.4): for a user without `companies`
        the `category` setting; for a company of `companies` its entry's, else the company's display
        name; None when the setting is null. Every writer and reader of categories asks here.

        A display name is read from BC by a full run (names change rarely) or when none is known, and
        kept in the state (`companies[…].category`), so an idle incremental run spends no request."""
        if not (scope.scope.category_default and scope.scope.listed):
            return scope.scope.category
        if scope.category is None:
            saved = (self.state.companies.get(scope.company_id) or {}).get("category")
            if self.mode == INCREMENTAL and saved:
                scope.category = saved
            else:
                scope.category = self.company_names().get(scope.company_id)
        return scope.category

    def categories(self) -> dict[str, str | None]:
        """Company id → its category, for every company still in the settings (`category_of`). A
        name BC would not give counts as no category: its contacts are written without one."""
        out: dict[str, str | None] = {}
        for scope in self.scopes:
            if scope.retired is not None:
                continue
            try:
                out[scope.company_id] = self.category_of(scope)
            except ApiError as exc:
                log.info("could not read the company names: %s", redact(str(exc), self.settings.user))
                out[scope.company_id] = None
        return out

    # Categories the sync wrote before and no longer writes for any company (casefolded): taken off
    # every contact (BEHAVIOUR §4.8). Set once each company's category is known (`_read_both_sides`).
    stale_categories: frozenset[str] = frozenset()


@dataclass
class _BothSides:
    """Step 2's result: the folder, its delta, and per company the read and the snapshot."""

    folder_id: str | None
    delta: DeltaPage
    folder_read: bool = False
    # Outlook ids an incremental delta reported, before unread partial items were left out: a photo
    # change shows only there (shared/photos.py).
    outlook_changed: set[str] = field(default_factory=set)


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
    run.reader = reader
    sides = _read_both_sides(run, reader)
    try:
        safety_stop = _plan(run, sides, force=force)
        if safety_stop:
            runs.stop_for_safety(report, safety_stop)
            report.items.append(_safety_item(safety_stop))
            return
        if report.dryRun:
            _report_dry_run(run)
            return
        if sides.folder_id is None and not run.settings.in_default_folder:
            raise RuntimeError("no Outlook folder to sync into")
        _ensure_categories(run)
        _apply(run, sides, sides.folder_id, heartbeat, checkpoint)
        folder_id = sides.folder_id or _folder_seen(run)
        if run.settings.sync_photos and folder_id:
            for scope in _active(run):
                if scope.result is not None and scope.outcome is not None:
                    _sync_photos(run, scope, sides, folder_id)
        checkpoint("before_watermark")
        _finish(run, sides, sides.folder_id)
    finally:
        _name_items(run)


def _name_items(run: _UserRun) -> None:
    """Give each report item the contact's display name from the records this run read, so the
    report names contacts the way a person knows them (a contact BC deleted keeps only its email),
    and, for a user with `companies`, its company by name (never by id)."""
    snapshots = {s.company_id: s.snapshot for s in run.scopes if s.snapshot is not None}
    for item in run.report.items:
        if item.name:
            continue
        candidates = [snapshots[item.company]] if item.company in snapshots else list(snapshots.values())
        for snapshot in candidates:
            record = (
                snapshot.bc.get(item.bcId or "")
                or snapshot.outlook.get(item.outlookId or "")
                or snapshot.leftover.get(item.outlookId or "")
                or {}
            )
            name = str(record.get("displayName") or "").strip()
            if name:
                item.name = name
                break
    labelled = [item for item in run.report.items if item.company]
    if labelled:
        try:
            names = run.company_names()
        except Exception as exc:  # the report still lists every item; only the name is missing
            log.info("could not read the company names: %s", redact(str(exc), run.settings.user))
            names = {}
        for item in labelled:
            item.company = names.get(str(item.company)) or "a company Business Central no longer lists"


def _label(run: _UserRun, scope: _ScopeRun, start: int) -> None:
    """Mark the report items added since `start` as this company's (a user with `companies`)."""
    if run.listed:
        for item in run.report.items[start:]:
            if item.company is None:
                item.company = scope.company_id


def settings_hash(settings: UserSettings, company_id: str, scope: Scope | None = None) -> str:
    """What the links were built under; when it changes, the next run reconciles everything.

    For a company of `companies` its filter and category count; for a user without `companies`
    the hash is what it was before issue 12, so stored state keeps working."""
    doc: dict[str, Any] = {
        "company": company_id,
        "filter": settings.filter if scope is None or not scope.listed else scope.filter,
        "pullNew": settings.pull_new_from_outlook,
        "pullEdits": settings.pull_edits_from_outlook,
        "remove": settings.remove_from_outlook,
        "photos": settings.sync_photos,
    }
    if scope is not None and scope.listed:
        doc["category"] = scope.category
        doc["categoryDefault"] = scope.category_default
    elif settings.category is not None:  # only when set: settings from before it hash as they did
        doc["category"] = settings.category
    if settings.in_default_folder:
        doc["defaultFolder"] = True
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def _companies_hash(scopes: list[_ScopeRun]) -> str:
    """The whole `companies` setup, in any order (the order only routes new Outlook contacts)."""
    joined = json.dumps(sorted(scope.scope_hash for scope in scopes))
    return "companies:" + hashlib.sha256(joined.encode()).hexdigest()[:32]


def _start(
    services: Services, settings: UserSettings, report: RunReport, counter: RequestCounter
) -> _UserRun:
    """What the run works with, and whether an incremental run must be a full one (BEHAVIOUR §4.4)."""
    store, config = services.store, services.config
    bc, graph = services.clients(counter)
    state = store.get_state(settings.user)
    listed = settings.companies is not None
    scopes = settings.scopes(config.bc_company_id)
    home = (state.company_id or scopes[0].company_id) if listed else scopes[0].company_id
    scope_runs: list[_ScopeRun] = []
    for scope in scopes:
        scope_hash = settings_hash(settings, scope.company_id, scope)
        if listed:
            saved = state.companies.get(scope.company_id) or {}
            watermark = saved.get("bcWatermark") if saved.get("settingsHash") == scope_hash else None
        else:
            watermark = state.bc_watermark
        scope_runs.append(
            _ScopeRun(scope, parse_filter(scope.filter), scope.company_id == home, scope_hash, watermark)
        )
    run_hash = _companies_hash(scope_runs) if listed else scope_runs[0].scope_hash
    run = _UserRun(settings, report, store, bc, graph, state, run_hash, report.mode, home, listed, scope_runs)
    if run.mode == INCREMENTAL:
        why_full = _why_full(state, run_hash, config.full_sync_hours)
        if why_full:
            run.mode = FULL
            report.message = why_full
    return run


def written_categories(state: UserState) -> list[str]:
    """The categories the sync has written to this user's contacts and not yet taken off all of them."""
    try:
        names = json.loads(state.categories) if state.categories else []
    except ValueError:
        return []
    return [str(n) for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _why_full(state: UserState, scope_hash: str, full_sync_hours: float) -> str | None:
    """Why an incremental run must reconcile fully, or None."""
    if not state.delta_link or not state.bc_watermark:
        return "first run for this user: a full sync was done"
    if state.settings_hash != scope_hash:
        return "settings changed since the last run: a full sync was done"
    if state.writing_run:
        return "the previous run stopped while writing: a full sync was done"
    if state.previous_folder_id:
        return "contacts are still being moved from the previous sync folder: a full sync was done"
    if _full_due(state, full_sync_hours):
        return f"scheduled full reconcile (every {full_sync_hours:g} h)"
    return None


# Step 2: read both sides ----------------------------------------------------------------------------


def _read_both_sides(run: _UserRun, reader: BcReader) -> _BothSides:
    """The Outlook folder's delta, then Business Central (each company's changes and ids), then each
    company's snapshot, with the folder's contacts routed to their company (planner.route)."""
    folder_id, delta = _read_outlook(run)
    run.report.mode = run.mode
    first_error: Exception | None = None
    for scope in run.scopes:
        try:
            scope.company, scope.ctx = _read_bc(run, scope, reader)
        except (ApiError, SchemaError) as exc:
            if not run.listed:
                raise  # one company: the run fails, as before issue 12
            first_error = first_error or exc
            scope.error = _failure_message(exc)
    if first_error is not None and all(scope.error for scope in run.scopes):
        raise first_error  # no company could be read: the run failed
    _assign_links(run, run.store.get_links(run.settings.user))
    sides = _BothSides(folder_id, delta)
    sides.outlook_changed = {c["id"] for c in delta.changed} if run.mode == INCREMENTAL else set()
    if folder_id:
        sides.delta = _read_partial(run, folder_id, delta)
        if run.listed:  # one company: every contact is its, and needs() reads the tags it must know
            _fetch_route_tags(run, folder_id, sides.delta)
    routed = _route_contacts(run, sides.delta.changed, sides.delta.tags)
    categories = run.categories()
    current = {c.casefold() for c in categories.values() if c}
    run.stale_categories = frozenset(c.casefold() for c in written_categories(run.state)) - current
    leftover = _route_leftover(run, *_read_leftover(run, folder_id))
    for scope in run.scopes:
        if scope.error is not None:
            continue
        contacts = routed.get(scope.company_id, [])
        scope.snapshot = _snapshot(run, scope, categories.get(scope.company_id))
        scope.snapshot.outlook = {contact["id"]: contact for contact in contacts}
        scope.snapshot.outlook_removed = set(sides.delta.removed)
        scope.snapshot.tags = {
            contact["id"]: parse_tag(sides.delta.tags[contact["id"]])[1]
            for contact in contacts
            if contact["id"] in sides.delta.tags
        }
        scope.snapshot.outlook_complete = run.mode == FULL
        for outlook_id, (contact, bc_id) in leftover.get(scope.company_id, {}).items():
            scope.snapshot.leftover[outlook_id] = contact
            scope.snapshot.tags.setdefault(outlook_id, bc_id)
            scope.snapshot.leftover_folder = run.state.previous_folder_id
    return sides


def _snapshot(run: _UserRun, scope: _ScopeRun, category: str | None) -> Snapshot:
    """A company's snapshot before the Outlook contacts are added: its BC read, links and category."""
    return Snapshot(
        mode=run.mode,
        bc=dict(scope.company.contacts) if scope.company else {},
        bc_index=scope.company.index if scope.company else {},
        outlook={},
        outlook_removed=set(),
        links=scope.links,
        ctx=scope.ctx,
        retired=scope.retired,
        category=category,
        stale_categories=run.stale_categories,
        default_folder=run.settings.in_default_folder,
    )


def _route_leftover(
    run: _UserRun, contacts: dict[str, dict[str, Any]], tags: dict[str, str | None]
) -> dict[str, dict[str, tuple[dict[str, Any], str]]]:
    """The tagged contacts of the folder a move leaves, by the company their tag names (a bare tag:
    the home company), each with its BC id. Untagged ones are the user's own: nothing moves them."""
    routed: dict[str, dict[str, tuple[dict[str, Any], str]]] = {}
    for outlook_id, contact in contacts.items():
        company, bc_id = parse_tag(tags.get(outlook_id))
        if not bc_id:
            continue
        scope = run.scope_of(company or run.home)
        routed.setdefault(scope.company_id, {})[outlook_id] = (contact, bc_id)
    return routed


def _assign_links(run: _UserRun, links: dict[str, Link]) -> None:
    """Each stored link to its company's scope: a bare key is the home company's, "{company}|{id}"
    another's; a company no longer in the settings gets a retired scope. A link stored under the
    other key form than its company now uses is moved before the run writes (`_move_links`)."""
    for key, link in sorted(links.items()):
        company, bc_id = split_link_key(key)
        scope = run.scope_of(company or run.home)
        preferred = bc_id if scope.home else f"{scope.company_id}{LINK_SEPARATOR}{bc_id}"
        if bc_id in scope.links:
            # The same contact under both key forms: the preferred one wins, the other is dropped.
            if key != preferred:
                scope.stale_keys.append(key)
                continue
            scope.stale_keys.append(scope.link_keys.pop(bc_id))
        link.bc_id = bc_id
        scope.links[bc_id] = link
        if key != preferred:
            scope.link_keys[bc_id] = key


def _link_owners(run: _UserRun) -> dict[str, str]:
    """Outlook id → company id of every link."""
    return {link.outlook_id: scope.company_id for scope in run.scopes for link in scope.links.values()}


def _fetch_route_tags(run: _UserRun, folder_id: str, delta: DeltaPage) -> None:
    """The BC-id tags of the changed contacts no link knows: they say which company a contact is of."""
    owners = _link_owners(run)
    ids = sorted(c["id"] for c in delta.changed if c["id"] not in owners and c["id"] not in delta.tags)
    run.graph.read_whole(run.settings.user, folder_id, delta, ids)


def _route_contacts(
    run: _UserRun, contacts: Iterable[dict[str, Any]], tags: Mapping[str, str | None]
) -> dict[str, list[dict[str, Any]]]:
    """Outlook contacts by the company whose plan decides them (planner.route)."""
    contacts = list(contacts)
    owners = _link_owners(run)
    listed = [scope for scope in run.scopes if scope.retired is None]
    needs_names = run.listed and any(
        contact.get("categories") and contact["id"] not in owners and not tags.get(contact["id"])
        for contact in contacts
    )
    # Without the names (not needed, or BC would not give them), new contacts go to the first company.
    named = run.categories() if needs_names else {}
    categories = [(scope.company_id, named.get(scope.company_id, scope.scope.category)) for scope in listed]
    emails = [
        (scope.company_id, set(scope.company.index.values()) - {""})
        for scope in listed
        if run.listed and scope.company is not None
    ]
    routed: dict[str, list[dict[str, Any]]] = {}
    for contact in contacts:
        raw = tags.get(contact["id"])
        tag_company, _ = parse_tag(raw)
        email = normalize_email(outlook_email(contact))
        company = route(
            linked_to=owners.get(contact["id"]),
            tag_company=tag_company,
            tagged=bool(raw),
            categories=contact.get("categories"),
            scopes=categories,
            home=run.home,
            email_in=next((c for c, known in emails if email and email in known), None),
        )
        run.scope_of(company)  # a company that left the settings gets its (retired) scope
        routed.setdefault(company, []).append(contact)
    return routed


def _read_leftover(
    run: _UserRun, folder_id: str | None
) -> tuple[dict[str, dict[str, Any]], dict[str, str | None]]:
    """Every contact of the folder a move leaves (BEHAVIOUR §4.8), with its BC id tag. A folder that
    is gone, or the one the run syncs into again (switched back), leaves nothing to move."""
    previous = run.state.previous_folder_id
    if not previous or previous == folder_id:
        run.state.previous_folder_id = None
        return {}, {}
    try:
        contacts = run.graph.list_contacts(run.settings.user, previous)
    except ApiError as exc:
        if exc.status != 404:
            raise
        run.state.previous_folder_id = None
        return {}, {}
    tags: dict[str, str | None] = {}
    leftover: dict[str, dict[str, Any]] = {}
    for contact in contacts:
        tags[contact["id"]] = tag_of(contact)
        contact.pop("singleValueExtendedProperties", None)
        leftover[contact["id"]] = contact
    return leftover, tags


def _read_outlook(run: _UserRun) -> tuple[str | None, DeltaPage]:
    """The sync folder (renamed, created or replaced as needed) and its delta since the last run."""
    settings, report, graph, state = run.settings, run.report, run.graph, run.state
    was_default = bool(state.folder_id) and state.folder_id == state.default_folder_id
    if state.folder_id and was_default != settings.in_default_folder:
        # Between a subfolder and the default Contacts folder (BEHAVIOUR §4.8): the contacts move.
        state.previous_folder_id = state.folder_id
        state.folder_id = None
        run.mode = FULL
        report.message = "the sync folder changed: contacts are moved to " + (
            "the default Contacts folder" if settings.in_default_folder else f"'{settings.folder_name}'"
        )
    if settings.in_default_folder:
        folder_id = _default_folder(graph, settings, state)
        if not folder_id:  # empty and without subfolders: nothing to read; created contacts tell its id
            run.mode = FULL
            return folder_id, DeltaPage()
        return folder_id, _delta(run, folder_id)
    previous_folder = state.folder_id
    folder_id = _ensure_folder(graph, settings, run.state, report, report.dryRun)
    if state.previous_folder_id and state.previous_folder_id == folder_id:
        state.previous_folder_id = None  # switched back before the move was finished: nothing to move
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
        return folder_id, _delta(run, folder_id)
    except FolderGone:
        run.state.folder_id = None
        folder_id = _ensure_folder(graph, settings, run.state, report, report.dryRun)
        run.mode = FULL
        report.message = "the Outlook folder had been deleted: it was created again and fully synced"
        return folder_id, graph.delta(settings.user, folder_id, None) if folder_id else DeltaPage()


def _default_folder(graph: GraphClient, settings: UserSettings, state: UserState) -> str | None:
    """The default Contacts folder's id: remembered (it cannot be deleted, so it never changes and
    needs no per-run check), else looked up (GraphClient.default_folder_id)."""
    if not state.default_folder_id:
        state.default_folder_id = graph.default_folder_id(settings.user)
    return state.default_folder_id


def _delta(run: _UserRun, folder_id: str) -> DeltaPage:
    """The folder's delta since the last run, or a fresh round when Outlook or the stored link say so."""
    settings, report, graph = run.settings, run.report, run.graph
    try:
        delta_link = run.state.delta_link if run.mode == INCREMENTAL else None
        return graph.delta(settings.user, folder_id, delta_link)
    except ForeignDeltaLink as exc:
        run.mode = FULL
        report.message = f"the stored Outlook delta link was not used ({exc}): a full sync was done"
        refused = {
            "runId": report.runId,
            "userHash": user_hash(settings.user),
            "error": redact(str(exc), settings.user),
        }
        log.warning("stored delta link refused %s", log_fields(refused))
        return graph.delta(settings.user, folder_id, None)
    except DeltaExpired:
        run.mode = FULL
        report.message = "Outlook asked for a full resync (delta token expired): a full sync was done"
        return graph.delta(settings.user, folder_id, None)


def _read_bc(run: _UserRun, scope: _ScopeRun, reader: BcReader) -> tuple[CompanyRead | None, BcContext]:
    """A company's contacts changed since its watermark (all in a full run), and its context. A
    company that left the settings is not read: all its contacts leave the folder."""
    tag_company = None if scope.home else scope.company_id
    if scope.retired is not None:
        return None, BcContext(tag_company=tag_company)
    since = None
    if run.mode == INCREMENTAL and scope.watermark:
        since = iso(parse_iso(scope.watermark) - OVERLAP)
    schema = run.bc.schema()
    check_filter_fields(scope.contact_filter.to_json(), schema)
    company = reader.read(run.bc, scope.company_id, since, pictures=run.settings.sync_photos)
    ctx = BcContext(
        fields=frozenset(name for name in MAPPED_FIELDS if name in schema.contact_properties),
        countries=company.countries,
        companies=company.companies,
        tag_company=tag_company,
    )
    return company, ctx


# Step 3: plan -------------------------------------------------------------------------------------


def _active(run: _UserRun) -> list[_ScopeRun]:
    return [scope for scope in run.scopes if scope.active]


def _plan(run: _UserRun, sides: _BothSides, *, force: bool) -> str | None:
    """Fetch what the planner needs, plan each company, put the skipped contacts and the companies
    that could not be read in the report; returns why the mass-removal guard stops the run, if it does."""
    _complete(run, sides)
    for scope in run.scopes:
        start = len(run.report.items)
        if scope.error is not None:
            run.report.add("failed", reason=f"Business Central company could not be read: {scope.error}")
            _label(run, scope, start)
            continue
        snapshot = scope.snapshot
        assert snapshot is not None
        result = plan(snapshot, run.settings, scope.contact_filter, force=None)
        watermark = scope.watermark
        if run.mode == INCREMENTAL and watermark and scope.company is not None:
            # BC contacts re-read only because of the overlap window were reported by an earlier run.
            seen = parse_iso(watermark)
            contacts = scope.company.contacts
            result.skipped = [
                item
                for item in result.skipped
                if item.outlookId is not None
                or item.bcId not in contacts
                or parse_iso(contacts[item.bcId]["lastModifiedDateTime"]) > seen
            ]
        for item in result.skipped:
            run.report.add(item.action, item.bcId, item.outlookId, item.email, item.reason)
        _label(run, scope, start)
        scope.result = result
    if force:
        return None
    planned = [scope for scope in _active(run) if scope.result is not None]
    deletions = sum(removals(scope.result) for scope in planned if scope.result)
    return removal_guard(deletions, sum(len(scope.links) for scope in planned))


FETCH_ROUNDS = 4  # tags, then the BC/Outlook records they point at, then theirs
TAGS_BY_ID_MAX = 40  # more unknown tags than two $batch calls read: list the folder instead


def _complete(run: _UserRun, sides: _BothSides) -> None:
    """Fetch what `needs()` asks for, company by company, until no company asks anything: records by
    id (at most FETCH_ROUNDS rounds each), the whole folder at most once (it completes every
    company's snapshot), then records again."""
    rounds: dict[str, int] = {}
    while True:
        progress = False
        for scope in _active(run):
            assert scope.snapshot is not None
            wanted = needs(scope.snapshot, run.settings, scope.contact_filter)
            if _list_instead(run, sides, wanted):
                # Many untagged contacts (the user's own, in their default folder): one listing of the
                # folder with tags (1,000 a page) costs less than reading the tags 20 at a time.
                _read_whole_folder(run, sides, str(sides.folder_id))
                rounds.clear()
                progress = True
            elif wanted.records() and rounds.get(scope.company_id, 0) < FETCH_ROUNDS:
                _fetch_records(run, scope, sides.folder_id, wanted)
                rounds[scope.company_id] = rounds.get(scope.company_id, 0) + 1
                progress = True
            elif wanted.whole_folder and sides.folder_id and not sides.folder_read:
                _read_whole_folder(run, sides, sides.folder_id)
                rounds.clear()
                progress = True
        if not progress:
            return


def _list_instead(run: _UserRun, sides: _BothSides, wanted: Needs) -> bool:
    """More unknown tags than two $batch calls read, in a full run: list the folder once instead."""
    return bool(
        sides.folder_id and run.mode == FULL and not sides.folder_read and len(wanted.tags) > TAGS_BY_ID_MAX
    )


def _fetch_records(run: _UserRun, scope: _ScopeRun, folder_id: str | None, wanted: Needs) -> None:
    snapshot = scope.snapshot
    assert snapshot is not None
    if wanted.tags or wanted.outlook:
        ids = sorted(wanted.tags | wanted.outlook)
        found, missing = (
            run.graph.get_contacts(run.settings.user, folder_id, ids) if folder_id else ({}, set(ids))
        )
        for outlook_id in wanted.tags:
            snapshot.tags[outlook_id] = (
                parse_tag(tag_of(found[outlook_id]))[1] if outlook_id in found else None
            )
        for outlook_id, contact in found.items():
            contact.pop("singleValueExtendedProperties", None)
            snapshot.outlook[outlook_id] = contact
        for outlook_id in missing:
            snapshot.outlook.pop(outlook_id, None)
            snapshot.outlook_removed.add(outlook_id)
    if wanted.bc:
        for contact in run.bc.get_contacts(
            scope.company_id, sorted(wanted.bc), pictures=run.settings.sync_photos
        ):
            snapshot.bc[contact["id"]] = contact


def _read_whole_folder(run: _UserRun, sides: _BothSides, folder_id: str) -> None:
    """Add every contact of the folder the delta did not show (skipped earlier, e.g. while its BC
    contact was not synced), so a create adopts it instead of putting a duplicate next to it. Each
    goes to its company's snapshot (planner.route), which is then complete."""
    contacts = run.graph.list_contacts(run.settings.user, folder_id)
    tags = {contact["id"]: tag_of(contact) for contact in contacts}
    for contact in contacts:
        contact.pop("singleValueExtendedProperties", None)
    for company, routed in _route_contacts(run, contacts, tags).items():
        scope = run.scope_of(company)
        if scope.error is not None:
            continue
        if scope.snapshot is None:  # a company that left the settings, seen only now
            scope.snapshot = _snapshot(run, scope, None)
        for contact in routed:
            scope.snapshot.tags.setdefault(contact["id"], parse_tag(tags[contact["id"]])[1])
            scope.snapshot.outlook.setdefault(contact["id"], contact)
    for scope in _active(run):
        assert scope.snapshot is not None
        scope.snapshot.outlook_complete = True
    sides.folder_read = True


def _report_dry_run(run: _UserRun) -> None:
    for scope in _active(run):
        start = len(run.report.items)
        for action in scope.result.actions if scope.result else []:
            if action.report_as:
                run.report.add(
                    action.report_as,
                    action.bc_id,
                    action.outlook_id,
                    action.email,
                    f"dry run: {action.reason}",
                )
        _label(run, scope, start)
    # A company that could not be read is a `failed` item: the dry run is partial, as the run would be.
    runs.finish(run.report, failures=any(scope.error is not None for scope in run.scopes))


# Step 4: apply ------------------------------------------------------------------------------------


def _apply(
    run: _UserRun,
    sides: _BothSides,
    folder_id: str | None,
    heartbeat: Callable[[], None],
    checkpoint: Callable[[str], None],
) -> None:
    """Apply each company's plan with its own executor (its company, filter, tags and link keys)."""
    planned = [scope for scope in _active(run) if scope.result is not None]
    if any(action.writes for scope in planned if scope.result for action in scope.result.actions):
        # Cleared by step 5: still set next time means this run stopped midway (see UserState).
        run.state.writing_run = run.report.runId
        run.state = run.store.save_state(run.state)
    _move_links(run, planned)
    for scope in planned:
        assert scope.result is not None and scope.snapshot is not None
        executor = Executor(
            settings=run.settings,
            contact_filter=scope.contact_filter,
            company_id=scope.company_id,
            folder_id=folder_id,
            bc=run.bc,
            graph=run.graph,
            store=run.store,
            report=run.report,
            heartbeat=heartbeat,
            checkpoint=checkpoint,
            ctx=scope.snapshot.ctx,
            link_key=scope.link_key,
            links=scope.links,
            category=scope.snapshot.category,
            stale_categories=run.stale_categories,
        )
        start = len(run.report.items)
        try:
            scope.outcome = executor.apply(scope.result)
        finally:
            _label(run, scope, start)


def _move_links(run: _UserRun, planned: list[_ScopeRun]) -> None:
    """Links stored under another key form than their company now uses (the home company changed
    when a user went from `companies` back to one company): stored again under the preferred key."""
    for scope in planned:
        if scope.retired is not None or not (scope.link_keys or scope.stale_keys):
            continue
        old = dict(scope.link_keys)
        scope.link_keys.clear()
        moved = [replace(link, bc_id=scope.link_key(b)) for b, link in scope.links.items() if b in old]
        if moved:
            run.store.upsert_links(run.settings.user, moved)
        run.store.delete_links(run.settings.user, [*old.values(), *scope.stale_keys])
        scope.stale_keys.clear()


def _sync_photos(run: _UserRun, scope: _ScopeRun, sides: _BothSides, folder_id: str) -> None:
    """Step 4b (syncPhotos): one company's pictures that changed, after the contact writes
    (shared/photos.py). Its echoes and holds join the contact writes' for step 5."""
    result, outcome, snapshot = scope.result, scope.outcome, scope.snapshot
    assert result is not None and outcome is not None and snapshot is not None
    # The links as the contact writes left them (the snapshot's when the plan wrote none).
    links_now = {k: v for k, v in snapshot.links.items() if k not in outcome.links_removed}
    links_now.update(outcome.links_saved)
    created = {
        links_now[action.bc_id].outlook_id
        for action in result.actions
        if action.kind in CREATES_IN_OUTLOOK and action.bc_id in links_now
    }
    step = photos.PhotoRun(
        user=run.settings.user,
        folder_id=folder_id,
        company_id=scope.company_id,
        bc=run.bc,
        graph=run.graph,
        report=run.report,
        links_before=snapshot.links,
        links_now=links_now,
        bc_records=snapshot.bc,
        outlook_changed=sides.outlook_changed,
        outlook_created=created,
    )
    start = len(run.report.items)
    try:
        done = photos.sync_photos(step)
    finally:
        _label(run, scope, start)
    changed = [
        replace(link, bc_id=scope.link_key(link.bc_id))
        for link in done.links.values()
        if photos.state_of(link) != photos.state_of(links_now[link.bc_id])
    ]
    if changed:
        run.store.upsert_links(run.settings.user, changed)
    for outlook_id, fingerprint_ in done.outlook_written.items():
        outcome.written.setdefault(outlook_id, fingerprint_)
    outcome.photos_written.update(done.outlook_written)
    outcome.hold_bc_from = earliest(outcome.hold_bc_from, done.hold_bc_from)
    outcome.hold_delta = outcome.hold_delta or done.hold_delta


# Step 5: watermarks and report ---------------------------------------------------------------------


def _finish(run: _UserRun, sides: _BothSides, folder_id: str | None) -> None:
    """Advance the watermarks only past what was written (BEHAVIOUR §4.3.4), each company's its own,
    then finish the report. A company that could not be read holds the delta link, so the Outlook
    changes of its contacts come again next run."""
    state, report = run.state, run.report
    done = [scope for scope in _active(run) if scope.outcome is not None]
    outcomes = [(scope.outcome, scope.ctx) for scope in done if scope.outcome is not None]
    failed_company = any(scope.error is not None for scope in run.scopes)
    hold_delta = failed_company or any(outcome.hold_delta for outcome, _ in outcomes)
    if folder_id and not hold_delta and sides.delta.delta_link:
        state.delta_link = _settled_delta_link(
            run.graph, run.settings.user, folder_id, sides.delta.delta_link, outcomes
        )
    if run.listed:
        companies: dict[str, dict[str, str]] = {}
        for scope in run.scopes:
            if scope.retired is not None:
                continue
            saved = state.companies.get(scope.company_id) or {}
            entry = {"settingsHash": scope.scope_hash}
            if scope.scope.category_default and scope.category:
                entry["category"] = scope.category  # the company's name, kept for incremental runs
            if scope.outcome is not None and scope.company is not None:
                entry["bcWatermark"] = _next_bc_watermark(
                    scope.watermark, scope.company.contacts, scope.outcome
                )
            elif saved.get("settingsHash") == scope.scope_hash and saved.get("bcWatermark"):
                entry["bcWatermark"] = saved["bcWatermark"]
            companies[scope.company_id] = entry
        state.companies = companies
        # The run-level watermark says "this user has synced"; each company's own is in `companies`.
        marks = [entry["bcWatermark"] for entry in companies.values() if "bcWatermark" in entry]
        state.bc_watermark = min(marks, key=parse_iso) if marks else state.bc_watermark
    else:
        scope = run.scopes[0]
        assert scope.company is not None and scope.outcome is not None
        state.bc_watermark = _next_bc_watermark(state.bc_watermark, scope.company.contacts, scope.outcome)
        state.companies = {}
    seen = _folder_seen(run)
    if folder_id is None and seen:
        # The default folder was empty, its id unknown: the contacts just created tell it. No delta
        # round has been read, so the next run starts one (a full sync, as after a first run).
        folder_id = state.default_folder_id = seen
        state.delta_link = None
    _settle_moves_and_categories(run, failed_company or any(outcome.failures for outcome, _ in outcomes))
    state.folder_id = folder_id
    state.folder_name = run.settings.folder_name
    state.company_id = run.home
    state.settings_hash = run.scope_hash
    if run.mode == FULL:
        state.last_full_sync = report.startedAt
    state.last_run_id = report.runId
    state.writing_run = None
    failures = failed_company or any(outcome.failures for outcome, _ in outcomes)
    state.last_status = RunStatus.PARTIAL if failures else RunStatus.SUCCEEDED
    run.store.save_state(state)  # before the report says so: if this fails, the run failed
    runs.finish(report, failures=failures)


def _folder_seen(run: _UserRun) -> str | None:
    """The folder the first contact created in an empty default folder landed in (`Outcome.folder_seen`)."""
    seen = (scope.outcome.folder_seen for scope in run.scopes if scope.outcome is not None)
    return next((folder for folder in seen if folder), None)


def _current_categories(run: _UserRun) -> list[str]:
    """The categories this run wrote: each planned company's (`category_of`), in settings order."""
    out: list[str] = []
    for scope in _active(run):
        category = scope.snapshot.category if scope.snapshot is not None else None
        if category and category.casefold() not in {c.casefold() for c in out}:
            out.append(category)
    return out


def _settle_moves_and_categories(run: _UserRun, failures: bool) -> None:
    """A full run without failures has handled every contact: a move is done (nothing of ours is
    left in the previous folder) and only the current categories are on the contacts. Otherwise the
    next run must finish both: the previous folder stays in the state, and so do earlier categories."""
    state = run.state
    written = written_categories(state)
    if run.mode == FULL and not failures:
        state.previous_folder_id = None
        written = []
    for category in _current_categories(run):
        if category.casefold() not in {c.casefold() for c in written}:
            written.append(category)
    state.categories = json.dumps(written, ensure_ascii=False) if written else None


def _master_categories(state: UserState) -> list[str]:
    """The categories known to be in the master category list ("!name": creating it was refused).
    A JSON list; a plain name (one category, as the state first stored it) reads as a list of one."""
    raw = state.master_category
    if not raw:
        return []
    try:
        names = json.loads(raw)
    except ValueError:
        return [raw]
    return [str(n) for n in names] if isinstance(names, list) else [raw]


def _ensure_categories(run: _UserRun) -> None:
    """Create each company's category in the user's master category list once, with a colour, so
    Outlook shows it coloured and offers it for filtering (Graph outlookCategory). Remembered in the
    state, so no run after the first spends a request on it; a 409 means it exists already. Without
    the MailboxSettings.ReadWrite permission (403) the contacts still get the category (Outlook shows
    it without a colour); the report says so once per category, and full runs try again."""
    state = run.state
    known = _master_categories(state)
    for scope in _active(run):
        category = scope.snapshot.category if scope.snapshot is not None else None
        if not category or category in known or scope.result is None:
            continue
        if not any(a.writes for a in scope.result.actions):
            continue
        refused = f"!{category}"
        if refused in known and run.mode != FULL:
            continue
        try:
            run.graph.create_category(run.settings.user, category, CATEGORY_COLOR)
        except ApiError as exc:
            if exc.status not in (401, 403):
                log.info("could not create the Outlook category: %s", redact(str(exc), run.settings.user))
                continue
            if refused not in known:
                run.report.items.append(
                    ReportItem(
                        "note",
                        reason=f"the category '{category}' is on the contacts, but Outlook shows it without "
                        "a colour: the app may not edit the master category list (it needs the Graph "
                        "application permission MailboxSettings.ReadWrite)",
                    )
                )
                known.append(refused)
            continue
        known = [name for name in known if name != refused] + [category]
    state.master_category = json.dumps(known, ensure_ascii=False) if known else None


def _next_bc_watermark(current: str | None, contacts: dict[str, dict[str, Any]], outcome: Outcome) -> str:
    """The newest change read, held back before the oldest BC record whose write failed. Compared as
    times, never as text (see `earliest`)."""
    stamps = (str(c["lastModifiedDateTime"]) for c in contacts.values() if c.get("lastModifiedDateTime"))
    newest = max(stamps, key=parse_iso, default="")
    watermark = current
    if newest and (watermark is None or parse_iso(newest) > parse_iso(watermark)):
        watermark = newest
    if outcome.hold_bc_from is not None:
        held = iso(parse_iso(outcome.hold_bc_from) - timedelta(microseconds=1))
        watermark = earliest(watermark, held)
    if watermark is None:
        watermark = iso(utcnow() - OVERLAP)  # an empty company: start from now
    return watermark


def _read_partial(run: _UserRun, folder_id: str, delta: DeltaPage) -> DeltaPage:
    """Read whole the updated contacts that delta gave as their id and changed properties only.

    Never taken as the whole contact (that would blank BC fields and lose Outlook-only values such as
    a second email). One exception needs no read: a synced contact edited in Outlook while its BC
    record is unchanged (its view still hashes as the link says) and Outlook edits are not pulled: the
    plan ignores such an edit, so the item is left out unread. Each contact is judged by the link,
    BC record and context of its own company.
    """
    if not run.settings.pull_edits_from_outlook:
        by_outlook = {
            link.outlook_id: (scope, bc_id)
            for scope in run.scopes
            if scope.error is None and scope.retired is None and scope.company is not None
            for bc_id, link in scope.links.items()
        }

        def ignored(contact: dict[str, Any]) -> bool:
            found = by_outlook.get(contact["id"])
            if found is None:
                return False
            scope, bc_id = found
            link = scope.links[bc_id]
            if not link.outlook_hash or scope.company is None:
                return False
            bc = scope.company.contacts.get(bc_id)  # also BC records re-read only for the overlap window
            return bc is None or fingerprint(bc_view(bc, scope.ctx)) == link.bc_hash

        delta.changed = [
            contact for contact in delta.changed if not (is_partial(contact) and ignored(contact))
        ]
    return run.graph.fill_partial(run.settings.user, folder_id, delta)


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
    graph: GraphClient,
    user: str,
    folder_id: str,
    delta_link: str,
    outcomes: list[tuple[Outcome, BcContext]],
) -> str:
    """The delta link to store: past this run's own writes when nothing else happened meanwhile.

    The link read at the start predates our writes. Keeping it would replay every write as a change
    next time, and a contact we created that the user then deletes would never show up as removed
    (delta leaves out items created and deleted between two rounds). So read one more round: if it
    holds only our own writes, store its link; if the user changed something meanwhile, keep the
    start link so the next run sees that change (and our echoes, which it recognises). `outcomes`:
    each company's, with the context its writes were fingerprinted in.
    """
    written = {oid: (fp, ctx) for outcome, ctx in outcomes for oid, fp in outcome.written.items()}
    photos_written = {oid for outcome, _ in outcomes for oid in outcome.photos_written}
    deleted = {oid for outcome, _ in outcomes for oid in outcome.deleted}
    if not written and not deleted:
        return delta_link

    def own_write(contact: dict[str, Any]) -> bool:
        fp, ctx = written.get(contact["id"], (None, DEFAULT_CONTEXT))
        return fp is not None and fp == fingerprint(outlook_view(contact, ctx))

    # Judged a page at a time, so the echo of a 20,000-contact first run is never held whole, and the
    # first change that is not ours ends the round early. Replays make this stricter than judging the
    # last version of each item, never looser: a doubt keeps the start link, which is always safe.
    partial: list[dict[str, Any]] = []
    settled = ""
    try:
        for items, link in graph.delta_pages(user, folder_id, delta_link):
            settled = link
            for item in items:
                if "@removed" in item:
                    if item["id"] not in deleted:
                        return delta_link
                elif item["id"] in photos_written and _bare(item):
                    continue  # a photo this run set comes back as the bare id of the contact
                elif is_partial(item):
                    partial.append(item)  # our own updates come back partial (id + what we changed)
                elif not own_write(item):
                    return delta_link
        # The partial ones read whole to compare, in `$batch` calls of 20 across all pages.
        after = graph.fill_partial(user, folder_id, DeltaPage(changed=partial))
    except (DeltaExpired, FolderGone, ApiError) as exc:
        log.info("could not settle the delta link (%s); keeping the start link", redact(str(exc), user))
        return delta_link
    own = all(own_write(contact) for contact in after.changed) and all(
        outlook_id in deleted for outlook_id in after.removed
    )
    return settled if own and settled else delta_link


def _bare(item: dict[str, Any]) -> bool:
    """A delta item that says only which contact changed, none of its properties."""
    return not set(item) - {"id", "@odata.type", "@odata.etag", "changeKey", "lastModifiedDateTime"}


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
    if name is None:
        raise ValueError("the default Contacts folder is not ensured by name (see _default_folder)")
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
    """Read each company once from the earliest watermark among its users (every company of a user
    with `companies`, each from that company's own watermark)."""
    by_company: dict[str, list[str | None]] = {}
    pictures: set[str] = set()  # companies with a user who syncs photos: their read carries pictures
    for settings in users:
        state = services.store.get_state(settings.user)
        for company, watermark in company_watermarks(settings, state, services.config.bc_company_id).items():
            since = None
            if mode == INCREMENTAL and watermark and state.delta_link:
                since = iso(parse_iso(watermark) - OVERLAP)
            by_company.setdefault(company, []).append(since)
            if settings.sync_photos:
                pictures.add(company)
    bc, _ = services.clients(RequestCounter())
    for company, starts in by_company.items():
        known = [start for start in starts if start is not None]
        earliest = min(known) if len(known) == len(starts) else None  # None: someone reads everything
        try:
            reader.read(bc, company, earliest, pictures=company in pictures)
        except ApiError as exc:  # each user's run reports it
            log.warning("could not read company %s: %s", company, exc)


def company_watermarks(
    settings: UserSettings, state: UserState, default_company: str
) -> dict[str, str | None]:
    """Each company a user syncs → its BC watermark (None: the next run reads it whole). For the
    change poll and the prewarm, which ask or read each company once for all its users."""
    marks: dict[str, str | None] = {}
    for scope in settings.scopes(default_company):
        if settings.companies is None:
            marks[scope.company_id] = state.bc_watermark
        else:
            saved = state.companies.get(scope.company_id) or {}
            marks[scope.company_id] = saved.get("bcWatermark")
    return marks
