"""openapi/openapi.json: a Swagger 2.0 definition Power Automate can import as a custom connector,
kept equal to the real routes, and honoured by the running functions (schemathesis).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shared import http_api
from tests.local_host import ROOT, LocalHost, function_folders, host_json, route_regex

SPEC_PATH = ROOT / "openapi" / "openapi.json"
SPEC = json.loads(SPEC_PATH.read_text())
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
ALICE = "alice@contoso.example"
EXAMPLE_USER = SPEC["definitions"]["SyncRequest"]["properties"]["user"]["example"]


def _operations() -> list[tuple[str, str, dict]]:
    return [
        (path, method, op)
        for path, item in SPEC["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


# The definition itself -----------------------------------------------------------------------
def test_swagger_2_with_host_base_path_and_https():
    assert SPEC["swagger"] == "2.0"
    assert SPEC["host"] and "/" not in SPEC["host"]
    assert SPEC["basePath"] == "/" + host_json()["extensions"]["http"]["routePrefix"]
    assert SPEC["schemes"] == ["https"]
    assert SPEC["consumes"] == ["application/json"] and SPEC["produces"] == ["application/json"]
    assert SPEC["info"]["title"] and SPEC["info"]["version"] and SPEC["info"]["description"]


def test_function_key_security_is_the_code_query_parameter():
    [(name, scheme)] = SPEC["securityDefinitions"].items()
    assert scheme == {**scheme, "type": "apiKey", "in": "query", "name": "code"}
    assert SPEC["security"] == [{name: []}]


def test_operations_are_described_for_the_flow_designer():
    ids = [op["operationId"] for _, _, op in _operations()]
    assert len(ids) == len(set(ids)) and all(re.fullmatch(r"[A-Z][A-Za-z]+", i) for i in ids)
    for path, method, op in _operations():
        where = f"{method.upper()} {path}"
        assert op["summary"] and len(op["summary"]) <= 80 and not op["summary"].endswith("."), where
        assert op["description"], where
        assert op.get("x-ms-visibility") in ("important", "advanced"), where
        for p in op.get("parameters", []):
            assert p.get("x-ms-summary") and p.get("description"), (where, p["name"])
            if p["in"] == "path":
                assert p["required"] is True and p.get("x-ms-url-encoding") == "single", (where, p["name"])
                assert "{" + p["name"] + "}" in path
        for status, resp in op["responses"].items():
            assert resp["description"], (where, status)
            if status != "401" and (status == "default" or int(status) >= 400):
                assert resp["schema"] == {"$ref": "#/definitions/Error"}, (where, status)
        assert "401" in op["responses"] and "default" in op["responses"], where


def test_start_sync_follows_the_asynchronous_pattern():
    start = SPEC["paths"]["/sync"]["post"]
    poll = SPEC["paths"]["/sync/runs/{runId}"]["get"]
    assert start["x-ms-visibility"] == "important"
    for op in (start, poll):
        assert op["responses"]["200"]["schema"] == {"$ref": "#/definitions/RunReport"}
        accepted = op["responses"]["202"]
        assert set(accepted["headers"]) == {"Location", "Retry-After"}
        assert accepted["headers"]["Retry-After"]["type"] == "integer"
    for status in ("400", "404", "409"):
        assert status in start["responses"]


def test_definitions_match_the_code():
    from shared.model import ACTIONS, UserSettings

    d = SPEC["definitions"]
    assert {"RunReport", "SyncRequest", "UserSettings", "ValidationResult", "Error"} <= set(d)
    assert set(d["SyncRequest"]["properties"]) == http_api._SYNC_FIELDS and d["SyncRequest"]["required"] == [
        "user"
    ]
    assert set(d["RunReport"]["properties"]["counts"]["properties"]) == set(ACTIONS)
    assert set(d["UserSettings"]["properties"]) == set(UserSettings._JSON_FIELDS)
    assert set(d["UserSettingsInput"]["properties"]) == set(UserSettings._JSON_FIELDS)
    from shared.filters import SUPPORTED_FIELDS

    assert set(d["UserSettings"]["properties"]["filter"]["properties"]) == set(SUPPORTED_FIELDS)
    assert d["Error"]["properties"]["error"]["required"] == ["code", "message"]


# The definition against the real routes ---------------------------------------------------------
def _sample(path: str) -> str:
    return path.replace("{user}", ALICE).replace("{runId}", "0123456789abcdef0123456789abcdef")


def _http_routes() -> dict[str, tuple[re.Pattern[str], set[str]]]:
    out = {}
    for f in function_folders():
        if f.trigger["type"] == "httpTrigger":
            out[f.name] = (route_regex(f.trigger["route"]), {m.lower() for m in f.trigger["methods"]})
    return out


def test_every_documented_operation_is_a_function_route():
    routes = _http_routes()
    for path, method, _ in _operations():
        owners = [
            n
            for n, (rx, methods) in routes.items()
            if rx.match(_sample(path).lstrip("/")) and method in methods
        ]
        assert len(owners) == 1, f"{method.upper()} {path} is served by {owners}"


@pytest.fixture
def host(env):
    h = LocalHost()
    with h.serve() as base:
        yield h, base


def test_documented_operations_and_only_those_reach_a_handler(host, world):
    """Every method and every documented path: the handlers dispatch exactly the documented pairs.

    A pair the handlers do not serve answers 404 NotFound or 405 MethodNotAllowed (from the code) or
    an empty 404 (from the host, when function.json does not list the method).
    """
    h, base = host
    world.user(ALICE)
    documented = {(path, method) for path, method, _ in _operations()}
    probes = {path for path, _, _ in _operations()} | {"/sync/runs", "/users/{user}/validate/x", "/sync/x/y"}
    for path, method in itertools.product(sorted(probes), ("get", "put", "post", "delete", "patch")):
        body = {"user": ALICE, "wait": False} if path == "/sync" else {}
        resp = requests.request(
            method, f"{base}/api{_sample(path)}", params={"code": h.key}, json=body, timeout=60
        )
        payload = resp.json() if resp.content else {}
        code = payload.get("error", {}).get("code") if isinstance(payload, dict) else None
        served = not (resp.status_code == 404 and code in (None, "NotFound")) and code != "MethodNotAllowed"
        assert served == ((path, method) in documented), (method, path, resp.status_code, code)


# The running API against the definition (schemathesis) --------------------------------------------
schema = schemathesis.openapi.from_path(str(SPEC_PATH))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_api_conforms_to_the_definition(case, host, world):
    """Generated requests (valid and invalid) get no 5xx and only documented, schema-true answers.

    The user the definition's examples name exists, so its operations are exercised beyond 4xx."""
    h, base = host
    world.user(EXAMPLE_USER)
    world.person("Example Person")
    case.call_and_validate(base_url=f"{base}/api", params={"code": h.key}, checks=CHECKS, timeout=60)


def test_spec_file_is_formatted_json():
    text = Path(SPEC_PATH).read_text()
    assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"
