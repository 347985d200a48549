"""Outbound webhook calls of the simulated services: validation requests and notification delivery.

Why one module for both Graph and Business Central: both services call the subscriber's URL the same
way (a POST with a JSON body, or a validation POST with ``?validationToken=``), differ only in their
time limits and in which answers they retry, and tests need the same two things from both: calls that
reach a local listener, and a deterministic way to wait until every queued delivery has been settled.

Deliveries run on one background thread per service. Waiting between retries goes through an
injectable ``wait`` callable (default: a real, interruptible wait), so a test replaces it with one that
records the delays and returns at once: retries are exercised without sleeping. ``wait_idle()`` blocks
on a condition until the queue is empty, never on a timer.

**Sandbox allowance.** The real services call only public HTTPS URLs. The sandbox also accepts
``http://`` when the host is a loopback address (127.0.0.0/8, ``::1``, ``localhost``), so tests can point
a subscription at an in-process listener; every other ``http://`` URL is refused like in the cloud.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_problem(url: Any, allow_loopback_http: bool = True) -> str | None:
    """Why a subscriber URL is refused, or None. HTTPS always; plain HTTP only to loopback (sandbox)."""
    if not isinstance(url, str) or not url:
        return "must be a non-empty absolute URL"
    parts = urlsplit(url)
    if not parts.hostname:
        return "must be an absolute URL"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http" and allow_loopback_http and is_loopback_host(parts.hostname):
        return None
    return "must use https"


@dataclass
class Attempt:
    """One call the service made: what it sent and what it got (for tests and the report)."""

    url: str
    body: Any
    status: int | None  # None: no answer in time, or the connection failed
    elapsed: float


@dataclass
class DeliveryPolicy:
    """How a service treats the subscriber's answer to a notification.

    ``retry_delays``: the waits before each further attempt (their count bounds the retries).
    ``retryable``: whether a failed answer (status, or None for no answer in time) is retried.
    ``on_give_up``: called with the job when retries end without success or a final refusal.
    """

    timeout: float
    retry_delays: tuple[float, ...]
    retryable: Callable[[int | None], bool]


@dataclass
class Job:
    url: str
    body: Any
    policy: DeliveryPolicy
    on_result: Callable[[Job, int | None], None] | None = None
    attempts: list[Attempt] = field(default_factory=list)


class Deliverer:
    """A background thread that POSTs queued notifications and retries them per their policy."""

    def __init__(self, name: str, ca_bundle: str | None = None) -> None:
        self.name = name
        self.ca_bundle = ca_bundle
        self.wait: Callable[[float], None] = self._interruptible_wait
        self.log: list[Attempt] = []
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._session = requests.Session()

    # ------------------------------------------------------------------ synchronous calls
    def validate(self, url: str, token: str, timeout: float) -> tuple[int | None, str, str]:
        """The validation request: POST url?validationToken=token; returns (status, content type, body)."""
        sep = "&" if urlsplit(url).query else "?"
        target = f"{url}{sep}{urlencode({'validationToken': token})}"
        started = time.monotonic()
        try:
            # A session of its own: this runs on the request's thread, the shared one on the delivery thread.
            resp = requests.post(
                target,
                data=b"",
                headers={"Content-Type": "text/plain; charset=utf-8"},
                timeout=timeout,
                verify=self.ca_bundle or True,
            )
        except requests.RequestException:
            self._record(Attempt(target, None, None, time.monotonic() - started))
            return None, "", ""
        elapsed = time.monotonic() - started
        self._record(Attempt(target, None, resp.status_code, elapsed))
        if elapsed > timeout:
            return None, "", ""
        return resp.status_code, resp.headers.get("Content-Type", ""), resp.text

    # ------------------------------------------------------------------ background delivery
    def submit(self, job: Job) -> None:
        with self._cond:
            self._queue.append(job)
            self._cond.notify_all()
        self._ensure_thread()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every queued job is settled (delivered, refused or given up). No sleeping."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def _ensure_thread(self) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=f"{self.name}-webhooks", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stop.is_set())
                if self._stop.is_set():
                    return
                job = self._queue.popleft()
                self._busy = True
            try:
                self._deliver(job)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _deliver(self, job: Job) -> None:
        delays = list(job.policy.retry_delays)
        while True:
            status = self._post(job)
            ok = status is not None and 200 <= status < 300
            if ok or not job.policy.retryable(status) or not delays or self._stop.is_set():
                if job.on_result is not None:
                    job.on_result(job, status)
                return
            self.wait(delays.pop(0))

    def _post(self, job: Job) -> int | None:
        started = time.monotonic()
        status: int | None
        try:
            resp = self._session.post(
                job.url, json=job.body, timeout=job.policy.timeout, verify=self.ca_bundle or True
            )
            status = resp.status_code
        except requests.RequestException:
            status = None
        elapsed = time.monotonic() - started
        if elapsed > job.policy.timeout:
            status = None  # an answer after the service stopped waiting counts as none
        attempt = Attempt(job.url, job.body, status, elapsed)
        job.attempts.append(attempt)
        self._record(attempt)
        return status

    def _record(self, attempt: Attempt) -> None:
        with self._cond:
            self.log.append(attempt)

    def _interruptible_wait(self, seconds: float) -> None:
        self._stop.wait(seconds)
