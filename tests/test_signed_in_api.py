"""Who may do what (BEHAVIOUR §7.7): every route of the API by every kind of credential, over real HTTP.

People reach the API under /api/signed-in with an Entra ID access token from a real sign-in (the
sandbox's authorize + PKCE flow); automation uses the function-key routes. Each refused request
answers a JSON error (401 or 403) that carries nothing of the token, and changes nothing: the stored
settings, the runs and the Outlook folder are compared before and after.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from shared.identity import AuthError, TokenValidator
from tests.signin import sign_in

ALICE = "alice@contoso.example"
BOB = "bob@contoso.example"
ADA = "ada@contoso.example"
CAROL = "carol@contoso.example"


@dataclass
class Door:
    """The API as people's browsers and flows reach it."""

    base: str
    client: Any
    world: Any
    tokens: dict[str, str]

    def __call__(
        self, method: str, path: str, body: Any = None, *, token: str | None = None, key: bool = False
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        params = {"code": self.client.host.key} if key else {}
        data = json.dumps(body).encode() if body is not None else None
        return requests.request(
            method, f"{self.base}/api/signed-in/{path}", data=data, headers=headers, params=params, timeout=60
        )

    def snapshot(self) -> dict[str, Any]:
        """What a refused request must leave as it was: settings (and their owners), runs, Outlook."""
        users = self.client("GET", "users").json()
        runs = {
            u["user"]: self.client("GET", f"sync/runs/{r.runId}").json()
            for u in users["users"]
            for r in self.world.services.store.list_reports(u["user"], 20, items=False)
        }
        store = self.world.services.store
        owners = {u["user"]: store.settings_owner(u["user"]) for u in users["users"]}
        return {"users": users, "owners": owners, "runs": runs, "outlook": self.world.outlook(ALICE)}


def _tamper(token: str, **claims: Any) -> str:
    """The token with changed claims and its original signature: what a forger would send."""
    header, payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data.update(claims)
    new = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{header}.{new}.{signature}"


@pytest.fixture
def door(world, client) -> Door:
    cloud = world.cloud
    page = f"{client.base}/api/selfservice"
    cloud.allow_redirect(page)
    passwords = {upn: world.colleague(upn, admin=upn == ADA) for upn in (ALICE, BOB, ADA, CAROL)}
    world.person("Pia Person")
    world.user(ALICE)  # written through the key door's store: the owner is learned on first sign-in use
    world.user(BOB)
    ca = world.env["REQUESTS_CA_BUNDLE"]

    def token(upn: str) -> str:
        return sign_in(cloud.authority, cloud.client_id, page, upn, passwords[upn], ca)["access_token"]

    alice_oid = next(u.oid for u in cloud.entra._tenants[cloud.tenant_id].users.values() if u.upn == ALICE)
    bob_oid = next(u.oid for u in cloud.entra._tenants[cloud.tenant_id].users.values() if u.upn == BOB)
    own = token(ALICE)

    def minted(**kw: Any) -> str:
        return cloud.entra.mint_user_token(cloud.tenant_id, cloud.client_id, alice_oid, **kw)

    tokens = {
        "own": own,
        "other": token(BOB),
        "admin": token(ADA),
        "carol": token(CAROL),
        "expired": minted(lifetime=-3600),
        "wrong_audience": minted(audience="00000003-0000-0000-c000-000000000000"),
        "wrong_issuer": minted(issuer=f"https://login.microsoftonline.com/{cloud.tenant_id}/v2.0"),
        "bad_signature": _tamper(own, oid=bob_oid, preferred_username=BOB),
        "unknown_key": minted(unpublished_key=True),
    }
    d = Door(client.base, client, world, tokens)
    first = d("POST", "sync", {"user": ALICE, "mode": "full"}, token=own)  # a run of Alice's to read
    assert first.status_code == 200, first.text
    tokens["alice_run"] = first.json()["runId"]
    return d


def routes(run_id: str) -> list[tuple[str, str, Any]]:
    """Every route of the people's API, aimed at Alice's data."""
    return [
        ("GET", "me", None),
        ("GET", "users", None),
        ("GET", f"users/{ALICE}", None),
        ("PUT", f"users/{ALICE}", {"folderName": "Elsewhere"}),
        ("DELETE", f"users/{ALICE}", None),
        ("POST", f"users/{ALICE}/validate", None),
        ("GET", f"users/{ALICE}/runs", None),
        ("POST", "sync", {"user": ALICE, "mode": "full"}),
        ("POST", "sync", {"user": ALICE, "mode": "full", "force": True}),
        ("GET", f"sync/runs/{run_id}", None),
    ]


def _json_error(resp: requests.Response, status: int, secrets: list[str]) -> dict[str, Any]:
    assert resp.status_code == status, (resp.request.method, resp.request.url, resp.text)
    assert resp.headers["Content-Type"].startswith("application/json")
    err = resp.json()["error"]
    assert err["code"] and err["message"]
    for s in secrets:
        assert s not in resp.text and s.split(".")[1] not in resp.text  # nothing of the token comes back
    return err


@pytest.mark.parametrize(
    ("credential", "expected_message"),
    [
        ("nothing", "sign in"),
        ("function_key", "sign in"),
        ("expired", "expired"),
        ("wrong_audience", "another application"),
        ("wrong_issuer", "another tenant"),
        ("bad_signature", "signature"),
        ("unknown_key", "key the tenant does not publish"),
    ],
)
def test_without_a_valid_token_every_route_is_refused_401_and_nothing_changes(
    door, credential, expected_message, caplog
):
    caplog.set_level("DEBUG")
    before = door.snapshot()
    token = door.tokens.get(credential)
    for method, path, body in routes(door.tokens["alice_run"]):
        resp = door(method, path, body, token=token, key=credential == "function_key")
        err = _json_error(resp, 401, [token] if token else [])
        assert expected_message in err["message"], (path, err)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert door.snapshot() == before
    if token:
        assert token.split(".")[1] not in caplog.text and token.split(".")[2] not in caplog.text


def test_another_persons_token_is_refused_403_on_alice_data_and_nothing_changes(door):
    token = door.tokens["other"]
    # Bob's first call teaches Bob's own row its owner (his mailbox's object id); then nothing may change.
    assert door("GET", "me", token=token).json()["user"] == BOB
    before = door.snapshot()
    for method, path, body in routes(door.tokens["alice_run"]):
        resp = door(method, path, body, token=token)
        if path == "me":
            assert resp.status_code == 200 and resp.json()["user"] == BOB  # Bob sees only himself
            continue
        _json_error(resp, 403, [token])
    assert door.snapshot() == before


def test_own_token_reaches_own_settings_runs_and_syncs_but_not_force_or_the_list(door):
    token = door.tokens["own"]
    me = door("GET", "me", token=token).json()
    assert me["user"] == ALICE and me["isAdmin"] is False and me["username"] == ALICE
    assert door("GET", f"users/{ALICE}", token=token).json()["user"] == ALICE
    assert door("POST", f"users/{ALICE}/validate", token=token).json()["ok"] is True
    runs = door("GET", f"users/{ALICE}/runs", token=token).json()["runs"]
    assert [r["runId"] for r in runs] == [door.tokens["alice_run"]] and runs[0]["status"] == "succeeded"
    assert door("GET", f"sync/runs/{door.tokens['alice_run']}", token=token).status_code == 200
    dry = door("POST", "sync", {"user": ALICE, "dryRun": True}, token=token)
    assert dry.status_code == 200 and dry.json()["dryRun"] is True

    before = door.snapshot()
    _json_error(door("GET", "users", token=token), 403, [token])
    err = _json_error(door("POST", "sync", {"user": ALICE, "force": True}, token=token), 403, [token])
    assert "ContactSync.Admin" in err["message"]
    err = _json_error(door("PUT", f"users/{ALICE}", {"enabled": False}, token=token), 403, [token])
    assert "enabled" in err["message"]
    assert door.snapshot() == before

    saved = door("PUT", f"users/{ALICE}", {"folderName": "Mine", "filter": {"city": "<>Oslo"}}, token=token)
    assert (
        saved.status_code == 200 and saved.json()["folderName"] == "Mine" and saved.json()["enabled"] is True
    )
    assert door.world.services.store.settings_owner(ALICE) == me["objectId"]
    assert door("DELETE", f"users/{ALICE}", token=token).status_code == 204


def test_admin_token_reaches_everything_including_force_and_the_list(door):
    token = door.tokens["admin"]
    me = door("GET", "me", token=token).json()
    assert me["isAdmin"] is True and me["user"] is None  # Ada has no sync of her own
    listing = door("GET", "users", token=token).json()["users"]
    alice = next(u for u in listing if u["user"] == ALICE)
    assert alice["lastRun"]["status"] == "succeeded" and alice["lastRun"]["failed"] == 0
    assert door("GET", f"users/{ALICE}/runs", token=token).status_code == 200
    assert door("GET", f"sync/runs/{door.tokens['alice_run']}", token=token).status_code == 200
    forced = door("POST", "sync", {"user": ALICE, "mode": "full", "force": True}, token=token)
    assert forced.status_code == 200
    off = door("PUT", f"users/{BOB}", {"enabled": False}, token=token)
    assert off.status_code == 200 and off.json()["enabled"] is False
    assert door.client("GET", f"users/{BOB}").json()["enabled"] is False
    assert door("DELETE", f"users/{BOB}", token=token).status_code == 204


def test_a_person_creates_settings_only_for_their_own_mailbox(door):
    token = door.tokens["carol"]
    assert door("GET", "me", token=token).json()["user"] is None
    before = door.snapshot()
    _json_error(door("PUT", "users/dave@contoso.example", {"folderName": "X"}, token=token), 403, [token])
    _json_error(
        door("PUT", f"users/{CAROL}", {"companyId": door.world.cloud.company_id}, token=token), 403, [token]
    )
    assert door.snapshot() == before
    created = door("PUT", f"users/{CAROL}", {"folderName": "Carol's"}, token=token)
    assert created.status_code == 201 and created.json()["enabled"] is True
    assert door("GET", "me", token=token).json()["user"] == CAROL


def test_the_function_key_routes_do_not_take_a_token_and_the_key_still_works(door):
    token = door.tokens["admin"]
    for path in ("users", f"users/{ALICE}", "sync"):
        resp = requests.get(
            f"{door.base}/api/{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        assert resp.status_code == 401  # the host wants the key there; a token is no key
    assert door.client("GET", f"users/{ALICE}").status_code == 200


def test_a_202_location_points_back_at_the_signed_in_door(door):
    resp = door("POST", "sync", {"user": ALICE, "wait": False}, token=door.tokens["own"])
    assert resp.status_code == 202
    assert resp.headers["Location"].endswith(f"/api/signed-in/sync/runs/{resp.json()['runId']}")
    door.client.run_queued_jobs()
    polled = requests.get(
        resp.headers["Location"], headers={"Authorization": f"Bearer {door.tokens['own']}"}, timeout=30
    )
    assert polled.status_code == 200 and polled.json()["status"] == "succeeded"


# Signing keys roll over ------------------------------------------------------------------------
def _validator(world, refresh_interval: float) -> TokenValidator:
    cloud = world.cloud
    return TokenValidator(cloud.entra.base_url, cloud.tenant_id, cloud.client_id, refresh_interval)


def test_a_token_signed_with_a_new_key_is_accepted_after_the_keys_are_fetched_again(world):
    cloud = world.cloud
    world.colleague(ALICE)
    oid = next(iter(cloud.entra._tenants[cloud.tenant_id].users))

    def mint() -> str:
        return cloud.entra.mint_user_token(cloud.tenant_id, cloud.client_id, oid)

    validator = _validator(world, refresh_interval=0)
    assert validator.principal(f"Bearer {mint()}").oid == oid
    cloud.entra.rotate_signing_key()
    assert validator.principal(f"Bearer {mint()}").oid == oid  # unknown kid: the key set is read again


def test_unknown_kids_do_not_make_the_api_hammer_entra(world):
    cloud = world.cloud
    world.colleague(ALICE)
    oid = next(iter(cloud.entra._tenants[cloud.tenant_id].users))
    validator = _validator(world, refresh_interval=300)
    validator.principal(f"Bearer {cloud.entra.mint_user_token(cloud.tenant_id, cloud.client_id, oid)}")
    cloud.reset_counters()
    for _ in range(5):
        forged = cloud.entra.mint_user_token(cloud.tenant_id, cloud.client_id, oid, unpublished_key=True)
        with pytest.raises(AuthError, match="key the tenant does not publish"):
            validator.principal(f"Bearer {forged}")
    assert cloud.entra.counters.http_count(kind="keys") == 0
