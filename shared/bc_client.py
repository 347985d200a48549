"""Business Central API v2.0: companies and contacts.

BC has no delta or webhooks for contacts, so changes are read with
`$filter=lastModifiedDateTime gt …` and deletions by listing ids (`$select=id`); pages are
server-driven (`@odata.nextLink`, `Prefer: odata.maxpagesize`, never `$top/$skip`), and writes go
through OData JSON `$batch` (≤ 100 operations) with `If-Match` on every PATCH/DELETE, as the API
requires (learn.microsoft.com: dynamics_contact_update, use-odata-batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from shared.http import BatchItem, HttpClient, ItemResult

BATCH_MAX = 100
PAGE_SIZE = 20000  # the documented maximum page size for BC online
CONTACT_FIELDS = (
    "id",
    "number",
    "type",
    "displayName",
    "jobTitle",
    "companyNumber",
    "companyName",
    "addressLine1",
    "addressLine2",
    "city",
    "state",
    "country",
    "postalCode",
    "phoneNumber",
    "mobilePhoneNumber",
    "email",
    "website",
    "searchName",
    "privacyBlocked",
    "lastModifiedDateTime",
)


def odata_string(value: str) -> str:
    """An OData string literal: quotes doubled, so user data can never end the literal early."""
    return "'" + value.replace("'", "''") + "'"


@dataclass
class BcWrite:
    """One contact write for `BcClient.write`: create (no id), update (id + etag) or delete."""

    method: str  # POST | PATCH | DELETE
    body: dict[str, Any] | None = None
    contact_id: str | None = None
    etag: str | None = None


class BcClient:
    def __init__(self, http: HttpClient, base_url: str, tenant: str, environment: str):
        self.http = http
        self.root = f"{base_url}/{quote(tenant, safe='')}/{quote(environment, safe='')}/api/v2.0"

    def _contacts_path(self, company_id: str) -> str:
        return f"companies({company_id})/contacts"

    def _get_all(self, url: str, params: dict[str, str] | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        headers = {"Prefer": f"odata.maxpagesize={PAGE_SIZE}"}
        next_url: str | None = url
        while next_url:
            resp = self.http.request("GET", next_url, params=params, headers=headers)
            out.extend(resp.body.get("value", []))
            next_url = resp.body.get("@odata.nextLink")
            params = None  # the nextLink carries the query
        return out

    def companies(self) -> list[dict[str, Any]]:
        return self._get_all(f"{self.root}/companies", None)

    def company(self, company_id: str) -> dict[str, Any]:
        return self.http.request("GET", f"{self.root}/companies({company_id})").body

    def list_contacts(
        self,
        company_id: str,
        *,
        modified_after: str | None = None,
        select: tuple[str, ...] = CONTACT_FIELDS,
    ) -> list[dict[str, Any]]:
        params = {"$select": ",".join(select)}
        if modified_after:
            params["$filter"] = f"lastModifiedDateTime gt {modified_after}"
        return self._get_all(f"{self.root}/{self._contacts_path(company_id)}", params)

    def get_contacts(self, company_id: str, ids: list[str]) -> list[dict[str, Any]]:
        """Full records for the given ids (OR-ed id filters, a few dozen per request)."""
        out: list[dict[str, Any]] = []
        for start in range(0, len(ids), 40):
            chunk = ids[start : start + 40]
            flt = " or ".join(f"id eq {cid}" for cid in chunk)
            out.extend(
                self._get_all(
                    f"{self.root}/{self._contacts_path(company_id)}",
                    {"$filter": flt, "$select": ",".join(CONTACT_FIELDS)},
                )
            )
        return out

    def write(self, company_id: str, writes: list[BcWrite]) -> list[ItemResult]:
        """Apply creates/updates/deletes through `$batch`; one result per write, in order."""
        items = []
        for w in writes:
            url = self._contacts_path(company_id)
            headers: dict[str, str] = {}
            if w.method != "POST":
                url += f"({w.contact_id})"
                headers["If-Match"] = w.etag or "*"
            items.append(BatchItem(w.method, url, w.body, headers))
        return self.http.batch(f"{self.root}/$batch", items, BATCH_MAX)
