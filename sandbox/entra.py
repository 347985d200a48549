"""Simulated Microsoft identity platform (Entra ID) v2.0 endpoints for the client-credentials flow.

The product talks to it through the real `msal` package with `authority=f"{host}/{tenant}"` and
`instance_discovery=False`. For such an authority MSAL calls exactly two endpoints (msal/authority.py,
`_initialize_entra_authority` and `tenant_discovery`):

* ``GET /{tenant}/v2.0/.well-known/openid-configuration`` - tenant discovery. An unknown tenant
  answers 400 ``invalid_tenant``/AADSTS90002 and MSAL raises ``ValueError`` when the app is built.
* ``POST /{tenant}/oauth2/v2.0/token`` - the token request (form-encoded, secret in the body).

Why the errors matter: the product must tell an admin *what* is wrong (wrong secret, missing consent,
wrong tenant, bad scope), so every refusal has the real status, ``error`` and AADSTS code, in the real
body shape (learn.microsoft.com/entra/identity-platform/reference-error-codes; bodies as captured in
public reports, e.g. microsoft/AzureTRE#1475 for 700016, MicrosoftDocs/azure-docs#99862 for 1002012,
Azure/azure-cli#22145 for ``invalid_tenant`` on discovery). Without admin consent Entra still issues
an app-only token, just without a ``roles`` claim (MicrosoftDocs/azure-docs PR #81503).

Tokens for Graph and Business Central are JWT-shaped v1.0 access tokens (both take v1 tokens) signed
with an HMAC key held here. Clients never verify them; the resource simulators call `validate()`.

Sign-in of people (the self-service page, issue 13) is the real thing, because the product verifies
those tokens itself: the authorize endpoint with a sign-in form for the tenant's test users, the
authorization code + PKCE (S256) exchange, refresh tokens, and v2.0 access tokens for the app's own
API signed RS256 with keys published at ``jwks_uri``, with the claims Entra puts in v2 access tokens
(``aud`` = the API's client id, ``iss`` = ``{host}/{tid}/v2.0``, ``oid``, ``tid``, ``scp``, ``roles``,
``preferred_username``, ``azp``, ``ver`` 2.0). Keys rotate: a new key signs while the old one stays
published until retired (learn.microsoft.com/entra/identity-platform/signing-key-rollover).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from sandbox.httpd import Request, Response, Service

GRAPH_RESOURCE = "https://graph.microsoft.com"
BC_RESOURCE = "https://api.businesscentral.dynamics.com"

# First-party application ids, so `{appId}/.default` scopes work as they do in Entra.
_RESOURCE_APP_IDS = {
    "00000003-0000-0000-c000-000000000000": GRAPH_RESOURCE,
    "996def3d-b36c-4153-8607-a6fd3c01b89f": BC_RESOURCE,
}
_KNOWN_RESOURCES = {GRAPH_RESOURCE, BC_RESOURCE}

TOKEN_LIFETIME = 3599  # seconds; what Entra answers as expires_in for app-only tokens


@dataclass
class ClientSecret:
    value: str
    expired: bool = False


@dataclass
class AppRegistration:
    """An app registration plus its service principal in one tenant, with admin-consented roles."""

    client_id: str
    display_name: str
    object_id: str  # the service principal's object id: the `oid` of app-only tokens
    secrets: list[ClientSecret] = field(default_factory=list)
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)  # resource -> application roles


@dataclass
class TenantUser:
    """A directory user who can sign in; `oid` is the same object id Graph answers for the user."""

    oid: str
    upn: str
    display_name: str
    password: str


@dataclass
class ExposedApi:
    """An app registration that exposes an API (Expose an API + App roles in the portal).

    `redirect_uris` are its *Single-page application* platform redirect URIs; `role_assignments`
    maps a user's oid to the app roles assigned to them (Enterprise applications > Users and groups).
    """

    client_id: str
    app_id_uri: str
    scopes: tuple[str, ...]
    app_roles: tuple[str, ...]
    redirect_uris: list[str] = field(default_factory=list)
    role_assignments: dict[str, set[str]] = field(default_factory=dict)


@dataclass
class SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey
    published: bool = True


@dataclass
class AuthCode:
    tenant_id: str
    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    oid: str
    nonce: str | None
    code_challenge: str
    code_challenge_method: str
    expires: float
    used: bool = False


@dataclass
class Tenant:
    tenant_id: str
    display_name: str
    domains: tuple[str, ...] = ()
    apps: dict[str, AppRegistration] = field(default_factory=dict)
    users: dict[str, TenantUser] = field(default_factory=dict)
    apis: dict[str, ExposedApi] = field(default_factory=dict)


class EntraError(Exception):
    """One refusal of the token endpoint, rendered in Entra's JSON error shape."""

    def __init__(self, status: int, error: str, code: int, description: str):
        super().__init__(f"AADSTS{code}: {description}")
        self.status = status
        self.error = error
        self.code = code
        self.description = description


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class EntraService(Service):
    name = "entra"

    def __init__(self) -> None:
        super().__init__()
        self._tenants: dict[str, Tenant] = {}
        self._signing_key = secrets.token_bytes(32)
        self._issued: dict[str, float] = {}  # token uti -> wall-clock issue time
        self._not_before = 0.0  # tokens issued before this instant are treated as expired
        self._token_lock = threading.Lock()
        self._rsa_keys: list[SigningKey] = []
        self._codes: dict[str, AuthCode] = {}
        self._refresh_tokens: dict[str, tuple[str, str, str, tuple[str, ...]]] = {}
        self.rotate_signing_key()
        t = r"(?P<tenant>[^/]+)"
        self.route(
            "GET", rf"/{t}/v2\.0/\.well-known/openid-configuration", self._openid_configuration, "discovery"
        )
        self.route("GET", rf"/{t}/discovery/v2\.0/keys", self._keys, "keys")
        self.route("POST", rf"/{t}/oauth2/v2\.0/token", self._token, "token")
        self.route("OPTIONS", rf"/{t}/oauth2/v2\.0/token", self._preflight, "token")
        self.route("GET", rf"/{t}/oauth2/v2\.0/authorize", self._authorize_form, "authorize")
        self.route("POST", rf"/{t}/oauth2/v2\.0/authorize", self._authorize_submit, "authorize")
        self.route("GET", rf"/{t}/oauth2/v2\.0/logout", self._logout, "logout")

    # Control API (tests and the demo) ---------------------------------------------------------
    def add_tenant(
        self, tenant_id: str, display_name: str = "Contoso", domains: Iterable[str] = ()
    ) -> Tenant:
        with self.lock:
            tenant = Tenant(tenant_id.lower(), display_name, tuple(d.lower() for d in domains))
            self._tenants[tenant.tenant_id] = tenant
            return tenant

    def register_app(
        self,
        tenant_id: str,
        client_id: str,
        secret: str,
        graph_roles: Iterable[str] = ("Contacts.ReadWrite", "User.Read.All"),
        bc_roles: Iterable[str] = ("API.ReadWrite.All",),
        display_name: str = "BC Contact Sync",
    ) -> AppRegistration:
        """Register an app with admin-consented application permissions; empty roles = no consent."""
        with self.lock:
            tenant = self._tenant_or_fail(tenant_id)
            app = AppRegistration(
                client_id=client_id.lower(),
                display_name=display_name,
                object_id=str(uuid.uuid4()),
                secrets=[ClientSecret(secret)],
                roles={GRAPH_RESOURCE: tuple(graph_roles), BC_RESOURCE: tuple(bc_roles)},
            )
            tenant.apps[app.client_id] = app
            return app

    def set_roles(self, tenant_id: str, client_id: str, resource: str, roles: Iterable[str]) -> None:
        with self.lock:
            self._app_or_fail(tenant_id, client_id).roles[resource] = tuple(roles)

    def add_secret(self, tenant_id: str, client_id: str, secret: str) -> None:
        with self.lock:
            self._app_or_fail(tenant_id, client_id).secrets.append(ClientSecret(secret))

    def revoke_secret(self, tenant_id: str, client_id: str, secret: str | None = None) -> None:
        """Delete one secret (or all): the old value then fails as a wrong secret (AADSTS7000215)."""
        with self.lock:
            app = self._app_or_fail(tenant_id, client_id)
            app.secrets = [s for s in app.secrets if secret is not None and s.value != secret]

    def expire_secret(self, tenant_id: str, client_id: str, secret: str | None = None) -> None:
        """Let a secret pass its end date: Entra then answers AADSTS7000222."""
        with self.lock:
            for s in self._app_or_fail(tenant_id, client_id).secrets:
                if secret is None or s.value == secret:
                    s.expired = True

    def remove_app(self, tenant_id: str, client_id: str) -> None:
        with self.lock:
            self._tenant_or_fail(tenant_id).apps.pop(client_id.lower(), None)

    def expire_all_tokens(self) -> None:
        """Every token issued so far stops validating (resources answer 401), as after expiry."""
        with self._token_lock:
            self._not_before = time.time()

    def validate(self, token: str, audience: str) -> dict[str, Any] | None:
        """Claims of a token this service issued, unexpired and for `audience`; else None."""
        parts = token.split(".")
        if len(parts) != 3:
            return None
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        expected = _b64url(hmac.new(self._signing_key, signing_input, hashlib.sha256).digest())
        if not hmac.compare_digest(expected, parts[2]):
            return None
        try:
            claims = json.loads(_b64url_decode(parts[1]))
        except ValueError:
            return None
        with self._token_lock:
            issued = self._issued.get(claims.get("uti", ""))
            not_before = self._not_before
        if issued is None or issued < not_before:
            return None
        if claims.get("exp", 0) <= time.time() or claims.get("aud") != audience:
            return None
        return claims

    # Endpoints ---------------------------------------------------------------------------------
    def _openid_configuration(self, req: Request, tenant: str) -> Response:
        found = self._find_tenant(tenant)
        if found is None:
            # Discovery of an unknown tenant: 400 invalid_tenant (seen in MSAL's
            # "OIDC Discovery endpoint rejects our request" errors, AADSTS90002).
            return self._error_response(
                req, EntraError(400, "invalid_tenant", 90002, _tenant_not_found(tenant))
            )
        tid = found.tenant_id
        base = f"{self.base_url}/{tid}"
        return Response(
            200,
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{base}/v2.0",
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
                "cloud_graph_host_name": "graph.windows.net",
                "msgraph_host": "graph.microsoft.com",
                "rbac_url": "https://pas.windows.net",
            },
            headers=_cors(req),
            content_type="application/json; charset=utf-8",
        )

    def _keys(self, req: Request, tenant: str) -> Response:
        # Only the RS256 keys of people's tokens: the HMAC-signed app-only tokens for Graph and
        # Business Central are checked by the sandbox itself and nobody else verifies them.
        return Response(200, self.jwks(), headers=_cors(req), content_type="application/json; charset=utf-8")

    def _token(self, req: Request, tenant: str) -> Response:
        try:
            return self._issue(req, tenant)
        except EntraError as exc:
            return self._error_response(req, exc)

    def _issue(self, req: Request, tenant_segment: str) -> Response:
        form = dict(parse_qsl(req.body.decode("utf-8"), keep_blank_values=True))
        with self.lock:
            tenant = self._find_tenant(tenant_segment)
            if tenant is None:
                raise EntraError(400, "invalid_request", 90002, _tenant_not_found(tenant_segment))
            grant_type = form.get("grant_type", "")
            if not grant_type:
                raise _missing("grant_type")
            if grant_type in ("authorization_code", "refresh_token"):
                return self._redeem(req, tenant, form)
            if grant_type != "client_credentials":
                raise EntraError(
                    400,
                    "unsupported_grant_type",
                    70003,
                    f"The app requested an unsupported grant type '{grant_type}'.",
                )
            client_id, secret = self._client_credentials(req, form)
            if not client_id:
                raise _missing("client_id")
            app = tenant.apps.get(client_id.lower())
            if app is None:
                raise EntraError(
                    400,
                    "unauthorized_client",
                    700016,
                    f"Application with identifier '{client_id}' was not found in the directory "
                    f"'{tenant.display_name}'. This can happen if the application has not been installed by "
                    "the administrator of the tenant or consented to by any user in the tenant. You may have "
                    "sent your authentication request to the wrong tenant.",
                )
            self._check_credential(app, form, secret)
            resource = self._resource_from_scope(form.get("scope", ""), tenant)
            roles = app.roles.get(resource, ())
        return Response(
            200,
            {
                "token_type": "Bearer",
                "expires_in": TOKEN_LIFETIME,
                "ext_expires_in": TOKEN_LIFETIME,
                "access_token": self._mint(tenant, app, resource, roles),
            },
            headers={"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"},
            content_type="application/json; charset=utf-8",
        )

    # People: users, the app's own API, signing keys (control API) ---------------------------------
    def add_user(
        self, tenant_id: str, upn: str, oid: str, display_name: str | None = None, password: str = ""
    ) -> TenantUser:
        """A directory user who can sign in with `password` (the sign-in form's only credential)."""
        with self.lock:
            tenant = self._tenant_or_fail(tenant_id)
            user = TenantUser(oid.lower(), upn, display_name or upn.split("@")[0].title(), password)
            tenant.users[user.oid] = user
            return user

    def expose_api(
        self,
        tenant_id: str,
        client_id: str,
        app_id_uri: str | None = None,
        scopes: Iterable[str] = ("access_as_user",),
        app_roles: Iterable[str] = ("ContactSync.Admin",),
        redirect_uris: Iterable[str] = (),
    ) -> ExposedApi:
        """Expose an API on an app registration (scopes, app roles, SPA redirect URIs)."""
        with self.lock:
            tenant = self._tenant_or_fail(tenant_id)
            api = ExposedApi(
                client_id.lower(),
                app_id_uri or f"api://{client_id.lower()}",
                tuple(scopes),
                tuple(app_roles),
                list(redirect_uris),
            )
            tenant.apis[api.client_id] = api
            return api

    def add_redirect_uri(self, tenant_id: str, client_id: str, uri: str) -> None:
        with self.lock:
            self._api_or_fail(tenant_id, client_id).redirect_uris.append(uri)

    def assign_app_role(self, tenant_id: str, client_id: str, oid: str, role: str) -> None:
        """Assign an app role to a user; it appears in `roles` of tokens issued from now on."""
        with self.lock:
            api = self._api_or_fail(tenant_id, client_id)
            if role not in api.app_roles:
                raise KeyError(f"app role {role!r} is not defined on {client_id}")
            api.role_assignments.setdefault(oid.lower(), set()).add(role)

    def rotate_signing_key(self) -> str:
        """A new key signs from now on; the previous keys stay published (Entra's rollover)."""
        key = SigningKey(_b64url(secrets.token_bytes(20)), rsa.generate_private_key(65537, 2048))
        with self._token_lock:
            self._rsa_keys.append(key)
        return key.kid

    def retire_signing_key(self, kid: str) -> None:
        """Stop publishing a key: tokens it signed no longer verify against `jwks_uri`."""
        with self._token_lock:
            for k in self._rsa_keys:
                if k.kid == kid:
                    k.published = False

    @property
    def active_kid(self) -> str:
        with self._token_lock:
            return self._rsa_keys[-1].kid

    def mint_user_token(
        self,
        tenant_id: str,
        client_id: str,
        oid: str,
        *,
        scopes: Iterable[str] = ("access_as_user",),
        roles: Iterable[str] | None = None,
        lifetime: int = TOKEN_LIFETIME,
        audience: str | None = None,
        issuer: str | None = None,
        unpublished_key: bool = False,
    ) -> str:
        """A v2 access token for a signed-in user, as the token endpoint would issue it.

        For tests of the product's validation: the keyword arguments make the token expired,
        for another audience or issuer, or signed by a key that `jwks_uri` does not publish.
        """
        with self.lock:
            tenant = self._tenant_or_fail(tenant_id)
            api = self._api_or_fail(tenant_id, client_id)
            user = tenant.users[oid.lower()]
            if roles is None:
                roles = sorted(api.role_assignments.get(user.oid, ()))
        claims = self._user_claims(tenant, api, user, tuple(scopes), tuple(roles), lifetime)
        if audience is not None:
            claims["aud"] = audience
        if issuer is not None:
            claims["iss"] = issuer
        key = (
            SigningKey("unpublished", rsa.generate_private_key(65537, 2048), False)
            if unpublished_key
            else None
        )
        return self._sign_rs256(claims, key)

    def jwks(self) -> dict[str, Any]:
        """The published signing keys, in the JWK set shape of Entra's `jwks_uri`."""
        with self._token_lock:
            keys = [k for k in self._rsa_keys if k.published]
        out = []
        for k in keys:
            numbers = k.private_key.public_key().public_numbers()
            out.append(
                {
                    "kty": "RSA",
                    "use": "sig",
                    "kid": k.kid,
                    "x5t": k.kid,
                    "n": _b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
                    "e": _b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
                }
            )
        return {"keys": out}

    # People: endpoints ----------------------------------------------------------------------------
    def _preflight(self, req: Request, tenant: str) -> Response:
        return Response(204, b"", headers=_cors(req, preflight=True))

    def _logout(self, req: Request, tenant: str) -> Response:
        target = req.query.get("post_logout_redirect_uri")
        if target:
            return Response(302, b"", headers={"Location": target})
        return Response(200, "<p>You signed out.</p>", content_type="text/html; charset=utf-8")

    def _authorize_check(self, tenant_segment: str, params: dict[str, str]) -> tuple[Tenant, ExposedApi]:
        """What Entra checks before it shows a sign-in page; failures are shown, never redirected."""
        with self.lock:
            tenant = self._find_tenant(tenant_segment)
            if tenant is None:
                raise EntraError(400, "invalid_tenant", 90002, _tenant_not_found(tenant_segment))
            client_id = params.get("client_id", "")
            if not client_id:
                raise EntraError(
                    400,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'client_id'.",
                )
            api = tenant.apis.get(client_id.lower())
            if api is None:
                raise EntraError(
                    400,
                    "unauthorized_client",
                    700016,
                    f"Application with identifier '{client_id}' was not found in the directory "
                    f"'{tenant.display_name}'.",
                )
            redirect = params.get("redirect_uri", "")
            if redirect not in api.redirect_uris:
                raise EntraError(
                    400,
                    "invalid_request",
                    50011,
                    f"The redirect URI '{redirect}' specified in the request does not match the redirect "
                    f"URIs configured for the application '{api.client_id}'.",
                )
            if params.get("response_type") != "code":
                raise EntraError(
                    400,
                    "unsupported_response_type",
                    700054,
                    "response_type 'id_token' is not enabled for the application.",
                )
            return tenant, api

    def _authorize_form(self, req: Request, tenant: str) -> Response:
        try:
            self._authorize_check(tenant, req.query)
        except EntraError as exc:
            return _error_page(exc)
        return _sign_in_page(req.query, req.query.get("login_hint", ""), "")

    def _authorize_submit(self, req: Request, tenant: str) -> Response:
        tenant_segment = tenant
        form = dict(parse_qsl(req.body.decode("utf-8"), keep_blank_values=True))
        try:
            found, api = self._authorize_check(tenant_segment, form)
        except EntraError as exc:
            return _error_page(exc)
        username = form.pop("username", "").strip().lower()
        password = form.pop("password", "")
        with self.lock:
            user = next((u for u in found.users.values() if u.upn.lower() == username), None)
        if user is None or not hmac.compare_digest(user.password.encode(), password.encode()):
            # AADSTS50126: "Error validating credentials due to invalid username or password."
            message = "Your account or password is incorrect. (AADSTS50126)"
            return _sign_in_page(form, username, message)
        scopes = tuple(form.get("scope", "").split())
        reply: dict[str, str] = {}
        challenge = form.get("code_challenge", "")
        method = form.get("code_challenge_method", "plain" if challenge else "")
        if challenge and method not in ("S256", "plain"):
            reply = {
                "error": "invalid_request",
                "error_description": "AADSTS501491: Invalid code challenge method.",
            }
        else:
            code = _b64url(secrets.token_bytes(32))
            with self.lock:
                self._codes[code] = AuthCode(
                    found.tenant_id,
                    api.client_id,
                    form["redirect_uri"],
                    scopes,
                    user.oid,
                    form.get("nonce"),
                    challenge,
                    method,
                    time.time() + 600,  # codes live about ten minutes
                )
            reply = {"code": code, "client_info": _client_info(user, found)}
        if form.get("state"):
            reply["state"] = form["state"]
        mode = form.get("response_mode", "query")
        separator = "#" if mode == "fragment" else ("&" if "?" in form["redirect_uri"] else "?")
        return Response(302, b"", headers={"Location": form["redirect_uri"] + separator + urlencode(reply)})

    def _redeem(self, req: Request, tenant: Tenant, form: dict[str, str]) -> Response:
        """authorization_code (with PKCE) and refresh_token grants of a public (SPA) client."""
        client_id = form.get("client_id", "").lower()
        if not client_id:
            raise _missing("client_id")
        api = tenant.apis.get(client_id)
        if api is None:
            raise EntraError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory '{tenant.display_name}'.",
            )
        if not req.headers.get("Origin"):
            raise EntraError(
                400,
                "invalid_request",
                9002327,
                "Tokens issued for the 'Single-Page Application' client-type may only be redeemed via "
                "cross-origin requests.",
            )
        if form["grant_type"] == "refresh_token":
            entry = self._refresh_tokens.get(form.get("refresh_token", ""))
            if entry is None or entry[1] != client_id:
                raise EntraError(
                    400, "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid."
                )
            _, _, oid, scopes = entry
            nonce = None
        else:
            code = self._codes.get(form.get("code", ""))
            if code is None or code.used or code.expires < time.time() or code.client_id != client_id:
                raise EntraError(
                    400,
                    "invalid_grant",
                    70008,
                    "The provided authorization code or refresh token has expired due to inactivity. Send "
                    "a new interactive authorization request for this user and resource.",
                )
            code.used = True  # a code is redeemable once
            if form.get("redirect_uri") != code.redirect_uri:
                raise EntraError(
                    400,
                    "invalid_grant",
                    50148,
                    "The redirect URI specified in the request does not match the redirect URI used to "
                    "obtain the authorization code.",
                )
            verifier = form.get("code_verifier", "")
            if not code.code_challenge:
                raise EntraError(
                    400,
                    "invalid_request",
                    9002325,
                    "Proof Key for Code Exchange is required for cross-origin authorization code redemption.",
                )
            if not verifier:
                raise _missing("code_verifier")
            expected = (
                _b64url(hashlib.sha256(verifier.encode("ascii")).digest())
                if code.code_challenge_method == "S256"
                else verifier
            )
            if not hmac.compare_digest(expected, code.code_challenge):
                raise EntraError(
                    400,
                    "invalid_grant",
                    501481,
                    "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
                )
            oid, scopes, nonce = code.oid, code.scopes, code.nonce
        user = tenant.users[oid]
        api_scopes = [
            s.split("/")[-1]
            for s in scopes
            # A scope names its resource by Application ID URI or by client id (both identify the app).
            if s.startswith((api.app_id_uri + "/", f"api://{api.client_id}/", f"{api.client_id}/"))
        ]
        unknown = [s for s in api_scopes if s not in api.scopes]
        if unknown:
            raise EntraError(
                400,
                "invalid_scope",
                65005,
                f"The application '{api.client_id}' asked for scope '{unknown[0]}' that doesn't exist on the resource.",
            )
        roles = tuple(sorted(api.role_assignments.get(user.oid, ())))
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": " ".join(f"{api.app_id_uri}/{s}" for s in api_scopes) or "openid profile",
            "expires_in": TOKEN_LIFETIME,
            "ext_expires_in": TOKEN_LIFETIME,
            "client_info": _client_info(user, tenant),
        }
        if api_scopes:
            body["access_token"] = self._sign_rs256(
                self._user_claims(tenant, api, user, tuple(api_scopes), roles, TOKEN_LIFETIME)
            )
        if "openid" in scopes:
            now = int(time.time())
            id_claims: dict[str, Any] = {
                "aud": api.client_id,
                "iss": f"{self.base_url}/{tenant.tenant_id}/v2.0",
                "iat": now,
                "nbf": now,
                "exp": now + TOKEN_LIFETIME,
                "name": user.display_name,
                "oid": user.oid,
                "preferred_username": user.upn,
                "sub": _b64url(hashlib.sha256(f"{user.oid}:{api.client_id}".encode()).digest()),
                "tid": tenant.tenant_id,
                "ver": "2.0",
            }
            if roles:
                id_claims["roles"] = list(roles)
            if nonce:
                id_claims["nonce"] = nonce
            body["id_token"] = self._sign_rs256(id_claims)
        if "offline_access" in scopes or form["grant_type"] == "refresh_token":
            refresh = _b64url(secrets.token_bytes(32))
            self._refresh_tokens[refresh] = (tenant.tenant_id, client_id, user.oid, scopes)
            body["refresh_token"] = refresh
            body["refresh_token_expires_in"] = 86400  # SPA refresh tokens live 24 hours
        return Response(
            200,
            body,
            headers={"Cache-Control": "no-store, no-cache", "Pragma": "no-cache", **_cors(req)},
            content_type="application/json; charset=utf-8",
        )

    def _user_claims(
        self,
        tenant: Tenant,
        api: ExposedApi,
        user: TenantUser,
        scopes: tuple[str, ...],
        roles: tuple[str, ...],
        lifetime: int,
    ) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": api.client_id,  # v2.0 access tokens: always the API's client id
            "iss": f"{self.base_url}/{tenant.tenant_id}/v2.0",
            "iat": now - 300,
            "nbf": now - 300,
            "exp": now + lifetime,
            "aio": _b64url(secrets.token_bytes(12)),
            "azp": api.client_id,  # the page is the same app registration as the API
            "azpacr": "0",  # a public client
            "name": user.display_name,
            "oid": user.oid,
            "preferred_username": user.upn,
            "rh": "0.A" + _b64url(secrets.token_bytes(12)),
            "sub": _b64url(hashlib.sha256(f"{user.oid}:{api.client_id}".encode()).digest()),
            "tid": tenant.tenant_id,
            "uti": _b64url(secrets.token_bytes(16)),
            "ver": "2.0",
        }
        if scopes:
            claims["scp"] = " ".join(scopes)
        if roles:
            claims["roles"] = list(roles)
        return claims

    def _sign_rs256(self, claims: dict[str, Any], key: SigningKey | None = None) -> str:
        if key is None:
            with self._token_lock:
                key = self._rsa_keys[-1]
        header = {"typ": "JWT", "alg": "RS256", "kid": key.kid, "x5t": key.kid}
        signing_input = (
            f"{_b64url(json.dumps(header, separators=(',', ':')).encode())}."
            f"{_b64url(json.dumps(claims, separators=(',', ':')).encode())}"
        )
        signature = key.private_key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def _api_or_fail(self, tenant_id: str, client_id: str) -> ExposedApi:
        api = self._tenant_or_fail(tenant_id).apis.get(client_id.lower())
        if api is None:
            raise KeyError(f"app {client_id!r} exposes no API in tenant {tenant_id!r}; call expose_api()")
        return api

    # Helpers -----------------------------------------------------------------------------------
    @staticmethod
    def _client_credentials(req: Request, form: dict[str, str]) -> tuple[str, str | None]:
        """client_secret_post (what MSAL sends) or client_secret_basic."""
        auth = req.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(auth[6:]).decode("utf-8").partition(":")
                return unquote_plus(user), unquote_plus(password)
            except ValueError:
                pass
        return form.get("client_id", ""), form.get("client_secret")

    @staticmethod
    def _check_credential(app: AppRegistration, form: dict[str, str], secret: str | None) -> None:
        if form.get("client_assertion"):
            # No certificates or federated credentials are registered in the sandbox.
            raise EntraError(
                401,
                "invalid_client",
                700027,
                "The certificate with identifier used to sign the client assertion is not registered on "
                f"application. [Reason - The key was not found.] Client app ID: {app.client_id}.",
            )
        if not secret:
            raise EntraError(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: "
                "'client_assertion' or 'client_secret'.",
            )
        match = next((s for s in app.secrets if hmac.compare_digest(s.value, secret)), None)
        if match is None:
            raise EntraError(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client "
                f"secret value, not the client secret ID, for a secret added to app '{app.client_id}'.",
            )
        if match.expired:
            raise EntraError(
                401,
                "invalid_client",
                7000222,
                f"The provided client secret keys for app '{app.client_id}' are expired. Visit the Azure "
                "portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using "
                "certificate credentials for added security: https://aka.ms/certCreds.",
            )

    @staticmethod
    def _resource_from_scope(scope: str, tenant: Tenant) -> str:
        """Client credentials take exactly one resource's `/.default` (AADSTS1002012, 28000, 500011)."""
        scopes = scope.split()
        if not scopes:
            raise _missing("scope")
        resources = []
        for s in scopes:
            if not s.endswith("/.default"):
                raise EntraError(
                    400,
                    "invalid_scope",
                    1002012,
                    f"The provided value for scope {s} is not valid. Client credential flows must have a "
                    "scope value with /.default suffixed to the resource identifier (application ID URI).",
                )
            resources.append(s[: -len("/.default")].rstrip("/"))
        if len({r.lower() for r in resources}) > 1:
            raise EntraError(
                400,
                "invalid_scope",
                28000,
                "Provided value for the input parameter scope is not valid because it contains more than one "
                f"resource. Scope {scope} is not valid.",
            )
        resource = _RESOURCE_APP_IDS.get(resources[0].lower(), resources[0].lower())
        if resource not in _KNOWN_RESOURCES:
            raise EntraError(
                400,
                "invalid_resource",
                500011,
                f"The resource principal named {resources[0]} was not found in the tenant named "
                f"{tenant.display_name}. This can happen if the application has not been installed by the "
                "administrator of the tenant or consented to by any user in the tenant. You might have sent "
                "your authentication request to the wrong tenant.",
            )
        return resource

    def _mint(self, tenant: Tenant, app: AppRegistration, resource: str, roles: tuple[str, ...]) -> str:
        now = time.time()
        uti = _b64url(secrets.token_bytes(16))
        issuer = f"https://sts.windows.net/{tenant.tenant_id}/"
        # Entra backdates iat/nbf by five minutes to absorb clock skew.
        claims: dict[str, Any] = {
            "aud": resource,
            "iss": issuer,
            "iat": int(now) - 300,
            "nbf": int(now) - 300,
            "exp": int(now) + TOKEN_LIFETIME,
            "app_displayname": app.display_name,
            "appid": app.client_id,
            "appidacr": "1",
            "idp": issuer,
            "idtyp": "app",
            "oid": app.object_id,
            "sub": app.object_id,
            "tid": tenant.tenant_id,
            "uti": uti,
            "ver": "1.0",
        }
        if roles:  # app-only tokens carry no roles claim at all when nothing is consented
            claims["roles"] = list(roles)
        header = {"typ": "JWT", "alg": "HS256", "kid": "sandbox"}
        signing_input = (
            f"{_b64url(json.dumps(header, separators=(',', ':')).encode())}."
            f"{_b64url(json.dumps(claims, separators=(',', ':')).encode())}"
        )
        signature = _b64url(
            hmac.new(self._signing_key, signing_input.encode("ascii"), hashlib.sha256).digest()
        )
        with self._token_lock:
            self._issued[uti] = now
        return f"{signing_input}.{signature}"

    def _error_response(self, req: Request, exc: EntraError) -> Response:
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        trace_id = str(uuid.uuid4())
        # Entra echoes the client's client-request-id (MSAL sends one) as the correlation id.
        correlation_id = req.headers.get("client-request-id") or str(uuid.uuid4())
        body = {
            "error": exc.error,
            "error_description": (
                f"AADSTS{exc.code}: {exc.description}\r\nTrace ID: {trace_id}\r\n"
                f"Correlation ID: {correlation_id}\r\nTimestamp: {now}"
            ),
            "error_codes": [exc.code],
            "timestamp": now,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"{self.base_url}/error?code={exc.code}",
        }
        return Response(exc.status, body, headers=_cors(req), content_type="application/json; charset=utf-8")

    def _find_tenant(self, segment: str) -> Tenant | None:
        key = segment.lower()
        if key in self._tenants:
            return self._tenants[key]
        return next((t for t in self._tenants.values() if key in t.domains), None)

    def _tenant_or_fail(self, tenant_id: str) -> Tenant:
        tenant = self._find_tenant(tenant_id)
        if tenant is None:
            raise KeyError(f"unknown sandbox tenant {tenant_id!r}; call add_tenant() first")
        return tenant

    def _app_or_fail(self, tenant_id: str, client_id: str) -> AppRegistration:
        app = self._tenant_or_fail(tenant_id).apps.get(client_id.lower())
        if app is None:
            raise KeyError(f"app {client_id!r} is not registered in tenant {tenant_id!r}")
        return app


def _tenant_not_found(tenant: str) -> str:
    return (
        f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing "
        "into the correct cloud. Check with your subscription administrator, this may happen if there are no "
        "active subscriptions for the tenant."
    )


def _missing(parameter: str) -> EntraError:
    return EntraError(
        400,
        "invalid_request",
        900144,
        f"The request body must contain the following parameter: '{parameter}'.",
    )


def _cors(req: Request, preflight: bool = False) -> dict[str, str]:
    """Entra answers browsers cross-origin on discovery, keys and (for SPA clients) the token endpoint."""
    headers = {"Access-Control-Allow-Origin": req.headers.get("Origin") or "*"}
    if preflight:
        headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        headers["Access-Control-Allow-Headers"] = req.headers.get("Access-Control-Request-Headers") or "*"
        headers["Access-Control-Max-Age"] = "86400"
    return headers


def _client_info(user: TenantUser, tenant: Tenant) -> str:
    """`client_info` (asked for with client_info=1): the home account's uid and utid, base64url JSON."""
    return _b64url(json.dumps({"uid": user.oid, "utid": tenant.tenant_id}).encode())


def _error_page(exc: EntraError) -> Response:
    """Entra shows authorize errors on its own page (it never redirects to an unverified URI)."""
    body = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Sign in</title></head><body>"
        f"<h1>Sorry, but we're having trouble signing you in.</h1><p id='error'>AADSTS{exc.code}: "
        f"{escape(exc.description)}</p></body></html>"
    )
    return Response(exc.status, body, content_type="text/html; charset=utf-8")


def _sign_in_page(params: dict[str, str], username: str, message: str) -> Response:
    """The sandbox's sign-in form: the authorize request's parameters ride along as hidden fields."""
    hidden = "".join(
        f"<input type='hidden' name='{escape(k)}' value='{escape(v)}'>"
        for k, v in params.items()
        if k not in ("username", "password")
    )
    error = f"<p id='error' role='alert'>{escape(message)}</p>" if message else ""
    body = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Sign in to your account</title>
<style>body{{font-family:system-ui,sans-serif;max-width:22rem;margin:3rem auto;padding:0 1rem}}
label,input,button{{display:block;width:100%;margin:.3rem 0;font-size:1rem}}input{{padding:.4rem}}
button{{padding:.5rem;background:#0067b8;color:#fff;border:0}}#error{{color:#a4262c}}</style></head>
<body><main><h1>Sign in</h1><p>Sandbox Entra ID: sign in as one of the tenant's test users.</p>{error}
<form method="post"><label for="username">Email</label>
<input id="username" name="username" type="email" autocomplete="username" required value="{escape(username)}">
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
{hidden}<button type="submit" id="sign-in">Sign in</button></form></main></body></html>"""
    return Response(200, body, content_type="text/html; charset=utf-8")
