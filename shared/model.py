"""Records that travel between the modules: settings, links, per-user state, run reports.

Contacts themselves stay as the JSON dicts the two APIs speak (BC API v2.0 field names, Graph
contact field names): the mapping module is the one place that knows both shapes, and keeping the
raw dicts means nothing an API returns is lost on the way through.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Any, ClassVar
from urllib.parse import quote

from shared.errors import ValidationError as ValidationError  # re-exported: callers import it from here too
from shared.filters import parse_filter

DEFAULT_FOLDER = "Business Central"
# The Outlook category every synced contact carries (BEHAVIOUR §5 `category`), unless set otherwise.
DEFAULT_CATEGORY = "Business Central"

# A mailbox address (UPN) or an Entra object id, as strict as Entra itself: the user name allows only
# A-Z a-z 0-9 ' . - _ ! # ^ ~, at most 64 characters, not ending (nor, here, starting) with a period;
# the domain at most 48 characters; the whole at most 113 ("Password policies and account restrictions
# in Microsoft Entra ID", UserPrincipalName requirements). Anything else ('/', '?', '%', '&', '=', '+',
# '{', '}', '|', '$', non-ASCII, ...) is not a UPN Entra can hold, so it is refused before it reaches a
# Graph URL or a Table key rather than made harmless by escaping further down.
UPN_MAX = 113
UPN_USER_MAX = 64
UPN_DOMAIN_MAX = 48
_UPN_USER_RE = re.compile(r"^[A-Za-z0-9'._!#^~-]+$")
_UPN_DOMAIN_RE = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# Characters Outlook does not allow in a folder name, plus control characters.
_BAD_FOLDER_CHARS = re.compile(r"[\x00-\x1f\x7f/\\]")


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime) -> str:
    """UTC timestamp as the APIs write it (ISO 8601 with Z)."""
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def earliest(current: str | None, candidate: str | None) -> str | None:
    """The earlier of two timestamps, compared as times. Never as text: BC trims the fraction's zeros
    ("…:47.5Z", "…:47Z"), so "…:47Z" sorts after "…:47.1Z" and "…:47.5Z" after "…:47.50001Z"."""
    if not candidate:
        return current
    if not current or parse_iso(candidate) < parse_iso(current):
        return candidate
    return current


def user_hash(user: str) -> str:
    """How logs name a user: Application Insights gets no mailbox addresses."""
    return hashlib.sha256(user.encode()).hexdigest()[:16]


def redact(text: str, user: str) -> str:
    """`text` for a log record: the mailbox address, plain or percent-encoded (it appears in the
    Graph paths that error messages name), replaced by the user's hash, which is how logs name users."""
    if not user:
        return text
    tag = f"<user {user_hash(user)}>"
    for form in sorted({user, quote(user, safe="@"), quote(user, safe="")}, key=len, reverse=True):
        text = re.sub(re.escape(form), tag, text, flags=re.IGNORECASE)
    return text


def log_fields(fields: dict[str, Any]) -> str:
    """A structured log record's fields as compact JSON, for the end of the message (`event {...}`).

    The Functions Python worker sends Application Insights only the formatted message: `extra` never
    becomes customDimensions (Azure/azure-functions-python-worker#1327), and the host stores the message
    verbatim in `traces.message`. So the fields travel in the message, and the workbook and alert
    queries read them with `parse_json(substring(message, strlen("event ")))`. Only ids, hashes,
    counts and reasons go in: never an address, a token or a secret.
    """
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False, default=str)


def _upn_problem(v: str) -> str | None:
    """Why `v` is not a user principal name Entra accepts, or None when it is one."""
    if v.count("@") != 1:
        return "must be a mailbox address (UPN) such as alice@contoso.com, with exactly one '@', or an object id (GUID)"
    name, domain = v.split("@")
    if len(v) > UPN_MAX:
        return f"must be at most {UPN_MAX} characters (Entra's limit for a user principal name)"
    if not name or len(name) > UPN_USER_MAX:
        return f"the part before '@' must be 1-{UPN_USER_MAX} characters"
    if not _UPN_USER_RE.match(name):
        return "the part before '@' may hold only letters A-Z, digits and ' . - _ ! # ^ ~"
    if name.startswith(".") or name.endswith("."):
        return "the part before '@' must not start or end with a period"
    if not domain or len(domain) > UPN_DOMAIN_MAX:
        return f"the domain after '@' must be 1-{UPN_DOMAIN_MAX} characters"
    if not _UPN_DOMAIN_RE.match(domain):
        return "the domain after '@' must be a domain name such as contoso.com (letters, digits, '-', '.')"
    return None


def normalize_user(value: Any) -> str:
    """The canonical key of a user: a lower-cased UPN or GUID. Raises ValidationError otherwise.

    The rules are Entra's own for a user principal name (see `_upn_problem`), so every mailbox a
    tenant can have is accepted and nothing else reaches a URL path, a Graph request or a Table key.
    The message says which rule the value breaks but never repeats the value.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValidationError("user", "a mailbox address (UPN) or Entra object id is required")
    v = value.strip()
    if _GUID_RE.match(v):
        return v.lower()
    problem = _upn_problem(v)
    if problem:
        raise ValidationError("user", problem)
    return v.lower()


def normalize_company_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _GUID_RE.match(value.strip()):
        raise ValidationError("companyId", "must be a Business Central company id (GUID) or null")
    return value.strip().lower()


def normalize_folder_name(value: Any) -> str | None:
    """A subfolder's name, or None: the user's default Contacts folder (the one phones show)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(
            "folderName", "must be a non-empty text, or null for the default Contacts folder"
        )
    v = value.strip()
    if len(v) > 255:
        raise ValidationError("folderName", "must be at most 255 characters")
    if _BAD_FOLDER_CHARS.search(v):
        raise ValidationError("folderName", "must not contain control characters, '/' or '\\'")
    return v


# The text rules of a category name (BEHAVIOUR §5): Graph's outlookCategory displayName is "a unique
# name that identifies a category in the user's mailbox" (outlookCategory resource type); Outlook for
# Windows joins an item's categories with the list separator (AssignToCategoryRuleAction.Categories),
# so a name holding ',' or ';' would come back as two categories there.
CATEGORY_MAX = 255
_BAD_CATEGORY_CHARS = re.compile(r"[\x00-\x1f\x7f,;]")
MAX_COMPANIES = 20  # one delta per run, but one BC read per company: a bound on what a run may cost


def normalize_category(value: Any, name: str = "category") -> str | None:
    """A category name as the user typed it (trimmed), or None for "no category"."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(name, "must be a non-empty text or null")
    v = value.strip()
    if len(v) > CATEGORY_MAX:
        raise ValidationError(name, f"must be at most {CATEGORY_MAX} characters")
    if _BAD_CATEGORY_CHARS.search(v):
        raise ValidationError(
            name, "must not contain control characters, ',' or ';' (Outlook splits categories there)"
        )
    return v


def _filter_document(value: Any, name: str) -> dict[str, str]:
    """A filter object as today's `filter` setting takes it; errors name `name` (e.g. companies[1].filter)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(name, "must be an object of field → Business Central filter expression")
    try:
        parse_filter(value)
    except ValidationError as exc:
        inner = exc.field.removeprefix("filter")  # parse_filter names "filter.<field>"
        raise ValidationError(
            f"{name}{inner if inner.startswith('.') else '.' + inner}", exc.message
        ) from None
    return dict(value)


@dataclass(frozen=True)
class CompanySetting:
    """One entry of `companies` (BEHAVIOUR §5.4): a BC company, its filter and its Outlook category.

    `category_given` tells "category": null (no category) from an entry without "category" (the
    company's display name, read from BC's companies endpoint when the run needs it)."""

    company_id: str
    filter: dict[str, str] = field(default_factory=dict)
    category: str | None = None
    category_given: bool = False

    @classmethod
    def from_json(cls, data: Any, where: str) -> CompanySetting:
        if not isinstance(data, dict):
            raise ValidationError(
                where, "must be an object with companyId, and optionally filter and category"
            )
        unknown = sorted(set(data) - {"companyId", "filter", "category"})
        if unknown:
            raise ValidationError(
                f"{where}.{unknown[0]}", "unknown field (known: companyId, filter, category)"
            )
        if data.get("companyId") is None:
            raise ValidationError(f"{where}.companyId", "is required: the Business Central company id (GUID)")
        value = data["companyId"]
        if not isinstance(value, str) or not _GUID_RE.match(value.strip()):
            raise ValidationError(f"{where}.companyId", "must be a Business Central company id (GUID)")
        return cls(
            company_id=value.strip().lower(),
            filter=_filter_document(data.get("filter"), f"{where}.filter"),
            category=normalize_category(data.get("category"), f"{where}.category"),
            category_given="category" in data,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"companyId": self.company_id, "filter": dict(self.filter)}
        if self.category_given:
            out["category"] = self.category
        return out


def normalize_companies(value: Any) -> tuple[CompanySetting, ...] | None:
    """The `companies` list, or None when it is null (then companyId and filter apply, as before)."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ValidationError(
            "companies", "must be a non-empty list of {companyId, filter, category} or null"
        )
    if len(value) > MAX_COMPANIES:
        raise ValidationError("companies", f"must list at most {MAX_COMPANIES} companies")
    entries = tuple(CompanySetting.from_json(item, f"companies[{n}]") for n, item in enumerate(value))
    seen: dict[str, int] = {}
    categories: dict[str, int] = {}
    for n, entry in enumerate(entries):
        if entry.company_id in seen:
            raise ValidationError(
                f"companies[{n}].companyId", f"lists the same company as companies[{seen[entry.company_id]}]"
            )
        seen[entry.company_id] = n
        if entry.category is not None:
            key = entry.category.casefold()
            if key in categories:
                raise ValidationError(
                    f"companies[{n}].category",
                    f"is the category of companies[{categories[key]}] too; each company needs its own "
                    "(a new Outlook contact goes to the company whose category it carries)",
                )
            categories[key] = n
    return entries


@dataclass(frozen=True)
class Scope:
    """One BC company a user syncs, with its filter and category: what the planner plans for at once.

    `UserSettings.scopes()` gives one per company of `companies`, or a single one from `companyId`
    and `filter` when `companies` is absent (`listed` False: the user's settings as before issue 12).
    `category`: the Outlook category of the company's contacts; `category_default` says it is the
    company's display name, which only BC knows (resolved by the run when it needs it)."""

    company_id: str
    filter: dict[str, str]
    category: str | None = None
    category_default: bool = False
    listed: bool = False


@dataclass(frozen=True)
class UserSettings:
    """One salesperson's sync setup (BEHAVIOUR §5)."""

    user: str
    enabled: bool = True
    company_id: str | None = None
    folder_name: str | None = DEFAULT_FOLDER  # None: the default Contacts folder
    filter: dict[str, str] = field(default_factory=dict)
    pull_new_from_outlook: bool = True
    pull_edits_from_outlook: bool = False
    remove_from_outlook: bool = True
    sync_photos: bool = True  # BC's picture ↔ the Outlook contact's photo (BEHAVIOUR §4.6, shared/photos.py)
    # Several BC companies (BEHAVIOUR §5.4); None: `company_id` and `filter` say the one company.
    companies: tuple[CompanySetting, ...] | None = None
    category: str | None = DEFAULT_CATEGORY  # None: synced contacts get no category

    JSON_FIELDS: ClassVar[dict[str, str]] = {
        "user": "user",
        "enabled": "enabled",
        "companyId": "company_id",
        "folderName": "folder_name",
        "filter": "filter",
        "pullNewFromOutlook": "pull_new_from_outlook",
        "pullEditsFromOutlook": "pull_edits_from_outlook",
        "removeFromOutlook": "remove_from_outlook",
        "syncPhotos": "sync_photos",
        "companies": "companies",
        "category": "category",
    }

    @classmethod
    def from_json(cls, data: Any, user: str | None = None) -> UserSettings:
        """Validate a settings document. Unknown fields are refused so a typo never goes unnoticed.

        `user`, when given (e.g. from the URL), must agree with the body's `user` if that is present.
        """
        if not isinstance(data, dict):
            raise ValidationError("body", "must be a JSON object")
        unknown = sorted(set(data) - set(cls.JSON_FIELDS))
        if unknown:
            raise ValidationError(unknown[0], f"unknown setting (known: {', '.join(cls.JSON_FIELDS)})")
        body_user = data.get("user")
        if user is not None and body_user is not None and normalize_user(body_user) != normalize_user(user):
            raise ValidationError("user", "does not match the user in the URL")
        key = normalize_user(user if user is not None else body_user)
        kwargs: dict[str, Any] = {"user": key}
        for name in (
            "enabled",
            "pullNewFromOutlook",
            "pullEditsFromOutlook",
            "removeFromOutlook",
            "syncPhotos",
        ):
            if name in data:
                if not isinstance(data[name], bool):
                    raise ValidationError(name, "must be true or false")
                kwargs[cls.JSON_FIELDS[name]] = data[name]
        if "companyId" in data:
            kwargs["company_id"] = normalize_company_id(data["companyId"])
        if "folderName" in data:
            kwargs["folder_name"] = normalize_folder_name(data["folderName"])
        if "category" in data:
            kwargs["category"] = normalize_category(data["category"], "category")
        if "filter" in data and data["filter"] is not None:
            filter_document = data["filter"]
            if not isinstance(filter_document, dict):
                raise ValidationError(
                    "filter", "must be an object of field → Business Central filter expression"
                )
            parse_filter(filter_document)  # raises ValidationError naming the field
            kwargs["filter"] = dict(filter_document)
        if data.get("companies") is not None:
            clash = [name for name in ("companyId", "filter", "category") if data.get(name) not in (None, {})]
            if clash:
                raise ValidationError(
                    "companies",
                    f"cannot be combined with {' or '.join(clash)}: give each company's filter and "
                    "category inside companies, or use companyId, filter and category without companies",
                )
            kwargs["companies"] = normalize_companies(data["companies"])
            # Each company names its own category; the top-level one says nothing (null in JSON).
            kwargs["category"] = None
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        out = {j: getattr(self, a) for j, a in self.JSON_FIELDS.items()}
        out["companies"] = None if self.companies is None else [c.to_json() for c in self.companies]
        return out

    def scopes(self, default_company: str) -> list[Scope]:
        """The companies this user syncs, in the order of the settings (the first takes new Outlook
        contacts without a company's category). `default_company`: BC_COMPANY_ID, for users
        without `companyId`."""
        if self.companies is None:
            return [Scope((self.company_id or default_company).lower(), dict(self.filter), self.category)]
        return [
            Scope(
                c.company_id,
                dict(c.filter),
                c.category,
                category_default=not c.category_given,
                listed=True,
            )
            for c in self.companies
        ]

    @property
    def in_default_folder(self) -> bool:
        """`folderName: null`: the sync shares the user's default Contacts folder with their own
        contacts, so it changes or removes only what it manages (BEHAVIOUR §4.8)."""
        return self.folder_name is None


@dataclass
class Link:
    """Ties one BC contact to one Outlook contact for one user (BEHAVIOUR §4.1).

    The hashes are of the mapped view of each side as last written or seen, so a later run can tell
    "this side changed since we last agreed" from "nothing happened" without asking either API.
    """

    bc_id: str
    outlook_id: str
    bc_hash: str = ""
    outlook_hash: str = ""
    email: str = ""
    etag: str | None = None  # Table Storage etag, for conditional writes
    # Photos (shared/photos.py): the hash of the picture both sides last agreed on ("" never checked,
    # "none" no picture), and the BC contact's etag when that was known, so an unchanged contact
    # costs no picture request.
    photo: str = ""
    photo_stamp: str = ""
    photo_etag: str = ""  # the Outlook photo's media etag when the hash was agreed ("" unknown)
    # The Outlook contact was the user's own before the sync linked it (matched by email): when it
    # stops being synced it is released (tag and category removed), never deleted (BEHAVIOUR §4.8).
    adopted: bool = False


@dataclass
class UserState:
    """Per-user watermarks and the Outlook folder we own."""

    user: str
    bc_watermark: str | None = None  # ISO UTC: BC lastModifiedDateTime already synced
    delta_link: str | None = None  # full Graph deltaLink URL of the folder
    folder_id: str | None = None
    folder_name: str | None = None
    company_id: str | None = None
    settings_hash: str | None = None  # filter/scope the links were built under
    last_full_sync: str | None = None
    last_run_id: str | None = None
    last_status: str | None = None
    # Set while a run writes and cleared when it completes: if it is still set, that run stopped
    # midway, and contacts it created may since have vanished from Outlook without the delta query
    # saying so (delta leaves out items created and deleted between two rounds): reconcile fully.
    writing_run: str | None = None
    # Per company of `companies` (BEHAVIOUR §5.4): companyId → {"bcWatermark", "settingsHash"}. The
    # fields above keep serving a user without `companies`, and the company its bare tags belong to.
    companies: dict[str, dict[str, str]] = field(default_factory=dict)
    # The default Contacts folder's id, once known (it never changes: the folder cannot be deleted).
    default_folder_id: str | None = None
    # A move between folders in progress (BEHAVIOUR §4.8): the folder the synced contacts are leaving.
    # Kept until a run empties it of them without a failure, so a run that stops midway is finished.
    previous_folder_id: str | None = None
    # JSON list of the categories the sync wrote: any that is no longer the current one is removed.
    categories: str | None = None
    # The category known to exist in the master category list ("!name": creating it was refused).
    master_category: str | None = None
    etag: str | None = None


class ActionKind(Enum):
    """What one planned action does, with the run report's count key and whether it writes.

    The one list of action kinds: the planner decides them, the executor routes each (exhaustively:
    a kind it does not know cannot reach it) and the report counts them under `report_key` ("" for
    actions the report does not count). `writes`: the action may change Outlook or Business Central,
    so a run about to apply it marks itself as writing (BEHAVIOUR §4.5).
    """

    # The order is the order of the report's counts (their JSON is compared byte for byte).
    CREATE_OUTLOOK = ("create_outlook", "outlookCreated", True)
    UPDATE_OUTLOOK = ("update_outlook", "outlookUpdated", True)
    DELETE_OUTLOOK = ("delete_outlook", "outlookDeleted", True)
    RECREATE_OUTLOOK = ("recreate_outlook", "outlookRecreated", True)
    CREATE_BC = ("create_bc", "bcCreated", True)
    UPDATE_BC = ("update_bc", "bcUpdated", True)
    LINK = ("link", "linked", True)  # adopt an Outlook contact, with BC's values when they differ
    # After a BC write: its BC id tag and BC's values onto the Outlook contact; counted with that write.
    TAG_OUTLOOK = ("tag_outlook", "", True)
    # Stop syncing a user's own contact (adopted): remove our tag and category, keep the contact.
    RELEASE_OUTLOOK = ("release_outlook", "", True)
    REFRESH_LINK = ("refresh_link", "", False)  # both sides agree again: store the new hashes
    UNLINK = ("unlink", "", False)  # stop syncing a contact, leaving Outlook alone

    report_key: str
    writes: bool

    def __new__(cls, value: str, report_key: str, writes: bool) -> ActionKind:
        member = object.__new__(cls)
        member._value_ = value
        member.report_key = report_key
        member.writes = writes
        return member


ACTIONS = (
    *(kind.report_key for kind in ActionKind if kind.report_key),
    "skipped",
    "failed",
)
# The counts that stand for a write to Outlook or BC. "linked" is not one: an adoption may write nothing.
WRITE_ACTIONS = tuple(
    kind.report_key for kind in ActionKind if kind.writes and kind.report_key and kind is not ActionKind.LINK
)


PHOTO_COUNTS = ("toOutlook", "toBc", "notCopied")


@dataclass
class ReportItem:
    action: str  # one of ACTIONS (or "unlinked", "safetyStop" for report-only items)
    bcId: str | None = None
    outlookId: str | None = None
    email: str | None = None
    reason: str | None = None
    # The contact's display name, so a person reading the report recognises it (ids mean nothing to
    # them); filled in at the end of the run from the records it read (sync._name_items).
    name: str | None = None
    # The BC company the item belongs to, by its display name, for a user with `companies`
    # (BEHAVIOUR §5.4); absent for a user with one company.
    company: str | None = None


class RunStatus(StrEnum):
    """What a run report says about its run. The values are what JSON, Table Storage and the OpenAPI
    definition carry; how a run moves between them is `shared/runs.py`."""

    QUEUED = "queued"
    RUNNING = "running"
    INTERRUPTED = "interrupted"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    SAFETY_STOP = "safetyStop"
    SKIPPED = "skipped"  # the CLI's run of several users: this one was already running (never stored)


@dataclass
class RunReport:
    """The run report of BEHAVIOUR §7, built as the run goes and persisted at the end."""

    user: str
    mode: str
    dryRun: bool = False
    runId: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: RunStatus = RunStatus.RUNNING
    startedAt: str = field(default_factory=lambda: iso(utcnow()))
    finishedAt: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ACTIONS, 0))
    items: list[ReportItem] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=lambda: {"bc": 0, "graph": 0})
    # Pictures copied this run (BEHAVIOUR §4.6): BC → Outlook, Outlook → BC, and not copied (each
    # of those is also an item "photoSkipped" with the reason).
    photos: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHOTO_COUNTS, 0))
    message: str | None = None

    def __post_init__(self) -> None:
        # A status read back from JSON is a plain string; an unknown one is refused (ValueError).
        self.status = RunStatus(self.status)

    def add(
        self,
        action: str,
        bc_id: str | None = None,
        outlook_id: str | None = None,
        email: str | None = None,
        reason: str | None = None,
    ) -> None:
        if action in self.counts:
            self.counts[action] += 1
        self.items.append(ReportItem(action, bc_id, outlook_id, email, reason))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value  # the plain string, as stored and answered
        for item in data["items"]:
            if item.get("company") is None:
                item.pop("company", None)  # a user with one company: the report is as before
        if data.get("message") is None:
            data.pop("message", None)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunReport:
        items = [ReportItem(**i) for i in data.get("items", [])]
        fields = {k: v for k, v in data.items() if k != "items"}
        return cls(items=items, **fields)
