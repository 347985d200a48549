"""Checks of the Bicep deployment in infra/ (issues 5 and 14).

There is no Bicep CLI on these machines (docs/API_NOTES.md §6), so: syntax is checked with
tree-sitter-bicep, policy with checkov, and the wiring between the Bicep and the code (app settings, their
defaults, the queue and the tables) by evaluating the few Bicep expressions involved. The evaluator below
understands only the shapes this repository uses; anything else fails with the file and line, so a
refactor of the Bicep cannot silently make a check vacuous.

The tools are test dependencies and CI must run these checks, so a missing tool fails (never skips).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from shared.config import SETTING_NAMES, SETTINGS

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
FUNCTION_APP = INFRA / "modules" / "functionapp.bicep"
STORAGE = INFRA / "modules" / "storage.bicep"

# Settings the code reads (shared/config.py) that the deployment must NOT set, each with the reason.
LOCAL_ONLY_SETTINGS = {
    # A storage connection string carries the account key. The deployed account has shared-key access
    # disabled, so in Azure the app uses the identity-based AzureWebJobsStorage__* settings instead; the
    # connection string is for Azurite and local runs only.
    "AzureWebJobsStorage",
}

# Settings the deployment sets that the code does not read: the Functions host reads them.
HOST_OWNED_SETTINGS = {
    # Tells the host to use a managed identity (with AzureWebJobsStorage__clientId) for its storage.
    "AzureWebJobsStorage__credential",
    # Blob endpoint for the host's own state (locks, keys, timer schedule status); the app uses no blobs.
    "AzureWebJobsStorage__blobServiceUri",
    # Where the host sends telemetry.
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    # Makes the host send telemetry with an Entra token of the identity (local auth is off).
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
}

# Exactly one of these is set, depending on the sign-in mode (parameter useFederatedCredential).
SECRET_MODE_ONLY = {"SYNC_CLIENT_SECRET"}
FEDERATED_MODE_ONLY = {"SYNC_MANAGED_IDENTITY_CLIENT_ID"}

WORKER_QUEUE = "contact-sync-jobs"
DEFAULT_TABLE_PREFIX = "ContactSync"
TABLE_SUFFIXES = ("Settings", "Links", "State", "Runs", "Leases")

# checkov findings skipped with an inline `checkov:skip=ID:reason` comment in the Bicep, next to the
# resource. A new skip must be added here too, so that every one is reviewed.
ALLOWED_CHECKOV_SKIPS = {
    # Network isolation: without VNet integration (left out: cost and setup per customer) the Flex host,
    # the deployment, the Key Vault reference and Power Automate reach the services over public endpoints.
    # Data access needs Entra ID everywhere (shared key and local auth are off).
    "CKV_AZURE_35": "storage: default network action Allow",
    "CKV_AZURE_59": "storage: public network access",
    "CKV_AZURE_109": "key vault: no firewall",
    "CKV_AZURE_189": "key vault: public network access",
    "CKV_AZURE_222": "function app: public network access (Power Automate calls it)",
    # checkov cannot evaluate the conditional that sends purge protection "off" as absent (the API rejects
    # an explicit false); it is on by default.
    "CKV_AZURE_110": "key vault: purge protection",
    "CKV_AZURE_42": "key vault: recoverable",
    # Cost and availability trade-offs of a scheduled, scale-to-zero sync.
    "CKV_AZURE_206": "storage: LRS (state can be rebuilt)",
    "CKV_AZURE_212": "function app: no always-ready instances",
    "CKV_AZURE_225": "plan: not zone redundant",
    # Not available on Flex Consumption.
    "CKV_AZURE_213": "function app: health check",
    # Design: callers use function keys; the secret's lifetime is the app registration credential's.
    "CKV_AZURE_17": "function app: client certificates",
    "CKV_AZURE_41": "key vault secret: expiry date",
}


# ---------------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------------

INSTALL_HINT = "install the test tools: .venv/bin/pip install -r requirements-dev.txt"


@cache
def _parser() -> Any:
    try:
        import tree_sitter_bicep
        from tree_sitter import Language, Parser
    except ImportError as exc:  # pragma: no cover - only without the dev requirements
        pytest.fail(f"tree-sitter-bicep is not installed ({exc}); {INSTALL_HINT}")
    return Parser(Language(tree_sitter_bicep.language()))


def _checkov_executable() -> str:
    """checkov pins packaging<24, which pytest>=9 cannot live with, so it has a venv of its own."""
    candidates = [os.environ.get("CHECKOV", ""), str(ROOT / ".venv-infra" / "bin" / "checkov")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("checkov")
    if found:
        return found
    pytest.fail(
        "checkov is not installed. Install it into its own venv: "
        "python3.11 -m venv .venv-infra && .venv-infra/bin/pip install checkov==3.3.30 "
        "(or point the CHECKOV environment variable at a checkov executable)"
    )


# ---------------------------------------------------------------------------------------------------
# A small reader and evaluator for the Bicep shapes used in infra/
# ---------------------------------------------------------------------------------------------------


class Unevaluable(AssertionError):
    """The Bicep uses a shape the evaluator does not know; the message says where."""


def _text(node: Any) -> str:
    return node.text.decode()


def _where(path: Path, node: Any) -> str:
    row, col = node.start_point
    return f"{path.relative_to(ROOT)}:{row + 1}:{col + 1}"


def _named(node: Any) -> list[Any]:
    return [c for c in node.named_children if c.type != "comment"]


@dataclass
class BicepFile:
    path: Path
    root: Any

    @classmethod
    @cache
    def load(cls, path: Path) -> BicepFile:
        return cls(path, _parser().parse(for_old_parsers(path, path.read_bytes())).root_node)

    def where(self, node: Any) -> str:
        return _where(self.path, node)

    def declarations(self, kind: str) -> dict[str, Any]:
        """Top-level `param`/`var`/`resource`/`module` declarations by name."""
        found = {}
        for node in self.root.named_children:
            if node.type == f"{kind}_declaration":
                found[_text(_named(node)[0])] = node
        return found

    def param_default(self, name: str) -> Any | None:
        node = self.declarations("parameter")[name]
        children = node.children
        for i, child in enumerate(children):
            if child.type == "=":
                return children[i + 1]
        return None

    def body(self, declaration: Any) -> Any:
        """The value after `=` of a declaration (an object, or a `for` over objects)."""
        children = declaration.children
        for i, child in enumerate(children):
            if child.type == "=":
                return children[i + 1]
        raise Unevaluable(f"{self.where(declaration)}: declaration without a value")

    def declaration_target(self, declaration: Any) -> str:
        """The type string of a resource or the path of a module."""
        strings = [c for c in _named(declaration) if c.type == "string"]
        return self.literal(strings[0])

    def resources(self, type_prefix: str) -> list[Any]:
        return [
            node
            for node in self.declarations("resource").values()
            if self.declaration_target(node).startswith(type_prefix + "@")
        ]

    def module(self, path: str) -> Any:
        matches = [m for m in self.declarations("module").values() if self.declaration_target(m) == path]
        assert len(matches) == 1, f"{self.path.name}: expected one module {path}, found {len(matches)}"
        return matches[0]

    # --- objects -------------------------------------------------------------------------------------

    def properties(self, obj: Any) -> Iterator[tuple[str, Any]]:
        if obj.type != "object":
            raise Unevaluable(f"{self.where(obj)}: expected an object, found {obj.type}")
        for prop in _named(obj):
            if prop.type != "object_property":
                continue
            key, *rest = _named(prop)
            if not rest:  # a nested resource declaration
                continue
            name = _text(key) if key.type == "identifier" else self.literal(key)
            yield name, rest[-1]

    def prop(self, obj: Any, *path: str) -> Any:
        node = obj
        for key in path:
            found = dict(self.properties(node)).get(key)
            if found is None:
                raise Unevaluable(f"{self.where(node)}: no property {key!r}")
            node = found
        return node

    # --- values --------------------------------------------------------------------------------------

    def literal(self, node: Any) -> str:
        if node.type != "string" or any(c.type == "interpolation" for c in node.named_children):
            raise Unevaluable(f"{self.where(node)}: expected a plain string, found {_text(node)}")
        return self.value(node, {})

    def value(self, node: Any, env: Mapping[str, Any]) -> Any:
        """Evaluate a constant expression: literals, interpolation, arrays, `for`, `?:`, `!`, names."""
        kind = node.type
        if kind == "string":
            parts = []
            for child in node.named_children:
                if child.type == "string_content":
                    parts.append(_text(child))
                elif child.type == "escape_sequence":
                    parts.append(bytes(_text(child), "ascii").decode("unicode_escape"))
                elif child.type == "interpolation":
                    parts.append(str(self.value(_named(child)[0], env)))
            return "".join(parts)
        if kind == "number":
            return int(_text(node))
        if kind == "boolean":
            return _text(node) == "true"
        if kind == "null":
            return None
        if kind == "array":
            return [self.value(item, env) for item in _named(node)]
        if kind == "for_statement":
            variable, iterable, body = _named(node)
            return [self.value(body, {**env, _text(variable): item}) for item in self.value(iterable, env)]
        if kind == "ternary_expression":
            branch = node.child_by_field_name("consequence" if self.truth(node, env) else "alternative")
            return self.value(branch, env)
        if kind == "unary_expression" and _text(node).startswith("!"):
            return not self.value(node.child_by_field_name("argument"), env)
        if kind == "parenthesized_expression":
            return self.value(_named(node)[0], env)
        if kind == "identifier":
            return self.lookup(node, env, self.value)
        raise Unevaluable(f"{self.where(node)}: cannot evaluate {kind}: {_text(node)}")

    def truth(self, ternary: Any, env: Mapping[str, Any]) -> bool:
        result = self.value(ternary.child_by_field_name("condition"), env)
        if not isinstance(result, bool):
            raise Unevaluable(f"{self.where(ternary)}: condition is not a bool")
        return result

    def lookup(self, node: Any, env: Mapping[str, Any], then: Any) -> Any:
        name = _text(node)
        if name in env:
            return env[name]
        variables = self.declarations("variable")
        if name in variables:
            return then(self.body(variables[name]), env)
        if name in self.declarations("parameter"):
            default = self.param_default(name)
            if default is None:
                raise Unevaluable(f"{self.where(node)}: parameter {name} has no default and no value")
            return then(default, env)
        raise Unevaluable(f"{self.where(node)}: unknown name {name}")

    def entries(self, node: Any, env: Mapping[str, Any]) -> dict[str, Any]:
        """The keys (with their value nodes) of an object expression: literals, vars, union(), ?:."""
        kind = node.type
        if kind == "object":
            return dict(self.properties(node))
        if kind == "identifier":
            return self.lookup(node, env, self.entries)
        if kind == "ternary_expression":
            branch = node.child_by_field_name("consequence" if self.truth(node, env) else "alternative")
            return self.entries(branch, env)
        if kind == "call_expression":
            function = _text(node.child_by_field_name("function"))
            arguments = _named(node.child_by_field_name("arguments"))
            if function == "union":
                merged: dict[str, Any] = {}
                for argument in arguments:
                    merged.update(self.entries(argument, env))
                return merged
        raise Unevaluable(f"{self.where(node)}: cannot read the keys of {kind}: {_text(node)[:60]}")


# ---------------------------------------------------------------------------------------------------
# Syntax
# ---------------------------------------------------------------------------------------------------

# tree-sitter-bicep 1.1.0 predates two forms this repository uses, and checkov's pinned pycep 0.5.1 the
# first one too (test_the_parsers_still_need_the_workaround proves both):
#   - `extension <alias>` (modules/appregistration.bicep, the Microsoft Graph extension);
#   - the assignments of a `.bicepparam` file, `param <name> = <value>` (no type).
# The smallest honest workaround: match the statement's exact form, then give the parser the same bytes
# with only that keyword replaced by something of the same width: the `extension <alias>` line becomes
# blanks, `param` in a .bicepparam becomes `var  `. Every other byte, and so every error and its line and
# column, stays as written; any other `extension` form is left in and reported as an error.
EXTENSION_STATEMENT = re.compile(rb"^extension[ \t]+[A-Za-z_][A-Za-z0-9_]*[ \t]*$", re.MULTILINE)
PARAM_ASSIGNMENT = re.compile(rb"^param(?=[ \t]+[A-Za-z_][A-Za-z0-9_]*[ \t]*=)", re.MULTILINE)


def for_old_parsers(path: Path, source: bytes) -> bytes:
    """`source` as tree-sitter-bicep 1.1.0 and pycep 0.5.1 can read it (see above)."""
    source = EXTENSION_STATEMENT.sub(lambda m: b" " * len(m.group(0)), source)
    if path.suffix == ".bicepparam":
        source = PARAM_ASSIGNMENT.sub(b"var  ", source)
    return source


def extension_aliases(path: Path) -> list[str]:
    return [m.group(0).split()[1].decode() for m in EXTENSION_STATEMENT.finditer(path.read_bytes())]


def _syntax_errors(path: Path, source: bytes) -> list[str]:
    source = for_old_parsers(path, source)
    errors = []

    def walk(node: Any) -> None:
        if node.type == "ERROR":
            errors.append(f"{_where(path, node)}: syntax error near {_text(node)[:40]!r}")
        elif node.is_missing:
            errors.append(f"{_where(path, node)}: missing {node.type!r}")
        for child in node.children:
            walk(child)

    walk(_parser().parse(source).root_node)
    return errors


def _bicep_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicep"))


def _bicepparam_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicepparam"))


def test_every_bicep_and_bicepparam_file_parses_without_errors():
    files = _bicep_files() + _bicepparam_files()
    assert MAIN in files and len(files) > 1, "infra/main.bicep and its modules are missing"
    assert _bicepparam_files(), "the plain az parameters file (infra/az.bicepparam) is missing"
    errors = [error for path in files for error in _syntax_errors(path, path.read_bytes())]
    assert errors == []


def _raw_errors(source: bytes) -> bool:
    def bad(node: Any) -> bool:
        return node.type == "ERROR" or node.is_missing or any(bad(c) for c in node.children)

    return bad(_parser().parse(source).root_node)


def test_the_parsers_still_need_the_workaround():
    """If this fails, the grammar learned the syntax: drop for_old_parsers instead of keeping a hack."""
    assert _raw_errors(b"extension microsoftGraphV1\n")
    assert _raw_errors(b"using './main.bicep'\n\nparam a = 'x'\n")
    assert not _raw_errors(b"using './main.bicep'\n")  # `using` itself is understood


def test_the_workaround_hides_no_errors_and_keeps_their_positions():
    param_file = INFRA / "broken.bicepparam"
    assert _syntax_errors(param_file, b"using './main.bicep'\nparam a = {\n  b 1\n}\n") == [
        "infra/broken.bicepparam:3:3: syntax error near 'b 1'"
    ]
    assert _syntax_errors(param_file, b"using './main.bicep'\nparam a = readEnvironmentVariable('A'\n") == [
        "infra/broken.bicepparam:2:38: missing ')'"
    ]
    module = INFRA / "broken.bicep"
    assert _syntax_errors(module, b"extension microsoftGraphV1\nparam a string\n") == []
    assert _syntax_errors(module, b"extension 'br:mcr.microsoft.com/x:1.0'\nparam a string\n") != []
    assert _syntax_errors(module, b"extension microsoftGraphV1\nparam a = 'x'\n") != []  # not in .bicep


def test_every_extension_alias_is_configured_in_bicepconfig():
    """An alias Bicep cannot resolve fails the build; bicepconfig.json maps it to a pinned artifact."""
    config = json.loads(
        "\n".join(
            line
            for line in (INFRA / "bicepconfig.json").read_text().splitlines()
            if not line.strip().startswith("//")
        )
    )
    used = {alias for path in _bicep_files() for alias in extension_aliases(path)}
    assert used == {"microsoftGraphV1"}
    for alias in used:
        assert re.fullmatch(
            r"br:mcr\.microsoft\.com/bicep/extensions/microsoftgraph/v1\.0:\d+\.\d+\.\d+",
            config["extensions"][alias],
        ), "pin a released version of the Microsoft Graph v1.0 extension"


def test_syntax_check_reports_a_broken_file_with_line_and_column():
    """tree-sitter recovers from errors silently; this proves the walk above would report them."""
    missing_colon = b"param a string\nvar b = {\n  c 1\n}\n"
    assert _syntax_errors(INFRA / "broken.bicep", missing_colon) == [
        "infra/broken.bicep:3:3: syntax error near 'c 1'"
    ]
    unclosed_array = b"var c = [\n  1\n  2\n"
    assert _syntax_errors(INFRA / "broken.bicep", unclosed_array) == ["infra/broken.bicep:3:4: missing ']'"]


# ---------------------------------------------------------------------------------------------------
# checkov
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory) -> dict[str, Any]:
    """checkov over a copy of infra/ as its parser can read it (for_old_parsers: the `extension` line).

    checkov's Bicep runner reads `.bicep` files only; the `.bicepparam` file is checked by tree-sitter
    and by the parameter checker (tests/test_infra_deploy.py).
    """
    copy = tmp_path_factory.mktemp("checkov") / "infra"
    shutil.copytree(INFRA, copy)
    for path in copy.rglob("*.bicep"):
        path.write_bytes(for_old_parsers(path, path.read_bytes()))
    command = [
        _checkov_executable(),
        "--framework",
        "bicep",
        "-d",
        str(copy),
        "--skip-download",
        "-o",
        "json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)
    # Exit code 1 means failed checks, which the tests below report in detail.
    assert result.returncode in (0, 1), f"checkov crashed ({result.returncode}): {result.stderr[-2000:]}"
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    bicep = [r for r in reports if r.get("check_type") == "bicep"]
    assert len(bicep) == 1, f"no bicep report in checkov's output: {result.stdout[:500]}"
    return bicep[0]


def test_checkov_parses_every_file_and_scans_resources(checkov_report):
    summary = checkov_report["summary"]
    # Its pinned pycep parser fails silently on newer syntax (typed arrays, `int?`, imports): the only
    # sign is this count, and then the file's resources are simply not scanned.
    assert summary["parsing_errors"] == 0, checkov_report["results"].get("parsing_errors")
    assert summary["resource_count"] > 0
    assert summary["passed"] > 0


def test_checkov_finds_no_failed_checks(checkov_report):
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['resource']} in {c['file_path']}"
        for c in checkov_report["results"].get("failed_checks", [])
    ]
    assert failed == []


def test_checkov_skips_are_exactly_the_reviewed_ones(checkov_report):
    skipped = checkov_report["results"].get("skipped_checks", [])
    unjustified = [
        c["check_id"] for c in skipped if not c["check_result"].get("suppress_comment", "").strip()
    ]
    assert unjustified == [], "every checkov:skip needs a reason after the id"
    assert {c["check_id"] for c in skipped} == set(ALLOWED_CHECKOV_SKIPS)


# ---------------------------------------------------------------------------------------------------
# App settings (BEHAVIOUR §6) against shared/config.py
# ---------------------------------------------------------------------------------------------------


def _deployed_settings(use_federated_credential: bool) -> dict[str, Any]:
    """App settings of the function app in one sign-in mode: name -> value node in functionapp.bicep."""
    bicep = BicepFile.load(FUNCTION_APP)
    (site,) = bicep.resources("Microsoft.Web/sites")
    app_settings = bicep.prop(bicep.body(site), "properties", "siteConfig", "appSettings")
    assert app_settings.type == "for_statement", (
        f"{bicep.where(app_settings)}: expected [for ... in items(...)]"
    )
    variable, iterable, body = _named(app_settings)
    assert _text(iterable.child_by_field_name("function")) == "items", bicep.where(iterable)
    assert _text(bicep.prop(body, "name")) == f"{_text(variable)}.key", bicep.where(body)
    assert _text(bicep.prop(body, "value")) == f"{_text(variable)}.value", bicep.where(body)
    (settings_object,) = _named(iterable.child_by_field_name("arguments"))
    return bicep.entries(settings_object, {"useFederatedCredential": use_federated_credential})


def _expected_setting_names() -> set[str]:
    return (set(SETTING_NAMES) - LOCAL_ONLY_SETTINGS) | HOST_OWNED_SETTINGS


def test_deployment_sets_exactly_the_settings_the_code_and_host_read():
    deployed = set(_deployed_settings(False)) | set(_deployed_settings(True))
    expected = _expected_setting_names()
    assert sorted(deployed - expected) == [], "set by Bicep but read by neither the code nor the host"
    assert sorted(expected - deployed) == [], "read by the code but never set by Bicep"


def test_allow_lists_do_not_hide_settings_the_code_reads():
    assert set(SETTING_NAMES) >= LOCAL_ONLY_SETTINGS
    assert not HOST_OWNED_SETTINGS & set(SETTING_NAMES), (
        "a host-owned setting is read by the code: drop it here"
    )


@pytest.mark.parametrize("federated", [False, True], ids=["client-secret", "secretless"])
def test_each_sign_in_mode_sets_its_credential_and_not_the_other(federated):
    names = set(_deployed_settings(federated))
    present, absent = (
        (FEDERATED_MODE_ONLY, SECRET_MODE_ONLY) if federated else (SECRET_MODE_ONLY, FEDERATED_MODE_ONLY)
    )
    assert names >= present
    assert not names & absent
    assert names == _expected_setting_names() - absent


def test_client_secret_is_a_key_vault_reference_not_a_value():
    bicep = BicepFile.load(FUNCTION_APP)
    secret = _deployed_settings(False)["SYNC_CLIENT_SECRET"]
    assert secret.type == "string", bicep.where(secret)
    assert _text(secret).startswith("'@Microsoft.KeyVault(VaultName=${"), bicep.where(secret)
    assert ";SecretName=${" in _text(secret), bicep.where(secret)


def _main_default_for(setting_value: Any) -> Any:
    """Follow an app setting's value (a module parameter) to main.bicep and return its default there."""
    module_file = BicepFile.load(FUNCTION_APP)
    node = setting_value
    if node.type == "call_expression" and _text(node.child_by_field_name("function")) == "string":
        (node,) = _named(node.child_by_field_name("arguments"))
    if node.type != "identifier" or _text(node) not in module_file.declarations("parameter"):
        raise Unevaluable(f"{module_file.where(setting_value)}: expected a module parameter")
    main = BicepFile.load(MAIN)
    argument = main.prop(main.body(main.module("./modules/functionapp.bicep")), "params", _text(node))
    if argument.type != "identifier" or _text(argument) not in main.declarations("parameter"):
        raise Unevaluable(f"{main.where(argument)}: expected a parameter of main.bicep")
    default = main.param_default(_text(argument))
    if default is None:
        raise Unevaluable(f"{main.where(argument)}: parameter {_text(argument)} has no default")
    return main.value(default, {})


def test_deployed_defaults_equal_the_code_defaults():
    deployed = _deployed_settings(False)
    with_defaults = [s for s in SETTINGS if s.default is not None and s.name in deployed]
    assert {s.name for s in with_defaults} >= {"SYNC_SCHEDULE", "SYNC_TABLE_PREFIX", "BC_API_BASE_URL"}
    mismatches = {
        s.name: (s.default, _main_default_for(deployed[s.name]))
        for s in with_defaults
        if str(_main_default_for(deployed[s.name])) != s.default
    }
    assert mismatches == {}, "setting: (default in shared/config.py, default in main.bicep)"


def test_no_storage_account_keys_anywhere():
    """Shared-key access is off, so a key or connection string would only be a broken credential."""
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _bicep_files()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"listKeys\(|AccountKey=|listConnectionStrings\(", line)
    ]
    assert offenders == []
    storage = BicepFile.load(STORAGE)
    (account,) = storage.resources("Microsoft.Storage/storageAccounts")
    properties = storage.prop(storage.body(account), "properties")
    assert _text(storage.prop(properties, "allowSharedKeyAccess")) == "false"


# ---------------------------------------------------------------------------------------------------
# Queue and tables
# ---------------------------------------------------------------------------------------------------


def _created_names(resource_type: str, module_param: str) -> list[str]:
    """Names of the looped child resources in storage.bicep, as main.bicep's arguments make them."""
    storage = BicepFile.load(STORAGE)
    (resource,) = storage.resources(resource_type)
    loop = storage.body(resource)
    assert loop.type == "for_statement", f"{storage.where(loop)}: expected a loop over {module_param}"
    variable, iterable, body = _named(loop)
    assert _text(iterable) == module_param, storage.where(iterable)
    assert _text(storage.prop(body, "name")) == _text(variable), storage.where(body)
    main = BicepFile.load(MAIN)
    argument = main.prop(main.body(main.module("./modules/storage.bicep")), "params", module_param)
    return main.value(argument, {})


def test_deployment_creates_the_worker_queue_and_its_poison_queue():
    queues = _created_names("Microsoft.Storage/storageAccounts/queueServices/queues", "queueNames")
    assert sorted(queues) == [WORKER_QUEUE, f"{WORKER_QUEUE}-poison"]


def test_every_queue_trigger_listens_on_a_deployed_queue():
    queues = set(_created_names("Microsoft.Storage/storageAccounts/queueServices/queues", "queueNames"))
    triggers = [
        (path.relative_to(ROOT), binding.get("queueName"))
        for path in sorted(ROOT.glob("function_*/function.json"))
        for binding in json.loads(path.read_text()).get("bindings", [])
        if binding.get("type") == "queueTrigger"
    ]
    assert [t for t in triggers if t[1] not in queues] == []


def test_deployment_creates_the_five_tables_for_the_default_prefix():
    tables = _created_names("Microsoft.Storage/storageAccounts/tableServices/tables", "tableNames")
    assert sorted(tables) == sorted(DEFAULT_TABLE_PREFIX + suffix for suffix in TABLE_SUFFIXES)


# ---------------------------------------------------------------------------------------------------
# azd and the parameter file
# ---------------------------------------------------------------------------------------------------


def test_parameter_file_matches_main_bicep():
    main = BicepFile.load(MAIN)
    declared = main.declarations("parameter")
    required = {name for name in declared if main.param_default(name) is None}
    given = set(json.loads((INFRA / "main.parameters.json").read_text())["parameters"])
    assert sorted(given - set(declared)) == [], "unknown parameters make the deployment fail"
    assert sorted(required - given) == [], "required parameters missing from main.parameters.json"


def test_azd_service_matches_the_function_app_tag():
    """`azd deploy` finds the app by its azd-service-name tag, so the names must agree."""
    azure_yaml = (ROOT / "azure.yaml").read_text()
    services = re.search(r"^services:\n((?:[ #].*\n?)*)", azure_yaml, re.MULTILINE)
    assert services, "azure.yaml has no services"
    names = re.findall(r"^  (\w[\w-]*):\s*$", services.group(1), re.MULTILINE)
    assert names == ["app"]
    assert re.search(r"^    host: function\s*$", services.group(1), re.MULTILINE)
    assert re.search(r"^    language: python\s*$", services.group(1), re.MULTILINE)
    bicep = BicepFile.load(FUNCTION_APP)
    (site,) = bicep.resources("Microsoft.Web/sites")
    tags = bicep.prop(bicep.body(site), "tags")
    assert _text(tags.child_by_field_name("function")) == "union", bicep.where(tags)
    service_tag = bicep.entries(tags, {"tags": {}})
    assert bicep.value(service_tag["azd-service-name"], {}) == "app"
