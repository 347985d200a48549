"""Shared fixtures: a real Azurite and the simulated cloud, each started once per test session."""

from __future__ import annotations

import pytest

from sandbox.azurite import Azurite


@pytest.fixture(scope="session")
def azurite():
    with Azurite() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def storage_connection_string(azurite) -> str:
    return azurite.connection_string
