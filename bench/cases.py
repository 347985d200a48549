"""The benchmark's cases, each driving the real engine (`shared.sync.run_user` / `run_users`) with real
`Services` against a real Azurite and the sandbox, and measuring what it cost.

A group is one fresh sandbox and one fresh set of tables: the initial full sync of N contacts, then
incremental runs on the same data. Between cases the sandbox's counters and rate windows are reset
(production runs are 15 minutes apart, longer than Graph's 10-minute and BC's 5-minute windows).
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.bounds import Model, Need, bc_time, graph_time, time_bound
from bench.host import Sandbox
from bench.measure import MemoryWatch, TimedStore, WarningCount, route_engine_logs, timed_call
from shared.auth import token_provider
from shared.config import Config
from shared.model import WRITE_ACTIONS, RunReport, UserSettings, iso, utcnow
from shared.planner import FULL, INCREMENTAL
from shared.services import Services, store_from_config
from shared.sync import run_user, run_users

OUT = Path(__file__).resolve().parent / "out"
_warnings: WarningCount | None = None


def engine_warnings() -> WarningCount:
    """The process-wide counter of engine warnings (their text goes to bench/out/engine.log)."""
    global _warnings
    if _warnings is None:
        _warnings = route_engine_logs(OUT / "engine.log")
    return _warnings


WRITE_KEYS = WRITE_ACTIONS


@dataclass
class CaseResult:
    group: str
    name: str
    kind: str  # initial | warmup | noop | changes
    contacts: int  # per user
    users: int
    companies: int = 1  # BC companies each user syncs (BEHAVIOUR §5.4)
    wall: float = 0.0
    store_total: float = 0.0
    store_critical: float = 0.0
    store_calls: dict[str, int] = field(default_factory=dict)
    store_seconds: dict[str, float] = field(default_factory=dict)  # by method, all threads
    engine_cpu: float = 0.0
    sandbox_cpu: float = 0.0
    peak_mib: float = 0.0
    baseline_mib: float = 0.0
    graph_http: int = 0
    graph_items: int = 0
    bc_http: int = 0
    bc_items: int = 0
    entra_http: int = 0
    graph_by_kind: dict[str, int] = field(default_factory=dict)
    graph_items_by_kind: dict[str, int] = field(default_factory=dict)
    bc_by_kind: dict[str, int] = field(default_factory=dict)
    mailbox_http_max: int = 0
    mailbox_items_max: int = 0
    graph_429: int = 0
    bc_429: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    bc_peak_active: int = 0
    engine_requests: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    bound_graph: int = 0
    bound_bc: int = 0
    bound_graph_items: int = 0
    bound_time: float = 0.0
    bound_graph_time: float = 0.0
    bound_bc_time: float = 0.0
    bound_photo: int = 0  # picture requests the case needs at least (both services)
    problems: list[str] = field(default_factory=list)
    engine_warnings: int | None = (
        None  # warning records the engine logged during the case (bench/out/engine.log)
    )

    @property
    def requests(self) -> int:
        return self.graph_http + self.bc_http

    @property
    def photo_requests(self) -> int:
        """Picture requests sent: Graph `photo` and BC `picture` calls (kinds photos.*, pictures.*)."""
        graph = sum(n for k, n in self.graph_by_kind.items() if k.split(" ", 1)[-1].startswith("photos."))
        bc = sum(n for k, n in self.bc_by_kind.items() if k.split(" ", 1)[-1].startswith("pictures."))
        return graph + bc

    @property
    def bound_requests(self) -> int:
        return self.bound_graph + self.bound_bc

    @property
    def ratio(self) -> float:
        return self.requests / self.bound_requests if self.bound_requests else float("inf")

    @property
    def api_wall(self) -> float:
        """Wall time less the store's share of the critical path (Azurite is not part of the bound)."""
        return max(0.0, self.wall - self.store_critical)

    @property
    def time_ratio(self) -> float:
        return self.api_wall / self.bound_time if self.bound_time else float("inf")

    @property
    def concurrency_429(self) -> int:
        return self.refusals.get("graph_concurrency", 0) + self.refusals.get("bc_queue_full", 0)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Rig:
    """One sandbox process, one set of tables, and the app's `Services` configured against them."""

    def __init__(self, storage_connection_string: str, model: Model, profile: str | None = None):
        self.model = model
        self.profile = profile
        self.sandbox = Sandbox().start()
        self.host = self.sandbox.host
        try:
            env = self.host.env(storage_connection_string, "Bench" + uuid.uuid4().hex[:10])
            os.environ.update(env)  # REQUESTS_CA_BUNDLE: the engine trusts the sandbox's CA as in tests
            config = Config.from_env(env)
            self.store = TimedStore(store_from_config(config))
            self.store.ensure_tables()
            self.services = Services(config=config, store=self.store, tokens=token_provider(config))  # type: ignore[arg-type]
            self.host.set_latency(model.graph_latency, model.bc_latency)
            self.memory = MemoryWatch()
        except BaseException:
            self.sandbox.stop()
            raise

    def close(self) -> None:
        self.sandbox.stop()

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Setup --------------------------------------------------------------------------------------
    def seed(self, contacts: int) -> None:
        """`contacts` eligible BC persons, last modified a day ago (existing data, not fresh edits)."""
        modified = iso(utcnow() - timedelta(days=1))
        done = 0
        while done < contacts:
            step = min(5000, contacts - done)
            self.host.seed_persons(done, step, modified)
            done += step

    def users(self, upns: list[str]) -> list[UserSettings]:
        self.host.add_mailboxes(upns)
        return [self.store.put_settings(UserSettings.from_json({"user": u})) for u in upns]

    def folder_id(self, user: str) -> str | None:
        return self.store._store.get_state(user).folder_id

    # Measuring ------------------------------------------------------------------------------------
    def measure(
        self,
        result: CaseResult,
        run: Callable[[], list[RunReport]],
        mailbox_need: Need,
        bc_need: Need,
        expect_counts: dict[str, int],
        expect_folder: int,
        upns: list[str],
    ) -> CaseResult:
        host = self.host
        host.reset_counters()
        host.forget_rate_history()
        self.store.reset()
        warnings = engine_warnings()
        warnings_before = warnings.count
        cpu_before = host.snapshot()["cpu_seconds"]
        self.memory.start()
        profiler = None
        if self.profile:
            profiler = cProfile.Profile(time.thread_time) if self.profile == "cpu" else cProfile.Profile()
        if profiler is not None:
            profiler.enable()
        try:
            reports, result.wall, result.engine_cpu = timed_call(run)
        finally:
            if profiler is not None:
                profiler.disable()
            result.peak_mib = self.memory.stop()
        result.baseline_mib = self.memory.baseline_mib
        result.engine_warnings = warnings.count - warnings_before
        snap = host.snapshot()
        if profiler is not None:
            _save_profile(profiler, result.name)
        result.sandbox_cpu = snap["cpu_seconds"] - cpu_before
        result.store_total = self.store.total
        result.store_critical = self.store.busiest_thread
        result.store_calls = dict(self.store.calls)
        result.store_seconds = {k: round(v, 3) for k, v in self.store.by_method.items()}
        g, b = snap["graph"], snap["bc"]
        result.graph_http, result.graph_items = g["http_total"], g["items_total"]
        result.bc_http, result.bc_items = b["http_total"], b["items_total"]
        result.entra_http = snap["entra"]["http_total"]
        result.graph_by_kind, result.graph_items_by_kind, result.bc_by_kind = g["http"], g["items"], b["http"]
        mailboxes = [snap["mailboxes"].get(u.lower(), {}) for u in upns]
        result.mailbox_http_max = max((m.get("http_total", 0) for m in mailboxes), default=0)
        result.mailbox_items_max = max((m.get("items_total", 0) for m in mailboxes), default=0)
        result.graph_429 = g["statuses"].get(429, 0)
        result.bc_429 = b["statuses"].get(429, 0)
        result.refusals = snap["refusals"]
        result.bc_peak_active = snap["bc_peak_active"]
        engine: Counter[str] = Counter()
        counts: Counter[str] = Counter()
        for r in reports:
            engine.update(r.requests)
            counts.update(r.counts)
        result.engine_requests, result.counts = dict(engine), dict(counts)
        result.bound_graph = mailbox_need.graph_requests * len(upns)
        result.bound_bc = bc_need.bc_requests
        result.bound_photo = mailbox_need.photo_graph * len(upns) + bc_need.photo_bc
        result.bound_graph_items = mailbox_need.graph_items
        result.bound_graph_time = graph_time(mailbox_need, self.model)
        result.bound_bc_time = bc_time(bc_need, self.model)
        result.bound_time = time_bound([mailbox_need] * len(upns), bc_need, self.model)
        result.problems = self._check(reports, counts, expect_counts, expect_folder, upns)
        return result

    def _check(
        self,
        reports: list[RunReport],
        counts: Counter[str],
        expect_counts: dict[str, int],
        expect_folder: int,
        upns: list[str],
    ) -> list[str]:
        """A fast but wrong run must not pass: what the users would see has to be right too."""
        problems = []
        for r in reports:
            if r.status != "succeeded":
                problems.append(f"{r.user}: status {r.status} ({r.message})")
        for key in (*WRITE_KEYS, "failed"):
            want = expect_counts.get(key, 0)
            if counts.get(key, 0) != want:
                problems.append(f"{key} {counts.get(key, 0)}, expected {want}")
        for upn in upns:
            fid = self.folder_id(upn)
            if fid is None:
                problems.append(f"{upn}: no folder")
                continue
            seen = self.host.folder_summary(upn, fid)
            if seen["contacts"] != expect_folder:
                problems.append(f"{upn}: {seen['contacts']} contacts in Outlook, expected {expect_folder}")
            if seen["duplicates"]:
                problems.append(f"{upn}: {seen['duplicates']} duplicate contacts in Outlook")
            if seen["untagged"]:
                problems.append(f"{upn}: {seen['untagged']} Outlook contacts without their BC id")
        return problems[:10]


def _save_profile(profiler: cProfile.Profile, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")
    profiler.dump_stats(OUT / f"{slug}.prof")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
    (OUT / f"{slug}.txt").write_text(text.getvalue())


# The groups ------------------------------------------------------------------------------------
def single_user_group(conn: str, model: Model, n: int, profile: str | None = None) -> list[CaseResult]:
    """Initial full sync of n contacts, a warm-up and a no-op incremental, then 1 % changed per side."""
    group = f"n{n}"
    upn = "seller@contoso.example"
    results: list[CaseResult] = []
    with Rig(conn, model, profile) as rig:
        log(f"[{group}] seeding {n} BC contacts")
        rig.seed(n)
        (settings,) = rig.users([upn])

        def one(mode: str) -> Callable[[], list[RunReport]]:
            return lambda: [run_user(rig.services, settings, mode)]

        log(f"[{group}] initial full sync")
        results.append(
            rig.measure(
                CaseResult(group, f"initial full sync, {n} contacts", "initial", n, 1),
                one(FULL),
                Need(graph_writes=n, echo=n, graph_fixed=3),  # folder lookup + create, the category (§4.8)
                Need(bc_read_rows=n, bc_reference_reads=2),
                {"outlookCreated": n},
                n,
                [upn],
            )
        )
        quiet = Need(bc_read_rows=n, bc_read_requests=1)
        for kind, title in (("warmup", "warm-up incremental"), ("noop", "no-op incremental")):
            log(f"[{group}] {title}")
            results.append(
                rig.measure(
                    CaseResult(group, f"{title}, {n} contacts", kind, n, 1),
                    one(INCREMENTAL),
                    Need(graph_fixed=1),
                    quiet,
                    {},
                    n,
                    [upn],
                )
            )
        changed = max(2, n // 100)
        bc_edits = changed
        outlook_edits, outlook_creates = changed // 2, changed - changed // 2
        ids = rig.host.bc_ids()
        rig.host.bc_edit(ids[:: max(1, len(ids) // bc_edits)][:bc_edits], "Changed in BC")
        fid = rig.folder_id(upn)
        rig.host.outlook_changes(upn, fid, outlook_edits, outlook_creates, group)
        log(
            f"[{group}] incremental with 1 % changed on each side ({bc_edits} BC edits, "
            f"{outlook_edits} Outlook edits, {outlook_creates} Outlook creates)"
        )
        results.append(
            rig.measure(
                CaseResult(group, f"incremental, 1 % changed per side, {n} contacts", "changes", n, 1),
                one(INCREMENTAL),
                Need(
                    graph_writes=bc_edits + outlook_creates,
                    delta_in=outlook_edits + outlook_creates,
                    echo=bc_edits + outlook_creates,
                    tag_reads=outlook_creates,
                    graph_fixed=1,
                ),
                Need(bc_read_rows=n, bc_read_requests=1, bc_writes=outlook_creates, bc_reference_reads=1),
                {"outlookUpdated": bc_edits, "bcCreated": outlook_creates},
                n + outlook_creates,
                [upn],
            )
        )
    return results


def photos_group(conn: str, model: Model, n: int, profile: str | None = None) -> list[CaseResult]:
    """`n` BC contacts, each with a picture (syncPhotos on, the default): the initial full sync copies
    every picture to Outlook (one BC read and one Graph write each), then a warm-up and a no-op
    incremental, which must cost what they cost without photos."""
    group = f"photos{n}"
    upn = "photos@contoso.example"
    results: list[CaseResult] = []
    with Rig(conn, model, profile) as rig:
        log(f"[{group}] seeding {n} BC contacts with pictures")
        rig.seed(n)
        rig.host.seed_pictures(rig.host.bc_ids(), iso(utcnow() - timedelta(days=1)))
        (settings,) = rig.users([upn])

        def one(mode: str) -> Callable[[], list[RunReport]]:
            return lambda: [run_user(rig.services, settings, mode)]

        log(f"[{group}] initial full sync with photos")
        results.append(
            rig.measure(
                CaseResult(group, f"initial full sync, {n} contacts with photos", "photos", n, 1),
                one(FULL),
                Need(graph_writes=n, echo=n, graph_fixed=2, photo_graph=n),
                Need(bc_read_rows=n, bc_reference_reads=2, photo_bc=n),
                {"outlookCreated": n},
                n,
                [upn],
            )
        )
        for kind, title in (("warmup", "warm-up incremental"), ("noop", "no-op incremental")):
            log(f"[{group}] {title}")
            results.append(
                rig.measure(
                    CaseResult(group, f"{title}, {n} contacts with photos", kind, n, 1),
                    one(INCREMENTAL),
                    Need(graph_fixed=1),
                    Need(bc_read_rows=n, bc_read_requests=1),
                    {},
                    n,
                    [upn],
                )
            )
    return results


def multi_user_group(
    conn: str,
    model: Model,
    users: int,
    contacts: int,
    max_parallel: int | None = None,
    profile: str | None = None,
) -> list[CaseResult]:
    """`users` salespeople, each with their own mailbox, all syncing the same company's `contacts`
    contacts in one scheduled run (`run_users`, BC read once for the company)."""
    group = f"users{users}"
    upns = [f"seller{i:03d}@contoso.example" for i in range(users)]
    results: list[CaseResult] = []
    kwargs: dict[str, Any] = {} if max_parallel is None else {"max_parallel": max_parallel}
    with Rig(conn, model, profile) as rig:
        log(f"[{group}] seeding {contacts} BC contacts and {users} mailboxes")
        rig.seed(contacts)
        settings = rig.users(upns)

        def scheduled() -> list[RunReport]:
            return run_users(rig.services, settings, INCREMENTAL, **kwargs)

        log(f"[{group}] first scheduled run ({users} users x {contacts} contacts)")
        results.append(
            rig.measure(
                CaseResult(
                    group,
                    f"{users} users x {contacts} contacts, first scheduled run",
                    "initial",
                    contacts,
                    users,
                ),
                scheduled,
                Need(graph_writes=contacts, echo=contacts, graph_fixed=3),  # + the category (BEHAVIOUR §4.8)
                Need(bc_read_rows=contacts, bc_reference_reads=2),
                {"outlookCreated": contacts * users},
                contacts,
                upns,
            )
        )
        for kind, title in (("warmup", "warm-up scheduled run"), ("noop", "no-op scheduled run")):
            log(f"[{group}] {title}")
            results.append(
                rig.measure(
                    CaseResult(group, f"{users} users x {contacts} contacts, {title}", kind, contacts, users),
                    scheduled,
                    Need(graph_fixed=1),
                    Need(bc_read_rows=contacts, bc_read_requests=1),
                    {},
                    contacts,
                    upns,
                )
            )
    return results


def companies_group(
    conn: str, model: Model, companies: int, contacts: int = 500, profile: str | None = None
) -> list[CaseResult]:
    """One salesperson syncing `companies` BC companies of `contacts` contacts each (BEHAVIOUR §5.4):
    the initial full sync, a warm-up and a no-op incremental. One Outlook delta for the folder, each
    company read on its own, so a no-op costs the user's 2 Graph requests and 2 BC per company."""
    group = f"companies{companies}"
    upn = "seller@contoso.example"
    total = companies * contacts
    results: list[CaseResult] = []
    with Rig(conn, model, profile) as rig:
        log(f"[{group}] seeding {companies} companies x {contacts} BC contacts")
        ids = rig.host.add_companies(companies)
        modified = iso(utcnow() - timedelta(days=1))
        for n, company in enumerate(ids):
            rig.host.seed_company_persons(company, n * contacts, contacts, modified)
        rig.host.add_mailboxes([upn])
        document = {"user": upn, "companies": [{"companyId": company} for company in ids]}
        settings = rig.store.put_settings(UserSettings.from_json(document))

        def one(mode: str) -> Callable[[], list[RunReport]]:
            return lambda: [run_user(rig.services, settings, mode)]

        log(f"[{group}] initial full sync")
        results.append(
            rig.measure(
                CaseResult(
                    group,
                    f"initial full sync, {companies} companies x {contacts}",
                    "initial",
                    total,
                    1,
                    companies,
                ),
                one(FULL),
                Need(graph_writes=total, echo=total, graph_fixed=2),
                # $metadata, each company's Country/Region table, the companies' names (the report).
                Need(bc_read_rows=contacts, bc_reference_reads=1 + companies + 1, companies=companies),
                {"outlookCreated": total},
                total,
                [upn],
            )
        )
        quiet = Need(bc_read_rows=contacts, bc_read_requests=1, companies=companies)
        for kind, title in (("warmup", "warm-up incremental"), ("noop", "no-op incremental")):
            log(f"[{group}] {title}")
            results.append(
                rig.measure(
                    CaseResult(
                        group, f"{title}, {companies} companies x {contacts}", kind, total, 1, companies
                    ),
                    one(INCREMENTAL),
                    Need(graph_fixed=1),
                    quiet,
                    {},
                    total,
                    [upn],
                )
            )
    return results
