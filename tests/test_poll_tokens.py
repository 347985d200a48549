"""Poll URLs without function keys (BEHAVIOUR §7.6).

The `Location` of a `202` is kept by Power Automate in the flow's run history, so it must not hold a key
that opens the API. It holds a poll token instead, and these tests pin what a holder of that URL can and
cannot do: read that one run's status and report (with no key at all), nothing about another run, nothing
with a token that was changed or has expired. Over real HTTP through the stand-in of the Functions host,
which also fails any test whose answers carry the host's key (tests/local_host.py).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from shared.config import Config, ConfigError
from shared.model import RunReport
from shared.poll_tokens import STORED_KEY_NAME, PollTokens, TokenProblem, new_key
from shared.services import get_services, reset_services
from tests.local_host import LocalHost

ALICE = "alice@contoso.example"
BOB = "bob@contoso.example"
RUN_A = "0123456789abcdef0123456789abcdef"
RUN_B = "fedcba9876543210fedcba9876543210"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def _token(location: str) -> str:
    [token] = parse_qs(urlsplit(location).query)["token"]
    return token


def _queued(client, world, user: str = ALICE) -> requests.Response:
    world.user(user)
    resp = client("POST", "sync", {"user": user, "wait": False})
    assert resp.status_code == 202, resp.text
    return resp


# The token itself --------------------------------------------------------------------------------
def test_a_token_opens_its_own_run_until_it_expires_and_nothing_else():
    clock = Clock()
    tokens = PollTokens(new_key(), ttl=timedelta(hours=24), clock=clock)
    token = tokens.issue(RUN_A)
    assert tokens.check(RUN_A, token) is None
    assert tokens.check(RUN_B, token) == TokenProblem.INVALID  # another run
    assert PollTokens(new_key(), clock=clock).check(RUN_A, token) == TokenProblem.INVALID  # another key
    expires, mac = token.split(".")
    later = f"{int(expires) + 3600}.{mac}"  # a longer life, claimed by the holder
    assert tokens.check(RUN_A, later) == TokenProblem.INVALID
    flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    assert tokens.check(RUN_A, f"{expires}.{flipped}") == TokenProblem.INVALID
    for junk in ("x", f"{expires}.", f".{mac}", f"{expires}.{mac}=", token + "A", " " + token):
        assert tokens.check(RUN_A, junk) == TokenProblem.INVALID, junk
    assert tokens.check(RUN_A, None) == TokenProblem.MISSING
    assert tokens.check(RUN_A, "") == TokenProblem.MISSING

    clock.now += timedelta(hours=24) - timedelta(seconds=1)
    assert tokens.check(RUN_A, token) is None
    clock.now += timedelta(seconds=1)
    assert tokens.check(RUN_A, token) == TokenProblem.EXPIRED
    assert tokens.check(RUN_B, token) == TokenProblem.INVALID  # expired and for another run: just invalid


def test_two_tokens_for_one_run_differ_only_when_issued_at_different_times():
    clock = Clock()
    tokens = PollTokens(new_key(), clock=clock)
    assert tokens.issue(RUN_A) == tokens.issue(RUN_A)
    assert tokens.issue(RUN_A) != tokens.issue(RUN_B)
    first = tokens.issue(RUN_A)
    clock.now += timedelta(seconds=5)
    assert tokens.issue(RUN_A) != first and tokens.check(RUN_A, first) is None


def test_a_short_key_is_refused():
    with pytest.raises(ValueError, match="32 bytes"):
        PollTokens(b"k" * 31)


# The 202 flow over HTTP ----------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["query", "header"])
def test_the_202_location_holds_a_poll_token_and_no_key_and_polls_without_one(client, world, key):
    world.person("Queued Person")
    world.user(ALICE)
    resp = client("POST", "sync", {"user": ALICE, "wait": False}, key=key)
    assert resp.status_code == 202
    location = resp.headers["Location"]
    run_id = resp.json()["runId"]
    assert urlsplit(location).path == f"/api/poll/{run_id}"
    assert set(parse_qs(urlsplit(location).query)) == {"token"}
    assert client.host.key not in location and client.host.key not in resp.text

    poll = requests.get(location, timeout=30)  # no key anywhere, as Power Automate polls
    assert poll.status_code == 202 and poll.json()["status"] == "queued"
    assert poll.headers["Location"] == location and int(poll.headers["Retry-After"]) > 0
    client.run_queued_jobs()
    done = requests.get(location, timeout=30)
    assert done.status_code == 200 and done.json()["status"] == "succeeded"
    assert done.json()["counts"]["outlookCreated"] == 1
    assert "Location" not in done.headers


def test_reading_a_run_with_the_key_hands_out_a_poll_url_too(client, world):
    run_id = _queued(client, world).json()["runId"]
    resp = client("GET", f"sync/runs/{run_id}")
    assert resp.status_code == 202
    location = resp.headers["Location"]
    assert urlsplit(location).path == f"/api/poll/{run_id}" and client.host.key not in location
    assert requests.get(location, timeout=30).status_code == 202


def test_a_token_does_not_open_another_run(client, world):
    alice = _queued(client, world, ALICE)
    bob = _queued(client, world, BOB)
    bob_url = urlsplit(bob.headers["Location"])._replace(query=f"token={_token(alice.headers['Location'])}")
    resp = requests.get(bob_url.geturl(), timeout=30)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "PollTokenInvalid"
    assert BOB not in resp.text and bob.json()["runId"] not in resp.text  # nothing of Bob's run
    assert "Location" not in resp.headers


def test_a_tampered_token_is_refused(client, world):
    resp = _queued(client, world)
    run_id, token = resp.json()["runId"], _token(resp.headers["Location"])
    expires, mac = token.split(".")
    for bad in (f"{int(expires) + 86400}.{mac}", f"{expires}.{mac[::-1]}", "", "1.2"):
        answer = requests.get(f"{client.base}/api/poll/{run_id}", params={"token": bad}, timeout=30)
        assert answer.status_code == 401, bad
        assert answer.json()["error"]["code"] in ("PollTokenInvalid", "PollTokenMissing")
        assert ALICE not in answer.text
    no_token = requests.get(f"{client.base}/api/poll/{run_id}", timeout=30)
    assert no_token.status_code == 401 and no_token.json()["error"]["code"] == "PollTokenMissing"


def test_the_function_key_does_not_open_the_poll_url(client, world):
    """The poll route is anonymous at the host, so a key would be ignored; only the token counts."""
    run_id = _queued(client, world).json()["runId"]
    resp = client("GET", f"poll/{run_id}")  # ?code=<the key>, no token
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "PollTokenMissing"


def test_an_expired_token_is_refused_and_says_how_to_read_the_run(client, world):
    run_id = _queued(client, world).json()["runId"]
    # A token this app really issued, with the app's own key, 1 s before now minus its lifetime.
    key = world.services.store.app_secret(STORED_KEY_NAME, new_key)
    expired = PollTokens(key, ttl=timedelta(seconds=-1)).issue(run_id)
    resp = requests.get(f"{client.base}/api/poll/{run_id}", params={"token": expired}, timeout=30)
    err = resp.json()["error"]
    assert resp.status_code == 401 and err["code"] == "PollTokenExpired"
    assert "GET /api/sync/runs/{runId}" in err["message"]
    fresh = PollTokens(key).issue(run_id)  # the same key, in date: the run opens
    assert (
        requests.get(f"{client.base}/api/poll/{run_id}", params={"token": fresh}, timeout=30).status_code
        == 202
    )


def test_a_valid_token_for_a_run_with_no_report_answers_404(client, world):
    key = world.services.store.app_secret(STORED_KEY_NAME, new_key)
    resp = requests.get(
        f"{client.base}/api/poll/{RUN_A}", params={"token": PollTokens(key).issue(RUN_A)}, timeout=30
    )
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "RunNotFound"


def test_a_malformed_run_id_is_refused_before_anything_is_read(client):
    for run_id in ("x", "0" * 31, "../" + RUN_A):
        resp = requests.get(f"{client.base}/api/poll/{run_id}", params={"token": "1.2"}, timeout=30)
        assert resp.status_code in (401, 404), run_id  # 404: the host's own, for a path with '/'
    resp = requests.get(f"{client.base}/api/poll/xyz", timeout=30)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "PollTokenInvalid"


def test_only_get_reaches_the_poll_url(client, world):
    resp = _queued(client, world)
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert requests.request(method, resp.headers["Location"], timeout=30).status_code == 404, method


# The key -------------------------------------------------------------------------------------------
def test_every_instance_checks_the_tokens_the_others_issued(world):
    """Without SYNC_POLL_TOKEN_KEY the key lives in Table Storage: a second process (a scaled-out
    instance) reads the same key, so a poll may land on any instance."""
    world.user(ALICE)
    report = RunReport(user=ALICE, mode="incremental", status="queued")
    token = get_services().poll_tokens().issue(report.runId)
    reset_services()
    assert get_services().poll_tokens().check(report.runId, token) is None


def test_a_configured_key_replaces_the_stored_one(world, monkeypatch):
    token = get_services().poll_tokens().issue(RUN_A)
    monkeypatch.setenv("SYNC_POLL_TOKEN_KEY", "k" * 40)
    reset_services()
    configured = get_services().poll_tokens()
    assert configured.check(RUN_A, token) == TokenProblem.INVALID  # outstanding URLs die with the key
    assert configured.check(RUN_A, configured.issue(RUN_A)) is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("too-short-but-secret", "at least 32 characters"),
        ("@Microsoft.KeyVault(VaultName=kv-x;SecretName=poll-key)", "unresolved Key Vault reference"),
    ],
)
def test_a_bad_configured_key_stops_the_app_naming_the_setting_not_the_value(env, value, problem):
    with pytest.raises(ConfigError) as exc:
        Config.from_env({**env, "SYNC_POLL_TOKEN_KEY": value})
    assert "SYNC_POLL_TOKEN_KEY" in str(exc.value) and problem in str(exc.value)
    assert "too-short-but-secret" not in str(exc.value)


# The check that no answer carries a key -------------------------------------------------------------
def test_the_stand_in_host_catches_an_answer_that_carries_its_key():
    """The guard behind 'no answer in any test contains a function key' can fail: an answer with the
    key in a header or (percent-encoded) in the body is recorded, and `serve()` then fails the test."""
    host = LocalHost(keys=("k3y/with+chars",))
    host._check_no_key(
        "POST", "/api/sync", (202, {"Location": "https://x/api/sync?code=k3y/with+chars"}, b"")
    )
    host._check_no_key("GET", "/api/x", (200, {}, b'{"next": "https://x/?code=k3y%2Fwith%2Bchars"}'))
    host._check_no_key("GET", "/api/y", (200, {"Location": "https://x/api/poll/1?token=2"}, b"{}"))
    assert len(host.key_leaks) == 2
    with pytest.raises(AssertionError, match="function key"), host.serve():
        pass
