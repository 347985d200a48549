"""Fixtures for the sandbox's own tests: real HTTPS servers on localhost with a throwaway CA."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox import httpd
from sandbox.entra import EntraService
from sandbox.httpd import SandboxServer, Service
from sandbox.tls import SandboxTls, make_tls

TENANT_ID = "7e1f0c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6"
CLIENT_ID = "0b9d4a52-7c61-4f0e-9d3a-5e6f7a8b9c0d"
CLIENT_SECRET = "sandbox-secret-not-real"


@pytest.fixture(scope="session")
def sandbox_tls(tmp_path_factory: pytest.TempPathFactory) -> SandboxTls:
    return make_tls(Path(tmp_path_factory.mktemp("sandbox-tls")))


@pytest.fixture
def ca_bundle(sandbox_tls: SandboxTls) -> str:
    return str(sandbox_tls.ca_bundle)


@pytest.fixture
def trust_sandbox(monkeypatch: pytest.MonkeyPatch, ca_bundle: str) -> str:
    """Make requests (and so MSAL) trust the sandbox CA the standard way."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_bundle)
    return ca_bundle


@pytest.fixture
def serve(
    sandbox_tls: SandboxTls, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[Service], SandboxServer]]:
    """Start services over HTTPS; stop them after the test.

    Two test-speed workarounds until sandbox/httpd.py takes them: the handler writes headers and
    body separately, so Nagle's algorithm plus delayed ACKs add ~40 ms to every keep-alive request
    (TCP_NODELAY removes it); and SandboxServer.stop() waits for serve_forever's 0.5 s poll, so
    servers are stopped on a background thread.
    """
    monkeypatch.setattr(httpd._Handler, "disable_nagle_algorithm", True)
    servers: list[SandboxServer] = []

    def start(service: Service) -> SandboxServer:
        server = SandboxServer(service, sandbox_tls.server_context).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        threading.Thread(target=server.stop, daemon=True).start()


@pytest.fixture
def entra(serve: Callable[[Service], SandboxServer]) -> EntraService:
    service = EntraService()
    service.add_tenant(TENANT_ID, display_name="Contoso", domains=["contoso.onmicrosoft.com"])
    service.register_app(TENANT_ID, CLIENT_ID, CLIENT_SECRET)
    serve(service)
    return service
