"""The simulated Entra ID's sign-in of people: authorize + PKCE, RS256 v2 access tokens, keys, rotation.

Pinned to the Microsoft identity platform documentation:

* "Microsoft identity platform and OAuth 2.0 authorization code flow",
  https://learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow : the authorize request
  (`client_id`, `response_type=code`, `redirect_uri`, `scope`, `state`, `code_challenge`), the code in the
  redirect, its redemption with `code_verifier`; single-page apps redeem cross-origin and must use PKCE.
* "Access token claims reference", https://learn.microsoft.com/entra/identity-platform/access-token-claims-reference :
  v2.0 tokens carry `aud` = the API's client id, `iss` = `https://login.microsoftonline.com/{tid}/v2.0`,
  `oid`, `tid`, `scp` (delegated), `roles` (app roles assigned), `preferred_username`, `azp`, `ver` "2.0";
  `kid`/`x5t` in the header name the signing key.
* "Signing key rollover in the Microsoft identity platform",
  https://learn.microsoft.com/entra/identity-platform/signing-key-rollover : keys are published at the
  OpenID configuration's `jwks_uri` and can roll over at any time; more than one key is published.
* Error codes (https://learn.microsoft.com/entra/identity-platform/reference-error-codes) as reported in
  public threads: AADSTS9002327 "Tokens issued for the 'Single-Page Application' client-type may only be
  redeemed via cross-origin requests" (learn.microsoft.com/answers/questions/1601797), AADSTS50011 redirect
  URI mismatch, AADSTS501481 code verifier mismatch, AADSTS70008 expired or used code, AADSTS50126 wrong
  password.
"""

from __future__ import annotations

import jwt
import pytest
import requests

from sandbox.entra import EntraService
from tests.sandbox.conftest import TENANT_ID
from tests.signin import authorize, code_from, pkce_pair, sign_in

API_ID = "5a1d2c3b-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
PAGE = "http://127.0.0.1:7071/api/selfservice"
ALICE_OID = "11111111-2222-4333-8444-555555555555"
ADMIN_OID = "99999999-2222-4333-8444-555555555555"


@pytest.fixture
def people(entra: EntraService) -> EntraService:
    entra.add_user(TENANT_ID, "alice@contoso.example", ALICE_OID, "Alice Able", password="alice-pw")
    entra.add_user(TENANT_ID, "ada@contoso.example", ADMIN_OID, "Ada Admin", password="ada-pw")
    entra.expose_api(TENANT_ID, API_ID, redirect_uris=[PAGE])
    entra.assign_app_role(TENANT_ID, API_ID, ADMIN_OID, "ContactSync.Admin")
    return entra


def authority(entra: EntraService) -> str:
    return f"{entra.base_url}/{TENANT_ID}"


def keys_of(entra: EntraService, ca_bundle: str) -> dict:
    config = requests.get(
        f"{authority(entra)}/v2.0/.well-known/openid-configuration", verify=ca_bundle, timeout=10
    ).json()
    assert config["authorization_endpoint"] == f"{authority(entra)}/oauth2/v2.0/authorize"
    return requests.get(config["jwks_uri"], verify=ca_bundle, timeout=10).json()


def verify_rs256(token: str, jwks: dict, audience: str) -> dict:
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks["keys"] if k["kid"] == kid)
    return jwt.decode(token, jwt.PyJWK(key, "RS256"), algorithms=["RS256"], audience=audience)


def test_a_person_signs_in_with_pkce_and_gets_a_v2_access_token_for_the_api(people, ca_bundle):
    tokens = sign_in(authority(people), API_ID, PAGE, "alice@contoso.example", "alice-pw", ca_bundle)

    claims = verify_rs256(tokens["access_token"], keys_of(people, ca_bundle), API_ID)
    assert claims["aud"] == API_ID and claims["ver"] == "2.0"
    assert claims["iss"] == f"{people.base_url}/{TENANT_ID}/v2.0"
    assert claims["oid"] == ALICE_OID and claims["tid"] == TENANT_ID
    assert claims["scp"] == "access_as_user" and "roles" not in claims
    assert claims["preferred_username"] == "alice@contoso.example" and claims["azp"] == API_ID
    assert claims["nbf"] <= claims["iat"] < claims["exp"]
    assert tokens["token_type"] == "Bearer" and tokens["scope"] == f"api://{API_ID}/access_as_user"
    id_claims = verify_rs256(tokens["id_token"], keys_of(people, ca_bundle), API_ID)
    assert id_claims["oid"] == ALICE_OID and id_claims["nonce"].startswith("n-")
    assert tokens["refresh_token"] and tokens["client_info"]


def test_a_scope_may_name_the_api_by_its_client_id(people, ca_bundle):
    tokens = sign_in(
        authority(people),
        API_ID,
        PAGE,
        "alice@contoso.example",
        "alice-pw",
        ca_bundle,
        api_scope=f"{API_ID}/access_as_user",
    )
    assert verify_rs256(tokens["access_token"], keys_of(people, ca_bundle), API_ID)["scp"] == "access_as_user"


def test_an_assigned_app_role_is_in_the_roles_claim(people, ca_bundle):
    tokens = sign_in(authority(people), API_ID, PAGE, "ada@contoso.example", "ada-pw", ca_bundle)
    claims = verify_rs256(tokens["access_token"], keys_of(people, ca_bundle), API_ID)
    assert claims["roles"] == ["ContactSync.Admin"] and claims["scp"] == "access_as_user"


def test_the_code_goes_to_the_registered_redirect_uri_with_the_state(people, ca_bundle):
    _verifier, challenge = pkce_pair()
    answer = authorize(
        authority(people), API_ID, PAGE, "alice@contoso.example", "alice-pw", "openid", challenge, ca_bundle
    )
    assert answer.status_code == 302 and answer.headers["Location"].startswith(PAGE + "?code=")
    assert code_from(answer)["state"].startswith("st-")
    fragment = authorize(
        authority(people),
        API_ID,
        PAGE,
        "alice@contoso.example",
        "alice-pw",
        "openid",
        challenge,
        ca_bundle,
        response_mode="fragment",
    )
    assert fragment.headers["Location"].startswith(PAGE + "#code=")


def test_an_unregistered_redirect_uri_is_shown_as_an_error_never_redirected(people, ca_bundle):
    resp = requests.get(
        f"{authority(people)}/oauth2/v2.0/authorize",
        params={
            "client_id": API_ID,
            "response_type": "code",
            "redirect_uri": "https://evil.example/cb",
            "scope": "openid",
        },
        verify=ca_bundle,
        allow_redirects=False,
        timeout=10,
    )
    assert resp.status_code == 400 and "AADSTS50011" in resp.text and "Location" not in resp.headers


def test_a_wrong_password_shows_the_form_again_with_the_error(people, ca_bundle):
    _, challenge = pkce_pair()
    answer = authorize(
        authority(people), API_ID, PAGE, "alice@contoso.example", "nope", "openid", challenge, ca_bundle
    )
    assert answer.status_code == 200 and "AADSTS50126" in answer.text and 'name="password"' in answer.text


def _redeem(
    entra: EntraService,
    ca_bundle: str,
    code: str,
    verifier: str,
    origin: str | None = "http://127.0.0.1:7071",
):
    headers = {"Origin": origin} if origin else {}
    return requests.post(
        f"{authority(entra)}/oauth2/v2.0/token",
        data={
            "client_id": API_ID,
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": PAGE,
            "code_verifier": verifier,
            "scope": f"api://{API_ID}/access_as_user",
        },
        headers=headers,
        verify=ca_bundle,
        timeout=10,
    )


def _code(entra: EntraService, ca_bundle: str, challenge: str) -> str:
    scope = f"openid api://{API_ID}/access_as_user"
    answer = authorize(
        authority(entra), API_ID, PAGE, "alice@contoso.example", "alice-pw", scope, challenge, ca_bundle
    )
    return code_from(answer)["code"]


def test_the_code_verifier_must_match_the_challenge(people, ca_bundle):
    _verifier, challenge = pkce_pair()
    wrong = _redeem(people, ca_bundle, _code(people, ca_bundle, challenge), "x" * 43)
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    assert wrong.json()["error_codes"] == [501481]


def test_a_code_is_redeemed_once(people, ca_bundle):
    verifier, challenge = pkce_pair()
    code = _code(people, ca_bundle, challenge)
    assert _redeem(people, ca_bundle, code, verifier).status_code == 200
    again = _redeem(people, ca_bundle, code, verifier)
    assert again.status_code == 400 and again.json()["error_codes"] == [70008]


def test_a_single_page_app_redeems_only_cross_origin(people, ca_bundle):
    verifier, challenge = pkce_pair()
    resp = _redeem(people, ca_bundle, _code(people, ca_bundle, challenge), verifier, origin=None)
    assert resp.status_code == 400 and resp.json()["error_codes"] == [9002327]


def test_browsers_may_read_discovery_keys_and_tokens_cross_origin(people, ca_bundle):
    verifier, challenge = pkce_pair()
    resp = _redeem(people, ca_bundle, _code(people, ca_bundle, challenge), verifier)
    assert resp.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:7071"
    config = requests.get(
        f"{authority(people)}/v2.0/.well-known/openid-configuration", verify=ca_bundle, timeout=10
    )
    assert config.headers["Access-Control-Allow-Origin"]


def test_keys_roll_over_new_key_signs_old_stays_published_until_retired(people, ca_bundle):
    before = sign_in(authority(people), API_ID, PAGE, "alice@contoso.example", "alice-pw", ca_bundle)[
        "access_token"
    ]
    old_kid = jwt.get_unverified_header(before)["kid"]
    new_kid = people.rotate_signing_key()

    after = sign_in(authority(people), API_ID, PAGE, "alice@contoso.example", "alice-pw", ca_bundle)[
        "access_token"
    ]
    assert jwt.get_unverified_header(after)["kid"] == new_kid != old_kid
    jwks = keys_of(people, ca_bundle)
    assert {k["kid"] for k in jwks["keys"]} == {old_kid, new_kid}
    assert all(k["kty"] == "RSA" and k["use"] == "sig" and k["n"] and k["e"] for k in jwks["keys"])
    verify_rs256(before, jwks, API_ID)  # tokens signed before the rollover still verify

    people.retire_signing_key(old_kid)
    assert {k["kid"] for k in keys_of(people, ca_bundle)["keys"]} == {new_kid}
