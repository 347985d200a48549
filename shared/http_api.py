"""The HTTP API of BEHAVIOUR §7: the routes of the two HTTP functions, their answers and their errors.

Power Automate's HTTP action gives up after 120 s but follows the asynchronous pattern by itself:
a `202 Accepted` with `Location` and `Retry-After` makes it poll the location until it answers 200.
So `POST /api/sync` runs the sync inline for up to `SYNC_INLINE_BUDGET_SECONDS`; a run that needs
longer is stopped cooperatively at the next batch boundary (everything written so far is linked),
handed to the Storage Queue under the same run id (`shared/jobs.py`), and the caller gets 202
pointing at the report. Every failure becomes a JSON error answer (`ErrorAnswer`), never a trace.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import azure.functions as func

from shared import runs
from shared.config import ConfigError
from shared.jobs import RUN_ID, Job
from shared.model import RunReport, RunStatus, UserSettings, ValidationError, normalize_user
from shared.planner import FULL, INCREMENTAL
from shared.poll_tokens import TokenProblem
from shared.services import Services, get_services
from shared.store import MalformedRowError, Store, StoreError
from shared.sync import RunInProgress, RunInterrupted, run_user
from shared.validate import validate_user

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
POLL_AFTER_SECONDS = 10
# After the inline budget the run is asked to stop at its next batch boundary. If that batch takes
# longer than this (heavy throttling), the answer leaves anyway and the run finishes in the background,
# so the caller always hears back within budget + grace (Power Automate gives up after 120 s).
INTERRUPT_GRACE_SECONDS = 20.0
_SYNC_FIELDS = {"user", "mode", "dryRun", "force", "wait"}
# The poll URL of a 202 (function_sync_poll, authLevel anonymous: the token is the authorization).
POLL_ROUTE = "poll"
# People's door (shared/signed_in.py): the same routes under /api/signed-in, authorized by a bearer token.
SIGNED_IN_ROUTE = "signed-in"
POLL_TOKEN_PARAM = "token"


# Responses -----------------------------------------------------------------------------------
def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, ensure_ascii=False),
        status_code=status,
        mimetype="application/json",
        headers=headers or {},
        charset="utf-8",
    )


def error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> func.HttpResponse:
    return json_response(status, {"error": {"code": code, "message": message, **extra}}, headers)


class ErrorAnswer(Exception):
    """The server's error answer to a request, raised from anywhere in a route and sent by `guarded`.

    Not to be confused with `shared.http_client.ApiError`, which is this app's failure calling BC or Graph.
    """

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
    ):
        super().__init__(message)
        self.response = error(status, code, message, headers, **extra)


def _not_allowed(allowed: str, usage: str) -> ErrorAnswer:
    return ErrorAnswer(405, "MethodNotAllowed", f"use {usage}", {"Allow": allowed})


def _body(req: func.HttpRequest) -> Any:
    raw = req.get_body() or b""
    if len(raw) > MAX_BODY:
        raise ErrorAnswer(413, "PayloadTooLarge", f"the request body must be at most {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ErrorAnswer(400, "InvalidJson", "the request body is not valid JSON") from None


def guarded(handler: Callable[..., func.HttpResponse]) -> Callable[..., func.HttpResponse]:
    """Every failure becomes a JSON error; never a stack trace, a setting value or a token."""

    def wrapper(*args: Any, **kwargs: Any) -> func.HttpResponse:
        try:
            return handler(*args, **kwargs)
        except ErrorAnswer as exc:
            return exc.response
        except ValidationError as exc:
            return error(400, "InvalidInput", str(exc), field=exc.field)
        except ConfigError as exc:
            log.error("configuration error: %s", exc)
            return error(500, "ConfigurationError", str(exc))
        except StoreError as exc:
            # StoreError messages name table and operation, never the connection string (safe to show).
            log.error("table storage error: %s", exc)
            if isinstance(exc, MalformedRowError):
                return error(500, "StoredDataInvalid", str(exc))
            return error(
                503,
                "StorageUnavailable",
                f"Table Storage failed: {exc}",
                {"Retry-After": str(POLL_AFTER_SECONDS)},
            )
        except Exception:
            log.exception("unhandled error in HTTP function")
            return error(500, "InternalError", "the request failed; see the function app's logs")

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


def _settings_or_error(store: Store, user: str) -> UserSettings:
    """The user's settings, or the 4xx that tells the caller what to do."""
    try:
        settings = store.get_settings(user)
    except MalformedRowError as exc:
        # Hand-edited in Storage: say what is wrong and how to fix it, rather than a 500.
        raise ErrorAnswer(
            409,
            "InvalidStoredSettings",
            f"the stored settings of {user} are invalid ({exc.detail}); replace them with PUT /api/users/{user}",
        ) from None
    if settings is None:
        raise ErrorAnswer(
            404, "UserNotFound", f"no sync settings for {user}; create them with PUT /api/users/{user}"
        )
    return settings


def _api_root(req: func.HttpRequest) -> tuple[str, str]:
    """(scheme://host of the caller's URL, the first path segment after /api/)."""
    base = req.url.split("?", 1)[0].split("#", 1)[0]
    if "/api/" not in base:
        return base.rstrip("/"), ""
    root, rest = base.split("/api/", 1)
    return root, rest.split("/", 1)[0]


def _location(req: func.HttpRequest, run_id: str, token: str) -> str:
    """The absolute poll URL of the run, on the host the caller used: `/api/poll/{runId}?token=`.

    It carries a poll token (shared/poll_tokens.py), never the caller's function key: Power Automate
    keeps the `Location` in the flow's run history, and a key there would open the whole API to anyone
    who can read that history. The token opens this run's status and report only, until it expires.
    """
    root, _ = _api_root(req)
    return f"{root}/api/{POLL_ROUTE}/{run_id}?{urlencode({POLL_TOKEN_PARAM: token})}"


def _accepted(req: func.HttpRequest, report: RunReport, token: str | None = None) -> func.HttpResponse:
    """202 with the poll URL; a poll passes its own token on, so the `Location` stays the same URL.

    A request through the people's door polls back at that door with the same bearer token, so it
    gets no poll token (and none is issued)."""
    root, door = _api_root(req)
    if door == SIGNED_IN_ROUTE:
        location = f"{root}/api/{SIGNED_IN_ROUTE}/sync/runs/{report.runId}"
    else:
        location = _location(req, report.runId, token or get_services().poll_tokens().issue(report.runId))
    headers = {"Location": location, "Retry-After": str(POLL_AFTER_SECONDS)}
    return json_response(202, report.to_json(), headers)


# POST /api/sync --------------------------------------------------------------------------------
def _parse_sync(body: Any) -> tuple[str, str, bool, bool, bool]:
    if not isinstance(body, dict):
        raise ErrorAnswer(400, "InvalidInput", "the body must be a JSON object")
    unknown = sorted(set(body) - _SYNC_FIELDS)
    if unknown:
        raise ValidationError(unknown[0], f"unknown field (known: {', '.join(sorted(_SYNC_FIELDS))})")
    user = normalize_user(body.get("user"))
    mode = body.get("mode", INCREMENTAL)
    if mode not in (INCREMENTAL, FULL):
        raise ValidationError("mode", "must be 'incremental' or 'full'")
    flags = []
    for name, default in (("dryRun", False), ("force", False), ("wait", True)):
        value = body.get(name, default)
        if not isinstance(value, bool):
            raise ValidationError(name, "must be true or false")
        flags.append(value)
    return user, mode, flags[0], flags[1], flags[2]


class _InlineRun:
    """One sync in a thread, so that the HTTP answer can leave when the time budget is spent.

    After the budget, `stop()` makes the next batch boundary raise `RunInterrupted` (what was written
    is linked; the queue finishes the run). If no boundary comes within the grace period, `detach()`
    lets the run finish by itself instead; the lock makes "stopped" and "detached" mutually exclusive.
    """

    def __init__(
        self,
        services: Services,
        settings: UserSettings,
        mode: str,
        dry_run: bool,
        force: bool,
        context: Any = None,
    ):
        self.run_id = uuid.uuid4().hex
        self._context = context  # the invocation's func.Context: its logs must carry the invocation id
        self.result: RunReport | None = None
        self.error: BaseException | None = None
        self._args = (services, settings, mode, dry_run, force)
        self._lock = threading.Lock()
        self._stop = self._stopped = self._detached = False
        self._thread = threading.Thread(target=self._work, name=f"sync-{self.run_id}", daemon=True)

    def _checkpoint(self, name: str) -> None:
        if name != "batch_done":
            return
        with self._lock:
            if self._stop and not self._detached:
                self._stopped = True
                raise RunInterrupted()

    def _work(self) -> None:
        services, settings, mode, dry_run, force = self._args
        if self._context is not None:
            # The worker tags a record with the invocation id of the emitting thread, and the host drops
            # records without one; a thread of our own has none unless told ("Logging from background
            # threads", learn.microsoft.com/azure/azure-functions/functions-reference-python).
            self._context.thread_local_storage.invocation_id = self._context.invocation_id
        try:
            self.result = run_user(
                services,
                settings,
                mode,
                dry_run=dry_run,
                force=force,
                run_id=self.run_id,
                checkpoint=self._checkpoint,
            )
        except BaseException as exc:  # handed to the request thread
            self.error = exc

    def run(self, budget: float, grace: float) -> bool:
        """True when the run ended (finished or stopped); False when it goes on in the background."""
        self._thread.start()
        self._thread.join(budget)
        if not self._thread.is_alive():
            return True
        with self._lock:
            self._stop = True
        self._thread.join(grace)
        if self._thread.is_alive():
            with self._lock:
                self._detached = not self._stopped
            if self._detached:
                return False
            self._thread.join()  # it has just stopped: only its report is being saved
        return True


def start_sync(req: func.HttpRequest, jobs: func.Out[str], context: Any = None) -> func.HttpResponse:
    user, mode, dry_run, force, wait = _parse_sync(_body(req))
    services = get_services()
    settings = _settings_or_error(services.store, user)
    current = services.store.current_lease(user)
    if current is not None:
        raise ErrorAnswer(409, "RunInProgress", f"a sync for {user} is already running", runId=current.holder)
    runs.settle_abandoned(services.store, user)  # nobody holds the lease: a "running" run died
    if not wait:
        report = runs.queued(user, mode, dry_run)
        services.store.save_report(report)
        jobs.set(Job(user, mode, report.runId, dry_run, force, "http").to_message())
        return _accepted(req, report)

    inline = _InlineRun(services, settings, mode, dry_run, force, context)
    ended = inline.run(services.config.inline_budget_seconds, INTERRUPT_GRACE_SECONDS)
    if not ended:
        # Still inside one batch: it finishes by itself and saves its report; the caller polls for it.
        report = services.store.get_report(inline.run_id) or RunReport(
            user=user, mode=mode, dryRun=dry_run, runId=inline.run_id
        )
        return _accepted(req, report)
    if isinstance(inline.error, RunInProgress):
        raise ErrorAnswer(409, "RunInProgress", str(inline.error), runId=inline.error.run_id)
    if inline.error is not None:
        raise inline.error
    final = inline.result
    assert final is not None
    if final.status == RunStatus.INTERRUPTED:
        # Stopped at a batch boundary: what was written is linked; the queue finishes the run.
        runs.requeue(final)
        services.store.save_report(final)
        jobs.set(Job(user, final.mode, final.runId, dry_run, force, "continuation").to_message())
        return _accepted(req, final)
    return json_response(200, final.to_json())


def _run_answer(req: func.HttpRequest, run_id: str, token: str | None = None) -> func.HttpResponse:
    store = get_services().store
    report = store.get_report(run_id)
    if report is None:
        raise ErrorAnswer(404, "RunNotFound", f"no run {run_id}")
    report = runs.as_seen(store, report)  # a run that died shows as failed; storing that is a writer's job
    if report.status in runs.IN_PROGRESS:
        return _accepted(req, report, token)
    return json_response(200, report.to_json())


def get_run(req: func.HttpRequest, run_id: str) -> func.HttpResponse:
    if not RUN_ID.match(run_id or ""):
        raise ErrorAnswer(400, "InvalidInput", "runId must be a run id as returned by POST /api/sync")
    return _run_answer(req, run_id)


_TOKEN_ANSWERS = {
    TokenProblem.MISSING: (
        "PollTokenMissing",
        "this poll URL needs the token= the 202 answer's Location gave",
    ),
    TokenProblem.INVALID: ("PollTokenInvalid", "the token does not open this run"),
    TokenProblem.EXPIRED: ("PollTokenExpired", "the token has expired"),
}


@guarded
def handle_poll(req: func.HttpRequest) -> func.HttpResponse:
    """Route of function_sync_poll: GET poll/{runId}?token=, the `Location` of a 202 (BEHAVIOUR §7.6).

    The host lets anyone in (authLevel anonymous) because the URL holds no function key; the poll token
    is checked before anything is read, so without a valid one for this very run the answer is 401
    whatever the run id, and it tells nothing about which runs exist.
    """
    if req.method != "GET":
        raise _not_allowed("GET", "GET the Location of a 202 answer")
    run_id = req.route_params.get("runId") or ""
    token = req.params.get(POLL_TOKEN_PARAM)
    problem = (
        get_services().poll_tokens().check(run_id, token) if RUN_ID.match(run_id) else TokenProblem.INVALID
    )
    if problem is not None:
        code, why = _TOKEN_ANSWERS[problem]
        raise ErrorAnswer(
            401, code, f"{why}; read the run with a function key at GET /api/sync/runs/{{runId}} instead"
        )
    return _run_answer(req, run_id, token)


@guarded
def handle_sync(req: func.HttpRequest, jobs: func.Out[str], context: Any = None) -> func.HttpResponse:
    """Route of function_sync_http: POST sync, GET sync/runs/{runId}. `context`: the invocation's
    func.Context, so that the inline run's thread logs under this invocation."""
    rest = (req.route_params.get("rest") or "").strip("/")
    if rest == "":
        if req.method != "POST":
            raise _not_allowed("POST", "POST /api/sync")
        return start_sync(req, jobs, context)
    parts = rest.split("/")
    if len(parts) == 2 and parts[0] == "runs":
        if req.method != "GET":
            raise _not_allowed("GET", "GET /api/sync/runs/{runId}")
        return get_run(req, parts[1])
    raise ErrorAnswer(404, "NotFound", "no such route under /api/sync")


# Users ---------------------------------------------------------------------------------------
@guarded
def handle_users(req: func.HttpRequest) -> func.HttpResponse:
    """Route of function_users_http: GET users, GET|PUT|DELETE users/{user}, POST users/{user}/validate."""
    rest = (req.route_params.get("rest") or "").strip("/")
    parts = [p for p in rest.split("/") if p] if rest else []
    if len(parts) > 2 or (len(parts) == 2 and parts[1] != "validate"):
        raise ErrorAnswer(404, "NotFound", "no such route under /api/users")
    if not parts:
        if req.method != "GET":
            raise _not_allowed("GET", "GET /api/users")
        users, bad = get_services().store.list_settings_checked()
        return json_response(
            200, {"users": [u.to_json() for u in users], "invalid": [{"user": k, "error": e} for k, e in bad]}
        )
    user = normalize_user(parts[0])
    if len(parts) == 2:
        if req.method != "POST":
            raise _not_allowed("POST", "POST /api/users/{user}/validate")
        services = get_services()
        return json_response(200, validate_user(services, _settings_or_error(services.store, user)))
    if req.method == "GET":
        return json_response(200, _settings_or_error(get_services().store, user).to_json())
    if req.method == "PUT":
        settings = UserSettings.from_json(_body(req), user=user)  # validated before Storage is touched
        store = get_services().store
        try:
            existed = store.get_settings(user) is not None
        except MalformedRowError:
            existed = True  # replacing a hand-broken row is exactly how to repair it
        saved = store.put_settings(settings)
        return json_response(200 if existed else 201, saved.to_json())
    if req.method == "DELETE":
        if not get_services().store.delete_settings(user):
            raise ErrorAnswer(404, "UserNotFound", f"no sync settings for {user}")
        # No body; the JSON content type keeps every answer of this API application/json.
        return func.HttpResponse(status_code=204, mimetype="application/json")
    raise _not_allowed("GET, PUT, DELETE", "GET, PUT or DELETE /api/users/{user}")
