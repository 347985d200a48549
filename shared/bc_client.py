"""Business Central API v2.0: companies and contacts.

BC has no delta or webhooks for contacts, so changes are read with
`$filter=lastModifiedDateTime gt …` and deletions by listing ids (`$select=id`); pages are
server-driven (`@odata.nextLink`, `Prefer: odata.maxpagesize`, never `$top/$skip`), and writes go
through OData JSON `$batch` (≤ 100 operations) with `If-Match` on every PATCH/DELETE, as the API
requires (learn.microsoft.com: dynamics_contact_update, use-odata-batch).
"""

from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from shared.http_client import BatchItem, HttpClient, ItemResult, image_body

BATCH_MAX = 100
# The picture's metadata with each contact: whether it has one, without reading any bytes.
PICTURE_EXPAND = "picture"
# What the sync keeps of it. The rest (its id, etag and two media links, about half of the page's
# bytes) is dropped as each page arrives: at 20,000 contacts it would hold ~20 MB for the whole run.
PICTURE_METADATA = ("contentType", "width", "height")
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


# Fields every BC version's contacts page has; the rest are read and written only when `$metadata`
# lists them (older versions lack e.g. jobTitle, and naming a missing property is a 400 that fails
# the whole read).
REQUIRED_FIELDS = ("id", "type", "displayName", "email", "lastModifiedDateTime")
METADATA_TTL = 3600.0  # seconds; a BC update that adds fields is picked up within the hour
_EDM = "{http://docs.oasis-open.org/odata/ns/edm}"


class SchemaError(ValueError):
    """BC's `$metadata` lacks what the sync cannot work without; the message names it."""


@dataclass(frozen=True)
class BcSchema:
    """The contact properties this tenant's BC version has, from its `$metadata`."""

    contact_properties: frozenset[str]

    @property
    def contact_fields(self) -> tuple[str, ...]:
        """The fields the sync reads (CONTACT_FIELDS in order), as far as this version has them."""
        return tuple(f for f in CONTACT_FIELDS if f in self.contact_properties)

    @property
    def missing(self) -> tuple[str, ...]:
        """The sync's fields this version lacks."""
        return tuple(f for f in CONTACT_FIELDS if f not in self.contact_properties)


def parse_metadata(xml: str) -> BcSchema:
    """The contact entity's properties from an OData v4 CSDL document (EDMX XML)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise SchemaError(f"Business Central's $metadata is not valid XML ({exc})") from None
    for entity in root.iter(f"{_EDM}EntityType"):
        if entity.get("Name") == "contact":
            names = frozenset(p.get("Name", "") for p in entity.findall(f"{_EDM}Property"))
            absent = [f for f in REQUIRED_FIELDS if f not in names]
            if absent:
                raise SchemaError(
                    f"Business Central's contacts API lacks {', '.join(absent)}; this version cannot be synced"
                )
            return BcSchema(names)
    raise SchemaError("Business Central's $metadata has no contact entity (API v2.0 contacts page missing)")


_schemas: dict[str, tuple[float, BcSchema]] = {}
_schemas_lock = threading.Lock()


def forget_schemas() -> None:
    """Drop the per-process `$metadata` cache (tests, or after a BC update)."""
    with _schemas_lock:
        _schemas.clear()


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

    def _get_all(
        self, url: str, params: dict[str, str] | None, *, pictures: bool = False
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        headers = {"Prefer": f"odata.maxpagesize={PAGE_SIZE}"}
        next_url: str | None = url
        while next_url:
            resp = self.http.request("GET", next_url, params=params, headers=headers)
            page = resp.body.get("value", [])
            if pictures:
                for record in page:
                    _keep_picture_metadata(record)
            out.extend(page)
            next_url = resp.body.get("@odata.nextLink")
            params = None  # the nextLink carries the query
        return out

    def schema(self) -> BcSchema:
        """The tenant's contact properties, read from `$metadata` once per process (per API root)."""
        with _schemas_lock:
            cached = _schemas.get(self.root)
            if cached is not None and time.monotonic() - cached[0] < METADATA_TTL:
                return cached[1]
        resp = self.http.request(
            "GET", f"{self.root}/$metadata", headers={"Accept": "application/xml"}, xml=True
        )
        if not isinstance(resp.body, str):
            raise SchemaError("Business Central's $metadata did not come back as XML")
        schema = parse_metadata(resp.body)
        with _schemas_lock:
            _schemas[self.root] = (time.monotonic(), schema)
        return schema

    def countries(self, company_id: str) -> list[dict[str, Any]]:
        """The company's Country/Region table (code and name of each row)."""
        return self._get_all(
            f"{self.root}/companies({company_id})/countriesRegions", {"$select": "code,displayName"}
        )

    def companies(self) -> list[dict[str, Any]]:
        return self._get_all(f"{self.root}/companies", None)

    def company(self, company_id: str) -> dict[str, Any]:
        return self.http.request("GET", f"{self.root}/companies({company_id})").json_object()

    def list_contacts(
        self,
        company_id: str,
        *,
        modified_after: str | None = None,
        select: tuple[str, ...] | None = None,
        pictures: bool = False,
    ) -> list[dict[str, Any]]:
        """Contacts with the given fields (default: every field of CONTACT_FIELDS the tenant has).

        `pictures`: each contact also carries its picture's metadata (`$expand=picture`: width,
        height, contentType; no bytes), which tells which contacts have one at no extra request."""
        params = {"$select": ",".join(select or self.schema().contact_fields)}
        if pictures:
            params["$expand"] = PICTURE_EXPAND
        if modified_after:
            params["$filter"] = f"lastModifiedDateTime gt {modified_after}"
        return self._get_all(f"{self.root}/{self._contacts_path(company_id)}", params, pictures=pictures)

    def contacts_changed_since(self, company_id: str, since: str) -> bool:
        """Whether any contact of the company changed after `since`: one request, one id at most.

        The change poll's whole question (BEHAVIOUR §8.1); deletions are invisible to it, because
        the API keeps no tombstones.
        """
        params = {"$filter": f"lastModifiedDateTime gt {since}", "$top": "1", "$select": "id"}
        resp = self.http.request("GET", f"{self.root}/{self._contacts_path(company_id)}", params=params)
        value = resp.json_object().get("value")
        return isinstance(value, list) and len(value) > 0

    # Webhooks (BEHAVIOUR §8.3): "Working with webhooks in Dynamics 365 Business Central",
    # learn.microsoft.com/dynamics365/business-central/dev-itpro/api-reference/v2.0/dynamics-subscriptions

    def contacts_resource(self, company_id: str) -> str:
        """The subscription `resource` for a company's contacts, in the documented relative form."""
        return f"/api/v2.0/{self._contacts_path(company_id)}"

    def webhook_supports_contacts(self, company_id: str) -> bool:
        """Whether this tenant's BC lists `v2.0/contacts` in the company's `webhookSupportedResources`
        (Microsoft's documented list of v2.0 webhook entities has no contacts)."""
        api = self.root.removesuffix("/v2.0")
        url = f"{api}/microsoft/runtime/beta/companies({company_id})/webhookSupportedResources"
        resp = self.http.request("GET", url)
        value = resp.json_object().get("value")
        names = {str(r.get("resource", "")).lower() for r in value if isinstance(r, dict)} if value else set()
        return "v2.0/contacts" in names

    def subscriptions(self) -> list[dict[str, Any]]:
        return self._get_all(f"{self.root}/subscriptions", None)

    def subscription(self, subscription_id: str) -> dict[str, Any] | None:
        """The subscription, or None when BC no longer has it (expired, deleted, or dropped by BC)."""
        resp = self.http.request("GET", self._subscription_url(subscription_id), allow_status=(404,))
        return None if resp.status == 404 else resp.json_object()

    def create_subscription(self, notification_url: str, resource: str, client_state: str) -> dict[str, Any]:
        """POST subscriptions: BC calls `notification_url` with a validationToken before it answers."""
        body = {"notificationUrl": notification_url, "resource": resource, "clientState": client_state}
        return self.http.request("POST", f"{self.root}/subscriptions", json_body=body).json_object()

    def renew_subscription(
        self, subscription_id: str, etag: str, notification_url: str, resource: str, client_state: str
    ) -> dict[str, Any] | None:
        """PATCH with If-Match: three more days (and another handshake). None when BC has no such one."""
        body = {"notificationUrl": notification_url, "resource": resource, "clientState": client_state}
        resp = self.http.request(
            "PATCH",
            self._subscription_url(subscription_id),
            json_body=body,
            headers={"If-Match": etag},
            allow_status=(404,),
        )
        return None if resp.status == 404 else resp.json_object()

    def delete_subscription(self, subscription_id: str, etag: str) -> None:
        """DELETE with If-Match (required); a subscription already gone is fine."""
        self.http.request(
            "DELETE", self._subscription_url(subscription_id), headers={"If-Match": etag}, allow_status=(404,)
        )

    def _subscription_url(self, subscription_id: str) -> str:
        return f"{self.root}/subscriptions('{quote(subscription_id, safe='')}')"

    def get_contacts(
        self, company_id: str, ids: list[str], *, pictures: bool = False
    ) -> list[dict[str, Any]]:
        """Full records for the given ids (OR-ed id filters, a few dozen per request); `pictures` as
        for `list_contacts`."""
        out: list[dict[str, Any]] = []
        for start in range(0, len(ids), 40):
            chunk = ids[start : start + 40]
            contact_filter = " or ".join(f"id eq {cid}" for cid in chunk)
            out.extend(
                self._get_all(
                    f"{self.root}/{self._contacts_path(company_id)}",
                    {
                        "$filter": contact_filter,
                        "$select": ",".join(self.schema().contact_fields),
                        **({"$expand": PICTURE_EXPAND} if pictures else {}),
                    },
                    pictures=pictures,
                )
            )
        return out

    # Contact pictures (API v2.0 "picture resource type") -----------------------------------
    def _picture_url(self, company_id: str, contact_id: str) -> str:
        return f"{self.root}/{self._contacts_path(company_id)}({contact_id})/picture"

    def get_picture(self, company_id: str, contact_id: str) -> bytes | None:
        """The contact's picture bytes (`picture/pictureContent`), or None when it has none (204)."""
        url = f"{self._picture_url(company_id, contact_id)}/pictureContent"
        resp = self.http.request("GET", url, headers={"Accept": "*/*"}, raw=True)
        if resp.status == 204 or not resp.body:
            return None
        return image_body(resp, "bc", url)

    def put_picture(
        self, company_id: str, contact_id: str, data: bytes, content_type: str, etag: str
    ) -> None:
        """Set the contact's picture: PATCH `picture/pictureContent` with the bytes, If-Match the
        contact's etag ("Required" in "Update picture"); a stale etag answers 412."""
        self.http.request(
            "PATCH",
            f"{self._picture_url(company_id, contact_id)}/pictureContent",
            json_body=data,
            headers={"If-Match": etag, "Accept": "*/*", "Content-Type": content_type},
            raw=True,
        )

    def write(self, company_id: str, writes: list[BcWrite]) -> list[ItemResult]:
        """Apply creates/updates/deletes through `$batch`; one result per write, in order.

        Properties the tenant's contacts page lacks are left out of bodies: BC refuses a body that
        names one."""
        items = []
        absent = set(CONTACT_FIELDS) - self.schema().contact_properties if writes else set()
        for w in writes:
            if w.body is not None and absent & w.body.keys():
                w = BcWrite(
                    w.method, {k: v for k, v in w.body.items() if k not in absent}, w.contact_id, w.etag
                )
            url = self._contacts_path(company_id)
            headers: dict[str, str] = {}
            if w.method != "POST":
                url += f"({w.contact_id})"
                headers["If-Match"] = w.etag or "*"
            items.append(BatchItem(w.method, url, w.body, headers))
        return self.http.batch(f"{self.root}/$batch", items, BATCH_MAX)


def _keep_picture_metadata(record: dict[str, Any]) -> None:
    picture = record.get("picture")
    if isinstance(picture, dict):
        record["picture"] = {k: picture[k] for k in PICTURE_METADATA if k in picture}
