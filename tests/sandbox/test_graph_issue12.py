"""Graph for issue 12: the default Contacts folder, master categories, categories on contacts and
contact photos, over real HTTPS.

Sources (found with the search tool):
- "Create contact" (user-post-contacts), https://learn.microsoft.com/en-us/graph/api/user-post-contacts
  — POST /users/{id}/contacts adds to the default Contacts folder.
- "List contactFolders", https://learn.microsoft.com/en-us/graph/api/user-list-contactfolders — the
  child folders of the default Contacts folder, not the default folder itself.
- "contact: delta", https://learn.microsoft.com/en-us/graph/api/contact-delta — documented only as
  /contactFolders/{id}/contacts/delta ("/me/contacts/delta" works but "is not yet documented",
  https://learn.microsoft.com/en-us/answers/questions/1634378/microsoft-graph-api-contacts-delta).
- "outlookCategory resource type", https://learn.microsoft.com/en-us/graph/api/resources/outlookcategory
  — displayName unique in the master list, cannot be renamed; color preset0..preset24 or none.
- "Use query parameters" (query-parameters), https://learn.microsoft.com/en-us/graph/query-parameters
  — $filter=categories/any(a:a eq 'Red category').
- "Get profilePhoto", https://learn.microsoft.com/en-us/graph/api/profilephoto-get — 404 when none.
- "Update profilePhoto", https://learn.microsoft.com/en-us/graph/api/profilephoto-update — PUT/PATCH
  .../contacts/{id}/photo/$value, Content-Type image/jpeg, photo "under 4 MB".
"""

from __future__ import annotations

import pytest
import requests

from sandbox.graph import GraphService
from sandbox.images import make_jpeg, make_png
from tests.sandbox.graph_fixtures import ALICE, GraphClient, client, graph, graph_server, graph_tls

__all__ = ["client", "graph", "graph_server", "graph_tls"]  # fixtures used by name


def make_folder(client: GraphClient, name: str) -> str:
    resp = client.post(f"/users/{ALICE}/contactFolders", json={"displayName": name})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def error_code(resp: requests.Response) -> str:
    return resp.json()["error"]["code"]


def put_photo(
    client: GraphClient, contact_id: str, data: bytes, ctype: str = "image/jpeg"
) -> requests.Response:
    return client.request(
        "PUT",
        f"/users/{ALICE}/contacts/{contact_id}/photo/$value",
        data=data,
        headers={"Content-Type": ctype},
    )


# ------------------------------------------------------------------ the default Contacts folder
def test_contacts_posted_to_users_contacts_land_in_the_default_folder_which_is_not_listed(
    client: GraphClient, graph: GraphService
):
    """user-post-contacts: POST /users/{id}/contacts → the default Contacts folder; /contactFolders
    lists its children only; the default folder itself is readable by its id."""
    root = graph.default_folder_id(ALICE)
    sub = make_folder(client, "Business Central")
    mine = client.post(f"/users/{ALICE}/contacts", json={"givenName": "Own", "surname": "Contact"}).json()
    synced = client.post(f"/users/{ALICE}/contactFolders/{sub}/contacts", json={"givenName": "Synced"}).json()

    folders = client.get(f"/users/{ALICE}/contactFolders").json()["value"]
    in_default = client.get(f"/users/{ALICE}/contacts").json()["value"]
    root_folder = client.get(f"/users/{ALICE}/contactFolders/{root}")

    assert mine["parentFolderId"] == root and synced["parentFolderId"] == sub
    assert [f["id"] for f in folders] == [sub]
    assert [c["id"] for c in in_default] == [mine["id"]]
    assert root_folder.status_code == 200 and root_folder.json()["displayName"] == "Contacts"
    assert [c["givenName"] for c in graph.folder_contacts(ALICE, None)] == ["Own"]


def test_delta_on_the_default_folder_by_its_id_sees_only_its_own_contacts(
    client: GraphClient, graph: GraphService
):
    """contact-delta: GET /users/{id}/contactFolders/{id}/contacts/delta with the default folder's id."""
    root = graph.default_folder_id(ALICE)
    sub = make_folder(client, "Business Central")
    graph.user_create_contact(ALICE, None, {"givenName": "Own"})
    graph.user_create_contact(ALICE, sub, {"givenName": "Synced"})

    first = client.get(f"/users/{ALICE}/contactFolders/{root}/contacts/delta")
    assert first.status_code == 200, first.text
    assert [c["givenName"] for c in first.json()["value"]] == ["Own"]
    graph.user_create_contact(ALICE, None, {"givenName": "Later"})
    graph.user_create_contact(ALICE, sub, {"givenName": "Not here"})
    second = client.get(first.json()["@odata.deltaLink"]).json()["value"]
    assert [c["givenName"] for c in second] == ["Later"]


def test_the_default_folders_id_is_the_parent_folder_id_of_its_subfolders_and_contacts(
    client: GraphClient, graph: GraphService
):
    """How the sync finds the default folder's id (BEHAVIOUR §4.8), with the two `$top=1` reads it
    makes. "contactFolder resource type" (https://learn.microsoft.com/en-us/graph/api/resources/
    contactfolder): parentFolderId is "the ID of the folder's parent folder"; "List contactFolders"
    (user-list-contactfolders) lists the folders *in the default Contacts folder*; "contact resource
    type" (https://learn.microsoft.com/en-us/graph/api/resources/contact): a contact's parentFolderId;
    "List contacts" (user-list-contacts) reads the default folder. `$top` and `$select` are the
    generic OData options (https://learn.microsoft.com/en-us/graph/query-parameters)."""
    root = graph.default_folder_id(ALICE)
    query = {"$top": "1", "$select": "id,parentFolderId"}
    assert client.get(f"/users/{ALICE}/contactFolders", params=query).json()["value"] == []
    assert client.get(f"/users/{ALICE}/contacts", params=query).json()["value"] == []
    graph.user_create_contact(ALICE, None, {"givenName": "Own"})
    [contact] = client.get(f"/users/{ALICE}/contacts", params=query).json()["value"]
    assert contact["parentFolderId"] == root
    make_folder(client, "Business Central")
    make_folder(client, "Other")
    [folder] = client.get(f"/users/{ALICE}/contactFolders", params=query).json()["value"]
    assert folder["parentFolderId"] == root


def test_the_default_folder_cannot_be_deleted(client: GraphClient, graph: GraphService):
    resp = client.delete(f"/users/{ALICE}/contactFolders/{graph.default_folder_id(ALICE)}")

    assert resp.status_code == 403 and error_code(resp) == "ErrorDeleteDistinguishedFolder"


# ------------------------------------------------------------------ master categories
def test_a_new_mailbox_has_outlooks_default_categories(client: GraphClient):
    """outlookcategory.md: each has id, displayName, color; new mailboxes carry the six colour
    categories [observed]."""
    resp = client.with_token("tok-settings").get(f"/users/{ALICE}/outlook/masterCategories")

    assert resp.status_code == 200, resp.text
    names = {c["displayName"]: c["color"] for c in resp.json()["value"]}
    assert names["Red category"] == "preset0" and len(names) == 6
    assert all(set(c) == {"id", "displayName", "color"} for c in resp.json()["value"])


def test_create_get_recolour_and_delete_a_category(client: GraphClient, graph: GraphService):
    settings = client.with_token("tok-settings")
    base = f"/users/{ALICE}/outlook/masterCategories"

    created = settings.post(base, json={"displayName": "Business Central", "color": "preset9"})
    assert created.status_code == 201, created.text
    cid = created.json()["id"]
    assert settings.get(f"{base}/{cid}").json()["displayName"] == "Business Central"
    recolour = settings.patch(f"{base}/{cid}", json={"color": "preset4"})
    assert recolour.status_code == 200 and recolour.json()["color"] == "preset4"
    assert {"displayName": "Business Central", "color": "preset4", "id": cid} in graph.master_categories(
        ALICE
    )
    assert settings.delete(f"{base}/{cid}").status_code == 204
    assert settings.get(f"{base}/{cid}").status_code == 404
    assert all(c["displayName"] != "Business Central" for c in graph.master_categories(ALICE))


def test_a_duplicate_name_a_rename_and_an_unknown_colour_are_refused(
    client: GraphClient, graph: GraphService
):
    """outlookcategory.md: "The displayName value must be unique in a user's master list", "After a
    category is created, the name cannot be changed"; color is the categoryColor enum. The error
    codes are [unverified]; the refusal itself, and that nothing changes, is what is pinned."""
    settings = client.with_token("tok-settings")
    base = f"/users/{ALICE}/outlook/masterCategories"
    cid = settings.post(base, json={"displayName": "Business Central", "color": "preset9"}).json()["id"]
    before = graph.master_categories(ALICE)

    duplicate = settings.post(base, json={"displayName": "business central", "color": "preset1"})
    rename = settings.patch(f"{base}/{cid}", json={"displayName": "BC"})
    colour = settings.post(base, json={"displayName": "Other", "color": "purple"})

    assert duplicate.status_code == 409
    assert rename.status_code == 400 and colour.status_code == 400
    assert graph.master_categories(ALICE) == before


@pytest.mark.parametrize(
    ("token", "method", "status"),
    [("tok-rw", "GET", 403), ("tok-settings-read", "GET", 200), ("tok-settings-read", "POST", 403)],
)
def test_categories_need_mailbox_settings_permissions(
    client: GraphClient, token: str, method: str, status: int
):
    """outlookuser-list-mastercategories / -post-mastercategories: MailboxSettings.Read to read,
    MailboxSettings.ReadWrite to create; Contacts.ReadWrite alone is not enough."""
    resp = client.with_token(token).request(
        method, f"/users/{ALICE}/outlook/masterCategories", json={"displayName": "X", "color": "none"}
    )

    assert resp.status_code == status, resp.text


def test_categories_on_contacts_are_a_string_list_and_filterable(client: GraphClient, graph: GraphService):
    """contact.md: categories is a String collection; query-parameters.md: categories/any(a:a eq '…').
    A value need not be in the master list (Outlook shows it without a colour)."""
    tagged = client.post(
        f"/users/{ALICE}/contacts", json={"givenName": "Tagged", "categories": ["Business Central"]}
    ).json()
    client.post(f"/users/{ALICE}/contacts", json={"givenName": "Private"})

    found = client.get(
        f"/users/{ALICE}/contacts", params={"$filter": "categories/any(c:c eq 'business central')"}
    ).json()["value"]

    assert tagged["categories"] == ["Business Central"]
    assert [c["id"] for c in found] == [tagged["id"]]
    cleared = client.patch(f"/users/{ALICE}/contacts/{tagged['id']}", json={"categories": []}).json()
    assert cleared["categories"] == []


# ------------------------------------------------------------------ contact photos
def test_a_contact_without_a_photo_answers_404(client: GraphClient):
    """profilephoto-get: "If no photo exists, the operation returns 404 Not Found"."""
    contact = client.post(f"/users/{ALICE}/contacts", json={"givenName": "Ada"}).json()

    meta = client.get(f"/users/{ALICE}/contacts/{contact['id']}/photo")
    value = client.get(f"/users/{ALICE}/contacts/{contact['id']}/photo/$value")

    assert meta.status_code == 404 and value.status_code == 404


def test_put_photo_value_sets_the_photo_and_changes_the_contact(client: GraphClient, graph: GraphService):
    """profilephoto-update: PUT .../contacts/{id}/photo/$value with image bytes → 200. The contact's
    changeKey changes and delta reports it [inferred: the photo is part of the contact item]."""
    root = graph.default_folder_id(ALICE)
    contact = client.post(f"/users/{ALICE}/contacts", json={"givenName": "Ada"}).json()
    link = client.get(f"/users/{ALICE}/contactFolders/{root}/contacts/delta").json()["@odata.deltaLink"]
    photo = make_jpeg(96, 128)

    resp = put_photo(client, contact["id"], photo)

    assert resp.status_code == 200, resp.text
    meta = client.get(f"/users/{ALICE}/contacts/{contact['id']}/photo").json()
    assert (meta["@odata.mediaContentType"], meta["width"], meta["height"]) == ("image/jpeg", 96, 128)
    value = client.get(f"/users/{ALICE}/contactFolders/{root}/contacts/{contact['id']}/photo/$value")
    assert (
        value.status_code == 200 and value.content == photo and value.headers["Content-Type"] == "image/jpeg"
    )
    after = client.get(f"/users/{ALICE}/contacts/{contact['id']}").json()
    assert after["changeKey"] != contact["changeKey"]
    assert [c["id"] for c in client.get(link).json()["value"]] == [contact["id"]]
    assert graph.contact_photo(ALICE, contact["id"]) == photo


def test_a_png_is_taken_with_its_own_type(client: GraphClient):
    contact = client.post(f"/users/{ALICE}/contacts", json={"givenName": "Ada"}).json()

    assert put_photo(client, contact["id"], make_png(48, 48), "image/png").status_code == 200
    meta = client.get(f"/users/{ALICE}/contacts/{contact['id']}/photo").json()
    assert meta["@odata.mediaContentType"] == "image/png"


def test_an_oversize_or_non_image_photo_is_refused_and_changes_nothing(
    client: GraphClient, graph: GraphService
):
    """profilephoto-update: "this limits the size of the photo you can add to under 4 MB". The status
    codes of the refusals are [unverified]."""
    contact = client.post(f"/users/{ALICE}/contacts", json={"givenName": "Ada"}).json()

    oversize = put_photo(client, contact["id"], make_jpeg(4000, 3000, padding=4 * 1024 * 1024))
    wrong_type = put_photo(client, contact["id"], make_jpeg(10, 10), "application/pdf")
    not_image = put_photo(client, contact["id"], b"not an image at all")
    read_only = put_photo(client.with_token("tok-read"), contact["id"], make_jpeg(10, 10))

    assert oversize.status_code == 413
    assert wrong_type.status_code == 400 and not_image.status_code == 400
    assert read_only.status_code == 403
    assert graph.contact_photo(ALICE, contact["id"]) is None
    assert client.get(f"/users/{ALICE}/contacts/{contact['id']}").json()["changeKey"] == contact["changeKey"]


def test_a_photo_just_under_4_mb_is_accepted(client: GraphClient):
    contact = client.post(f"/users/{ALICE}/contacts", json={"givenName": "Ada"}).json()
    photo = make_jpeg(10, 10, padding=4 * 1024 * 1024 - 1000)

    assert len(photo) < 4 * 1024 * 1024
    assert put_photo(client, contact["id"], photo).status_code == 200


def test_seeded_photo_is_served(client: GraphClient, graph: GraphService):
    contact = graph.user_create_contact(ALICE, None, {"givenName": "Ada"})
    graph.set_contact_photo(ALICE, contact["id"], make_jpeg(20, 20))

    assert client.get(f"/users/{ALICE}/contacts/{contact['id']}/photo").json()["width"] == 20


def test_photo_metadata_in_batch_carries_a_media_etag_that_changes_with_the_photo(client: GraphClient):
    """ "Get profilePhoto" (https://learn.microsoft.com/en-us/graph/api/profilephoto-get): the metadata
    answer carries `@odata.mediaContentType` and `@odata.mediaEtag` (its example: "\\"BA09D118\\"").
    "JSON batching" (https://learn.microsoft.com/en-us/graph/json-batching) takes any JSON request,
    so the metadata of 20 contacts costs one request; a contact without a photo answers 404 inside
    the batch. The sync compares the media etag to tell a changed Outlook photo without its bytes."""
    with_photo = client.post(f"/users/{ALICE}/contacts", json={"displayName": "Photo"}).json()
    without = client.post(f"/users/{ALICE}/contacts", json={"displayName": "None"}).json()
    assert put_photo(client, with_photo["id"], make_jpeg(30, 30)).status_code == 200

    def batch() -> dict[str, dict]:
        reqs = [
            {"id": str(n), "method": "GET", "url": f"/users/{ALICE}/contacts/{c['id']}/photo"}
            for n, c in enumerate((with_photo, without))
        ]
        resp = client.post("/$batch", json={"requests": reqs})
        assert resp.status_code == 200
        return {r["id"]: r for r in resp.json()["responses"]}

    first = batch()
    assert put_photo(client, with_photo["id"], make_jpeg(30, 30, padding=10)).status_code == 200
    second = batch()

    assert first["0"]["status"] == 200 and first["0"]["body"]["@odata.mediaContentType"] == "image/jpeg"
    assert first["1"]["status"] == 404
    assert first["0"]["body"]["@odata.mediaEtag"] != second["0"]["body"]["@odata.mediaEtag"]
