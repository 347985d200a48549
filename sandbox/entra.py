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

Tokens are JWT-shaped v1.0 access tokens (Graph and Business Central both take v1 tokens) signed
with an HMAC key held here. Clients never verify them; the resource simulators call `validate()`.
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
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

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
class Tenant:
    tenant_id: str
    display_name: str
    domains: tuple[str, ...] = ()
    apps: dict[str, AppRegistration] = field(default_factory=dict)


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
        t = r"(?P<tenant>[^/]+)"
        self.route(
            "GET", rf"/{t}/v2\.0/\.well-known/openid-configuration", self._openid_configuration, "discovery"
        )
        self.route("GET", rf"/{t}/discovery/v2\.0/keys", self._keys, "keys")
        self.route("POST", rf"/{t}/oauth2/v2\.0/token", self._token, "token")

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
            content_type="application/json; charset=utf-8",
        )

    def _keys(self, req: Request, tenant: str) -> Response:
        # Tokens are HMAC-signed here and nobody outside the sandbox verifies them.
        return Response(200, {"keys": []}, content_type="application/json; charset=utf-8")

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
        return Response(exc.status, body, content_type="application/json; charset=utf-8")

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
