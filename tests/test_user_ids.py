"""User ids as strict as Entra's user principal names, through every route that takes a user (BEHAVIOUR §5.1).

Entra's documented UserPrincipalName requirements ("Password policies and account restrictions in
Microsoft Entra ID", https://learn.microsoft.com/entra/identity/authentication/concept-sspr-policy,
section "Username policies"; source MicrosoftDocs/entra-docs docs/identity/authentication/concept-sspr-policy.md):

- characters allowed: A-Z, a-z, 0-9, ' . - _ ! # ^ ~
- not allowed: an '@' that does not separate the user name from the domain; a period immediately
  before the '@'
- lengths: at most 113 characters in all, up to 64 before the '@', up to 48 after it

The app also refuses a leading period (an address cannot start with one either) and accepts Entra object
ids (GUIDs), as it always did. Values inside the rules are accepted on every route; values outside get
`400 InvalidInput` with `field: "user"` and change nothing.
"""

from __future__ import annotations

import string
import uuid
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shared.model import ValidationError, normalize_user

ALLOWED = string.ascii_letters + string.digits + "'.-_!#^~"
FORBIDDEN = '/?%&=+{}|$*`"(),:;<>[]\\ \t@\x00\x7féø😀'
LABEL = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=10)


def _name(draw, max_size: int = 64) -> str:
    name = draw(st.text(ALLOWED, min_size=1, max_size=max_size))
    assume(not name.startswith(".") and not name.endswith("."))
    return name


@st.composite
def valid_upns(draw) -> str:
    name = _name(draw)
    labels = draw(st.lists(LABEL, min_size=2, max_size=4))
    domain = ".".join(labels)
    assume(len(domain) <= 48 and len(name) + 1 + len(domain) <= 113)
    return f"{name}@{domain}"


@st.composite
def invalid_upns(draw) -> str:
    """One rule broken at a time, so each refusal is pinned to that rule."""
    name, domain = _name(draw, 20), draw(st.sampled_from(["contoso.example", "sub.contoso.co.uk"]))
    broken = draw(st.sampled_from(["char", "name_len", "domain_len", "total_len", "period", "at", "no_at"]))
    if broken == "char":
        bad = draw(st.sampled_from(FORBIDDEN))
        # Not whitespace first: surrounding whitespace is trimmed by design (the test above), so
        # " 0@contoso.example" is a valid address typed with a space, not a forbidden character.
        at = draw(st.integers(1 if bad.isspace() else 0, len(name)))
        return f"{name[:at]}{bad}{name[at:]}@{domain}" if bad != "@" else f"{name}@{bad}{domain}"
    if broken == "name_len":
        return f"{'a' * draw(st.integers(65, 80))}@{domain}"
    if broken == "domain_len":
        return f"{name}@{'d' * draw(st.integers(46, 60))}.example"  # 49+ characters after '@'
    if broken == "total_len":
        return f"{'a' * 64}@{'b' * 24}.{'c' * 23}.{'e' * draw(st.integers(1, 10))}"
    if broken == "period":
        return draw(st.sampled_from([f".{name}@{domain}", f"{name}.@{domain}"]))
    if broken == "at":
        return f"{name}@{name}@{domain}"
    return name.replace("@", "") or "x"


def _error(resp, status: int = 400):
    assert resp.status_code == status, (resp.status_code, resp.text)
    return resp.json()["error"]


# The rule itself ---------------------------------------------------------------------------------
@given(valid_upns())
def test_every_upn_entra_accepts_is_accepted_lower_cased(upn):
    assert normalize_user(upn) == upn.lower()
    assert normalize_user(f"  {upn} ") == upn.lower()


@given(invalid_upns())
def test_every_value_outside_entras_rules_is_refused_naming_the_field(value):
    with pytest.raises(ValidationError) as exc:
        normalize_user(value)
    assert exc.value.field == "user" and exc.value.message
    if len(value) > 12:  # (a short value may occur in the message's own words by chance)
        assert value not in str(exc.value)  # the message names the rule, never echoes the input


def test_the_boundaries_exactly():
    domain48 = f"{'d' * 40}.example"  # 48
    assert len(domain48) == 48
    assert normalize_user(f"{'a' * 64}@{domain48}") == f"{'a' * 64}@{domain48}"  # 113 in all
    for value, rule in [
        (f"{'a' * 65}@contoso.example", "1-64"),
        (f"a@{'d' * 41}.example", "1-48"),
        (f"{'a' * 64}@{'d' * 41}.example", "113"),
        ("alice.@contoso.example", "period"),
        (".alice@contoso.example", "period"),
        ("@contoso.example", "1-64"),
        ("alice@", "1-48"),
        ("alice@contoso", "domain"),
        ("alice@-contoso.example", "domain"),
        ("a@b@contoso.example", "exactly one '@'"),
        ("alice", "exactly one '@'"),
    ]:
        with pytest.raises(ValidationError, match=rule):
            normalize_user(value)
    for ok in ("o'brien.#1!^~_-@contoso.example", "_x_@contoso.example", "a..b@contoso.example"):
        assert normalize_user(ok) == ok


def test_the_path_tricks_of_the_issue_are_refused():
    for value in (
        "../../admin@contoso.example",
        "alice/../bob@contoso.example",
        "a?b=c@contoso.example",
        "a%2Fb@contoso.example",
        "a&b@contoso.example",
        "a+b@contoso.example",
        "{a}@contoso.example",
        "a|b@contoso.example",
        "$a@contoso.example",
    ):
        with pytest.raises(ValidationError):
            normalize_user(value)


def test_object_ids_stay_accepted():
    oid = str(uuid.uuid4()).upper()
    assert normalize_user(oid) == oid.lower()
    assert normalize_user(f"{{{oid}}}".strip("{}")) == oid.lower()


# Through every route, over HTTP --------------------------------------------------------------------
HTTP = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _stored(client) -> list[str]:
    resp = client("GET", "users")
    assert resp.status_code == 200
    return sorted(u["user"] for u in resp.json()["users"]) + sorted(i["user"] for i in resp.json()["invalid"])


@HTTP
@given(upn=valid_upns())
def test_a_valid_upn_works_on_every_route(client, world, upn):
    path = f"users/{quote(upn, safe='@')}"
    created = client("PUT", path, {"folderName": "Business Central"})
    assert created.status_code in (200, 201), created.text
    assert created.json()["user"] == upn.lower()
    assert client("GET", path).json()["user"] == upn.lower()
    body_user = client("PUT", path, {"user": upn.upper()})  # the body may repeat the user, any case
    assert body_user.status_code == 200 and body_user.json()["user"] == upn.lower()
    check = client("POST", f"{path}/validate")
    assert check.status_code == 200 and check.json()["user"] == upn.lower()
    run = client("POST", "sync", {"user": upn, "wait": False})
    assert run.status_code == 202 and run.json()["user"] == upn.lower()
    client.host.queued("contact-sync-jobs")  # not run here
    assert client("DELETE", path).status_code == 204


@HTTP
@given(value=invalid_upns())
def test_an_invalid_user_is_refused_by_every_route_and_changes_nothing(client, world, value):
    world.user("alice@contoso.example")
    before = _stored(client)
    # In a body: exactly one answer, 400 naming the field.
    for method, path, body in (
        ("POST", "sync", {"user": value}),
        ("POST", "sync", {"user": value, "wait": False}),
        ("PUT", "users/alice@contoso.example", {"user": value}),
    ):
        err = _error(client(method, path, body))
        assert err["code"] == "InvalidInput" and err["field"] == "user", (method, path)
    # In the URL, percent-encoded as a client sends it; the host keeps an encoded '/' inside its segment
    # (tests/local_host.py `kestrel_path`), so every value reaches the handler whole.
    encoded = quote(value, safe="@")
    for method, path, body in (
        ("GET", f"users/{encoded}", None),
        ("PUT", f"users/{encoded}", {"folderName": "Business Central"}),
        ("DELETE", f"users/{encoded}", None),
        ("POST", f"users/{encoded}/validate", None),
    ):
        err = _error(client(method, path, body))
        assert err["code"] == "InvalidInput" and err["field"] == "user", (method, path)
    assert client.host.queued("contact-sync-jobs") == []
    assert _stored(client) == before


def test_the_stand_in_host_keeps_an_encoded_slash_in_its_segment_as_kestrel_does():
    from tests.local_host import kestrel_path

    assert kestrel_path("/api/users/a%2Fb%40c%20d%2f") == "/api/users/a%2Fb@c d%2F"
