"""Tokens for Business Central and Graph through MSAL's client-credentials flow.

One `ConfidentialClientApplication` per process (MSAL's token cache lives in it, so a new instance
per run would fetch a new token every run and hit Entra's limits). The secretless alternative uses
the function app's user-assigned managed identity as a federated credential: MSAL's own
`ManagedIdentityClient` fetches the assertion, so no extra package is needed.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import msal
import requests

from shared.config import Config

if TYPE_CHECKING:
    from azure.core.credentials import AccessToken

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
BC_SCOPE = "https://api.businesscentral.dynamics.com/.default"
# The audience Entra expects for a managed identity token used as a federated client assertion.
_FIC_AUDIENCE = "api://AzureADTokenExchange"
# Authority hosts MSAL knows; for any other host (the sandbox) instance discovery must be off, since
# MSAL would otherwise ask Microsoft's cloud whether the host is a valid authority.
_KNOWN_AUTHORITY_HOSTS = {
    "login.microsoftonline.com",
    "login.microsoftonline.us",
    "login.chinacloudapi.cn",
    "login.partner.microsoftonline.cn",
    "login.microsoftonline.de",
    "login.windows.net",
    "login.microsoft.com",
    "sts.windows.net",
}


class AuthError(RuntimeError):
    """A token could not be obtained. The message is actionable and carries no secret."""

    def __init__(self, scope: str, error: str, description: str):
        hint = ""
        if error == "invalid_client":
            hint = " Check SYNC_CLIENT_ID and the client secret (expired or wrong value?)."
        elif error in ("invalid_scope", "unauthorized_client"):
            hint = " Check that the app registration exists in this tenant and has admin consent."
        elif error == "invalid_request" and "90002" in description:
            hint = " Check SYNC_TENANT_ID."
        super().__init__(
            f"Could not get a token for {scope}: {error}: {description}.{hint}".replace("..", ".")
        )
        self.scope = scope
        self.error = error


class TokenProvider:
    def __init__(self, config: Config, http_client: requests.Session | None = None):
        self._config = config
        credential: object
        if config.client_secret:
            credential = config.client_secret
        else:
            mi = msal.ManagedIdentityClient(
                msal.UserAssignedManagedIdentity(client_id=config.managed_identity_client_id),
                http_client=http_client or requests.Session(),
            )

            def assertion() -> str:
                result = mi.acquire_token_for_client(resource=_FIC_AUDIENCE)
                if "access_token" not in result:
                    raise AuthError(
                        _FIC_AUDIENCE, result.get("error", "error"), result.get("error_description", "")
                    )
                token: str = result["access_token"]
                return token

            credential = {"client_assertion": assertion}
        host = urlsplit(config.authority_host).hostname or ""
        self._app = msal.ConfidentialClientApplication(
            config.client_id,
            authority=config.authority,
            client_credential=credential,
            instance_discovery=host in _KNOWN_AUTHORITY_HOSTS,
            http_client=http_client,
        )
        self._lock = threading.Lock()

    def token(self, scope: str) -> str:
        # MSAL serves from its cache until the token nears expiry (and refreshes proactively).
        with self._lock:
            result = self._app.acquire_token_for_client(scopes=[scope])
        if "access_token" not in result:
            raise AuthError(
                scope, result.get("error", "error"), result.get("error_description", "no description")
            )
        token: str = result["access_token"]
        return token

    def invalidate(self) -> None:
        """Drop cached tokens, e.g. after a 401 on a token the cache still thought valid."""
        with self._lock:
            self._app.remove_tokens_for_client()


_providers: dict[tuple[str, str], TokenProvider] = {}
_providers_lock = threading.Lock()


def token_provider(config: Config) -> TokenProvider:
    """The process-wide provider for this authority and client (one MSAL app per process)."""
    key = (config.authority, config.client_id)
    with _providers_lock:
        if key not in _providers:
            _providers[key] = TokenProvider(config)
        return _providers[key]


class ManagedIdentityCredential:
    """An azure-core `TokenCredential` over MSAL's managed identity client.

    Lets `azure-data-tables` and `azure-storage-queue` use the function app's user-assigned identity
    (storage accounts with shared-key access disabled) without adding azure-identity.
    """

    def __init__(self, client_id: str | None):
        identity = (
            msal.UserAssignedManagedIdentity(client_id=client_id)
            if client_id
            else msal.SystemAssignedManagedIdentity()
        )
        self._client = msal.ManagedIdentityClient(identity, http_client=requests.Session())

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        from azure.core.credentials import AccessToken

        resource = scopes[0].removesuffix("/.default") if scopes else "https://storage.azure.com"
        result = self._client.acquire_token_for_client(resource=resource)
        if "access_token" not in result:
            raise AuthError(resource, result.get("error", "error"), result.get("error_description", ""))
        import time as _time

        return AccessToken(result["access_token"], int(_time.time()) + int(result.get("expires_in", 3600)))
