"""Microsoft Graph v1.0: the user's sync folder and its contacts.

Every request asks for immutable ids (`Prefer: IdType="ImmutableId"`), so a contact keeps its id
if the user moves it. Writes go through JSON `$batch` (≤ 20 per call); Graph runs at most four of an
unordered batch at a time against one mailbox, which is also the mailbox's concurrency limit, so one
batch in flight per mailbox uses the budget fully without provoking 429s (throttling-outlook docs).
The folder's delta query finds Outlook changes; `$expand` does not work on Outlook delta, so the
BC-id extended property of an unknown contact is read with a separate GET.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from shared.http_client import (
    AmbiguousWriteError,
    ApiError,
    BatchItem,
    ForeignUrlError,
    HttpClient,
    ItemResult,
    image_body,
)
from shared.mapping import BC_ID_PROPERTY_ID

IMMUTABLE_IDS = 'IdType="ImmutableId"'
BATCH_MAX = 20
DELTA_PAGE_SIZE = 200  # the most Outlook returns per contacts delta page (docs/API_NOTES.md §3)
LIST_PAGE_SIZE = 1000
CONTACT_SELECT = (
    "id",
    "displayName",
    "givenName",
    "surname",
    "emailAddresses",
    "companyName",
    "jobTitle",
    "businessPhones",
    "mobilePhone",
    "businessAddress",
    "businessHomePage",
    "parentFolderId",
    # The sync's category and the user's own (BEHAVIOUR §4.8); a new Outlook contact goes to the
    # company whose category it carries (BEHAVIOUR §5.4).
    "categories",
)
CATEGORY_COLOR = "preset7"  # the sync's category: Blue in Outlook's colour table (outlookcategory.md)
_EXPAND_TAG = f"singleValueExtendedProperties($filter=id eq '{BC_ID_PROPERTY_ID}')"


class DeltaExpired(Exception):
    """The stored delta link can no longer be used (410 Gone or syncStateNotFound): resync."""


class ForeignDeltaLink(DeltaExpired):
    """The stored delta link points outside the configured Graph base: refused unsent, so the run
    starts a fresh delta round (a full sync) instead of handing a token to another host."""


class FolderGone(Exception):
    """The sync folder no longer exists (deleted by the user)."""


@dataclass
class DeltaPage:
    changed: list[dict[str, Any]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    delta_link: str = ""
    # BC-id tags of contacts that were read whole by id (`fill_partial`), so no one asks again.
    tags: dict[str, str | None] = field(default_factory=dict)


def is_partial(item: dict[str, Any]) -> bool:
    """A delta item that lacks a property we select: Graph answers an updated item with its id and "at
    least the properties that have been updated" (delta-query-overview), so what is missing is
    unknown, not empty. Only a contact holding every selected property may be taken as whole."""
    return any(name not in item for name in CONTACT_SELECT)


def tag_of(contact: dict[str, Any]) -> str | None:
    """The BC id an Outlook contact carries in its extended property, if it was expanded."""
    for prop in contact.get("singleValueExtendedProperties") or []:
        if str(prop.get("id", "")).lower() == BC_ID_PROPERTY_ID.lower():
            value: str | None = prop.get("value")
            return value
    return None


def find_by_name(folders: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The folder of that display name, compared as Exchange does: without regard to case."""
    wanted = name.casefold()
    return next((f for f in folders if str(f.get("displayName") or "").casefold() == wanted), None)


def odata_string(value: str) -> str:
    """An OData string literal: quotes doubled, so user data can never end the literal early."""
    return "'" + value.replace("'", "''") + "'"


class GraphClient:
    def __init__(self, http: HttpClient, base_url: str):
        self.http = http
        self.base = base_url

    @staticmethod
    def user_path(user: str) -> str:
        return f"/users/{quote(user, safe='@')}"

    def _url(self, path: str) -> str:
        return f"{self.base}{path}"

    # Mailbox and folder ---------------------------------------------------------------
    def get_user(self, user: str) -> dict[str, Any]:
        return self.http.request(
            "GET", self._url(self.user_path(user)), params={"$select": "id,mail,userPrincipalName"}
        ).json_object()

    def find_folder(self, user: str, name: str) -> dict[str, Any] | None:
        """The folder under Contacts with this name. Exchange compares folder names without regard to
        case ("business central" is the folder "Business Central"), so this does too."""
        return find_by_name(self.folders_named(user, name), name)

    def folders_named(self, user: str, name: str) -> list[dict[str, Any]]:
        """The folders under Contacts that `$filter=displayName eq` matches (Exchange: any case)."""
        resp = self.http.request(
            "GET",
            self._url(f"{self.user_path(user)}/contactFolders"),
            params={"$filter": f"displayName eq {odata_string(name)}"},
        )
        return list(resp.body.get("value", []))

    def list_folders(self, user: str) -> list[dict[str, Any]]:
        """The folders directly under the default Contacts folder. A folder the user deleted is in
        Deleted Items and no longer listed here, though it still answers GET by id."""
        return self._get_all(
            self._url(f"{self.user_path(user)}/contactFolders"),
            {"$select": "id,displayName,parentFolderId", "$top": str(LIST_PAGE_SIZE)},
        )

    def _get_all(self, url: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """Every item of a collection, following `@odata.nextLink` (which carries the query itself)."""
        out: list[dict[str, Any]] = []
        next_url: str | None = url
        query: dict[str, str] | None = params
        while next_url:
            resp = self.http.request("GET", next_url, params=query)
            out.extend(resp.body.get("value", []))
            next_url = resp.body.get("@odata.nextLink")
            query = None
        return out

    def default_folder_id(self, user: str) -> str | None:
        """The id of the user's default Contacts folder, or None while it is empty and has no subfolder.

        Graph v1.0 documents no way to address that folder by a name ("List contactFolders" lists its
        children only; `/contacts/delta` without a folder id is undocumented). Its id is documented
        indirectly: it is the `parentFolderId` of every folder under it (user-list-contactfolders)
        and of every contact in it (`/users/{id}/contacts`, contactfolder-list-contacts). One request
        each, asked once per user: the id is kept in the user's state (the folder cannot be deleted).
        """
        for path in ("contactFolders", "contacts"):
            found = self.http.request(
                "GET",
                self._url(f"{self.user_path(user)}/{path}"),
                params={"$select": "id,parentFolderId", "$top": "1"},
            ).body.get("value", [])
            if found and found[0].get("parentFolderId"):
                return str(found[0]["parentFolderId"])
        return None

    def create_category(self, user: str, name: str, color: str) -> str:
        """Add `name` to the user's master category list (outlookuser-post-mastercategories, which
        needs MailboxSettings.ReadWrite). Returns "created" or "exists" (409: the name is taken, which
        is what we wanted); an ApiError otherwise (403: the permission is missing)."""
        try:
            self.http.request(
                "POST",
                self._url(f"{self.user_path(user)}/outlook/masterCategories"),
                json_body={"displayName": name, "color": color},
            )
        except ApiError as exc:
            if exc.status == 409:
                return "exists"
            raise
        return "created"

    def create_folder(self, user: str, name: str) -> dict[str, Any]:
        """Create the folder under Contacts; if Exchange says it exists (409 ErrorFolderExists, e.g.
        created meanwhile by Outlook or by a run of ours), use the existing one instead. An answer that
        does not say what happened (lost, unreadable, or a 2xx without the folder) is resolved the same
        way, by looking the folder up, never by creating it again."""
        try:
            body = self.http.request(
                "POST", self._url(f"{self.user_path(user)}/contactFolders"), json_body={"displayName": name}
            ).body
            if isinstance(body, dict) and body.get("id"):
                return body
            unknown: ApiError = AmbiguousWriteError(
                "graph",
                "POST",
                "contactFolders",
                None,
                "NoFolderInAnswer",
                "the answer did not hold the folder",
            )
        except AmbiguousWriteError as exc:
            unknown = exc
        except ApiError as exc:
            if exc.status != 409:
                raise
            unknown = exc
        # By name, then by reading them all, in case a tenant's `eq` ever compared case-sensitively.
        found = self.find_folder(user, name) or find_by_name(self.list_folders(user), name)
        if found is None:
            raise unknown
        return found

    def rename_folder(self, user: str, folder_id: str, name: str) -> dict[str, Any]:
        return self.http.request(
            "PATCH",
            self._url(f"{self.user_path(user)}/contactFolders/{quote(folder_id, safe='')}"),
            json_body={"displayName": name},
        ).json_object()

    # Reading contacts -------------------------------------------------------------------
    def delta(self, user: str, folder_id: str, delta_link: str | None) -> DeltaPage:
        """One full delta round: from the stored link (or the start) to the next deltaLink."""
        out = DeltaPage()
        seen: dict[str, dict[str, Any]] = {}
        removed: dict[str, None] = {}
        for items, link in self.delta_pages(user, folder_id, delta_link):
            out.delta_link = link  # "" until the last page
            for item in items:
                cid = item["id"]
                if "@removed" in item:
                    seen.pop(cid, None)
                    removed[cid] = None
                else:
                    removed.pop(cid, None)
                    seen[cid] = item  # replays: the last version wins
        out.changed = list(seen.values())
        out.removed = list(removed)
        return out

    def delta_pages(
        self, user: str, folder_id: str, delta_link: str | None
    ) -> Iterator[tuple[list[dict[str, Any]], str]]:
        """The same round a page at a time: its items in Graph's order (removed ones carry `@removed`)
        and, on the last page, the deltaLink (else ""). For a reader that can judge each page alone and
        stop early instead of holding the whole round in memory."""
        if delta_link:
            try:
                self.http.check_target(delta_link)
            except ForeignUrlError as exc:
                raise ForeignDeltaLink(str(exc)) from None
            url, params = delta_link, None
        else:
            url = self._url(
                f"{self.user_path(user)}/contactFolders/{quote(folder_id, safe='')}/contacts/delta"
            )
            params = {"$select": ",".join(CONTACT_SELECT)}
        headers = {"Prefer": f"odata.maxpagesize={DELTA_PAGE_SIZE}"}
        while True:
            try:
                resp = self.http.request("GET", url, params=params, headers=headers)
            except ApiError as exc:
                if exc.status == 410 or exc.code.lower() in (
                    "syncstatenotfound",
                    "resyncrequired",
                    "syncstateinvalid",
                ):
                    raise DeltaExpired(str(exc)) from None
                if exc.status == 404 and exc.code.lower() in (
                    "erroritemnotfound",
                    "itemnotfound",
                    "resourcenotfound",
                ):
                    raise FolderGone(str(exc)) from None
                raise
            params = None
            items: list[dict[str, Any]] = resp.body.get("value", [])
            next_link = resp.body.get("@odata.nextLink")
            if next_link:
                yield items, ""
                url = next_link
                continue
            link: str = resp.body.get("@odata.deltaLink", "")
            if link:
                # Stored, then called with a token on the next run: refuse a foreign one now, before
                # it reaches Table Storage (a nextLink is refused by the request that would follow it).
                self.http.check_target(link)
            yield items, link
            return

    def fill_partial(self, user: str, folder_id: str, page: DeltaPage) -> DeltaPage:
        """Replace partial delta items by the whole contacts, read by id in `$batch` (≤ 20 a call).

        Only items that lack a selected property are read, so a round of whole items (first rounds,
        created contacts, tenants that send updates whole) costs nothing more. A contact gone by now
        counts as removed. The BC-id tags come along and are kept in `page.tags`.
        """
        return self.read_whole(user, folder_id, page, [c["id"] for c in page.changed if is_partial(c)])

    def read_whole(self, user: str, folder_id: str, page: DeltaPage, ids: list[str]) -> DeltaPage:
        """Replace the items `ids` of `page` by the whole contacts with their tags (`$batch`, ≤ 20 a
        call); one gone by now counts as removed."""
        if not ids:
            return page
        found, missing = self.get_contacts(user, folder_id, ids)
        changed = []
        for contact in page.changed:
            cid = contact["id"]
            if cid in missing:
                continue
            if cid in found:
                contact = found[cid]
                page.tags[cid] = tag_of(contact)
                contact.pop("singleValueExtendedProperties", None)
            changed.append(contact)
        page.changed = changed
        page.removed = [*page.removed, *(i for i in ids if i in missing and i not in page.removed)]
        return page

    def list_contacts(self, user: str, folder_id: str, *, with_tag: bool = True) -> list[dict[str, Any]]:
        params = {"$select": ",".join(CONTACT_SELECT), "$top": str(LIST_PAGE_SIZE)}
        if with_tag:
            params["$expand"] = _EXPAND_TAG
        return self._get_all(
            self._url(f"{self.user_path(user)}/contactFolders/{quote(folder_id, safe='')}/contacts"), params
        )

    def get_contacts(
        self, user: str, folder_id: str, ids: list[str]
    ) -> tuple[dict[str, dict[str, Any]], set[str]]:
        """Full contacts (with their BC-id tag) by id; returns (found by id, ids no longer in the folder)."""
        query = f"?$select={','.join(CONTACT_SELECT)}&$expand={_EXPAND_TAG}"
        items = [self.contact_op(user, folder_id, "GET", i, query=query) for i in ids]
        found: dict[str, dict[str, Any]] = {}
        missing: set[str] = set()
        for cid, res in zip(ids, self._batch(items), strict=True):
            if res.ok and isinstance(res.body, dict):
                if res.body.get("parentFolderId") not in (None, folder_id):
                    # Ids are mailbox-wide, so a contact GET through our folder's path also answers
                    # for one elsewhere, e.g. in a deleted folder now in Deleted Items: not ours.
                    missing.add(cid)
                    continue
                found[cid] = res.body
            elif res.status == 404:
                missing.add(cid)
            else:
                raise ApiError("graph", "GET", cid, res.status, "BatchItemFailed", res.error or "")
        return found, missing

    # Contact photos (Graph "Get profilePhoto" / "Update profilePhoto") --------------------
    def _photo_url(self, user: str, folder_id: str, contact_id: str) -> str:
        return self._url(
            f"{self.user_path(user)}/contactFolders/{quote(folder_id, safe='')}/contacts/"
            f"{quote(contact_id, safe='')}/photo/$value"
        )

    def get_photo(self, user: str, folder_id: str, contact_id: str) -> bytes | None:
        """The contact's photo bytes, or None when it has none (Graph answers 404 then)."""
        url = self._photo_url(user, folder_id, contact_id)
        resp = self.http.request("GET", url, headers={"Accept": "*/*"}, allow_status=(404,), raw=True)
        if resp.status == 404 or not resp.body:
            return None
        return image_body(resp, "graph", url)

    def photo_etags(self, user: str, folder_id: str, ids: list[str]) -> dict[str, str | None]:
        """Each contact's photo `@odata.mediaEtag` ("Get profilePhoto" metadata, JSON, so 20 to a
        `$batch` call), or None for a contact without a photo (404). Tells a changed photo without
        reading its bytes."""
        results = self._batch([self.contact_op(user, folder_id, "GET", i, query="/photo") for i in ids])
        out: dict[str, str | None] = {}
        for contact_id, res in zip(ids, results, strict=True):
            if res.ok and isinstance(res.body, dict):
                out[contact_id] = str(res.body.get("@odata.mediaEtag") or "")
            elif res.status == 404:
                out[contact_id] = None
            else:
                raise ApiError("graph", "GET", contact_id, res.status, "BatchItemFailed", res.error or "")
        return out

    def put_photo(self, user: str, folder_id: str, contact_id: str, data: bytes, content_type: str) -> None:
        """Set the contact's photo: PUT .../photo/$value with the image bytes (200, no body)."""
        self.http.request(
            "PUT",
            self._photo_url(user, folder_id, contact_id),
            json_body=data,
            headers={"Accept": "*/*", "Content-Type": content_type},
            raw=True,
        )

    # Writing contacts -------------------------------------------------------------------
    def contact_op(
        self,
        user: str,
        folder_id: str | None,
        method: str,
        contact_id: str | None = None,
        body: dict[str, Any] | None = None,
        query: str = "",
    ) -> BatchItem:
        """One `$batch` operation on the folder's contacts (the collection when no contact id). Without a
        folder id, the default Contacts folder's (`/users/{id}/contacts`, user-post-contacts): only
        while its id is unknown, i.e. it is empty and has no subfolder."""
        if folder_id is None:
            path = f"{self.user_path(user)}/contacts"
        else:
            path = f"{self.user_path(user)}/contactFolders/{quote(folder_id, safe='')}/contacts"
        if contact_id is not None:
            path += f"/{quote(contact_id, safe='')}"
        return BatchItem(method, path + query, body)

    def write(self, items: list[BatchItem]) -> list[ItemResult]:
        """Operations from `contact_op`, in as many `$batch` calls as they need."""
        return self._batch(items)

    def _batch(self, items: list[BatchItem]) -> list[ItemResult]:
        # Headers of the $batch envelope do not reach its operations: each asks for immutable ids.
        for item in items:
            item.headers.setdefault("Prefer", IMMUTABLE_IDS)
        return self.http.batch(f"{self.base}/$batch", items, BATCH_MAX)

    # Change notifications (BEHAVIOUR §8.2) ----------------------------------------------------
    # "Create subscription", "Update subscription", "Delete subscription" (Microsoft Graph v1.0):
    # resource `users/{id}/contactFolders/{id}/contacts`, expiry at most 4,230 minutes ahead for contacts.
    def create_subscription(
        self,
        user: str,
        folder_id: str,
        notification_url: str,
        client_state: str,
        expires: str,
    ) -> dict[str, Any]:
        """Subscribe to created/updated/deleted contacts of the user's sync folder. Graph validates both
        URLs by calling them before it answers (our endpoint echoes the token)."""
        resource = (
            f"{self.user_path(user).lstrip('/')}/contactFolders/{folder_id}/contacts"  # ids are URL-safe
        )
        return self.http.request(
            "POST",
            self._url("/subscriptions"),
            json_body={
                "changeType": "created,updated,deleted",
                "notificationUrl": notification_url,
                "lifecycleNotificationUrl": notification_url,
                "resource": resource,
                "expirationDateTime": expires,
                "clientState": client_state,
            },
        ).json_object()

    def renew_subscription(self, subscription_id: str, expires: str) -> dict[str, Any]:
        """A new expiry; renewing also reauthorizes a subscription that asked for it."""
        return self.http.request(
            "PATCH",
            self._url(f"/subscriptions/{quote(subscription_id, safe='')}"),
            json_body={"expirationDateTime": expires},
        ).json_object()

    def delete_subscription(self, subscription_id: str) -> None:
        """Delete it; one Graph no longer has (404) is as good as deleted."""
        try:
            self.http.request("DELETE", self._url(f"/subscriptions/{quote(subscription_id, safe='')}"))
        except ApiError as exc:
            if exc.status != 404:
                raise

    def list_subscriptions(self) -> list[dict[str, Any]]:
        """The app's live subscriptions (Graph lists those the calling app created), all pages."""
        return self._get_all(self._url("/subscriptions"), {})
