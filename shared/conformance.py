"""The live conformance check: does this tenant behave the way the engine assumes?

`python -m shared conformance --user <upn>` runs, step by step, every Graph and Business Central
behaviour the sync relies on against the customer's REAL tenant, before the first real sync, and
prints one row per assumption: what it saw and `ok`, or `differs` with what to do. Each assumption
and its Microsoft source is listed in docs/CONFORMANCE.md.

Why a separate check and not the connection check (`validate`): `validate` answers "can this app
reach this user"; this answers "does the service behave as documented", which a sandbox can only
assume. It therefore exercises writes in Outlook (a scratch folder with two scratch contacts), and
removes them again in a `finally`, also when a step fails, reporting a cleanup that did not work. It
never writes to Business Central: every BC request is a GET, or a `$batch` of GETs.

Requests go through a deliberately thin client (not `shared.http_client.HttpClient`): a conformance check
must see the raw answer (status, `Content-Type`, `Preference-Applied`) rather than a retry policy's
interpretation of it. It still honours `Retry-After` on 429/503 for requests that are safe to repeat.
Nothing it prints contains a token, a secret or the mailbox address.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from shared.auth import BC_SCOPE, GRAPH_SCOPE, AuthError, TokenProvider
from shared.bc_client import CONTACT_FIELDS, REQUIRED_FIELDS
from shared.config import Config
from shared.graph_client import IMMUTABLE_IDS, odata_string, tag_of
from shared.http_client import parse_retry_after
from shared.mapping import BC_ID_PROPERTY_ID, MAPPED_FIELDS

OK = "ok"
DIFFERS = "differs"
SCRATCH_PREFIX = "BC Contact Sync conformance"
# Small pages force the delta round to page (nextLink) with only two scratch contacts.
DELTA_PAGE = 1
# A deletion can take a moment to show in Outlook delta on a real tenant; the deltaLink is followed
# again a few times before the check says @removed never came.
DELTA_REMOVED_ATTEMPTS = 5
DELTA_REMOVED_WAIT = 2.0
# The BC contact fields the engine reads ($select) and maps (BEHAVIOUR §4.6): all must exist in $metadata.
REQUIRED_BC_FIELDS = tuple(dict.fromkeys((*CONTACT_FIELDS, *MAPPED_FIELDS)))
_RETRY = {429, 503}
_SAFE = {"GET", "PATCH", "DELETE"}


@dataclass
class Finding:
    """One row of the table: an assumption, what the tenant answered, and the verdict."""

    assumption: str
    saw: str
    ok: bool
    todo: str = ""  # what to do when it differs

    @property
    def verdict(self) -> str:
        return OK if self.ok else DIFFERS


@dataclass
class ConformanceResult:
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.findings) and all(f.ok for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "findings": [{**asdict(f), "verdict": f.verdict} for f in self.findings],
        }


class StepFailed(Exception):
    """A step got an answer it cannot build on; the message says what and what to do."""

    def __init__(self, saw: str, todo: str = ""):
        super().__init__(saw)
        self.saw = saw
        self.todo = todo


@dataclass
class Answer:
    status: int
    headers: requests.structures.CaseInsensitiveDict[str]
    text: str
    body: Any  # parsed JSON, or None

    @property
    def content_type(self) -> str:
        return str(self.headers.get("Content-Type", "")).lower()

    def error(self) -> str:
        """`status code: message` from an OData error body, else the status and content type."""
        err = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(err, dict):
            return f"{self.status} {err.get('code', '')}: {err.get('message', '')}".strip()
        return f"{self.status} ({self.content_type or 'no body'})"


class _Api:
    """One service: bearer token from MSAL, raw answers, Retry-After honoured for safe requests."""

    def __init__(
        self,
        base_url: str,
        token: Callable[[], str],
        session: requests.Session,
        sleep: Callable[[float], None],
        timeout: tuple[float, float] = (10.0, 60.0),
        attempts: int = 4,
    ):
        self._base = urlsplit(base_url.rstrip("/"))
        self._token = token
        self._session = session
        self._sleep = sleep
        self._timeout = timeout
        self._attempts = attempts

    def call(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        body: Any = None,
        safe: bool | None = None,
    ) -> Answer:
        repeatable = method.upper() in _SAFE if safe is None else safe
        target = urlsplit(url)
        if (target.scheme.lower(), target.netloc.lower()) != (
            self._base.scheme.lower(),
            self._base.netloc.lower(),
        ) or not (target.path + "/").startswith(self._base.path + "/"):
            # A nextLink/deltaLink pointing elsewhere would take the bearer token with it.
            raise StepFailed(
                f"refused to follow a link to {target.scheme}://{target.netloc}, outside the configured "
                "base URL; nothing was sent there",
                "check GRAPH_BASE_URL / BC_API_BASE_URL (sovereign cloud?) and report the answer",
            )
        for attempt in range(1, self._attempts + 1):
            hdrs = {"Authorization": f"Bearer {self._token()}", **(headers or {})}
            if body is not None:
                hdrs["Content-Type"] = "application/json"
            try:
                resp = self._session.request(
                    method,
                    url,
                    headers=hdrs,
                    params=params,
                    data=None if body is None else json.dumps(body),
                    timeout=self._timeout,
                )
            except requests.RequestException as exc:
                if repeatable and attempt < self._attempts:
                    self._sleep(min(2.0**attempt, 10.0))
                    continue
                raise StepFailed(
                    f"no answer ({type(exc).__name__})", "check the network and the base URL settings"
                ) from None
            if resp.status_code in _RETRY and repeatable and attempt < self._attempts:
                wait = parse_retry_after(resp.headers.get("Retry-After"))
                self._sleep(min(wait if wait is not None else 2.0**attempt, 30.0))
                continue
            try:
                parsed = resp.json() if "json" in resp.headers.get("Content-Type", "").lower() else None
            except ValueError:
                parsed = None
            return Answer(resp.status_code, resp.headers, resp.text, parsed)
        raise AssertionError("unreachable")  # pragma: no cover


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _roles(token: str) -> list[str]:
    """The application roles in an access token (its payload is not secret; the token is)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return []
    roles = claims.get("roles") if isinstance(claims, dict) else None
    return sorted(str(r) for r in roles) if isinstance(roles, list) else []


class Conformance:
    """Runs the checks for one mailbox. `run()` returns every finding; it never raises for a
    tenant that answers unexpectedly (that is a `differs` row), only for a bug of its own."""

    def __init__(
        self,
        config: Config,
        user: str,
        *,
        tokens: TokenProvider,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.config = config
        self.user = user
        self.tokens = tokens
        self.sleep = sleep
        session = session or requests.Session()
        self.graph = _Api(config.graph_base_url, lambda: tokens.token(GRAPH_SCOPE), session, sleep)
        self.bc = _Api(config.bc_base_url, lambda: tokens.token(BC_SCOPE), session, sleep)
        self.result = ConformanceResult()
        self._user_path = f"{config.graph_base_url}/users/{quote(user, safe='@')}"
        self.bc_root = (
            f"{config.bc_base_url}/{quote(config.tenant_id, safe='')}/"
            f"{quote(config.bc_environment, safe='')}/api/v2.0"
        )
        self.scratch_name = f"{SCRATCH_PREFIX} {secrets.token_hex(4)}"
        # What the Graph steps created; the finally block removes it.
        self.folder_id: str | None = None
        self.contact_ids: list[str] = []
        # Facts later steps build on.
        self._contacts: dict[str, str] = {}  # role ("a", "b") -> immutable id
        self._marker = str(uuid.uuid4())

    # ------------------------------------------------------------------ reporting
    def _add(self, assumption: str, saw: str, ok: bool, todo: str = "") -> bool:
        self.result.findings.append(Finding(assumption, self._scrub(saw), ok, self._scrub(todo)))
        return ok

    def _scrub(self, text: str) -> str:
        """No mailbox address or bearer token in anything printed (service messages echo them)."""
        text = re.sub(re.escape(self.user), "<user>", text, flags=re.IGNORECASE)
        return re.sub(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+", "Bearer <redacted>", text)

    @contextmanager
    def _step(self, assumption: str, todo: str) -> Iterator[None]:
        """Turn a StepFailed (or an unexpected answer shape) into a `differs` row."""
        try:
            yield
        except StepFailed as exc:
            self._add(assumption, exc.saw, False, exc.todo or todo)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            self._add(
                assumption, f"an answer of an unexpected shape ({type(exc).__name__}: {exc})", False, todo
            )

    # ------------------------------------------------------------------ the run
    def run(self) -> ConformanceResult:
        graph_ok = self._token("Graph token (client credentials)", GRAPH_SCOPE, "Contacts.ReadWrite")
        bc_ok = self._token("Business Central token (client credentials)", BC_SCOPE, "API.ReadWrite.All")
        if graph_ok:
            self._graph_checks()
        else:
            for name in GRAPH_ASSUMPTIONS:
                self._add(name, "not checked: no Graph token", False, "fix the Graph token first")
        if bc_ok:
            self._bc_checks()
        else:
            for name in BC_ASSUMPTIONS:
                self._add(name, "not checked: no Business Central token", False, "fix the BC token first")
        return self.result

    def _token(self, assumption: str, scope: str, role: str) -> bool:
        try:
            token = self.tokens.token(scope)
        except (AuthError, requests.RequestException, ValueError) as exc:
            return self._add(
                assumption,
                str(exc) if isinstance(exc, AuthError) else f"no token: {type(exc).__name__}: {exc}",
                False,
                "check SYNC_TENANT_ID, SYNC_CLIENT_ID and the secret; grant admin consent (docs/DEPLOY.md)",
            )
        roles = _roles(token)
        saw = f"token issued; roles: {', '.join(roles) or 'none'}"
        if role not in roles:
            return self._add(
                assumption,
                saw,
                False,
                f"grant the application permission {role} with admin consent in the app registration",
            )
        return self._add(assumption, saw, True)

    # ------------------------------------------------------------------ Graph
    def _graph_checks(self) -> None:
        done: set[str] = set()
        steps: list[tuple[str, Callable[[], None]]] = [
            (SCRATCH_FOLDER, self._scratch_folder),
            (EXT_EXPAND, self._ext_expand),
            (EXT_FILTER, self._ext_filter),
            (IMMUTABLE, self._immutable_ids),
            (DELTA, self._delta_and_batch),
            (DEFAULT_FOLDER, self._default_folder),
            (CATEGORIES, self._categories),
        ]
        try:
            for name, step in steps:
                before = len(self.result.findings)
                try:
                    step()
                except StepFailed as exc:
                    self._add(name, exc.saw, False, exc.todo)
                added = self.result.findings[before:]
                done.update(f.assumption for f in added)
                if name == SCRATCH_FOLDER and not all(f.ok for f in added):
                    break  # nothing below can run without the folder and its two contacts
        except Exception as exc:  # report what ran, then clean up; never leave Outlook dirty
            self._add(
                "conformance check itself", f"stopped: {type(exc).__name__}: {exc}", False, "report this"
            )
        finally:
            for name in GRAPH_ASSUMPTIONS:
                if name not in done and name != CLEANUP:
                    self._add(name, "not checked: an earlier step failed", False, "fix the step above first")
            self._cleanup()

    def _folders_url(self) -> str:
        return f"{self._user_path}/contactFolders"

    def _contacts_url(self, contact_id: str | None = None) -> str:
        url = f"{self._folders_url()}/{quote(self.folder_id or '', safe='')}/contacts"
        return url if contact_id is None else f"{url}/{quote(contact_id, safe='')}"

    def _immutable(self) -> dict[str, str]:
        return {"Prefer": IMMUTABLE_IDS}

    def _scratch_folder(self) -> None:
        todo = (
            "the sync creates and renames its folder: grant Contacts.ReadWrite for this mailbox "
            "(Exchange RBAC for Applications or an application access policy) and check the address"
        )
        made = self.graph.call("POST", self._folders_url(), body={"displayName": self.scratch_name})
        if made.status != 201 or not isinstance(made.body, dict) or not made.body.get("id"):
            raise StepFailed(f"creating a contact folder answered {made.error()}", todo)
        self.folder_id = made.body["id"]
        renamed_to = f"{self.scratch_name} renamed"
        renamed = self.graph.call(
            "PATCH",
            f"{self._folders_url()}/{quote(self.folder_id, safe='')}",
            body={"displayName": renamed_to},
        )
        if renamed.status != 200 or (renamed.body or {}).get("displayName") != renamed_to:
            raise StepFailed(f"renaming the folder answered {renamed.error()}", todo)
        self.scratch_name = renamed_to
        found = self.graph.call(
            "GET", self._folders_url(), params={"$filter": f"displayName eq {odata_string(renamed_to)}"}
        )
        ids = [f.get("id") for f in (found.body or {}).get("value", [])] if found.status == 200 else []
        if ids != [self.folder_id]:
            raise StepFailed(
                f"$filter=displayName eq … answered {found.error() if found.status != 200 else ids}",
                "the sync finds its folder by name; report this tenant's answer",
            )
        for role, name in (("a", "Conformance Alpha"), ("b", "Conformance Beta")):
            body: dict[str, Any] = {
                "givenName": "Conformance",
                "surname": name.split()[1],
                "displayName": name,
                "emailAddresses": [{"address": f"conformance.{role}@example.invalid", "name": name}],
            }
            if role == "a":
                body["singleValueExtendedProperties"] = [{"id": BC_ID_PROPERTY_ID, "value": self._marker}]
            created = self.graph.call("POST", self._contacts_url(), headers=self._immutable(), body=body)
            if created.status != 201 or not (created.body or {}).get("id"):
                raise StepFailed(f"creating a contact answered {created.error()}", todo)
            self.contact_ids.append(created.body["id"])
            self._contacts[role] = created.body["id"]
        self._add(SCRATCH_FOLDER, "created, renamed and found by name; 2 contacts created in it", True)

    def _default_folder(self) -> None:
        """`folderName: null` (BEHAVIOUR §4.8): the default folder's id is the `parentFolderId` of a
        folder under it (here the scratch folder), it answers by that id, and its delta runs in the
        documented folder form. Read only: one delta page, the user's own contacts are not touched."""
        todo = "the default Contacts folder setting (folderName null) relies on this: report this tenant's answer"
        with self._step(DEFAULT_FOLDER, todo):
            scratch = self.graph.call("GET", f"{self._folders_url()}/{quote(self.folder_id or '', safe='')}")
            parent = (scratch.body or {}).get("parentFolderId") if scratch.status == 200 else None
            if not parent:
                raise StepFailed(f"the scratch folder's parentFolderId: {scratch.error()}")
            url = f"{self._folders_url()}/{quote(parent, safe='')}"
            got = self.graph.call("GET", url)
            if got.status != 200 or (got.body or {}).get("id") != parent:
                raise StepFailed(f"GET of the default folder by its id answered {got.error()}")
            delta = self.graph.call(
                "GET",
                f"{url}/contacts/delta",
                headers={"Prefer": f"odata.maxpagesize={DELTA_PAGE}"},
                params={"$select": "id"},
            )
            links = {"@odata.nextLink", "@odata.deltaLink"} & set(delta.body or {})
            if delta.status != 200 or not links:
                raise StepFailed(f"its contacts/delta answered {delta.error()}")
            self._add(DEFAULT_FOLDER, "its id answers, and its delta pages as a folder's does", True)

    def _categories(self) -> None:
        """The sync's category goes into the master category list (BEHAVIOUR §4.8). Reading it shows
        the MailboxSettings permission reaches this mailbox; the check writes no category."""
        todo = (
            "the sync adds its Outlook category to the master category list: grant MailboxSettings.ReadWrite "
            "(the Exchange role 'Application MailboxSettings.ReadWrite', or the Graph application permission; "
            "docs/DEPLOY.md). Without it the category is still set, without a colour"
        )
        with self._step(CATEGORIES, todo):
            got = self.graph.call("GET", f"{self._user_path}/outlook/masterCategories")
            if got.status != 200 or not isinstance((got.body or {}).get("value"), list):
                raise StepFailed(f"GET outlook/masterCategories answered {got.error()}", todo)
            self._add(CATEGORIES, f"{len(got.body['value'])} categories listed", True)

    def _ext_expand(self) -> None:
        with self._step(
            EXT_EXPAND, "the sync recovers lost links from this tag: report this tenant's answer"
        ):
            got = self.graph.call(
                "GET",
                self._contacts_url(self._contacts["a"]),
                headers=self._immutable(),
                params={
                    "$expand": f"singleValueExtendedProperties($filter=id eq {odata_string(BC_ID_PROPERTY_ID)})"
                },
            )
            if got.status != 200:
                raise StepFailed(f"GET with $expand answered {got.error()}")
            value = tag_of(got.body)
            if value != self._marker:
                raise StepFailed(
                    f"the expanded property was {'missing' if value is None else 'a different value'}",
                    "the BcContactId tag written on create is not readable back: report this tenant's answer",
                )
            self._add(EXT_EXPAND, "the BcContactId value written on create came back", True)

    def _ext_filter(self) -> None:
        with self._step(EXT_FILTER, "finding a contact by its BC id needs this filter: report the answer"):
            flt = (
                f"singleValueExtendedProperties/any(ep: ep/id eq {odata_string(BC_ID_PROPERTY_ID)} "
                f"and ep/value eq {odata_string(self._marker)})"
            )
            got = self.graph.call(
                "GET", self._contacts_url(), headers=self._immutable(), params={"$filter": flt}
            )
            if got.status != 200:
                raise StepFailed(f"$filter on the extended property answered {got.error()}")
            ids = [c.get("id") for c in got.body.get("value", [])]
            if ids != [self._contacts["a"]]:
                raise StepFailed(f"the filter matched {len(ids)} contact(s) instead of the tagged one")
            self._add(EXT_FILTER, "exactly the tagged contact matched", True)

    def _immutable_ids(self) -> None:
        todo = (
            'Graph did not honour Prefer: IdType="ImmutableId": links would break when a user moves a '
            "contact. Check that the mailbox is in Exchange Online (not on-premises) and report the answer"
        )
        with self._step(IMMUTABLE, todo):
            cid = self._contacts["a"]
            plain = self.graph.call("GET", self._contacts_url(cid), params={"$select": "id"})
            pref = self.graph.call(
                "GET", self._contacts_url(cid), headers=self._immutable(), params={"$select": "id"}
            )
            if plain.status != 200 or pref.status != 200:
                raise StepFailed(f"reading the contact answered {plain.error()} / {pref.error()}")
            rest_id, immutable_id = plain.body["id"], pref.body["id"]
            applied = "immutableid" in pref.headers.get("Preference-Applied", "").replace(" ", "").lower()
            problems = []
            if immutable_id != cid:
                problems.append("the id differs from the one the create answered")
            if rest_id == immutable_id:
                problems.append("the REST id and the immutable id are the same")
            if not applied:
                problems.append('no Preference-Applied: IdType="ImmutableId"')
            # The folder was renamed after the contact was created; the id must still read it back.
            if problems:
                raise StepFailed("; ".join(problems))
            self._add(
                IMMUTABLE, "immutable id differs from the REST id, is stable and Preference-Applied", True
            )

    def _delta_and_batch(self) -> None:
        delta_url = f"{self._contacts_url()}/delta"
        headers = {"Prefer": f"{IMMUTABLE_IDS}, odata.maxpagesize={DELTA_PAGE}"}
        delta_link = ""
        first_round: str | None = None
        with self._step(DELTA, "the sync reads Outlook changes through folder delta: report the answer"):
            pages, url = 0, delta_url
            seen: set[str] = set()
            params: dict[str, str] | None = {"$select": "id,displayName"}
            while True:
                page = self.graph.call("GET", url, headers=headers, params=params)
                pages += 1
                if page.status != 200:
                    raise StepFailed(f"delta answered {page.error()}")
                seen.update(i.get("id") for i in page.body.get("value", []))
                params = None
                if page.body.get("@odata.nextLink"):
                    url = page.body["@odata.nextLink"]
                    if pages > 20:
                        raise StepFailed("more than 20 delta pages for two contacts")
                    continue
                delta_link = page.body.get("@odata.deltaLink", "")
                break
            if not delta_link:
                raise StepFailed("the last delta page carried no @odata.deltaLink")
            missing = set(self._contacts.values()) - seen
            if missing:
                raise StepFailed(
                    f"the first delta round did not return {len(missing)} of the 2 contacts by immutable id"
                )
            first_round = f"first round: {pages} page(s), both contacts"
        self._batch(first_round, delta_link, headers)

    def _graph_batch(self, items: list[tuple[str, str, str]], safe: bool = False) -> Answer:
        """A Graph `$batch` of (id, method, relative url) items, each asking for immutable ids."""
        requests_ = [
            {"id": item_id, "method": method, "url": url, "headers": {"Prefer": IMMUTABLE_IDS}}
            for item_id, method, url in items
        ]
        return self.graph.call(
            "POST", f"{self.config.graph_base_url}/$batch", body={"requests": requests_}, safe=safe
        )

    def _batch(self, first_round: str | None, delta_link: str, headers: dict[str, str]) -> None:
        todo = "the sync writes Outlook contacts through $batch: report this tenant's answer"
        deleted = False
        with self._step(BATCH, todo):
            path = self._contacts_url().removeprefix(self.config.graph_base_url)
            a, b = self._contacts["a"], self._contacts["b"]
            first = self._graph_batch(
                [
                    ("1", "GET", f"{path}/{quote(a, safe='')}?$select=id"),
                    ("2", "DELETE", f"{path}/{quote(b, safe='')}"),
                ]
            )
            statuses = self._batch_statuses(first)
            if statuses.get("2") == 204:
                deleted = True
                self.contact_ids.remove(b)
            second = self._graph_batch([("1", "GET", f"{path}/{quote(b, safe='')}")], safe=True)
            statuses2 = self._batch_statuses(second)
            want = ({"1": 200, "2": 204}, {"1": 404})
            if (statuses, statuses2) != want:
                raise StepFailed(
                    f"item statuses {statuses} then {statuses2}, expected {want[0]} then {want[1]}"
                )
            self._add(BATCH, "200 envelope; items 200 and 204, then 404 for the deleted contact", True)
        if first_round is None:
            return
        with self._step(DELTA, "the sync learns Outlook deletions from @removed in delta: report the answer"):
            if not deleted:
                raise StepFailed(f"{first_round}; @removed not checked: the $batch delete failed")
            link = delta_link
            for attempt in range(DELTA_REMOVED_ATTEMPTS):
                removed, link = self._delta_round(link, headers)
                if b in removed:
                    self._add(DELTA, f"{first_round}; then @removed for the deleted contact", True)
                    return
                if attempt + 1 < DELTA_REMOVED_ATTEMPTS:
                    self.sleep(DELTA_REMOVED_WAIT)
            raise StepFailed(f"{first_round}; no @removed entry for the contact deleted through $batch")

    def _delta_round(self, link: str, headers: dict[str, str]) -> tuple[set[str], str]:
        removed: set[str] = set()
        url = link
        for _ in range(20):
            page = self.graph.call("GET", url, headers=headers)
            if page.status != 200:
                raise StepFailed(f"following the deltaLink answered {page.error()}")
            removed.update(i.get("id") for i in page.body.get("value", []) if "@removed" in i)
            if page.body.get("@odata.nextLink"):
                url = page.body["@odata.nextLink"]
                continue
            return removed, page.body.get("@odata.deltaLink", link)
        raise StepFailed("more than 20 delta pages for one deletion")

    @staticmethod
    def _batch_statuses(answer: Answer) -> dict[str, int]:
        if answer.status != 200 or not isinstance(answer.body, dict):
            raise StepFailed(f"$batch answered {answer.error()}")
        return {str(r.get("id")): int(r.get("status", 0)) for r in answer.body.get("responses", [])}

    def _cleanup(self) -> None:
        if not self.folder_id:
            self._add(CLEANUP, "nothing was created", True)
            return
        problems = []
        for cid in list(self.contact_ids):
            try:
                gone = self.graph.call("DELETE", self._contacts_url(cid))
            except StepFailed as exc:
                problems.append(f"contact: {exc.saw}")
                continue
            if gone.status in (204, 404):
                self.contact_ids.remove(cid)
            else:
                problems.append(f"deleting a scratch contact answered {gone.error()}")
        folder_url = f"{self._folders_url()}/{quote(self.folder_id, safe='')}"
        try:
            # permanentDelete leaves nothing in Deleted Items; where it does not exist (national
            # clouds), a plain DELETE moves the folder to Deleted Items, which is still out of sight.
            gone = self.graph.call("POST", f"{folder_url}/permanentDelete", safe=True)
            if gone.status in (400, 404, 405, 501):
                gone = self.graph.call("DELETE", folder_url)
            if gone.status not in (204, 404):
                problems.append(f"deleting the scratch folder answered {gone.error()}")
            else:
                listed = self.graph.call(
                    "GET",
                    self._folders_url(),
                    params={"$filter": f"displayName eq {odata_string(self.scratch_name)}"},
                )
                if listed.status == 200 and listed.body.get("value"):
                    problems.append("the deleted folder is still listed among the contact folders")
        except StepFailed as exc:
            problems.append(f"folder: {exc.saw}")
        if problems:
            self._add(
                CLEANUP,
                "; ".join(problems),
                False,
                f"delete the contact folder '{self.scratch_name}' in Outlook by hand",
            )
        else:
            self._add(CLEANUP, "scratch folder and contacts deleted; the folder is no longer listed", True)

    # ------------------------------------------------------------------ Business Central (read only)
    def _bc_checks(self) -> None:
        company = self.config.bc_company_id
        for name, step in (
            (BC_COMPANIES, self._bc_companies),
            (BC_METADATA, self._bc_metadata),
            (BC_BATCH, self._bc_batch),
            (BC_COUNTRIES, self._bc_countries),
            (BC_PICTURES, self._bc_pictures),
            (BC_WEBHOOKS, self._bc_webhooks),
        ):
            with self._step(name, "report this tenant's answer"):
                try:
                    step(company)
                except StepFailed as exc:
                    self._add(name, exc.saw, False, exc.todo)
                except AuthError as exc:  # a token refused halfway: this row differs, the next ones run
                    self._add(name, str(exc), False, "check the app registration and its consent")

    def _bc_companies(self, company: str) -> None:
        got = self.bc.call("GET", f"{self.bc_root}/companies", headers={"Accept": "application/json"})
        if got.status != 200:
            raise StepFailed(
                f"GET companies answered {got.error()}",
                "check BC_ENVIRONMENT; in BC add the app on Microsoft Entra Applications, enable it and "
                "assign permission sets (docs/DEPLOY.md)",
            )
        companies = got.body.get("value", [])
        names = {str(c.get("id", "")).lower(): c.get("displayName") or c.get("name") for c in companies}
        if company.lower() not in names:
            listing = ", ".join(f"{cid} ({name})" for cid, name in names.items()) or "none"
            raise StepFailed(
                f"{_count(len(companies), 'company', 'companies')}; BC_COMPANY_ID is not one of them",
                f"set BC_COMPANY_ID to one of: {listing}",
            )
        self._add(
            BC_COMPANIES,
            f"{_count(len(companies), 'company', 'companies')}; the configured one is '{names[company.lower()]}'",
            True,
        )

    def _bc_metadata(self, company: str) -> None:
        got = self.bc.call("GET", f"{self.bc_root}/$metadata", headers={"Accept": "application/xml"})
        if got.status != 200:
            raise StepFailed(
                f"GET $metadata answered {got.error()}",
                "this environment does not serve …/api/v2.0/$metadata: check BC_ENVIRONMENT and "
                "BC_API_BASE_URL"
                if got.status == 404
                else "the sync cannot confirm which contact fields this BC version has; report the answer",
            )
        try:
            root = ET.fromstring(got.text)
        except ET.ParseError:
            raise StepFailed(f"$metadata is not CSDL XML ({got.content_type or 'no content type'})") from None
        # Matched by local name: the CSDL namespace is fixed by OData 4.0, but a prefix-free match
        # also reads a 4.01 document or one served with another default namespace.
        contact = next(
            (e for e in root.iter() if _local(e.tag) == "EntityType" and e.get("Name") == "contact"), None
        )
        if contact is None:
            raise StepFailed(
                "$metadata has no EntityType 'contact'", "BC API v2.0 contacts need BC 18 or later"
            )
        present = {p.get("Name") for p in contact if _local(p.tag) == "Property"}
        missing = [f for f in REQUIRED_BC_FIELDS if f not in present]
        essential = [f for f in missing if f in REQUIRED_FIELDS]
        if essential:
            raise StepFailed(
                f"the contact entity lacks {', '.join(missing)}",
                f"the sync cannot run without {', '.join(essential)}: update the environment to a current "
                "Business Central version (Admin Center) before syncing",
            )
        if missing:
            # The engine reads $metadata too and leaves such fields out in both directions.
            raise StepFailed(
                f"the contact entity lacks {', '.join(missing)}",
                f"the sync runs but leaves {', '.join(missing)} out in both directions (Outlook keeps its "
                "own value); update the environment to a current version to sync them",
            )
        self._add(
            BC_METADATA, f"all {len(REQUIRED_BC_FIELDS)} contact fields the sync uses are present", True
        )

    def _bc_batch(self, company: str) -> None:
        todo = (
            "Business Central must answer $batch in JSON (Accept: application/json, BC 17.1+): check that "
            "no proxy drops the Accept header, and report the answer"
        )
        got = self.bc.call(
            "POST",
            f"{self.bc_root}/$batch",
            headers={"Accept": "application/json"},
            body={
                "requests": [
                    {"id": "1", "method": "GET", "url": f"companies({company})?$select=id"},
                    {"id": "2", "method": "GET", "url": f"companies({company})/contacts?$select=id&$top=1"},
                ]
            },
            safe=True,
        )
        if got.status != 200:
            raise StepFailed(f"a read-only $batch answered {got.error()}", todo)
        if "application/json" not in got.content_type or not isinstance(got.body, dict):
            raise StepFailed(
                f"a read-only $batch answered {got.content_type or 'no content type'}, not JSON", todo
            )
        statuses = {str(r.get("id")): int(r.get("status", 0)) for r in got.body.get("responses", [])}
        if statuses != {"1": 200, "2": 200}:
            raise StepFailed(f"item statuses {statuses}, expected 200 for both reads", todo)
        self._add(BC_BATCH, "JSON answer, both read operations 200", True)

    def _bc_countries(self, company: str) -> None:
        got = self.bc.call(
            "GET",
            f"{self.bc_root}/companies({company})/countriesRegions",
            headers={"Accept": "application/json"},
        )
        if got.status != 200:
            raise StepFailed(
                f"GET countriesRegions answered {got.error()}",
                "countriesRegions is part of API v2.0 (BC 17+): check BC_ENVIRONMENT and the BC version"
                if got.status == 404
                else "the sync checks Outlook country names against this list: give the app's permission "
                "sets read access to Countries/Regions",
            )
        codes = [str(c["code"]) for c in got.body.get("value", []) if isinstance(c, dict) and c.get("code")]
        if not codes:
            raise StepFailed(
                "no countries/regions with a code",
                "set up Countries/Regions in Business Central: an address country cannot be stored without",
            )
        self._add(BC_COUNTRIES, f"{len(codes)} countries/regions (e.g. {', '.join(sorted(codes)[:3])})", True)

    def _bc_pictures(self, company: str) -> None:
        todo = (
            "the sync reads contacts with $expand=picture when syncPhotos is on (the default): turn it off "
            'for this company\'s users (PUT /api/users/{user} with "syncPhotos": false) and report the answer'
        )
        got = self.bc.call(
            "GET",
            f"{self.bc_root}/companies({company})/contacts?$select=id&$top=5&$expand=picture",
            headers={"Accept": "application/json"},
        )
        if got.status != 200 or not isinstance(got.body, dict):
            raise StepFailed(f"contacts with $expand=picture answered {got.error()}", todo)
        contacts = got.body.get("value", [])
        if not all(isinstance(c.get("picture"), dict) for c in contacts):
            raise StepFailed("contacts with $expand=picture came back without their picture", todo)
        with_picture = sum(
            1 for c in contacts if (c["picture"].get("contentType") or c["picture"].get("width"))
        )
        self._add(
            BC_PICTURES,
            f"{_count(len(contacts), 'contact', 'contacts')} read with their picture's metadata "
            f"({with_picture} with a picture)",
            True,
        )

    def _bc_webhooks(self, company: str) -> None:
        """Whether this BC offers contacts webhooks (BEHAVIOUR §8.3). Either answer is conformant: the
        documented list has no contacts, and without them the change poll does the job."""
        api = self.bc_root.removesuffix("/v2.0")
        got = self.bc.call(
            "GET",
            f"{api}/microsoft/runtime/beta/companies({company})/webhookSupportedResources",
            headers={"Accept": "application/json"},
        )
        if got.status != 200 or not isinstance(got.body, dict):
            raise StepFailed(
                f"GET webhookSupportedResources answered {got.error()}",
                "the app cannot tell whether contacts webhooks are offered and polls every minute instead; "
                "report the answer",
            )
        names = [str(r.get("resource", "")) for r in got.body.get("value", []) if isinstance(r, dict)]
        if "v2.0/contacts" in {n.lower() for n in names}:
            saw = "contacts listed: the app subscribes to contact changes (BEHAVIOUR §8.3)"
        else:
            saw = f"{_count(len(names), 'resource', 'resources')}, not contacts: the change poll asks every minute"
        self._add(BC_WEBHOOKS, saw, True)


# The rows, in the order they are printed.
SCRATCH_FOLDER = "Graph: scratch contact folder create/rename/find/use"
EXT_EXPAND = "Graph: BcContactId extended property via $expand"
EXT_FILTER = "Graph: $filter on the BcContactId extended property"
IMMUTABLE = 'Graph: Prefer IdType="ImmutableId" gives stable, distinct ids'
BATCH = "Graph: $batch with per-item status"
DELTA = "Graph: folder delta paging and @removed"
DEFAULT_FOLDER = "Graph: the default Contacts folder by its id, with delta"
CATEGORIES = "Graph: the master category list is readable"
CLEANUP = "Graph: cleanup of the scratch folder"
GRAPH_ASSUMPTIONS = (
    SCRATCH_FOLDER,
    EXT_EXPAND,
    EXT_FILTER,
    IMMUTABLE,
    BATCH,
    DELTA,
    DEFAULT_FOLDER,
    CATEGORIES,
    CLEANUP,
)
BC_COMPANIES = "BC: companies list holds BC_COMPANY_ID"
BC_METADATA = "BC: $metadata contact fields the mapping uses"
BC_BATCH = "BC: read-only $batch answered in JSON"
BC_COUNTRIES = "BC: countriesRegions readable"
BC_PICTURES = "BC: contacts with $expand=picture (syncPhotos)"

BC_WEBHOOKS = "BC: webhookSupportedResources (contacts webhooks or the poll)"
BC_ASSUMPTIONS = (BC_COMPANIES, BC_METADATA, BC_BATCH, BC_COUNTRIES, BC_PICTURES, BC_WEBHOOKS)


def run_conformance(config: Config, user: str, *, tokens: TokenProvider, **kw: Any) -> ConformanceResult:
    return Conformance(config, user, tokens=tokens, **kw).run()


def format_table(result: ConformanceResult) -> str:
    """The table an operator reads: assumption, what it saw, verdict (and what to do)."""
    width = max((len(f.assumption) for f in result.findings), default=10)
    lines = [f"{'assumption':<{width}}  {'verdict':<7}  saw"]
    for f in result.findings:
        lines.append(f"{f.assumption:<{width}}  {f.verdict:<7}  {f.saw}")
        if not f.ok and f.todo:
            lines.append(f"{'':<{width}}  {'':<7}  → {f.todo}")
    differs = sum(not f.ok for f in result.findings)
    lines.append("")
    lines.append(
        "All assumptions hold."
        if result.ok
        else f"{differs} assumption(s) differ: fix them before the first sync."
    )
    return "\n".join(lines)
