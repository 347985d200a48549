"""Fixtures for the simulated Graph: a fresh service per test on its own HTTPS port, and a tiny
client that talks to it with `requests` and the sandbox CA, as the product does."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from sandbox.graph import GRAPH_AUDIENCE, GraphService
from sandbox.httpd import SandboxServer
from sandbox.tls import SandboxTls, make_tls

APP_ID = "11111111-2222-3333-4444-555555555555"
OTHER_APP_ID = "99999999-2222-3333-4444-555555555555"
ALICE = "alice@contoso.com"
BOB = "bob@contoso.com"
BC_ID = "String {8ECCC264-6880-4EBE-992F-8888D2EEAA1D} Name BcContactId"

# Fixed test tokens: what Entra would have put in each token's claims.
TOKENS: dict[str, dict] = {
    "tok-rw": {"roles": ["Contacts.ReadWrite", "User.Read.All"]},
    "tok-read": {"roles": ["Contacts.Read"]},
    "tok-none": {"roles": []},
    "tok-other-app": {"roles": ["Contacts.ReadWrite"], "appid": OTHER_APP_ID},
    # Master categories need MailboxSettings.* (outlookuser-list-mastercategories.md).
    "tok-settings": {"roles": ["Contacts.ReadWrite", "MailboxSettings.ReadWrite"]},
    "tok-settings-read": {"roles": ["Contacts.ReadWrite", "MailboxSettings.Read"]},
}


def validate_token(token: str, audience: str) -> dict | None:
    claims = TOKENS.get(token)
    if claims is None or audience != GRAPH_AUDIENCE:
        return None
    return {"aud": GRAPH_AUDIENCE, "tid": "contoso-tenant", "appid": APP_ID, **claims}


@dataclass
class GraphClient:
    """Requests against the sandbox with a bearer token; paths are relative to `/v1.0`."""

    base: str
    ca_bundle: str
    session: requests.Session
    token: str | None = "tok-rw"
    immutable: bool = False

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        if self.token is not None:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        if self.immutable:
            headers.setdefault("Prefer", 'IdType="ImmutableId"')
        url = path if path.startswith("https://") else f"{self.base}/v1.0{path}"
        return self.session.request(method, url, headers=headers, verify=self.ca_bundle, timeout=10, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def with_token(self, token: str | None) -> GraphClient:
        return GraphClient(self.base, self.ca_bundle, requests.Session(), token, self.immutable)

    def with_immutable_ids(self) -> GraphClient:
        return GraphClient(self.base, self.ca_bundle, requests.Session(), self.token, True)


@pytest.fixture(scope="module")
def graph_tls(tmp_path_factory: pytest.TempPathFactory) -> SandboxTls:
    return make_tls(tmp_path_factory.mktemp("graph-tls"))


def start_graph(tls: SandboxTls, **options: Any) -> tuple[GraphService, SandboxServer]:
    service = GraphService(validate_token, **options)
    return service, SandboxServer(service, tls.server_context).start()


def fresh_tenant(service: GraphService) -> GraphService:
    service.reset()
    service.add_mailbox(ALICE)
    service.add_mailbox(BOB)
    return service


@pytest.fixture(scope="module")
def graph_server(graph_tls: SandboxTls) -> Iterator[tuple[GraphService, SandboxServer]]:
    # One server per module (stopping one takes ~0.5 s); every test gets a reset tenant on it.
    service, server = start_graph(graph_tls)
    yield service, server
    server.stop()


@pytest.fixture
def graph(graph_server: tuple[GraphService, SandboxServer]) -> GraphService:
    return fresh_tenant(graph_server[0])


@pytest.fixture
def client(
    graph: GraphService, graph_server: tuple[GraphService, SandboxServer], graph_tls: SandboxTls
) -> Iterator[GraphClient]:
    session = requests.Session()
    yield GraphClient(graph_server[1].url, str(graph_tls.ca_bundle), session)
    session.close()
