"""App settings (BEHAVIOUR §6), read and validated once, with errors that name the setting.

Every setting the code reads is declared in `SETTINGS` below; the infrastructure tests check that
Bicep sets exactly these, so adding a setting here without adding it to the deployment fails CI.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})+$")
_ENV_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,29}$")
_TABLE_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,49}$")
# NCRONTAB as the Functions host reads it: six fields (seconds first).
_NCRONTAB = re.compile(r"^\S+(\s+\S+){5}$")


@dataclass(frozen=True)
class Setting:
    name: str
    required: bool
    default: str | None
    description: str


SETTINGS: tuple[Setting, ...] = (
    Setting("SYNC_TENANT_ID", True, None, "Entra tenant id (GUID) or primary domain of the customer"),
    Setting("SYNC_CLIENT_ID", True, None, "Application (client) id of the app registration"),
    Setting("SYNC_CLIENT_SECRET", False, None, "Client secret (a Key Vault reference in Azure)"),
    Setting(
        "SYNC_MANAGED_IDENTITY_CLIENT_ID",
        False,
        None,
        "Secretless alternative: client id of the user-assigned managed identity that is a federated "
        "credential of the app registration (used when SYNC_CLIENT_SECRET is not set)",
    ),
    Setting("SYNC_AUTHORITY_HOST", False, "https://login.microsoftonline.com", "Entra authority host"),
    Setting("BC_API_BASE_URL", False, "https://api.businesscentral.dynamics.com/v2.0", "BC API base URL"),
    Setting("BC_ENVIRONMENT", True, None, "Business Central environment name, e.g. production"),
    Setting("BC_COMPANY_ID", True, None, "Default BC company id (GUID) for users without companyId"),
    Setting("GRAPH_BASE_URL", False, "https://graph.microsoft.com/v1.0", "Microsoft Graph base URL"),
    Setting("AzureWebJobsStorage", False, None, "Storage connection string (local/Azurite)"),
    Setting("AzureWebJobsStorage__tableServiceUri", False, None, "Identity-based Table endpoint"),
    Setting("AzureWebJobsStorage__queueServiceUri", False, None, "Identity-based Queue endpoint"),
    Setting("AzureWebJobsStorage__clientId", False, None, "Client id of the identity used for Storage"),
    Setting("SYNC_TABLE_PREFIX", False, "ContactSync", "Prefix of the Table Storage tables"),
    Setting("SYNC_SCHEDULE", False, "0 */15 * * * *", "NCRONTAB schedule of the timer"),
    Setting(
        "SYNC_CHANGE_POLL_SCHEDULE",
        False,
        "0 * * * * *",
        "NCRONTAB schedule of the change poll: one BC request per company asking whether any contact "
        "changed (turn it off with AzureWebJobs.function_change_poll.Disabled=true)",
    ),
    Setting(
        "SYNC_PUBLIC_URL",
        False,
        None,
        "The function app's public https address (https://<app>.azurewebsites.net), which Graph and Business "
        "Central must be able to reach: where they send change notifications (BEHAVIOUR §8.2, §8.3); unset, no "
        "subscriptions are made, the schedule and the change poll do the job",
    ),
    Setting(
        "SYNC_BC_WEBHOOKS",
        False,
        "true",
        "true: subscribe to Business Central contact webhooks where the tenant offers them (the change poll "
        "skips those companies); false: always poll",
    ),
    Setting("SYNC_INLINE_BUDGET_SECONDS", False, "90", "How long POST /api/sync waits before answering 202"),
    Setting(
        "SYNC_FULL_SYNC_HOURS", False, "24", "Hours between automatic full reconciles per user (0 = never)"
    ),
    Setting(
        "SYNC_POLL_TOKEN_KEY",
        False,
        None,
        "Key of the poll tokens in 202 Location URLs, at least 32 characters (a Key Vault reference); "
        "when not set the app creates one and keeps it in its Table Storage",
    ),
    Setting(
        "SYNC_API_AUDIENCE",
        False,
        None,
        "Audience of the access tokens people sign in with: the app's client id (what v2.0 tokens carry; "
        "the default) or its Application ID URI",
    ),
    Setting(
        "SYNC_NOTIFY_DEBOUNCE_SECONDS",
        False,
        "5",
        "Seconds a change notification's run waits so a burst of notifications becomes one run (0-60)",
    ),
    Setting(
        "SYNC_SAFETY_NET_MINUTES",
        False,
        "60",
        "With a live subscription, the scheduled run of a user happens only this often (15-1440): "
        "notifications and the change poll bring edits, this run brings BC deletions",
    ),
)

SETTING_NAMES = tuple(s.name for s in SETTINGS)


class ConfigError(ValueError):
    """A missing or malformed setting. The message names it and never contains its value."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"App setting {name} {problem}")
        self.setting = name


def _https_url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(name, "must be an https:// URL without query or fragment")
    return value.rstrip("/")


@dataclass(frozen=True)
class Config:
    tenant_id: str
    client_id: str
    client_secret: str | None = field(repr=False)
    managed_identity_client_id: str | None
    authority_host: str
    bc_base_url: str
    bc_environment: str
    bc_company_id: str
    graph_base_url: str
    storage_connection_string: str | None = field(repr=False)
    table_service_uri: str | None
    queue_service_uri: str | None
    storage_client_id: str | None
    table_prefix: str
    schedule: str
    inline_budget_seconds: float
    full_sync_hours: float
    poll_token_key: str | None = field(default=None, repr=False)
    api_audience: str = ""
    change_poll_schedule: str = "0 * * * * *"
    public_url: str | None = None
    bc_webhooks: bool = True
    notify_debounce_seconds: float = 5.0
    safety_net_minutes: float = 60.0

    @property
    def authority(self) -> str:
        return f"{self.authority_host}/{self.tenant_id}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """The settings from `env` (default: os.environ), checked in table order: the first problem is named."""
        read = _Reader(os.environ if env is None else env)
        tenant = read.matching(
            "SYNC_TENANT_ID",
            lambda v: bool(_GUID.match(v) or _DOMAIN.match(v)),
            "must be a tenant id (GUID) or a domain such as contoso.com",
        )
        client_id = read.matching(
            "SYNC_CLIENT_ID", _GUID.match, "must be the application (client) id, a GUID"
        )
        secret, mi_client = _credential_settings(read)
        env_name = read.matching(
            "BC_ENVIRONMENT", _ENV_NAME.match, "must be an environment name (letters, digits, - or _)"
        )
        company = read.matching(
            "BC_COMPANY_ID", _GUID.match, "must be a company id (GUID); list them with GET .../companies"
        )
        conn, table_uri, queue_uri = _storage_settings(read)
        prefix = read.matching(
            "SYNC_TABLE_PREFIX",
            _TABLE_PREFIX.match,
            "must start with a letter and hold only letters and digits",
        )
        schedule, change_poll = _schedules(read)
        poll_key = _poll_token_key(read)
        return cls(
            tenant_id=tenant,
            client_id=client_id,
            client_secret=secret,
            managed_identity_client_id=mi_client,
            authority_host=_https_url("SYNC_AUTHORITY_HOST", read.value("SYNC_AUTHORITY_HOST")),
            bc_base_url=_https_url("BC_API_BASE_URL", read.value("BC_API_BASE_URL")),
            bc_environment=env_name,
            bc_company_id=company.lower(),
            graph_base_url=_https_url("GRAPH_BASE_URL", read.value("GRAPH_BASE_URL")),
            storage_connection_string=conn,
            table_service_uri=table_uri,
            queue_service_uri=queue_uri,
            storage_client_id=read.optional("AzureWebJobsStorage__clientId"),
            table_prefix=prefix,
            schedule=schedule,
            inline_budget_seconds=_number(
                "SYNC_INLINE_BUDGET_SECONDS", read.value("SYNC_INLINE_BUDGET_SECONDS"), 1, 230
            ),
            full_sync_hours=_number("SYNC_FULL_SYNC_HOURS", read.value("SYNC_FULL_SYNC_HOURS"), 0, 24 * 31),
            poll_token_key=poll_key,
            api_audience=_audience(read.optional("SYNC_API_AUDIENCE"), client_id.lower()),
            change_poll_schedule=change_poll,
            **_notification_settings(read),
        )


class _Reader:
    """Reads settings by name from an environment, applying `SETTINGS`' defaults and requirements."""

    def __init__(self, env: Mapping[str, str]):
        self._env = env

    def optional(self, name: str) -> str | None:
        """The trimmed value, the declared default when blank or unset, or ConfigError when required."""
        spec = next(s for s in SETTINGS if s.name == name)
        raw = self._env.get(name)
        value = raw.strip() if isinstance(raw, str) else None
        if not value:
            if spec.required:
                raise ConfigError(name, f"is missing ({spec.description})")
            return spec.default
        return value

    def value(self, name: str) -> str:
        """A setting that always has a value: required, or optional with a default."""
        value = self.optional(name)
        if value is None:  # only a setting declared with neither: a mistake in SETTINGS
            raise ConfigError(name, "is missing")
        return value

    def matching(self, name: str, check: Callable[[str], object], problem: str) -> str:
        """A setting that always has a value and must pass `check`; ConfigError naming `problem`."""
        value = self.value(name)
        if not check(value):
            raise ConfigError(name, problem)
        return value


def _poll_token_key(read: _Reader) -> str | None:
    """The configured poll-token key, or None: the app then keeps a random key in Table Storage."""
    poll_key = read.optional("SYNC_POLL_TOKEN_KEY")
    if not poll_key:
        return None
    from shared.poll_tokens import MIN_CONFIGURED_KEY_CHARS
    from shared.validate import unresolved_key_vault_reference  # validate imports auth -> config

    problem = unresolved_key_vault_reference("SYNC_POLL_TOKEN_KEY", poll_key)
    if problem:
        raise ConfigError("SYNC_POLL_TOKEN_KEY", problem)
    if len(poll_key) < MIN_CONFIGURED_KEY_CHARS:
        raise ConfigError(
            "SYNC_POLL_TOKEN_KEY",
            f"must be at least {MIN_CONFIGURED_KEY_CHARS} characters of random text "
            "(or leave it unset: the app then keeps a random key in its Table Storage)",
        )
    return poll_key


def _credential_settings(read: _Reader) -> tuple[str | None, str | None]:
    """(client secret, managed identity client id): at least one, the secret not an unresolved Key
    Vault reference."""
    secret = read.optional("SYNC_CLIENT_SECRET")
    mi_client = read.optional("SYNC_MANAGED_IDENTITY_CLIENT_ID")
    if mi_client and not _GUID.match(mi_client):
        raise ConfigError("SYNC_MANAGED_IDENTITY_CLIENT_ID", "must be a client id (GUID)")
    if not secret and not mi_client:
        raise ConfigError(
            "SYNC_CLIENT_SECRET",
            "is missing (set it, or SYNC_MANAGED_IDENTITY_CLIENT_ID for the secretless federated credential)",
        )
    if secret:
        from shared.validate import unresolved_key_vault_reference  # validate imports auth -> config

        problem = unresolved_key_vault_reference("SYNC_CLIENT_SECRET", secret)
        if problem:
            raise ConfigError("SYNC_CLIENT_SECRET", problem)
    return secret, mi_client


def _storage_settings(read: _Reader) -> tuple[str | None, str | None, str | None]:
    """(connection string, table service URI, queue service URI): a connection string locally, the
    service URIs for the managed identity in Azure."""
    conn = read.optional("AzureWebJobsStorage")
    table_uri = read.optional("AzureWebJobsStorage__tableServiceUri")
    queue_uri = read.optional("AzureWebJobsStorage__queueServiceUri")
    if not conn and not table_uri:
        raise ConfigError(
            "AzureWebJobsStorage",
            "is missing (or set AzureWebJobsStorage__tableServiceUri for managed identity)",
        )
    if conn and "=" not in conn:
        raise ConfigError("AzureWebJobsStorage", "is not a storage connection string")
    if table_uri:
        table_uri = _https_url("AzureWebJobsStorage__tableServiceUri", table_uri)
    if queue_uri:
        queue_uri = _https_url("AzureWebJobsStorage__queueServiceUri", queue_uri)
    return conn, table_uri, queue_uri


def _audience(value: str | None, client_id: str) -> str:
    """The token audience: a client id (GUID) or an Application ID URI (api://…, https://…)."""
    if not value:
        return client_id
    if _GUID.match(value):
        return value.lower()
    if re.match(r"^(api|https)://[^\s]+$", value):
        return value
    raise ConfigError(
        "SYNC_API_AUDIENCE", "must be the app's client id (GUID) or its Application ID URI (api://…)"
    )


def _schedules(read: _Reader) -> tuple[str, str]:
    """(SYNC_SCHEDULE, SYNC_CHANGE_POLL_SCHEDULE), each six-field NCRONTAB as the host reads it."""
    schedule = read.matching(
        "SYNC_SCHEDULE",
        _NCRONTAB.match,
        "must be an NCRONTAB expression with six fields, e.g. 0 */15 * * * *",
    )
    change_poll = read.matching(
        "SYNC_CHANGE_POLL_SCHEDULE",
        _NCRONTAB.match,
        "must be an NCRONTAB expression with six fields, e.g. 0 * * * * * (every minute)",
    )
    return schedule, change_poll


def _notification_settings(read: _Reader) -> dict[str, Any]:
    """Change notifications (BEHAVIOUR §8.2, §8.3): the public URL Graph and BC call, whether to use BC
    webhooks, the debounce of a notification's run and the safety-net interval."""
    return {
        "public_url": _public_url(read.optional("SYNC_PUBLIC_URL")),
        "bc_webhooks": _flag("SYNC_BC_WEBHOOKS", read.value("SYNC_BC_WEBHOOKS")),
        "notify_debounce_seconds": _number(
            "SYNC_NOTIFY_DEBOUNCE_SECONDS", read.value("SYNC_NOTIFY_DEBOUNCE_SECONDS"), 0, 60
        ),
        "safety_net_minutes": _number(
            "SYNC_SAFETY_NET_MINUTES", read.value("SYNC_SAFETY_NET_MINUTES"), 15, 1440
        ),
    }


def _public_url(value: str | None) -> str | None:
    """The app's public base address for notification URLs: https, or plain http to a loopback host
    (a function app hosted locally for development and tests; no cloud service can call that anyway)."""
    if not value:
        return None
    parts = urlsplit(value)
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if (
        parts.scheme not in ("https", "http")
        or (parts.scheme == "http" and not loopback)
        or not parts.hostname
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(
            "SYNC_PUBLIC_URL",
            "must be the app's https:// address without query or fragment, e.g. https://<app>.azurewebsites.net",
        )
    return value.rstrip("/")


def _flag(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered not in ("true", "false"):
        raise ConfigError(name, "must be true or false")
    return lowered == "true"


def _number(name: str, value: str, low: float, high: float) -> float:
    try:
        n = float(value)
    except ValueError:
        raise ConfigError(name, "must be a number") from None
    if not low <= n <= high:
        raise ConfigError(name, f"must be between {low:g} and {high:g}")
    return n
