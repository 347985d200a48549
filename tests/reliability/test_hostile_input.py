"""Hostile input (issue 6, item 4): strings built to break out of a URL, an OData literal, a table key
or a JSON document, in user ids, filters and folder names, through `UserSettings.from_json` and the
HTTP functions as the host calls them; and settings rows damaged by hand in Table Storage.

The promise: a clear 4xx (or a valid setting stored as given), never a 500, and a refused request
changes nothing. (Schemathesis over the whole OpenAPI definition lives in tests/test_openapi.py.)
"""

from __future__ import annotations

import json
from typing import Any

import azure.functions as func
from azure.data.tables import TableServiceClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import function_sync_http
import function_users_http
from sandbox.bindings import Collector
from shared.jobs import fan_out, work
from shared.model import UserSettings, ValidationError
from shared.services import get_services
from tests.reliability.conftest import long_profile

ALICE = "alice@contoso.example"

INJECTIONS = [
    "' or 1 eq 1",
    "alice@contoso.example' or '1' eq '1",
    "x') or true or ('",
    "../",
    "../../admin@contoso.example",
    "alice@contoso.example/../bob@contoso.example",
    "%2F",
    "alice%40contoso.example",
    "alice@contoso.example%2F..%2F",
    "alice@contoso.example?$filter=x",
    "alice@contoso.example#frag",
    '"quoted"@contoso.example',
    "o'brien@contoso.example",
    "'",
    "''",
    "\\",
    "\x00",
    "line\r\nbreak",
    "tab\there",
    "\u202eevil",
    "Zoë Ø'Brien",
    "😀@contoso.example",
    "a" * 5000,
    "$(rm -rf /)",
    "<script>alert(1)</script>",
    "Robert'); DROP TABLE Settings;--",
    "*",
    "|",
    "@",
    "..",
    "<>",
]
hostile = st.one_of(
    st.sampled_from(INJECTIONS),
    st.text(
        alphabet=st.one_of(st.sampled_from("'\"%/\\?#&=|*@.<>()$;: \t\r\n\x00\x7f"), st.characters()),
        max_size=300,
    ),
    st.builds(
        lambda a, b: f"{a}@{b}", st.sampled_from(INJECTIONS), st.sampled_from(["contoso.example", "x"])
    ),
)
FILTER_FIELDS = ["displayName", "city", "companyName", "number", "country", "email", "id", "' or 1 eq 1"]

PROFILE = settings(
    max_examples=300 if long_profile() else 40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=not long_profile(),
)


def _call(main, method: str, rest: str, body: Any = None, raw: bytes | None = None, **kw):
    req = func.HttpRequest(
        method,
        f"https://app.example/api/{rest}",
        headers={"Content-Type": "application/json"},
        route_params={"rest": rest.split("/", 1)[1] if "/" in rest else ""},
        body=raw if raw is not None else (b"" if body is None else json.dumps(body).encode()),
    )
    return main(req, **kw)


def _users(method: str, path: str, body: Any = None, raw: bytes | None = None) -> func.HttpResponse:
    return _call(function_users_http.main, method, f"users/{path}".rstrip("/"), body, raw)


def _sync(body: Any = None, raw: bytes | None = None) -> tuple[func.HttpResponse, Collector]:
    out = Collector()
    return _call(function_sync_http.main, "POST", "sync", body, raw, jobs=out), out


def _snapshot() -> Any:
    store = get_services().store
    valid, bad = store.list_settings_checked()
    return sorted(json.dumps(s.to_json(), sort_keys=True) for s in valid), sorted(bad)


def _assert_clean_error(resp: func.HttpResponse) -> dict:
    assert resp.status_code != 500 and resp.status_code < 500, (resp.status_code, resp.get_body()[:300])
    if resp.status_code >= 400:
        body = json.loads(resp.get_body())
        assert set(body["error"]) >= {"code", "message"} and body["error"]["message"]
        return body
    return {}


def test_settings_documents_refuse_or_accept_cleanly(recorder):
    with recorder.case("hostile input", "UserSettings.from_json: user, filter, folderName") as rec:

        @PROFILE
        @given(user=hostile, folder=hostile, field=st.sampled_from(FILTER_FIELDS), expr=hostile)
        def check(user: str, folder: str, field: str, expr: str) -> None:
            rec.add()
            for doc in (
                {"user": user},
                {"user": ALICE, "folderName": folder},
                {"user": ALICE, "filter": {field: expr}},
            ):
                try:
                    s = UserSettings.from_json(doc)
                except ValidationError as exc:
                    assert exc.field and exc.message
                    continue
                # Accepted: what is stored is what reads back, and what reads back is valid again.
                assert UserSettings.from_json(s.to_json()) == s
                assert all(ord(ch) >= 0x20 and ch != "\x7f" for ch in s.folder_name)

        check()


def test_http_functions_answer_hostile_input_with_4xx_and_change_nothing(world, env, recorder):
    world.user()
    baseline = _snapshot()
    with recorder.case(
        "hostile input", "HTTP users/sync routes: user in URL and body, filter, folder"
    ) as rec:

        @PROFILE
        @given(value=hostile, field=st.sampled_from(FILTER_FIELDS), which=st.integers(0, 7))
        def check(value: str, field: str, which: int) -> None:
            rec.add()
            before = _snapshot()
            if which == 0:
                resp, out = _sync({"user": value})
                changes = out.value is not None
            elif which == 1:
                resp = _users("GET", value)
                changes = False
            elif which == 2:
                resp = _users("DELETE", value)
                changes = resp.status_code == 204
            elif which == 3:
                resp = _users("POST", f"{value}/validate")
                changes = False
            elif which == 4:
                resp = _users("PUT", value, {"folderName": "x"})
                changes = resp.status_code in (200, 201)
            elif which == 5:
                resp = _users("PUT", ALICE, {"filter": {field: value}})
                changes = resp.status_code in (200, 201)
            elif which == 6:
                resp = _users("PUT", ALICE, {"folderName": value})
                changes = resp.status_code in (200, 201)
            else:
                resp = _users("PUT", ALICE, raw=value.encode("utf-8", "surrogatepass"))
                changes = resp.status_code in (200, 201)
            _assert_clean_error(resp)
            if not changes:
                assert _snapshot() == before, "a refused request changed the stored settings"
            elif which == 4:
                # A strange but valid mailbox address: the same URL reads and removes exactly that row.
                assert _users("GET", value).status_code == 200
                assert _users("DELETE", value).status_code == 204
                assert _snapshot() == before
            else:
                world.user()  # put Alice back for the next example

        check()
    assert _snapshot() == baseline


# --- settings rows damaged by hand ---------------------------------------------------------------

MALFORMED = {
    "typo@contoso.example": {"enabeld": True},
    "wrongtype@contoso.example": {"enabled": "yes"},
    "badjson@contoso.example": {"filter": "{not json"},
    "badfilter@contoso.example": {"filter": json.dumps({"city": "Oslo&Bergen"})},
    "injected@contoso.example": {"filter": json.dumps({"' or 1 eq 1": "x"})},
    "badfolder@contoso.example": {"folderName": "a/b"},
    "badcompany@contoso.example": {"companyId": "' or 1 eq 1"},
    "UPPER@Contoso.Example": {},  # a key that is not the normalized user
    "not a user": {},
}


def _write_malformed(azurite, prefix: str) -> None:
    table = TableServiceClient.from_connection_string(azurite.connection_string).get_table_client(
        f"{prefix}Settings"
    )
    for pk, columns in MALFORMED.items():
        table.upsert_entity({"PartitionKey": pk, "RowKey": "settings", **columns})
    table.upsert_entity({"PartitionKey": ALICE, "RowKey": "not-settings"})


def test_malformed_settings_rows_skip_that_user_with_a_reason(world, azurite, env, recorder):
    world.user()
    world.user("bob@contoso.example")
    world.person("Visible Person")
    _write_malformed(azurite, env["SYNC_TABLE_PREFIX"])
    with recorder.case("hostile input", "malformed settings rows in Table Storage") as rec:
        rec.add(len(MALFORMED) + 1)
        jobs = Collector()
        fan_out(None, jobs)
        users = sorted(json.loads(m)["user"] for m in jobs.value)
        assert users == [ALICE, "bob@contoso.example"]

        listing = _users("GET", "")
        assert listing.status_code == 200
        body = json.loads(listing.get_body())
        assert sorted(u["user"] for u in body["users"]) == [ALICE, "bob@contoso.example"]
        invalid = {i["user"]: i["error"] for i in body["invalid"]}
        assert set(MALFORMED) <= set(invalid), invalid
        assert all(invalid.values())

        # The valid users still sync, each in its own run.
        for message in jobs.value:
            report = work(func.QueueMessage(id="1", body=message.encode()))
            assert report is not None and report.status == "succeeded"


def test_malformed_settings_row_answers_a_clear_error_not_500(world, azurite, env, recorder):
    """Reading one damaged row through the API: the caller is told what is wrong with it."""
    world.user()
    _write_malformed(azurite, env["SYNC_TABLE_PREFIX"])
    with recorder.case("hostile input", "GET/POST on a user whose settings row is malformed") as rec:
        for user in ("typo@contoso.example", "badfilter@contoso.example"):
            for resp in (_users("GET", user), _sync({"user": user})[0], _users("POST", f"{user}/validate")):
                rec.add()
                _assert_clean_error(resp)
