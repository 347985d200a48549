"""The BC simulator is as strict as a real tenant where tenants differ or BC is inconvenient:
`$metadata`, versions without some contact fields, the per-company Country/Region table,
localized application messages, and validation of every property a PATCH names.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from sandbox.bc import COUNTRY_NAMES
from tests.sandbox.test_bc import World, error_of, make_world  # noqa: F401 - make_world is a fixture

EDM = "{http://docs.oasis-open.org/odata/ns/edm}"


@pytest.fixture
def tenant(make_world) -> World:  # noqa: F811 - make_world is the fixture imported above
    return make_world()


def contact_properties(tenant: World) -> list[str]:
    resp = tenant.http.get(f"{tenant.root}/$metadata")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/xml")
    root = ET.fromstring(resp.text)
    [entity] = [e for e in root.iter(f"{EDM}EntityType") if e.get("Name") == "contact"]
    return [p.get("Name") for p in entity.findall(f"{EDM}Property")]


def test_metadata_is_an_odata_csdl_document_listing_the_contact_properties(tenant):
    """BC serves the service's CSDL at `.../api/v2.0/$metadata` (OData v4 EDMX XML, one
    `Microsoft.NAV` schema; the contact entity's properties are those of the resource reference).

    Sources: "contact resource type", https://learn.microsoft.com/en-us/dynamics365/business-central/
    dev-itpro/api-reference/v2.0/resources/dynamics_contact ; OData CSDL XML v4.01,
    https://docs.oasis-open.org/odata/odata-csdl-xml/v4.01/odata-csdl-xml-v4.01.html ;
    "add-new-api.md" (farzad-erp/bc-docker-2019) for the `.../api/beta/$metadata` endpoint.
    """
    props = contact_properties(tenant)
    assert {"id", "number", "type", "displayName", "jobTitle", "companyName", "country", "email"} <= set(
        props
    )
    root = ET.fromstring(tenant.http.get(f"{tenant.root}/$metadata").text)
    assert root.tag == "{http://docs.oasis-open.org/odata/ns/edmx}Edmx" and root.get("Version") == "4.0"
    assert [s.get("Namespace") for s in root.iter(f"{EDM}Schema")] == ["Microsoft.NAV"]


def test_a_version_without_job_title_refuses_it_in_select_filter_and_bodies(tenant):
    """Older BC versions' contacts page lacks newer properties; OData answers a `$select`,
    `$filter` or body naming a property the type lacks with 400 ("Could not find a property named
    'x' on type 'Microsoft.NAV.contact'" / "The property 'x' does not exist on type ..."), so the
    whole read or write fails.

    Sources: "Troubleshooting OData/API calls" (error codes: query errors are BadRequest_*),
    https://learn.microsoft.com/en-us/dynamics365/business-central/dev-itpro/webservices/dynamics-error-codes ;
    the same OData message from another Microsoft OData service, jlattimer/CRMRESTBuilder issue #3,
    https://github.com/jlattimer/CRMRESTBuilder/issues/3 ; microsoft/AL issue #6816 (BC:
    "Could not find a property named 'purchaseLines' on type 'Microsoft.NAV.purchasers'"),
    https://github.com/microsoft/AL/issues/6816 .
    """
    person = tenant.create(type="Person", displayName="Kari Nordmann", jobTitle="Buyer")
    tenant.bc.contact_fields_absent = frozenset({"jobTitle"})
    assert "jobTitle" not in contact_properties(tenant)
    for params in ({"$select": "id,jobTitle"}, {"$filter": "jobTitle eq 'Buyer'"}, {"$orderby": "jobTitle"}):
        status, code, message = error_of(tenant.http.get(tenant.contacts_url, params=params))
        assert (status, code) == (400, "BadRequest")
        assert "Could not find a property named 'jobTitle'" in message
    listed = tenant.http.get(tenant.contacts_url).json()["value"]
    assert listed and all("jobTitle" not in c for c in listed)
    status, code, message = error_of(
        tenant.http.post(tenant.contacts_url, json={"displayName": "X", "jobTitle": "Y"})
    )
    assert (status, code) == (400, "BadRequest") and "'jobTitle' does not exist" in message
    etag = tenant.http.get(tenant.contact_url(person["id"])).json()["@odata.etag"]
    resp = tenant.http.patch(
        tenant.contact_url(person["id"]), json={"jobTitle": "Z"}, headers={"If-Match": etag}
    )
    assert resp.status_code == 400
    resp = tenant.http.patch(
        tenant.contact_url(person["id"]), json={"city": "Oslo"}, headers={"If-Match": etag}
    )
    assert resp.status_code == 200 and "jobTitle" not in resp.json()


def test_countries_regions_per_company_and_country_must_be_a_code_in_it(tenant):
    """`GET companies({id})/countriesRegions` lists the company's Country/Region table (id, code,
    displayName, addressFormat, lastModifiedDateTime); a contact's `country` is a Code[10] with a
    table relation to it, so a value not in the table (e.g. a name) is refused with
    Internal_InvalidTableRelation.

    Sources: "countryRegion resource type", https://learn.microsoft.com/en-us/dynamics365/business-central/
    dev-itpro/api-reference/v2.0/resources/dynamics_countryregion ; "Get countriesRegions",
    https://learn.microsoft.com/en-us/dynamics365/business-central/dev-itpro/api-reference/v2.0/api/
    dynamics_countryregion_get ; "Troubleshooting OData/API calls" (NavCSideValidateTableRelationException
    → Internal_InvalidTableRelation), https://learn.microsoft.com/en-us/dynamics365/business-central/
    dev-itpro/webservices/dynamics-error-codes .
    """
    rows = tenant.list_all(f"{tenant.root}/companies({tenant.company})/countriesRegions")
    assert {r["code"]: r["displayName"] for r in rows} == COUNTRY_NAMES
    assert set(rows[0]) == {
        "@odata.etag",
        "id",
        "code",
        "displayName",
        "addressFormat",
        "lastModifiedDateTime",
    } - {"@odata.etag"}
    norway = tenant.http.get(
        f"{tenant.root}/companies({tenant.company})/countriesRegions", params={"$filter": "code eq 'NO'"}
    ).json()["value"]
    assert [r["displayName"] for r in norway] == ["Norway"]
    assert tenant.create(type="Person", displayName="A", country="no")["country"] == "NO"
    status, code, message = error_of(
        tenant.http.post(tenant.contacts_url, json={"displayName": "B", "country": "Norway"})
    )
    assert (status, code) == (400, "Internal_InvalidTableRelation") and "(NORWAY)" in message
    # Each company has its own table.
    other = tenant.bc.add_company("Other AS")
    tenant.bc.remove_country("NO", other)
    resp = tenant.http.post(
        f"{tenant.root}/companies({other})/contacts", json={"displayName": "C", "country": "NO"}
    )
    assert resp.status_code == 400
    assert tenant.create(type="Person", displayName="D", country="NO")["country"] == "NO"


@pytest.mark.parametrize(
    ("payload", "code", "norwegian"),
    [
        ({"type": "Person", "displayName": "P", "companyName": "Nobody Ltd"}, "Application_DialogException",
         "Du må velge en eksisterende kontakt."),
        ({"displayName": "P", "country": "XX"}, "Internal_InvalidTableRelation",
         "Feltet Lands-/områdekode i tabellen Kontakt inneholder en verdi (XX)"),
        ({"displayName": "P", "phoneNumber": "call me"}, "Application_FieldValidationException",
         "kan ikke inneholde bokstaver"),
        ({"displayName": "P", "city": "x" * 31}, "Application_StringExceededLength", "Lengden på strengen er 31"),
    ],
)  # fmt: skip
def test_application_messages_come_in_the_company_language_and_codes_do_not(tenant, payload, code, norwegian):
    """BC's AL messages are translated into the session's language (a Norwegian company's users get
    Norwegian text), while the error code is the same in every language: clients must decide from
    codes and data, never from message text.

    Sources: "Troubleshooting OData/API calls" (codes are the stable categories; the messages are the
    application's), https://learn.microsoft.com/en-us/dynamics365/business-central/dev-itpro/webservices/
    dynamics-error-codes ; "Business Central API Error Response Patterns" ("Error messages are returned
    in the user's language context ... integration scenarios typically require language-neutral error
    handling"), https://app.unpkg.com/bc-code-intelligence-mcp@1.5.6/files/embedded-knowledge/domains/
    jordan-bridge/error-response-patterns.md .
    """
    status, english_code, english = error_of(tenant.http.post(tenant.contacts_url, json=payload))
    assert (status, english_code) == (400, code)
    tenant.bc.set_company_language(tenant.company, "nb-NO")
    status, nb_code, message = error_of(tenant.http.post(tenant.contacts_url, json=payload))
    assert (status, nb_code) == (400, code)
    assert norwegian in message and message != english and "CorrelationId" in message


def test_a_patch_validates_every_property_it_names_even_an_unchanged_one(tenant):
    """BC runs each property of a PATCH body through the page field's validation, changed or not;
    Company Name's OnValidate looks the name up among Company contacts (Contact.GetCompNo) and,
    without a page to pick from, refuses a name that matches none ("You must select an existing
    contact."). So an unchanged company name that BC no longer knows fails the whole PATCH, and the
    same PATCH without it succeeds.

    Sources: "Update contacts" (PATCH with If-Match), https://learn.microsoft.com/en-us/dynamics365/
    business-central/dev-itpro/api-reference/v2.0/api/dynamics_contact_update ; Contact table
    (Contact.Table.al, "Company Name" OnValidate → GetCompNo; OnModify renames the Company Name of
    persons linked by Company No.), StefanMaron/MSDyn365BC.Code.History
    BaseApp/Source/Base Application/CRM/Contact/Contact.Table.al .
    """
    company = tenant.create(type="Company", displayName="Fabrikam Ltd")
    person = tenant.create(type="Person", displayName="Ola Nordmann", companyName="Fabrikam Ltd")
    assert person["companyNumber"] == company["number"]
    # Unlinked from the company (as imported data often is), then the company is renamed: the
    # person's company name is left as it was, and BC no longer knows it.
    tenant.bc.edit_contact(tenant.company, person["id"], companyNumber="")
    tenant.bc.edit_contact(tenant.company, company["id"], displayName="Fabrikam AS")
    current = tenant.http.get(tenant.contact_url(person["id"])).json()
    assert current["companyName"] == "Fabrikam Ltd"
    headers = {"If-Match": current["@odata.etag"]}
    unchanged = {"companyName": "Fabrikam Ltd", "jobTitle": "Buyer"}
    status, code, message = error_of(
        tenant.http.patch(tenant.contact_url(person["id"]), json=unchanged, headers=headers)
    )
    assert (status, code, message.split("  CorrelationId")[0]) == (
        400,
        "Application_DialogException",
        "You must select an existing contact.",
    )
    resp = tenant.http.patch(tenant.contact_url(person["id"]), json={"jobTitle": "Buyer"}, headers=headers)
    assert resp.status_code == 200 and resp.json()["jobTitle"] == "Buyer"
