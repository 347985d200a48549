"""A tiny local HTTP listener standing in for the function app's webhook endpoint in sandbox tests.

It records every request and answers with whatever the test's `answer` function returns, so a test
can play a correct endpoint, a broken one or a slow one. Plain http on 127.0.0.1: the sandbox's
documented loopback allowance (sandbox/notify.py).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest


@dataclass
class Received:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


Answer = Callable[[Received], tuple[int, str, str]]


def echo_validation(req: Received) -> tuple[int, str, str]:
    """A correct endpoint: echo the validation token as text/plain, accept notifications with 202."""
    if "validationToken" in req.query:
        return 200, "text/plain; charset=utf-8", req.query["validationToken"]
    return 202, "text/plain", ""


@dataclass
class Listener:
    url: str
    answer: Answer = echo_validation
    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)  # ends a "slow" answer

    def notifications(self) -> list[Received]:
        return [r for r in self.received if "validationToken" not in r.query]

    def validations(self) -> list[Received]:
        return [r for r in self.received if "validationToken" in r.query]


@pytest.fixture
def listener() -> Iterator[Listener]:
    box: dict[str, Listener] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            parts = urlsplit(self.path)
            req = Received(
                parts.path, dict(parse_qsl(parts.query)), dict(self.headers.items()), self.rfile.read(length)
            )
            me = box["listener"]
            me.received.append(req)
            status, content_type, text = me.answer(req)
            data = text.encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the caller stopped waiting

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    box["listener"] = Listener(f"http://127.0.0.1:{server.server_address[1]}/api/notify")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield box["listener"]
    box["listener"].release.set()
    server.shutdown()
    server.server_close()


def slow(listener: Listener, then: Answer = echo_validation) -> Answer:
    """An endpoint that answers only after the test ends (or `release` is set): too late for the caller."""

    def answer(req: Received) -> tuple[int, str, str]:
        listener.release.wait(5)
        return then(req)

    return answer
