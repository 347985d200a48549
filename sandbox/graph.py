"""Simulated Microsoft Graph v1.0 for Outlook personal contacts (plus `/users/{id}` and `$batch`).

The product is only as good as the fakes it is tested against, so this service copies the parts of
Graph and Exchange Online a contact sync trips over: immutable vs. REST ids, change keys, the
undocumented multi-value limits, extended properties that are written inline but only readable via
`$expand`, folder delta with its token cache, 410/`syncStateNotFound` resets, JSON batching with
`dependsOn` and per-item throttling, and the per app + mailbox limits (4 concurrent requests,
10,000 requests per 10 minutes). Where the real behaviour is only observed, not documented, the
comment next to it says so and names the source.

Tests and the demo drive it through plain methods: mailboxes (`add_mailbox`), an Exchange application
access policy (`restrict_app`), a person using Outlook (`user_*`), inspection (`folders`,
`folder_contacts`) and delta resets (`expire_delta_tokens`, `require_resync`).
"""

from __future__ import annotations

import base64
import bisect
import json
import math
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from sandbox import graph_categories, graph_photos
from sandbox.httpd import CaseInsensitiveDict, ConnectionReset, Counters, Request, Response, Route, Service

GRAPH_AUDIENCE = "https://graph.microsoft.com"
BATCH_MAX_REQUESTS = 20  # concepts/json-batching.md

TokenValidator = Callable[[str, str], "dict | None"]

# --- contact schema: github.com/microsoftgraph/msgraph-metadata clean_v10_metadata/cleanMetadata.xml ---
STRING_PROPS = (
    "assistantName",
    "birthday",
    "businessHomePage",
    "companyName",
    "department",
    "displayName",
    "fileAs",
    "generation",
    "givenName",
    "initials",
    "jobTitle",
    "manager",
    "middleName",
    "mobilePhone",
    "nickName",
    "officeLocation",
    "personalNotes",
    "profession",
    "spouseName",
    "surname",
    "title",
    "yomiCompanyName",
    "yomiGivenName",
    "yomiSurname",
)
STRING_LIST_PROPS = ("businessPhones", "categories", "children", "homePhones", "imAddresses")
ADDRESS_PROPS = ("businessAddress", "homeAddress", "otherAddress")
ADDRESS_FIELDS = ("street", "city", "state", "postalCode", "countryOrRegion")
EMAIL_SLOT_PROPS = ("primaryEmailAddress", "secondaryEmailAddress", "tertiaryEmailAddress")
SERVER_PROPS = ("id", "changeKey", "createdDateTime", "lastModifiedDateTime", "parentFolderId")
NAVIGATION_PROPS = ("singleValueExtendedProperties", "multiValueExtendedProperties", "extensions", "photo")
# The order Graph serialises a contact in (api-reference/v1.0/api/contact-get.md example).
# One pool for the operations of every `$batch` of every mailbox. A pool per batch spent more of the
# sandbox's CPU on starting threads than on the operations (50 users send ~1,300 batches in the
# benchmark). Threads start only as the load needs them; 512 covers 128 batches in flight at once.
_BATCH_POOL = ThreadPoolExecutor(max_workers=512, thread_name_prefix="graph-batch")

RENDER_ORDER = (
    "createdDateTime",
    "lastModifiedDateTime",
    "changeKey",
    "categories",
    "parentFolderId",
    "birthday",
    "fileAs",
    "displayName",
    "givenName",
    "initials",
    "middleName",
    "nickName",
    "surname",
    "title",
    "yomiGivenName",
    "yomiSurname",
    "yomiCompanyName",
    "generation",
    "imAddresses",
    "jobTitle",
    "companyName",
    "department",
    "officeLocation",
    "profession",
    "businessHomePage",
    "assistantName",
    "manager",
    "homePhones",
    "mobilePhone",
    "businessPhones",
    "spouseName",
    "personalNotes",
    "children",
    "emailAddresses",
    "homeAddress",
    "businessAddress",
    "otherAddress",
    *EMAIL_SLOT_PROPS,
)
SELECTABLE = frozenset((*RENDER_ORDER, "id", *NAVIGATION_PROPS))
# [observed] microsoftgraph/microsoft-graph-docs-contrib#560: not documented, enforced by Exchange.
MULTI_VALUE_LIMITS = {"emailAddresses": ("EmailAddresses", 3), "businessPhones": ("BusinessPhones", 2)}
NAME_PARTS = ("givenName", "surname")

# --- messages copied from real responses --------------------------------------------------------
MSG_ACCESS_DENIED = "Access is denied. Check credentials and try again."
# [observed] public reports of Exchange application access policies / RBAC for Applications.
MSG_APP_POLICY = (
    "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings."
)
MSG_NOT_FOUND = "The specified object was not found in the store."
MSG_BAD_JSON = (
    "Unable to read JSON request payload. Please ensure Content-Type header is set and payload is of "
    "valid JSON format."
)
MSG_BAD_FILTER = "The query filter contains one or more invalid nodes."
# [observed] microsoftgraph/microsoft-graph-docs-contrib#7929, #8029: $expand on Outlook delta → 500.
MSG_DELTA_EXPAND = "Value cannot be null.\r\nParameter name: type"
MSG_EXT_ID = (
    "PropertyId values may only be in one of the following formats: 'MapiPropertyType namespaceGuid Name "
    "propertyName', 'MapiPropertyType namespaceGuid Id propertyId' or 'MapiPropertyType propertyTag'."
)
USER_READ_ROLES = frozenset(
    {
        "User.Read.All",
        "User.ReadWrite.All",
        "User.ReadBasic.All",
        "Directory.Read.All",
        "Directory.ReadWrite.All",
    }
)
CONTACT_READ_ROLES = frozenset({"Contacts.Read", "Contacts.ReadWrite"})
CONTACT_WRITE_ROLES = frozenset({"Contacts.ReadWrite"})
READ_KINDS = frozenset({"folders.list", "folders.get", "contacts.list", "contacts.get", "contacts.delta"})
WRITE_KINDS = frozenset(
    {
        "folders.create",
        "folders.update",
        "folders.delete",
        "contacts.create",
        "contacts.update",
        "contacts.delete",
    }
)

_MAILBOX_PATH = re.compile(r"^/v1\.0/users/([^/]+)/(?:contactfolders|contacts|outlook)(?:/|$)", re.IGNORECASE)
# Route kinds added by sandbox/graph_photos.py and sandbox/graph_categories.py → the roles that allow them.
EXTRA_KIND_ROLES: dict[str, frozenset[str]] = {}
_ID_SHAPE = re.compile(r"^[A-Za-z0-9_\-=]{20,}$")
_QUOTED = r"'((?:[^']|'')*)'"
_FILTER_DISPLAY_NAME = re.compile(rf"^\s*displayName\s+eq\s+{_QUOTED}\s*$", re.IGNORECASE)
_FILTER_EMAIL = re.compile(
    rf"^\s*emailAddresses/any\(\s*(\w+)\s*:\s*\1/address\s+eq\s+{_QUOTED}\s*\)\s*$", re.IGNORECASE
)
# query-parameters.md: "$filter=categories/any(a:a eq 'Red category')" (collections use lambda operators).
_FILTER_CATEGORY = re.compile(
    rf"^\s*categories/any\(\s*(\w+)\s*:\s*\1\s+eq\s+{_QUOTED}\s*\)\s*$", re.IGNORECASE
)
_FILTER_EXT = re.compile(
    rf"^\s*singleValueExtendedProperties/any\(\s*(\w+)\s*:\s*\1/id\s+eq\s+{_QUOTED}\s+and\s+\1/value\s+eq\s+"
    rf"{_QUOTED}\s*\)\s*$",
    re.IGNORECASE,
)
_EXPAND_EXT = re.compile(
    rf"^\s*singleValueExtendedProperties\s*\(\s*\$filter\s*=\s*id\s+eq\s+{_QUOTED}\s*\)\s*$", re.IGNORECASE
)
_EXT_ID = re.compile(
    r"^\s*(\w+)\s+\{([0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12})\}\s+(Name|Id)\s+(\S.*?)\s*$"
)


class GraphError(Exception):
    """A Graph error answer raised from deep inside a handler (turned into the error body by the route)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


# --- records ------------------------------------------------------------------------------------
@dataclass
class _Folder:
    id: str
    display_name: str
    parent_id: str


@dataclass
class _Contact:
    key: str  # the immutable id: stable for the item's life in the mailbox (concepts/outlook-immutable-id.md)
    rest_id: str  # the default id: changes when the item moves to another folder
    folder_id: str
    props: dict[str, Any]
    emails: list[dict | None]  # Exchange's Email1/2/3 slots behind emailAddresses / primary… (inference)
    extended: dict[str, tuple[str, str]]  # matching key → (id as Graph returns it, value)
    change_key: str
    created: str
    modified: str
    # Property name → the mailbox seq of its last change, so a delta round can answer an updated item
    # with only what changed since the round's sync point (delta-query-overview.md).
    changed_at: dict[str, int] = field(default_factory=dict)
    photo: Any = None  # sandbox.graph_photos.Photo when the contact has one


@dataclass
class _DeltaState:
    """What a `$skiptoken`/`$deltatoken` stands for. Query options of the first call live here."""

    folder_id: str
    select: tuple[str, ...] | None
    generation: int
    seq: int  # delta link: the sync point; page token: where this round ends
    keys: tuple[str, ...] = ()  # page token: the round's items (shared between the round's pages)
    offset: int = 0
    incremental: bool = False
    since: int = 0  # incremental round: the sync point it reports changes after


@dataclass
class _Mailbox:
    upn: str
    user_id: str
    root_id: str  # the default Contacts folder; `/contactFolders` lists its children
    # The mail folder a deleted folder goes to (well-known name `deleteditems`); not a contact folder.
    deleted_items_id: str = ""
    folders: dict[str, _Folder] = field(default_factory=dict)
    contacts: dict[str, _Contact] = field(default_factory=dict)  # by immutable id, creation order
    rest_index: dict[str, str] = field(default_factory=dict)  # REST id → immutable id
    seq: int = 0
    # Per folder change log: (seq, contact key) in seq order; per (folder, key): (seq, present, rest id).
    folder_log: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    history: dict[tuple[str, str], list[tuple[int, bool, str]]] = field(default_factory=dict)
    tokens: OrderedDict[str, _DeltaState] = field(default_factory=OrderedDict)
    generation: int = 0
    # The master category list (sandbox.graph_categories): lower-case display name → category.
    categories: dict[str, Any] = field(default_factory=dict)


@dataclass
class _User:
    id: str
    upn: str
    display_name: str
    mailbox: _Mailbox | None


@dataclass
class _Ctx:
    """Per-request state that hooks and handlers share (request ids, token claims, preferences)."""

    request_id: str
    client_request_id: str
    prefer: dict[str, str]
    claims: dict | None = None
    claims_checked: bool = False
    refusal: Response | None = None

    @property
    def immutable(self) -> bool:
        return self.prefer.get("idtype", "").lower() == "immutableid"


class _CounterMap(dict):
    """`mailbox_counters[upn]` works for any mailbox, also one the product got wrong."""

    def __missing__(self, key: str) -> Counters:
        value = self[key] = Counters()
        return value


class _MailboxLimits:
    """Outlook's limits per app id + mailbox (concepts/includes/throttling-outlook.md via
    concepts/throttling-limits.md): concurrent requests and requests per sliding window."""

    def __init__(self, concurrency: int, rate_limit: int, rate_window: float, retry_after: float):
        self.concurrency, self.rate_limit, self.rate_window = concurrency, rate_limit, rate_window
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], int] = {}
        self._arrivals: dict[tuple[str, str], deque[float]] = {}

    def forget_history(self) -> None:
        with self._lock:
            self._arrivals.clear()

    def enter(self, key: tuple[str, str]) -> tuple[str, float] | None:
        """Take a slot, or say why not (message, Retry-After seconds)."""
        with self._lock:
            now = time.monotonic()
            arrivals = self._arrivals.setdefault(key, deque())
            while arrivals and arrivals[0] <= now - self.rate_window:
                arrivals.popleft()
            # Throttled requests still count against the window (concepts/throttling.md: "usage is
            # still counted while you are throttled").
            arrivals.append(now)
            if len(arrivals) > self.rate_limit:
                wait = arrivals[len(arrivals) - self.rate_limit] + self.rate_window - now
                # Wording chosen by the sandbox after the observed "…MailboxConcurrency limit." pattern.
                return "Application is over its MailboxRequests limit.", max(wait, 0.001)
            inflight = self._inflight.get(key, 0)
            if inflight >= self.concurrency:
                # [observed] Microsoft Q&A 1660054 and many client code bases.
                return "Application is over its MailboxConcurrency limit.", self.retry_after
            self._inflight[key] = inflight + 1
            return None

    def leave(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._inflight[key] -= 1


# --- small helpers ------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_id(prefix: str, seed: bytes) -> str:
    # Exchange ids are URL-safe base64 of a binary entry id; the prefixes mimic the two formats
    # (REST "AAMkA…", immutable "AAkALg…") so a test can tell them apart, as a person can.
    return prefix + base64.urlsafe_b64encode(seed + secrets.token_bytes(30)).decode()


def _change_key() -> str:
    return base64.b64encode(secrets.token_bytes(12)).decode()


def _retry_after(seconds: float) -> str:
    # Integer delta-seconds as on the wire; sub-second values (tests with tiny windows) keep three
    # decimals, the sandbox convention the product's parser accepts (see sandbox/httpd.py).
    return str(math.ceil(seconds)) if seconds >= 1 else f"{seconds:.3f}"


def _unquote_literal(text: str) -> str:
    return text.replace("''", "'")


def _parse_prefer(values: str | None) -> dict[str, str]:
    prefs: dict[str, str] = {}
    for part in (values or "").split(","):
        name, _, value = part.strip().partition("=")
        if name:
            prefs[name.strip().lower()] = value.strip().strip('"')
    return prefs


def _ext_key(raw: Any) -> tuple[str, str]:
    """(matching key, id as returned). Type and GUID compare case-insensitively; the name does not
    (https://learn.microsoft.com/en-us/graph/api/resources/extended-properties-overview;
    docs/API_NOTES.md §5)."""
    match = _EXT_ID.match(raw) if isinstance(raw, str) else None
    if not match:
        raise GraphError(400, "ErrorInvalidProperty", MSG_EXT_ID)
    mapi_type, guid, kind, name = match.groups()
    shown = f"{mapi_type} {{{guid.lower()}}} {kind} {name}"
    return f"{mapi_type.lower()} {{{guid.lower()}}} {kind.lower()} {name}", shown


def _unknown_property(name: str, type_name: str) -> GraphError:
    # [observed] msgraph-sdk-dotnet#450 and microsoft-graph-docs-contrib#601 (code RequestBodyRead).
    return GraphError(
        400,
        "RequestBodyRead",
        f"The property '{name}' does not exist on type '{type_name}'. Make sure to only use property names "
        "that are defined by the type or mark the type as open type.",
    )


def _bad_value(name: str) -> GraphError:
    return GraphError(400, "RequestBodyRead", f"Cannot convert the literal value of property '{name}'.")


# --- body validation ----------------------------------------------------------------------------
@dataclass
class _ContactWrite:
    props: dict[str, Any] = field(default_factory=dict)
    email_list: list[dict] | None = None
    email_slots: dict[int, dict | None] = field(default_factory=dict)
    extended: dict[str, tuple[str, str | None]] = field(default_factory=dict)


def _parse_contact_body(body: Any) -> _ContactWrite:
    if not isinstance(body, dict):
        raise GraphError(400, "RequestBodyRead", "The request body must be a JSON object (a contact).")
    out = _ContactWrite()
    for name, value in body.items():
        if name.startswith("@odata.") or name in SERVER_PROPS:
            continue  # annotations and server-set fields are ignored on write
        if name in STRING_PROPS:
            if value is not None and not isinstance(value, str):
                raise _bad_value(name)
            out.props[name] = value
        elif name in STRING_LIST_PROPS:
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise _bad_value(name)
            out.props[name] = list(value or [])
        elif name in ADDRESS_PROPS:
            out.props[name] = _parse_address(name, value)
        elif name == "emailAddresses":
            if value is not None and not isinstance(value, list):
                raise _bad_value(name)
            out.email_list = [_parse_email(name, v) for v in value or []]
        elif name in EMAIL_SLOT_PROPS:
            out.email_slots[EMAIL_SLOT_PROPS.index(name)] = (
                None if value is None else _parse_email(name, value)
            )
        elif name == "singleValueExtendedProperties":
            if not isinstance(value, list):
                raise _bad_value(name)
            for item in value:
                if not isinstance(item, dict) or not isinstance(item.get("value"), str | None):
                    raise _bad_value(name)
                key, shown = _ext_key(item.get("id"))
                out.extended[key] = (shown, item.get("value"))
        elif name in ("multiValueExtendedProperties", "extensions", "photo"):
            raise GraphError(501, "NotImplemented", f"The sandbox does not implement writing '{name}'.")
        else:
            raise _unknown_property(name, "Microsoft.OutlookServices.Contact")
    for name, (exchange_name, limit) in MULTI_VALUE_LIMITS.items():
        count = len(out.email_list or []) if name == "emailAddresses" else len(out.props.get(name) or [])
        if count > limit:
            # The error code is not documented; the message is the one quoted in issue #560.
            raise GraphError(
                400,
                "ErrorInvalidArgument",
                f"The multi value property {exchange_name} has {count} entries, that exceeds the max allowed "
                f"value of {limit}",
            )
    return out


def _parse_address(name: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad_value(name)
    for key, part in value.items():
        if key.startswith("@odata."):
            continue
        if key not in ADDRESS_FIELDS:
            raise _unknown_property(key, "Microsoft.OutlookServices.PhysicalAddress")
        if part is not None and not isinstance(part, str):
            raise _bad_value(f"{name}/{key}")
    # contact-update.md: a structured address is replaced as a whole, not merged.
    return {k: value[k] for k in ADDRESS_FIELDS if value.get(k) is not None}


def _parse_email(name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise _bad_value(name)
    for key, part in value.items():
        if key.startswith("@odata."):
            continue
        if key not in ("name", "address"):
            raise _unknown_property(key, "Microsoft.OutlookServices.EmailAddress")
        if part is not None and not isinstance(part, str):
            raise _bad_value(f"{name}/{key}")
    return {k: value[k] for k in ("name", "address") if value.get(k) is not None}


# --- the service --------------------------------------------------------------------------------
class GraphService(Service):
    """Microsoft Graph v1.0, the contact-related part, for one tenant."""

    envelope_latency = False  # latency is per item; see sandbox.httpd.Service.envelope_latency

    name = "graph"

    def __init__(
        self,
        validate_token: TokenValidator,
        *,
        mailbox_concurrency: int = 4,
        rate_limit: int = 10_000,
        rate_window: float = 600.0,
        concurrency_retry_after: float = 1.0,
        batch_parallelism: int = 4,
        page_size: int = 10,
        delta_page_size: int = 10,
        delta_max_page_size: int = 200,
        delta_token_cache: int = 1000,
    ) -> None:
        super().__init__()
        self.validate_token = validate_token
        self.limits = _MailboxLimits(mailbox_concurrency, rate_limit, rate_window, concurrency_retry_after)
        self.batch_parallelism = batch_parallelism
        self.page_size = page_size
        self.delta_page_size = delta_page_size
        self.delta_max_page_size = delta_max_page_size  # [observed] Q&A 2025: contacts delta caps at 200
        self.delta_token_cache = delta_token_cache
        # Documented behaviour: `Prefer: IdType="ImmutableId"` is honoured (outlook-immutable-id.md).
        # False stands for a tenant where it is not (e.g. a mailbox Graph cannot serve immutable ids
        # for), so the live conformance check can be shown to report it; nothing else turns it off.
        self.honour_immutable_ids = True
        self.delta_partial_updates = True
        """Delta answers an item updated since the last round with its id and only the properties that
        changed ("Updated instances are represented by their id with at least the properties that have
        been updated", delta-query-overview.md). False: updated items come whole, which the docs also
        allow ("additional properties may be included"); a tenant that does so is the kinder case."""
        self.mailbox_counters: dict[str, Counters] = _CounterMap()
        self._users: dict[str, _User] = {}
        self._upn_index: dict[str, str] = {}
        self._app_scopes: dict[str, frozenset[str]] = {}
        self._ctxs: dict[int, _Ctx] = {}
        self._tls = threading.local()
        # Hook for change notifications (sandbox/graph_subscriptions.py): called under the data lock
        # with (mailbox user id, folder id, contact, "created" | "updated" | "deleted").
        self.contact_listeners: list[Callable[[str, str, _Contact, str], None]] = []
        self._register_routes()

    def _register_routes(self) -> None:
        user = r"/v1\.0/(?i:users)/(?P<user>[^/]+)"
        folders = user + r"/(?i:contactfolders)"
        folder = folders + r"/(?P<folder>[^/]+)"
        delta = r"/(?i:contacts)/(?i:(?:microsoft\.graph\.)?delta(?:\(\))?)"
        routes: list[tuple[str, str, Callable[..., Response], str]] = [
            ("GET", user, self._get_user, "users.get"),
            ("GET", folders, self._list_folders, "folders.list"),
            ("POST", folders, self._create_folder, "folders.create"),
            ("GET", folder, self._get_folder, "folders.get"),
            ("PATCH", folder, self._update_folder, "folders.update"),
            ("DELETE", folder, self._delete_folder, "folders.delete"),
            ("POST", folder + r"/(?i:permanentDelete)", self._permanent_delete_folder, "folders.delete"),
            ("GET", folder + delta, self._delta, "contacts.delta"),
            ("GET", folder + r"/(?i:contacts)", self._list_contacts, "contacts.list"),
            ("POST", folder + r"/(?i:contacts)", self._create_contact, "contacts.create"),
            ("GET", user + r"/(?i:contacts)", self._list_contacts, "contacts.list"),
            ("POST", user + r"/(?i:contacts)", self._create_contact, "contacts.create"),
        ]
        for base in (folder + r"/(?i:contacts)", user + r"/(?i:contacts)"):
            item = base + r"/(?P<contact>[^/]+)"
            routes += [
                ("GET", item, self._get_contact, "contacts.get"),
                ("PATCH", item, self._update_contact, "contacts.update"),
                ("DELETE", item, self._delete_contact, "contacts.delete"),
            ]
        # Issue 12: contact photos and the master category list live in their own modules.
        routes += graph_photos.routes(self, (folder + r"/(?i:contacts)", user + r"/(?i:contacts)"))
        routes += graph_categories.routes(self, user)
        routes.append(("POST", r"/v1\.0/\$batch", self._batch, "$batch"))
        routes += [(m, r"/v1\.0/(?i:me)(?:/.*)?", self._me, "me") for m in ("GET", "POST", "PATCH", "DELETE")]
        for method, pattern, handler, kind in routes:
            # $batch must not hold the data lock: its operations take it themselves, in parallel.
            self.route(method, pattern, self._wrap(handler, locked=kind != "$batch"), kind)

    def _wrap(self, handler: Callable[..., Response], locked: bool) -> Callable[..., Response]:
        def run(req: Request, **groups: str) -> Response:
            try:
                if not locked:
                    return handler(req, self._ctxs[id(req)], **groups)
                with self.lock:
                    return handler(req, self._ctxs[id(req)], **groups)
            except GraphError as err:
                return self.error_response(err.status, err.code, err.message, err.headers)

        return run

    # ------------------------------------------------------------------ control API (tests, demo)
    def add_mailbox(self, upn: str, user_id: str | None = None, display_name: str | None = None) -> str:
        """Create a directory user with an Exchange Online mailbox; returns the user's object id."""
        with self.lock:
            uid = (user_id or str(uuid.uuid4())).lower()
            seed = uuid.UUID(uid).bytes if _is_guid(uid) else secrets.token_bytes(16)
            root = _new_id("AQMkA", seed)
            mailbox = _Mailbox(upn=upn, user_id=uid, root_id=root, deleted_items_id=_new_id("AQMkA", seed))
            mailbox.folders[root] = _Folder(root, "Contacts", _new_id("AQMkA", seed))
            graph_categories.seed_defaults(mailbox)
            name = display_name or upn.split("@")[0].replace(".", " ").title()
            self._users[uid] = _User(uid, upn, name, mailbox)
            self._upn_index[upn.lower()] = uid
            self.mailbox_counters.setdefault(upn.lower(), Counters())
            return uid

    def remove_mailbox(self, upn: str, keep_user: bool = True) -> None:
        """Drop the mailbox (licence removed); the directory user stays unless keep_user is False."""
        with self.lock:
            user = self._require_user(upn)
            user.mailbox = None
            if not keep_user:
                del self._users[user.id]
                del self._upn_index[user.upn.lower()]

    def restrict_app(self, appid: str, mailboxes: Iterable[str] | None) -> None:
        """An application access policy / RBAC scope: the app reaches only these mailboxes (None: all)."""
        with self.lock:
            if mailboxes is None:
                self._app_scopes.pop(appid, None)
            else:
                self._app_scopes[appid] = frozenset(m.lower() for m in mailboxes)

    def default_folder_id(self, upn: str) -> str:
        return self._require_mailbox(upn).root_id

    def folders(self, upn: str) -> list[dict]:
        with self.lock:
            mailbox = self._require_mailbox(upn)
            return [self._folder_json(f) for f in self._top_folders(mailbox)]

    def find_folder(self, upn: str, display_name: str) -> dict | None:
        return next((f for f in self.folders(upn) if f["displayName"].lower() == display_name.lower()), None)

    def folder_contacts(self, upn: str, folder_id: str | None, id_type: str = "immutable") -> list[dict]:
        """Full contacts of a folder, each with all its single-value extended properties."""
        with self.lock:
            mailbox = self._require_mailbox(upn)
            fid = self._user_folder(mailbox, folder_id).id
            return [
                self._contact_json(c, immutable=id_type == "immutable", all_extended=True)
                for c in mailbox.contacts.values()
                if c.folder_id == fid
            ]

    def user_create_folder(self, upn: str, display_name: str) -> dict:
        with self.lock:
            return self._folder_json(
                self._new_folder(self._require_mailbox(upn), {"displayName": display_name})
            )

    def user_rename_folder(self, upn: str, folder_id: str, display_name: str) -> dict:
        with self.lock:
            mailbox = self._require_mailbox(upn)
            folder = self._user_folder(mailbox, folder_id)
            return self._folder_json(self._rename_folder(mailbox, folder, {"displayName": display_name}))

    def user_delete_folder(self, upn: str, folder_id: str) -> None:
        """A person deleting the folder in Outlook: it moves to Deleted Items with its contacts (same
        ids, still readable, gone from `/contactFolders`); deleting it there removes it for good."""
        with self.lock:
            mailbox = self._require_mailbox(upn)
            self._remove_folder(mailbox, self._user_folder(mailbox, folder_id))

    def user_empty_deleted_items(self, upn: str) -> None:
        """Empty Deleted Items: the folders in it and their contacts are gone for good."""
        with self.lock:
            mailbox = self._require_mailbox(upn)
            for folder in [f for f in mailbox.folders.values() if f.parent_id == mailbox.deleted_items_id]:
                self._purge_folder(mailbox, folder)

    def deleted_items_id(self, upn: str) -> str:
        return self._require_mailbox(upn).deleted_items_id

    def folder(self, upn: str, folder_id: str) -> dict | None:
        """Any contact folder of the mailbox by id, wherever it is (also in Deleted Items)."""
        with self.lock:
            found = self._require_mailbox(upn).folders.get(folder_id)
            return self._folder_json(found) if found else None

    def user_create_contact(self, upn: str, folder_id: str | None, data: dict) -> dict:
        """A person creating a contact in Outlook; visible to delta like any other change."""
        with self.lock:
            mailbox = self._require_mailbox(upn)
            folder = self._user_folder(mailbox, folder_id)
            contact = self._new_contact(mailbox, folder.id, _parse_contact_body(data))
            return self._contact_json(contact, immutable=True, all_extended=True)

    def user_update_contact(self, upn: str, folder_id: str | None, contact_id: str, **changes: Any) -> dict:
        with self.lock:
            mailbox = self._require_mailbox(upn)
            contact = self._user_contact(mailbox, folder_id, contact_id)
            self._modify_contact(mailbox, contact, _parse_contact_body(changes))
            return self._contact_json(contact, immutable=True, all_extended=True)

    def user_delete_contact(self, upn: str, folder_id: str | None, contact_id: str) -> None:
        with self.lock:
            mailbox = self._require_mailbox(upn)
            self._remove_contact(mailbox, self._user_contact(mailbox, folder_id, contact_id))

    def user_move_contact(self, upn: str, contact_id: str, dest_folder_id: str | None) -> dict:
        """Drag a contact to another folder: its REST id changes, its immutable id does not."""
        with self.lock:
            mailbox = self._require_mailbox(upn)
            contact = self._find_contact(mailbox, contact_id)
            dest = self._user_folder(mailbox, dest_folder_id)
            if dest.id != contact.folder_id:
                self._log(mailbox, contact.folder_id, contact, present=False)
                self._changed(mailbox, contact.folder_id, contact, "deleted")  # gone from that folder
                del mailbox.rest_index[contact.rest_id]
                contact.rest_id = _new_id("AAMkA", contact.key.encode()[:8])
                mailbox.rest_index[contact.rest_id] = contact.key
                contact.folder_id = dest.id
                contact.change_key, contact.modified = _change_key(), _now()
                self._log(mailbox, dest.id, contact, present=True)
                self._changed(mailbox, dest.id, contact, "created")
            return self._contact_json(contact, immutable=True, all_extended=True)

    def set_contact_photo(self, upn: str, contact_id: str, data: bytes) -> None:
        """A person adding a photo to a contact in Outlook (see sandbox.graph_photos)."""
        graph_photos.set_photo(self, upn, contact_id, data)

    def contact_photo(self, upn: str, contact_id: str) -> bytes | None:
        return graph_photos.photo_of(self, upn, contact_id)

    def master_categories(self, upn: str) -> list[dict[str, str]]:
        return graph_categories.master_categories(self, upn)

    def user_add_category(self, upn: str, display_name: str, color: str = "none") -> dict[str, str]:
        return graph_categories.user_add_category(self, upn, display_name, color)

    def expire_delta_tokens(self, upn: str) -> None:
        """Evict every delta/skip token of the mailbox: the next use answers syncStateNotFound."""
        with self.lock:
            self._require_mailbox(upn).tokens.clear()

    def require_resync(self, upn: str) -> None:
        """Maintenance/migration: every existing token answers 410 Gone with a fresh delta Location."""
        with self.lock:
            self._require_mailbox(upn).generation += 1

    def reset_counters(self) -> None:
        self.counters.reset()
        for counters in self.mailbox_counters.values():
            counters.reset()

    def reset(self) -> None:
        """A fresh tenant on the same port: no users, policies, faults, counters or request history.
        (Restarting a server costs half a second; tests reuse one and reset it instead.)"""
        with self.lock:
            self._users.clear()
            self._upn_index.clear()
            self._app_scopes.clear()
            self.faults.clear()
            self.faults.fired.clear()
            self.counters.reset()
            self.mailbox_counters.clear()
            self.limits.forget_history()

    # ------------------------------------------------------------------ framework hooks
    def dispatch(self, req: Request) -> Response:
        """Wraps the base dispatch so the mailbox's concurrency slot is held for the whole request,
        including the injected latency the base applies: that is what makes concurrency shape time."""
        ctx = _Ctx(
            request_id=str(uuid.uuid4()),
            client_request_id=req.headers.get("client-request-id") or "",
            prefer=_parse_prefer(req.headers.get("Prefer")),
        )
        if not self.honour_immutable_ids:
            ctx.prefer.pop("idtype", None)
        ctx.client_request_id = ctx.client_request_id or ctx.request_id
        previous = getattr(self._tls, "ctx", None)
        self._tls.ctx = ctx
        self._ctxs[id(req)] = ctx
        slot: tuple[str, str] | None = None
        mailbox_key = self._mailbox_key(req.path)
        try:
            if mailbox_key:
                self._count_for_mailbox(mailbox_key, req)
                claims = self._claims(req, ctx)
                if claims and claims.get("appid") and self._resolve_user(mailbox_key):
                    key = (str(claims["appid"]), mailbox_key)
                    refused = self.limits.enter(key)
                    if refused is None:
                        slot = key
                    else:
                        message, wait = refused
                        ctx.refusal = self.error_response(
                            429, "ApplicationThrottled", message, {"Retry-After": _retry_after(wait)}
                        )
            resp = super().dispatch(req)
        finally:
            if slot:
                self.limits.leave(slot)
            self._ctxs.pop(id(req), None)
            self._tls.ctx = previous
        resp.headers.setdefault("request-id", ctx.request_id)
        resp.headers.setdefault("client-request-id", ctx.client_request_id)
        if ctx.immutable and resp.status < 400:
            applied = [p for p in [resp.headers.get("Preference-Applied"), 'IdType="ImmutableId"'] if p]
            resp.headers["Preference-Applied"] = ", ".join(applied)
        if mailbox_key:
            self.mailbox_counters[mailbox_key].record_status(resp.status)
        return resp

    def error_response(self, status: int, code: str, message: str, headers: dict | None = None) -> Response:
        ctx: _Ctx | None = getattr(self._tls, "ctx", None)
        request_id = ctx.request_id if ctx else str(uuid.uuid4())
        inner = {
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            "request-id": request_id,
            "client-request-id": ctx.client_request_id if ctx else request_id,
        }
        return Response(
            status, {"error": {"code": code, "message": message, "innerError": inner}}, headers or {}
        )

    def authorize(self, req: Request, route: Route) -> Response | None:
        ctx = self._ctxs[id(req)]
        if not _bearer(req):
            return self._unauthorized("Access token is empty.")
        claims = self._claims(req, ctx)
        if claims is None:
            return self._unauthorized("Access token validation failure. Invalid audience or signature.")
        roles = set(claims.get("roles") or ())
        if route.kind == "users.get" and not roles & USER_READ_ROLES:
            return self.error_response(
                403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation."
            )
        needed = CONTACT_WRITE_ROLES if route.kind in WRITE_KINDS else CONTACT_READ_ROLES
        if (route.kind in READ_KINDS or route.kind in WRITE_KINDS) and not roles & needed:
            return self.error_response(403, "ErrorAccessDenied", MSG_ACCESS_DENIED)
        if route.kind in EXTRA_KIND_ROLES and not roles & EXTRA_KIND_ROLES[route.kind]:
            return self.error_response(403, "ErrorAccessDenied", MSG_ACCESS_DENIED)
        return None

    def before(self, req: Request, route: Route) -> Response | None:
        return self._ctxs[id(req)].refusal

    def _unauthorized(self, message: str) -> Response:
        challenge = (
            'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize"'
        )
        return self.error_response(
            401, "InvalidAuthenticationToken", message, {"WWW-Authenticate": challenge}
        )

    def _claims(self, req: Request, ctx: _Ctx) -> dict | None:
        if not ctx.claims_checked:
            token = _bearer(req)
            ctx.claims = self.validate_token(token, GRAPH_AUDIENCE) if token else None
            ctx.claims_checked = True
        return ctx.claims

    def _mailbox_key(self, path: str) -> str | None:
        match = _MAILBOX_PATH.match(path)
        if not match:
            return None
        with self.lock:
            user = self._resolve_user(unquote(match.group(1)))
        return user.upn.lower() if user else unquote(match.group(1)).lower()

    def _count_for_mailbox(self, key: str, req: Request) -> None:
        counters = self.mailbox_counters[key]
        kind = self.kind_for(req)
        if not req.in_batch:
            counters.record_http(req.method, kind)
        counters.record_item(req.method, kind)

    # ------------------------------------------------------------------ directory and mailboxes
    def _resolve_user(self, ref: str) -> _User | None:
        ref = ref.strip()
        if ref.startswith("'") and ref.endswith("'"):
            ref = ref[1:-1]
        return self._users.get(ref.lower()) or self._users.get(self._upn_index.get(ref.lower(), ""))

    def _require_user(self, ref: str) -> _User:
        user = self._resolve_user(ref)
        if user is None:
            raise KeyError(f"no such user in the sandbox directory: {ref}")
        return user

    def _require_mailbox(self, ref: str) -> _Mailbox:
        mailbox = self._require_user(ref).mailbox
        if mailbox is None:
            raise KeyError(f"user {ref} has no mailbox")
        return mailbox

    def _mailbox(self, ref: str, ctx: _Ctx) -> _Mailbox:
        user = self._resolve_user(ref)
        if user is None:
            # [observed] Graph answers ErrorInvalidUser for mailbox calls on unknown users.
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{ref}' is invalid.")
        scope = self._app_scopes.get(str((ctx.claims or {}).get("appid")))
        if scope is not None and user.upn.lower() not in scope:
            raise GraphError(403, "ErrorAccessDenied", MSG_APP_POLICY)
        if user.mailbox is None:
            raise GraphError(
                404,
                "MailboxNotEnabledForRESTAPI",
                "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
            )
        return user.mailbox

    # ------------------------------------------------------------------ folders
    def _top_folders(self, mailbox: _Mailbox) -> list[_Folder]:
        return [f for f in mailbox.folders.values() if f.parent_id == mailbox.root_id]

    def _folder_json(self, folder: _Folder) -> dict:
        return {"id": folder.id, "displayName": folder.display_name, "parentFolderId": folder.parent_id}

    def _folder(self, mailbox: _Mailbox, folder_id: str) -> _Folder:
        if not _ID_SHAPE.match(folder_id):
            raise GraphError(400, "ErrorInvalidIdMalformed", "Id is malformed.")
        folder = mailbox.folders.get(folder_id)
        if folder is None:
            raise GraphError(404, "ErrorItemNotFound", MSG_NOT_FOUND)
        return folder

    def _user_folder(self, mailbox: _Mailbox, folder_id: str | None) -> _Folder:
        if folder_id is None:
            return mailbox.folders[mailbox.root_id]
        if folder_id not in mailbox.folders:
            raise KeyError(f"no folder {folder_id} in {mailbox.upn}")
        return mailbox.folders[folder_id]

    def _user_contact(self, mailbox: _Mailbox, folder_id: str | None, contact_id: str) -> _Contact:
        contact = self._find_contact(mailbox, contact_id)
        if folder_id is not None and contact.folder_id != folder_id:
            raise KeyError(f"contact {contact_id} is not in folder {folder_id}")
        return contact

    def _folder_name(self, body: Any) -> str:
        if not isinstance(body, dict):
            raise GraphError(
                400, "RequestBodyRead", "The request body must be a JSON object (a contactFolder)."
            )
        for key in body:
            if key not in ("displayName", "parentFolderId", "id") and not key.startswith("@odata."):
                raise _unknown_property(key, "Microsoft.OutlookServices.ContactFolder")
        name = body.get("displayName")
        if not isinstance(name, str) or not name.strip():
            raise GraphError(400, "ErrorInvalidRequest", "The folder display name must not be empty.")
        return name

    def _check_unique(self, mailbox: _Mailbox, name: str, except_id: str | None = None) -> None:
        # Exchange refuses a second folder of the same name (case-insensitive) under one parent:
        # 409 ErrorFolderExists [observed] alcionai/corso#3278 for contact folders; EWS documents
        # ErrorFolderExists as "a folder with the same name as another folder in the same parent".
        for other in self._top_folders(mailbox):
            if other.id != except_id and other.display_name.lower() == name.lower():
                raise GraphError(
                    409,
                    "ErrorFolderExists",
                    f"A folder with the specified name already exists., Could not create folder '{name}'.",
                )

    def _new_folder(self, mailbox: _Mailbox, body: Any) -> _Folder:
        name = self._folder_name(body)
        self._check_unique(mailbox, name)
        folder = _Folder(_new_id("AQMkA", mailbox.root_id.encode()[:8]), name, mailbox.root_id)
        mailbox.folders[folder.id] = folder
        return folder

    def _rename_folder(self, mailbox: _Mailbox, folder: _Folder, body: Any) -> _Folder:
        name = self._folder_name(body)
        self._check_unique(mailbox, name, except_id=folder.id)
        folder.display_name = name
        return folder

    def _remove_folder(self, mailbox: _Mailbox, folder: _Folder) -> None:
        """DELETE (and deleting in Outlook) moves the folder to Deleted Items; only `permanentDelete`,
        or deleting it again from Deleted Items, removes it (contactfolder-permanentdelete.md; [observed]
        msgraph-sdk-powershell#2743: deleted contact folders live on with another parentFolderId)."""
        if folder.id == mailbox.root_id:
            raise GraphError(
                403, "ErrorDeleteDistinguishedFolder", "Distinguished folders cannot be deleted."
            )
        if folder.parent_id == mailbox.deleted_items_id:
            self._purge_folder(mailbox, folder)
            return
        # The folder, its contacts and their ids stay as they are; only its parent changes. A folder
        # of the same name already in Deleted Items is not a clash there (Exchange renames on move).
        folder.parent_id = mailbox.deleted_items_id

    def _purge_folder(self, mailbox: _Mailbox, folder: _Folder) -> None:
        if folder.id == mailbox.root_id:
            raise GraphError(
                403, "ErrorDeleteDistinguishedFolder", "Distinguished folders cannot be deleted."
            )
        for contact in [c for c in mailbox.contacts.values() if c.folder_id == folder.id]:
            self._remove_contact(mailbox, contact)
        del mailbox.folders[folder.id]
        for token in [t for t, s in mailbox.tokens.items() if s.folder_id == folder.id]:
            del mailbox.tokens[token]

    def _list_folders(self, req: Request, ctx: _Ctx, user: str) -> Response:
        mailbox = self._mailbox(user, ctx)
        options = _query_options(req.query, {"$filter", "$top", "$skip", "$select"})
        folders = self._top_folders(mailbox)
        if "$filter" in options:
            match = _FILTER_DISPLAY_NAME.match(options["$filter"])
            if not match:
                raise GraphError(400, "ErrorInvalidUrlQueryFilter", MSG_BAD_FILTER)
            wanted = _unquote_literal(match.group(1)).lower()
            folders = [f for f in folders if f.display_name.lower() == wanted]
        values = [self._folder_json(f) for f in folders]
        if "$select" in options:
            chosen = {n.strip() for n in options["$select"].split(",") if n.strip()}
            for name in chosen - {"id", "displayName", "parentFolderId"}:
                raise GraphError(
                    400,
                    "RequestBroker--ParseUri",
                    f"Could not find a property named '{name}' on type 'microsoft.graph.contactFolder'.",
                )
            values = [{k: v for k, v in f.items() if k == "id" or k in chosen} for f in values]
        return self._page(req, values, options, f"users('{user}')/contactFolders")

    def _create_folder(self, req: Request, ctx: _Ctx, user: str) -> Response:
        mailbox = self._mailbox(user, ctx)
        folder = self._new_folder(mailbox, _json_body(req))
        return Response(
            201, self._with_context(self._folder_json(folder), f"users('{user}')/contactFolders/$entity")
        )

    def _get_folder(self, req: Request, ctx: _Ctx, user: str, folder: str) -> Response:
        found = self._folder(self._mailbox(user, ctx), folder)
        return Response(
            200, self._with_context(self._folder_json(found), f"users('{user}')/contactFolders/$entity")
        )

    def _update_folder(self, req: Request, ctx: _Ctx, user: str, folder: str) -> Response:
        mailbox = self._mailbox(user, ctx)
        found = self._rename_folder(mailbox, self._folder(mailbox, folder), _json_body(req))
        return Response(
            200, self._with_context(self._folder_json(found), f"users('{user}')/contactFolders/$entity")
        )

    def _delete_folder(self, req: Request, ctx: _Ctx, user: str, folder: str) -> Response:
        mailbox = self._mailbox(user, ctx)
        self._remove_folder(mailbox, self._folder(mailbox, folder))
        return Response(204)

    def _permanent_delete_folder(self, req: Request, ctx: _Ctx, user: str, folder: str) -> Response:
        mailbox = self._mailbox(user, ctx)
        self._purge_folder(mailbox, self._folder(mailbox, folder))
        return Response(204)

    # ------------------------------------------------------------------ contacts: storage
    def _log(self, mailbox: _Mailbox, folder_id: str, contact: _Contact, present: bool) -> None:
        mailbox.seq += 1
        mailbox.folder_log.setdefault(folder_id, []).append((mailbox.seq, contact.key))
        mailbox.history.setdefault((folder_id, contact.key), []).append(
            (mailbox.seq, present, contact.rest_id)
        )

    def _new_contact(self, mailbox: _Mailbox, folder_id: str, write: _ContactWrite) -> _Contact:
        stamp = _now()
        seed = mailbox.root_id.encode()[:8]
        contact = _Contact(
            key=_new_id("AAkALg", seed),
            rest_id=_new_id("AAMkA", seed),
            folder_id=folder_id,
            props={},
            emails=[None, None, None],
            extended={},
            change_key=_change_key(),
            created=stamp,
            modified=stamp,
        )
        self._apply(contact, write, creating=True)
        mailbox.contacts[contact.key] = contact
        mailbox.rest_index[contact.rest_id] = contact.key
        self._log(mailbox, folder_id, contact, present=True)
        self._changed(mailbox, folder_id, contact, "created")
        return contact

    def _modify_contact(self, mailbox: _Mailbox, contact: _Contact, write: _ContactWrite) -> None:
        before = self._contact_json(contact, immutable=True)
        self._apply(contact, write, creating=False)
        contact.change_key, contact.modified = _change_key(), _now()  # outlookitem.md: new on every change
        self._log(mailbox, contact.folder_id, contact, present=True)
        after = self._contact_json(contact, immutable=True)
        for name in RENDER_ORDER:
            if before.get(name) != after.get(name):
                contact.changed_at[name] = mailbox.seq
        self._changed(mailbox, contact.folder_id, contact, "updated")

    def _remove_contact(self, mailbox: _Mailbox, contact: _Contact) -> None:
        del mailbox.contacts[contact.key]
        mailbox.rest_index.pop(contact.rest_id, None)
        self._log(mailbox, contact.folder_id, contact, present=False)
        self._changed(mailbox, contact.folder_id, contact, "deleted")

    def _changed(self, mailbox: _Mailbox, folder_id: str, contact: _Contact, change: str) -> None:
        for listener in self.contact_listeners:
            listener(mailbox.user_id, folder_id, contact, change)

    def _apply(self, contact: _Contact, write: _ContactWrite, creating: bool) -> None:
        contact.props.update(write.props)
        if write.email_list is not None:
            contact.emails = [*write.email_list, None, None, None][:3]
        for slot, value in write.email_slots.items():
            contact.emails[slot] = value
        for key, (shown, value) in write.extended.items():
            if value is None:
                contact.extended.pop(key, None)
            else:
                contact.extended[key] = (shown, value)
        # contact.md: displayName is regenerated from the name parts when they change and the
        # request does not set it (simplified to "given surname").
        names_changed = any(p in write.props for p in NAME_PARTS)
        if names_changed and not write.props.get("displayName"):
            parts = [contact.props.get(p) for p in NAME_PARTS]
            generated = " ".join(p for p in parts if p)
            if generated or not creating:
                contact.props["displayName"] = generated

    def _find_contact(self, mailbox: _Mailbox, contact_id: str) -> _Contact:
        """Either id format resolves to the item, anywhere in the mailbox: Exchange ids are mailbox-wide,
        so the folder segment of the URL is not checked (as with messages)."""
        key = contact_id if contact_id in mailbox.contacts else mailbox.rest_index.get(contact_id)
        if key is None:
            if not _ID_SHAPE.match(contact_id):
                raise GraphError(400, "ErrorInvalidIdMalformed", "Id is malformed.")
            raise GraphError(404, "ErrorItemNotFound", MSG_NOT_FOUND)
        return mailbox.contacts[key]

    def _contact_json(
        self,
        contact: _Contact,
        immutable: bool,
        select: Iterable[str] | None = None,
        expand_key: str | None = None,
        all_extended: bool = False,
    ) -> dict:
        full = {
            "createdDateTime": contact.created,
            "lastModifiedDateTime": contact.modified,
            "changeKey": contact.change_key,
            "parentFolderId": contact.folder_id,
            "emailAddresses": [dict(e) for e in contact.emails if e],
            **{p: contact.props.get(p) for p in STRING_PROPS},
            **{p: list(contact.props.get(p) or []) for p in STRING_LIST_PROPS},
            **{p: dict(contact.props.get(p) or {}) for p in ADDRESS_PROPS},
            **{p: dict(e) if e else None for p, e in zip(EMAIL_SLOT_PROPS, contact.emails, strict=True)},
        }
        if full["fileAs"] is None:
            full["fileAs"] = ""
        chosen = None if select is None else set(select)
        wanted = RENDER_ORDER if chosen is None else [p for p in RENDER_ORDER if p in chosen]
        out = {
            "@odata.etag": f'W/"{contact.change_key}"',
            "id": contact.key if immutable else contact.rest_id,
        }
        out.update({p: full[p] for p in wanted})
        shown = [
            {"id": sid, "value": value}
            for key, (sid, value) in contact.extended.items()
            if all_extended or key == expand_key
        ]
        if shown:  # Graph leaves the navigation property out when nothing matches the $expand filter
            out["singleValueExtendedProperties"] = shown
        return out

    # ------------------------------------------------------------------ contacts: endpoints
    def _contact_folder(self, mailbox: _Mailbox, folder: str | None) -> _Folder:
        return mailbox.folders[mailbox.root_id] if folder is None else self._folder(mailbox, folder)

    def _list_contacts(self, req: Request, ctx: _Ctx, user: str, folder: str | None = None) -> Response:
        mailbox = self._mailbox(user, ctx)
        fid = self._contact_folder(mailbox, folder).id
        options = _query_options(req.query, {"$filter", "$top", "$skip", "$select", "$expand"})
        select = _parse_select(options.get("$select"))
        expand_key = _parse_expand(options.get("$expand"))
        match = _contact_filter(options.get("$filter"))
        values = [
            self._contact_json(c, ctx.immutable, select, expand_key)
            for c in mailbox.contacts.values()
            if c.folder_id == fid and match(c)
        ]
        return self._page(req, values, options, f"users('{user}')/contacts")

    def _get_contact(
        self, req: Request, ctx: _Ctx, user: str, contact: str, folder: str | None = None
    ) -> Response:
        mailbox = self._mailbox(user, ctx)
        if folder is not None:
            self._folder(mailbox, folder)
        options = _query_options(req.query, {"$select", "$expand"})
        found = self._find_contact(mailbox, contact)
        body = self._contact_json(
            found, ctx.immutable, _parse_select(options.get("$select")), _parse_expand(options.get("$expand"))
        )
        return Response(200, self._with_context(body, f"users('{user}')/contacts/$entity"))

    def _create_contact(self, req: Request, ctx: _Ctx, user: str, folder: str | None = None) -> Response:
        mailbox = self._mailbox(user, ctx)
        fid = self._contact_folder(mailbox, folder).id
        contact = self._new_contact(mailbox, fid, _parse_contact_body(_json_body(req)))
        body = self._contact_json(contact, ctx.immutable)
        return Response(201, self._with_context(body, f"users('{user}')/contacts/$entity"))

    def _update_contact(
        self, req: Request, ctx: _Ctx, user: str, contact: str, folder: str | None = None
    ) -> Response:
        mailbox = self._mailbox(user, ctx)
        if folder is not None:
            self._folder(mailbox, folder)
        found = self._find_contact(mailbox, contact)
        self._check_if_match(req, found)
        self._modify_contact(mailbox, found, _parse_contact_body(_json_body(req)))
        body = self._contact_json(found, ctx.immutable)
        return Response(200, self._with_context(body, f"users('{user}')/contacts/$entity"))

    def _delete_contact(
        self, req: Request, ctx: _Ctx, user: str, contact: str, folder: str | None = None
    ) -> Response:
        mailbox = self._mailbox(user, ctx)
        if folder is not None:
            self._folder(mailbox, folder)
        found = self._find_contact(mailbox, contact)
        self._check_if_match(req, found)
        self._remove_contact(mailbox, found)
        return Response(204)

    def _check_if_match(self, req: Request, contact: _Contact) -> None:
        # If-Match is not documented for contacts (https://learn.microsoft.com/en-us/graph/api/contact-update,
        # docs/API_NOTES.md §4); Exchange reports a stale change key as ErrorIrresolvableConflict
        # [observed], here with 412 as concepts/errors.md defines.
        etag = req.headers.get("If-Match")
        if etag and etag.strip() != "*" and etag.strip() != f'W/"{contact.change_key}"':
            raise GraphError(
                412,
                "ErrorIrresolvableConflict",
                "The send or update operation could not be performed because the change key passed in the "
                "request does not match the current change key for the item.",
            )

    # ------------------------------------------------------------------ delta
    def _delta(self, req: Request, ctx: _Ctx, user: str, folder: str) -> Response:
        mailbox = self._mailbox(user, ctx)
        fid = self._folder(mailbox, folder).id
        options = {k.lower(): v for k, v in req.query.items()}
        if "$expand" in options:
            raise GraphError(500, "InternalServerError", MSG_DELTA_EXPAND)
        # contact-delta.md documents only $select (plus the state tokens).
        _query_options(req.query, {"$select", "$skiptoken", "$deltatoken"})
        token = options.get("$skiptoken") or options.get("$deltatoken")
        base_link = f"{self.base_url}{_quote_path(req.path)}"
        if token:
            state = mailbox.tokens.get(token)
            if state is None or state.folder_id != fid:
                # delta-query-overview.md: an evicted token answers a 40X with syncStateNotFound; the one
                # public capture (microsoft-graph-docs-contrib#7897, Outlook delta) shows 410 Gone.
                raise GraphError(
                    410,
                    "SyncStateNotFound",
                    f"The sync state generation is not found; generation={state.seq if state else 0};"
                    f"[highest={mailbox.seq}].",
                )
            if state.generation != mailbox.generation:
                fresh = _delta_restart_link(base_link, state.select)
                raise GraphError(
                    410,
                    "resyncRequired",
                    "The delta token is no longer valid, and the app must reset the sync state.",
                    {"Location": fresh},
                )
            mailbox.tokens.move_to_end(token)
            if "$deltatoken" in options and not options.get("$skiptoken"):
                state = _DeltaState(
                    fid,
                    state.select,
                    mailbox.generation,
                    mailbox.seq,
                    self._changes(mailbox, fid, state.seq),
                    0,
                    True,
                    state.seq,
                )
        else:
            keys = tuple(k for k, c in mailbox.contacts.items() if c.folder_id == fid)
            select = _parse_select(options.get("$select"))
            state = _DeltaState(fid, tuple(select) if select else None, mailbox.generation, mailbox.seq, keys)
        size = self.delta_page_size
        applied = {}
        if "odata.maxpagesize" in ctx.prefer:
            try:
                size = max(1, min(int(ctx.prefer["odata.maxpagesize"]), self.delta_max_page_size))
            except ValueError:
                raise GraphError(400, "BadRequest", "Invalid odata.maxpagesize preference.") from None
            applied["odata.maxpagesize"] = str(size)
        page = state.keys[state.offset : state.offset + size]
        values = [v for v in (self._delta_item(mailbox, fid, k, state, ctx) for k in page) if v]
        body: dict[str, Any] = {"@odata.context": f"{self.base_url}/v1.0/$metadata#Collection(contact)"}
        if state.offset + size < len(state.keys):
            nxt = _DeltaState(
                fid,
                state.select,
                state.generation,
                state.seq,
                state.keys,
                state.offset + size,
                state.incremental,
                state.since,
            )
            body["@odata.nextLink"] = f"{base_link}?$skiptoken={self._store_token(mailbox, nxt)}"
        else:
            done = _DeltaState(fid, state.select, state.generation, state.seq)
            body["@odata.deltaLink"] = f"{base_link}?$deltatoken={self._store_token(mailbox, done)}"
        body["value"] = values
        headers = {}
        if applied:
            headers["Preference-Applied"] = ", ".join(f"{k}={v}" for k, v in applied.items())
        return Response(200, body, headers)

    def _changes(self, mailbox: _Mailbox, fid: str, since: int) -> tuple[str, ...]:
        """Items of the folder whose state changed after `since`, oldest change first. An item that
        came and went entirely after `since` was never seen by the client and is left out."""
        log = mailbox.folder_log.get(fid, [])
        last: dict[str, int] = {}
        for seq, key in log[bisect.bisect_right(log, since, key=lambda e: e[0]) :]:
            last[key] = seq
        keys = []
        for key, _ in sorted(last.items(), key=lambda kv: kv[1]):
            present_now = key in mailbox.contacts and mailbox.contacts[key].folder_id == fid
            history = mailbox.history[(fid, key)]
            at = bisect.bisect_right(history, since, key=lambda e: e[0])
            if present_now or (at > 0 and history[at - 1][1]):
                keys.append(key)
        return tuple(keys)

    def _delta_item(
        self, mailbox: _Mailbox, fid: str, key: str, state: _DeltaState, ctx: _Ctx
    ) -> dict | None:
        contact = mailbox.contacts.get(key)
        if contact is not None and contact.folder_id == fid:
            select = state.select
            if (
                state.incremental
                and self.delta_partial_updates
                and self._was_present(mailbox, fid, key, state)
            ):
                # Updated, not created: its id plus what changed since the sync point, and no more
                # (contact-delta.md: "The id property is always returned").
                changed = {p for p, seq in contact.changed_at.items() if seq > state.since}
                select = tuple(p for p in (state.select or RENDER_ORDER) if p in changed)
            return {
                "@odata.type": "#microsoft.graph.contact",
                **self._contact_json(contact, ctx.immutable, select),
            }
        if not state.incremental:
            return None  # deleted while the first round was being paged: the next round reports it
        rest_id = mailbox.history[(fid, key)][-1][2]  # the id the item had when it left this folder
        return {
            "@odata.type": "#microsoft.graph.contact",
            "id": key if ctx.immutable else rest_id,
            "@removed": {"reason": "deleted"},
        }

    def _was_present(self, mailbox: _Mailbox, fid: str, key: str, state: _DeltaState) -> bool:
        """Was the item in the folder at the round's sync point (so this round reports an update)?"""
        history = mailbox.history.get((fid, key), [])
        at = bisect.bisect_right(history, state.since, key=lambda e: e[0])
        return at > 0 and history[at - 1][1]

    def _store_token(self, mailbox: _Mailbox, state: _DeltaState) -> str:
        # delta-query-overview.md: Outlook keeps tokens in a bounded cache and evicts the oldest.
        token = secrets.token_urlsafe(24)
        mailbox.tokens[token] = state
        while len(mailbox.tokens) > self.delta_token_cache:
            mailbox.tokens.popitem(last=False)
        return token

    # ------------------------------------------------------------------ users, /me
    def _get_user(self, req: Request, ctx: _Ctx, user: str) -> Response:
        found = self._resolve_user(user)
        if found is None:
            raise GraphError(
                404,
                "Request_ResourceNotFound",
                f"Resource '{user}' does not exist or one of its queried reference-property objects are "
                "not present.",
            )
        body = {
            "@odata.context": f"{self.base_url}/v1.0/$metadata#users/$entity",
            "businessPhones": [],
            "displayName": found.display_name,
            "givenName": None,
            "jobTitle": None,
            "mail": found.upn if found.mailbox else None,
            "mobilePhone": None,
            "officeLocation": None,
            "preferredLanguage": None,
            "surname": None,
            "userPrincipalName": found.upn,
            "id": found.id,
        }
        return Response(200, body)

    def _me(self, req: Request, ctx: _Ctx) -> Response:
        raise GraphError(400, "BadRequest", "/me request is only valid with delegated authentication flow.")

    # ------------------------------------------------------------------ paging
    def _with_context(self, body: dict, context: str) -> dict:
        return {"@odata.context": f"{self.base_url}/v1.0/$metadata#{context}", **body}

    def _page(self, req: Request, values: list[dict], options: dict[str, str], context: str) -> Response:
        top = _int_option(options, "$top", self.page_size)
        skip = _int_option(options, "$skip", 0)
        if top < 1 or skip < 0:
            raise GraphError(400, "BadRequest", "Invalid $top or $skip value.")
        if top > 1000:
            # The Outlook list APIs take $top 1..1000 (user-list-messages.md); OData's own wording.
            raise GraphError(
                400,
                "BadRequest",
                "The limit of '1000' for Top query has been exceeded. The value from the incoming request "
                f"is '{top}'.",
            )
        body: dict[str, Any] = {"@odata.context": f"{self.base_url}/v1.0/$metadata#{context}"}
        if skip + top < len(values):
            query = {k: v for k, v in req.query.items() if k.lower() != "$skip"}
            query["$skip"] = str(skip + top)
            body["@odata.nextLink"] = (
                f"{self.base_url}{_quote_path(req.path)}?{urlencode(query, quote_via=quote, safe='$,()')}"
            )
        body["value"] = values[skip : skip + top]
        return Response(200, body)

    # ------------------------------------------------------------------ $batch
    def _batch(self, req: Request, ctx: _Ctx) -> Response:
        items = _validate_batch(_json_body(req))
        # Per mailbox, the envelope is one HTTP call (its operations are counted as items).
        paths = (urlsplit("/" + i["url"].lstrip("/")).path for i in items)
        for key in {k for k in (self._mailbox_key("/v1.0" + unquote(p)) for p in paths) if k}:
            self.mailbox_counters[key].record_http("POST", "$batch")
        return Response(200, {"responses": self._run_batch(items, req)})

    def _run_batch(self, items: list[dict], outer: Request) -> list[dict]:
        if not any(i.get("dependsOn") for i in items):
            # throttling-outlook.md: Graph sends at most 4 requests of an unordered batch to Outlook
            # at a time; the responses come back in completion order.
            return self._run_unordered(items, outer)
        # With dependsOn Graph runs the requests one at a time (known-issues/json-batching.md).
        status: dict[str, int] = {}
        results = []
        for item in _topological(items):
            dep = (item.get("dependsOn") or [None])[0]
            if dep is not None and status[dep.lower()] >= 400:
                result = {
                    "id": item["id"],
                    "status": 424,
                    "headers": {"Content-Type": "application/json"},
                    "body": {"error": {"code": "BadRequest", "message": "Failed dependency"}},
                }
            else:
                result = self._run_item(item, outer)[0]
            status[item["id"].lower()] = result["status"]
            results.append(result)
        return results

    def _run_unordered(self, items: list[dict], outer: Request) -> list[dict]:
        """`batch_parallelism` workers of the shared pool take the items one after another, so at most
        that many run at once; the answers are in completion order. Every item runs even when one
        fails; then a dropped connection wins over any other error."""
        pending = deque(items)
        done: list[tuple[dict, float]] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not pending:
                        return
                    item = pending.popleft()
                try:
                    result = self._run_item(item, outer)
                except Exception as exc:  # raised once every item has run
                    with lock:
                        errors.append(exc)
                    continue
                with lock:
                    done.append(result)

        workers = max(1, min(self.batch_parallelism, len(items)))
        for future in [_BATCH_POOL.submit(worker) for _ in range(workers)]:
            future.result()
        if errors:
            raise next((e for e in errors if isinstance(e, ConnectionReset)), errors[0])
        return [result for result, _ in sorted(done, key=lambda pair: pair[1])]

    def _run_item(self, item: dict, outer: Request) -> tuple[dict, float]:
        url = item["url"]
        parts = urlsplit("/" + url.lstrip("/"))
        headers = CaseInsensitiveDict(item.get("headers") or {})
        # The envelope's token travels with every operation; its other headers (Prefer…) do not.
        if "authorization" not in headers and outer.headers.get("Authorization"):
            headers["Authorization"] = outer.headers["Authorization"]
        body = item.get("body")
        raw = b"" if body is None else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
        sub = Request(
            method=item["method"].upper(),
            path="/v1.0" + unquote(parts.path),
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers=headers,
            body=raw,
            raw_target="/v1.0" + parts.path + (f"?{parts.query}" if parts.query else ""),
            in_batch=True,
        )
        if url.lower().startswith(("http://", "https://")) or sub.path.startswith("/v1.0/$batch"):
            resp = self.error_response(400, "BadRequest", f"Invalid request URL '{url}' in a batch.")
        else:
            try:
                resp = self.dispatch(sub)
            except ConnectionReset:
                raise
            except Exception as exc:  # a simulator bug must be loud, as at top level
                resp = self.error_response(500, "SandboxError", f"{type(exc).__name__}: {exc}")
        self.counters.record_status(resp.status)
        _, ctype = resp.encoded()
        out: dict[str, Any] = {"id": item["id"], "status": resp.status, "headers": dict(resp.headers)}
        if resp.body is not None:
            out["headers"]["Content-Type"] = ctype
            out["body"] = resp.body
        return out, time.monotonic()


# --- module helpers -----------------------------------------------------------------------------
def _is_guid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _bearer(req: Request) -> str:
    value = req.headers.get("Authorization") or ""
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _json_body(req: Request) -> Any:
    try:
        return req.json()
    except (ValueError, UnicodeDecodeError):
        raise GraphError(400, "BadRequest", MSG_BAD_JSON) from None


def _quote_path(path: str) -> str:
    return quote(path, safe="/$()'=,@:-_.")


def _delta_restart_link(base_link: str, select: tuple[str, ...] | None) -> str:
    # delta-query-overview.md "Synchronization reset": a Location with an empty $deltatoken, "same
    # as the initial query" (so the first request's $select comes back with it).
    prefix = f"$select={','.join(select)}&" if select else ""
    return f"{base_link}?{prefix}$deltatoken="


def _query_options(query: dict[str, str], allowed: set[str]) -> dict[str, str]:
    """System query options by lower-case name; an option the endpoint does not honour is refused
    (never silently ignored, which would make a product bug look like a success)."""
    options = {}
    for name, value in query.items():
        low = name.lower()
        if low.startswith("$"):
            if low not in allowed:
                raise GraphError(
                    400, "BadRequest", f"The query option '{name}' is not supported here by the sandbox."
                )
            options[low] = value
    return options


def _int_option(options: dict[str, str], name: str, default: int) -> int:
    if name not in options:
        return default
    try:
        return int(options[name])
    except ValueError:
        raise GraphError(400, "BadRequest", f"Invalid value '{options[name]}' for {name}.") from None


def _parse_select(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    for name in names:
        if name not in SELECTABLE:
            raise GraphError(
                400,
                "RequestBroker--ParseUri",
                f"Could not find a property named '{name}' on type 'microsoft.graph.contact'.",
            )
    return names


def _parse_expand(value: str | None) -> str | None:
    if value is None:
        return None
    match = _EXPAND_EXT.match(value)
    if not match:
        raise GraphError(
            400,
            "BadRequest",
            "Only $expand=singleValueExtendedProperties($filter=id eq '…') is supported for contacts by "
            "the sandbox.",
        )
    return _ext_key(_unquote_literal(match.group(1)))[0]


def _contact_filter(value: str | None) -> Callable[[_Contact], bool]:
    """The contact filters the sync needs; anything else is refused with Outlook's 400."""
    if value is None:
        return lambda c: True
    if match := _FILTER_EMAIL.match(value):
        # user-list-contacts.md: only emailAddresses/any(a:a/address eq '…') filters on email.
        wanted = _unquote_literal(match.group(2)).lower()
        return lambda c: any(e and (e.get("address") or "").lower() == wanted for e in c.emails)
    if match := _FILTER_EXT.match(value):
        key = _ext_key(_unquote_literal(match.group(2)))[0]
        wanted = _unquote_literal(match.group(3)).lower()
        return lambda c: key in c.extended and c.extended[key][1].lower() == wanted
    if match := _FILTER_DISPLAY_NAME.match(value):
        wanted = _unquote_literal(match.group(1)).lower()
        return lambda c: (c.props.get("displayName") or "").lower() == wanted
    if match := _FILTER_CATEGORY.match(value):
        wanted = _unquote_literal(match.group(2)).lower()
        return lambda c: any(v.lower() == wanted for v in c.props.get("categories") or [])
    raise GraphError(400, "ErrorInvalidUrlQueryFilter", MSG_BAD_FILTER)


def _batch_error(message: str) -> GraphError:
    return GraphError(400, "BadRequest", message)


def _validate_batch(payload: Any) -> list[dict]:
    """Whole-batch checks: any failure refuses the batch with 400 and runs nothing (json-batching.md)."""
    items = payload.get("requests") if isinstance(payload, dict) else None
    if not isinstance(items, list):
        raise _batch_error("Invalid batch payload format.")
    if len(items) > BATCH_MAX_REQUESTS:
        # [observed] "Number of requests inside batch exceed the limit." (live-tenant reports).
        raise _batch_error("Number of requests inside batch exceed the limit.")
    seen: dict[str, dict] = {}
    for item in items:
        if not isinstance(item, dict):
            raise _batch_error("Invalid batch payload format.")
        rid, method, url = item.get("id"), item.get("method"), item.get("url")
        if not isinstance(rid, str) or not rid or not isinstance(method, str) or not isinstance(url, str):
            raise _batch_error("Each batch request needs a string 'id', 'method' and 'url'.")
        if rid.lower() in seen:
            # [observed] ids compare case-insensitively: microsoft-graph-docs#4449,
            # msgraph-sdk-javascript#433.
            raise _batch_error(f"Request Id {rid} has to be unique in a batch.")
        seen[rid.lower()] = item
        headers = item.get("headers")
        if headers is not None and not isinstance(headers, dict):
            raise _batch_error("Invalid batch payload format.")
        has_type = any(k.lower() == "content-type" for k in (headers or {}))
        if method.upper() in ("POST", "PATCH", "PUT") and (item.get("body") is None or not has_type):
            # [observed] msgraph-sdk-dotnet#2628: the whole batch fails with this message.
            raise _batch_error(f"Write request id : {rid} does not contain Content-Type header or body.")
    depends: dict[str, str] = {}
    for item in items:
        dep = item.get("dependsOn")
        if dep is None:
            continue
        if not isinstance(dep, list) or not all(isinstance(d, str) for d in dep):
            raise _batch_error("Invalid batch payload format.")
        if len(dep) > 1:
            # known-issues/json-batching.md: a request can depend on a single other request only.
            raise _batch_error(f"Request {item['id']} can depend on one other request only.")
        if dep:
            if dep[0].lower() not in seen or dep[0].lower() == item["id"].lower():
                raise _batch_error(f"Request {item['id']} depends on unknown request {dep[0]}.")
            depends[item["id"].lower()] = dep[0].lower()
    if depends:
        _check_dependency_shape(items, depends)
    return items


def _check_dependency_shape(items: list[dict], depends: dict[str, str]) -> None:
    """Parallel, serial (one chain) or "same" (all depend on one request): the only shapes Graph runs."""
    same = len(set(depends.values())) == 1
    roots = [i["id"].lower() for i in items if i["id"].lower() not in depends]
    targets = list(depends.values())
    chain = len(roots) == 1 and len(targets) == len(set(targets))
    if chain:  # every item must hang off the single root (no cycles)
        followers = {v: k for k, v in depends.items()}
        walked, node = 1, roots[0]
        while node in followers:
            node, walked = followers[node], walked + 1
        chain = walked == len(items)
    if not (same or chain):
        raise _batch_error(
            "Batch requests with dependsOn must be fully serial or all depend on the same request."
        )


def _topological(items: list[dict]) -> list[dict]:
    by_id = {i["id"].lower(): i for i in items}
    done: set[str] = set()
    order: list[dict] = []

    def visit(item: dict) -> None:
        rid = item["id"].lower()
        if rid in done:
            return
        for dep in item.get("dependsOn") or []:
            visit(by_id[dep.lower()])
        done.add(rid)
        order.append(item)

    for item in items:
        visit(item)
    return order
