"""The simulated Graph must behave like Graph where the sync depends on it, over real HTTPS."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from sandbox.graph import GraphService
from sandbox.tls import SandboxTls
from tests.sandbox.graph_fixtures import (
    ALICE,
    APP_ID,
    BC_ID,
    BOB,
    GraphClient,
    client,
    fresh_tenant,
    graph,
    graph_server,
    graph_tls,
    start_graph,
)

__all__ = ["client", "graph", "graph_server", "graph_tls"]  # fixtures used by name

DEFAULT_FOLDER_CONTACTS = f"/users/{ALICE}/contacts"


def make_folder(client: GraphClient, name: str = "Business Central", user: str = ALICE) -> str:
    resp = client.post(f"/users/{user}/contactFolders", json={"displayName": name})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def make_contact(client: GraphClient, folder: str, **data: object) -> dict:
    resp = client.post(f"/users/{ALICE}/contactFolders/{folder}/contacts", json=data)
    assert resp.status_code == 201, resp.text
    return resp.json()


def error_code(resp: requests.Response) -> str:
    return resp.json()["error"]["code"]


def follow(client: GraphClient, url: str) -> Iterator[dict]:
    """Every page of a server-driven paging sequence."""
    while url:
        resp = client.get(url)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        yield page
        url = page.get("@odata.nextLink")


@pytest.fixture
def small_graph(graph_tls: SandboxTls) -> Iterator[tuple[GraphService, GraphClient]]:
    """A server with tiny throttling limits, so the rate window is cheap to exhaust."""
    service, server = start_graph(graph_tls, rate_limit=5, rate_window=60.0, delta_token_cache=3)
    fresh_tenant(service)
    session = requests.Session()
    yield service, GraphClient(server.url, str(graph_tls.ca_bundle), session)
    session.close()
    server.stop()


# --------------------------------------------------------------------------- folders
def test_folder_is_created_under_the_default_folder_and_found_by_name(
    client: GraphClient, graph: GraphService
):
    fid = make_folder(client, "Business Central")
    make_folder(client, "O'Brien's")

    listed = client.get(f"/users/{ALICE}/contactFolders").json()["value"]
    assert {f["displayName"] for f in listed} == {"Business Central", "O'Brien's"}
    assert all(f["parentFolderId"] == graph.default_folder_id(ALICE) for f in listed)

    found = client.get(f"/users/{ALICE}/contactFolders", params={"$filter": "displayName eq 'O''Brien''s'"})
    assert [f["displayName"] for f in found.json()["value"]] == ["O'Brien's"]
    missing = client.get(f"/users/{ALICE}/contactFolders", params={"$filter": "displayName eq 'Nope'"})
    assert missing.json()["value"] == []
    assert client.get(f"/users/{ALICE}/contactFolders/{fid}").json()["displayName"] == "Business Central"


def test_a_second_folder_with_the_same_name_is_refused(client: GraphClient):
    fid = make_folder(client, "Business Central")
    other = make_folder(client, "Archive")

    dup = client.post(f"/users/{ALICE}/contactFolders", json={"displayName": "business central"})
    assert dup.status_code == 409 and error_code(dup) == "ErrorFolderExists"
    clash = client.patch(f"/users/{ALICE}/contactFolders/{other}", json={"displayName": "Business Central"})
    assert clash.status_code == 409 and error_code(clash) == "ErrorFolderExists"
    # Another mailbox may have its own folder of that name.
    assert (
        client.post(f"/users/{BOB}/contactFolders", json={"displayName": "Business Central"}).status_code
        == 201
    )

    renamed = client.patch(f"/users/{ALICE}/contactFolders/{fid}", json={"displayName": "BC Contacts"})
    assert renamed.status_code == 200 and renamed.json()["displayName"] == "BC Contacts"


def test_a_deleted_folder_goes_to_deleted_items_keeping_its_id_and_contacts(
    client: GraphClient, graph: GraphService
):
    """Deleting a contact folder (in Outlook or with DELETE) moves it to Deleted Items: it keeps its
    id and contacts, still answers GET with Deleted Items as its parent, and drops out of
    `/contactFolders`, which lists only the children of the default Contacts folder. Only
    `permanentDelete`, or deleting it again from Deleted Items, removes it.

    Sources:
    - "Delete contactFolder" and "contactFolder: permanentDelete" (a separate action that "permanently
      delete[s] a contact folder and remove[s] its items"),
      https://learn.microsoft.com/en-us/graph/api/contactfolder-delete and
      https://learn.microsoft.com/en-us/graph/api/contactfolder-permanentdelete
    - "mailFolder resource type", well-known name `deleteditems`: "The folder items are moved to when
      they're deleted", https://learn.microsoft.com/en-us/graph/api/resources/mailfolder
    - "List contactFolders": the folders "in the default Contacts folder",
      https://learn.microsoft.com/en-us/graph/api/user-list-contactfolders
    - [observed] "Remove-MgUserContactFolder", microsoftgraph/msgraph-sdk-powershell#2743: deleted
      contact folders live on, "listed with a different parentFolderId",
      https://github.com/microsoftgraph/msgraph-sdk-powershell/issues/2743
    """
    fid = make_folder(client)
    contact = make_contact(client, fid, displayName="Ann Lee")

    assert client.delete(f"/users/{ALICE}/contactFolders/{fid}").status_code == 204
    binned = client.get(f"/users/{ALICE}/contactFolders/{fid}")
    assert binned.status_code == 200
    assert binned.json()["parentFolderId"] == graph.deleted_items_id(ALICE) != graph.default_folder_id(ALICE)
    assert client.get(f"/users/{ALICE}/contactFolders").json()["value"] == []
    found = client.get(
        f"/users/{ALICE}/contactFolders", params={"$filter": "displayName eq 'Business Central'"}
    )
    assert found.json()["value"] == []
    assert client.get(f"/users/{ALICE}/contacts/{contact['id']}").json()["displayName"] == "Ann Lee"
    # A new folder of that name under Contacts is no clash: names are unique per parent.
    assert make_folder(client) != fid

    # Deleting it from Deleted Items removes it for good, as does permanentDelete.
    assert client.delete(f"/users/{ALICE}/contactFolders/{fid}").status_code == 204
    gone = client.get(f"/users/{ALICE}/contactFolders/{fid}")
    assert gone.status_code == 404 and error_code(gone) == "ErrorItemNotFound"
    assert client.get(f"/users/{ALICE}/contacts/{contact['id']}").status_code == 404
    other = make_folder(client, "Archive")
    assert client.post(f"/users/{ALICE}/contactFolders/{other}/permanentDelete").status_code == 204
    assert client.get(f"/users/{ALICE}/contactFolders/{other}").status_code == 404


def test_a_folder_deleted_in_outlook_keeps_its_delta_and_its_contacts(
    client: GraphClient, graph: GraphService
):
    """A folder the user deleted in Outlook is in Deleted Items, not gone: its delta link still works and
    reports nothing (moving the folder changes none of its contacts), so only the folder's parent tells
    a client that it left Contacts. Sources as in
    test_a_deleted_folder_goes_to_deleted_items_keeping_its_id_and_contacts."""
    fid = make_folder(client)
    ann = graph.user_create_contact(ALICE, fid, {"displayName": "Ann"})
    _, link, _ = run_round(client, delta_url(fid))
    graph.user_delete_folder(ALICE, fid)

    assert graph.folders(ALICE) == [] and graph.folder(ALICE, fid)[
        "parentFolderId"
    ] == graph.deleted_items_id(ALICE)
    items, _, _ = run_round(client, link)
    assert items == []
    assert [c["id"] for c in graph.folder_contacts(ALICE, fid)] == [ann["id"]]
    graph.user_empty_deleted_items(ALICE)
    assert graph.folder(ALICE, fid) is None
    resp = client.get(link)
    assert resp.status_code == 404 and error_code(resp) == "ErrorItemNotFound"


def test_folder_list_is_paged_with_top_and_an_absolute_next_link(client: GraphClient):
    for name in ("A", "B", "C"):
        make_folder(client, name)
    first = client.get(f"/users/{ALICE}/contactFolders", params={"$top": "2"}).json()
    assert len(first["value"]) == 2
    assert first["@odata.nextLink"].startswith("https://")
    pages = list(follow(client, first["@odata.nextLink"]))
    assert [f["displayName"] for p in pages for f in p["value"]] == ["C"]
    assert "@odata.nextLink" not in pages[-1]


@pytest.mark.parametrize(
    ("path", "expression"),
    [
        ("contactFolders", "startswith(displayName,'Bus')"),
        ("contacts", "emailAddresses/any(a:a/name eq 'Ann')"),
        ("contacts", "companyName ne 'Contoso'"),
    ],
)
def test_unsupported_filters_are_refused_not_ignored(client: GraphClient, path: str, expression: str):
    resp = client.get(f"/users/{ALICE}/{path}", params={"$filter": expression})
    assert resp.status_code == 400
    assert error_code(resp) == "ErrorInvalidUrlQueryFilter"


# --------------------------------------------------------------------------- contacts
def test_created_contact_carries_server_fields_and_a_generated_display_name(client: GraphClient):
    fid = make_folder(client)
    created = make_contact(
        client,
        fid,
        givenName="Ann",
        surname="Lee",
        emailAddresses=[{"address": "ann@fabrikam.com", "name": "Ann Lee"}],
        singleValueExtendedProperties=[{"id": BC_ID, "value": "BC-1"}],
    )
    assert created["displayName"] == "Ann Lee"
    assert created["parentFolderId"] == fid
    assert created["@odata.etag"] == f'W/"{created["changeKey"]}"'
    assert created["createdDateTime"].endswith("Z") and created["lastModifiedDateTime"].endswith("Z")
    assert created["emailAddresses"] == [{"address": "ann@fabrikam.com", "name": "Ann Lee"}]
    assert "singleValueExtendedProperties" not in created  # written inline, never echoed

    fetched = client.get(f"/users/{ALICE}/contactFolders/{fid}/contacts/{created['id']}").json()
    assert fetched["changeKey"] == created["changeKey"] and fetched["displayName"] == "Ann Lee"


def test_patch_gives_a_new_change_key_and_replaces_complex_values_whole(client: GraphClient):
    fid = make_folder(client)
    created = make_contact(
        client, fid, displayName="Ann Lee", businessAddress={"street": "1 Main St", "city": "Oslo"}
    )
    url = f"/users/{ALICE}/contactFolders/{fid}/contacts/{created['id']}"

    updated = client.patch(url, json={"businessAddress": {"city": "Bergen"}, "jobTitle": "Buyer"})
    assert updated.status_code == 200
    body = updated.json()
    assert body["changeKey"] != created["changeKey"]
    assert body["@odata.etag"] == f'W/"{body["changeKey"]}"'
    assert body["businessAddress"] == {"city": "Bergen"}  # the street is gone: no merge
    assert body["jobTitle"] == "Buyer" and body["displayName"] == "Ann Lee"
    assert client.get(url).json()["changeKey"] == body["changeKey"]


def test_changing_name_parts_without_display_name_regenerates_it(client: GraphClient):
    fid = make_folder(client)
    created = make_contact(client, fid, displayName="Custom Name", givenName="Ann", surname="Lee")
    assert created["displayName"] == "Custom Name"
    url = f"/users/{ALICE}/contacts/{created['id']}"

    assert client.patch(url, json={"surname": "Berg"}).json()["displayName"] == "Ann Berg"
    kept = client.patch(url, json={"surname": "Dahl", "displayName": "Ann D."}).json()
    assert kept["displayName"] == "Ann D."


def test_deleted_contact_is_gone(client: GraphClient):
    fid = make_folder(client)
    created = make_contact(client, fid, displayName="Ann")
    url = f"/users/{ALICE}/contactFolders/{fid}/contacts/{created['id']}"
    assert client.delete(url).status_code == 204
    gone = client.get(url)
    assert gone.status_code == 404 and error_code(gone) == "ErrorItemNotFound"
    assert client.delete(url).status_code == 404


def test_more_than_three_emails_or_two_business_phones_is_refused(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    emails = [{"address": f"a{i}@x.com"} for i in range(4)]
    resp = client.post(f"/users/{ALICE}/contactFolders/{fid}/contacts", json={"emailAddresses": emails})
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == (
        "The multi value property EmailAddresses has 4 entries, that exceeds the max allowed value of 3"
    )
    phones = client.post(
        f"/users/{ALICE}/contactFolders/{fid}/contacts", json={"businessPhones": ["1", "2", "3"]}
    )
    assert phones.status_code == 400 and "BusinessPhones has 3 entries" in phones.json()["error"]["message"]
    assert graph.folder_contacts(ALICE, fid) == []

    ok = make_contact(client, fid, emailAddresses=emails[:3], businessPhones=["1", "2"])
    patch = client.patch(f"/users/{ALICE}/contacts/{ok['id']}", json={"emailAddresses": emails})
    assert patch.status_code == 400
    assert len(client.get(f"/users/{ALICE}/contacts/{ok['id']}").json()["emailAddresses"]) == 3


def test_unknown_property_and_malformed_json_are_refused(client: GraphClient):
    fid = make_folder(client)
    url = f"/users/{ALICE}/contactFolders/{fid}/contacts"
    unknown = client.post(url, json={"displayName": "Ann", "favouriteColour": "blue"})
    assert unknown.status_code == 400 and error_code(unknown) == "RequestBodyRead"
    assert "favouriteColour" in unknown.json()["error"]["message"]
    bad_address = client.post(url, json={"businessAddress": {"town": "Oslo"}})
    assert bad_address.status_code == 400 and "town" in bad_address.json()["error"]["message"]
    broken = client.post(url, data="{not json", headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and error_code(broken) == "BadRequest"


def test_immutable_ids_on_request_and_both_formats_resolve(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    immutable_client = client.with_immutable_ids()
    created = immutable_client.post(
        f"/users/{ALICE}/contactFolders/{fid}/contacts", json={"displayName": "Ann"}
    )
    assert created.headers["Preference-Applied"] == 'IdType="ImmutableId"'
    immutable_id = created.json()["id"]

    plain = client.get(f"/users/{ALICE}/contactFolders/{fid}/contacts").json()["value"][0]
    rest_id = plain["id"]
    assert rest_id != immutable_id
    assert "Preference-Applied" not in client.get(f"/users/{ALICE}/contacts/{rest_id}").headers
    for some_id in (rest_id, immutable_id):
        assert client.get(f"/users/{ALICE}/contacts/{some_id}").json()["displayName"] == "Ann"
        assert immutable_client.get(f"/users/{ALICE}/contacts/{some_id}").json()["id"] == immutable_id

    # A move to another folder changes the REST id but not the immutable one.
    other = make_folder(client, "Other")
    graph.user_move_contact(ALICE, immutable_id, other)
    assert client.get(f"/users/{ALICE}/contacts/{rest_id}").status_code == 404
    moved = immutable_client.get(f"/users/{ALICE}/contacts/{immutable_id}").json()
    assert moved["parentFolderId"] == other and moved["id"] == immutable_id


def test_extended_property_is_read_with_expand_and_found_with_filter(client: GraphClient):
    fid = make_folder(client)
    tagged = make_contact(
        client, fid, displayName="Ann", singleValueExtendedProperties=[{"id": BC_ID, "value": "AbC-1"}]
    )
    make_contact(client, fid, displayName="Bob")
    url = f"/users/{ALICE}/contactFolders/{fid}/contacts"
    expand = f"singleValueExtendedProperties($filter=id eq '{BC_ID}')"

    assert "singleValueExtendedProperties" not in client.get(f"{url}/{tagged['id']}").json()
    expanded = client.get(f"{url}/{tagged['id']}", params={"$expand": expand}).json()
    assert [p["value"] for p in expanded["singleValueExtendedProperties"]] == ["AbC-1"]
    listed = client.get(url, params={"$expand": expand, "$select": "displayName"}).json()["value"]
    assert {c["displayName"]: "singleValueExtendedProperties" in c for c in listed} == {
        "Ann": True,
        "Bob": False,
    }

    def find(prop_id: str, value: str) -> list[str]:
        expr = f"singleValueExtendedProperties/Any(ep: ep/id eq '{prop_id}' and ep/value eq '{value}')"
        resp = client.get(url, params={"$filter": expr})
        assert resp.status_code == 200, resp.text
        return [c["id"] for c in resp.json()["value"]]

    assert find(BC_ID, "abc-1") == [tagged["id"]]  # the value compares case-insensitively
    assert find(BC_ID.replace("{8ECCC264", "{8eccc264"), "AbC-1") == [tagged["id"]]  # so does the GUID
    assert find(BC_ID.replace("BcContactId", "bccontactid"), "AbC-1") == []  # the name does not
    assert find(BC_ID, "other") == []

    bad = client.post(url, json={"singleValueExtendedProperties": [{"id": "BcContactId", "value": "x"}]})
    assert bad.status_code == 400 and error_code(bad) == "ErrorInvalidProperty"


def test_email_filter_matches_any_address_case_insensitively(client: GraphClient):
    fid = make_folder(client)
    ann = make_contact(client, fid, emailAddresses=[{"address": "x@y.com"}, {"address": "Ann@Fabrikam.com"}])
    neil = make_contact(client, fid, emailAddresses=[{"address": "o'neil@fabrikam.com"}])
    url = f"/users/{ALICE}/contactFolders/{fid}/contacts"

    def ids(address: str) -> list[str]:
        expr = f"emailAddresses/any(a:a/address eq '{address}')"
        return [c["id"] for c in client.get(url, params={"$filter": expr}).json()["value"]]

    assert ids("ann@fabrikam.com") == [ann["id"]]
    assert ids("o''neil@fabrikam.com") == [neil["id"]]
    assert ids("nobody@fabrikam.com") == []


def test_select_returns_only_the_chosen_properties(client: GraphClient):
    fid = make_folder(client)
    created = make_contact(client, fid, displayName="Ann", jobTitle="Buyer")
    got = client.get(f"/users/{ALICE}/contacts/{created['id']}", params={"$select": "displayName"}).json()
    assert set(got) == {"@odata.context", "@odata.etag", "id", "displayName"}
    bad = client.get(f"/users/{ALICE}/contacts", params={"$select": "displayName,shoeSize"})
    assert bad.status_code == 400 and "shoeSize" in bad.json()["error"]["message"]


def test_contact_list_pages_ten_by_default_and_honours_top(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    for i in range(25):
        graph.user_create_contact(ALICE, fid, {"displayName": f"C{i:02d}"})
    url = f"/users/{ALICE}/contactFolders/{fid}/contacts"

    pages = list(follow(client, client.get(url).request.url))
    assert [len(p["value"]) for p in pages] == [10, 10, 5]
    assert sorted(c["displayName"] for p in pages for c in p["value"]) == [f"C{i:02d}" for i in range(25)]
    assert len(client.get(url, params={"$top": "1000"}).json()["value"]) == 25
    too_many = client.get(url, params={"$top": "1001"})
    assert too_many.status_code == 400
    # The default Contacts folder is separate from the sync folder.
    assert client.get(DEFAULT_FOLDER_CONTACTS).json()["value"] == []


def test_contacts_endpoint_without_folder_uses_the_default_folder(client: GraphClient, graph: GraphService):
    created = client.post(DEFAULT_FOLDER_CONTACTS, json={"displayName": "Ann"})
    assert created.status_code == 201
    assert created.json()["parentFolderId"] == graph.default_folder_id(ALICE)
    assert [c["displayName"] for c in client.get(DEFAULT_FOLDER_CONTACTS).json()["value"]] == ["Ann"]


def test_if_match_with_a_stale_etag_is_refused(client: GraphClient):
    created = client.post(DEFAULT_FOLDER_CONTACTS, json={"displayName": "Ann"}).json()
    url = f"{DEFAULT_FOLDER_CONTACTS}/{created['id']}"
    fresh = client.patch(url, json={"jobTitle": "A"}, headers={"If-Match": created["@odata.etag"]})
    assert fresh.status_code == 200
    stale = client.patch(url, json={"jobTitle": "B"}, headers={"If-Match": created["@odata.etag"]})
    assert stale.status_code == 412 and error_code(stale) == "ErrorIrresolvableConflict"


# --------------------------------------------------------------------------- users, auth, mailboxes
def test_user_is_found_by_upn_in_any_case_or_by_id(client: GraphClient, graph: GraphService):
    by_upn = client.get(f"/users/{ALICE.upper()}")
    assert by_upn.status_code == 200
    user_id = by_upn.json()["id"]
    assert client.get(f"/users/{user_id}").json()["userPrincipalName"] == ALICE
    unknown = client.get("/users/nobody@contoso.com")
    assert unknown.status_code == 404 and error_code(unknown) == "Request_ResourceNotFound"
    denied = client.with_token("tok-read").get(f"/users/{ALICE}")
    assert denied.status_code == 403 and error_code(denied) == "Authorization_RequestDenied"
    # Contacts are reachable by id as well as by UPN.
    assert client.get(f"/users/{user_id}/contactFolders").status_code == 200


def test_token_problems_answer_401_or_403(client: GraphClient):
    url = f"/users/{ALICE}/contactFolders"
    missing = client.with_token(None).get(url)
    assert missing.status_code == 401 and error_code(missing) == "InvalidAuthenticationToken"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.with_token("forged").get(url).status_code == 401

    none = client.with_token("tok-none").get(url)
    assert none.status_code == 403 and none.json()["error"]["message"] == (
        "Access is denied. Check credentials and try again."
    )
    reader = client.with_token("tok-read")
    assert reader.get(url).status_code == 200
    assert reader.post(url, json={"displayName": "X"}).status_code == 403


def test_error_body_has_graph_shape_and_echoes_client_request_id(client: GraphClient):
    resp = client.get(f"/users/{ALICE}/contacts/{'A' * 40}", headers={"client-request-id": "abc-123"})
    assert resp.status_code == 404
    inner = resp.json()["error"]["innerError"]
    assert inner["client-request-id"] == "abc-123" and inner["request-id"] and inner["date"]
    assert resp.headers["request-id"] == inner["request-id"]


def test_mailbox_access_follows_policy_and_mailbox_state(client: GraphClient, graph: GraphService):
    graph.restrict_app(APP_ID, [ALICE])
    assert client.get(f"/users/{ALICE}/contactFolders").status_code == 200
    blocked = client.get(f"/users/{BOB}/contactFolders")
    assert blocked.status_code == 403 and error_code(blocked) == "ErrorAccessDenied"
    assert "AppOnly AccessPolicy" in blocked.json()["error"]["message"]
    assert client.with_token("tok-other-app").get(f"/users/{BOB}/contactFolders").status_code == 200
    graph.restrict_app(APP_ID, None)

    unknown = client.get("/users/nobody@contoso.com/contactFolders")
    assert unknown.status_code == 404 and error_code(unknown) == "ErrorInvalidUser"
    graph.remove_mailbox(BOB)
    no_mailbox = client.get(f"/users/{BOB}/contactFolders")
    assert no_mailbox.status_code == 404 and error_code(no_mailbox) == "MailboxNotEnabledForRESTAPI"
    assert client.get(f"/users/{BOB}").status_code == 200  # still in the directory


def test_me_is_refused_for_app_only_tokens(client: GraphClient):
    resp = client.get("/me/contacts")
    assert resp.status_code == 400 and "delegated" in resp.json()["error"]["message"]


# --------------------------------------------------------------------------- delta
def delta_url(folder: str) -> str:
    return f"/users/{ALICE}/contactFolders/{folder}/contacts/delta"


def run_round(client: GraphClient, first: str, **kwargs: object) -> tuple[list[dict], str, list[dict]]:
    """One delta round: (all items, the delta link, every page body)."""
    pages = []
    resp = client.get(first, **kwargs)
    while True:
        assert resp.status_code == 200, resp.text
        page = resp.json()
        pages.append(page)
        assert ("@odata.nextLink" in page) != ("@odata.deltaLink" in page)  # never both, never neither
        if "@odata.deltaLink" in page:
            return [v for p in pages for v in p["value"]], page["@odata.deltaLink"], pages
        resp = client.get(page["@odata.nextLink"], headers=kwargs.get("headers"))


def test_first_delta_round_returns_every_contact_over_pages(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    for i in range(23):
        graph.user_create_contact(ALICE, fid, {"displayName": f"C{i:02d}"})
    graph.user_create_contact(ALICE, None, {"displayName": "In the default folder"})

    items, link, pages = run_round(client, delta_url(fid), headers={"Prefer": "odata.maxpagesize=10"})
    assert [len(p["value"]) for p in pages] == [10, 10, 3]
    assert sorted(i["displayName"] for i in items) == [f"C{i:02d}" for i in range(23)]
    assert all("$skiptoken=" in p["@odata.nextLink"] for p in pages[:-1])
    assert "$deltatoken=" in link and link.startswith("https://")

    default = client.get(delta_url(fid))
    assert len(default.json()["value"]) == 10  # default page size
    capped = client.get(delta_url(fid), headers={"Prefer": "odata.maxpagesize=500"})
    assert capped.headers["Preference-Applied"] == "odata.maxpagesize=200"
    assert len(capped.json()["value"]) == 23


def test_next_delta_round_reports_user_and_app_changes(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    other = make_folder(client, "Other")
    kept = graph.user_create_contact(ALICE, fid, {"displayName": "Kept"})
    edited = graph.user_create_contact(ALICE, fid, {"displayName": "Edited"})
    deleted = graph.user_create_contact(ALICE, fid, {"displayName": "Deleted"})
    app_edited = graph.user_create_contact(ALICE, fid, {"displayName": "App edited"})
    moved = graph.user_create_contact(ALICE, fid, {"displayName": "Moved"})
    first, link, _ = run_round(client, delta_url(fid), params={"$select": "displayName,jobTitle"})
    rest_ids = {i["displayName"]: i["id"] for i in first}
    assert set(first[0]) == {"@odata.type", "@odata.etag", "id", "displayName", "jobTitle"}

    graph.user_update_contact(ALICE, fid, edited["id"], jobTitle="Buyer")
    graph.user_delete_contact(ALICE, fid, deleted["id"])
    graph.user_move_contact(ALICE, moved["id"], other)
    graph.user_create_contact(ALICE, fid, {"displayName": "New", "companyName": "Fabrikam"})
    assert client.patch(f"/users/{ALICE}/contacts/{rest_ids['App edited']}", json={"jobTitle": "CEO"}).ok
    transient = make_contact(client, fid, displayName="Came and went")
    assert client.delete(f"/users/{ALICE}/contacts/{transient['id']}").status_code == 204
    graph.user_create_contact(ALICE, other, {"displayName": "Elsewhere"})

    second, link2, _ = run_round(client, link)
    # Updated items carry their id and what changed (see the partial-delta test below), so by id.
    names = {v: k for k, v in rest_ids.items()}
    changed = {names.get(i["id"]) or i["displayName"]: i for i in second if "@removed" not in i}
    removed = {i["id"]: i["@removed"] for i in second if "@removed" in i}
    assert set(changed) == {"Edited", "New", "App edited"}
    assert changed["Edited"]["jobTitle"] == "Buyer" and changed["App edited"]["jobTitle"] == "CEO"
    assert "companyName" not in changed["New"]  # $select of the first request still applies
    assert removed == {rest_ids["Deleted"]: {"reason": "deleted"}, rest_ids["Moved"]: {"reason": "deleted"}}
    assert kept["id"] not in {i["id"] for i in second}

    third, _, _ = run_round(client, link2)
    assert third == []
    assert app_edited["displayName"] == "App edited"


def test_delta_with_immutable_ids_reports_immutable_ids(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    ann = graph.user_create_contact(ALICE, fid, {"displayName": "Ann"})
    immutable_client = client.with_immutable_ids()
    first, link, _ = run_round(immutable_client, delta_url(fid))
    assert [i["id"] for i in first] == [ann["id"]]
    graph.user_delete_contact(ALICE, fid, ann["id"])
    second, _, _ = run_round(immutable_client, link)
    assert second[0]["id"] == ann["id"] and second[0]["@removed"] == {"reason": "deleted"}


def test_expired_delta_token_answers_sync_state_not_found(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    graph.user_create_contact(ALICE, fid, {"displayName": "Ann"})
    _, link, _ = run_round(client, delta_url(fid))
    graph.expire_delta_tokens(ALICE)
    resp = client.get(link)
    assert resp.status_code == 410  # the one public capture of an Outlook delta (docs-contrib#7897)
    assert error_code(resp).lower() == "syncstatenotfound"
    assert "Location" not in resp.headers
    # Starting over works.
    items, _, _ = run_round(client, delta_url(fid))
    assert [i["displayName"] for i in items] == ["Ann"]


def test_oldest_delta_tokens_fall_out_of_the_bounded_cache(small_graph: tuple[GraphService, GraphClient]):
    graph, client = small_graph
    fid = graph.user_create_folder(ALICE, "Business Central")["id"]
    _, oldest, _ = run_round(client, delta_url(fid))
    for _ in range(3):
        run_round(client, delta_url(fid))
    assert error_code(client.get(oldest)) == "SyncStateNotFound"


def test_resync_required_answers_410_with_a_fresh_location(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    graph.user_create_contact(ALICE, fid, {"displayName": "Ann", "jobTitle": "Buyer"})
    _, link, _ = run_round(client, delta_url(fid), params={"$select": "displayName"})
    graph.require_resync(ALICE)

    gone = client.get(link)
    assert gone.status_code == 410
    location = gone.headers["Location"]
    query = parse_qs(urlsplit(location).query, keep_blank_values=True)
    assert query["$deltatoken"] == [""] and query["$select"] == ["displayName"]
    items, _, _ = run_round(client, location)
    assert [set(i) for i in items] == [{"@odata.type", "@odata.etag", "id", "displayName"}]


def test_delta_refuses_expand_and_filter(client: GraphClient):
    fid = make_folder(client)
    expand = client.get(
        delta_url(fid), params={"$expand": f"singleValueExtendedProperties($filter=id eq '{BC_ID}')"}
    )
    assert expand.status_code == 500  # issues #7929/#8029: Outlook delta fails on $expand
    assert client.get(delta_url(fid), params={"$filter": "displayName eq 'x'"}).status_code == 400


def test_delta_of_a_permanently_deleted_folder_is_not_found(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    _, link, _ = run_round(client, delta_url(fid))
    assert client.post(f"/users/{ALICE}/contactFolders/{fid}/permanentDelete").status_code == 204
    resp = client.get(link)
    assert resp.status_code == 404 and error_code(resp) == "ErrorItemNotFound"


def test_delta_answers_an_updated_contact_with_its_id_and_only_what_changed(
    client: GraphClient, graph: GraphService
):
    """In a round after the first, a contact created since the last round comes whole; an updated one
    comes as its id plus the properties that changed (within the first request's $select), not as the
    whole contact. A client that took it for the whole contact would blank everything else.

    Sources:
    - "Use delta query to track changes in Microsoft Graph data", section "Resource representation in
      the delta query response": "Newly created instances ... are represented ... using their standard
      representation" and "Updated instances are represented by their id with at least the properties
      that have been updated, but additional properties may be included",
      https://learn.microsoft.com/en-us/graph/delta-query-overview
    - "contact: delta": "The id property is always returned",
      https://learn.microsoft.com/en-us/graph/api/contact-delta
    """
    fid = make_folder(client)
    ann = graph.user_create_contact(
        ALICE,
        fid,
        {
            "displayName": "Ann Lee",
            "jobTitle": "Buyer",
            "companyName": "Fabrikam",
            "businessPhones": ["+47 1"],
        },
    )
    select = "displayName,jobTitle,companyName,businessPhones,emailAddresses"
    first, link, _ = run_round(client.with_immutable_ids(), delta_url(fid), params={"$select": select})
    assert first[0]["companyName"] == "Fabrikam"  # the first round is whole

    graph.user_update_contact(ALICE, fid, ann["id"], jobTitle="Head Buyer")
    graph.user_update_contact(
        ALICE,
        fid,
        ann["id"],
        emailAddresses=[{"address": "ann@fabrikam.example"}, {"address": "ann@home.example"}],
    )
    graph.user_create_contact(ALICE, fid, {"displayName": "Bo Ek", "companyName": "Contoso"})
    second, link2, _ = run_round(client.with_immutable_ids(), link)
    by_name = {i.get("displayName", "<partial>"): i for i in second}
    assert set(by_name) == {"<partial>", "Bo Ek"}
    partial = by_name["<partial>"]
    assert partial["id"] == ann["id"]
    assert {k for k in partial if not k.startswith("@odata.")} == {"id", "jobTitle", "emailAddresses"}
    assert partial["jobTitle"] == "Head Buyer" and len(partial["emailAddresses"]) == 2
    assert by_name["Bo Ek"]["companyName"] == "Contoso" and "jobTitle" in by_name["Bo Ek"]  # created: whole

    # A change outside $select still reports the item, with its id alone.
    graph.user_update_contact(ALICE, fid, ann["id"], personalNotes="met at the fair")
    third, _, _ = run_round(client.with_immutable_ids(), link2)
    assert [{k for k in i if not k.startswith("@odata.")} for i in third] == [{"id"}]

    # The switch for a tenant that sends updated items whole.
    graph.delta_partial_updates = False
    graph.user_update_contact(ALICE, fid, ann["id"], jobTitle="Chief Buyer")
    fourth, _, _ = run_round(client.with_immutable_ids(), link2)
    assert fourth[0]["companyName"] == "Fabrikam" and fourth[0]["jobTitle"] == "Chief Buyer"


def test_folder_names_compare_case_insensitively(client: GraphClient):
    """Exchange compares folder names without regard to case: `$filter=displayName eq '…'` finds
    "business central" for 'Business Central', and creating "BUSINESS CENTRAL" next to it is refused
    with 409 ErrorFolderExists.

    Sources:
    - EWS "CreateFolder" (MS-OXWSFOLD 3.1.4.2): "Trying to create a folder that already exists results
      in an error",
      https://learn.microsoft.com/en-us/openspecs/exchange_server_protocols/ms-oxwsfold/f44f8b84-12d6-4dd6-994c-fd235b9cb886
    - [observed] alcionai/corso#3278 "Handle ErrorFolderExists for contact restore folders": Graph answers
      a second contact folder of one name with ErrorFolderExists, resolved by getting the folder by
      display name, https://github.com/alcionai/corso/pull/3278
    - [observed] jstedfast/MailKit#803 "Folder Name Case Sensitivity": Office 365 matches folder names
      regardless of case, https://github.com/jstedfast/MailKit/issues/803
    - [observed] microsoft-graph-docs-contrib#760: `eq` is case-sensitive "only ... in places API",
      https://github.com/microsoftgraph/microsoft-graph-docs-contrib/issues/760
    """
    fid = make_folder(client, "business central")
    found = client.get(
        f"/users/{ALICE}/contactFolders", params={"$filter": "displayName eq 'Business Central'"}
    )
    assert [(f["id"], f["displayName"]) for f in found.json()["value"]] == [(fid, "business central")]
    dup = client.post(f"/users/{ALICE}/contactFolders", json={"displayName": "BUSINESS CENTRAL"})
    assert dup.status_code == 409 and error_code(dup) == "ErrorFolderExists"
    assert len(client.get(f"/users/{ALICE}/contactFolders").json()["value"]) == 1


# --------------------------------------------------------------------------- $batch
def batch(client: GraphClient, requests_: list[dict]) -> requests.Response:
    return client.post("/$batch", json={"requests": requests_})


def by_id(resp: requests.Response) -> dict[str, dict]:
    assert resp.status_code == 200, resp.text
    return {r["id"]: r for r in resp.json()["responses"]}


JSON = {"Content-Type": "application/json"}


def test_batch_answers_200_with_a_status_per_operation(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    ann = make_contact(client, fid, displayName="Ann")
    carl = make_contact(client, fid, displayName="Carl")
    resp = batch(
        client,
        [
            {
                "id": "1",
                "method": "POST",
                "url": f"/users/{ALICE}/contactFolders/{fid}/contacts",
                "headers": JSON,
                "body": {"displayName": "Bob"},
            },
            {"id": "2", "method": "GET", "url": f"users/{ALICE}/contacts/{'A' * 40}"},  # no leading slash
            {
                "id": "3",
                "method": "PATCH",
                "url": f"/users/{ALICE}/contacts/{ann['id']}",
                "headers": JSON,
                "body": {"jobTitle": "CEO"},
            },
            {"id": "4", "method": "DELETE", "url": f"/users/{ALICE}/contacts/{carl['id']}?x=1"},
        ],
    )
    results = by_id(resp)
    assert {k: r["status"] for k, r in results.items()} == {"1": 201, "2": 404, "3": 200, "4": 204}
    assert results["1"]["body"]["displayName"] == "Bob"
    assert results["1"]["headers"]["Content-Type"].startswith("application/json")
    assert results["2"]["body"]["error"]["code"] == "ErrorItemNotFound"
    assert "body" not in results["4"]
    assert sorted(c["displayName"] for c in graph.folder_contacts(ALICE, fid)) == ["Ann", "Bob"]


def test_malformed_batches_are_refused_whole(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    create = {
        "method": "POST",
        "url": f"/users/{ALICE}/contactFolders/{fid}/contacts",
        "headers": JSON,
        "body": {},
    }

    too_many = batch(client, [{"id": str(i), **create} for i in range(21)])
    assert too_many.status_code == 400
    duplicate = batch(client, [{"id": "a", **create}, {"id": "A", **create}])
    assert duplicate.status_code == 400 and "has to be unique" in duplicate.json()["error"]["message"]
    no_type = batch(client, [{"id": "1", **create}, {"id": "2", **{**create, "headers": {}}}])
    assert no_type.status_code == 400 and "Content-Type" in no_type.json()["error"]["message"]
    assert graph.folder_contacts(ALICE, fid) == []  # nothing of a refused batch ran

    assert batch(client, [{"id": str(i), **create} for i in range(20)]).status_code == 200


def test_failed_dependency_gives_424_to_its_dependents(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    missing = f"/users/{ALICE}/contacts/{'B' * 40}"
    create = {"method": "POST", "url": f"/users/{ALICE}/contactFolders/{fid}/contacts", "headers": JSON}
    resp = batch(
        client,
        [
            {"id": "3", "dependsOn": ["2"], **create, "body": {"displayName": "Never"}},
            {"id": "1", "method": "PATCH", "url": missing, "headers": JSON, "body": {"jobTitle": "x"}},
            {"id": "2", "dependsOn": ["1"], **create, "body": {"displayName": "Never either"}},
        ],
    )
    assert {k: r["status"] for k, r in by_id(resp).items()} == {"1": 404, "2": 424, "3": 424}
    assert graph.folder_contacts(ALICE, fid) == []
    assert graph.counters.item_count("POST", "contacts.create") == 0  # dependents never ran

    two_deps = [
        {"id": "1", **create, "body": {}},
        {"id": "2", **create, "body": {}},
        {"id": "3", "dependsOn": ["1", "2"], **create, "body": {}},
    ]
    assert batch(client, two_deps).status_code == 400
    mixed = [
        {"id": "1", **create, "body": {}},
        {"id": "2", "dependsOn": ["1"], **create, "body": {}},
        {"id": "3", "dependsOn": ["2"], **create, "body": {}},
        {"id": "4", **create, "body": {}},
    ]
    assert batch(client, mixed).status_code == 400  # neither parallel, serial nor "same"
    assert graph.folder_contacts(ALICE, fid) == []


def test_throttled_operation_gets_its_own_429_inside_a_200_batch(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    graph.faults.throttle(count=1, retry_after=0.5, in_batch=True, method="POST")
    create = {"method": "POST", "url": f"/users/{ALICE}/contactFolders/{fid}/contacts", "headers": JSON}
    resp = batch(client, [{"id": str(i), **create, "body": {"displayName": f"C{i}"}} for i in range(3)])
    results = list(by_id(resp).values())
    throttled = [r for r in results if r["status"] == 429]
    assert len(throttled) == 1 and throttled[0]["headers"]["Retry-After"] == "0.500"
    assert sorted(r["status"] for r in results) == [201, 201, 429]
    assert len(graph.folder_contacts(ALICE, fid)) == 2


def test_batch_runs_four_operations_at_a_time(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    get = {"method": "GET", "url": f"/users/{ALICE}/contactFolders/{fid}/contacts"}
    graph.faults.slow(0.1, count=20, path_regex="/contacts$")  # each operation, not the envelope
    started = time.monotonic()
    resp = batch(client, [{"id": str(i), **get} for i in range(20)])
    elapsed = time.monotonic() - started
    assert all(r["status"] == 200 for r in by_id(resp).values())
    # 5 waves of 4 take 0.5 s; 5 at a time would take 0.4 s, 2 at a time 1 s, one at a time 2 s.
    assert 0.48 <= elapsed < 0.9

    graph.faults.slow(0.05, count=6, path_regex="/contacts$")
    chain = [{"id": str(i), **get, **({"dependsOn": [str(i - 1)]} if i else {})} for i in range(6)]
    started = time.monotonic()
    assert all(r["status"] == 200 for r in by_id(batch(client, chain)).values())
    assert time.monotonic() - started >= 0.3  # dependsOn runs them one after another


def test_batch_operations_share_the_mailbox_concurrency_limit(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    url = f"/users/{ALICE}/contactFolders/{fid}/contacts"
    graph.faults.slow(0.4, count=5, path_regex="/contacts$")  # the five operations, not the envelope
    barrier = threading.Barrier(2)
    statuses: list[int] = []

    def send_batch() -> None:
        barrier.wait()
        resp = batch(
            client.with_token("tok-rw"), [{"id": str(i), "method": "GET", "url": url} for i in range(4)]
        )
        statuses.extend(r["status"] for r in resp.json()["responses"])

    def send_one() -> None:
        barrier.wait()
        statuses.append(client.with_token("tok-rw").get(url).status_code)

    threads = [threading.Thread(target=send_batch), threading.Thread(target=send_one)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200, 200, 200, 200, 429]


# --------------------------------------------------------------------------- limits, faults, counters
def test_fifth_concurrent_request_to_a_mailbox_is_throttled(client: GraphClient, graph: GraphService):
    graph.faults.latency = 0.3
    barrier = threading.Barrier(6)
    results: dict[str, list[requests.Response]] = {ALICE: [], BOB: []}

    def call(user: str) -> None:
        worker = client.with_token("tok-rw")
        barrier.wait()
        results[user].append(worker.get(f"/users/{user}/contactFolders"))

    threads = [threading.Thread(target=call, args=(u,)) for u in [ALICE] * 5 + [BOB]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in results[ALICE]) == [200, 200, 200, 200, 429]
    throttled = next(r for r in results[ALICE] if r.status_code == 429)
    assert error_code(throttled) == "ApplicationThrottled"
    assert "MailboxConcurrency" in throttled.json()["error"]["message"]
    assert float(throttled.headers["Retry-After"]) > 0
    assert [r.status_code for r in results[BOB]] == [200]  # other mailboxes are not affected


def test_request_window_per_mailbox_is_enforced(small_graph: tuple[GraphService, GraphClient]):
    _, client = small_graph
    statuses = [client.get(f"/users/{ALICE}/contactFolders").status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    throttled = client.get(f"/users/{ALICE}/contactFolders")
    assert error_code(throttled) == "ApplicationThrottled" and int(throttled.headers["Retry-After"]) >= 1
    assert client.get(f"/users/{BOB}/contactFolders").status_code == 200


def test_injected_faults_reach_the_client(client: GraphClient, graph: GraphService):
    url = f"/users/{ALICE}/contactFolders"
    graph.faults.reset()
    with pytest.raises(requests.ConnectionError):
        client.get(url)
    graph.faults.html()
    html = client.get(url)
    assert html.status_code == 502 and html.headers["Content-Type"].startswith("text/html")
    graph.faults.error(503, retry_after=2)
    busy = client.get(url)
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "2"
    assert busy.json()["error"]["innerError"]["request-id"]
    graph.faults.error(504)
    assert client.get(url).status_code == 504
    assert client.get(url).status_code == 200


def test_counters_record_calls_and_operations_per_mailbox(client: GraphClient, graph: GraphService):
    fid = make_folder(client)
    client.get(f"/users/{BOB}/contactFolders")
    get = {"method": "GET", "url": f"/users/{ALICE}/contactFolders/{fid}/contacts"}
    batch(client, [{"id": str(i), **get} for i in range(3)])

    alice = graph.mailbox_counters[ALICE]
    assert alice.http_count("POST", "folders.create") == 1
    assert alice.http_count("POST", "$batch") == 1
    assert alice.item_count("GET", "contacts.list") == 3
    assert alice.http_count("GET", "contacts.list") == 0  # inside the batch: items, not calls
    assert graph.mailbox_counters[BOB].http_total == 1
    assert graph.counters.http_total == 3 and graph.counters.item_count("GET", "contacts.list") == 3


# --------------------------------------------------------------------------- conformance switches
def test_immutable_id_preference_is_honoured_unless_the_tenant_switch_turns_it_off(
    client: GraphClient, graph: GraphService
):
    """Documented: `Prefer: IdType="ImmutableId"` makes Graph answer immutable ids, distinct from the
    default (REST) ids, and it says so in `Preference-Applied`. The switch `honour_immutable_ids =
    False` stands for a tenant that ignores the preference (the conformance check must notice).
    Source: "Obtain immutable identifiers for Outlook resources", https://learn.microsoft.com/graph/outlook-immutable-id
    """
    fid = make_folder(client)
    immutable_client = client.with_immutable_ids()
    created = immutable_client.post(
        f"/users/{ALICE}/contactFolders/{fid}/contacts", json={"displayName": "Ann"}
    )
    plain_id = client.get(f"/users/{ALICE}/contacts/{created.json()['id']}").json()["id"]
    assert created.json()["id"] != plain_id and "ImmutableId" in created.headers["Preference-Applied"]

    graph.honour_immutable_ids = False
    ignored = immutable_client.get(f"/users/{ALICE}/contacts/{plain_id}")
    assert ignored.json()["id"] == plain_id and "Preference-Applied" not in ignored.headers
