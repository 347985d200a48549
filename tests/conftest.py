"""Shared fixtures: a real Azurite (once per session) and a fresh simulated cloud per test."""

from __future__ import annotations

import uuid

import pytest

from sandbox.azurite import Azurite
from sandbox.cloud import Cloud


@pytest.fixture(scope="session")
def azurite():
    with Azurite() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def storage_connection_string(azurite) -> str:
    return azurite.connection_string


@pytest.fixture
def cloud(tmp_path):
    with Cloud(tmp_path) as c:
        yield c


@pytest.fixture
def env(cloud, azurite, monkeypatch) -> dict[str, str]:
    """App settings pointing at this test's cloud and its own tables, set in the environment."""
    from shared.services import reset_services

    values = cloud.env(azurite.connection_string, table_prefix="T" + uuid.uuid4().hex[:12])
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    reset_services()
    yield values
    reset_services()


@pytest.fixture
def world(cloud, env):
    from tests.world import World

    return World(cloud, env)


@pytest.fixture
def client(env):
    """The HTTP API over real HTTP (tests/api_client.py), with this test's settings."""
    from tests.api_client import LocalHost, api_client

    with api_client(LocalHost()) as c:
        yield c


@pytest.fixture
def clients(world):
    """The app's BC and Graph clients for one mailbox, with waits recorded instead of slept:
    (world, bc, graph, waits, counter)."""
    from shared.http_client import RequestCounter

    world.cloud.graph.add_mailbox("alice@contoso.example")
    waits: list[float] = []
    world.services.sleep = waits.append
    counter = RequestCounter()
    bc, graph = world.services.clients(counter)
    return world, bc, graph, waits, counter


@pytest.fixture
def queue(azurite, env):
    """The jobs queue on Azurite, as the timer, the change poll and the worker bindings see it."""
    from shared.jobs import QUEUE_NAME
    from tests.local_host import QueueHost

    return QueueHost(azurite.connection_string, QUEUE_NAME)
