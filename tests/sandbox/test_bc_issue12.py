"""Business Central for issue 12: contact pictures and several companies in one environment, over HTTPS.

Sources (found with the search tool, docs corpus):
- "picture resource type" (API v2.0), https://learn.microsoft.com/en-us/dynamics365/business-central/dev-itpro/api-reference/v2.0/resources/dynamics_picture
- "Get picture", https://learn.microsoft.com/en-us/dynamics365/business-central/dev-itpro/api-reference/v2.0/api/dynamics_picture_get
- "Update picture", https://learn.microsoft.com/en-us/dynamics365/business-central/dev-itpro/api-reference/v2.0/api/dynamics_picture_update
- "companies" / "Get contacts" (API v2.0): every entity lives under companies({id}).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import requests

from sandbox.bc import parse_datetime
from sandbox.images import make_jpeg, make_png
from tests.sandbox.test_bc import T0, World, error_of, make_world, world

__all__ = ["make_world", "world"]  # fixtures used by name


def picture_url(world: World, contact_id: str, company: str | None = None) -> str:
    return f"{world.root}/companies({company or world.company})/contacts({contact_id})/picture"


def put_picture(world: World, contact_id: str, data: bytes, etag: str | None) -> requests.Response:
    headers = {"Content-Type": "application/octet-stream"}
    if etag is not None:
        headers["If-Match"] = etag
    return world.http.patch(f"{picture_url(world, contact_id)}/pictureContent", data=data, headers=headers)


def test_a_contact_without_a_picture_answers_an_empty_picture_entity(world):
    """ "Get picture": GET companies({id})/contacts({id})/picture answers the picture entity
    (id, parentType, width, height, contentType, pictureContent media links). Without a picture:
    width/height 0, contentType empty, and the stream answers 204 [observed, unverified]."""
    contact = world.create(displayName="Ada Lovelace", type="Person")

    resp = world.http.get(picture_url(world, contact["id"]))
    content = world.http.get(f"{picture_url(world, contact['id'])}/pictureContent")

    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] == contact["id"] and body["parentType"] == "Contact"
    assert (body["width"], body["height"], body["contentType"]) == (0, 0, "")
    assert body["pictureContent@odata.mediaReadLink"].endswith(
        f"contacts({contact['id']})/picture/pictureContent"
    )
    assert content.status_code == 204 and content.content == b""


def test_patch_picture_content_needs_if_match_and_sets_the_picture(world):
    """ "Update picture": PATCH .../picture/pictureContent, If-Match "Required", 204 No Content on
    success. A missing If-Match is BC's 400 BadRequest_InvalidToken, a stale one 412, as for the
    contact itself. The stored picture's type and size are read from the bytes."""
    contact = world.create(displayName="Ada Lovelace", type="Person")
    picture = world.http.get(picture_url(world, contact["id"])).json()
    photo = make_jpeg(320, 240)

    missing = put_picture(world, contact["id"], photo, None)
    stale = put_picture(world, contact["id"], photo, 'W/"JzE7MTsxOzAwOyc="')
    ok = put_picture(world, contact["id"], photo, picture["@odata.etag"])

    assert error_of(missing)[:2] == (400, "BadRequest_InvalidToken")
    assert error_of(stale)[:2] == (412, "Request_EntityChanged")
    assert ok.status_code == 204 and ok.content == b""
    after = world.http.get(picture_url(world, contact["id"])).json()
    assert (after["width"], after["height"], after["contentType"]) == (320, 240, "image/jpeg")
    content = world.http.get(f"{picture_url(world, contact['id'])}/pictureContent")
    assert content.status_code == 200 and content.content == photo
    assert content.headers["Content-Type"] == "image/jpeg"
    assert world.bc.picture(world.company, contact["id"]) == photo


def test_a_picture_write_modifies_the_contact(world):
    """The picture is the contact record's Image field [inferred]: writing it changes the contact's
    etag and lastModifiedDateTime, so the old contact etag no longer matches (a delta read by
    lastModifiedDateTime sees the change)."""
    world.bc.clock.freeze(T0)
    contact = world.create(displayName="Ada Lovelace", type="Person")

    world.bc.clock.advance(5)
    assert put_picture(world, contact["id"], make_png(64, 64), "*").status_code == 204

    now = world.http.get(f"{world.contacts_url}({contact['id']})").json()
    assert now["@odata.etag"] != contact["@odata.etag"]
    assert parse_datetime(now["lastModifiedDateTime"]) == T0 + timedelta(seconds=5)
    stale = world.http.patch(
        f"{world.contacts_url}({contact['id']})",
        json={"jobTitle": "X"},
        headers={"If-Match": contact["@odata.etag"]},
    )
    assert stale.status_code == 412


def test_a_body_that_is_not_an_image_is_refused_and_changes_nothing(world):
    contact = world.create(displayName="Ada Lovelace", type="Person")

    resp = put_picture(world, contact["id"], b"%PDF-1.7 not a picture", "*")

    assert resp.status_code == 400
    assert world.bc.picture(world.company, contact["id"]) is None
    assert (
        world.http.get(f"{world.contacts_url}({contact['id']})").json()["@odata.etag"]
        == contact["@odata.etag"]
    )


def test_delete_picture_needs_if_match_and_removes_it(world):
    """ "picture resource type": DELETE picture → none. If-Match as for the other writes."""
    contact = world.create(displayName="Ada Lovelace", type="Person")
    world.bc.set_picture(world.company, contact["id"], make_jpeg(10, 10))

    missing = world.http.delete(picture_url(world, contact["id"]))
    etag = world.http.get(picture_url(world, contact["id"])).json()["@odata.etag"]
    ok = world.http.delete(picture_url(world, contact["id"]), headers={"If-Match": etag})

    assert error_of(missing)[:2] == (400, "BadRequest_InvalidToken")
    assert ok.status_code == 204
    assert world.http.get(picture_url(world, contact["id"])).json()["width"] == 0
    assert world.bc.picture(world.company, contact["id"]) is None


def test_picture_of_a_missing_contact_is_404(world):
    resp = world.http.get(picture_url(world, "00000000-0000-0000-0000-00000000abcd"))

    assert error_of(resp)[:2] == (404, "Internal_RecordNotFound")


def test_expand_picture_lists_each_contacts_picture_metadata_without_its_bytes(world):
    """`$expand=picture` on the contacts collection: `picture` is the contact's navigation property
    ("picture resource type", Navigation → contact, https://learn.microsoft.com/en-us/dynamics365/business-central/dev-itpro/api-reference/v2.0/resources/dynamics_picture),
    rendered with the properties of "Get picture" (width, height, contentType; no bytes). The sync
    reads it to know which contacts have a picture at no extra request. An expansion the sandbox
    does not know is refused, never ignored. [inferred: no `contacts?$expand=picture` example]"""
    with_picture = world.create(displayName="Ada Lovelace")
    without = world.create(displayName="Alan Turing")
    world.bc.set_picture(world.company, with_picture["id"], make_jpeg(120, 90))

    resp = world.http.get(world.contacts_url, params={"$select": "id,displayName", "$expand": "picture"})
    unknown = world.http.get(world.contacts_url, params={"$expand": "contactInformation"})
    without_expand = world.http.get(world.contacts_url, params={"$select": "id"}).json()["value"]

    assert resp.status_code == 200
    pictures = {c["id"]: c["picture"] for c in resp.json()["value"]}
    assert (pictures[with_picture["id"]]["width"], pictures[with_picture["id"]]["height"]) == (120, 90)
    assert pictures[with_picture["id"]]["contentType"] == "image/jpeg"
    assert pictures[without["id"]]["contentType"] == "" and pictures[without["id"]]["width"] == 0
    assert "pictureContent" not in pictures[with_picture["id"]]
    assert error_of(unknown)[0] == 400
    assert all("picture" not in c for c in without_expand)


@pytest.fixture
def two(world) -> tuple[World, str]:
    second = world.bc.add_company("CRONUS Norge AS")
    return world, second


def test_several_companies_are_listed_and_keep_their_own_contacts_and_numbers(two):
    """API v2.0: /companies lists every company of the environment; contacts, their No. series
    and the Country/Region table are per company (each entity is addressed under companies({id}))."""
    world, second = two
    first_contact = world.create(displayName="Ada Lovelace", type="Person")
    resp = world.http.post(f"{world.root}/companies({second})/contacts", json={"displayName": "Nils Nilsen"})
    assert resp.status_code == 201, resp.text
    second_contact = resp.json()

    names = {c["name"] for c in world.http.get(f"{world.root}/companies").json()["value"]}
    assert names == {"CRONUS USA, Inc.", "CRONUS Norge AS"}
    assert first_contact["number"] == second_contact["number"] == "CT000001"
    in_second = world.list_all(f"{world.root}/companies({second})/contacts")
    assert [c["displayName"] for c in in_second] == ["Nils Nilsen"]
    across = world.http.get(f"{world.root}/companies({second})/contacts({first_contact['id']})")
    assert error_of(across)[:2] == (404, "Internal_RecordNotFound")


def test_country_tables_are_per_company(two):
    world, second = two
    world.bc.add_country("XK", "Kosovo", company_id=second)

    def codes(company: str) -> set[str]:
        return {r["code"] for r in world.list_all(f"{world.root}/companies({company})/countriesRegions")}

    assert "XK" in codes(second) and "XK" not in codes(world.company)


def test_a_picture_belongs_to_its_company(two):
    world, second = two
    contact = world.create(displayName="Ada Lovelace", type="Person")
    world.bc.set_picture(world.company, contact["id"], make_jpeg(8, 8))

    across = world.http.get(picture_url(world, contact["id"], company=second))

    assert error_of(across)[:2] == (404, "Internal_RecordNotFound")
