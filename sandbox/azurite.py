"""Runs a real Azurite (Table + Queue service, in memory) on free ports for tests and the demo.

The storage layer is only ever tested against this real emulator, never an in-memory stand-in.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The emulator's published development account key (documented by Microsoft; not a secret).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def azurite_binary() -> Path:
    path = ROOT / "node_modules" / ".bin" / "azurite"
    if not path.exists():
        raise RuntimeError(
            f"Azurite is not installed at {path}. Run `npm ci` (or `npm install`) in {ROOT} "
            "or use ./scripts/test.sh, which installs it."
        )
    return path


class Azurite:
    """Start with `start()`, read `connection_string`, stop with `stop()` (also a context manager)."""

    def __init__(self) -> None:
        self.table_port = _free_port()
        self.queue_port = _free_port()
        self.blob_port = _free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._cwd: str | None = None

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
            f"TableEndpoint=http://127.0.0.1:{self.table_port}/{DEV_ACCOUNT};"
            f"QueueEndpoint=http://127.0.0.1:{self.queue_port}/{DEV_ACCOUNT};"
            f"BlobEndpoint=http://127.0.0.1:{self.blob_port}/{DEV_ACCOUNT};"
        )

    def start(self, timeout: float = 30.0) -> Azurite:
        # --inMemoryPersistence cannot be combined with --location, so run from a scratch cwd.
        self._cwd = tempfile.mkdtemp(prefix="azurite-")
        cmd = [
            str(azurite_binary()),
            "--inMemoryPersistence",
            "--disableTelemetry",
            "--silent",
            "--tableHost", "127.0.0.1", "--tablePort", str(self.table_port),
            "--queueHost", "127.0.0.1", "--queuePort", str(self.queue_port),
            "--blobHost", "127.0.0.1", "--blobPort", str(self.blob_port),
        ]  # fmt: skip
        self._proc = subprocess.Popen(cmd, cwd=self._cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        for port in (self.table_port, self.queue_port):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if self._proc.poll() is not None or time.monotonic() > deadline:
                        err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                        self.stop()
                        raise RuntimeError(f"Azurite did not start: {err.strip() or 'timeout'}") from None
                    time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
        if self._cwd:
            shutil.rmtree(self._cwd, ignore_errors=True)
            self._cwd = None

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
