"""The simulated cloud in a process of its own, driven through a small control API.

Why a separate process: the sandbox's servers are Python threads. In the engine's process they would
compete with the engine for the GIL (distorting wall time, most of all with 50 mailboxes in flight)
and their data (every contact of every mailbox) would be counted as the engine's memory.

`start_sandbox()` returns a proxy of `SandboxHost` living in the child; every method runs there and
returns plain data. The host also counts the sandbox's 429 refusals by cause (its limit objects are
wrapped here, not changed), so the benchmark can tell "too many at once" from "too many per window".
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing import get_context
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any

FIRST = ("Anna", "Lars", "Ingrid", "Ola", "Kari", "Jonas", "Sofie", "Henrik", "Maja", "Erik", "Nora", "Emil")
LAST = ("Hansen", "Johansen", "Olsen", "Larsen", "Berg", "Haugen", "Dahl", "Lie", "Strand", "Nguyen")
TITLES = ("Purchasing Manager", "CEO", "Sales Rep", "CFO", "Buyer", "Office Manager", "IT Lead")
CITIES = (("Oslo", "0150"), ("Bergen", "5003"), ("Trondheim", "7010"), ("Stavanger", "4006"))


def person_fields(i: int) -> dict[str, Any]:
    """A deterministic, fully eligible BC person with the fields a real contact has filled in.

    No company name: BC resolves a person's company name by scanning the company contacts, which
    would make seeding 20,000 contacts quadratic without changing what the sync does per contact.
    """
    first, last = FIRST[i % len(FIRST)], LAST[(i // len(FIRST)) % len(LAST)]
    city, postcode = CITIES[i % len(CITIES)]
    return {
        "type": "Person",
        "displayName": f"{first} {last} {i}",
        "email": f"{first}.{last}.{i}@bench{i % 50}.example".lower(),
        "jobTitle": TITLES[i % len(TITLES)],
        "phoneNumber": f"+47 22 {i % 100:02d} {i // 100 % 100:02d} 00",
        "mobilePhoneNumber": f"+47 9{i:07d}",
        "addressLine1": f"Storgata {i % 120 + 1}",
        "city": city,
        "postalCode": postcode,
        "country": "NO",
    }


class SandboxHost:
    """The Cloud plus the control calls the benchmark needs, all executed in the sandbox process."""

    def __init__(self) -> None:
        from sandbox.cloud import Cloud

        self._dir = tempfile.mkdtemp(prefix="bc-sync-bench-")
        self.cloud = Cloud(Path(self._dir)).start()
        self.cloud.bc.add_country("NO")
        self.refusals: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._wrap_limits()
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()

    # Limits, observed from outside ----------------------------------------------------------
    def _wrap_limits(self) -> None:
        graph_limits = self.cloud.graph.limits
        enter = graph_limits.enter

        def counted_enter(key: tuple[str, str]) -> tuple[str, float] | None:
            refused = enter(key)
            if refused is not None:
                cause = "graph_concurrency" if "Concurrency" in refused[0] else "graph_rate"
                with self._lock:
                    self.refusals[cause] += 1
            return refused

        graph_limits.enter = counted_enter  # type: ignore[method-assign]
        bc_limits = self.cloud.bc.limits
        admit: Callable[[str], Any] = bc_limits.admit

        def counted_admit(principal: str) -> Any:
            refused = admit(principal)
            if refused is not None:
                text = str(refused)
                cause = "bc_queue_full" if "queue" in text.lower() else "bc_rate"
                if getattr(refused, "status", 429) == 503:
                    cause = "bc_queue_timeout"
                with self._lock:
                    self.refusals[cause] += 1
            return refused

        bc_limits.admit = counted_admit  # type: ignore[method-assign]

    # Settings and latency -------------------------------------------------------------------
    def env(self, storage_connection_string: str, table_prefix: str) -> dict[str, str]:
        return self.cloud.env(storage_connection_string, table_prefix)

    def company_id(self) -> str:
        return self.cloud.company_id

    def set_latency(self, graph: float, bc: float) -> None:
        self.cloud.graph.faults.latency = graph
        self.cloud.bc.faults.latency = bc

    def limits(self) -> dict[str, Any]:
        g, b = self.cloud.graph, self.cloud.bc
        return {
            "graph_mailbox_concurrency": g.limits.concurrency,
            "graph_rate_limit": g.limits.rate_limit,
            "graph_rate_window": g.limits.rate_window,
            "graph_batch_parallelism": g.batch_parallelism,
            "graph_delta_max_page": g.delta_max_page_size,
            # Older sandboxes spent the latency on a $batch envelope too (outside any mailbox slot).
            "graph_envelope_latency": getattr(g, "envelope_latency", True),
            "bc_max_concurrent": b.limits.max_concurrent,
            "bc_max_queue": b.limits.max_queue,
            "bc_rate_limit": b.limits.rate_limit,
            "bc_rate_window": b.limits.rate_window,
        }

    # Data -------------------------------------------------------------------------------------
    def seed_persons(self, start: int, count: int, modified: str) -> int:
        """BC persons `start`..`start+count-1`, last modified at `modified` (long before the runs)."""
        bc, company = self.cloud.bc, self.cloud.company_id
        for i in range(start, start + count):
            bc.seed_contact(company, lastModifiedDateTime=modified, **person_fields(i))
        return len(bc.companies[company].contacts)

    def seed_pictures(self, ids: list[str], modified: str) -> int:
        """A small JPEG picture on each of these BC contacts, all different; their last modification
        stays at `modified` (existing data, not fresh edits). Returns how many have one."""
        from sandbox.bc import parse_datetime
        from sandbox.images import make_jpeg

        bc, company = self.cloud.bc, self.cloud.company_id
        when = parse_datetime(modified)
        for n, cid in enumerate(ids):
            bc.set_picture(company, cid, make_jpeg(96 + n % 200, 96, padding=4000 + n % 1000))
            bc.set_last_modified(company, cid, when)
        return len(ids)

    def add_companies(self, count: int) -> list[str]:
        """The world's company and `count - 1` more, each with the demo Country/Region table."""
        ids = [self.cloud.company_id]
        for n in range(1, count):
            ids.append(self.cloud.bc.add_company(f"Bench Company {n}", display_name=f"Bench Company {n}"))
        return ids

    def seed_company_persons(self, company: str, start: int, count: int, modified: str) -> int:
        """Like `seed_persons`, into another company (persons `start`.. keep their emails distinct)."""
        bc = self.cloud.bc
        for i in range(start, start + count):
            bc.seed_contact(company, lastModifiedDateTime=modified, **person_fields(i))
        return len(bc.companies[company].contacts)

    def bc_ids(self) -> list[str]:
        with self.cloud.bc.lock:
            return sorted(self.cloud.bc.companies[self.cloud.company_id].contacts)

    def bc_count(self) -> int:
        with self.cloud.bc.lock:
            return len(self.cloud.bc.companies[self.cloud.company_id].contacts)

    def bc_edit(self, ids: list[str], job_title: str) -> None:
        """A person editing these contacts in BC (stamps lastModifiedDateTime now)."""
        for cid in ids:
            self.cloud.bc.edit_contact(self.cloud.company_id, cid, jobTitle=job_title)

    def add_mailboxes(self, upns: list[str]) -> None:
        for upn in upns:
            self.cloud.graph.add_mailbox(upn)

    def outlook_changes(self, upn: str, folder_id: str, edits: int, creates: int, tag: str) -> dict[str, int]:
        """The salesperson edits `edits` synced contacts and creates `creates` new ones in the folder."""
        graph = self.cloud.graph
        contacts = sorted(graph.folder_contacts(upn, folder_id), key=lambda c: c["id"])
        step = max(1, len(contacts) // max(1, edits))
        edited = 0
        for c in contacts[::step][:edits]:
            graph.user_update_contact(upn, folder_id, c["id"], jobTitle=f"Edited in Outlook {tag}")
            edited += 1
        for i in range(creates):
            name = f"Outlook Person {tag} {i}"
            graph.user_create_contact(
                upn,
                folder_id,
                {
                    "displayName": name,
                    "givenName": "Outlook",
                    "surname": f"Person{i}",
                    "emailAddresses": [{"address": f"outlook.{tag}.{i}@new.example", "name": name}],
                },
            )
        return {"edited": edited, "created": creates}

    def calibration_folder(self, upn: str, contacts: int) -> dict[str, Any]:
        """A mailbox with a folder of `contacts` contacts, for timing single requests and batches."""
        graph = self.cloud.graph
        graph.add_mailbox(upn)
        fid = graph.user_create_folder(upn, "Calibration")["id"]
        ids = [
            graph.user_create_contact(upn, fid, {"displayName": f"Calibration {i}", "givenName": "C"})["id"]
            for i in range(contacts)
        ]
        return {"folder_id": fid, "ids": ids}

    def folder_summary(self, upn: str, folder_id: str) -> dict[str, int]:
        """What the salesperson sees: how many contacts, how many duplicate emails, how many untagged."""
        from shared.mapping import BC_ID_PROPERTY_ID

        contacts = self.cloud.graph.folder_contacts(upn, folder_id)
        emails: Counter[str] = Counter()
        untagged = 0
        for c in contacts:
            emails[((c.get("emailAddresses") or [{}])[0].get("address") or "").strip().lower()] += 1
            props = c.get("singleValueExtendedProperties") or []
            if not any(str(p.get("id", "")).lower() == BC_ID_PROPERTY_ID.lower() for p in props):
                untagged += 1
        return {
            "contacts": len(contacts),
            "duplicates": sum(n - 1 for n in emails.values() if n > 1),
            "untagged": untagged,
        }

    # Counters -----------------------------------------------------------------------------------
    def reset_counters(self) -> None:
        self.cloud.reset_counters()
        self.cloud.graph.reset_counters()
        self.cloud.bc.limits.peak_active.clear()
        with self._lock:
            self.refusals.clear()

    def forget_rate_history(self) -> None:
        """A fresh rate window (runs are 15 minutes apart in production; the windows are 5/10)."""
        self.cloud.graph.limits.forget_history()
        self.cloud.bc.limits.reset()

    def snapshot(self) -> dict[str, Any]:
        """Every counter as plain data."""

        def counters(c: Any) -> dict[str, Any]:
            return {
                "http": {f"{m} {k}": n for (m, k), n in c.http.items()},
                "items": {f"{m} {k}": n for (m, k), n in c.items.items()},
                "statuses": dict(c.statuses),
                "http_total": c.http_total,
                "items_total": c.items_total,
            }

        cloud = self.cloud
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with self._lock:
            refusals = dict(self.refusals)
        return {
            "entra": counters(cloud.entra.counters),
            "bc": counters(cloud.bc.counters),
            "graph": counters(cloud.graph.counters),
            "mailboxes": {upn: counters(c) for upn, c in cloud.graph.mailbox_counters.items()},
            "refusals": refusals,
            "bc_peak_active": max(cloud.bc.limits.peak_active.values(), default=0),
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "pid": os.getpid(),
        }

    def stop(self) -> None:
        self.cloud.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


def _exit_with_parent(parent: int) -> None:
    """End the sandbox process when the benchmark's process is gone (killed without cleaning up)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


class _Manager(BaseManager):
    pass


_Manager.register("SandboxHost", SandboxHost)


class Sandbox:
    """The child process and the host proxy; `stop()` ends both (also as a context manager)."""

    def __init__(self) -> None:
        self._manager = _Manager(ctx=get_context("spawn"))
        self.host: Any = None

    def start(self) -> Sandbox:
        self._manager.start()
        self.host = self._manager.SandboxHost()  # type: ignore[attr-defined]
        return self

    def stop(self) -> None:
        if self.host is not None:
            # The child may already be gone; shutting the manager down still ends it.
            with contextlib.suppress(Exception):
                self.host.stop()
            self.host = None
        self._manager.shutdown()
        deadline = time.monotonic() + 10
        while self._manager._process.is_alive() and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.05)

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
