"""The run lifecycle (shared/runs.py): which status changes are allowed, and that reading never writes.

The table below is written out independently of `runs.TRANSITIONS`, so a change to the lifecycle
has to change this test too. The "GET never writes" tests go through the HTTP API and compare every
row of the test's tables (with its ETag) before and after.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from azure.data.tables import TableServiceClient

from shared import runs
from shared.jobs import Job, work
from shared.model import RunReport, RunStatus

ROOT = Path(__file__).resolve().parents[1]
ALICE = "alice@contoso.example"

TRANSITIONS: dict[str, Callable[[RunReport], RunReport]] = {
    "resume": runs.resume,
    "interrupt": runs.interrupt,
    "requeue": runs.requeue,
    "succeed": runs.succeed,
    "finish_partial": lambda r: runs.finish(r, failures=True),
    "stop_for_safety": lambda r: runs.stop_for_safety(r, "would remove 12 of 20 contacts"),
    "fail": lambda r: runs.fail(r, "Graph answered 403"),
    "abandon": runs.abandon,
    "give_up": lambda r: runs.give_up(r, "the user's sync settings were deleted"),
}
# transition: (the statuses it may start from, the status it ends in)
ALLOWED: dict[str, tuple[set[str], str]] = {
    "resume": ({"queued", "interrupted"}, "running"),
    "interrupt": ({"running"}, "interrupted"),
    "requeue": ({"interrupted"}, "queued"),
    "succeed": ({"running"}, "succeeded"),
    "finish_partial": ({"running"}, "partial"),
    "stop_for_safety": ({"running"}, "safetyStop"),
    "fail": ({"running"}, "failed"),
    "abandon": ({"running"}, "failed"),
    "give_up": ({"queued", "running", "interrupted", "failed"}, "failed"),
}
CASES = [(name, status) for name in ALLOWED for status in RunStatus]


def test_the_table_names_every_transition():
    assert set(TRANSITIONS) == set(ALLOWED) == {t.name for t in runs.TRANSITIONS}


@pytest.mark.parametrize(("name", "status"), CASES, ids=[f"{n}-from-{s.value}" for n, s in CASES])
def test_a_transition_moves_only_from_its_allowed_statuses(name, status):
    sources, target = ALLOWED[name]
    report = RunReport(user=ALICE, mode="incremental", status=status, message="before")
    if status.value in sources:
        assert TRANSITIONS[name](report) is report
        assert report.status == target
    else:
        with pytest.raises(runs.IllegalTransition, match=f"cannot {name} run {report.runId}: it is {status}"):
            TRANSITIONS[name](report)
        assert report.status == status and report.message == "before"  # refused: nothing changed


def test_finished_runs_never_move_again():
    for status in runs.DONE:
        for name, move in TRANSITIONS.items():
            with pytest.raises(runs.IllegalTransition):
                move(RunReport(user=ALICE, mode="full", status=status))
            assert status.value not in ALLOWED[name][0]


def test_status_values_are_the_stored_and_documented_strings():
    spec = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    assert {s.value for s in RunStatus} == set(
        spec["definitions"]["RunReport"]["properties"]["status"]["enum"]
    )
    report = runs.queued(ALICE, "full", False)
    data = json.loads(json.dumps(report.to_json()))
    assert data["status"] == "queued" and type(report.to_json()["status"]) is str
    assert RunReport.from_json(data).status is RunStatus.QUEUED
    with pytest.raises(ValueError, match="'finished'"):
        RunReport.from_json({**data, "status": "finished"})


def test_only_the_lifecycle_module_assigns_a_report_status():
    """Every status change goes through shared/runs.py: no other module assigns `x.status = ...`."""
    offenders = []
    for path in sorted((ROOT / "shared").glob("*.py")):
        if path.name == "runs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            flat = [
                t for target in targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])
            ]
            offenders += [f"{path.name}:{node.lineno}" for t in flat if _assigns_status(t)]
    assert offenders == []


def _assigns_status(target: ast.expr) -> bool:
    """`something.status = ...`, except `self.status` (errors keep an HTTP status of their own)."""
    is_self = (
        isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
    )
    return isinstance(target, ast.Attribute) and target.attr == "status" and not is_self


# A GET never writes -----------------------------------------------------------------------------
def _tables(env: dict[str, str]) -> dict[tuple[str, str, str], tuple[str, dict[str, Any]]]:
    """Every row of this test's tables with its ETag (a rewrite of the same values changes it)."""
    service = TableServiceClient.from_connection_string(env["AzureWebJobsStorage"])
    rows = {}
    for table in service.list_tables():
        if not table.name.startswith(env["SYNC_TABLE_PREFIX"]):
            continue
        for e in service.get_table_client(table.name).list_entities():
            rows[(table.name, e["PartitionKey"], e["RowKey"])] = (e.metadata["etag"], dict(e))
    return rows


def _crashed_run(world) -> RunReport:
    """A run that stored "running" and then died with its host: its lease is gone."""
    report = RunReport(user=ALICE, mode="incremental", status="running")
    world.services.store.save_report(report)
    return report


def test_get_of_a_run_that_died_answers_failed_and_writes_nothing(client, world):
    world.user(ALICE)
    finished = client("POST", "sync", {"user": ALICE}).json()
    dead = _crashed_run(world)  # after the POST: nothing has settled it yet
    before = _tables(world.env)
    for _ in range(2):
        resp = client("GET", f"sync/runs/{dead.runId}")
        assert resp.status_code == 200 and resp.json()["status"] == "failed"
        assert "stopped without finishing" in resp.json()["message"]
        assert client("GET", f"sync/runs/{finished['runId']}").json() == finished
        assert client("GET", "sync/runs/0123456789abcdef0123456789abcdef").status_code == 404
        assert client("GET", "users").status_code == 200
    assert _tables(world.env) == before
    assert world.services.store.get_report(dead.runId).status == "running"


def test_the_next_post_stores_the_dead_run_as_failed(client, world):
    world.user(ALICE)
    dead = _crashed_run(world)
    assert client("POST", "sync", {"user": ALICE}).json()["status"] == "succeeded"
    stored = world.services.store.get_report(dead.runId)
    assert stored.status == "failed" and stored.message == runs.ABANDONED_MESSAGE and stored.finishedAt


def test_the_worker_stores_the_dead_run_as_failed_but_not_a_live_or_dry_one(world):
    world.user(ALICE)
    dead = _crashed_run(world)
    dry = RunReport(user=ALICE, mode="incremental", dryRun=True)  # holds no lease: cannot tell
    world.services.store.save_report(dry)
    report = work(func.QueueMessage(id="1", body=Job(ALICE).to_message().encode()))
    assert report is not None and report.status == "succeeded"
    assert world.services.store.get_report(dead.runId).status == "failed"
    assert world.services.store.get_report(dry.runId).status == "running"


def test_a_repeated_job_for_a_finished_run_leaves_its_report_alone(world):
    """The user's settings were deleted after the run succeeded; a redelivered job must not turn it
    failed (succeeded -> failed is not a transition)."""
    world.user(ALICE)
    done = world.sync(ALICE)
    world.services.store.delete_settings(ALICE)
    job = Job(ALICE, runId=done.runId, reason="http")
    assert work(func.QueueMessage(id="1", body=job.to_message().encode())) is None
    stored = world.services.store.get_report(done.runId)
    assert stored.status == "succeeded" and stored.message == done.message
