"""Simulated Business Central API v2.0 (companies, contacts, OData query, paging, $batch, limits).

It stands in for ``https://api.businesscentral.dynamics.com/v2.0/{tenant}/{environment}/api/v2.0``
and tells the truth about the parts the sync depends on, including the inconvenient ones:

* Contact rules come from the Contact table and the "APIV2 - Contacts" page (page 30071,
  BCApps ``APIV2Contacts.Page.al``; table 5050 ``Contact.Table.al`` in StefanMaron/MSDyn365BC.Code.History):
  field lengths, Code fields upper-cased and trimmed, letters refused in phone numbers, email
  validation, ``type`` defaulting to Company (which clears ``jobTitle`` and makes the contact its own
  company), ``companyName`` resolved to an existing company contact or refused, company data inherited
  by persons, and every modify stamping ``lastModifiedDateTime``.
* Concurrency: PATCH/DELETE need ``If-Match`` (400 ``BadRequest_InvalidToken`` without it), a stale
  ETag gives 412 ``Request_EntityChanged``.
* Server-driven paging with ``Prefer: odata.maxpagesize`` and key-based ``$skiptoken`` nextLinks.
* ``$batch`` (JSON format, at most 100 operations, ``Isolation: snapshot`` = all or nothing),
  answered as ``multipart/mixed`` unless the request says ``Accept: application/json``.
* Operational limits per principal: 5 requests processed at once, 95 queued (for up to 8 minutes,
  then 503), then 429; 6,000 requests per 5-minute sliding window, then 429. BC's 429 carries no
  ``Retry-After`` (the docs only ask for "a cool off period"); ``throttle_sends_retry_after`` adds one.

Error codes follow the documented table (api-reference/v1.0/dynamics_error_codes.md) and every
message ends with BC's ``  CorrelationId:  <guid>.`` suffix.
"""

from __future__ import annotations

import base64
import json
import math
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from sandbox import bc_pictures
from sandbox.httpd import CaseInsensitiveDict, ConnectionReset, Request, Response, Route, Service

BC_AUDIENCE = "https://api.businesscentral.dynamics.com"
MAX_PAGE_SIZE = 20_000  # operational limits: "Max page size 20,000 entities per page"
MAX_BATCH_OPERATIONS = 100
# Application permissions BC accepts for service-to-service calls
# (dev-itpro/administration/automation-apis-using-s2s-authentication.md).
_S2S_ROLES = {"API.ReadWrite.All", "Automation.ReadWrite.All", "app_access"}
_ZERO_DATE = "0001-01-01"  # how BC serialises an empty Date (0D)


class BcError(Exception):
    """A refusal rendered as BC's OData error body."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


# Clock ------------------------------------------------------------------------------------------
class Clock:
    """UTC time for ``lastModifiedDateTime``; tests may freeze or move it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frozen: datetime | None = None
        self._offset = timedelta(0)

    def now(self) -> datetime:
        with self._lock:
            base = self._frozen or datetime.now(UTC)
            moment = base + self._offset
        # SystemModifiedAt is stored with millisecond precision.
        return moment.replace(microsecond=moment.microsecond // 1000 * 1000)

    def freeze(self, at: datetime | None = None) -> None:
        with self._lock:
            self._frozen = (at or datetime.now(UTC)).astimezone(UTC)
            self._offset = timedelta(0)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._offset += timedelta(seconds=seconds)

    def unfreeze(self) -> None:
        with self._lock:
            self._frozen = None
            self._offset = timedelta(0)


def format_datetime(value: datetime) -> str:
    """OData DateTimeOffset as BC writes it: UTC, 'Z', fraction only when non-zero, zeros trimmed."""
    value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += "." + f"{value.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_datetime(text: str) -> datetime:
    m = re.fullmatch(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2})?)(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})", text)
    if not m:
        raise ValueError(text)
    fraction = (m.group(2) or "0")[:6].ljust(6, "0")
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(f"{m.group(1)}.{fraction}{zone}").astimezone(UTC)


# Entity model -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldSpec:
    name: str  # JSON property
    kind: str  # guid | code | text | enum | bool | date | datetime | int
    length: int | None = None
    caption: str = ""  # the AL field caption used in BC's messages
    writable: bool = True
    options: tuple[str, ...] = ()


CONTACT_FIELDS: tuple[FieldSpec, ...] = (
    # Page order matters: BC validates the properties of a request in the order of the page's fields.
    FieldSpec("id", "guid", caption="Id", writable=False),
    FieldSpec("number", "code", 20, "No."),
    FieldSpec("type", "enum", caption="Type", options=("Company", "Person")),
    FieldSpec("displayName", "text", 100, "Name"),
    FieldSpec("jobTitle", "text", 30, "Job Title"),
    FieldSpec("companyNumber", "code", 20, "Company No."),
    FieldSpec("companyName", "text", 100, "Company Name"),
    FieldSpec(
        "contactBusinessRelation",
        "enum",
        caption="Contact Business Relation",
        writable=False,
        options=("None", "Contact", "Customer", "Vendor", "Bank Account", "Employee", "Multiple"),
    ),
    FieldSpec("addressLine1", "text", 100, "Address"),
    FieldSpec("addressLine2", "text", 50, "Address 2"),
    FieldSpec("city", "text", 30, "City"),
    FieldSpec("state", "text", 30, "County"),
    FieldSpec("country", "code", 10, "Country/Region Code"),
    FieldSpec("postalCode", "code", 20, "Post Code"),
    FieldSpec("phoneNumber", "text", 30, "Phone No."),
    FieldSpec("mobilePhoneNumber", "text", 30, "Mobile Phone No."),
    FieldSpec("email", "text", 80, "Email"),
    # "Home Page" grew from Text[80] to Text[255] when CLEAN24 took effect (Contact.Table.al).
    FieldSpec("website", "text", 255, "Home Page"),
    FieldSpec("searchName", "code", 100, "Search Name"),
    FieldSpec("privacyBlocked", "bool", caption="Privacy Blocked"),
    FieldSpec("taxRegistrationNumber", "text", 20, "VAT Registration No."),
    FieldSpec("lastInteractionDate", "date", caption="Date of Last Interaction", writable=False),
    FieldSpec("lastModifiedDateTime", "datetime", caption="Last Modified Date", writable=False),
)
_CONTACT_SPEC = {f.name: f for f in CONTACT_FIELDS}

COMPANY_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("id", "guid"),
    FieldSpec("systemVersion", "text"),
    FieldSpec("timestamp", "int"),
    FieldSpec("name", "text"),
    FieldSpec("displayName", "text"),
    FieldSpec("businessProfileId", "text"),
    FieldSpec("systemCreatedAt", "datetime"),
    FieldSpec("systemCreatedBy", "guid"),
    FieldSpec("systemModifiedAt", "datetime"),
    FieldSpec("systemModifiedBy", "guid"),
)

# The Country/Region table of the demo companies: ISO 3166 codes with their English names (the
# names are what a person types in Outlook's free-text countryOrRegion).
COUNTRY_NAMES: dict[str, str] = {
    "AE": "United Arab Emirates", "AT": "Austria", "AU": "Australia", "BE": "Belgium", "BG": "Bulgaria",
    "BR": "Brazil", "CA": "Canada", "CH": "Switzerland", "CN": "China", "CY": "Cyprus",
    "CZ": "Czech Republic", "DE": "Germany", "DK": "Denmark", "DZ": "Algeria", "EE": "Estonia",
    "ES": "Spain", "FI": "Finland", "FR": "France", "GB": "Great Britain", "GR": "Greece",
    "HK": "Hong Kong", "HR": "Croatia", "HU": "Hungary", "ID": "Indonesia", "IE": "Ireland",
    "IL": "Israel", "IN": "India", "IS": "Iceland", "IT": "Italy", "JP": "Japan", "KE": "Kenya",
    "KR": "South Korea", "LT": "Lithuania", "LU": "Luxembourg", "LV": "Latvia", "MA": "Morocco",
    "MT": "Malta", "MX": "Mexico", "MY": "Malaysia", "MZ": "Mozambique", "NG": "Nigeria",
    "NL": "Netherlands", "NO": "Norway", "NZ": "New Zealand", "PH": "Philippines", "PL": "Poland",
    "PT": "Portugal", "RO": "Romania", "RS": "Serbia", "RU": "Russia", "SA": "Saudi Arabia",
    "SE": "Sweden", "SG": "Singapore", "SI": "Slovenia", "SK": "Slovakia", "SZ": "Swaziland",
    "TH": "Thailand", "TN": "Tunisia", "TR": "Turkey", "TW": "Taiwan", "UA": "Ukraine",
    "UG": "Uganda", "US": "USA", "VN": "Vietnam", "ZA": "South Africa",
}  # fmt: skip
DEFAULT_COUNTRIES = frozenset(COUNTRY_NAMES)

COUNTRY_FIELDS: tuple[FieldSpec, ...] = (
    # countriesRegions resource type (api-reference/v2.0/resources/dynamics_countryregion.md).
    FieldSpec("id", "guid", caption="Id", writable=False),
    FieldSpec("code", "code", 10, "Code"),
    FieldSpec("displayName", "text", 50, "Name"),
    FieldSpec("addressFormat", "text", caption="Address Format"),
    FieldSpec("lastModifiedDateTime", "datetime", caption="Last Modified Date", writable=False),
)

_EMPTY_CONTACT: dict[str, Any] = {
    "number": "",
    "type": "Company",  # Contact.Type has no InitValue: the enum's first value, Company (enum 5050)
    "displayName": "",
    "jobTitle": "",
    "companyNumber": "",
    "companyName": "",
    "contactBusinessRelation": "None",
    "addressLine1": "",
    "addressLine2": "",
    "city": "",
    "state": "",
    "country": "",
    "postalCode": "",
    "phoneNumber": "",
    "mobilePhoneNumber": "",
    "email": "",
    "website": "",
    "searchName": "",
    "privacyBlocked": False,
    "taxRegistrationNumber": "",
    "lastInteractionDate": _ZERO_DATE,
}
_ADDRESS_FIELDS = ("addressLine1", "addressLine2", "postalCode", "city", "state")
_COMMUNICATION_FIELDS = ("phoneNumber", "mobilePhoneNumber", "email", "website")


@dataclass
class ContactRow:
    id: str
    values: dict[str, Any]
    modified: datetime
    rowversion: int
    picture: Any = None  # sandbox.bc_pictures.Picture when the contact has one (the Image field)

    def view(self) -> dict[str, Any]:
        """Values as the query engine compares them."""
        return {**self.values, "id": self.id, "lastModifiedDateTime": self.modified}


@dataclass
class CountryRow:
    """One row of a company's Country/Region table (table 9)."""

    id: str
    code: str
    name: str
    modified: datetime
    address_format: str = "Post Code+City"

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "code": self.code,
            "displayName": self.name,
            "addressFormat": self.address_format,
            "lastModifiedDateTime": self.modified,
        }


@dataclass
class Company:
    id: str
    name: str
    display_name: str
    created: datetime
    created_by: str
    contacts: dict[str, ContactRow] = field(default_factory=dict)
    numbers: dict[str, str] = field(default_factory=dict)  # contact No. -> id (the primary key)
    next_number: int = 1
    # The company's Country/Region table: code -> row. Each company has its own (table 9 is per company).
    countries: dict[str, CountryRow] = field(default_factory=dict)
    # The language BC's application messages come in ("Language" of the session, usually the company's
    # users' language): "en-US" or "nb-NO". Error *codes* never change with it.
    language: str = "en-US"

    def by_number(self, number: str) -> ContactRow | None:
        cid = self.numbers.get(number)
        return self.contacts.get(cid) if cid else None

    def copy(self) -> Company:
        rows = {
            k: ContactRow(r.id, dict(r.values), r.modified, r.rowversion, r.picture)
            for k, r in self.contacts.items()
        }
        return replace(self, contacts=rows, numbers=dict(self.numbers), countries=dict(self.countries))


# The service ------------------------------------------------------------------------------------
class BusinessCentralService(Service):
    name = "bc"

    def __init__(
        self,
        validate_token: Callable[[str, str], dict | None],
        tenant_id: str,
        environment: str = "production",
        *,
        tenant_domains: Iterable[str] = (),
        max_concurrent: int = 5,
        max_queue: int = 95,
        queue_timeout: float = 480.0,
        rate_limit: int = 6000,
        rate_window: float = 300.0,
        authority_host: str = "https://login.microsoftonline.com",
        inherit_company_data: bool = True,
    ):
        super().__init__()
        self._validate_token = validate_token
        self.tenant_id = tenant_id.lower()
        self._tenant_names = {self.tenant_id, *(d.lower() for d in tenant_domains)}
        self.environment = environment
        self._authority_host = authority_host.rstrip("/")
        self._inherit = inherit_company_data
        self.clock = Clock()
        self.companies: dict[str, Company] = {}
        self.contact_fields_absent: frozenset[str] = frozenset()
        """Switch: properties the contacts API page of this tenant's BC version does not have.

        Real tenants run different BC versions, and older API pages lack newer fields (e.g.
        ``frozenset({"jobTitle"})``). Such a property is missing from ``$metadata`` and from every
        answer, and naming it in ``$select``, ``$filter``, ``$orderby`` or a body is a 400, as for any
        property the type does not have. Default: none absent (the current version)."""
        self._entra_apps: set[str] = set()
        self._rowversion = 0
        self._etag_base = int(uuid.uuid4().int % 10**18) + 10**19
        self.limits = PrincipalLimits(max_concurrent, max_queue, queue_timeout, rate_limit, rate_window)
        # Documented behaviour: a JSON `$batch` sent with `Accept: application/json` is answered in
        # JSON (use-odata-batch.md). False stands for a tenant that answers multipart/mixed anyway
        # (an older version, or a proxy dropping Accept), so the conformance check can show it.
        self.json_batch_answers = True
        # Whether BC's own 429s (rate window, full queue) carry Retry-After. Microsoft documents none
        # ("Working with API limits": retry "while providing a cool off period", with regular,
        # incremental, exponential or random intervals), so by default they do not.
        self.throttle_sends_retry_after: bool = False
        # Hook for webhooks (sandbox/bc_webhooks.py): called under the data lock with
        # (company id, contact id, "created" | "updated" | "deleted", lastModifiedDateTime).
        self.contact_listeners: list[Callable[[str, str, str, datetime], None]] = []

        p = r"/v2\.0/(?P<tenant>[^/]+)/(?P<env>[^/]+)/api/v2\.0"
        self.route("GET", rf"{p}/companies", self._list_companies, "companies.list")
        self.route("GET", rf"{p}/companies\((?P<cid>[^)/]*)\)", self._get_company, "companies.get")
        # Contacts under companies(...) or, as BC also allows, with ?company= or a Company header.
        for c in (r"companies\((?P<cid>[^)/]*)\)/", ""):
            one = rf"{p}/{c}contacts\((?P<id>[^)/]*)\)"
            self.route("GET", rf"{p}/{c}contacts", self._list_contacts, "contacts.list")
            self.route("POST", rf"{p}/{c}contacts", self._create_contact, "contacts.create")
            self.route("GET", one, self._get_contact, "contacts.get")
            self.route("PATCH", one, self._update_contact, "contacts.update")
            self.route("DELETE", one, self._delete_contact, "contacts.delete")
        self.route("GET", rf"{p}/\$metadata", self._metadata, "$metadata")
        self.route(
            "GET",
            rf"{p}/companies\((?P<cid>[^)/]*)\)/countriesRegions",
            self._list_countries,
            "countries.list",
        )
        self.route("POST", rf"{p}/\$batch", self._batch, "$batch")
        bc_pictures.register(self, p)  # issue 12: contact pictures
        self._known = list(self.routes)
        for method in ("GET", "POST", "PATCH", "PUT", "DELETE"):
            self.route(method, r"/.*", self._no_resource, "unknown")

    # Control API: data ----------------------------------------------------------------------
    def register_entra_app(self, client_id: str) -> None:
        """The app's entry on BC's *Microsoft Entra Applications* page (enabled, with permissions)."""
        with self.lock:
            self._entra_apps.add(client_id.lower())

    def unregister_entra_app(self, client_id: str) -> None:
        with self.lock:
            self._entra_apps.discard(client_id.lower())

    def add_company(
        self,
        name: str,
        company_id: str | None = None,
        display_name: str | None = None,
        *,
        language: str = "en-US",
    ) -> str:
        """A company with the demo Country/Region table; `language` sets the language of BC's
        application messages for it ("en-US" or "nb-NO")."""
        if language not in ("en-US", "nb-NO"):
            raise ValueError(f"unsupported sandbox language {language!r}")
        with self.lock:
            cid = (company_id or str(uuid.uuid4())).lower()
            now = self.clock.now()
            company = Company(cid, name, display_name or name, now, str(uuid.uuid4()), language=language)
            for code, country in COUNTRY_NAMES.items():
                company.countries[code] = CountryRow(str(uuid.uuid4()), code, country, now)
            self.companies[cid] = company
            return cid

    def set_company_language(self, company_id: str, language: str) -> None:
        """Switch: the language BC answers this company's application errors in ("en-US", "nb-NO")."""
        if language not in ("en-US", "nb-NO"):
            raise ValueError(f"unsupported sandbox language {language!r}")
        with self.lock:
            self._company(company_id).language = language

    def add_country(self, code: str, name: str | None = None, company_id: str | None = None) -> None:
        """Add (or rename) a Country/Region row, in one company or in all of them."""
        with self.lock:
            code = code.strip().upper()
            for company in [self._company(company_id)] if company_id else self.companies.values():
                row = company.countries.get(code)
                if row is None:
                    company.countries[code] = CountryRow(
                        str(uuid.uuid4()), code, name or code, self.clock.now()
                    )
                elif name:
                    row.name, row.modified = name, self.clock.now()

    def remove_country(self, code: str, company_id: str | None = None) -> None:
        with self.lock:
            for company in [self._company(company_id)] if company_id else self.companies.values():
                company.countries.pop(code.strip().upper(), None)

    def seed_contact(self, company_id: str, **fields: Any) -> dict[str, Any]:
        """Insert a contact as existing BC data, without the API's validation.

        Server fields may be given (``id``, ``number``, ``lastModifiedDateTime``); what is not given
        gets BC's defaults: a number from the series, type Company, search name from the name.
        """
        with self.lock:
            company = self._company(company_id)
            modified = fields.pop("lastModifiedDateTime", None)
            cid = str(fields.pop("id", None) or uuid.uuid4()).lower()
            _check_control_fields(fields)
            values = dict(_EMPTY_CONTACT)
            for name, value in fields.items():
                values[name] = _normalise(_CONTACT_SPEC[name], value)
            if not values["searchName"]:
                values["searchName"] = values["displayName"].upper()[:100]
            if not values["number"]:
                values["number"] = self._next_number(company)
            if values["number"] in company.numbers:
                raise ValueError(f"contact number {values['number']} already exists")
            if values["type"] == "Person" and values["companyName"] and not values["companyNumber"]:
                match = self._company_contact_by_name(company, values["companyName"])
                values["companyNumber"] = match.values["number"] if match else ""
            row = ContactRow(cid, values, self.clock.now(), 0)
            self._type_change(company, row, on_insert=True)
            self._stamp(row)
            if modified is not None:
                row.modified = _as_datetime(modified)
            company.contacts[cid] = row
            company.numbers[values["number"]] = cid
            self._changed(company, cid, "created")
            return self._render(row)

    def set_picture(self, company_id: str, contact_id: str, data: bytes | None) -> None:
        """Someone setting (or, with None, removing) a contact's picture in BC; modifies the contact."""
        with self.lock:
            row = self._row(self._company(company_id), contact_id)
            row.picture = None if data is None else bc_pictures.parse_picture(data)
            self._stamp(row)

    def picture(self, company_id: str, contact_id: str) -> bytes | None:
        """The contact's picture bytes as BC holds them, or None."""
        with self.lock:
            picture = self._row(self._company(company_id), contact_id).picture
            return picture.data if picture else None

    def edit_contact(self, company_id: str, contact_id: str, **fields: Any) -> dict[str, Any]:
        """A person editing the contact in BC: no API validation, but the table's side effects."""
        with self.lock:
            company = self._company(company_id)
            row = self._row(company, contact_id)
            _check_control_fields(fields)
            old = dict(row.values)
            for name, value in fields.items():
                row.values[name] = _normalise(_CONTACT_SPEC[name], value)
            if row.values["number"] != old["number"]:
                self._rename(company, row, old["number"])
            renamed = row.values["displayName"] != old["displayName"] and "searchName" not in fields
            if renamed and old["searchName"] in ("", old["displayName"].upper()[:100]):
                row.values["searchName"] = row.values["displayName"].upper()[:100]
            if row.values["type"] != old["type"]:
                self._type_change(company, row, on_insert=False)
            self._modify(company, row, old)
            return self._render(row)

    def delete_contact(self, company_id: str, contact_id: str) -> None:
        with self.lock:
            company = self._company(company_id)
            self._delete(company, self._row(company, contact_id))

    def set_last_modified(self, company_id: str, contact_id: str, when: datetime) -> dict[str, Any]:
        """Backdate a contact's lastModifiedDateTime, as a transaction that committed late would."""
        with self.lock:
            row = self._row(self._company(company_id), contact_id)
            row.modified = when.astimezone(UTC)
            return self._render(row)

    def contacts(self, company_id: str) -> list[dict[str, Any]]:
        with self.lock:
            company = self._company(company_id)
            rows = sorted(company.contacts.values(), key=lambda r: r.values["number"])
            return [self._render(r) for r in rows]

    def get_contact(self, company_id: str, contact_id: str) -> dict[str, Any] | None:
        with self.lock:
            row = self._company(company_id).contacts.get(contact_id.lower())
            return self._render(row) if row else None

    # Error shape, authorization, limits ------------------------------------------------------
    def error_response(self, status: int, code: str, message: str, headers: dict | None = None) -> Response:
        body = {"error": {"code": code, "message": f"{message}  CorrelationId:  {uuid.uuid4()}."}}
        return Response(status, body, dict(headers or {}))

    def _fail(self, exc: BcError) -> Response:
        return self.error_response(exc.status, exc.code, exc.message, exc.headers)

    def authorize(self, req: Request, route: Route) -> Response | None:
        try:
            self._authorize(req)
        except BcError as exc:
            return self._fail(exc)
        return None

    def _authorize(self, req: Request) -> None:
        claims = self._claims(req)
        if claims is None or claims.get("tid", "").lower() != self.tenant_id:
            raise self._unauthorized("The server has rejected the client credentials.")
        m = re.match(r"/v2\.0/(?P<tenant>[^/]+)/(?P<env>[^/]+)/", req.path)
        if m and m["tenant"].lower() not in self._tenant_names:
            raise BcError(404, "BadRequest_NotFound", f"The tenant '{m['tenant']}' could not be found.")
        if m and m["env"].lower() != self.environment.lower():
            raise BcError(
                404,
                "BadRequest_NotFound",
                f"The environment '{m['env']}' could not be found for tenant '{m['tenant']}'.",
            )
        # A token without BC's application roles, or from an app missing on the Microsoft Entra
        # Applications page, is refused with 401 Authentication_InvalidCredentials (community.dynamics.com
        # "Common api / authentication errors": "Web service call failed because user could not be
        # authenticated or authorized." - cause: no roles section in the token).
        roles = set(claims.get("roles", []))
        if not roles & _S2S_ROLES or claims.get("appid", "").lower() not in self._entra_apps:
            raise self._unauthorized(
                "Web service call failed because user could not be authenticated or authorized."
            )

    def _claims(self, req: Request) -> dict | None:
        auth = req.headers.get("Authorization", "")
        if auth[:7].lower() != "bearer ":
            return None
        return self._validate_token(auth[7:].strip(), BC_AUDIENCE)

    def _unauthorized(self, message: str) -> BcError:
        challenge = (
            f'Bearer authorization_uri="{self._authority_host}/{self.tenant_id}/oauth2/authorize", '
            f'resource_id="{BC_AUDIENCE}"'
        )
        return BcError(401, "Authentication_InvalidCredentials", message, {"WWW-Authenticate": challenge})

    def dispatch(self, req: Request) -> Response:
        """Top-level requests pass the principal's limits first; latency and faults then run inside
        the concurrency slot, so the limits shape wall time as they do in BC. Operations inside a
        ``$batch`` share the slot of their envelope."""
        if req.in_batch:
            return super().dispatch(req)
        claims = self._claims(req)
        principal = (claims or {}).get("oid") or (claims or {}).get("appid")
        if not principal:
            return super().dispatch(req)
        refusal = self.limits.admit(principal)
        if refusal is not None and refusal.status == 429 and not self.throttle_sends_retry_after:
            refusal.headers.pop("Retry-After", None)
        if refusal is not None:
            kind = self.kind_for(req)
            self.counters.record_http(req.method, kind)
            if kind != "$batch":
                self.counters.record_item(req.method, kind)
            return self._fail(refusal)
        try:
            return super().dispatch(req)
        finally:
            self.limits.release(principal)

    # Endpoints: companies --------------------------------------------------------------------
    def _list_companies(self, req: Request, tenant: str, env: str) -> Response:
        engine = QueryEngine("Microsoft.NAV.company", COMPANY_FIELDS, key=("name",))
        context = f"{self._root(tenant, env)}/$metadata#companies"

        def run() -> Response:
            with self.lock:
                rows = [(self._company_view(c), c) for c in self.companies.values()]
                return engine.collection(req, rows, self._company_view_json, context, self._page_url(req))

        return self._answer(run)

    def _get_company(self, req: Request, tenant: str, env: str, cid: str) -> Response:
        try:
            with self.lock:
                company = self._company_from_url(req, cid)
                body = {"@odata.context": f"{self._root(tenant, env)}/$metadata#companies/$entity"}
                body.update(self._company_view_json(self._company_view(company), None))
            return Response(200, body)
        except BcError as exc:
            return self._fail(exc)

    # Endpoints: contacts ---------------------------------------------------------------------
    def _list_contacts(self, req: Request, tenant: str, env: str, cid: str | None = None) -> Response:
        def run() -> Response:
            # Evaluated and rendered under the lock: a page is one consistent read.
            with self.lock:
                company = self._company_from_url(req, cid)
                rows = [(r.view(), r) for r in company.contacts.values()]
                engine = QueryEngine("Microsoft.NAV.contact", self._contact_specs(), key=("number",))
                context = f"{self._root(tenant, env)}/$metadata#companies({company.id})/contacts"
                expand = bc_pictures.expansion(self, tenant, env, company, req)
                return engine.collection(
                    req, rows, self._render_selected, context, self._page_url(req), expand=expand
                )

        return self._answer(run)

    def _get_contact(self, req: Request, tenant: str, env: str, id: str, cid: str | None = None) -> Response:
        def run() -> Response:
            _reject_query_options(req, allowed={"$select"})
            with self.lock:
                company = self._company_from_url(req, cid)
                row = self._row_from_url(company, id)
                select = QueryEngine("Microsoft.NAV.contact", self._contact_specs(), ("number",)).select(req)
                return self._entity_response(tenant, env, company, row, 200, select)

        return self._answer(run)

    def _create_contact(self, req: Request, tenant: str, env: str, cid: str | None = None) -> Response:
        def run() -> Response:
            body = _json_body(req)
            with self.lock:
                company = self._company_from_url(req, cid)
                with _localized(company):
                    row = self._insert(company, body)
                resp = self._entity_response(tenant, env, company, row, 201)
                resp.headers["Location"] = (
                    f"{self._root(tenant, env)}/companies({company.id})/contacts({row.id})"
                )
                return resp

        return self._answer(run)

    def _update_contact(
        self, req: Request, tenant: str, env: str, id: str, cid: str | None = None
    ) -> Response:
        def run() -> Response:
            body = _json_body(req)
            with self.lock:
                company = self._company_from_url(req, cid)
                row = self._row_from_url(company, id)
                with _localized(company):
                    self._check_if_match(req, row)
                    self._apply_patch(company, row, body)
                return self._entity_response(tenant, env, company, row, 200)

        return self._answer(run)

    def _delete_contact(
        self, req: Request, tenant: str, env: str, id: str, cid: str | None = None
    ) -> Response:
        def run() -> Response:
            with self.lock:
                company = self._company_from_url(req, cid)
                row = self._row_from_url(company, id)
                with _localized(company):
                    self._check_if_match(req, row)
                    self._delete(company, row)
            return Response(204)

        return self._answer(run)

    def _contact_specs(self) -> tuple[FieldSpec, ...]:
        """The contact properties this tenant's BC version has (see `contact_fields_absent`)."""
        return tuple(f for f in CONTACT_FIELDS if f.name not in self.contact_fields_absent)

    def _metadata(self, req: Request, tenant: str, env: str) -> Response:
        """The service document's CSDL (OData v4 EDMX XML), as BC serves at ``.../api/v2.0/$metadata``:
        one ``Microsoft.NAV`` schema whose entity types list their properties. Only the entity types
        the sandbox serves are included."""

        def props(fields: Iterable[FieldSpec]) -> str:
            out = []
            for f in fields:
                edm = _EDM.get(f.kind) or f"Microsoft.NAV.{f.name}"
                extra = f' MaxLength="{f.length}"' if f.length and edm == "Edm.String" else ""
                nullable = ' Nullable="false"' if f.name == "id" else ""
                out.append(f'<Property Name="{f.name}" Type="{edm}"{nullable}{extra} />')
            return "".join(out)

        def entity(name: str, key: str, fields: Iterable[FieldSpec]) -> str:
            return f'<EntityType Name="{name}"><Key><PropertyRef Name="{key}" /></Key>{props(fields)}</EntityType>'

        xml = (
            '<?xml version="1.0" encoding="utf-8"?>'
            '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">'
            "<edmx:DataServices>"
            '<Schema Namespace="Microsoft.NAV" xmlns="http://docs.oasis-open.org/odata/ns/edm">'
            + entity("company", "id", COMPANY_FIELDS)
            + entity("contact", "id", self._contact_specs())
            + entity("countryRegion", "id", COUNTRY_FIELDS)
            + '<EntityContainer Name="NAV">'
            '<EntitySet Name="companies" EntityType="Microsoft.NAV.company" />'
            '<EntitySet Name="contacts" EntityType="Microsoft.NAV.contact" />'
            '<EntitySet Name="countriesRegions" EntityType="Microsoft.NAV.countryRegion" />'
            "</EntityContainer></Schema></edmx:DataServices></edmx:Edmx>"
        )
        return Response(200, xml, content_type="application/xml;charset=utf-8")

    def _list_countries(self, req: Request, tenant: str, env: str, cid: str) -> Response:
        engine = QueryEngine("Microsoft.NAV.countryRegion", COUNTRY_FIELDS, key=("code",))

        def run() -> Response:
            with self.lock:
                company = self._company_from_url(req, cid)
                rows = [(r.view(), r) for r in company.countries.values()]
                context = f"{self._root(tenant, env)}/$metadata#companies({company.id})/countriesRegions"
                return engine.collection(req, rows, _render_view, context, self._page_url(req))

        return self._answer(run)

    def _no_resource(self, req: Request) -> Response:
        if any(r.pattern.match(req.path) for r in self._known):
            segment = req.path.rstrip("/").rsplit("/", 1)[-1]
            return self.error_response(
                405,
                "BadRequest_MethodNotAllowed",
                f"'{req.method}' requests for '{segment}' are not allowed within "
                "Dynamics 365 Business Central OData web services.",
            )
        return self.error_response(
            404,
            "BadRequest_NotFound",
            "No HTTP resource was found that matches the request URI "
            f"'{self.base_url}{req.raw_target or req.path}'.",
        )

    # Endpoint: $batch ------------------------------------------------------------------------
    def _batch(self, req: Request, tenant: str, env: str) -> Response:
        try:
            body = _json_body(req)
            ops = body.get("requests") if isinstance(body, dict) else None
            if not isinstance(ops, list):
                raise BcError(400, "BadRequest", "Invalid Request Body")
            if len(ops) > MAX_BATCH_OPERATIONS:
                raise BcError(
                    400,
                    "BadRequest",
                    f"The batch request contains {len(ops)} operations; "
                    f"the maximum is {MAX_BATCH_OPERATIONS}.",
                )
            ids = [op.get("id") for op in ops if isinstance(op, dict) and op.get("id") is not None]
            if len(ids) != len(set(ids)):
                raise BcError(400, "BadRequest", "The request ids in a batch request must be unique.")
            if any(not isinstance(op, dict) or not op.get("method") or not op.get("url") for op in ops):
                raise BcError(400, "BadRequest", "Invalid Request Body")
            if any("atomicityGroup" in op for op in ops):
                raise BcError(
                    400,
                    "BadRequest",
                    "atomicityGroup is not supported by the sandbox; use Isolation: snapshot.",
                )
        except BcError as exc:
            return self._fail(exc)
        snapshot = req.headers.get("Isolation", "").strip().lower() == "snapshot"
        base_path = req.path[: -len("$batch")]
        if not snapshot:
            return _batch_answer(
                req, [self._run_operation(req, op, base_path) for op in ops], self.json_batch_answers
            )
        # One session and one transaction (use-odata-batch.md): all changes are reverted when any
        # operation fails, while the answers of the successful ones are still returned.
        with self.lock:
            # The row-version counter is not rolled back: ETags the client already saw must never
            # come back for different content.
            saved = {cid: company.copy() for cid, company in self.companies.items()}
            restore = True
            try:
                responses = [self._run_operation(req, op, base_path) for op in ops]
                restore = any(r["status"] >= 400 for r in responses)
            finally:
                if restore:
                    self.companies = saved
        return _batch_answer(req, responses, self.json_batch_answers)

    def _run_operation(self, envelope: Request, op: dict[str, Any], base_path: str) -> dict[str, Any]:
        target = urlsplit(str(op["url"]))
        path = target.path if target.path.startswith("/") else base_path + target.path
        headers = CaseInsensitiveDict({str(k): str(v) for k, v in (op.get("headers") or {}).items()})
        if "Authorization" not in headers and envelope.headers.get("Authorization"):
            headers["Authorization"] = envelope.headers["Authorization"]
        payload = op.get("body")
        data = (
            b""
            if payload is None
            else (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        )
        item = Request(
            method=str(op["method"]).upper(),
            path=unquote(path),
            query=dict(parse_qsl(target.query, keep_blank_values=True)),
            headers=headers,
            body=data,
            raw_target=path + (f"?{target.query}" if target.query else ""),
            in_batch=True,
        )
        try:
            resp = self.dispatch(item)
        except ConnectionReset:
            raise
        except Exception as exc:  # a simulator bug inside one operation shows as that operation's 500
            resp = self.error_response(500, "SandboxError", f"{type(exc).__name__}: {exc}")
        out: dict[str, Any] = {"id": op.get("id"), "status": resp.status}
        out_headers = {k.lower(): v for k, v in resp.headers.items()}
        if resp.body is not None:
            out_headers.setdefault(
                "content-type", resp.content_type or "application/json; odata.metadata=minimal"
            )
            out_headers["odata-version"] = "4.0"
            out["body"] = (
                resp.body if not isinstance(resp.body, bytes) else resp.body.decode("utf-8", "replace")
            )
        out["headers"] = out_headers
        return out

    # Contact rules ---------------------------------------------------------------------------
    def _insert(self, company: Company, body: dict[str, Any]) -> ContactRow:
        row = ContactRow("", dict(_EMPTY_CONTACT), self.clock.now(), 0)
        self._apply(company, row, body, inserting=True)
        if row.values["displayName"] == "":
            raise _dialog('A "displayName" must be provided.')
        if not row.values["number"]:
            row.values["number"] = self._next_number(company)
        elif row.values["number"] in company.numbers:
            raise BcError(
                400,
                "Internal_EntityWithSameKeyExists",
                f"The Contact already exists. Identification fields and values: No.='{row.values['number']}'",
            )
        row.id = str(uuid.uuid4())
        self._type_change(company, row, on_insert=True)
        self._stamp(row)
        company.contacts[row.id] = row
        company.numbers[row.values["number"]] = row.id
        self._changed(company, row.id, "created")
        return row

    def _apply_patch(self, company: Company, row: ContactRow, body: dict[str, Any]) -> None:
        old = dict(row.values)
        work = ContactRow(row.id, dict(row.values), row.modified, row.rowversion)
        self._apply(company, work, body, inserting=False)
        if work.values["number"] != old["number"] and work.values["number"] in company.numbers:
            raise BcError(
                400,
                "Internal_EntityWithSameKeyExists",
                "The Contact already exists. Identification fields and values: "
                f"No.='{work.values['number']}'",
            )
        row.values = work.values
        if row.values["number"] != old["number"]:
            self._rename(company, row, old["number"])
        # Contact.OnModify -> DoModify stamps "Last Date/Time Modified", so every modify is a write
        # and moves SystemModifiedAt, even when the request changed nothing else.
        self._modify(company, row, old)

    def _apply(self, company: Company, row: ContactRow, body: dict[str, Any], inserting: bool) -> None:
        if not isinstance(body, dict):
            raise BcError(400, "BadRequest", "Invalid Request Body")
        for key in body:
            if key.startswith("@"):
                continue  # instance annotations such as @odata.etag
            if key not in _CONTACT_SPEC or key in self.contact_fields_absent:
                raise BcError(
                    400,
                    "BadRequest",
                    f"The property '{key}' does not exist on type 'Microsoft.NAV.contact'. Make sure to "
                    "only use property names that are defined by the type or mark the type as open type.",
                )
            _check_json_type(_CONTACT_SPEC[key], body[key])
        v = row.values
        for spec in CONTACT_FIELDS:
            if spec.name not in body:
                continue
            raw = body[spec.name]
            if not spec.writable:
                current = {"id": row.id or None, "lastInteractionDate": v["lastInteractionDate"]}.get(
                    spec.name
                )
                if spec.name == "lastModifiedDateTime" or raw == current or (spec.name == "id" and inserting):
                    continue  # SystemModifiedAt and the key are maintained by the platform
                if spec.name == "contactBusinessRelation" and raw == v["contactBusinessRelation"]:
                    continue
                raise BcError(400, "BadRequest_InvalidOperation", f"Control '{spec.caption}' is read-only.")
            value = _normalise(spec, raw)
            _check_length(spec, value)
            self._validate_field(company, row, spec.name, value, inserting)

    def _validate_field(
        self, company: Company, row: ContactRow, name: str, value: Any, inserting: bool
    ) -> None:
        v = row.values
        if name == "number":
            v["number"] = value
        elif name == "type":
            old_type = v["type"]
            v["type"] = value
            if not inserting and value != old_type:
                self._type_change(company, row, on_insert=False)
        elif name == "displayName":
            if value == "":
                raise _dialog('The blank "displayName" is not allowed.')
            old_name = v["displayName"]
            v["displayName"] = value
            # UpdateSearchName: follows the name while it still mirrors the old one.
            if v["searchName"] in ("", old_name.upper()[:100]):
                v["searchName"] = value.upper()[:100]
            if v["type"] == "Company":
                v["companyName"] = value  # ProcessCompanyNameChange
        elif name == "companyNumber":
            self._set_company_no(company, row, value)
        elif name == "companyName":
            self._set_company_no(company, row, self._get_comp_no(company, value))
        elif name == "country":
            if value and value not in company.countries:
                raise BcError(
                    400,
                    "Internal_InvalidTableRelation",
                    f"The field Country/Region Code of table Contact contains a value ({value}) that "
                    "cannot be found in the related table (Country/Region).",
                )
            v["country"] = value
        elif name in ("phoneNumber", "mobilePhoneNumber"):
            # Contact."Phone No." OnValidate: Char.IsLetter on every character -> FieldError.
            if any(ch.isalpha() for ch in value):
                caption = _CONTACT_SPEC[name].caption
                raise BcError(
                    400,
                    "Application_FieldValidationException",
                    f"{caption} must not contain letters in Contact No.='{v['number']}'.",
                )
            v[name] = value
        elif name == "email":
            if value:
                _check_email_addresses(value)
            v["email"] = value
        elif name == "taxRegistrationNumber":
            v[name] = value.upper()  # "VAT Registration No." := UpperCase(...)
        else:
            v[name] = value

    def _get_comp_no(self, company: Company, text: str) -> str:
        """Contact.GetCompNo: the company contact a typed company name refers to, or BC's error.

        Without a UI to pick from (an API call), anything but a single match fails with
        "You must select an existing contact." - so a person cannot name a company BC does not know.
        """
        if text == "":
            return ""
        if len(text) <= 20 and company.by_number(text.strip().upper()) is not None:
            return text.strip().upper()
        rows = sorted(company.contacts.values(), key=lambda r: r.values["number"])
        companies = [r for r in rows if r.values["type"] == "Company"]
        needle = text.lower()
        for r in companies:
            if r.values["displayName"].lower() == needle:
                return r.values["number"]
        for r in companies:
            if r.values["number"].lower().startswith(needle) or r.values["displayName"].lower().startswith(
                needle
            ):
                return r.values["number"]
        hits = [
            r
            for r in companies
            if any(
                needle in r.values[f].lower()
                for f in ("number", "displayName", "city", "phoneNumber", "postalCode")
            )
        ]
        if len(hits) == 1:
            return hits[0].values["number"]
        raise _dialog("You must select an existing contact.")

    def _set_company_no(self, company: Company, row: ContactRow, number: str) -> None:
        """Contact."Company No." OnValidate: inherit from the company (or clear the name), then
        only a person may change company."""
        v = row.values
        old_number = v["companyNumber"]
        target = company.by_number(number) if number else None
        if number and (target is None or target.values["type"] != "Company"):
            # TableRelation = Contact where(Type = const(Company)), checked by Validate.
            raise BcError(
                400,
                "Internal_InvalidTableRelation",
                f"The field Company No. of table Contact contains a value ({number}) that cannot be "
                "found in the related table (Contact).",
            )
        if target is not None:
            self._inherit_company(company, row, target, old_number)
        else:
            v["companyName"] = ""
        if number == old_number:
            return
        if v["type"] != "Person":
            raise BcError(
                400,
                "Application_FieldValidationException",
                f"Type must be equal to 'Person'  in Contact: No.={v['number']}. "
                f"Current value is '{v['type']}'.",
            )
        v["companyNumber"] = number

    def _inherit_company(
        self, company: Company, row: ContactRow, target: ContactRow, old_number: str
    ) -> None:
        """InheritCompanyToPersonData with the Marketing Setup "Inherit ..." options switched on."""
        v, t = row.values, target.values
        v["companyName"] = t["displayName"]
        if not self._inherit:
            return
        old = company.by_number(old_number) if old_number else None
        v["country"] = t["country"]
        stale = all(v[f] == "" for f in _ADDRESS_FIELDS) or (
            old is not None and all(v[f] == old.values[f] for f in _ADDRESS_FIELDS)
        )
        if stale:
            for f in _ADDRESS_FIELDS:
                v[f] = t[f]
        for f in _COMMUNICATION_FIELDS:
            if v[f] == "" or (old is not None and v[f] == old.values[f]):
                v[f] = t[f]

    def _type_change(self, company: Company, row: ContactRow, on_insert: bool) -> None:
        """Contact.TypeChange: a company is its own company and has no job title."""
        v = row.values
        if v["type"] == "Company":
            v["jobTitle"] = ""
            v["companyNumber"] = v["number"]
            v["companyName"] = v["displayName"]
            return
        if not on_insert and any(
            r.values["type"] == "Person" and r.values["companyNumber"] == v["number"] and r.id != row.id
            for r in company.contacts.values()
        ):
            raise _dialog("You cannot change Type because one or more persons are assigned to this company.")
        if v["companyNumber"] == v["number"]:
            v["companyNumber"] = ""
            v["companyName"] = ""

    def _modify(self, company: Company, row: ContactRow, old: dict[str, Any]) -> None:
        self._stamp(row)
        self._changed(company, row.id, "updated")
        v = row.values
        if v["type"] == "Company" and v["displayName"] != old["displayName"]:
            # Contact.OnModify for a company rewrites the company name on each of its persons.
            for person in company.contacts.values():
                if person.values["type"] == "Person" and person.values["companyNumber"] == v["number"]:
                    person.values["companyName"] = v["displayName"]
                    self._stamp(person)
                    self._changed(company, person.id, "updated")

    def _rename(self, company: Company, row: ContactRow, old_number: str) -> None:
        company.numbers.pop(old_number, None)
        company.numbers[row.values["number"]] = row.id
        if row.values["type"] == "Company":
            row.values["companyNumber"] = row.values["number"]
            for person in company.contacts.values():
                if person.values["companyNumber"] == old_number and person.id != row.id:
                    person.values["companyNumber"] = row.values["number"]

    def _delete(self, company: Company, row: ContactRow) -> None:
        if row.values["type"] == "Company":
            # Contact.OnDelete deletes the persons of a company contact.
            for person in list(company.contacts.values()):
                if (
                    person.values["type"] == "Person"
                    and person.values["companyNumber"] == row.values["number"]
                ):
                    self._drop(company, person)
                    self._changed(company, person.id, "deleted")
        self._drop(company, row)
        self._changed(company, row.id, "deleted")

    def _changed(self, company: Company, contact_id: str, change: str) -> None:
        for listener in self.contact_listeners:
            listener(company.id, contact_id, change, self.clock.now())

    @staticmethod
    def _drop(company: Company, row: ContactRow) -> None:
        company.contacts.pop(row.id, None)
        if company.numbers.get(row.values["number"]) == row.id:
            company.numbers.pop(row.values["number"], None)

    def _stamp(self, row: ContactRow) -> None:
        self._rowversion += 1
        row.rowversion = self._rowversion
        row.modified = self.clock.now()

    def _next_number(self, company: Company) -> str:
        while True:
            number = f"CT{company.next_number:06d}"  # the demo data's CONT series: CT000001..
            company.next_number += 1
            if number not in company.numbers:
                return number

    def _company_contact_by_name(self, company: Company, name: str) -> ContactRow | None:
        return next(
            (
                r
                for r in company.contacts.values()
                if r.values["type"] == "Company" and r.values["displayName"].lower() == name.lower()
            ),
            None,
        )

    # Rendering and lookups -------------------------------------------------------------------
    def _etag(self, row: ContactRow) -> str:
        digits = str(self._etag_base + row.rowversion)
        token = base64.b64encode(f"'{len(digits)};{digits};00;'".encode()).decode()
        return f'W/"{token}"'

    def _render(self, row: ContactRow, select: list[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"@odata.etag": self._etag(row)}
        for spec in self._contact_specs():
            if select is not None and spec.name not in select:
                continue
            if spec.name == "id":
                out["id"] = row.id
            elif spec.name == "lastModifiedDateTime":
                out["lastModifiedDateTime"] = format_datetime(row.modified)
            else:
                out[spec.name] = row.values[spec.name]
        return out

    def _render_selected(
        self, view: dict[str, Any], row: ContactRow, select: list[str] | None
    ) -> dict[str, Any]:
        return self._render(row, select)

    def _company_view(self, company: Company) -> dict[str, Any]:
        return {
            "id": company.id,
            "systemVersion": "27.0.38460.41144",
            "timestamp": 1000 + len(company.contacts),
            "name": company.name,
            "displayName": company.display_name,
            "businessProfileId": "",
            "systemCreatedAt": company.created,
            "systemCreatedBy": company.created_by,
            "systemModifiedAt": company.created,
            "systemModifiedBy": company.created_by,
        }

    @staticmethod
    def _company_view_json(view: dict[str, Any], row: Any, select: list[str] | None = None) -> dict[str, Any]:
        return {
            k: (format_datetime(v) if isinstance(v, datetime) else v)
            for k, v in view.items()
            if select is None or k in select
        }

    def _entity_response(
        self,
        tenant: str,
        env: str,
        company: Company,
        row: ContactRow,
        status: int,
        select: list[str] | None = None,
    ) -> Response:
        context = f"{self._root(tenant, env)}/$metadata#companies({company.id})/contacts"
        context += f"({','.join(select)})/$entity" if select else "/$entity"
        body = {"@odata.context": context, **self._render(row, select)}
        return Response(status, body, {"ETag": body["@odata.etag"]})

    def _root(self, tenant: str, env: str) -> str:
        return f"{self.base_url}/v2.0/{tenant}/{env}/api/v2.0"

    def _page_url(self, req: Request) -> str:
        return f"{self.base_url}{quote(req.path, safe='/()$,=')}"

    def _company(self, company_id: str) -> Company:
        company = self.companies.get(company_id.lower())
        if company is None:
            raise KeyError(f"unknown sandbox company {company_id!r}")
        return company

    def _company_from_url(self, req: Request, cid: str | None) -> Company:
        if cid is None:
            # Without companies(...) in the URL BC takes the company from ?company= or the Company header.
            wanted = req.query.get("company") or req.headers.get("Company")
            if not wanted:
                raise BcError(
                    400,
                    "Internal_CompanyNotFound",
                    "Cannot process the request because the default company cannot be found. You can "
                    "specify a default company in the service configuration file, or specify one for each "
                    'tenant, or you can add a query string in the form of "company=[name]".',
                )
            found = next(
                (c for c in self.companies.values() if wanted.lower() in (c.id, c.name.lower())),
                None,
            )
            if found is None:
                raise BcError(400, "Internal_CompanyNotFound", f"The company '{wanted}' does not exist.")
            return found
        key = cid.strip().lower()
        if not _GUID.fullmatch(key):
            raise BcError(
                400,
                "BadRequest",
                "Invalid format of GUID string. The correct format of the GUID string is: "
                "CDEF7890-ABCD-0123-1234-567890ABCDEF where 0-9, A-F symbolizes hexadecimal digits.",
            )
        company = self.companies.get(key)
        if company is None:
            raise BcError(404, "BadRequest_NotFound", f"The company with id '{cid}' does not exist.")
        return company

    @staticmethod
    def _row(company: Company, contact_id: str) -> ContactRow:
        row = company.contacts.get(contact_id.lower())
        if row is None:
            raise KeyError(f"unknown contact {contact_id!r}")
        return row

    @staticmethod
    def _row_from_url(company: Company, contact_id: str) -> ContactRow:
        key = contact_id.strip().lower()
        if not _GUID.fullmatch(key):
            raise BcError(
                400,
                "BadRequest",
                "Invalid format of GUID string. The correct format of the GUID string is: "
                "CDEF7890-ABCD-0123-1234-567890ABCDEF where 0-9, A-F symbolizes hexadecimal digits.",
            )
        row = company.contacts.get(key)
        if row is None:
            raise BcError(
                404,
                "Internal_RecordNotFound",
                "The Contact does not exist. Identification fields and values: "
                f"System ID='{{{key.upper()}}}'",
            )
        return row

    def _check_if_match(self, req: Request, row: ContactRow) -> None:
        check_if_match(req, self._etag(row))

    def _answer(self, run: Callable[[], Response]) -> Response:
        try:
            return run()
        except BcError as exc:
            return self._fail(exc)


def check_if_match(req: Request, etag: str) -> None:
    """BC's optimistic concurrency, for every entity that has an etag.

    If-Match is "Required" for PATCH and DELETE (api-reference/v2.0/api/dynamics_contact_update.md,
    _delete.md). Without it BC answers BadRequest_InvalidToken (MicrosoftDocs/dynamics365smb-devitpro-pb
    issue #813); a stale tag is the OData conflict Request_EntityChanged (dynamics_error_codes.md).
    """
    header = req.headers.get("If-Match", "").strip()
    if not header:
        raise BcError(
            400,
            "BadRequest_InvalidToken",
            "Could not validate the client concurrency token required by the service. Please provide a "
            "valid token in the client request.",
        )
    offered = [t.strip() for t in header.split(",")]
    if "*" not in offered and etag not in offered:
        raise BcError(412, "Request_EntityChanged", "Another user has already changed the record.")


def _wants_json(accept: str | None) -> bool:
    """Whether an Accept header asks for JSON explicitly (``*/*`` or none does not)."""
    for item in (accept or "").split(","):
        media = item.split(";", 1)[0].strip().lower()
        if media == "application/json":
            return True
    return False


_REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 404: "Not Found"}


def _batch_answer(req: Request, responses: list[dict[str, Any]], json_answers: bool = True) -> Response:
    """A `$batch` answer in the format the request accepts.

    BC answers a JSON `$batch` with JSON only when the request says ``Accept: application/json``;
    otherwise (no Accept, or ``*/*`` as `requests` sends) the answer is ``multipart/mixed``, one
    ``application/http`` part per operation (Kauffmann, "Batch calls with Business Central APIs (1)").
    `json_answers=False` (the service's `json_batch_answers` switch) answers multipart whatever Accept says.
    """
    if json_answers and _wants_json(req.headers.get("Accept")):
        return Response(200, {"responses": responses})
    boundary = f"batchresponse_{uuid.uuid4()}"
    parts = []
    for r in responses:
        status = int(r["status"])
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        head += [f"{k}: {v}" for k, v in (r.get("headers") or {}).items()]
        body = r.get("body")
        text = "" if body is None else body if isinstance(body, str) else json.dumps(body)
        parts.append(
            f"--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            + "\r\n".join(head)
            + "\r\n\r\n"
            + text
            + "\r\n"
        )
    payload = "".join(parts) + f"--{boundary}--\r\n"
    return Response(200, payload.encode("utf-8"), content_type=f"multipart/mixed; boundary={boundary}")


# Operational limits ----------------------------------------------------------------------------
class PrincipalLimits:
    """BC's per-user/principal limits: a few requests processed at once, more waiting in a queue,
    429 when the queue is full, 503 when a request waited too long, and a sliding-window rate.

    Sources: dev-itpro/administration/operational-limits-online.md (5 concurrent, 95 queued, 100
    connections, 8 minutes in the queue) and learn.microsoft.com/training/modules/work-with-api/4-limits
    (6,000 requests per 5-minute sliding window per user or service principal; "use batching to perform
    multiple operations in one call" - so a $batch envelope counts as one request here).
    """

    def __init__(
        self, max_concurrent: int, max_queue: int, queue_timeout: float, rate_limit: int, rate_window: float
    ):
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self._cond = threading.Condition()
        self._active: Counter[str] = Counter()
        self._waiting: Counter[str] = Counter()
        self._history: dict[str, deque[float]] = {}
        self.peak_active: Counter[str] = Counter()

    def admit(self, principal: str) -> BcError | None:
        with self._cond:
            now = time.monotonic()
            history = self._history.setdefault(principal, deque())
            while history and history[0] <= now - self.rate_window:
                history.popleft()
            if len(history) >= self.rate_limit:
                wait = max(1, math.ceil(history[0] + self.rate_window - now))
                return BcError(
                    429,
                    "Application_TooManyRequests",
                    f"Too many requests reached. Actual ({len(history) + 1}). Maximum ({self.rate_limit}).",
                    {"Retry-After": str(wait)},
                )
            if self._active[principal] >= self.max_concurrent:
                if self._waiting[principal] >= self.max_queue:
                    return BcError(
                        429,
                        "Application_TooManyRequests",
                        "The request queue for this user is full. Try again later.",
                        {"Retry-After": "1"},
                    )
                self._waiting[principal] += 1
                deadline = now + self.queue_timeout
                try:
                    while self._active[principal] >= self.max_concurrent:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return BcError(
                                503, "ServiceUnavailable", "The request waited too long in the queue."
                            )
                        self._cond.wait(remaining)
                finally:
                    self._waiting[principal] -= 1
            self._active[principal] += 1
            self.peak_active[principal] = max(self.peak_active[principal], self._active[principal])
            history.append(time.monotonic())
            return None

    def release(self, principal: str) -> None:
        with self._cond:
            self._active[principal] -= 1
            self._cond.notify_all()

    def reset(self) -> None:
        with self._cond:
            self._history.clear()
            self.peak_active.clear()


# OData query engine ----------------------------------------------------------------------------
_EDM = {
    "guid": "Edm.Guid",
    "code": "Edm.String",
    "text": "Edm.String",
    "bool": "Edm.Boolean",
    "date": "Edm.Date",
    "datetime": "Edm.DateTimeOffset",
    "int": "Edm.Int32",
}
_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SUPPORTED_OPTIONS = {"$filter", "$select", "$top", "$skip", "$orderby", "$count", "$skiptoken"}


def _reject_query_options(req: Request, allowed: set[str]) -> None:
    for key in req.query:
        if key.startswith("$") and key not in allowed:
            if key in _SUPPORTED_OPTIONS | {"$expand", "$apply", "$search", "$compute", "$format"}:
                raise BcError(
                    400, "BadRequest", f"The query option '{key}' is not supported by the sandbox here."
                )
            raise BcError(400, "BadRequest", f"The query parameter '{key}' is not supported.")


class QueryEngine:
    """$filter, $select, $orderby, $top, $skip, $count and server-driven paging over one entity set.

    Anything it cannot evaluate is refused with a 400, never ignored: a silently dropped filter
    would make the product read (and act on) the wrong contacts.
    """

    def __init__(self, type_name: str, fields: Iterable[FieldSpec], key: tuple[str, ...]):
        self.type_name = type_name
        self.specs = {f.name: f for f in fields}
        self.key = key

    def select(self, req: Request) -> list[str] | None:
        text = req.query.get("$select")
        if text is None:
            return None
        names = [s.strip() for s in text.split(",") if s.strip()]
        for name in names:
            if name not in self.specs:
                raise BcError(
                    400, "BadRequest", f"Could not find a property named '{name}' on type '{self.type_name}'."
                )
        return names

    def collection(
        self,
        req: Request,
        rows: list[tuple[dict[str, Any], Any]],
        render: Callable[[dict[str, Any], Any, list[str] | None], dict[str, Any]],
        context: str,
        page_url: str,
        expand: Callable[[Any], dict[str, Any]] | None = None,
    ) -> Response:
        """`expand`: the entity set's `$expand` (its navigation properties rendered for one row), or
        None where `$expand` is refused."""
        _reject_query_options(req, _SUPPORTED_OPTIONS | ({"$expand"} if expand else set()))
        select = self.select(req)
        if "$filter" in req.query:
            predicate = FilterParser(req.query["$filter"], self).parse()
            rows = [r for r in rows if predicate(r[0])]
        order = self._order(req.query.get("$orderby"))
        rows.sort(key=lambda r: _SortKey(tuple(r[0][name] for name, _ in order), tuple(d for _, d in order)))
        total = len(rows)
        top = _int_option(req, "$top")
        skip = _int_option(req, "$skip") or 0
        token = _decode_skiptoken(req.query.get("$skiptoken"))
        returned_before = 0
        if token is not None:
            last = _SortKey(tuple(_revive(v) for v in token["k"]), tuple(d for _, d in order))
            rows = [r for r in rows if _SortKey(tuple(r[0][n] for n, _ in order), last.desc) > last]
            returned_before = token["n"]
        else:
            rows = rows[skip:]
        if top is not None:
            rows = rows[: max(0, top - returned_before)]
        page_size, applied = _page_size(req)
        page, more = rows[:page_size], len(rows) > page_size
        if select:
            context += f"({','.join(select)})"
        body: dict[str, Any] = {"@odata.context": context}
        if req.query.get("$count", "").lower() == "true":
            body["@odata.count"] = total
        body["value"] = [
            {**render(view, obj, select), **(expand(obj) if expand else {})} for view, obj in page
        ]
        headers = {"Preference-Applied": f"odata.maxpagesize={page_size}"} if applied else {}
        if more:
            last_view = page[-1][0]
            token_out = {"k": [_freeze(last_view[n]) for n, _ in order], "n": returned_before + len(page)}
            query = [(k, v) for k, v in req.query.items() if k not in ("$skiptoken", "$skip")]
            query.append(("$skiptoken", base64.urlsafe_b64encode(json.dumps(token_out).encode()).decode()))
            body["@odata.nextLink"] = f"{page_url}?{urlencode(query, safe='$,()')}"
        return Response(200, body, headers)

    def _order(self, text: str | None) -> list[tuple[str, bool]]:
        order: list[tuple[str, bool]] = []
        for part in (text or "").split(","):
            words = part.split()
            if not words:
                continue
            if len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
                raise BcError(400, "BadRequest", f"Syntax error in '$orderby={text}'.")
            if words[0] not in self.specs:
                raise BcError(
                    400,
                    "BadRequest",
                    f"Could not find a property named '{words[0]}' on type '{self.type_name}'.",
                )
            order.append((words[0], len(words) == 2 and words[1].lower() == "desc"))
        names = {n for n, _ in order}
        order.extend((k, False) for k in self.key if k not in names)
        if "id" in self.specs and "id" not in names | set(self.key):
            order.append(("id", False))  # a unique tie-breaker keeps key-based paging exact
        return order


class _SortKey:
    """Tuple ordering with a direction per component."""

    __slots__ = ("desc", "values")

    def __init__(self, values: tuple, desc: tuple[bool, ...]):
        self.values = values
        self.desc = desc

    def __lt__(self, other: _SortKey) -> bool:
        for a, b, d in zip(self.values, other.values, self.desc, strict=False):
            if a != b:
                return (a > b) if d else (a < b)
        return False

    def __gt__(self, other: _SortKey) -> bool:
        return other < self


def _freeze(value: Any) -> Any:
    return {"$dt": format_datetime(value)} if isinstance(value, datetime) else value


def _revive(value: Any) -> Any:
    return parse_datetime(value["$dt"]) if isinstance(value, dict) and "$dt" in value else value


def _decode_skiptoken(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        token = json.loads(base64.urlsafe_b64decode(text.encode()))
        if isinstance(token, dict) and isinstance(token.get("k"), list) and isinstance(token.get("n"), int):
            return token
    except ValueError:
        pass
    raise BcError(400, "BadRequest", f"The skip token '{text}' is not valid.")


def _int_option(req: Request, name: str) -> int | None:
    text = req.query.get(name)
    if text is None:
        return None
    if not text.isdigit():
        raise BcError(400, "BadRequest", f"Invalid value '{text}' for {name} query option found.")
    return int(text)


def _page_size(req: Request) -> tuple[int, bool]:
    """Prefer: odata.maxpagesize=N is honoured up to BC's 20,000 maximum
    (dev-itpro/webservices/server-driven-paging-in-odata-web-services.md)."""
    for pref in req.headers.get("Prefer", "").split(","):
        name, _, value = pref.strip().partition("=")
        if name.strip().lower() == "odata.maxpagesize" and value.strip().isdigit() and int(value) > 0:
            return (int(value), True) if int(value) <= MAX_PAGE_SIZE else (MAX_PAGE_SIZE, False)
    return MAX_PAGE_SIZE, False


class FilterParser:
    """A recursive-descent parser for the OData $filter subset BC contacts need.

    Grammar: or-expr := and-expr ('or' and-expr)*; and-expr := unary ('and' unary)*;
    unary := 'not' unary | '(' or-expr ')' | func '(' property ',' string ')' | operand op operand.
    Operators eq ne gt ge lt le; functions contains, startswith, endswith. String comparison is
    ordinal and case-sensitive, like the AL filters BC turns these into.
    """

    _TOKEN = re.compile(
        r"\s*(?:"
        r"(?P<string>'(?:[^']|'')*')"
        r"|(?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2}))"
        r"|(?P<guid>[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})"
        r"|(?P<date>\d{4}-\d{2}-\d{2})"
        r"|(?P<number>-?\d+(?:\.\d+)?)"
        r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
        r"|(?P<punct>[(),])"
        r")"
    )
    _OPS = {"eq", "ne", "gt", "ge", "lt", "le"}
    _OP_NAMES = {
        "eq": "Equal",
        "ne": "NotEqual",
        "gt": "GreaterThan",
        "ge": "GreaterThanOrEqual",
        "lt": "LessThan",
        "le": "LessThanOrEqual",
    }
    _FUNCS = {"contains", "startswith", "endswith"}

    def __init__(self, text: str, engine: QueryEngine):
        self.text = text
        self.engine = engine
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = self._TOKEN.match(text, pos)
            if not m or m.end() == pos:
                self._syntax(pos)
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind), m.start(kind)))
            pos = m.end()
        self.i = 0

    def parse(self) -> Callable[[dict[str, Any]], bool]:
        if not self.tokens:
            self._syntax(0)
        node = self._or()
        if self.i != len(self.tokens):
            self._syntax(self.tokens[self.i][2])
        return node

    # Grammar -------------------------------------------------------------------------------
    def _or(self) -> Callable[[dict[str, Any]], bool]:
        left = self._and()
        while self._peek_word("or"):
            self.i += 1
            right, prev = self._and(), left
            left = lambda r, a=prev, b=right: a(r) or b(r)  # noqa: E731
        return left

    def _and(self) -> Callable[[dict[str, Any]], bool]:
        left = self._unary()
        while self._peek_word("and"):
            self.i += 1
            right, prev = self._unary(), left
            left = lambda r, a=prev, b=right: a(r) and b(r)  # noqa: E731
        return left

    def _unary(self) -> Callable[[dict[str, Any]], bool]:
        if self._peek_word("not"):
            self.i += 1
            inner = self._unary()
            return lambda r: not inner(r)
        if self._peek_punct("("):
            self.i += 1
            inner = self._or()
            self._expect(")")
            return inner
        tok, after = self._peek(), self._peek(1)
        if tok and tok[0] == "name" and after and after[:2] == ("punct", "("):
            if tok[1] not in self._FUNCS:
                raise BcError(
                    400, "BadRequest", f"The sandbox does not support the function '{tok[1]}' in $filter."
                )
            return self._function()
        left = self._operand()
        op = self._peek()
        if not op or op[0] != "name" or op[1] not in self._OPS:
            self._syntax(op[2] if op else len(self.text))
        self.i += 1
        right = self._operand()
        return self._comparison(op[1], left, right)

    def _function(self) -> Callable[[dict[str, Any]], bool]:
        name = self.tokens[self.i][1]
        self.i += 2
        prop = self._operand()
        self._expect(",")
        lit = self._operand()
        self._expect(")")
        if (
            prop[0] != "prop"
            or lit[0] != "lit"
            or _EDM.get(prop[1].kind) != "Edm.String"
            or lit[1] != "Edm.String"
        ):
            raise BcError(
                400, "BadRequest", f"No function signature for the function with name '{name}' matches."
            )
        field_name, needle = prop[1].name, lit[2]
        test = {
            "contains": lambda s: needle in s,
            "startswith": lambda s: s.startswith(needle),
            "endswith": lambda s: s.endswith(needle),
        }[name]
        return lambda r: test(r[field_name])

    def _operand(self) -> tuple:
        tok = self._peek()
        if tok is None:
            self._syntax(len(self.text))
        kind, value, pos = tok
        self.i += 1
        if kind == "string":
            return ("lit", "Edm.String", value[1:-1].replace("''", "'"))
        if kind == "datetime":
            try:
                return ("lit", "Edm.DateTimeOffset", parse_datetime(value))
            except ValueError:
                self._syntax(pos)
        if kind == "guid":
            return ("lit", "Edm.Guid", value.lower())
        if kind == "date":
            return ("lit", "Edm.Date", value)
        if kind == "number":
            return (
                "lit",
                "Edm.Decimal" if "." in value else "Edm.Int32",
                float(value) if "." in value else int(value),
            )
        if kind == "name":
            if value in ("true", "false"):
                return ("lit", "Edm.Boolean", value == "true")
            if value == "null":
                return ("lit", "null", None)
            spec = self.engine.specs.get(value)
            if spec is None:
                raise BcError(
                    400,
                    "BadRequest",
                    f"Could not find a property named '{value}' on type '{self.engine.type_name}'.",
                )
            return ("prop", spec)
        self._syntax(pos)
        raise AssertionError  # unreachable

    def _comparison(self, op: str, left: tuple, right: tuple) -> Callable[[dict[str, Any]], bool]:
        if left[0] == "lit" and right[0] == "prop":
            left, right = right, left
            op = {"gt": "lt", "lt": "gt", "ge": "le", "le": "ge"}.get(op, op)
        if left[0] != "prop" or right[0] != "lit":
            raise BcError(
                400, "BadRequest", "The sandbox supports comparisons of a property with a literal only."
            )
        spec: FieldSpec = left[1]
        lit_type, value = right[1], right[2]
        prop_type = _EDM.get(spec.kind) or f"Microsoft.NAV.{spec.name}Type"
        if lit_type == "null":
            return lambda r: op == "ne"  # BC properties are never null
        if spec.kind == "enum":
            if lit_type != "Edm.String":
                self._incompatible(prop_type, lit_type, op)
            if value not in spec.options:
                raise BcError(
                    400, "BadRequest", f"The string '{value}' is not a valid enumeration type constant."
                )
        elif spec.kind == "int":
            if lit_type not in ("Edm.Int32", "Edm.Decimal"):
                self._incompatible(prop_type, lit_type, op)
        elif prop_type != lit_type:
            self._incompatible(prop_type, lit_type, op)
        name = spec.name
        compare = {
            "eq": lambda a, b: a == b,
            "ne": lambda a, b: a != b,
            "gt": lambda a, b: a > b,
            "ge": lambda a, b: a >= b,
            "lt": lambda a, b: a < b,
            "le": lambda a, b: a <= b,
        }[op]
        if spec.kind == "guid":
            return lambda r: compare(r[name].lower(), value)
        return lambda r: compare(r[name], value)

    # Token helpers -------------------------------------------------------------------------
    def _peek(self, ahead: int = 0) -> tuple[str, str, int] | None:
        j = self.i + ahead
        return self.tokens[j] if j < len(self.tokens) else None

    def _peek_word(self, word: str) -> bool:
        tok = self._peek()
        return bool(tok and tok[0] == "name" and tok[1] == word)

    def _peek_punct(self, char: str) -> bool:
        tok = self._peek()
        return bool(tok and tok[0] == "punct" and tok[1] == char)

    def _expect(self, char: str) -> None:
        if not self._peek_punct(char):
            tok = self._peek()
            self._syntax(tok[2] if tok else len(self.text))
        self.i += 1

    def _syntax(self, pos: int) -> None:
        raise BcError(400, "BadRequest", f"Syntax error at position {pos} in '{self.text}'.")

    def _incompatible(self, left: str, right: str, op: str) -> None:
        raise BcError(
            400,
            "BadRequest",
            "A binary operator with incompatible types was detected. Found operand types "
            f"'{left}' and '{right}' for operator kind '{self._OP_NAMES[op]}'.",
        )


# Value helpers ---------------------------------------------------------------------------------
def _dialog(message: str) -> BcError:
    return BcError(400, "Application_DialogException", message)


def _json_body(req: Request) -> Any:
    try:
        return req.json() if req.body else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise BcError(400, "BadRequest", "Invalid Request Body") from exc


def _check_json_type(spec: FieldSpec, value: Any) -> None:
    """What the OData reader refuses before any AL runs."""
    edm = {"bool": "Edm.Boolean", "enum": f"Microsoft.NAV.{spec.name}"}.get(spec.kind, "Edm.String")
    if value is None:
        raise BcError(
            400,
            "BadRequest",
            f"A null value was found for the property named '{spec.name}', which has the expected type "
            f"'{edm}[Nullable=False]'. The expected type '{edm}[Nullable=False]' does not allow null values.",
        )
    if spec.kind == "bool" and not isinstance(value, bool):
        raise BcError(400, "BadRequest", f"Cannot convert a primitive value to the expected type '{edm}'.")
    if spec.kind in ("text", "code", "guid", "date", "datetime") and not isinstance(value, str):
        raise BcError(400, "BadRequest", f"Cannot convert a primitive value to the expected type '{edm}'.")
    if spec.kind == "enum":
        if not isinstance(value, str):
            raise BcError(
                400, "BadRequest", f"Cannot convert a primitive value to the expected type '{edm}'."
            )
        if value not in spec.options:
            # The shape of BC's answer for an unknown option (use-odata-batch.md example).
            raise BcError(
                400,
                "Unknown",
                f"'{value}' is not an option. The existing options are: {','.join(spec.options)}",
            )


def _normalise(spec: FieldSpec, value: Any) -> Any:
    # A Code value is stored upper-cased without leading or trailing spaces.
    if spec.kind == "code" and isinstance(value, str):
        return value.strip().upper()
    if spec.kind == "guid" and isinstance(value, str):
        return value.lower()
    return value


def _check_length(spec: FieldSpec, value: Any) -> None:
    if spec.length is not None and isinstance(value, str) and len(value) > spec.length:
        raise BcError(
            400,
            "Application_StringExceededLength",
            f"The length of the string is {len(value)}, but it must be less than or equal to {spec.length} "
            f"characters. Value: {value}",
        )


def _check_email_addresses(value: str) -> None:
    """Mail Management.CheckValidEmailAddresses: ';'-separated addresses, each a bare address with
    exactly one '@' (the .NET MailAddress check of Email Account, without display names)."""
    for address in value.strip(";").split(";"):
        address = address.strip()
        local, at, domain = address.partition("@")
        bad = (
            not at
            or not local
            or not domain
            or "@" in domain
            or any(ch.isspace() or ch in '<>()[],:"\\' for ch in address)
            or domain.startswith(".")
            or domain.endswith(".")
            or ".." in address
            or local.startswith(".")
            or local.endswith(".")
        )
        if bad:
            raise _dialog(f'The email address "{address}" is not valid.')


def _check_control_fields(fields: dict[str, Any]) -> None:
    unknown = [k for k in fields if k not in _CONTACT_SPEC or k in ("id", "lastModifiedDateTime")]
    if unknown:
        raise TypeError(f"unknown contact field(s): {', '.join(unknown)}")


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return parse_datetime(str(value))


def _render_view(view: dict[str, Any], row: Any, select: list[str] | None) -> dict[str, Any]:
    """A plain entity (countriesRegions) as JSON: datetimes as BC writes them, `$select` applied."""
    return {
        k: (format_datetime(v) if isinstance(v, datetime) else v)
        for k, v in view.items()
        if select is None or k in select
    }


# Localized application messages -----------------------------------------------------------------
# BC's AL messages (Error, FieldError, TestField, table-relation checks, dialogs) come in the
# session's language, while the error *code* stays the same. The Norwegian (nb-NO) texts follow the
# Norwegian base-application translation's wording. Only messages raised by contact rules are
# translated; OData-level messages (query syntax, unknown property) stay English, as in BC.
_MESSAGES_NB: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.S), template)
    for pattern, template in (
        (r"You must select an existing contact\.", "Du må velge en eksisterende kontakt."),
        (
            r"The field Country/Region Code of table Contact contains a value \((.*)\) that cannot be found "
            r"in the related table \(Country/Region\)\.",
            r"Feltet Lands-/områdekode i tabellen Kontakt inneholder en verdi (\1) som ikke finnes i den "
            r"relaterte tabellen (Land/område).",
        ),
        (
            r"The field Company No\. of table Contact contains a value \((.*)\) that cannot be found in the "
            r"related table \(Contact\)\.",
            r"Feltet Firmanr. i tabellen Kontakt inneholder en verdi (\1) som ikke finnes i den relaterte "
            r"tabellen (Kontakt).",
        ),
        (
            r"(.*) must not contain letters in Contact No\.='(.*)'\.",
            r"\1 kan ikke inneholde bokstaver i Kontakt Nr.='\2'.",
        ),
        (r'The email address "(.*)" is not valid\.', r'E-postadressen "\1" er ikke gyldig.'),
        (
            r"The length of the string is (\d+), but it must be less than or equal to (\d+) characters\. "
            r"Value: (.*)",
            r"Lengden på strengen er \1, men den må være mindre enn eller lik \2 tegn. Verdi: \3",
        ),
        (r'The blank "displayName" is not allowed\.', 'Tom "displayName" er ikke tillatt.'),
        (r'A "displayName" must be provided\.', 'Du må angi "displayName".'),
        (
            r"Type must be equal to 'Person'  in Contact: No\.=(.*)\. Current value is '(.*)'\.",
            r"Type må være lik Person i Kontakt: Nr.=\1. Gjeldende verdi er \2.",
        ),
        (
            r"You cannot change Type because one or more persons are assigned to this company\.",
            "Du kan ikke endre Type fordi én eller flere personer er tilordnet dette firmaet.",
        ),
        (r"Another user has already changed the record\.", "En annen bruker har allerede endret posten."),
        (
            r"The Contact already exists\. Identification fields and values: (.*)",
            r"Kontakt finnes allerede. Identifikasjonsfelter og -verdier: \1",
        ),
    )
)


class _localized:
    """Re-raise a contact rule's BcError with its message in the company's language."""

    def __init__(self, company: Company):
        self.language = company.language

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, BcError) and self.language == "nb-NO":
            exc.message = localize(exc.message, self.language)
        return False


def localize(message: str, language: str) -> str:
    """BC's message in `language`; English when no translation is known."""
    if language != "nb-NO":
        return message
    for pattern, template in _MESSAGES_NB:
        if pattern.fullmatch(message):
            return pattern.sub(template, message)
    return message
