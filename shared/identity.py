"""Who is calling: Entra ID access tokens for this app's own API, validated in code (BEHAVIOUR §7.7).

People sign in to the self-service page and call the API with a v2.0 access token issued for this
app: the delegated scope `access_as_user`, plus the app role `ContactSync.Admin` for admins. The token
is checked with PyJWT (no hand-written crypto): RS256 against the tenant's signing keys from the
OpenID configuration's `jwks_uri`, issuer `{SYNC_AUTHORITY_HOST}/{SYNC_TENANT_ID}/v2.0`, audience
`SYNC_API_AUDIENCE`, `exp`/`nbf` with a minute of skew, and the scope or the role
(learn.microsoft.com/entra/identity-platform/claims-validation). A person is their `oid`, never
their `preferred_username`, which can change.

Signing keys roll over at any time, so the key set is cached and fetched again when a token names a
`kid` the cache does not hold (learn.microsoft.com/entra/identity-platform/signing-key-rollover); a
refetch happens at most once per `refresh_interval` so forged `kid`s cannot make us hammer Entra.
Nothing from a token ever reaches an error message, a log or a report.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
import requests

log = logging.getLogger(__name__)

SCOPE = "access_as_user"
ADMIN_ROLE = "ContactSync.Admin"
LEEWAY_SECONDS = 60
HTTP_TIMEOUT = 10


class AuthError(Exception):
    """A refused request: 401 (no or unusable token) or 403 (valid token, not allowed)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Principal:
    """The caller of a token-protected route: a person (`oid`) or an admin app."""

    oid: str
    name: str = ""
    username: str = ""  # preferred_username: shown, never used to decide anything
    scopes: frozenset[str] = field(default_factory=frozenset)
    roles: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles


class KeySet:
    """The tenant's published signing keys, fetched through the OpenID configuration and cached."""

    def __init__(self, authority_host: str, tenant_id: str, refresh_interval: float = 30.0) -> None:
        self.discovery_url = f"{authority_host.rstrip('/')}/{tenant_id}/v2.0/.well-known/openid-configuration"
        self.refresh_interval = refresh_interval
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()

    def key(self, kid: str) -> jwt.PyJWK | None:
        with self._lock:
            if kid not in self._keys and time.monotonic() - self._fetched_at >= self.refresh_interval:
                self._refresh()
            return self._keys.get(kid)

    def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            config = requests.get(self.discovery_url, timeout=HTTP_TIMEOUT)
            config.raise_for_status()
            jwks = requests.get(config.json()["jwks_uri"], timeout=HTTP_TIMEOUT)
            jwks.raise_for_status()
            keys = {}
            for data in jwks.json().get("keys", []):
                if data.get("kty") == "RSA" and data.get("kid"):
                    keys[data["kid"]] = jwt.PyJWK(data, algorithm="RS256")
        except (requests.RequestException, ValueError, KeyError, jwt.PyJWTError) as exc:
            log.error("could not read the tenant's signing keys: %s", type(exc).__name__)
            raise AuthError(
                503, "SigningKeysUnavailable", "the sign-in service's keys could not be read; try again"
            ) from None
        self._keys = keys


class TokenValidator:
    """Turns an `Authorization: Bearer …` header into a `Principal`, or raises `AuthError`."""

    def __init__(
        self,
        authority_host: str,
        tenant_id: str,
        audience: str,
        refresh_interval: float = 30.0,
        client_id: str | None = None,
    ):
        self.issuer = f"{authority_host.rstrip('/')}/{tenant_id}/v2.0"
        # v2.0 access tokens always carry the API's client id as `aud`, whatever the Application ID URI;
        # SYNC_API_AUDIENCE may name either, and both mean this app.
        self.audience = sorted({audience, client_id or audience})
        self.keys = KeySet(authority_host, tenant_id, refresh_interval)

    def principal(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthError(
                401, "Unauthorized", "sign in: this route needs an Entra ID access token (Bearer)"
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "Unauthorized", "the Authorization header must be 'Bearer <access token>'")
        claims = self.claims(token.strip())
        scopes = frozenset(str(claims.get("scp", "")).split())
        roles = frozenset(r for r in claims.get("roles", []) if isinstance(r, str))
        if SCOPE not in scopes and ADMIN_ROLE not in roles:
            raise AuthError(
                403,
                "Forbidden",
                f"the token carries neither the scope {SCOPE} nor the app role {ADMIN_ROLE}",
            )
        oid = claims.get("oid")
        if not isinstance(oid, str) or not oid:
            raise AuthError(401, "InvalidToken", "the access token names no object id (oid)")
        return Principal(
            oid=oid.lower(),
            name=str(claims.get("name", "")),
            username=str(claims.get("preferred_username", "")),
            scopes=scopes,
            roles=roles,
        )

    def claims(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError(401, "InvalidToken", "the access token is not a JWT") from None
        if header.get("alg") != "RS256":
            raise AuthError(401, "InvalidToken", "the access token must be signed with RS256")
        key = self.keys.key(str(header.get("kid", "")))
        if key is None:
            raise AuthError(
                401, "InvalidToken", "the access token is signed with a key the tenant does not publish"
            )
        try:
            return jwt.decode(
                token,
                key=key,
                algorithms=["RS256"],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "nbf", "iss", "aud", "oid", "tid"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "InvalidToken", "the access token has expired; sign in again") from None
        except jwt.ImmatureSignatureError:
            raise AuthError(401, "InvalidToken", "the access token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise AuthError(
                401, "InvalidToken", "the access token was issued for another application"
            ) from None
        except jwt.InvalidIssuerError:
            raise AuthError(
                401, "InvalidToken", "the access token was issued by another tenant or authority"
            ) from None
        except jwt.InvalidSignatureError:
            raise AuthError(401, "InvalidToken", "the access token's signature is not valid") from None
        except jwt.PyJWTError:
            raise AuthError(401, "InvalidToken", "the access token is not valid") from None
