"""Measuring one case: wall time, the store's share of it, the engine's memory high-water, CPU.

The store wrapper exists because Azurite is far slower than Azure Table Storage for link writes
(it scans the partition on every write: ~3.5 ms a link, ~60 s for 20,000), and Table Storage is not
part of the API bound; its time is measured per thread so it can be taken off the run's critical path.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class TimedStore:
    """Delegates to a `shared.store.Store`, timing every public call by thread and by method."""

    def __init__(self, store: Any):
        self._store = store
        self._lock = threading.Lock()
        self.by_thread: defaultdict[int, float] = defaultdict(float)
        self.by_method: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()

    def reset(self) -> None:
        with self._lock:
            self.by_thread.clear()
            self.by_method.clear()
            self.calls.clear()

    @property
    def total(self) -> float:
        return sum(self.by_thread.values())

    @property
    def busiest_thread(self) -> float:
        """Store seconds on the thread that spent the most in the store: its share of the critical path."""
        return max(self.by_thread.values(), default=0.0)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                spent = time.perf_counter() - started
                with self._lock:
                    self.by_thread[threading.get_ident()] += spent
                    self.by_method[name] += spent
                    self.calls[name] += 1

        return timed


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", _PROC_STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class MemoryWatch:
    """The process's resident-set high-water during a case (VmHWM, reset through clear_refs "5" on
    Linux). Where that reset is unavailable, a sampling thread records the highest VmRSS instead."""

    def __init__(self) -> None:
        try:
            _CLEAR_REFS.write_text("5")
            self.method = "VmHWM, reset per case"
        except OSError:
            self.method = "highest VmRSS sampled every 20 ms"
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline_mib = 0.0

    def start(self) -> None:
        self.baseline_mib = (_status_kib("VmRSS") or 0) / 1024
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self._stop.clear()
            self._peak = _status_kib("VmRSS") or 0
            self._thread = threading.Thread(target=self._sample, daemon=True, name="bench-rss")
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, _status_kib("VmRSS") or 0)

    def stop(self) -> float:
        """Peak resident set in MiB."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            return self._peak / 1024
        return (_status_kib("VmHWM") or 0) / 1024


class WarningCount(logging.Handler):
    """Counts the engine's warnings (failed items, retries given up) per case; the records themselves
    go to bench/out/engine.log instead of flooding the console."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def route_engine_logs(path: Path) -> WarningCount:
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    file_handler = logging.FileHandler(path, mode="w")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    counter = WarningCount()
    root.addHandler(file_handler)
    root.addHandler(counter)
    return counter


def timed_call(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, engine-process CPU seconds)."""
    cpu = time.process_time()
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started, time.process_time() - cpu
