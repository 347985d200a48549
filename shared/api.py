"""The HTTP API of SPEC §7 and the queue/timer plumbing, shared by the thin function folders.

Power Automate's HTTP action gives up after 120 s but follows the asynchronous pattern by itself:
a `202 Accepted` with `Location` and `Retry-After` makes it poll the location until it answers 200.
So `POST /api/sync` runs the sync inline for up to `SYNC_INLINE_BUDGET_SECONDS`; a run that needs
longer is stopped cooperatively at the next batch boundary (everything written so far is linked),
handed to the Storage Queue under the same run id, and the caller gets 202 pointing at the report.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import azure.functions as func

from shared.config import Config, ConfigError
from shared.model import RunReport, UserSettings, ValidationError, iso, normalize_user, utcnow
from shared.planner import FULL, INCREMENTAL

log = logging.getLogger(__name__)

QUEUE_NAME = "contact-sync-jobs"
MAX_BODY = 64 * 1024
POLL_AFTER_SECONDS = 10
MAX_DEQUEUE = 5  # host.json extensions.queues.maxDequeueCount
_SYNC_FIELDS = {"user", "mode", "dryRun", "force", "wait"}
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")

_services = None
_services_lock = threading.Lock()


def get_services():
    """The process-wide services (config, store, MSAL app, BC reader), built on first use."""
    global _services
    with _services_lock:
        if _services is None:
            from shared.sync import Services

            services = Services.from_config(Config.from_env())
            services.store.ensure_tables()
            _services = services
        return _services


def reset_services() -> None:
    """Forget the process-wide services (tests switch environments)."""
    global _services
    with _services_lock:
        _services = None


# Responses -----------------------------------------------------------------------------------
def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, ensure_ascii=False),
        status_code=status,
        mimetype="application/json",
        headers=headers or {},
        charset="utf-8",
    )


def error(status: int, code: str, message: str, **extra: Any) -> func.HttpResponse:
    return json_response(status, {"error": {"code": code, "message": message, **extra}})


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.response = error(status, code, message, **extra)


def _body(req: func.HttpRequest) -> Any:
    raw = req.get_body() or b""
    if len(raw) > MAX_BODY:
        raise HttpError(413, "PayloadTooLarge", f"the request body must be at most {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HttpError(400, "InvalidJson", "the request body is not valid JSON") from None


def guarded(handler: Callable[..., func.HttpResponse]) -> Callable[..., func.HttpResponse]:
    """Every failure becomes a JSON error; never a stack trace, a setting value or a token."""

    def wrapper(*args: Any, **kwargs: Any) -> func.HttpResponse:
        try:
            return handler(*args, **kwargs)
        except HttpError as exc:
            return exc.response
        except ValidationError as exc:
            return error(400, "InvalidInput", str(exc), field=exc.field)
        except ConfigError as exc:
            log.error("configuration error: %s", exc)
            return error(500, "ConfigurationError", str(exc))
        except Exception:
            log.exception("unhandled error in HTTP function")
            return error(500, "InternalError", "the request failed; see the function app's logs")

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


# Queue messages --------------------------------------------------------------------------------
@dataclass
class Job:
    user: str
    mode: str = INCREMENTAL
    runId: str | None = None
    dryRun: bool = False
    force: bool = False
    reason: str = "schedule"  # schedule | http | continuation

    def to_message(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_message(cls, text: str) -> Job:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a job message must be a JSON object")
        job = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        job.user = normalize_user(job.user)
        if job.mode not in (INCREMENTAL, FULL):
            raise ValueError(f"unknown mode {job.mode!r}")
        return job


def _location(req: func.HttpRequest, run_id: str) -> str:
    base = req.url.split("/api/", 1)[0]
    return f"{base}/api/sync/runs/{run_id}"


# POST /api/sync --------------------------------------------------------------------------------
def _parse_sync(body: Any) -> tuple[str, str, bool, bool, bool]:
    if not isinstance(body, dict):
        raise HttpError(400, "InvalidInput", "the body must be a JSON object")
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


def start_sync(req: func.HttpRequest, jobs: func.Out[str]) -> func.HttpResponse:
    from shared.sync import RunInProgress, RunInterrupted, run_user

    user, mode, dry_run, force, wait = _parse_sync(_body(req))
    services = get_services()
    settings = services.store.get_settings(user)
    if settings is None:
        raise HttpError(
            404, "UserNotFound", f"no sync settings for {user}; create them with PUT /api/users/{user}"
        )
    current = services.store.current_lease(user)
    if current is not None:
        raise HttpError(409, "RunInProgress", f"a sync for {user} is already running", runId=current.holder)
    report = RunReport(user=user, mode=mode, dryRun=dry_run)
    headers = {"Location": _location(req, report.runId), "Retry-After": str(POLL_AFTER_SECONDS)}
    if not wait:
        report.status = "queued"
        services.store.save_report(report)
        jobs.set(Job(user, mode, report.runId, dry_run, force, "http").to_message())
        return json_response(202, report.to_json(), headers)

    stop = threading.Event()
    done: dict[str, Any] = {}

    def checkpoint(name: str) -> None:
        if stop.is_set() and name == "batch_done":
            raise RunInterrupted()

    def work() -> None:
        try:
            done["report"] = run_user(
                services,
                settings,
                mode,
                dry_run=dry_run,
                force=force,
                run_id=report.runId,
                checkpoint=checkpoint,
            )
        except BaseException as exc:
            done["error"] = exc

    thread = threading.Thread(target=work, name=f"sync-{report.runId}", daemon=True)
    thread.start()
    thread.join(services.config.inline_budget_seconds)
    if thread.is_alive():
        stop.set()
        thread.join()
    if "error" in done:
        if isinstance(done["error"], RunInProgress):
            raise HttpError(409, "RunInProgress", str(done["error"]), runId=done["error"].run_id)
        raise done["error"]
    final: RunReport = done["report"]
    if final.status == "interrupted":
        # Stopped at a batch boundary: what was written is linked; the queue finishes the run.
        final.status = "queued"
        final.message = "continuing in the background; poll the Location for the report"
        services.store.save_report(final)
        jobs.set(Job(user, final.mode, final.runId, dry_run, force, "continuation").to_message())
        return json_response(202, final.to_json(), headers)
    return json_response(200, final.to_json())


def get_run(req: func.HttpRequest, run_id: str) -> func.HttpResponse:
    if not _RUN_ID.match(run_id or ""):
        raise HttpError(400, "InvalidInput", "runId must be a run id as returned by POST /api/sync")
    report = get_services().store.get_report(run_id)
    if report is None:
        raise HttpError(404, "RunNotFound", f"no run {run_id}")
    if report.status in ("queued", "running"):
        return json_response(
            202,
            report.to_json(),
            {"Location": _location(req, run_id), "Retry-After": str(POLL_AFTER_SECONDS)},
        )
    return json_response(200, report.to_json())


@guarded
def handle_sync(req: func.HttpRequest, jobs: func.Out[str]) -> func.HttpResponse:
    """Route of function_sync_http: POST sync, GET sync/runs/{runId}."""
    rest = (req.route_params.get("rest") or "").strip("/")
    if rest == "":
        if req.method != "POST":
            raise HttpError(405, "MethodNotAllowed", "use POST /api/sync")
        return start_sync(req, jobs)
    parts = rest.split("/")
    if len(parts) == 2 and parts[0] == "runs":
        if req.method != "GET":
            raise HttpError(405, "MethodNotAllowed", "use GET /api/sync/runs/{runId}")
        return get_run(req, parts[1])
    raise HttpError(404, "NotFound", f"no route /api/sync/{rest}")


# Users ---------------------------------------------------------------------------------------
@guarded
def handle_users(req: func.HttpRequest) -> func.HttpResponse:
    """Route of function_users_http: GET users, GET|PUT|DELETE users/{user}, POST users/{user}/validate."""
    from shared.validate import validate_user

    rest = (req.route_params.get("rest") or "").strip("/")
    parts = [p for p in rest.split("/") if p] if rest else []
    services = get_services()
    store = services.store
    if not parts:
        if req.method != "GET":
            raise HttpError(405, "MethodNotAllowed", "use GET /api/users")
        users, bad = store.list_settings_checked()
        return json_response(
            200, {"users": [u.to_json() for u in users], "invalid": [{"user": k, "error": e} for k, e in bad]}
        )
    user = normalize_user(parts[0])
    if len(parts) == 2 and parts[1] == "validate":
        if req.method != "POST":
            raise HttpError(405, "MethodNotAllowed", "use POST /api/users/{user}/validate")
        settings = store.get_settings(user)
        if settings is None:
            raise HttpError(404, "UserNotFound", f"no sync settings for {user}")
        return json_response(200, validate_user(services, settings))
    if len(parts) != 1:
        raise HttpError(404, "NotFound", f"no route /api/users/{rest}")
    if req.method == "GET":
        settings = store.get_settings(user)
        if settings is None:
            raise HttpError(404, "UserNotFound", f"no sync settings for {user}")
        return json_response(200, settings.to_json())
    if req.method == "PUT":
        settings = UserSettings.from_json(_body(req), user=user)
        existed = store.get_settings(user) is not None
        saved = store.put_settings(settings)
        return json_response(200 if existed else 201, saved.to_json())
    if req.method == "DELETE":
        if not store.delete_settings(user):
            raise HttpError(404, "UserNotFound", f"no sync settings for {user}")
        return func.HttpResponse(status_code=204)
    raise HttpError(405, "MethodNotAllowed", "use GET, PUT or DELETE /api/users/{user}")


# Timer and worker ------------------------------------------------------------------------------
def fan_out(timer: Any, jobs: func.Out[list[str]]) -> int:
    """One queue message per enabled user; the worker function runs each under its lease."""
    services = get_services()
    if getattr(timer, "past_due", False):
        log.warning("timer is past due; enqueuing one run per user now (missed ticks are not replayed)")
    users, bad = services.store.list_settings_checked()
    for key, err in bad:
        log.warning("skipping a user with invalid settings (%s): %s", key, err)
    messages = [
        Job(u.user, INCREMENTAL, None, False, False, "schedule").to_message() for u in users if u.enabled
    ]
    jobs.set(messages)
    log.info(
        "scheduled contact sync", extra={"custom_dimensions": {"users": len(messages), "invalid": len(bad)}}
    )
    return len(messages)


def work(msg: func.QueueMessage) -> RunReport | None:
    """Run one queued job. Raising makes the queue retry it, then move it to the poison queue."""
    from shared.sync import RunInProgress, run_user

    try:
        job = Job.from_message(msg.get_body().decode("utf-8"))
    except (ValueError, TypeError, ValidationError) as exc:
        log.error("dropping an unreadable job message: %s", exc)
        return None  # retrying cannot fix it
    services = get_services()
    settings = services.store.get_settings(job.user)
    if settings is None or (not settings.enabled and job.reason == "schedule"):
        log.info("job for a removed or disabled user skipped")
        return None
    attempt = int(getattr(msg, "dequeue_count", 1) or 1)
    resume = services.store.get_report(job.runId) if job.runId else None
    try:
        report = run_user(
            services,
            settings,
            job.mode,
            dry_run=job.dryRun,
            force=job.force,
            run_id=job.runId,
            reader=services.bc_reader if job.reason == "schedule" else None,
            resume=resume if resume is not None and resume.status in ("queued", "interrupted") else None,
        )
    except RunInProgress as exc:
        if job.reason == "schedule":
            log.info("scheduled run skipped: %s", exc)
            return None
        raise  # an on-demand run waits its turn through the queue's retry
    if report.status == "failed":
        if attempt >= MAX_DEQUEUE:
            report.message = f"{report.message} (gave up after {attempt} attempts; moved to the poison queue)"
            services.store.save_report(report)
        raise RuntimeError(f"sync run {report.runId} failed (attempt {attempt}): {report.message}")
    return report


def now_iso() -> str:
    return iso(utcnow())
