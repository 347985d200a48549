"""One run per user at a time (BEHAVIOUR §4.5; issue 6, item 3), across every way a run starts.

Overlap is made certain with events, not sleeps: a run is held inside the simulated Graph (the
`WireTap` below blocks its first write batch) until the competing start has been answered.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from datetime import timedelta

import azure.functions as func
import pytest

import function_sync_http
import function_sync_worker
from sandbox.bindings import Collector
from sandbox.httpd import Request, Response
from shared.jobs import Job
from shared.model import utcnow
from shared.store import Store
from shared.sync import RunInProgress, run_user
from tests.reliability.checks import assert_converged
from tests.reliability.conftest import batch_envelope

ALICE = "alice@contoso.example"


class Gate:
    """Holds the first Graph write batch until `release()`; `entered` says a run is inside."""

    def __init__(self, service) -> None:
        self.entered = threading.Event()
        self._open = threading.Event()
        self._armed = True
        self._original = service.dispatch
        self._service = service
        service.dispatch = self._dispatch

    def _dispatch(self, req: Request) -> Response:
        if self._armed and batch_envelope(req) and b'"POST"' in req.body:
            self._armed = False
            self.entered.set()
            assert self._open.wait(60), "the gate was never released"
        return self._original(req)

    def release(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._open.set()
        self._service.__dict__.pop("dispatch", None)


@pytest.fixture
def gate(cloud):
    g = Gate(cloud.graph)
    yield g
    g.close()


def _seed(world, n: int = 25) -> None:
    world.user()
    for i in range(n):
        world.person(f"Person {i:02d} Sample")


def _thread(target, results: dict, key: str) -> threading.Thread:
    def run() -> None:
        try:
            results[key] = target()
        except BaseException as exc:
            results[key] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _post_sync(body: dict) -> tuple[func.HttpResponse, Collector]:
    out = Collector()
    req = func.HttpRequest(
        "POST",
        "https://app.example/api/sync",
        headers={"Content-Type": "application/json"},
        route_params={"rest": ""},
        body=json.dumps(body).encode(),
    )
    return function_sync_http.main(req, out), out


def test_two_runs_of_one_user_at_once(world, gate, recorder):
    with recorder.case("concurrency", "two run_user calls for one user at once (threads)") as rec:
        _seed(world)
        settings = world.services.store.get_settings(ALICE)
        results: dict = {}
        first = _thread(lambda: run_user(world.services, settings, "full"), results, "first")
        assert gate.entered.wait(30)
        with pytest.raises(RunInProgress):
            run_user(world.services, settings, "full")
        gate.release()
        first.join(60)
        assert results["first"].status == "succeeded"
        assert len(world.outlook_by_email()) == 25
        assert_converged(world, ALICE)
        rec.add()


def test_free_races_never_duplicate(world, recorder):
    """Without a gate: whoever wins, the loser is refused or runs after; never two writers."""
    with recorder.case("concurrency", "4 threads start one user's run at the same instant") as rec:
        _seed(world, 30)
        settings = world.services.store.get_settings(ALICE)
        for _round in range(5):
            world.person(f"Late {_round} Sample")
            barrier = threading.Barrier(4)
            results: dict = {}

            def start(barrier=barrier):
                barrier.wait()
                return run_user(world.services, settings, "incremental")

            threads = [_thread(start, results, str(i)) for i in range(4)]
            for t in threads:
                t.join(60)
            outcomes = sorted(
                type(r).__name__ if isinstance(r, Exception) else r.status for r in results.values()
            )
            assert set(outcomes) <= {"succeeded", "RunInProgress"} and "succeeded" in outcomes, outcomes
            assert len(world.outlook_by_email()) == 31 + _round
            rec.add()
        assert_converged(world, ALICE)


def test_queue_worker_and_http_at_once(world, env, gate, recorder):
    """The timer's queued job runs; an HTTP request for the same user meanwhile answers 409."""
    with recorder.case("concurrency", "queue worker running, POST /api/sync arrives → 409") as rec:
        _seed(world)
        results: dict = {}
        msg = func.QueueMessage(id="1", body=Job(ALICE).to_message().encode())
        worker = _thread(lambda: function_sync_worker.main(msg), results, "worker")
        assert gate.entered.wait(30)
        resp, out = _post_sync({"user": ALICE, "mode": "full"})
        assert resp.status_code == 409, resp.get_body()
        assert json.loads(resp.get_body())["error"]["code"] == "RunInProgress"
        assert out.value is None  # nothing queued either
        gate.release()
        worker.join(60)
        assert not isinstance(results.get("worker"), BaseException), results
        assert_converged(world, ALICE)
        rec.add()


def test_http_run_in_progress_defers_the_queued_jobs(world, env, gate, recorder):
    """An HTTP run is inside; the timer's job for that user is skipped, an on-demand job is retried."""
    with recorder.case("concurrency", "POST /api/sync running, queue worker arrives → deferred") as rec:
        _seed(world)
        results: dict = {}
        http = _thread(lambda: _post_sync({"user": ALICE, "mode": "full"}), results, "http")
        assert gate.entered.wait(30)
        scheduled = func.QueueMessage(id="1", body=Job(ALICE).to_message().encode())
        assert function_sync_worker.main(scheduled) is None  # skipped: the next tick picks it up
        on_demand = func.QueueMessage(id="2", body=Job(ALICE, reason="http").to_message().encode())
        with pytest.raises(RunInProgress):
            function_sync_worker.main(on_demand)  # the queue retries it after its visibility timeout
        gate.release()
        http.join(60)
        resp, _ = results["http"]
        assert resp.status_code == 200, resp.get_body()
        assert json.loads(resp.get_body())["counts"]["outlookCreated"] == 25
        assert_converged(world, ALICE)
        rec.add(2)


def test_lease_of_a_crashed_run_expires(world, azurite, env, recorder):
    """A process that died mid-run never releases its lease: it blocks runs until it expires, then
    the next run proceeds (timer, queue and HTTP alike)."""
    with recorder.case("concurrency", "lease left by a crashed run expires, next run proceeds") as rec:
        _seed(world, 5)
        now = [utcnow()]
        store = Store.from_connection_string(
            azurite.connection_string, prefix=env["SYNC_TABLE_PREFIX"], clock=lambda: now[0]
        )
        services = replace(world.services, store=store)
        settings = store.get_settings(ALICE)
        assert store.acquire_lease(ALICE, "run-that-crashed", 15 * 60) is not None
        with pytest.raises(RunInProgress) as err:
            run_user(services, settings)
        assert err.value.run_id == "run-that-crashed"
        resp, _ = _post_sync({"user": ALICE})
        assert resp.status_code == 409
        now[0] += timedelta(minutes=15, seconds=1)
        report = run_user(services, settings)
        assert report.status == "succeeded" and report.counts["outlookCreated"] == 5
        rec.add()

        # The same through HTTP, whose store runs on the real clock: a lease that expired a minute ago.
        now[0] = utcnow() - timedelta(minutes=16)
        assert store.acquire_lease(ALICE, "another-crashed-run", 15 * 60) is not None
        world.person("After Crash")
        resp, _ = _post_sync({"user": ALICE})
        assert resp.status_code == 200, resp.get_body()
        assert json.loads(resp.get_body())["counts"]["outlookCreated"] == 1
        assert_converged(world, ALICE)
        rec.add()
