"""One HTTP policy for both APIs: timeouts, retries, Retry-After, backoff, JSON checks, counting.

Retries follow what Microsoft documents for Graph and Business Central: honour `Retry-After` on 429
(and on 503 when sent), back off exponentially with full jitter when it is absent (Business Central's
429 carries none: "adopt a retry logic while providing a cool off period"), within a total budget of
BC's 5-minute rate window; retry 503/504 and dropped connections.

A non-idempotent request (a POST, a `$batch` with writes) is sent again only when the answer says
it was *not* processed (429, 503, 401 before the token refresh) or it never left (no connection).
Any other outcome whose fate is unknown raises `AmbiguousWriteError` instead of repeating: the
connection lost after sending, a read timeout, a 502/504 or a gateway's error page, and any 2xx
whose body cannot be read (HTML, or BC's multipart/mixed `$batch` answer): a 2xx means the service
applied the write, so repeating a create would duplicate the contact. The sync resolves ambiguous
writes on the next run through the BC-id tag or the email match instead.

Every request carries `Accept: application/json` (without it BC answers `$batch` as multipart/mixed)
and goes only to the configured origin: a `@odata.nextLink`/`deltaLink` pointing anywhere else is
refused before a token is fetched (`ForeignUrlError`).

The same rules apply to each operation inside a JSON `$batch` (Graph and BC share the format):
throttled items come back with their own status and `Retry-After` inside a 200 envelope.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests

log = logging.getLogger(__name__)

RETRY_STATUSES = {429, 503, 504}
_IDEMPOTENT = {"GET", "HEAD", "PUT", "DELETE", "PATCH"}  # PATCH: same body, same result


class ApiError(RuntimeError):
    """A request that failed for good. The message names service, method, path and status."""

    def __init__(self, service: str, method: str, url: str, status: int | None, code: str, message: str):
        path = urlsplit(url).path if url else ""
        where = f"{service} {method} {path}"
        super().__init__(
            f"{where} → {status if status is not None else 'no response'} {code}: {message}".strip()
        )
        self.service = service
        self.method = method
        self.status = status
        self.code = code
        self.detail = message


class AmbiguousWriteError(ApiError):
    """A write may or may not have happened (the answer was lost). Never repeat it blindly."""


class ForeignUrlError(ApiError):
    """A URL (a nextLink, a deltaLink, a stored link) outside the configured base: never called.

    The message names only the origins, not the path (a Graph path holds the mailbox address).
    """

    def __init__(self, service: str, url: str, allowed: str):
        parts = urlsplit(url)
        got = f"{parts.scheme}://{parts.netloc}" if parts.scheme or parts.netloc else "a relative URL"
        RuntimeError.__init__(
            self,
            f"{service}: refused to follow a link to {got}: it is not the configured {service} "
            f"address {allowed}; nothing was sent there (no token left this app)",
        )
        self.service = service
        self.method = "GET"
        self.status = None
        self.code = "ForeignHost"
        self.detail = str(self)
        self.origin = got


@dataclass
class Backoff:
    """Exponential backoff with full jitter for answers without `Retry-After`, within a time budget.

    Attempt n waits a uniform random time in [0, min(cap, base * 2**(n-1))] ("full jitter" spreads
    the retries of many clients instead of synchronising them). `budget` bounds the total wait of one
    request: 300 s is Business Central's sliding rate window (6,000 requests per 5 minutes), so a
    throttled request keeps trying for as long as the window needs to drain and no longer.
    """

    base: float = 0.5
    cap: float = 60.0
    budget: float = 300.0
    rng: random.Random = field(default_factory=random.Random)

    def ceiling(self, attempt: int) -> float:
        return min(self.cap, self.base * 2.0 ** max(0, attempt - 1))

    def delay(self, attempt: int, waited: float) -> float | None:
        """The wait before retry number `attempt`, or None when the budget is spent."""
        remaining = self.budget - waited
        if remaining <= 0:
            return None
        return min(remaining, self.rng.uniform(0, self.ceiling(attempt)))


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: Any  # parsed JSON, or None

    def json_object(self) -> dict[str, Any]:
        """The body as the JSON object the API documents for this call (a typed view, not a check)."""
        body: dict[str, Any] = self.body
        return body

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers.items():
            if k.lower() == name:
                return v
        return None


@dataclass
class RequestCounter:
    """Requests a run sent, per service, counted on the wire (a $batch is one request)."""

    counts: dict[str, int] = field(default_factory=dict)
    throttled: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, service: str, throttled: bool = False) -> None:
        with self._lock:
            self.counts[service] = self.counts.get(service, 0) + 1
            if throttled:
                self.throttled[service] = self.throttled.get(service, 0) + 1


@dataclass
class BatchItem:
    method: str
    url: str  # relative to the batch root, as the API expects it in a batch
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ItemResult:
    status: int | None  # None: no definite answer (see error)
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    ambiguous: bool = False  # the write may have happened

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_of(body: Any, text: str) -> tuple[str, str]:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("code", "")), str(err.get("message", ""))
        if isinstance(err, str):  # OAuth style
            return err, str(body.get("error_description", ""))
    return "", text[:200].strip()


class WindowPacer:
    """Keeps one client under a request budget per sliding window.

    Graph allows 10,000 requests per 10 minutes per app and mailbox, counting every operation inside a
    `$batch`; a large first sync would otherwise run into 429s and sit out their Retry-After. Pacing
    waits exactly as long as the window needs instead. One run per mailbox at a time (the lease) makes
    a per-run pacer enough.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.limit = limit
        self.window = window
        self._clock = clock
        self._sleep = sleep
        self._events: list[tuple[float, int]] = []
        self._used = 0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            while True:
                now = self._clock()
                while self._events and self._events[0][0] <= now - self.window:
                    self._used -= self._events.pop(0)[1]
                if self._used + n <= self.limit or not self._events:
                    self._events.append((now, n))
                    self._used += n
                    return
                wait = self._events[0][0] + self.window - now
                self._sleep(wait)


class HttpClient:
    """A `requests.Session` with the retry policy, for one service and one run's counter."""

    def __init__(
        self,
        service: str,
        token: Callable[[], str],
        *,
        counter: RequestCounter | None = None,
        on_unauthorized: Callable[[], None] | None = None,
        timeout: tuple[float, float] = (10.0, 120.0),
        max_attempts: int = 8,
        backoff_base: float = 0.5,
        backoff_cap: float = 60.0,
        max_wait: float = 300.0,
        max_throttled_attempts: int = 40,
        sleep: Callable[[float], None] = time.sleep,
        default_headers: dict[str, str] | None = None,
        session: requests.Session | None = None,
        pacer: Callable[[int], None] | None = None,
        base_url: str | None = None,
        rng: random.Random | None = None,
    ):
        """`base_url`: the configured API base; requests anywhere else are refused (ForeignUrlError).
        `max_attempts` bounds retries of errors; 429s are bounded by the `max_wait` budget (and
        `max_throttled_attempts`), since a throttled request was not processed and waiting is the cure.
        """
        self.service = service
        self._token = token
        self.counter = counter or RequestCounter()
        self._on_unauthorized = on_unauthorized
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._max_wait = max_wait
        self._max_throttled_attempts = max_throttled_attempts
        self._sleep = sleep
        # BC answers a `$batch` as multipart/mixed unless the request asks for JSON; both APIs
        # answer JSON anyway, so every request says so.
        self._headers = {"Accept": "application/json", **(default_headers or {})}
        self._session = session or requests.Session()
        self._pacer = pacer
        self.backoff = Backoff(backoff_base, backoff_cap, max_wait, rng or random.Random())
        self._origin: str | None = None
        self._base_path = ""
        if base_url:
            self._origin, self._base_path = _origin_of(base_url)
        self._base_url = base_url.rstrip("/") if base_url else None

    def _backoff(self, attempt: int, waited: float = 0.0) -> float:
        delay = self.backoff.delay(attempt, waited)
        return 0.0 if delay is None else delay

    def check_target(self, url: str) -> None:
        """Refuse a URL outside the configured base (scheme, host, port and base path)."""
        if self._origin is None:
            return
        origin, path = _origin_of(url)
        if origin != self._origin or not (path + "/").startswith(self._base_path + "/"):
            raise ForeignUrlError(self.service, url, self._base_url or "")

    def request(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        allow_status: tuple[int, ...] = (),
        idempotent: bool | None = None,
        operations: int = 1,
        xml: bool = False,
        raw: bool = False,
    ) -> HttpResponse:
        """Send with retries; return the response for 2xx and `allow_status`, raise ApiError otherwise.

        `idempotent` overrides what the method says, e.g. for a `$batch` POST that only reads.
        `xml`/`raw`: a 2xx XML answer as text / an accepted answer as bytes; a bytes `json_body` goes as is.
        """
        method = method.upper()
        data, as_json = _encode(json_body)
        self.check_target(url)  # before any token is fetched or any byte is sent
        call = _Call(method, url, method in _IDEMPOTENT if idempotent is None else idempotent)
        while True:
            call.attempt += 1
            if self._pacer is not None:
                self._pacer(operations)  # every attempt counts against the service's budget
            try:
                resp = self._session.request(
                    method,
                    url,
                    params=params,
                    data=data,
                    headers=self._headers_for(headers, as_json),
                    timeout=self._timeout,
                )
            except requests.exceptions.RequestException as exc:
                self.counter.add(self.service)
                self._raise_unless_repeatable(call, exc)
                self._wait(call, self._backoff(call.attempt, call.waited))
                continue
            status = resp.status_code
            self.counter.add(self.service, throttled=status == 429)
            body = self._parse(resp)
            accepted = 200 <= status < 300 or status in allow_status
            if accepted and (raw or (xml and "xml" in _ctype(resp))):
                return HttpResponse(status, dict(resp.headers), resp.content if raw else resp.text)
            if accepted:
                if body is not _NOT_JSON:
                    return HttpResponse(status, dict(resp.headers), body)
                self._raise_for_unreadable(call, resp)
                self._wait(call, self._backoff(call.attempt, call.waited))
                continue
            if status == 401 and not call.refreshed and self._on_unauthorized:
                call.refreshed = True
                self._on_unauthorized()
                continue
            delay = self._retry_delay(call, resp, body, resp.text)
            log.info("%s %s → %s, retrying in %.1fs", self.service, method, status, delay)
            self._wait(call, delay)

    def _headers_for(self, headers: dict[str, str] | None, has_body: bool) -> dict[str, str]:
        """The client's headers, the call's, a fresh token; `Prefer` values of both are combined."""
        merged = {**self._headers, **(headers or {}), "Authorization": f"Bearer {self._token()}"}
        if "Prefer" in self._headers and headers and "Prefer" in headers:
            merged["Prefer"] = f"{self._headers['Prefer']}, {headers['Prefer']}"
        if has_body:
            merged["Content-Type"] = "application/json"
        return merged

    def _wait(self, call: _Call, delay: float) -> None:
        call.waited += delay
        self._sleep(delay)

    def _raise_unless_repeatable(self, call: _Call, exc: requests.exceptions.RequestException) -> None:
        """A request that got no (whole) answer: raise unless it may be sent again.

        A connection that failed before sending is safe to repeat; a connection lost after sending, a
        read timeout or an answer that broke off while being read (ChunkedEncodingError,
        ContentDecodingError) may follow an applied write, so a write is ambiguous."""
        ambiguous: tuple[str, str] | None
        if isinstance(exc, requests.exceptions.ConnectionError):  # ConnectTimeout included
            sent = not isinstance(
                exc, requests.exceptions.ConnectTimeout
            ) and "NewConnectionError" not in repr(exc)
            ambiguous = ("ConnectionLost", "the connection dropped after sending") if sent else None
            final = ("ConnectionError", str(exc)[:200])
        elif isinstance(exc, requests.exceptions.Timeout):
            ambiguous = final = ("Timeout", "no answer in time")
        else:
            ambiguous = (type(exc).__name__, "the answer broke off")
            final = (type(exc).__name__, str(exc)[:200])
        if not call.repeatable and ambiguous is not None:
            raise AmbiguousWriteError(self.service, call.method, call.url, None, *ambiguous) from None
        if call.attempt >= self._max_attempts:
            raise ApiError(self.service, call.method, call.url, None, *final) from None

    def _raise_for_unreadable(self, call: _Call, resp: requests.Response) -> None:
        """An accepted answer whose body is not JSON: raise unless it is a read to try again."""
        status = resp.status_code
        if not call.repeatable and 200 <= status < 300:
            # A 2xx says the service applied the write; only its answer is unreadable (a proxy's
            # page, BC's multipart batch answer). Repeating would apply it twice.
            raise AmbiguousWriteError(
                self.service,
                call.method,
                call.url,
                status,
                "UnreadableAnswer",
                f"{_ctype(resp) or 'no content type'} body instead of JSON after the write was accepted",
            )
        # A read answered by an HTML page with a 2xx (a proxy or captive portal) is a transient
        # failure, and a read is safe to repeat.
        if call.attempt >= self._max_attempts:
            raise ApiError(self.service, call.method, call.url, status, "NotJson", _ctype(resp))

    def _retry_delay(self, call: _Call, resp: requests.Response, body: Any, text: str) -> float:
        """How long to wait before sending a failed request again, or the error that ends it."""
        status = resp.status_code
        code, message = _error_of(None if body is _NOT_JSON else body, text)
        if body is _NOT_JSON and not code:
            message = f"{_ctype(resp)} body instead of JSON"
        retryable = status in RETRY_STATUSES or (status >= 500 and body is _NOT_JSON)
        # 429 and 503 say the request was not processed. A 502 or 504 (JSON or not), or a gateway's
        # error page, may come after the service applied a write: repeating it could duplicate.
        if not call.repeatable and (status in (502, 504) or (retryable and status not in (429, 503))):
            fallback = {502: "BadGateway", 504: "GatewayTimeout"}.get(status, "ServerError")
            raise AmbiguousWriteError(self.service, call.method, call.url, status, code or fallback, message)
        more = call.attempt < self._max_attempts or (
            status == 429 and call.attempt < self._max_throttled_attempts
        )
        if not (retryable and more):
            raise ApiError(self.service, call.method, call.url, status, code or "Error", message)
        delay = parse_retry_after(resp.headers.get("Retry-After"))
        if delay is None:
            delay = self.backoff.delay(call.attempt, call.waited)
        if delay is None or call.waited + delay > self._max_wait:
            original = _error_of(None if body is _NOT_JSON else body, text)[1]
            raise ApiError(self.service, call.method, call.url, status, code, f"still throttled: {original}")
        return delay

    def _parse(self, resp: requests.Response) -> Any:
        """The JSON body, parsed once from the bytes (JSON is UTF-8, RFC 8259). Not through `resp.text`
        and `resp.json()`: each decodes the body again, and a 20,000-contact BC page (25 MB) would sit in
        memory three times over while it is parsed."""
        if not resp.content:
            return None
        if "json" not in _ctype(resp):
            return _NOT_JSON
        try:
            return json.loads(resp.content)
        except ValueError:  # includes UnicodeDecodeError
            return _NOT_JSON

    def batch(
        self,
        batch_url: str,
        items: list[BatchItem],
        max_size: int,
        headers: dict[str, str] | None = None,
    ) -> list[ItemResult]:
        """Run operations through JSON `$batch`, `max_size` per call, retrying throttled items.

        Results come back in the order of `items`. Items answered 429/503 (or 504 for reads) are sent
        again after the longest Retry-After among them; writes answered 504 are reported ambiguous.
        """
        results: list[ItemResult | None] = [None] * len(items)
        for start in range(0, len(items), max_size):
            chunk = list(range(start, min(start + max_size, len(items))))
            self._run_chunk(batch_url, items, chunk, results, headers or {})
        return [r if r is not None else ItemResult(None, error="not sent") for r in results]

    def _run_chunk(
        self,
        batch_url: str,
        items: list[BatchItem],
        pending: list[int],
        results: list[ItemResult | None],
        headers: dict[str, str],
    ) -> None:
        attempt = 0
        waited = 0.0
        while pending:
            attempt += 1
            payload = {"requests": [_batch_request(i, items[i]) for i in pending]}
            reads_only = all(items[i].method.upper() == "GET" for i in pending)
            try:
                resp = self.request(
                    "POST",
                    batch_url,
                    json_body=payload,
                    headers=headers,
                    idempotent=reads_only or None,
                    operations=len(pending),
                )
            except AmbiguousWriteError as exc:
                for i in pending:
                    reads = items[i].method.upper() == "GET"
                    results[i] = ItemResult(None, error=str(exc), ambiguous=not reads)
                return
            except ApiError as exc:
                for i in pending:
                    results[i] = ItemResult(exc.status, error=str(exc))
                return
            retry, delay = self._read_answers(items, pending, results, resp.body, attempt, waited)
            if (
                retry
                and attempt < self._max_throttled_attempts
                and (attempt < self._max_attempts or all(_status_of(results[i]) == 429 for i in retry))
                and waited + delay <= self._max_wait
            ):
                waited += delay
                self._sleep(delay)
                pending = retry
                continue
            return

    def _read_answers(
        self,
        items: list[BatchItem],
        pending: list[int],
        results: list[ItemResult | None],
        envelope: Any,
        attempt: int,
        waited: float,
    ) -> tuple[list[int], float]:
        """Each pending item's result from the `$batch` answer; returns (items to send again, how long
        to wait first: the longest Retry-After among them, or the backoff)."""
        answered: dict[str, dict[str, Any]] = {}
        for answer in (envelope or {}).get("responses", []):
            answered[str(answer.get("id"))] = answer
        retry: list[int] = []
        delay = 0.0
        for i in pending:
            answer = answered.get(str(i))
            if answer is None:
                # The envelope was accepted (2xx), so a write without its own answer may have
                # been applied: ambiguous, never sent again.
                results[i] = ItemResult(
                    None,
                    error="no answer for this operation in the batch response",
                    ambiguous=items[i].method.upper() != "GET",
                )
                continue
            status = int(answer.get("status", 0))
            item_headers = {str(k): str(v) for k, v in (answer.get("headers") or {}).items()}
            body = answer.get("body")
            method = items[i].method.upper()
            if status in RETRY_STATUSES and not (status == 504 and method not in _IDEMPOTENT):
                retry.append(i)
                retry_after = parse_retry_after(
                    next((v for k, v in item_headers.items() if k.lower() == "retry-after"), None)
                )
                delay = max(delay, retry_after if retry_after is not None else self._backoff(attempt, waited))
                error = _item_error(self.service, items[i], status, body)
                results[i] = ItemResult(status, body, item_headers, error=error)
            elif 200 <= status < 300:
                results[i] = ItemResult(status, body, item_headers)
            else:
                error = _item_error(self.service, items[i], status, body)
                results[i] = ItemResult(status, body, item_headers, error=error, ambiguous=status == 504)
        return retry, delay


@dataclass
class _Call:
    """One request across its attempts: what it is, whether it may be repeated, how far it got."""

    method: str
    url: str
    repeatable: bool
    attempt: int = 0
    waited: float = 0.0
    refreshed: bool = False  # the token was refreshed once after a 401


def _status_of(result: ItemResult | None) -> int | None:
    return None if result is None else result.status


class _NotJson:
    def __repr__(self) -> str:
        return "<not json>"


_NOT_JSON: Any = _NotJson()


def _origin_of(url: str) -> tuple[str, str]:
    """(scheme://host:port with the default port made explicit, path without trailing slash)."""
    parts = urlsplit(url)
    scheme = (parts.scheme or "").lower()
    try:
        port = parts.port or {"https": 443, "http": 80}.get(scheme)
    except ValueError:
        port = None
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}", parts.path.rstrip("/")


def image_body(resp: HttpResponse, service: str, url: str) -> bytes:
    """The bytes of a picture's answer. A page in its place (a proxy's HTML with a 2xx, a JSON body)
    is an error, never taken for a picture: it would otherwise be copied, or noted as not an image."""
    ctype = (resp.header("Content-Type") or "").lower()
    if any(kind in ctype for kind in ("html", "json", "xml", "text/")):
        raise ApiError(service, "GET", url, resp.status, "NotAnImage", f"{ctype} body instead of a picture")
    data: bytes = resp.body or b""
    return data


def _encode(body: Any) -> tuple[Any, bool]:
    """A request's body as sent, and whether it is JSON: bytes (a photo) go as they are, with the
    Content-Type the caller gives."""
    if body is None or isinstance(body, bytes):
        return body, False
    return json.dumps(body), True


def _ctype(resp: requests.Response) -> str:
    return resp.headers.get("Content-Type", "").lower()


def _batch_request(index: int, item: BatchItem) -> dict[str, Any]:
    req: dict[str, Any] = {"id": str(index), "method": item.method.upper(), "url": item.url}
    headers = dict(item.headers)
    if item.body is not None:
        headers.setdefault("Content-Type", "application/json")
        req["body"] = item.body
    if headers:
        req["headers"] = headers
    return req


def _item_error(service: str, item: BatchItem, status: int, body: Any) -> str:
    code, message = _error_of(body, "")
    path = item.url.split("?", 1)[0]
    return f"{service} {item.method.upper()} {path} → {status} {code}: {message}".strip()
