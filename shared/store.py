"""Table Storage: per-user settings, links, watermarks, run reports and leases (BEHAVIOUR §2, §4, §5, §7).

Everything the sync remembers between runs lives here, behind one class, so the rest of the code
never sees an entity dict, a key-encoding rule or an Azure exception. The layout, chosen so every
hot read is a single-partition query:

| table          | PartitionKey           | RowKey                          | holds                          |
|----------------|------------------------|---------------------------------|--------------------------------|
| {p}Settings    | user                   | ``settings``                    | BEHAVIOUR §5 settings, one per user |
| {p}Links       | user                   | BC contact id                   | outlookId, both hashes, email  |
| {p}State       | user                   | ``state``                       | watermarks, delta link, folder |
| {p}State       | user                   | ``changePoll``                  | the pending wake-up job (§8.1) |
| {p}State       | ``graphSubscriptions`` | subscription id                 | user, folder, clientState, expiry (§8.2) |
| {p}Runs        | ``run_`` + runId       | ``head``, ``chunk_{gen}_{n}``   | report, zlib-compressed chunks |
| {p}Runs        | ``user_`` + user       | inverted start time + runId     | per-user index with a summary  |
| {p}Leases      | user                   | ``lease``                       | holder, expiresAt              |
| {p}State       | ``bcwebhook``          | BC company id                   | webhook support, subscription  |

Keys go through `encode_key`, so a user or id may contain characters Table Storage refuses in keys.
Limits that shape the code are those of "Understanding the Table service data model"
(learn.microsoft.com/rest/api/storageservices/understanding-the-table-service-data-model): keys
without ``/ \\ # ?`` or control characters, a string property at most 64 KiB of UTF-16 (32 K
characters), a binary property at most 64 KiB, an entity at most 1 MiB; and those of "Performing
entity group transactions"
(learn.microsoft.com/rest/api/storageservices/performing-entity-group-transactions): one
partition, at most 100 entities, each entity once, at most 4 MiB per transaction.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError
from azure.data.tables import TableClient, TableServiceClient, TableTransactionError, UpdateMode

from shared.model import Link, RunReport, UserSettings, UserState, ValidationError, parse_iso, redact, utcnow

log = logging.getLogger(__name__)

TABLES = ("Settings", "Links", "State", "Runs", "Leases")
DEFAULT_PREFIX = "ContactSync"
_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{2,62}$")  # the rule as the data-model page states it
_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")

_TRANSACTION_MAX = 100  # entity group transaction limit
_PAGE = 1000  # the most entities one query response returns
_TEXT_PART = 30_000  # characters per string property: below 32 K UTF-16 units even with some non-BMP text
# Report chunks: binary properties of 60,000 bytes, 12 per row. Real Table Storage counts Edm.Binary by
# its raw length (12 x 60,000 is far below 1 MiB); Azurite measures the base64 JSON body instead, so the
# row is also kept below 1 MiB in that form (4/3 x 720,000 = 960,000 bytes).
_PART_BYTES = 60_000
_PARTS_PER_ROW = 12
_SUMMARY_MESSAGE_MAX = 2_000
_INVERTED_BASE = 10**17  # microseconds since 1970 stay below 10**16 until the year 2286

_KEY_UNSAFE = re.compile(r"[%/\\#?\x00-\x1f\x7f-\x9f]")
_KEY_ESCAPE = re.compile(r"%([0-9A-F]{2})")

_SETTINGS_RK = "settings"
_STATE_RK = "state"
_WAKE_RK = "changePoll"  # the wake-up job queued and not finished yet (the name predates notifications)
_SUBS_PK = "graphSubscriptions"  # Graph subscriptions in State: never a user key (no '@')
_SUBSCRIPTION_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")  # Graph gives GUIDs; anything else is not ours
_LEASE_RK = "lease"
_BC_WEBHOOK_PK = "bcwebhook"  # one row per BC company (BEHAVIOUR §8.3); never a user key either
_APP_PK = "app"  # the app's own rows in State: never a user key (no '@', not a GUID)
_HEAD_RK = "head"
_SETTINGS_COLUMNS = frozenset(UserSettings.JSON_FIELDS) - {"user"}
# The mailbox's Entra object id, looked up through Graph: the `oid` of the person who owns the row
# (BEHAVIOUR §7.7). Kept beside the settings, never part of them: no API caller can set it.
_OWNER_COLUMN = "objectId"
_STATE_COLUMNS = {
    "bc_watermark": "bcWatermark",
    "delta_link": "deltaLink",
    "folder_id": "folderId",
    "folder_name": "folderName",
    "company_id": "companyId",
    "settings_hash": "settingsHash",
    "last_full_sync": "lastFullSync",
    "last_run_id": "lastRunId",
    "last_status": "lastStatus",
    "writing_run": "writingRun",
    "default_folder_id": "defaultFolderId",
    "previous_folder_id": "previousFolderId",
    "categories": "categories",
    "master_category": "masterCategory",
}
# Per company of `companies` (BEHAVIOUR §5.4): {companyId: {"bcWatermark", "settingsHash"}}, as JSON.
_COMPANIES_COLUMN = "companies"
_LINK_COLUMNS = [
    "RowKey",
    "outlookId",
    "bcHash",
    "outlookHash",
    "email",
    "photo",
    "photoStamp",
    "photoEtag",
    "adopted",
]
# Table Storage holds no null: a settings row says "the default Contacts folder" with an empty
# folderName, and "no category" by the category column's absence. A row written before the category
# setting existed has no such column either, so it keeps syncing without one, as it did (BEHAVIOUR §5).
_DEFAULT_FOLDER_COLUMN = ""

T = TypeVar("T")


# --- errors -------------------------------------------------------------------------------------


class StoreError(Exception):
    """Table Storage failed. The message names the table and the operation and carries the service's
    status and error code, never the connection string or account key, so it is safe to log."""

    def __init__(self, table: str, operation: str, detail: str, status: int | None = None):
        super().__init__(f"{operation} (table {table}): {detail}")
        self.table = table
        self.operation = operation
        self.detail = detail
        self.status = status


class ConcurrencyError(StoreError):
    """Someone else wrote the row since we read it: the caller's view is stale and must not win."""


class LeaseLost(ConcurrencyError):
    """Our lease was taken over (or released) by someone else; the run must stop writing."""


class MalformedRowError(StoreError):
    """A row that does not pass validation, typically hand-edited in Storage Explorer."""


def _azure_error_text(err: AzureError) -> str:
    if isinstance(err, HttpResponseError) and err.status_code is not None:
        code = getattr(err, "error_code", None)
        code = getattr(code, "value", code)
        lines = (err.message or "").strip().splitlines()
        text = (
            f"HTTP {err.status_code}"
            + (f" {code}" if code else "")
            + (f": {lines[0][:200]}" if lines else "")
        )
        if code == "TableNotFound":
            text += " (create the tables first: Store.ensure_tables)"
        return text
    return f"cannot reach Table Storage ({type(err).__name__})"


def _status(err: AzureError) -> int | None:
    return getattr(err, "status_code", None)


def _is_missing_entity(err: HttpResponseError) -> bool:
    """404 for the row, as opposed to 404 for the whole table (which must not read as 'no row')."""
    code = getattr(err, "error_code", None)
    return err.status_code == 404 and getattr(code, "value", code) != "TableNotFound"


@contextmanager
def _storage_errors(table: str, operation: str) -> Iterator[None]:
    """Turns any Azure SDK error escaping the block into a StoreError naming table and operation."""
    try:
        yield
    except StoreError:
        raise
    except AzureError as err:
        raise StoreError(table, operation, _azure_error_text(err), _status(err)) from err


class _WriteLost(Exception):
    """A conditional write lost its race: the row was created (409), changed (412) or deleted (404)
    by another writer since it was read. The caller decides what losing means for it."""

    def __init__(self, status: int | None, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _write_if_match(client: TableClient, entity: dict[str, Any], etag: str | None) -> str:
    """The one conditional write of the store: insert when `etag` is None (the row must not exist),
    otherwise replace If-Match `etag`. Returns the new etag; raises _WriteLost when another writer got
    there first, so no caller ever overwrites what it did not read."""
    try:
        if etag is None:
            meta = client.create_entity(entity)
        else:
            meta = client.update_entity(
                entity, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
            )
    except ResourceExistsError as err:
        raise _WriteLost(409, "another writer created it first") from err
    except HttpResponseError as err:
        if err.status_code == 412:
            raise _WriteLost(412, "changed by another writer") from err
        if _is_missing_entity(err):
            raise _WriteLost(err.status_code, "deleted meanwhile") from err
        raise
    return str(meta["etag"])


# --- keys ---------------------------------------------------------------------------------------


def encode_key(value: str) -> str:
    """A PartitionKey/RowKey for `value`: the characters keys may not hold, and ``%`` itself, become
    ``%XX`` (their code point). Everything else stays readable in Storage Explorer. Reversible."""
    return _KEY_UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", value)


def decode_key(key: str) -> str:
    return _KEY_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), key)


def validate_prefix(prefix: str) -> str:
    """Table names are 3-63 letters and digits starting with a letter; checking the prefix up front
    gives a message naming the setting instead of an HTTP 400 on the first write."""
    longest = max(len(t) for t in TABLES)
    if (
        not isinstance(prefix, str)
        or not _PREFIX.match(prefix)
        or not all(_TABLE_NAME.match(prefix + t) for t in TABLES)
    ):
        raise ValueError(
            f"SYNC_TABLE_PREFIX must be 1-{63 - longest} letters or digits starting with a letter "
            f"(Azure table names are 3-63 alphanumeric characters); got {str(prefix)[:80]!r}"
        )
    return prefix


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _as_utc(value: datetime) -> datetime:
    """A plain aware datetime (the SDK returns its own datetime subclass)."""
    v = value.astimezone(UTC)
    return datetime(v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, tzinfo=UTC)


def _put_text(entity: dict[str, Any], name: str, value: str | None) -> None:
    """Stores a long text across ``name``, ``name_1``, … so a value over the 32 K-character property
    limit (a Graph delta link is usually a few KB, but nothing bounds it) still fits."""
    if value is None:
        return
    entity[name] = value[:_TEXT_PART]
    for n, start in enumerate(range(_TEXT_PART, len(value), _TEXT_PART), 1):
        entity[f"{name}_{n}"] = value[start : start + _TEXT_PART]


def _get_text(entity: dict[str, Any], name: str) -> str | None:
    value = entity.get(name)
    if value is None:
        return None
    parts, n = [value], 1
    while f"{name}_{n}" in entity:
        parts.append(entity[f"{name}_{n}"])
        n += 1
    return "".join(parts)


# --- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    """Proof that `holder` may run `user`'s sync until `expires_at`; `etag` makes renew/release
    conditional, so a holder whose lease was taken over cannot extend or delete the new one."""

    user: str
    holder: str
    expires_at: datetime
    etag: str


@dataclass(frozen=True)
class WakeMark:
    """A queued wake-up job (shared/wake.py): its run id, when it was queued, when it took the lease."""

    run_id: str
    queued_at: datetime
    started_at: datetime | None = None
    etag: str | None = field(default=None, compare=False)


@dataclass
class GraphSubscriptionRow:
    """One Graph subscription we created (BEHAVIOUR §8.2). `client_state` is the secret Graph echoes in
    every notification; it is never logged. `action`: "" (live), "renew" (reauthorization required) or
    "recreate" (Graph removed it); `safety_net_at`: when the timer last queued the user's safety-net run."""

    id: str
    user: str
    folder_id: str
    client_state: str = field(repr=False)
    expires_at: datetime
    action: str = ""
    safety_net_at: datetime | None = None


def _subscription_from(entity: Any) -> GraphSubscriptionRow | None:
    user, folder, state, expires = (entity.get(k) for k in ("user", "folderId", "clientState", "expiresAt"))
    if not all(isinstance(v, str) and v for v in (user, folder, state)) or not isinstance(expires, datetime):
        return None  # unreadable: the timer finds the user without a live subscription and makes one
    net = entity.get("safetyNetAt")
    return GraphSubscriptionRow(
        id=entity["RowKey"],
        user=user,
        folder_id=folder,
        client_state=state,
        expires_at=_as_utc(expires),
        action=str(entity.get("action") or ""),
        safety_net_at=_as_utc(net) if isinstance(net, datetime) else None,
    )


def _settings_entity(settings: UserSettings) -> dict[str, Any]:
    entity: dict[str, Any] = {"PartitionKey": encode_key(settings.user), "RowKey": _SETTINGS_RK}
    for name, value in settings.to_json().items():
        if name == "folderName" and value is None:
            value = _DEFAULT_FOLDER_COLUMN
        if name == "user" or value is None:
            continue
        json_column = name in ("filter", "companies")
        entity[name] = json.dumps(value, ensure_ascii=False, sort_keys=True) if json_column else value
    return entity


def _settings_from_entity(entity: dict[str, Any]) -> UserSettings:
    """Validates a row exactly like a PUT body (UserSettings.from_json), so a hand-edited row with a
    typo'd column, a wrong type or a bad filter is refused with the same message an API caller gets."""
    user = decode_key(entity["PartitionKey"])
    if entity["RowKey"] != _SETTINGS_RK:
        raise ValidationError("RowKey", f"must be {_SETTINGS_RK!r}")
    data: dict[str, Any] = {}
    for name, value in entity.items():
        if name in ("PartitionKey", "RowKey", _OWNER_COLUMN):
            continue
        if name not in _SETTINGS_COLUMNS:
            raise ValidationError(name, f"unknown column (known: {', '.join(sorted(_SETTINGS_COLUMNS))})")
        data[name] = value
    if data.get("folderName") == _DEFAULT_FOLDER_COLUMN:
        data["folderName"] = None
    data.setdefault("category", None)
    for name in ("filter", "companies"):
        if name in data:
            try:
                data[name] = json.loads(data[name]) if isinstance(data[name], str) else data[name]
            except ValueError:
                raise ValidationError(name, "is not valid JSON") from None
    settings = UserSettings.from_json(data, user=user)
    if settings.user != user:
        raise ValidationError("PartitionKey", f"must be the normalized user key {settings.user!r}")
    return settings


def _report_summary(report: RunReport) -> dict[str, Any]:
    summary = report.to_json()
    summary.pop("items", None)
    if isinstance(summary.get("message"), str):
        summary["message"] = summary["message"][:_SUMMARY_MESSAGE_MAX]
    return summary


def _delete_other_generations(client: Any, pk: str, generation: int) -> None:
    """Delete a report's chunk rows of every generation but `generation` (the head stays)."""
    keep = _chunk_prefix(generation)
    stale = [
        e["RowKey"]
        for e in client.query_entities(
            "PartitionKey eq @pk", parameters={"pk": pk}, select=["RowKey"], results_per_page=_PAGE
        )
        if e["RowKey"] != _HEAD_RK and not e["RowKey"].startswith(keep)
    ]
    for rk in stale:
        client.delete_entity(pk, rk)


# --- the store ----------------------------------------------------------------------------------


def pooled_transport(size: int = 64) -> Any:
    """An HTTP transport whose connection pool fits the runs of one process.

    The SDK's default pool keeps 10 connections; with more users syncing in parallel the rest are
    opened and thrown away for every call ("Connection pool is full, discarding connection").
    """
    import requests
    from azure.core.pipeline.transport import RequestsTransport
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return RequestsTransport(session=session, session_owner=False)


class Store:
    """All Table Storage access of the sync. Safe to share within a process: it holds only clients.

    `clock` is the time source for leases, injectable so tests move time instead of sleeping.
    Leases compare times from different machines, so they assume clocks within a few seconds of
    each other (Azure hosts are NTP-synced); keep lease durations far above that.
    """

    def __init__(
        self,
        service: TableServiceClient,
        prefix: str = DEFAULT_PREFIX,
        *,
        clock: Callable[[], datetime] = utcnow,
    ):
        self.prefix = validate_prefix(prefix)
        self.table_names = {kind: f"{prefix}{kind}" for kind in TABLES}
        self._service = service
        self._clock = clock
        self._clients = {kind: service.get_table_client(name) for kind, name in self.table_names.items()}

    @classmethod
    def from_connection_string(
        cls, conn_str: str, prefix: str = DEFAULT_PREFIX, *, clock: Callable[[], datetime] = utcnow
    ) -> Store:
        validate_prefix(prefix)
        try:
            # A trailing ';' is harmless in a full connection string but makes the SDK refuse the
            # common local shorthand "UseDevelopmentStorage=true;".
            service = TableServiceClient.from_connection_string(
                conn_str.strip().rstrip(";"), transport=pooled_transport()
            )
        except (ValueError, TypeError, AttributeError):
            # `from None`: the SDK's own message could quote part of the string.
            raise StoreError(
                "-", "open Table Storage", "the storage connection string is malformed"
            ) from None
        return cls(service, prefix, clock=clock)

    def _client(self, kind: str) -> tuple[TableClient, str]:
        return self._clients[kind], self.table_names[kind]

    def ensure_tables(self) -> None:
        """Creates the five tables when missing; safe to call on every start."""
        for name in self.table_names.values():
            with _storage_errors(name, "create table"):
                self._service.create_table_if_not_exists(name)

    def _get_entity(self, kind: str, pk: str, rk: str, operation: str) -> Any | None:
        client, table = self._client(kind)
        with _storage_errors(table, operation):
            try:
                return client.get_entity(pk, rk)
            except HttpResponseError as err:
                if _is_missing_entity(err):
                    return None
                raise

    # --- settings (BEHAVIOUR §5) ---------------------------------------------------------------------

    def get_settings(self, user: str) -> UserSettings | None:
        entity = self._get_entity("Settings", encode_key(user), _SETTINGS_RK, f"read settings of {user}")
        if entity is None:
            return None
        try:
            return _settings_from_entity(entity)
        except ValidationError as err:
            raise MalformedRowError(
                self.table_names["Settings"], f"read settings of {user}", str(err)
            ) from None

    def put_settings(self, settings: UserSettings, owner: str | None = None) -> UserSettings:
        """Last write wins: settings are edited by an admin, not raced by runs. The record is validated
        again first (it may have been built without from_json), so nothing invalid is ever stored.

        `owner` is the mailbox's Entra object id; without it the row keeps the owner it had."""
        settings = UserSettings.from_json(settings.to_json())
        client, table = self._client("Settings")
        entity = _settings_entity(settings)
        if owner is None:
            owner = self.settings_owner(settings.user)
        if owner:
            entity[_OWNER_COLUMN] = owner.lower()
        with _storage_errors(table, f"write settings of {settings.user}"):
            client.upsert_entity(entity, mode=UpdateMode.REPLACE)
        return settings

    def settings_owner(self, user: str) -> str | None:
        """The Entra object id remembered for the user's mailbox, if it was looked up yet."""
        entity = self._get_entity("Settings", encode_key(user), _SETTINGS_RK, f"read settings of {user}")
        value = entity.get(_OWNER_COLUMN) if entity is not None else None
        return value if isinstance(value, str) and value else None

    def user_of_owner(self, object_id: str) -> str | None:
        """The settings row (user key) whose mailbox belongs to `object_id`, if any."""
        client, table = self._client("Settings")
        with _storage_errors(table, "find settings by owner"):
            rows = client.query_entities(
                f"{_OWNER_COLUMN} eq @oid and RowKey eq @rk",
                parameters={"oid": object_id.lower(), "rk": _SETTINGS_RK},
                select=["PartitionKey"],
            )
            for row in rows:
                return decode_key(row["PartitionKey"])
        return None

    def delete_settings(self, user: str) -> bool:
        """Stops the user's sync and forgets their sync state; returns whether settings existed.

        Settings go first (that is what stops the timer from scheduling the user), then watermarks
        and links. Nothing a person made is lost: the Outlook contacts and BC contacts stay, every
        Outlook contact the sync made carries its BC id (BEHAVIOUR §4.1) so a later setup re-adopts it
        instead of duplicating it, and the run reports are kept as the audit trail. The lease is left
        to expire, so a run in progress is not joined by a second one. Idempotent: calling it again
        finishes a clean-up that was interrupted.
        """
        existed = self._get_entity("Settings", encode_key(user), _SETTINGS_RK, f"delete settings of {user}")
        for kind, rk, what in (
            ("Settings", _SETTINGS_RK, "settings"),
            ("State", _STATE_RK, "state"),
            ("State", _WAKE_RK, "wake mark"),
        ):
            client, table = self._client(kind)
            with _storage_errors(table, f"delete {what} of {user}"):
                client.delete_entity(encode_key(user), rk)
        self.delete_links(user, list(self._link_keys(user)))
        return existed is not None

    def list_settings(self) -> list[UserSettings]:
        """Valid settings only. A malformed row is logged and skipped: one bad hand edit must not stop
        the timer from syncing everybody else (use list_settings_checked to show the problem)."""
        valid, problems = self.list_settings_checked()
        for user, message in problems:
            log.warning("Skipping a malformed settings row: %s", redact(message, user))
        return valid

    def list_settings_checked(self) -> tuple[list[UserSettings], list[tuple[str, str]]]:
        """(valid settings, [(user key, problem)]) over the whole Settings table, never raising for a
        row's content."""
        client, table = self._client("Settings")
        valid: list[UserSettings] = []
        problems: list[tuple[str, str]] = []
        with _storage_errors(table, "list settings"):
            for entity in client.list_entities(results_per_page=_PAGE):
                try:
                    valid.append(_settings_from_entity(entity))
                except ValidationError as err:
                    problems.append((decode_key(entity["PartitionKey"]), str(err)))
        return valid, problems

    # --- links (BEHAVIOUR §4.1) ----------------------------------------------------------------------

    def get_links(self, user: str) -> dict[str, Link]:
        """All links of a user by BC id: one partition query, paged 1,000 at a time, only the link
        columns (about 0.5 s for 20,000 links on Azurite)."""
        client, table = self._client("Links")
        links: dict[str, Link] = {}
        with _storage_errors(table, f"read links of {user}"):
            rows = client.query_entities(
                "PartitionKey eq @pk",
                parameters={"pk": encode_key(user)},
                select=_LINK_COLUMNS,
                results_per_page=_PAGE,
            )
            for entity in rows:
                bc_id = decode_key(entity["RowKey"])
                links[bc_id] = Link(
                    bc_id=bc_id,
                    outlook_id=entity.get("outlookId") or "",
                    bc_hash=entity.get("bcHash") or "",
                    outlook_hash=entity.get("outlookHash") or "",
                    email=entity.get("email") or "",
                    etag=entity.metadata.get("etag"),
                    photo=entity.get("photo") or "",
                    photo_stamp=entity.get("photoStamp") or "",
                    photo_etag=entity.get("photoEtag") or "",
                    adopted=bool(entity.get("adopted")),
                )
        return links

    def upsert_links(self, user: str, links: Iterable[Link]) -> None:
        """Insert-or-replace in entity group transactions of 100 (one round trip per 100 links).

        Unconditional on purpose: the user's lease makes the running sync the only writer of these
        rows, and a replace must win over whatever a crashed earlier run left. A BC id given twice
        keeps its last version (a transaction may touch each entity only once). Each transaction is
        atomic; a failure part-way leaves earlier batches written, which the next run re-derives.
        Etags of the passed links are not updated; get_links returns fresh ones.
        """
        unique = {link.bc_id: link for link in links}
        pk = encode_key(user)
        ops = [
            (
                "upsert",
                {
                    "PartitionKey": pk,
                    "RowKey": encode_key(link.bc_id),
                    "outlookId": link.outlook_id,
                    "bcHash": link.bc_hash,
                    "outlookHash": link.outlook_hash,
                    "email": link.email,
                    "photo": link.photo,
                    "photoStamp": link.photo_stamp,
                    "photoEtag": link.photo_etag,
                    "adopted": link.adopted,
                },
                {"mode": UpdateMode.REPLACE},
            )
            for link in unique.values()
        ]
        client, table = self._client("Links")
        for batch in _chunks(ops, _TRANSACTION_MAX):
            with _storage_errors(table, f"write {len(batch)} links of {user}"):
                client.submit_transaction(batch)

    def delete_links(self, user: str, bc_ids: Iterable[str]) -> None:
        """Deletes in transactions of 100. Idempotent: a link that is already gone is fine. A delete of
        a missing row fails its whole transaction (404), so that batch is redone row by row."""
        pk = encode_key(user)
        keys = list(dict.fromkeys(encode_key(b) for b in bc_ids))
        client, table = self._client("Links")
        for batch in _chunks(keys, _TRANSACTION_MAX):
            with _storage_errors(table, f"delete {len(batch)} links of {user}"):
                try:
                    client.submit_transaction([("delete", {"PartitionKey": pk, "RowKey": k}) for k in batch])
                except TableTransactionError as err:
                    if err.status_code != 404:
                        raise
                    for k in batch:
                        client.delete_entity(pk, k)  # the SDK treats 404 on a single delete as done

    def _link_keys(self, user: str) -> Iterator[str]:
        client, table = self._client("Links")
        with _storage_errors(table, f"list links of {user}"):
            for e in client.query_entities(
                "PartitionKey eq @pk",
                parameters={"pk": encode_key(user)},
                select=["RowKey"],
                results_per_page=_PAGE,
            ):
                yield decode_key(e["RowKey"])

    # --- state / watermarks (BEHAVIOUR §4.3 step 4) --------------------------------------------------

    def get_state(self, user: str) -> UserState:
        """The stored state, or a fresh one (etag None) for a user who never ran."""
        entity = self._get_entity("State", encode_key(user), _STATE_RK, f"read state of {user}")
        if entity is None:
            return UserState(user=user)
        values = {attr: _get_text(entity, col) for attr, col in _STATE_COLUMNS.items()}
        companies_text = _get_text(entity, _COMPANIES_COLUMN)
        try:
            companies = json.loads(companies_text) if companies_text else {}
        except ValueError:
            raise MalformedRowError(
                "State", f"read state of {user}", f"column {_COMPANIES_COLUMN} is not valid JSON"
            ) from None
        return UserState(user=user, etag=entity.metadata.get("etag"), companies=companies, **values)

    def save_state(self, state: UserState) -> UserState:
        """Writes the state only if nobody else wrote it since `state` was read (ETag condition).

        Watermarks decide what the next run skips; if two writers could interleave, an older run could
        move a watermark back or past changes it never saw. So: insert when state.etag is None (fails
        if the row appeared meanwhile), otherwise replace If-Match the etag (fails with 412 if it
        changed, or 404 if it was deleted). Either failure raises ConcurrencyError. Returns the state
        with its new etag, ready for the next save.
        """
        entity: dict[str, Any] = {"PartitionKey": encode_key(state.user), "RowKey": _STATE_RK}
        for attr, col in _STATE_COLUMNS.items():
            _put_text(entity, col, getattr(state, attr))
        if state.companies:
            _put_text(entity, _COMPANIES_COLUMN, json.dumps(state.companies, sort_keys=True))
        client, table = self._client("State")
        operation = f"save state of {state.user}"
        with _storage_errors(table, operation):
            try:
                etag = _write_if_match(client, entity, state.etag)
            except _WriteLost as lost:
                raise ConcurrencyError(table, operation, lost.detail, lost.status) from lost.__cause__
        return replace(state, etag=etag)

    # --- the pending wake-up job (BEHAVIOUR §8.1, §8.2) ------------------------------------------------

    def get_wake_mark(self, user: str) -> WakeMark | None:
        """The job the change poll or a change notification queued for `user` that has not finished, if
        any: while it is there, nothing more is queued for the user (coalescing, shared/wake.py)."""
        entity = self._get_entity("State", encode_key(user), _WAKE_RK, f"read wake mark of {user}")
        if entity is None:
            return None
        etag = str(entity.metadata.get("etag")) if getattr(entity, "metadata", None) else None
        run_id, queued = entity.get("runId"), entity.get("queuedAt")
        if not isinstance(run_id, str) or not isinstance(queued, datetime):
            # An unreadable mark must not block the user's runs for ever: it reads as long expired.
            return WakeMark("", datetime(1970, 1, 1, tzinfo=UTC), None, etag)
        started = entity.get("startedAt")
        started_at = _as_utc(started) if isinstance(started, datetime) else None
        return WakeMark(run_id, _as_utc(queued), started_at, etag)

    def claim_wake_mark(self, user: str, run_id: str, queued_at: datetime, seen: WakeMark | None) -> bool:
        """Set the mark of a new job, but only if it is still `seen` (None: no mark): of two callers
        that saw the same mark at once (the change poll, a notification, Graph's parallel deliveries),
        one queues the job and the other learns it lost (False) and coalesces."""
        client, table = self._client("State")
        entity: dict[str, Any] = {"PartitionKey": encode_key(user), "RowKey": _WAKE_RK}
        entity.update(runId=run_id, queuedAt=_as_utc(queued_at))
        try:
            with _storage_errors(table, f"save wake mark of {user}"):
                _write_if_match(client, entity, seen.etag if seen is not None else None)
        except _WriteLost:
            return False
        return True

    def set_wake_mark(self, user: str, run_id: str, queued_at: datetime) -> None:
        """A new pending job for `user` (replaces any older mark)."""
        client, table = self._client("State")
        entity: dict[str, Any] = {"PartitionKey": encode_key(user), "RowKey": _WAKE_RK}
        entity.update(runId=run_id, queuedAt=_as_utc(queued_at))
        with _storage_errors(table, f"save wake mark of {user}"):
            client.upsert_entity(entity, mode=UpdateMode.REPLACE)

    def start_wake_mark(self, user: str, run_id: str, started_at: datetime) -> None:
        """The job `run_id` holds the user's lease now: a change notified from here on may not be in
        what it reads, so it earns one follow-up. A newer mark (a follow-up already queued) stays."""
        mark = self.get_wake_mark(user)
        if mark is None or mark.run_id != run_id:
            return
        client, table = self._client("State")
        entity: dict[str, Any] = {"PartitionKey": encode_key(user), "RowKey": _WAKE_RK}
        entity.update(runId=run_id, queuedAt=mark.queued_at, startedAt=_as_utc(started_at))
        with contextlib.suppress(_WriteLost), _storage_errors(table, f"save wake mark of {user}"):
            _write_if_match(client, entity, mark.etag)  # lost: a follow-up's mark took its place

    def clear_wake_mark(self, user: str, run_id: str) -> None:
        """Removes the mark if it is still the one of `run_id` (a newer mark stays)."""
        mark = self.get_wake_mark(user)
        if mark is None or mark.run_id != run_id:
            return
        client, table = self._client("State")
        with _storage_errors(table, f"delete wake mark of {user}"):
            client.delete_entity(encode_key(user), _WAKE_RK)

    # --- Graph change-notification subscriptions (BEHAVIOUR §8.2) ------------------------------------

    def get_subscription(self, subscription_id: str) -> GraphSubscriptionRow | None:
        """The subscription we hold under this id, or None (an unknown id, or not one Graph gives)."""
        if not _SUBSCRIPTION_ID.match(subscription_id):
            return None
        entity = self._get_entity("State", _SUBS_PK, subscription_id, "read a subscription")
        return _subscription_from(entity) if entity is not None else None

    def list_subscriptions(self) -> list[GraphSubscriptionRow]:
        client, table = self._client("State")
        with _storage_errors(table, "list subscriptions"):
            rows = client.query_entities(
                "PartitionKey eq @pk", parameters={"pk": _SUBS_PK}, results_per_page=_PAGE
            )
            found = [_subscription_from(e) for e in rows]
        return [r for r in found if r is not None]

    def subscriptions_of(self, user: str) -> list[GraphSubscriptionRow]:
        client, table = self._client("State")
        with _storage_errors(table, "list subscriptions of a user"):
            rows = client.query_entities(
                "PartitionKey eq @pk and user eq @user", parameters={"pk": _SUBS_PK, "user": user}
            )
            found = [_subscription_from(e) for e in rows]
        return [r for r in found if r is not None]

    def save_subscription(self, row: GraphSubscriptionRow) -> None:
        client, table = self._client("State")
        entity: dict[str, Any] = {
            "PartitionKey": _SUBS_PK,
            "RowKey": row.id,
            "user": row.user,
            "folderId": row.folder_id,
            "clientState": row.client_state,
            "expiresAt": _as_utc(row.expires_at),
            "action": row.action,
        }
        if row.safety_net_at is not None:
            entity["safetyNetAt"] = _as_utc(row.safety_net_at)
        with _storage_errors(table, "save a subscription"):
            client.upsert_entity(entity, mode=UpdateMode.REPLACE)

    def delete_subscription(self, subscription_id: str) -> None:
        client, table = self._client("State")
        with _storage_errors(table, "delete a subscription"):
            client.delete_entity(_SUBS_PK, subscription_id)

    # --- Business Central webhook subscriptions, one row per company (BEHAVIOUR §8.3) ---------------

    def list_bc_webhooks(self) -> dict[str, BcWebhookRow]:
        """Every company's row, by company id: one single-partition query (the notification endpoint
        and the change poll both read them all; there are as many as companies with users)."""
        client, table = self._client("State")
        rows: dict[str, BcWebhookRow] = {}
        with _storage_errors(table, "list BC webhook rows"):
            for entity in client.query_entities(
                "PartitionKey eq @pk", parameters={"pk": _BC_WEBHOOK_PK}, results_per_page=_PAGE
            ):
                row = _bc_webhook_from(entity)
                rows[row.company_id] = row
        return rows

    def save_bc_webhook(self, row: BcWebhookRow) -> None:
        client, table = self._client("State")
        entity: dict[str, Any] = {"PartitionKey": _BC_WEBHOOK_PK, "RowKey": encode_key(row.company_id)}
        for name, column in _BC_WEBHOOK_COLUMNS.items():
            value = getattr(row, name)
            if value is not None:
                entity[column] = _as_utc(value) if isinstance(value, datetime) else value
        with _storage_errors(table, "save a BC webhook row"):
            client.upsert_entity(entity, mode=UpdateMode.REPLACE)

    def delete_bc_webhook(self, company_id: str) -> None:
        client, table = self._client("State")
        with _storage_errors(table, "delete a BC webhook row"):
            client.delete_entity(_BC_WEBHOOK_PK, encode_key(company_id))

    # --- the app's own secrets (BEHAVIOUR §7.6: the poll-token key) ----------------------------------

    def app_secret(self, name: str, create: Callable[[], bytes]) -> bytes:
        """The secret `name` the app keeps for itself, created with `create()` on first use.

        Kept in the State table under the partition `app`, which no user can have (a user key holds an
        '@' or is a GUID). Created with an insert, so when two instances start at once one insert wins
        and the other reads the winner's value: every instance ends up with the same secret.
        """
        client, table = self._client("State")
        operation = f"read app secret {name}"
        entity = self._get_entity("State", _APP_PK, name, operation)
        if entity is None:
            value = create()
            with _storage_errors(table, f"create app secret {name}"):
                try:
                    client.create_entity(
                        {"PartitionKey": _APP_PK, "RowKey": name, "value": base64.b64encode(value).decode()}
                    )
                    return value
                except ResourceExistsError:
                    pass
            entity = self._get_entity("State", _APP_PK, name, operation)
        try:
            if entity is None:  # deleted between the lost insert and this read
                raise KeyError(name)
            return base64.b64decode(entity["value"], validate=True)
        except (TypeError, KeyError, ValueError, binascii.Error):
            raise MalformedRowError(
                table, operation, "the stored value is not base64; delete the row to get a new one"
            ) from None

    # --- run reports (BEHAVIOUR §7) ------------------------------------------------------------------

    def save_report(self, report: RunReport) -> None:
        """Stores (or re-stores) a report of any size; called at the start of a run and at the end.

        The JSON is zlib-compressed and cut into 60 KB binary parts, 12 per row. A re-save writes a
        new generation of chunk rows first, then flips the ``head`` row to it (the single-entity write
        that commits), then deletes every other generation, so a reader sees the old or the new report,
        never a mix, and a shrinking report leaves no stale chunks. A small index row per user (newest
        first by row key) lets list_reports read one partition instead of the table. One writer per
        run is assumed (the run's lease holder).
        """
        payload = zlib.compress(
            json.dumps(report.to_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8"), 6
        )
        parts = [payload[i : i + _PART_BYTES] for i in range(0, len(payload), _PART_BYTES)]
        rows = list(_chunks(parts, _PARTS_PER_ROW))
        pk = _run_pk(report.runId)
        client, table = self._client("Runs")
        operation = f"save report {report.runId}"
        head = self._get_entity("Runs", pk, _HEAD_RK, operation)
        generation = int(head.get("generation", 0)) + 1 if head else 1
        index_rk = self._index_rk(report)
        with _storage_errors(table, operation):
            for n, row in enumerate(rows):
                entity: dict[str, Any] = {"PartitionKey": pk, "RowKey": _chunk_rk(generation, n)}
                entity.update({f"p{i:02d}": part for i, part in enumerate(row)})
                client.upsert_entity(entity, mode=UpdateMode.REPLACE)
            client.upsert_entity(
                {
                    "PartitionKey": pk,
                    "RowKey": _HEAD_RK,
                    "runId": report.runId,
                    "user": report.user,
                    "status": report.status,
                    "generation": generation,
                    "chunks": len(rows),
                    "bytes": len(payload),
                    "indexKey": index_rk,
                },
                mode=UpdateMode.REPLACE,
            )
            client.upsert_entity(
                {
                    "PartitionKey": _user_pk(report.user),
                    "RowKey": index_rk,
                    "runId": report.runId,
                    "status": report.status,
                    "startedAt": report.startedAt,
                    "summary": json.dumps(_report_summary(report), ensure_ascii=False),
                },
                mode=UpdateMode.REPLACE,
            )
            if head and head.get("indexKey") and head.get("user") and head["indexKey"] != index_rk:
                client.delete_entity(_user_pk(head["user"]), head["indexKey"])
            _delete_other_generations(client, pk, generation)

    def get_report(self, run_id: str) -> RunReport | None:
        client, table = self._client("Runs")
        operation = f"read report {run_id}"
        pk = _run_pk(run_id)
        # A concurrent re-save may flip the head between our read of it and of its chunks; the chunks
        # of the generation we saw are then gone, and re-reading sees the new one.
        for _attempt in range(3):
            with _storage_errors(table, operation):
                rows = {
                    e["RowKey"]: e
                    for e in client.query_entities(
                        "PartitionKey eq @pk", parameters={"pk": pk}, results_per_page=_PAGE
                    )
                }
            head = rows.get(_HEAD_RK)
            if head is None:
                return None
            try:
                chunk_rows = [
                    rows.get(_chunk_rk(int(head["generation"]), n)) for n in range(int(head["chunks"]))
                ]
            except (KeyError, TypeError, ValueError):
                raise MalformedRowError(
                    table, operation, "the report's head row lacks generation/chunks"
                ) from None
            present = [row for row in chunk_rows if row is not None]
            if len(present) != len(chunk_rows):
                continue
            payload = b"".join(
                row[f"p{i:02d}"] for row in present for i in range(_PARTS_PER_ROW) if f"p{i:02d}" in row
            )
            try:
                return RunReport.from_json(json.loads(zlib.decompress(payload)))
            except (zlib.error, ValueError, TypeError) as err:
                raise MalformedRowError(table, operation, f"stored report is unreadable ({err})") from None
        raise ConcurrencyError(table, operation, "the report kept changing while being read")

    def list_reports(
        self, user: str, limit: int = 20, *, items: bool = True, status: str | None = None
    ) -> list[RunReport]:
        """The user's latest reports, newest first. With items=False only the index partition is read
        and the reports come back without their item lists (counts are complete): enough for a list.
        `status` keeps only the reports whose index row has that status (filtered by the service)."""
        if limit <= 0:
            return []
        client, table = self._client("Runs")
        query, parameters = "PartitionKey eq @pk", {"pk": _user_pk(user)}
        if status is not None:
            query, parameters = f"{query} and status eq @status", {**parameters, "status": str(status)}
        with _storage_errors(table, f"list reports of {user}"):
            rows = list(
                islice(
                    client.query_entities(
                        query,
                        parameters=parameters,
                        select=["runId", "summary"],
                        results_per_page=min(limit, _PAGE),
                    ),
                    limit,
                )
            )
        if not items:
            return [RunReport.from_json(json.loads(row["summary"])) for row in rows]
        reports = (self.get_report(row["runId"]) for row in rows)
        return [r for r in reports if r is not None]

    def _index_rk(self, report: RunReport) -> str:
        try:
            started = parse_iso(report.startedAt)
        except (ValueError, TypeError, AttributeError):
            started = self._clock()
        micros = (started - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        return f"{_INVERTED_BASE - micros:017d}_{encode_key(report.runId)}"

    # --- leases (BEHAVIOUR §4.5: one run per user at a time) -----------------------------------------

    def current_lease(self, user: str) -> Lease | None:
        """Who is running this user's sync now, or None when nobody holds an unexpired lease."""
        entity = self._get_entity("Leases", encode_key(user), _LEASE_RK, f"read lease of {user}")
        if entity is None:
            return None
        lease = _lease_from(user, entity)
        return lease if lease.expires_at > self._clock() else None

    def acquire_lease(self, user: str, holder: str, duration_s: float) -> Lease | None:
        """The lease for `holder`, or None while someone else holds an unexpired one.

        Every write is conditional, so exactly one of several racers wins: a free lease is taken with
        an insert (409 if another racer inserted first) and an expired one with a replace If-Match
        the etag we read (412 if another racer replaced it first). A loser re-reads and then sees the
        winner's unexpired lease. Acquiring again as the same holder extends the lease.
        """
        if duration_s <= 0:
            raise ValueError("lease duration must be positive")
        client, table = self._client("Leases")
        operation = f"acquire lease of {user}"
        pk = encode_key(user)
        for _attempt in range(4):
            entity = self._get_entity("Leases", pk, _LEASE_RK, operation)
            now = self._clock()
            if entity is not None:
                current = _lease_from(user, entity)
                if current.holder != holder and current.expires_at > now:
                    return None
            expires = now + timedelta(seconds=duration_s)
            new = {"PartitionKey": pk, "RowKey": _LEASE_RK, "holder": holder, "expiresAt": expires}
            with _storage_errors(table, operation):
                try:
                    etag = _write_if_match(client, new, None if entity is None else entity.metadata["etag"])
                except _WriteLost:
                    continue  # another racer wrote first: re-read and see its lease
            return Lease(user, holder, _as_utc(expires), etag)
        return None

    def renew_lease(self, lease: Lease, duration_s: float) -> Lease:
        """Extends our lease, If-Match its etag. Succeeds even after expiry if nobody took it over
        (no one else can have run meanwhile); raises LeaseLost if it was taken over or released."""
        client, table = self._client("Leases")
        operation = f"renew lease of {lease.user} for {lease.holder}"
        expires = self._clock() + timedelta(seconds=duration_s)
        entity = {
            "PartitionKey": encode_key(lease.user),
            "RowKey": _LEASE_RK,
            "holder": lease.holder,
            "expiresAt": expires,
        }
        with _storage_errors(table, operation):
            try:
                etag = _write_if_match(client, entity, lease.etag)
            except _WriteLost as lost:
                raise LeaseLost(
                    table, operation, "the lease was taken over or released", lost.status
                ) from lost.__cause__
        return Lease(lease.user, lease.holder, _as_utc(expires), etag)

    def release_lease(self, lease: Lease) -> None:
        """Deletes our lease If-Match its etag: a lease someone else took over is theirs and stays.
        No error when it is already gone or no longer ours."""
        client, table = self._client("Leases")
        with _storage_errors(table, f"release lease of {lease.user} for {lease.holder}"):
            try:
                client.delete_entity(
                    encode_key(lease.user),
                    _LEASE_RK,
                    etag=lease.etag,
                    match_condition=MatchConditions.IfNotModified,
                )
            except HttpResponseError as err:
                if err.status_code != 412:
                    raise


@dataclass
class BcWebhookRow:
    """What the app knows about one company's Business Central contacts webhook (BEHAVIOUR §8.3).

    `supported`/`checked_at`: the answer of `webhookSupportedResources` and when it was read (read
    again daily). The subscription fields are BC's (`subscriptionId`, `@odata.etag`,
    `expirationDateTime`) plus the random `client_state` the app chose for it and the
    `notification_url` it was made for; `verified_at` is when BC last confirmed it exists.
    """

    company_id: str
    supported: bool | None = None
    checked_at: datetime | None = None
    subscription_id: str | None = None
    client_state: str | None = field(default=None, repr=False)
    etag: str | None = None
    expires_at: datetime | None = None
    verified_at: datetime | None = None
    notification_url: str | None = None

    def forget_subscription(self) -> None:
        self.subscription_id = self.client_state = self.etag = None
        self.expires_at = self.verified_at = self.notification_url = None


_BC_WEBHOOK_COLUMNS = {
    "supported": "supported",
    "checked_at": "checkedAt",
    "subscription_id": "subscriptionId",
    "client_state": "clientState",
    "etag": "bcEtag",
    "expires_at": "expiresAt",
    "verified_at": "verifiedAt",
    "notification_url": "notificationUrl",
}


def _bc_webhook_from(entity: Any) -> BcWebhookRow:
    """A row as stored; a value of the wrong type reads as absent (the upkeep then starts afresh)."""
    row = BcWebhookRow(decode_key(entity["RowKey"]))
    for name, column in _BC_WEBHOOK_COLUMNS.items():
        value = entity.get(column)
        if name == "supported":
            row.supported = value if isinstance(value, bool) else None
        elif name.endswith("_at"):
            setattr(row, name, _as_utc(value) if isinstance(value, datetime) else None)
        else:
            setattr(row, name, value if isinstance(value, str) and value else None)
    return row


def _lease_from(user: str, entity: Any) -> Lease:
    return Lease(user, entity["holder"], _as_utc(entity["expiresAt"]), entity.metadata["etag"])


def _run_pk(run_id: str) -> str:
    return f"run_{encode_key(run_id)}"


def _user_pk(user: str) -> str:
    return f"user_{encode_key(user)}"


def _chunk_prefix(generation: int) -> str:
    return f"chunk_{generation:06d}_"


def _chunk_rk(generation: int, n: int) -> str:
    return f"{_chunk_prefix(generation)}{n:04d}"
