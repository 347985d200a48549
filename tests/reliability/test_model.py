"""BEHAVIOUR §4.5 as a stateful property test: random edits on both sides, random faults and crashes,
interleaved with incremental and full runs, against the simulated cloud.

The expectation is derived from Business Central itself (it is the source of truth), so the model
only remembers what BC cannot say: which contacts the test deleted, which Outlook contacts the user
made or edited, and what each run reported. After every run the invariants that must hold even under
faults are checked (nothing deleted in BC, no duplicate email in BC, no user contact lost without a
report item, the lease released, the user's own contacts in the default Contacts folder never deleted
and never changed unless the sync adopted them); after every run without injected faults that succeeds,
the full set (see `check_converged`). The settings change too: the folder renamed, switched to the
default Contacts folder (`folderName: null`) and back, the category renamed or turned off (issue 12).

Profiles: fast by default (CI); `RELIABILITY_LONG=1` runs thousands of steps.
"""

from __future__ import annotations

import itertools
import os
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from shared.filters import parse_filter
from shared.mapping import (
    bc_is_eligible,
    bc_view,
    normalize_email,
    outlook_email,
    outlook_is_eligible,
    outlook_view,
)
from shared.model import UserSettings
from shared.sync import RunInterrupted, run_user, settings_hash
from tests.reliability.conftest import WireTap, batch_envelope, long_profile
from tests.world import World, tag, writes

NAMES = ["Ada Lovelace", "Grace Hopper", "Nils Nilsen", "Åse Øvrebø", "Zoë O'Brien", "Li"]
TITLES = ["Buyer", "CEO", "Head of Sales", ""]
CITIES = ["Oslo", "Bergen", "Tromsø", ""]
FILTERS: list[dict[str, str]] = [
    {},
    {"city": "Oslo|Bergen"},
    {"city": "<>Oslo"},
    {"city": "@b*"},
    {"displayName": "<>Z*"},
]
FOLDERS = ["Business Central", "BC Contacts", "Kunder 'BC' & co"]
CATEGORIES: list[str | None] = ["Business Central", "Kunder", None]
CHECKPOINTS = ["after_bc_batch", "after_graph_batch", "before_links", "batch_done", "before_watermark"]
FAULTS = [
    "throttle",
    "503",
    "504",
    "reset",
    "html",
    "drop_after_apply",
    "html_after_apply",
    "crash",
    "interrupt_resume",
]


@dataclass
class Ctx:
    """What lives for the whole machine run: one cloud, one set of tables, the counts for the report."""

    world: World
    taps: dict[str, WireTap]
    sleeps: list[float] = field(default_factory=list)
    examples: int = 0
    steps: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    converged_checks: int = 0


@dataclass
class UserContact:
    """An Outlook contact the user made: when (in runs) it last changed, and whether it is gone."""

    changed_at: int
    deleted: bool = False


class SyncMachine(RuleBasedStateMachine):
    ctx: ClassVar[Ctx]

    def __init__(self) -> None:
        super().__init__()
        c = self.ctx
        c.examples += 1
        self.cloud = c.world.cloud
        self.services = c.world.services
        self.store = self.services.store
        self.user = f"m{c.examples}-{uuid.uuid4().hex[:6]}@contoso.example"
        self.cloud.graph.add_mailbox(self.user)
        self.company = self.cloud.bc.add_company(f"Model {c.examples}")
        self.settings = self.store.put_settings(UserSettings(user=self.user, company_id=self.company))
        self.serial = itertools.count()
        self.known_bc: set[str] = set()
        self.deleted_bc: set[str] = set()
        self.user_made: dict[str, UserContact] = {}
        self.dirty: set[str] = set()  # Outlook ids the user edited since the last reconcile
        self.first_seen: dict[str, int] = {}  # Outlook id → run count when first seen in the folder
        self.reasons: dict[str, int] = {}  # Outlook id → latest run that skipped/failed it with a reason
        self.mentioned: set[str] = set()  # Outlook ids named by any report item
        self.settings_changed_at = 0
        self.last_scope = settings_hash(self.settings, self.company)
        self.runs = 0
        self.outside: dict[str, str] = {}  # the user's own contacts in the default folder: id → changeKey
        self.adopted: set[str] = set()  # those of them the sync has tagged at some point (adopted)

    # Helpers -------------------------------------------------------------------------------
    def _email(self) -> str:
        return f"p{next(self.serial)}.{uuid.uuid4().hex[:4]}@example.com"

    def _folder_id(self) -> str | None:
        fid = self.store.get_state(self.user).folder_id
        if fid and fid == self.cloud.graph.default_folder_id(self.user):
            return fid  # folderName null: the default Contacts folder (it cannot be deleted)
        if fid and any(f["id"] == fid for f in self.cloud.graph.folders(self.user)):
            return fid
        return None

    def _mailbox(self) -> list[dict[str, Any]]:
        """Every contact of the default Contacts folder and the folders under it (not Deleted Items)."""
        graph = self.cloud.graph
        out = list(graph.folder_contacts(self.user, None))
        for f in graph.folders(self.user):
            out += graph.folder_contacts(self.user, f["id"])
        return out

    def _folder(self) -> list[dict[str, Any]]:
        fid = self._folder_id()
        return self.cloud.graph.folder_contacts(self.user, fid) if fid else []

    def _bc(self) -> list[dict[str, Any]]:
        return self.cloud.bc.contacts(self.company)

    def _save_settings(self, **changes: Any) -> None:
        data = {**self.settings.to_json(), **changes}
        self.settings = self.store.put_settings(UserSettings.from_json(data))

    def _pick(self, items: list[Any], index: int) -> Any:
        return items[index % len(items)]

    # Business Central ------------------------------------------------------------------------
    @rule(
        kind=st.sampled_from(["person", "person", "person", "company", "blocked", "no_email", "two_emails"]),
        name=st.sampled_from(NAMES),
        city=st.sampled_from(CITIES),
        title=st.sampled_from(TITLES),
    )
    def bc_create(self, kind: str, name: str, city: str, title: str) -> None:
        fields: dict[str, Any] = {"displayName": name, "email": self._email(), "city": city}
        if kind != "company":
            fields.update(type="Person", jobTitle=title)
        if kind == "blocked":
            fields["privacyBlocked"] = True
        if kind == "no_email":
            fields["email"] = ""
        if kind == "two_emails":
            fields["email"] = f"{self._email()};{self._email()}"
        contact = self.cloud.bc.seed_contact(self.company, **fields)
        self.known_bc.add(contact["id"])
        self.ctx.ops[f"bc create ({kind})"] += 1

    @rule(
        index=st.integers(0, 10**6),
        change=st.sampled_from(
            [
                "title",
                "name",
                "city",
                "to_company",
                "to_person",
                "block",
                "unblock",
                "blank_email",
                "new_email",
            ]
        ),
        name=st.sampled_from(NAMES),
        city=st.sampled_from(CITIES),
        title=st.sampled_from(TITLES),
    )
    def bc_edit(self, index: int, change: str, name: str, city: str, title: str) -> None:
        alive = sorted(self.known_bc - self.deleted_bc)
        if not alive:
            return
        cid = self._pick(alive, index)
        fields = {
            "title": {"jobTitle": title},
            "name": {"displayName": name},
            "city": {"city": city},
            "to_company": {"type": "Company"},
            "to_person": {"type": "Person"},
            "block": {"privacyBlocked": True},
            "unblock": {"privacyBlocked": False},
            "blank_email": {"email": ""},
            "new_email": {"email": self._email()},
        }[change]
        self.cloud.bc.edit_contact(self.company, cid, **fields)
        self.ctx.ops[f"bc edit ({change})"] += 1

    @rule(index=st.integers(0, 10**6))
    def bc_delete(self, index: int) -> None:
        alive = sorted(self.known_bc - self.deleted_bc)
        if not alive:
            return
        cid = self._pick(alive, index)
        self.cloud.bc.delete_contact(self.company, cid)
        self.deleted_bc.add(cid)
        self.ctx.ops["bc delete"] += 1

    # Outlook (the user, in the sync folder) ------------------------------------------------
    @rule(
        kind=st.sampled_from(["fresh", "fresh", "bc_email", "twin", "no_email", "no_name", "bad_phone"]),
        name=st.sampled_from(NAMES),
        index=st.integers(0, 10**6),
        shout=st.booleans(),
    )
    def outlook_create(self, kind: str, name: str, index: int, shout: bool) -> None:
        fid = self._folder_id()
        if fid is None:
            return
        email = self._email()
        if kind == "bc_email":
            emails = [c["email"] for c in self._bc() if c["email"]]
            email = self._pick(emails, index) if emails else email
        elif kind == "twin":
            emails = [outlook_email(c) for c in self._folder() if outlook_email(c)]
            email = self._pick(emails, index) if emails else email
        if shout:  # the same address as typed differently: matching is trimmed and case-insensitive
            email = f" {email.upper()} "
        body: dict[str, Any] = {"displayName": name, "emailAddresses": [{"address": email}]}
        if kind == "no_email":
            body.pop("emailAddresses")
        if kind == "no_name":
            body.pop("displayName")
        if kind == "bad_phone":
            body["businessPhones"] = ["call me maybe"]
        created = self.cloud.graph.user_create_contact(self.user, fid, body)
        self.user_made[created["id"]] = UserContact(changed_at=self.runs)
        self.ctx.ops[f"outlook create ({kind})"] += 1

    @rule(
        index=st.integers(0, 10**6),
        change=st.sampled_from(["title", "name", "city", "mobile", "email"]),
        name=st.sampled_from(NAMES),
        city=st.sampled_from(CITIES),
        title=st.sampled_from(TITLES),
    )
    def outlook_edit(self, index: int, change: str, name: str, city: str, title: str) -> None:
        folder = sorted(self._folder(), key=lambda c: c["id"])
        if not folder:
            return
        contact = self._pick(folder, index)
        changes = {
            "title": {"jobTitle": title or None},
            "name": {"displayName": name},
            "city": {"businessAddress": {**(contact.get("businessAddress") or {}), "city": city or None}},
            "mobile": {"mobilePhone": f"+47 4{next(self.serial):07d}"},
            "email": {"emailAddresses": [{"address": self._email()}]},
        }[change]
        edited = self.cloud.graph.user_update_contact(self.user, self._folder_id(), contact["id"], **changes)
        if contact["id"] in self.outside:  # the user may change their own contact, of course
            self.outside[contact["id"]] = edited["changeKey"]
        self.dirty.add(contact["id"])
        if contact["id"] in self.user_made:
            self.user_made[contact["id"]].changed_at = self.runs
        self.ctx.ops[f"outlook edit ({change})"] += 1

    @rule(index=st.integers(0, 10**6))
    def outlook_delete(self, index: int) -> None:
        folder = sorted(self._folder(), key=lambda c: c["id"])
        if not folder:
            return
        contact = self._pick(folder, index)
        self.cloud.graph.user_delete_contact(self.user, self._folder_id(), contact["id"])
        self.outside.pop(contact["id"], None)
        if contact["id"] in self.user_made:
            self.user_made[contact["id"]].deleted = True
        self.ctx.ops["outlook delete"] += 1

    @rule()
    def outlook_delete_folder(self) -> None:
        fid = self._folder_id()
        if fid is None or fid == self.cloud.graph.default_folder_id(self.user):
            return  # the default Contacts folder cannot be deleted
        for c in self.cloud.graph.folder_contacts(self.user, fid):
            if c["id"] in self.user_made:
                self.user_made[c["id"]].deleted = True
        self.cloud.graph.user_delete_folder(self.user, fid)
        self.ctx.ops["outlook delete the sync folder"] += 1

    @rule(index=st.integers(0, 10**6))
    def outlook_create_outside(self, index: int) -> None:
        """A contact in the default Contacts folder, even with a synced email: never touched."""
        emails = [c["email"] for c in self._bc() if c["email"]] or [self._email()]
        created = self.cloud.graph.user_create_contact(
            self.user,
            None,
            {"displayName": "Private", "emailAddresses": [{"address": self._pick(emails, index)}]},
        )
        self.outside[created["id"]] = created["changeKey"]
        self.ctx.ops["outlook create outside the sync folder"] += 1

    # Settings ----------------------------------------------------------------------------------
    @rule(flt=st.sampled_from(FILTERS))
    def change_filter(self, flt: dict[str, str]) -> None:
        self._save_settings(filter=flt)
        self.ctx.ops["settings: filter change"] += 1

    @rule(name=st.sampled_from(FOLDERS))
    def rename_folder(self, name: str) -> None:
        self._save_settings(folderName=name)
        self.ctx.ops["settings: folder rename"] += 1

    @rule()
    def use_default_folder(self) -> None:
        """folderName null: the synced contacts move to the default Contacts folder (BEHAVIOUR §4.8);
        `rename_folder` moves them back into a subfolder."""
        self._save_settings(folderName=None)
        self.ctx.ops["settings: default Contacts folder"] += 1

    @rule(category=st.sampled_from(CATEGORIES))
    def change_category(self, category: str | None) -> None:
        self._save_settings(category=category)
        self.ctx.ops[f"settings: category {category or 'off'}"] += 1

    @rule(flag=st.sampled_from(["pullEditsFromOutlook", "removeFromOutlook", "pullNewFromOutlook"]))
    def toggle(self, flag: str) -> None:
        self._save_settings(**{flag: not self.settings.to_json()[flag]})
        self.ctx.ops[f"settings: toggle {flag}"] += 1

    # Runs --------------------------------------------------------------------------------------
    def _run(self, mode: str, checkpoint: Any = None, resume: Any = None) -> Any:
        kw: dict[str, Any] = {}
        if checkpoint is not None:
            kw["checkpoint"] = checkpoint
        report = run_user(self.services, self.settings, mode, resume=resume, **kw)
        if report.status == "safetyStop":
            m = re.search(r"remove (\d+) of (\d+)", report.message or "")
            assert m and int(m[1]) > 10 and int(m[1]) * 2 > int(m[2]), report.message
            self.ctx.ops["mass-deletion guard stopped a run (then forced)"] += 1
            report = run_user(self.services, self.settings, mode, force=True, resume=None, **kw)
        scope = settings_hash(self.settings, self.company)
        if scope != self.last_scope:  # this run reconciled everything under new settings
            self.settings_changed_at, self.last_scope = self.runs, scope
        self.runs += 1
        self.ctx.statuses[report.status] += 1
        for item in report.items:
            if item.outlookId:
                self.mentioned.add(item.outlookId)
                if item.action in ("skipped", "failed") and item.reason:
                    self.reasons[item.outlookId] = self.runs
        for c in self._folder():
            self.first_seen.setdefault(c["id"], self.runs)
        self.check_always()
        return report

    @rule(mode=st.sampled_from(["incremental", "incremental", "full"]))
    def run(self, mode: str) -> None:
        report = self._run(mode)
        assert report.status == "succeeded", (report.status, report.message, _failures(report))
        if report.mode == "full" or self.settings.pull_edits_from_outlook:
            self.dirty.clear()
        self.check_converged()
        again = self._run("incremental")
        assert again.status == "succeeded" and writes(again) == 0, (
            again.message,
            again.counts,
            _items(again),
        )
        self.ctx.converged_checks += 1
        self.ctx.ops[f"fault-free {mode} run"] += 1

    @rule()
    def run_incremental(self) -> None:
        """Runs are the point: two extra rules make them as frequent as edits."""
        self.run("incremental")

    @rule()
    def run_full(self) -> None:
        self.run("full")

    @rule(
        mode=st.sampled_from(["incremental", "full"]),
        fault=st.sampled_from(FAULTS),
        service=st.sampled_from(["bc", "graph"]),
        count=st.integers(1, 4),
        where=st.sampled_from(CHECKPOINTS),
        in_batch=st.sampled_from([None, True, False]),
        retry_after=st.sampled_from([None, 0.01, 2.0]),
    )
    def faulty_run(
        self,
        mode: str,
        fault: str,
        service: str,
        count: int,
        where: str,
        in_batch: bool | None,
        retry_after: float | None,
    ) -> None:
        svc = self.cloud.bc if service == "bc" else self.cloud.graph
        tap = self.ctx.taps[service]
        checkpoint = None
        self._pending_work()  # so the fault meets writes on both sides, not an idle run
        label = {
            "503": f"{service} 503 (1-4 in a row)",
            "504": f"{service} 504 (1-4 in a row)",
            "reset": f"{service} connection reset, request not applied (1-4)",
            "html": f"{service} HTML error page instead of JSON (1-4)",
        }.get(fault, f"{service} {fault}")
        match = {} if in_batch is None else {"in_batch": in_batch}
        if fault == "throttle":
            svc.faults.throttle(
                count=count, retry_after=retry_after if retry_after is not None else 0.01, **match
            )
            label = f"{service} 429 storm (1-4 in a row) with Retry-After"
        elif fault in ("503", "504"):
            svc.faults.error(int(fault), count=count, retry_after=retry_after, **match)
        elif fault == "reset":
            svc.faults.reset(count=count, **match)
        elif fault == "html":
            svc.faults.html(count=count, **match)
        elif fault == "drop_after_apply":
            tap.drop_after_apply(batch_envelope, count=1)
            label = f"{service} $batch applied, connection reset before the answer"
        elif fault == "html_after_apply":
            tap.html_after_apply(batch_envelope, count=1)
            label = f"{service} $batch applied, 502 HTML page instead of the answer"
        elif fault in ("crash", "interrupt_resume"):
            seen = Counter()

            nth = 1 if where == "before_watermark" else 1 + count % 2  # once per run; batches repeat

            def checkpoint(name: str, _where=where if fault == "crash" else "batch_done", _n=nth) -> None:
                seen[name] += 1
                if name == _where and seen[name] == _n:
                    if fault == "crash":
                        raise RuntimeError(f"simulated crash at {name} #{_n}")
                    raise RunInterrupted()

            label = (
                f"crash at {where}" if fault == "crash" else "interrupted at a batch boundary, then resumed"
            )
        before = len(self.ctx.sleeps)
        fired_before = svc.faults.fired.get("429", 0)
        try:
            report = self._run(mode, checkpoint=checkpoint)
            if fault == "interrupt_resume" and report.status == "interrupted":
                report = self._run(mode, resume=report)
        finally:
            fired_429 = svc.faults.fired.get("429", 0) - fired_before
            for s in (self.cloud.bc, self.cloud.graph):
                s.faults.clear()
            for t in self.ctx.taps.values():
                t.clear()
        if fault == "throttle" and retry_after == 2.0 and fired_429 and report.status == "succeeded":
            assert max(self.ctx.sleeps[before:], default=0) >= 2.0, "Retry-After was not honoured"
        if checkpoint is not None and report.status not in ("failed", "interrupted") and fault == "crash":
            label += " (point not reached: the run completed)"
        self.ctx.faults[label] += 1

    def _pending_work(self) -> None:
        """One new BC person every filter of FILTERS keeps, and one new contact in the folder."""
        person = self.cloud.bc.seed_contact(
            self.company, type="Person", displayName="Fay Fault", email=self._email(), city="Bergen"
        )
        self.known_bc.add(person["id"])
        fid = self._folder_id()
        if fid is not None:
            body = {"displayName": "Olav Outlook", "emailAddresses": [{"address": self._email()}]}
            created = self.cloud.graph.user_create_contact(self.user, fid, body)
            self.user_made[created["id"]] = UserContact(changed_at=self.runs)

    # Invariants --------------------------------------------------------------------------------
    @invariant()
    def count_step(self) -> None:
        self.ctx.steps += 1

    def check_always(self) -> None:
        """What must hold after any run, faults or not."""
        bc = self._bc()
        present = {c["id"] for c in bc}
        lost = (self.known_bc - self.deleted_bc) - present
        assert not lost, f"BC contacts disappeared: {lost}"
        self.known_bc |= present  # contacts the sync created in BC are protected from now on too
        emails = Counter(normalize_email(c["email"]) for c in bc if c["email"])
        assert all(n == 1 for n in emails.values()), f"duplicate emails in BC: {emails.most_common(3)}"
        mailbox = self._mailbox()
        folder_ids = {c["id"] for c in mailbox}  # a move leaves the user's own contacts where they are
        for oid, made in self.user_made.items():
            if not made.deleted and oid not in folder_ids:
                assert oid in self.mentioned, (
                    f"a user's Outlook contact vanished without a report item: {oid}"
                )
                made.deleted = True
        assert self.store.current_lease(self.user) is None, "the run left its lease behind"
        outside = {
            c["id"]: c for c in self.cloud.graph.folder_contacts(self.user, None) if c["id"] in self.outside
        }
        assert set(outside) == set(self.outside), "the sync deleted a contact of the user's own"
        self.adopted |= {oid for oid, c in outside.items() if tag(c)}
        touched = {oid for oid, c in outside.items() if c["changeKey"] != self.outside[oid]}
        assert touched <= self.adopted, "the sync changed a contact of the user's own it never adopted"
        for oid in touched:
            self.outside[oid] = outside[oid]["changeKey"]

    def check_converged(self) -> None:
        """After a run without injected faults that succeeded: BEHAVIOUR §4.5 in full."""
        state = self.store.get_state(self.user)
        folders = self.cloud.graph.folders(self.user)
        in_default = self.settings.folder_name is None
        if in_default:
            # Unknown (None) only while the default folder was empty, with no subfolder to tell its id.
            assert state.folder_id in (None, self.cloud.graph.default_folder_id(self.user))
        else:
            wanted = str(self.settings.folder_name).lower()
            named = [f for f in folders if f["displayName"].lower() == wanted]
            assert [f["id"] for f in named] == [state.folder_id], (self.settings.folder_name, folders)
        folder = self.cloud.graph.folder_contacts(self.user, None if in_default else state.folder_id)
        elsewhere = [tag(c) for c in self._mailbox() if tag(c) and c["id"] not in {o["id"] for o in folder}]
        assert not elsewhere, (
            f"synced contacts left behind in another folder (a move not finished): {elsewhere}"
        )
        flt = parse_filter(self.settings.filter)
        bc = {c["id"]: c for c in self._bc()}
        eligible = {cid for cid, c in bc.items() if bc_is_eligible(c) is None and flt.matches(c)}

        by_tag: dict[str, list[dict[str, Any]]] = {}
        untagged = []
        for c in folder:
            t = tag(c)
            if t:
                by_tag.setdefault(t, []).append(c)
            else:
                untagged.append(c)
        dupes = {t: [c["id"] for c in cs] for t, cs in by_tag.items() if len(cs) > 1}
        assert not dupes, f"one BC contact twice in Outlook: {dupes}"
        tags = set(by_tag)
        assert eligible <= tags, f"eligible BC contacts missing in Outlook: {eligible - tags}"
        extra = tags - eligible
        if self.settings.remove_from_outlook:
            assert not extra, (
                f"Outlook holds contacts BC no longer syncs: {[_brief(bc.get(t)) for t in extra]}"
            )
        links = self.store.get_links(self.user)
        for cid in eligible:
            [o] = by_tag[cid]
            assert cid in links and links[cid].outlook_id == o["id"], (
                f"link of {cid} does not point at its contact"
            )
            if o["id"] not in self.dirty:
                assert outlook_view(o) == bc_view(bc[cid]), (cid, outlook_view(o), bc_view(bc[cid]))
            ours = {c.casefold() for c in o.get("categories") or []} & {c.casefold() for c in CATEGORIES if c}
            wanted = {self.settings.category.casefold()} if self.settings.category else set()
            assert ours == wanted, (cid, o.get("categories"), self.settings.category)
        tagged_emails = Counter(
            normalize_email(outlook_email(cs[0]))
            for t, cs in by_tag.items()
            if t in eligible and outlook_email(cs[0])
        )  # leftovers kept by removeFromOutlook off are the user's now, not synced contacts
        assert all(n == 1 for n in tagged_emails.values()), (
            f"two synced contacts share an email: {tagged_emails}"
        )

        bc_emails = {normalize_email(c["email"]) for c in bc.values() if c["email"]}
        synced_at = {normalize_email(outlook_email(by_tag[t][0])): by_tag[t][0]["id"] for t in eligible}
        for c in untagged:
            made = self.user_made.get(c["id"])
            if c["id"] in self.outside:
                continue  # the user's own contact in the default folder (released, or never synced)
            assert made is not None, f"an untagged contact the user did not make: {c['id']}"
            if outlook_is_eligible(c) is not None:
                continue
            if in_default:
                continue  # the default folder: private (the model never gives a contact the sync's category)
            email = normalize_email(outlook_email(c))
            since = max(made.changed_at, self.settings_changed_at)
            assert email in bc_emails or self.reasons.get(c["id"], -1) > since, (
                f"a new Outlook contact neither reached BC nor was reported: {outlook_view(c)}"
            )
            twin = synced_at.get(email)
            if twin is not None and twin not in self.user_made:
                assert self.first_seen[twin] <= made.changed_at, (
                    f"the sync created {twin} in Outlook while the user's own contact {c['id']} "
                    f"with the same email {email} was already in the folder"
                )


def _failures(report: Any) -> list[str]:
    return [f"{i.action}: {i.reason}" for i in report.items if i.action == "failed"][:5]


def _items(report: Any) -> list[str]:
    return [f"{i.action} {i.email}: {i.reason}" for i in report.items if i.action not in ("skipped",)][:8]


def _brief(c: dict[str, Any] | None) -> Any:
    if c is None:
        return "deleted"
    return {k: c.get(k) for k in ("type", "displayName", "email", "city", "privacyBlocked")}


def test_sync_converges_under_random_edits_and_faults(cloud, env, taps, recorder):
    world = World(cloud, env)
    ctx = Ctx(world=world, taps=taps)
    world.services.sleep = ctx.sleeps.append  # record waits instead of sleeping them
    # With waits recorded, not slept, thousands of runs would exhaust BC's real-time budget of 6,000
    # requests per 5 minutes and then retry instantly until they give up. BC throttling is exercised
    # here by the injected 429s (and in tests/test_http.py), so the model lifts that one limit.
    cloud.bc.limits.rate_limit = 10**9
    SyncMachine.ctx = ctx
    long = long_profile()
    profile = settings(
        max_examples=int(os.environ.get("RELIABILITY_EXAMPLES") or (250 if long else 10)),
        stateful_step_count=50 if long else 25,
        deadline=None,
        derandomize=not long,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    started = time.monotonic()
    outcome = "fail"
    with recorder.case(
        "stateful model", "convergence after random edits, settings changes and faults"
    ) as rec:
        try:
            run_state_machine_as_test(SyncMachine, settings=profile)
            outcome = "pass"
        finally:
            rec.add(ctx.steps)
            rec.detail.update(
                examples=ctx.examples,
                steps=ctx.steps,
                convergedChecks=ctx.converged_checks,
                statuses=dict(ctx.statuses),
                minutes=round((time.monotonic() - started) / 60, 2),
            )
            for area, counts in (
                ("fault (stateful model)", ctx.faults),
                ("operation (stateful model)", ctx.ops),
            ):
                for label, n in sorted(counts.items()):
                    recorder.write({"area": area, "case": label, "cases": n, "result": outcome})
    assert ctx.converged_checks > 0


@pytest.fixture(autouse=True)
def _no_machine_leak():
    yield
    SyncMachine.ctx = None  # type: ignore[assignment]
