"""Fixtures of the reliability suite (issue 6): the record of what was tried, and fault tools.

Every test here records the cases it ran as JSON lines (area, case, how many, pass/fail) into the
file named by `RELIABILITY_LOG`, so `scripts/reliability_report.py` can turn a test run into
RELIABILITY.md instead of anyone writing that table by hand. Without the variable nothing is written.

`RELIABILITY_LONG=1` selects the long profile of the stateful test (thousands of steps); the default
is the fast profile that CI runs. (An environment variable, not a pytest option: options can only be
declared in the root conftest, which this suite does not own.)
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from sandbox.httpd import ConnectionReset, Request, Response, Service

LOG_ENV = "RELIABILITY_LOG"
LONG_ENV = "RELIABILITY_LONG"


def long_profile() -> bool:
    return os.environ.get(LONG_ENV, "").strip().lower() in ("1", "true", "yes")


class Recorder:
    """Appends one JSON line per finished case group; thread-safe, flushed at once (a crash keeps it)."""

    def __init__(self, path: str | None):
        self.path = path
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        if not self.path:
            return
        line = json.dumps({"profile": "long" if long_profile() else "fast", **record}, ensure_ascii=False)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    @contextmanager
    def case(self, area: str, case: str, **detail: Any) -> Iterator[CaseCount]:
        """Counts the cases run inside the block; records pass, or fail with the error, on exit."""
        count = CaseCount()
        started = time.monotonic()
        try:
            yield count
        except BaseException as exc:
            self.write(
                {
                    "area": area,
                    "case": case,
                    "cases": max(count.n, 1),
                    "result": "fail",
                    "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                    "seconds": round(time.monotonic() - started, 2),
                    **count.detail,
                    **detail,
                }
            )
            raise
        self.write(
            {
                "area": area,
                "case": case,
                "cases": count.n,
                "result": "pass",
                "seconds": round(time.monotonic() - started, 2),
                **count.detail,
                **detail,
            }
        )


@dataclass
class CaseCount:
    n: int = 0
    detail: dict[str, Any] = field(default_factory=dict)

    def add(self, k: int = 1) -> None:
        self.n += k


@pytest.fixture(scope="session")
def recorder() -> Recorder:
    return Recorder(os.environ.get(LOG_ENV) or None)


# --- fault tools the sandbox lacks ---------------------------------------------------------------


class WireTap:
    """Wraps a simulated service's `dispatch` (instance attribute, so `$batch` operations pass through
    it too): records every request target as received, and can make the service apply a request and
    then lose or garble the answer, which the sandbox's own `Faults` (refusing before applying)
    cannot do."""

    def __init__(self, service: Service):
        self.service = service
        self.targets: list[tuple[str, str, bool]] = []  # (method, raw target, in a batch)
        self._lock = threading.Lock()
        self._after: list[tuple[Callable[[Request], bool], str]] = []
        self.fired: dict[str, int] = {}
        self._original = service.dispatch
        service.dispatch = self._dispatch  # type: ignore[method-assign]

    def close(self) -> None:
        if self.service.__dict__.get("dispatch") == self._dispatch:
            del self.service.dispatch

    def drop_after_apply(self, match: Callable[[Request], bool], count: int = 1) -> None:
        """The next `count` matching requests are applied, then the connection is reset."""
        with self._lock:
            self._after.extend([(match, "drop")] * count)

    def html_after_apply(self, match: Callable[[Request], bool], count: int = 1) -> None:
        """The next `count` matching requests are applied, then a gateway's 502 HTML page answers."""
        with self._lock:
            self._after.extend([(match, "html")] * count)

    def clear(self) -> None:
        with self._lock:
            self._after.clear()

    def _take(self, req: Request) -> str | None:
        with self._lock:
            for i, (match, kind) in enumerate(self._after):
                if match(req):
                    del self._after[i]
                    self.fired[kind] = self.fired.get(kind, 0) + 1
                    return kind
        return None

    def _dispatch(self, req: Request) -> Response:
        with self._lock:
            self.targets.append((req.method, req.raw_target, req.in_batch))
        kind = self._take(req)
        resp = self._original(req)
        if kind == "drop":
            raise ConnectionReset()
        if kind == "html":
            return Response(
                502,
                "<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>",
                content_type="text/html; charset=utf-8",
            )
        return resp


def batch_envelope(req: Request) -> bool:
    return not req.in_batch and req.method == "POST" and req.path.endswith("/$batch")


@pytest.fixture
def taps(cloud) -> Iterator[dict[str, WireTap]]:
    tapped = {"bc": WireTap(cloud.bc), "graph": WireTap(cloud.graph)}
    yield tapped
    for t in tapped.values():
        t.close()
