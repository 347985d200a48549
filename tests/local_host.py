"""A small stand-in for the Azure Functions host, for tests: HTTP routes and the queue trigger.

HTTP: a WSGI app that reads every function folder's `function.json`, matches requests against the
HTTP triggers' route templates under host.json's `routePrefix`, refuses requests without the
function key (401, as the real host does for `authLevel: function`), and calls the folder's
`main` with a `func.HttpRequest` and collectors for its output bindings, the way the host does.
`serve()` puts it on a local port so `requests` and schemathesis can call it over real HTTP.

Queue: `QueueHost` drains a real (Azurite) Storage Queue into a queue-triggered `main`: base64
messages (host.json `messageEncoding`), `dequeue_count` from the service, a failed attempt made
visible again, and after `maxDequeueCount` failed attempts the message moved to `<queue>-poison`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qsl, quote, unquote
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import azure.functions as func
from azure.functions.queue import QueueMessage

from sandbox.bindings import Collector

ROOT = Path(__file__).resolve().parent.parent
# The newest Queue service version the pinned Azurite (package-lock.json) accepts; the SDK's default
# can be newer than the emulator.
AZURITE_QUEUE_API_VERSION = "2025-11-05"
_REASONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    401: "Unauthorized",
    404: "Not Found",
}


@dataclass
class FunctionFolder:
    name: str
    config: dict[str, Any]
    module: Any

    @property
    def bindings(self) -> list[dict[str, Any]]:
        return self.config["bindings"]

    @property
    def trigger(self) -> dict[str, Any]:
        return next(b for b in self.bindings if b["type"].endswith("Trigger"))

    @property
    def out_bindings(self) -> list[dict[str, Any]]:
        return [b for b in self.bindings if b["direction"] == "out" and b["name"] != "$return"]


def function_folders(root: Path = ROOT) -> list[FunctionFolder]:
    """Every folder at the app root holding a function.json, with its imported module."""
    folders = []
    for path in sorted(root.glob("*/function.json")):
        name = path.parent.name
        folders.append(FunctionFolder(name, json.loads(path.read_text()), importlib.import_module(name)))
    return folders


def host_json(root: Path = ROOT) -> dict[str, Any]:
    return json.loads((root / "host.json").read_text())


def route_regex(template: str) -> re.Pattern[str]:
    """An ASP.NET-style route template (`users/{user}`, `sync/{*rest}`, `{id?}`) as a regex.

    A catch-all or optional last segment may be absent together with the slash before it, so
    `sync/{*rest}` matches `sync`, `sync/` and `sync/runs/1`.
    """
    pattern = ""
    for i, segment in enumerate(template.strip("/").split("/")):
        slash = "/" if i else ""
        m = re.fullmatch(r"\{(\*?)(\w+)(?::[^}?]+)?(\??)\}", segment)
        if m is None:
            pattern += slash + re.escape(segment)
        elif m.group(1):
            pattern += f"(?:{slash}(?P<{m.group(2)}>.*))?"
        elif m.group(3):
            pattern += f"(?:{slash}(?P<{m.group(2)}>[^/]+))?"
        else:
            pattern += f"{slash}(?P<{m.group(2)}>[^/]+)"
    # DOTALL: a catch-all takes any decoded character, a line break (%0A) included, as ASP.NET's does.
    return re.compile(f"^{pattern}/?$", re.IGNORECASE | re.DOTALL)


@dataclass
class Route:
    folder: FunctionFolder
    regex: re.Pattern[str]
    methods: tuple[str, ...]
    auth_level: str


class LocalHost:
    """The HTTP side of the Functions host as a WSGI app (see the module docstring)."""

    def __init__(self, root: Path = ROOT, keys: tuple[str, ...] | None = None):
        self.keys = keys or (secrets.token_urlsafe(24),)
        prefix = host_json(root).get("extensions", {}).get("http", {}).get("routePrefix", "api")
        self.prefix = "/" + prefix.strip("/") if prefix else ""
        self.routes: list[Route] = []
        for folder in function_folders(root):
            trigger = folder.trigger
            if trigger["type"] != "httpTrigger":
                continue
            self.routes.append(
                Route(
                    folder,
                    route_regex(trigger.get("route") or folder.name),
                    tuple(m.upper() for m in trigger.get("methods") or ("GET", "POST")),
                    trigger.get("authLevel", "function").lower(),
                )
            )
        self.outputs: dict[str, list[str]] = {}  # queueName → messages written through output bindings
        # Answers that carried one of the host's keys (BEHAVIOUR §7.6: no answer may). `serve()` fails
        # the test that caused one, so every test over real HTTP also checks this.
        self.key_leaks: list[str] = []
        self._lock = threading.Lock()

    @property
    def key(self) -> str:
        return self.keys[0]

    def queued(self, queue_name: str) -> list[str]:
        """Messages the functions wrote to `queue_name` so far, and forget them (they are taken)."""
        with self._lock:
            return self.outputs.pop(queue_name, [])

    # WSGI ------------------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        status, headers, body = self.handle(environ)
        reason = _REASONS.get(status, "Status")
        start_response(f"{status} {reason}", list(headers.items()))
        return [body]

    def handle(self, environ: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        method = environ["REQUEST_METHOD"].upper()
        raw = environ.get("RAW_PATH_INFO")
        path = kestrel_path(raw) if raw is not None else environ.get("PATH_INFO", "")
        if not path.startswith(self.prefix + "/") and path != self.prefix:
            return 404, {}, b""
        relative = path[len(self.prefix) :].lstrip("/")
        query = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        params: dict[str, str] = {}
        for k, v in query:
            params.setdefault(k, v)
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = environ["CONTENT_TYPE"]
        for route in self.routes:
            match = route.regex.match(relative)
            if match is None or method not in route.methods:
                continue
            if route.auth_level != "anonymous":
                given = params.get("code") or headers.get("x-functions-key")
                if not given or not any(secrets.compare_digest(given, k) for k in self.keys):
                    return 401, {}, b""
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else b""
            url = _request_url(environ)
            req = func.HttpRequest(
                method,
                url,
                headers=headers,
                params=params,
                route_params={k: v or "" for k, v in match.groupdict().items()},
                body=body,
            )
            answer = self._invoke(route.folder, req)
            self._check_no_key(method, path, answer)
            return answer
        return 404, {}, b""

    def _check_no_key(self, method: str, path: str, answer: tuple[int, dict[str, str], bytes]) -> None:
        """Remember an answer whose headers or body hold a host key, plain or percent-encoded."""
        status, headers, body = answer
        text = " ".join(f"{k}: {v}" for k, v in headers.items()) + " " + body.decode("utf-8", "replace")
        for key in self.keys:
            if key in text or quote(key, safe="") in text:
                with self._lock:
                    self.key_leaks.append(f"{method} {path} answered {status} with a function key")

    def _invoke(self, folder: FunctionFolder, req: func.HttpRequest) -> tuple[int, dict[str, str], bytes]:
        trigger = folder.trigger["name"]
        outs = {b["name"]: Collector() for b in folder.out_bindings}
        try:
            resp = folder.module.main(**{trigger: req}, **outs)
        except Exception:
            return 500, {}, b""  # the host answers a failed invocation with an empty 500
        with self._lock:
            for binding in folder.out_bindings:
                if binding["type"] == "queue":
                    queue = self.outputs.setdefault(binding["queueName"], [])
                    queue.extend(outs[binding["name"]].messages())
        headers = dict(resp.headers)
        if resp.mimetype:
            charset = f"; charset={resp.charset}" if resp.charset else ""
            headers.setdefault("Content-Type", f"{resp.mimetype}{charset}")
        return resp.status_code, headers, resp.get_body() or b""

    # Serving ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def serve(self, port: int = 0) -> Iterator[str]:
        """Serve on a local port (a free one by default); yields the base URL (`http://127.0.0.1:PORT`)."""
        server = make_server(
            "127.0.0.1", port, self, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="local-functions-host",
            daemon=True,
        )
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}"
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
        assert not self.key_leaks, f"answers carried the function key: {self.key_leaks}"


def kestrel_path(raw: str) -> str:
    """The request path as Kestrel (the Functions host's server) hands it to routing: every valid escape
    decoded except `%2F`, which would change where the path's segments end, so `users/a%2Fb` stays one
    segment `a%2Fb` ("Kestrel is supposed to decode all valid escape sequences except %2F because of the
    ambiguity it creates", dotnet/aspnetcore#30655, https://github.com/dotnet/aspnetcore/issues/30655).
    wsgiref decodes `%2F` too, which would split a user id into two segments that no real host sees."""
    return "%2F".join(unquote(part) for part in re.split("%2[Ff]", raw))


def _request_url(environ: dict[str, Any]) -> str:
    host = environ.get("HTTP_HOST") or f"{environ['SERVER_NAME']}:{environ['SERVER_PORT']}"
    path = environ.get("RAW_PATH_INFO") or quote(environ.get("PATH_INFO", ""))
    url = f"{environ.get('wsgi.url_scheme', 'http')}://{host}{path}"
    return f"{url}?{environ['QUERY_STRING']}" if environ.get("QUERY_STRING") else url


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        environ["RAW_PATH_INFO"] = self.path.split("?", 1)[0]  # as sent, for `kestrel_path`
        return environ

    def log_message(self, format: str, *args: Any) -> None:
        pass


def call_main(main: Any, **bindings: Any) -> Any:
    """Call a function's `main` with exactly the parameters it declares (as the host does)."""
    names = inspect.signature(main).parameters
    return main(**{k: v for k, v in bindings.items() if k in names})


@dataclass
class Attempt:
    body: str
    dequeue_count: int
    error: BaseException | None = None
    poisoned: bool = False

    @property
    def job(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class QueueHost:
    """The queue trigger of the Functions host over a real Storage Queue (Azurite in tests)."""

    connection_string: str
    queue_name: str
    max_dequeue_count: int = field(
        default_factory=lambda: host_json()["extensions"]["queues"]["maxDequeueCount"]
    )

    def __post_init__(self) -> None:
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

        def client(name: str) -> QueueClient:
            c = QueueClient.from_connection_string(
                self.connection_string,
                name,
                message_encode_policy=TextBase64EncodePolicy(),  # host.json messageEncoding: base64
                message_decode_policy=TextBase64DecodePolicy(),
                api_version=AZURITE_QUEUE_API_VERSION,
            )
            with contextlib.suppress(ResourceExistsError):
                c.create_queue()
            c.clear_messages()
            return c

        self.queue = client(self.queue_name)
        self.poison = client(f"{self.queue_name}-poison")

    def send(self, messages: list[str]) -> None:
        """What the output binding does with the messages a function set."""
        for m in messages:
            self.queue.send_message(m)

    def poisoned(self) -> list[str]:
        return [m.content for m in self.poison.peek_messages(max_messages=32)]

    def drain(self, main: Any, max_rounds: int = 50) -> list[Attempt]:
        """Deliver messages to `main` until the queue is empty; returns every attempt made.

        A failed attempt makes the message visible again at once (the real host waits
        `visibilityTimeout`; the tests need no wait), and the `maxDequeueCount`-th failure moves it
        to the poison queue, as the host does.
        """
        trigger = next(iter(inspect.signature(main).parameters))
        attempts: list[Attempt] = []
        for _ in range(max_rounds):
            batch = list(self.queue.receive_messages(messages_per_page=16, visibility_timeout=60))
            if not batch:
                return attempts
            for m in batch:
                qm = QueueMessage(
                    id=m.id,
                    body=m.content.encode("utf-8"),
                    dequeue_count=m.dequeue_count,
                    pop_receipt=m.pop_receipt,
                )
                attempt = Attempt(m.content, m.dequeue_count)
                attempts.append(attempt)
                try:
                    main(**{trigger: qm})
                except Exception as exc:  # the host logs it and retries the message
                    attempt.error = exc
                    if m.dequeue_count >= self.max_dequeue_count:
                        self.poison.send_message(m.content)
                        self.queue.delete_message(m)
                        attempt.poisoned = True
                    else:
                        self.queue.update_message(m, visibility_timeout=0)
                    continue
                self.queue.delete_message(m)
        raise AssertionError(f"queue {self.queue_name} did not drain in {max_rounds} rounds")
