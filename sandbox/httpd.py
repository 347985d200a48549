"""A tiny HTTPS framework the three simulated services (Entra ID, Business Central, Graph) stand on.

Why our own: the simulators must behave like the real services at the HTTP level (status codes,
headers, error bodies, connection resets, latency, concurrency limits), which needs full control of
the socket and of each request's life. The standard library's threaded server gives exactly that and
nothing we would have to work around.

A service is a `Service` subclass that registers routes; `SandboxServer` serves one service on its
own port over TLS. Every request passes through the service's `Faults` (injected failures) and
`Counters` (what the product sent), both controllable from tests.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit


class CaseInsensitiveDict(dict):
    """Header map: HTTP header names are case-insensitive (RFC 9110 §5.1)."""

    def __init__(self, items: Any = ()):
        super().__init__()
        for k, v in dict(items).items():
            self[k] = v

    def __setitem__(self, key: str, value: str) -> None:
        super().__setitem__(key.lower(), value)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


@dataclass
class Request:
    method: str
    path: str  # percent-decoded path, no query string
    query: dict[str, str]  # decoded query parameters (last value wins)
    headers: CaseInsensitiveDict
    body: bytes = b""
    raw_target: str = ""  # the request target exactly as sent (path + query)
    in_batch: bool = False  # True for an operation carried inside a $batch request

    def json(self) -> Any:
        if not self.body:
            return None
        return json.loads(self.body.decode("utf-8"))


@dataclass
class Response:
    status: int
    body: Any = None  # dict/list → JSON; str → text; bytes → raw; None → empty
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None

    def encoded(self) -> tuple[bytes, str | None]:
        if self.body is None:
            return b"", self.content_type
        if isinstance(self.body, bytes):
            return self.body, self.content_type or "application/octet-stream"
        if isinstance(self.body, str):
            return self.body.encode("utf-8"), self.content_type or "text/plain; charset=utf-8"
        data = json.dumps(self.body, separators=(",", ":")).encode("utf-8")
        return data, self.content_type or "application/json; odata.metadata=minimal; charset=utf-8"


class ConnectionReset(Exception):
    """Raised by a handler (or a fault) to drop the TCP connection without an answer."""


@dataclass
class Fault:
    """One injected failure. `remaining` counts down per matching request; None = forever."""

    kind: str  # "status" | "reset" | "html" | "latency" | "unreadable" | "relink"
    status: int = 503
    retry_after: float | None = None
    delay: float = 0.0
    link_base: str | None = None  # "relink": the foreign base that replaces the service's own
    method: str | None = None
    path_regex: str | None = None
    remaining: int | None = 1
    in_batch: bool | None = None  # None: both top-level and batch items; True/False: only those

    def matches(self, req: Request) -> bool:
        if self.method and req.method != self.method.upper():
            return False
        if self.in_batch is not None and req.in_batch != self.in_batch:
            return False
        return not (self.path_regex and not re.search(self.path_regex, req.path))


_AFTER_FAULTS = ("unreadable", "relink")


class Faults:
    """Failures a test asks the service to produce, consumed in the order they were added."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self.latency: float = 0.0  # added to every request (and every batch item)
        self.fired: Counter[str] = Counter()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def throttle(self, count: int = 1, retry_after: float = 0.0, **match: Any) -> Fault:
        return self.add(Fault("status", status=429, retry_after=retry_after, remaining=count, **match))

    def error(self, status: int, count: int = 1, retry_after: float | None = None, **match: Any) -> Fault:
        return self.add(Fault("status", status=status, retry_after=retry_after, remaining=count, **match))

    def reset(self, count: int = 1, **match: Any) -> Fault:
        return self.add(Fault("reset", remaining=count, **match))

    def html(self, count: int = 1, status: int = 502, **match: Any) -> Fault:
        return self.add(Fault("html", status=status, remaining=count, **match))

    def slow(self, delay: float, count: int = 1, **match: Any) -> Fault:
        return self.add(Fault("latency", delay=delay, remaining=count, **match))

    def unreadable(self, count: int = 1, status: int = 200, **match: Any) -> Fault:
        """The request is *applied*, then its 2xx answer arrives as a page the client cannot read
        (a proxy's or captive portal's HTML with the service's success status): the "applied, answer
        unreadable" outcome. Only a 2xx answer is replaced; an error answer passes unchanged."""
        return self.add(Fault("unreadable", status=status, remaining=count, **match))

    def foreign_links(self, link_base: str, count: int = 1, **match: Any) -> Fault:
        """The answer's `@odata.nextLink` / `@odata.deltaLink` point at `link_base` (another scheme,
        host or port) instead of this service: what a hostile or misrouted answer would carry."""
        return self.add(Fault("relink", link_base=link_base.rstrip("/"), remaining=count, **match))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.latency = 0.0

    def take(self, req: Request) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.matches(req):
                    if f.remaining is not None:
                        f.remaining -= 1
                        if f.remaining <= 0:
                            self._faults.remove(f)
                    self.fired[f.kind if f.kind != "status" else str(f.status)] += 1
                    return f
        return None


class Counters:
    """What the product sent: per (method, kind), batch items counted individually.

    `http` counts HTTP calls on the wire (a $batch is one); `items` counts operations (a $batch of 20
    is 20 items and no extra item for the envelope).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.http: Counter[tuple[str, str]] = Counter()
        self.items: Counter[tuple[str, str]] = Counter()
        self.statuses: Counter[int] = Counter()

    def record_http(self, method: str, kind: str) -> None:
        with self._lock:
            self.http[(method, kind)] += 1

    def record_item(self, method: str, kind: str) -> None:
        with self._lock:
            self.items[(method, kind)] += 1

    def record_status(self, status: int) -> None:
        with self._lock:
            self.statuses[status] += 1

    @property
    def http_total(self) -> int:
        return sum(self.http.values())

    @property
    def items_total(self) -> int:
        return sum(self.items.values())

    def http_count(self, method: str | None = None, kind: str | None = None) -> int:
        return sum(
            n
            for (m, k), n in self.http.items()
            if (method is None or m == method) and (kind is None or k == kind)
        )

    def item_count(self, method: str | None = None, kind: str | None = None) -> int:
        return sum(
            n
            for (m, k), n in self.items.items()
            if (method is None or m == method) and (kind is None or k == kind)
        )

    def reset(self) -> None:
        with self._lock:
            self.http.clear()
            self.items.clear()
            self.statuses.clear()


Handler = Callable[..., Response]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    kind: str  # a short name for counters, e.g. "contacts.list"


class Service:
    """Base for a simulated service. Subclasses call `route()` in `__init__` and implement handlers.

    `dispatch()` is the single entry for a request, used both for top-level requests and for the
    operations inside a `$batch`, so faults, counters and latency apply to each in the same way.
    """

    name = "service"
    # Whether a `$batch` envelope costs one latency of its own on top of its operations. The
    # benchmark's Graph model charges latency per item (Graph fans a batch out to Outlook), so the
    # Graph simulator turns this off; BC's envelope holds a concurrency slot and is charged.
    envelope_latency = True

    def __init__(self) -> None:
        self.routes: list[Route] = []
        self.faults = Faults()
        self.counters = Counters()
        self.lock = threading.RLock()  # guards the service's data
        self.base_url = ""  # set by SandboxServer.start()

    def route(self, method: str, pattern: str, handler: Handler, kind: str) -> None:
        self.routes.append(Route(method.upper(), re.compile(f"^{pattern}$"), handler, kind))

    # Hooks a subclass may override -------------------------------------------------------
    def error_response(self, status: int, code: str, message: str, headers: dict | None = None) -> Response:
        """The service's own error body shape (OData style by default)."""
        return Response(status, {"error": {"code": code, "message": message}}, headers or {})

    def authorize(self, req: Request, route: Route) -> Response | None:
        """Return an error Response to refuse the request (e.g. missing/invalid bearer token)."""
        return None

    def before(self, req: Request, route: Route) -> Response | None:
        """Called after authorization, before the handler; may refuse (e.g. concurrency limits)."""
        return None

    def after(self, req: Request, route: Route) -> None:
        """Called after the handler (also when it raised), e.g. to release a concurrency slot."""

    def kind_for(self, req: Request) -> str:
        for r in self.routes:
            if r.method == req.method and r.pattern.match(req.path):
                return r.kind
        return "unknown"

    # Dispatch ----------------------------------------------------------------------------
    def dispatch(self, req: Request) -> Response:
        match = None
        route = None
        path_matched = False
        for r in self.routes:
            m = r.pattern.match(req.path)
            if m:
                path_matched = True
                if r.method == req.method:
                    match, route = m, r
                    break
        kind = route.kind if route else "unknown"
        if req.in_batch:
            self.counters.record_item(req.method, kind)
        else:
            self.counters.record_http(req.method, kind)
            if kind != "$batch":
                self.counters.record_item(req.method, kind)
        fault = self.faults.take(req)
        after_fault = None
        if fault is not None and fault.kind in _AFTER_FAULTS:
            after_fault = fault  # shapes the answer of a request that is handled normally
        elif fault is not None:
            resp = self._apply_fault(fault, req)
            if resp is not None:
                return resp
        if self.faults.latency and (req.in_batch or kind != "$batch" or self.envelope_latency):
            time.sleep(self.faults.latency)
        if route is None:
            if path_matched:
                return self.error_response(405, "BadRequest", f"Method {req.method} is not allowed here.")
            return self.error_response(404, "NotFound", f"Resource not found for the segment '{req.path}'.")
        refused = self.authorize(req, route)
        if refused is not None:
            return refused
        refused = self.before(req, route)
        if refused is not None:
            return refused
        try:
            resp = route.handler(
                req, **{k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            )
        finally:
            self.after(req, route)
        return resp if after_fault is None else self._shape_answer(after_fault, resp)

    def _shape_answer(self, fault: Fault, resp: Response) -> Response:
        if fault.kind == "unreadable":
            if not 200 <= resp.status < 300:
                return resp
            body = "<!DOCTYPE html><html><head><title>OK</title></head><body>Request accepted.</body></html>"
            return Response(fault.status, body, content_type="text/html; charset=utf-8")
        if isinstance(resp.body, dict) and fault.link_base:
            body = dict(resp.body)
            for key in ("@odata.nextLink", "@odata.deltaLink"):
                link = body.get(key)
                if isinstance(link, str) and link.startswith(self.base_url):
                    body[key] = fault.link_base + link[len(self.base_url) :]
            return replace(resp, body=body)
        return resp

    def _apply_fault(self, fault: Fault, req: Request) -> Response | None:
        if fault.kind == "latency":
            time.sleep(fault.delay)
            return None
        if fault.kind == "reset":
            raise ConnectionReset()
        if fault.kind == "html":
            body = (
                "<!DOCTYPE html><html><head><title>502 - Web server received an invalid response</title>"
                "</head><body><h1>Server Error</h1></body></html>"
            )
            return Response(fault.status, body, content_type="text/html; charset=utf-8")
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = _fmt_seconds(fault.retry_after)
        code = {429: "TooManyRequests", 503: "ServiceUnavailable", 504: "GatewayTimeout"}.get(
            fault.status, "InternalServerError"
        )
        return self.error_response(fault.status, code, f"Injected fault {fault.status}.", headers)


def _fmt_seconds(value: float) -> str:
    # Retry-After is delta-seconds (an integer) per RFC 9110; fractions are a sandbox-only extension
    # that lets tests keep waits short. The product parses both.
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate small writes; without TCP_NODELAY, Nagle's algorithm and
    # delayed ACKs add ~40 ms to every response, which would swamp any latency model.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        service = self.server.service
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        req = Request(
            method=self.command,
            path=unquote(parts.path),
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers=CaseInsensitiveDict(dict(self.headers.items())),
            body=body,
            raw_target=self.path,
        )
        try:
            resp = service.dispatch(req)
        except ConnectionReset:
            self._reset()
            return
        except Exception as exc:  # a simulator bug must show up loudly in tests, as a 500
            resp = service.error_response(500, "SandboxError", f"{type(exc).__name__}: {exc}")
        service.counters.record_status(resp.status)
        data, ctype = resp.encoded()
        self.send_response(resp.status)
        if ctype:
            self.send_header("Content-Type", ctype)
        for k, v in resp.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send a TCP RST: the client sees
        # "Connection reset by peer", as with a dropped load-balancer connection.
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], service: Service, ssl_context: ssl.SSLContext | None):
        super().__init__(addr, _Handler)
        self.service = service
        self.ssl_context = ssl_context

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            # Handshake lazily in the handler thread so one slow client cannot block accept().
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            if isinstance(request, ssl.SSLSocket):
                request.do_handshake()
            super().finish_request(request, client_address)
        except (ssl.SSLError, ConnectionError, OSError):
            pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class SandboxServer:
    """Serves one Service on 127.0.0.1:<free port>, over TLS when an SSL context is given."""

    def __init__(self, service: Service, ssl_context: ssl.SSLContext | None, host: str = "localhost"):
        self.service = service
        self._server = _Server(("127.0.0.1", 0), service, ssl_context)
        self.port = self._server.server_address[1]
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://{host}:{self.port}"
        service.base_url = self.url
        self._thread: threading.Thread | None = None

    def start(self) -> SandboxServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=f"sandbox-{self.service.name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)
