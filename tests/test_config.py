"""App settings (BEHAVIOUR §6): defaults, and a clear error naming the setting for anything wrong."""

from __future__ import annotations

import pytest

from shared.config import SETTING_NAMES, Config, ConfigError

GOOD = {
    "SYNC_TENANT_ID": "contoso.onmicrosoft.com",
    "SYNC_CLIENT_ID": "6f1c2c1e-1111-4222-8333-944445555666",
    "SYNC_CLIENT_SECRET": "not-a-real-secret-value",
    "BC_ENVIRONMENT": "production",
    "BC_COMPANY_ID": "9E1C2C1E-1111-4222-8333-944445555666",
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
}


def test_defaults():
    c = Config.from_env(GOOD)
    assert c.authority == "https://login.microsoftonline.com/contoso.onmicrosoft.com"
    assert c.bc_base_url == "https://api.businesscentral.dynamics.com/v2.0"
    assert c.graph_base_url == "https://graph.microsoft.com/v1.0"
    assert c.table_prefix == "ContactSync" and c.schedule == "0 */15 * * * *"
    assert c.bc_company_id == "9e1c2c1e-1111-4222-8333-944445555666"
    assert (c.inline_budget_seconds, c.full_sync_hours) == (90, 24)
    assert "not-a-real-secret-value" not in repr(c)


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("SYNC_TENANT_ID", None, "missing"),
        ("SYNC_TENANT_ID", "not a tenant", "GUID"),
        ("SYNC_CLIENT_ID", "abc", "GUID"),
        ("SYNC_CLIENT_SECRET", None, "missing"),
        ("SYNC_CLIENT_SECRET", "@Microsoft.KeyVault(SecretUri=https://kv/secrets/x)", "Key Vault"),
        ("BC_ENVIRONMENT", "prod env!", "environment name"),
        ("BC_COMPANY_ID", "CRONUS", "GUID"),
        ("AzureWebJobsStorage", None, "missing"),
        ("SYNC_AUTHORITY_HOST", "http://login.example", "https"),
        ("GRAPH_BASE_URL", "ftp://graph", "https"),
        ("SYNC_TABLE_PREFIX", "1bad-prefix", "letter"),
        ("SYNC_SCHEDULE", "every quarter hour", "six fields"),
        ("SYNC_INLINE_BUDGET_SECONDS", "0", "between"),
        ("SYNC_FULL_SYNC_HOURS", "daily", "number"),
    ],
)
def test_bad_settings_fail_fast_naming_the_setting(name, value, words):
    env = dict(GOOD)
    if value is None:
        env.pop(name)
    else:
        env[name] = value
    with pytest.raises(ConfigError) as err:
        Config.from_env(env)
    assert err.value.setting == name and name in str(err.value) and words in str(err.value)
    if value and len(value) > 3:
        assert value not in str(err.value)  # values (possibly secrets) are never echoed


def test_secretless_and_identity_based_storage():
    env = {k: v for k, v in GOOD.items() if k not in ("SYNC_CLIENT_SECRET", "AzureWebJobsStorage")}
    env["SYNC_MANAGED_IDENTITY_CLIENT_ID"] = "7f1c2c1e-1111-4222-8333-944445555666"
    env["AzureWebJobsStorage__tableServiceUri"] = "https://acct.table.core.windows.net/"
    c = Config.from_env(env)
    assert c.client_secret is None and c.managed_identity_client_id.startswith("7f1c")
    assert c.table_service_uri == "https://acct.table.core.windows.net"


def test_every_declared_setting_is_known_to_the_example_file():
    import json
    from pathlib import Path

    example = json.loads((Path(__file__).parent.parent / "local.settings.example.json").read_text())["Values"]
    assert set(SETTING_NAMES) <= set(example)
