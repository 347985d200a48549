"""A test's view of the simulated world: the sandbox cloud, Table Storage on Azurite, and the app's
services configured against them exactly as the function app would be (settings from the
environment). Helpers read what a user would look at: the contacts in BC and in the Outlook folder.
"""

from __future__ import annotations

from typing import Any

from sandbox.cloud import Cloud
from shared.config import Config
from shared.mapping import BC_ID_PROPERTY_ID
from shared.model import WRITE_ACTIONS, RunReport, UserSettings
from shared.services import Services
from shared.sync import run_user


class World:
    def __init__(self, cloud: Cloud, env: dict[str, str]):
        self.cloud = cloud
        self.env = env
        self.config = Config.from_env(env)
        self.services = Services.from_config(self.config)
        self.services.backoff_base = 0.01
        self.services.store.ensure_tables()
        self.company = cloud.company_id
        cloud.bc.add_country("NO")
        self._mailboxes: set[str] = set()

    # Setup ---------------------------------------------------------------------------------
    def user(self, upn: str = "alice@contoso.example", **settings: Any) -> UserSettings:
        if upn.lower() not in self._mailboxes:
            self.cloud.graph.add_mailbox(upn)
            self._mailboxes.add(upn.lower())
        s = UserSettings.from_json({"user": upn, **settings})
        return self.services.store.put_settings(s)

    def colleague(self, upn: str, admin: bool = False) -> str:
        """A colleague who can sign in (a mailbox and an Entra user with the same object id); returns
        the throwaway password. Call before `user(upn)`, which then uses this mailbox."""
        _, password = self.cloud.add_person(upn, admin=admin)
        self._mailboxes.add(upn.lower())
        return password

    def person(self, name: str, email: str | None = None, **fields: Any) -> dict[str, Any]:
        if email is None:
            email = name.lower().replace(" ", ".") + "@example.com"
        return self.cloud.bc.seed_contact(
            self.company, type="Person", displayName=name, email=email, **fields
        )

    def second_company(self, ned_title: str = "Clerk") -> str:
        """Fabrikam ("Fabrikam, Inc."; Fay the CEO and Ned with `ned_title`) beside the world's CRONUS
        (Ola in Oslo, Berit in Bergen): the two companies of the `companies` tests. Returns Fabrikam's id."""
        bc = self.cloud.bc
        fabrikam = bc.add_company("Fabrikam", display_name="Fabrikam, Inc.")
        bc.add_country("NO", company_id=fabrikam)
        self.person("Ola Oslo", "ola@cronus.example", city="Oslo")
        self.person("Berit Bergen", "berit@cronus.example", city="Bergen")
        for name, email, title in (
            ("Fay Fabrikam", "fay@fabrikam.example", "CEO"),
            ("Ned Nobody", "ned@fabrikam.example", ned_title),
        ):
            bc.seed_contact(fabrikam, type="Person", displayName=name, email=email, jobTitle=title)
        return fabrikam

    # Running --------------------------------------------------------------------------------
    def sync(
        self, user: str | UserSettings = "alice@contoso.example", mode: str = "incremental", **kw: Any
    ) -> RunReport:
        settings = user if isinstance(user, UserSettings) else self.services.store.get_settings(user.lower())
        return run_user(self.services, settings, mode, **kw)

    # Looking ---------------------------------------------------------------------------------
    def folder_id(self, user: str = "alice@contoso.example") -> str | None:
        return self.services.store.get_state(user.lower()).folder_id

    def outlook(self, user: str = "alice@contoso.example") -> list[dict[str, Any]]:
        fid = self.folder_id(user)
        return self.cloud.graph.folder_contacts(user, fid) if fid else []

    def outlook_by_email(self, user: str = "alice@contoso.example") -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for c in self.outlook(user):
            email = (c.get("emailAddresses") or [{}])[0].get("address", "").strip().lower()
            assert email not in out, f"duplicate Outlook contact for {email}"
            out[email] = c
        return out

    def bc_contacts(self) -> list[dict[str, Any]]:
        return self.cloud.bc.contacts(self.company)

    def bc_by_email(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for c in self.bc_contacts():
            out.setdefault((c.get("email") or "").lower(), []).append(c)
        return out


def tag(contact: dict[str, Any]) -> str | None:
    for p in contact.get("singleValueExtendedProperties") or []:
        if p["id"].lower() == BC_ID_PROPERTY_ID.lower():
            return p["value"]
    return None


def writes(report: RunReport) -> int:
    return sum(report.counts[k] for k in WRITE_ACTIONS)
