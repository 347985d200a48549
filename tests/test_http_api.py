"""The HTTP API of BEHAVIOUR §7 over real HTTP, through the local stand-in of the Functions host.

What a Power Automate flow or an admin sees: status codes, JSON bodies, the 202 pattern's headers,
settings round trips, the connection check's messages, and JSON errors for every bad request.
"""

from __future__ import annotations

import json
from typing import Any

import azure.functions as func
import pytest
import requests

from sandbox.entra import BC_RESOURCE, GRAPH_RESOURCE
from shared import http_api
from shared.services import get_services, reset_services
from shared.sync import LEASE_SECONDS
from tests.local_host import LocalHost

ALICE = "alice@contoso.example"
BOB = "bob@contoso.example"


def _error(resp: requests.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    err = resp.json()["error"]
    assert isinstance(err["code"], str) and isinstance(err["message"], str) and err["message"]
    if code:
        assert err["code"] == code, err
    assert "Traceback" not in resp.text
    return err


# The function key ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "sync"),
        ("GET", "sync/runs/0123456789abcdef0123456789abcdef"),
        ("GET", "users"),
        ("GET", f"users/{ALICE}"),
        ("PUT", f"users/{ALICE}"),
        ("DELETE", f"users/{ALICE}"),
        ("POST", f"users/{ALICE}/validate"),
    ],
)
def test_every_route_needs_the_function_key(client, method, path):
    assert client(method, path, {}, key=None).status_code == 401
    assert client(method, path, {}, key="not-the-key").status_code == 401


def test_the_key_works_as_query_or_header(client, world):
    world.user(ALICE)
    for key in ("query", "header"):
        resp = client("GET", f"users/{ALICE}", key=key)
        assert resp.status_code == 200 and resp.json()["user"] == ALICE


# POST /api/sync ---------------------------------------------------------------------------------
def test_sync_inline_200_then_the_same_report_by_run_id(client, world):
    people = [world.person(f"Person {i}") for i in range(3)]
    world.user(ALICE)
    resp = client("POST", "sync", {"user": ALICE, "mode": "full"})
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/json")
    report = resp.json()
    assert report["status"] == "succeeded" and report["counts"]["outlookCreated"] == 3
    assert sorted(i["email"] for i in report["items"]) == sorted(p["email"] for p in people)
    again = client("GET", f"sync/runs/{report['runId']}")
    assert again.status_code == 200 and again.json() == report


def test_dry_run_reports_and_writes_nothing(client, world):
    world.person("Dry Person")
    world.user(ALICE)
    resp = client("POST", "sync", {"user": ALICE, "dryRun": True})
    assert resp.status_code == 200 and resp.json()["dryRun"] is True
    assert [i["action"] for i in resp.json()["items"]] == ["outlookCreated"]
    assert world.cloud.graph.find_folder(ALICE, "Business Central") is None


def test_async_pattern_poll_the_location_as_power_automate_does(client, world):
    world.person("Queued Person")
    world.user(ALICE)
    resp = client("POST", "sync", {"user": ALICE, "wait": False})
    assert resp.status_code == 202 and resp.json()["status"] == "queued"
    location, retry_after = resp.headers["Location"], int(resp.headers["Retry-After"])
    assert location.startswith(f"{client.base}/api/poll/{resp.json()['runId']}?token=") and retry_after >= 1
    # The HTTP action polls the Location exactly as given, without the key: the poll token opens it.
    poll = requests.get(location, timeout=30)
    assert poll.status_code == 202 and poll.headers["Location"] == location
    client.run_queued_jobs()
    done = requests.get(location, timeout=30)
    assert done.status_code == 200 and done.json()["status"] == "succeeded"
    assert done.json()["counts"]["outlookCreated"] == 1


def test_409_names_the_run_in_progress(client, world):
    world.user(ALICE)
    world.services.store.acquire_lease(ALICE, "fedcba9876543210fedcba9876543210", LEASE_SECONDS)
    err = _error(client("POST", "sync", {"user": ALICE}), 409, "RunInProgress")
    assert err["runId"] == "fedcba9876543210fedcba9876543210"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user": ALICE, "colour": "blue"}, "colour"),
        ({"user": ALICE, "mode": "fast"}, "mode"),
        ({"user": ALICE, "mode": None}, "mode"),
        ({"user": ALICE, "dryRun": "yes"}, "dryRun"),
        ({"user": ALICE, "force": 1}, "force"),
        ({"user": ALICE, "wait": None}, "wait"),
        ({"user": "alice"}, "user"),
        ({"user": "alice@contoso.example/../../x"}, "user"),
        ({"user": 42}, "user"),
        ({}, "user"),
    ],
)
def test_sync_refuses_bad_input_naming_the_field_before_touching_anything(client, world, body, field):
    world.user(ALICE)
    err = _error(client("POST", "sync", body), 400, "InvalidInput")
    assert err["field"] == field
    assert world.services.store.list_reports(ALICE) == []
    assert world.services.store.current_lease(ALICE) is None


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"{not json", 400, "InvalidJson"),
        (b"\xff\xfe\x00", 400, "InvalidJson"),
        (b"[1, 2]", 400, "InvalidInput"),
        (b'"alice@contoso.example"', 400, "InvalidInput"),
        (json.dumps({"user": ALICE, "pad": "x" * (http_api.MAX_BODY + 1)}).encode(), 413, "PayloadTooLarge"),
    ],
)
def test_sync_refuses_unreadable_bodies(client, world, raw, status, code):
    world.user(ALICE)
    _error(client("POST", "sync", raw), status, code)
    assert world.services.store.list_reports(ALICE) == []


def test_sync_for_an_unknown_user_is_404(client):
    err = _error(client("POST", "sync", {"user": "nobody@contoso.example"}), 404, "UserNotFound")
    assert "PUT /api/users/nobody@contoso.example" in err["message"]


# GET /api/sync/runs/{runId} ---------------------------------------------------------------------
def test_run_lookup_errors(client):
    _error(client("GET", "sync/runs/not-a-run-id"), 400, "InvalidInput")
    _error(client("GET", "sync/runs/" + "A" * 32), 400, "InvalidInput")
    _error(client("GET", "sync/runs/0123456789abcdef0123456789abcdef"), 404, "RunNotFound")
    _error(client("GET", "sync/runs/0123456789abcdef0123456789abcdef/items"), 404, "NotFound")
    _error(client("GET", "sync/nothing"), 404, "NotFound")


def test_wrong_methods_are_405_with_allow(client):
    resp = client("GET", "sync")
    _error(resp, 405, "MethodNotAllowed")
    assert resp.headers["Allow"] == "POST"
    assert client("POST", "sync/runs/0123456789abcdef0123456789abcdef").headers["Allow"] == "GET"
    assert client("POST", "users", {}).headers["Allow"] == "GET"
    assert client("GET", f"users/{ALICE}/validate").headers["Allow"] == "POST"
    # Methods function.json does not list never reach the code: the host answers 404.
    assert client("PATCH", f"users/{ALICE}", {}).status_code == 404


# Settings ------------------------------------------------------------------------------------
def test_settings_round_trip(client):
    settings = {
        "folderName": "BC Kunder",
        "filter": {"companyName": "Contoso*|Fabrikam", "city": "<>Oslo"},
        "pullEditsFromOutlook": True,
    }
    created = client("PUT", "users/Alice@Contoso.Example", settings)
    assert created.status_code == 201
    body = created.json()
    assert (
        body["user"] == ALICE and body["folderName"] == "BC Kunder" and body["filter"] == settings["filter"]
    )
    assert body["enabled"] is True and body["companyId"] is None and body["removeFromOutlook"] is True
    assert client("GET", f"users/{ALICE}").json() == body
    updated = client("PUT", f"users/{ALICE}", {**settings, "enabled": False, "user": ALICE})
    assert updated.status_code == 200 and updated.json()["enabled"] is False
    client("PUT", f"users/{BOB}", {})
    listed = client("GET", "users").json()
    assert sorted(u["user"] for u in listed["users"]) == [ALICE, BOB] and listed["invalid"] == []
    assert client("DELETE", f"users/{ALICE}").status_code == 204
    _error(client("GET", f"users/{ALICE}"), 404, "UserNotFound")
    _error(client("DELETE", f"users/{ALICE}"), 404, "UserNotFound")
    assert [u["user"] for u in client("GET", "users").json()["users"]] == [BOB]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"filter": {"city": "Oslo..Bergen..Trondheim"}}, "filter.city"),
        ({"filter": {"city": "a&b"}}, "filter.city"),
        ({"filter": {"email": "*@contoso.com"}}, "filter.email"),
        ({"filter": "city=Oslo"}, "filter"),
        ({"folderName": ""}, "folderName"),
        ({"folderName": "a/b"}, "folderName"),
        ({"companyId": "CRONUS"}, "companyId"),
        ({"enabled": "true"}, "enabled"),
        ({"user": BOB}, "user"),
        ({"pullNewFromOutlok": False}, "pullNewFromOutlok"),
    ],
)
def test_settings_validation_names_the_field(client, body, field):
    err = _error(client("PUT", f"users/{ALICE}", body), 400, "InvalidInput")
    assert err["field"] == field, err
    _error(client("GET", f"users/{ALICE}"), 404)  # nothing was stored


def test_bad_user_in_the_path_is_400(client):
    for path in ("users/not-a-user", "users/not-a-user/validate"):
        method = "POST" if path.endswith("validate") else "GET"
        assert _error(client(method, path), 400, "InvalidInput")["field"] == "user"
    _error(client("GET", f"users/{ALICE}/extra"), 404, "NotFound")


def _break_settings_row(world, user: str, **columns: Any) -> None:
    from azure.data.tables import TableServiceClient, UpdateMode

    from shared.store import encode_key

    table = TableServiceClient.from_connection_string(world.env["AzureWebJobsStorage"]).get_table_client(
        world.services.store.table_names["Settings"]
    )
    entity = table.get_entity(encode_key(user), "settings")
    entity.update(columns)
    table.upsert_entity(entity, mode=UpdateMode.REPLACE)


def test_a_hand_broken_settings_row_gives_a_clear_4xx_and_put_repairs_it(client, world):
    world.user(ALICE)
    world.user(BOB)
    _break_settings_row(world, BOB, filter=json.dumps({"city": "a&b"}))
    for method, path, body in (
        ("GET", f"users/{BOB}", None),
        ("POST", "sync", {"user": BOB}),
        ("POST", f"users/{BOB}/validate", None),
    ):
        err = _error(client(method, path, body), 409, "InvalidStoredSettings")
        assert "filter.city" in err["message"] and f"PUT /api/users/{BOB}" in err["message"]
    listed = client("GET", "users").json()
    assert [u["user"] for u in listed["users"]] == [ALICE]
    assert [i["user"] for i in listed["invalid"]] == [BOB] and "filter.city" in listed["invalid"][0]["error"]
    repaired = client("PUT", f"users/{BOB}", {"filter": {"city": "Oslo"}})
    assert repaired.status_code == 200 and client("GET", f"users/{BOB}").json()["filter"] == {"city": "Oslo"}
    _break_settings_row(world, BOB, enabled="yes")
    assert client("DELETE", f"users/{BOB}").status_code == 204


# POST /api/users/{user}/validate ---------------------------------------------------------------
def _checks(resp: requests.Response) -> dict[str, dict[str, Any]]:
    assert resp.status_code == 200, resp.text
    return {c["name"]: c for c in resp.json()["checks"]}


def test_validate_all_ok(client, world):
    world.user(ALICE)
    resp = client("POST", f"users/{ALICE}/validate")
    checks = _checks(resp)
    assert resp.json()["ok"] is True and resp.json()["user"] == ALICE
    assert set(checks) == {
        "bcToken",
        "graphToken",
        "bcCompany",
        "bcFields",
        "bcWebhooks",
        "mailbox",
        "contactsPermission",
        "categoryPermission",
    }
    assert all(c["ok"] for c in checks.values())
    assert "CRONUS" in checks["bcCompany"]["message"]


def test_validate_unknown_user_is_404(client):
    _error(client("POST", f"users/{ALICE}/validate"), 404, "UserNotFound")


def test_validate_graph_permission_missing(client, world):
    world.user(ALICE)
    cloud = world.cloud
    cloud.entra.set_roles(cloud.tenant_id, cloud.client_id, GRAPH_RESOURCE, ["User.Read.All"])
    resp = client("POST", f"users/{ALICE}/validate")
    checks = _checks(resp)
    assert resp.json()["ok"] is False and checks["mailbox"]["ok"] is True
    message = checks["contactsPermission"]["message"]
    assert not checks["contactsPermission"]["ok"] and "403" in message
    assert "Contacts.ReadWrite" in message and "admin consent" in message


def test_validate_mailbox_outside_the_apps_access_policy(client, world):
    world.user(ALICE)
    world.cloud.graph.add_mailbox(BOB)
    world.cloud.graph.restrict_app(world.cloud.client_id, [BOB])
    checks = _checks(client("POST", f"users/{ALICE}/validate"))
    failed = [c for c in checks.values() if not c["ok"]]
    assert failed and all("403" in c["message"] or "not checked" in c["message"] for c in failed)
    assert any(ALICE in c["message"] and "Contacts.ReadWrite" in c["message"] for c in failed)


def test_validate_bc_refuses_the_app(client, world):
    world.user(ALICE)
    world.cloud.bc.unregister_entra_app(world.cloud.client_id)
    checks = _checks(client("POST", f"users/{ALICE}/validate"))
    assert not checks["bcCompany"]["ok"]
    assert "Microsoft Entra Applications" in checks["bcCompany"]["message"]
    assert checks["mailbox"]["ok"] and checks["contactsPermission"]["ok"]


def test_validate_bc_permission_not_consented(client, world):
    world.user(ALICE)
    cloud = world.cloud
    cloud.entra.set_roles(cloud.tenant_id, cloud.client_id, BC_RESOURCE, [])
    checks = _checks(client("POST", f"users/{ALICE}/validate"))
    assert not checks["bcCompany"]["ok"] and "API.ReadWrite.All" in checks["bcCompany"]["message"]


def test_validate_wrong_secret(client, world):
    world.user(ALICE)
    world.cloud.entra.revoke_secret(world.cloud.tenant_id, world.cloud.client_id)
    resp = client("POST", f"users/{ALICE}/validate")
    checks = _checks(resp)
    for name in ("bcToken", "graphToken"):
        assert not checks[name]["ok"] and "client secret" in checks[name]["message"]
        assert world.cloud.client_secret not in checks[name]["message"]
    assert checks["mailbox"]["message"].startswith("not checked")
    assert world.cloud.client_secret not in resp.text


def test_a_missing_app_setting_is_a_json_500_naming_it(client, world, monkeypatch):
    monkeypatch.delenv("BC_COMPANY_ID")
    reset_services()
    err = _error(client("POST", "sync", {"user": ALICE}), 500, "ConfigurationError")
    assert "BC_COMPANY_ID" in err["message"]
    assert world.cloud.client_secret not in json.dumps(err)


def test_function_request_objects_carry_route_params():
    """The local host hands `main` what the real host hands it (the route's catch-all value)."""
    host = LocalHost()
    seen: dict[str, Any] = {}

    class Spy:
        @staticmethod
        def main(req: func.HttpRequest) -> func.HttpResponse:
            seen.update(req.route_params, method=req.method, code=req.params.get("code"))
            return func.HttpResponse(status_code=204)

    route = next(r for r in host.routes if r.folder.name == "function_users_http")
    route.folder = type(route.folder)(route.folder.name, route.folder.config, Spy)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": f"/api/users/{ALICE}/validate",
        "QUERY_STRING": f"code={host.key}",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "7071",
    }
    status, _, _ = host.handle(environ)
    assert status == 204 and seen == {"rest": f"{ALICE}/validate", "method": "GET", "code": host.key}


def test_validate_read_only_contacts_permission_fails_before_and_after_the_first_sync(client, world):
    """Reading alone is not enough: a sync with Contacts.Read only would fail on its first write."""
    world.user(ALICE)
    cloud = world.cloud
    cloud.entra.set_roles(
        cloud.tenant_id, cloud.client_id, GRAPH_RESOURCE, ["Contacts.Read", "User.Read.All"]
    )
    check = _checks(client("POST", f"users/{ALICE}/validate"))["contactsPermission"]
    assert not check["ok"] and "Contacts.ReadWrite" in check["message"]

    cloud.entra.set_roles(
        cloud.tenant_id, cloud.client_id, GRAPH_RESOURCE, ["Contacts.ReadWrite", "User.Read.All"]
    )
    get_services().tokens.invalidate()
    assert client("POST", "sync", {"user": ALICE}).json()["status"] == "succeeded"  # the folder exists now
    assert _checks(client("POST", f"users/{ALICE}/validate"))["contactsPermission"]["ok"]

    cloud.entra.set_roles(
        cloud.tenant_id, cloud.client_id, GRAPH_RESOURCE, ["Contacts.Read", "User.Read.All"]
    )
    get_services().tokens.invalidate()
    check = _checks(client("POST", f"users/{ALICE}/validate"))["contactsPermission"]
    assert not check["ok"] and "403" in check["message"] and "Contacts.ReadWrite" in check["message"]
