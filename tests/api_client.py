"""An HTTP client for the API as a Power Automate flow or an admin calls it: real HTTP through the
local stand-in of the Functions host, with the function key in the query, a header, or not at all."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import requests
from azure.functions.queue import QueueMessage

import function_sync_worker
from shared.jobs import QUEUE_NAME
from tests.local_host import LocalHost


@dataclass
class Client:
    base: str
    host: LocalHost

    def __call__(
        self, method: str, path: str, body: Any = None, *, key: str | None = "query", **kw: Any
    ) -> requests.Response:
        """`key`: "query" (?code=), "header" (x-functions-key), None (no key) or a wrong key's value."""
        params, headers = {}, kw.pop("headers", {})
        if key == "query":
            params["code"] = self.host.key
        elif key == "header":
            headers["x-functions-key"] = self.host.key
        elif key is not None:
            params["code"] = key
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        return requests.request(
            method, f"{self.base}/api/{path}", params=params, data=body, headers=headers, timeout=60, **kw
        )

    def run_queued_jobs(self) -> None:
        """What the queue trigger would do with the jobs the HTTP functions queued."""
        for n, message in enumerate(self.host.queued(QUEUE_NAME)):
            function_sync_worker.main(QueueMessage(id=str(n), body=message.encode(), dequeue_count=1))


@contextmanager
def api_client(host: LocalHost) -> Iterator[Client]:
    with host.serve() as base:
        yield Client(base, host)
