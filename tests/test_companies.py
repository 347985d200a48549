"""Several Business Central companies for one salesperson (BEHAVIOUR §5.4), through the HTTP API.

What the salesperson sees in Outlook and in each BC company, and what the run report says, when the
settings list `companies`: each company with its own filter and category, a contact of each company
its own Outlook contact, new Outlook contacts going to the company whose category they carry, a
company taken off the list leaving the folder under the mass-removal guard, and one company's
failure leaving the other's contacts to sync.
"""

from __future__ import annotations

from typing import Any

import pytest
from azure.functions.timer import TimerRequest

import function_change_poll
from sandbox.bindings import Collector
from shared.model import WRITE_ACTIONS
from tests.world import tag

ALICE = "alice@contoso.example"
CRONUS = "CRONUS International Ltd."
FABRIKAM = "Fabrikam, Inc."


def _email(contact: dict[str, Any]) -> str:
    return str((contact.get("emailAddresses") or [{}])[0].get("address", "")).lower()


def _writes(report: dict[str, Any]) -> int:
    return sum(report["counts"][key] for key in WRITE_ACTIONS)


def _sync(client, **body: Any) -> dict[str, Any]:
    resp = client("POST", "sync", {"user": ALICE, **body})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def _put(client, settings: dict[str, Any]) -> None:
    resp = client("PUT", f"users/{ALICE}", settings)
    assert resp.status_code in (200, 201), resp.text


@pytest.fixture
def two(world):
    """CRONUS (the world's company) and Fabrikam, with people in each."""
    fabrikam = world.second_company(ned_title="Clerk")
    world.cloud.graph.add_mailbox(ALICE)
    return world, world.company, fabrikam


def _companies(cronus: str, fabrikam: str, **extra: Any) -> dict[str, Any]:
    return {
        "companies": [
            {"companyId": cronus, "filter": {"city": "Oslo"}, "category": "CRONUS contacts"},
            {"companyId": fabrikam, "filter": {"jobTitle": "CEO"}, **extra},
        ]
    }


def test_two_companies_each_with_its_filter_and_the_report_names_the_company(client, two):
    world, cronus, fabrikam = two
    _put(client, _companies(cronus, fabrikam))

    report = _sync(client, mode="full")

    assert report["status"] == "succeeded", report
    folder = world.outlook_by_email(ALICE)
    assert sorted(folder) == ["fay@fabrikam.example", "ola@cronus.example"]
    bc_fay = next(c for c in world.cloud.bc.contacts(fabrikam) if c["email"] == "fay@fabrikam.example")
    bc_ola = next(c for c in world.bc_contacts() if c["email"] == "ola@cronus.example")
    # The first company is the home one (bare BC id); the other's tag names its company.
    assert tag(folder["ola@cronus.example"]) == bc_ola["id"]
    assert tag(folder["fay@fabrikam.example"]) == f"{fabrikam}/{bc_fay['id']}"
    created = {i["email"]: i["company"] for i in report["items"] if i["action"] == "outlookCreated"}
    assert created == {"ola@cronus.example": CRONUS, "fay@fabrikam.example": FABRIKAM}
    assert fabrikam not in str(report) and cronus not in str(report)  # companies by name, never by id
    again = _sync(client)
    assert _writes(again) == 0 and again["status"] == "succeeded", again
    # Each company kept its own watermark: an idle run is incremental and costs the folder check and
    # one delta page in Graph, and per company the changed-since query and the id listing in BC.
    assert again["mode"] == "incremental" and again["requests"] == {"bc": 4, "graph": 2}, again


def test_a_new_outlook_contact_goes_to_the_company_whose_category_it_carries(client, two):
    """The second company has no `category`: its category is its display name, read from BC."""
    world, cronus, fabrikam = two
    _put(client, _companies(cronus, fabrikam))
    _sync(client, mode="full")
    folder_id = world.folder_id(ALICE)
    graph = world.cloud.graph
    graph.user_create_contact(
        ALICE,
        folder_id,
        {
            "displayName": "Carl Category",
            "emailAddresses": [{"address": "carl@new.example", "name": "Carl Category"}],
            "jobTitle": "CEO",
            "categories": [FABRIKAM],
        },
    )
    graph.user_create_contact(
        ALICE,
        folder_id,
        {
            "displayName": "Nina Nocat",
            "emailAddresses": [{"address": "nina@new.example", "name": "Nina Nocat"}],
            "businessAddress": {"city": "Oslo"},
        },
    )

    report = _sync(client)

    assert report["counts"]["bcCreated"] == 2, report
    in_fabrikam = {c["email"] for c in world.cloud.bc.contacts(fabrikam)}
    in_cronus = {c["email"] for c in world.bc_contacts()}
    assert "carl@new.example" in in_fabrikam and "carl@new.example" not in in_cronus
    assert "nina@new.example" in in_cronus and "nina@new.example" not in in_fabrikam
    by_email = world.outlook_by_email(ALICE)
    assert tag(by_email["carl@new.example"]).startswith(f"{fabrikam}/")
    assert "/" not in tag(by_email["nina@new.example"])
    companies = {i["email"]: i["company"] for i in report["items"] if i["action"] == "bcCreated"}
    assert companies == {"carl@new.example": FABRIKAM, "nina@new.example": CRONUS}
    assert _writes(_sync(client)) == 0


def test_the_same_person_in_both_companies_is_two_outlook_contacts(client, two):
    world, cronus, fabrikam = two
    world.person("Sam Both", "sam@both.example", city="Oslo", jobTitle="CEO")
    world.cloud.bc.seed_contact(
        fabrikam, type="Person", displayName="Sam Both", email="sam@both.example", jobTitle="CEO"
    )
    _put(client, _companies(cronus, fabrikam))

    report = _sync(client, mode="full")

    sams = [c for c in world.outlook(ALICE) if _email(c) == "sam@both.example"]
    assert len(sams) == 2, report
    assert sorted("/" in tag(c) for c in sams) == [False, True]
    assert _writes(_sync(client, mode="full")) == 0


def test_removing_a_company_removes_its_contacts_under_the_mass_removal_guard(client, two):
    world, cronus, fabrikam = two
    for n in range(12):
        world.cloud.bc.seed_contact(
            fabrikam,
            type="Person",
            displayName=f"Boss {n}",
            email=f"boss{n}@fabrikam.example",
            jobTitle="CEO",
        )
    _put(client, _companies(cronus, fabrikam))
    _sync(client, mode="full")
    assert len(world.outlook(ALICE)) == 14  # Ola, Fay and 12 bosses

    _put(
        client,
        {"companies": [{"companyId": cronus, "filter": {"city": "Oslo"}, "category": "CRONUS contacts"}]},
    )
    stopped = _sync(client)

    assert stopped["status"] == "safetyStop", stopped
    assert len(world.outlook(ALICE)) == 14  # nothing changed
    forced = client("POST", "sync", {"user": ALICE, "force": True}).json()
    assert forced["status"] == "succeeded" and forced["counts"]["outlookDeleted"] == 13, forced
    assert [_email(c) for c in world.outlook(ALICE)] == ["ola@cronus.example"]
    reasons = {i["reason"] for i in forced["items"] if i["action"] == "outlookDeleted"}
    assert reasons == {"no longer synced: its company is no longer in your settings"}
    assert {i["company"] for i in forced["items"] if i["action"] == "outlookDeleted"} == {FABRIKAM}
    assert _writes(_sync(client)) == 0


def test_a_failing_company_does_not_stop_the_other_and_the_report_says_which(client, two):
    world, cronus, fabrikam = two
    _put(client, _companies(cronus, fabrikam))
    world.cloud.bc.faults.error(
        403, count=None, method="GET", path_regex=rf"companies\({fabrikam}\)/contacts"
    )

    report = _sync(client, mode="full")

    assert report["status"] == "partial", report
    assert sorted(world.outlook_by_email(ALICE)) == ["ola@cronus.example"]
    failed = [i for i in report["items"] if i["action"] == "failed"]
    assert len(failed) == 1 and failed[0]["company"] == FABRIKAM
    assert (
        "could not be read" in failed[0]["reason"] and "Microsoft Entra Applications" in failed[0]["reason"]
    )
    world.cloud.bc.faults.clear()
    healed = _sync(client)
    assert healed["status"] == "succeeded", healed
    assert sorted(world.outlook_by_email(ALICE)) == ["fay@fabrikam.example", "ola@cronus.example"]


def test_a_user_synced_before_companies_existed_keeps_working_and_can_move_to_companies(client, two):
    """No migration: the stored links (bare BC ids) and tags of a user with `companyId` serve the
    same company as the first of `companies`, so nothing is written again and nothing doubles."""
    world, cronus, fabrikam = two
    # The one company's category is the one its `companies` entry names: moving relabels nothing.
    one = {"companyId": cronus, "filter": {"city": "Oslo"}, "category": "CRONUS contacts"}
    _put(client, one)
    first = _sync(client, mode="full")
    assert first["counts"]["outlookCreated"] == 1 and "company" not in first["items"][0]
    assert _writes(_sync(client)) == 0 and _writes(_sync(client, mode="full")) == 0

    _put(client, _companies(cronus, fabrikam))
    moved = _sync(client)

    assert moved["counts"]["outlookCreated"] == 1 and _writes(moved) == 1, moved  # Fay only
    assert sorted(world.outlook_by_email(ALICE)) == ["fay@fabrikam.example", "ola@cronus.example"]
    # And back: Fabrikam's contact leaves, Ola stays the same contact.
    ola_id = world.outlook_by_email(ALICE)["ola@cronus.example"]["id"]
    _put(client, {**one, "companies": None})
    back = _sync(client)
    assert back["counts"]["outlookDeleted"] == 1 and _writes(back) == 1, back
    assert world.outlook_by_email(ALICE)["ola@cronus.example"]["id"] == ola_id
    assert _writes(_sync(client, mode="full")) == 0


def test_reordering_companies_moves_nothing(client, two):
    world, cronus, fabrikam = two
    _put(client, _companies(cronus, fabrikam))
    _sync(client, mode="full")
    before = {c["id"] for c in world.outlook(ALICE)}
    settings = _companies(cronus, fabrikam)
    settings["companies"].reverse()
    _put(client, settings)

    report = _sync(client)

    assert _writes(report) == 0, report
    assert {c["id"] for c in world.outlook(ALICE)} == before


def test_changing_one_companys_filter_moves_only_its_contacts(client, two):
    world, cronus, fabrikam = two
    _put(client, _companies(cronus, fabrikam))
    _sync(client, mode="full")
    settings = _companies(cronus, fabrikam)
    settings["companies"][1]["filter"] = {"jobTitle": "Clerk"}
    _put(client, settings)

    report = _sync(client)

    assert report["counts"]["outlookCreated"] == 1 and report["counts"]["outlookDeleted"] == 1, report
    assert sorted(world.outlook_by_email(ALICE)) == ["ned@fabrikam.example", "ola@cronus.example"]


GUID = "11111111-2222-3333-4444-555555555555"


@pytest.mark.parametrize(
    ("document", "field", "words"),
    [
        ({"companies": []}, "companies", "non-empty list"),
        ({"companies": "x"}, "companies", "non-empty list"),
        ({"companies": [{}]}, "companies[0].companyId", "is required"),
        ({"companies": [{"companyId": "not-a-guid"}]}, "companies[0].companyId", "GUID"),
        (
            {"companies": [{"companyId": GUID}, {"companyId": GUID.upper()}]},
            "companies[1].companyId",
            "same company",
        ),
        ({"companies": [{"companyId": GUID, "filter": {"colour": "red"}}]}, "companies[0].filter.colour", ""),
        ({"companies": [{"companyId": GUID, "filter": "city=Oslo"}]}, "companies[0].filter", "object"),
        ({"companies": [{"companyId": GUID, "category": ""}]}, "companies[0].category", "non-empty"),
        ({"companies": [{"companyId": GUID, "category": "a,b"}]}, "companies[0].category", "','"),
        ({"companies": [{"companyId": GUID, "category": "x" * 256}]}, "companies[0].category", "255"),
        (
            {
                "companies": [
                    {"companyId": GUID, "category": "Sales"},
                    {"companyId": GUID.replace("1", "9"), "category": "sales"},
                ]
            },
            "companies[1].category",
            "category of companies[0]",
        ),
        ({"companies": [{"companyId": GUID, "colour": "red"}]}, "companies[0].colour", "unknown field"),
        (
            {"companyId": GUID, "companies": [{"companyId": GUID}]},
            "companies",
            "cannot be combined with companyId",
        ),
        (
            {"filter": {"city": "Oslo"}, "companies": [{"companyId": GUID}]},
            "companies",
            "cannot be combined with filter",
        ),
    ],
)
def test_an_invalid_companies_document_is_refused_naming_the_problem_and_changes_nothing(
    client, world, document, field, words
):
    world.user(ALICE, folderName="Kept")
    before = client("GET", f"users/{ALICE}").json()

    resp = client("PUT", f"users/{ALICE}", document)

    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    assert message.startswith(f"{field}:") and words in message, message
    assert client("GET", f"users/{ALICE}").json() == before


def test_companies_round_trip_through_the_api(client, world):
    other = GUID.replace("1", "9")
    document = {
        "companies": [
            {"companyId": GUID.upper(), "filter": {"city": "Oslo"}, "category": " Sales "},
            {"companyId": other},
            {"companyId": "22222222-2222-3333-4444-555555555555", "category": None},
        ]
    }
    resp = client("PUT", f"users/{ALICE}", document)
    assert resp.status_code in (200, 201), resp.text
    stored = client("GET", f"users/{ALICE}").json()["companies"]
    assert stored == [
        {"companyId": GUID, "filter": {"city": "Oslo"}, "category": "Sales"},
        {"companyId": other, "filter": {}},
        {"companyId": "22222222-2222-3333-4444-555555555555", "filter": {}, "category": None},
    ]


def test_the_connection_check_checks_every_company(client, two):
    world, cronus, fabrikam = two
    _put(client, _companies(cronus, fabrikam))

    ok = client("POST", f"users/{ALICE}/validate").json()
    world.cloud.bc.faults.error(403, count=None, method="GET", path_regex=rf"companies\({fabrikam}\)")
    failing = client("POST", f"users/{ALICE}/validate").json()

    check = next(c for c in ok["checks"] if c["name"] == "bcCompany")
    assert check["ok"] and CRONUS in check["message"] and FABRIKAM in check["message"], check
    check = next(c for c in failing["checks"] if c["name"] == "bcCompany")
    assert not check["ok"] and fabrikam in check["message"], check


def test_the_cli_report_has_a_company_column_for_a_user_with_companies(client, two):
    from shared.cli import format_report
    from shared.model import RunReport

    _world, cronus, fabrikam = two
    _put(client, _companies(cronus, fabrikam))
    report = RunReport.from_json(_sync(client, mode="full"))

    text = format_report(report)

    assert any(line.startswith("action") and " company " in line for line in text.splitlines()), text
    fay = next(line for line in text.splitlines() if "fay@fabrikam.example" in line)
    assert FABRIKAM in fay


def test_a_dry_run_with_a_company_that_cannot_be_read_is_partial_and_writes_nothing(client, two):
    world, cronus, fabrikam = two
    _put(client, _companies(cronus, fabrikam))
    world.cloud.bc.faults.error(
        403, count=None, method="GET", path_regex=rf"companies\({fabrikam}\)/contacts"
    )

    report = _sync(client, dryRun=True)

    assert report["status"] == "partial" and report["counts"]["failed"] == 1, report
    assert [i["company"] for i in report["items"] if i["action"] == "outlookCreated"] == [CRONUS]
    assert world.cloud.graph.find_folder(ALICE, "Business Central") is None


def test_the_change_poll_asks_each_company_of_the_user_once_and_queues_one_job(client, two):
    """BEHAVIOUR §8.1 per company: the change in the second company queues the user's run."""
    world, cronus, fabrikam = two
    _put(client, _companies(cronus, fabrikam))
    _sync(client, mode="full")
    world.cloud.reset_counters()

    def tick() -> list[str]:
        jobs = Collector()
        function_change_poll.main(TimerRequest(), jobs)
        return jobs.messages()

    assert tick() == [] and world.cloud.bc.counters.http_total == 2  # one question per company
    fay = next(c for c in world.cloud.bc.contacts(fabrikam) if c["email"] == "fay@fabrikam.example")
    world.cloud.bc.edit_contact(fabrikam, fay["id"], mobilePhoneNumber="+47 99 99 99 99")

    queued = tick()

    assert len(queued) == 1 and ALICE in queued[0], queued
    report = _sync(client)
    assert report["counts"]["outlookUpdated"] == 1 and report["items"][0]["company"] == FABRIKAM, report
