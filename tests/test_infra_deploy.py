"""The deployment paths of issue 14: plain `az`, redeploy after `azd down`, the secret on the first
deployment, the app registration as code, and the docs that walk a partner through them.

There is no Bicep CLI, `az` or Azure here (docs/API_NOTES.md §6). So the parameter files are
checked by a small checker over the parsed `main.bicep` (types, `@minLength`, `@maxLength`,
`@minValue`, `@maxValue`, `@allowed`, required parameters), the azd hooks run against a stand-in `az`
that records its calls, and the unresolved Key Vault reference is driven through the real HTTP API.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from shared import services
from shared.model import user_hash
from tests.test_infra import INFRA, MAIN, ROOT, BicepFile, Unevaluable, _named, _text

AZ_PARAMS = INFRA / "az.bicepparam"
AZD_PARAMS = INFRA / "main.parameters.json"
APP_REGISTRATION = INFRA / "modules" / "appregistration.bicep"
KEY_VAULT = INFRA / "modules" / "keyvault.bicep"
DEPLOY_MD = ROOT / "docs" / "DEPLOY.md"
POWER_AUTOMATE_MD = ROOT / "docs" / "POWER_AUTOMATE.md"


# ---------------------------------------------------------------------------------------------------
# A parameter checker over the parsed main.bicep
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One `param` of main.bicep: its type, whether it has a default, and its constraint decorators."""

    name: str
    type: str
    required: bool
    min_length: int | None = None
    max_length: int | None = None
    min_value: int | None = None
    max_value: int | None = None
    allowed: tuple[Any, ...] | None = None


PYTHON_TYPES = {"string": str, "int": int, "bool": bool, "object": dict, "array": list}


@cache
def main_params() -> dict[str, ParamSpec]:
    bicep = BicepFile.load(MAIN)
    children = [c for c in bicep.root.named_children if c.type != "comment"]
    specs = {}
    for i, node in enumerate(children):
        if node.type != "parameter_declaration":
            continue
        name_node, type_node, *_ = _named(node)
        decorators: dict[str, Any] = {}
        if i and children[i - 1].type == "decorators":
            for decorator in _named(children[i - 1]):
                (call,) = _named(decorator)
                function = _text(call.child_by_field_name("function"))
                arguments = _named(call.child_by_field_name("arguments"))
                if function in ("minLength", "maxLength", "minValue", "maxValue", "allowed"):
                    decorators[function] = bicep.value(arguments[0], {})
        allowed = decorators.get("allowed")
        specs[_text(name_node)] = ParamSpec(
            name=_text(name_node),
            type=_text(type_node),
            required=bicep.param_default(_text(name_node)) is None,
            min_length=decorators.get("minLength"),
            max_length=decorators.get("maxLength"),
            min_value=decorators.get("minValue"),
            max_value=decorators.get("maxValue"),
            allowed=tuple(allowed) if allowed is not None else None,
        )
    return specs


def problems(spec: ParamSpec, value: Any) -> list[str]:
    """Why ARM would reject `value` for this parameter (an empty list: it would accept it)."""
    expected = PYTHON_TYPES.get(spec.type)
    if expected is None:
        raise Unevaluable(f"parameter {spec.name}: type {spec.type} is not known to the checker")
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        return [f"{spec.name}: expected {spec.type}, got {type(value).__name__} {value!r}"]
    found = []
    if isinstance(value, str | list):
        if spec.min_length is not None and len(value) < spec.min_length:
            found.append(f"{spec.name}: length {len(value)} is below @minLength({spec.min_length})")
        if spec.max_length is not None and len(value) > spec.max_length:
            found.append(f"{spec.name}: length {len(value)} is above @maxLength({spec.max_length})")
    if isinstance(value, int) and not isinstance(value, bool):
        if spec.min_value is not None and value < spec.min_value:
            found.append(f"{spec.name}: {value} is below @minValue({spec.min_value})")
        if spec.max_value is not None and value > spec.max_value:
            found.append(f"{spec.name}: {value} is above @maxValue({spec.max_value})")
    if spec.allowed is not None and value not in spec.allowed:
        found.append(f"{spec.name}: {value!r} is not one of @allowed({list(spec.allowed)})")
    return found


@dataclass(frozen=True)
class Given:
    """A value a parameters file gives: a literal, or an environment variable (with its default)."""

    param: str
    literal: Any = None
    variable: str | None = None
    default: str | None = None  # the environment variable's default; None: the variable must be set
    as_type: str = "string"  # what the file turns the variable's text into


def _convert(text: str, as_type: str) -> Any:
    """A variable's text as the parameter's type, the way bool()/int() (and azd) turn it."""
    if as_type == "bool":
        if text.lower() not in ("true", "false"):
            return text  # left a string: the type check reports it
        return text.lower() == "true"
    if as_type == "int":
        return int(text) if re.fullmatch(r"-?\d+", text) else text
    return text


def bicepparam_values(path: Path = AZ_PARAMS) -> dict[str, Given]:
    """The `param` assignments of a .bicepparam file (literals and readEnvironmentVariable)."""
    bicep = BicepFile.load(path)
    usings = [n for n in bicep.root.named_children if n.type == "using_statement"]
    assert len(usings) == 1, f"{path.name}: expected one `using`"
    (target,) = _named(usings[0])
    assert (path.parent / bicep.literal(target)).resolve() == MAIN, f"{path.name} must be `using` main.bicep"
    given = {}
    for name, node in bicep.declarations("variable").items():  # `param` read as `var` (for_old_parsers)
        value = bicep.body(node)
        as_type = "string"
        if value.type == "call_expression" and _text(value.child_by_field_name("function")) in (
            "bool",
            "int",
        ):
            as_type = _text(value.child_by_field_name("function"))
            (value,) = _named(value.child_by_field_name("arguments"))
        if value.type == "call_expression":
            function = _text(value.child_by_field_name("function"))
            if function != "readEnvironmentVariable":
                raise Unevaluable(f"{bicep.where(value)}: the checker knows readEnvironmentVariable only")
            arguments = [bicep.literal(a) for a in _named(value.child_by_field_name("arguments"))]
            given[name] = Given(name, variable=arguments[0], default=[*arguments, None][1], as_type=as_type)
        else:
            given[name] = Given(name, literal=bicep.value(value, {}), as_type=as_type)
    return given


AZD_PLACEHOLDER = re.compile(r"^\$\{(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?:=(?P<default>[^}]*))?\}$")


def azd_values(path: Path = AZD_PARAMS, *, literally: bool = False) -> dict[str, Given]:
    """main.parameters.json as azd reads it: `${VAR}` / `${VAR=default}` become the variable's value,
    converted to the parameter's type. `literally`: as plain `az` reads it, placeholders and all."""
    given = {}
    for name, entry in json.loads(path.read_text())["parameters"].items():
        value = entry["value"]
        match = AZD_PLACEHOLDER.match(value) if isinstance(value, str) else None
        if match and not literally:
            spec = main_params().get(name)
            given[name] = Given(
                name, variable=match["var"], default=match["default"], as_type=spec.type if spec else "string"
            )
        else:
            given[name] = Given(name, literal=value)
    return given


def check(values: dict[str, Given]) -> list[str]:
    """Every problem ARM would report for these values: unknown, missing, mistyped, out of range."""
    specs = main_params()
    found = [f"{name}: not a parameter of main.bicep" for name in values if name not in specs]
    found += [
        f"{s.name}: required, but given no value"
        for s in specs.values()
        if s.required and s.name not in values
    ]
    for name, given in values.items():
        if name not in specs:
            continue
        if given.variable is None:
            found += problems(specs[name], given.literal)
        elif given.default is not None:
            found += [
                f"{p} (default of {given.variable})"
                for p in problems(specs[name], _convert(given.default, given.as_type))
            ]
        elif specs[name].type != given.as_type:
            found.append(
                f"{name}: {given.variable} is read as {given.as_type}, the parameter is {specs[name].type}"
            )
    return found


def test_checker_reads_the_constraints_of_main_bicep():
    specs = main_params()
    assert specs["bcCompanyId"] == ParamSpec("bcCompanyId", "string", True, min_length=36, max_length=36)
    assert specs["pythonVersion"].allowed == ("3.11", "3.12")
    assert (specs["staleUserHours"].min_value, specs["staleUserHours"].max_value) == (1, 47)
    assert specs["useFederatedCredential"].type == "bool" and not specs["useFederatedCredential"].required


def test_checker_reports_each_kind_of_violation():
    bad = {
        "environmentName": Given("environmentName", literal=""),
        "bcEnvironment": Given("bcEnvironment", literal="production"),
        "bcCompanyId": Given("bcCompanyId", literal="CRONUS"),
        "pythonVersion": Given("pythonVersion", literal="3.9"),
        "staleUserHours": Given("staleUserHours", variable="STALE_USER_HOURS", default="48", as_type="int"),
        "useFederatedCredential": Given("useFederatedCredential", literal="yes"),
        "maximumInstanceCount": Given("maximumInstanceCount", literal=2000),
        "syncInlineBudgetSeconds": Given("syncInlineBudgetSeconds", literal=0),
        "syncTenant": Given("syncTenant", literal="contoso.com"),
    }
    assert check(bad) == [
        "syncTenant: not a parameter of main.bicep",
        "environmentName: length 0 is below @minLength(1)",
        "bcCompanyId: length 6 is below @minLength(36)",
        "pythonVersion: '3.9' is not one of @allowed(['3.11', '3.12'])",
        "staleUserHours: 48 is above @maxValue(47) (default of STALE_USER_HOURS)",
        "useFederatedCredential: expected bool, got str 'yes'",
        "maximumInstanceCount: 2000 is above @maxValue(1000)",
        "syncInlineBudgetSeconds: 0 is below @minValue(1)",
    ]
    assert check({}) == [
        "environmentName: required, but given no value",
        "bcEnvironment: required, but given no value",
        "bcCompanyId: required, but given no value",
    ]


def test_the_azd_file_read_by_plain_az_fails_as_the_issue_says():
    """`az deployment group create -p infra/main.parameters.json` passes the placeholders as text."""
    found = check(azd_values(literally=True))
    assert "bcCompanyId: length 16 is below @minLength(36)" in found
    assert "useFederatedCredential: expected bool, got str '${USE_FEDERATED_CREDENTIAL=false}'" in found


def test_the_az_bicepparam_file_passes_the_checker():
    assert check(bicepparam_values()) == []


def test_the_azd_parameters_file_passes_the_checker():
    assert check(azd_values()) == []


def test_required_values_come_from_variables_that_must_be_set():
    """A missing variable stops `az` at build time with its name, before anything is deployed."""
    required = {s.name for s in main_params().values() if s.required}
    assert required == {"environmentName", "bcEnvironment", "bcCompanyId"}
    az = bicepparam_values()
    assert {name: (az[name].variable, az[name].default) for name in required} == {
        "environmentName": ("AZURE_ENV_NAME", None),
        "bcEnvironment": ("BC_ENVIRONMENT", None),
        "bcCompanyId": ("BC_COMPANY_ID", None),
    }


def test_azd_and_az_read_the_same_variables_with_the_same_defaults():
    """One set of `export`/`azd env set` values gives the same deployment on both paths."""
    az, azd = bicepparam_values(), azd_values()
    # location: azd passes AZURE_LOCATION; plain az deploys into the resource group's region (the default).
    assert set(azd) - set(az) == {"location"}
    assert set(az) - set(azd) == set()
    assert {n: (az[n].variable, az[n].default) for n in az} == {
        n: (azd[n].variable, azd[n].default) for n in az
    }


def test_the_deploy_guide_exports_every_variable_the_az_path_needs():
    text = DEPLOY_MD.read_text()
    exported = set(re.findall(r"^export ([A-Z_][A-Z0-9_]*)=", text, re.MULTILINE))
    must = {g.variable for g in bicepparam_values().values() if g.variable and g.default is None}
    assert must <= exported
    assert "-p infra/az.bicepparam" in text or "--parameters infra/az.bicepparam" in text


# ---------------------------------------------------------------------------------------------------
# Key Vault: redeploy after `azd down`
# ---------------------------------------------------------------------------------------------------


def test_key_vault_create_mode_reaches_the_vault():
    main = BicepFile.load(MAIN)
    argument = main.prop(_object(main, main.module("./modules/keyvault.bicep")), "params", "createMode")
    assert _text(argument) == "keyVaultCreateMode"
    assert main_params()["keyVaultCreateMode"].allowed == ("default", "recover")
    vault_file = BicepFile.load(KEY_VAULT)
    (vault,) = vault_file.resources("Microsoft.KeyVault/vaults")
    assert _text(vault_file.prop(vault_file.body(vault), "properties", "createMode")) == "createMode"


# ---------------------------------------------------------------------------------------------------
# azd hooks, run against a stand-in `az` that records its calls
# ---------------------------------------------------------------------------------------------------

FAKE_AZ = """#!/bin/sh
echo "$*" >> "$AZ_CALLS"
case "$*" in
  "keyvault show "*) exit "${FAKE_VAULT_EXISTS:-1}" ;;
  "keyvault show-deleted "*) exit "${FAKE_VAULT_DELETED:-1}" ;;
  "rest --method get "*) echo "${FAKE_REFERENCE_STATUS:-Resolved}" ;;
esac
exit 0
"""


def _hook(script: str, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    az = bin_dir / "az"
    az.write_text(FAKE_AZ)
    az.chmod(az.stat().st_mode | stat.S_IXUSR)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", "AZ_CALLS": str(calls), **env}
    result = subprocess.run(
        ["sh", str(ROOT / "scripts" / script)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result, calls.read_text().splitlines()


def test_azure_yaml_runs_both_hooks_on_every_shell():
    text = (ROOT / "azure.yaml").read_text()
    for hook in ("preprovision", "postprovision"):
        block = re.search(rf"^  {hook}:\n((?:    .*\n)+)", text, re.MULTILINE)
        assert block, f"azure.yaml has no {hook} hook"
        scripts = re.findall(r"run: \./(scripts/\S+)", block.group(1))
        assert sorted(scripts) == [f"scripts/azd-{hook}.ps1", f"scripts/azd-{hook}.sh"]
        for script in scripts:
            assert (ROOT / script).is_file()
        assert os.access(ROOT / f"scripts/azd-{hook}.sh", os.X_OK)


@pytest.mark.parametrize("script", ["azd-preprovision.sh", "azd-postprovision.sh"])
def test_hook_scripts_are_valid_sh(script):
    result = subprocess.run(
        ["sh", "-n", str(ROOT / "scripts" / script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_preprovision_recovers_the_soft_deleted_vault_after_azd_down(tmp_path):
    result, calls = _hook(
        "azd-preprovision.sh",
        tmp_path,
        KEY_VAULT_NAME="kv-abc123",
        AZURE_RESOURCE_GROUP="rg-sync",
        AZURE_LOCATION="swedencentral",
        FAKE_VAULT_EXISTS="1",
        FAKE_VAULT_DELETED="0",
    )
    assert result.returncode == 0, result.stderr
    assert calls[-2:] == [
        "group create --name rg-sync --location swedencentral --output none",
        "keyvault recover --name kv-abc123 --output none",
    ]


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({}, "first provision or secretless: no vault name yet"),
        ({"KEY_VAULT_NAME": "kv-abc123", "FAKE_VAULT_EXISTS": "0"}, "the vault exists"),
        ({"KEY_VAULT_NAME": "kv-abc123", "FAKE_VAULT_DELETED": "1"}, "purged or never created"),
    ],
)
def test_preprovision_leaves_everything_alone_otherwise(tmp_path, env, why):
    result, calls = _hook("azd-preprovision.sh", tmp_path, **env)
    assert result.returncode == 0, (why, result.stderr)
    assert not [c for c in calls if c.startswith(("keyvault recover", "group create"))], why


def test_postprovision_refreshes_the_key_vault_reference_until_resolved(tmp_path):
    app_id = "/subscriptions/s/resourceGroups/rg-sync/providers/Microsoft.Web/sites/func-abc123"
    result, calls = _hook(
        "azd-postprovision.sh", tmp_path, KEY_VAULT_NAME="kv-abc123", FUNCTION_APP_ID=app_id
    )
    assert result.returncode == 0, result.stderr
    base = f"https://management.azure.com{app_id}/config/configreferences/appsettings"
    assert calls == [
        f"rest --method post --url {base}/refresh?api-version=2022-03-01 --output none",
        f"rest --method get --url {base}/SYNC_CLIENT_SECRET?api-version=2022-03-01 "
        "--query properties.status --output tsv",
    ]
    assert "resolved" in result.stdout


def test_postprovision_does_nothing_in_the_secretless_mode(tmp_path):
    result, calls = _hook("azd-postprovision.sh", tmp_path, FUNCTION_APP_ID="/x")
    assert result.returncode == 0 and calls == []


def test_the_hooks_read_outputs_that_main_bicep_writes():
    outputs = {
        _text(_named(n)[0])
        for n in BicepFile.load(MAIN).root.named_children
        if n.type == "output_declaration"
    }
    used = set()
    for script in (ROOT / "scripts").glob("azd-*.sh"):
        used |= set(re.findall(r"\$\{([A-Z_]+)", script.read_text()))
    assert used - {"AZURE_RESOURCE_GROUP", "AZURE_LOCATION"} <= outputs


# ---------------------------------------------------------------------------------------------------
# The connection check names an unresolved Key Vault reference
# ---------------------------------------------------------------------------------------------------

REFERENCE = "@Microsoft.KeyVault(VaultName=kv-abc123;SecretName=sync-client-secret)"


def test_validate_says_what_to_do_about_an_unresolved_key_vault_reference(client, world, monkeypatch):
    """In Azure an unresolved reference leaves its literal text in the setting ("Use Key Vault
    references as app settings", https://learn.microsoft.com/azure/app-service/app-service-key-vault-references)."""
    world.user("alice@contoso.example")
    monkeypatch.setenv("SYNC_CLIENT_SECRET", REFERENCE)
    services.reset_services()
    resp = client("POST", "users/alice@contoso.example/validate")
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["code"] == "ConfigurationError"
    message = error["message"]
    assert "SYNC_CLIENT_SECRET" in message and "unresolved Key Vault reference" in message
    assert "vault kv-abc123, secret sync-client-secret" in message
    assert "/config/configreferences/appsettings/refresh?api-version=2022-03-01" in message
    assert "Key Vault Secrets User" in message
    assert REFERENCE not in message
    # Nothing ran: the sync refuses the same way, and no contact was written anywhere.
    resp = client("POST", "sync", {"user": "alice@contoso.example"})
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "ConfigurationError"
    assert world.outlook() == []


def test_a_resolved_secret_that_merely_mentions_key_vault_is_a_secret():
    from shared.validate import unresolved_key_vault_reference

    assert unresolved_key_vault_reference("SYNC_CLIENT_SECRET", "abc~@Microsoft.KeyVault(") is None
    assert unresolved_key_vault_reference("SYNC_CLIENT_SECRET", None) is None
    assert unresolved_key_vault_reference("SYNC_CLIENT_SECRET", "  " + REFERENCE) is not None


# ---------------------------------------------------------------------------------------------------
# The app registration as code
# ---------------------------------------------------------------------------------------------------


def _resource(bicep: BicepFile, name: str) -> Any:
    """A resource declaration by its symbolic name."""
    return bicep.declarations("resource")[name]


def _object(bicep: BicepFile, declaration: Any) -> Any:
    """The body object of a declaration, also of a conditional one (`= if (...) {...}`)."""
    body = bicep.body(declaration)
    return _named(body)[-1] if body.type == "if_statement" else body


def _items(bicep: BicepFile, array: Any) -> list[Any]:
    assert array.type == "array", bicep.where(array)
    return _named(array)


def test_app_registration_exposes_the_api_the_self_service_page_needs():
    bicep = BicepFile.load(APP_REGISTRATION)
    app = bicep.body(_resource(bicep, "app"))
    assert bicep.value(bicep.prop(app, "signInAudience"), {}) == "AzureADMyOrg"
    (uri,) = _items(bicep, bicep.prop(app, "identifierUris"))
    # api://<tenantId>/<string>: allowed by the default identifier URI policy.
    assert re.fullmatch(r"'api://\$\{tenant\(\)\.tenantId\}/\$\{uniqueName\}'", _text(uri))
    (scope,) = _items(bicep, bicep.prop(app, "api", "oauth2PermissionScopes"))
    assert bicep.value(bicep.prop(scope, "value"), {}) == "access_as_user"
    assert bicep.value(bicep.prop(scope, "type"), {}) == "User"
    (role,) = _items(bicep, bicep.prop(app, "appRoles"))
    assert bicep.value(bicep.prop(role, "value"), {}) == "ContactSync.Admin"
    assert bicep.value(bicep.prop(role, "allowedMemberTypes"), {}) == ["User"]
    assert "adminPageRedirectUri" in _text(bicep.prop(app, "spa", "redirectUris"))
    sp = bicep.body(_resource(bicep, "servicePrincipal"))
    assert _text(bicep.prop(sp, "appId")) == "app.appId"


def test_the_managed_identity_is_the_apps_federated_credential():
    bicep = BicepFile.load(APP_REGISTRATION)
    node = _resource(bicep, "managedIdentityCredential")
    assert "if (!empty(managedIdentityPrincipalId))" in _text(node)
    fic = _object(bicep, node)
    assert bicep.value(bicep.prop(fic, "audiences"), {}) == ["api://AzureADTokenExchange"]
    assert _text(bicep.prop(fic, "subject")) == "managedIdentityPrincipalId"
    assert _text(bicep.prop(fic, "issuer")) == "issuer"
    assert "'${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'" in _text(
        bicep.body(bicep.declarations("variable")["issuer"])
    )
    main = BicepFile.load(MAIN)
    argument = main.prop(
        _object(main, main.module("./modules/appregistration.bicep")), "params", "managedIdentityPrincipalId"
    )
    assert _text(argument) == "useFederatedCredential ? identity.outputs.principalId : ''"


def _documented_permissions() -> dict[str, str]:
    """`Permission` -> app-role id from the table in docs/DEPLOY.md step 2."""
    rows = re.findall(
        r"^\|[^|]*\| `([A-Za-z.]+)` \| `([0-9a-f-]{36})` \|", DEPLOY_MD.read_text(), re.MULTILINE
    )
    return dict(rows)


def test_granted_permissions_are_the_documented_ones_and_only_behind_parameters():
    bicep = BicepFile.load(APP_REGISTRATION)
    role_ids = {
        key: bicep.value(value, {})
        for key, value in bicep.properties(bicep.body(bicep.declarations("variable")["roleIds"]))
    }
    assert _documented_permissions() == {
        "API.ReadWrite.All": role_ids["bcApiReadWriteAll"],
        "User.Read.All": role_ids["graphUserReadAll"],
        "Contacts.ReadWrite": role_ids["graphContactsReadWrite"],
        "MailboxSettings.ReadWrite": role_ids["graphMailboxSettingsReadWrite"],
    }
    grants = bicep.resources("Microsoft.Graph/appRoleAssignedTo")
    assert len(grants) == 2 and all("if (grantPermissions)" in _text(g) for g in grants)
    # Contacts.ReadWrite in Entra only when asked for: with Exchange RBAC the two grants would add up.
    graph_roles = bicep.body(bicep.declarations("variable")["graphRoles"])
    assert _text(graph_roles) == (
        "grantContactsReadWrite ? concat(graphRolesAlways, graphRolesEntraContacts) : graphRolesAlways"
    )
    main = BicepFile.load(MAIN)
    module = main.module("./modules/appregistration.bicep")
    assert "if (deployAppRegistration)" in _text(module)
    params = _object(main, module)
    assert _text(main.prop(params, "params", "grantPermissions")) == "grantAppPermissions"
    assert (
        _text(main.prop(params, "params", "grantContactsReadWrite")) == "contactsPermission == 'entraConsent'"
    )
    assert main.value(main.param_default("deployAppRegistration"), {}) is False
    assert main.value(main.param_default("grantAppPermissions"), {}) is False
    assert main.value(main.param_default("contactsPermission"), {}) == "exchangeRbac"


def test_the_app_uses_the_created_registration_or_the_given_client_id():
    main = BicepFile.load(MAIN)
    assert _text(main.body(main.declarations("variable")["clientId"])) == (
        "deployAppRegistration ? appRegistration.outputs.appId : syncClientId"
    )
    argument = main.prop(main.body(main.module("./modules/functionapp.bicep")), "params", "syncClientId")
    assert _text(argument) == "clientId"


# ---------------------------------------------------------------------------------------------------
# Docs
# ---------------------------------------------------------------------------------------------------


def test_deploy_guide_walks_both_paths_and_the_redeploy():
    text = DEPLOY_MD.read_text()
    for needle in (
        "azd up",
        "az deployment group create",
        "azd down",
        "keyVaultCreateMode=recover",
        "KEY_VAULT_CREATE_MODE=recover",
        "configreferences/appsettings/refresh",
        "DEPLOY_APP_REGISTRATION",
        "az functionapp function keys set",
    ):
        assert needle in text, needle
    readme = (ROOT / "README.md").read_text()
    deploy = re.search(r"^## Deploy.*?(?=^## )", readme, re.MULTILINE | re.DOTALL)
    assert deploy and "docs/DEPLOY.md" in deploy.group(0)


def test_power_automate_guide_gives_the_sync_function_its_own_key():
    text = POWER_AUTOMATE_MD.read_text()
    commands = re.findall(
        r"az functionapp function keys (?:set|list|delete)[^\n]*--function-name (\S+)", text
    )
    assert commands and set(commands) == {"function_sync_http"}
    assert (ROOT / "function_sync_http" / "function.json").is_file()


def test_the_guide_computes_the_same_user_hash_as_the_logs():
    """The workbook names users by hash; the guide's one-liner must find the same one."""
    (command,) = re.findall(r'`(python3 -c "[^`]*hashlib[^`]*)`', DEPLOY_MD.read_text())
    code = re.search(r'-c "([^"]*)"', command).group(1)
    result = subprocess.run(
        ["python3", "-c", code, "Alice@Contoso.example"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == user_hash("alice@contoso.example")
