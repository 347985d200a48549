"""Field mapping BC ⇄ Outlook (BEHAVIOUR §4.6): round trips, preserved Outlook extras, Graph list limits,
BC's length and validation rules, name derivation, eligibility and the change fingerprint."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.mapping import (
    BC_ID_PROPERTY_ID,
    BC_LIMITS,
    MAPPED_FIELDS,
    MappingError,
    bc_is_eligible,
    bc_length,
    bc_to_outlook,
    bc_view,
    fingerprint,
    graph_patch,
    normalize_email,
    outlook_email,
    outlook_is_eligible,
    outlook_name,
    outlook_to_bc,
    outlook_view,
    split_name,
)


def bc_contact(**fields: Any) -> dict[str, Any]:
    base = {
        "id": "5d115c9c-44e3-ea11-bb43-000d3a2feca1",
        "number": "CT000123",
        "type": "Person",
        "displayName": "Ann Marie Smith",
        "email": "ann@contoso.com",
        "privacyBlocked": False,
        "@odata.etag": 'W/"JzE5OzE7MDsn"',
    }
    base.update(fields)
    return base


def outlook_contact(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "AAMkAGI2TG93AAA=",
        "displayName": "Ann Marie Smith",
        "emailAddresses": [{"address": "ann@contoso.com", "name": "Ann Marie Smith"}],
    }
    base.update(fields)
    return base


# --- strategies: BC contacts as BC would store them -----------------------------------------------

# Any printable text: no control characters (BC's UI cannot enter them) and no lone surrogates;
# includes non-BMP characters, which count twice towards BC's limits.
printable = st.characters(blacklist_categories=("Cc", "Cs"))


def fit(limit: int):
    """Text within a BC limit counted in UTF-16 units, as BC counts."""

    def cut(s: str) -> str:
        while bc_length(s) > limit:
            s = s[:-1]
        return s

    return st.text(printable, max_size=limit).map(cut)


code_text = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789- ", max_size=10)  # Code fields are upper case
phones = st.text("0123456789 +-()./#*\u0663", max_size=30)  # \u0663 ARABIC-INDIC DIGIT THREE is no letter
atext = "abcXYZ019!#$%&'*+-/=?^_`{|}~øé"
local_parts = st.text(atext + ".", min_size=1, max_size=30).filter(lambda s: not s.startswith("."))
labels = st.text("abcxyz019-øé", min_size=1, max_size=12)
domains = st.lists(labels, min_size=1, max_size=3).map(".".join)
emails = st.builds(lambda local, domain: f"{local}@{domain}", local_parts, domains).filter(
    lambda e: bc_length(e) <= 80
)
names = fit(100).filter(lambda s: s.strip() != "")

bc_contacts = st.builds(
    bc_contact,
    id=st.uuids().map(str),
    displayName=names,
    email=emails,
    companyName=fit(100),
    jobTitle=fit(30),
    phoneNumber=phones,
    mobilePhoneNumber=phones,
    addressLine1=fit(100),
    addressLine2=fit(50),
    city=fit(30),
    state=fit(30),
    postalCode=code_text,
    country=code_text,
    website=fit(80),
)

email_entries = st.one_of(
    st.fixed_dictionaries(
        {"address": st.text(max_size=12) | emails, "name": st.none() | st.text(max_size=8)}
    ),
    st.fixed_dictionaries({"address": st.none()}),
    st.none(),
)
existing_contacts = st.fixed_dictionaries(
    {},
    optional={
        "emailAddresses": st.lists(email_entries, max_size=6),
        "businessPhones": st.lists(st.text(max_size=10) | st.none(), max_size=5),
    },
)


# --- round trips (hypothesis) ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(bc_contacts)
def test_bc_to_outlook_and_back_keeps_every_mapped_field(bc: dict[str, Any]) -> None:
    back = outlook_to_bc(bc_to_outlook(bc))
    expected = bc_view(bc)
    assert back["type"] == "Person"
    for name in MAPPED_FIELDS:
        assert back.get(name, "") == expected[name], name
        assert bc_length(back.get(name, "")) <= BC_LIMITS[name]


@settings(max_examples=200, deadline=None)
@given(bc_contacts, st.none() | existing_contacts)
def test_outlook_view_of_the_body_equals_bc_view(bc: dict[str, Any], existing: dict[str, Any] | None) -> None:
    # Whatever the Outlook contact held before, right after the write both sides read the same,
    # so the next run sees nothing to do.
    body = bc_to_outlook(bc, existing)
    assert outlook_view(body) == bc_view(bc)
    assert fingerprint(outlook_view(body)) == fingerprint(bc_view(bc))


@settings(max_examples=200, deadline=None)
@given(bc_contacts, existing_contacts)
def test_graph_list_limits_hold_and_bc_values_come_first(
    bc: dict[str, Any], existing: dict[str, Any]
) -> None:
    body = bc_to_outlook(bc, existing)
    addresses = [e["address"] for e in body["emailAddresses"]]
    assert len(addresses) <= 3
    assert len(body["businessPhones"]) <= 2
    assert addresses[0] == bc["email"].strip()
    assert body["emailAddresses"][0]["name"] == bc["displayName"].strip()
    assert [normalize_email(a) for a in addresses].count(normalize_email(bc["email"])) == 1
    old = [e.get("address") for e in existing.get("emailAddresses", [])[1:] if isinstance(e, dict)]
    assert all(a in old for a in addresses[1:])  # extras only ever come from the existing contact
    if bc["phoneNumber"].strip():
        assert body["businessPhones"][0] == bc["phoneNumber"].strip()
    else:
        assert body["businessPhones"] == []


# --- bc_to_outlook examples -----------------------------------------------------------------------


def test_body_carries_every_field_and_the_bc_id_tag() -> None:
    bc = bc_contact(
        companyName="Contoso Ltd",
        jobTitle="Buyer",
        phoneNumber="+47 22 33 44 55",
        mobilePhoneNumber="+47 900 00 000",
        addressLine1="Main Street 1",
        addressLine2="Building B",
        city="Oslo",
        state="Oslo",
        postalCode="0150",
        country="NO",
        website="www.contoso.com",
    )
    body = bc_to_outlook(bc)
    assert body == {
        "displayName": "Ann Marie Smith",
        "givenName": "Ann Marie",
        "middleName": None,
        "surname": "Smith",
        "emailAddresses": [{"address": "ann@contoso.com", "name": "Ann Marie Smith"}],
        "businessPhones": ["+47 22 33 44 55"],
        "mobilePhone": "+47 900 00 000",
        "companyName": "Contoso Ltd",
        "jobTitle": "Buyer",
        "businessAddress": {
            "street": "Main Street 1\r\nBuilding B",
            "city": "Oslo",
            "state": "Oslo",
            "postalCode": "0150",
            "countryOrRegion": "NO",
        },
        "businessHomePage": "www.contoso.com",
        "singleValueExtendedProperties": [{"id": BC_ID_PROPERTY_ID, "value": bc["id"]}],
    }


def test_bc_id_property_has_graphs_named_property_format() -> None:
    match = re.fullmatch(r"String \{([0-9a-f-]{36})\} Name BcContactId", BC_ID_PROPERTY_ID)
    assert match and uuid.UUID(match.group(1))
    assert "singleValueExtendedProperties" not in bc_to_outlook(bc_contact(id=None))


def test_blank_bc_values_clear_outlook_values() -> None:
    existing = outlook_contact(mobilePhone="+1 555", companyName="Old Co", businessPhones=["1", "2"])
    body = bc_to_outlook(bc_contact(), existing)
    for key in ("mobilePhone", "companyName", "jobTitle", "businessHomePage"):
        assert key in body and body[key] is None
    # A PATCH must carry the whole address, so every part is present and null.
    assert body["businessAddress"] == dict.fromkeys(
        ("street", "city", "state", "postalCode", "countryOrRegion")
    )
    # No BC phone: the first slot cannot be left empty, so the list is cleared (see bc_to_outlook).
    assert body["businessPhones"] == []


def test_street_holds_only_line_one_when_line_two_is_blank() -> None:
    body = bc_to_outlook(bc_contact(addressLine1="Main Street 1", addressLine2="  "))
    assert body["businessAddress"]["street"] == "Main Street 1"


def test_extra_outlook_addresses_and_second_phone_are_preserved() -> None:
    existing = outlook_contact(
        emailAddresses=[
            {"address": "old@contoso.com", "name": "Ann"},  # BC's slot: replaced
            {"address": "ann.private@example.com", "name": "Private"},
            {"address": "ANN@CONTOSO.COM", "name": "dup"},  # BC's new address again: dropped
            {"address": "ann@fabrikam.com"},
        ],
        businessPhones=["+47 1", "+47 2"],
    )
    body = bc_to_outlook(bc_contact(phoneNumber="+47 9"), existing)
    assert body["emailAddresses"] == [
        {"address": "ann@contoso.com", "name": "Ann Marie Smith"},
        {"address": "ann.private@example.com", "name": "Private"},
        {"address": "ann@fabrikam.com"},
    ]
    assert body["businessPhones"] == ["+47 9", "+47 2"]


@pytest.mark.parametrize(
    ("display_name", "given", "surname"),
    [
        ("Ann Marie Smith", "Ann Marie", "Smith"),
        ("Smith", "Smith", ""),
        ("  Jean-Luc   Picard ", "Jean-Luc", "Picard"),
        ("Ann  Marie Smith", "Ann  Marie", "Smith"),
        ("Zoë Ångström-Øye", "Zoë", "Ångström-Øye"),
        ("", "", ""),
    ],
)
def test_names_derived_from_display_name(display_name: str, given: str, surname: str) -> None:
    assert split_name(display_name) == (given, surname)
    body = bc_to_outlook(bc_contact(displayName=display_name))
    assert (body["givenName"], body["surname"]) == (given or None, surname or None)
    assert body["displayName"] == (display_name.strip() or None)


# --- outlook_to_bc examples -----------------------------------------------------------------------


def test_outlook_contact_becomes_a_bc_person_without_blank_fields() -> None:
    contact = outlook_contact(
        displayName="",
        givenName=" Ola ",
        surname="Nordmann",
        emailAddresses=[{"address": "  ", "name": "x"}, {"address": " Ola@Example.NO ", "name": "Ola"}],
        businessPhones=["", "+47 22 00 00 00"],
        mobilePhone=None,
        companyName="Fabrikam",
        jobTitle="",
        businessAddress={
            "street": "Storgata 1\r\n\r\n3. etasje\nBak\n",
            "city": "Oslo",
            "postalCode": "n-0150",
            "countryOrRegion": "no",
            "state": None,
        },
        businessHomePage="fabrikam.no",
    )
    assert outlook_to_bc(contact) == {
        "type": "Person",
        "displayName": "Ola Nordmann",
        "email": "Ola@Example.NO",
        "companyName": "Fabrikam",
        "phoneNumber": "+47 22 00 00 00",
        "addressLine1": "Storgata 1",
        "addressLine2": "3. etasje, Bak",
        "city": "Oslo",
        "postalCode": "N-0150",  # Code fields: BC stores them upper-cased
        "country": "NO",
        "website": "fabrikam.no",
    }


def test_update_body_clears_blanks_sends_only_what_changed_and_leaves_the_type_alone() -> None:
    bc = bc_contact(jobTitle="Buyer", city="Oslo", phoneNumber="ext. 12")  # imported with letters
    body = outlook_to_bc(
        outlook_contact(jobTitle="  ", businessPhones=["ext. 12"], mobilePhone="+47 9"), current=bc
    )
    # Cleared in Outlook → "" in BC; unchanged values (even one BC would now refuse) are not sent.
    assert body == {"jobTitle": "", "city": "", "mobilePhoneNumber": "+47 9"}


def test_code_fields_upper_case_like_dotnet_keeping_length() -> None:
    body = outlook_to_bc(outlook_contact(businessAddress={"postalCode": "straße 1", "countryOrRegion": "de"}))
    assert body["postalCode"] == "STRAßE 1"
    assert body["country"] == "DE"


def test_primary_email_address_is_read_when_the_list_is_absent() -> None:
    contact = {"displayName": "Kim", "primaryEmailAddress": {"address": " kim@contoso.com "}}
    assert outlook_email(contact) == "kim@contoso.com"
    assert outlook_to_bc(contact)["email"] == "kim@contoso.com"


@pytest.mark.parametrize("name", sorted(BC_LIMITS))
def test_too_long_values_are_refused_never_truncated(name: str) -> None:
    limit = BC_LIMITS[name]
    contact = outlook_contact()
    value = "7" * (limit + 1)
    if name == "displayName":
        contact["displayName"] = value
    elif name == "email":
        value = "a" * (limit - len("@contoso.com") + 1) + "@contoso.com"
        contact["emailAddresses"] = [{"address": value}]
    elif name in ("addressLine1", "addressLine2"):
        contact["businessAddress"] = {"street": value if name == "addressLine1" else "x\n" + value}
    else:
        source = {
            "phoneNumber": ("businessPhones", [value]),
            "mobilePhoneNumber": ("mobilePhone", value),
            "companyName": ("companyName", value),
            "jobTitle": ("jobTitle", value),
            "website": ("businessHomePage", value),
            "city": ("businessAddress", {"city": value}),
            "state": ("businessAddress", {"state": value}),
            "postalCode": ("businessAddress", {"postalCode": value}),
            "country": ("businessAddress", {"countryOrRegion": value}),
        }
        key, raw = source[name]
        contact[key] = raw
    with pytest.raises(MappingError) as err:
        outlook_to_bc(contact)
    assert f"{name} (Outlook " in err.value.reason
    assert f"{limit + 1} characters long" in err.value.reason and f"at most {limit}" in err.value.reason


def test_length_counts_utf16_units_like_bc() -> None:
    # 16 emoji are 16 code points but 32 UTF-16 units: more than Job Title's 30.
    with pytest.raises(MappingError, match=r"jobTitle .* 32 characters long"):
        outlook_to_bc(outlook_contact(jobTitle="\U0001f600" * 16))
    assert outlook_to_bc(outlook_contact(jobTitle="\U0001f600" * 15))["jobTitle"] == "\U0001f600" * 15


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("phoneNumber", "+47 22 33 44 55 ext. 12"),
        ("phoneNumber", "call me"),
        ("mobilePhoneNumber", "ЖЖЖ 123"),
    ],
)
def test_phone_numbers_with_letters_are_refused(field: str, value: str) -> None:
    contact = outlook_contact(
        **({"businessPhones": [value]} if field == "phoneNumber" else {"mobilePhone": value})
    )
    with pytest.raises(MappingError) as err:
        outlook_to_bc(contact)
    assert f"{field} (Outlook" in err.value.reason and "letters" in err.value.reason


def test_phone_number_symbols_and_non_latin_digits_are_fine() -> None:
    body = outlook_to_bc(
        outlook_contact(businessPhones=["+47 (22) 33-44.55 #1 *2"], mobilePhone="\u0663\u0664")
    )
    assert body["phoneNumber"] == "+47 (22) 33-44.55 #1 *2"
    assert body["mobilePhoneNumber"] == "\u0663\u0664"


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("ann smith@contoso.com", "space"),
        ("ann.contoso.com", "exactly one '@'"),
        ("ann@x@contoso.com", "exactly one '@'"),
        ("@contoso.com", "nothing before"),
        ("ann@", "nothing after"),
        (".ann@contoso.com", "starts with '.'"),
        ("ann@contoso..com", "domain"),
        ("ann@.contoso.com", "domain"),
        ("Ann <ann@contoso.com>", "space"),
        ("ann@contoso.com;bob@contoso.com", "several addresses"),
        ("ann,bob@contoso.com", "','"),
        ('"ann"@contoso.com', "'\"'"),
        ("ann@[10.0.0.1]", "'['"),
        ("/o=ExchangeLabs/ou=Exchange Administrative Group/cn=Recipients/cn=ann", "space"),
    ],
)
def test_emails_bc_would_reject_are_refused_with_the_reason(address: str, why: str) -> None:
    with pytest.raises(MappingError) as err:
        outlook_to_bc(outlook_contact(emailAddresses=[{"address": address}]))
    assert err.value.reason.startswith("email (Outlook emailAddresses[0])")
    assert why in err.value.reason


@pytest.mark.parametrize(
    "address",
    [
        "a..b@contoso.com",
        "ann.@contoso.com",
        "o'brien+sales@sub.example.co.uk",
        "øystein@blåbær.no",
        "ann@localhost",
    ],
)
def test_emails_bc_accepts_pass(address: str) -> None:
    assert outlook_to_bc(outlook_contact(emailAddresses=[{"address": address}]))["email"] == address


def test_missing_name_and_email_are_both_reported() -> None:
    with pytest.raises(MappingError) as err:
        outlook_to_bc({"displayName": " ", "emailAddresses": []})
    assert "no name" in err.value.reason and "no email address" in err.value.reason
    assert isinstance(err.value, ValueError)


# --- views, fingerprint, eligibility --------------------------------------------------------------


def test_views_share_one_shape_and_normalize() -> None:
    bc = bc_contact(displayName=" Ann Marie Smith ", email=" ann@contoso.com", city=None, postalCode="n-0150")
    view = bc_view(bc)
    assert list(view) == list(MAPPED_FIELDS)
    assert view["displayName"] == "Ann Marie Smith" and view["email"] == "ann@contoso.com"
    assert view["city"] == "" and view["postalCode"] == "N-0150"
    assert list(outlook_view({})) == list(MAPPED_FIELDS) and set(outlook_view({}).values()) == {""}


def test_a_line_break_inside_a_bc_address_line_reads_the_same_on_both_sides() -> None:
    bc = bc_contact(addressLine1="Main St 1\nBack door", addressLine2="Floor 2")
    assert outlook_view(bc_to_outlook(bc)) == bc_view(bc)


def test_a_lone_second_address_line_survives_the_trip() -> None:
    bc = bc_contact(addressLine1="", addressLine2="c/o Contoso")
    body = bc_to_outlook(bc)
    assert body["businessAddress"]["street"] == "\r\nc/o Contoso"
    assert outlook_to_bc(body)["addressLine2"] == "c/o Contoso" and "addressLine1" not in outlook_to_bc(body)


def test_fingerprint_is_stable_and_content_sensitive() -> None:
    view = bc_view(bc_contact())
    assert re.fullmatch(r"[0-9a-f]{32}", fingerprint(view))
    assert fingerprint(dict(reversed(list(view.items())))) == fingerprint(view)
    assert fingerprint({**view, "city": "Oslo"}) != fingerprint(view)


def test_fingerprint_is_sha256_of_canonical_json() -> None:
    # Hashes are stored in link rows, so the construction must not drift between releases or
    # depend on anything process-specific.
    view = {"email": "z@x.no", "displayName": "Zoë"}
    canonical = json.dumps(view, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert fingerprint(view) == hashlib.sha256(canonical.encode()).hexdigest()[:32]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"type": "Company"}, "type is Company"),
        ({"type": None}, "type is blank"),
        ({"privacyBlocked": True}, "privacy blocked"),
        ({"displayName": "  "}, "no name"),
        ({"email": ""}, "no email address"),
        ({"email": "a@x.com;b@y.com"}, "several addresses"),
    ],
)
def test_bc_contacts_that_do_not_go_to_outlook_say_why(changes: dict[str, Any], reason: str) -> None:
    assert reason in (bc_is_eligible(bc_contact(**changes)) or "")


def test_eligible_bc_contact() -> None:
    assert bc_is_eligible(bc_contact()) is None


@pytest.mark.parametrize(
    ("contact", "reason"),
    [
        ({"emailAddresses": [{"address": "a@b.com"}]}, "no name"),
        ({"displayName": "Kim"}, "no email address"),
        ({"displayName": "Kim", "emailAddresses": [{"address": "  "}]}, "no email address"),
    ],
)
def test_outlook_contacts_that_do_not_go_to_bc_say_why(contact: dict[str, Any], reason: str) -> None:
    assert reason in (outlook_is_eligible(contact) or "")


def test_outlook_name_and_email_normalization() -> None:
    assert outlook_is_eligible({"surname": "Kim", "emailAddresses": [{"address": "k@x.no"}]}) is None
    assert outlook_name({"givenName": "Ann", "middleName": "Marie", "surname": "Smith"}) == "Ann Marie Smith"
    assert outlook_name({"displayName": " Dr. Who "}) == "Dr. Who"
    assert normalize_email("  Ann@Contoso.COM ") == "ann@contoso.com"


def test_graph_patch_sends_only_what_outlook_lacks_with_the_whole_address_name_and_tag() -> None:
    """The PATCH of a BC change to Outlook names only changed properties; the address goes whole
    (Graph replaces a structured address), displayName and the BC id tag always."""
    bc = bc_contact(city="Oslo", postalCode="0150", jobTitle="Buyer")
    existing = {"id": "AAMkAGI2TG93AAA=", **bc_to_outlook(bc)}
    existing.pop("singleValueExtendedProperties")  # the planner's copy has the tag stripped
    assert set(graph_patch(bc_to_outlook(bc, existing), existing)) == {
        "displayName",
        "singleValueExtendedProperties",
    }
    moved = graph_patch(
        bc_to_outlook(bc_contact(city="Bergen", postalCode="0150", jobTitle="Buyer"), existing), existing
    )
    assert set(moved) == {"displayName", "singleValueExtendedProperties", "businessAddress"}
    assert moved["businessAddress"] == {**existing["businessAddress"], "city": "Bergen"}
    assert graph_patch({"jobTitle": None}, {"displayName": "x"}) == {"jobTitle": None}  # not shown: sent
