"""The API for people: the same routes as the function-key API, under /api/signed-in, behind a token.

Two doors to one API (BEHAVIOUR §7.7). The function-key routes (`/api/sync…`, `/api/users…`) are for
automation and operators: the Functions host checks the key before our code runs, so those routes
cannot also take a token. People call the mirror of every route under `/api/signed-in/…`, which the host
leaves anonymous and this module protects: an Entra ID access token for this app (scope
`access_as_user`, or the app role `ContactSync.Admin`), validated by `shared.identity`.

Who may do what: a person reaches only the settings row whose mailbox belongs to their token's `oid`
(the row remembers the mailbox's object id, looked up through Graph), its connection check, its runs
and syncs without `force`; they may create a row only for their own mailbox and cannot change `enabled`
or `companyId` (the admin's switches). An admin (the app role) may do everything the key allows.
Authorization is decided before anything is read for the caller or written, so a refused request
changes nothing; the request is then handed to the very handler the key door uses.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import azure.functions as func

from shared import http_api as api
from shared.http_client import ApiError, RequestCounter
from shared.identity import ADMIN_ROLE, AuthError, Principal, TokenValidator
from shared.jobs import RUN_ID
from shared.model import ValidationError, normalize_user
from shared.services import get_services

log = logging.getLogger(__name__)

PREFIX = api.SIGNED_IN_ROUTE
RUNS_LISTED = 20
_ADMIN_ONLY_FIELDS = ("enabled", "companyId", "companies")

_validators: dict[tuple[str, str, str, str], TokenValidator] = {}
_validators_lock = threading.Lock()


def validator() -> TokenValidator:
    """One validator (and so one key cache) per authority, tenant and audience in this process."""
    config = get_services().config
    key = (config.authority_host, config.tenant_id, config.api_audience, config.client_id)
    with _validators_lock:
        if key not in _validators:
            host, tenant, audience, client_id = key
            _validators[key] = TokenValidator(host, tenant, audience, client_id=client_id)
        return _validators[key]


def _refuse(status: int, code: str, message: str) -> func.HttpResponse:
    headers = {}
    if status == 401:
        # RFC 6750 §3: a 401 for a bearer-protected resource says which scheme it wants.
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"' if code == "InvalidToken" else "Bearer"
    return api.error(status, code, message, headers)


class Forbidden(api.ErrorAnswer):
    def __init__(self, message: str):
        super().__init__(403, "Forbidden", message)


def mailbox_object_id(user: str) -> str | None:
    """The Entra object id of the mailbox `user`, from Graph (GET /users/{upn}); None if unknown."""
    _, graph = get_services().clients(RequestCounter())
    try:
        found = graph.get_user(user)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
    value = found.get("id")
    return value.lower() if isinstance(value, str) else None


def owner_of(user: str) -> tuple[str | None, bool]:
    """The object id that owns `user`'s settings row, and whether the row already remembers it.

    Rows written through the key door have no owner yet: it is looked up in Graph, and remembered
    only once a request that may write has been allowed (`_remember_owner`), so neither a GET nor a
    refused request ever writes."""
    store = get_services().store
    owner = store.settings_owner(user)
    if owner is not None:
        return owner, True
    if store.get_settings(user) is None:
        return None, False
    return mailbox_object_id(user), False


def _remember_owner(user: str, owner: str) -> None:
    store = get_services().store
    settings = store.get_settings(user)
    if settings is not None:
        store.put_settings(settings, owner=owner)


def my_user(principal: Principal) -> str | None:
    """The settings row of the signed-in person, found by `oid` (never by the changeable username)."""
    store = get_services().store
    found = store.user_of_owner(principal.oid)
    if found is not None:
        return found
    # A row written through the key door before its owner was looked up: the username only says
    # which row to check; Graph's object id of that mailbox decides.
    try:
        candidate = normalize_user(principal.username)
    except ValidationError:
        return None
    if owner_of(candidate)[0] == principal.oid:
        return candidate
    return None


def _require_own(principal: Principal, user: str, method: str, creating: bool = False) -> None:
    if principal.is_admin:
        return
    owner, remembered = owner_of(user)
    if owner is None and creating:
        owner = mailbox_object_id(user)
    if owner != principal.oid:
        raise Forbidden(f"you may only reach your own sync; {ADMIN_ROLE} is needed for other users")
    if not remembered and not creating and method != "GET":
        _remember_owner(user, owner)


def _require_admin(principal: Principal, what: str) -> None:
    if not principal.is_admin:
        raise Forbidden(f"{what} needs the app role {ADMIN_ROLE}")


def _forward(req: func.HttpRequest, rest: str, body: bytes | None = None) -> func.HttpRequest:
    return func.HttpRequest(
        req.method,
        req.url,
        headers=dict(req.headers),
        params=dict(req.params),
        route_params={"rest": rest},
        body=req.get_body() if body is None else body,
    )


@api.guarded
def handle(req: func.HttpRequest, jobs: func.Out[str]) -> func.HttpResponse:
    """Route of function_signed_in_http: /api/signed-in/{me|users…|sync…}."""
    try:
        principal = validator().principal(req.headers.get("Authorization"))
    except AuthError as exc:
        return _refuse(exc.status, exc.code, exc.message)
    rest = (req.route_params.get("rest") or "").strip("/")
    parts = [p for p in rest.split("/") if p]
    if parts == ["me"]:
        if req.method != "GET":
            raise api.ErrorAnswer(405, "MethodNotAllowed", "use GET /api/signed-in/me", {"Allow": "GET"})
        return _me(principal)
    if parts and parts[0] == "users":
        return _users(req, principal, parts[1:])
    if parts and parts[0] == "sync":
        return _sync(req, jobs, principal, parts[1:])
    raise api.ErrorAnswer(404, "NotFound", "no such route under /api/signed-in")


def _me(principal: Principal) -> func.HttpResponse:
    user = my_user(principal)
    return api.json_response(
        200,
        {
            "objectId": principal.oid,
            "name": principal.name,
            "username": principal.username,
            "isAdmin": principal.is_admin,
            "user": user,
        },
    )


def _users(req: func.HttpRequest, principal: Principal, parts: list[str]) -> func.HttpResponse:
    if not parts:
        _require_admin(principal, "the list of all users")
        if req.method != "GET":
            return api.handle_users(_forward(req, ""))
        return _admin_list()
    user = normalize_user(parts[0])
    if len(parts) == 2 and parts[1] == "runs":
        _require_own(principal, user, req.method)
        if req.method != "GET":
            raise api.ErrorAnswer(405, "MethodNotAllowed", "use GET", {"Allow": "GET"})
        runs = get_services().store.list_reports(user, RUNS_LISTED, items=False)
        return api.json_response(200, {"runs": [r.to_json() for r in runs]})
    creating = req.method == "PUT" and get_services().store.get_settings(user) is None
    _require_own(principal, user, req.method, creating=creating)
    body = None
    if req.method == "PUT" and not principal.is_admin:
        body = _person_settings_body(req, user, creating)
    resp = api.handle_users(_forward(req, "/".join(parts), body))
    if req.method == "PUT" and resp.status_code in (200, 201) and creating:
        owner = mailbox_object_id(user)
        store = get_services().store
        settings = store.get_settings(user)
        if owner and settings is not None:
            store.put_settings(settings, owner=owner)
    return resp


def _person_settings_body(req: func.HttpRequest, user: str, creating: bool) -> bytes:
    """A person's PUT keeps the admin's switches (`enabled`, `companyId`, `companies`) as they are:
    which BC companies a person reads is the admin's decision (BEHAVIOUR §7.7)."""
    data = api._body(req)
    if not isinstance(data, dict):
        raise api.ErrorAnswer(400, "InvalidInput", "the body must be a JSON object")
    current = None if creating else get_services().store.get_settings(user)
    stored = (
        current.to_json() if current is not None else {"enabled": True, "companyId": None, "companies": None}
    )
    for name in _ADMIN_ONLY_FIELDS:
        if name in data and data[name] != stored.get(name):
            raise Forbidden(f"{name} is set by an admin ({ADMIN_ROLE}); leave it out or unchanged")
        data[name] = stored.get(name)
    return json.dumps(data).encode("utf-8")


def _admin_list() -> func.HttpResponse:
    store = get_services().store
    users, bad = store.list_settings_checked()
    rows: list[dict[str, Any]] = []
    for u in users:
        last = store.list_reports(u.user, 1, items=False)
        row = u.to_json()
        row["lastRun"] = (
            {
                "runId": last[0].runId,
                "status": last[0].status,
                "finishedAt": last[0].finishedAt,
                "failed": last[0].counts.get("failed", 0),
            }
            if last
            else None
        )
        rows.append(row)
    return api.json_response(200, {"users": rows, "invalid": [{"user": k, "error": e} for k, e in bad]})


def _sync(
    req: func.HttpRequest, jobs: func.Out[str], principal: Principal, parts: list[str]
) -> func.HttpResponse:
    if not parts:
        if req.method == "POST":
            data = api._body(req)
            if isinstance(data, dict):
                if data.get("force") is True:
                    _require_admin(principal, "force (past the mass-delete guard)")
                if "user" in data:
                    _require_own(principal, normalize_user(data.get("user")), req.method)
        return api.handle_sync(_forward(req, ""), jobs)
    reading_a_run = len(parts) == 2 and parts[0] == "runs" and req.method == "GET"
    if reading_a_run and not principal.is_admin and RUN_ID.match(parts[1]):
        report = get_services().store.get_report(parts[1])
        if report is not None:
            _require_own(principal, report.user, req.method)
    return api.handle_sync(_forward(req, "/".join(parts)), jobs)
