"""The operator CLI, run as an operator would, against the sandbox and Azurite."""

from __future__ import annotations

import io
import json

from shared.cli import main

ALICE = "alice@contoso.example"


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_users_validate_sync_and_report(world, tmp_path, capsys):
    world.cloud.graph.add_mailbox(ALICE)
    world.person("Cli Person", city="Oslo")
    world.person("Other Person", city="Bergen")
    settings = tmp_path / "alice.json"
    settings.write_text(json.dumps({"filter": {"city": "Oslo"}, "folderName": "BC"}))

    code, out = run("users", "put", ALICE, "--file", str(settings))
    assert code == 0 and json.loads(out)["filter"] == {"city": "Oslo"}
    code, out = run("users", "list")
    assert [u["user"] for u in json.loads(out)["users"]] == [ALICE]

    code, out = run("validate", "--user", ALICE)
    assert code == 0 and out.count("ok  ") == 8  # five checks, bcFields, bcWebhooks and categoryPermission

    code, out = run("sync", "--user", ALICE, "--mode", "full", "--dry-run")
    assert code == 0 and "(dry run)" in out and "outlookCreated" in out
    assert world.outlook() == []

    code, out = run("sync", "--user", ALICE, "--json")
    report = json.loads(out)
    assert code == 0 and report["status"] == "succeeded" and report["counts"]["outlookCreated"] == 1
    assert [c["displayName"] for c in world.outlook()] == ["Cli Person"]

    code, out = run("report", report["runId"])
    assert code == 0 and f"Run {report['runId']}" in out and "Status: succeeded" in out

    code, out = run("sync", "--all")
    assert code == 0 and "Status: succeeded" in out


def test_a_user_syncs_into_the_default_contacts_folder_through_the_cli(world, tmp_path):
    """BEHAVIOUR §4.8 through the operator CLI: folderName null and a category of one's own."""
    world.cloud.graph.add_mailbox(ALICE)
    world.person("Cli Person", "cli@example.com")
    settings = tmp_path / "alice.json"
    settings.write_text(json.dumps({"folderName": None, "category": "Kunder"}))
    code, out = run("users", "put", ALICE, "--file", str(settings))
    assert code == 0 and json.loads(out)["folderName"] is None and json.loads(out)["category"] == "Kunder"
    code, out = run("sync", "--user", ALICE, "--json")
    assert code == 0 and json.loads(out)["counts"]["outlookCreated"] == 1
    [contact] = world.cloud.graph.folder_contacts(ALICE, None)
    assert contact["displayName"] == "Cli Person" and contact["categories"] == ["Kunder"]
    assert world.cloud.graph.folders(ALICE) == []


def test_clear_errors(world, capsys, monkeypatch):
    code, _ = run("sync", "--user", "nobody@contoso.example")
    assert code == 2 and "no settings for nobody@contoso.example" in capsys.readouterr().err

    code, _ = run("users", "get", "not an address")
    assert code == 2 and "user:" in capsys.readouterr().err

    monkeypatch.delenv("BC_COMPANY_ID")
    code, _ = run("users", "list")
    err = capsys.readouterr().err
    assert code == 2 and "BC_COMPANY_ID" in err


def test_report_tables_name_contacts_by_name_and_email_never_by_id(world):
    """A person reads the report: each row names the contact as they know it, not by an internal id."""
    world.user(ALICE)
    kept = world.person("Named Person")
    nameless = world.cloud.bc.seed_contact(world.company, type="Person", displayName="No Email Person")
    code, out = run("sync", "--user", ALICE, "--mode", "full")
    report = world.services.store.list_reports(ALICE)[0]
    ids = {i for item in report.items for i in (item.bcId, item.outlookId) if i}
    assert code == 0 and ids and not any(i in out for i in ids)
    rows = {line.split()[0]: line for line in out.splitlines()[-2:]}
    assert "Named Person" in rows["outlookCreated"] and kept["email"] in rows["outlookCreated"]
    assert "No Email Person" in rows["skipped"] and "no email address" in rows["skipped"]
    assert nameless["id"] not in out
