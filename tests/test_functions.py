"""The function folders called the way the Functions host calls them (issue 4).

Timer → Storage Queue (a real Azurite queue) → worker; the inline-or-202 sync of `POST /api/sync`
continued by the worker under the same run id; every function.json against its `main`; and the
logs a run leaves for Application Insights.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import typing
from datetime import timedelta

import azure.functions as func
import pytest
from azure.functions import meta
from azure.functions.timer import TimerRequest

import function_sync_http
import function_sync_timer
import function_sync_worker
import function_users_http
from sandbox.azurite import DEV_KEY
from shared import http_api
from shared.jobs import MAX_DEQUEUE, QUEUE_NAME
from shared.model import RunReport, iso, utcnow
from shared.services import get_services, reset_services
from shared.sync import LEASE_SECONDS, user_hash
from tests.local_host import ROOT, Collector, function_folders, host_json
from tests.world import tag

ALICE = "alice@contoso.example"
BOB = "bob@contoso.example"
CAROL = "carol@contoso.example"


def _people(world, n: int, prefix: str = "Person") -> list[dict]:
    return [world.person(f"{prefix} {i:03d} Sample") for i in range(n)]


def _tick(past_due: bool = False) -> list[str]:
    """One timer tick: what the timer function hands its queue output binding."""
    jobs = Collector()
    function_sync_timer.main(TimerRequest(past_due=past_due), jobs)
    return jobs.messages()


def _report(run_id: str) -> RunReport:
    report = get_services().store.get_report(run_id)
    assert report is not None, run_id
    return report


def _post(
    path: str,
    body: dict | bytes | None = None,
    jobs: Collector | None = None,
    context: func.Context | None = None,
    **params: str,
):
    """POST through function_sync_http's main, as the host calls it for `sync/{*rest}`."""
    raw = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
    rest = path.removeprefix("sync").strip("/")
    req = func.HttpRequest(
        "POST",
        f"https://contoso-sync.azurewebsites.net/api/{path}",
        params=params,
        route_params={"rest": rest},
        body=raw,
    )
    resp = function_sync_http.main(req, jobs or Collector(), context)
    return resp.status_code, json.loads(resp.get_body() or b"null"), resp.headers


def _get_run(run_id: str):
    req = func.HttpRequest(
        "GET",
        f"https://contoso-sync.azurewebsites.net/api/sync/runs/{run_id}",
        route_params={"rest": f"runs/{run_id}"},
        body=b"",
    )
    resp = function_sync_http.main(req, Collector())
    return resp.status_code, json.loads(resp.get_body()), resp.headers


# Timer → queue → worker ------------------------------------------------------------------------
def test_timer_fans_out_to_enabled_users_and_the_worker_syncs_each(world, queue, caplog):
    people = _people(world, 6)
    for upn in (ALICE, BOB):
        world.user(upn)
    world.user(CAROL, enabled=False)
    caplog.set_level(logging.INFO)

    messages = _tick(past_due=True)
    assert sorted(json.loads(m)["user"] for m in messages) == [ALICE, BOB]
    assert any("past due" in r.getMessage() for r in caplog.records)
    queue.send(messages)
    attempts = queue.drain(function_sync_worker.main)

    assert [a.error for a in attempts] == [None, None]
    want = {p["email"] for p in people}
    for upn in (ALICE, BOB):
        assert set(world.outlook_by_email(upn)) == want
    assert world.folder_id(CAROL) is None and world.cloud.graph.find_folder(CAROL, "Business Central") is None
    for m in messages:
        report = _report(json.loads(m)["runId"])
        assert report.status == "succeeded" and report.counts["outlookCreated"] == 6

    # The next tick: nothing changed, so nothing is written.
    queue.send(_tick())
    attempts = queue.drain(function_sync_worker.main)
    assert len(attempts) == 2
    for a in attempts:
        report = _report(a.job["runId"])
        assert report.mode == "incremental" and report.counts["outlookCreated"] == 0


def test_a_user_disabled_after_the_tick_is_skipped_by_the_worker(world, queue):
    _people(world, 2)
    world.user(ALICE)
    messages = _tick()
    world.user(ALICE, enabled=False)
    queue.send(messages)
    attempts = queue.drain(function_sync_worker.main)
    assert [a.error for a in attempts] == [None]
    assert world.folder_id(ALICE) is None


def test_failing_user_is_retried_then_poisoned_with_the_reason_in_its_report(world, queue):
    _people(world, 3)
    world.user(ALICE)
    world.user(BOB)
    world.cloud.graph.remove_mailbox(BOB)  # licence removed: Graph has no mailbox for Bob any more

    queue.send(_tick())
    attempts = queue.drain(function_sync_worker.main)

    bob = [a for a in attempts if a.job["user"] == BOB]
    assert [a.dequeue_count for a in bob] == [1, 2, 3, 4, 5]
    assert all(a.error is not None for a in bob) and [a.poisoned for a in bob] == [False] * 4 + [True]
    assert queue.poisoned() == [bob[0].body]
    report = _report(bob[0].job["runId"])  # every attempt of one job shares its run report
    assert report.status == "failed"
    assert "gave up after 5 attempts" in report.message and "poison" in report.message
    assert "mailbox" in report.message.lower()

    alice = [a for a in attempts if a.job["user"] == ALICE]
    assert [(a.dequeue_count, a.error) for a in alice] == [(1, None)]
    assert len(world.outlook_by_email(ALICE)) == 3


def test_max_dequeue_count_agrees_with_host_json():
    assert host_json()["extensions"]["queues"]["maxDequeueCount"] == MAX_DEQUEUE


def test_scheduled_run_becomes_a_full_reconcile_when_the_last_one_is_too_old(world, queue, monkeypatch):
    monkeypatch.setenv("SYNC_FULL_SYNC_HOURS", "6")
    reset_services()
    world.person("Pat Buyer", jobTitle="Buyer")
    world.user(ALICE)
    queue.send(_tick())
    queue.drain(function_sync_worker.main)
    [o] = world.outlook(ALICE)
    # Drift an incremental run leaves alone: an edit made in Outlook (BC is the source).
    world.cloud.graph.user_update_contact(
        ALICE, world.folder_id(ALICE), o["id"], jobTitle="Edited in Outlook"
    )

    queue.send(_tick())
    [attempt] = queue.drain(function_sync_worker.main)
    assert _report(attempt.job["runId"]).mode == "incremental"
    assert world.outlook(ALICE)[0]["jobTitle"] == "Edited in Outlook"

    store = world.services.store
    state = store.get_state(ALICE)
    state.last_full_sync = iso(utcnow() - timedelta(hours=7))
    store.save_state(state)
    queue.send(_tick())
    [attempt] = queue.drain(function_sync_worker.main)
    report = _report(attempt.job["runId"])
    assert report.mode == "full" and "full reconcile" in report.message
    assert report.counts["outlookUpdated"] == 1
    assert world.outlook(ALICE)[0]["jobTitle"] == "Buyer"


def test_unreadable_and_malformed_jobs_are_dropped_not_retried(world, queue, caplog):
    world.user(ALICE)
    queue.send(["not json", json.dumps({"user": "not a user"}), json.dumps({"user": ALICE, "mode": "x"})])
    attempts = queue.drain(function_sync_worker.main)
    assert [a.error for a in attempts] == [None, None, None]
    assert queue.poisoned() == []


def _break_settings_row(world, user: str, **columns) -> None:
    """Hand-edit a settings row in Storage, as someone with Storage Explorer might."""
    from azure.data.tables import TableServiceClient, UpdateMode

    from shared.store import encode_key

    service = TableServiceClient.from_connection_string(world.env["AzureWebJobsStorage"])
    table = service.get_table_client(world.services.store.table_names["Settings"])
    entity = table.get_entity(encode_key(user), "settings")
    entity.update(columns)
    table.upsert_entity(entity, mode=UpdateMode.REPLACE)


def test_a_hand_broken_settings_row_is_skipped_by_timer_and_worker(world, queue, caplog):
    _people(world, 2)
    world.user(ALICE)
    world.user(BOB)
    messages = _tick()
    _break_settings_row(world, BOB, filter=json.dumps({"city": "Oslo..Bergen..Trondheim"}))
    queue.send(messages)
    attempts = queue.drain(function_sync_worker.main)
    assert [a.error for a in attempts] == [None, None]  # a retry cannot repair the row
    assert len(world.outlook(ALICE)) == 2 and world.folder_id(BOB) is None

    caplog.set_level(logging.WARNING)
    assert [json.loads(m)["user"] for m in _tick()] == [ALICE]
    assert any(
        "invalid settings" in r.getMessage() and "filter.city" in r.getMessage() for r in caplog.records
    )


# POST /api/sync through the function ------------------------------------------------------------
def test_inline_sync_answers_200_with_the_report(world):
    _people(world, 3)
    world.user(ALICE)
    status, body, _ = _post("sync", {"user": ALICE, "mode": "full"})
    assert status == 200
    assert body["status"] == "succeeded" and body["counts"]["outlookCreated"] == 3
    assert body["user"] == ALICE and body["mode"] == "full" and body["dryRun"] is False
    assert {"runId", "startedAt", "finishedAt", "items", "requests"} <= set(body)


def test_a_run_beyond_the_budget_answers_202_and_the_worker_finishes_it(world, queue, monkeypatch):
    people = _people(world, 100)
    world.user(ALICE)
    monkeypatch.setenv("SYNC_INLINE_BUDGET_SECONDS", "1")
    reset_services()
    world.cloud.graph.faults.latency = 0.08  # every Graph request and batch item takes 80 ms

    jobs = Collector()
    status, body, headers = _post("sync", {"user": ALICE, "mode": "full"}, jobs, code="the-function-key")
    world.cloud.graph.faults.latency = 0.0
    assert status == 202, body
    run_id = body["runId"]
    # The poll URL holds a poll token for this run, never the caller's function key (BEHAVIOUR §7.6).
    assert headers["Location"].startswith(f"https://contoso-sync.azurewebsites.net/api/poll/{run_id}?token=")
    assert "the-function-key" not in headers["Location"] and "code=" not in headers["Location"]
    assert int(headers["Retry-After"]) > 0
    assert body["status"] == "queued"
    folder = world.cloud.graph.find_folder(ALICE, "Business Central")
    part = len(world.cloud.graph.folder_contacts(ALICE, folder["id"]))
    assert 0 < part < 100  # stopped at a batch boundary, with what it wrote already there

    status, polled, headers = _get_run(run_id)
    assert status == 202 and polled["status"] == "queued" and "Retry-After" in headers

    [message] = jobs.messages()
    assert json.loads(message)["runId"] == run_id
    queue.send([message])
    [attempt] = queue.drain(function_sync_worker.main)
    assert attempt.error is None

    status, report, _ = _get_run(run_id)
    assert status == 200
    assert report["status"] == "succeeded" and report["runId"] == run_id
    assert report["counts"]["outlookCreated"] == 100 and report["counts"]["failed"] == 0
    outlook = world.outlook_by_email(ALICE)  # asserts no duplicates
    assert set(outlook) == {p["email"] for p in people}
    assert {tag(c) for c in outlook.values()} == {p["id"] for p in people}


def test_wait_false_always_queues(world, queue):
    _people(world, 2)
    world.user(ALICE)
    jobs = Collector()
    status, body, headers = _post("sync", {"user": ALICE, "wait": False}, jobs)
    assert status == 202 and body["status"] == "queued"
    assert f"/api/poll/{body['runId']}?token=" in headers["Location"]
    assert world.outlook(ALICE) == []
    queue.send(jobs.messages())
    queue.drain(function_sync_worker.main)
    status, report, _ = _get_run(body["runId"])
    assert status == 200 and report["counts"]["outlookCreated"] == 2
    assert len(world.outlook(ALICE)) == 2


def test_409_while_a_run_holds_the_lease(world):
    world.user(ALICE)
    holder = "0123456789abcdef0123456789abcdef"
    lease = world.services.store.acquire_lease(ALICE, holder, LEASE_SECONDS)
    jobs = Collector()
    status, body, _ = _post("sync", {"user": ALICE, "wait": False}, jobs)
    assert status == 409
    assert body["error"]["code"] == "RunInProgress" and body["error"]["runId"] == holder
    assert jobs.messages() == []
    world.services.store.release_lease(lease)
    assert _post("sync", {"user": ALICE})[0] == 200


def test_a_crashed_run_reads_as_failed_instead_of_running_forever(world):
    world.user(ALICE)
    report = RunReport(user=ALICE, mode="incremental", status="running")
    world.services.store.save_report(report)  # its host died; its lease is gone
    status, body, _ = _get_run(report.runId)
    assert status == 200 and body["status"] == "failed"
    assert "stopped without finishing" in body["message"]


def test_a_run_still_inside_one_batch_after_the_grace_answers_202_and_finishes(world, monkeypatch):
    _people(world, 30)
    world.user(ALICE)
    monkeypatch.setenv("SYNC_INLINE_BUDGET_SECONDS", "1")
    monkeypatch.setattr(http_api, "INTERRUPT_GRACE_SECONDS", 0.2)
    reset_services()
    world.cloud.graph.faults.slow(2.0, method="POST", path_regex=r"\$batch$")  # one slow batch
    jobs = Collector()
    status, body, _ = _post("sync", {"user": ALICE, "mode": "full"}, jobs)
    assert status == 202 and body["status"] == "running"
    assert jobs.messages() == []  # the run finishes by itself: nothing to continue
    status, polled, _ = _get_run(body["runId"])
    assert status == 202 and polled["status"] == "running"  # it still holds the lease: not abandoned
    [thread] = [t for t in threading.enumerate() if t.name == f"sync-{body['runId']}"]
    thread.join()
    status, report, _ = _get_run(body["runId"])
    assert status == 200 and report["status"] == "succeeded"
    assert report["counts"]["outlookCreated"] == 30 and len(world.outlook_by_email(ALICE)) == 30


# function.json against the code -----------------------------------------------------------------
def _annotation_ok(binding: dict, annotation: object, is_return: bool = False) -> bool:
    """The Python worker's own check that a parameter's type fits its binding (azure.functions)."""
    converter = meta.get_binding_registry().get(binding["type"])
    assert converter is not None, binding["type"]
    if binding["direction"] == "in":
        return converter.check_input_type_annotation(annotation)
    if not is_return:
        assert typing.get_origin(annotation) is func.Out, f"{binding['name']} must be func.Out[...]"
        (annotation,) = typing.get_args(annotation)
    return converter.check_output_type_annotation(annotation)


@pytest.mark.parametrize("folder", function_folders(), ids=lambda f: f.name)
def test_function_json_matches_main(folder):
    config = folder.config
    assert config.get("scriptFile") == "__init__.py" and "entryPoint" not in config
    main = folder.module.main
    hints = typing.get_type_hints(main)
    params = [p for p in inspect.signature(main).parameters if p != "context"]
    if "context" in inspect.signature(main).parameters:
        # The worker binds `context` by name, not through function.json, and refuses an annotation that
        # is not a class named Context (azure-functions-python-worker, functions.py Registry.add_function).
        assert isinstance(hints["context"], type) and hints["context"].__name__ == "Context"
    named = [b for b in folder.bindings if b["name"] != "$return"]
    assert sorted(params) == sorted(b["name"] for b in named), "parameters must be exactly the bindings"
    assert len([b for b in folder.bindings if b["type"].endswith("Trigger")]) == 1
    for b in named:
        assert _annotation_ok(b, hints[b["name"]]), (
            f"{b['name']}: {hints[b['name']]} does not fit {b['type']}"
        )
        if b["type"] in ("queue", "queueTrigger"):
            assert b["queueName"] == QUEUE_NAME and b["connection"] == "AzureWebJobsStorage"
    returns = [b for b in folder.bindings if b["name"] == "$return"]
    if folder.trigger["type"] == "httpTrigger":
        # BEHAVIOUR §7.7: the host checks the function key, except on the page (static files, no data),
        # on the people's door, whose code refuses every request without a valid Entra ID token, and on
        # the poll URL of a 202, whose token is its authorization (BEHAVIOUR §7.6), and on the two
        # notification endpoints, which Graph and Business Central call without a key: each notification's
        # subscription id and clientState are checked in code (BEHAVIOUR §8.2, §8.3, §11).
        expected = "anonymous" if folder.name in ANONYMOUS_BY_DESIGN else "function"
        assert folder.trigger["authLevel"] == expected
        assert [r["type"] for r in returns] == ["http"]
        assert _annotation_ok(returns[0], hints["return"], is_return=True)
    else:
        assert returns == [] and hints.get("return") is type(None)


ANONYMOUS_BY_DESIGN = (
    "function_bc_notify",
    "function_graph_notify",
    "function_selfservice",
    "function_signed_in_http",
    "function_sync_poll",
)


def test_the_functions_are_the_nine_expected_with_their_triggers():
    triggers = {f.name: f.trigger for f in function_folders()}
    assert {k: t["type"] for k, t in triggers.items()} == {
        "function_bc_notify": "httpTrigger",
        "function_change_poll": "timerTrigger",
        "function_graph_notify": "httpTrigger",
        "function_selfservice": "httpTrigger",
        "function_signed_in_http": "httpTrigger",
        "function_sync_http": "httpTrigger",
        "function_sync_poll": "httpTrigger",
        "function_sync_timer": "timerTrigger",
        "function_sync_worker": "queueTrigger",
        "function_users_http": "httpTrigger",
    }
    assert triggers["function_sync_timer"]["schedule"] == "%SYNC_SCHEDULE%"
    assert triggers["function_sync_timer"].get("runOnStartup", False) is False
    assert triggers["function_change_poll"]["schedule"] == "%SYNC_CHANGE_POLL_SCHEDULE%"
    assert triggers["function_change_poll"].get("runOnStartup", False) is False
    outputs = {f.name: f.out_bindings for f in function_folders()}
    assert (
        outputs["function_change_poll"] == outputs["function_sync_timer"]
    )  # the same queue the worker drains
    assert triggers["function_sync_http"]["route"] == "sync/{*rest}"
    assert triggers["function_users_http"]["route"] == "users/{*rest}"
    assert triggers["function_sync_poll"]["route"] == "poll/{runId}"
    assert triggers["function_sync_poll"]["methods"] == ["get"]
    assert triggers["function_bc_notify"]["route"] == "notify/bc"  # BEHAVIOUR §8.3
    assert triggers["function_bc_notify"]["methods"] == ["post"]
    assert outputs["function_bc_notify"] == outputs["function_sync_timer"]
    assert triggers["function_graph_notify"]["route"] == "notify/graph"
    assert triggers["function_graph_notify"]["methods"] == ["post"]  # Graph validates with a POST too
    assert set(triggers["function_sync_http"]["methods"]) == {"get", "post"}
    assert set(triggers["function_users_http"]["methods"]) == {"get", "put", "delete", "post"}
    assert triggers["function_signed_in_http"]["route"] == "signed-in/{*rest}"
    assert triggers["function_selfservice"]["route"] == "selfservice/{*path}"
    assert triggers["function_selfservice"]["methods"] == ["get"]
    host = host_json()
    assert host["version"] == "2.0" and host["extensions"]["http"]["routePrefix"] == "api"
    assert host["extensions"]["queues"]["messageEncoding"] == "base64"


def test_function_folders_stay_thin():
    for folder in function_folders():
        source = (ROOT / folder.name / "__init__.py").read_text()
        assert source.count("\n") < 20, f"{folder.name} should only hand over to shared/"


# Logging for Application Insights -------------------------------------------------------------
def _run_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("contact sync run {")]


def _fields(record: logging.LogRecord, event: str) -> dict:
    """The record's fields as Application Insights keeps them: JSON in the message after the event
    (the Python worker drops `extra`, python-worker#1327; tests/test_infra_monitoring.py has the rest)."""
    message = record.getMessage()
    assert message.startswith(f"{event} {{"), message
    return json.loads(message[len(event) + 1 :])


def test_one_structured_record_per_run_without_the_mailbox_address(world, caplog):
    _people(world, 3)
    world.cloud.bc.seed_contact(world.company, type="Company", displayName="Contoso", email="co@example.com")
    world.user(ALICE)
    caplog.set_level(logging.INFO)
    status, body, _ = _post("sync", {"user": ALICE, "mode": "full"})
    assert status == 200
    [record] = _run_records(caplog)
    dims = _fields(record, "contact sync run")
    assert dims["runId"] == body["runId"] and dims["mode"] == "full" and dims["status"] == "succeeded"
    assert dims["outlookCreated"] == 3 and dims["skipped"] == 1
    assert isinstance(dims["durationSeconds"], float) and dims["durationSeconds"] >= 0
    assert dims["userHash"] == user_hash(ALICE)
    assert ALICE not in json.dumps(dims) and "alice" not in json.dumps(dims).lower()
    skipped = [r for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "Person" in _fields(skipped[0], "contact skipped")["reason"]
    assert _fields(skipped[0], "contact skipped")["runId"] == body["runId"]
    assert ALICE not in skipped[0].getMessage() and "co@example.com" not in skipped[0].getMessage()


class _Invocation(func.Context):
    """What the worker hands `main` as `context`: the invocation id and the worker's thread-local
    storage, which its log handler reads at emit time to tag each record with the invocation."""

    def __init__(self) -> None:
        self._id = "inv-" + "0" * 8
        self._storage = threading.local()

    @property
    def invocation_id(self) -> str:
        return self._id

    @property
    def thread_local_storage(self) -> threading.local:  # type: ignore[override]
        return self._storage

    function_name = "function_sync_http"
    function_directory = str(ROOT / "function_sync_http")
    trace_context = retry_context = None  # type: ignore[assignment]


class _WorkerTags(logging.Handler):
    """Stands in for the worker's AsyncLoggingHandler: it tags each record with the emitting thread's
    invocation id (azure_functions_worker dispatcher, get_current_invocation_id); the host drops a
    record without one (GrpcWorkerChannel.Log: "IgnoringRpcLog")."""

    def __init__(self, storage: threading.local) -> None:
        super().__init__(logging.INFO)
        self.storage = storage
        self.tagged: list[tuple[str, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.tagged.append((record.getMessage(), getattr(self.storage, "invocation_id", None)))


@pytest.mark.parametrize("with_context", [True, False], ids=["context", "no-context"])
def test_an_inline_http_run_logs_its_record_under_the_invocation(world, caplog, with_context):
    """`POST /api/sync` runs the sync in its own thread; the worker keeps that thread's records only
    when the thread carries the invocation id ("Logging from background threads",
    https://learn.microsoft.com/azure/azure-functions/functions-reference-python). Without the
    context the record would be dropped in Azure: the control case shows what the test detects."""
    _people(world, 2)
    world.user(ALICE)
    caplog.set_level(logging.INFO)
    invocation = _Invocation()
    invocation.thread_local_storage.invocation_id = invocation.invocation_id  # the worker does this
    tags = _WorkerTags(invocation.thread_local_storage)
    logging.getLogger().addHandler(tags)
    try:
        status, body, _ = _post(
            "sync", {"user": ALICE, "mode": "full"}, context=invocation if with_context else None
        )
    finally:
        logging.getLogger().removeHandler(tags)
    assert status == 200 and body["status"] == "succeeded"
    [(message, tag_)] = [t for t in tags.tagged if t[0].startswith("contact sync run {")]
    assert json.loads(message.removeprefix("contact sync run "))["runId"] == body["runId"]
    assert tag_ == (invocation.invocation_id if with_context else None)


def test_no_secret_token_or_storage_key_in_logs_or_error_bodies(world, caplog):
    caplog.set_level(logging.DEBUG)
    _people(world, 2)
    world.user(ALICE)
    bodies = [_post("sync", {"user": ALICE})[1]]
    world.cloud.entra.revoke_secret(world.cloud.tenant_id, world.cloud.client_id)
    get_services().tokens.invalidate()  # the cached tokens are gone too: every token request fails
    bodies.append(_post("sync", {"user": ALICE, "mode": "full"})[1])  # a run that cannot get tokens
    bodies.append(_post("sync", {"user": "nobody@contoso.example"})[1])
    bodies.append(_post("sync", b"{not json")[1])
    req = func.HttpRequest(
        "POST",
        f"https://x/api/users/{ALICE}/validate",
        route_params={"rest": f"{ALICE}/validate"},
        body=b"",
    )
    bodies.append(json.loads(function_users_http.main(req).get_body()))
    assert bodies[1]["status"] == "failed" and not bodies[4]["ok"]
    text = json.dumps(bodies) + "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert world.cloud.client_secret not in text
    assert DEV_KEY not in text and "AccountKey" not in text
    assert "eyJ" not in text
