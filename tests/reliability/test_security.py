"""Security checks as tests (issue 6, item 6).

- No client secret, access token or storage account key in any log record (every logger at DEBUG,
  including msal, urllib3 and the Azure SDK), run report or HTTP error body, over runs with faults.
- Every HTTP route needs the function key (authLevel "function").
- User ids, folder names and filter values reach Graph and BC only percent-encoded and OData-quoted:
  the raw request targets the simulated services received are inspected.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import azure.functions as func

import function_sync_http
import function_users_http
from sandbox.azurite import DEV_KEY
from sandbox.bindings import Collector
from sandbox.httpd import Request, Response
from shared.sync import run_users
from tests.reliability.checks import assert_converged, new_outlook_contacts
from tests.reliability.conftest import WireTap

ROOT = Path(__file__).resolve().parents[2]
ALICE = "alice@contoso.example"
ODD_USER = "o'brien.#1!^~_-@contoso.example"  # a valid UPN (Entra's characters) full of URL and OData syntax
ODD_FOLDER = "Kunder 'BC' & co #1 ?x=1 + 50%"
ODD_FILTER = {"companyName": "'O''Neil & Sons'|<>'x'' or 1 eq 1'", "city": "@oslo|'#&='"}


class TokenTap(WireTap):
    """Remembers every access token the simulated Entra hands out."""

    def __init__(self, service) -> None:
        super().__init__(service)
        self.tokens: list[str] = []

    def _dispatch(self, req: Request) -> Response:
        resp = super()._dispatch(req)
        if isinstance(resp.body, dict) and resp.body.get("access_token"):
            self.tokens.append(resp.body["access_token"])
        return resp


def _call(main, method: str, rest: str, body=None, **kw) -> func.HttpResponse:
    req = func.HttpRequest(
        method,
        f"https://app.example/api/{rest}",
        headers={"Content-Type": "application/json"},
        route_params={"rest": rest.split("/", 1)[1] if "/" in rest else ""},
        body=b"" if body is None else json.dumps(body).encode(),
    )
    return main(req, **kw)


def test_no_secret_token_or_key_in_logs_reports_or_error_bodies(world, env, cloud, caplog, recorder):
    tokens = TokenTap(cloud.entra)
    texts: list[str] = []
    try:
        with recorder.case("security", "secrets, tokens, account key in logs/reports/error bodies") as rec:
            caplog.set_level(logging.DEBUG)
            for name in ("msal", "urllib3", "azure", "shared", "requests"):
                logging.getLogger(name).setLevel(logging.DEBUG)
            for u in (ALICE, "bob@contoso.example", "carol@contoso.example"):
                world.user(u)
            for i in range(25):
                world.person(f"Person {i:02d} Sample")
            new_outlook_contacts(world, ALICE, 3)
            world.cloud.graph.remove_mailbox("bob@contoso.example")
            graph, bc = world.cloud.graph.faults, world.cloud.bc.faults
            graph.throttle(count=3, retry_after=0.01)
            graph.error(503, count=2, retry_after=0.01)
            graph.html(count=1, method="GET")
            bc.reset(count=1, method="GET")
            bc.error(504, count=1, method="GET")
            reports = run_users(world.services, world.services.store.list_settings(), "full")
            world.cloud.entra.expire_all_tokens()  # a 401, a token refresh, then success
            world.cloud.bc.edit_contact(world.company, world.bc_contacts()[0]["id"], jobTitle="Changed")
            reports.append(world.sync(ALICE))
            cloud.bc.unregister_entra_app(cloud.client_id)  # BC refuses the app: 401 with a message
            reports.append(world.sync(ALICE, mode="full"))
            cloud.bc.register_entra_app(cloud.client_id)
            rec.add(len(reports))
            assert {r.status for r in reports} >= {"succeeded", "failed"}
            for r in reports:
                texts.append(json.dumps(r.to_json()))
                stored = world.services.store.get_report(r.runId)
                texts.append(json.dumps(stored.to_json()) if stored else "")

            # HTTP answers, errors included.
            for main, method, rest, body, kw in [
                (function_sync_http.main, "POST", "sync", {"user": ALICE}, {"jobs": Collector()}),
                (
                    function_sync_http.main,
                    "POST",
                    "sync",
                    {"user": "nobody@contoso.example"},
                    {"jobs": Collector()},
                ),
                (function_sync_http.main, "POST", "sync", {"user": "' or 1 eq 1"}, {"jobs": Collector()}),
                (function_sync_http.main, "GET", "sync/runs/" + "0" * 32, None, {"jobs": Collector()}),
                (function_users_http.main, "POST", f"users/{ALICE}/validate", None, {}),
                (function_users_http.main, "POST", "users/bob@contoso.example/validate", None, {}),
                (function_users_http.main, "PUT", f"users/{ALICE}", {"filter": {"city": "a&b"}}, {}),
                (function_users_http.main, "GET", "users", None, {}),
            ]:
                resp = _call(main, method, rest, body, **kw)
                rec.add()
                texts.append(resp.get_body().decode("utf-8", "replace"))
                texts.append(json.dumps(dict(resp.headers)))
            for record in caplog.records:
                texts.append(record.getMessage())
                texts.append(repr(record.__dict__))
            assert len(tokens.tokens) >= 3 and len(caplog.records) > 50
            secrets = {
                "client secret": env["SYNC_CLIENT_SECRET"],
                "storage account key": DEV_KEY,
                "storage connection string": env["AzureWebJobsStorage"],
                **{f"access token {i}": t for i, t in enumerate(tokens.tokens)},
                **{f"token signature {i}": t.rsplit(".", 1)[-1] for i, t in enumerate(tokens.tokens)},
            }
            haystack = "\n".join(texts)
            leaked = [name for name, value in secrets.items() if value and value in haystack]
            assert not leaked, f"found in logs/reports/HTTP bodies: {leaked}"
            assert "Bearer ey" not in haystack
    finally:
        tokens.close()


# BEHAVIOUR §7.7: the host checks the key everywhere except on the page (static files, no data), on
# the people's door, whose code refuses every request without a valid Entra ID token
# (tests/test_signed_in_api.py drives every route there with every kind of credential), and on the poll
# URL of a 202, whose poll token is its authorization (BEHAVIOUR §7.6, tests/test_poll_tokens.py), and on
# the two notification endpoints, which Graph and Business Central call without a key: a notification
# counts only with a stored subscription id and its clientState (BEHAVIOUR §8.2, §8.3, §11,
# tests/test_graph_notify.py, tests/test_bc_webhooks.py).
ANONYMOUS_BY_DESIGN = {
    "function_bc_notify",
    "function_graph_notify",
    "function_selfservice",
    "function_signed_in_http",
    "function_sync_poll",
}


def test_every_http_route_requires_the_function_key_or_a_token(recorder):
    with recorder.case("security", "authLevel of every HTTP trigger") as rec:
        triggers = []
        for path in sorted(ROOT.glob("*/function.json")):
            for binding in json.loads(path.read_text())["bindings"]:
                if binding["type"] == "httpTrigger":
                    triggers.append((path.parent.name, binding.get("authLevel"), binding.get("route")))
        rec.add(len(triggers))
        assert len(triggers) >= 3
        assert all(
            level == ("anonymous" if name in ANONYMOUS_BY_DESIGN else "function")
            for name, level, _ in triggers
        ), triggers


def _user_segments(targets: list[tuple[str, str, bool]], *, server_links: bool) -> list[str]:
    """The user segment of each Graph request; `server_links` selects the delta/next links Graph
    handed out (followed verbatim, as Graph requires), or else the URLs the client built itself."""
    out = []
    for _, raw, _ in targets:
        m = re.match(r"^(?:https?://[^/]+)?/v1\.0/users/([^/?]+)", raw)
        if m and server_links == bool(re.search(r"[?&]\$(delta|skip)token=", raw)):
            out.append(m[1])
    return out


def test_user_folder_and_filter_values_reach_the_apis_escaped(world, taps, recorder):
    with recorder.case("security", "raw request targets: user, folder name, filter escaped") as rec:
        world.user(ODD_USER, folderName=ODD_FOLDER, filter=ODD_FILTER)
        world.person("Neil Match", companyName="O'Neil & Sons", city="Oslo")
        world.person("Other Person", companyName="x' or 1 eq 1", city="Oslo")
        assert world.sync(ODD_USER, mode="full").status == "succeeded"
        assert world.sync(ODD_USER, mode="full").status == "succeeded"
        # One folder with the odd name, found again by its $filter on the second run.
        assert [f["displayName"] for f in world.cloud.graph.folders(ODD_USER)].count(ODD_FOLDER) == 1
        assert [c["displayName"] for c in world.outlook(ODD_USER)] == ["Neil Match"]
        assert_converged(world, ODD_USER)

        graph_targets = taps["graph"].targets
        segments = _user_segments(graph_targets, server_links=False)
        rec.add(len(graph_targets) + len(taps["bc"].targets))
        assert segments and all(seg == quote(ODD_USER, safe="@") for seg in segments), set(segments)
        assert all(
            unquote(seg) == ODD_USER for seg in segments + _user_segments(graph_targets, server_links=True)
        )
        for _, raw, _ in graph_targets + taps["bc"].targets:
            if re.search(r"[?&]\$(delta|skip)token=", raw):
                continue  # a link Graph built; the client must not touch it
            # $batch and $metadata are OData system segments, not data.
            path = urlsplit(raw).path.replace("/$batch", "").replace("/$metadata", "")
            assert not re.search(r"['#&+=$!^ ]", path), raw  # reserved characters only percent-encoded
        folder_queries = [
            dict(parse_qsl(urlsplit(raw).query))
            for m, raw, _ in graph_targets
            if raw.split("?")[0].endswith("/contactFolders") and m == "GET"
        ]
        assert folder_queries, "the folder was never looked up by name"
        quoted = ODD_FOLDER.replace("'", "''")
        assert all(q.get("$filter") == f"displayName eq '{quoted}'" for q in folder_queries), folder_queries
        # The user's filter is evaluated by the sync itself: none of its values reaches BC.
        for _, raw, _ in taps["bc"].targets:
            flt = dict(parse_qsl(urlsplit(raw).query)).get("$filter")
            if flt is not None:
                assert re.fullmatch(
                    r"lastModifiedDateTime gt [0-9T:.Z-]+|id eq [0-9a-f-]{36}( or id eq [0-9a-f-]{36})*", flt
                ), flt
            assert "Neil" not in unquote(raw) and "1 eq 1" not in unquote(raw), raw
