"""The simulated Business Central API v2.0 over real HTTPS, with tokens from the simulated Entra."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from sandbox.bc import BusinessCentralService, parse_datetime
from sandbox.entra import EntraService
from sandbox.httpd import SandboxServer, Service
from tests.sandbox.conftest import CLIENT_ID, CLIENT_SECRET, TENANT_ID

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


@dataclass
class World:
    entra: EntraService
    bc: BusinessCentralService
    http: requests.Session
    root: str  # https://localhost:PORT/v2.0/{tenant}/production/api/v2.0
    company: str
    ca_bundle: str

    @property
    def contacts_url(self) -> str:
        return f"{self.root}/companies({self.company})/contacts"

    def contact_url(self, contact_id: str) -> str:
        return f"{self.contacts_url}({contact_id})"

    def token(self, scope: str = "https://api.businesscentral.dynamics.com/.default", **form: str) -> str:
        data = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        resp = requests.post(
            f"{self.entra.base_url}/{TENANT_ID}/oauth2/v2.0/token",
            data={**data, "scope": scope, **form},
            verify=self.ca_bundle,
            timeout=10,
        )
        return resp.json()["access_token"]

    def create(self, **fields: Any) -> dict[str, Any]:
        resp = self.http.post(self.contacts_url, json=fields)
        assert resp.status_code == 201, resp.text
        return resp.json()

    def list_all(self, url: str | None = None, page_size: int | None = None) -> list[dict[str, Any]]:
        headers = {"Prefer": f"odata.maxpagesize={page_size}"} if page_size else {}
        items, next_url = [], url or self.contacts_url
        while next_url:
            body = self.http.get(next_url, headers=headers).json()
            items += body["value"]
            next_url = body.get("@odata.nextLink")
        return items


@pytest.fixture
def make_world(entra, serve: Callable[[Service], SandboxServer], trust_sandbox) -> Callable[..., World]:
    # Trust goes through REQUESTS_CA_BUNDLE as in the product (requests lets that variable win over
    # Session.verify, and this machine exports one).
    ca_bundle = trust_sandbox

    def make(**limits: Any) -> World:
        bc = BusinessCentralService(
            entra.validate, TENANT_ID, tenant_domains=["contoso.onmicrosoft.com"], **limits
        )
        bc.register_entra_app(CLIENT_ID)
        server = serve(bc)
        company = bc.add_company("CRONUS USA, Inc.")
        world = World(
            entra,
            bc,
            requests.Session(),
            f"{server.url}/v2.0/{TENANT_ID}/production/api/v2.0",
            company,
            ca_bundle,
        )
        world.http.headers["Authorization"] = f"Bearer {world.token()}"
        return world

    return make


@pytest.fixture
def world(make_world) -> World:
    return make_world()


def error_of(resp: requests.Response) -> tuple[int, str, str]:
    err = resp.json()["error"]
    return resp.status_code, err["code"], err["message"]


# Companies ----------------------------------------------------------------------------------------
def test_companies_list_and_single_company(world):
    listing = world.http.get(f"{world.root}/companies")

    assert listing.status_code == 200
    assert listing.json()["@odata.context"].endswith("/api/v2.0/$metadata#companies")
    (company,) = listing.json()["value"]
    assert company["id"] == world.company and company["name"] == "CRONUS USA, Inc."
    assert set(company) >= {"systemVersion", "displayName", "businessProfileId", "systemCreatedAt"}
    single = world.http.get(f"{world.root}/companies({world.company})")
    assert single.status_code == 200 and single.json()["id"] == world.company


def test_unknown_company_is_404_and_a_malformed_id_is_400(world):
    missing = world.http.get(f"{world.root}/companies(00000000-0000-0000-0000-000000000001)/contacts")
    malformed = world.http.get(f"{world.root}/companies(cronus)/contacts")

    assert missing.status_code == 404
    assert malformed.status_code == 400 and "Invalid format of GUID string" in error_of(malformed)[2]


# Create -------------------------------------------------------------------------------------------
def test_post_creates_a_contact_with_server_set_fields(world):
    before = datetime.now(UTC) - timedelta(seconds=1)

    resp = world.http.post(
        world.contacts_url, json={"type": "Person", "displayName": "Ada Lovelace", "email": "ada@example.com"}
    )

    assert resp.status_code == 201
    body = resp.json()
    assert resp.headers["Location"] == world.contact_url(body["id"])
    assert body["@odata.etag"].startswith('W/"') and resp.headers["ETag"] == body["@odata.etag"]
    assert body["number"] == "CT000001" and body["searchName"] == "ADA LOVELACE"
    assert body["lastModifiedDateTime"].endswith("Z")
    assert before <= parse_datetime(body["lastModifiedDateTime"]) <= datetime.now(UTC)
    expected = {
        "id", "number", "type", "displayName", "jobTitle", "companyNumber", "companyName", "addressLine1",
        "addressLine2", "city", "state", "country", "postalCode", "phoneNumber", "mobilePhoneNumber", "email",
        "website", "searchName", "privacyBlocked", "lastModifiedDateTime",
    }  # fmt: skip
    assert expected <= set(body)
    assert world.http.post(world.contacts_url, json={"displayName": "B"}).json()["number"] == "CT000002"


def test_a_given_number_is_kept_as_a_code_and_must_be_unique(world):
    assert world.create(displayName="A", number=" ct000099 ")["number"] == "CT000099"

    status, code, message = error_of(
        world.http.post(world.contacts_url, json={"displayName": "B", "number": "CT000099"})
    )

    assert (status, code) == (400, "Internal_EntityWithSameKeyExists")
    assert "No.='CT000099'" in message


def test_type_defaults_to_company_which_is_its_own_company_without_job_title(world):
    body = world.create(displayName="Fabrikam", jobTitle="CEO")

    assert body["type"] == "Company"
    assert body["jobTitle"] == ""
    assert (body["companyNumber"], body["companyName"]) == (body["number"], "Fabrikam")


def test_code_fields_are_upper_cased_and_trimmed(world):
    body = world.create(
        type="Person", displayName="Ola", postalCode=" sw1a 1aa ", country="gb", searchName="x"
    )

    assert (body["postalCode"], body["country"], body["searchName"]) == ("SW1A 1AA", "GB", "X")


@pytest.mark.parametrize(
    ("payload", "code", "message"),
    [
        ({"type": "Person"}, "Application_DialogException", 'A "displayName" must be provided.'),
        ({"displayName": ""}, "Application_DialogException", 'The blank "displayName" is not allowed.'),
        (
            {"displayName": "X", "nickname": "Y"},
            "BadRequest",
            "The property 'nickname' does not exist on type",
        ),
        ({"displayName": None}, "BadRequest", "A null value was found for the property named 'displayName'"),
        ({"displayName": "X", "privacyBlocked": "no"}, "BadRequest", "Cannot convert a primitive value"),
        ({"displayName": "X", "type": "Robot"}, "Unknown", "'Robot' is not an option."),
        ({"displayName": "X", "country": "NORWAY"}, "Internal_InvalidTableRelation", "(Country/Region)"),
    ],
)
def test_post_is_validated_like_bc(world, payload, code, message):
    status, got_code, got_message = error_of(world.http.post(world.contacts_url, json=payload))

    assert (status, got_code) == (400, code)
    assert message in got_message
    assert got_message.rstrip().endswith(".") and "CorrelationId:" in got_message
    assert world.bc.contacts(world.company) == []


@pytest.mark.parametrize(
    ("field", "limit"),
    [
        ("displayName", 100),
        ("jobTitle", 30),
        ("addressLine1", 100),
        ("addressLine2", 50),
        ("city", 30),
        ("postalCode", 20),
        ("country", 10),
        ("phoneNumber", 30),
        ("mobilePhoneNumber", 30),
        ("email", 80),
        ("website", 255),
    ],
)
def test_field_lengths(world, field, limit):
    too_long = "1" * (limit + 1)
    fine = "1" * limit if field != "email" else "a" * (limit - 6) + "@x.com"

    status, code, message = error_of(
        world.http.post(world.contacts_url, json={"type": "Person", field: too_long})
    )

    assert (status, code) == (400, "Application_StringExceededLength")
    assert message.startswith(
        f"The length of the string is {limit + 1}, but it must be less than or equal to {limit} characters. "
        f"Value: {too_long}"
    )
    if field not in ("country",):
        assert world.http.post(
            world.contacts_url, json={"displayName": "N", "type": "Person", field: fine}
        ).ok


@pytest.mark.parametrize("field", ["phoneNumber", "mobilePhoneNumber"])
def test_phone_numbers_refuse_letters(world, field):
    status, code, message = error_of(
        world.http.post(
            world.contacts_url, json={"type": "Person", "displayName": "A", field: "+47 22 CALL ME"}
        )
    )

    caption = {"phoneNumber": "Phone No.", "mobilePhoneNumber": "Mobile Phone No."}[field]
    assert (status, code) == (400, "Application_FieldValidationException")
    assert message.startswith(f"{caption} must not contain letters in Contact No.=''")
    assert (
        world.create(type="Person", displayName="B", **{field: "+47 (22) 00-11.22"})[field]
        == "+47 (22) 00-11.22"
    )


@pytest.mark.parametrize(
    "email", ["not-an-email", "a@b@c.com", "ada @example.com", "Ada <ada@example.com>", "@x.com"]
)
def test_invalid_email_addresses_are_refused(world, email):
    status, code, message = error_of(
        world.http.post(world.contacts_url, json={"type": "Person", "displayName": "A", "email": email})
    )

    assert (status, code) == (400, "Application_DialogException")
    assert message.startswith('The email address "')
    assert "is not valid." in message


def test_email_accepts_a_semicolon_separated_list_as_bc_does(world):
    assert world.create(displayName="A", email="a@x.com;b@y.com")["email"] == "a@x.com;b@y.com"


def test_company_name_must_name_an_existing_company_contact(world):
    status, code, message = error_of(
        world.http.post(
            world.contacts_url, json={"type": "Person", "displayName": "Kari", "companyName": "Nowhere"}
        )
    )

    assert (status, code) == (400, "Application_DialogException")
    assert message.startswith("You must select an existing contact.")


def test_person_linked_to_a_company_inherits_its_data_unless_given(world):
    firm = world.bc.seed_contact(
        world.company, type="Company", displayName="Contoso AS", city="Oslo", postalCode="0150",
        country="NO", phoneNumber="+47 22 00 00 00", email="post@contoso.no",
    )  # fmt: skip

    person = world.create(
        type="Person", displayName="Kari Nordmann", companyName="contoso as", email="kari@contoso.no"
    )

    assert (person["companyNumber"], person["companyName"]) == (firm["number"], "Contoso AS")
    assert (person["city"], person["postalCode"], person["country"]) == ("Oslo", "0150", "NO")
    assert person["phoneNumber"] == "+47 22 00 00 00"
    assert person["email"] == "kari@contoso.no"


def test_only_a_person_can_belong_to_another_company(world):
    world.bc.seed_contact(world.company, type="Company", displayName="Contoso AS")

    status, code, message = error_of(
        world.http.post(world.contacts_url, json={"displayName": "Kari", "companyName": "Contoso AS"})
    )

    assert (status, code) == (400, "Application_FieldValidationException")
    assert message.startswith("Type must be equal to 'Person'")


# Read ---------------------------------------------------------------------------------------------
def test_get_single_contact_and_missing_contact(world):
    created = world.create(displayName="Ada")

    got = world.http.get(world.contact_url(created["id"]))
    missing = world.http.get(world.contact_url("00000000-0000-0000-0000-00000000abcd"))

    assert got.status_code == 200 and got.json()["displayName"] == "Ada"
    assert got.json()["@odata.context"].endswith("/contacts/$entity")
    assert missing.status_code == 404 and error_of(missing)[1] == "Internal_RecordNotFound"


# Update and delete --------------------------------------------------------------------------------
def test_patch_requires_if_match(world):
    created = world.create(displayName="Ada")

    status, code, message = error_of(
        world.http.patch(world.contact_url(created["id"]), json={"city": "Oslo"})
    )

    assert (status, code) == (400, "BadRequest_InvalidToken")
    assert message.startswith("Could not validate the client concurrency token required by the service.")


def test_patch_with_current_etag_returns_the_entity_and_moves_modified_time_and_etag(world):
    created = world.create(displayName="Ada")
    world.bc.clock.freeze(T0)

    resp = world.http.patch(
        world.contact_url(created["id"]), json={"city": "Oslo"}, headers={"If-Match": created["@odata.etag"]}
    )

    assert resp.status_code == 200
    assert resp.json()["city"] == "Oslo" and resp.json()["displayName"] == "Ada"
    assert resp.json()["lastModifiedDateTime"] == "2026-03-01T08:00:00Z"
    assert resp.json()["@odata.etag"] != created["@odata.etag"]


def test_every_patch_is_a_write_even_without_changes(world):
    created = world.create(displayName="Ada")
    world.bc.clock.freeze(T0)

    resp = world.http.patch(
        world.contact_url(created["id"]), json={}, headers={"If-Match": created["@odata.etag"]}
    )

    assert resp.json()["lastModifiedDateTime"] == "2026-03-01T08:00:00Z"
    assert resp.json()["@odata.etag"] != created["@odata.etag"]


def test_stale_etag_is_412_and_star_overrides(world):
    created = world.create(displayName="Ada")
    world.bc.edit_contact(world.company, created["id"], city="Bergen")  # someone edits in BC meanwhile

    stale = world.http.patch(
        world.contact_url(created["id"]), json={"city": "Oslo"}, headers={"If-Match": created["@odata.etag"]}
    )
    star = world.http.patch(
        world.contact_url(created["id"]), json={"city": "Oslo"}, headers={"If-Match": "*"}
    )

    assert error_of(stale)[:2] == (412, "Request_EntityChanged")
    assert "Another user has already changed the record." in error_of(stale)[2]
    assert star.status_code == 200 and star.json()["city"] == "Oslo"


def test_read_only_properties(world):
    created = world.create(displayName="Ada")
    url, etag = world.contact_url(created["id"]), {"If-Match": "*"}

    same_id = world.http.patch(
        url, json={"id": created["id"], "lastModifiedDateTime": "2000-01-01T00:00:00Z"}, headers=etag
    )
    other_id = world.http.patch(url, json={"id": "00000000-0000-0000-0000-000000000001"}, headers=etag)

    assert same_id.status_code == 200 and same_id.json()["lastModifiedDateTime"] > "2020"
    assert error_of(other_id)[:2] == (400, "BadRequest_InvalidOperation")


def test_renaming_a_company_contact_touches_its_persons(world):
    firm = world.bc.seed_contact(world.company, type="Company", displayName="Contoso")
    person = world.bc.seed_contact(world.company, type="Person", displayName="Kari", companyName="Contoso")
    world.bc.clock.freeze(T0)

    world.http.patch(
        world.contact_url(firm["id"]), json={"displayName": "Contoso Group"}, headers={"If-Match": "*"}
    )

    after = world.bc.get_contact(world.company, person["id"])
    assert after["companyName"] == "Contoso Group"
    assert after["lastModifiedDateTime"] == "2026-03-01T08:00:00Z"


def test_delete_requires_if_match_and_answers_204(world):
    created = world.create(displayName="Ada")

    without = world.http.delete(world.contact_url(created["id"]))
    stale = world.http.delete(world.contact_url(created["id"]), headers={"If-Match": 'W/"JzE7MTswMDsn"'})
    deleted = world.http.delete(
        world.contact_url(created["id"]), headers={"If-Match": created["@odata.etag"]}
    )

    assert error_of(without)[:2] == (400, "BadRequest_InvalidToken")
    assert stale.status_code == 412
    assert deleted.status_code == 204 and deleted.content == b""
    assert world.http.get(world.contact_url(created["id"])).status_code == 404


def test_deleting_a_company_contact_deletes_its_persons(world):
    firm = world.bc.seed_contact(world.company, type="Company", displayName="Contoso")
    world.bc.seed_contact(world.company, type="Person", displayName="Kari", companyName="Contoso")
    loner = world.bc.seed_contact(world.company, type="Person", displayName="Ola")

    world.http.delete(world.contact_url(firm["id"]), headers={"If-Match": "*"})

    assert [c["id"] for c in world.bc.contacts(world.company)] == [loner["id"]]


# Query --------------------------------------------------------------------------------------------
def names(world: World, **params: str) -> list[str]:
    resp = world.http.get(world.contacts_url, params=params)
    assert resp.status_code == 200, resp.text
    return [c["displayName"] for c in resp.json()["value"]]


def test_filter_on_last_modified_date_time(world):
    for i, name in enumerate(["A", "B", "C"]):
        world.bc.clock.freeze(T0 + timedelta(minutes=i))
        world.bc.seed_contact(world.company, displayName=name)

    assert names(world, **{"$filter": "lastModifiedDateTime gt 2026-03-01T08:01:00Z"}) == ["C"]
    assert names(world, **{"$filter": "lastModifiedDateTime ge 2026-03-01T08:01:00Z"}) == ["B", "C"]
    assert names(world, **{"$filter": "lastModifiedDateTime lt 2026-03-01T09:01:00+01:00"}) == ["A"]
    assert names(world, **{"$filter": "lastModifiedDateTime le 2026-03-01T08:01:00.000Z"}) == ["A", "B"]


def test_a_late_commit_can_be_simulated(world):
    world.bc.clock.freeze(T0)
    late = world.bc.seed_contact(world.company, displayName="Late")

    world.bc.set_last_modified(world.company, late["id"], T0 - timedelta(minutes=5))

    assert names(world, **{"$filter": "lastModifiedDateTime gt 2026-03-01T07:58:00Z"}) == []
    assert world.bc.get_contact(world.company, late["id"])["lastModifiedDateTime"] == "2026-03-01T07:55:00Z"


def test_filter_on_strings_is_exact_and_case_sensitive_with_quote_escaping(world):
    world.bc.seed_contact(world.company, displayName="Ada", email="ada@example.com")
    world.bc.seed_contact(world.company, displayName="O'Brien", email="obrien@example.com")

    assert names(world, **{"$filter": "email eq 'ada@example.com'"}) == ["Ada"]
    assert names(world, **{"$filter": "email eq 'ADA@example.com'"}) == []
    assert names(world, **{"$filter": "displayName eq 'O''Brien'"}) == ["O'Brien"]
    assert names(world, **{"$filter": "number eq 'CT000002'"}) == ["O'Brien"]


def test_filter_by_id_with_and_or_and_parentheses(world):
    a = world.bc.seed_contact(world.company, type="Person", displayName="A", city="Oslo")
    world.bc.seed_contact(world.company, type="Person", displayName="B", city="Bergen")
    world.bc.seed_contact(world.company, type="Company", displayName="C", city="Oslo")

    assert names(world, **{"$filter": f"id eq {a['id']}"}) == ["A"]
    assert names(world, **{"$filter": "city eq 'Oslo' and type eq 'Person'"}) == ["A"]
    assert names(world, **{"$filter": "displayName eq 'B' or displayName eq 'C'"}) == ["B", "C"]
    assert names(
        world, **{"$filter": "(city eq 'Oslo' or city eq 'Bergen') and not (type eq 'Company')"}
    ) == ["A", "B"]
    assert names(world, **{"$filter": "startswith(displayName,'A') or contains(city,'erg')"}) == ["A", "B"]


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"$filter": "tolower(email) eq 'x'"}, "does not support the function 'tolower'"),
        ({"$filter": "email eq 5"}, "incompatible types"),
        ({"$filter": "lastModifiedDateTime gt '2026-01-01'"}, "incompatible types"),
        ({"$filter": "id eq 'not-a-guid'"}, "incompatible types"),
        ({"$filter": "nickname eq 'x'"}, "Could not find a property named 'nickname'"),
        ({"$filter": "email eq"}, "Syntax error"),
        ({"$filter": "email eq 'a' xor email eq 'b'"}, "Syntax error"),
        ({"$filter": "type eq 'Robot'"}, "not a valid enumeration"),
        ({"$select": "displayName,nickname"}, "Could not find a property named 'nickname'"),
        # `picture` is expanded since issue 12 (tests/sandbox/test_bc_issue12.py); others are refused.
        ({"$expand": "contactInformation"}, "not supported"),
        ({"$search": "Ada"}, "not supported"),
        ({"$wat": "1"}, "The query parameter '$wat' is not supported."),
    ],
)
def test_unsupported_or_invalid_query_options_are_refused_never_ignored(world, params, fragment):
    world.bc.seed_contact(world.company, displayName="Ada", email="x")

    status, code, message = error_of(world.http.get(world.contacts_url, params=params))

    assert (status, code) == (400, "BadRequest")
    assert fragment in message


def test_select_returns_only_the_chosen_properties_and_the_etag(world):
    world.bc.seed_contact(world.company, displayName="Ada", email="ada@example.com")

    body = world.http.get(world.contacts_url, params={"$select": "id,email"}).json()

    assert body["@odata.context"].endswith("/contacts(id,email)")
    assert set(body["value"][0]) == {"@odata.etag", "id", "email"}


def test_top_skip_orderby_and_count(world):
    for name in ["Cecilie", "Anna", "Bo", "Dag"]:
        world.bc.seed_contact(world.company, displayName=name)

    assert names(world, **{"$orderby": "displayName desc", "$top": "2"}) == ["Dag", "Cecilie"]
    assert names(world, **{"$orderby": "displayName", "$skip": "1", "$top": "2"}) == ["Bo", "Cecilie"]
    body = world.http.get(world.contacts_url, params={"$count": "true", "$top": "1"}).json()
    assert body["@odata.count"] == 4 and len(body["value"]) == 1


# Paging -------------------------------------------------------------------------------------------
def test_server_driven_paging_with_maxpagesize(world):
    for i in range(25):
        world.bc.seed_contact(world.company, displayName=f"P{i:02d}", type="Person")
    headers = {"Prefer": "odata.maxpagesize=10"}

    first = world.http.get(world.contacts_url, params={"$filter": "type eq 'Person'"}, headers=headers)
    second = world.http.get(first.json()["@odata.nextLink"], headers=headers)
    third = world.http.get(second.json()["@odata.nextLink"], headers=headers)

    assert first.headers["Preference-Applied"] == "odata.maxpagesize=10"
    assert [len(r.json()["value"]) for r in (first, second, third)] == [10, 10, 5]
    assert "@odata.nextLink" not in third.json()
    link = first.json()["@odata.nextLink"]
    assert link.startswith(world.contacts_url + "?") and "$skiptoken=" in link and "%24filter" not in link
    assert "$filter=type" in link  # the filter travels with the link


def test_default_page_holds_up_to_20000_entities(world):
    for i in range(30):
        world.bc.seed_contact(world.company, displayName=f"P{i}")

    body = world.http.get(world.contacts_url).json()

    assert len(body["value"]) == 30 and "@odata.nextLink" not in body


def test_paging_is_stable_while_data_changes_between_pages(world):
    seeded = [world.bc.seed_contact(world.company, displayName=f"P{i:02d}") for i in range(30)]
    headers = {"Prefer": "odata.maxpagesize=10"}
    first = world.http.get(world.contacts_url, headers=headers).json()
    # Between pages: a contact already read is deleted and a new one is added.
    world.bc.delete_contact(world.company, first["value"][0]["id"])
    added = world.bc.seed_contact(world.company, displayName="New")

    rest = world.list_all(first["@odata.nextLink"], page_size=10)

    seen = [c["id"] for c in first["value"] + rest]
    assert len(seen) == len(set(seen))
    assert {c["id"] for c in seeded} <= set(seen)
    assert added["id"] in seen


# $batch -------------------------------------------------------------------------------------------
def batch(world: World, requests_: list[dict[str, Any]], **headers: str) -> requests.Response:
    # Accept: application/json as every client that wants JSON must say (without it BC answers
    # multipart/mixed; tests/sandbox/test_transport.py pins that).
    headers = {"Accept": "application/json", **headers}
    return world.http.post(f"{world.root}/$batch", json={"requests": requests_}, headers=headers)


def test_batch_runs_each_operation_and_counts_them_as_items(world):
    existing = world.bc.seed_contact(world.company, displayName="Ada")
    c = f"companies({world.company})"

    create = {"type": "Person", "displayName": "Bo"}
    etag = {"If-Match": existing["@odata.etag"]}
    absolute_url = world.contact_url(existing["id"])  # absolute URLs are accepted too

    resp = batch(
        world,
        [
            {"id": "1", "method": "POST", "url": f"{c}/contacts", "body": create},
            {"id": "2", "method": "PATCH", "url": f"{c}/contacts({existing['id']})", "headers": etag,
             "body": {"city": "Oslo"}},
            {"id": "3", "method": "GET", "url": f"{c}/contacts?$filter=city eq 'Oslo'"},
            {"id": "4", "method": "DELETE", "url": absolute_url, "headers": {"If-Match": "*"}},
        ],
    )  # fmt: skip

    assert resp.status_code == 200
    out = {r["id"]: r for r in resp.json()["responses"]}
    assert [out[i]["status"] for i in "1234"] == [201, 200, 200, 204]
    assert out["1"]["body"]["displayName"] == "Bo"
    assert [v["displayName"] for v in out["3"]["body"]["value"]] == ["Ada"]
    assert [c["displayName"] for c in world.bc.contacts(world.company)] == ["Bo"]
    counters = world.bc.counters
    assert counters.http_count("POST", "$batch") == 1
    assert counters.item_count() == 4
    assert counters.item_count("PATCH", "contacts.update") == 1


def test_batch_item_failures_are_per_item_and_if_match_applies_inside(world):
    existing = world.bc.seed_contact(world.company, displayName="Ada")
    world.bc.edit_contact(world.company, existing["id"], city="Bergen")
    url = f"/v2.0/{TENANT_ID}/production/api/v2.0/companies({world.company})/contacts"  # absolute path form

    resp = batch(
        world,
        [
            {"id": "a", "method": "POST", "url": url, "body": {"displayName": "Ok"}},
            {"id": "b", "method": "POST", "url": url, "body": {"displayName": "Bad", "phoneNumber": "ring"}},
            {"id": "c", "method": "PATCH", "url": f"{url}({existing['id']})",
             "headers": {"If-Match": existing["@odata.etag"]}, "body": {"city": "Oslo"}},
        ],
    )  # fmt: skip

    statuses = {r["id"]: r["status"] for r in resp.json()["responses"]}
    assert statuses == {"a": 201, "b": 400, "c": 412}
    assert sorted(c["displayName"] for c in world.bc.contacts(world.company)) == ["Ada", "Ok"]


def test_batch_with_isolation_snapshot_is_all_or_nothing(world):
    url = f"companies({world.company})/contacts"

    resp = batch(
        world,
        [
            {"id": "1", "method": "POST", "url": url, "body": {"displayName": "First"}},
            {"id": "2", "method": "POST", "url": url, "body": {"displayName": "Bad", "email": "nope"}},
        ],
        Isolation="snapshot",
    )

    assert [r["status"] for r in resp.json()["responses"]] == [201, 400]
    assert world.bc.contacts(world.company) == []


def test_batch_with_isolation_snapshot_commits_when_all_succeed(world):
    url = f"companies({world.company})/contacts"

    resp = batch(
        world,
        [{"method": "POST", "url": url, "body": {"displayName": n}} for n in "AB"],
        Isolation="snapshot",
    )

    assert [r["status"] for r in resp.json()["responses"]] == [201, 201]
    assert [r["id"] for r in resp.json()["responses"]] == [None, None]
    assert len(world.bc.contacts(world.company)) == 2


def test_batch_of_more_than_100_operations_is_refused(world):
    url = f"companies({world.company})/contacts"

    resp = batch(
        world,
        [{"id": str(i), "method": "POST", "url": url, "body": {"displayName": "X"}} for i in range(101)],
    )

    assert error_of(resp)[:2] == (400, "BadRequest")
    assert world.bc.contacts(world.company) == []
    ok = batch(
        world,
        [{"id": str(i), "method": "POST", "url": url, "body": {"displayName": "X"}} for i in range(100)],
    )
    assert ok.status_code == 200 and len(world.bc.contacts(world.company)) == 100


def test_throttling_inside_a_batch_is_per_item_with_retry_after(world):
    world.bc.faults.throttle(count=1, retry_after=2, in_batch=True)
    url = f"companies({world.company})/contacts"

    resp = batch(
        world,
        [{"id": str(i), "method": "POST", "url": url, "body": {"displayName": str(i)}} for i in range(2)],
    )

    first, second = resp.json()["responses"]
    assert resp.status_code == 200
    assert (first["status"], first["headers"]["retry-after"]) == (429, "2")
    assert second["status"] == 201


# Authentication and routing ----------------------------------------------------------------------
def test_missing_or_invalid_token_is_401_with_a_bearer_challenge(world):
    no_token = requests.get(world.contacts_url, verify=world.ca_bundle, timeout=10)
    graph_token = requests.get(
        world.contacts_url,
        headers={"Authorization": f"Bearer {world.token('https://graph.microsoft.com/.default')}"},
        verify=world.ca_bundle,
        timeout=10,
    )

    for resp in (no_token, graph_token):
        assert error_of(resp)[:2] == (401, "Authentication_InvalidCredentials")
        assert resp.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=")


def test_expired_tokens_are_refused(world):
    world.entra.expire_all_tokens()

    assert world.http.get(world.contacts_url).status_code == 401


def test_app_missing_on_the_entra_applications_page_is_refused(world):
    world.bc.unregister_entra_app(CLIENT_ID)

    status, code, message = error_of(world.http.get(world.contacts_url))

    assert (status, code) == (401, "Authentication_InvalidCredentials")
    assert message.startswith(
        "Web service call failed because user could not be authenticated or authorized."
    )


def test_token_without_api_readwrite_all_is_refused(world):
    world.entra.set_roles(TENANT_ID, CLIENT_ID, "https://api.businesscentral.dynamics.com", ())
    world.http.headers["Authorization"] = f"Bearer {world.token()}"

    assert error_of(world.http.get(world.contacts_url))[:2] == (401, "Authentication_InvalidCredentials")


def test_unknown_environment_or_tenant_is_404_and_the_tenant_domain_works(world):
    base = world.root.split("/v2.0/")[0]

    wrong_env = world.http.get(f"{base}/v2.0/{TENANT_ID}/sandbox/api/v2.0/companies")
    wrong_tenant = world.http.get(f"{base}/v2.0/contoso2.onmicrosoft.com/production/api/v2.0/companies")
    domain = world.http.get(f"{base}/v2.0/contoso.onmicrosoft.com/production/api/v2.0/companies")

    assert wrong_env.status_code == 404 and "environment 'sandbox'" in error_of(wrong_env)[2]
    assert wrong_tenant.status_code == 404
    assert domain.status_code == 200


def test_unknown_resource_is_404_and_a_wrong_method_is_405(world):
    missing = world.http.get(f"{world.root}/companies({world.company})/customers")
    wrong = world.http.put(f"{world.contacts_url}(00000000-0000-0000-0000-000000000001)", json={})

    assert error_of(missing)[:2] == (404, "BadRequest_NotFound")
    assert error_of(wrong)[:2] == (405, "BadRequest_MethodNotAllowed")


def test_company_can_be_named_by_query_or_header_instead_of_the_url(world):
    world.bc.seed_contact(world.company, displayName="Ada")

    by_query = world.http.get(f"{world.root}/contacts", params={"company": "CRONUS USA, Inc."})
    by_header = world.http.get(f"{world.root}/contacts", headers={"Company": world.company})
    neither = world.http.get(f"{world.root}/contacts")

    assert [c["displayName"] for c in by_query.json()["value"]] == ["Ada"]
    assert by_header.status_code == 200
    assert error_of(neither)[:2] == (400, "Internal_CompanyNotFound")


# Limits -------------------------------------------------------------------------------------------
def parallel(world: World, count: int) -> tuple[list[int], float]:
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(count)

    def call() -> None:
        session = requests.Session()
        session.verify, session.headers = world.ca_bundle, dict(world.http.headers)
        start.wait()
        status = session.get(world.contacts_url).status_code
        with lock:
            statuses.append(status)

    began = time.monotonic()
    threads = [threading.Thread(target=call) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(statuses), time.monotonic() - began


def test_excess_concurrent_requests_are_queued_then_refused_with_429(make_world):
    world = make_world(max_concurrent=2, max_queue=1)
    world.bc.faults.latency = 0.3

    statuses, elapsed = parallel(world, 4)

    assert statuses == [200, 200, 200, 429]
    assert world.bc.limits.peak_active.most_common(1)[0][1] == 2
    assert elapsed >= 0.55  # the queued request waited for a slot, its latency spent inside it


def test_a_request_queued_too_long_gets_503(make_world):
    world = make_world(max_concurrent=1, max_queue=5, queue_timeout=0.1)
    world.bc.faults.latency = 0.4

    statuses, _ = parallel(world, 2)

    assert statuses == [200, 503]


def test_rate_window_gives_429_without_retry_after_unless_switched_on(make_world):
    """BC's 429 asks for "a cool off period" and documents no Retry-After ("Working with API limits
    in Dynamics 365 Business Central", https://learn.microsoft.com/en-us/dynamics365/business-central/
    dev-itpro/api-reference/v2.0/dynamics-rate-limits), so the sandbox sends none by default;
    `throttle_sends_retry_after` models a front end that does."""
    world = make_world(rate_limit=3, rate_window=60.0)

    statuses = [world.http.get(world.contacts_url).status_code for _ in range(3)]
    refused = world.http.get(world.contacts_url)
    world.bc.throttle_sends_retry_after = True
    refused_with_hint = world.http.get(world.contacts_url)

    assert statuses == [200, 200, 200]
    assert refused.status_code == 429 and "Retry-After" not in refused.headers
    assert refused_with_hint.status_code == 429
    assert 1 <= int(refused_with_hint.headers["Retry-After"]) <= 60
    assert world.bc.counters.http_count("GET", "contacts.list") == 5


def test_a_batch_counts_once_against_the_rate_window(make_world):
    world = make_world(rate_limit=2, rate_window=60.0)
    ops = [{"method": "GET", "url": f"companies({world.company})/contacts"} for _ in range(5)]

    first, second = batch(world, ops), batch(world, ops)

    assert (first.status_code, second.status_code) == (200, 200)
    assert all(r["status"] == 200 for r in first.json()["responses"])
    assert batch(world, ops).status_code == 429


# Injected faults ----------------------------------------------------------------------------------
def test_injected_faults(world):
    world.bc.faults.throttle(count=1, retry_after=3)
    world.bc.faults.error(503, count=1)
    world.bc.faults.html(count=1)
    world.bc.faults.reset(count=1)

    throttled = world.http.get(world.contacts_url)
    unavailable = world.http.get(world.contacts_url)
    html = world.http.get(world.contacts_url)
    with pytest.raises(requests.ConnectionError):
        world.http.get(world.contacts_url)
    healthy = world.http.get(world.contacts_url)

    assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, "3")
    assert unavailable.status_code == 503 and unavailable.json()["error"]["code"] == "ServiceUnavailable"
    assert html.status_code == 502 and html.headers["Content-Type"].startswith("text/html")
    assert healthy.status_code == 200


def test_json_batch_is_answered_in_json_unless_the_tenant_switch_answers_multipart(world):
    """Documented: a `$batch` sent as JSON with `Accept: application/json` is answered with a JSON
    body of `responses` (BC 17.1 and later). The switch `json_batch_answers = False` stands for a
    tenant that answers OData multipart/mixed instead (the conformance check must notice).
    Sources: "Using OData transactional $batch requests",
    https://learn.microsoft.com/dynamics365/business-central/dev-itpro/webservices/use-odata-batch ;
    OData Version 4.01 Part 1: Protocol, §11.7 Batch Requests,
    https://docs.oasis-open.org/odata/odata/v4.01/odata-v4.01-part1-protocol.html
    """
    ops = [{"id": "1", "method": "GET", "url": f"companies({world.company})?$select=id"}]
    as_json = batch(world, ops, Accept="application/json")
    assert as_json.headers["Content-Type"].startswith("application/json")
    assert [r["status"] for r in as_json.json()["responses"]] == [200]

    world.bc.json_batch_answers = False
    multipart = batch(world, ops, Accept="application/json")
    assert multipart.status_code == 200
    ctype = multipart.headers["Content-Type"]
    assert ctype.startswith("multipart/mixed; boundary=")
    boundary = ctype.split("boundary=", 1)[1]
    assert multipart.text.count(f"--{boundary}") == 2 and multipart.text.rstrip().endswith(f"--{boundary}--")
    assert "HTTP/1.1 200 OK" in multipart.text and world.company in multipart.text
