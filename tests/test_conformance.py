"""`python -m shared conformance --user <upn>`, run as an operator would, against the sandbox.

The command must say `ok` for every assumption on a tenant that behaves as Microsoft documents (the
sandbox as it is), say `differs` with what to do when the tenant does not (sandbox switches that
break one documented behaviour each), never write to Business Central, and leave the mailbox as it
found it, also when a step fails halfway.
"""

from __future__ import annotations

import io
import json

import pytest

from sandbox.cloud import Cloud
from shared.cli import main

ALICE = "alice@contoso.example"
WRITE_KINDS = ("contacts.create", "contacts.update", "contacts.delete")


@pytest.fixture
def tenant(cloud: Cloud, monkeypatch: pytest.MonkeyPatch) -> Cloud:
    """The app's settings without any storage setting: the check must not need Table Storage."""
    for key, value in cloud.env("unused").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AzureWebJobsStorage")
    monkeypatch.delenv("AzureWebJobsStorage__tableServiceUri", raising=False)
    cloud.graph.add_mailbox(ALICE)
    cloud.graph.user_create_folder(ALICE, "Business Central")  # the user's own folder stays untouched
    cloud.bc.seed_contact(cloud.company_id, type="Person", displayName="Existing Person")
    return cloud


def conformance(*extra: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["conformance", "--user", ALICE, *extra], out=out)
    return code, out.getvalue()


def findings(*extra: str) -> tuple[int, dict[str, dict]]:
    code, out = conformance("--json", *extra)
    return code, {f["assumption"]: f for f in json.loads(out)["findings"]}


def mailbox_state(cloud: Cloud) -> dict[str, list[str]]:
    """Every folder of the mailbox (by name) with the names of its contacts, default folder included."""
    folders = {f["displayName"]: f["id"] for f in cloud.graph.folders(ALICE)}
    state = {
        name: sorted(c["displayName"] for c in cloud.graph.folder_contacts(ALICE, fid))
        for name, fid in folders.items()
    }
    state["(default Contacts)"] = sorted(c["displayName"] for c in cloud.graph.folder_contacts(ALICE, None))
    return state


def bc_writes(cloud: Cloud) -> int:
    return sum(cloud.bc.counters.item_count(kind=k) for k in WRITE_KINDS)


def differs(found: dict[str, dict]) -> dict[str, dict]:
    return {name: f for name, f in found.items() if f["verdict"] != "ok"}


def test_every_assumption_holds_on_a_documented_tenant_and_nothing_is_left_behind(tenant: Cloud):
    before = mailbox_state(tenant)
    bc_before = [dict(c) for c in tenant.bc.contacts(tenant.company_id)]

    code, out = conformance()

    assert code == 0, out
    assert "  differs  " not in out and "All assumptions hold." in out
    rows = [line for line in out.splitlines() if "  ok  " in line]
    assert len(rows) == 17, out  # 2 tokens, 9 Graph, 6 Business Central
    for expected in (
        "immutable id differs from the REST id",
        "@removed",
        "JSON answer",
        "countries/regions",
        "read with their picture's metadata",
        "not contacts: the change poll asks every minute",  # the documented list has no contacts
    ):
        assert expected in out
    # Outlook: the scratch folder and its contacts are gone; the user's own folder is untouched.
    assert mailbox_state(tenant) == before
    # Business Central: not one write, and the data is as it was.
    assert bc_writes(tenant) == 0
    assert tenant.bc.contacts(tenant.company_id) == bc_before
    # No token, secret or mailbox address in what the operator sees.
    assert ALICE not in out and tenant.client_secret not in out and "eyJ" not in out


def test_a_graph_that_ignores_the_immutable_id_preference_is_reported(tenant: Cloud):
    tenant.graph.honour_immutable_ids = False

    code, found = findings()

    assert code == 1
    row = found['Graph: Prefer IdType="ImmutableId" gives stable, distinct ids']
    assert row["verdict"] == "differs"
    assert "the REST id and the immutable id are the same" in row["saw"]
    assert "Exchange Online" in row["todo"]
    assert set(differs(found)) == {row["assumption"]}  # the other checks still ran and passed
    assert mailbox_state(tenant) == {"Business Central": [], "(default Contacts)": []}


def test_a_bc_batch_answered_in_multipart_is_reported_without_a_crash(tenant: Cloud):
    tenant.bc.json_batch_answers = False

    code, out = conformance()

    assert code == 1
    line = next(line for line in out.splitlines() if line.startswith("BC: read-only $batch"))
    assert "differs" in line and "multipart/mixed" in line and "not JSON" in line
    assert "Accept header" in out  # what to do
    assert bc_writes(tenant) == 0


def test_a_bc_that_refuses_expand_picture_says_to_turn_sync_photos_off(tenant: Cloud):
    tenant.bc.faults.error(400, method="GET", path_regex=r"/contacts$", in_batch=False)

    code, found = findings()

    assert code == 1
    assert list(differs(found)) == ["BC: contacts with $expand=picture (syncPhotos)"]
    assert '"syncPhotos": false' in found["BC: contacts with $expand=picture (syncPhotos)"]["todo"]


def test_a_step_failing_midway_still_removes_the_scratch_folder(tenant: Cloud):
    # Graph fails the delta round with a 500 (JSON error body, not retried) after folder and contacts
    # were created: the later steps still run or say why not, and cleanup removes everything.
    tenant.graph.faults.error(500, path_regex=r"/delta$")
    before = mailbox_state(tenant)

    code, found = findings()

    assert code == 1
    delta = found["Graph: folder delta paging and @removed"]
    assert delta["verdict"] == "differs" and "500" in delta["saw"]
    assert found["Graph: cleanup of the scratch folder"]["verdict"] == "ok"
    assert mailbox_state(tenant) == before
    assert tenant.graph.faults.fired["500"] == 1


def test_a_cleanup_that_fails_is_reported_with_the_folder_to_remove(tenant: Cloud):
    tenant.graph.faults.error(500, count=2, method="POST", path_regex=r"/permanentDelete$")
    tenant.graph.faults.error(500, method="DELETE", path_regex=r"/contactFolders/[^/]+$")

    code, found = findings()

    assert code == 1
    row = found["Graph: cleanup of the scratch folder"]
    assert row["verdict"] == "differs" and "500" in row["saw"]
    assert "BC Contact Sync conformance" in row["todo"] and "by hand" in row["todo"]
    leftover = [name for name in mailbox_state(tenant) if name.startswith("BC Contact Sync conformance")]
    assert len(leftover) == 1 and leftover[0] in row["todo"]


def test_a_wrong_secret_creates_nothing_and_names_the_settings(tenant: Cloud, monkeypatch):
    monkeypatch.setenv("SYNC_CLIENT_SECRET", "not-the-secret")

    code, found = findings()

    assert code == 1
    token_row = found["Graph token (client credentials)"]
    assert token_row["verdict"] == "differs" and "invalid_client" in token_row["saw"]
    assert "SYNC_CLIENT_ID" in token_row["todo"]
    assert all(f["verdict"] == "differs" for f in found.values())
    assert tenant.graph.counters.http_total == 0 and tenant.bc.counters.http_total == 0


def test_a_missing_setting_is_named_and_nothing_is_sent(tenant: Cloud, monkeypatch, capsys):
    monkeypatch.delenv("BC_COMPANY_ID")

    code, out = conformance()

    assert code == 2 and out == ""
    assert "BC_COMPANY_ID" in capsys.readouterr().err
    assert tenant.graph.counters.http_total == 0 and tenant.bc.counters.http_total == 0


def test_a_delta_link_to_another_host_is_refused_unsent_and_reported(tenant: Cloud):
    # A misrouted (or hostile) answer points the deltaLink at another host: the check must not
    # follow it with the bearer token, must say so, and must still clean up.
    tenant.graph.faults.foreign_links("https://graph.attacker.example", path_regex=r"/delta$")

    code, found = findings()

    assert code == 1
    delta = found["Graph: folder delta paging and @removed"]
    assert delta["verdict"] == "differs"
    assert "refused to follow a link to https://graph.attacker.example" in delta["saw"]
    assert "GRAPH_BASE_URL" in delta["todo"]
    assert found["Graph: cleanup of the scratch folder"]["verdict"] == "ok"
    assert tenant.graph.faults.fired["relink"] == 1


def test_a_bc_version_without_job_title_is_reported_with_what_the_sync_leaves_out(tenant: Cloud):
    tenant.bc.contact_fields_absent = frozenset({"jobTitle"})

    code, found = findings()

    assert code == 1
    row = found["BC: $metadata contact fields the mapping uses"]
    assert row["verdict"] == "differs" and row["saw"] == "the contact entity lacks jobTitle"
    assert "leaves jobTitle out" in row["todo"] and "update the environment" in row["todo"]
    assert set(differs(found)) == {row["assumption"]}
    assert bc_writes(tenant) == 0


def test_a_bc_version_without_a_field_the_sync_cannot_do_without_says_it_cannot_sync(tenant: Cloud):
    tenant.bc.contact_fields_absent = frozenset({"email", "jobTitle"})

    code, found = findings()

    assert code == 1
    row = found["BC: $metadata contact fields the mapping uses"]
    assert row["saw"] == "the contact entity lacks jobTitle, email"
    assert row["todo"].startswith("the sync cannot run without email")
