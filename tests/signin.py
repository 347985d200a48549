"""Sign a person in against the sandbox's Entra ID the way a browser and MSAL.js do, over real HTTPS.

GET authorize (the sign-in form), POST the form (a 302 to the redirect URI with the code), then the
code + PKCE verifier to the token endpoint from a cross-origin "page" (the `Origin` header). Used by the
sandbox's own tests and the API's route-by-credential tests; the browser test does it with Chromium.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests


def pkce_pair() -> tuple[str, str]:
    verifier = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorize(
    authority: str,
    client_id: str,
    redirect_uri: str,
    username: str,
    password: str,
    scopes: str,
    challenge: str,
    verify: str,
    method: str = "S256",
    response_mode: str = "query",
) -> requests.Response:
    """Open the sign-in form and submit it; returns the answer to the submission (not followed)."""
    params = {
        "client_id": client_id,
        "response_type": "code",
        "redirect_uri": redirect_uri,
        "scope": scopes,
        "state": "st-" + secrets.token_hex(4),
        "nonce": "n-" + secrets.token_hex(4),
        "code_challenge": challenge,
        "code_challenge_method": method,
        "response_mode": response_mode,
    }
    form = requests.get(f"{authority}/oauth2/v2.0/authorize", params=params, verify=verify, timeout=10)
    form.raise_for_status()
    return requests.post(
        f"{authority}/oauth2/v2.0/authorize",
        data={**params, "username": username, "password": password},
        verify=verify,
        allow_redirects=False,
        timeout=10,
    )


def code_from(resp: requests.Response) -> dict[str, str]:
    location = resp.headers["Location"]
    parts = urlsplit(location)
    query = parts.fragment or parts.query
    return {k: v[0] for k, v in parse_qs(query).items()}


def sign_in(
    authority: str,
    client_id: str,
    redirect_uri: str,
    username: str,
    password: str,
    verify: str,
    api_scope: str | None = None,
) -> dict[str, Any]:
    """The whole dance; returns the token endpoint's JSON (access_token, id_token, …)."""
    verifier, challenge = pkce_pair()
    scope = f"openid profile offline_access {api_scope or f'api://{client_id}/access_as_user'}"
    answer = authorize(authority, client_id, redirect_uri, username, password, scope, challenge, verify)
    assert answer.status_code == 302, answer.text
    code = code_from(answer)["code"]
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(redirect_uri))
    token = requests.post(
        f"{authority}/oauth2/v2.0/token",
        data={
            "client_id": client_id,
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
            "scope": scope,
        },
        headers={"Origin": origin},
        verify=verify,
        timeout=10,
    )
    assert token.status_code == 200, token.text
    return token.json()
