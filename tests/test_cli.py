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
    assert code == 0 and out.count("ok  ") == 6  # five checks and bcFields

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


def test_clear_errors(world, capsys, monkeypatch):
    code, _ = run("sync", "--user", "nobody@contoso.example")
    assert code == 2 and "no settings for nobody@contoso.example" in capsys.readouterr().err

    code, _ = run("users", "get", "not an address")
    assert code == 2 and "user:" in capsys.readouterr().err

    monkeypatch.delenv("BC_COMPANY_ID")
    code, _ = run("users", "list")
    err = capsys.readouterr().err
    assert code == 2 and "BC_COMPANY_ID" in err
