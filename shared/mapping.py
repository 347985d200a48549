"""Field mapping between a BC API v2.0 contact and a Microsoft Graph v1.0 contact (BEHAVIOUR §4.6).

This is the one module that knows both JSON shapes. Besides the two write bodies it defines a
*view*: the mapped fields of either side in one common shape (BC field names, normalized text), so
that the sync can hash "what we last agreed on" and tell a real change from noise.

Facts the mapping relies on, with where they come from:

- BC stores one email and one phone; Graph has at most 3 `emailAddresses` and 2 `businessPhones`
  (observed server limits, not documented:
  https://github.com/microsoftgraph/microsoft-graph-docs-contrib/issues/560; docs/API_NOTES.md §1).
  BC's value always takes the first slot and the user's other Outlook values are kept behind it (see
  `bc_to_outlook` for a blank BC value).
- Graph regenerates `displayName` when other name properties change unless it is sent too
  (api-reference/v1.0/resources/contact.md), so every body carries it.
- A PATCH of a structured address must send the whole `physicalAddress` (api/contact-update.md),
  so `businessAddress` is always complete. Every contact property but `id` is nullable in the v1.0
  CSDL (https://github.com/microsoftgraph/msgraph-metadata, `clean_v10_metadata/cleanMetadata.xml`;
  docs/API_NOTES.md §2), so a blank BC value is sent as null to clear the Outlook string (not
  verified against a live tenant); list properties are cleared with [].
- BC field lengths come from table 5050 Contact (StefanMaron/MSDyn365BC.Code.History,
  `BaseApp/Source/Base Application/CRM/Contact/Contact.Table.al`): Name Text[100], E-Mail Text[80],
  Phone No./Mobile Phone No. Text[30], Address Text[100], Address 2 Text[50], City Text[30],
  County Text[30], Post Code Code[20], Country/Region Code Code[10], Company Name Text[100],
  Job Title Text[30], Home Page Text[80]. (Home Page grows to Text[255] in builds compiled with
  CLEAN24; 80 is what every BC version accepts.) The limits count UTF-16 code units, as SQL
  nvarchar does.
- Post Code and Country/Region Code are AL `Code` fields: BC upper-cases and trims them on write,
  so the view does the same and a case-only difference is not a change.
- BC rejects a phone number containing a letter: `Phone No.` and `Mobile Phone No.` OnValidate test
  every character with .NET `Char.IsLetter` (same Contact.Table.al).
- BC validates `E-Mail` with Mail Management `CheckValidEmailAddresses` -> `CheckValidEmailAddress`:
  spaces trimmed, split at ';', exactly one '@', and .NET `MailAddress` must parse the text to the
  same address (System Application "Email Account Impl." `ValidateEmailAddress`). See
  `bc_email_problem` for the rules replicated here.
- BC's API page itself requires a non-blank `displayName` (APIV2 - Contacts, microsoft/BCApps
  `Apps/W1/APIV2/app/src/pages/APIV2Contacts.Page.al`).
"""

from __future__ import annotations

import hashlib
import json
import threading
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# The named property that tags an Outlook contact with the BC contact id (BEHAVIOUR §4.1). The GUID is
# this application's property-set namespace, generated once for this project; it must never change,
# or contacts tagged by earlier runs can no longer be found. Format per Graph
# resources/extended-properties-overview.md: "String {GUID} Name <name>" (the name is case-sensitive).
BC_ID_PROPERTY_GUID = "d956e057-69a3-4bd5-9d9d-1d8011688f31"
BC_ID_PROPERTY_ID = f"String {{{BC_ID_PROPERTY_GUID}}} Name BcContactId"

BC_LIMITS: dict[str, int] = {
    "displayName": 100,
    "email": 80,
    "phoneNumber": 30,
    "mobilePhoneNumber": 30,
    "addressLine1": 100,
    "addressLine2": 50,
    "city": 30,
    "postalCode": 20,
    "country": 10,
    "companyName": 100,
    "jobTitle": 30,
    "state": 30,
    "website": 80,
}

MAX_EMAIL_ADDRESSES = 3
MAX_BUSINESS_PHONES = 2

# The BC fields the mapping carries, in the order of BEHAVIOUR §4.6; also the keys of a view.
MAPPED_FIELDS = (
    "displayName",
    "email",
    "companyName",
    "jobTitle",
    "phoneNumber",
    "mobilePhoneNumber",
    "addressLine1",
    "addressLine2",
    "city",
    "state",
    "postalCode",
    "country",
    "website",
)

_CODE_FIELDS = frozenset({"postalCode", "country"})
_PHONE_FIELDS = ("phoneNumber", "mobilePhoneNumber")

# Where each BC field comes from in a Graph contact, for reasons a user can act on.
_OUTLOOK_SOURCE = {
    "displayName": "displayName or givenName/surname",
    "email": "emailAddresses[0]",
    "companyName": "companyName",
    "jobTitle": "jobTitle",
    "phoneNumber": "businessPhones[0]",
    "mobilePhoneNumber": "mobilePhone",
    "addressLine1": "businessAddress.street, first line",
    "addressLine2": "businessAddress.street, further lines",
    "city": "businessAddress.city",
    "state": "businessAddress.state",
    "postalCode": "businessAddress.postalCode",
    "country": "businessAddress.countryOrRegion",
    "website": "businessHomePage",
}


class CountryTable:
    """A BC company's Country/Region table (`countriesRegions`): code ↔ name.

    BC's `country` is a code that must exist in this table (BC refuses anything else), while
    Outlook's `countryOrRegion` is free text a person types ("Norway"). So Outlook text maps to a
    code by code or by name, case-insensitively, and BC's code goes to Outlook as the table's name.

    The table is loaded on first use (`loader`), so a run that maps no country never reads it; it
    is then kept with the company's other reads of that run.
    """

    def __init__(
        self,
        rows: Iterable[Mapping[str, Any]] | None = None,
        *,
        loader: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
    ):
        self._loader = loader
        self._lock = threading.Lock()
        self._by_code: dict[str, str] | None = None
        self._by_name: dict[str, str] = {}
        if rows is not None:
            self._fill(rows)

    def _fill(self, rows: Iterable[Mapping[str, Any]]) -> None:
        by_code: dict[str, str] = {}
        by_name: dict[str, str] = {}
        for row in rows:
            code = _bc_code(_text(row.get("code")))
            if not code:
                continue
            name = _text(row.get("displayName"))
            by_code[code] = name or code
            if name:
                by_name.setdefault(name.casefold(), code)
        self._by_code, self._by_name = by_code, by_name

    def _table(self) -> dict[str, str]:
        with self._lock:
            if self._by_code is None:
                self._fill(self._loader() if self._loader else ())
            return self._by_code or {}

    @property
    def loaded(self) -> bool:
        return self._by_code is not None

    def code_for(self, text: str) -> str | None:
        """The code an Outlook country text stands for (a code or a name), or None if BC has none."""
        text = text.strip()
        if not text:
            return ""
        table = self._table()
        code = _bc_code(text)
        if code in table:
            return code
        return self._by_name.get(text.casefold())

    def name_for(self, code: str) -> str:
        """What Outlook shows for a BC country code: the table's name, or the code if it has none."""
        return self._table().get(code, code) if code else ""


@dataclass(frozen=True)
class BcContext:
    """What the mapping must know about the tenant's Business Central.

    `fields`: the mapped fields the tenant's contacts API has (from `$metadata`; older versions
    lack e.g. jobTitle). A field BC lacks is neither read, compared nor written on either side, so
    Outlook keeps its own value. `countries`: the company's Country/Region table, or None to pass
    country codes through unchanged. `companies`: casefolded name → name of every Company contact
    in BC, or None when unknown (then companyName is sent as it is).
    """

    fields: frozenset[str] = field(default_factory=lambda: frozenset(MAPPED_FIELDS))
    countries: CountryTable | None = None
    companies: Mapping[str, str] | None = None
    # The BC company the tag names (BEHAVIOUR §5.4), or None for a bare BC id: the user's home company.
    tag_company: str | None = None

    def has(self, name: str) -> bool:
        return name in self.fields


DEFAULT_CONTEXT = BcContext()


class MappingError(ValueError):
    """An Outlook contact that cannot be stored in BC as it is; `reason` names the field(s)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --- small normalizers ----------------------------------------------------------------------------


def _text(value: Any) -> str:
    """A JSON scalar as stripped text; null, missing and non-scalars are blank."""
    if value is None or isinstance(value, dict | list):
        return ""
    return (value if isinstance(value, str) else str(value)).strip()


def _bc_code(value: str) -> str:
    """What BC stores in a Code field: trimmed and upper-cased character by character.

    .NET upper-casing maps one character to one character (it keeps 'ß'), unlike Python's
    str.upper(), which would turn 'ß' into 'SS' and change the length.
    """
    return "".join(u if len(u := c.upper()) == 1 else c for c in value.strip())


def _field(name: str, value: str) -> str:
    return _bc_code(value) if name in _CODE_FIELDS else value


def bc_length(value: str) -> int:
    """Length as BC (SQL nvarchar, .NET strings) counts it: UTF-16 code units."""
    return len(value.encode("utf-16-le")) // 2


def normalize_email(value: Any) -> str:
    """The matching key of an email address: trimmed and case-folded (BEHAVIOUR §4.3)."""
    return _text(value).casefold()


def split_name(display_name: str) -> tuple[str, str]:
    """(givenName, surname) from a display name: the last word is the surname (BEHAVIOUR §4.6).

    A single word is a given name only. Inner spacing of the given name is kept as written.
    """
    words = display_name.strip().rsplit(None, 1)
    if len(words) < 2:
        return (words[0] if words else ""), ""
    return words[0].strip(), words[1]


def join_street(line1: str, line2: str) -> str:
    """BC's two address lines as one Outlook street (CRLF between, as BC's own Exchange sync did)."""
    return f"{line1}\r\n{line2}" if line2 else line1


def split_street(street: str) -> tuple[str, str]:
    """An Outlook street as BC's (addressLine1, addressLine2).

    Split at the first line break with CRs dropped (OWA writes bare LFs); further non-blank lines
    are folded into line 2 with ", " so nothing the user typed is lost.
    """
    lines = street.replace("\r", "").split("\n")
    rest = [line.strip() for line in lines[1:] if line.strip()]
    return lines[0].strip(), ", ".join(rest)


# --- reading each side ----------------------------------------------------------------------------


def _first_address(contact: Mapping[str, Any]) -> str:
    for entry in _list(contact.get("emailAddresses")):
        if isinstance(entry, Mapping) and (address := _text(entry.get("address"))):
            return address
    primary = contact.get("primaryEmailAddress")
    return _text(primary.get("address")) if isinstance(primary, Mapping) else ""


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def outlook_name(contact: Mapping[str, Any]) -> str:
    """The contact's name: displayName, else given, middle and surname joined as BC's
    CalculatedName joins First, Middle Name and Surname."""
    name = _text(contact.get("displayName"))
    if name:
        return name
    parts = (_text(contact.get(k)) for k in ("givenName", "middleName", "surname"))
    return " ".join(p for p in parts if p)


def _outlook_country(contact: Mapping[str, Any]) -> str:
    address = contact.get("businessAddress")
    return _text(address.get("countryOrRegion")) if isinstance(address, Mapping) else ""


def outlook_email(contact: Mapping[str, Any]) -> str:
    """The address that maps to BC's email: the first non-blank of `emailAddresses`, trimmed.

    Falls back to `primaryEmailAddress` (v1.0 since 2026) for a response that only carries that.
    """
    return _first_address(contact)


def bc_view(bc: Mapping[str, Any], ctx: BcContext = DEFAULT_CONTEXT) -> dict[str, str]:
    """The mapped fields of a BC contact, normalized (stripped text, "" for null, Code fields as BC
    stores them).

    The address lines are passed through the street round trip, so a line break inside a BC address
    line (possible through the API) reads the same on both sides instead of looking like a change
    on every run.
    """
    view = {name: _field(name, _text(bc.get(name))) for name in MAPPED_FIELDS}
    view["addressLine1"], view["addressLine2"] = split_street(
        join_street(view["addressLine1"], view["addressLine2"])
    )
    return {name: value for name, value in view.items() if ctx.has(name)}


def outlook_view(contact: Mapping[str, Any], ctx: BcContext = DEFAULT_CONTEXT) -> dict[str, str]:
    """The mapped fields of an Outlook contact in the shape of `bc_view`.

    With a country table, the country is the BC code the Outlook text stands for (so "Norway" and
    BC's "NO" read the same); text BC's table does not know reads as blank, like BC's empty country
    for it: BC cannot hold it, so it stays in Outlook only (see `bc_to_outlook`) and is no change.
    """
    address = contact.get("businessAddress")
    address = address if isinstance(address, Mapping) else {}
    phones = [p for p in (_text(x) for x in _list(contact.get("businessPhones"))) if p]
    street = address.get("street")
    # Not _text(): stripping would swallow the line break in front of a lone second line.
    line1, line2 = split_street(street if isinstance(street, str) else "")
    view = {
        "displayName": outlook_name(contact),
        "email": outlook_email(contact),
        "companyName": _text(contact.get("companyName")),
        "jobTitle": _text(contact.get("jobTitle")),
        "phoneNumber": phones[0] if phones else "",
        "mobilePhoneNumber": _text(contact.get("mobilePhone")),
        "addressLine1": line1,
        "addressLine2": line2,
        "city": _text(address.get("city")),
        "state": _text(address.get("state")),
        "postalCode": _text(address.get("postalCode")),
        "country": _text(address.get("countryOrRegion")),
        "website": _text(contact.get("businessHomePage")),
    }
    if ctx.countries is not None and ctx.has("country") and view["country"]:
        view["country"] = ctx.countries.code_for(view["country"]) or ""
    return {name: _field(name, view[name]) for name in MAPPED_FIELDS if ctx.has(name)}


def fingerprint(view: Mapping[str, Any]) -> str:
    """A stable content hash of a view: sha256 of canonical JSON, first 32 hex digits."""
    canonical = json.dumps(view, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


# --- eligibility (BEHAVIOUR §4.2) ----------------------------------------------------------------------


def bc_is_eligible(bc: Mapping[str, Any]) -> str | None:
    """None when the BC contact may go to Outlook, else the reason it is skipped.

    The user's filter is applied separately (shared.filters).
    """
    kind = _text(bc.get("type"))
    if kind != "Person":
        return f"type is {kind or 'blank'}, only Person contacts are synchronized"
    if bc.get("privacyBlocked") is True:
        return "privacy blocked"
    if not _text(bc.get("displayName")):
        return "no name (displayName is blank)"
    email = _text(bc.get("email"))
    if not email:
        return "no email address"
    if ";" in email:
        # BC accepts "a@x.com;b@y.com" in one field; an Outlook address slot holds one address.
        return "email holds several addresses separated by ';'; Outlook needs a single address"
    return None


def outlook_is_eligible(contact: Mapping[str, Any]) -> str | None:
    """None when the Outlook contact may come into BC (name and email present), else the reason."""
    if not outlook_name(contact):
        return "no name (displayName, givenName and surname are blank)"
    if not outlook_email(contact):
        return "no email address"
    return None


# --- BC -> Outlook --------------------------------------------------------------------------------


def bc_to_outlook(
    bc: Mapping[str, Any], existing: Mapping[str, Any] | None = None, ctx: BcContext = DEFAULT_CONTEXT
) -> dict[str, Any]:
    """The Graph POST/PATCH body for a BC contact.

    A field the tenant's BC lacks (`ctx.fields`) keeps the Outlook contact's own value; the country
    goes to Outlook as its name from BC's Country/Region table.

    `existing` is the Outlook contact being updated (None when creating); only its extra email
    addresses (2nd and 3rd) and its second business phone are read, to keep them behind BC's value.
    The first slot of each list belongs to BC. Graph lists cannot hold an empty first slot, so when
    BC's value is blank the list is cleared: keeping the extras would move one of them into BC's
    slot, where the next run would take it for BC's value (and a full sync would rewrite it).
    """
    existing = existing or {}
    view = _view_for_outlook(bc, existing, ctx)
    name = view["displayName"]
    given, surname = split_name(name)
    emails = _email_addresses(view["email"], name, existing)
    phones = _business_phones(view["phoneNumber"], existing)
    body: dict[str, Any] = {
        "displayName": name or None,
        # The name parts are derived from BC's single name, so a middle name left from an adopted
        # contact would show up twice in Outlook's full name: clear it.
        "givenName": given or None,
        "middleName": None,
        "surname": surname or None,
        "emailAddresses": emails[:MAX_EMAIL_ADDRESSES],
        "businessPhones": phones[:MAX_BUSINESS_PHONES],
        "mobilePhone": view["mobilePhoneNumber"] or None,
        "companyName": view["companyName"] or None,
        "jobTitle": view["jobTitle"] or None,
        "businessAddress": {
            "street": join_street(view["addressLine1"], view["addressLine2"]) or None,
            "city": view["city"] or None,
            "state": view["state"] or None,
            "postalCode": view["postalCode"] or None,
            "countryOrRegion": view["country"] or None,
        },
        "businessHomePage": view["website"] or None,
    }
    bc_id = _text(bc.get("id"))
    if bc_id:
        body["singleValueExtendedProperties"] = [
            {"id": BC_ID_PROPERTY_ID, "value": tag_value(bc_id, ctx.tag_company)}
        ]
    return body


TAG_SEPARATOR = "/"  # never in a GUID: "{companyId}/{bcId}"


def tag_value(bc_id: str, company_id: str | None) -> str:
    """The BcContactId tag of a contact: its BC id, qualified by its company unless that is the user's
    home company (the one company of the settings before `companies`, whose tags stay as they were).

    BC ids are GUIDs but are only unique within a company (a copied company keeps them), so a contact
    of a second company names its company: it stays routable to it when the links are lost."""
    return f"{company_id}{TAG_SEPARATOR}{bc_id}" if company_id else bc_id


def parse_tag(value: str | None) -> tuple[str | None, str | None]:
    """(company id or None for the home company, BC id) of a tag; (None, None) for no tag."""
    if not value:
        return None, None
    company, sep, bc_id = value.partition(TAG_SEPARATOR)
    if not sep:
        return None, value
    return company.lower(), bc_id


def _view_for_outlook(bc: Mapping[str, Any], existing: Mapping[str, Any], ctx: BcContext) -> dict[str, str]:
    """BC's values over the Outlook contact's (or blanks), the country as Outlook shows it: BC's
    Country/Region name, or the Outlook text BC cannot hold, or Outlook's own when BC lacks the field."""
    view = {**outlook_view(existing), **bc_view(bc, ctx)} if existing else {**_BLANK_VIEW, **bc_view(bc, ctx)}
    if ctx.countries is not None and ctx.has("country"):
        typed = _outlook_country(existing)
        if not view["country"] and typed and not ctx.countries.code_for(typed):
            view["country"] = typed  # Outlook-only text BC cannot hold: keep it
        else:
            view["country"] = ctx.countries.name_for(view["country"])
    elif not ctx.has("country") and existing:
        view["country"] = _outlook_country(existing)
    return view


def _email_addresses(email: str, name: str, existing: Mapping[str, Any]) -> list[dict[str, Any]]:
    """BC's address first, then the Outlook contact's other addresses; none when BC's is blank."""
    emails: list[dict[str, Any]] = []
    if not email:
        return emails
    emails.append({"address": email, "name": name})
    for entry in _list(existing.get("emailAddresses"))[1:]:
        if not isinstance(entry, Mapping) or not _text(entry.get("address")):
            continue
        if normalize_email(entry.get("address")) == normalize_email(email):
            continue  # BC's address is already first
        kept = {"address": entry.get("address")}
        if isinstance(entry.get("name"), str):
            kept["name"] = entry["name"]
        emails.append(kept)
    return emails


def _business_phones(phone: str, existing: Mapping[str, Any]) -> list[str]:
    """BC's phone first, then the Outlook contact's other business phones; none when BC's is blank."""
    phones: list[str] = []
    if not phone:
        return phones
    phones.append(phone)
    for other in _list(existing.get("businessPhones"))[1:]:
        if isinstance(other, str) and other.strip() and other.strip() != phone:
            phones.append(other)
    return phones


_BLANK_VIEW = dict.fromkeys(MAPPED_FIELDS, "")

# --- Outlook -> BC --------------------------------------------------------------------------------

# RFC 5322 atext: what .NET MailAddress accepts unquoted in a dot-atom (plus non-ASCII, below).
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")


def _atext(ch: str) -> bool:
    if ch.isascii():
        return ch in _ATEXT
    return not unicodedata.category(ch).startswith(("Z", "C"))  # no spaces, controls, format chars


def bc_email_problem(address: str) -> str | None:
    """Why BC would refuse this (trimmed) address as a contact's email, or None if it accepts it.

    Replicates Mail Management `CheckValidEmailAddress` for one address: exactly one '@' and a
    text .NET `MailAddress` parses back to itself, i.e. dot-atom local part and domain of RFC 5322
    atext or non-ASCII characters. Like .NET, consecutive and trailing dots are accepted in the
    local part ("user...name..@host", MailAddress class remarks) but not a leading dot. Stricter
    than BC on purpose: several addresses joined by ';' (BC splits them, but one Outlook address is
    one address), quoted local parts and [domain literals] are refused.
    """
    if not address:
        return "is blank"
    if any(ch.isspace() for ch in address):
        return "contains a space"
    if ";" in address:
        return "holds several addresses separated by ';'"
    ats = address.count("@")
    if ats != 1:
        return f"must contain exactly one '@' (it has {ats})"
    local, domain = address.split("@")
    if not local:
        return "has nothing before the '@'"
    if not domain:
        return "has nothing after the '@'"
    for part, text in (("before", local), ("after", domain)):
        bad = next((ch for ch in text if ch != "." and not _atext(ch)), None)
        if bad is not None:
            return f"contains {bad!r}, which is not allowed {part} the '@'"
    if local.startswith("."):
        return "starts with '.'"
    if domain.startswith(".") or domain.endswith(".") or ".." in domain:
        return "has an empty part in the domain after the '@' (a leading, trailing or double '.')"
    return None


def phone_has_letter(value: str) -> bool:
    """BC's phone rule: no character for which .NET `Char.IsLetter` is true.

    .NET tests UTF-16 code units, so a letter outside the Basic Multilingual Plane (stored as a
    surrogate pair) is not caught by BC either; Python's isalpha covers the same Unicode categories
    (Lu, Ll, Lt, Lm, Lo).
    """
    return any(ch.isalpha() and ord(ch) <= 0xFFFF for ch in value)


def outlook_to_bc(
    contact: Mapping[str, Any],
    *,
    current: Mapping[str, Any] | None = None,
    ctx: BcContext = DEFAULT_CONTEXT,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """The BC API body that stores an Outlook contact, or MappingError naming every field BC would
    refuse. Nothing is truncated: a value that does not fit skips the contact with a reason.

    Creating (no `current`): `type: "Person"` and the non-blank fields. Updating, `current` is the
    linked BC contact: the PATCH body holds only the fields whose value differs from BC's (a value
    the user cleared in Outlook is sent as "" to clear it in BC too), and only those are checked.
    BC validates every property a PATCH names, changed or not, so an unchanged value BC no longer
    accepts (a phone number imported with letters, a company name whose company contact was renamed
    since) must not be sent, or it would block every later update of the contact.

    Decided from data, before BC sees it (never from BC's error text, which is localized): a country
    BC's Country/Region table does not know and a company name that is no Company contact in BC are
    left out, and `notes` says so; the contact is still stored. Fields the tenant lacks are not sent.
    """
    view = outlook_view(contact, DEFAULT_CONTEXT)
    unknown = _values_bc_cannot_hold(view, contact, current, ctx)
    fields = [name for name in MAPPED_FIELDS if ctx.has(name)]
    if current is not None:
        now = bc_view(current, ctx)
        fields = [name for name in fields if view[name] != now.get(name)]
    for name, typed in unknown.items():
        if name in fields:
            fields.remove(name)
            if notes is not None:
                notes.append(
                    f"country '{typed}' is not in Business Central's Country/Region table; left empty"
                    if name == "country"
                    else f"company '{typed}' is not a company contact in Business Central; left empty"
                )
    problems = _bc_problems(view, fields, creating=current is None)
    if problems:
        raise MappingError("; ".join(problems))

    if current is not None:
        return {name: view[name] for name in fields}
    body: dict[str, Any] = {"type": "Person"}
    for name in fields:
        if view[name]:
            body[name] = view[name]
    return body


def _values_bc_cannot_hold(
    view: dict[str, str], contact: Mapping[str, Any], current: Mapping[str, Any] | None, ctx: BcContext
) -> dict[str, str]:
    """Field -> what the user typed, for a country and a company name BC does not know; `view` gets
    BC's country code and BC's spelling of a known company name."""
    unknown: dict[str, str] = {}
    if ctx.countries is not None and ctx.has("country") and view["country"]:
        typed = _outlook_country(contact)
        view["country"] = ctx.countries.code_for(typed) or ""
        if not view["country"]:
            unknown["country"] = typed
    if ctx.companies is not None and ctx.has("companyName") and view["companyName"]:
        known = ctx.companies.get(view["companyName"].casefold())
        if known is not None:
            view["companyName"] = known
        elif current is None or view["companyName"] != bc_view(current, ctx).get("companyName"):
            unknown["companyName"] = view["companyName"]
    return unknown


def _bc_problems(view: dict[str, str], fields: list[str], *, creating: bool) -> list[str]:
    """Every reason BC would refuse the `fields` to be sent (all of them when creating)."""
    problems: list[str] = []
    if not view["displayName"] and (creating or "displayName" in fields):
        problems.append("no name (displayName, givenName and surname are blank)")
    if creating or "email" in fields:
        if not view["email"]:
            problems.append("no email address")
        elif (why := bc_email_problem(view["email"])) is not None:
            problems.append(
                f"email (Outlook {_OUTLOOK_SOURCE['email']}) {why}; Business Central would reject it"
            )
    for name in _PHONE_FIELDS:
        if (creating or name in fields) and phone_has_letter(view[name]):
            problems.append(
                f"{name} (Outlook {_OUTLOOK_SOURCE[name]}) contains letters, "
                "which Business Central does not allow in a phone number"
            )
    for name in fields:
        length, limit = bc_length(view[name]), BC_LIMITS[name]
        if length > limit:
            problems.append(
                f"{name} (Outlook {_OUTLOOK_SOURCE[name]}) is {length} characters long; "
                f"Business Central allows at most {limit}"
            )
    return problems


_ALWAYS_SENT = ("displayName", "singleValueExtendedProperties")


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {} or value == ""


def graph_patch(body: dict[str, Any], existing: Mapping[str, Any] | None) -> dict[str, Any]:
    """A Graph PATCH body (from `bc_to_outlook`) without the properties whose value the Outlook
    contact already has, as for BC: only what changes is sent.

    Kept always: `displayName` (Graph regenerates it from the name parts otherwise,
    resources/contact.md) and the BC id tag (the contact the planner holds has it stripped). A
    structured address is compared and sent whole (api/contact-update.md). Null, "" and [] are the
    same emptiness; a property the existing contact does not show is treated as changed.
    """
    if existing is None:
        return body
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key in _ALWAYS_SENT or key not in existing:
            out[key] = value
            continue
        old = existing.get(key)
        if isinstance(value, dict) and isinstance(old, Mapping):
            same = all(
                (_empty(v) and _empty(old.get(k))) or v == old.get(k) for k, v in value.items()
            ) and all(k in value or _empty(v) for k, v in old.items())
        else:
            same = (_empty(value) and _empty(old)) or value == old
        if not same:
            out[key] = value
    return out
