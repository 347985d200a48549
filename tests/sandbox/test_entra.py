"""The simulated Entra ID, driven by the real MSAL over real HTTPS."""

from __future__ import annotations

import base64
import json
from typing import Any

import msal
import pytest
import requests

from sandbox.entra import BC_RESOURCE, GRAPH_RESOURCE, EntraService
from tests.sandbox.conftest import CLIENT_ID, CLIENT_SECRET, TENANT_ID

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
BC_SCOPE = "https://api.businesscentral.dynamics.com/.default"


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def msal_app(
    entra: EntraService, secret: str = CLIENT_SECRET, tenant: str = TENANT_ID, client_id: str = CLIENT_ID
):
    # Exactly how the product builds its client (BEHAVIOUR §6: instance discovery off for the sandbox host).
    return msal.ConfidentialClientApplication(
        client_id, authority=f"{entra.base_url}/{tenant}", client_credential=secret, instance_discovery=False
    )


def token_request(
    entra: EntraService, ca_bundle: str, tenant: str = TENANT_ID, **form: str
) -> requests.Response:
    data = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    data.update(form)
    return requests.post(
        f"{entra.base_url}/{tenant}/oauth2/v2.0/token", data=data, verify=ca_bundle, timeout=10
    )


def test_msal_gets_a_token_for_each_resource_with_its_consented_roles(entra, trust_sandbox):
    app = msal_app(entra)

    graph = app.acquire_token_for_client([GRAPH_SCOPE])
    bc = app.acquire_token_for_client([BC_SCOPE])

    assert graph["token_type"] == "Bearer" and graph["expires_in"] == 3599
    assert graph["token_source"] == "identity_provider"
    g, b = claims_of(graph["access_token"]), claims_of(bc["access_token"])
    assert g["aud"] == GRAPH_RESOURCE and b["aud"] == BC_RESOURCE
    assert g["roles"] == ["Contacts.ReadWrite", "User.Read.All"] and b["roles"] == ["API.ReadWrite.All"]
    assert g["tid"] == TENANT_ID and g["appid"] == CLIENT_ID and g["oid"]
    assert g["iss"] == f"https://sts.windows.net/{TENANT_ID}/"
    assert g["nbf"] <= g["iat"] < g["exp"]
    assert entra.validate(graph["access_token"], GRAPH_RESOURCE) == g
    assert entra.validate(graph["access_token"], BC_RESOURCE) is None  # wrong audience


def test_second_request_is_served_from_msal_cache(entra, trust_sandbox):
    app = msal_app(entra)
    first = app.acquire_token_for_client([BC_SCOPE])

    second = app.acquire_token_for_client([BC_SCOPE])

    assert second["token_source"] == "cache"
    assert second["access_token"] == first["access_token"]
    assert entra.counters.http_count("POST", "token") == 1


def test_domain_name_works_as_tenant_and_tokens_name_the_tenant_id(entra, trust_sandbox):
    result = msal_app(entra, tenant="contoso.onmicrosoft.com").acquire_token_for_client([GRAPH_SCOPE])

    assert claims_of(result["access_token"])["tid"] == TENANT_ID


def test_wrong_secret_is_invalid_client(entra, trust_sandbox, ca_bundle):
    result = msal_app(entra, secret="not-the-secret").acquire_token_for_client([GRAPH_SCOPE])

    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [7000215]
    assert result["error_description"].startswith("AADSTS7000215: Invalid client secret provided.")
    assert token_request(entra, ca_bundle, client_secret="nope", scope=GRAPH_SCOPE).status_code == 401


def test_error_body_has_entras_shape_and_echoes_the_client_request_id(entra, ca_bundle):
    resp = requests.post(
        f"{entra.base_url}/{TENANT_ID}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": "x",
            "scope": BC_SCOPE,
        },
        headers={"client-request-id": "11111111-2222-3333-4444-555555555555"},
        verify=ca_bundle,
        timeout=10,
    )

    body = resp.json()
    assert set(body) >= {
        "error",
        "error_description",
        "error_codes",
        "timestamp",
        "trace_id",
        "correlation_id",
    }
    assert body["correlation_id"] == "11111111-2222-3333-4444-555555555555"
    assert "Correlation ID: 11111111-2222-3333-4444-555555555555" in body["error_description"]


def test_unknown_client_id_is_unauthorized_client(entra, ca_bundle):
    resp = token_request(
        entra, ca_bundle, client_id="99999999-0000-0000-0000-000000000000", scope=GRAPH_SCOPE
    )

    assert resp.status_code == 400
    assert resp.json()["error"] == "unauthorized_client"
    assert resp.json()["error_codes"] == [700016]
    assert "was not found in the directory 'Contoso'" in resp.json()["error_description"]


@pytest.mark.parametrize(
    ("scope", "status", "error", "code"),
    [
        ("User.Read.All", 400, "invalid_scope", 1002012),
        ("https://graph.microsoft.com/Contacts.ReadWrite", 400, "invalid_scope", 1002012),
        (f"{GRAPH_SCOPE} {BC_SCOPE}", 400, "invalid_scope", 28000),
        ("https://unknown.example.com/.default", 400, "invalid_resource", 500011),
        ("", 400, "invalid_request", 900144),
    ],
)
def test_scope_must_be_one_known_resources_default(entra, ca_bundle, scope, status, error, code):
    resp = token_request(entra, ca_bundle, scope=scope)

    assert (resp.status_code, resp.json()["error"], resp.json()["error_codes"]) == (status, error, [code])


def test_msal_reports_a_scope_without_default(entra, trust_sandbox):
    result = msal_app(entra).acquire_token_for_client(["https://graph.microsoft.com/Contacts.ReadWrite"])

    assert result["error"] == "invalid_scope"
    assert "Client credential flows must have a scope value with /.default" in result["error_description"]


def test_unknown_tenant_fails_discovery_and_token_requests(entra, trust_sandbox, ca_bundle):
    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        msal_app(entra, tenant="00000000-dead-beef-0000-000000000000")

    discovery = requests.get(
        f"{entra.base_url}/nosuchtenant/v2.0/.well-known/openid-configuration", verify=ca_bundle, timeout=10
    )
    assert discovery.status_code == 400 and discovery.json()["error"] == "invalid_tenant"
    token = token_request(entra, ca_bundle, tenant="nosuchtenant", scope=GRAPH_SCOPE)
    assert token.status_code == 400
    assert (token.json()["error"], token.json()["error_codes"]) == ("invalid_request", [90002])


def test_unsupported_grant_type(entra, ca_bundle):
    resp = token_request(entra, ca_bundle, grant_type="password", scope=GRAPH_SCOPE)

    assert resp.status_code == 400
    assert (resp.json()["error"], resp.json()["error_codes"]) == ("unsupported_grant_type", [70003])


def test_client_assertion_is_refused_as_no_certificate_is_registered(entra, ca_bundle):
    resp = token_request(
        entra,
        ca_bundle,
        client_secret="",
        client_assertion="eyJhbGciOi.fake.assertion",
        client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        scope=GRAPH_SCOPE,
    )

    assert resp.status_code == 401 and resp.json()["error"] == "invalid_client"


def test_secret_via_http_basic_is_accepted(entra, ca_bundle):
    resp = requests.post(
        f"{entra.base_url}/{TENANT_ID}/oauth2/v2.0/token",
        data={"grant_type": "client_credentials", "scope": BC_SCOPE},
        auth=(CLIENT_ID, CLIENT_SECRET),
        verify=ca_bundle,
        timeout=10,
    )

    assert resp.status_code == 200 and resp.json()["access_token"]


def test_expired_and_revoked_secrets(entra, ca_bundle):
    entra.add_secret(TENANT_ID, CLIENT_ID, "second-secret")
    entra.expire_secret(TENANT_ID, CLIENT_ID, CLIENT_SECRET)

    expired = token_request(entra, ca_bundle, scope=GRAPH_SCOPE)
    assert expired.status_code == 401 and expired.json()["error_codes"] == [7000222]
    assert (
        token_request(entra, ca_bundle, client_secret="second-secret", scope=GRAPH_SCOPE).status_code == 200
    )

    entra.revoke_secret(TENANT_ID, CLIENT_ID)
    revoked = token_request(entra, ca_bundle, client_secret="second-secret", scope=GRAPH_SCOPE)
    assert revoked.status_code == 401 and revoked.json()["error_codes"] == [7000215]


def test_without_admin_consent_the_token_has_no_roles(entra, trust_sandbox):
    entra.register_app(TENANT_ID, "aaaaaaaa-0000-0000-0000-000000000001", "s", graph_roles=(), bc_roles=())

    result = msal_app(
        entra, secret="s", client_id="aaaaaaaa-0000-0000-0000-000000000001"
    ).acquire_token_for_client([BC_SCOPE])

    assert "roles" not in claims_of(result["access_token"])


def test_expire_all_tokens_invalidates_issued_tokens_only(entra, trust_sandbox):
    old = msal_app(entra).acquire_token_for_client([BC_SCOPE])["access_token"]

    entra.expire_all_tokens()

    assert entra.validate(old, BC_RESOURCE) is None
    fresh = msal_app(entra).acquire_token_for_client([BC_SCOPE])["access_token"]
    assert entra.validate(fresh, BC_RESOURCE) is not None


def test_forged_or_foreign_tokens_do_not_validate(entra, trust_sandbox):
    token = msal_app(entra).acquire_token_for_client([BC_SCOPE])["access_token"]
    header, _, signature = token.split(".")
    forged_claims = {**claims_of(token), "roles": ["Everything"]}
    forged = base64.urlsafe_b64encode(json.dumps(forged_claims).encode()).rstrip(b"=").decode()

    assert entra.validate(f"{header}.{forged}.{signature}", BC_RESOURCE) is None
    assert entra.validate(token, BC_RESOURCE) is not None
    other = EntraService()
    assert other.validate(token, BC_RESOURCE) is None
    assert entra.validate("not-a-jwt", BC_RESOURCE) is None


def test_tls_is_real_requests_without_the_sandbox_ca_refuse_the_server(entra, monkeypatch):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)

    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{entra.base_url}/{TENANT_ID}/v2.0/.well-known/openid-configuration", timeout=10)
