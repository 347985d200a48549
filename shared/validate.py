"""The connection check of BEHAVIOUR §1.4 / §7: can this app sync this user, and if not, what to fix.

Each check answers `ok` or an actionable message; later checks that depend on a failed one are
reported as not run rather than failing with a confusing second error.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from shared.auth import BC_SCOPE, GRAPH_SCOPE, AuthError
from shared.bc_client import BcSchema, SchemaError
from shared.graph_client import CATEGORY_COLOR
from shared.http_client import ApiError, RequestCounter
from shared.model import UserSettings

KEY_VAULT_REFERENCE_PREFIX = "@Microsoft.KeyVault("
_REFERENCE_PART = re.compile(r"(VaultName|SecretName)=([A-Za-z0-9-]{1,127})")


def unresolved_key_vault_reference(name: str, value: str | None) -> str | None:
    """What to do when an app setting still holds its `@Microsoft.KeyVault(...)` reference, else None.

    App Service resolves a reference when the app starts and leaves the literal text in the setting when
    it cannot (no access yet, no secret); it fetches it again only every 24 hours unless the app's
    configuration changes or the refresh endpoint is called ("Use Key Vault references as app settings",
    https://learn.microsoft.com/azure/app-service/app-service-key-vault-references, section "Rotation").
    On a first deployment that is the normal failure: the role assignment exists but has not propagated
    when the app first starts. The message names the vault and secret (not secrets), never the value.
    """
    if not value or not value.strip().startswith(KEY_VAULT_REFERENCE_PREFIX):
        return None
    parts = dict(_REFERENCE_PART.findall(value))
    where = (
        f" (vault {parts['VaultName']}, secret {parts['SecretName']})"
        if "VaultName" in parts and "SecretName" in parts
        else ""
    )
    return (
        f"is an unresolved Key Vault reference{where}: App Service could not read the secret when the app "
        "started and retries only every 24 hours. Usual causes: the app's identity got its 'Key Vault Secrets "
        "User' role moments before (it takes a few minutes to apply), or the secret does not exist yet. "
        "Check that the secret exists, then make the platform fetch it again: "
        'az rest --method post --url "https://management.azure.com$(az functionapp show -g <resource group> '
        '-n <app> --query id -o tsv)/config/configreferences/appsettings/refresh?api-version=2022-03-01" '
        "(azd runs this after every provision; see docs/DEPLOY.md, 'Secret not resolved'). The same GET "
        f"without /refresh, ending in /appsettings/{name}, shows the platform's reason."
    )


@dataclass
class Check:
    name: str
    ok: bool
    message: str


def validate_user(services: Any, settings: UserSettings) -> dict[str, Any]:
    config = services.config
    company_ids = [scope.company_id for scope in settings.scopes(config.bc_company_id)]
    bc, graph = services.clients(RequestCounter())
    checks: list[Check] = []

    def token(name: str, scope: str) -> bool:
        try:
            services.tokens.token(scope)
        except AuthError as exc:
            checks.append(Check(name, False, str(exc)))
            return False
        checks.append(Check(name, True, "ok"))
        return True

    # A cached token would hide a secret revoked or expired since it was issued: ask Entra afresh.
    services.tokens.invalidate()
    bc_token = token("bcToken", BC_SCOPE)
    graph_token = token("graphToken", GRAPH_SCOPE)
    if bc_token:
        checks.append(_companies_check(bc, company_ids))
        try:
            checks.append(_fields_check(bc.schema(), settings))
        except (ApiError, SchemaError) as exc:
            checks.append(Check("bcFields", False, str(exc)))
        checks.append(_webhooks_check(services, bc, company_ids))
    else:
        checks.append(Check("bcCompany", False, "not checked: no Business Central token"))
        checks.append(Check("bcFields", False, "not checked: no Business Central token"))
        checks.append(Check("bcWebhooks", True, "not checked: no Business Central token"))
    if graph_token:
        checks += _graph_checks(services, graph, settings)
    else:
        checks.append(Check("mailbox", False, "not checked: no Graph token"))
        checks.append(Check("contactsPermission", False, "not checked: no Graph token"))
    return {"user": settings.user, "ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}


def _companies_check(bc: Any, company_ids: list[str]) -> Check:
    """Each company the user syncs (one, or every company of `companies`): found, and its contacts
    readable. One check, ok only when every company is; the message names each by its name."""
    oks: list[str] = []
    problems: list[str] = []
    for company_id in company_ids:
        try:
            company = bc.company(company_id)
            bc.list_contacts(company_id, select=("id",))  # proves read access to contacts too
            oks.append(str(company.get("displayName") or company.get("name")))
        except ApiError as exc:
            which = f"Company {company_id}: " if len(company_ids) > 1 else ""  # its name is unreadable
            problems.append(which + _bc_hint(exc, company_id))
    if problems:
        return Check("bcCompany", False, " ".join(problems))
    return Check("bcCompany", True, f"ok: {', '.join(oks)}")


def _webhooks_check(services: Any, bc: Any, company_ids: list[str]) -> Check:
    """Whether each company's contacts can be subscribed to and whether the app's subscription is live
    (BEHAVIOUR §8.3). Informational: without webhooks the change poll does the job, so it never fails."""
    from shared.bc_webhooks import notification_url

    url = notification_url(services)
    if url is None:
        why = "SYNC_BC_WEBHOOKS is false" if not services.config.bc_webhooks else "SYNC_PUBLIC_URL is not set"
        return Check("bcWebhooks", True, f"ok: webhooks not used ({why}); {_POLL}")
    if len(company_ids) == 1:
        return Check("bcWebhooks", True, f"ok: {_webhooks_status(services, bc, url, company_ids[0])}")
    parts = [f"company {n}: {_webhooks_status(services, bc, url, c)}" for n, c in enumerate(company_ids, 1)]
    return Check("bcWebhooks", True, "ok: " + " ".join(parts))


_POLL = "the change poll asks Business Central every minute"


def _webhooks_status(services: Any, bc: Any, url: str, company_id: str) -> str:
    from shared.bc_webhooks import is_live

    try:
        supported = bc.webhook_supports_contacts(company_id)
    except ApiError as exc:
        return f"could not read webhookSupportedResources ({exc}); {_POLL}"
    if not supported:
        return f"this Business Central offers no contacts webhooks; {_POLL}"
    row = services.store.list_bc_webhooks().get(company_id)
    if row is not None and is_live(row, url, services.clock()) and row.expires_at is not None:
        return f"contacts webhooks supported; subscription live until {row.expires_at.isoformat()}"
    return (
        f"contacts webhooks supported; no live subscription yet (the next change-poll tick makes one, "
        f"BC must reach {url}); {_POLL} meanwhile"
    )


def _graph_checks(services: Any, graph: Any, settings: UserSettings) -> list[Check]:
    """The mailbox, the permission to write contacts there, and the one to add the category."""
    checks: list[Check] = []
    try:
        graph.get_user(settings.user)
        checks.append(Check("mailbox", True, "ok"))
        try:
            folder = (
                graph.find_folder(settings.user, settings.folder_name)
                if settings.folder_name is not None
                else None
            )
            if folder:  # a write that changes nothing proves Contacts.ReadWrite, not just read access
                graph.rename_folder(settings.user, folder["id"], folder["displayName"])
                checks.append(Check("contactsPermission", True, "ok"))
            else:
                checks.append(_read_only_hint(services.tokens.token(GRAPH_SCOPE)))
        except ApiError as exc:
            checks.append(Check("contactsPermission", False, _graph_hint(exc, settings.user)))
        category = _a_category(settings)
        if category:
            checks.append(_category_check(graph, settings.user, category))
    except ApiError as exc:
        checks.append(Check("mailbox", False, _graph_hint(exc, settings.user)))
        checks.append(Check("contactsPermission", False, "not checked: mailbox not reachable"))
    return checks


def _a_category(settings: UserSettings) -> str | None:
    """A category the sync writes, to prove the permission with: the `category` setting, or with
    `companies` the first company's that names one (a company's default, its display name, would
    cost a BC read; the permission is the same for every category)."""
    if settings.companies is None:
        return settings.category
    return next((c.category for c in settings.companies if c.category), None)


def _category_check(graph: Any, user: str, category: str) -> Check:
    """The sync puts its category in the user's master category list (BEHAVIOUR §4.8), which needs
    MailboxSettings.ReadWrite. Creating it here is what the first sync would do anyway; a 409 (it
    exists) also proves the write was allowed, since Graph authorizes before it looks."""
    try:
        graph.create_category(user, category, CATEGORY_COLOR)
    except ApiError as exc:
        if exc.status in (401, 403):
            return Check(
                "categoryPermission",
                False,
                f"Microsoft Graph refused to add the category '{category}' to the master category list "
                f"({exc.status}). Synced contacts still get it, but Outlook shows it without a colour. Grant "
                "MailboxSettings.ReadWrite: the Exchange role 'Application MailboxSettings.ReadWrite' in the "
                "same management scope as Contacts.ReadWrite, or the Graph application permission with admin "
                "consent (docs/DEPLOY.md step 2).",
            )
        return Check("categoryPermission", False, str(exc))
    return Check("categoryPermission", True, "ok")


def _fields_check(schema: BcSchema, settings: UserSettings) -> Check:
    """Which synced fields this BC version's contacts API lacks (from `$metadata`). Missing fields
    are simply not synced; a filter on one cannot work, so that fails the check."""
    missing = schema.missing
    filters = [scope.filter for scope in settings.scopes("")]
    used = dict.fromkeys(name for spec in filters for name in spec)
    in_filter = [name for name in used if name not in schema.contact_properties]
    if in_filter:
        names = ", ".join(in_filter)
        return Check(
            "bcFields",
            False,
            f"The user's filter uses {names}, which this Business Central version's contacts API does not "
            f"have: remove {names} from the filter. Missing fields: {', '.join(missing)}.",
        )
    if missing:
        return Check(
            "bcFields",
            True,
            f"ok: this Business Central version's contacts API has no {', '.join(missing)}; "
            "those fields are not synchronized",
        )
    return Check("bcFields", True, "ok")


def _read_only_hint(token: str) -> Check:
    """Reading worked; before the folder exists a write cannot be tried without creating something,
    so look at the token: Entra's Contacts.Read without Contacts.ReadWrite means every write fails.
    (Exchange RBAC for Applications grants do not show in the token, so no role is no verdict.)"""
    try:
        payload = token.split(".")[1]
        roles = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))).get("roles") or []
    except (IndexError, ValueError, AttributeError):
        roles = []
    if "Contacts.Read" in roles and "Contacts.ReadWrite" not in roles:
        return Check(
            "contactsPermission",
            False,
            "The app can read but not write contacts: it has the Graph application permission Contacts.Read "
            "but not Contacts.ReadWrite. Grant Contacts.ReadWrite (Microsoft Graph, application) with admin "
            "consent in the app registration.",
        )
    return Check("contactsPermission", True, "ok")


def _bc_hint(exc: ApiError, company_id: str) -> str:
    if exc.status in (401, 403):
        return (
            f"Business Central refused the app ({exc.status}). In Business Central, open the Microsoft Entra "
            "Applications page, add this app's client id, set State to Enabled and assign permission sets that "
            "allow reading and editing contacts; the app registration needs the API.ReadWrite.All application "
            "permission on Dynamics 365 Business Central with admin consent."
        )
    if exc.status == 404:
        return (
            f"Business Central company {company_id} or environment not found: check BC_ENVIRONMENT and "
            "BC_COMPANY_ID (or the user's companyId)."
        )
    return str(exc)


def _graph_hint(exc: ApiError, user: str) -> str:
    if exc.status == 403:
        return (
            "Microsoft Graph denied access (403). The app needs Contacts.ReadWrite for this mailbox: either "
            "through Exchange Online RBAC for Applications (role 'Application Contacts.ReadWrite' with a "
            f"management scope that includes {user}), or, legacy, the Graph application permission with admin "
            "consent plus an application access policy that includes this mailbox."
        )
    if exc.status == 404:
        return f"No Exchange Online mailbox found for {user}: check the address."
    if exc.status == 401:
        return "Microsoft Graph rejected the token (401): check the tenant and the app registration."
    return str(exc)
